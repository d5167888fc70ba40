"""The attnc command, run in-process: output, exit codes (0 ok, 1 check failed, 2 usage/spec/call error)."""
import argparse
import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch

import attnc
from attnc import bench, cli
from attnc.cli import main
from attnc.runtime.inputs import random_inputs, random_params

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
CHECK_KEYS = {"file", "variant", "check", "shape", "target", "dtype", "seed", "status", "ok", "err", "bound",
              "lse_err", "lse_bound", "ms", "why", "error"}


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# -- show --
def test_show_prints_the_kernel(capsys):
    code, out, err = run(capsys, "show", EXAMPLES / "causal.attn")
    assert code == 0, err
    assert "def attnc_causal_fwd(" in out


def test_show_const_override(capsys):
    code, out, err = run(capsys, "show", EXAMPLES / "sliding_window.attn", "-D", "window=64", "--lse")
    assert code == 0, err
    assert "< 64" in out and "< 256" not in out


def test_show_triton_is_source_or_a_clear_message(capsys):
    code, out, err = run(capsys, "show", EXAMPLES / "causal.attn", "--target", "triton")
    assert code in (0, 2)
    assert ("attnc_causal_fwd" in out) if code == 0 else ("triton" in err and "Traceback" not in err)


# -- ir --
def test_ir_after_online_shows_every_stage_up_to_it(capsys):
    code, out, err = run(capsys, "ir", EXAMPLES / "causal.attn", "--after", "online")
    assert code == 0, err
    assert "-- after lower:" in out
    assert "-- after online: 1 pass over the keys --" in out
    assert "after tile" not in out


def test_ir_unknown_pass_is_a_usage_error(capsys):
    code, _, err = run(capsys, "ir", EXAMPLES / "causal.attn", "--after", "nonsense")
    assert code == 2
    assert "online" in err          # the valid names are listed


# -- check --
def test_check_causal_passes(capsys):
    code, out, err = run(capsys, "check", EXAMPLES / "causal.attn")
    assert code == 0, out + err
    assert "5 ok, 0 failed" in out


def test_check_params_with_free_dims(capsys, tmp_path):
    # offsets[doc[q_idx]]: doc's values index offsets, so they must stay below offsets' length
    spec = tmp_path / "doc_start.attn"
    spec.write_text("variant doc_start\nparam doc: i32[L]\nparam start: i32[NDOC]\nlet q_pos = q_idx + KV - Q\n"
                    "mask = q_pos >= 0 and kv_idx >= start[doc[max(q_pos, 0)]] and kv_idx <= q_pos\n")
    code, out, err = run(capsys, "check", EXAMPLES / "t5_bias.attn", EXAMPLES / "document.attn", spec)
    assert code == 0, out + err
    assert "15 ok, 0 failed" in out


def test_check_reports_a_wrong_kernel(capsys, monkeypatch):
    call = attnc.Compiled.__call__

    def off_by_a_bit(self, q, k, v, **kw):
        out, lse = call(self, q, k, v, **kw)
        return out + 1e-3, lse
    monkeypatch.setattr(attnc.Compiled, "__call__", off_by_a_bit)
    code, out, _ = run(capsys, "check", EXAMPLES / "full.attn")
    assert code == 1
    assert "FAIL (out)" in out


# -- errors --
def test_broken_spec_exits_2_with_its_location(capsys, tmp_path):
    bad = tmp_path / "bad.attn"
    bad.write_text("variant bad\nmask = q_idx >=\n")
    for cmd in ("show", "ir", "check"):
        code, _, err = run(capsys, cmd, bad)
        assert code == 2
        assert f"{bad}:2:" in err
        assert "Traceback" not in err


def test_unknown_subcommand_exits_2(capsys):
    code, _, err = run(capsys, "frobnicate", EXAMPLES / "causal.attn")
    assert code == 2
    assert "invalid choice" in err


def test_unknown_const_exits_2(capsys):
    code, _, err = run(capsys, "show", EXAMPLES / "causal.attn", "-D", "window=64")
    assert code == 2
    assert "window" in err


@pytest.mark.parametrize("argv", [["show", "README.md"], ["show", EXAMPLES / "causal.attn", "-D", "window"],
                                  ["show", EXAMPLES / "sliding_window.attn", "-D", "window=wide"], []])
def test_usage_errors_exit_2(capsys, argv):
    assert run(capsys, *argv)[0] == 2


