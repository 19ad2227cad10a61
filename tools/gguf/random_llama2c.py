#!/usr/bin/env python3
"""A random-weight llama2.c checkpoint of a real model's shape, for timing the GGUF host on
2 cores without a download (docs/gguf.md); its answers mean nothing.

    random_llama2c.py OUT.bin [--shape tinyllama|llama3-8b|smollm-360m|tiny] [--layers N]
                      [--ids OUT_IDS.bin --tokens T]

--layers cuts the model to N layers (time per token grows linearly with the layers; the
embedding and classifier are paid once). --ids also writes T random int32 token ids, a prompt
for longheads_chat --prompt-ids. Convert with llama2c_to_gguf.py (--type q4_k etc.).
"""
import argparse
import struct

import numpy as np

SHAPES = {  # dim, hidden, layers, heads, kv heads, vocab, context
    "tinyllama": (2048, 5632, 22, 32, 4, 32000, 2048),
    "llama3-8b": (4096, 14336, 32, 32, 8, 128256, 8192),
    "smollm-360m": (960, 2560, 32, 15, 5, 49152, 2048),
    "tiny": (64, 128, 2, 4, 2, 320, 256),  # for the tool's smoke test (a byte-level vocabulary fits in 320)
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--shape", default="tinyllama", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, default=0, help="0: the model's own")
    ap.add_argument("--ids")
    ap.add_argument("--tokens", type=int, default=4096)
    args = ap.parse_args()
    dim, hidden, layers, heads, kv_heads, vocab, seq = SHAPES[args.shape]
    layers = args.layers or layers
    hd = dim // heads
    kv = kv_heads * hd
    rng = np.random.default_rng(0)
    with open(args.out, "wb") as f:
        f.write(struct.pack("<7i", dim, hidden, layers, heads, kv_heads, -vocab, seq))  # negative vocab: own classifier

        def normal(n, scale):
            f.write((rng.standard_normal(n, dtype=np.float32) * scale).astype("<f4").tobytes())

        normal(vocab * dim, 1.0)
        f.write(np.ones(layers * dim, dtype="<f4").tobytes())
        for n in (dim * dim, kv * dim, kv * dim, dim * dim):
            normal(layers * n, dim ** -0.5)
        f.write(np.ones(layers * dim, dtype="<f4").tobytes())
        normal(layers * hidden * dim, dim ** -0.5)
        normal(layers * dim * hidden, hidden ** -0.5)
        normal(layers * hidden * dim, dim ** -0.5)
        f.write(np.ones(dim, dtype="<f4").tobytes())
        f.write(np.zeros(seq * hd, dtype="<f4").tobytes())  # freq_cis, unused
        normal(vocab * dim, dim ** -0.5)
    if args.ids:
        rng.integers(3, vocab, args.tokens).astype("<i4").tofile(args.ids)


if __name__ == "__main__":
    main()
