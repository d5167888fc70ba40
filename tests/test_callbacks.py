"""Callbacks with FlexAttention's signatures trace into the same IR as the language, and any pure elementwise
torch code in them means what torch says it means (checked point by point against torch's own evaluation)."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import flex_attention as tf

import attnc
from attnc.frontend.callbacks import MAX_ELEMENTS, trace
from attnc.runtime.reference import evaluate, index_env

try:
    from helpers import generator
except ImportError:
    from tests.helpers import generator

SLOPES = torch.rand(4) * 0.5 + 0.1
DOC = torch.sort(torch.randint(0, 4, (200,), generator=generator(3))).values.int()
REL_BIAS = torch.randn(4, 399)


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def alibi(score, b, h, q_idx, kv_idx):
    return score - SLOPES[h] * (q_idx - kv_idx)


def softcap(score, b, h, q_idx, kv_idx):
    return 30.0 * torch.tanh(score / 30.0)


def document(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) & (DOC[q_idx] == DOC[kv_idx])


def sliding(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) & (q_idx - kv_idx < 256)


def prefix(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) | (kv_idx < 64)


def streaming(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) & ((q_idx - kv_idx < 256) | (kv_idx < 4))


def t5(score, b, h, q_idx, kv_idx):
    return score + REL_BIAS[h, q_idx - kv_idx + 200 - 1]


# (the language, the callbacks, the params the language's form is called with)
PAIRS = {
    "causal": ("variant causal\nmask = q_idx >= kv_idx", dict(mask_mod=causal), {}),
    "alibi": ("variant alibi_causal\nparam SLOPES: f32[H]\nmask = q_idx >= kv_idx\n"
              "score = score - SLOPES[h] * (q_idx - kv_idx)", dict(score_mod=alibi, mask_mod=causal),
              {"SLOPES": SLOPES}),
    "softcap": ("variant softcap\nscore = 30.0 * tanh(score / 30.0)", dict(score_mod=softcap), {}),
    "document": ("variant document\nparam DOC: i32[L]\nmask = q_idx >= kv_idx and DOC[q_idx] == DOC[kv_idx]",
                 dict(mask_mod=document), {"DOC": DOC}),
    "sliding": ("variant sliding\nconst window = 256\nmask = q_idx >= kv_idx and q_idx - kv_idx < window",
                dict(mask_mod=sliding), {}),
    "prefix": ("variant prefix\nmask = q_idx >= kv_idx or kv_idx < 64", dict(mask_mod=prefix), {}),
    "streaming": ("variant streaming\nmask = q_idx >= kv_idx and (q_idx - kv_idx < 256 or kv_idx < 4)",
                  dict(mask_mod=streaming), {}),
    "t5": ("variant t5\nparam REL_BIAS: f32[H, R]\nconst kv = 200\n"
           "score = score + REL_BIAS[h, q_idx - kv_idx + kv - 1]", dict(score_mod=t5), {"REL_BIAS": REL_BIAS}),
}


@pytest.mark.parametrize("name", list(PAIRS))
def test_dsl_and_callbacks_print_the_same_ir(name):
    text, kwargs, _ = PAIRS[name]
    from_text, traced = attnc.compile(text), attnc.compile(**kwargs)
    for after in (None, "lower", "simplify", "online"):
        assert traced.ir(after=after) == from_text.ir(after=after)


@pytest.mark.parametrize("name", list(PAIRS))
def test_dsl_and_callbacks_compute_the_same(name):
    text, kwargs, params = PAIRS[name]
    q, k, v = (torch.randn(2, 4, 200, 32, dtype=torch.float64, generator=generator(i)) for i in range(3))
    traced, from_text = attnc.compile(**kwargs), attnc.compile(text)
    out = traced(q, k, v)
    assert torch.allclose(out, from_text(q, k, v, **params), atol=1e-12)
    assert torch.allclose(out, from_text.reference(q, k, v, **params), atol=1e-10)


def test_sigmoid_norm_by_name_matches_the_language_with_a_constant_bias():
    def bias(score, b, h, q_idx, kv_idx):
        return score - math.log(200)
    traced = attnc.compile(score_mod=bias, norm="sigmoid")
    from_text = attnc.compile("variant bias\nconst n = 200\nscore = score - log(n)\nnorm = sigmoid")
    assert traced.ir() == from_text.ir()


def test_closed_over_tensors_become_params_named_after_the_variable():
    assert list(attnc.compile(score_mod=t5).param_specs) == ["REL_BIAS"]
    # names come from the closures of nested callables too (and_masks holds document in its own closure)
    assert list(attnc.compile(mask_mod=tf.and_masks(causal, document)).param_specs) == ["DOC"]


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


def test_callable_normalizer_with_row_statistics():
    def relu2(score, b, h, q_idx, kv_idx):
        w = torch.relu(score) ** 2
        return w / attnc.rowsum(w)

    traced = attnc.compile(norm=relu2)
    q, k, v = (torch.randn(1, 2, 50, 16, dtype=torch.float64) for _ in range(3))
    w = torch.relu(q @ k.transpose(-1, -2) / 4.0) ** 2
    want = (w / w.sum(-1, keepdim=True)) @ v
    assert torch.allclose(traced(q, k, v), want, atol=1e-12)


# -- tracing coverage: what torch computes for every (b, h, q_idx, kv_idx), the trace computes --
B, H, Q, KV = 2, 3, 37, 45


def assert_traces_like_torch(score_mod=None, mask_mod=None, Bn=B, Hn=H, Qn=Q, KVn=KV):
    v = trace(score_mod, mask_mod)
    env = index_env(Bn, Hn, Qn, KVn, {"B": Bn, "H": Hn, "Q": Qn, "KV": KVn})
    if mask_mod is not None:
        got = torch.ones((), dtype=torch.bool) if v.mask is None else evaluate(v.mask, env, v.captured)
        want = tf.create_mask(mask_mod, Bn, Hn, Qn, KVn, device="cpu")
        assert torch.equal(got.expand(Bn, Hn, Qn, KVn), want.expand(Bn, Hn, Qn, KVn))
    if score_mod is not None:
        score = torch.randn(Bn, Hn, Qn, KVn, dtype=torch.float64, generator=generator(7)) * 3
        env["score"] = score
        got = evaluate(v.score, env, v.captured).expand(Bn, Hn, Qn, KVn)
        idx = [torch.arange(n) for n in (Bn, Hn, Qn, KVn)]
        want = _grid_score(score_mod, score, *idx)
        # torch computes an integer made float in float32: agreement to its rounding
        assert torch.allclose(got, want.double(), rtol=1e-6, atol=1e-5), (got - want).abs().max()
    return v


def _grid_score(score_mod, score, b, h, q, kv):
    """score_mod over the whole grid the way FlexAttention's eager path evaluates it: vmapped per index."""
    fn = score_mod
    for axis in reversed(range(4)):
        dims = [None] * 5
        dims[0] = dims[1 + axis] = 0
        fn = torch.vmap(fn, in_dims=tuple(dims))
    return fn(score, b, h, q, kv)


