"""attnc as an attention implementation of Hugging Face transformers.

    from attnc.integrations import transformers as attnc_hf
    attnc_hf.register()                                                        # "attnc": causal softmax
    attnc_hf.register("attnc_swa", "examples/sliding_window.attn", window=4096)
    attnc_hf.register("attnc_alibi", "examples/alibi.attn", params={"slopes": slopes})
    model = AutoModelForCausalLM.from_config(config, attn_implementation="attnc_swa")

A registered name is one variant (a path, .attn text, or a Compiled) for every attention layer of a model.
attnc builds the model's mask itself, from the sizes and the 2D padding mask transformers hands its mask
interface, never as a dense Q x KV tensor:
- the queries are the last Q of the keys (q_idx + KV - Q is a query's position), as with a KV cache;
- a variant without a mask is made causal; a variant with a mask replaces the causal one (every example
  with a mask says causal itself), so `prefix_lm.attn` or `streaming_llm.attn` change the model's mask;
- padding rides as a param of the variant, keep_key: bool[B, KV], and-ed with its mask;
- callbacks (attnc.compile(score_mod=..., mask_mod=...)) see positions, as FlexAttention's mods do in
  transformers (which adds the cache offset to q_idx): their q_idx becomes q_idx + KV - Q.
Training works as with sdpa: gradients flow through attnc's backward kernels to q, k, v and to float params
given here (a learned ALiBi slope), and a torch.compile'd model traces attnc's op without a graph break.
What a model asks for that the variant does not do (a sliding-window, packed-sequence or bidirectional
mask, softcap, sinks, dropout, attention weights, a prepared 4D mask) raises an error: it is never dropped."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

import attnc
from attnc.errors import CallError, SpecError
from attnc.frontend import resolve
from attnc.frontend.variant import Variant
from attnc.ir import expr as E

try:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, causal_mask_function
except ImportError as e:                  # the optional extra is missing: say how to get it, once, at import
    raise ImportError(f"attnc.integrations.transformers needs Hugging Face transformers >= 5.23 ({e}); "
                      "install it with `pip install transformers`") from None

KEEP = "keep_key"
# the pieces the model's mask is made of, in the language: bottom-right causality and per-key padding
_CAUSAL = resolve.load("variant causal\nlet q_pos = q_idx + KV - Q\nmask = q_pos >= kv_idx\n")
_KEEP = resolve.load(f"variant keep\nparam {KEEP}: bool[B, KV]\nmask = {KEEP}[b, kv_idx]\n")
# keyword arguments of transformers' attention call that change the result: what each would need
_UNSUPPORTED = {
    "softcap": "a variant with soft-capping, e.g. register(name, 'examples/softcap.attn', cap=...)",
    "sliding_window": "a sliding-window variant and config.sliding_window = None",
    "s_aux": "a variant with sinks, e.g. 'examples/sinks.attn' with params={'sinks': ...}",
    "position_bias": "a variant with the bias in its score, e.g. 'examples/t5_bias.attn'",
}


@dataclass(frozen=True)
class KeyMask:
    """What attnc's mask interface hands the attention layers instead of a dense mask.

    keys: the cache rows [0, keys) the queries attend over; the queries are the last of them (a static
          cache holds more rows, not yet written). keep: bool [B, keys], False at padding; None if none."""
    keys: int
    keep: torch.Tensor | None


class Registration:
    """One registered name: its variant, composed with causality and padding; kernels compile on first use."""

    def __init__(self, name: str, variant: Variant, params: dict, backend: str | None):
        if KEEP in variant.params:
            raise SpecError(f"variant '{variant.name}' declares a param '{KEEP}', the name attnc's transformers "
                            f"integration gives the padding mask; rename it")
        missing = set(variant.params) - set(params) - set(variant.captured)
        if missing:
            raise CallError(f"register('{name}'): the variant needs params {', '.join(sorted(missing))}; "
                            f"expected params={{name: tensor}}")
        unknown = set(params) - set(variant.params)
        if unknown:
            raise CallError(f"register('{name}'): unexpected params {', '.join(sorted(unknown))}; the variant "
                            f"takes: {', '.join(variant.params) or '(none)'}")
        if variant.file == "<callback>":
            variant = _positions_for_rows(variant)
        self.name, self.variant, self.params, self.backend = name, variant, dict(params), backend
        # made here, not at the first call, so a torch.compile'd model never traces their construction
        self._compiled = {padded: self._compose(padded) for padded in (False, True)}

    def _compose(self, padded: bool) -> attnc.Compiled:
        """The variant's mask (or causality) and, when padded, keep_key[b, kv_idx]."""
        v = self.variant
        mask = v.mask if v.mask is not None else _CAUSAL.mask
        params = dict(v.params)
        if padded:
            mask = E.make(E.Op.AND, mask, _KEEP.mask)
            params[KEEP] = _KEEP.params[KEEP]
        name = f"{v.name}_padded" if padded else v.name
        return attnc.Compiled(dataclasses.replace(v, name=name, mask=mask, params=params), self.backend)

    def params_on(self, device: torch.device) -> dict:
        # moved at every call (a no-op on their own device): a copy kept would miss the optimizer's updates
        return {n: t.to(device) for n, t in self.params.items()}

    # -- transformers' mask interface: called once per forward, before the layers --
    def mask(self, batch_size: int, q_length: int, kv_length: int, q_offset=None, kv_offset: int = 0,
             mask_function=causal_mask_function, attention_mask: torch.Tensor | None = None, **_) -> KeyMask:
        if q_offset is None:       # older transformers pass cache_position instead: the queries' place is unknown
            raise CallError(f"attn_implementation '{self.name}': transformers gave the mask interface no q_offset; "
                            f"expected transformers >= 5.23")
        if mask_function is not causal_mask_function:
            raise CallError(f"attn_implementation '{self.name}': the model asks for a mask other than the causal "
                            f"one ({getattr(mask_function, '__qualname__', mask_function)}: a sliding window, packed "
                            f"sequences or an overlay); attnc builds only causality and padding, expected a model "
                            f"whose mask is causal (for a sliding window: config.sliding_window = None and a "
                            f"sliding-window variant)")
        # key row j is position kv_offset + j and query row i is q_offset + i: the queries end at row `keys`
        keys = int(q_offset) + q_length - kv_offset
        if not 0 < keys <= kv_length:
            raise CallError(f"attn_implementation '{self.name}': queries at positions {int(q_offset)}.."
                            f"{int(q_offset) + q_length - 1} do not end inside the keys {kv_offset}.."
                            f"{kv_offset + kv_length - 1}; expected the cache to hold every query's position")
        keep = None
        if attention_mask is not None:
            if attention_mask.dim() != 2:
                raise CallError(f"attention_mask: expected the 2D padding mask [batch, positions], got shape "
                                f"{tuple(attention_mask.shape)}")
            keep = attention_mask.to(torch.bool)
            short = kv_offset + keys - keep.shape[-1]
            if short > 0:                      # as transformers does: positions past the mask are padding
                keep = torch.nn.functional.pad(keep, (0, short), value=False)
            keep = keep[:, kv_offset:kv_offset + keys]
            # a mask without padding runs the variant without the keep_key param; a traced graph keeps the
            # param, which reads the mask's values on the device instead of deciding on the host
            if not torch.compiler.is_compiling() and bool(keep.all()):
                keep = None
            elif keep.shape[0] != batch_size:
                keep = keep.expand(batch_size, -1)
        return KeyMask(keys, keep)

    # -- transformers' attention interface: called by every attention layer --
    def forward(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask, dropout: float = 0.0, scaling: float | None = None, **kwargs):
        self._refuse(module, dropout, kwargs)
        keep = None
        if isinstance(attention_mask, KeyMask):
            key, value = key[:, :, :attention_mask.keys], value[:, :, :attention_mask.keys]
            keep = attention_mask.keep
        elif attention_mask is not None:
            raise CallError(f"attention_mask: attn_implementation '{self.name}' takes the mask its own mask "
                            f"interface builds from a 2D padding mask; got a prepared "
                            f"{type(attention_mask).__name__} of shape {tuple(attention_mask.shape)}")
        attn = self._compiled[keep is not None]
        params = dict(self.params_on(query.device))
        if keep is not None:
            params[KEEP] = keep.to(query.device)
        out = attn(query, key, value, scale=scaling, **params)
        return out.transpose(1, 2).contiguous(), None

    def _refuse(self, module, dropout: float, kwargs: dict) -> None:
        for name, instead in _UNSUPPORTED.items():
            if kwargs.get(name) is not None:
                raise CallError(f"{name}: the model passes {name}={kwargs[name]!r}, which attn_implementation "
                                f"'{self.name}' ({self.variant.name}) does not compute; expected {instead}")
        if kwargs.get("output_attentions"):
            raise CallError("output_attentions: attnc never materializes the attention weights; expected "
                            "output_attentions=False or attn_implementation='eager'")
        if kwargs.get("cache") is not None:
            raise CallError("cache: attnc does not read paged caches; expected a DynamicCache or StaticCache")
        if dropout and module.training:
            raise CallError(f"dropout: attention dropout {dropout} is not implemented by attnc; expected "
                            f"config.attention_dropout = 0.0 or model.eval()")
        is_causal = kwargs.get("is_causal")
        if not (getattr(module, "is_causal", True) if is_causal is None else is_causal):
            raise CallError(f"is_causal: the layer {type(module).__name__} is bidirectional; attn_implementation "
                            f"'{self.name}' composes a causal mask, expected a causal (decoder) model")


