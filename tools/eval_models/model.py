"""A tiny Llama in PyTorch whose forward pass is llama2.c's run.c, and its export to the
llama2.c legacy checkpoint format our hosts read (examples/llama2c/checkpoint.hpp).

run.c's model: RMSNorm (eps 1e-5, weight * x / rms), RoPE on interleaved pairs (theta 10000,
frequencies 1 / theta^(2i / d) in float), grouped-query attention (query head h reads kv head
h / (H_q / H_kv)), SwiGLU feed-forward w2(silu(w1 x) * w3 x), a final RMSNorm and a classifier
shared with the embedding.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Shape:
    dim: int = 128
    hidden_dim: int = 352
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    vocab_size: int = 512
    seq_len: int = 256
    norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


def rope_angles(seq_len: int, head_dim: int):
    """cos and sin [seq_len, head_dim / 2] as run.c computes them (float frequencies)."""
    i = torch.arange(0, head_dim, 2, dtype=torch.float32)
    freq = 1.0 / torch.pow(torch.tensor(10000.0, dtype=torch.float32), i / head_dim)
    angle = torch.arange(seq_len, dtype=torch.float32)[:, None] * freq[None, :]
    return torch.cos(angle), torch.sin(angle)


def rotate(x, cos, sin):
    """x [B, T, H, d]: each pair (x[2i], x[2i+1]) turned by the position's angle i."""
    even, odd = x[..., 0::2], x[..., 1::2]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.stack([even * c - odd * s, even * s + odd * c], dim=-1).flatten(-2)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


class Layer(nn.Module):
    def __init__(self, s: Shape):
        super().__init__()
        self.s = s
        hd = s.head_dim
        self.attention_norm = RMSNorm(s.dim, s.norm_eps)
        self.wq = nn.Linear(s.dim, s.n_heads * hd, bias=False)
        self.wk = nn.Linear(s.dim, s.n_kv_heads * hd, bias=False)
        self.wv = nn.Linear(s.dim, s.n_kv_heads * hd, bias=False)
        self.wo = nn.Linear(s.n_heads * hd, s.dim, bias=False)
        self.ffn_norm = RMSNorm(s.dim, s.norm_eps)
        self.w1 = nn.Linear(s.dim, s.hidden_dim, bias=False)
        self.w2 = nn.Linear(s.hidden_dim, s.dim, bias=False)
        self.w3 = nn.Linear(s.dim, s.hidden_dim, bias=False)

    def forward(self, x, cos, sin, mask):
        s = self.s
        B, T, _ = x.shape
        h = self.attention_norm(x)
        q = rotate(self.wq(h).view(B, T, s.n_heads, s.head_dim), cos, sin)
        k = rotate(self.wk(h).view(B, T, s.n_kv_heads, s.head_dim), cos, sin)
        v = self.wv(h).view(B, T, s.n_kv_heads, s.head_dim)
        group = s.n_heads // s.n_kv_heads
        k = k.repeat_interleave(group, dim=2)
        v = v.repeat_interleave(group, dim=2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-1, -2) / math.sqrt(s.head_dim) + mask
        out = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(B, T, -1)
        x = x + self.wo(out)
        h = self.ffn_norm(x)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h))


class Llama(nn.Module):
    def __init__(self, s: Shape):
        super().__init__()
        self.s = s
        self.embedding = nn.Embedding(s.vocab_size, s.dim)
        self.layers = nn.ModuleList(Layer(s) for _ in range(s.n_layers))
        self.norm = RMSNorm(s.dim, s.norm_eps)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * s.n_layers) if name.endswith(("wo.weight", "w2.weight")) else 0.02
                nn.init.normal_(p, mean=0.0, std=std)
        cos, sin = rope_angles(s.seq_len, s.head_dim)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, tokens):
        T = tokens.shape[1]
        x = self.embedding(tokens)
        mask = torch.full((T, T), float("-inf")).triu(1)
        for layer in self.layers:
            x = layer(x, self.cos[:T], self.sin[:T], mask)
        return self.norm(x) @ self.embedding.weight.t()  # the shared classifier


def export_llama2c(model: Llama, path: str) -> None:
    """The llama2.c legacy format: 7 int32 (dim, hidden, layers, heads, kv heads, vocab (positive:
    shared classifier), seq_len), then fp32 tensors in run.c's order, each layer's in turn."""
    s = model.s
    L = model.layers

    def put(f, t):
        f.write(t.detach().float().contiguous().numpy().astype("<f4").tobytes())

    with open(path, "wb") as f:
        f.write(struct.pack("<7i", s.dim, s.hidden_dim, s.n_layers, s.n_heads, s.n_kv_heads, s.vocab_size, s.seq_len))
        put(f, model.embedding.weight)
        for name in ("attention_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w1", "w2", "w3"):
            for layer in L:
                put(f, getattr(layer, name).weight)
        put(f, model.norm.weight)
        cos, sin = rope_angles(s.seq_len, s.head_dim)
        put(f, cos)  # freq_cis_real, read and ignored by run.c's later versions
        put(f, sin)


def load_llama2c(path: str) -> Llama:
    """The inverse of export_llama2c (shared classifier)."""
    import numpy as np

    with open(path, "rb") as f:
        dim, hidden, layers, heads, kv_heads, vocab, seq_len = struct.unpack("<7i", f.read(28))
        if vocab <= 0:
            raise ValueError(f"{path}: a separate classifier is not read here")
        model = Llama(Shape(dim, hidden, layers, heads, kv_heads, vocab, seq_len))
        data = np.frombuffer(f.read(), dtype="<f4")
    at = 0

    def take(t):
        nonlocal at
        n = t.numel()
        if at + n > data.size:
            raise ValueError(f"{path}: truncated")
        with torch.no_grad():
            t.copy_(torch.from_numpy(data[at:at + n].copy()).view_as(t))
        at += n

    take(model.embedding.weight)
    for name in ("attention_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w1", "w2", "w3"):
        for layer in model.layers:
            take(getattr(layer, name).weight)
    take(model.norm.weight)
    return model
