"""What torch's elementwise operations mean, one value at a time, as IR nodes: arithmetic with torch's
promotion and rounding, integer bitwise operations as arithmetic on bits, and torch's pointwise functions as
compositions of attnc's function library (exact ones only). Every rule takes and returns nodes; what has no
meaning in the IR is a SpecError at the user's line."""
from __future__ import annotations

import inspect
import math
import os

from attnc.errors import Loc, SpecError
from attnc.ir import expr as E
from attnc.ir.expr import BOOL, FLOAT, INT, Node, Op

_PKG = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_BITS: dict[int, tuple[Node, tuple[Node, ...]]] = {}    # id(node) -> (node, its known bits), for one trace
_PLACEHOLDERS: list[Node] = []                           # bitwise results of unknown width made in this trace
INT_BITS = 31           # value bits of attnc's integers (int32, like every index expression's)


def user_loc() -> Loc:
    """The innermost frame of the user's code on the stack: where a traced value was misused."""
    for info in inspect.stack(context=1)[1:]:
        fname = os.path.abspath(info.filename)
        if fname.startswith(_PKG + os.sep) or "/torch/" in fname:
            continue
        text = info.code_context[0] if info.code_context else ""
        return Loc(info.filename, info.lineno, len(text) - len(text.lstrip()) + 1, text)
    return Loc("<callback>")


def fail(message: str, expected: str | None = None):
    raise SpecError(message, user_loc(), expected)


def start() -> None:
    """Forget the bits and placeholders of an earlier trace."""
    _BITS.clear()
    _PLACEHOLDERS.clear()


# -- node-level rules: each takes and returns IR nodes --
def numeric(n: Node) -> Node:
    """A number from a boolean the way torch promotes it: True -> 1 (an integer of one bit)."""
    if n.dtype != BOOL:
        return n
    out = E.where(n, 1, 0)
    _BITS[id(out)] = (out, (out,))
    return out


def as_float(n: Node) -> Node:
    return E.make(Op.MUL, numeric(n), 1.0) if n.dtype != FLOAT else n


def _is(n: Node, v) -> bool:
    return n.op is Op.CONST and n.arg == v and not isinstance(n.arg, bool)


def arith(op: Op):
    return lambda a, b: E.make(op, numeric(a), numeric(b))


def floor_div(a: Node, b: Node) -> Node:
    a, b = numeric(a), numeric(b)
    if FLOAT in (a.dtype, b.dtype):              # torch: float // float = floor(a / b)
        return E.make(Op.FLOOR, E.make(Op.DIV, a, b))
    return E.make(Op.FLOORDIV, a, b)


def floor_mod(a: Node, b: Node) -> Node:
    a, b = numeric(a), numeric(b)
    if FLOAT in (a.dtype, b.dtype):              # remainder with the divisor's sign, like torch.remainder
        return a - b * E.make(Op.FLOOR, E.make(Op.DIV, a, b))
    return E.make(Op.MOD, a, b)


def fmod(a: Node, b: Node) -> Node:
    # C's fmod keeps the dividend's sign: it differs from floor mod by b where the signs differ
    m = floor_mod(a, b)
    differ = E.make(Op.NE, E.make(Op.LT, numeric(a), 0), E.make(Op.LT, numeric(b), 0))
    return E.where(E.make(Op.AND, differ, E.make(Op.NE, m, 0)), m - numeric(b), m)


def trunc(x: Node) -> Node:
    if x.dtype != FLOAT:
        return numeric(x)
    return E.where(E.make(Op.GE, x, 0.0), E.make(Op.FLOOR, x), E.make(Op.CEIL, x))


def divide(a: Node, b: Node, rounding_mode=None) -> Node:
    if rounding_mode == "floor":
        return floor_div(a, b)
    if rounding_mode == "trunc":
        if FLOAT in (a.dtype, b.dtype):
            return trunc(E.make(Op.DIV, numeric(a), numeric(b)))
        q = floor_div(a, b)                      # integer trunc = floor, plus one where inexact and signs differ
        differ = E.make(Op.NE, E.make(Op.LT, numeric(a), 0), E.make(Op.LT, numeric(b), 0))
        return E.where(E.make(Op.AND, differ, E.make(Op.NE, floor_mod(a, b), 0)), q + 1, q)
    if rounding_mode is not None:
        fail(f"rounding_mode={rounding_mode!r}", "None, 'floor' or 'trunc'")
    return E.make(Op.DIV, numeric(a), numeric(b))


