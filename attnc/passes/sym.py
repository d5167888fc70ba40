"""Node <-> sympy. Arithmetic goes to sympy; everything else (loads, comparisons, where, // and %) stays
opaque as a symbol whose operands are converted on their own."""
from __future__ import annotations

import math

import sympy

from attnc.ir import expr as E
from attnc.ir.expr import FLOAT, INT, Node, Op

_FUNCS = {Op.EXP: sympy.exp, Op.LOG: sympy.log, Op.TANH: sympy.tanh, Op.ERF: sympy.erf}
_BACK = {sympy.exp: Op.EXP, sympy.log: Op.LOG, sympy.tanh: Op.TANH, sympy.erf: Op.ERF}
_ARITH = {Op.ADD: lambda a, b: a + b, Op.SUB: lambda a, b: a - b, Op.MUL: lambda a, b: a * b, Op.NEG: lambda a: -a}

# What sympy is given to fold. Its integers are exact and unbounded, so 10 ** 10 ** 10 would run for hours;
# its floats have unbounded exponents, so 1e308 * 1e308 is not inf. Numbers it makes are kept to those a
# backend can print and compute alike; arithmetic that would leave them stays opaque.
MAX_POWER = 64            # x ** e with |e| beyond this is left to the backends
MAX_BITS = 1024           # a power of a number at most this large (in bits) is folded
FLOAT_MAX = 1.7976931348623157e308


def _small_power(base: sympy.Expr, e: int) -> bool:
    """base ** e is cheap for sympy: a small exponent, and no number in base that would grow past MAX_BITS."""
    if abs(e) > MAX_POWER:
        return False
    nums = [abs(a) for a in base.atoms(sympy.Number)]
    if e < 0 and base.is_zero:
        return False
    return all(a == 0 or abs(float(sympy.log(a, 2))) * abs(e) <= MAX_BITS for a in nums)


def _number(op: Op, x: sympy.Expr) -> sympy.Expr | None:
    """A function of a number, evaluated as the backends evaluate it (float64); None where it has no value."""
    try:
        v = E.fold_value(op, [float(x)], FLOAT)
    except (E.FoldError, OverflowError, TypeError):
        return None
    return sympy.Float(v) if v is not None and math.isfinite(v) else None


def _tame_number(a: sympy.Expr) -> bool:
    """A number a backend prints as it is: a normal finite float, an integer (or ratio of them) within int64."""
    if a is sympy.zoo or a is sympy.nan or not a.is_finite:
        return False
    if a.is_Rational:
        return abs(a.p) < 2 ** 63 and abs(a.q) < 2 ** 63
    return not a.is_Float or a == 0 or E.FLOAT_TINY <= abs(float(a)) <= FLOAT_MAX


