"""lower_ops: operations a target spells with others, as rewrites into those (for Triton, which has no
power of a constant integer exponent, exact for negative bases, and no floor of an integer)."""
from __future__ import annotations

from attnc.ir import expr as E
from attnc.ir.expr import Node, Op
from attnc.plan.model import KernelPlan, map_exprs


def _power(a: Node, e: int) -> Node:
    """a ** e for an integer e >= 1 by repeated squaring: exact for any sign of a, integers stay integers."""
    out, square = None, a
    while e:
        if e & 1:
            out = square if out is None else E.make(Op.MUL, out, square)
        e >>= 1
        if e:
            square = E.make(Op.MUL, square, square)
    return out


def _rule(n: Node) -> Node | None:
    a = n.src[0] if n.src else None
    if n.op is Op.POW and n.src[1].op is Op.CONST and float(n.src[1].arg).is_integer():
        e = int(n.src[1].arg)                                    # x ** 5 -> (x*x)*(x*x)*x, x ** -1 -> 1 / x
        if e == 0:
            return E.const(1.0) if n.dtype == E.FLOAT else E.const(1)
        out = _power(a, abs(e))
        if n.dtype == E.FLOAT and out.dtype != E.FLOAT:
            out = Node(Op.TOFLOAT, (out,), dtype=E.FLOAT)
        return out if e > 0 else E.make(Op.DIV, E.const(1.0), out)
    if n.op is Op.POW and n.src[1].op is Op.CONST and n.src[1].arg == 0.5:
        return E.make(Op.SQRT, a)                                 # x ** 0.5 -> sqrt(x)
    if n.op in (Op.FLOOR, Op.CEIL) and n.dtype == E.INT:
        return a                                                  # floor(i) -> i
    return None


def lower_ops(plan: KernelPlan) -> KernelPlan:
    def fix(root: Node) -> Node:
        memo: dict[Node, Node] = {}
        for n in root.walk():
            srcs = tuple(memo[s] for s in n.src)
            m = n if srcs == n.src else Node(n.op, srcs, n.arg, E.keep_dtype(n, srcs), n.loc)
            memo[n] = _rule(m) or m
        return memo[root]
    return map_exprs(plan, fix)
