"""Random specs through the derived backward: scores composed from the whole function library (with params
read per head and per key, indices, and values read along several paths), every normalizer form, masks,
Q != KV, GQA, with and without the lse. On the torch backend in float64 the output and every gradient
must equal autograd of the materialized reference to rounding; the only other outcome allowed is a
SpecError or a CallError. Seeded: a failure names its spec and reproduces."""
from __future__ import annotations

import random

import pytest
import torch

import attnc

UNARY = ["exp(tanh({}))", "tanh({})", "sigmoid({})", "softplus({})", "erf({})", "relu({})", "abs({})",
         "sqrt(1 + {0} * {0})", "log(1 + sigmoid({}))", "exp2(tanh({}))", "floor({})", "sign({})",
         "rsqrt(2 + tanh({}))", "log2(2 + abs({}))", "({}) ** 2", "({}) ** 3"]
BINARY = ["({} + {})", "({} - {})", "({} * {})", "min({}, {})", "max({}, {})", "({} / (2 + abs({})))",
          "where(q_idx > kv_idx, {}, {})", "clamp({}, -1.5, {})"]
LEAVES = ["score", "score", "score", "t[h]", "0.1 * q_idx", "0.05 * kv_idx", "0.3", "u[kv_idx % 4]",
          "t[h] * (q_idx - kv_idx) * 0.1"]
NORMS = ["softmax", "sigmoid", "relu", "linear", "rownorm(relu(score) ** 2)", "softmax(sink = t[h])",
         "map(tanh(score))", "exp(score - rowmax(score)) / rowsum(exp(score - rowmax(score)))",
         "relu(score - rowmax(score) + 4) / rowsum(relu(score - rowmax(score) + 4))",
         "exp(score - rowmax(score)) / (1 + rowsum(exp(score - rowmax(score))))"]
MASKS = ["", "mask = q_idx + KV - Q >= kv_idx\n", "mask = kv_idx % 3 != 1\n", "mask = q_idx + KV - Q - kv_idx < 5\n"]
CASES = 40


def _expr(rng: random.Random, depth: int) -> str:
    if depth == 0 or rng.random() < 0.2:
        return rng.choice(LEAVES)
    if rng.random() < 0.4:
        return rng.choice(UNARY).format(_expr(rng, depth - 1))
    return rng.choice(BINARY).format(_expr(rng, depth - 1), _expr(rng, depth - 1))


def _spec(i: int) -> tuple[str, random.Random]:
    rng = random.Random(1000 + i)
    mask, score, norm = rng.choice(MASKS), _expr(rng, 3), rng.choice(NORMS)
    return f"variant f\nparam t: f32[H]\nparam u: f32[4]\n{mask}score = {score}\nnorm = {norm}\n", rng


@pytest.mark.parametrize("i", range(CASES))
def test_random_specs_differentiate_exactly(i):
    spec, rng = _spec(i)
    try:
        attn = attnc.compile(spec, backend="torch")
        attn.source("torch", backward=True)
    except attnc.SpecError:
        return
    g = torch.Generator().manual_seed(i)
    Q, KV = rng.choice([(7, 11), (11, 7), (9, 9)])
    HKV = rng.choice([1, 2])
    q = torch.randn(2, 2, Q, 4, generator=g, dtype=torch.float64).requires_grad_()
    k, v = (torch.randn(2, HKV, KV, 4, generator=g, dtype=torch.float64).requires_grad_() for _ in range(2))
    t = (torch.rand(2, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    u = (torch.rand(4, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    lse = rng.random() < 0.3
    leaves = (q, k, v, t, u)

    def loss(fn):
        res = fn(q, k, v, t=t, u=u, return_lse=lse)
        out, l = res if lse else (res, None)
        w = torch.randn(out.shape, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
        total = (out * w).sum()
        if lse:
            total = total + torch.where(torch.isinf(l), 0, l).sum()
        return out, total

    try:
        out, total = loss(attn)
    except attnc.CallError:
        return
    ref, ref_total = loss(attn.reference)
    assert (out - ref).abs().max().item() <= 1e-9, spec
    got = torch.autograd.grad(total, leaves, allow_unused=True)
    want = torch.autograd.grad(ref_total, leaves, allow_unused=True)
    scale = max([1.0] + [w.abs().max().item() for w in want if w is not None])
    for name, a, b in zip("qkvtu", got, want):
        a = torch.zeros_like(leaves["qkvtu".index(name)]) if a is None else a
        b = torch.zeros_like(a) if b is None else b
        err = (a - b).abs().max().item()
        assert err <= 1e-8 * scale, f"d{name}: error {err:.3g} for\n{spec}"
