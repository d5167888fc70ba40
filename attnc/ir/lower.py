"""Variant -> naive cascade: every row statistic a complete reduction, weights materialized, then P·V."""
from __future__ import annotations

import math

from attnc.errors import SpecError
from attnc.frontend.variant import Variant
from attnc.ir import expr as E
from attnc.ir.cascade import Cascade, Einsum, tensor
from attnc.ir.expr import BOOL, Node, Op

SCALE = Node(Op.SIZE, arg="scale", dtype=E.FLOAT)
IDENTITY = {Op.ROWMAX: E.NEG_INF, Op.ROWSUM: E.ZERO}


def lower(v: Variant, lse: bool = False) -> Cascade:
    if v.norm.op is Op.CONST and not math.isfinite(float(v.norm.arg)):
        raise SpecError(f"the normalizer is the constant {v.norm.arg}: every weight would be {v.norm.arg}",
                        v.norm.loc, "a finite weight, or an expression of score")
    stmts = [Einsum("QK", ("b", "h", "m", "n"), E.make(Op.MUL, tensor("Q"), tensor("K")), "+", ("e",), role="qk")]
    stmts.append(Einsum("S", ("b", "h", "m", "n"), E.substitute(v.score, {E.SCORE: tensor("QK") * SCALE}),
                        role="score"))
    s = tensor("S")
    mk = None
    if v.mask is not None:
        stmts.append(Einsum("MK", ("b", "h", "m", "n"), v.mask, role="mask"))
        mk = tensor("MK", BOOL)

    def keep(x: Node, fill: Node) -> Node:
        return x if mk is None else E.where(mk, x, fill)

    stats: dict[Node, Node] = {}          # ROWMAX/ROWSUM node -> tensor read
    bodies: dict[tuple, str] = {}         # (reduce, body) -> statement name, so equal statistics are one
    counts = {"max": 0, "+": 0}

    def stat(n: Node) -> Node:
        red = "max" if n.op is Op.ROWMAX else "+"
        body = keep(E.substitute(n.src[0], {E.SCORE: s, **stats}), IDENTITY[n.op])
        key = (red, body)
        if key not in bodies:
            counts[red] += 1
            name = ("M" if red == "max" else "L") + str(counts[red])
            bodies[key] = name
            stmts.append(Einsum(name, ("b", "h", "m"), body, red, ("n",), role="stat"))
        return tensor(bodies[key])

    def lower_norm(expr: Node) -> Node:
        for n in expr.walk():                     # children first: inner statistics are defined first
            if n.op in IDENTITY and n not in stats:
                stats[n] = stat(n)
        return E.substitute(expr, {E.SCORE: s, **stats})

    weight = lower_norm(v.norm)
    stmts.append(Einsum("P", ("b", "h", "m", "n"), keep(weight, E.ZERO), role="weight"))
    stmts.append(Einsum("O", ("b", "h", "m", "f"), tensor("P") * tensor("V"), "+", ("n",), role="output"))
    outputs = ("O",)
    if lse:
        m = E.make(Op.ROWMAX, E.SCORE)      # lse = log sum exp(score) over kept keys, stabilized by the row max
        lse_expr = lower_norm(m + E.make(Op.LOG, E.make(Op.ROWSUM, E.make(Op.EXP, E.SCORE - m))))
        stmts.append(Einsum("LSE", ("b", "h", "m"), lse_expr, role="lse"))
        outputs = ("O", "LSE")
    return Cascade(tuple(stmts), outputs, v, {"notes": []})
