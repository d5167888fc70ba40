"""Expressions: one immutable node type shared by the frontends, the cascade IR and the backends."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from enum import Enum, auto
from typing import Any, Callable, Iterator

from attnc.errors import Loc, SpecError


class Op(Enum):
    # leaves
    CONST = auto()      # arg: int | float | bool
    INDEX = auto()      # arg: 'b' | 'h' | 'q_idx' | 'kv_idx'
    SIZE = auto()       # arg: 'B' | 'H' | 'HKV' | 'Q' | 'KV' | 'D' or a free dim name bound at call time
    SCORE = auto()      # the current score (scaled q.k, then each `score =` in turn)
    TENSOR = auto()     # arg: name of a cascade tensor, read at the statement's own ranks
    # a param read: arg = param name, src = one index expression per dim
    LOAD = auto()
    # frontend-only leaves, gone after resolution
    NAME = auto()       # arg: identifier
    MEMBER = auto()     # arg: (alias, member)
    CALL = auto()       # arg: (function name, tuple of keyword names); src = positional then keyword args
    # arithmetic
    ADD = auto(); SUB = auto(); MUL = auto(); DIV = auto(); FLOORDIV = auto(); MOD = auto(); POW = auto()
    NEG = auto()
    # x / d, but 0 where d == 0: division by a row statistic (an empty row gives 0, never NaN)
    DIVZ = auto()
    # comparisons and logic
    LT = auto(); LE = auto(); GT = auto(); GE = auto(); EQ = auto(); NE = auto()
    AND = auto(); OR = auto(); NOT = auto()
    WHERE = auto()
    # the function library
    EXP = auto(); EXP2 = auto(); LOG = auto(); LOG2 = auto(); SQRT = auto(); RSQRT = auto()
    TANH = auto(); SIGMOID = auto(); SOFTPLUS = auto(); RELU = auto(); ABS = auto(); SIGN = auto()
    FLOOR = auto(); CEIL = auto(); MIN = auto(); MAX = auto(); CLAMP = auto(); ERF = auto()
    # an integer value used as a float (inserted by backends before printing)
    TOFLOAT = auto()
    # row statistics (normalizers only): a complete reduction over kv_idx of src[0]
    ROWMAX = auto(); ROWSUM = auto()


BINARY = {Op.ADD, Op.SUB, Op.MUL, Op.DIV, Op.FLOORDIV, Op.MOD, Op.POW, Op.DIVZ, Op.MIN, Op.MAX}
COMPARE = {Op.LT, Op.LE, Op.GT, Op.GE, Op.EQ, Op.NE}
LOGIC = {Op.AND, Op.OR, Op.NOT}
UNARY_FLOAT = {Op.EXP, Op.EXP2, Op.LOG, Op.LOG2, Op.SQRT, Op.RSQRT, Op.TANH, Op.SIGMOID, Op.SOFTPLUS, Op.ERF}
UNARY_SAME = {Op.NEG, Op.RELU, Op.ABS, Op.SIGN, Op.FLOOR, Op.CEIL}
ROWSTAT = {Op.ROWMAX, Op.ROWSUM}

# name in the language -> (op, arity)
FUNCTIONS: dict[str, tuple[Op, int]] = {
    "exp": (Op.EXP, 1), "exp2": (Op.EXP2, 1), "log": (Op.LOG, 1), "log2": (Op.LOG2, 1),
    "sqrt": (Op.SQRT, 1), "rsqrt": (Op.RSQRT, 1), "tanh": (Op.TANH, 1), "sigmoid": (Op.SIGMOID, 1),
    "softplus": (Op.SOFTPLUS, 1), "erf": (Op.ERF, 1), "relu": (Op.RELU, 1), "abs": (Op.ABS, 1), "sign": (Op.SIGN, 1),
    "floor": (Op.FLOOR, 1), "ceil": (Op.CEIL, 1), "min": (Op.MIN, 2), "max": (Op.MAX, 2),
    "clamp": (Op.CLAMP, 3), "where": (Op.WHERE, 3), "rowmax": (Op.ROWMAX, 1), "rowsum": (Op.ROWSUM, 1),
}

INDEX_NAMES = ("b", "h", "q_idx", "kv_idx")
SIZE_NAMES = ("B", "H", "HKV", "Q", "KV", "D")

INT, FLOAT, BOOL = "int", "float", "bool"

# The limits every accepted expression (after lets, score rebinding and imports are inlined) stays within.
# Depth: the printer, sympy and Python's and Triton's compilers of the generated source all recurse over
# it, with room left for what lowering adds (the plan wraps an expression a few levels deeper).
# Nodes: an expression written out in full, shared subexpressions counted each time they are used; a
# chain of lets that each use the previous twice doubles it, and sympy walks it written out.
MAX_DEPTH = 64
MAX_NODES = 4096
# Integer constants, and every integer an index expression computes, lie in int32: Triton computes
# indices in 32 bits and the reference in 64, and only in this range are the two the same.
INT_MIN, INT_MAX = -2 ** 31, 2 ** 31 - 1


@dataclass(frozen=True)
class Node:
    """An expression node. Immutable; equal nodes hash equal, so a DAG of them shares subexpressions."""
    op: Op
    src: tuple["Node", ...] = ()
    arg: Any = None
    dtype: str = FLOAT
    loc: Loc | None = field(default=None, compare=False, hash=False, repr=False)

    def __post_init__(self):
        # children exist before their parents, so each hash is computed once, from the children's
        object.__setattr__(self, "_hash", hash((self.op, self.arg, self.dtype, tuple(s._hash for s in self.src))))

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        """Structural equality, walked with an explicit stack: an expression may be deeper than Python's
        recursion allows before the frontend has measured it."""
        if not isinstance(other, Node):
            return NotImplemented
        stack, seen = [(self, other)], set()
        while stack:
            a, b = stack.pop()
            if a is b or (id(a), id(b)) in seen:
                continue
            if a._hash != b._hash or a.op is not b.op or a.dtype != b.dtype or len(a.src) != len(b.src) \
                    or not (a.arg is b.arg or a.arg == b.arg):
                return False
            seen.add((id(a), id(b)))
            stack.extend(zip(a.src, b.src))
        return True

    def replace(self, **kw) -> "Node":
        return replace(self, **kw)

    def walk(self) -> Iterator["Node"]:
        """Every node of the DAG once, children before parents."""
        seen: set[int] = set()
        stack: list[tuple[Node, bool]] = [(self, False)]
        while stack:
            n, done = stack.pop()
            if done:
                yield n
                continue
            if id(n) in seen:
                continue
            seen.add(id(n))
            stack.append((n, True))
            stack.extend((s, False) for s in reversed(n.src))

    def uses(self, op: Op, arg: Any = None) -> bool:
        return any(n.op is op and (arg is None or n.arg == arg) for n in self.walk())

    # operator sugar, for building expressions in passes and in the callback tracer
    def __add__(self, o): return binary(Op.ADD, self, o)
    def __radd__(self, o): return binary(Op.ADD, o, self)
    def __sub__(self, o): return binary(Op.SUB, self, o)
    def __rsub__(self, o): return binary(Op.SUB, o, self)
    def __mul__(self, o): return binary(Op.MUL, self, o)
    def __rmul__(self, o): return binary(Op.MUL, o, self)
    def __truediv__(self, o): return binary(Op.DIV, self, o)
    def __neg__(self): return Node(Op.NEG, (self,), dtype=self.dtype)


def const(v: int | float | bool) -> Node:
    if isinstance(v, bool):
        return Node(Op.CONST, arg=v, dtype=BOOL)
    if isinstance(v, int):
        return Node(Op.CONST, arg=v, dtype=INT)
    return Node(Op.CONST, arg=float(v), dtype=FLOAT)


def as_node(x) -> Node:
    return x if isinstance(x, Node) else const(x)


def index(name: str) -> Node:
    return Node(Op.INDEX, arg=name, dtype=INT)


def size(name: str) -> Node:
    return Node(Op.SIZE, arg=name, dtype=INT)


SCORE = Node(Op.SCORE, dtype=FLOAT)
NEG_INF = const(-math.inf)
ZERO = const(0.0)


def result_dtype(op: Op, srcs: tuple[Node, ...]) -> str:
    """The dtype an op produces from its operands' dtypes (int/float/bool, no widths: backends pick those)."""
    if op in COMPARE or op in LOGIC:
        return BOOL
    if op in UNARY_FLOAT or op in (Op.DIV, Op.DIVZ, Op.TOFLOAT) or op in ROWSTAT:
        return FLOAT
    if op is Op.WHERE:
        a, b = srcs[1].dtype, srcs[2].dtype
        return a if a == b else FLOAT if FLOAT in (a, b) else INT
    if op is Op.POW and not (srcs[1].op is Op.CONST and srcs[1].dtype == INT and srcs[1].arg >= 0):
        return FLOAT          # an integer power is an integer only for a constant exponent >= 0: 2 ** -1 is 0.5
    if op in (Op.SIGN, Op.NEG, Op.RELU, Op.ABS, Op.FLOOR, Op.CEIL) and srcs[0].dtype == BOOL:
        return INT
    if op in (Op.FLOOR, Op.CEIL):
        return srcs[0].dtype
    kinds = {s.dtype for s in srcs}
    return FLOAT if FLOAT in kinds else INT


