#!/usr/bin/env python3
"""Writes a llama2.c legacy checkpoint as a GGUF v3 file (llama architecture), so the GGUF host
can be tested on our own models without a download (examples/gguf, tests/gguf_test.cpp).

    llama2c_to_gguf.py MODEL.bin OUT.gguf [--type f32|f16|bf16|q8_0|q4_0|q4_k|q5_k|q6_k]
                       [--vocab VOCAB.txt | --byte-vocab] [--version 2|3] [--arch llama|qwen2]

Layout, as llama.cpp's writer makes it: header, metadata, tensor infos, padding to
general.alignment (32), then each tensor's data at an offset that is a multiple of 32.
ggml lists a tensor's dimensions innermost first, so a [rows, cols] row-major matrix is
ne = [cols, rows]. q/k rows are written as llama2.c holds them: llama2.c, like Meta's Llama,
rotates adjacent pairs, which is the layout llama.cpp expects of the llama architecture (its
own converter un-permutes Hugging Face checkpoints back to it), so no permutation is applied.

--arch qwen2 writes the same model as llama.cpp's qwen2 architecture holds one: q/k rows in
Hugging Face's layout (each head's rotated pairs split into halves, HF's permute of Meta's
rows), which llama.cpp rotates as halves (NEOX), and q/k/v biases (zero here); the GGUF host
must then answer as it does for the llama file (tests/gguf_test.cpp).

Quantisation (--type) applies to the 2-D weights; norms stay F32 as in llama.cpp's files. A
K-quant needs rows of a multiple of 256 values: a matrix whose rows are shorter or ragged is
written as Q8_0 instead (llama.cpp falls back the same way), and the type each tensor got is
printed. The quantisers are simple round-to-nearest ones, not llama.cpp's searched scales:
what the tests need is valid blocks whose dequantised values the C++ reader must reproduce,
and a stated error.

The vocabulary: tokenizer.ggml.model "llama" with tokens, scores and token types. With
--vocab (id<TAB>string lines, as ../shared/models/passkey-256.vocab.txt, one word per token)
each word is written as SentencePiece writes a word, "\u2581word", so the GGUF host prints
" the pass key is ..." (ids 0-2, <unk> <s> </s>, stay as they are, control tokens); such a
word-level vocabulary has no pieces smaller than words, so text cannot be encoded into it by
SentencePiece's merges: feed it token ids (longheads_chat --prompt-ids). --byte-vocab writes a
byte-level BPE vocabulary ("gpt2", GPT-2's pre-tokenizer, no merges: every byte its own token,
ids 0-255, the rest placeholders, the last one BOS/EOS) so any text can be fed to a model of at
least 257 tokens (the tool's smoke test). Without either, placeholders "<tok_N>"
(stories260K's tokenizer.bin is not in ../shared).
"""
import argparse
import struct
import sys

import numpy as np

GGUF_MAGIC = 0x46554747
ALIGNMENT = 32
# ggml type ids and (block elements, block bytes)
TYPES = {"f32": (0, 1, 4), "f16": (1, 1, 2), "q4_0": (2, 32, 18), "q8_0": (8, 32, 34), "q4_k": (12, 256, 144),
         "q5_k": (13, 256, 176), "q6_k": (14, 256, 210), "bf16": (30, 1, 2)}
# GGUF metadata value types
U32, I32, F32, BOOL, STRING, ARRAY = 4, 5, 6, 7, 8, 9


