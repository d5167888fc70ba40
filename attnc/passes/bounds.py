"""bounds: every param read -> proven in bounds from the declared dims, or a call-time check.

Each index expression is bounded over the whole domain (q_idx < Q, kv_idx < KV, h < H, b < B) with sizes
kept symbolic; sympy proves 0 <= lo and hi <= dim - 1 for every positive size where it can. What it cannot
prove is checked at call time by the same interval interpretation with the real sizes and param values,
so no generated kernel reads memory it was not given."""
from __future__ import annotations

from dataclasses import dataclass

import sympy

from attnc.errors import CallError
from attnc.ir.cascade import Cascade
from attnc.ir.expr import Node, Op
from attnc.ir.printer import expr_text
from attnc.passes.intervals import Box, Interp
from attnc.passes.sym import SymMap

_RANGE = {"b": "B", "h": "H", "q_idx": "Q", "kv_idx": "KV"}


@dataclass(frozen=True)
class Access:
    param: str
    axis: int
    index: Node
    dim: int | str
    proven: bool

    def describe(self) -> str:
        how = "proven" if self.proven else "checked at call time"
        return f"{self.param}[axis {self.axis}] <- {expr_text(self.index)} in [0, {self.dim}): {how}"


def symbolic_range(n: Node) -> tuple[sympy.Expr, sympy.Expr] | None:
    """(lo, hi) of an affine index expression over the domain, in size symbols; None if not affine."""
    m = SymMap()
    x = m.to(n)
    lo = hi = sympy.Integer(0)
    try:
        poly = sympy.Poly(x, *[s for s, node in m.to_node.items() if node.op is Op.INDEX]) if x.free_symbols else None
    except sympy.PolynomialError:
        return None
    if poly is None:
        return (x, x) if x.is_number else None
    if poly.total_degree() > 1:
        return None
    const = poly.coeff_monomial(1)
    if any(m.to_node[s].op is not Op.SIZE for s in const.free_symbols):
        return None
    lo = hi = const
    for sym in poly.gens:
        c = poly.coeff_monomial(sym)
        if not c.is_number:
            return None
        top = sympy.Symbol(_RANGE[m.to_node[sym].arg], integer=True, positive=True) - 1
        lo, hi = (lo + c * top, hi) if c < 0 else (lo, hi + c * top)
    return lo, hi


def _prove(lo: sympy.Expr, hi: sympy.Expr, dim: int | str) -> bool:
    d = sympy.Symbol(dim, integer=True, positive=True) if isinstance(dim, str) else sympy.Integer(dim)
    return bool(lo.is_nonnegative) and bool((d - 1 - hi).is_nonnegative)


def accesses(c: Cascade) -> list[Access]:
    params = c.variant.params
    out, seen = [], set()
    for s in c.stmts:
        for n in s.body.walk():
            if n.op is not Op.LOAD or n in seen:
                continue
            seen.add(n)
            for axis, idx in enumerate(n.src):
                dim = params[n.arg].dims[axis]
                rng = symbolic_range(idx)
                out.append(Access(n.arg, axis, idx, dim, rng is not None and _prove(*rng, dim)))
    return out


def bounds(c: Cascade) -> Cascade:
    return c.with_facts(bounds=tuple(accesses(c)))


def check_at_call(checks: tuple[Access, ...], sizes: dict[str, int], params: dict) -> None:
    """Raise CallError for a param read that would leave its tensor; proven reads cost nothing."""
    todo = [a for a in checks if not a.proven]
    if not todo:
        return
    import torch
    full = {k: (torch.tensor(0.0, dtype=torch.float64), torch.tensor(sizes[v] - 1.0, dtype=torch.float64))
            for k, v in _RANGE.items()}
    interp = Interp(Box(full, {k: float(v) for k, v in sizes.items()}, params, {}))
    for a in todo:
        lo, hi = interp(a.index)
        n = params[a.param].shape[a.axis]
        if lo.min().item() < 0 or hi.max().item() > n - 1:
            raise CallError(
                f"param '{a.param}' would be read out of bounds: axis {a.axis} is indexed by "
                f"{expr_text(a.index)}, which reaches [{lo.min().item():.0f}, {hi.max().item():.0f}] for "
                f"these inputs, but the tensor has {n} entries there; expected a larger '{a.param}' "
                f"or index values in range")
