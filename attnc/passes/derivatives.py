"""Derivatives of expressions: one table line per op of the function library, and reverse-mode accumulation.

Each rule gives d(out)/d(operand) for every operand of one node, from the node `n` itself and its operands
`a`, `b`, `c`. The conventions at kinks follow torch's autograd, so a kernel's gradients match autograd of the
materialized reference: relu'(0) = 0, |x|'(0) = 0, min/max split the gradient evenly between tied operands,
floor, ceil and sign have derivative 0 everywhere.
"""
from __future__ import annotations

import math
from typing import Callable

from attnc.errors import SpecError
from attnc.ir import expr as E
from attnc.ir.expr import Node, Op

LN2 = math.log(2.0)
_0, _1, _HALF = E.const(0.0), E.const(1.0), E.const(0.5)


def _w(c, a, b) -> Node:
    return E.where(c, a, b)


def _pow(n: Node, a: Node, b: Node) -> tuple:
    db = b * E.make(Op.LOG, a) * n if b.op is not Op.CONST else None     # d(a^b)/db = a^b log a
    return (b * E.make(Op.POW, a, b - E.const(1)) if b.op is not Op.CONST or b.arg != 0 else _0, db)


# op -> (node, *operands) -> one partial derivative per operand (None: no gradient flows there)
RULES: dict[Op, Callable[..., tuple]] = {
    Op.ADD: lambda n, a, b: (_1, _1),                                    # d(a + b) = da + db
    Op.SUB: lambda n, a, b: (_1, -_1),                                   # d(a - b) = da - db
    Op.MUL: lambda n, a, b: (b, a),                                      # d(a b) = b da + a db
    Op.DIV: lambda n, a, b: (_1 / b, -(n / b)),                          # d(a / b) = da / b - (a / b) db / b
    Op.DIVZ: lambda n, a, b: (E.make(Op.DIVZ, _1, b),                    # as DIV, and 0 where b == 0
                              E.make(Op.DIVZ, -n, b)),
    Op.POW: _pow,                                                        # d(a^b) = b a^(b-1) da + a^b log a db
    Op.NEG: lambda n, a: (-_1,),                                         # d(-a) = -da
    Op.EXP: lambda n, a: (n,),                                           # exp' = exp
    Op.EXP2: lambda n, a: (n * E.const(LN2),),                           # exp2' = exp2 ln 2
    Op.LOG: lambda n, a: (_1 / a,),                                      # log' = 1 / a
    Op.LOG2: lambda n, a: (_1 / (a * E.const(LN2)),),                    # log2' = 1 / (a ln 2)
    Op.SQRT: lambda n, a: (_HALF / n,),                                  # sqrt' = 1 / (2 sqrt a)
    Op.RSQRT: lambda n, a: (-_HALF * n / a,),                            # rsqrt' = -a^(-3/2) / 2
    Op.TANH: lambda n, a: (_1 - n * n,),                                 # tanh' = 1 - tanh^2
    Op.SIGMOID: lambda n, a: (n * (_1 - n),),                            # sigmoid' = s (1 - s)
    Op.SOFTPLUS: lambda n, a: (E.make(Op.SIGMOID, a),),                  # softplus' = sigmoid
    Op.ERF: lambda n, a: (E.const(2 / math.sqrt(math.pi)) * E.make(Op.EXP, -(a * a)),),  # erf' = 2 e^(-a^2) / sqrt(pi)
    Op.RELU: lambda n, a: (_w(E.make(Op.GT, a, _0), _1, _0),),           # relu' = [a > 0]
    Op.ABS: lambda n, a: (E.make(Op.SIGN, a),),                          # |a|' = sign a  (0 at 0)
    Op.SIGN: lambda n, a: (_0,),                                         # sign' = 0
    Op.FLOOR: lambda n, a: (_0,),                                        # floor' = 0
    Op.CEIL: lambda n, a: (_0,),                                         # ceil' = 0
    Op.MIN: lambda n, a, b: (_w(E.make(Op.EQ, a, b), _HALF, _w(E.make(Op.LT, a, b), _1, _0)),   # ties split
                             _w(E.make(Op.EQ, a, b), _HALF, _w(E.make(Op.LT, b, a), _1, _0))),
    Op.MAX: lambda n, a, b: (_w(E.make(Op.EQ, a, b), _HALF, _w(E.make(Op.GT, a, b), _1, _0)),   # ties split
                             _w(E.make(Op.EQ, a, b), _HALF, _w(E.make(Op.GT, b, a), _1, _0))),
    Op.WHERE: lambda n, c, a, b: (None, _w(c, _1, _0), _w(c, _0, _1)),   # the branch taken gets it all
    Op.TOFLOAT: lambda n, a: (None,),                                    # integers carry no gradient
}
# ops whose result carries no gradient at all: integer and boolean arithmetic, comparisons, logic
NO_GRADIENT = E.COMPARE | E.LOGIC | {Op.FLOORDIV, Op.MOD}


def gradients(root: Node, leaves: list[Node], seed: Node = _1) -> dict[Node, Node]:
    """d(root)/d(leaf) * seed for each leaf, by reverse accumulation over the DAG (each node visited once).
    A leaf root does not reach gets 0."""
    # children before parents, each value once: two equal nodes that are distinct objects share one adjoint,
    # so they are one node here (the first, which precedes every parent of either)
    order = list(dict.fromkeys(root.walk()))
    adjoint: dict[Node, Node] = {root: seed}
    wanted = set(leaves)
    for n in reversed(order):
        g = adjoint.get(n)
        if g is None or n in wanted or not n.src or n.dtype != E.FLOAT:
            continue
        if n.op in NO_GRADIENT or n.op is Op.LOAD:
            continue
        rule = RULES.get(n.op)
        if rule is None:
            raise SpecError(f"attnc has no derivative for {n.op.name.lower()}", n.loc,
                            "a function of the library whose derivative attnc knows")
        for s, d in zip(n.src, rule(n, *n.src)):
            if d is None or s.dtype != E.FLOAT:
                continue
            term = g * d
            adjoint[s] = term if s not in adjoint else adjoint[s] + term
    return {leaf: adjoint.get(leaf, _0) for leaf in leaves}