ACTIVATIONS = {
    "silu": F.silu, "mish": F.mish, "elu": F.elu, "selu": F.selu, "celu": lambda x: F.celu(x, 0.5),
    "leaky_relu": lambda x: F.leaky_relu(x, 0.2), "relu6": F.relu6, "hardtanh": F.hardtanh,
    "hardsigmoid": F.hardsigmoid, "hardswish": F.hardswish, "softsign": F.softsign, "tanhshrink": F.tanhshrink,
    "logsigmoid": F.logsigmoid, "hardshrink": F.hardshrink, "softshrink": F.softshrink, "softplus": F.softplus,
    "softplus_beta": lambda x: F.softplus(x, beta=2.0, threshold=1.5), "sigmoid": F.sigmoid, "tanh": F.tanh,
    "relu": F.relu, "expit": torch.special.expit, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu, "erf": torch.erf, "special_erf": torch.special.erf,
    "threshold": lambda x: F.threshold(x, 0.1, -2.0), "log1p": lambda x: torch.log1p(x.abs()),
    "expm1": torch.expm1, "square": torch.square, "reciprocal": lambda x: torch.reciprocal(x.abs() + 1),
    "trunc": torch.trunc, "fmod": lambda x: torch.fmod(x, 0.7), "remainder": lambda x: x % 0.7,
    "floordiv": lambda x: x // 0.7, "isneginf": lambda x: torch.where(torch.isneginf(x - 1), 0.0, x),
}


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_pointwise_activations_trace_as_torch_defines_them(name):
    act = ACTIVATIONS[name]
    assert_traces_like_torch(score_mod=lambda score, b, h, q_idx, kv_idx: act(score))


def test_tensor_methods_trace():
    table = torch.randn(3, 100)

    def mod(score, b, h, q_idx, kv_idx):
        d = (q_idx - kv_idx).abs()
        bias = d.float().clamp(max=10.0) * 0.1 + q_idx.new_ones(()) + d.new_zeros(()).to(torch.float32)
        bias = bias + score.new_full((), 0.5) - torch.div(q_idx - kv_idx, 4, rounding_mode="trunc")
        bias = bias + torch.fmod(q_idx - kv_idx, 3) + (q_idx - kv_idx).sign() * score.exp().clamp_max(2.0)
        near = torch.where(d < 5, 1.0, 0.0).to(score.dtype)
        return (score * near).where(d > 2, score) + bias + table[h, d] + torch.maximum(score, score.new_zeros(()))

    def mask(b, h, q_idx, kv_idx):
        d = q_idx - kv_idx
        return d.ge(-3) & d.le(7).logical_or(kv_idx.eq(0)) & ~(d == 5).bool() & (d.to(torch.bool) | (h > 0))

    assert_traces_like_torch(score_mod=mod, mask_mod=mask)


