"""FlexAttention-style callbacks -> Variant, by tracing: each argument is a Traced value that records the
expression built from it. Tensors the callbacks close over become params when a traced index reads them."""
from __future__ import annotations

import inspect
import linecache
import os
import re

import torch
import torch.nn.functional as F

from attnc.errors import Loc, SpecError
from attnc.frontend.resolve import RESERVED, Resolver, softmax_norm
from attnc.frontend.variant import Param, Variant
from attnc.ir import expr as E
from attnc.ir.expr import BOOL, FLOAT, INT, Node, Op

_PKG = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TORCH_DTYPES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f32",
                 torch.int32: "i32", torch.int64: "i64", torch.int16: "i32", torch.int8: "i32",
                 torch.uint8: "i32", torch.bool: "bool"}


def _user_loc() -> Loc:
    """The innermost frame of the user's code on the stack: where a traced value was misused."""
    for info in inspect.stack(context=1)[1:]:
        fname = os.path.abspath(info.filename)
        if fname.startswith(_PKG + os.sep) or "/torch/" in fname:
            continue
        text = info.code_context[0] if info.code_context else ""
        return Loc(info.filename, info.lineno, len(text) - len(text.lstrip()) + 1, text)
    return Loc("<callback>")


class _Tracer:
    """One tracing session: names the tensors callbacks read."""

    def __init__(self, fns):
        self.params: dict[str, Param] = {}
        self.captured: dict[str, torch.Tensor] = {}
        self.by_id: dict[int, str] = {}
        self.names: dict[int, str] = {}
        for fn in fns:
            if fn is None or not callable(fn):
                continue
            code = getattr(fn, "__code__", None)
            cells = getattr(fn, "__closure__", None) or ()
            if code is not None:
                for name, cell in zip(code.co_freevars, cells):
                    try:
                        self._remember(name, cell.cell_contents)
                    except ValueError:
                        pass
                for name in code.co_names:
                    self._remember(name, getattr(fn, "__globals__", {}).get(name))

    def _remember(self, name: str, value):
        if isinstance(value, torch.Tensor) and id(value) not in self.names:
            self.names[id(value)] = name

    def param_for(self, t: torch.Tensor) -> str:
        if id(t) in self.by_id:
            return self.by_id[id(t)]
        name = self.names.get(id(t)) or f"param{len(self.params)}"
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) or name in RESERVED:
            name = f"param{len(self.params)}"
        while name in self.params:
            name += "_"
        if t.dtype not in _TORCH_DTYPES:
            raise SpecError(f"a callback reads tensor '{name}' of dtype {t.dtype}", _user_loc(),
                            "a float, int or bool tensor")
        if t.dim() == 0:
            raise SpecError(f"a callback reads 0-d tensor '{name}' as a value", _user_loc(),
                            "index a tensor with the callback's indices, or use a Python number")
        dims = tuple(f"{name}_len{i}" if t.dim() > 1 else f"{name}_len" for i in range(t.dim()))
        self.params[name] = Param(name, _TORCH_DTYPES[t.dtype], dims)
        self.captured[name] = t
        self.by_id[id(t)] = name
        return name


_ACTIVE: list[_Tracer] = []


def _node(x) -> Node:
    if isinstance(x, Traced):
        return x.node
    if isinstance(x, bool):
        return E.const(x)
    if isinstance(x, (int, float)):
        return E.const(x)
    if isinstance(x, torch.Tensor) and x.dim() == 0 and not x.requires_grad:
        return E.const(x.item())
    raise SpecError(f"a callback combined a traced value with {type(x).__name__}", _user_loc(),
                    "Python numbers, traced values, or tensors indexed with the callback's indices")


def _num(n: Node, what: str) -> Node:
    if n.dtype == BOOL:
        raise SpecError(f"{what} needs a number, got a boolean", _user_loc(),
                        "a number; use torch.where(cond, a, b) to turn a condition into a number")
    return n


def _bool(n: Node, what: str) -> Node:
    if n.dtype != BOOL:
        raise SpecError(f"{what} needs booleans, got a {n.dtype}", _user_loc(), "a comparison such as q_idx >= kv_idx")
    return n


def _arith(op: Op):
    def f(a, b):
        x, y = _num(_node(a), op.name.lower()), _num(_node(b), op.name.lower())
        if op in (Op.FLOORDIV, Op.MOD) and FLOAT in (x.dtype, y.dtype):
            raise SpecError(f"'{'//' if op is Op.FLOORDIV else '%'}' needs integers", _user_loc())
        return Traced(E.make(op, x, y))
    return f


