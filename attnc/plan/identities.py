"""identities: multiplications and divisions by one -> their operand, so equal values print equal (tanh(c * qk)
and tanh(c * qk * 1.0), one from the score, one from its derivative, become one value for cse)."""
from __future__ import annotations

from attnc.ir import expr as E
from attnc.ir.expr import Node, Op
from attnc.plan.model import KernelPlan, map_exprs


def _one(n: Node) -> bool:
    return n.op is Op.CONST and n.dtype != E.BOOL and n.arg == 1


def _fix(n: Node) -> Node | None:
    if n.op is Op.MUL and _one(n.src[1]) and n.src[0].dtype == n.dtype:
        return n.src[0]                                  # x * 1 -> x
    if n.op is Op.MUL and _one(n.src[0]) and n.src[1].dtype == n.dtype:
        return n.src[1]                                  # 1 * x -> x
    if n.op is Op.DIV and _one(n.src[1]) and n.src[0].dtype == n.dtype:
        return n.src[0]                                  # x / 1 -> x
    return None


def identities(plan: KernelPlan) -> KernelPlan:
    return map_exprs(plan, lambda root: E.bottom_up(root, _fix))
