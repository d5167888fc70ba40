"""The torch backend's own paths: plain softmax handed to SDPA's CPU kernel in spans (forward and backward,
partial spans in row blocks, rows that keep nothing, the fallback where SDPA's kernel does not apply), the
row plan passes (weights, rowdiv, factor, identities), and a call that leaves the process as it found it."""
from __future__ import annotations

import threading

import pytest
import torch

import attnc
from attnc.backends import torch_backend, torch_schedule, torch_spans

try:
    from helpers import example, generator, qkv
except ImportError:
    from tests.helpers import example, generator, qkv

from attnc.runtime.inputs import random_params

PLAIN = ("causal", "sliding_window", "document", "full", "prefix_lm")


@pytest.fixture
def small_spans(monkeypatch):
    """Tiles and row blocks small enough that shapes of a few hundred rows have many spans and blocks."""
    monkeypatch.setattr(torch_schedule, "SPAN_SHAPES", ((64, 16), (32, 32)))
    monkeypatch.setattr(torch_schedule, "SPAN_ROWS", (8, 16))
    torch_backend.SCHEDULES.memo.clear()
    yield
    torch_backend.SCHEDULES.memo.clear()


def compiled(name: str, **consts):
    return attnc.compile(example(name), **consts)


def run_and_grads(fn, q, k, v, params, dtype, seed=3):
    """out, lse and the gradients of q, k, v for a random linear loss of out."""
    qq, kk, vv = (t.to(dtype).detach().requires_grad_() for t in (q, k, v))
    out = fn(qq, kk, vv, **params)
    g = torch.Generator().manual_seed(seed)
    (out * torch.randn(out.shape, generator=g).to(dtype)).sum().backward()
    with torch.no_grad():
        _, lse = fn(q.to(dtype), k.to(dtype), v.to(dtype), return_lse=True, **params)
    return out.detach(), lse, qq.grad, kk.grad, vv.grad


def check_against_oracle(attn, shape, seed=0, Dv=None):
    B, H, HKV, Q, KV, D = shape
    q, k, v = qkv(B, H, HKV, Q, KV, D, Dv, seed=seed)
    params = random_params(attn, B, H, HKV, Q, KV, D, generator(seed))
    got = run_and_grads(attn, q, k, v, params, torch.float32)
    ref = run_and_grads(attn.reference, q, k, v, params, torch.float64)
    eager = run_and_grads(attn.reference, q, k, v, params, torch.float32)
    for name, x, r, e in zip(("out", "lse", "dq", "dk", "dv"), got, ref, eager):
        finite = torch.isfinite(r)
        assert torch.equal(torch.isfinite(x), finite), f"{name}: infinities differ from the oracle's"
        err = (x.double() - r)[finite].abs().max().item()
        eager_err = (e.double() - r)[finite].abs().max().item()
        assert err <= max(4 * eager_err, 2e-5 * max(1.0, r[finite].abs().max().item())), \
            f"{name}: error {err:.3g}, eager fp32 error {eager_err:.3g}"


@pytest.mark.parametrize("name", PLAIN)
def test_plain_softmax_goes_to_sdpa_forward_and_backward(name):
    attn = compiled(name)
    assert torch_backend.sdpa_pass(attn.plans("torch", save=True)[0]) is not None
    assert torch_backend.sdpa_pass(attn.plans("torch", backward=True)[0]) is not None
    assert "spans.softmax_span(" in attn.source("torch")
    assert "spans.softmax_span_grad(" in attn.source("torch", backward=True)


@pytest.mark.parametrize("name", ["alibi", "softcap", "sigmoid", "sinks", "temperature", "relu2"])
def test_other_variants_keep_the_tile_loop(name):
    attn = compiled(name)
    assert all(torch_backend.sdpa_pass(p) is None for p in attn.plans("torch", save=True))
    assert all(torch_backend.sdpa_pass(p) is None for p in attn.plans("torch", backward=True))


def test_a_backward_with_an_lse_gradient_keeps_the_tile_loop():
    # SDPA's backward has no input for dLSE
    assert torch_backend.sdpa_pass(compiled("causal").plans("torch", True, backward=True)[0]) is None


# (B, H, HKV, Q, KV, D): GQA and B > 1 past several row blocks; queries past the keys (rows that keep none);
# cross-attention with fewer queries; MQA
SHAPES = {"gqa_b2": (2, 4, 2, 150, 150, 16), "q_gt_kv": (1, 2, 2, 170, 90, 8), "q_lt_kv": (2, 2, 1, 40, 203, 8),
          "mqa": (1, 3, 1, 97, 131, 16)}


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("name", ["causal", "sliding_window", "document", "full"])
def test_spans_match_the_float64_oracle(name, shape, small_spans):
    consts = {"window": 24} if name == "sliding_window" else {}
    check_against_oracle(compiled(name, **consts), SHAPES[shape])


