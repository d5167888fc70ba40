"""rowdiv: acc /? l after the passes, with l one value per row and acc a head-dim tile -> acc * r, r = 1 /? l
computed once per row: the guarded division runs on a column, the tile only multiplies.

acc /? l = acc * (1 /? l) for a finite acc (where l == 0 both are 0): an accumulator of finite products is.
Only where 1 / l cannot overflow: l sums exp(x - m) with m the running max of x, so a row that keeps a key
holds a term exp(0) = 1 and l >= 1. A sum without the max (exp(score) over scores near -100) may be
subnormal, its reciprocal inf: that division stays as it is."""
from __future__ import annotations

from attnc.ir import expr as E
from attnc.ir.expr import Node, Op
from attnc.plan.model import KernelPlan, value
from attnc.plan.rows import fresh


def _at_least_one(s, states) -> bool:
    """The sum state s adds exp(x - m_ref) (or exp2) for a running max m of x: each kept row's sum is >= 1."""
    v = s.value
    if v.op not in (Op.EXP, Op.EXP2) or v.src[0].op is not Op.SUB:
        return False
    x, ref = v.src[0].src
    if ref.op is not Op.TENSOR or not ref.arg.endswith("_ref"):
        return False
    m = states.get(ref.arg[:-len("_ref")])
    return m is not None and m.kind == "max" and m.value == x and dict(s.rescale).get(m.name) == 1.0


def rowdiv(plan: KernelPlan) -> KernelPlan:
    states = {s.name: s for p in plan.passes for s in p.states}
    columns = {n for n, s in states.items() if s.kind == "sum" and _at_least_one(s, states)}
    tiles = {n for n, s in states.items() if s.kind == "dot"}
    epilogue: list[tuple[str, Node]] = []
    recips: dict[Node, str] = {}

    def fix(n: Node) -> Node | None:
        if n.op is not Op.DIVZ or n.src[1].op is not Op.TENSOR or n.src[1].arg not in columns:
            return None
        acc, l = n.src
        if not (acc.op is Op.TENSOR and acc.arg in tiles):
            return None
        if l not in recips:
            recips[l] = fresh(plan.replace(epilogue=plan.epilogue + tuple(epilogue)), f"r_{l.arg}")
            epilogue.append((recips[l], E.make(Op.DIVZ, E.const(1.0), l)))
        return acc * value(recips[l])

    for name, e in plan.epilogue:
        epilogue.append((name, E.bottom_up(e, fix)))
    if not recips:
        return plan
    return plan.replace(epilogue=tuple(epilogue))