class SymMap:
    """One conversion context: opaque nodes and leaves get stable symbols, and come back unchanged."""

    def __init__(self):
        self.to_node: dict[sympy.Symbol, Node] = {}
        self.to_sym: dict[Node, sympy.Symbol] = {}
        self.memo: dict[Node, sympy.Expr] = {}
        self.tame: set[sympy.Expr] = set()           # subexpressions known to hold only printable numbers

    def symbol(self, n: Node, name: str | None = None) -> sympy.Symbol:
        if n not in self.to_sym:
            base = name or f"_t{len(self.to_sym)}"
            kw = {"integer": True} if n.dtype == INT else {"real": True}
            if n.op is Op.SIZE and n.dtype == INT:
                kw = {"integer": True, "positive": True}
            if n.op is Op.INDEX:
                kw = {"integer": True, "nonnegative": True}
            s = sympy.Symbol(base, **kw)
            self.to_sym[n], self.to_node[s] = s, n
        return self.to_sym[n]

    # -- Node -> sympy --
    def to(self, root: Node) -> sympy.Expr:
        """root as a sympy expression: children first, each distinct node once (no recursion, and a DAG of
        shared subexpressions stays a DAG)."""
        for n in root.walk():
            if n not in self.memo:
                self.memo[n] = self._one(n)
        return self.memo[root]

    def _one(self, n: Node) -> sympy.Expr:
        op = n.op
        if op is Op.CONST and n.dtype != E.BOOL and math.isfinite(n.arg):
            return sympy.Integer(n.arg) if n.dtype == INT else sympy.Float(n.arg)
        if op in (Op.INDEX, Op.SIZE, Op.TENSOR):
            return self.symbol(n, str(n.arg))
        if op is Op.SCORE:
            return self.symbol(n, "score")
        x = [self.memo[s] for s in n.src]
        out = None
        if op in _ARITH:
            out = _ARITH[op](*x)
        elif op is Op.DIV and not x[1].is_zero:
            out = x[0] / x[1]
        elif op is Op.POW and n.src[1].op is Op.CONST and n.src[1].dtype == INT and _small_power(x[0], n.src[1].arg):
            out = x[0] ** n.src[1].arg
        elif op in _FUNCS:
            out = _FUNCS[op](x[0]) if not x[0].is_number else _number(op, x[0])
        if out is not None and self._tame(out):
            return out
        # opaque: convert operands on their own, then name the rebuilt node. So is arithmetic sympy would
        # fold into no number (x / 0), into one past float64 or int64, or spend unbounded time on
        srcs = tuple(self.back(x[i], s.dtype) for i, s in enumerate(n.src))
        return self.symbol(Node(op, srcs, n.arg, E.keep_dtype(n, srcs), n.loc) if srcs else n)

    def _tame(self, x: sympy.Expr) -> bool:
        """x holds only numbers a backend prints as they are (each subexpression looked at once per map)."""
        stack = [(x, False)]
        while stack:
            y, ready = stack.pop()
            if y in self.tame:
                continue
            if y.is_Number or y is sympy.zoo or y is sympy.nan:
                if not _tame_number(y):
                    return False
            elif not ready:                         # its arguments first, then itself
                stack.append((y, True))
                stack.extend((a, False) for a in y.args)
                continue
            self.tame.add(y)
        return True

    # -- sympy -> Node --
    def back(self, x: sympy.Expr, want: str = FLOAT) -> Node:
        node = self._back(x)
        if want == FLOAT and node.dtype == INT and node.op is Op.CONST:
            return E.const(float(node.arg))
        return node

    def _back(self, x: sympy.Expr) -> Node:
        if x in self.to_node:
            return self.to_node[x]
        if x.is_Integer:
            return E.const(int(x))
        if x.is_Rational:
            return E.make(Op.DIV, E.const(int(x.p)), E.const(int(x.q)))
        if x.is_Float or (x.is_number and x.is_real):      # log(200) -> 5.298...: fold constants
            return E.const(float(x))
        if x.is_Add:
            pos, neg = [], []
            for t in x.as_ordered_terms():
                c, rest = t.as_coeff_Mul()
                (neg if c < 0 else pos).append(t if c >= 0 else -t)
            out = self._back(pos[0]) if pos else -self._back(neg.pop(0))
            for t in pos[1:]:
                out = out + self._back(t)
            for t in neg:
                out = out - self._back(t)
            return out
        if x.is_Mul:
            c, rest = x.as_coeff_Mul()
            if c < 0:
                return -self._back(-x)
            num, den = [], []
            for f in sympy.Mul.make_args(rest):
                if f.is_Pow and f.exp.is_Integer and f.exp < 0:
                    den.append(f.base ** -f.exp)
                else:
                    num.append(self._back(f))
            p, q = (int(c.p), int(c.q)) if c.is_Rational else (c, 1)
            out = None if p == 1 or (c.is_Float and float(c) == 1.0) else self._back(sympy.sympify(p))  # sympy: 1.0 != 1
            for f in num:
                out = f if out is None else out * f
            out = E.const(1) if out is None else out
            for f in den:
                out = out / self._back(f)
            return out / E.const(q) if q != 1 else out
        if x.is_Pow:
            base, ex = self._back(x.base), x.exp
            if ex == sympy.Rational(1, 2):
                return E.make(Op.SQRT, base)
            if ex == sympy.Rational(-1, 2):
                return E.make(Op.RSQRT, base)
            if ex.is_Integer and ex < 0:
                return E.make(Op.DIV, E.const(1.0), base if ex == -1 else E.make(Op.POW, base, E.const(int(-ex))))
            return E.make(Op.POW, base, self._back(ex))
        if x.func in _BACK:
            return E.make(_BACK[x.func], self._back(x.args[0]))
        raise NotImplementedError(f"cannot bring {x} back from sympy")


def canonical(n: Node) -> Node:
    """n in sympy's canonical form (terms ordered, constants folded, like terms collected). sympy flattens
    sums and products, which can turn a balanced tree into a long chain: a result deeper than both n and
    MAX_DEPTH is not taken, so every expression stays as deep as the printers and compilers allow."""
    m = SymMap()
    out = m.back(m.to(n), n.dtype)
    return out if E.height(out) <= max(E.height(n), E.MAX_DEPTH) else n


def linear_coeff(n: Node, var: Node) -> float | None:
    """c if n == c * var + (terms free of var) with c a number, else None."""
    m = SymMap()
    x, v = m.to(n), m.symbol(var)
    d = sympy.diff(x, v)
    return float(d) if d.is_number else None
