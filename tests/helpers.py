"""What the tests share: the example files, random inputs and params, and the float64-oracle comparison.

The comparison rule follows PyTorch's flex attention tests: the kernel's error against a float64 golden run
may be at most twice the error of the eager (materialized) reference run in the same dtype, with a floor.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.attn"))
EXAMPLE_IDS = [p.stem for p in EXAMPLES]

FLOOR = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3, torch.float64: 1e-12}


def example(name: str) -> str:
    return str(ROOT / "examples" / f"{name}.attn")


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def qkv(B: int, H: int, HKV: int, Q: int, KV: int, D: int, Dv: int | None = None, dtype=torch.float32,
        seed: int = 0):
    """Standard normal q [B,H,Q,D], k [B,HKV,KV,D], v [B,HKV,KV,Dv], drawn in float32 then cast."""
    g = generator(seed)
    Dv = D if Dv is None else Dv
    draw = lambda *s: torch.randn(*s, generator=g).to(dtype)      # noqa: E731
    return draw(B, H, Q, D), draw(B, HKV, KV, D), draw(B, HKV, KV, Dv)


def random_params(attn, B: int, H: int, HKV: int, Q: int, KV: int, D: int, seed: int = 0) -> dict:
    """A tensor for every declared param, every read in bounds: attnc.runtime.inputs when present."""
    try:
        from attnc.runtime.inputs import random_params as library
    except ImportError:
        library = None
    if library is not None:
        return library(attn, B, H, HKV, Q, KV, D, generator(seed))
    return _own_params(attn, B, H, HKV, Q, KV, D, generator(seed))


def _own_params(attn, B, H, HKV, Q, KV, D, g) -> dict:
    """The fallback: float params positive in [0.1, 1); widths in [1, 64); other ints sorted ids in [0, 4);
    a free dim sized from the reads along it (rel_bias gets R = Q + KV - 1, doc gets max(Q, KV))."""
    from attnc.passes.bounds import _RANGE
    from attnc.passes.intervals import Box, Interp
    sizes = {"B": B, "H": H, "HKV": HKV, "Q": Q, "KV": KV, "D": D}
    full = {k: (torch.tensor(0.0, dtype=torch.float64), torch.tensor(sizes[v] - 1.0, dtype=torch.float64))
            for k, v in _RANGE.items()}
    interp = Interp(Box(full, {k: float(v) for k, v in sizes.items()}, {}, {}))
    free: dict[str, int] = {}
    for a in attn.plan().bounds:
        if isinstance(a.dim, str) and a.dim not in sizes:
            hi = interp(a.index)[1].max().item()
            if math.isfinite(hi):
                free[a.dim] = max(free.get(a.dim, 1), int(hi) + 1)
    out = {}
    for name, (dtype, dims) in attn.param_specs.items():
        shape = tuple(d if isinstance(d, int) else sizes.get(d) or free.get(d, max(Q, KV)) for d in dims)
        if dtype in ("f32", "f16", "bf16"):
            out[name] = torch.rand(shape, generator=g) * 0.9 + 0.1
        elif dtype == "bool":
            out[name] = torch.randint(0, 2, shape, generator=g).bool()
        elif "width" in name or "window" in name:
            out[name] = torch.randint(1, 64, shape, generator=g).int()
        else:
            out[name] = torch.randint(0, 4, shape, generator=g).sort(dim=-1).values.int()
    return out


def max_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.double() - ref).abs().max().item() if x.numel() else 0.0


def lse_err(lse: torch.Tensor, ref: torch.Tensor) -> float:
    """Error of an lse over the rows the oracle finds finite; -inf rows must match exactly (checked here)."""
    lse = lse.double()
    empty = torch.isneginf(ref)
    assert torch.equal(torch.isneginf(lse), empty), "lse is -inf exactly where the oracle's is"
    assert not torch.isnan(lse).any(), "lse has NaN"
    keep = ~empty
    return (lse[keep] - ref[keep]).abs().max().item() if keep.any() else 0.0


def check_against_oracle(attn, q, k, v, params: dict, *, scale=None, lse: bool = True, floor: float | None = None):
    """Kernel in q's dtype vs the float64 oracle, bounded by twice the same-dtype reference's error.
    Returns (kernel error, reference error) of the output for callers that want to say more."""
    floor = FLOOR[q.dtype] if floor is None else floor
    as64 = lambda t: t.to(torch.float64) if t.is_floating_point() else t     # noqa: E731
    p64 = {n: as64(t) for n, t in params.items()}
    gold, gold_lse = attn.reference(as64(q), as64(k), as64(v), scale=scale, return_lse=True, **p64)
    eager, eager_lse = attn.reference(q, k, v, scale=scale, return_lse=True, **params)
    if lse:
        out, out_lse = attn(q, k, v, scale=scale, return_lse=True, **params)
    else:
        out, out_lse = attn(q, k, v, scale=scale, **params), None
    assert out.shape == gold.shape, (out.shape, gold.shape)
    assert out.dtype == q.dtype
    assert not torch.isnan(out).any(), "kernel output has NaN"
    err, ref_err = max_err(out, gold), max_err(eager, gold)
    assert err <= max(2 * ref_err, floor), f"out: kernel error {err:.3g}, eager {q.dtype} error {ref_err:.3g}"
    if out_lse is not None:
        assert out_lse.shape == gold_lse.shape
        e = lse_err(out_lse, gold_lse)
        keep = ~torch.isneginf(gold_lse)
        r = (eager_lse.double()[keep] - gold_lse[keep]).abs().max().item() if keep.any() else 0.0
        assert e <= max(2 * r, floor), f"lse: kernel error {e:.3g}, eager {q.dtype} error {r:.3g}"
    return err, ref_err