def keep_dtype(n: Node, srcs: tuple[Node, ...]) -> str:
    """The dtype of n rebuilt over new operands: a load keeps its param's, others follow their operands."""
    return n.dtype if n.op is Op.LOAD or not srcs else result_dtype(n.op, srcs)


def make(op: Op, *srcs: Node, arg: Any = None, loc: Loc | None = None) -> Node:
    srcs = tuple(as_node(s) for s in srcs)
    return Node(op, srcs, arg, result_dtype(op, srcs), loc)


def binary(op: Op, a, b) -> Node:
    return make(op, as_node(a), as_node(b))


def where(c, a, b) -> Node:
    return make(Op.WHERE, as_node(c), as_node(a), as_node(b))


def substitute(root: Node, mapping: dict[Node, Node] | Callable[[Node], Node | None]) -> Node:
    """Rebuild `root` bottom-up, replacing nodes that `mapping` names (by equality)."""
    get = mapping.get if isinstance(mapping, dict) else mapping
    memo: dict[Node, Node] = {}
    for n in root.walk():
        hit = get(n)
        if hit is not None:
            memo[n] = hit
            continue
        srcs = tuple(memo[s] for s in n.src)
        memo[n] = n if srcs == n.src else Node(n.op, srcs, n.arg, keep_dtype(n, srcs), n.loc)
    return memo[root]


