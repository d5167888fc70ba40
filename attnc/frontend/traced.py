"""Traced values: what a callback's arguments are while it is traced. A scalar is one IR node; an array (a
row of a closed-over table, a short vector) is a flat row-major tuple of nodes with a shape, unrolled at
trace time. Tensors the callback reads become params of the tracing session (Tracer), named after the
closure variable that holds them."""
from __future__ import annotations

import functools
import itertools
import math
import re

import torch

from attnc.errors import SpecError
from attnc.frontend.resolve import RESERVED
from attnc.frontend.torch_rules import fail, user_loc, where_node
from attnc.frontend.variant import Param
from attnc.ir import expr as E
from attnc.ir.expr import BOOL, FLOAT, INT, Node, Op

HANDLERS: dict = {}     # torch function or Tensor method -> (handler, self first); filled by traced_methods

_TORCH_DTYPES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f32",
                 torch.int32: "i32", torch.int64: "i64", torch.int16: "i32", torch.int8: "i32",
                 torch.uint8: "i32", torch.bool: "bool"}
_KIND_DTYPE = {FLOAT: torch.float32, INT: torch.int32, BOOL: torch.bool}    # what .dtype reports, as in Flex
MAX_ELEMENTS = 128      # most values one traced array holds: vector work is unrolled into one expression each


class Tracer:
    """One tracing session: names the tensors callbacks read and holds them as params."""

    def __init__(self, fns, device=None):
        self.params: dict[str, Param] = {}
        self.captured: dict[str, torch.Tensor] = {}
        self.by_id: dict[int, str] = {}
        self.names: dict[int, str] = {}
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        seen: set[int] = set()
        for fn in fns:
            self._visit(fn, seen, 0)

    def _visit(self, fn, seen: set, depth: int):
        """Name the tensors fn closes over or reads as globals, looking into the callables it closes over
        (and_masks, or_masks, a wrapped mask_mod) a few levels deep."""
        fn = getattr(fn, "__func__", fn)
        if isinstance(fn, functools.partial):
            for value in list(fn.args) + list(fn.keywords.values()):
                self._remember("", value, seen, depth)
            fn = fn.func
        code = getattr(fn, "__code__", None)
        if code is None or id(fn) in seen or depth > 3:
            return
        seen.add(id(fn))
        for name, cell in zip(code.co_freevars, getattr(fn, "__closure__", None) or ()):
            try:
                self._remember(name, cell.cell_contents, seen, depth)
            except ValueError:          # an empty cell
                pass
        for name in code.co_names:
            self._remember(name, getattr(fn, "__globals__", {}).get(name), seen, depth)

    def _remember(self, name: str, value, seen: set, depth: int):
        if isinstance(value, torch.Tensor):
            if name and id(value) not in self.names:
                self.names[id(value)] = name
        elif callable(value) and not isinstance(value, type):
            self._visit(value, seen, depth + 1)
        elif isinstance(value, (tuple, list)) and len(value) <= 16:
            for v in value:
                if callable(v) or isinstance(v, torch.Tensor):
                    self._remember("", v, seen, depth + 1)

    def is_named(self, t: torch.Tensor) -> bool:
        return id(t) in self.names or id(t) in self.by_id

    def param_for(self, t: torch.Tensor) -> str:
        """The param that holds t; a 0-d tensor is held as one element (read at index 0)."""
        if id(t) in self.by_id:
            return self.by_id[id(t)]
        name = self.names.get(id(t)) or f"param{len(self.params)}"
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) or name in RESERVED:
            name = f"param{len(self.params)}"
        while name in self.params:
            name += "_"
        if t.dtype not in _TORCH_DTYPES:
            fail(f"a callback reads tensor '{name}' of dtype {t.dtype}", "a float, int or bool tensor")
        held = t.reshape(1) if t.dim() == 0 else t
        dims = (1,) if t.dim() == 0 else tuple(
            f"{name}_len{i}" if t.dim() > 1 else f"{name}_len" for i in range(t.dim()))
        self.params[name] = Param(name, _TORCH_DTYPES[t.dtype], dims)
        self.captured[name] = held
        self.by_id[id(t)] = name
        return name


