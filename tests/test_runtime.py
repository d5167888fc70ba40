"""The compiled object: the on-disk cache, dtypes, scale, shapes, IR text, const overrides, and calls at the edges."""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import pytest
import torch

import attnc
from attnc.runtime import cache

try:
    from helpers import ROOT, check_against_oracle, example, qkv, random_params
except ImportError:
    from tests.helpers import ROOT, check_against_oracle, example, qkv, random_params


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(d))
    return d


def kernel_files(d):
    return sorted(p for p in d.iterdir() if p.suffix == ".py") if d.exists() else []


# -- the cache --

def test_first_compile_writes_one_file_named_by_a_content_hash(cache_dir):
    attn = attnc.compile(example("causal"))
    src = attn.source()
    files = kernel_files(cache_dir)
    assert len(files) == 1
    assert re.fullmatch(r"attnc_causal_fwd-[0-9a-f]{16,}\.py", files[0].name), files[0].name
    assert files[0].read_text() == src
    assert not [p for p in cache_dir.iterdir() if p.suffix != ".py"], "no temporary file is left behind"


def test_second_compile_reads_the_same_file(cache_dir, monkeypatch):
    src = attnc.compile(example("causal")).source()
    (path,) = kernel_files(cache_dir)
    before = path.stat().st_mtime_ns
    from attnc.backends import torch_backend

    def no_render(plan):
        raise AssertionError("rendered again instead of reading the cache")
    monkeypatch.setattr(torch_backend, "render", no_render)
    again = attnc.compile(example("causal"))
    assert again.source() == src
    q, k, v = qkv(1, 2, 2, 20, 20, 8)
    again(q, k, v)
    assert kernel_files(cache_dir) == [path] and path.stat().st_mtime_ns == before


def test_a_cached_file_edited_on_disk_is_rebuilt_not_run(cache_dir):
    src = attnc.compile(example("causal")).source()
    (path,) = kernel_files(cache_dir)
    # the cache checks each entry against its checksum: an edited kernel is never executed
    path.write_text(path.read_text().replace("def attnc_causal_fwd", "MARK = 1\ndef attnc_causal_fwd"))
    attn = attnc.compile(example("causal"))
    assert attn.source() == src and "MARK" not in attn.source()
    q, k, v = qkv(1, 2, 2, 20, 20, 8)
    check_against_oracle(attn, q, k, v, {})


def test_different_variants_and_consts_get_different_files(cache_dir):
    attnc.compile(example("sliding_window")).source()
    attnc.compile(example("sliding_window"), window=512).source()
    attnc.compile(example("sliding_window"), window=256).source()       # the default again: no new file
    attnc.compile(example("causal")).source()
    attnc.compile(example("causal")).source(return_lse=True)
    names = [p.name for p in kernel_files(cache_dir)]
    assert len(names) == 4 and len({n.split("-")[-1] for n in names}) == 4


def test_cache_writes_are_atomic(cache_dir, monkeypatch):
    seen = []
    real = os.replace

    def spy(src, dst):
        src, dst = str(src), str(dst)
        assert os.path.dirname(src) == os.path.dirname(dst), "the temporary file lies beside the target"
        assert not os.path.exists(dst), "the target is never written in place"
        with open(src) as f:
            seen.append((dst, f.read()))                # complete before it becomes visible
        real(src, dst)
    monkeypatch.setattr(cache.os, "replace", spy)
    src = attnc.compile(example("alibi")).source()
    assert len(seen) == 1 and seen[0][1] == src


def test_unwritable_cache_still_compiles(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(blocker / "cache"))
    attn = attnc.compile(example("causal"))
    q, k, v = qkv(1, 2, 2, 20, 20, 8)
    check_against_oracle(attn, q, k, v, {})


def test_concurrent_processes_share_the_cache(cache_dir):
    code = ("import attnc, torch\n"
            "a = attnc.compile('examples/streaming_llm.attn')\n"
            "q = torch.randn(1, 2, 40, 8)\n"
            "print(float(a(q, q, q).sum()))\n")
    env = {**os.environ, "ATTNC_CACHE_DIR": str(cache_dir),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err
    assert len(kernel_files(cache_dir)) == 1
    assert not [p for p in cache_dir.iterdir() if p.suffix != ".py"]


# -- dtypes, scale, shapes --

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
                         ids=["fp32", "bf16", "fp16", "fp64"])