def compare(op: Op):
    def f(a: Node, b: Node) -> Node:
        if (a.dtype == BOOL) != (b.dtype == BOOL):
            a, b = numeric(a), numeric(b)
        return E.make(op, a, b)
    return f


def _logic(op: Op, bitwise):
    """& | ^ on booleans are logic; on integers they are bitwise."""
    def f(a: Node, b: Node) -> Node:
        if a.dtype == BOOL and b.dtype == BOOL:
            return E.make(op, a, b)
        if FLOAT in (a.dtype, b.dtype):
            fail("a bitwise operation on a float", "integers (indices) or booleans (conditions)")
        return bitwise(numeric(a), numeric(b))
    return f


def invert(a: Node) -> Node:
    if a.dtype == BOOL:
        return E.make(Op.NOT, a)
    if a.dtype == FLOAT:
        fail("~ on a float", "~ on a condition or an integer")
    if _is_lazy(a):
        return _lazy("~", (a,))
    return E.const(-1 - a.arg) if a.op is Op.CONST else E.make(Op.SUB, -1, a)     # ~x = -1 - x


# -- integer bitwise operations as arithmetic on bits. The IR has no bit operations, so:
#    bit i of any integer x    = (x // 2**i) % 2          (floor division is an arithmetic shift)
#    x with known bits         = sum(2**i * bit_i)         (a constant >= 0, or a value masked by one)
#    x & k, k known            = bit by bit over k's width
#    x | k, x ^ k, k known     = x + (k & ~x),  x + sum(2**i * k_i * (1 - 2 x_i))
#    x & c, x | c, x ^ c, c<0  = x - (x & ~c),  ~(~x & ~c),  ~(x ^ ~c)           (~c >= 0)
# An operation on two values of unknown width has no such form; it is held as a placeholder whose bits
# are still known (x ^ y has bit i = x_i xor y_i), so masking it with a constant later gives a value.
# A placeholder left unmasked at the end is refused.
def _known_bits(n: Node) -> tuple[Node, ...] | None:
    """The bits of a non-negative integer of known width, least significant first; None if unknown."""
    if n.op is Op.CONST:
        return tuple(E.const((n.arg >> i) & 1) for i in range(n.arg.bit_length())) if n.arg >= 0 else None
    hit = _BITS.get(id(n))
    return hit[1] if hit is not None and hit[0] is n else None


def _lazy(op: str, srcs: tuple[Node, ...], k: int = 0) -> Node:
    n = Node(Op.CALL, srcs, ("bits", op, k), INT, user_loc())
    _PLACEHOLDERS.append(n)
    return n


def _is_lazy(n: Node) -> bool:
    return n.op is Op.CALL and isinstance(n.arg, tuple) and n.arg[0] == "bits"


_ONE_BIT = {"&": lambda a, b: _and1(a, b), "|": lambda a, b: _or1(a, b), "^": lambda a, b: _xor1(a, b)}


def _bit(n: Node, i: int) -> Node:
    known = _known_bits(n)
    if known is not None:
        return known[i] if i < len(known) else E.const(0)
    if n.op is Op.CONST:
        return E.const((n.arg >> i) & 1)
    width = _width(n)
    if width is not None and i >= width:
        return E.const(0)
    if i >= INT_BITS and not _is_lazy(n):      # attnc's integers are int32: bit 31 and up repeat the sign
        return E.where(E.make(Op.LT, n, 0), 1, 0)
    if _is_lazy(n):
        op, k = n.arg[1], n.arg[2]
        if op in _ONE_BIT:
            return _ONE_BIT[op](_bit(n.src[0], i), _bit(n.src[1], i))
        if op == "~":
            return _xor1(_bit(n.src[0], i), E.const(1))
        return _bit(n.src[0], i + k) if op == ">>" else E.const(0) if i < k else _bit(n.src[0], i - k)
    return E.make(Op.MOD, E.make(Op.FLOORDIV, n, 2 ** i) if i else n, 2)


