"""FlexAttention-style callbacks -> Variant, by tracing: each argument is a Traced value that records the
expression built from it (traced.py), torch's operations on it mean what torch says (torch_rules.py,
traced_methods.py), and tensors the callbacks read become params, read again at every trace."""
from __future__ import annotations

import linecache
import math
import os
import re

import torch

from attnc.errors import Loc, SpecError
from attnc.frontend import torch_rules, traced_methods  # noqa: F401 -- installs Traced's methods
from attnc.frontend.resolve import Resolver, softmax_norm
from attnc.frontend.torch_rules import fail, no_placeholders
from attnc.frontend.traced import ACTIVE, MAX_ELEMENTS, Traced, Tracer, lift  # noqa: F401 -- re-exported
from attnc.frontend.traced_methods import FUNCTIONS, METHODS  # noqa: F401 -- re-exported
from attnc.frontend.variant import Variant
from attnc.ir import expr as E
from attnc.ir.expr import BOOL, INT, Node, Op

_PKG = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def row_stat(kind: str, x) -> Traced:
    """rowmax / rowsum inside a traced normalizer."""
    op = Op.ROWMAX if kind == "rowmax" else Op.ROWSUM
    n = lift(x).node
    if n.dtype == BOOL:
        fail(f"{kind} needs a number, got a boolean", "a number; torch.where(cond, a, b) makes one")
    return Traced(E.make(op, n))


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
            if not os.path.abspath(f).startswith(_PKG + os.sep) and "/torch/" not in f:
                text = linecache.getline(f, tb.tb_lineno)
                loc = Loc(f, tb.tb_lineno, len(text) - len(text.lstrip()) + 1, text)
            tb = tb.tb_next
        raise SpecError(f"{what} could not be traced: {type(e).__name__}: {e}", loc,
                        "arithmetic, comparisons and torch functions on its arguments") from None
    if isinstance(out, (bool, int, float)):
        out = Traced(E.const(out))
    if isinstance(out, torch.Tensor) and out.dim() == 0:
        out = lift(out)
    if not isinstance(out, Traced):
        raise SpecError(f"{what} returned {type(out).__name__}", Loc(_where_defined(fn)),
                        "an expression of its arguments")
    if out.shape and math.prod(out.shape) != 1:
        raise SpecError(f"{what} returned an array of shape {out.shape}", Loc(_where_defined(fn)),
                        "one value per (b, h, q_idx, kv_idx): reduce it (.any(-1), .sum(-1))")
    return out.nodes[0]


def _where_defined(fn) -> str:
    code = getattr(getattr(fn, "__func__", fn), "__code__", None)
    return f"{code.co_filename}:{code.co_firstlineno}" if code else "<callback>"


def _args() -> tuple[Traced, ...]:
    return tuple(Traced(E.index(n)) for n in ("b", "h", "q_idx", "kv_idx"))


def trace(score_mod=None, mask_mod=None, norm=None, consts: dict | None = None, device=None) -> Variant:
    """A Variant from callbacks with FlexAttention's signatures, and a normalizer (name, spec text or callable).
    The Variant's `captured` holds the tensors the callbacks read, as they are now. device: what
    `q_idx.device` answers inside the callbacks (the call's device)."""
    for fn, what in ((score_mod, "score_mod"), (mask_mod, "mask_mod")):
        if fn is not None and not callable(fn):
            raise SpecError(f"{what} must be callable, got {type(fn).__name__}")
    tracer = Tracer([score_mod, mask_mod, norm if callable(norm) else None], device)
    torch_rules.start()
    ACTIVE.append(tracer)
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
        ACTIVE.pop()
    for root in (score, mask, norm_node):
        if root is not None:
            no_placeholders(root)
    if score.dtype == INT:                       # a score_mod that returns an integer: scores are floats
        score = E.make(Op.MUL, score, 1.0)
    names = [getattr(f, "__name__", "") for f in (score_mod, mask_mod)]
    name = "_".join(n for n in names if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", n or "")) or "callbacks"
    return Variant(name, score, mask, norm_node, kind, dict(tracer.params), dict(consts or {}), "<callback>",
                   dict(tracer.captured))


_SOFTMAX: list[Node] = []     # the default normalizer, built once (nodes are immutable)


def _norm(norm, consts: dict) -> tuple[Node, str]:
    if norm is None:
        if not _SOFTMAX:
            _SOFTMAX.append(softmax_norm())
        return _SOFTMAX[0], "softmax"
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
