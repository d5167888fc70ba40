"""hoist: param reads that do not change along the loop -> values computed once per program, before the
passes (slopes[h] once per head instead of once per pair; doc[q_idx] once per query tile).

A kernel over key tiles also sweeps the query heads of its kv head, so there a read of h stays in the loop.
Hoisted values are named h_<param>_<index letters>: the prefix keeps them apart from the kernel's own names
and from every other name a spec can produce (params arrive as p_<name>)."""
from __future__ import annotations

from dataclasses import replace

from attnc.ir import expr as E
from attnc.ir.expr import Node, Op
from attnc.plan.model import KernelPlan, map_exprs, value

LOOP_INDICES = {"m": {"kv_idx"}, "n": {"q_idx", "h"}}       # by the plan's parallel rank


def hoistable(n: Node, parallel: str) -> bool:
    return n.op is Op.LOAD and not E.free_indices(n) & LOOP_INDICES[parallel] and not any(
        x.op is Op.TENSOR for x in n.walk())


def hoist(plan: KernelPlan) -> KernelPlan:
    names: dict[Node, str] = {}
    lines: list[tuple[str, Node]] = []
    for e in plan.exprs():
        for n in e.walk():
            if n in names or not hoistable(n, plan.parallel):
                continue
            name = "h_" + "_".join([n.arg] + [x.arg[0] if x.op is Op.INDEX else "x" for x in n.src])
            while name in names.values():
                name += "_"
            lines.append((name, E.substitute(n, {k: value(v, k.dtype) for k, v in names.items()})))
            names[n] = name
    if not lines:
        return plan
    reads = {n: value(name, n.dtype) for n, name in names.items()}
    out = map_exprs(plan, lambda root: E.substitute(root, reads))
    return replace(out, prologue=tuple(lines) + out.prologue)
