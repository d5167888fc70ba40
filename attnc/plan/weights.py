"""weights: exp(x - m) /? l, with m and l row values (the saved row max and the row sum it scales) ->
exp(x - lse), lse = where(l == 0, inf, m + log(l)) computed once per row.

exp(x - m) / l = exp(x - (m + log l)) wherever l > 0; where l == 0 both are 0 (x - inf = -inf, also for a row
whose max is -inf, where exp(x - m) alone is exp(nan)). A divide and its guard leave every pair."""
from __future__ import annotations

import math

from attnc.ir import expr as E
from attnc.ir.expr import Node, Op
from attnc.plan.model import KernelPlan, value
from attnc.plan.rows import fresh, is_row, map_pairs, prologue_rows, with_prologue


def weights(plan: KernelPlan) -> KernelPlan:
    rows = prologue_rows(plan)
    found: dict[tuple[Node, Node], str] = {}
    lines: list[tuple[str, Node]] = []

    def fix(n: Node) -> Node | None:
        if n.op is not Op.DIVZ or n.src[0].op is not Op.EXP or n.src[0].src[0].op is not Op.SUB:
            return None
        (x, m), l = n.src[0].src[0].src, n.src[1]
        if not (is_row(m, plan, rows) and is_row(l, plan, rows)) or is_row(x, plan, rows):
            return None
        if (m, l) not in found:
            name = fresh(plan.replace(prologue=plan.prologue + tuple(lines)),
                         f"lse_{m.arg}" if m.op is Op.TENSOR else "lse")
            lse = E.where(E.make(Op.EQ, l, E.const(0.0)), E.const(math.inf), m + E.make(Op.LOG, l))
            found[(m, l)] = name
            lines.append((name, lse))
        return E.make(Op.EXP, x - value(found[(m, l)]))

    out = map_pairs(plan, lambda root: E.bottom_up(root, fix))
    return with_prologue(out, lines) if lines else plan
