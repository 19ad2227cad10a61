#!/usr/bin/env python3
"""docs/python.md's quick start, run by CI (ctest python_quickstart): one LongHeads layer over
NumPy arrays, a sequence prefilled then decoded, the chunks each head read, and a scorer
written in Python."""
import numpy as np

# [snippet:quickstart]
import longheads as lh

# One attention layer: 8 query heads sharing 2 kv heads (GQA), d 64, chunks of 32 tokens, each
# head reading 8 of them (a 256-token budget) per query.
config = lh.AttentionConfig(n_q_heads=8, n_kv_heads=2, head_dim=64, chunk_size=32, budget_chunks=8)
rope = lh.Rope(64, base=10000.0, layout="half")  # "interleaved" for Meta / llama2.c weights
attention = lh.Attention(config, rope, policy="recommended", threads=2)
cache = attention.make_cache()

# q, k, v: float32 [tokens, heads, head_dim], before RoPE, as your projections give them.
rng = np.random.default_rng(0)
q = rng.standard_normal((4096, 8, 64), dtype=np.float32)
k = rng.standard_normal((4096, 2, 64), dtype=np.float32)
v = rng.standard_normal((4096, 2, 64), dtype=np.float32)

out = attention.prefill(cache, q[:4000], k[:4000], v[:4000])  # [4000, 8, 64]
for t in range(4000, 4096):  # then token by token: the same bits as one prefill
    step, chosen = attention.decode(cache, q[t:t + 1], k[t:t + 1], v[t:t + 1], selections=True)
print(cache.tokens, "tokens;", "head 0 read chunks", cache.last_selection(0))

# A scorer of your own: queries [m, d] (before RoPE), the chunks' summaries [n, r] (here the
# recommended policy's key bounds [min | max] per channel), the first query's position and w.
def loudest_channel(queries, summaries, first_position, chunk_size):
    d = queries.shape[1]
    reach = np.maximum(np.abs(summaries[:, :d]), np.abs(summaries[:, d:]))  # [n, d]
    return np.abs(queries) @ reach.T  # [m, n]: no rotation, an upper bound of |q . k|

mine = lh.Attention(config, rope, policy="recommended", scorer=loudest_channel)
out_mine = mine.prefill(mine.make_cache(), q, k, v)
print("last token, max |difference| from the recommended policy's output:", np.abs(out_mine[-1] - step[0]).max())
# [/snippet:quickstart]

assert out.shape == (4000, 8, 64) and cache.tokens == 4096 and chosen.shape == (1, 8, 8)
print("quickstart: ok")
