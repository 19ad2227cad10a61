#!/usr/bin/env python3
"""Round trip through longheads_run from NumPy: the recipe docs/longheads_run.md walks through.

    python3 examples/docs/numpy_roundtrip.py build/examples/longheads_run

Saves pre-RoPE q/k/v of a GQA layer as .npy, runs longheads_run (dense and LongHeads), loads
out.npy back and checks it against attention computed here in NumPy. Exit code 0 when every
check holds, 77 when NumPy is not installed (apt-get install python3-numpy).
"""
import subprocess
import sys
import tempfile
from pathlib import Path

try:
    import numpy as np
except ImportError:
    print("numpy_roundtrip: NumPy is missing (apt-get install python3-numpy); skipped", file=sys.stderr)
    sys.exit(77)


# [snippet:numpy]
def rope_half(x, positions, theta=10000.0):
    """RoPE with the half layout (Hugging Face/NeoX): pairs (i, i + d/2). x: [T, H, d]."""
    d = x.shape[-1]
    inv_freq = theta ** (-np.arange(0, d, 2, dtype=np.float64) / d)
    angles = positions[:, None, None] * inv_freq[None, None, :]  # [T, 1, d/2]
    cos, sin = np.cos(angles), np.sin(angles)
    a, b = x[..., : d // 2], x[..., d // 2 :]
    return np.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)


def causal_attention(q, k, v):
    """Dense causal attention with RoPE at true positions, in float64. q: [T, Hq, d]."""
    T, Hq, d = q.shape
    group = Hq // k.shape[1]
    pos = np.arange(T, dtype=np.float64)
    qr, kr = rope_half(q.astype(np.float64), pos), rope_half(k.astype(np.float64), pos)
    kr, vr = np.repeat(kr, group, axis=1), np.repeat(v.astype(np.float64), group, axis=1)  # GQA
    logits = np.einsum("thd,shd->hts", qr, kr) / np.sqrt(d)
    logits[:, np.triu(np.ones((T, T), dtype=bool), 1)] = -np.inf
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("hts,shd->thd", p, vr)


def longheads_run(tool, q, k, v, *flags, work):
    """Saves q/k/v, runs the tool, loads its output (and the chunks each query read)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        np.save(work / f"{name}.npy", np.ascontiguousarray(x, dtype=np.float32))  # [T, heads, d], C order
    subprocess.run([tool, "--q", work / "q.npy", "--k", work / "k.npy", "--v", work / "v.npy",
                    "--out", work / "out.npy", *flags], check=True)
    return np.load(work / "out.npy")


# From PyTorch: q = q_proj(x).view(T, Hq, d).detach().float().cpu().numpy(), before RoPE;
# and back: torch.from_numpy(out).
# [/snippet:numpy]


def main():
    tool = sys.argv[1] if len(sys.argv) > 1 else "build/examples/longheads_run"
    rng = np.random.default_rng(0)
    T, Hq, Hkv, d = 300, 8, 2, 32
    q = rng.standard_normal((T, Hq, d), dtype=np.float32)
    k = rng.standard_normal((T, Hkv, d), dtype=np.float32)
    v = rng.standard_normal((T, Hkv, d), dtype=np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        # [snippet:checks]
        expected = causal_attention(q, k, v)
        dense = longheads_run(tool, q, k, v, "--attention", "dense", "--chunk-size", "32", "--chunks", "4", work=work)
        # A budget of 10 chunks * 32 = 320 tokens holds all 300: LongHeads is exact here.
        inside = longheads_run(tool, q, k, v, "--chunk-size", "32", "--chunks", "10", work=work)
        # A budget of 4 chunks (128 tokens) is 2.3x short: every head picks its own 4 chunks.
        past = longheads_run(tool, q, k, v, "--chunk-size", "32", "--chunks", "4",
                             "--selections", work / "selections.npy", work=work)
        selections = np.load(work / "selections.npy")  # [T, Hq, 4] chunk ids, -1 padded
        # [/snippet:checks]
        checks = {
            "dense vs NumPy": np.abs(dense - expected).max(),
            "LongHeads inside the budget vs NumPy": np.abs(inside - expected).max(),
        }
        ok = True
        for name, diff in checks.items():
            print(f"{name}: max |diff| {diff:.2e}")
            ok &= bool(diff <= 1e-4)
        last = selections[-1]
        print(f"last query's chunks per head: {last.tolist()}")
        ok &= past.shape == (T, Hq, d) and bool(np.isfinite(past).all())
        ok &= bool((last[:, 0] == 0).all()) and bool((last[:, -1] == (T - 1) // 32).all())  # sink and current chunk
        ok &= len({tuple(h) for h in last}) > 1  # heads choose differently
        ok &= bool(np.abs(past - expected).max() > 1e-3)  # past the budget it is not dense attention
        print("numpy round trip:", "ok" if ok else "FAILED")
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