def test_dtypes_run_and_keep_the_dtype(dtype):
    attn = attnc.compile(example("alibi"))
    q, k, v = qkv(2, 4, 2, 50, 70, 16, dtype=dtype)
    params = random_params(attn, 2, 4, 2, 50, 70, 16)
    out, lse = attn(q, k, v, return_lse=True, **params)
    assert out.dtype == dtype and out.shape == (2, 4, 50, 16) and lse.shape == (2, 4, 50)
    check_against_oracle(attn, q, k, v, params)


def test_default_scale_is_one_over_sqrt_d():
    attn = attnc.compile(example("full"))
    q, k, v = qkv(1, 2, 2, 30, 40, 32)
    default = attn(q, k, v)
    assert torch.allclose(default, attn(q, k, v, scale=1 / math.sqrt(32)), atol=1e-6)
    assert torch.allclose(default, torch.nn.functional.scaled_dot_product_attention(q, k, v), atol=1e-5)
    assert not torch.allclose(default, attn(q, k, v, scale=1.0), atol=1e-3)


@pytest.mark.parametrize("scale", [0.05, 1.0, 3.0])
def test_explicit_scale(scale):
    attn = attnc.compile(example("causal"))
    q, k, v = qkv(1, 2, 2, 30, 30, 16)
    out = attn(q, k, v, scale=scale)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    assert torch.allclose(out, sdpa, atol=1e-5)
    check_against_oracle(attn, q, k, v, {}, scale=scale)


def test_value_dim_differs_from_key_dim():
    attn = attnc.compile(example("sliding_window"), window=16)
    q, k, v = qkv(2, 4, 2, 45, 45, 16, Dv=40)
    out = attn(q, k, v)
    assert out.shape == (2, 4, 45, 40)
    check_against_oracle(attn, q, k, v, {})


def test_gqa_matches_repeated_heads():
    attn = attnc.compile(example("causal"))
    q, k, v = qkv(1, 4, 2, 30, 30, 16)
    rep = attn(q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1))
    assert torch.allclose(attn(q, k, v), rep, atol=1e-6)


# -- IR text --

def test_ir_contains_the_pass_count():
    assert "1 pass over the keys" in attnc.compile(example("alibi")).ir()
    text = attnc.compile(example("hinge")).ir()
    assert "2 passes over the keys" in text and "note:" in text


def test_ir_after_a_named_pass():
    attn = attnc.compile(example("causal"))
    assert "3 passes" in attn.ir(after="lower") and "2 passes" in attn.ir(after="defer_division")
    with pytest.raises(attnc.CallError, match="unknown pass"):
        attn.ir(after="nonsense")


def test_source_is_readable_python():
    src = attnc.compile(example("alibi")).source()
    compile(src, "<kernel>", "exec")
    assert "def attnc_alibi" in src and "pass" in src


# -- const overrides --

def test_const_override_changes_the_result():
    default = attnc.compile(example("sliding_window"))
    wide = attnc.compile(example("sliding_window"), window=512)
    assert default.variant.consts["window"] == 256 and wide.variant.consts["window"] == 512
    q, k, v = qkv(1, 2, 2, 700, 700, 8)
    a, b = default(q, k, v), wide(q, k, v)
    assert torch.allclose(a[:, :, :256], b[:, :, :256], atol=1e-6)     # rows that see < 256 keys either way
    assert not torch.allclose(a[:, :, 300:], b[:, :, 300:], atol=1e-3)
    check_against_oracle(wide, q, k, v, {})
    causal = attnc.compile(example("causal"))(q, k, v)
    assert torch.allclose(attnc.compile(example("sliding_window"), window=700)(q, k, v), causal, atol=1e-6)


def test_float_const_override():
    q, k, v = qkv(1, 2, 2, 30, 30, 16)
    capped = attnc.compile(example("softcap"), cap=0.5)
    assert not torch.allclose(capped(q, k, v), attnc.compile(example("softcap"))(q, k, v), atol=1e-4)
    check_against_oracle(capped, q, k, v, {})


def test_repr_and_param_specs():
    attn = attnc.compile(example("t5_bias"))
    assert attn.param_specs == {"rel_bias": ("f32", ("H", "R"))}
    assert "t5_bias" in repr(attn)


@pytest.mark.parametrize("body", ["max(score, 1.7)", "min(score, 0.3)", "clamp(score, -0.3, 0.7)",
                                  "score + where(q_idx >= kv_idx, 0.1, 0.7)",
                                  "score * (1.0 + 0.25 * tanh(where(q_idx >= kv_idx, 0.0, 1.0)))"])