def free_indices(n: Node) -> frozenset[str]:
    """The index variables an expression really depends on (its ranks, in IR terms)."""
    return frozenset(x.arg for x in n.walk() if x.op is Op.INDEX) | (
        frozenset({"b", "h", "q_idx", "kv_idx"}) if n.uses(Op.SCORE) else frozenset())


def promote_ints(root: Node) -> Node:
    """Wrap integer operands of float-valued ops, and of comparisons with a float, in TOFLOAT, so a backend
    computes them in its float type (torch would compare an integer tensor with 1e-300 in float32, where it
    is 0). A constant integer exponent stays an integer: x ** 2 is x * x."""
    def fix(n: Node) -> Node | None:
        mixed_compare = n.op in COMPARE and {s.dtype for s in n.src} == {INT, FLOAT}
        if not mixed_compare and (n.dtype != FLOAT or n.op in (Op.LOAD, Op.TOFLOAT)):
            return None
        if not any(s.dtype == INT for s in n.src):
            return None
        srcs = tuple(_as_float(s) if s.dtype == INT and not (n.op is Op.POW and i == 1 and s.op is Op.CONST) else s
                     for i, s in enumerate(n.src))
        return Node(n.op, srcs, n.arg, n.dtype, n.loc)
    return bottom_up(root, fix)


def _as_float(n: Node) -> Node:
    return const(float(n.arg)) if n.op is Op.CONST else Node(Op.TOFLOAT, (n,), dtype=FLOAT)


def bottom_up(root: Node, fix) -> Node:
    """Rebuild root from the leaves up; fix(node over rebuilt operands) may return a replacement."""
    memo: dict[Node, Node] = {}
    for n in root.walk():
        srcs = tuple(memo[s] for s in n.src)
        m = n if srcs == n.src else Node(n.op, srcs, n.arg, n.dtype, n.loc)
        memo[n] = fix(m) or m
    return memo[root]


def params_used(n: Node) -> list[str]:
    out: list[str] = []
    for x in n.walk():
        if x.op is Op.LOAD and x.arg not in out:
            out.append(x.arg)
    return out