# -- the inputs check draws --
def test_random_params_fit_every_read():
    g = torch.Generator().manual_seed(0)
    t5 = attnc.compile(str(EXAMPLES / "t5_bias.attn"))
    rel_bias = random_params(t5, 2, 4, 2, 100, 173, 32, g)["rel_bias"]
    assert rel_bias.shape[0] == 4 and rel_bias.shape[1] <= 100 + 173 - 1       # no longer than any read needs
    t5(*random_inputs(t5, 2, 4, 2, 100, 173, 32, 24, torch.float32, g), rel_bias=rel_bias)   # every read in bounds
    doc = random_params(attnc.compile(str(EXAMPLES / "document.attn")), 1, 2, 2, 1, 300, 32, g)["doc"]
    assert doc.shape == (300,) and doc.dtype == torch.int32
    assert torch.equal(doc, doc.sort().values)           # ids come in runs
    widths = random_params(attnc.compile(str(EXAMPLES / "moa.attn")), 1, 8, 8, 64, 64, 32, g)["widths"]
    assert widths.min() >= 1 and widths.max() < 64
    q, k, v = random_inputs(t5, 2, 4, 2, 100, 173, 32, 24, torch.bfloat16, g)
    assert (q.shape, k.shape, v.shape) == ((2, 4, 100, 32), (2, 2, 173, 32), (2, 2, 173, 24))
    assert q.dtype == torch.bfloat16