def read_llama2c(path):
    with open(path, "rb") as f:
        dim, hidden, layers, heads, kv_heads, vocab, seq_len = struct.unpack("<7i", f.read(28))
        data = np.frombuffer(f.read(), dtype="<f4")
    shared = vocab > 0
    vocab = abs(vocab)
    hd = dim // heads
    kv = kv_heads * hd
    at = 0

    def take(*shape):
        nonlocal at
        n = int(np.prod(shape))
        out = data[at:at + n].reshape(shape)
        at += n
        return out

    t = {"token_embd.weight": take(vocab, dim)}
    rms_att = take(layers, dim)
    wq, wk, wv, wo = take(layers, dim, dim), take(layers, kv, dim), take(layers, kv, dim), take(layers, dim, dim)
    rms_ffn = take(layers, dim)
    w1, w2, w3 = take(layers, hidden, dim), take(layers, dim, hidden), take(layers, hidden, dim)
    rms_final = take(dim)
    take(seq_len, hd)  # freq_cis real + imag
    classifier = None if shared else take(vocab, dim)
    for l in range(layers):
        p = f"blk.{l}."
        t[p + "attn_norm.weight"] = rms_att[l]
        t[p + "attn_q.weight"] = wq[l]
        t[p + "attn_k.weight"] = wk[l]
        t[p + "attn_v.weight"] = wv[l]
        t[p + "attn_output.weight"] = wo[l]
        t[p + "ffn_norm.weight"] = rms_ffn[l]
        t[p + "ffn_gate.weight"] = w1[l]
        t[p + "ffn_down.weight"] = w2[l]
        t[p + "ffn_up.weight"] = w3[l]
    t["output_norm.weight"] = rms_final
    if classifier is not None:
        t["output.weight"] = classifier
    config = dict(dim=dim, hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads, vocab=vocab, seq_len=seq_len)
    return config, t


# ---- quantisers: blocks laid out as ggml-common.h declares them --------------------------------

def f16_bytes(x):
    return np.asarray(x, dtype="<f2")


def quant_q8_0(x):
    b = x.reshape(-1, 32).astype(np.float32)
    amax = np.abs(b).max(axis=1)
    d = (amax / 127).astype(np.float16)
    inv = np.where(d.astype(np.float32) > 0, 1 / np.maximum(d.astype(np.float32), 1e-30), 0)
    q = np.clip(np.rint(b * inv[:, None]), -127, 127).astype(np.int8)
    out = np.zeros((b.shape[0], 34), dtype=np.uint8)
    out[:, 0:2] = d.astype("<f2").view(np.uint8).reshape(-1, 2)
    out[:, 2:] = q.view(np.uint8)
    return out


def quant_q4_0(x):
    b = x.reshape(-1, 32).astype(np.float32)
    idx = np.abs(b).argmax(axis=1)
    vmax = b[np.arange(b.shape[0]), idx]
    d = (vmax / -8).astype(np.float16)
    df = d.astype(np.float32)
    inv = np.where(df != 0, 1 / np.where(df != 0, df, 1), 0)
    q = np.clip(np.rint(b * inv[:, None]) + 8, 0, 15).astype(np.uint8)
    out = np.zeros((b.shape[0], 18), dtype=np.uint8)
    out[:, 0:2] = d.astype("<f2").view(np.uint8).reshape(-1, 2)
    out[:, 2:] = q[:, :16] | (q[:, 16:] << 4)
    return out


def pack_scale_min_k4(sc, mn):
    """8 six-bit scales and mins per block into ggml's 12-byte layout (inverse of get_scale_min_k4)."""
    n = sc.shape[0]
    s = np.zeros((n, 12), dtype=np.uint8)
    s[:, 0:4] = (sc[:, 0:4] & 63) | ((sc[:, 4:8] >> 4) << 6)
    s[:, 4:8] = (mn[:, 0:4] & 63) | ((mn[:, 4:8] >> 4) << 6)
    s[:, 8:12] = (sc[:, 4:8] & 0xF) | ((mn[:, 4:8] & 0xF) << 4)
    return s