def test_integer_bitwise_operations_become_arithmetic_on_bits():
    def mask(b, h, q_idx, kv_idx):
        x = (q_idx & 0xF) ^ 5                         # known bits on both sides: bit by bit
        y = (kv_idx | 2) % 8                          # one side known: x + (k & ~x)
        z = (q_idx & -4) == (kv_idx & ~3)             # negative constants through ~c
        w = ((q_idx >> 2) << 1) >= (kv_idx >> 1)
        u = (kv_idx ^ -3) < (q_idx | -16) + 20
        return ((x & 7) == y) | z | (w & u) | ((q_idx ^ kv_idx) & 1 == 0)
    assert_traces_like_torch(mask_mod=mask, Qn=64, KVn=70)


def _interleave(x):                                    # 16 bits of x spread to the even bits
    x = x & 0x0000FFFF
    x = (x | (x << 8)) & 0x00FF00FF
    x = (x | (x << 4)) & 0x0F0F0F0F
    x = (x | (x << 2)) & 0x33333333
    return (x | (x << 1)) & 0x55555555


def _deinterleave(code):
    code = code & 0x55555555
    code = (code | (code >> 1)) & 0x33333333
    code = (code | (code >> 2)) & 0x0F0F0F0F
    code = (code | (code >> 4)) & 0x00FF00FF
    return (code | (code >> 8)) & 0x0000FFFF


def morton_natten(b, h, q_idx, kv_idx):
    """NATTEN on an 8x8 canvas laid out in Morton order (attention-gym's generate_morton_natten)."""
    qx, qy = _deinterleave(q_idx), _deinterleave(q_idx >> 1)
    kx, ky = _deinterleave(kv_idx), _deinterleave(kv_idx >> 1)
    near = ((qx.clamp(1, 6) - kx).abs() <= 1) & ((qy.clamp(1, 6) - ky).abs() <= 1)
    return near & (_interleave(qx) | (_interleave(qy) << 1) == q_idx)      # decoding round-trips


def test_morton_order_natten_traces():
    assert_traces_like_torch(mask_mod=morton_natten, Bn=1, Hn=1, Qn=64, KVn=64)


def test_morton_order_natten_runs():
    q, k, v = (torch.randn(1, 2, 64, 16, dtype=torch.float64, generator=generator(i)) for i in range(3))
    keep = tf.create_mask(morton_natten, 1, 1, 64, 64, device="cpu")
    s = (q @ k.transpose(-1, -2) / 4).masked_fill(~keep, -math.inf)
    assert torch.allclose(attnc.flex_attention(q, k, v, block_mask=morton_natten), torch.softmax(s, -1) @ v,
                          atol=1e-12)


def test_chained_indexing_and_rows_of_tables():
    ancestor = torch.rand(10, 10, generator=generator(1)) < 0.4
    intervals = torch.tensor([[0, 10], [5, 30], [20, 37]])
    image_of = torch.repeat_interleave(torch.arange(3), 15)

    def tree(b, h, q_idx, kv_idx):
        return ancestor[q_idx % 10][kv_idx % 10] | (q_idx == kv_idx)

    def flamingo(b, h, q_idx, kv_idx):
        interval = intervals[image_of[kv_idx]]
        lo, hi = interval
        return (q_idx >= interval[0]) & (q_idx < hi) & (lo >= 0)

    assert_traces_like_torch(mask_mod=tree)
    assert_traces_like_torch(mask_mod=flamingo)


