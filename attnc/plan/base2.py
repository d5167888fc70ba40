"""base2: exp(x) -> exp2(x) with log2(e) folded into the logit's scale, wherever the plan uses the logit only
inside exponentials of linear combinations of it and its running maxima (softmax and its relatives).

The kernel then scales q.k by sm_scale * log2(e), so qk and every running maximum of it are in base-2 units;
exp(s - m) becomes exp2(s - m) with no multiply per element. Values outside the loop that read a maximum
(the epilogue's lse, the saved statistics) read it times ln 2, back in natural units."""
from __future__ import annotations

from dataclasses import replace

from attnc.ir import expr as E
from attnc.ir.expr import Node, Op
from attnc.plan.model import KernelPlan, KVPass, value

LN2 = 0.6931471805599453


def scaled_names(plan: KernelPlan) -> set[str]:
    maxes = [s.name for p in plan.passes for s in p.maxes]
    return {"qk", "s"} | set(maxes) | {f"{m}{x}" for m in maxes for x in ("_ref", "_part")}


def exp2_of(root: Node, scaled: set[str]) -> Node | None:
    """root with exp(linear combination of base-2 values) as exp2 of it; None if a base-2 value is used any
    other way."""
    def linear(n: Node) -> bool:
        if n.op is Op.TENSOR:
            return n.arg in scaled
        if n.op in (Op.ADD, Op.SUB):
            return all(linear(x) for x in n.src)
        if n.op is Op.NEG:
            return linear(n.src[0])
        if n.op is Op.MUL:
            a, b = n.src
            return (a.op is Op.CONST and linear(b)) or (b.op is Op.CONST and linear(a))
        return False

    memo: dict[Node, Node] = {}
    exposed: set[Node] = set()          # nodes that carry a base-2 value outside a linear exp
    for n in root.walk():
        if n.op is Op.EXP and linear(n.src[0]):
            memo[n] = Node(Op.EXP2, n.src, dtype=E.FLOAT)          # exp(x) = exp2(x log2 e), x already scaled
            continue
        if (n.op is Op.TENSOR and n.arg in scaled) or any(x in exposed for x in n.src):
            exposed.add(n)
        srcs = tuple(memo[x] for x in n.src)
        memo[n] = n if srcs == n.src else Node(n.op, srcs, n.arg, E.keep_dtype(n, srcs), n.loc)
    return None if root in exposed else memo[root]


def base2(plan: KernelPlan) -> KernelPlan:
    if plan.kind != "forward" or plan.score != value("qk") or any(
            s.value != value("s") for p in plan.passes for s in p.maxes):
        return plan
    scaled = scaled_names(plan)
    passes = []
    for p in plan.passes:
        states = []
        for s in p.states:
            v = s.value if s.kind == "max" else exp2_of(s.value, scaled)
            if v is None:
                return plan
            states.append(replace(s, value=v))
        passes.append(replace(p, states=tuple(states)))
    natural = {value(s.name): E.make(Op.MUL, value(s.name), E.const(LN2)) for p in plan.passes for s in p.maxes}
    back = lambda e: E.substitute(e, natural)        # noqa: E731
    return replace(plan, passes=tuple(replace(p, after=tuple((n, back(e)) for n, e in p.after)) for p in passes),
                   epilogue=tuple((n, back(e)) for n, e in plan.epilogue),
                   stores=tuple(replace(s, value=back(s.value)) for s in plan.stores), base2=True)