def test_float_literals_keep_float64_precision(body):
    attn = attnc.compile(f"variant m\nscore = {body}\n")
    q, k, v = qkv(1, 2, 2, 16, 16, 8, dtype=torch.float64, seed=5)
    q = q * 2
    torch.testing.assert_close(attn(q, k, v), attn.reference(q, k, v), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("spec", [
    "variant uniform\nscore = 0.0\nmask = q_idx >= kv_idx\n",                # mean of the kept values
    "variant per_head\nscore = 0.1 * h\n",
    "variant per_row\nnorm = rownorm(exp(0.1 * q_idx))\n",
    "variant half\nnorm = map(0.5)\nmask = q_idx >= kv_idx\n",
], ids=["uniform", "per_head", "per_row", "constant_map"])
def test_scores_and_weights_that_do_not_vary_over_the_tile(spec):
    attn = attnc.compile(spec)
    q, k, v = qkv(1, 2, 2, 20, 20, 8)
    check_against_oracle(attn, q, k, v, {})


# -- calls at the edges: empty results, or one clear CallError naming the argument --

def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    from attnc.backends.triton_launch import interpreting
    return interpreting() or torch.cuda.is_available()


BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not triton_available(), reason="needs triton with TRITON_INTERPRET=1 or a GPU"))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,H,HKV", [(0, 4, 2), (2, 0, 2), (0, 0, 1)], ids=["no_batch", "no_heads", "neither"])
def test_no_batch_or_no_heads_gives_empty_results_and_gradients(backend, B, H, HKV):
    attn = attnc.compile(example("alibi"), backend=backend)
    q, k, v = (t.requires_grad_() for t in qkv(B, H, HKV, 5, 7, 8, Dv=6))
    slopes = torch.rand(H).requires_grad_()
    out, lse = attn(q, k, v, slopes=slopes, return_lse=True)
    ref, ref_lse = attn.reference(q, k, v, slopes=slopes, return_lse=True)
    assert out.shape == ref.shape == (B, H, 5, 6) and lse.shape == ref_lse.shape == (B, H, 5)
    assert out.dtype == q.dtype
    (out.sum() + lse.sum()).backward()
    for t in (q, k, v, slopes):       # nothing attends: no gradient anywhere, k and v keep their shapes
        assert t.grad.shape == t.shape and not t.grad.any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_value_dim_still_gives_lse(backend):
    attn = attnc.compile(example("alibi"), backend=backend)
    q, k, v = qkv(1, 4, 2, 5, 7, 8, Dv=0)
    slopes = torch.rand(4)
    out, lse = attn(q, k, v, slopes=slopes, return_lse=True)
    assert out.shape == (1, 4, 5, 0)
    torch.testing.assert_close(lse, attn.reference(q, k, v, slopes=slopes, return_lse=True)[1])


@pytest.mark.parametrize("shapes,match", [
    (((1, 2, 5, 8), (1, 0, 7, 8), (1, 0, 7, 8)), "k must have at least one head"),
    (((1, 2, 5, 0), (1, 2, 7, 0), (1, 2, 7, 8)), "head_dim of at least 1"),
], ids=["no_kv_heads", "no_head_dim"])
def test_no_kv_heads_or_no_head_dim_is_refused(shapes, match):
    attn = attnc.compile(example("causal"))
    q, k, v = (torch.randn(s) for s in shapes)
    with pytest.raises(attnc.CallError, match=match):
        attn(q, k, v)
    with pytest.raises(attnc.CallError, match=match):
        attn.reference(q, k, v)


@pytest.mark.parametrize("scale", ["0.1", 1j, torch.tensor([0.1, 0.2]), torch.tensor(1j), torch.tensor(True),
                                   True, None.__class__, float("nan"), float("inf")],
                         ids=["str", "complex", "two_elements", "complex_tensor", "bool_tensor", "bool", "type",
                              "nan", "inf"])
def test_scale_must_be_a_finite_real_number(scale):
    attn = attnc.compile(example("causal"))
    q, k, v = qkv(1, 2, 2, 5, 5, 8)
    with pytest.raises(attnc.CallError, match="scale"):
        attn(q, k, v, scale=scale)


@pytest.mark.parametrize("scale", [torch.tensor(0.3), torch.tensor(0.3, dtype=torch.float64), 0.3,
                                   torch.tensor(2), 2], ids=["tensor", "float64_tensor", "float", "int_tensor", "int"])
