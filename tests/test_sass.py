"""attnc's kernels as sm_90 machine code (benchmarks/sass.py), without a GPU: no spills, K and V (and the
backward's Q and dO) loaded through asynchronous copies; and the yardstick it compares with
(benchmarks/fa2.py) computes attention and its gradients.

Two runs of benchmarks/sass.py per session: every example's forward kernel (about 2 minutes on 2 cores with
triton's kernel cache cold, under 1 minute warm), and the backward kernels of the examples in BACKWARD, each
with a different reason to be there (about 90 s cold)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

try:
    from helpers import EXAMPLE_IDS, ROOT
except ImportError:                                     # tests/ imported as a package
    from tests.helpers import EXAMPLE_IDS, ROOT

SASS = ROOT / "benchmarks" / "sass.py"

# examples whose forward kernel spills today, each with why; a fix shows up as XPASS
SPILLING: dict[str, str] = {}
# the backward's examples: a plain softmax, a mask, a per-head param gradient, a 2-D table's gradient scattered
# per pair, a row-level param gradient, two running maxima, two passes with a preprocess that sweeps the keys
BACKWARD = ["full", "causal", "alibi", "t5_bias", "sinks", "cog", "hinge"]
# (example, kernel kind) whose backward kernel spills today, each with why
BACKWARD_SPILLING: dict[tuple[str, str], str] = {}


def _toolchain_missing() -> str | None:
    """Why sm_90 code cannot be built and read here, or None."""
    try:
        import triton.backends.nvidia  # noqa: F401
        tools = {"ptxas": triton.knobs.nvidia.ptxas.path, "cuobjdump": triton.knobs.nvidia.cuobjdump.path}
    except Exception as e:      # noqa: BLE001  (any way of not having it is a skip)
        return f"triton's CUDA backend is missing ({type(e).__name__}: {e})"
    missing = [name for name, path in tools.items() if not (path and Path(path).is_file())]
    return f"triton's {' and '.join(missing)} missing" if missing else None


def _clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _rows(*args: str) -> tuple[int, dict]:
    """(exit status, rows by name) of one benchmarks/sass.py run."""
    run = subprocess.run([sys.executable, str(SASS), "--json", *args], env=_clean_env(), capture_output=True,
                         text=True, timeout=1200)
    assert run.stdout, run.stderr[-4000:]
    by_name: dict = {}
    for r in json.loads(run.stdout)["rows"]:
        by_name.setdefault(r["name"], []).append(r)
    return run.returncode, by_name


@pytest.fixture(scope="session")
def sass(tmp_path_factory) -> dict:
    """benchmarks/sass.py's rows for every example and one unreadable spec, by name."""
    if (why := _toolchain_missing()) is not None:
        pytest.skip(why)
    bad = tmp_path_factory.mktemp("sass") / "broken.attn"
    bad.write_text("variant broken\nscore = score +\n")
    status, by_name = _rows(str(bad), *(str(ROOT / "examples" / f"{n}.attn") for n in EXAMPLE_IDS))
    assert status == 1                                          # the broken spec's row, and only that, failed
    return by_name


@pytest.fixture(scope="session")
def sass_bwd() -> dict:
    """benchmarks/sass.py's backward rows for the BACKWARD examples, by (name, kernel kind)."""
    if (why := _toolchain_missing()) is not None:
        pytest.skip(why)
    status, by_name = _rows("--direction", "bwd", *(str(ROOT / "examples" / f"{n}.attn") for n in BACKWARD))
    assert status == 0, [r.get("error") for rows in by_name.values() for r in rows if "error" in r]
    return {(r["name"], r["kind"]): r for rows in by_name.values() for r in rows}


def _forward(sass: dict, name: str) -> dict:
    rows = sass[name]
    assert len(rows) == 1, rows                                 # a prefill launch runs one kernel
    assert "error" not in rows[0], rows[0]["error"]
    return rows[0]


def _spilling(name: str):
    marks = [pytest.mark.xfail(strict=True, reason=SPILLING[name])] if name in SPILLING else []
    return pytest.param(name, marks=marks, id=name)