def quant_k_affine(x, bits):
    """Q4_K / Q5_K: 256-value blocks of 8 sub-blocks of 32, x ~ d*sc*q - dmin*m."""
    levels = (1 << bits) - 1
    b = x.reshape(-1, 8, 32).astype(np.float32)
    lo = np.minimum(b.min(axis=2), 0)
    hi = b.max(axis=2)
    scale = (hi - lo) / levels  # per sub-block
    mins = -lo
    d = (scale.max(axis=1) / 63).astype(np.float16)
    dmin = (mins.max(axis=1) / 63).astype(np.float16)
    df, dminf = d.astype(np.float32), dmin.astype(np.float32)
    sc = np.clip(np.rint(scale / np.where(df > 0, df, 1)[:, None]), 0, 63).astype(np.uint8)
    mn = np.clip(np.rint(mins / np.where(dminf > 0, dminf, 1)[:, None]), 0, 63).astype(np.uint8)
    step = df[:, None] * sc
    offset = dminf[:, None] * mn
    q = np.rint((b + offset[:, :, None]) / np.where(step > 0, step, 1)[:, :, None])
    q = np.clip(np.where(step[:, :, None] > 0, q, 0), 0, levels).astype(np.uint8)  # [n, 8, 32]
    n = b.shape[0]
    head = np.zeros((n, 4), dtype=np.uint8)
    head[:, 0:2] = d.astype("<f2").view(np.uint8).reshape(-1, 2)
    head[:, 2:4] = dmin.astype("<f2").view(np.uint8).reshape(-1, 2)
    scales = pack_scale_min_k4(sc, mn)
    low = q & 0xF
    # qs: for each 64-value group g, byte l holds sub-block 2g's low nibble and 2g+1's as the high one
    qs = (low[:, 0::2, :] | (low[:, 1::2, :] << 4)).reshape(n, 128)
    if bits == 4:
        return np.concatenate([head, scales, qs], axis=1)
    high = (q >> 4) & 1  # [n, 8, 32]: bit j of qh[l] is sub-block j's fifth bit
    qh = np.zeros((n, 32), dtype=np.uint8)
    for j in range(8):
        qh |= (high[:, j, :] << j).astype(np.uint8)
    return np.concatenate([head, scales, qh, qs], axis=1)


def quant_q6_k(x):
    """Q6_K: 256-value blocks of 16 sub-blocks of 16, x ~ d*sc*(q-32), int8 sub-scales."""
    b = x.reshape(-1, 16, 16).astype(np.float32)
    n = b.shape[0]
    idx = np.abs(b).argmax(axis=2)
    vmax = np.take_along_axis(b, idx[:, :, None], axis=2)[:, :, 0]
    scale = vmax / -32
    amax = np.abs(scale).max(axis=1)
    d = (amax / 127).astype(np.float16)
    df = d.astype(np.float32)
    sc = np.clip(np.rint(scale / np.where(df > 0, df, 1)[:, None]), -128, 127).astype(np.int8)
    step = df[:, None] * sc
    q = np.rint(b / np.where(step != 0, step, 1)[:, :, None])
    q = (np.clip(np.where(step[:, :, None] != 0, q, 0), -32, 31) + 32).astype(np.uint8).reshape(n, 256)
    ql = np.zeros((n, 128), dtype=np.uint8)
    qh = np.zeros((n, 64), dtype=np.uint8)
    for half in range(2):  # 128 values each: ql 64 bytes, qh 32 bytes
        v = q[:, half * 128:(half + 1) * 128]
        q1, q2, q3, q4 = v[:, 0:32], v[:, 32:64], v[:, 64:96], v[:, 96:128]
        ql[:, half * 64:half * 64 + 32] = (q1 & 0xF) | ((q3 & 0xF) << 4)
        ql[:, half * 64 + 32:half * 64 + 64] = (q2 & 0xF) | ((q4 & 0xF) << 4)
        qh[:, half * 32:half * 32 + 32] = (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6)
    tail = d.astype("<f2").view(np.uint8).reshape(-1, 2)
    return np.concatenate([ql, qh, sc.view(np.uint8), tail], axis=1)


