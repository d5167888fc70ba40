"""Gradients: every example's dQ, dK, dV and float-param gradients against torch's autograd of the float64
materialized reference, on both backends (Triton under TRITON_INTERPRET=1), at ragged shapes with GQA,
Q != KV and B > 1; torch.autograd.gradcheck in float64; empty rows, huge logits, and what cannot be done."""
from __future__ import annotations

import math

import pytest
import torch

import attnc

try:
    from helpers import EXAMPLE_IDS, check_against_oracle, example, generator
except ImportError:
    from tests.helpers import EXAMPLE_IDS, check_against_oracle, example, generator

from attnc.runtime.inputs import random_inputs, random_params

# (B, H, HKV, Q, KV, D, Dv): ragged with GQA and Q < KV; Q > KV with MQA; B > 1 square past a tile edge
SHAPES = {"ragged_gqa": (2, 4, 2, 37, 53, 16, 12), "q_gt_kv_mqa": (1, 3, 1, 45, 29, 8, 8),
          "square": (2, 2, 2, 70, 70, 16, 16)}
TRITON_SHAPES = {"ragged_gqa": (2, 4, 2, 37, 53, 16, 12)}


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    from attnc.backends.triton_launch import interpreting
    return interpreting() or torch.cuda.is_available()


def grads(fn, q, k, v, params: dict, dtype, lse: bool, seed: int = 5):
    """Gradients of q, k, v and every float param of a random linear loss of out (and lse)."""
    qq, kk, vv = (t.to(dtype).detach().requires_grad_() for t in (q, k, v))
    pp = {n: t.to(dtype).detach().requires_grad_() if t.is_floating_point() else t for n, t in params.items()}
    res = fn(qq, kk, vv, return_lse=lse, **pp)
    out, l = res if lse else (res, None)
    g = torch.Generator().manual_seed(seed)
    loss = (out * torch.randn(out.shape, generator=g).to(dtype)).sum()
    if lse:
        loss = loss + (torch.where(torch.isinf(l), 0, l) * torch.randn(l.shape, generator=g).to(dtype)).sum()
    loss.backward()
    return {"q": qq.grad, "k": kk.grad, "v": vv.grad} | {n: pp[n].grad for n in params if params[n].is_floating_point()}


def check_grads(attn, shape, lse: bool, seed: int = 0):
    B, H, HKV, Q, KV, D, Dv = shape
    gen = generator(seed)
    q, k, v = random_inputs(attn, B, H, HKV, Q, KV, D, Dv, torch.float32, gen)
    params = random_params(attn, B, H, HKV, Q, KV, D, gen)
    # float params (slopes, temperatures, sinks) in [0.5, 1.5): a temperature of 0.1 makes logits ten times
    # larger, where the backward's rowsum(dO * O) (FlashAttention's form) rounds worse in fp32 than eager
    # autograd; the float64 gradcheck below covers that regime exactly
    params = {n: (t * 0 + torch.rand(t.shape, generator=gen) + 0.5).to(t.dtype) if t.is_floating_point() else t
              for n, t in params.items()}
    ref = grads(attn.reference, q, k, v, params, torch.float64, lse)
    eager = grads(attn.reference, q, k, v, params, torch.float32, lse)
    got = grads(attn, q, k, v, params, torch.float32, lse)
    for name, r in ref.items():
        assert got[name] is not None, f"no gradient for {name}"
        if r is None:                  # the reference never reads it (a score without q.k): autograd's 0
            r, eager[name] = (torch.zeros_like(got[name], dtype=torch.float64),) * 2
        assert got[name].dtype == (torch.float32 if name in "qkv" else params[name].dtype)
        err = (got[name].double() - r).abs().max().item()
        eager_err = (eager[name].double() - r).abs().max().item()
        # flex attention's rule, on the gradient's scale: at most a few times the eager fp32 error
        bound = max(4 * eager_err, 2e-5 * max(1.0, r.abs().max().item()))
        assert err <= bound, f"{name}: error {err:.3g}, eager fp32 error {eager_err:.3g}"


