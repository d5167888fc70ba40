"""promote: integer operands of float operations -> TOFLOAT(operand), so a backend computes them in its
float type (q_idx * 0.5 -> float(q_idx) * 0.5). Integer exponents of ** stay integers."""
from __future__ import annotations

from attnc.ir import expr as E
from attnc.plan.model import KernelPlan, map_exprs


def promote(plan: KernelPlan) -> KernelPlan:
    return map_exprs(plan, E.promote_ints)
