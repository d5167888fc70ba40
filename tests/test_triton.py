"""The Triton backend: every example through the generated kernel under TRITON_INTERPRET=1 on CPU tensors,
against the float64 oracle; kernels compiled for sm_90 without a GPU; realistic shapes where CUDA is."""
from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:        # before triton is imported: it builds tl's standard library in the mode it finds then
    os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton")

import attnc  # noqa: E402
from attnc.backends import triton_launch  # noqa: E402

try:
    from helpers import EXAMPLE_IDS, check_against_oracle, example, qkv, random_params
except ImportError:                                     # tests/ imported as a package
    from tests.helpers import EXAMPLE_IDS, check_against_oracle, example, qkv, random_params

if not CUDA and not isinstance(triton.language.standard.sigmoid, triton.runtime.interpreter.InterpretedFunction):
    pytest.skip("triton was imported before TRITON_INTERPRET=1 was set: run this file on its own",
                allow_module_level=True)

DEVICE = "cuda" if CUDA else "cpu"      # interpreted on CPU tensors, compiled where a GPU is
# (B, H, HKV, Q, KV, D, Dv): ragged with Q != KV and GQA; B > 1 with equal lengths
SHAPES = {"ragged_gqa": (1, 2, 1, 37, 53, 16, 16), "batched": (2, 2, 2, 16, 16, 32, 32)}
FP32_FLOOR = 1e-4
cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


_compiled: dict = {}


def compiled(name: str, **consts) -> attnc.Compiled:
    key = (name, tuple(sorted(consts.items())))
    if key not in _compiled:
        _compiled[key] = attnc.compile(example(name), backend="triton", **consts)
    return _compiled[key]


def inputs(attn, shape, dtype=torch.float32, seed=0):
    """q, k, v and params on DEVICE."""
    B, H, HKV, Q, KV, D, Dv = shape
    q, k, v = (t.to(DEVICE) for t in qkv(B, H, HKV, Q, KV, D, Dv, dtype, seed=seed))
    return q, k, v, {n: t.to(DEVICE) for n, t in random_params(attn, B, H, HKV, Q, KV, D, seed=seed + 1).items()}


def config(attn, q, v, params, sizes):
    """The launch configuration of the forward kernel for one call."""
    return triton_launch.launch_config(attn, attn.plan(True, "triton"), q.dtype, q.device, params,
                                       dict(sizes, Dv=v.shape[-1]))


def sizes_of(shape, attn=None, params=None) -> dict:
    """The sizes a call binds: the shape's, and free dims from the params' shapes."""
    B, H, HKV, Q, KV, D, _ = shape
    out = {"B": B, "H": H, "HKV": HKV, "Q": Q, "KV": KV, "D": D}
    for name, (_, dims) in (attn.param_specs.items() if attn is not None else ()):
        for d, n in zip(dims, params[name].shape):
            if isinstance(d, str) and d not in out:
                out[d] = n
    return out


def run_check(attn, shape, dtype=torch.float32, seed=0, lse=True, floor=None):
    q, k, v, params = inputs(attn, shape, dtype, seed)
    floor = FP32_FLOOR if floor is None and dtype == torch.float32 else floor
    return check_against_oracle(attn, q, k, v, params, lse=lse, floor=floor)


# -- every example --
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
@pytest.mark.parametrize("name", EXAMPLE_IDS)
def test_example_matches_the_oracle(name, shape):
    run_check(compiled(name), SHAPES[shape])


