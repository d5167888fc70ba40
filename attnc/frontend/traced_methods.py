"""Tensor methods and torch functions on traced values: conversions and constructors, reductions and
short-vector work (dot products, .any(-1)), shape views, and the tables that bind each torch function or
Tensor method to its rule. Importing this module installs the methods on Traced."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from attnc.frontend.torch_rules import (AND, BINARY, OR, POINTWISE, XOR, arith, as_bool, as_float, compare, divide,
                                        fail, floor_div, floor_mod, invert, numeric, shift, tree, where_node)
from attnc.frontend.traced import HANDLERS, Traced, elementwise, lift, positions, rearrange, stack
from attnc.ir import expr as E
from attnc.ir.expr import BOOL, FLOAT, INT, Op

# -- conversions and constructors --
def _to_kind(x: Traced, dtype) -> Traced:
    if dtype is None:
        return x
    if dtype in (torch.float16, torch.bfloat16):
        fail(f"a cast to {dtype}: attnc computes scores in float32 and would not round them",
              ".float() or no cast")
    if dtype.is_floating_point:
        return elementwise(as_float, x)
    if dtype == torch.bool:
        return elementwise(as_bool, x)
    if x.kind == FLOAT:
        fail(f"a cast of a float to {dtype} (the IR has no float-to-integer op)",
              "keep it a float (floor() keeps the value), or compute the integer from integer indices")
    return elementwise(numeric, x)


def _to(x: Traced, *args, **kwargs) -> Traced:
    dtype = kwargs.get("dtype")
    for a in args:
        if isinstance(a, torch.dtype):
            dtype = a
        elif isinstance(a, (Traced, torch.Tensor)):
            dtype = a.dtype
    return _to_kind(x, dtype)


def _shape_args(args, kwargs) -> tuple[int, ...]:
    size = kwargs.get("size", args[0] if len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)) else args)
    return tuple(int(s) for s in size)


def _filled(shape, value, like: Traced | None, dtype) -> Traced:
    """A constant array: of dtype's kind, else like's."""
    kind = _kind_of(dtype) if dtype is not None else (like.kind if like is not None else FLOAT)
    v = bool(value) if kind == BOOL else int(value) if kind == INT else float(value)
    n = E.const(v)
    return Traced(n) if not shape else Traced.array([n] * math.prod(shape), shape)


def _kind_of(dtype) -> str:
    return BOOL if dtype == torch.bool else FLOAT if dtype.is_floating_point else INT


def _new(value):
    def f(self, *args, dtype=None, device=None, requires_grad=False, layout=None, pin_memory=False, **kw):
        return _filled(_shape_args(args, kw), value, self, dtype)
    return f


def _new_full(self, size, fill_value, dtype=None, device=None, requires_grad=False, **_):
    return _full_of(tuple(size), fill_value, self, dtype)


def _full_of(shape, fill, like: Traced | None, dtype) -> Traced:
    if isinstance(fill, (Traced, torch.Tensor)):
        return elementwise(lambda _, f: f, _filled(shape, 0, like, dtype), fill)
    return _filled(shape, fill, like, dtype)


def _like(value):
    def f(x, dtype=None, **_):
        x = lift(x)
        return _filled(x.shape, value, x, dtype)
    return f


# -- reductions and vector work: unrolled over the array's elements --
def _reduce(op: Op, empty, to_kind):
    def f(x, dim=None, keepdim=False, **kwargs):
        x = elementwise(to_kind, x)
        dim = kwargs.get("axis", dim)
        if dim is None or not x.shape:
            rows, shape = [list(x.nodes)], ()
        else:
            dims = tuple(d % len(x.shape) for d in ((dim,) if isinstance(dim, int) else dim))
            pos = positions(x.shape, lambda p: p.permute(*[d for d in range(p.dim()) if d not in dims], *dims))
            shape = tuple(pos.shape[:pos.dim() - len(dims)])
            rows = [[x.nodes[i] for i in r] for r in pos.reshape(math.prod(shape), -1).tolist()]
            if keepdim:
                shape = tuple(1 if d in dims else s for d, s in enumerate(x.shape))
        out = [tree(op, r) if r else E.const(empty) for r in rows]
        return Traced(out[0]) if not shape else Traced.array(out, shape)
    return f


_SUM = _reduce(Op.ADD, 0, numeric)
_PROD = _reduce(Op.MUL, 1, numeric)
_ANY = _reduce(Op.OR, False, as_bool)
_ALL = _reduce(Op.AND, True, as_bool)
_AMAX = _reduce(Op.MAX, -math.inf, numeric)
_AMIN = _reduce(Op.MIN, math.inf, numeric)


def _mean(x, dim=None, keepdim=False, dtype=None):
    x = lift(x)
    n = x.numel() if dim is None else math.prod(x.shape[d] for d in ((dim,) if isinstance(dim, int) else dim))
    return elementwise(lambda s: E.make(Op.DIV, as_float(s), float(n)), _SUM(x, dim, keepdim))


def _extreme(reduce, pairwise, result):
    """torch.max / torch.min: of two tensors elementwise; over all values; or over a dim, with indices."""
    def f(x, other=None, dim=None, keepdim=False):
        if other is not None and not isinstance(other, int) or isinstance(other, bool):
            return elementwise(pairwise, x, other)
        dim = other if other is not None else dim
        if dim is None:
            return reduce(x)
        x = lift(x)
        d = dim % len(x.shape)
        values = reduce(x, d, True)
        idx = None                              # the first index that attains the extreme, as torch's
        for i in reversed(range(x.shape[d])):
            hit = elementwise(lambda v, m: E.make(Op.EQ, v, m), rearrange(x, lambda p: p.narrow(d, i, 1)), values)
            idx = elementwise(lambda c, r, j=i: E.where(c, j, r), hit, 0 if idx is None else idx)
        if not keepdim:
            values, idx = (rearrange(t, lambda p: p.squeeze(d)) for t in (values, idx))
        return result((values, idx))
    return f


def _cat(items, dim=0):
    ts = [lift(t) for t in items]
    pos_parts, nodes, offset = [], [], 0
    for t in ts:
        pos_parts.append(positions(t.shape) + offset)
        nodes.extend(t.nodes)
        offset += len(t.nodes)
    pos = torch.cat(pos_parts, dim)
    return Traced.array([nodes[i] for i in pos.reshape(-1).tolist()], pos.shape)


def _matmul(a, b):
    a, b = lift(a), lift(b)
    if not a.shape or not b.shape:
        fail("matmul of a scalar", "a * b for scalars")
    a2 = rearrange(a, lambda p: p.unsqueeze(0)) if len(a.shape) == 1 else a
    b2 = rearrange(b, lambda p: p.unsqueeze(-1)) if len(b.shape) == 1 else b
    prod = elementwise(lambda x, y: E.make(Op.MUL, numeric(x), numeric(y)),
                rearrange(a2, lambda p: p.unsqueeze(-1)), rearrange(b2, lambda p: p.unsqueeze(-3)))
    out = _SUM(prod, -2)
    if len(a.shape) == 1:
        out = rearrange(out, lambda p: p.squeeze(-2))
    if len(b.shape) == 1:
        out = rearrange(out, lambda p: p.squeeze(-1))
    return out


def _dot(a, b):
    a, b = lift(a), lift(b)
    if len(a.shape) != 1 or a.shape != b.shape:
        fail(f"torch.dot of shapes {a.shape} and {b.shape}", "two 1-d rows of the same length")
    return _matmul(a, b)


def _where(c, a=None, b=None):
    if a is None or b is None:
        fail("torch.where(cond) with one argument", "torch.where(cond, a, b)")
    return elementwise(lambda cn, an, bn: where_node(cn, an, bn), c, a, b)


def _clamp(x, min=None, max=None):              # noqa: A002 -- torch's keyword names
    x = lift(x)
    if min is not None:
        x = elementwise(lambda a, m: E.make(Op.MAX, numeric(a), numeric(m)), x, min)
    if max is not None:
        x = elementwise(lambda a, m: E.make(Op.MIN, numeric(a), numeric(m)), x, max)
    return x


def _add(x, other, alpha=1):
    return elementwise(arith(Op.ADD), x, other if alpha == 1 else elementwise(lambda o: numeric(o) * alpha, other))


def _sub(x, other, alpha=1):
    return elementwise(arith(Op.SUB), x, other if alpha == 1 else elementwise(lambda o: numeric(o) * alpha, other))


def _masked_fill(x, mask, value):
    return elementwise(lambda v, c, f: where_node(c, f, v), x, mask, value)


def _view(fn_name):
    return lambda x, *args, **kwargs: rearrange(lift(x), lambda p: getattr(p, fn_name)(*args, **kwargs))


def _unary_map(fn):
    def f(x, *args, inplace=False, **kwargs):      # in place or not, a traced value is a new expression
        return elementwise(lambda n: fn(n, *args, **kwargs), x)
    return f


def _binary_map(fn):
    return lambda x, other, *args, **kwargs: elementwise(lambda a, b: fn(a, b, *args, **kwargs), x, other)


def _same(x, *_, **__):
    return lift(x)


# Tensor methods a traced value answers (self first); FUNCTIONS adds torch.* / F.* spellings.
METHODS = {name: _unary_map(fn) for name, fn in POINTWISE.items()}
METHODS.update({name: _binary_map(fn) for name, fn in BINARY.items()})
METHODS.update({
    "div": lambda x, other, rounding_mode=None: elementwise(lambda a, b: divide(a, b, rounding_mode), x, other),
    "divide": lambda x, other, rounding_mode=None: elementwise(lambda a, b: divide(a, b, rounding_mode), x, other),
    "add": _add, "sub": _sub, "subtract": _sub,
    "clamp": _clamp, "clip": _clamp,
    "clamp_min": lambda x, m: _clamp(x, min=m), "clamp_max": lambda x, m: _clamp(x, max=m),
    "where": lambda x, condition, y: _where(condition, x, y), "masked_fill": _masked_fill,
    "to": _to, "type": lambda x, dtype=None, **_: _to_kind(lift(x), dtype) if dtype is not None else "torch.Tensor",
    "type_as": lambda x, other: _to_kind(lift(x), other.dtype),
    "float": lambda x, *_, **__: _to_kind(lift(x), torch.float32),
    "double": lambda x, *_, **__: _to_kind(lift(x), torch.float32),
    "int": lambda x, *_, **__: _to_kind(lift(x), torch.int32),
    "long": lambda x, *_, **__: _to_kind(lift(x), torch.int64),
    "bool": lambda x, *_, **__: _to_kind(lift(x), torch.bool),
    "half": lambda x, *_, **__: _to_kind(lift(x), torch.float16),
    "bfloat16": lambda x, *_, **__: _to_kind(lift(x), torch.bfloat16),
    "contiguous": _same, "clone": _same, "detach": _same, "cpu": _same, "cuda": _same,
    "new_ones": _new(1), "new_zeros": _new(0), "new_full": _new_full,
    "new_tensor": lambda self, data, dtype=None, **_: _to_kind(lift(torch.as_tensor(data)), dtype),
    "sum": _SUM, "prod": _PROD, "any": _ANY, "all": _ALL, "amax": _AMAX, "amin": _AMIN, "mean": _mean,
    "max": _extreme(_AMAX, arith(Op.MAX), torch.return_types.max),
    "min": _extreme(_AMIN, arith(Op.MIN), torch.return_types.min), "dot": _dot, "matmul": _matmul, "inner": _dot,
    "__matmul__": _matmul, "__rmatmul__": lambda a, b: _matmul(b, a),
    "view": _view("view"), "reshape": _view("reshape"), "unsqueeze": _view("unsqueeze"),
    "squeeze": _view("squeeze"), "expand": _view("expand"), "flatten": _view("flatten"),
    "permute": _view("permute"), "transpose": _view("transpose"), "t": _view("t"), "flip": _view("flip"),
    "repeat": _view("repeat"), "movedim": _view("movedim"), "unflatten": _view("unflatten"),
    "expand_as": lambda x, other: rearrange(lift(x), lambda p: p.expand(tuple(other.shape))),
    "item": lambda x: fail(".item() on a traced value", "use the traced value directly"),
    "tolist": lambda x: fail(".tolist() on a traced value", "index the traced array (row[0])"),
})
# operators reached through a closed-over tensor on the left (real.__add__(traced)) or on Traced itself
_OPERATORS = {
    "__add__": BINARY["add"], "__sub__": BINARY["sub"], "__mul__": BINARY["mul"],
    "__truediv__": BINARY["true_divide"], "__floordiv__": floor_div, "__mod__": floor_mod,
    "__pow__": METHODS["pow"], "__lt__": compare(Op.LT), "__le__": compare(Op.LE), "__gt__": compare(Op.GT),
    "__ge__": compare(Op.GE), "__eq__": compare(Op.EQ), "__ne__": compare(Op.NE), "__and__": AND, "__or__": OR,
    "__xor__": XOR, "__lshift__": shift(True), "__rshift__": shift(False),
}
for _name, _fn in list(_OPERATORS.items()):
    METHODS[_name] = _binary_map(_fn) if _name != "__pow__" else _fn
    METHODS["__r" + _name[2:]] = (lambda f: lambda x, other: elementwise(lambda a, b: f(b, a), x, other))(_fn)
METHODS["__pow__"] = _binary_map(lambda a, b: E.make(Op.POW, numeric(a), numeric(b)))
METHODS["__rpow__"] = lambda x, other: elementwise(lambda a, b: E.make(Op.POW, numeric(b), numeric(a)), x, other)
METHODS["__neg__"] = METHODS["neg"]
METHODS["__abs__"] = METHODS["abs"]
METHODS["__invert__"] = _unary_map(invert)
METHODS["__pos__"] = _same
METHODS["__floor__"], METHODS["__ceil__"], METHODS["__trunc__"] = METHODS["floor"], METHODS["ceil"], METHODS["trunc"]

FUNCTIONS = {
    "where": _where, "clamp": _clamp, "clip": _clamp, "stack": stack, "cat": _cat, "concat": _cat,
    "ones_like": _like(1), "zeros_like": _like(0),
    "full_like": lambda x, fill_value, dtype=None, **_: _full_of(lift(x).shape, fill_value, lift(x), dtype),
    "dot": _dot, "matmul": _matmul, "inner": _dot,
    "max": METHODS["max"], "min": METHODS["min"],
}

for _name, _fn in METHODS.items():
    if _name not in ("__getitem__", "__setitem__", "__len__", "__iter__", "__bool__", "__index__", "__int__",
                     "__float__", "dim", "size", "numel"):
        setattr(Traced, _name, (lambda f: lambda self, *a, **k: f(self, *a, **k))(_fn))


# torch's own functions and Tensor methods, by identity: a name alone could be a custom op's (approx::tanh)
for _host, _table in ((torch.Tensor, METHODS), (torch, {**METHODS, **FUNCTIONS}), (F, {**METHODS, **FUNCTIONS}),
                      (torch.special, METHODS)):
    for _name, _fn in _table.items():
        _obj = getattr(_host, _name, None)
        if callable(_obj) and _obj not in HANDLERS:
            HANDLERS[_obj] = (_fn, _host is torch.Tensor)