@pytest.mark.parametrize("lse", [False, True], ids=["out", "out+lse"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("name", EXAMPLE_IDS)
def test_torch_gradients_match_the_float64_reference(name, shape, lse):
    check_grads(attnc.compile(example(name), backend="torch"), SHAPES[shape], lse, seed=len(name))


@pytest.mark.skipif(not triton_available(), reason="needs triton with TRITON_INTERPRET=1 or a GPU")
@pytest.mark.parametrize("lse", [False, True], ids=["out", "out+lse"])
@pytest.mark.parametrize("name", EXAMPLE_IDS)
def test_triton_gradients_match_the_float64_reference(name, lse):
    check_grads(attnc.compile(example(name), backend="triton"), TRITON_SHAPES["ragged_gqa"], lse, seed=len(name))


@pytest.mark.parametrize("name", EXAMPLE_IDS)
def test_gradcheck_in_float64(name):
    attn = attnc.compile(example(name), backend="torch")
    B, H, HKV, Q, KV, D, Dv = 1, 2, 1, 6, 9, 4, 3
    gen = generator(11)
    q, k, v = (t.double().requires_grad_() for t in random_inputs(attn, B, H, HKV, Q, KV, D, Dv, torch.float32, gen))
    params = random_params(attn, B, H, HKV, Q, KV, D, gen)
    floats = [n for n, t in params.items() if t.is_floating_point()]
    fixed = {n: t for n, t in params.items() if n not in floats}
    values = [params[n].double().requires_grad_() for n in floats]

    def f(q, k, v, *vals):
        return attn(q, k, v, **fixed, **dict(zip(floats, vals)))
    assert torch.autograd.gradcheck(f, (q, k, v, *values), eps=1e-6, atol=1e-5, rtol=1e-4)


# a score that reads the same value along two paths (equal nodes that need not be one object): the chain
# rule must add each path once; a param read twice; erf (exact gelu), whose derivative is 2 e^(-x^2) / sqrt(pi)
REPEATED = {"score_twice": "variant r\nscore = score + 0.5 * tanh(score)\n",
            "gelu": "variant r\nscore = 0.5 * score * (1 + erf(score * 0.7071067811865476))\n",
            "param_twice": "variant r\nparam t: f32[H]\nscore = score * t[h] + tanh(score * t[h])\n",
            "index_twice": "variant r\nscore = score - 0.1 * abs(q_idx - kv_idx) + sigmoid(score - 0.1 * abs(q_idx - kv_idx))\n",
            # a param read per pair (the score) and per row (the sink): two kernels' parts of one gradient
            "sink_and_score": "variant r\nparam t: f32[H]\nmask = q_idx + KV - Q >= kv_idx\n"
                              "score = score + t[h]\nnorm = softmax(sink = t[h])\n",
            # scores that read no q.k (dQ = dK = 0), are one value per row, or a constant
            "no_logit": "variant r\nparam t: f32[H]\nmask = q_idx + KV - Q >= kv_idx\nscore = t[h] * 0.1 * kv_idx\n",
            "per_row": "variant r\nparam t: f32[H]\nmask = q_idx + KV - Q >= kv_idx\nscore = t[h] - 0.1 * q_idx\n"
                       "norm = sigmoid\n",
            "per_row_temp": "variant r\nparam t: f32[H]\nmask = q_idx + KV - Q >= kv_idx\n"
                            "score = (tanh(score) + 0.1 * q_idx) * ((0.3 + t[h]) - 0.1 * q_idx * score)\n",
            "floor": "variant r\nparam t: f32[H]\nscore = floor(score * 2) + t[h] * 0.1 * kv_idx\n",    # d/dq.k = 0
            "constant": "variant r\nparam t: f32[H]\nmask = q_idx + KV - Q >= kv_idx\nscore = erf(relu(score - score))\n"
                        "norm = softmax(sink = t[h])\n"}


@pytest.mark.parametrize("name", list(REPEATED))
def test_gradcheck_where_a_value_is_read_twice(name):
    attn = attnc.compile(REPEATED[name], backend="torch")
    gen = generator(13)
    q, k, v = (torch.randn(1, 2, 6, 4, generator=gen, dtype=torch.float64).requires_grad_() for _ in range(3))
    t = (torch.rand(2, generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
    params = (t,) if attn.param_specs else ()

    def f(q, k, v, *vals):
        return attn(q, k, v, **dict(zip(attn.param_specs, vals)))
    assert torch.autograd.gradcheck(f, (q, k, v, *params), eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not triton_available(), reason="needs triton with TRITON_INTERPRET=1 or a GPU"))])
@pytest.mark.parametrize("name", list(REPEATED))
def test_gradients_where_a_value_is_read_twice_match_the_reference(name, backend):
    attn = attnc.compile(REPEATED[name], backend=backend)
    check_grads(attn, TRITON_SHAPES["ragged_gqa"], lse=False, seed=7)
    B, H, HKV, Q, KV, D, Dv = TRITON_SHAPES["ragged_gqa"]
    gen = generator(8)
    q, k, v = random_inputs(attn, B, H, HKV, Q, KV, D, Dv, torch.float32, gen)
    check_against_oracle(attn, q, k, v, random_params(attn, B, H, HKV, Q, KV, D, gen))


NORMS = {"softmax": "softmax", "sinks": "softmax(sink = sinks[h])", "sigmoid": "sigmoid",
         "relu2": "rownorm(relu(score) ** 2)",
         "hinge": "relu(score - rowmax(score) + 4) / rowsum(relu(score - rowmax(score) + 4))"}


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not triton_available(), reason="needs triton with TRITON_INTERPRET=1 or a GPU"))])
@pytest.mark.parametrize("norm", list(NORMS))
def test_rows_with_nothing_kept_get_zero_gradients(norm, backend):
    # query rows 0..11 keep no key: their outputs are 0 and nothing flows back from them
    spec = (f"variant empty_rows\nparam sinks: f32[H]\nmask = q_idx >= 12 and kv_idx <= q_idx\n"
            f"norm = {NORMS[norm]}\n")
    attn = attnc.compile(spec, backend=backend)
    q, k, v = (torch.randn(1, 2, 30, 8, generator=generator(i)).requires_grad_() for i in range(3))
    sinks = torch.rand(2, generator=generator(4)).requires_grad_()
    out = attn(q, k, v, sinks=sinks) if "sinks" in attn.variant.params else attn(q, k, v)
    assert torch.equal(out[:, :, :12], torch.zeros_like(out[:, :, :12]))
    (out * torch.randn(out.shape, generator=generator(5))).sum().backward()
    for t in (q, k, v, sinks):
        assert t.grad is None or torch.isfinite(t.grad).all()
    assert torch.equal(q.grad[:, :, :12], torch.zeros_like(q.grad[:, :, :12]))


