"""attnc as a Hugging Face transformers attention implementation: a tiny random Llama (no downloads) must give
sdpa's logits with and without padding, sdpa's greedy tokens through a KV cache, run in bf16, and train with
sdpa's gradients."""
from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig, StaticCache  # noqa: E402

import attnc  # noqa: E402
from attnc.integrations import transformers as attnc_hf  # noqa: E402

try:
    from helpers import example
except ImportError:                                     # tests/ imported as a package
    from tests.helpers import example

VOCAB, PAD = 128, 0
TOL = 1e-5          # fp32 logits of a 2-layer model: attnc and sdpa differ by summation order only
GRAD_RTOL = 1e-5    # fp32 gradients, relative to each tensor's largest entry (observed: below 1e-6)


def tiny_config(**kw) -> LlamaConfig:
    """2 layers, hidden 64, 4 query heads over 2 kv heads (GQA), vocab 128."""
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512, pad_token_id=PAD, bos_token_id=1,
                eos_token_id=2)
    return LlamaConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def model():
    attnc_hf.register()
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(), attn_implementation="sdpa").eval()


def logits(model, impl: str, ids, **kw) -> torch.Tensor:
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return model(ids, **kw).logits


def tokens(seed: int, B: int, S: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (B, S), generator=torch.Generator().manual_seed(seed))


