"""bounds: every param read -> proven in bounds from the declared dims, or a call-time check.

Each index expression is bounded over the whole domain (q_idx < Q, kv_idx < KV, h < H, b < B) with sizes
kept symbolic; sympy proves 0 <= lo and hi <= dim - 1 for every positive size where it can. What it cannot
prove is checked at call time with the real sizes and param values.

The rule both follow: every integer an index expression computes, the index and every intermediate value,
lies in int32. There the backends' integer arithmetic (int32 in Triton, int64 in torch and the reference)
is exact, so the value checked is the value every kernel computes. The proofs are over all sizes; the
int32 rule depends on the sizes and params of a call, so the call-time check applies it to every read,
proven ones included (for those it is a few integer operations on the sizes)."""
from __future__ import annotations

import functools
from dataclasses import dataclass

import sympy

from attnc.errors import CallError, Loc, SpecError
from attnc.ir.cascade import Cascade
from attnc.ir.expr import Node, Op
from attnc.ir.printer import expr_text
from attnc.passes.intervals import INF, IntOverflow, int_ranges
from attnc.passes.sym import SymMap, canonical

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


@dataclass(frozen=True)
class IntRange:
    """Integer arithmetic outside the indices (a mask's q_idx // width, a score's h * 2): int32 at every
    step too, or the kernels' integer widths would give different masks and scores."""
    expr: Node
    where: str                  # the statement or variant part it comes from

    def describe(self) -> str:
        return f"integers of {self.where} within int32: checked at call time"


def symbolic_range(n: Node) -> tuple[sympy.Expr, sympy.Expr] | None:
    """(lo, hi) of an affine index expression over the domain, in size symbols; None if not affine.

    Affine is read off derivatives (each index's coefficient a number), never by expanding into a
    polynomial: (q_idx + 1) ** 4096 is refused in one step instead of expanded."""
    m = SymMap()
    x = m.to(n)
    gens = [s for s in x.free_symbols if m.to_node[s].op is Op.INDEX]
    if any(m.to_node[s].op not in (Op.INDEX, Op.SIZE) for s in x.free_symbols):
        return None                          # a load, a floor division, ...: not affine in indices and sizes
    coeffs = {}
    for g in gens:
        c = sympy.diff(x, g)
        if not c.is_number:
            return None
        coeffs[g] = c
    lo = hi = x.subs({g: 0 for g in gens})
    for g, c in coeffs.items():
        top = sympy.Symbol(_RANGE[m.to_node[g].arg], integer=True, positive=True) - 1
        lo, hi = (lo + c * top, hi) if c < 0 else (lo, hi + c * top)
    return lo, hi


def _prove(lo: sympy.Expr, hi: sympy.Expr, dim: int | str) -> bool:
    d = sympy.Symbol(dim, integer=True, positive=True) if isinstance(dim, str) else sympy.Integer(dim)
    return bool(lo.is_nonnegative) and bool((d - 1 - hi).is_nonnegative)


def accesses(c: Cascade) -> list[Access]:
    """Every param read of the cascade, and of the variant as written: a read that simplification removed
    (p[i] ** 0) is still one the reference makes, so its index is checked too."""
    v = c.variant
    params = v.params
    out, seen = [], set()
    for body in [s.body for s in c.stmts] + [e for e in (v.score, v.mask, v.norm) if e is not None]:
        for n in body.walk():
            if n.op is not Op.LOAD:
                continue
            read = (n.arg, tuple(canonical(i) for i in n.src))     # the variant's reads, in the cascade's terms
            if read in seen:
                continue
            seen.add(read)
            for axis, idx in enumerate(n.src):
                dim = params[n.arg].dims[axis]
                rng = symbolic_range(idx)
                out.append(Access(n.arg, axis, idx, dim, rng is not None and _prove(*rng, dim)))
    return out


def int_checks(c: Cascade) -> list[IntRange]:
    """The integer arithmetic of the variant as the reference computes it and of each statement as the
    kernels compute it (sympy may have reordered it): both must stay in int32 for the two to agree."""
    v = c.variant
    parts = [("score", v.score), ("mask", v.mask), ("norm", v.norm)] + [(s.name, s.body) for s in c.stmts]
    return [IntRange(e, name) for name, e in parts
            if e is not None and any(n.dtype == "int" and n.op is not Op.CONST for n in e.walk())]


def bounds(c: Cascade) -> Cascade:
    return c.with_facts(bounds=tuple(accesses(c)) + tuple(int_checks(c)))


# -- divisors --