def height(root: Node) -> int:
    """Levels from root to its deepest leaf (a leaf is 1), without recursion."""
    h: dict[int, int] = {}
    for n in root.walk():
        h[id(n)] = 1 + max((h[id(s)] for s in n.src), default=0)
    return h[id(root)]


def too_big(root: Node) -> tuple[Node, str] | None:
    """The lowest node past MAX_DEPTH levels or MAX_NODES nodes written out, with which limit; None if
    root is within both. Children are measured before parents, without recursion."""
    height: dict[int, int] = {}
    count: dict[int, int] = {}
    for n in root.walk():
        height[id(n)] = 1 + max((height[id(s)] for s in n.src), default=0)
        count[id(n)] = 1 + sum(count[id(s)] for s in n.src)
        if height[id(n)] > MAX_DEPTH:
            return n, f"nests deeper than {MAX_DEPTH} levels"
        if count[id(n)] > MAX_NODES:
            return n, f"has more than {MAX_NODES} operations when its lets are written out"
    return None


def check_size(root: Node, loc: Loc | None = None) -> None:
    """SpecError at the first subexpression past the limits (MAX_DEPTH, MAX_NODES)."""
    hit = too_big(root)
    if hit is not None:
        n, why = hit
        raise SpecError(f"this expression {why}", n.loc or loc,
                        f"an expression at most {MAX_DEPTH} levels deep and {MAX_NODES} operations long; "
                        f"name parts with let and keep each part small")


def check_ints(root: Node, loc: Loc | None = None) -> None:
    """SpecError at an integer constant outside [INT_MIN, INT_MAX]."""
    for n in root.walk():
        if n.op is Op.CONST and n.dtype == INT and not INT_MIN <= n.arg <= INT_MAX:
            raise SpecError(f"the integer {n.arg} is outside attnc's integer range", n.loc or loc, INT_RANGE_WORDS)


INT_RANGE_WORDS = "an integer from -2**31 to 2**31 - 1 (indices are computed in 32 bits)"
# A float below float64's smallest normal number is subnormal: a constant like 1e-320 is 0 in a float32
# kernel and not in the reference, and no variant needs one, so such constants are refused.
FLOAT_TINY = 2.2250738585072014e-308
TINY_WORDS = "0.0, or a number of magnitude at least 2.2250738585072014e-308"


def fingerprint(*roots: Node | None) -> str:
    """A text that is equal exactly when the expressions are (locations aside): each distinct node once,
    children before parents, so it is linear in the DAG and never recurses."""
    ids: dict[Node, int] = {}
    parts: list[str] = []
    for root in roots:
        if root is None:
            parts.append("none")
            continue
        for n in root.walk():
            if n not in ids:
                ids[n] = len(ids)
                parts.append(f"{n.op.name}({n.arg!r},{n.dtype};{','.join(str(ids[s]) for s in n.src)})")
        parts.append(f"root {ids[root]}")
    return ";".join(parts)


# -- constant folding --
# An op whose operands are all constants becomes a constant, computed as the reference computes it:
# integers exactly (Python ints), floats in float64 with torch's functions. What has no value is refused:
# a result that is NaN, infinite from finite operands (1/0, log(0), exp(1000)), or an integer outside
# [INT_MIN, INT_MAX]; an integer divisor of 0.

_INT_FN: dict[Op, Callable] = {
    Op.ADD: lambda a, b: a + b, Op.SUB: lambda a, b: a - b, Op.MUL: lambda a, b: a * b, Op.NEG: lambda a: -a,
    Op.FLOORDIV: lambda a, b: a // b, Op.MOD: lambda a, b: a % b, Op.POW: lambda a, b: a ** b,
    Op.ABS: abs, Op.SIGN: lambda a: (a > 0) - (a < 0), Op.RELU: lambda a: max(a, 0),
    Op.FLOOR: lambda a: a, Op.CEIL: lambda a: a, Op.MIN: min, Op.MAX: max,
}
_CMP_FN: dict[Op, Callable] = {
    Op.LT: lambda a, b: a < b, Op.LE: lambda a, b: a <= b, Op.GT: lambda a, b: a > b,
    Op.GE: lambda a, b: a >= b, Op.EQ: lambda a, b: a == b, Op.NE: lambda a, b: a != b,
    Op.AND: lambda a, b: a and b, Op.OR: lambda a, b: a or b, Op.NOT: lambda a: not a,
}