# -- the command line itself --
def test_python_dash_m_attnc(tmp_path):
    env = {**os.environ, "ATTNC_CACHE_DIR": str(tmp_path)}
    run_m = lambda *a: subprocess.run([sys.executable, "-m", "attnc", *a], cwd=tmp_path, env=env,  # noqa: E731
                                      capture_output=True, text=True, timeout=300)
    version = run_m("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"attnc {metadata.version('attnc')}"
    show = run_m("show", "causal")                        # a packaged example, from a folder without one
    assert show.returncode == 0, show.stderr
    assert "def attnc_causal_fwd(" in show.stdout
    bad = run_m("bench", "causal", "--seq", "abc")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def _options(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                yield from _options(sub)
        elif action.option_strings and not isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            yield parser, action


def test_every_option_has_help_and_shows_its_default():
    seen = 0
    for parser, action in _options(cli.build_parser()):
        seen += 1
        assert action.help, f"{parser.prog} {action.option_strings} has no help"
        text = " ".join(parser.format_help().split())
        flag = action.option_strings[-1]
        line = text[text.index(flag, text.index("options:")):]
        if action.default not in (None, False, []):
            assert f"(default: {action.default})" in line[:300], f"{parser.prog} {flag}"
        elif action.default is None and action.type is not None and action.dest not in ("plot",):
            assert "(default:" in line[:300], f"{parser.prog} {flag} should say what it defaults to"
    assert seen > 20


@pytest.mark.parametrize("argv", [
    ["bench", "causal", "--seq", "abc"], ["bench", "causal", "--seq", "-5"], ["bench", "causal", "--reps", "0"],
    ["bench", "causal", "--heads", "0"], ["bench", "causal", "--kv-seq", "1.5"], ["bench", "causal", "--dim", ""],
    ["bench", "causal", "--kv-heads", "x"], ["bench", "causal", "--batch", "-1"],
    ["bench", "causal", "--device", "tpu"], ["bench", "causal", "--heads", "8", "--kv-heads", "3"],
    ["check", "causal", "--seed", "-1"], ["check", "causal", "--seed", "x"],
    ["show", "sliding_window", "-D", "window=wide"], ["show", "sliding_window", "-D", "window"],
    ["show", "sliding_window", "-D", "=3"], ["show", "sliding_window", "-D", "window=nan"],
    ["show", "sliding_window", "-D", "window=inf"], ["cache"], ["cache", "frob"]])
def test_bad_arguments_are_one_line_usage_errors(capsys, argv, monkeypatch):
    monkeypatch.setattr(bench, "bench_variant", lambda *a, **k: pytest.fail("ran a benchmark"))
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert out == "" and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err and err.startswith("attnc ")


def test_interrupt_exits_130_without_a_traceback(capsys, monkeypatch):
    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "cmd_ir", interrupted)
    code, _, err = run(capsys, "ir", "causal")
    assert code == 130 and "interrupted" in err and "Traceback" not in err


# -- examples by name --
def test_an_example_by_name(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("alibi", "alibi.attn"):
        code, out, err = run(capsys, "show", name)
        assert code == 0, err
        assert "def attnc_alibi_fwd(" in out
    code, out, err = run(capsys, "ir", "causal", "--after", "lower")
    assert code == 0 and "-- after lower" in out


def test_a_local_file_comes_before_the_example(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "causal.attn").write_text("variant mine\nmask = q_idx >= kv_idx\n")
    code, out, err = run(capsys, "show", "causal.attn")
    assert code == 0, err
    assert "def attnc_mine_fwd(" in out


def test_an_unknown_name_lists_the_examples(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, "show", "nonesuch")
    assert code == 2 and "no packaged example" in err and "sliding_window" in err
    code, _, err = run(capsys, "show", "sub/causal.attn")        # a path is never looked up by name
    assert code == 2 and "cannot read" in err


# -- check --
def test_check_json(capsys, tmp_path):
    code, out, err = run(capsys, "check", "causal", EXAMPLES / "t5_bias.attn", "--json", "--seed", "3")
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    from attnc.runtime.decode_check import SHAPE
    per_file = [("oracle", s) for s in cli.SHAPES] + [("decode_prefill", SHAPE)]
    assert len(records) == 2 * len(per_file)
    for r, (check, shape) in zip(records, per_file * 2):
        assert set(r) == CHECK_KEYS
        assert r["status"] == "ok" and r["ok"] is True and r["why"] == [] and r["error"] is None
        assert tuple(r["shape"].values()) == shape and r["check"] == check
        assert 0 <= r["err"] <= r["bound"] and 0 <= r["lse_err"] <= r["lse_bound"] and r["ms"] > 0
        assert (r["target"], r["dtype"], r["seed"]) == ("torch", "fp32", 3)
    assert [r["variant"] for r in records] == ["causal"] * 5 + ["t5_bias"] * 5
    assert "10 ok, 0 failed" in err                 # the summary goes to stderr, stdout is only JSON


def test_check_grad_compares_gradients(capsys):
    code, out, err = run(capsys, "check", "alibi", "--json", "--grad")
    assert code == 0, err
    grads = [json.loads(line) for line in out.splitlines() if json.loads(line)["check"] == "grad"]
    assert len(grads) == len(cli.GRAD_SHAPES) and all(r["ok"] for r in grads)
    assert all(0 <= r["err"] <= r["bound"] and r["lse_err"] is None for r in grads)


def test_show_and_ir_of_the_backward(capsys):
    code, out, err = run(capsys, "show", "alibi", "--backward")
    assert code == 0 and "def attnc_alibi_bwd(" in out and "grad_slopes" in out
    code, out, err = run(capsys, "ir", "alibi", "--backward", "--after", "autodiff")
    assert code == 0 and "DQ[b,h,m,e]" in out and "d_slopes" in out
    code, out, err = run(capsys, "ir", "sinks", "--backward", "--target", "triton")
    assert code == 0 and "kernel attnc_sinks_bwd_dkdv (dkdv)" in out and "after cse (triton)" in out


def test_check_json_reports_a_wrong_kernel(capsys, monkeypatch):
    call = attnc.Compiled.__call__

    def off_by_a_bit(self, q, k, v, **kw):
        out, lse = call(self, q, k, v, **kw)
        return out + 1e-3, lse
    monkeypatch.setattr(attnc.Compiled, "__call__", off_by_a_bit)
    code, out, _ = run(capsys, "check", "full", "--json")
    assert code == 1
    records = [json.loads(line) for line in out.splitlines()]
    assert all(r["status"] == "fail" and r["why"] == ["out"] and r["err"] > r["bound"] for r in records)


def test_check_counts_a_file_that_does_not_compile(capsys, tmp_path):
    bad = tmp_path / "bad.attn"
    bad.write_text("variant bad\nmask = q_idx >=\n")
    code, out, err = run(capsys, "check", "causal", bad)
    assert code == 2
    assert "2 file(s), 6 check(s): 5 ok, 1 failed (torch, fp32); 1 file(s) did not compile" in out
    assert "CANNOT COMPILE" in out and f"{bad}:2:" in err
    code, out, err = run(capsys, "check", bad, "--json")
    (record,) = [json.loads(line) for line in out.splitlines()]
    assert set(record) == CHECK_KEYS and record["status"] == "compile_error" and record["ok"] is False
    assert f"{bad}:2:" in record["error"]


def test_progress_only_when_asked_or_on_a_terminal(capsys):
    code, out, err = run(capsys, "check", "causal", "--json", "--progress")
    assert code == 0
    assert err.count("checking causal") == len(cli.SHAPES) + 1       # the oracle at each shape, and decode equals prefill
    assert all(json.loads(line) for line in out.splitlines())
    code, out, err = run(capsys, "check", "causal", "--json")      # stderr is not a terminal here
    assert "checking" not in err


# -- bench --
def test_bench_json_with_kv_heads_and_kv_length(capsys):
    code, out, err = run(capsys, "bench", "sigmoid", "--seq", "16", "--kv-seq", "40", "--heads", "4",
                         "--kv-heads", "2", "--dim", "8", "--batch", "2", "--reps", "2", "--json")
    assert code == 0, err
    r = json.loads(out)
    assert set(r) == {"variant", "file", "shape", "dtype", "device", "threads", "reps", "ms", "flex_mask_ms",
                      "max_diff", "versions"}
    assert r["shape"] == {"B": 2, "H": 4, "HKV": 2, "Q": 16, "KV": 40, "D": 8, "Dv": 8}
    assert r["variant"] == "sigmoid" and r["dtype"] == "float32" and r["device"] == "cpu" and r["reps"] == 2
    assert r["ms"]["attnc"] > 0 and r["ms"]["eager"] > 0
    assert r["ms"]["flex"] is None and r["ms"]["sdpa"] is None          # neither computes a sigmoid normalizer
    assert r["max_diff"]["eager"] < 1e-5
    assert r["versions"]["attnc"] == attnc.__version__


def test_bench_table_and_progress(capsys):
    code, out, err = run(capsys, "bench", "relu2", "--seq", "16", "--dim", "8", "--heads", "2", "--reps", "1",
                         "--dtype", "bf16", "--progress")
    assert code == 0, err
    assert "relu2: B=1 H=2 HKV=2 Q=16 KV=16 D=8, bf16 on cpu, median of 1" in out
    assert "timing attnc" in err and "timing eager" in err


def test_bench_plot(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "bench.png"
    code, out, err = run(capsys, "bench", "sigmoid", "--seq", "16", "--dim", "8", "--heads", "2", "--reps", "1",
                         "--plot", png)
    assert code == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"plot: {png}" in out


def test_bench_plot_without_matplotlib_fails_before_the_run(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)          # import raises ImportError
    monkeypatch.setattr(bench, "bench_variant", lambda *a, **k: pytest.fail("ran a benchmark"))
    code, _, err = run(capsys, "bench", "causal", "--plot", tmp_path / "x.png")
    assert code == 2 and "pip install 'attnc[plot]'" in err and "Traceback" not in err


@pytest.mark.parametrize("name", ["x.nope", "missing/x.png"])
def test_bench_plot_path_is_checked_before_the_run(capsys, tmp_path, monkeypatch, name):
    pytest.importorskip("matplotlib")
    monkeypatch.setattr(bench, "bench_variant", lambda *a, **k: pytest.fail("ran a benchmark"))
    code, _, err = run(capsys, "bench", "causal", "--plot", tmp_path / name)
    assert code == 2 and "--plot" in err


@pytest.mark.parametrize("mask, Q, KV, kind", [
    (None, 64, 80, "full"), ("q_idx >= kv_idx", 64, 80, "causal"), ("q_idx + KV - Q >= kv_idx", 64, 64, "causal"),
    ("q_idx + KV - Q >= kv_idx", 1, 64, None),                  # bottom-right: not SDPA's top-left is_causal
    ("q_idx >= kv_idx and q_idx - kv_idx < 8", 64, 64, None), ("q_idx > kv_idx", 64, 64, None)])
def test_sdpa_stands_in_only_for_what_it_computes(mask, Q, KV, kind):
    spec = "variant v\n" + (f"mask = {mask}\n" if mask else "")
    assert bench.sdpa_kind_of(attnc.compile(spec).variant, Q, KV) == kind
    assert bench.sdpa_kind_of(attnc.compile(spec + "norm = sigmoid\n").variant, Q, KV) is None
    assert bench.sdpa_kind_of(attnc.compile(spec + "score = score * 2\n").variant, Q, KV) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given when no CUDA device exists")
def test_bench_on_a_missing_device(capsys):
    code, _, err = run(capsys, "bench", "causal", "--device", "cuda")
    assert code == 2 and "no CUDA device" in err


# -- cache --
def test_cache_info_and_clear(capsys, tmp_path, monkeypatch):
    d = tmp_path / "kernels"
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(d))
    code, out, _ = run(capsys, "cache", "info")
    assert code == 0 and f"path     {d}" in out and "entries  0" in out
    attnc.compile(str(EXAMPLES / "causal.attn")).source()
    attnc.compile(str(EXAMPLES / "alibi.attn")).source()
    code, out, _ = run(capsys, "cache", "info", "--json")
    info = json.loads(out)
    assert info == {"path": str(d), "entries": 2, "bytes": sum(f.stat().st_size for f in d.iterdir())}
    (d / "mine.txt").write_text("not a kernel")
    code, out, _ = run(capsys, "cache", "clear")
    assert code == 0 and out.strip() == f"removed 2 file(s) from {d}"
    assert [p.name for p in d.iterdir()] == ["mine.txt"]
