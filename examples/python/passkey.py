#!/usr/bin/env python3
"""The llama2.c forward pass in NumPy, with `longheads` for attention: answers the shared
passkey prompts with the model trained at 256 tokens (passkey-256), 16x past its context.

    python3 examples/python/passkey.py --policy recommended        # every 4,096-token prompt
    python3 examples/python/passkey.py --policy python-bounds      # the scorer below, in NumPy

Policies: any name of longheads.policies() (paper, recommended, ...), or `python-bounds`: Quest's
chunk bound written here in NumPy (the query's largest possible dot product with any key of
the chunk, from the chunk's per-channel key minima and maxima) and passed to the library as a
callable. Needs ../shared beside the checkout (or --shared), and the module on PYTHONPATH
(pip install --no-build-isolation ., or CMake's build/python).
"""
import argparse
import json
import os
import struct
import sys
import time

import numpy as np

import longheads as lh

HERE = os.path.dirname(os.path.abspath(__file__))


class Model:
    """A llama2.c legacy checkpoint: 7 int32 (dim, hidden, layers, heads, kv heads, vocab
    (negative: a classifier of its own), seq_len), then the fp32 weights in a fixed order."""

    def __init__(self, path):
        with open(path, "rb") as f:
            dim, hidden, layers, heads, kv_heads, vocab, seq_len = struct.unpack("7i", f.read(28))
            weights = np.fromfile(f, dtype=np.float32)
        shared, vocab = vocab > 0, abs(vocab)
        self.dim, self.layers, self.heads, self.kv_heads, self.vocab = dim, layers, heads, kv_heads, vocab
        self.head_dim = dim // heads
        kv_dim = kv_heads * self.head_dim
        at = 0

        def take(*shape):
            nonlocal at
            n = int(np.prod(shape))
            block = weights[at:at + n].reshape(shape)
            at += n
            return block

        self.embedding = take(vocab, dim)
        self.rms_attention = take(layers, dim)
        self.wq, self.wk, self.wv = take(layers, dim, dim), take(layers, kv_dim, dim), take(layers, kv_dim, dim)
        self.wo = take(layers, dim, dim)
        self.rms_ffn = take(layers, dim)
        self.w1, self.w2, self.w3 = take(layers, hidden, dim), take(layers, dim, hidden), take(layers, hidden, dim)
        self.rms_final = take(dim)
        take(seq_len, self.head_dim // 2)  # RoPE tables of llama2.c's run.c; the library makes its own
        take(seq_len, self.head_dim // 2)
        self.classifier = self.embedding if shared else take(vocab, dim)


def rms_norm(x, weight):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-5) * weight


class Transformer:
    """The forward pass over a block of tokens; attention by one longheads layer object and
    one cache per transformer layer (pre-RoPE q and k: the library rotates them)."""

    def __init__(self, model, attention):
        self.model, self.attention = model, attention
        self.caches = [attention.make_cache() for _ in range(model.layers)]

    def forward(self, tokens):
        m = self.model
        x = m.embedding[tokens]  # [T, dim]
        T = len(tokens)
        for l in range(m.layers):
            xn = rms_norm(x, m.rms_attention[l])
            q = (xn @ m.wq[l].T).reshape(T, m.heads, m.head_dim)
            k = (xn @ m.wk[l].T).reshape(T, m.kv_heads, m.head_dim)
            v = (xn @ m.wv[l].T).reshape(T, m.kv_heads, m.head_dim)
            out = self.attention.prefill(self.caches[l], q, k, v)
            x = x + out.reshape(T, m.dim) @ m.wo[l].T
            xn = rms_norm(x, m.rms_ffn[l])
            gate = xn @ m.w1[l].T
            x = x + ((gate / (1 + np.exp(-gate))) * (xn @ m.w3[l].T)) @ m.w2[l].T
        return rms_norm(x[-1], m.rms_final) @ m.classifier.T  # the last token's logits

    def answer(self, prompt, count=5):
        """Greedy: the prompt in one prefill, then `count` tokens one at a time."""
        token = int(np.argmax(self.forward(prompt)))
        answer = [token]
        while len(answer) < count:
            token = int(np.argmax(self.forward(np.array([token], dtype=np.int32))))
            answer.append(token)
        return answer


def python_bounds(rope, offset_chunks=1):
    """Quest's chunk bound in NumPy: the query (rotated to its offset in a chunk `offset_chunks`
    chunks in, as the chunk's keys were rotated at their offsets) against [min | max] of the
    chunk's keys, sum_i max(q_i lo_i, q_i hi_i): no key of the chunk can score higher."""
    def scorer(queries, summaries, first_position, chunk_size):
        positions = (first_position + np.arange(len(queries))) % chunk_size + offset_chunks * chunk_size
        q = rope.rotate(queries, positions).astype(np.float64)
        d = q.shape[1]
        lo, hi = summaries[:, :d].astype(np.float64), summaries[:, d:].astype(np.float64)
        return np.maximum(q[:, None, :] * lo[None], q[:, None, :] * hi[None]).sum(-1)
    return scorer


def make_attention(model, policy, chunk_size=32, chunks=8, threads=1):
    config = lh.AttentionConfig(n_q_heads=model.heads, n_kv_heads=model.kv_heads, head_dim=model.head_dim, chunk_size=chunk_size,
                                budget_chunks=chunks)
    rope = lh.Rope(model.head_dim, 10000.0, "interleaved")  # llama2.c rotates interleaved pairs
    if policy == "python-bounds":  # Quest's key bounds as the encoder, the scorer above
        return lh.Attention(config, rope, policy="quest", scorer=python_bounds(rope), threads=threads)
    return lh.Attention(config, rope, policy=policy, threads=threads)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", default=os.path.join(HERE, "..", "..", "..", "shared"), help="the shared models and data")
    parser.add_argument("--policy", default="recommended", help="a name of longheads.policies(), or python-bounds")
    parser.add_argument("--length", type=int, default=4096, help="prompt length of the shared set (prompt + 5 answer tokens)")
    parser.add_argument("--prompts", type=int, default=0, help="at most this many prompts (0: all of the length)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    model_path = os.path.join(args.shared, "models", "passkey-256.bin")
    manifest = os.path.join(args.shared, "data", "passkey", "manifest.jsonl")
    if not os.path.exists(model_path) or not os.path.exists(manifest):
        print(f"passkey.py: {model_path} or {manifest} is missing (--shared)", file=sys.stderr)
        return 77
    model = Model(model_path)
    with open(manifest) as f:
        entries = [e for e in map(json.loads, f) if e["length"] == args.length]
    if args.prompts:
        entries = entries[:args.prompts]
    right = 0
    for e in entries:
        prompt = np.fromfile(os.path.join(os.path.dirname(manifest), e["file"]), dtype=np.int32)
        start = time.perf_counter()
        answer = Transformer(model, make_attention(model, args.policy, threads=args.threads)).answer(prompt)
        right += answer == e["answer_ids"]
        print(f"{e['file']}: passkey {e['passkey']}, answer {' '.join(map(str, answer))} "
              f"({'right' if answer == e['answer_ids'] else 'wrong'}), {time.perf_counter() - start:.2f} s")
    print(f"{args.policy}: {right}/{len(entries)} answered at {args.length} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
