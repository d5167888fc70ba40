"""Cascade -> KernelPlan: the backend-neutral description every template renders.

A plan is a grid over (b, h, query tile), one or more passes over the key tiles, each with loop-carried
state (init / per-tile update / rescale), and an epilogue. Tile-level expressions are Nodes whose TENSOR
leaves name plan values: 'qk' (the scaled q.k tile), 's' (the modified score), state names, and the
per-tile references of running maxima ('<state>_ref'). Backends only print them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from attnc.ir import expr as E
from attnc.ir.cascade import Cascade, tensor
from attnc.ir.expr import Node, Op
from attnc.ir.lower import SCALE
from attnc.passes.block_sparsity import BlockSparsity
from attnc.passes.pass_count import pass_count
from attnc.passes.sym import canonical

INIT = {"max": E.NEG_INF, "sum": E.ZERO, "dot": E.ZERO}


@dataclass(frozen=True)
class State:
    """One loop-carried value: a running max, a running row sum, or the P·V accumulator."""
    name: str                                   # m_i, l_i, acc, m_i2, ...
    kind: str                                   # 'max' | 'sum' | 'dot'
    value: Node                                 # per element of the tile, before the mask
    rescale: tuple[tuple[str, float], ...] = () # (max state, c): multiply by exp(c * (old - new)) when it moves

    @property
    def fill(self) -> Node:
        return E.NEG_INF if self.kind == "max" else E.ZERO


@dataclass(frozen=True)
class KVPass:
    """One sweep over the key tiles of a query tile."""
    states: tuple[State, ...]

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
        return [(alpha_name(m, c, i), m, c) for i, (m, c) in enumerate(seen)]


def alpha_name(m: str, c: float, i: int) -> str:
    return "alpha" if i == 0 else f"alpha{i + 1}"


@dataclass(frozen=True)
class KernelPlan:
    name: str                                   # a readable, deterministic kernel name
    variant: object
    score: Node                                 # s as an expression of qk, indices and params
    mask: Node | None                           # keep-condition, evaluated on partial tiles only
    passes: tuple[KVPass, ...]
    epilogue: tuple[tuple[str, Node], ...]      # ('out', ...), optionally ('lse', ...)
    sparsity: BlockSparsity
    bounds: tuple
    block_m: int
    block_n: int
    pass_count: int
    notes: tuple[str, ...] = ()
    params: tuple = field(default=())

    @property
    def has_lse(self) -> bool:
        return any(n == "lse" for n, _ in self.epilogue)


def build_plan(c: Cascade) -> KernelPlan:
    stmts = {s.name: s for s in c.stmts}
    when = c.facts["pass_of"]
    counters = {"max": 0, "sum": 0}
    names: dict[str, str] = {}
    for s in c.stmts:                       # readable state names, in order of appearance
        if s.reduce and s.over == ("n",):
            if s.name == "U":
                names[s.name] = "acc"
                continue
            kind = "max" if s.reduce == "max" else "sum"
            counters[kind] += 1
            base = "m_i" if kind == "max" else "l_i"
            names[s.name] = base if counters[kind] == 1 else f"{base}{counters[kind]}"

    qk, mask_read = tensor("qk"), tensor("MK", E.BOOL)
    score = canonical(E.substitute(stmts["S"].body, {tensor("QK"): qk, SCALE: E.const(1)}))
    mask = stmts["MK"].body if "MK" in stmts else None
    inline = {tensor(s.name, s.body.dtype): s.body for s in c.stmts
              if s.reduce is None and s.iterates_n and s.name not in ("S", "MK")}

    def strip_mask(n: Node) -> Node:
        """where(MK, x, fill) -> x: the template applies the mask, and only on partial tiles."""
        return E.substitute(n, lambda x: x.src[1] if x.op is Op.WHERE and x.src[0] == mask_read else None)

    passes = []
    for p in sorted({when[s.name] for s in c.stmts if s.name in names}):
        states = []
        for s in c.stmts:
            if s.name not in names or when[s.name] != p:
                continue
            body = strip_mask(E.substitute(s.body, inline))
            if s.name == "U":                                    # U = weight * V: keep the weight
                body = canonical(body / tensor("V"))            # sympy cancels V out of the product
                kind = "dot"
            else:
                kind = "max" if s.reduce == "max" else "sum"
            refs = {tensor(r): tensor(f"{names[r]}_ref" if when[r] == p and stmts[r].running else names[r])
                    for r in s.reads() if r in names}
            refs[tensor("S")] = tensor("s")
            value = E.substitute(body, refs)
            rescale = tuple((names[m], cc) for m, cc in s.rescale)
            states.append(State(names[s.name], kind, value, rescale))
        passes.append(KVPass(tuple(states)))

    epilogue = []
    for out_name, key in (("out", "O"), ("lse", "LSE")):
        if key in c.outputs:
            body = E.substitute(stmts[key].body, {tensor(r): tensor(n) for r, n in names.items()})
            epilogue.append((out_name, body))
    v = c.variant
    kname = f"attnc_{v.name}_fwd"
    return KernelPlan(kname, v, score, mask, tuple(passes), tuple(epilogue), c.facts["sparsity"],
                      c.facts["bounds"], c.facts["block_m"], c.facts["block_n"], pass_count(c),
                      tuple(c.facts.get("notes", ())), tuple(v.params.values()))


def promote(plan: KernelPlan, then=lambda n: n) -> KernelPlan:
    """The plan with integer operands of float ops marked TOFLOAT, for backends that must cast;
    `then` is a backend's own rewrite applied after."""
    from dataclasses import replace

    def p(n: Node) -> Node:
        return then(E.promote_ints(n))
    passes = tuple(KVPass(tuple(replace(s, value=p(s.value)) for s in ps.states)) for ps in plan.passes)
    return replace(plan, score=p(plan.score), mask=plan.mask and p(plan.mask), passes=passes,
                   epilogue=tuple((n, p(e)) for n, e in plan.epilogue))