ACTIVE: list[Tracer] = []


def active() -> Tracer:
    if not ACTIVE:
        fail("a traced value was used after its callback returned", "use traced values only inside the callback")
    return ACTIVE[-1]


# -- traced values: a scalar is one node, an array a flat row-major tuple of nodes with a shape --
class Traced:
    """A value inside a traced callback. Arithmetic and torch functions build IR; Python control flow fails."""
    __slots__ = ("nodes", "shape")

    def __init__(self, node: Node, shape: tuple[int, ...] = (), nodes: tuple[Node, ...] | None = None):
        self.shape = tuple(shape)
        self.nodes = (node,) if nodes is None else tuple(nodes)

    @classmethod
    def array(cls, nodes, shape) -> "Traced":
        shape = tuple(int(s) for s in shape)
        if math.prod(shape) > MAX_ELEMENTS:
            fail(f"a traced array of shape {shape} has more than {MAX_ELEMENTS} values to unroll",
                  "index tables fully (t[b, h, q_idx]) or reduce over short rows only")
        return cls(None, shape, tuple(nodes))

    @property
    def node(self) -> Node:
        if self.shape and math.prod(self.shape) != 1:
            fail(f"a traced array of shape {self.shape} where one value is expected",
                  "reduce it (.any(-1), .sum(-1)) or index it (row[0])")
        return self.nodes[0]

    @property
    def kind(self) -> str:
        return self.nodes[0].dtype if self.nodes else FLOAT

    # what code asks of a tensor
    dtype = property(lambda self: _KIND_DTYPE[self.kind])
    device = property(lambda self: active().device)
    ndim = property(lambda self: len(self.shape))
    is_cuda = property(lambda self: active().device.type == "cuda")
    requires_grad = False

    def dim(self): return len(self.shape)
    def numel(self): return math.prod(self.shape)

    def size(self, d=None):
        return torch.Size(self.shape) if d is None else self.shape[d]

    def __repr__(self):
        return f"Traced({self.shape}, {self.kind})"

    def __bool__(self):
        raise SpecError("Python control flow (if, and, or, not, a conditional expression, min/max) on a traced "
                        "value", user_loc(), "torch.where(cond, a, b) for values, &, |, ~ to combine conditions, "
                        "torch.minimum / torch.maximum")

    def __index__(self):
        raise SpecError("a traced value was used as a Python integer", user_loc(),
                        "index tensors with the traced value directly (doc[q_idx]), not through int()")

    __int__ = __float__ = __index__

    def __len__(self):
        if not self.shape:                  # torch's answer for a 0-d tensor; callers probe with len()
            raise TypeError("len() of a 0-d tensor")
        return self.shape[0]

    def __iter__(self):
        if not self.shape:
            raise TypeError("iteration over a 0-d tensor")
        return iter(self[i] for i in range(self.shape[0]))

    def __getitem__(self, idx):
        return index_traced(self, idx)

    def __setitem__(self, idx, value):
        fail("a traced value cannot be assigned into", "torch.where(cond, new, old)")

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        hint = UNSUPPORTED.get(name)
        raise SpecError(f"a callback calls .{name}() on a traced value, which attnc cannot trace", user_loc(),
                        hint or "an elementwise expression of the arguments; attnc.frontend.callbacks.METHODS "
                                "lists the tensor methods it traces")

    __hash__ = object.__hash__

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.__getitem__:
            return index_tensor(args[0], args[1]) if not isinstance(args[0], Traced) else args[0][args[1]]
        handler = HANDLERS.get(func)
        if handler is None:
            name = getattr(func, "__name__", "") or str(func)
            qual = getattr(func, "__qualname__", None) or name
            custom = isinstance(func, (torch._ops.OpOverload, torch._ops.OpOverloadPacket))
            raise SpecError(f"a callback calls {'the custom op ' if custom else ''}{qual}, which attnc cannot "
                            f"trace", user_loc(),
                            "a torch function whose meaning attnc knows; a custom op's is not readable" if custom
                            else UNSUPPORTED.get(name.lstrip("_")) or
                            "arithmetic, comparisons, torch.where and the elementwise functions listed in "
                            "attnc.frontend.callbacks.FUNCTIONS")
        if handler[1]:                         # a Tensor method reached through a real tensor: self first
            return handler[0](lift(args[0]), *args[1:], **kwargs)
        return handler[0](*args, **kwargs)