@pytest.mark.parametrize("name,consts,shape,empty,full", [
    ("sliding_window", {"window": 40}, (1, 2, 1, 130, 130, 24, 40), True, True),    # the 2-row tile is full
    ("dilated_sliding_window", {"window": 20, "dilation": 3}, (1, 1, 1, 100, 120, 16, 16), True, False),
    ("prefix_lm", {"prefix": 20}, (1, 1, 1, 100, 90, 80, 80), True, True),    # D = 80, padded to 128
    ("document", {}, (2, 2, 1, 100, 100, 16, 16), True, False),               # tiles from the doc ids
])
def test_block_sparsity_skips_empty_tiles_and_the_mask_on_full_ones(name, consts, shape, empty, full):
    attn = compiled(name, **consts)
    q, k, v, params = inputs(attn, shape, seed=5)
    cfg = config(attn, q, v, params, sizes_of(shape, attn, params))
    if triton_launch.interpreting():       # block sizes fixed at 32 x 32: the tile counts are known
        n_tiles = -(-shape[3] // cfg.block_m) * -(-shape[4] // cfg.block_n)
        assert (int(cfg.blocks[0].sum() + cfg.blocks[2].sum()) < n_tiles) == empty
        assert (int(cfg.blocks[2].sum()) > 0) == full
    check_against_oracle(attn, q, k, v, params, floor=FP32_FLOOR)


# lengths that are multiples of the tiles compile without any bounds check (CHECK_M, CHECK_N off), head dims
# that are powers of two without the head-dim masks (PAD_D, PAD_DV off); a padded head dim keeps its masks
@pytest.mark.parametrize("shape", [(2, 2, 1, 64, 96, 16, 16), (1, 2, 2, 64, 64, 24, 40), (1, 2, 1, 64, 45, 16, 16)],
                         ids=["even", "even_padded_head_dims", "even_queries_ragged_keys"])
@pytest.mark.parametrize("name", ["full", "causal", "t5_bias", "document"])
def test_unchecked_tiles_match_the_oracle(name, shape):
    run_check(compiled(name), shape, seed=4)


def test_wide_offsets_compute_the_same(monkeypatch):
    # WIDE (a row offset past int32, which needs 2^31 elements in one batch and head) is forced on: the offsets
    # in int64 give the same attention as the int32 ones
    real = triton_launch.load_module
    forced = lambda source, name: real(source.replace("    WIDE = max(", "    WIDE = True or max("), name)  # noqa: E731
    monkeypatch.setattr(triton_launch, "load_module", forced)
    attn = attnc.compile(example("alibi"), backend="triton")        # its kernels loaded through `forced`
    source = attn.source("triton")
    assert "    WIDE = max(" in source and "times(start_n, stride_kn, WIDE)" in source
    run_check(attn, SHAPES["ragged_gqa"], seed=23)


def test_strided_inputs_and_params():
    attn = compiled("t5_bias")
    q, k, v, params = inputs(attn, SHAPES["ragged_gqa"], seed=3)
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))      # [B, N, H, D] memory
    params = {"rel_bias": params["rel_bias"].t().contiguous().t()}                       # column-major
    assert params["rel_bias"].stride(1) != 1
    check_against_oracle(attn, q, k, v, params, floor=FP32_FLOOR)


# -- decoding: split-KV --
@pytest.mark.parametrize("name", ["full", "cog", "relu2"])
def test_decode_splits_the_keys_and_merges_through_the_states(name):
    # full: a max and its sums; cog: two maxima; relu2: an unrescaled sum beside a rescaled one
    attn = compiled(name)
    shape = (1, 2, 1, 1, 1100, 16, 16)
    q, k, v, params = inputs(attn, shape, seed=7)
    assert config(attn, q, v, params, sizes_of(shape)).n_splits > 1
    check_against_oracle(attn, q, k, v, params, floor=FP32_FLOOR)
    check_against_oracle(attn, q, k, v, params, lse=False, floor=FP32_FLOOR)


def test_two_pass_plans_run_unsplit():
    attn = compiled("hinge")
    shape = (1, 2, 1, 1, 1100, 16, 16)
    q, k, v, params = inputs(attn, shape, seed=8)
    assert config(attn, q, v, params, sizes_of(shape)).n_splits == 1
    check_against_oracle(attn, q, k, v, params, floor=FP32_FLOOR)


# -- dtypes, rows with nothing kept, index arithmetic, callbacks --
def test_bf16():
    run_check(compiled("alibi"), SHAPES["ragged_gqa"], torch.bfloat16, floor=2e-2)


def test_fp16():
    run_check(compiled("softcap"), SHAPES["batched"], torch.float16, floor=2e-3)


def test_rows_with_nothing_kept_give_zero_and_minus_inf():
    attn = attnc.compile("variant late\nmask = kv_idx >= q_idx + 20\n", backend="triton")
    q, k, v, _ = inputs(attn, (1, 2, 1, 53, 53, 16, 16), seed=9)
    out, lse = attn(q, k, v, return_lse=True)
    assert not torch.isnan(out).any()
    assert torch.equal(out[:, :, 33:], torch.zeros_like(out[:, :, 33:]))
    assert torch.isneginf(lse[:, :, 33:]).all() and torch.isfinite(lse[:, :, :33]).all()
    check_against_oracle(attn, q, k, v, {}, floor=FP32_FLOOR)


def test_mod_and_floordiv_of_negative_operands_round_like_python():
    attn = attnc.compile("variant negmod\nlet d = q_idx - kv_idx\n"
                         "score = score + 0.5 * (d % 3) + 0.1 * (d // 4) + 0.2 * (d % -5)\n", backend="triton")
    run_check(attn, SHAPES["ragged_gqa"], seed=10)


def test_callbacks_with_a_closed_over_tensor():
    slopes = (torch.rand(2) * 0.5 + 0.1).to(DEVICE)

    def alibi(score, b, h, q_idx, kv_idx):
        return score - slopes[h] * (q_idx - kv_idx)

    attn = attnc.compile(score_mod=alibi, mask_mod=lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, backend="triton")
    q, k, v, _ = inputs(attn, SHAPES["ragged_gqa"], seed=11)
    check_against_oracle(attn, q, k, v, {}, floor=FP32_FLOOR)