@pytest.mark.parametrize("name", ["fa2", "fa2_causal"])
def test_the_yardstick_compiles_to_async_copies_and_warpgroup_mmas(sass, name):
    row = _forward(sass, name)
    assert row["spills"] == 0 and row["registers"] <= 255
    assert row["async"] > 0 and row["hgmma"] > 0, row


@pytest.mark.parametrize("name", [_spilling(n) for n in EXAMPLE_IDS])
def test_forward_kernel_does_not_spill(sass, name):
    row = _forward(sass, name)
    assert row["spills"] == 0, f"{row['spills']} spill instructions at {row['registers']} registers"


@pytest.mark.parametrize("name", EXAMPLE_IDS)
def test_forward_kernel_loads_k_and_v_through_async_copies(sass, name):
    row = _forward(sass, name)
    yardstick = _forward(sass, row["yardstick"])
    assert row["async"] >= yardstick["async"], (row["async"], yardstick["async"])


def _backward(name: str, kind: str):
    marks = ([pytest.mark.xfail(strict=True, reason=BACKWARD_SPILLING[(name, kind)])]
             if (name, kind) in BACKWARD_SPILLING else [])
    return pytest.param(name, kind, marks=marks, id=f"{name}-{kind}")


@pytest.mark.parametrize("name, kind", [_backward(n, k) for n in BACKWARD for k in ("dq", "dkdv")])
def test_backward_kernel_does_not_spill(sass_bwd, name, kind):
    row = sass_bwd[(name, kind)]
    assert row["spills"] == 0, f"{row['spills']} spill instructions at {row['registers']} registers"


@pytest.mark.parametrize("name", BACKWARD)
@pytest.mark.parametrize("kind", ["dq", "dkdv"])
def test_backward_step_tiles_load_through_async_copies(sass_bwd, name, kind):
    # dQ sweeps K and V, dK/dV sweeps Q and dO: at least as many asynchronous copies as the yardstick's kernel
    # of that kind with one sweep (the non-causal one)
    row, yardstick = sass_bwd[(name, kind)], sass_bwd[("fa2", kind)]
    assert row["async"] >= yardstick["async"] > 0, (row["async"], yardstick["async"])


def test_the_backward_yardstick_does_not_spill(sass_bwd):
    for name in ("fa2", "fa2_causal"):
        for kind in ("preprocess", "dq", "dkdv"):
            assert sass_bwd[(name, kind)]["spills"] == 0, (name, kind)


def test_a_kernel_that_cannot_be_built_is_a_row_saying_so(sass):
    (row,) = sass["broken"]
    assert row["kernel"] is None
    assert row["error"].startswith("SpecError: ") and "broken.attn:2:" in row["error"]


FA2_CHECK = """
import sys, torch
sys.path.insert(0, sys.argv[1])
import fa2
g = torch.Generator().manual_seed(0)
for causal in (False, True):
    q, k, v, do = (torch.randn(2, 3, 64, 16, generator=g) for _ in range(4))
    out, lse = fa2.attention(q, k, v, causal, sm_scale=0.3, BLOCK_M=32, BLOCK_N=16)
    qd, kd, vd = (t.double().requires_grad_() for t in (q, k, v))
    s = qd @ kd.transpose(-1, -2) * 0.3
    if causal:
        s = s.masked_fill(~torch.ones(64, 64, dtype=torch.bool).tril(), float("-inf"))
    ref = torch.softmax(s, -1) @ vd
    ref.backward(do.double())
    print((out.double() - ref).abs().max().item(),
          (lse.double() * 0.6931471805599453 - torch.logsumexp(s, -1)).abs().max().item())
    for tiles in ((32, 16), (16, 32)):       # dQ's program tile the larger, then dK/dV's
        grads = fa2.attention_backward(q, k, v, out, lse, do, causal, sm_scale=0.3, BLOCK_M=tiles[0],
                                       BLOCK_N=tiles[1])
        print(*((a.double() - b.grad).abs().max().item() for a, b in zip(grads, (qd, kd, vd))))
"""


def test_the_yardstick_matches_float64_attention_and_its_gradients():
    env = dict(_clean_env(), TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-c", FA2_CHECK, str(ROOT / "benchmarks")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    errors = [float(x) for x in run.stdout.split()]
    # out and base-2 lse, then dq, dk, dv at two tilings; non-causal and causal
    assert len(errors) == 16 and max(errors) < 1e-5, errors
