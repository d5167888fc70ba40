"""The plan's invariants, checked after building and after every plan pass: every value an expression
reads is defined before it is read, names are unique, and kinds, ranks and operands are ones the
backends know. Raises IRError: a failure is a compiler bug."""
from __future__ import annotations

from attnc.ir.cascade import IRError
from attnc.ir.expr import Node, Op
from attnc.plan.model import KINDS, KernelPlan


def _reads(e: Node) -> set[str]:
    return {x.arg for x in e.walk() if x.op is Op.TENSOR}


def verify_plan(plan: KernelPlan) -> None:
    def check(ok: bool, what: str) -> None:
        if not ok:
            raise IRError(f"invalid plan {plan.name}: {what}")

    check(plan.kind in KINDS, f"unknown kind {plan.kind}")
    check(plan.parallel in ("m", "n"), f"parallel rank {plan.parallel}")
    names = [x.name for x in plan.loads]
    check(len(names) == len(set(names)), f"two loads share a name: {names}")
    for x in plan.loads:
        check(x.at == ("program" if x.rank == plan.parallel else "step"), f"load {x.name} at {x.at}")
    known = set(names) | {n for n, _, _ in plan.rowdots}

    def define(n: str, where: str) -> None:
        check(n not in known, f"{n} defined twice ({where})")
        known.add(n)

    def reads_known(e: Node, where: str, extra: set[str] = frozenset()) -> None:
        missing = _reads(e) - known - set(extra)
        check(not missing, f"{where} reads {', '.join(sorted(missing))} before they are defined")

    for n, e in plan.prologue:
        reads_known(e, f"prologue {n}")
        define(n, "prologue")
    states = [s.name for p in plan.passes for s in p.states]
    check(len(states) == len(set(states)), f"two states share a name: {states}")
    for i, p in enumerate(plan.passes, 1):
        for d in p.dots:
            check(d.a in known and d.b in known, f"pass {i}: {d.name} = {d.a} @ {d.b}^T reads an unknown tile")
            known.add(d.name)
        tile = {"s", "keep"}
        if plan.score is not None:
            reads_known(plan.score, "the score")
        if plan.mask is not None:
            reads_known(plan.mask, "the mask")
        own = {s.name for s in p.states} | {f"{s.name}_ref" for s in p.maxes}
        for n, e in p.defs:
            reads_known(e, f"pass {i} def {n}", tile | own)
            tile.add(n)
        for s in p.states:
            check(s.kind in ("max", "sum", "dot", "argmax"), f"state {s.name} of kind {s.kind}")
            check((s.kind == "dot") == (s.operand is not None), f"state {s.name}: operand and kind disagree")
            check(s.operand is None or s.operand in known, f"state {s.name} multiplies unknown {s.operand}")
            reads_known(s.value, f"state {s.name}", tile | own)
        for s in p.scatters:
            reads_known(s.value, f"scatter {s.target}", tile | own)
            check(s.operand in known, f"scatter {s.target} multiplies unknown {s.operand}")
        for g in p.grads:
            for e in (g.value,) + g.index:
                reads_known(e, f"gradient of {g.param}", tile | own)
        known.update(s.name for s in p.states)
        for n, e in p.after:
            reads_known(e, f"pass {i} after {n}")
            define(n, f"pass {i}")
    for n, e in plan.epilogue:
        reads_known(e, f"epilogue {n}")
        define(n, "epilogue")
    for s in plan.stores:
        reads_known(s.value, f"store {s.target}")
        check(s.width in (None, "e", "f"), f"store {s.target} of width {s.width}")
    for g in plan.row_grads:
        for e in (g.value,) + g.index:
            reads_known(e, f"gradient of {g.param}")
