"""defer division: a weight's factor that does not depend on n moves past the sum over n.

    P[m,n] = where(MK, X[m,n] /? D[m], 0);  O[m,f] = Σn P·V   ->   U[m,f] = Σn where(MK, X, 0)·V;  O = U /? D

Likewise for a factor D[m] multiplying the weight. The weight statement P is inlined into the sum, and the
n-free factors are applied once per row after it, so no consumer that iterates n waits on D.
"""
from __future__ import annotations

from attnc.ir import expr as E
from attnc.ir.cascade import Cascade, Einsum, tensor
from attnc.ir.expr import Node, Op
from attnc.passes.simplify import drop_unused
from attnc.passes.sym import canonical


def depends_on_n(n: Node, c: Cascade) -> bool:
    for x in n.walk():
        if x.op is Op.INDEX and x.arg == "kv_idx":
            return True
        if x.op is Op.TENSOR and "n" in c.ranks_of(x.arg):
            return True
    return False


def split(n: Node, c: Cascade) -> tuple[Node, list[tuple[Op, Node]]]:
    """n == rest (op factor)*, with every factor free of n. Walks products, divisions and where(c, x, 0)."""
    if n.op is Op.DIVZ and not depends_on_n(n.src[1], c):
        rest, fs = split(n.src[0], c)
        return rest, fs + [(Op.DIVZ, n.src[1])]
    if n.op is Op.MUL:
        a, b = n.src
        if not depends_on_n(b, c):
            rest, fs = split(a, c)
            return rest, fs + [(Op.MUL, b)]
        if not depends_on_n(a, c):
            rest, fs = split(b, c)
            return rest, fs + [(Op.MUL, a)]
    if n.op is Op.WHERE and n.src[2].op is Op.CONST and n.src[2].arg == 0:
        rest, fs = split(n.src[1], c)
        return E.where(n.src[0], rest, n.src[2]), fs
    return n, []


def weight_of(c: Cascade) -> Node:
    """The weight w in O = w * V, a weight statement inlined. A read of the score stays a read: the score is
    the plan's score hook (its scale is folded into q), so its body must not be split here."""
    o, v = c.role("output"), tensor(c.input("v").name)
    if o.body == v:                          # O = sum_n V: every weight is 1
        return E.const(1.0)
    a, b = o.body.src if o.body.op is Op.MUL else (o.body, None)
    w = a if b == v else b if a == v else canonical(o.body / v)
    if w.op is Op.TENSOR and c.role_of(w.arg) != "score" and c.get(w.arg).reduce is None:
        w = c.get(w.arg).body
    return w


def defer_division(c: Cascade) -> Cascade:
    o = c.role("output")
    rest, factors = split(weight_of(c), c)
    u = Einsum("U", o.ranks, rest * tensor(c.input("v").name), "+", ("n",), role="acc")
    out = tensor("U")
    for op, f in factors:
        out = E.make(op, out, f)
    stmts = []
    for s in c.stmts:
        if s is o:
            stmts += [u, Einsum(o.name, o.ranks, out, role="output")]
        else:
            stmts.append(s)
    return c.replace(stmts=tuple(drop_unused(stmts, c.outputs)))
