"""attnc's Triton kernels as sm_90 machine code, beside a hand-written FlashAttention-2 (benchmarks/fa2.py).

    python benchmarks/sass.py [FILE.attn ...] [--json | --markdown] [--out FILE.json] [--jobs 2]
        [--direction fwd|bwd] [--dtype fp16] [--head-dim 64] [--block-m M] [--block-n N] [--warps 4] [--stages 3]
        [--seq 4096] [--no-lse] [--no-specialize] [--deterministic]

Tiles default to the ones attnc's launcher picks at that head dim: forward 128x64, backward 64x32 at D=64
(program tile x step: dQ 64 queries stepping 32 keys, dK/dV 64 keys stepping 32 queries); the yardstick
runs at the same tiles.

No GPU is needed. Each launcher runs on meta tensors with its kernels swapped for recorders; the recorded
arguments are specialized as Triton's launcher specializes them on a device (16-byte aligned pointers, ints
that are multiples of 16 marked so, ints equal to 1 made constants); triton.compile builds sm_90a code and
the cuobjdump in the triton wheel reads its registers and SASS. A kernel that fails is a row saying so
(exit status 1).
"""
from __future__ import annotations

import os

os.environ.pop("TRITON_INTERPRET", None)    # machine code needs triton's compiler: cleared before triton loads

import argparse  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import warnings  # noqa: E402
from collections import Counter  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import NamedTuple  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(ROOT / "benchmarks"))
DIRECTIONS = ("fwd", "bwd")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
YARDSTICKS = {"fa2": False, "fa2_causal": True}     # job name: causal

# column: the SASS opcodes it counts
COUNTS = {
    "spills": ("STL", "LDL"),           # local-memory stores and loads: registers spilled to the stack
    "async": ("LDGSTS", "UTMALDG"),     # global -> shared copies that overlap the math (cp.async, TMA)
    "ldg": ("LDG",),                    # plain global loads into registers
    "hgmma": ("HGMMA",),                # warpgroup tensor-core matrix multiplies
}
INSTRUCTION = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", re.M)


@dataclass(frozen=True)
class Config:
    direction: str = "fwd"
    dtype: str = "fp16"
    head_dim: int = 64
    block_m: int = 128
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3
    batch: int = 2          # the launch whose arguments are specialized
    heads: int = 16
    seq: int = 4096
    lse: bool = True        # a training forward stores the row statistics, as the yardstick does
    splits: int = 1         # a forward launch of split-KV decoding (> 1) also runs the merge kernel
    specialize: bool = True     # False: every int a plain i32 and no alignment facts (odd strides, odd pointers)
    deterministic: bool = False     # the backward's param gradients added in a fixed order, not by atomics

    def describe(self) -> str:
        tiles = (f"BLOCK_M={self.block_m}, BLOCK_N={self.block_n}" if self.direction == "fwd" else
                 f"tiles {self.block_m}x{self.block_n} (dQ: BLOCK_M={self.block_m} queries, steps of "
                 f"BLOCK_N={self.block_n} keys; dK/dV: BLOCK_N={self.block_m} keys, steps of BLOCK_M={self.block_n} "
                 f"queries)")
        return (f"sm_90a, {self.dtype}, D={self.head_dim}, {tiles}, "
                f"{self.num_warps} warps, {self.num_stages} stages; arguments of a launch at B={self.batch}, "
                f"H={self.heads}, S={self.seq}{', with lse' if self.lse else ''}"
                + ("" if self.specialize else "; arguments not specialized (plain i32, no alignment)")
                + ("; deterministic param gradients" if self.deterministic else ""))


class Kernel(NamedTuple):
    label: str
    fn: object              # the triton.JITFunction
    signature: dict
    constexprs: dict
    attrs: dict
    kind: str = ""          # forward, merge, preprocess, dq, dkdv: what a row is compared with


# -- what a launch passes --
class _Recorder:
    """Stands in for a kernel: `kernel[grid](*args, **kwargs)` records the call instead of launching it."""

    def __init__(self, kernel, calls: list):
        self.kernel, self.calls = kernel, calls

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((self.kernel, args, kwargs))


def recorded_launches(scope: dict, launch) -> list[tuple]:
    """(kernel, args, kwargs) for every kernel of `scope` that launch() launches, in order; nothing runs."""
    import triton
    calls: list = []
    kernels = {n: k for n, k in scope.items() if isinstance(k, triton.runtime.KernelInterface)}
    try:
        scope.update({n: _Recorder(k, calls) for n, k in kernels.items()})
        launch()
    finally:
        scope.update(kernels)
    return calls