@pytest.mark.parametrize("name", ["causal", "document"])
def test_spans_at_the_default_tile_shapes(name):
    # query tiles of up to 1024 rows and blocks of 64 or 128: partial spans in several blocks
    check_against_oracle(compiled(name), (1, 2, 1, 300, 300, 16), seed=1)


def test_head_dims_sdpa_does_not_take_run_the_same_spans_by_plain_operations(small_spans):
    # SDPA's CPU kernel needs v's head dim equal to q's: elsewhere the span is computed as a matmul
    check_against_oracle(compiled("causal"), (1, 2, 1, 60, 70, 8), Dv=12)


def test_rows_that_keep_no_key_give_zero_and_minus_infinity(small_spans):
    attn = compiled("causal")
    q, k, v = qkv(1, 2, 2, 80, 30, 8)                 # the first 50 queries sit before every key
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, lse = attn(q, k, v, return_lse=True)
    assert (out[:, :, :50] == 0).all() and torch.isneginf(lse[:, :, :50]).all()
    assert torch.isfinite(lse[:, :, 50:]).all()
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert (q.grad[:, :, :50] == 0).all()


def test_spans_join_tiles_of_one_kind():
    tiles = [(0, [(0, 16, True), (16, 32, True), (32, 48, False), (64, 80, False), (80, 96, True)])]
    assert torch_schedule.join(tiles, None, True) == [(0, [(0, 32, True), (32, 48, False), (64, 80, False),
                                                           (80, 96, True)])]
    assert torch_schedule.join(tiles, 32, False) == [(0, [(0, 32, True), (32, 48, False), (64, 96, False)])]


def test_kept_keys_narrow_a_partial_span():
    keep = torch.zeros(1, 1, 1, 4, 10, dtype=torch.bool)
    keep[..., 1, 3:6] = True
    assert torch_spans.kept_keys(keep, 100, 110)[:2] == (103, 106)
    assert torch_spans.kept_keys(torch.zeros(1, 1, 1, 4, 10, dtype=torch.bool), 100, 110)[:2] == (100, 100)
    a, b, rest = torch_spans.kept_keys(torch.ones(1, 1, 1, 4, 10, dtype=torch.bool), 100, 110)
    assert (a, b, rest) == (100, 110, None)                # a span that keeps every pair needs no mask


# -- the row plan passes --
def plan_text(name: str, backward: bool) -> str:
    text = compiled(name).ir(target="torch", backward=backward)
    return text[text.index("-- plan after"):]


def test_weights_are_exp_of_the_score_minus_the_rows_lse():
    text = plan_text("alibi", backward=True)
    assert "lse_m1 = where(l1 == 0.0, float(inf), m1 + log(l1))" in text
    assert "exp(s - lse_m1)" in text and "/? l1" not in text.split("pass 1")[1]


def test_row_values_leave_the_loop_and_sums_share_their_factor():
    text = plan_text("alibi", backward=True)
    loop = text.split("pass 1")[1]
    assert "(dp * r1 + g1) * exp(s - m1)" in loop        # dp * r * e + g * e -> (dp * r + g) * e
    assert "r1 = 1.0 /? l1" in text.split("pass 1")[0]


def test_the_forward_divides_once_per_row():
    text = plan_text("softcap", backward=False)
    assert "r_l_i = 1.0 /? l_i" in text and "out = acc * r_l_i" in text


def test_multiplications_by_one_are_gone():
    assert "* 1.0)" not in plan_text("softcap", backward=True)


def test_the_mask_is_applied_once():
    src = compiled("alibi").source("torch", backward=True)
    assert "masked(ds" not in src and "masked(p," not in src     # ds and p carry the mask already


# -- the process around a call --
def denormals_flushed() -> bool:
    return torch.tensor([1e-39]).mul(1.0).item() == 0.0


def test_a_call_leaves_denormals_and_the_allocator_alone(monkeypatch):
    monkeypatch.delenv(torch_backend.HEAP_TILES, raising=False)
    torch_backend.keep_tiles_in_the_heap.cache_clear()
    before = denormals_flushed()
    attn = compiled("alibi")
    q, k, v = (t.requires_grad_() for t in qkv(1, 2, 2, 40, 40, 8))
    attn(q, k, v, **random_params(attn, 1, 2, 2, 40, 40, 8, generator(0))).sum().backward()
    assert denormals_flushed() == before
    seen = []
    thread = threading.Thread(target=lambda: seen.append(denormals_flushed()))
    thread.start()
    thread.join()
    assert seen == [before]
    assert torch_backend.keep_tiles_in_the_heap() is False          # opt-in: ATTNC_HEAP_TILES=1
    torch_backend.keep_tiles_in_the_heap.cache_clear()