def test_cpu_tensors_without_the_interpreter_are_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v = qkv(1, 1, 1, 8, 8, 16)
    with pytest.raises(attnc.CallError, match="TRITON_INTERPRET"):
        compiled("full")(q, k, v)


# -- the generated source --
def test_source_reads_like_the_fused_attention_tutorial():
    src = compiled("causal").source("triton")
    for text in ("start_m = tl.program_id(0)", "off_hz = tl.program_id(1)", "offs_m = ", "offs_n = ",
                 "# -- compute qk --", "# -- update m_i and l_i --", "# epilogue", "tl.dot(",
                 "qk_scale = sm_scale * LOG2E", "p = tl.exp2(qk * late_scale - m_i_ref)",
                 "off_b.to(tl.int64) * stride_qz",
                 'triton.autotune(configs=CONFIGS, key=["N_Q", "N_KV", "HEAD_DIM"])'):
        assert text in src, text
    assert "tl.exp(" not in src


def test_scores_not_folded_to_base_2_use_exp2_times_log2e():
    # a per-pair bias added to qk: log2(e) would cost the multiply it saves
    src = compiled("t5_bias").source("triton")
    assert "qk_scale = sm_scale\n" in src
    assert "tl.exp2((s - m_i_ref) * LOG2E)" in src


@pytest.mark.parametrize("name, texts", [
    ("alibi", ["h_slopes_h = tl.load(p_slopes + off_h * stride_slopes_0)",      # hoisted out of the key loop
               "s = qk * late_scale - 1.4426950408889634 * h_slopes_h * tl.cast(", "p = tl.exp2(s - m_i_ref)"]),
    ("softcap", ["s = tanh(qk * (0.023104906018664842 * late_scale))",       # its factor 30 log2(e) at each read
                 "p = tl.exp2(s * 43.2808512266689 - m_i_ref)"]),
    ("sigmoid", ["s = qk * late_scale - 1.4426950408889634 * tl.log(", "p = sigmoid2(s)"]),
    ("sinks", ["divz_rows(acc, l_i + tl.exp2(1.4426950408889634 * h_sinks_h - m_i))"]),
])
def test_affine_and_scaled_scores_fold_log2e_into_their_factors(name, texts):
    src = compiled(name).source("triton")
    assert "qk_scale = sm_scale * LOG2E" in src
    for text in texts:
        assert text in src, text


def test_param_loads_are_masked_to_the_rows_and_columns_that_exist():
    # checked where a tile may run past N_Q or N_KV (CHECK_M, CHECK_N: constexprs the launcher sets per call)
    src = compiled("t5_bias").source("triton")
    assert "load_checked(p_rel_bias + off_h * stride_rel_bias_0 + (" in src
    assert " * stride_rel_bias_1, offs_m[:, None] < N_Q, offs_n[None, :] < N_KV, CHECK_M, CHECK_N, 0)" in src


# -- deterministic param gradients: each program adds into its own copy, summed in a fixed order --
ROWS_AND_COLUMNS = ("variant rows_and_columns\nparam bq: f32[Q]\nparam bk: f32[KV]\n"
                    "score = score + 0.5 * bq[q_idx] + bk[kv_idx // 2]\n")     # one entry per row; two keys per entry