def specialized(kernel, args: tuple, kwargs: dict, label: str | None = None, kind: str = "") -> Kernel:
    """The signature, constants and divisibility attributes triton's launcher derives from these arguments;
    labelled with the kernel's name unless told."""
    import triton
    from triton.runtime.jit import create_function_from_signature
    fn = kernel
    while not isinstance(fn, triton.JITFunction):           # an autotuner or heuristics wraps the jit function
        fn = fn.fn
    backend = _backend()
    kwargs = {k: v for k, v in kwargs.items() if k not in ("num_warps", "num_stages")}   # Config decides those
    bound, spec, _ = create_function_from_signature(fn.signature, fn.params, backend)(*args, **kwargs)
    values = list(bound.values())
    signature, constexprs, attrs = {}, {}, {}
    for i, (p, (ty, attr)) in enumerate(zip(fn.params, spec)):
        signature[p.name] = ty
        if ty == "constexpr":
            constexprs[(i,)] = values[i]
        elif isinstance(attr, str):
            attrs[(i,)] = backend.parse_attr(attr)
    return Kernel(label or fn.__name__, fn, signature, constexprs, attrs, kind)


def _backend():
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    return make_backend(GPUTarget("cuda", 90, 32))


# -- the kernels --
def attnc_kernels(compiled, config: Config) -> list[Kernel]:
    """attnc's kernels for one direction of `compiled`, as its Triton launchers launch them at config's shape
    (the backward: its row preprocess, dQ and dK/dV kernels, each fed what the one before returns).

    Everything this script knows about attnc's generated code is here: the kernels of a direction, each
    launcher's arguments, the block lists it takes."""
    from attnc.backends import triton_launch
    from attnc.runtime.inputs import random_params
    import triton.language as tl
    backward = config.direction == "bwd"
    B, H, S, D = config.batch, config.heads, config.seq, config.head_dim
    dtype = DTYPES[config.dtype]
    q, k, v = (torch.empty(B, H, S, D, dtype=dtype, device="meta") for _ in range(3))
    params = random_params(compiled, B, H, H, S, S, D, torch.Generator().manual_seed(0))
    sizes, meta, scale = compiled._validate(q, k, v, None, {n: t.to("meta") for n, t in params.items()})
    tensors = {"Q": q, "K": k, "V": v}
    if backward:            # what the training forward saved, and the output's gradient
        forward = compiled._compiled("triton", config.lse, False, True)[0].plan
        tensors.update({s.target: torch.empty(B, H, S, dtype=torch.float32, device="meta")
                        for s in forward.stores if s.width is None and s.target != "lse"})
        tensors.update(O=torch.empty_like(q), dO=torch.empty_like(q), dLSE=torch.empty(B, H, S, device="meta"))
    dot = {"fp16": tl.float16, "bf16": tl.bfloat16}[config.dtype]
    out = []
    for kernel in compiled._compiled("triton", config.lse, backward):
        plan = kernel.plan
        bm, bn = (config.block_n, config.block_m) if plan.kind == "dkdv" else (config.block_m, config.block_n)
        cls = triton_launch.plan_tiles(plan, sizes, params, bm, bn)
        blocks = triton_launch.block_lists(cls, "meta")
        scope = triton_launch.load_module(kernel.source, plan.name)
        args = {x.name: tensors[x.tensor] for x in plan.loads} | {f"p_{p.name}": meta[p.name] for p in plan.params}

        def launch(scope=scope, plan=plan, args=args, blocks=blocks, bm=bm, bn=bn):   # as triton_launch.launch does
            got = scope[plan.name](**args, sm_scale=scale, blocks=blocks, BLOCK_M=bm,
                                   BLOCK_N=bn, N_SPLITS=1 if backward else config.splits,
                                   DOT_DTYPE=dot, DTYPE=dtype, sizes=dict(sizes, Dv=D),
                                   DETERMINISTIC=config.deterministic)
            tensors.update(zip(plan.results(), got))
        for call in recorded_launches(scope, launch):
            merge = call[0] is scope.get(f"{plan.name}_merge")
            out.append(specialized(*call, kind="merge" if merge else plan.kind))
    return out


FA2_KINDS = {"fa2_fwd_kernel": "forward", "fa2_bwd_preprocess_kernel": "preprocess", "fa2_bwd_dq_kernel": "dq",
             "fa2_bwd_dkdv_kernel": "dkdv"}