def _width(n: Node, depth: int = 12) -> int | None:
    """A bound on the bit length of n where n >= 0 for every input (an index is below 2**31), else None."""
    known = _known_bits(n)
    if known is not None:
        return len(known)
    if n.op is Op.INDEX:
        return INT_BITS
    if n.op is Op.CONST:
        return n.arg.bit_length() if n.arg >= 0 else None
    if depth == 0:
        return None
    w = [_width(s, depth - 1) for s in (n.src[1:] if n.op is Op.WHERE else n.src)]
    c = n.src[1].arg if len(n.src) == 2 and n.src[1].op is Op.CONST else None
    if n.op is Op.FLOORDIV and c is not None and c > 0 and w[0] is not None:   # a // c < 2**w / 2**(bits(c)-1)
        return max(w[0] - c.bit_length() + 1, 0)
    if n.op is Op.MOD and c is not None and c > 0:                            # floor mod: 0 <= a % c < c
        return (c - 1).bit_length()
    if None in w:
        return None
    return {Op.ADD: lambda: max(w) + 1, Op.MUL: lambda: sum(w), Op.MAX: lambda: max(w), Op.MIN: lambda: min(w),
            Op.WHERE: lambda: max(w)}.get(n.op, lambda: None)()


def _from_bits(bits) -> Node:
    bits = list(bits)
    while bits and _is(bits[-1], 0):
        bits.pop()
    if len(bits) > INT_BITS:
        fail(f"a bitwise result reaches bit {len(bits) - 1}, past attnc's 32-bit integers",
              f"values below 2**{INT_BITS}: mask with a narrower constant")
    fixed = sum(1 << i for i, b in enumerate(bits) if _is(b, 1))
    terms = [b if i == 0 else E.make(Op.MUL, b, 1 << i) for i, b in enumerate(bits) if b.op is not Op.CONST]
    if not terms:
        return E.const(fixed)
    out = tree(Op.ADD, terms + ([E.const(fixed)] if fixed else []))
    _BITS[id(out)] = (out, tuple(bits))
    return out


def _and1(a, b):    # one bit: a*b
    return E.const(0) if _is(a, 0) or _is(b, 0) else b if _is(a, 1) else a if _is(b, 1) or a == b else a * b


def _or1(a, b):     # one bit: max(a, b)
    if _is(a, 1) or _is(b, 1):
        return E.const(1)
    return b if _is(a, 0) else a if _is(b, 0) or a == b else E.make(Op.MAX, a, b)


def _xor1(a, b):    # one bit: |a - b|
    if _is(a, 0) or _is(b, 0):
        return b if _is(a, 0) else a
    if _is(a, 1) or _is(b, 1):
        return E.make(Op.SUB, 1, b if _is(a, 1) else a)
    return E.const(0) if a == b else E.make(Op.ABS, E.make(Op.SUB, a, b))


def _negative_const(a: Node, b: Node):
    return next(((c.arg, x) for c, x in ((a, b), (b, a)) if c.op is Op.CONST and c.arg < 0), None)


def _band(a: Node, b: Node) -> Node:
    if a.op is Op.CONST and b.op is Op.CONST:
        return E.const(a.arg & b.arg)
    neg = _negative_const(a, b)
    if neg is not None and not _is_lazy(neg[1]):
        c, x = neg
        return E.make(Op.SUB, x, _band(x, E.const(~c)))
    known = [k for k in (_known_bits(a), _known_bits(b)) if k is not None]
    if not known:
        return _lazy("&", (a, b))
    return _from_bits([_and1(_bit(a, i), _bit(b, i)) for i in range(min(map(len, known)))])