def _positions_for_rows(v: Variant) -> Variant:
    """A callback variant with q_idx read as the query's position, q_idx + KV - Q."""
    shift = {E.index("q_idx"): E.index("q_idx") + E.size("KV") - E.size("Q")}
    return dataclasses.replace(v, score=E.substitute(v.score, shift), norm=E.substitute(v.norm, shift),
                               mask=None if v.mask is None else E.substitute(v.mask, shift))


def register(name: str = "attnc", variant=None, *, params: dict | None = None, backend: str | None = None,
             **consts) -> str:
    """Register `name` as an attn_implementation computed by attnc; returns name.

    variant: None (causal softmax), an .attn path or text (consts override its consts), or a Compiled.
    params: tensors for the variant's params, the same in every layer (ALiBi's slopes, a T5 table)."""
    if not isinstance(name, str) or not name or name in ("eager", "sdpa", "flex_attention") or \
            name.startswith("flash_attention") or name.startswith("paged|"):
        raise CallError(f"name must be a new attn_implementation name, got {name!r}")
    if variant is None:
        if consts:
            raise CallError(f"consts {', '.join(consts)} given without a variant; expected variant=...")
        v = _CAUSAL
    elif isinstance(variant, attnc.Compiled):
        if consts:
            raise CallError(f"consts {', '.join(consts)} given with a compiled variant; expected them in "
                            f"attnc.compile(...)")
        v = variant.variant
        backend = backend or variant.backend
    else:
        v = attnc.compile(variant, **consts).variant
    reg = Registration(name, v, params or {}, backend)
    AttentionInterface.register(name, reg.forward)
    AttentionMaskInterface.register(name, reg.mask)
    return name