def fa2_kernels(causal: bool, config: Config) -> list[Kernel]:
    """The yardstick's kernels of config's direction at its shape (the backward: preprocess, dQ, dK/dV)."""
    import fa2
    shape = (config.batch, config.heads, config.seq, config.head_dim)
    q, k, v, out, do = (torch.empty(shape, dtype=DTYPES[config.dtype], device="meta") for _ in range(5))
    lse = torch.empty(shape[:3], dtype=torch.float32, device="meta")
    tiles = dict(BLOCK_M=config.block_m, BLOCK_N=config.block_n)
    if config.direction == "fwd":
        launches = recorded_launches(vars(fa2), lambda: fa2.attention(q, k, v, causal, **tiles))
    else:
        launches = recorded_launches(vars(fa2), lambda: fa2.attention_backward(q, k, v, out, lse, do, causal,
                                                                                **tiles, BLOCK_M1=config.block_n,
                                                                                BLOCK_N1=config.block_m))
    rows = []
    for call in launches:
        kind = FA2_KINDS[call[0].__name__]
        label = " ".join(["FA2"] + ["causal"] * causal + [kind] * (config.direction != "fwd"))
        rows.append(specialized(*call, label=label, kind=kind))
    return rows


# -- compiling and reading the machine code --
def unspecialized(kernel: Kernel) -> Kernel:
    """The kernel as a launch without divisibility facts compiles it: ints equal to 1 stay i32 arguments."""
    signature, constexprs = dict(kernel.signature), dict(kernel.constexprs)
    for i, p in enumerate(kernel.fn.params):
        if not p.is_constexpr and isinstance(constexprs.get((i,)), int):
            signature[p.name] = "i32"
            del constexprs[(i,)]
    return kernel._replace(signature=signature, constexprs=constexprs, attrs={})


def cubin(kernel: Kernel, config: Config):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    if not config.specialize:
        kernel = unspecialized(kernel)
    src = ASTSource(kernel.fn, kernel.signature, kernel.constexprs, kernel.attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": config.num_warps, "num_stages": config.num_stages})


def cuobjdump() -> str:
    import triton
    return triton.knobs.nvidia.cuobjdump.path


def measure(binary: bytes) -> dict:
    """Registers, stack and local memory (cuobjdump -res-usage), and SASS opcode counts."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(binary)
        f.flush()
        dump = subprocess.run([cuobjdump(), "-res-usage", "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    ops = Counter(INSTRUCTION.findall(dump))
    res = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|LOCAL):(\d+)", dump)}
    return {"registers": res["REG"], "stack": res["STACK"], "local": res["LOCAL"],
            **{col: sum(ops[o] for o in opcodes) for col, opcodes in COUNTS.items()},
            "sass": sum(ops.values()) - ops["NOP"]}     # NOPs only pad for alignment


def rows_of(job: str, config: Config) -> list[dict]:
    """One row per kernel of a job (a YARDSTICKS name or an .attn path); a failure is a row saying so."""
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
    name = job if job in YARDSTICKS else Path(job).stem
    try:
        if job in YARDSTICKS:
            kernels, yardstick = fa2_kernels(YARDSTICKS[job], config), None
        else:
            import attnc
            compiled = attnc.compile(job, backend="triton")
            kernels = attnc_kernels(compiled, config)
            yardstick = "fa2_causal" if compiled.variant.mask is not None else "fa2"
        if not kernels:
            raise RuntimeError(f"the {config.direction} launcher launched no kernel")
    except Exception as e:      # noqa: BLE001  (reported in the row)
        return [{"name": name, "kernel": None, "error": _short(e)}]
    rows = []
    for kernel in kernels:
        row = {"name": name, "kernel": kernel.label, "kind": kernel.kind, "yardstick": yardstick}
        try:
            ck = cubin(kernel, config)
            row.update(measure(ck.asm["cubin"]), shared=ck.metadata.shared)
        except Exception as e:  # noqa: BLE001
            row["error"] = _short(e)
        rows.append(row)
    return rows


def _short(e: Exception) -> str:
    """The error's first line, and its last where that says what was expected."""
    lines = [x.strip() for x in str(e).strip().splitlines() if x.strip()] or [""]
    text = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"
    return f"{type(e).__name__}: {text}"[:300]


def run(jobs: list[str], config: Config, workers: int) -> list[dict]:
    """Rows of every job, compiled in `workers` fresh processes (spawned: no interpreter-mode triton)."""
    if workers <= 1:
        return [r for job in jobs for r in rows_of(job, config)]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(rows_of, job, config) for job in jobs]
        out = []
        for job, fut in zip(jobs, futures):
            try:
                out += fut.result()
            except Exception as e:      # noqa: BLE001  (a worker that died: its job's row says so)
                out.append({"name": Path(job).stem, "kernel": None, "error": _short(e)})
        return out