def _bor(a: Node, b: Node) -> Node:
    if a.op is Op.CONST and b.op is Op.CONST:
        return E.const(a.arg | b.arg)
    neg = _negative_const(a, b)
    if neg is not None and not _is_lazy(neg[1]):
        c, x = neg
        return invert(_band(invert(x), E.const(~c)))
    ka, kb = _known_bits(a), _known_bits(b)
    if ka is not None and kb is not None:
        return _from_bits([_or1(_bit(a, i), _bit(b, i)) for i in range(max(len(ka), len(kb)))])
    if ka is None and kb is None or _is_lazy(a) or _is_lazy(b):
        return _lazy("|", (a, b))
    k, x = (ka, b) if ka is not None else (kb, a)
    return E.make(Op.ADD, x, _from_bits([_and1(k_i, E.make(Op.SUB, 1, _bit(x, i))) for i, k_i in enumerate(k)]))


def _bxor(a: Node, b: Node) -> Node:
    if a.op is Op.CONST and b.op is Op.CONST:
        return E.const(a.arg ^ b.arg)
    neg = _negative_const(a, b)
    if neg is not None and not _is_lazy(neg[1]):
        c, x = neg
        return invert(_bxor(x, E.const(~c)))
    ka, kb = _known_bits(a), _known_bits(b)
    if ka is not None and kb is not None:
        return _from_bits([_xor1(_bit(a, i), _bit(b, i)) for i in range(max(len(ka), len(kb)))])
    if ka is None and kb is None or _is_lazy(a) or _is_lazy(b):
        return _lazy("^", (a, b))
    k, x = (ka, b) if ka is not None else (kb, a)
    terms = [E.make(Op.MUL, _and1(k_i, E.make(Op.SUB, 1, E.make(Op.MUL, 2, _bit(x, i)))), 1 << i)
             for i, k_i in enumerate(k) if not _is(k_i, 0)]
    return E.make(Op.ADD, x, tree(Op.ADD, terms)) if terms else x


def shift(left: bool):
    def f(a: Node, b: Node) -> Node:
        if b.op is not Op.CONST or b.dtype != INT or b.arg < 0:
            fail("a shift by a traced or negative amount", "a shift by a non-negative Python int (x << 8)")
        if a.dtype != INT:
            fail("a shift of a non-integer", "x << k on an integer index")
        k, bits = b.arg, _known_bits(a)
        if a.op is Op.CONST:
            return E.const(a.arg << k if left else a.arg >> k)
        if bits is not None:
            return _from_bits((E.const(0),) * k + bits if left else bits[k:])
        if _is_lazy(a):
            return _lazy("<<" if left else ">>", (a,), k)
        return E.make(Op.MUL, a, 1 << k) if left else E.make(Op.FLOORDIV, a, 1 << k)   # x >> k = x // 2**k
    return f


def no_placeholders(root: Node) -> None:
    if not _PLACEHOLDERS:
        return
    for n in root.walk():
        if _is_lazy(n):
            raise SpecError(f"'{n.arg[1]}' of integers whose width attnc cannot bound is used as a number (the IR "
                            f"has no bitwise ops)", n.loc,
                            "mask the result with a constant ((q_idx ^ kv_idx) & 1), or one operand first "
                            "((x & 0xFFFF) | y)")


AND = _logic(Op.AND, _band)
OR = _logic(Op.OR, _bor)
XOR = _logic(Op.NE, _bxor)


# -- pointwise functions as compositions of the IR's function library (torch's definitions, exact) --
def _unary(op: Op):
    return lambda x: E.make(op, as_float(x) if op in E.UNARY_FLOAT else numeric(x))


def _softplus(x, beta=1.0, threshold=20.0):
    # torch: x where beta * x > threshold, softplus(beta * x) / beta elsewhere
    x = as_float(x)
    bx = E.make(Op.MUL, x, float(beta)) if beta != 1 else x
    soft = E.make(Op.SOFTPLUS, bx)
    soft = E.make(Op.DIV, soft, float(beta)) if beta != 1 else soft
    return E.where(E.make(Op.GT, bx, float(threshold)), x, soft)