def _cmp(op: Op):
    return lambda a, b: Traced(E.make(op, _node(a), _node(b)))


def _logic(op: Op):
    return lambda a, b: Traced(E.make(op, _bool(_node(a), "&/|"), _bool(_node(b), "&/|")))


def _unary(op: Op):
    return lambda a, *_, **__: Traced(E.make(op, _num(_node(a), op.name.lower())))


class Traced:
    """A value inside a traced callback. Arithmetic and torch functions build IR; Python control flow fails."""
    __slots__ = ("node",)

    def __init__(self, node: Node):
        self.node = node

    __add__, __sub__, __mul__, __truediv__ = _arith(Op.ADD), _arith(Op.SUB), _arith(Op.MUL), _arith(Op.DIV)
    __floordiv__, __mod__, __pow__ = _arith(Op.FLOORDIV), _arith(Op.MOD), _arith(Op.POW)
    __radd__ = lambda a, b: _arith(Op.ADD)(b, a)
    __rsub__ = lambda a, b: _arith(Op.SUB)(b, a)
    __rmul__ = lambda a, b: _arith(Op.MUL)(b, a)
    __rtruediv__ = lambda a, b: _arith(Op.DIV)(b, a)
    __rfloordiv__ = lambda a, b: _arith(Op.FLOORDIV)(b, a)
    __rmod__ = lambda a, b: _arith(Op.MOD)(b, a)
    __rpow__ = lambda a, b: _arith(Op.POW)(b, a)
    __neg__ = _unary(Op.NEG)
    __abs__ = _unary(Op.ABS)
    __lt__, __le__, __gt__, __ge__ = _cmp(Op.LT), _cmp(Op.LE), _cmp(Op.GT), _cmp(Op.GE)
    __eq__, __ne__ = _cmp(Op.EQ), _cmp(Op.NE)
    __and__, __or__ = _logic(Op.AND), _logic(Op.OR)
    __rand__ = lambda a, b: _logic(Op.AND)(b, a)
    __ror__ = lambda a, b: _logic(Op.OR)(b, a)
    __hash__ = object.__hash__

    def __pos__(self):
        return self

    def __invert__(self):
        return Traced(E.make(Op.NOT, _bool(self.node, "~")))

    def __bool__(self):
        raise SpecError("Python control flow (if, and, or, not, a conditional expression) on a traced value",
                        _user_loc(), "torch.where(cond, a, b) for values, and &, |, ~ to combine conditions")

    def __index__(self):
        raise SpecError("a traced value was used as a Python integer", _user_loc(),
                        "index tensors with the traced value directly (doc[q_idx]), not through int()")

    __int__ = __float__ = __index__

    def __getitem__(self, _):
        raise SpecError("a traced value cannot be indexed", _user_loc(), "index a closed-over tensor instead")

    def __iter__(self):
        raise SpecError("a traced value cannot be iterated", _user_loc())

    # methods FlexAttention code often calls
    def exp(self): return _unary(Op.EXP)(self)
    def tanh(self): return _unary(Op.TANH)(self)
    def sigmoid(self): return _unary(Op.SIGMOID)(self)
    def abs(self): return _unary(Op.ABS)(self)
    def to(self, *_, **__): return self
    def float(self): return Traced(E.make(Op.MUL, self.node, E.const(1.0))) if self.node.dtype == INT else self

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.__getitem__:
            return _index(args[0], args[1])
        handler = _TORCH.get(func) or _TORCH.get(getattr(func, "__name__", None))
        if handler is None:
            name = getattr(func, "__qualname__", None) or getattr(func, "__name__", str(func))
            raise SpecError(f"a callback calls {name}, which attnc cannot trace", _user_loc(),
                            "arithmetic, comparisons, torch.where and the functions: " +
                            ", ".join(sorted(k for k in _TORCH if isinstance(k, str))))
        return handler(*args, **kwargs)