def _unknown(n: Node) -> tuple:
    """What is known of a leaf over every call: sizes are >= 1, indices >= 0, params anything."""
    if n.op is Op.SIZE:
        return 1, INF
    if n.op is Op.INDEX:
        return 0, INF
    return (0, 1) if n.dtype == "bool" else (-INF, INF)


@functools.lru_cache(maxsize=4096)         # callbacks are traced at every call: their Variants come back often
def provably_nonzero(d: Node) -> bool:
    """d is not 0 anywhere in the domain, for every size and param value: an affine form whose sign sympy
    proves (KV - kv_idx), or a range that excludes 0 (max(w[h], 1))."""
    if d.op is Op.CONST:
        return d.arg != 0
    rng = symbolic_range(d)
    if rng is not None and (rng[0].is_positive or rng[1].is_negative):
        return True
    lo, hi = int_ranges(d, _unknown, limit=False)[d]
    return lo > 0 or hi < 0


def check_divisors(e: Node, loc: Loc | None = None) -> None:
    """SpecError at an integer // or % whose divisor may be 0 (torch raises there and Triton's result is
    undefined, so no two kernels would agree), and at a division by the constant 0."""
    for n in e.walk():
        if n.op is Op.DIV and n.src[1].op is Op.CONST and n.src[1].arg == 0:
            raise SpecError("division by zero", n.src[1].loc or n.loc or loc, "a divisor that is not 0")
        if n.op in (Op.FLOORDIV, Op.MOD) and not provably_nonzero(n.src[1]):
            raise SpecError(f"the divisor of this '{'//' if n.op is Op.FLOORDIV else '%'}' can be 0",
                            n.src[1].loc or n.loc or loc,
                            "a divisor that is never 0: a nonzero constant, a size, or e.g. max(w[h], 1)")


# -- at call time --

def domain_leaf(sizes: dict[str, int], params: dict):
    """Leaf ranges over the whole domain of one call: indices below their sizes, params their min and max,
    cascade tensors (never integers there) unknown."""
    seen: dict[str, tuple] = {}

    def leaf(n: Node) -> tuple:
        if n.op is Op.INDEX:
            return 0, sizes[_RANGE[n.arg]] - 1
        if n.op is Op.SIZE:
            return sizes[n.arg], sizes[n.arg]
        if n.op is Op.TENSOR:
            return (0, 1) if n.dtype == "bool" else (-INF, INF)
        t = params[n.arg]
        if n.src and all(i.op is Op.CONST for i in n.src):      # ids[0]: that one entry, not the whole range
            at = tuple(int(i.arg) for i in n.src)
            if len(at) == t.dim() and all(0 <= a < d for a, d in zip(at, t.shape)):
                v = int(t[at].item())
                return v, v
            return 0, 0                                         # out of range: the access fails its own check
        if n.arg not in seen:
            # nothing to read: the access fails its own check
            seen[n.arg] = (int(t.min().item()), int(t.max().item())) if t.numel() else (0, 0)
        return seen[n.arg]
    return leaf


def check_at_call(checks: tuple, sizes: dict[str, int], params: dict) -> None:
    """Raise CallError for a param read that would leave its tensor, or for integer arithmetic (an index on
    the way, a mask, a score) that leaves int32 for these inputs, where the kernels' integer widths differ."""
    leaf = domain_leaf(sizes, params)
    known: dict = {}
    for a in checks:
        if isinstance(a, IntRange):
            try:
                int_ranges(a.expr, leaf, limit=True, out=known)
            except IntOverflow as e:
                raise CallError(
                    f"the integer {expr_text(e.node)} in {a.where} reaches [{e.lo}, {e.hi}] for these inputs, "
                    f"outside the 32-bit integers every kernel computes in; expected sizes and int params "
                    f"that keep it within [-2**31, 2**31 - 1]") from None
            continue
        n = params[a.param].shape[a.axis]
        try:
            lo, hi = int_ranges(a.index, leaf, limit=True, out=known)[a.index]
        except IntOverflow as e:
            part = "" if e.node == a.index else f", in its part {expr_text(e.node)},"
            raise CallError(
                f"param '{a.param}' cannot be read safely: axis {a.axis} is indexed by {expr_text(a.index)}"
                f"{part} which reaches [{e.lo}, {e.hi}] for these inputs, outside the 32-bit integers every "
                f"kernel computes indices in; expected index values (and params they read) within "
                f"[-2**31, 2**31 - 1] at every step") from None
        if a.proven:
            continue
        if lo < 0 or hi > n - 1:
            raise CallError(
                f"param '{a.param}' would be read out of bounds: axis {a.axis} is indexed by "
                f"{expr_text(a.index)}, which reaches [{lo}, {hi}] for these inputs, but the tensor has "
                f"{n} entries there; expected a larger '{a.param}' or index values in range")
