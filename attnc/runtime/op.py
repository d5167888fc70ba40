"""attnc's torch ops: one generic custom op runs every compiled variant, so torch.compile, torch.export and
autograd see one opaque call with a shape-only (fake) implementation.

    attnc::attention(key, q, k, v, params, scale, return_lse, save) -> [out, lse?, saved statistics...]
    attnc::attention_backward(key, q, k, v, out, dout, dlse, stats, params, scale, return_lse)
        -> [dq, dk, dv, the gradient of each param that has one]

`key` names the variant in a per-process registry: its name, the content hash of its IR and its backend.
A graph or an exported program stores only the key, so the process that runs it must have compiled the
same variant (attnc.compile with the same spec, consts and backend): keys are deterministic, so that
process finds it under the same key, and one that has not compiled it gets a CallError that says so.
The registry holds the latest Compiled of each key (equal keys compute the same function, so any of them
may serve it); a graph may outlive the Compiled it was traced from, so a key is never dropped.
The real implementations do all host work (tile classification, bounds checks), where dynamo never looks.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor

from attnc.errors import CallError
from attnc.runtime import autograd

if TYPE_CHECKING:
    from attnc.runtime.compiled import Compiled

REGISTRY: dict[str, "Compiled"] = {}
PLAIN = (torch.Tensor, torch.nn.Parameter)          # tensor types an eager call may run without the dispatcher


def key_of(variant, backend: str | None) -> str:
    """Readable, deterministic: equal variants on one backend get one key in every process."""
    return f"{variant.name}-{variant.key()}-{backend or 'auto'}"


def register(compiled: "Compiled") -> None:
    """Make `compiled` the one its key runs: the latest made, as every Compiled of a key computes the same."""
    REGISTRY[compiled.op_key] = compiled


def lookup(key: str) -> "Compiled":
    try:
        return REGISTRY[key]
    except KeyError:
        raise CallError(f"attnc op key {key!r}: no such variant was compiled in this process; a graph or exported "
                        f"program stores only the key, so expected attnc.compile(...) of the same variant "
                        f"(spec, consts and backend) before running it") from None


def row_dtype(target: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype of lse and the row statistics: the torch backend keeps float64 inputs in float64, Triton
    accumulates in float32."""
    return torch.float64 if target == "torch" and dtype == torch.float64 else torch.float32


def empty_call(q: Tensor) -> bool:
    """No batch or no query heads: nothing to compute, and the kernels are never launched."""
    return q.shape[0] == 0 or q.shape[1] == 0


def run(compiled: "Compiled", q: Tensor, k: Tensor, v: Tensor, params: list[Tensor], scale: float,
        return_lse: bool, save: bool) -> list[Tensor]:
    """attnc::attention's implementation; a plain eager call runs it without the dispatcher (dispatcher_needed)."""
    target = compiled.target(q)
    names = compiled.forward_results(target, return_lse, save)
    if empty_call(q):
        return _forward_shapes(q, v, names, row_dtype(target, q.dtype))
    named = compiled.named_params(params)
    res = compiled.forward(target, q, k, v, scale, named, compiled.sizes(q, k, named), return_lse, save)
    return [res[n].contiguous() for n in names]


def dispatcher_needed(tensors) -> bool:
    """Whether a call must go through the op: when traced (dynamo, export, make_fx), under a dispatch or
    torch-function mode or a functorch transform, or with tensor subclasses. A call without any of these
    and without gradients runs the op's implementation directly, saving the dispatcher's ~25 us."""
    C = torch._C
    return (torch.compiler.is_compiling() or C._len_torch_dispatch_stack() > 0 or C._is_torch_function_mode_enabled()
            or C._are_functorch_transforms_active() or any(type(t) not in PLAIN for t in tensors))


@torch.library.custom_op("attnc::attention", mutates_args=())
def attention(key: str, q: Tensor, k: Tensor, v: Tensor, params: list[Tensor], scale: float, return_lse: bool,
              save: bool) -> list[Tensor]:
    """[out, lse (with return_lse), then with save the row statistics the backward reads: save says a
    backward is expected; without them a backward recomputes them]."""
    return run(lookup(key), q, k, v, params, scale, return_lse, save)


@attention.register_fake
def _attention_fake(key, q, k, v, params, scale, return_lse, save):
    compiled = lookup(key)
    target = compiled.target(q)
    return _forward_shapes(q, v, compiled.forward_results(target, return_lse, save), row_dtype(target, q.dtype))


def _forward_shapes(q: Tensor, v: Tensor, names: list[str], rows: torch.dtype) -> list[Tensor]:
    B, H, Q = q.shape[:3]
    return [q.new_empty((B, H, Q, v.shape[3])) if n == "out" else q.new_empty((B, H, Q), dtype=rows)
            for n in names]


@torch.library.custom_op("attnc::attention_backward", mutates_args=())
def attention_backward(key: str, q: Tensor, k: Tensor, v: Tensor, out: Tensor, dout: Tensor, dlse: Optional[Tensor],
                       stats: list[Tensor], params: list[Tensor], scale: float, return_lse: bool) -> list[Tensor]:
    """[dq, dk, dv, then the gradient of each param in compiled.grad_params(), in the param's dtype]."""
    compiled = lookup(key)
    target = compiled.target(q)
    grad_names = compiled.grad_params(target, return_lse)
    named = compiled.named_params(params)
    if empty_call(q):
        return [torch.zeros_like(t, memory_format=torch.contiguous_format)
                for t in (q, k, v, *(named[n] for n in grad_names))]
    stat_names = [n for n in compiled.forward_results(target, return_lse, True) if n not in ("out", "lse")]
    tensors = {"Q": q, "K": k, "V": v, "O": out, "dO": dout.contiguous(), **dict(zip(stat_names, stats))}
    if return_lse:
        rows = row_dtype(target, q.dtype)
        tensors["dLSE"] = q.new_zeros(q.shape[:3], dtype=rows) if dlse is None else dlse.to(rows).contiguous()
    res = compiled.backward(target, tensors, scale, named, compiled.sizes(q, k, named), return_lse)
    zero = {"dq": q, "dk": k}           # a score that does not read q.k: no kernel computes these
    grads = [res["dq"] if "dq" in res else torch.zeros_like(zero["dq"]),
             res["dk"] if "dk" in res else torch.zeros_like(zero["dk"]), res["dv"]] + [res[f"grad_{n}"].to(named[n].dtype) for n in grad_names]
    return [g.contiguous() for g in grads]


@attention_backward.register_fake
def _attention_backward_fake(key, q, k, v, out, dout, dlse, stats, params, scale, return_lse):
    compiled = lookup(key)
    named = compiled.named_params(params)
    grad_names = compiled.grad_params(compiled.target(q), return_lse)
    return [t.new_empty(t.shape) for t in (q, k, v, *(named[n] for n in grad_names))]


attention.register_autograd(autograd.backward, setup_context=autograd.setup_context)
attention_backward.register_autograd(autograd.no_double_backward, setup_context=autograd.nothing_to_save)
