#!/usr/bin/env bash
# Writes gguf_fuzzer's seed corpus: a tiny random llama2.c model (dim 32, 1 layer, 2 heads,
# vocab 8) converted to GGUF as F32, F16, Q8_0 and Q4_0 (7-40 kB), and files of two 256-wide
# rows each of Q4_K, Q5_K, Q6_K and BF16 (under 2 kB).
#   tests/fuzz/make_gguf_corpus.sh     (needs python3 with NumPy)
set -euo pipefail
cd "$(dirname "$0")"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p gguf_corpus
/usr/bin/python3 - "$tmp" <<'PY'
import struct, sys
import numpy as np
rng = np.random.default_rng(5)
def write(path, dim, hidden, heads, kv_heads, vocab, seq_len, layers=1):
    hd = dim // heads; kv = kv_heads * hd
    n = vocab*dim + layers*(2*dim + 2*dim*dim + 2*kv*dim + 3*hidden*dim) + dim + seq_len*hd
    with open(path, "wb") as f:
        f.write(struct.pack("<7i", dim, hidden, layers, heads, kv_heads, vocab, seq_len))
        f.write(rng.normal(0, 0.2, n).astype("<f4").tobytes())
write(sys.argv[1] + "/tiny.bin", 32, 64, 2, 1, 8, 16)
sys.path.insert(0, "../../tools/gguf")
import llama2c_to_gguf as g
for kind in ("q4_k", "q5_k", "q6_k", "bf16"):
    w = g.writer()
    w.add("general.architecture", g.STRING, "llama")
    x = rng.normal(0, 1, (2, 256)).astype(np.float32)
    w.write(f"gguf_corpus/rows-{kind}.gguf", [("rows.weight", [2, 256], g.TYPES[kind][0], g.encode(x, kind))], 3)
PY
for t in f32 f16 q8_0 q4_0; do /usr/bin/python3 ../../tools/gguf/llama2c_to_gguf.py "$tmp/tiny.bin" "gguf_corpus/tiny-$t.gguf" --type $t; done