def encode(array, kind):
    x = np.ascontiguousarray(array, dtype=np.float32)
    if kind == "f32":
        return x.astype("<f4").tobytes()
    if kind == "f16":
        return x.astype("<f2").tobytes()
    if kind == "bf16":
        bits = x.view(np.uint32)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2")  # round to nearest even
        return rounded.tobytes()
    quant = {"q8_0": quant_q8_0, "q4_0": quant_q4_0, "q4_k": lambda v: quant_k_affine(v, 4),
             "q5_k": lambda v: quant_k_affine(v, 5), "q6_k": quant_q6_k}[kind]
    return quant(x).tobytes()


def tensor_kind(name, array, wanted):
    if array.ndim == 1:
        return "f32"
    row = array.shape[-1]
    block = TYPES[wanted][1]
    if row % block != 0:
        return "q8_0" if row % 32 == 0 and wanted not in ("f32", "f16", "bf16") else "f16" if wanted != "f32" else "f32"
    return wanted


# ---- GGUF writer ------------------------------------------------------------------------------

class writer:
    def __init__(self):
        self.kv = []

    @staticmethod
    def string(s):
        b = s.encode("utf-8") if isinstance(s, str) else s
        return struct.pack("<Q", len(b)) + b

    def add(self, key, vtype, value, element=None):
        self.kv.append((key, vtype, value, element))

    def value(self, vtype, value, element=None):
        if vtype == U32:
            return struct.pack("<I", value)
        if vtype == I32:
            return struct.pack("<i", value)
        if vtype == F32:
            return struct.pack("<f", value)
        if vtype == BOOL:
            return struct.pack("<B", 1 if value else 0)
        if vtype == STRING:
            return self.string(value)
        if vtype == ARRAY:
            return struct.pack("<IQ", element, len(value)) + b"".join(self.value(element, v) for v in value)
        raise ValueError(vtype)

    def write(self, path, tensors, version):
        out = bytearray(struct.pack("<IIQQ", GGUF_MAGIC, version, len(tensors), len(self.kv)))
        for key, vtype, value, element in self.kv:
            out += self.string(key) + struct.pack("<I", vtype) + self.value(vtype, value, element)
        offset = 0
        blobs = []
        for name, shape, type_id, blob in tensors:
            ne = list(reversed(shape))  # innermost first
            out += self.string(name) + struct.pack("<I", len(ne)) + b"".join(struct.pack("<Q", d) for d in ne)
            out += struct.pack("<IQ", type_id, offset)
            blobs.append((offset, blob))
            offset += (len(blob) + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT
        out += b"\0" * ((-len(out)) % ALIGNMENT)
        start = len(out)
        for off, blob in blobs:
            out += b"\0" * (start + off - len(out))
            out += blob
        with open(path, "wb") as f:
            f.write(out)


def permute_to_halves(w, n_head):
    """Meta's rows (pairs 2i, 2i+1 of each head) to Hugging Face's (i, i + d/2)."""
    rows, cols = w.shape
    return w.reshape(n_head, rows // n_head // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--type", default="f32", choices=sorted(TYPES))
    ap.add_argument("--vocab", help="id<TAB>string lines (passkey-256.vocab.txt)")
    ap.add_argument("--byte-vocab", action="store_true", help="a byte-level BPE vocabulary of the 256 bytes (text in for any model)")
    ap.add_argument("--version", type=int, default=3, choices=[2, 3])
    ap.add_argument("--name", default=None)
    ap.add_argument("--arch", default="llama", choices=["llama", "qwen2"])
    args = ap.parse_args()

    c, tensors = read_llama2c(args.model)
    arch = args.arch
    if arch == "qwen2":
        kv = c["kv_heads"] * (c["dim"] // c["heads"])
        for l in range(c["layers"]):
            p = f"blk.{l}."
            tensors[p + "attn_q.weight"] = permute_to_halves(tensors[p + "attn_q.weight"], c["heads"])
            tensors[p + "attn_k.weight"] = permute_to_halves(tensors[p + "attn_k.weight"], c["kv_heads"])
            tensors[p + "attn_q.bias"] = np.zeros(c["dim"], dtype=np.float32)
            tensors[p + "attn_k.bias"] = np.zeros(kv, dtype=np.float32)
            tensors[p + "attn_v.bias"] = np.zeros(kv, dtype=np.float32)
    w = writer()
    w.add("general.architecture", STRING, arch)
    w.add("general.name", STRING, args.name or args.model.rsplit("/", 1)[-1])
    w.add("general.alignment", U32, ALIGNMENT)
    w.add(f"{arch}.context_length", U32, c["seq_len"])
    w.add(f"{arch}.embedding_length", U32, c["dim"])
    w.add(f"{arch}.block_count", U32, c["layers"])
    w.add(f"{arch}.feed_forward_length", U32, c["hidden"])
    w.add(f"{arch}.attention.head_count", U32, c["heads"])
    w.add(f"{arch}.attention.head_count_kv", U32, c["kv_heads"])
    w.add(f"{arch}.rope.dimension_count", U32, c["dim"] // c["heads"])
    w.add(f"{arch}.attention.layer_norm_rms_epsilon", F32, 1e-5)
    w.add(f"{arch}.rope.freq_base", F32, 10000.0)

    tokens = [f"<tok_{i}>" for i in range(c["vocab"])]
    if args.vocab:
        with open(args.vocab, encoding="utf-8") as f:
            for line in f:
                if "\t" in line:
                    i, s = line.rstrip("\n").split("\t", 1)
                    if 3 <= int(i) < len(tokens):
                        tokens[int(i)] = "\u2581" + s
    if args.byte_vocab:
        if c["vocab"] < 257:
            sys.exit("--byte-vocab needs a vocabulary of at least 257 tokens")
        chars, extra = [], 256
        for b in range(256):  # GPT-2's bytes_to_unicode
            printable = 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255
            chars.append(chr(b) if printable else chr(extra))
            extra += 0 if printable else 1
        tokens = chars + [f"<tok_{i}>" for i in range(256, c["vocab"] - 1)] + ["<|endoftext|>"]
        w.add("tokenizer.ggml.model", STRING, "gpt2")
        w.add("tokenizer.ggml.pre", STRING, "gpt-2")
        w.add("tokenizer.ggml.tokens", ARRAY, tokens, STRING)
        w.add("tokenizer.ggml.merges", ARRAY, [], STRING)
        w.add("tokenizer.ggml.token_type", ARRAY, [1] * 256 + [5] * (c["vocab"] - 257) + [3], I32)
        w.add("tokenizer.ggml.bos_token_id", U32, c["vocab"] - 1)
        w.add("tokenizer.ggml.eos_token_id", U32, c["vocab"] - 1)
    else:
        w.add("tokenizer.ggml.model", STRING, "llama")
        w.add("tokenizer.ggml.tokens", ARRAY, tokens, STRING)
        w.add("tokenizer.ggml.scores", ARRAY, [0.0] * len(tokens), F32)
        w.add("tokenizer.ggml.token_type", ARRAY, [2 if i == 0 else 3 if i < 3 else 1 for i in range(len(tokens))], I32)
        w.add("tokenizer.ggml.bos_token_id", U32, 1)
        w.add("tokenizer.ggml.eos_token_id", U32, 2)

    out = []
    counts = {}
    for name, array in tensors.items():
        kind = tensor_kind(name, array, args.type)
        counts[kind] = counts.get(kind, 0) + 1
        out.append((name, list(array.shape), TYPES[kind][0], encode(array, kind)))
    w.write(args.out, out, args.version)
    print(f"{args.out}: {len(out)} tensors (" + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) + ")")


if __name__ == "__main__":
    sys.exit(main())