def _index(t, idx) -> Traced:
    if isinstance(t, Traced):
        raise SpecError("a traced value cannot be indexed", _user_loc())
    items = idx if isinstance(idx, tuple) else (idx,)
    if len(items) != t.dim():
        raise SpecError(f"a {t.dim()}-d tensor is indexed with {len(items)} index(es)", _user_loc(),
                        f"{t.dim()} indices, one per dimension")
    nodes = []
    for i in items:
        if isinstance(i, slice) or i is None or i is Ellipsis:
            raise SpecError("only integer indexing of closed-over tensors can be traced", _user_loc(),
                            "t[q_idx], t[h, q_idx - kv_idx]")
        n = _node(i)
        if n.dtype != INT:
            raise SpecError(f"a tensor index must be an integer, got a {n.dtype}", _user_loc())
        nodes.append(n)
    name = _ACTIVE[-1].param_for(t)
    kind = _ACTIVE[-1].params[name].kind
    dtype = FLOAT if kind == "float" else INT if kind == "int" else BOOL
    return Traced(Node(Op.LOAD, tuple(nodes), name, dtype))


def _where(c, a, b):
    return Traced(E.make(Op.WHERE, _bool(_node(c), "where"), _node(a), _node(b)))


def _clamp(x, min=None, max=None):
    n = _node(x)
    if min is not None:
        n = E.make(Op.MAX, n, _node(min))
    if max is not None:
        n = E.make(Op.MIN, n, _node(max))
    return Traced(n)


_TORCH = {
    torch.where: _where, torch.exp: _unary(Op.EXP), torch.exp2: _unary(Op.EXP2), torch.log: _unary(Op.LOG),
    torch.log2: _unary(Op.LOG2), torch.sqrt: _unary(Op.SQRT), torch.rsqrt: _unary(Op.RSQRT),
    torch.tanh: _unary(Op.TANH), torch.sigmoid: _unary(Op.SIGMOID), F.softplus: _unary(Op.SOFTPLUS),
    torch.relu: _unary(Op.RELU), F.relu: _unary(Op.RELU), torch.abs: _unary(Op.ABS), torch.sign: _unary(Op.SIGN),
    torch.floor: _unary(Op.FLOOR), torch.ceil: _unary(Op.CEIL),
    torch.minimum: lambda a, b: Traced(E.make(Op.MIN, _node(a), _node(b))),
    torch.maximum: lambda a, b: Traced(E.make(Op.MAX, _node(a), _node(b))),
    torch.clamp: _clamp, torch.pow: _arith(Op.POW),
    torch.logical_and: _logic(Op.AND), torch.logical_or: _logic(Op.OR),
    torch.logical_not: lambda a: Traced(E.make(Op.NOT, _bool(_node(a), "logical_not"))),
    # tensor methods and operators reached through a closed-over tensor on the left
    "__add__": _arith(Op.ADD), "__sub__": _arith(Op.SUB), "__mul__": _arith(Op.MUL),
    "__truediv__": _arith(Op.DIV), "__radd__": lambda a, b: _arith(Op.ADD)(b, a),
    "__rsub__": lambda a, b: _arith(Op.SUB)(b, a), "__rmul__": lambda a, b: _arith(Op.MUL)(b, a),
    "__lt__": _cmp(Op.LT), "__le__": _cmp(Op.LE), "__gt__": _cmp(Op.GT), "__ge__": _cmp(Op.GE),
    "__eq__": _cmp(Op.EQ), "__ne__": _cmp(Op.NE), "__and__": _logic(Op.AND), "__or__": _logic(Op.OR),
    "where": _where, "exp": _unary(Op.EXP), "tanh": _unary(Op.TANH), "sigmoid": _unary(Op.SIGMOID),
    "log": _unary(Op.LOG), "sqrt": _unary(Op.SQRT), "abs": _unary(Op.ABS), "softplus": _unary(Op.SOFTPLUS),
    "relu": _unary(Op.RELU), "clamp": _clamp, "minimum": lambda a, b: Traced(E.make(Op.MIN, _node(a), _node(b))),
    "maximum": lambda a, b: Traced(E.make(Op.MAX, _node(a), _node(b))),
}


def row_stat(kind: str, x) -> Traced:
    """rowmax / rowsum inside a traced normalizer."""
    op = Op.ROWMAX if kind == "rowmax" else Op.ROWSUM
    return Traced(E.make(op, _num(_node(x), kind)))


