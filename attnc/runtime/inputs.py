"""Random inputs for a compiled variant: q, k, v, and params shaped and valued so every read stays in bounds.

Params follow their declarations (`attn.param_specs`) and the bounds facts of the plan: a free dim (L, R)
gets the smallest length that holds every index the variant reads along it, an int param whose values
are themselves indices gets values inside the axis it indexes, and the rest get plausible values
(positive floats; few, sorted ids; widths of a few dozen)."""
from __future__ import annotations

import torch

from attnc.ir.expr import SIZE_NAMES, Op
from attnc.passes.bounds import Access, domain_leaf
from attnc.passes.intervals import IntOverflow, int_ranges

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16, "i32": torch.int32,
          "i64": torch.int64, "bool": torch.bool}
IDS = 4                 # distinct ids (documents, segments) in an id param
WIDTHS = (1, 64)        # [lo, hi) of a width or window param


def random_inputs(attn, B: int, H: int, HKV: int, Q: int, KV: int, D: int, Dv: int, dtype: torch.dtype,
                  generator: torch.Generator, *, device=None):
    """(q, k, v) with standard normal entries; drawn in float32 so every dtype sees the same values."""
    def draw(*shape):
        return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)
    return draw(B, H, Q, D), draw(B, HKV, KV, D), draw(B, HKV, KV, Dv)


def random_params(attn, B: int, H: int, HKV: int, Q: int, KV: int, D: int, generator: torch.Generator,
                  *, device=None) -> dict[str, torch.Tensor]:
    """A tensor for every param the variant declares (closures of callbacks excepted), all reads in bounds."""
    specs = {n: s for n, s in attn.param_specs.items() if n not in attn.variant.captured}
    if not specs:
        return {}
    sizes = {"B": B, "H": H, "HKV": HKV, "Q": Q, "KV": KV, "D": D}
    reads = attn.plan().bounds
    free = [d for _, dims in specs.values() for d in dims if isinstance(d, str) and d not in SIZE_NAMES]
    lengths = _free_lengths(reads, sizes, dict.fromkeys(free, max(Q, KV)))
    dims = {**sizes, **lengths}
    # an int param read inside another param's index holds indices: values in [0, that axis's length)
    limits: dict[str, int] = {}
    for a in reads:
        if not isinstance(a, Access):
            continue
        for n in a.index.walk():
            if n.op is Op.LOAD:
                n_outer = _length(a.dim, dims)
                limits[n.arg] = min(limits.get(n.arg, n_outer), n_outer)
    params = {name: _draw(name, spec, dims, limits.get(name), generator) for name, spec in specs.items()}
    # an index built from param values (doc[q_idx] + 1) can still reach past a free dim: grow it once
    grown = {d: n for d, n in _reach(reads, dims, params).items() if d in lengths and n > lengths[d]}
    if grown:
        dims.update(grown)
        for name, spec in specs.items():
            if any(d in grown for d in spec[1]):
                params[name] = _draw(name, spec, dims, limits.get(name), generator)
    return {n: t.to(device) for n, t in params.items()} if device is not None else params


def _length(dim, dims: dict[str, int]) -> int:
    return dim if isinstance(dim, int) else dims[dim]


def _reach(reads, dims: dict[str, int], params: dict) -> dict[str, int]:
    """For each free dim name: 1 + the largest index any read reaches along it (reads of missing params skipped),
    computed exactly as the call-time check computes it."""
    out: dict[str, int] = {}
    leaf = domain_leaf(dims, params)
    for a in reads:
        if not isinstance(a, Access) or not isinstance(a.dim, str) or a.dim in SIZE_NAMES:
            continue
        if any(n.op is Op.LOAD and n.arg not in params for n in a.index.walk()):
            continue
        try:
            hi = int_ranges(a.index, leaf, limit=True)[a.index][1]
        except IntOverflow:
            continue                        # the call-time check will say what is wrong
        out[a.dim] = max(out.get(a.dim, 1), hi + 1)
    return out


def _free_lengths(reads, sizes: dict[str, int], lengths: dict[str, int]) -> dict[str, int]:
    """Free dim lengths from the reads that involve no param values; a dim none of them reads keeps its
    starting length. An index may name a free dim itself (R // 2 + q_idx): after the first round, grow only."""
    for i in range(8):
        need = _reach(reads, {**sizes, **lengths}, {})
        new = {d: need.get(d, n) if i == 0 else max(n, need.get(d, n)) for d, n in lengths.items()}
        if i and new == lengths:
            break
        lengths = new
    return lengths


def _draw(name: str, spec: tuple, dims: dict[str, int], limit: int | None, g: torch.Generator) -> torch.Tensor:
    dtype_name, decl = spec
    dtype = DTYPES[dtype_name]
    shape = tuple(_length(d, dims) for d in decl)
    if dtype.is_floating_point:                          # slopes, temperatures, sinks: positive
        return (torch.rand(shape, generator=g) * 0.9 + 0.1).to(dtype)
    if dtype is torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if limit is not None:                                 # indices into another param
        return torch.randint(0, max(limit, 1), shape, generator=g).to(dtype)
    if "width" in name or "window" in name:
        return torch.randint(*WIDTHS, shape, generator=g).to(dtype)
    ids = torch.randint(0, IDS, shape, generator=g)        # document or segment ids: runs of equal ids
    return ids.sort(dim=-1).values.to(dtype)
