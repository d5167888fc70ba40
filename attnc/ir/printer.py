"""Expression and cascade printing. Every target (IR text, torch, triton) is a table of op -> format."""
from __future__ import annotations

import math
from typing import Callable

from attnc.ir.cascade import INDEX_RANK, Cascade, Einsum
from attnc.ir.expr import Node, Op

ATOM = 100

# op -> (format, precedence[, operand precedence]). Operands are {0}, {1}, {2}; precedence follows
# Python's. A call-like format that puts an operand next to an operator names the precedence below
# which that operand needs parentheses.
INFIX: dict[Op, tuple[str, int]] = {
    Op.OR: ("{0} or {1}", 1), Op.AND: ("{0} and {1}", 2), Op.NOT: ("not {0}", 3),
    Op.LT: ("{0} < {1}", 4), Op.LE: ("{0} <= {1}", 4), Op.GT: ("{0} > {1}", 4),
    Op.GE: ("{0} >= {1}", 4), Op.EQ: ("{0} == {1}", 4), Op.NE: ("{0} != {1}", 4),
    Op.ADD: ("{0} + {1}", 10), Op.SUB: ("{0} - {1}", 10),
    Op.MUL: ("{0} * {1}", 11), Op.DIV: ("{0} / {1}", 11), Op.FLOORDIV: ("{0} // {1}", 11),
    Op.MOD: ("{0} % {1}", 11), Op.NEG: ("-{0}", 12), Op.POW: ("{0} ** {1}", 13),
}
# ops that read the same in every Python-like target, as calls
CALLS = {op: (f"{op.name.lower()}({{0}})", ATOM) for op in (
    Op.EXP, Op.EXP2, Op.LOG, Op.LOG2, Op.SQRT, Op.RSQRT, Op.TANH, Op.SIGMOID, Op.SOFTPLUS, Op.RELU,
    Op.ABS, Op.SIGN, Op.FLOOR, Op.CEIL, Op.ERF)}

IR_TABLE: dict[Op, tuple[str, int]] = {
    **INFIX, **CALLS,
    Op.MIN: ("min({0}, {1})", ATOM), Op.MAX: ("max({0}, {1})", ATOM),
    Op.WHERE: ("where({0}, {1}, {2})", ATOM), Op.DIVZ: ("{0} /? {1}", 11), Op.TOFLOAT: ("float({0})", ATOM),
    Op.ROWMAX: ("rowmax({0})", ATOM), Op.ROWSUM: ("rowsum({0})", ATOM),
}

ARITH = {Op.ADD, Op.SUB, Op.MUL, Op.DIV, Op.NEG}


def number(v) -> str:
    """A literal attnc itself prints: never spec text."""
    if isinstance(v, bool):
        return "True" if v else "False"
    if isinstance(v, int):
        return str(int(v))
    v = float(v)
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if math.isnan(v):
        return "nan"
    return repr(v)


def ir_load(n: Node, idx: list[str]) -> str:
    return f"{n.arg}[{', '.join(idx)}]"


def render(root: Node, table: dict[Op, tuple[str, int]], leaf: Callable[[Node], str],
           names: dict[Node, str] | None = None,
           load: Callable[[Node, list[str]], str] = ir_load,
           inplace: dict[Op, tuple[str, int]] | None = None, donated: Node | None = None,
           custom: Callable[[Node, list[str]], tuple[str, int] | None] | None = None) -> str:
    """Infix text for `root`; nodes in `names` print as those names (common subexpressions).
    inplace: formats for ops that may overwrite their first operand: a unary op's fresh temporary, or
    `donated`, a named value whose one remaining reader is this op. custom: a target's own text for
    particular nodes (given their operands' texts), or None to use the table."""
    names = names or {}
    inplace = inplace or {}

    def fresh(n: Node) -> bool:
        return n not in names and n.op in ARITH and n.dtype == "float"

    memo: dict[Node, tuple[str, int]] = {}

    def go(n: Node) -> tuple[str, int]:
        if n in names:
            return names[n], ATOM
        if n in memo:
            return memo[n]
        if n.op is Op.LOAD:
            out = (load(n, [go(s)[0] for s in n.src]), ATOM)
        elif not n.src:
            text = leaf(n)
            out = (text, ATOM if not text.startswith("-") else 12)
        elif custom is not None and (hit := custom(n, [go(s)[0] for s in n.src])) is not None:
            out = hit
        else:
            if n.op not in table:
                raise NotImplementedError(f"this target cannot print {n.op.name}")
            overwrite = n.op in inplace and (fresh(n.src[0]) if len(n.src) == 1 else n.src[0] == donated)
            fmt, prec, *tight = inplace[n.op] if overwrite else table[n.op]
            parts = []
            for i, s in enumerate(n.src):
                t, p = go(s)
                # a right operand of equal precedence keeps its parentheses: a * (b // c) is not a * b // c,
                # and even a + (b + c) rounds differently from (a + b) + c
                if prec < ATOM and (p < prec or (p == prec and i > 0 and n.op is not Op.NEG)
                                    or (p == prec and i == 0 and n.op is Op.POW) or (p == prec == 4)):
                    t = f"({t})"
                elif tight and p < tight[0]:       # an operand the format itself puts next to an operator
                    t = f"({t})"
                parts.append(t)
            out = (fmt.format(*parts), prec)
        memo[n] = out
        return out
    return go(root)[0]


def ir_leaf(n: Node) -> str:
    if n.op is Op.CONST:
        return number(n.arg)
    if n.op is Op.INDEX:
        return INDEX_RANK[n.arg]
    if n.op in (Op.SIZE, Op.TENSOR):
        return n.arg
    if n.op is Op.SCORE:
        return "score"
    raise NotImplementedError(n.op.name)


def expr_text(n: Node) -> str:
    """An expression as the IR printer shows it."""
    return render(n, IR_TABLE, ir_leaf)


def stmt_text(s: Einsum, inputs: dict[str, tuple[str, ...]] | None = None) -> str:
    """One statement; reads of the cascade's inputs show their ranks (Q[b,h,m,e])."""
    ranks = ",".join(s.ranks)
    inputs = inputs or {}

    def leaf(n: Node) -> str:
        if n.op is Op.TENSOR and n.arg in inputs:
            return f"{n.arg}[{','.join(inputs[n.arg])}]"
        return ir_leaf(n)
    line = f"{s.name}[{ranks}] = {render(s.body, IR_TABLE, leaf)}"
    if s.reduce:
        kind = "running " if s.running else ""
        line = f"{line:<56} {kind}reduce {s.reduce} over {','.join(s.over)}"
        if s.rescale:
            line += "  rescale " + " * ".join(f"exp({c:g}*({r}_old - {r}))" for r, c in s.rescale)
    if s.note:
        line += f"    # {s.note}"
    return line


def cascade_text(c: Cascade) -> str:
    inputs = {t.name: t.ranks for t in c.inputs}
    return "\n".join(stmt_text(s, inputs) for s in c.stmts)