def _float_fn(op: Op) -> Callable | None:
    import torch
    import torch.nn.functional as F
    return {
        Op.ADD: torch.add, Op.SUB: torch.sub, Op.MUL: torch.mul, Op.DIV: torch.true_divide, Op.NEG: torch.neg,
        Op.POW: torch.pow, Op.DIVZ: lambda a, d: torch.where(d == 0, torch.zeros_like(a), a / d),
        Op.EXP: torch.exp, Op.EXP2: torch.exp2, Op.LOG: torch.log, Op.LOG2: torch.log2, Op.SQRT: torch.sqrt,
        Op.RSQRT: torch.rsqrt, Op.TANH: torch.tanh, Op.SIGMOID: torch.sigmoid, Op.SOFTPLUS: F.softplus,
        Op.ERF: torch.erf, Op.RELU: torch.relu, Op.ABS: torch.abs, Op.SIGN: torch.sign, Op.FLOOR: torch.floor, Op.CEIL: torch.ceil,
        Op.MIN: torch.minimum, Op.MAX: torch.maximum, Op.TOFLOAT: lambda a: a,
    }.get(op)


class FoldError(Exception):
    """A constant expression without a value: why, and what would have one."""

    def __init__(self, why: str, expected: str):
        super().__init__(why)
        self.why, self.expected = why, expected


def fold_value(op: Op, args: list, dtype: str, ieee: bool = False):
    """The value of op over constant args, as the reference computes it; FoldError where there is none.
    ieee: a float that overflows or divides by zero is the infinity the reference computes, not an error."""
    if op is Op.WHERE:
        return args[1] if args[0] else args[2]
    if op in _CMP_FN:
        return bool(_CMP_FN[op](*args))
    if dtype == INT:
        if op in (Op.FLOORDIV, Op.MOD) and args[1] == 0:
            raise FoldError("integer division by zero", "a divisor that is never 0")
        if op is Op.POW and abs(args[0]) > 1 and args[1] > 64:      # 2 ** 64 is out of range already
            raise FoldError(f"{args[0]} ** {args[1]} is outside attnc's integer range", INT_RANGE_WORDS)
        v = int(_INT_FN[op](*(int(a) for a in args)))
        if not INT_MIN <= v <= INT_MAX:
            raise FoldError(f"this evaluates to {v}, outside attnc's integer range", INT_RANGE_WORDS)
        return v
    import torch
    fn = _float_fn(op)
    if fn is None:
        return None
    xs = [torch.tensor(float(a), dtype=torch.float64) for a in args]
    v = float(fn(*xs))
    if math.isnan(v):
        raise FoldError("this evaluates to NaN (not a number)", "arguments inside the function's domain")
    if v != 0 and abs(v) < FLOAT_TINY:
        raise FoldError("this underflows below float64's normal numbers", TINY_WORDS)
    if math.isinf(v) and not ieee and all(math.isfinite(float(a)) for a in args):
        zero_div = op in (Op.DIV, Op.POW, Op.LOG, Op.LOG2, Op.RSQRT) and 0 in args
        raise FoldError("division by zero" if zero_div else "this overflows to infinity",
                        "a constant expression with a finite value (write inf for infinity)")
    return v


def fold(n: Node, strict: bool = True) -> Node | None:
    """n as a constant when every operand is one; None when it is not constant. When the constant has no
    value (see fold_value): SpecError at n's location. Not strict (for constants the passes uncover, such as
    exp(q_idx - q_idx + 1000)): a float overflow folds to the infinity the reference computes too, and an
    integer outside the range is left as it is (the call-time check refuses it); NaN is still an error."""
    if not n.src or n.op in (Op.LOAD, Op.CALL) or n.op in ROWSTAT or any(s.op is not Op.CONST for s in n.src):
        return None
    try:
        v = fold_value(n.op, [s.arg for s in n.src], n.dtype, ieee=not strict)
    except FoldError as e:
        if not strict and n.dtype != FLOAT:
            return None
        raise SpecError(e.why, n.loc, e.expected) from None
    if v is None:
        return None
    v = bool(v) if n.dtype == BOOL else int(v) if n.dtype == INT else float(v)
    return const(v).replace(loc=n.loc)
