"""attnc: a compiler for attention variants.

    attn = attnc.compile("examples/alibi.attn")            # a path, spec text, or callbacks
    out = attn(q, k, v, slopes=slopes)
"""
from __future__ import annotations

from attnc.errors import AttncError, CallError, SpecError
from attnc.runtime.cache import VERSION as __version__
from attnc.runtime.compiled import Compiled

__all__ = ["compile", "SpecError", "CallError", "AttncError", "Compiled", "flex_attention", "create_block_mask",
           "rowmax", "rowsum"]


def compile(spec: str | None = None, *, score_mod=None, mask_mod=None, norm=None, backend: str | None = None,
            **consts) -> Compiled:
    """Compile a variant from an .attn path, .attn source text, or FlexAttention-style callbacks.

    consts override the spec's `const` values. backend: None (by device), 'torch' or 'triton'.
    """
    from attnc.frontend import callbacks, resolve
    if spec is not None and (score_mod is not None or mask_mod is not None or norm is not None):
        raise SpecError("give either a spec (path or text) or callbacks (score_mod, mask_mod, norm), not both")
    if spec is not None:
        if not isinstance(spec, str):
            raise SpecError(f"spec must be a path or spec text (str), got {type(spec).__name__}")
        variant = resolve.load(spec, consts)
    else:
        variant = callbacks.trace(score_mod, mask_mod, norm, consts)
    return Compiled(variant, backend)


def rowmax(x):
    """In a callback normalizer: the maximum of x over the row's kept keys."""
    from attnc.frontend.callbacks import row_stat
    return row_stat("rowmax", x)


def rowsum(x):
    """In a callback normalizer: the sum of x over the row's kept keys."""
    from attnc.frontend.callbacks import row_stat
    return row_stat("rowsum", x)


def flex_attention(query, key, value, score_mod=None, block_mask=None, scale=None, enable_gqa=False,
                   return_lse=False, kernel_options=None, *, return_aux=None):
    """torch.nn.attention.flex_attention's call, arguments in its order, compiled by attnc (attnc.flex).
    block_mask: a torch BlockMask, or a mask_mod callable."""
    from attnc import flex
    return flex.flex_attention(query, key, value, score_mod, block_mask, scale, enable_gqa, return_lse,
                               kernel_options, return_aux=return_aux)


def create_block_mask(mask_mod, B, H, Q_LEN, KV_LEN, device=None, BLOCK_SIZE=128, _compile=False,
                      separate_full_blocks=True, compute_dq_write_order=False, dq_kv_order=True):
    """torch's create_block_mask, its blocks classified by attnc's interval analysis (attnc.flex)."""
    from attnc import flex
    return flex.create_block_mask(mask_mod, B, H, Q_LEN, KV_LEN, device, BLOCK_SIZE, _compile,
                                  separate_full_blocks, compute_dq_write_order, dq_kv_order)