def _gelu(x, approximate="none"):
    if approximate not in ("none", "tanh"):
        fail(f"gelu's approximate must be 'none' or 'tanh', not {approximate!r}", "approximate='none' or 'tanh'")
    x = as_float(x)
    if approximate == "none":       # 0.5 x (1 + erf(x / sqrt(2)))
        return E.make(Op.MUL, 0.5 * x, 1.0 + E.make(Op.ERF, E.make(Op.MUL, x, 1 / math.sqrt(2))))
    # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
    inner = E.make(Op.MUL, math.sqrt(2 / math.pi), x + E.make(Op.MUL, 0.044715, x * x * x))
    return E.make(Op.MUL, 0.5 * x, 1.0 + E.make(Op.TANH, inner))


def _elu(x, alpha=1.0, scale=1.0, input_scale=1.0):
    x = as_float(x)   # scale * (x if x > 0 else alpha * (exp(input_scale * x) - 1))
    neg = E.make(Op.MUL, float(alpha), E.make(Op.SUB, E.make(Op.EXP, E.make(Op.MUL, x, float(input_scale))), 1.0))
    out = E.where(E.make(Op.GT, x, 0.0), x, neg)
    return E.make(Op.MUL, out, float(scale)) if scale != 1 else out


_SELU = (1.6732632423543772848170429916717, 1.0507009873554804934193349852946)
_HARD = lambda lo, hi: lambda x: E.make(Op.MIN, E.make(Op.MAX, numeric(x), lo), hi)      # noqa: E731

POINTWISE = {
    "exp": _unary(Op.EXP), "exp2": _unary(Op.EXP2), "log": _unary(Op.LOG), "log2": _unary(Op.LOG2),
    "sqrt": _unary(Op.SQRT), "rsqrt": _unary(Op.RSQRT), "tanh": _unary(Op.TANH), "sigmoid": _unary(Op.SIGMOID),
    "erf": _unary(Op.ERF), "special_erf": _unary(Op.ERF),
    "relu": _unary(Op.RELU), "abs": _unary(Op.ABS), "sign": _unary(Op.SIGN), "neg": _unary(Op.NEG),
    "negative": _unary(Op.NEG), "floor": _unary(Op.FLOOR), "ceil": _unary(Op.CEIL), "trunc": trunc,
    "fix": trunc, "absolute": _unary(Op.ABS), "square": lambda x: numeric(x) * numeric(x),
    "reciprocal": lambda x: E.make(Op.DIV, 1.0, numeric(x)),
    "log1p": lambda x: E.make(Op.LOG, 1.0 + as_float(x)),
    "expm1": lambda x: E.make(Op.SUB, E.make(Op.EXP, as_float(x)), 1.0),
    "log10": lambda x: E.make(Op.DIV, E.make(Op.LOG, as_float(x)), math.log(10)),
    "expit": _unary(Op.SIGMOID), "special_expit": _unary(Op.SIGMOID),
    "softplus": _softplus, "gelu": _gelu, "silu": lambda x: as_float(x) * E.make(Op.SIGMOID, as_float(x)),
    "mish": lambda x: as_float(x) * E.make(Op.TANH, _softplus(x)),
    "elu": lambda x, alpha=1.0: _elu(x, alpha),
    "celu": lambda x, alpha=1.0: _elu(x, alpha, 1.0, 1.0 / alpha),   # alpha*(exp(x/alpha)-1)
    "selu": lambda x: _elu(x, _SELU[0], _SELU[1]),
    "leaky_relu": lambda x, negative_slope=0.01:
        E.where(E.make(Op.GT, numeric(x), 0), numeric(x), E.make(Op.MUL, numeric(x), float(negative_slope))),
    "relu6": _HARD(0.0, 6.0),
    "hardtanh": lambda x, min_val=-1.0, max_val=1.0: _HARD(float(min_val), float(max_val))(x),
    "hardsigmoid": lambda x: _HARD(0.0, 1.0)(E.make(Op.ADD, E.make(Op.DIV, as_float(x), 6.0), 0.5)),
    "hardswish": lambda x:
        as_float(x) * _HARD(0.0, 1.0)(E.make(Op.ADD, E.make(Op.DIV, as_float(x), 6.0), 0.5)),
    "softsign": lambda x: E.make(Op.DIV, as_float(x), 1.0 + E.make(Op.ABS, as_float(x))),
    "tanhshrink": lambda x: as_float(x) - E.make(Op.TANH, as_float(x)),
    "logsigmoid": lambda x: E.make(Op.NEG, _softplus(E.make(Op.NEG, as_float(x)))),
    "threshold": lambda x, threshold, value:
        E.where(E.make(Op.GT, numeric(x), threshold), numeric(x), value),
    "hardshrink": lambda x, lambd=0.5:
        E.where(E.make(Op.GT, E.make(Op.ABS, as_float(x)), float(lambd)), as_float(x), 0.0),
    "softshrink": lambda x, lambd=0.5: E.where(
        E.make(Op.GT, as_float(x), float(lambd)), as_float(x) - float(lambd),
        E.where(E.make(Op.LT, as_float(x), -float(lambd)), as_float(x) + float(lambd), 0.0)),
    "isnan": lambda x: E.make(Op.NE, x, x) if x.dtype == FLOAT else E.const(False),
    "isinf": lambda x: E.make(Op.EQ, E.make(Op.ABS, x), math.inf) if x.dtype == FLOAT else E.const(False),
    "isposinf": lambda x: E.make(Op.EQ, x, math.inf) if x.dtype == FLOAT else E.const(False),
    "isneginf": lambda x: E.make(Op.EQ, x, -math.inf) if x.dtype == FLOAT else E.const(False),
    "isfinite": lambda x: E.make(Op.EQ, E.make(Op.SUB, x, x), 0.0) if x.dtype == FLOAT else E.const(True),
    "logical_not": lambda x: E.make(Op.NOT, x if x.dtype == BOOL else E.make(Op.NE, x, 0)),
    "bitwise_not": invert,
}
for _alias, _name in (("log_sigmoid", "logsigmoid"), ("_threshold", "threshold"), ("silu_", "silu")):
    POINTWISE[_alias] = POINTWISE[_name]

