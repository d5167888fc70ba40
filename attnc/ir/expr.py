"""Expressions: one immutable node type shared by the frontends, the cascade IR and the backends."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from enum import Enum, auto
from typing import Any, Callable, Iterator

from attnc.errors import Loc


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
    FLOOR = auto(); CEIL = auto(); MIN = auto(); MAX = auto(); CLAMP = auto()
    # an integer value used as a float (inserted by backends before printing)
    TOFLOAT = auto()
    # row statistics (normalizers only): a complete reduction over kv_idx of src[0]
    ROWMAX = auto(); ROWSUM = auto()


BINARY = {Op.ADD, Op.SUB, Op.MUL, Op.DIV, Op.FLOORDIV, Op.MOD, Op.POW, Op.DIVZ, Op.MIN, Op.MAX}
COMPARE = {Op.LT, Op.LE, Op.GT, Op.GE, Op.EQ, Op.NE}
LOGIC = {Op.AND, Op.OR, Op.NOT}
UNARY_FLOAT = {Op.EXP, Op.EXP2, Op.LOG, Op.LOG2, Op.SQRT, Op.RSQRT, Op.TANH, Op.SIGMOID, Op.SOFTPLUS}
UNARY_SAME = {Op.NEG, Op.RELU, Op.ABS, Op.SIGN, Op.FLOOR, Op.CEIL}
ROWSTAT = {Op.ROWMAX, Op.ROWSUM}

# name in the language -> (op, arity)
FUNCTIONS: dict[str, tuple[Op, int]] = {
    "exp": (Op.EXP, 1), "exp2": (Op.EXP2, 1), "log": (Op.LOG, 1), "log2": (Op.LOG2, 1),
    "sqrt": (Op.SQRT, 1), "rsqrt": (Op.RSQRT, 1), "tanh": (Op.TANH, 1), "sigmoid": (Op.SIGMOID, 1),
    "softplus": (Op.SOFTPLUS, 1), "relu": (Op.RELU, 1), "abs": (Op.ABS, 1), "sign": (Op.SIGN, 1),
    "floor": (Op.FLOOR, 1), "ceil": (Op.CEIL, 1), "min": (Op.MIN, 2), "max": (Op.MAX, 2),
    "clamp": (Op.CLAMP, 3), "where": (Op.WHERE, 3), "rowmax": (Op.ROWMAX, 1), "rowsum": (Op.ROWSUM, 1),
}

INDEX_NAMES = ("b", "h", "q_idx", "kv_idx")
SIZE_NAMES = ("B", "H", "HKV", "Q", "KV", "D")

INT, FLOAT, BOOL = "int", "float", "bool"


@dataclass(frozen=True)
class Node:
    """An expression node. Immutable; equal nodes hash equal, so a DAG of them shares subexpressions."""
    op: Op
    src: tuple["Node", ...] = ()
    arg: Any = None
    dtype: str = FLOAT
    loc: Loc | None = field(default=None, compare=False, hash=False, repr=False)

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
    if op is Op.POW and srcs[1].op is Op.CONST and srcs[1].dtype == INT and srcs[1].arg < 0:
        return FLOAT
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
    """Wrap integer operands of float-valued ops in TOFLOAT, so a backend computes them in its float type."""
    def fix(n: Node) -> Node | None:
        if n.dtype != FLOAT or n.op in (Op.LOAD, Op.TOFLOAT) or not any(s.dtype == INT for s in n.src):
            return None
        srcs = tuple(_as_float(s) if s.dtype == INT and not (n.op is Op.POW and i == 1) else s
                     for i, s in enumerate(n.src))
        return Node(n.op, srcs, n.arg, FLOAT, n.loc)
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
