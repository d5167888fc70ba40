"""Callbacks with FlexAttention's signatures trace into the same IR as the language."""
from pathlib import Path

import pytest
import torch

import attnc

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _pairs():
    slopes = torch.rand(4) * 0.5 + 0.1
    doc = torch.sort(torch.randint(0, 4, (200,))).values.int()
    rel_bias = torch.randn(4, 399)

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    def alibi(score, b, h, q_idx, kv_idx):
        return score - slopes[h] * (q_idx - kv_idx)

    def softcap(score, b, h, q_idx, kv_idx):
        return 30.0 * torch.tanh(score / 30.0)

    def document(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (doc[q_idx] == doc[kv_idx])

    def sliding(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < 256)

    def prefix(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) | (kv_idx < 64)

    def t5(score, b, h, q_idx, kv_idx):
        return score + rel_bias[h, q_idx - kv_idx + 200 - 1]

    def streaming(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & ((q_idx - kv_idx < 256) | (kv_idx < 4))

    return [
        ("full.attn", dict(), {}),
        ("causal.attn", dict(mask_mod=causal), {}),
        ("alibi.attn", dict(score_mod=alibi, mask_mod=causal), {"slopes": slopes}),
        ("softcap.attn", dict(score_mod=softcap), {}),
        ("document.attn", dict(mask_mod=document), {"doc": doc}),
        ("sliding_window.attn", dict(mask_mod=sliding), {}),
        ("prefix_lm.attn", dict(mask_mod=prefix), {}),
        ("streaming_llm.attn", dict(mask_mod=streaming), {}),
        ("sigmoid.attn", None, {}),
        ("t5_bias.attn", None, {"rel_bias": rel_bias}),
    ], (slopes, doc, rel_bias, t5)


PAIRS, _ = _pairs()


@pytest.mark.parametrize("file,kwargs,params", [p for p in PAIRS if p[1] is not None], ids=lambda x: str(x)[:20])
def test_dsl_and_callbacks_print_the_same_ir(file, kwargs, params):
    from_file = attnc.compile(str(EXAMPLES / file))
    traced = attnc.compile(**kwargs) if kwargs else attnc.compile(score_mod=None, mask_mod=None)
    assert traced.ir() == from_file.ir()
    for after in ("lower", "simplify", "online"):
        assert traced.ir(after=after) == from_file.ir(after=after)


@pytest.mark.parametrize("file,kwargs,params", [p for p in PAIRS if p[1] is not None], ids=lambda x: str(x)[:20])
def test_dsl_and_callbacks_compute_the_same(file, kwargs, params):
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 4, 200, 32, dtype=torch.float64) for _ in range(3))
    traced = attnc.compile(**kwargs)
    from_file = attnc.compile(str(EXAMPLES / file))
    out = traced(q, k, v)
    assert torch.allclose(out, from_file(q, k, v, **params), atol=1e-12)
    assert torch.allclose(out, from_file.reference(q, k, v, **params), atol=1e-10)


def test_sigmoid_norm_by_name_matches_the_file_with_a_constant_bias():
    import math

    def bias(score, b, h, q_idx, kv_idx):
        return score - math.log(200)
    traced = attnc.compile(score_mod=bias, norm="sigmoid")
    from_file = attnc.compile("const n = 200\nscore = score - log(n)\nnorm = sigmoid")
    assert traced.ir() == from_file.ir()


def test_closed_over_tensors_become_params_named_after_the_variable():
    _, (slopes, doc, rel_bias, t5) = _pairs()
    attn = attnc.compile(score_mod=t5)
    assert list(attn.param_specs) == ["rel_bias"]
    # the callback closes over the key length as a number; the language names it as a const
    from_text = attnc.compile("param rel_bias: f32[H, R]\nconst kv = 200\n"
                              "score = score + rel_bias[h, q_idx - kv_idx + kv - 1]")
    assert attn.ir() == from_text.ir()


def test_nested_indexing_through_two_closed_over_tensors():
    doc = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2, 2, 2])
    offsets = torch.tensor([0, 2, 5])

    def in_doc_prefix(b, h, q_idx, kv_idx):
        return kv_idx - offsets[doc[q_idx]] < 2

    attn = attnc.compile(mask_mod=in_doc_prefix)
    assert set(attn.param_specs) == {"offsets", "doc"}
    assert "offsets[doc[m]]" in attn.ir()
    q, k, v = (torch.randn(1, 2, 10, 16, dtype=torch.float64) for _ in range(3))
    keep = (torch.arange(10)[None, :] - offsets[doc][:, None]) < 2
    s = (q @ k.transpose(-1, -2)) / 4.0
    want = torch.softmax(s.masked_fill(~keep, float("-inf")), -1) @ v
    assert torch.allclose(attn(q, k, v), want, atol=1e-12)


def test_python_control_flow_on_a_traced_value_says_use_where():
    def bad(b, h, q_idx, kv_idx):
        if q_idx > kv_idx:
            return q_idx >= 0
        return kv_idx >= 0

    with pytest.raises(attnc.SpecError) as e:
        attnc.compile(mask_mod=bad)
    msg = str(e.value)
    assert "torch.where" in msg and "test_callbacks.py" in msg and "if q_idx > kv_idx" in msg


def test_python_and_on_traced_values_is_rejected():
    with pytest.raises(attnc.SpecError, match="torch.where"):
        attnc.compile(mask_mod=lambda b, h, q, kv: q >= kv and q - kv < 4)


def test_untraceable_call_names_the_function_and_the_place():
    def odd(score, b, h, q_idx, kv_idx):
        return torch.fft.fft(score)

    with pytest.raises(attnc.SpecError) as e:
        attnc.compile(score_mod=odd)
    assert "fft" in str(e.value)
    assert "Traceback" not in str(e.value)


def test_mask_mod_must_return_a_boolean_and_score_mod_a_number():
    with pytest.raises(attnc.SpecError, match="boolean"):
        attnc.compile(mask_mod=lambda b, h, q, kv: q - kv)
    with pytest.raises(attnc.SpecError, match="boolean"):
        attnc.compile(score_mod=lambda s, b, h, q, kv: q >= kv)


def test_callable_normalizer_with_row_statistics():
    def relu2(score, b, h, q_idx, kv_idx):
        w = torch.relu(score) ** 2
        return w / attnc.rowsum(w)

    traced = attnc.compile(norm=relu2)
    from_file = attnc.compile(str(EXAMPLES / "relu2.attn"))
    q, k, v = (torch.randn(1, 2, 50, 16, dtype=torch.float64) for _ in range(3))
    assert torch.allclose(traced(q, k, v), from_file.reference(q, k, v), atol=1e-12)


def test_flex_attention_drop_in():
    slopes = torch.rand(4)

    def alibi(score, b, h, q_idx, kv_idx):
        return score - slopes[h] * (q_idx - kv_idx)

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    q = torch.randn(1, 4, 64, 16, dtype=torch.float64)
    k, v = (torch.randn(1, 2, 64, 16, dtype=torch.float64) for _ in range(2))
    out, lse = attnc.flex_attention(q, k, v, score_mod=alibi, block_mask=causal, enable_gqa=True, return_lse=True)
    ref = attnc.compile(str(EXAMPLES / "alibi.attn")).reference(q, k, v, slopes=slopes, return_lse=True)
    assert torch.allclose(out, ref[0], atol=1e-12) and torch.allclose(lse, ref[1], atol=1e-12)
    with pytest.raises(attnc.SpecError, match="enable_gqa"):
        attnc.flex_attention(q, k, v, block_mask=causal)
