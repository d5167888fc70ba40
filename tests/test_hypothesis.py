"""Random valid specs, compiled and run in float64 against the float64 oracle.

Each spec has up to three `score =` modifiers built from the function library over score, indices, consts and
a float param indexed by h; a mask that is an and/or/not of affine comparisons of q_idx, kv_idx and consts; and
a normalizer among softmax, sigmoid, two rownorms and softmax with a sink. Magnitudes are kept modest (bounded
functions, small coefficients) so no exp overflows and the only difference left is rounding."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnc

try:
    from helpers import generator, qkv
except ImportError:
    from tests.helpers import generator, qkv

BOUNDED = ["tanh", "sigmoid"]                # |f(x)| <= 1 for every x
GROWING = ["softplus", "relu", "abs"]        # |f(x)| <= |x| + 1


@st.composite
def small_float(draw, lo=-2.0, hi=2.0):
    return round(draw(st.floats(lo, hi, allow_nan=False, allow_infinity=False)), 3)


def fmt(x: float) -> str:
    return f"{x:.3f}" if x >= 0 else f"({x:.3f})"


LEAVES = ["score", "s_c", "p[h]", "0.05 * (q_idx - kv_idx)", "0.03 * kv_idx", "0.1 * h", "0.02 * (q_idx + kv_idx)",
          "0.1 * (q_idx % 3)", "0.2 * (kv_idx // 16)", "p[h] * score", "score / (1.0 + p[h])"]


@st.composite
def term(draw, depth: int = 1) -> str:
    """A float expression with |value| <= a few, for |score| <= a few and indices < 64."""
    leaf = draw(st.sampled_from(LEAVES)) if depth == 0 or draw(st.booleans()) else draw(term(depth - 1))
    kind = draw(st.sampled_from(["bounded", "growing", "minmax", "where", "clamp", "exp", "log", "sqrt", "plain"]))
    if kind == "log":
        return f"log(1.0 + abs({leaf}))"
    if kind == "sqrt":
        return f"sqrt(abs({leaf}) + 0.5)"
    if kind == "bounded":
        return f"{draw(st.sampled_from(BOUNDED))}({leaf})"
    if kind == "growing":
        return f"{draw(st.sampled_from(GROWING))}({leaf} - {fmt(draw(small_float()))})"
    if kind == "minmax":     # a float32-exact bound: see test_runtime's min/max precision test for why
        return f"{draw(st.sampled_from(['min', 'max']))}({leaf}, {fmt(draw(st.integers(-16, 16)) / 8)})"
    if kind == "where":      # one branch holds score: see test_runtime's float-literal precision test for why
        return f"where(q_idx >= kv_idx + {draw(st.integers(-5, 5))}, {leaf}, {fmt(draw(small_float()))} * score)"
    if kind == "clamp":
        return f"clamp({leaf}, -1.0, 1.0)"
    if kind == "exp":
        return f"exp(-abs({leaf}))"
    return leaf


@st.composite
def score_mod(draw) -> str:
    t = draw(term())
    shape = draw(st.sampled_from(["add", "mul", "cap", "replace_bounded", "select"]))
    if shape == "select":
        return f"where(kv_idx % 2 == 0, score, 0.5 * score + 0.1 * {t})"
    if shape == "add":
        return f"score + {fmt(draw(small_float(-1, 1)))} * {t}"
    if shape == "mul":
        return f"score * (1.0 + 0.25 * tanh({t}))"
    if shape == "cap":
        return f"c_cap * tanh(score / c_cap) + 0.1 * {t}"
    return f"score - 0.5 * sigmoid({t})"


@st.composite
def comparison(draw) -> str:
    lhs = draw(st.sampled_from(["q_idx - kv_idx", "kv_idx", "q_idx", "q_idx + kv_idx", "2 * q_idx - kv_idx",
                                "kv_idx - q_idx"]))
    op = draw(st.sampled_from(["<", "<=", ">", ">=", "==", "!="]))
    rhs = draw(st.sampled_from(["0", "c_w", "c_s", str(draw(st.integers(-8, 40)))]))
    return f"{lhs} {op} {rhs}"


@st.composite
def mask(draw, depth=2) -> str:
    if depth == 0 or draw(st.booleans()):
        return draw(comparison())
    a, b = draw(mask(depth - 1)), draw(mask(depth - 1))
    form = draw(st.sampled_from(["and", "or", "not"]))
    return f"not ({a})" if form == "not" else f"({a}) {form} ({b})"


NORMS = ["softmax", "sigmoid", "rownorm(relu(score) ** 2)", "rownorm(softplus(score))", "softmax(sink = s_c)",
         "softmax(sink = p[h])"]


@st.composite
def spec(draw) -> str:
    lines = ["variant random", f"const s_c = {draw(small_float(-1, 1))}", f"const c_cap = {draw(small_float(2, 8))}",
             f"const c_w = {draw(st.integers(1, 30))}", f"const c_s = {draw(st.integers(0, 6))}",
             "param p: f32[H]"]
    for _ in range(draw(st.integers(0, 3))):
        lines.append(f"score = {draw(score_mod())}")
    if draw(st.integers(0, 3)):
        lines.append(f"mask = {draw(mask())}")
    lines.append(f"norm = {draw(st.sampled_from(NORMS))}")
    return "\n".join(lines) + "\n"


@st.composite
def shape(draw):
    hkv = draw(st.sampled_from([1, 2]))
    return (draw(st.integers(1, 2)), hkv * draw(st.sampled_from([1, 2])), hkv, draw(st.integers(1, 40)),
            draw(st.integers(1, 40)), draw(st.sampled_from([4, 8])), draw(st.sampled_from([4, 8])))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("attnc-cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("ATTNC_CACHE_DIR", str(d))
    yield d
    mp.undo()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(text=spec(), dims=shape(), seed=st.integers(0, 2 ** 16), lse=st.booleans())
def test_random_specs_match_the_oracle_in_float64(cache_dir, text, dims, seed, lse):
    B, H, HKV, Q, KV, D, Dv = dims
    attn = attnc.compile(text)
    q, k, v = qkv(B, H, HKV, Q, KV, D, Dv, torch.float64, seed=seed)
    p = torch.rand(H, generator=generator(seed), dtype=torch.float64) * 0.9 + 0.1
    ref = attn.reference(q, k, v, p=p, return_lse=lse)
    got = attn(q, k, v, p=p, return_lse=lse)
    if lse:
        (ref, ref_lse), (got, got_lse) = ref, got
        assert torch.equal(torch.isneginf(got_lse), torch.isneginf(ref_lse)), text
        finite = ~torch.isneginf(ref_lse)
        torch.testing.assert_close(got_lse[finite], ref_lse[finite], rtol=1e-9, atol=1e-9, msg=lambda m: text + m)
    assert got.dtype == torch.float64 and not torch.isnan(got).any(), text
    atol = 1e-9 * max(1.0, ref.abs().max().item())
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=atol, msg=lambda m: text + m)