# -- reporting --
COLUMNS = [("kernel", "kernel"), ("registers", "registers"), ("spills", "spills (STL+LDL)"),
           ("async", "async loads (LDGSTS/UTMA)"), ("ldg", "LDG"), ("hgmma", "HGMMA"), ("sass", "SASS"),
           ("vs", "SASS vs FA2")]


def table(rows: list[dict]) -> list[list[str]]:
    """Header and one line per row; "vs" is SASS over the row's yardstick (causal FA2 for masked variants),
    kernel for kernel of the same kind (forward; preprocess, dq, dkdv)."""
    by_name = {(r["name"], r["kind"]): r for r in rows if r["name"] in YARDSTICKS and "error" not in r}
    out = [[title for _, title in COLUMNS]]
    for r in rows:
        label = (r["name"] if r["kernel"] is None else f"{r['kernel']} (yardstick)" if r["name"] in YARDSTICKS
                 else f"{r['name']} ({r['kernel']})")
        if "error" in r:
            out.append([label, "failed"] + [""] * (len(COLUMNS) - 2))
            continue
        ref = by_name.get((r.get("yardstick") or "", r["kind"]))
        vs = f"{r['sass'] / ref['sass']:.2f}x{' (causal)' if r['yardstick'] == 'fa2_causal' else ''}" if ref else ""
        out.append([label] + [str(r[c]) for c, _ in COLUMNS[1:-1]] + [vs])
    return out


def failures(rows: list[dict]) -> str:
    return "\n".join(f"{r['name']}{'' if r['kernel'] is None else ' ' + r['kernel']} failed: {r['error']}"
                     for r in rows if "error" in r)


def markdown(lines: list[list[str]]) -> str:
    head, *body = lines
    rule = ["---"] + ["---:"] * (len(head) - 1)
    return "\n".join("| " + " | ".join(x) + " |" for x in [head, rule] + body)


def plain(lines: list[list[str]]) -> str:
    widths = [max(len(x[i]) for x in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(x, widths)))
                     for x in lines)


def main(argv=None) -> int:
    d = Config()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="*", type=Path, help="variant files (default: examples/*.attn)")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    ap.add_argument("--markdown", action="store_true", help="print a markdown table")
    ap.add_argument("--direction", choices=DIRECTIONS, default=d.direction)
    ap.add_argument("--dtype", choices=list(DTYPES), default=d.dtype)
    ap.add_argument("--head-dim", type=int, default=d.head_dim)
    ap.add_argument("--block-m", type=int, help="the program tile (backward: of dQ and, as keys, of dK/dV); default: "
                    "the launcher's, 128 forward and 64 backward at D=64")
    ap.add_argument("--block-n", type=int, help="the step tile; default: the launcher's, 64 forward and 32 backward "
                    "at D=64")
    ap.add_argument("--warps", type=int, default=d.num_warps)
    ap.add_argument("--stages", type=int, default=d.num_stages)
    ap.add_argument("--seq", type=int, default=d.seq, help="sequence length of the launch (default 4096)")
    ap.add_argument("--no-lse", action="store_true", help="attnc's plan without the row statistics")
    ap.add_argument("--deterministic", action="store_true",
                    help="backward: param gradients added in a fixed order (torch.use_deterministic_algorithms)")
    ap.add_argument("--no-specialize", action="store_true",
                    help="compile every int argument as a plain i32, without alignment facts")
    ap.add_argument("--jobs", type=int, default=2, help="compiling processes (default 2)")
    ap.add_argument("--out", type=Path, help="also write the JSON results to this file")
    ap.add_argument("--splits", type=int, default=d.splits,
                    help="forward: launch split-KV with this many programs per row, so the merge kernel runs too")
    a = ap.parse_args(argv)
    from attnc.backends.triton_launch import block_sizes
    bm, bn = block_sizes({"Q": a.seq, "KV": a.seq, "D": a.head_dim}, DTYPES[a.dtype],
                         "forward" if a.direction == "fwd" else "dq")
    config = Config(a.direction, a.dtype, a.head_dim, a.block_m or bm, a.block_n or bn, a.warps, a.stages, seq=a.seq,
                    lse=not a.no_lse, specialize=not a.no_specialize, splits=a.splits, deterministic=a.deterministic)
    files = a.files or sorted(EXAMPLES.glob("*.attn"))
    rows = run(list(YARDSTICKS) + [str(f) for f in files], config, a.jobs)
    result = {"config": asdict(config), "described": config.describe(), "rows": rows}
    if a.out is not None:
        a.out.write_text(json.dumps(result, indent=1) + "\n")
    if a.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"{config.describe()}\n")
        print(markdown(table(rows)) if a.markdown else plain(table(rows)))
        if failures(rows):
            print("\n" + failures(rows))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
