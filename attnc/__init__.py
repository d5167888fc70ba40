"""attnc: a compiler for attention variants.

    attn = attnc.compile("examples/alibi.attn")            # a path, spec text, or callbacks
    out = attn(q, k, v, slopes=slopes)
"""
from __future__ import annotations

from attnc.errors import AttncError, CallError, SpecError
from attnc.runtime.cache import VERSION as __version__
from attnc.runtime.compiled import Compiled

__all__ = ["compile", "SpecError", "CallError", "AttncError", "Compiled", "flex_attention", "rowmax", "rowsum"]


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
                   return_lse=False, mask_mod=None):
    """FlexAttention's call, compiled by attnc. block_mask may be a mask_mod callable or an object with one."""
    from attnc.frontend.callbacks import flex_compat
    return flex_compat(query, key, value, score_mod, block_mask, scale, enable_gqa, return_lse, mask_mod)
