"""Gradients: every compiled variant runs through a torch.autograd.Function whose backward runs the kernels
attnc derived for it (passes/autodiff.py), on the same backend as the forward."""
from __future__ import annotations

import torch

from attnc.errors import CallError


class _Attention(torch.autograd.Function):
    """forward(compiled, target, scale, sizes, return_lse, param names, q, k, v, *params)."""

    @staticmethod
    def forward(ctx, compiled, target, scale, sizes, return_lse, names, q, k, v, *values):
        params = dict(zip(names, values))
        res = compiled.forward(target, q, k, v, scale, params, sizes, return_lse, save=True)
        stats = [n for n in res if n not in ("out", "lse")]
        ctx.compiled, ctx.target, ctx.scale, ctx.sizes = compiled, target, scale, sizes
        ctx.return_lse, ctx.names, ctx.stats = return_lse, names, stats
        ctx.save_for_backward(q, k, v, res["out"], *(res[n] for n in stats), *values)
        if return_lse:
            return res["out"], res["lse"]
        return res["out"]

    @staticmethod
    def backward(ctx, dout, dlse=None):
        if torch.is_grad_enabled():          # backward(create_graph=True): a graph of the gradients is wanted
            raise CallError("attnc differentiates once: its backward kernels are not differentiable themselves "
                            "(double backward, create_graph=True, is not supported)")
        q, k, v, out, *rest = ctx.saved_tensors
        stats = dict(zip(ctx.stats, rest[:len(ctx.stats)]))
        params = dict(zip(ctx.names, rest[len(ctx.stats):]))
        tensors = {"Q": q, "K": k, "V": v, "O": out, "dO": dout.contiguous(), **stats}
        if ctx.return_lse:
            tensors["dLSE"] = torch.zeros_like(stats[next(iter(stats))]) if dlse is None else dlse.contiguous()
        res = ctx.compiled.backward(ctx.target, tensors, ctx.scale, params, ctx.sizes, ctx.return_lse)
        grads = [res["dq"], res["dk"], res["dv"]]
        grads = [g if need else None for g, need in zip(grads, ctx.needs_input_grad[6:9])]
        for i, (name, t) in enumerate(params.items()):
            g = res.get(f"grad_{name}")
            grads.append(g.to(t.dtype) if g is not None and ctx.needs_input_grad[9 + i] else None)
        return (None,) * 6 + tuple(grads)


def attention(compiled, target: str, q, k, v, scale: float, params: dict, sizes: dict, return_lse: bool):
    """The call, recorded for autograd. The backward kernels are compiled now, so a variant attnc cannot
    differentiate fails at the call (a SpecError that says why), never in the middle of backward."""
    compiled._compiled(target, return_lse, True)
    names = tuple(params)
    values = tuple(params[n] for n in names)
    for name, t in params.items():
        if t.requires_grad and not t.is_floating_point():
            raise CallError(f"param '{name}' requires grad but is an integer tensor: indices have no gradient")
    return _Attention.apply(compiled, target, scale, sizes, return_lse, names, q, k, v, *values)