def lift(x) -> Traced:
    """Python numbers, tensors and traced values as Traced. A tensor the callback closes over (or one that
    needs gradients) becomes a param read at every call; one it builds itself is a constant."""
    if isinstance(x, Traced):
        return x
    if isinstance(x, (bool, int, float)):
        return Traced(E.const(x))
    if isinstance(x, torch.Tensor):
        if x.numel() > MAX_ELEMENTS:
            fail(f"a tensor of shape {tuple(x.shape)} is used whole in a traced expression",
                  "index it with the callback's arguments (t[q_idx])")
        if x.dtype not in _TORCH_DTYPES:
            fail(f"a callback uses a tensor of dtype {x.dtype}", "a float, int or bool tensor")
        if active().is_named(x) or x.requires_grad:
            name = active().param_for(x)
            kind = _KIND[active().params[name].kind]
            coords = itertools.product(*map(range, x.shape)) if x.dim() else [(0,)]
            nodes = [Node(Op.LOAD, tuple(E.const(c) for c in coord), name, kind) for coord in coords]
            return Traced(nodes[0]) if x.dim() == 0 else Traced.array(nodes, x.shape)
        values = x.detach().cpu().reshape(-1).tolist()
        nodes = [E.const(bool(v) if x.dtype == torch.bool else v) for v in values]
        return Traced(nodes[0]) if x.dim() == 0 else Traced.array(nodes, x.shape)
    if isinstance(x, (tuple, list)):
        return stack([lift(v) for v in x], 0)
    fail(f"a callback combined a traced value with {type(x).__name__}",
          "Python numbers, traced values, or tensors indexed with the callback's indices")


_KIND = {"float": FLOAT, "int": INT, "bool": BOOL}


def positions(shape: tuple, fn=None) -> torch.Tensor:
    """Flat positions of an array of this shape, optionally rearranged by a torch shape op: views, indexing
    and broadcasting of traced arrays follow torch's own rules by applying them to the positions."""
    pos = torch.arange(max(math.prod(shape), 1)).reshape(shape) if shape else torch.tensor(0)
    return fn(pos) if fn is not None else pos


def rearrange(x: Traced, fn) -> Traced:
    pos = positions(x.shape, fn)
    nodes = [x.nodes[i] for i in pos.reshape(-1).tolist()]
    return Traced(nodes[0]) if pos.dim() == 0 else Traced.array(nodes, pos.shape)


def _broadcast(ts: list[Traced]) -> tuple[tuple[int, ...], list[tuple[Node, ...]]]:
    """The broadcast shape of ts and, for each of its elements, the operand nodes that meet there."""
    if all(not t.shape for t in ts):
        return (), [tuple(t.nodes[0] for t in ts)]
    try:
        shape = tuple(torch.broadcast_shapes(*(t.shape for t in ts)))
    except RuntimeError:
        fail(f"traced arrays of shapes {', '.join(str(t.shape) for t in ts)} do not broadcast")
    picks = [positions(t.shape, lambda p: p.expand(shape)).reshape(-1).tolist() for t in ts]
    return shape, [tuple(t.nodes[p[i]] for t, p in zip(ts, picks)) for i in range(math.prod(shape))]


def elementwise(fn, *xs) -> Traced:
    """fn(node, ...) applied elementwise over broadcast operands."""
    shape, operands = _broadcast([lift(x) for x in xs])
    out = [fn(*ns) for ns in operands]
    return Traced(out[0]) if not shape else Traced.array(out, shape)


def stack(items, dim=0):
    ts = [lift(t) for t in items]
    shape = torch.broadcast_shapes(*(t.shape for t in ts))
    ts = [rearrange(t, lambda p: p.expand(shape)) if t.shape != shape else t for t in ts]
    nodes = [n for t in ts for n in t.nodes]
    stacked = Traced.array(nodes, (len(ts),) + tuple(shape))
    return rearrange(stacked, lambda p: p.movedim(0, dim)) if dim else stacked

