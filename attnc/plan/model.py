"""The KernelPlan: a backend-neutral description of one kernel, which every backend's one skeleton renders.

A kernel is parallel over tiles of one rank (its programs: query tiles for forward and dQ, key tiles for
dK/dV) and sweeps the tiles of the other rank (the loop) once per pass. Tiles are [parallel, loop]: in a
forward kernel rows are queries and columns keys, in a dK/dV kernel rows are keys and columns queries.
Expressions are Nodes whose TENSOR leaves name plan values: loads ('q', 'k', 'do', row statistics), tile
products ('qk', 'dp'), the score 's', the mask 'keep', definitions of the pass, state names and the
per-tile references of running maxima ('<state>_ref'). Backends only print them.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, fields, is_dataclass, replace

from attnc.ir import expr as E
from attnc.ir.expr import Node, Op

Assign = tuple[str, Node]          # name = expression, in order: later lines may read earlier names


@dataclass(frozen=True)
class Load:
    """A tile of a kernel input: rows indexed by `rank` (m or n); `width` the head dim it spans (e or f), or
    None for a per-row vector (a row statistic); loaded once per program or at every loop step."""
    name: str
    tensor: str
    role: str
    rank: str
    width: str | None
    at: str                         # 'program' | 'step'
    dtype: str = "float"


@dataclass(frozen=True)
class TileDot:
    """name = a @ b^T over the head dim: a is a program tile, b a step tile (qk = q k^T, dp = do v^T)."""
    name: str
    a: str
    b: str
    scaled: bool = False            # the product is the scaled logit: the kernel applies sm_scale


@dataclass(frozen=True)
class State:
    """One loop-carried value: a running max, a running row sum, or a product accumulator (value @ operand)."""
    name: str                                   # m_i, l_i, acc, dq, ...
    kind: str                                   # 'max' | 'sum' | 'dot'
    value: Node                                 # per element of the tile, before the mask
    rescale: tuple[tuple[str, float], ...] = () # (max state, c): multiply by exp(c * (old - new)) when it moves
    operand: str | None = None                  # dot: the step tile the value multiplies
    width: str | None = None                    # dot: the head dim of the result (e or f)

    @property
    def fill(self) -> Node:
        return E.NEG_INF if self.kind == "max" else E.ZERO


@dataclass(frozen=True)
class Scatter:
    """target[loop tile] += value^T @ operand: an output of the loop rank accumulated as the loop visits it
    (dK and dV in a kernel parallel over query tiles)."""
    target: str
    value: Node
    operand: str
    width: str
    scaled: bool = False            # multiplied by sm_scale once complete (dK)


@dataclass(frozen=True)
class ParamGrad:
    """grad_<param>[index] += value, summed over the tile's pairs (and rows, for a row-level value)."""
    param: str
    index: tuple[Node, ...]
    value: Node


@dataclass(frozen=True)
class KVPass:
    """One sweep over the loop rank's tiles: tile products, values, loop-carried states, scatters."""
    dots: tuple[TileDot, ...]
    states: tuple[State, ...]
    defs: tuple[Assign, ...] = ()               # tile values the states and scatters read (p, ds)
    scatters: tuple[Scatter, ...] = ()
    grads: tuple[ParamGrad, ...] = ()
    after: tuple[Assign, ...] = ()              # row values computed from this pass's final states

    @property
    def maxes(self) -> tuple[State, ...]:
        return tuple(s for s in self.states if s.kind == "max")

    @property
    def sums(self) -> tuple[State, ...]:
        return tuple(s for s in self.states if s.kind != "max")

    def alphas(self) -> list[tuple[str, str, float]]:
        """(alpha name, max state, c) for every distinct rescale factor this pass needs."""
        seen: list[tuple[str, float]] = []
        for s in self.sums:
            for r in s.rescale:
                if r not in seen:
                    seen.append(r)
        return [("alpha" if i == 0 else f"alpha{i + 1}", m, c) for i, (m, c) in enumerate(seen)]

    def exprs(self) -> list[Node]:
        return ([s.value for s in self.states] + [e for _, e in self.defs] + [s.value for s in self.scatters]
                + [g.value for g in self.grads] + [i for g in self.grads for i in g.index]
                + [e for _, e in self.after])


@dataclass(frozen=True)
class Store:
    """An output written after the passes: target[program tile] = value (a row vector or a head-dim tile)."""
    target: str
    value: Node
    width: str | None = None        # e or f for a tile, None for a per-row vector
    scaled: bool = False            # multiplied by sm_scale (dQ, dK: the scale sits in the logit)


KINDS = ("forward", "preprocess", "dq", "dkdv", "backward")