def left_padded(seed: int, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) for prompts of these lengths, padded on the left as generate() wants."""
    S = max(lengths)
    ids = tokens(seed, len(lengths), S)
    mask = torch.zeros(len(lengths), S, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, S - n:] = 1
    return ids.masked_fill(mask == 0, PAD), mask


def test_logits_match_sdpa_without_padding(model):
    ids = tokens(1, 3, 37)
    sdpa, ours = logits(model, "sdpa", ids), logits(model, "attnc", ids)
    assert (ours - sdpa).abs().max().item() < TOL


@pytest.mark.parametrize("side", ["left", "right"])
def test_logits_match_sdpa_with_padding(model, side):
    ids, mask = left_padded(2, [29, 11, 20])
    if side == "right":
        ids, mask = ids.flip(-1), mask.flip(-1)
    sdpa, ours = logits(model, "sdpa", ids, attention_mask=mask), logits(model, "attnc", ids, attention_mask=mask)
    real = mask.bool()               # the rows of padding tokens are never read by a real token
    assert torch.isfinite(ours).all()
    assert (ours - sdpa)[real].abs().max().item() < TOL


def test_decoding_through_a_dynamic_cache_matches_sdpa(model):
    ids, mask = left_padded(3, [21, 14])
    steps = {}
    for impl in ("sdpa", "attnc"):
        model.set_attn_implementation(impl)
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            out = [model(ids, attention_mask=mask, past_key_values=cache).logits[:, -1]]
            m = mask
            for t in range(4):     # one token at a time: Q = 1 against the whole cache
                nxt = out[-1].argmax(-1, keepdim=True)
                m = torch.cat([m, torch.ones_like(nxt)], -1)
                out.append(model(nxt, attention_mask=m, past_key_values=cache).logits[:, -1])
        steps[impl] = torch.stack(out)
    assert (steps["attnc"] - steps["sdpa"]).abs().max().item() < TOL


def test_greedy_generate_gives_sdpa_tokens(model):
    ids, mask = left_padded(4, [19, 7, 12])
    out = {}
    for impl in ("sdpa", "attnc"):
        model.set_attn_implementation(impl)
        with torch.no_grad():
            out[impl] = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                                       use_cache=True, pad_token_id=PAD)
    assert out["attnc"].shape == (3, 19 + 12)
    assert torch.equal(out["attnc"], out["sdpa"])


def test_a_static_cache_holds_rows_not_yet_written(model):
    ids = tokens(5, 2, 13)
    steps = {}
    for impl in ("sdpa", "attnc"):
        model.set_attn_implementation(impl)
        cache = StaticCache(config=model.config, max_cache_len=40)
        with torch.no_grad():
            first = model(ids, past_key_values=cache).logits
            nxt = first[:, -1:].argmax(-1)
            steps[impl] = torch.cat([first, model(nxt, past_key_values=cache).logits], 1)
    assert (steps["attnc"] - steps["sdpa"]).abs().max().item() < TOL


def test_bf16_runs_and_stays_near_fp32(model):
    ids, mask = left_padded(6, [24, 16])
    ref = logits(model, "sdpa", ids, attention_mask=mask)
    model.to(torch.bfloat16)
    try:
        ours = logits(model, "attnc", ids, attention_mask=mask)
        sdpa = logits(model, "sdpa", ids, attention_mask=mask)
    finally:
        model.to(torch.float32)
    real = mask.bool()
    assert ours.dtype == torch.bfloat16 and torch.isfinite(ours).all()
    # attnc's bf16 error is of the size of sdpa's bf16 error, both against the fp32 run
    err, sdpa_err = ((x.float() - ref)[real].abs().max().item() for x in (ours, sdpa))
    assert err <= max(2 * sdpa_err, 2e-2), (err, sdpa_err)


# -- a variant per model --

def test_a_variant_file_changes_the_model_mask(model):
    # a window of 4 keys in attnc must equal sdpa given the same window as an explicit mask
    name = attnc_hf.register("attnc_window4", example("sliding_window"), window=4)
    ids = tokens(7, 2, 19)
    ours = logits(model, name, ids)
    pos = torch.arange(19)
    window = (pos[:, None] >= pos[None, :]) & (pos[:, None] - pos[None, :] < 4)
    sdpa = logits(model, "sdpa", ids, attention_mask=window.expand(2, 1, 19, 19))
    assert (ours - sdpa).abs().max().item() < TOL


def test_a_variant_with_params_and_padding(model):
    # ALiBi's bias is what an additive float mask gives sdpa
    slopes = 2.0 ** (-8.0 * torch.arange(1, 5) / 4)
    name = attnc_hf.register("attnc_alibi", example("alibi"), params={"slopes": slopes})
    ids, mask = left_padded(8, [15, 9])
    ours = logits(model, name, ids, attention_mask=mask)
    pos = torch.arange(15)
    keep = (pos[:, None] >= pos[None, :]) & mask.bool()[:, None, None, :]
    bias = -slopes[:, None, None] * (pos[:, None] - pos[None, :])
    sdpa = logits(model, "sdpa", ids, attention_mask=torch.where(keep, bias, -math.inf))
    real = mask.bool()
    assert (ours - sdpa)[real].abs().max().item() < TOL


def test_a_compiled_variant_without_a_mask_is_made_causal(model):
    name = attnc_hf.register("attnc_plain", attnc.compile("variant plain\nnorm = softmax\n"))
    ids = tokens(9, 2, 23)
    assert (logits(model, name, ids) - logits(model, "sdpa", ids)).abs().max().item() < TOL


def test_callbacks_see_positions_as_flex_mods_do_in_transformers(model):
    # FlexAttention's causal and ALiBi mods, written for rows, decode through a cache like the .attn file
    slopes = 2.0 ** (-8.0 * torch.arange(1, 5) / 4)

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    def alibi(score, b, h, q_idx, kv_idx):
        return score - slopes[h] * (q_idx - kv_idx)

    names = [attnc_hf.register("attnc_alibi_callbacks", attnc.compile(score_mod=alibi, mask_mod=causal)),
             attnc_hf.register("attnc_alibi_file", example("alibi"), params={"slopes": slopes})]
    ids, mask = left_padded(14, [16, 10])
    steps = {}
    for name in names:
        model.set_attn_implementation(name)
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            out = [model(ids, attention_mask=mask, past_key_values=cache).logits[:, -1]]
            m = mask
            for t in range(3):
                nxt = out[-1].argmax(-1, keepdim=True)
                m = torch.cat([m, torch.ones_like(nxt)], -1)
                out.append(model(nxt, attention_mask=m, past_key_values=cache).logits[:, -1])
        steps[name] = torch.stack(out)
    assert (steps[names[0]] - steps[names[1]]).abs().max().item() < TOL


def test_registration_errors_name_what_is_wrong():
    with pytest.raises(attnc.CallError, match="slopes"):
        attnc_hf.register("attnc_noslopes", example("alibi"))
    with pytest.raises(attnc.CallError, match="name"):
        attnc_hf.register("sdpa")
    with pytest.raises(attnc.SpecError, match="keep_key"):
        attnc_hf.register("attnc_clash", "variant c\nparam keep_key: f32[H]\nscore = score + keep_key[h]\n",
                          params={"keep_key": torch.ones(4)})
    with pytest.raises(attnc.CallError, match="window"):
        attnc_hf.register("attnc_consts", window=3)


def test_a_sliding_window_model_is_refused_not_ignored():
    attnc_hf.register()
    from transformers import MistralConfig
    cfg = MistralConfig(**{k: v for k, v in tiny_config().to_dict().items() if k in MistralConfig().to_dict()})
    cfg.sliding_window = 8
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(cfg, attn_implementation="attnc").eval()
    with torch.no_grad(), pytest.raises(attnc.CallError, match="sliding"):
        m(tokens(10, 1, 12))


def test_a_prepared_4d_mask_is_refused(model):
    ids = tokens(11, 1, 8)
    with pytest.raises(attnc.CallError, match="attention_mask"):
        logits(model, "attnc", ids, attention_mask=torch.ones(1, 1, 8, 8, dtype=torch.bool))


def train_grads(model, impl: str, ids, mask, extra=()) -> dict:
    """The gradient of every parameter (and of `extra` tensors) after one loss.backward() through `impl`."""
    model.set_attn_implementation(impl)
    model.zero_grad()
    for t in extra:
        t.grad = None
    model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    grads.update({f"extra{i}": t.grad.clone() for i, t in enumerate(extra)})
    model.zero_grad()
    return grads


def assert_same_grads(got: dict, want: dict) -> None:
    # fp32 gradients that differ by summation order only: relative to each tensor's largest entry
    assert got.keys() == want.keys()
    for n, g in want.items():
        assert g.abs().max() > 0, n
        assert (got[n] - g).abs().max().item() <= GRAD_RTOL * g.abs().max().item(), n


@pytest.mark.parametrize("side", ["left", "right"])
def test_a_training_step_gives_sdpa_gradients(model, side):
    ids, mask = left_padded(13, [17, 10, 5])
    if side == "right":
        ids, mask = ids.flip(-1), mask.flip(-1)
    grads = {impl: train_grads(model, impl, ids, mask) for impl in ("sdpa", "attnc")}
    assert {f"model.layers.{i}.self_attn.{p}_proj.weight" for i in range(2) for p in "qkv"} <= grads["attnc"].keys()
    assert_same_grads(grads["attnc"], grads["sdpa"])


def test_a_learned_param_gets_its_gradient_through_the_model(model):
    # ALiBi slopes as a trained tensor: sdpa gets the same bias as an additive mask built from them
    slopes = (2.0 ** (-8.0 * torch.arange(1, 5) / 4)).requires_grad_()
    name = attnc_hf.register("attnc_alibi_learned", example("alibi"), params={"slopes": slopes})
    ids, mask = left_padded(15, [12, 7])
    pos = torch.arange(12)
    keep = (pos[:, None] >= pos[None, :]) & mask.bool()[:, None, None, :]
    ours = train_grads(model, name, ids, mask, extra=(slopes,))
    model.set_attn_implementation("sdpa")
    model.zero_grad()
    slopes.grad = None
    bias = torch.where(keep, -slopes[:, None, None] * (pos[:, None] - pos[None, :]), -math.inf)
    model(ids, attention_mask=bias, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
    sdpa = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None} | {"extra0": slopes.grad}
    model.zero_grad()
    assert_same_grads(ours, sdpa)


def test_a_compiled_model_trains_with_the_eager_gradients():
    # fullgraph: the mask interface, the layers and attnc's op trace without a break (aot_eager: no codegen)
    attnc_hf.register()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(num_hidden_layers=1), attn_implementation="attnc").eval()
    ids, mask = left_padded(16, [9, 5])
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    got = {n.removeprefix("_orig_mod."): g for n, g in train_grads(compiled, "attnc", ids, mask).items()}
    assert_same_grads(got, train_grads(model, "attnc", ids, mask))
