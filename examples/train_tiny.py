"""Train a tiny causal transformer on the CPU with attnc's attention, and compare it with the same model on SDPA.

    python examples/train_tiny.py [--steps 300]

The data is generated: each sequence counts up from a random start with a random stride (mod the vocabulary),
so the next token is predictable from the two before it and the loss can fall well below log(vocab). Three
runs from the same initial weights and the same batches: SDPA's causal attention, attnc's causal softmax
(examples/causal.attn), and a sigmoid-normalized causal variant that SDPA cannot express. attnc derives both
backward passes; the softmax run's loss curve should match SDPA's to float32 rounding, and the sigmoid run
should learn too.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import attnc

HERE = Path(__file__).resolve().parent
VOCAB, SEQ, BATCH, DIM, HEADS, LAYERS = 32, 32, 16, 32, 2, 2
SIGMOID_CAUSAL = """variant sigmoid_causal
let q_pos = q_idx + KV - Q
mask = q_pos >= kv_idx
score = score - log(KV)
norm = sigmoid
"""


def batches(steps: int, seed: int = 0):
    """(tokens, targets) per step: counting sequences with a random start and stride."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        start = torch.randint(0, VOCAB, (BATCH, 1), generator=g)
        stride = torch.randint(1, 4, (BATCH, 1), generator=g)
        seq = (start + stride * torch.arange(SEQ + 1)) % VOCAB
        yield seq[:, :-1], seq[:, 1:]


class Block(nn.Module):
    def __init__(self, attention):
        super().__init__()
        self.attention = attention
        self.norm1, self.norm2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.qkv, self.proj = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)
        self.mlp = nn.Sequential(nn.Linear(DIM, 4 * DIM), nn.GELU(), nn.Linear(4 * DIM, DIM))

    def forward(self, x):
        B, S, _ = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, S, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)
        y = self.attention(q, k, v).transpose(1, 2).reshape(B, S, DIM)
        x = x + self.proj(y)
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    def __init__(self, attention):
        super().__init__()
        self.embed, self.pos = nn.Embedding(VOCAB, DIM), nn.Parameter(torch.zeros(SEQ, DIM))
        self.blocks = nn.ModuleList(Block(attention) for _ in range(LAYERS))
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, tokens):
        x = self.embed(tokens) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


ATTENTIONS = {
    "sdpa": lambda: sdpa,
    "attnc-causal": lambda: attnc.compile(str(HERE / "causal.attn")),
    "attnc-sigmoid": lambda: attnc.compile(SIGMOID_CAUSAL),
}


def train(name: str, steps: int, seed: int = 0, lr: float = 3e-3) -> list[float]:
    """The loss at every step of training a fresh TinyLM (the same weights for every name) with `name`'s attention."""
    torch.manual_seed(seed)
    model = TinyLM(ATTENTIONS[name]())
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for tokens, targets in batches(steps, seed):
        loss = F.cross_entropy(model(tokens).reshape(-1, VOCAB), targets.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    steps = ap.parse_args().steps
    curves, seconds = {}, {}
    for name in ATTENTIONS:
        t0 = time.perf_counter()
        curves[name] = train(name, steps)
        seconds[name] = time.perf_counter() - t0
    print(f"{'step':>6}" + "".join(f"{n:>16}" for n in curves))
    for i in sorted({0, 1, 10} | set(range(0, steps, max(steps // 10, 1))) | {steps - 1}):
        print(f"{i:>6}" + "".join(f"{c[i]:>16.4f}" for c in curves.values()))
    gap = max(abs(a - b) for a, b in zip(curves["sdpa"], curves["attnc-causal"]))
    print(f"\nlog(vocab) = {math.log(VOCAB):.3f}; largest |sdpa - attnc-causal| over the curve: {gap:.2e}")
    print("seconds: " + ", ".join(f"{n} {s:.1f}" for n, s in seconds.items()))


if __name__ == "__main__":
    main()