def test_short_vectors_unroll_any_and_dot_products():
    topk = torch.randint(0, 5, (B, H, 10, 3), generator=generator(2))
    q_rope, k_rope = torch.randn(B, H, Q, 4, generator=generator(3)), torch.randn(B, 1, KV, 4, generator=generator(4))
    coords = torch.randint(0, 9, (max(Q, KV), 2), generator=generator(5))

    def selected(b, h, q_idx, kv_idx):
        return (topk[b, h, q_idx // 4] == (kv_idx // 9).unsqueeze(-1)).any(dim=-1)

    def rope(score, b, h, q_idx, kv_idx):
        return score + 0.5 * torch.dot(q_rope[b, h, q_idx], k_rope[b, 0, kv_idx]) + \
            (q_rope[b, h, q_idx] * k_rope[b, 0, kv_idx]).sum(-1) + (q_rope[b, h, q_idx] @ k_rope[b, 0, kv_idx])

    def chebyshev(b, h, q_idx, kv_idx):
        return (coords[q_idx] - coords[kv_idx]).abs().amax(-1) <= 2

    def manhattan(score, b, h, q_idx, kv_idx):
        d = (coords[q_idx] - coords[kv_idx]).abs()
        return score - d.sum() * 0.1 + d.max(dim=-1).values + torch.stack([d[0], d[1]]).float().mean()

    assert_traces_like_torch(mask_mod=selected)
    assert_traces_like_torch(score_mod=rope)
    assert_traces_like_torch(mask_mod=chebyshev)
    assert_traces_like_torch(score_mod=manhattan)


def test_a_closed_over_scalar_tensor_is_a_param_read_at_every_call():
    temperature = torch.tensor(2.0, dtype=torch.float64)

    def scaled(score, b, h, q_idx, kv_idx):
        return score / temperature

    assert list(attnc.compile(score_mod=scaled).param_specs) == ["temperature"]
    q, k, v = (torch.randn(1, 1, 8, 4, dtype=torch.float64, generator=generator(i)) for i in range(3))
    for t in (2.0, 0.5):
        temperature.fill_(t)
        want = torch.softmax(q @ k.transpose(-1, -2) / 2 / t, -1) @ v
        assert torch.allclose(attnc.flex_attention(q, k, v, score_mod=scaled), want, atol=1e-12)


# -- what cannot be traced says what to write instead, at the user's line --
def _error_of(**kwargs) -> str:
    with pytest.raises(attnc.SpecError) as e:
        trace(**kwargs)
    msg = str(e.value)
    assert "Traceback" not in msg and "expected:" in msg
    return msg


def test_python_control_flow_on_a_traced_value_says_use_where():
    def bad(b, h, q_idx, kv_idx):
        if q_idx > kv_idx:
            return q_idx >= 0
        return kv_idx >= 0

    msg = _error_of(mask_mod=bad)
    assert "torch.where" in msg and "test_callbacks.py" in msg and "if q_idx > kv_idx" in msg


def test_python_and_or_max_on_traced_values_are_rejected():
    assert "torch.where" in _error_of(mask_mod=lambda b, h, q, kv: q >= kv and q - kv < 4)
    assert "torch.maximum" in _error_of(score_mod=lambda s, b, h, q, kv: s + max(q, kv))


@pytest.mark.parametrize("body,words", [
    (lambda s, b, h, q, kv: torch.erfc(s), "1 - erf(x)"),
    (lambda s, b, h, q, kv: F.gelu(s, approximate="fast"), "'none' or 'tanh'"),
    (lambda s, b, h, q, kv: torch.sin(s), "table indexed by position"),
    (lambda s, b, h, q, kv: s + (s * 2).int(), "float-to-integer"),
    (lambda s, b, h, q, kv: s + (q & kv), "mask the result with a constant"),
    (lambda s, b, h, q, kv: s + ((q ^ kv) | 1), "mask the result with a constant"),
    (lambda s, b, h, q, kv: s + (q << kv), "non-negative Python int"),
    (lambda s, b, h, q, kv: s.half(), ".float()"),
    (lambda s, b, h, q, kv: s + torch.fft.fft(s), "FUNCTIONS"),
    (lambda s, b, h, q, kv: s.frobnicate(), "METHODS"),
])
def test_untraceable_code_names_the_place_and_what_to_write(body, words):
    msg = _error_of(score_mod=body)
    assert words in msg and "test_callbacks.py" in msg


def test_arrays_too_long_to_unroll_and_arrays_returned_are_refused():
    wide = torch.randn(10, MAX_ELEMENTS + 1)
    assert "index every dimension" in _error_of(score_mod=lambda s, b, h, q, kv: s + wide[q].sum())
    rows = torch.randn(10, 3)
    assert "reduce it" in _error_of(score_mod=lambda s, b, h, q, kv: s + rows[q])


def test_mask_mod_must_return_a_boolean_and_score_mod_a_number():
    with pytest.raises(attnc.SpecError, match="boolean"):
        attnc.compile(mask_mod=lambda b, h, q, kv: q - kv)
    with pytest.raises(attnc.SpecError, match="boolean"):
        attnc.compile(score_mod=lambda s, b, h, q, kv: q >= kv)


def test_index_tensors_answer_dtype_device_and_shape_like_flexattentions():
    seen = {}

    def probe(score, b, h, q_idx, kv_idx):
        seen.update(dtype=q_idx.dtype, score=score.dtype, device=q_idx.device, shape=q_idx.shape, dim=q_idx.dim())
        return score + torch.tensor(1.0, device=q_idx.device)

    trace(score_mod=probe)
    assert seen == {"dtype": torch.int32, "score": torch.float32, "device": torch.device("cpu"),
                    "shape": torch.Size([]), "dim": 0}