BINARY = {
    "add": arith(Op.ADD), "sub": arith(Op.SUB), "subtract": arith(Op.SUB), "mul": arith(Op.MUL),
    "multiply": arith(Op.MUL), "true_divide": arith(Op.DIV), "floor_divide": floor_div, "remainder": floor_mod,
    "fmod": fmod, "pow": lambda a, b: E.make(Op.POW, numeric(a), numeric(b)),
    "maximum": arith(Op.MAX), "minimum": arith(Op.MIN), "fmax": arith(Op.MAX), "fmin": arith(Op.MIN),
    "eq": compare(Op.EQ), "ne": compare(Op.NE), "lt": compare(Op.LT), "le": compare(Op.LE),
    "gt": compare(Op.GT), "ge": compare(Op.GE),
    "less": compare(Op.LT), "less_equal": compare(Op.LE), "greater": compare(Op.GT), "greater_equal": compare(Op.GE),
    "not_equal": compare(Op.NE),
    "logical_and": lambda a, b: E.make(Op.AND, as_bool(a), as_bool(b)),
    "logical_or": lambda a, b: E.make(Op.OR, as_bool(a), as_bool(b)),
    "logical_xor": lambda a, b: E.make(Op.NE, as_bool(a), as_bool(b)),
    "bitwise_and": AND, "bitwise_or": OR, "bitwise_xor": XOR,
    "bitwise_left_shift": shift(True), "bitwise_right_shift": shift(False),
}


def as_bool(n: Node) -> Node:
    return n if n.dtype == BOOL else E.make(Op.NE, n, 0)


# -- shared by the rules and the reductions --
def tree(op: Op, nodes: list[Node]) -> Node:
    """nodes combined pairwise: depth log2(n) rather than n, since every later stage walks the depth."""
    while len(nodes) > 1:
        nodes = [E.make(op, *nodes[i:i + 2]) if i + 1 < len(nodes) else nodes[i] for i in range(0, len(nodes), 2)]
    return nodes[0]


def where_node(c: Node, a: Node, b: Node) -> Node:
    if (a.dtype == BOOL) != (b.dtype == BOOL):
        a, b = numeric(a), numeric(b)
    return E.make(Op.WHERE, as_bool(c), a, b)
