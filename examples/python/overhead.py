#!/usr/bin/env python3
"""What a decode call costs from Python beyond the same call from C++, at a tiny shape (so
that the library's own work is small and the difference is the binding's): the same tokens
decoded into two copies of one cache, one call per token from Python and from a C++ loop
(Attention._decode_loop), in alternating rounds; medians of the per-call times. Then what a
scorer written in Python costs: a 4,096-token prefill with Quest's bound scored in C++ and
the same bound scored by a NumPy function (examples/python/passkey.py's python_bounds).

    PYTHONPATH=build/python python3 examples/python/overhead.py
"""
import argparse
import statistics
import sys
import time

import numpy as np

import longheads as lh


def measure(calls=2000, rounds=7, context=256, out_given=True):
    config = lh.AttentionConfig(n_q_heads=2, n_kv_heads=1, head_dim=16, chunk_size=8, budget_chunks=4)
    a = lh.Attention(config, lh.Rope(16), policy="recommended")
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((calls, h, 16), dtype=np.float32) for h in (2, 1, 1))
    prefix = [rng.standard_normal((context, h, 16), dtype=np.float32) for h in (2, 1, 1)]
    python_us, cpp_us = [], []
    for _ in range(rounds):
        start_cache = a.make_cache(reserve=context + calls)
        a.ingest(start_cache, *prefix)
        from_python, from_cpp = start_cache.copy(), start_cache.copy()
        out = np.empty((calls, 2, 16), dtype=np.float32)
        start = time.perf_counter()
        for t in range(calls):
            if out_given:
                a.decode(from_python, q[t:t + 1], k[t:t + 1], v[t:t + 1], out=out[t:t + 1])
            else:
                a.decode(from_python, q[t:t + 1], k[t:t + 1], v[t:t + 1])
        python_us.append((time.perf_counter() - start) / calls * 1e6)
        cpp_out = np.empty_like(out)
        cpp_us.append(a._decode_loop(from_cpp, q, k, v, cpp_out) / calls * 1e6)
        assert from_python == from_cpp  # the same calls
    return statistics.median(python_us), statistics.median(cpp_us)


def measure_scorer(tokens=4096, rounds=3):
    import os
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from passkey import python_bounds
    config = lh.AttentionConfig(n_q_heads=8, n_kv_heads=2, head_dim=64, chunk_size=32, budget_chunks=8)
    rope = lh.Rope(64)
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((tokens, h, 64), dtype=np.float32) for h in (8, 2, 2))
    layers = {"C++ bound_scorer (quest)": lh.Attention(config, rope, policy="quest"),
              "NumPy bound scorer": lh.Attention(config, rope, policy="quest", scorer=python_bounds(rope))}
    seconds = {name: [] for name in layers}
    for _ in range(rounds):
        for name, a in layers.items():
            start = time.perf_counter()
            a.prefill(a.make_cache(), q, k, v)
            seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in seconds.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    for out_given in (True, False):
        python_us, cpp_us = measure(args.calls, args.rounds, out_given=out_given)
        how = "out= given" if out_given else "out returned"
        print(f"decode, 2 q heads, 1 kv head, d 16, w 8, k 4 ({how}): from Python {python_us:.2f} us, from C++ {cpp_us:.2f} us, "
              f"overhead {python_us - cpp_us:.2f} us per call")
    for name, s in measure_scorer().items():
        print(f"prefill 4096 tokens, 8 q / 2 kv heads, d 64, w 32, k 8, {name}: {s * 1e3:.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
