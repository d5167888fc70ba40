"""attnc's forward kernels as sm_90 machine code (benchmarks/sass.py), without a GPU: no spills, K and V loaded
through asynchronous copies; and the yardstick it compares with (benchmarks/fa2.py) computes attention.

One run of benchmarks/sass.py compiles every example for the session: about 2 minutes on 2 cores with
triton's kernel cache cold, under 1 minute warm."""
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


@pytest.fixture(scope="session")
def sass(tmp_path_factory) -> dict:
    """benchmarks/sass.py's rows for every example and one unreadable spec, by name."""
    if (why := _toolchain_missing()) is not None:
        pytest.skip(why)
    bad = tmp_path_factory.mktemp("sass") / "broken.attn"
    bad.write_text("variant broken\nscore = score +\n")
    run = subprocess.run([sys.executable, str(SASS), "--json", str(bad)]
                         + [str(ROOT / "examples" / f"{n}.attn") for n in EXAMPLE_IDS],
                         env=_clean_env(), capture_output=True, text=True, timeout=1200)
    assert run.returncode == 1, run.stderr[-4000:]             # the broken spec's row, and only that, failed
    rows = json.loads(run.stdout)["rows"]
    by_name: dict = {}
    for r in rows:
        by_name.setdefault(r["name"], []).append(r)
    return by_name


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
    q, k, v = (torch.randn(2, 3, 64, 16, generator=g) for _ in range(3))
    out, lse = fa2.attention(q, k, v, causal, sm_scale=0.3, BLOCK_M=32, BLOCK_N=16)
    s = q.double() @ k.double().transpose(-1, -2) * 0.3
    if causal:
        s = s.masked_fill(~torch.ones(64, 64, dtype=torch.bool).tril(), float("-inf"))
    print((out.double() - torch.softmax(s, -1) @ v.double()).abs().max().item(),
          (lse.double() * 0.6931471805599453 - torch.logsumexp(s, -1)).abs().max().item())
"""


def test_the_yardstick_matches_float64_attention():
    env = dict(_clean_env(), TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-c", FA2_CHECK, str(ROOT / "benchmarks")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    errors = [float(x) for x in run.stdout.split()]
    assert len(errors) == 4 and max(errors) < 1e-5, errors          # out and base-2 lse, non-causal and causal