@dataclass(frozen=True)
class KernelPlan:
    name: str                                   # readable, deterministic: attnc_<variant>_<kind>
    kind: str                                   # one of KINDS
    variant: object
    parallel: str                               # 'm' or 'n'
    loads: tuple[Load, ...]
    score: Node | None                          # s as an expression of qk, indices and params
    mask: Node | None                           # keep-condition, evaluated on partial tiles only
    passes: tuple[KVPass, ...]
    stores: tuple[Store, ...]
    rowdots: tuple[tuple[str, str, str], ...] = ()   # (name, a, b): name = rowsum(a * b) over the head dim
    prologue: tuple[Assign, ...] = ()           # per-program values before the passes (row level)
    epilogue: tuple[Assign, ...] = ()           # per-program values after the passes, read by stores
    row_grads: tuple[ParamGrad, ...] = ()       # param gradients of row-level values, after the passes
    sparsity: object = None
    bounds: tuple = ()
    block_m: int = 128
    block_n: int = 64
    pass_count: int = 1
    notes: tuple[str, ...] = ()
    params: tuple = field(default=())
    base2: bool = False                         # qk and its running maxima are in base-2 units (base2 pass)
    lines: dict = field(default_factory=dict, compare=False)   # the cse pass's named temporaries per region

    def replace(self, **kw) -> "KernelPlan":
        return replace(self, **kw)

    @property
    def loop(self) -> str:
        return "n" if self.parallel == "m" else "m"

    @property
    def has_lse(self) -> bool:
        return any(s.target == "lse" for s in self.stores)

    def load(self, name: str) -> Load | None:
        return next((x for x in self.loads if x.name == name), None)

    def results(self) -> list[str]:
        """What the kernel returns, in order: its stores, the outputs it scatters into the loop's tiles, then
        the gradient of each param (grad_<name>). Every backend returns them in this order."""
        out = [s.target for s in self.stores]
        for p in self.passes:
            out += [s.target for s in p.scatters if s.target not in out]
        for g in [g for p in self.passes for g in p.grads] + list(self.row_grads):
            if f"grad_{g.param}" not in out:
                out.append(f"grad_{g.param}")
        return out

    def exprs(self) -> list[Node]:
        """Every expression of the plan, for analyses (which indices, sizes and params it reads)."""
        out = [e for _, e in self.prologue] + [e for _, e in self.epilogue]
        out += [x for x in (self.score, self.mask) if x is not None]
        for p in self.passes:
            out += p.exprs()
        out += [s.value for s in self.stores] + [g.value for g in self.row_grads]
        out += [i for g in self.row_grads for i in g.index]
        return out


def fingerprint(plan: KernelPlan) -> str:
    """A hash of everything that shapes the plan's generated code. Expressions are DAGs: each distinct node is
    written once, so the work is linear in the plan (repr() would expand shared subexpressions as trees)."""
    h = hashlib.sha256()
    ids: dict[Node, int] = {}

    def put(x) -> None:
        if isinstance(x, Node):
            for n in x.walk():
                if n not in ids:
                    ids[n] = len(ids)
                    h.update(f"{n.op.name}|{n.arg!r}|{n.dtype}|{[ids[s] for s in n.src]};".encode())
            h.update(f"@{ids[x]};".encode())
        elif is_dataclass(x) and not isinstance(x, type):
            h.update(f"<{type(x).__name__}".encode())
            for f in fields(x):
                if f.compare:
                    h.update(f.name.encode())
                    put(getattr(x, f.name))
            h.update(b">")
        elif isinstance(x, (tuple, list)):
            h.update(b"(")
            for y in x:
                put(y)
            h.update(b")")
        elif isinstance(x, dict):
            put(sorted(x.items(), key=lambda kv: repr(kv[0])))
        else:
            h.update(f"{x!r};".encode())
    put(plan.variant.key())
    put(replace(plan, variant=None))
    return h.hexdigest()


def map_exprs(plan: KernelPlan, fn) -> KernelPlan:
    """The plan with fn applied to every expression."""
    passes = tuple(KVPass(
        p.dots,
        tuple(replace(s, value=fn(s.value)) for s in p.states),
        tuple((n, fn(e)) for n, e in p.defs),
        tuple(replace(s, value=fn(s.value)) for s in p.scatters),
        tuple(replace(g, value=fn(g.value), index=tuple(fn(i) for i in g.index)) for g in p.grads),
        tuple((n, fn(e)) for n, e in p.after))
        for p in plan.passes)
    return replace(
        plan, score=plan.score and fn(plan.score), mask=plan.mask and fn(plan.mask), passes=passes,
        prologue=tuple((n, fn(e)) for n, e in plan.prologue), epilogue=tuple((n, fn(e)) for n, e in plan.epilogue),
        stores=tuple(replace(s, value=fn(s.value)) for s in plan.stores),
        row_grads=tuple(replace(g, value=fn(g.value), index=tuple(fn(i) for i in g.index)) for g in plan.row_grads))


def value(name: str, dtype: str = E.FLOAT) -> Node:
    """A read of a plan value."""
    return Node(Op.TENSOR, arg=name, dtype=dtype)
