"""Gradients: the derivative of the attnc::attention op (runtime/op.py), registered on it, runs the backward
kernels attnc derived for the variant (passes/autodiff.py) through attnc::attention_backward, on the same
backend as the forward. They are not differentiable themselves: double backward raises."""
from __future__ import annotations

import torch

from attnc.errors import CallError

DOUBLE_BACKWARD = ("attnc differentiates once: its backward kernels are not differentiable themselves "
                   "(double backward, create_graph=True, is not supported)")


def setup_context(ctx, inputs, output) -> None:
    """Saves q, k, v, out, the forward's row statistics and the params. Runs at the call whenever a backward
    may follow: the backward kernels compile now, so a variant attnc cannot differentiate fails at the call
    (a SpecError that says why), never in the middle of a backward."""
    from attnc.runtime.op import lookup          # op.py registers these functions: imported late
    key, q, k, v, params, scale, return_lse, save = inputs
    compiled = lookup(key)
    ctx.key, ctx.scale, ctx.return_lse, ctx.saved = key, scale, return_lse, save
    ctx.param_names = tuple(compiled.variant.params)
    ctx.grad_names = compiled.grad_params(compiled.target(q), return_lse)
    first = 2 if return_lse else 1         # out, lse: what the caller sees; then the statistics
    ctx.n_stats = len(output) - first
    ctx.save_for_backward(q, k, v, output[0], *output[first:], *params)


def backward(ctx, grads: list):
    if torch.is_grad_enabled():           # backward(create_graph=True): a graph of the gradients is wanted
        raise CallError(DOUBLE_BACKWARD)
    q, k, v, out, *rest = ctx.saved_tensors
    stats, params = rest[:ctx.n_stats], rest[ctx.n_stats:]
    if not ctx.saved:                     # called without save: the statistics are computed again
        stats = torch.ops.attnc.attention(ctx.key, q, k, v, list(params), ctx.scale, ctx.return_lse,
                                          True)[2 if ctx.return_lse else 1:]
    dout = grads[0] if grads[0] is not None else torch.zeros_like(out)
    dlse = grads[1] if ctx.return_lse else None
    res = torch.ops.attnc.attention_backward(ctx.key, q, k, v, out, dout, dlse, list(stats), list(params),
                                             ctx.scale, ctx.return_lse)
    got = dict(zip(ctx.grad_names, res[3:]))
    dq, dk, dv = (g if need else None for g, need in zip(res[:3], ctx.needs_input_grad[1:4]))
    dparams = [got.get(name) if need else None for name, need in zip(ctx.param_names, ctx.needs_input_grad[4])]
    return None, dq, dk, dv, dparams, None, None, None


def nothing_to_save(ctx, inputs, output) -> None:
    pass


def no_double_backward(ctx, grads):
    raise CallError(DOUBLE_BACKWARD)