UNSUPPORTED = {
    "erfc": "erfc is not in attnc's function library (1 - erf(x) loses its tail past x = 3)",
    "erfinv": "erfinv is not in attnc's function library",
    "sin": "attnc's function library has no trigonometric functions; precompute a table indexed by position",
    "cos": "attnc's function library has no trigonometric functions; precompute a table indexed by position",
    "tan": "attnc's function library has no trigonometric functions", "atan": "no trigonometric functions",
    "atan2": "no trigonometric functions", "round": "round (half to even) is not traceable; use floor(x + 0.5)",
    "item": "use the traced value directly", "numpy": "use the traced value directly",
}


# -- indexing --
def index_tensor(t: torch.Tensor, idx) -> Traced:
    """A closed-over tensor read at traced indices: one LOAD per element of the result. Leading indices are
    traced values or ints (broadcast like torch's advanced indexing); trailing dims left out or given as
    ':' are unrolled into a short array."""
    items = list(idx) if isinstance(idx, tuple) else [idx]
    if any(i is Ellipsis for i in items):
        e = items.index(Ellipsis)
        items[e:e + 1] = [slice(None)] * (t.dim() - len(items) + 1)
    if len(items) > t.dim():
        fail(f"a {t.dim()}-d tensor is indexed with {len(items)} indices", f"at most {t.dim()} indices")
    items += [slice(None)] * (t.dim() - len(items))
    lead = 0
    while lead < len(items) and not isinstance(items[lead], slice):
        lead += 1
    if any(not (isinstance(i, slice) and i == slice(None)) for i in items[lead:]) or lead == 0 and t.dim():
        fail("only integer indexing of closed-over tensors can be traced, with ':' only after the indices",
              "t[q_idx], t[h, q_idx - kv_idx], t[b, h, q_tile] (a short row)")
    nodes = []
    for axis, i in enumerate(items[:lead]):
        if isinstance(i, bool) or not isinstance(i, (int, Traced, torch.Tensor)):
            fail(f"a tensor index of type {type(i).__name__}", "an integer expression of the indices")
        if isinstance(i, int):
            i = i + t.shape[axis] if i < 0 else i
        n = lift(i)
        if n.kind != INT:
            fail(f"a tensor index must be an integer, got a {n.kind}", "an integer expression of the indices")
        nodes.append(n)
    name = active().param_for(t)
    kind = _KIND[active().params[name].kind]
    rest = tuple(t.shape[lead:])         # a row per index: its trailing dims are unrolled
    if math.prod(rest) > MAX_ELEMENTS:
        fail(f"a row of {math.prod(rest)} values would be unrolled", "index every dimension of the tensor")
    shape, operands = _broadcast(nodes)
    coords = [tuple(E.const(c) for c in coord) for coord in itertools.product(*map(range, rest))]
    out = [Node(Op.LOAD, ns + c, name, kind) for ns in operands for c in coords]
    shape += rest
    return Traced(out[0]) if not shape else Traced.array(out, shape)


def index_traced(x: Traced, idx) -> Traced:
    """A traced array indexed by ints, slices, None and ...; a traced scalar index selects from a 1-d array."""
    items = idx if isinstance(idx, tuple) else (idx,)
    if not x.shape:
        fail("a traced scalar cannot be indexed", "index a closed-over tensor instead")
    if any(isinstance(i, (Traced, torch.Tensor)) for i in items):
        if len(items) != 1 or len(x.shape) != 1:
            fail("a traced array indexed by a traced value", "one traced index into a 1-d array")
        sel = lift(items[0])
        out = None
        for j in reversed(range(x.shape[0])):       # where(i == j, x[j], ...), the last one as the default
            out = elementwise(lambda v: v, x[j]) if out is None else elementwise(
                lambda i, v, rest, j=j: where_node(E.make(Op.EQ, i, j), v, rest), sel, x[j], out)
        return out
    try:
        return rearrange(x, lambda p: p[idx])
    except (IndexError, TypeError) as e:
        fail(f"indexing a traced array of shape {x.shape}: {e}")