def test_scale_as_a_number_or_a_0d_tensor(scale):
    attn = attnc.compile(example("causal"))
    q, k, v = qkv(1, 2, 2, 5, 5, 8)
    torch.testing.assert_close(attn(q, k, v, scale=scale), attn(q, k, v, scale=float(scale)), rtol=0, atol=0)
    check_against_oracle(attn, q, k, v, {}, scale=scale)


def test_a_scale_that_requires_grad_is_refused_not_detached():
    attn = attnc.compile(example("causal"))
    q, k, v = qkv(1, 2, 2, 5, 5, 8)
    scale = torch.tensor(0.3, requires_grad=True)
    with pytest.raises(attnc.CallError, match="scale requires grad"):
        attn(q, k, v, scale=scale)
    with torch.no_grad():                               # no gradient asked for: nothing is lost
        attn(q, k, v, scale=scale)


def test_return_lse_must_be_a_bool():
    attn = attnc.compile(example("causal"))
    q, k, v = qkv(1, 2, 2, 5, 5, 8)
    with pytest.raises(attnc.CallError, match="return_lse"):
        attn(q, k, v, return_lse="yes")


CONST_INDEX = ("variant table_at_a_constant\nparam ids: i32[L]\nparam tab: f32[T]\n"
               "mask = q_idx + KV - Q >= kv_idx\nscore = score + tab[ids[0]] * (q_idx - kv_idx)\n")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_param_read_at_a_constant_index_end_to_end(backend):
    attn = attnc.compile(CONST_INDEX, backend=backend)
    q, k, v = (t.requires_grad_() for t in qkv(2, 4, 2, 9, 13, 8, seed=2))
    ids, tab = torch.tensor([3, 0, 1], dtype=torch.int32), (torch.rand(5) * 0.2).requires_grad_()
    check_against_oracle(attn, q.detach(), k.detach(), v.detach(), {"ids": ids, "tab": tab.detach()})
    out, lse = attn(q, k, v, ids=ids, tab=tab, return_lse=True)
    (out.sum() + lse.sum()).backward()
    q64, k64, v64, tab64 = (t.detach().double().requires_grad_() for t in (q, k, v, tab))
    ref, ref_lse = attn.reference(q64, k64, v64, ids=ids, tab=tab64, return_lse=True)
    (ref.sum() + ref_lse.sum()).backward()
    for got, want in zip((q, k, v, tab), (q64, k64, v64, tab64)):
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-4, atol=1e-5)
    assert tab.grad[3] != 0 and not tab.grad[[0, 1, 2, 4]].any()      # only the entry read has a gradient
    with pytest.raises(attnc.CallError, match="tab"):                     # the same sizes, ids[0] now past tab
        attn(q, k, v, ids=torch.tensor([5, 0, 1], dtype=torch.int32), tab=tab)


def test_a_constant_index_is_checked_at_the_entry_it_reads():
    attn = attnc.compile(CONST_INDEX)
    q, k, v = qkv(1, 2, 2, 5, 5, 8)
    check_against_oracle(attn, q, k, v, {"ids": torch.tensor([2, 9], dtype=torch.int32), "tab": torch.rand(5)})


def test_bounds_checks_are_cached_only_where_sizes_decide_them(monkeypatch):
    from attnc.runtime import compiled as compiled_module
    calls = []
    real = compiled_module.check_at_call
    monkeypatch.setattr(compiled_module, "check_at_call", lambda *a: calls.append(1) or real(*a))
    causal, table = attnc.compile(example("causal")), attnc.compile(CONST_INDEX)
    q, k, v = qkv(1, 2, 2, 5, 5, 8)
    for _ in range(3):
        causal(q, k, v)
    assert len(calls) == 1
    ids, tab = torch.tensor([1], dtype=torch.int32), torch.rand(4)
    for _ in range(3):
        table(q, k, v, ids=ids, tab=tab)
    assert len(calls) == 4


def test_per_shape_caches_stay_bounded_while_decoding():
    from attnc.runtime.compiled import TILE_MEMO
    attn = attnc.compile(example("sliding_window"), window=4)
    for KV in range(2, TILE_MEMO + 12):
        attn(*qkv(1, 2, 2, 1, KV, 4))
    assert 0 < len(attn._tiles) <= TILE_MEMO and 0 < len(attn._checked) <= TILE_MEMO
