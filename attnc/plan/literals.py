"""literals: float literals that where/min/max would turn into float32 scalars -> TOFLOAT(literal), so they
take the accumulation dtype (float64 runs stay float64). For targets whose scalars have a fixed type."""
from __future__ import annotations

from attnc.ir import expr as E
from attnc.ir.expr import Node, Op
from attnc.plan.model import KernelPlan, map_exprs


def _fix(n: Node) -> Node | None:
    if n.op not in (Op.WHERE, Op.MIN, Op.MAX) or n.dtype != E.FLOAT:
        return None
    if not any(s.op is Op.CONST and s.dtype == E.FLOAT for s in n.src):
        return None
    srcs = tuple(Node(Op.TOFLOAT, (s,), dtype=E.FLOAT) if s.op is Op.CONST and s.dtype == E.FLOAT else s
                 for s in n.src)
    return Node(n.op, srcs, n.arg, n.dtype)        # where(c, 0.1, x) -> where(c, float(0.1), x)


def literals(plan: KernelPlan) -> KernelPlan:
    return map_exprs(plan, lambda root: E.bottom_up(root, _fix))
