"""Which values of a plan are row values: one number per row of the program tile, the same for every pair
of the loop's tiles. What the row passes (weights, rowdiv, factor) compute once per row they find here."""
from __future__ import annotations

from dataclasses import replace

from attnc.ir import expr as E
from attnc.ir.expr import Node, Op
from attnc.plan.model import KernelPlan

LOOP_INDICES = {"m": {"kv_idx"}, "n": {"q_idx", "h"}}       # by the plan's parallel rank


def prologue_rows(plan: KernelPlan) -> set[str]:
    """Names the prologue may read: row statistics loaded per program, row dots and prologue values."""
    return ({x.name for x in plan.loads if x.width is None and x.at == "program"}
            | {n for n, _, _ in plan.rowdots} | {n for n, _ in plan.prologue})


def is_row(e: Node, plan: KernelPlan, names: set[str]) -> bool:
    """e reads only the row values `names`, indices of the program and params at them: one value per row."""
    loop = LOOP_INDICES[plan.parallel]
    return not E.free_indices(e) & loop and all(
        x.arg in names for x in e.walk() if x.op is Op.TENSOR) and not e.uses(Op.SCORE)


def fresh(plan: KernelPlan, base: str) -> str:
    """A name no value of the plan has yet."""
    taken = ({x.name for x in plan.loads} | {n for n, _, _ in plan.rowdots} | {n for n, _ in plan.prologue}
             | {n for n, _ in plan.epilogue} | {s.name for p in plan.passes for s in p.states}
             | {n for p in plan.passes for n, _ in p.defs + p.after} | {"qk", "dp", "s", "keep"})
    name = base
    while name in taken:
        name += "_"
    return name


def map_pairs(plan: KernelPlan, fn) -> KernelPlan:
    """The plan with fn applied to every per-pair expression: the score, and each pass's definitions, state
    values, scattered values and param gradients (not their integer indices, not the mask)."""
    passes = tuple(replace(
        p, defs=tuple((n, fn(e)) for n, e in p.defs),
        states=tuple(replace(s, value=fn(s.value)) for s in p.states),
        scatters=tuple(replace(s, value=fn(s.value)) for s in p.scatters),
        grads=tuple(replace(g, value=fn(g.value)) for g in p.grads)) for p in plan.passes)
    return replace(plan, score=plan.score and fn(plan.score), passes=passes)


def with_prologue(plan: KernelPlan, lines: list[tuple[str, Node]]) -> KernelPlan:
    """The plan with each new row value in the prologue right after the last value it reads. Placed that
    early, no earlier line holds it as a subexpression: cse then names it by its own line."""
    prologue = list(plan.prologue)
    for name, e in lines:
        reads = {x.arg for x in e.walk() if x.op is Op.TENSOR}
        at = max((i + 1 for i, (n, _) in enumerate(prologue) if n in reads), default=0)
        prologue.insert(at, (name, e))
    return replace(plan, prologue=tuple(prologue))