def test_a_fully_masked_row_gives_zero_gradients_not_nan():
    attn = attnc.compile("variant m\nmask = kv_idx > q_idx + 100\n")         # nothing kept anywhere
    q, k, v = (torch.randn(1, 2, 10, 8, generator=generator(i)).requires_grad_() for i in range(3))
    out, lse = attn(q, k, v, return_lse=True)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
    out.sum().backward()
    for t in (q, k, v):
        assert torch.equal(t.grad, torch.zeros_like(t.grad))


def test_huge_logits_keep_finite_gradients():
    attn = attnc.compile(example("causal"))
    q, k, v = (torch.randn(1, 2, 40, 8, generator=generator(i)) for i in range(3))
    q = (q * 1e3).requires_grad_()                  # logits of order 1e4
    k, v = k.requires_grad_(), v.requires_grad_()
    out = attn(q, k, v)
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    ref = grads(attn.reference, q.detach(), k.detach(), v.detach(), {}, torch.float64, False)
    got = grads(attn, q.detach(), k.detach(), v.detach(), {}, torch.float32, False)
    assert (got["v"].double() - ref["v"]).abs().max().item() < 1e-4


def test_double_backward_raises_a_clear_error():
    attn = attnc.compile(example("causal"))
    q, k, v = (torch.randn(1, 2, 8, 4, generator=generator(i), dtype=torch.float64).requires_grad_()
               for i in range(3))
    with pytest.raises(attnc.CallError, match="double backward"):
        torch.autograd.grad(attn(q, k, v).sum(), q, create_graph=True)
    (gq,) = torch.autograd.grad(attn(q, k, v).sum(), q)           # once is fine
    assert gq.shape == q.shape


def test_an_integer_param_that_requires_grad_is_refused():
    attn = attnc.compile(example("document"))
    q, k, v = (torch.randn(1, 2, 8, 4, generator=generator(i)).requires_grad_() for i in range(3))
    doc = torch.zeros(8).requires_grad_()           # a float tensor where ids are expected
    with pytest.raises(attnc.CallError):
        attn(q, k, v, doc=doc)


def test_float_params_get_gradients_only_when_asked():
    attn = attnc.compile(example("alibi"))
    q, k, v = (torch.randn(1, 4, 16, 8, generator=generator(i)).requires_grad_() for i in range(3))
    slopes = torch.rand(4, generator=generator(9))
    attn(q, k, v, slopes=slopes).sum().backward()
    assert slopes.grad is None and q.grad is not None
    slopes.requires_grad_()
    q.grad = None
    attn(q, k, v, slopes=slopes).sum().backward()
    assert slopes.grad is not None and slopes.grad.shape == slopes.shape


def test_inference_mode_and_no_grad_record_nothing():
    attn = attnc.compile(example("causal"))
    q, k, v = (torch.randn(1, 2, 8, 4, generator=generator(i)).requires_grad_() for i in range(3))
    with torch.no_grad():
        assert attn(q, k, v).grad_fn is None
    assert attn(q, k, v).grad_fn is not None


def test_the_backward_compiles_with_the_forward_so_errors_come_at_the_call():
    attn = attnc.compile("variant x\nnorm = exp(score - rowmax(score)) / rowsum(exp(score - rowmax(score)))\n")
    q, k, v = (torch.randn(1, 1, 5, 4, generator=generator(i)).requires_grad_() for i in range(3))
    out = attn(q, k, v)
    assert out.grad_fn is not None and math.isfinite(out.sum().item())


# normalizers no example uses, under a mask, with the lse returned: the weights are the score itself
# (linear), so on a full tile the masked weights and the score are one tensor, which the lse's term of
# the backward may not overwrite
PLAIN_NORMS = {n: f"variant p\nmask = q_idx + KV - Q >= kv_idx\nscore = score - 0.1 * kv_idx\nnorm = {n}\n"
               for n in ("linear", "relu", "map(tanh(score))")}


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not triton_available(), reason="needs triton with TRITON_INTERPRET=1 or a GPU"))])
@pytest.mark.parametrize("name", list(PLAIN_NORMS))
def test_plain_normalizers_under_a_mask_with_the_lse(name, backend):
    check_grads(attnc.compile(PLAIN_NORMS[name], backend=backend), SHAPES["square"], lse=True, seed=9)
