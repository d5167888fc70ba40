"""The attnc command, run in-process: output, exit codes (0 ok, 1 check failed, 2 usage/spec/call error)."""
from pathlib import Path

import pytest
import torch

import attnc
from attnc.cli import main
from attnc.runtime.inputs import random_inputs, random_params

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


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
    assert "4 ok, 0 failed" in out


def test_check_params_with_free_dims(capsys, tmp_path):
    # offsets[doc[q_idx]]: doc's values index offsets, so they must stay below offsets' length
    spec = tmp_path / "doc_start.attn"
    spec.write_text("variant doc_start\nparam doc: i32[L]\nparam start: i32[NDOC]\n"
                    "mask = kv_idx >= start[doc[q_idx]] and kv_idx <= q_idx\n")
    code, out, err = run(capsys, "check", EXAMPLES / "t5_bias.attn", EXAMPLES / "document.attn", spec)
    assert code == 0, out + err
    assert "12 ok, 0 failed" in out


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
    assert random_params(t5, 2, 4, 2, 100, 173, 32, g)["rel_bias"].shape == (4, 100 + 173 - 1)
    doc = random_params(attnc.compile(str(EXAMPLES / "document.attn")), 1, 2, 2, 1, 300, 32, g)["doc"]
    assert doc.shape == (300,) and doc.dtype == torch.int32
    assert torch.equal(doc, doc.sort().values)           # ids come in runs
    widths = random_params(attnc.compile(str(EXAMPLES / "moa.attn")), 1, 8, 8, 64, 64, 32, g)["widths"]
    assert widths.min() >= 1 and widths.max() < 64
    q, k, v = random_inputs(t5, 2, 4, 2, 100, 173, 32, 24, torch.bfloat16, g)
    assert (q.shape, k.shape, v.shape) == ((2, 4, 100, 32), (2, 2, 173, 32), (2, 2, 173, 24))
    assert q.dtype == torch.bfloat16