def param_grads(attn, q, k, v, params, deterministic: bool) -> dict:
    """The float params' gradients of a fixed random linear loss of out and lse."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        pp = {n: t.detach().clone().requires_grad_() if t.is_floating_point() else t for n, t in params.items()}
        out, lse = attn(q, k, v, return_lse=True, **pp)
        g = torch.Generator().manual_seed(3)
        loss = (out * torch.randn(out.shape, generator=g).to(out.device)).sum()
        loss = loss + (torch.where(torch.isinf(lse), 0, lse) * torch.randn(lse.shape, generator=g).to(lse.device)).sum()
        loss.backward()
    finally:
        torch.use_deterministic_algorithms(before)
    return {n: t.grad for n, t in pp.items() if t.is_floating_point()}


@pytest.mark.parametrize("name", ["alibi", "temperature", "sinks", "t5_bias", "rows_and_columns"])
def test_deterministic_param_gradients_repeat_exactly_and_equal_the_atomics(name, monkeypatch):
    # one entry per tile (slopes, tau), per row after the passes (sinks), per pair with collisions (T5's clamped
    # table), per row and per two columns (rows_and_columns): each tile's entries are summed in sorted order
    attn = attnc.compile(ROWS_AND_COLUMNS, backend="triton") if name == "rows_and_columns" else compiled(name)
    q, k, v, params = inputs(attn, SHAPES["ragged_gqa"], seed=21)
    taken = []
    real = triton_launch.deterministic_workspace
    monkeypatch.setattr(triton_launch, "deterministic_workspace", lambda *a: taken.append(real(*a)) or taken[-1])
    atomic = param_grads(attn, q, k, v, params, False)
    assert not taken
    first, second = (param_grads(attn, q, k, v, params, True) for _ in range(2))
    assert any(taken)                      # the kernel with the gradients took the workspace
    for n, g in atomic.items():
        assert torch.equal(first[n], second[n]), n
        scale = g.abs().max().item()
        assert (first[n] - g).abs().max().item() <= 1e-5 * max(scale, 1.0), (n, (first[n] - g).abs().max().item())


def test_a_deterministic_workspace_too_big_is_refused(monkeypatch):
    attn = compiled("t5_bias")
    q, k, v, params = inputs(attn, SHAPES["ragged_gqa"], seed=22)
    monkeypatch.setattr(triton_launch, "DETERMINISTIC_WORKSPACE_BYTES", 1024)
    with pytest.raises(attnc.CallError, match="deterministic gradients of rel_bias need"):
        param_grads(attn, q, k, v, params, True)
    assert param_grads(attn, q, k, v, params, False)["rel_bias"] is not None


# -- compiled for a GPU without one: what the interpreter forgives --
SM90_CASES = [                    # (direction, dtype, splits, options, examples)
    ("fwd", "fp16", 2, [], ["alibi", "cog", "sigmoid"]),     # a hoisted param read, two maxima, no lse; merge kernels
    ("fwd", "bf16", 1, [], ["t5_bias", "hinge", "natten"]),  # a 2-D param read, two passes, py_mod / py_floordiv
    ("bwd", "fp16", 1, [], ["causal", "alibi", "sinks", "hinge", "t5_bias"]),   # param gradients, a row preprocess
    ("bwd", "fp16", 1, ["--deterministic"], ["alibi", "sinks", "t5_bias"]),     # sorted scatters of param gradients
]


@pytest.mark.parametrize("direction, dtype, splits, options, names", SM90_CASES,
                         ids=["-".join([c[0], c[1]] + [o.strip("-") for o in c[3]]) for c in SM90_CASES])
def test_kernels_compile_for_sm90(direction, dtype, splits, options, names):
    """Every kernel a launch runs (the merge of split-KV, the backward's three) builds sm_90 machine code, with
    the arguments a launch specializes: benchmarks/sass.py in a fresh interpreter without TRITON_INTERPRET."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parent.parent), env.get("PYTHONPATH", "")])
    root = Path(__file__).resolve().parent.parent
    run = subprocess.run([sys.executable, str(root / "benchmarks" / "sass.py"), "--json", "--direction", direction,
                          "--dtype", dtype, "--splits", str(splits), "--seq", "1024", "--jobs", "1"] + options
                         + [str(root / "examples" / f"{n}.attn") for n in names],
                         env=env, capture_output=True, text=True, timeout=900)
    if "ptxas" in run.stderr and "not found" in run.stderr.lower():
        pytest.skip("triton's CUDA toolchain (ptxas) is missing")
    rows = [r for r in json.loads(run.stdout)["rows"] if r["name"] in names]
    assert not [r for r in rows if "error" in r], [r["error"] for r in rows if "error" in r]
    per = {n: [r["kernel"] for r in rows if r["name"] == n] for n in names}
    for n, kernels in per.items():
        want = 2 if direction == "fwd" and splits > 1 else 1 if direction == "fwd" else 3
        assert len(kernels) >= want - (direction == "bwd"), (n, kernels)        # a preprocess may be unneeded
    assert all(r["spills"] == 0 for r in rows), rows


# -- on a GPU, realistic shapes --
GPU_SHAPES = {"prefill": (2, 8, 2, 1024, 1024, 128, 128), "ragged": (1, 4, 4, 1000, 1500, 96, 64),
              "decode": (4, 32, 8, 1, 8192, 128, 128)}


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("shape", list(GPU_SHAPES))
@pytest.mark.parametrize("name", ["full", "causal", "alibi", "document", "sliding_window", "sinks", "sigmoid",
                                  "hinge", "t5_bias", "softcap"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_gpu_matches_the_oracle(name, shape, dtype):
    if name == "document" and GPU_SHAPES[shape][3] != GPU_SHAPES[shape][4]:
        pytest.skip("document masking is self-attention")
    run_check(compiled(name), GPU_SHAPES[shape], dtype, seed=12, floor=2e-2 if dtype == torch.bfloat16 else 2e-3)


@pytest.mark.gpu
@cuda
def test_gpu_fp32_is_ieee_accurate():
    run_check(compiled("alibi"), (1, 4, 2, 300, 557, 80, 80), torch.float32, seed=14)