def _call(fn, what: str, args) -> Node:
    try:
        out = fn(*args)
    except SpecError:
        raise
    except Exception as e:   # the user's code failed on a traced value: say where, in their code
        tb = e.__traceback__
        loc = Loc("<callback>")
        while tb is not None:
            f = tb.tb_frame.f_code.co_filename
            if not os.path.abspath(f).startswith(_PKG + os.sep):
                text = linecache.getline(f, tb.tb_lineno)
                loc = Loc(f, tb.tb_lineno, len(text) - len(text.lstrip()) + 1, text)
            tb = tb.tb_next
        raise SpecError(f"{what} could not be traced: {type(e).__name__}: {e}", loc,
                        "arithmetic, comparisons and torch functions on its arguments") from None
    if isinstance(out, (bool, int, float)):
        out = Traced(E.const(out))
    if not isinstance(out, Traced):
        raise SpecError(f"{what} returned {type(out).__name__}", Loc(_where_defined(fn)),
                        "an expression of its arguments")
    return out.node


def _where_defined(fn) -> str:
    code = getattr(fn, "__code__", None)
    return f"{code.co_filename}:{code.co_firstlineno}" if code else "<callback>"


def _args() -> tuple[Traced, ...]:
    return tuple(Traced(E.index(n)) for n in ("b", "h", "q_idx", "kv_idx"))


def trace(score_mod=None, mask_mod=None, norm=None, consts: dict | None = None) -> Variant:
    """A Variant from callbacks with FlexAttention's signatures, and a normalizer (name, spec text or callable)."""
    for fn, what in ((score_mod, "score_mod"), (mask_mod, "mask_mod")):
        if fn is not None and not callable(fn):
            raise SpecError(f"{what} must be callable, got {type(fn).__name__}")
    tracer = _Tracer([score_mod, mask_mod, norm if callable(norm) else None])
    _ACTIVE.append(tracer)
    try:
        b, h, q, kv = _args()
        score = _call(score_mod, "score_mod", (Traced(E.SCORE), b, h, q, kv)) if score_mod else E.SCORE
        if score.dtype == BOOL:
            raise SpecError("score_mod returned a boolean", Loc(_where_defined(score_mod)),
                            "a number; a condition belongs in mask_mod")
        mask = None
        if mask_mod is not None:
            mask = _call(mask_mod, "mask_mod", (b, h, q, kv))
            if mask.dtype != BOOL:
                raise SpecError(f"mask_mod returned a {mask.dtype}, not a boolean", Loc(_where_defined(mask_mod)),
                                "a comparison such as q_idx >= kv_idx")
            if mask.op is Op.CONST:
                mask = None if mask.arg else mask
        norm_node, kind = _norm(norm, consts or {})
    finally:
        _ACTIVE.pop()
    if score.dtype == INT:                       # a score_mod that returns an integer: scores are floats
        score = E.make(Op.MUL, score, 1.0)
    names = [getattr(f, "__name__", "") for f in (score_mod, mask_mod)]
    name = "_".join(n for n in names if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", n or "")) or "callbacks"
    return Variant(name, score, mask, norm_node, kind, dict(tracer.params), dict(consts or {}), "<callback>",
                   dict(tracer.captured))


def _norm(norm, consts: dict) -> tuple[Node, str]:
    if norm is None:
        return softmax_norm(), "softmax"
    if isinstance(norm, str):
        v = Resolver(consts).variant(f"norm = {norm}", "<norm>")
        if v.params:
            raise SpecError("a normalizer given as text cannot read params", Loc("<norm>"),
                            "a callable normalizer to read tensors")
        return v.norm, v.norm_kind
    if callable(norm):
        b, h, q, kv = _args()
        body = _call(norm, "norm", (Traced(E.SCORE), b, h, q, kv))
        if body.dtype == BOOL:
            raise SpecError("norm returned a boolean", Loc(_where_defined(norm)))
        return body, "general"
    raise SpecError(f"norm must be a name, spec text or a callable, got {type(norm).__name__}")


_COMPILED: dict = {}


def flex_compat(query, key, value, score_mod, block_mask, scale, enable_gqa, return_lse, mask_mod):
    """attnc.flex_attention: FlexAttention's arguments, compiled once per (score_mod, mask_mod)."""
    from attnc.runtime.compiled import Compiled
    mm = mask_mod or getattr(block_mask, "mask_mod", None) or (block_mask if callable(block_mask) else None)
    if query.shape[1] != key.shape[1] and not enable_gqa:
        raise SpecError(f"q has {query.shape[1]} heads and k {key.shape[1]}: pass enable_gqa=True for GQA")
    k = (id(score_mod), id(mm))
    if k not in _COMPILED:
        _COMPILED[k] = (score_mod, mm, Compiled(trace(score_mod, mm)))
    return _COMPILED[k][2](query, key, value, scale=scale, return_lse=return_lse)

