"""The `attnc` command: show generated source, print the IR, check against the float64 oracle, benchmark.

Exit codes: 0 ok, 1 a check failed, 2 usage, spec or call error."""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import attnc
from attnc.errors import AttncError, CallError, SpecError

TARGETS = ("torch", "triton")
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
ATOL = {"fp32": 1e-5, "bf16": 2e-2, "fp16": 2e-2}
# (B, H, HKV, Q, KV, D, Dv): square, ragged + GQA + Q != KV, decoding with MQA, ragged past a tile edge
SHAPES = ((1, 2, 2, 128, 128, 32, 32), (2, 4, 2, 100, 173, 32, 24), (1, 4, 1, 1, 300, 64, 64),
          (2, 2, 2, 257, 257, 64, 64))


class UsageError(Exception):
    """A command line that names something attnc cannot use (exit 2, like argparse's own errors)."""


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:          # --help, --version, usage errors: argparse has printed; return its code
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 2
    try:
        return args.run(args)
    except (AttncError, UsageError) as e:
        print(f"attnc {args.command}: {e}" if not isinstance(e, SpecError) else str(e), file=sys.stderr)
        return 2
    except BrokenPipeError:          # `attnc show ... | head`: the reader left early, which is no error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="attnc", description="A compiler for attention variants.")
    p.add_argument("--version", action="version", version=f"attnc {attnc.__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    consts = argparse.ArgumentParser(add_help=False)
    consts.add_argument("-D", dest="consts", action="append", default=[], metavar="NAME=VALUE",
                        help="override a const of the variant (repeatable), e.g. -D window=512")

    show = sub.add_parser("show", parents=[consts], help="print the generated kernel source")
    show.add_argument("file", help="an .attn file")
    show.add_argument("--target", choices=TARGETS, default="torch")
    show.add_argument("--lse", action="store_true", help="the kernel that also returns the log-sum-exp")
    show.set_defaults(run=cmd_show)

    from attnc.passes import PASS_NAMES
    ir = sub.add_parser("ir", parents=[consts], help="print the cascade after each pass, with its pass count")
    ir.add_argument("file", help="an .attn file")
    ir.add_argument("--after", choices=PASS_NAMES, default=None, metavar="PASS",
                    help=f"stop after this pass: {', '.join(PASS_NAMES)} (default: all)")
    ir.set_defaults(run=cmd_ir)

    check = sub.add_parser("check", parents=[consts], help="compare kernels with a float64 reference")
    check.add_argument("files", nargs="+", metavar="FILE", help=".attn files")
    check.add_argument("--target", choices=TARGETS, default="torch")
    check.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    check.add_argument("--seed", type=int, default=0)
    check.set_defaults(run=cmd_check)

    bench = sub.add_parser("bench", parents=[consts], help="time against FlexAttention, SDPA and eager")
    bench.add_argument("file", help="an .attn file")
    bench.add_argument("--seq", type=int, default=1024, help="query and key length")
    bench.add_argument("--heads", type=int, default=8)
    bench.add_argument("--dim", type=int, default=64, help="head dimension of q, k and v")
    bench.add_argument("--batch", type=int, default=1)
    bench.add_argument("--reps", type=int, default=5)
    bench.set_defaults(run=cmd_bench)
    return p


def _consts(pairs: list[str]) -> dict[str, int | float]:
    out: dict[str, int | float] = {}
    for pair in pairs:
        name, eq, text = pair.partition("=")
        if not eq or not name.strip():
            raise UsageError(f"-D expects NAME=VALUE, got {pair!r}")
        try:
            value: int | float = int(text)
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                raise UsageError(f"-D {name}: {text!r} is not a number") from None
        out[name.strip()] = value
    return out


def _compile(path: str, args, backend: str | None = None):
    if not path.endswith(".attn"):
        raise UsageError(f"{path}: expected a path to an .attn file")
    return attnc.compile(path, backend=backend, **_consts(args.consts))


def _need_target(target: str) -> None:
    if target == "triton":
        try:
            from attnc.backends import triton_backend  # noqa: F401
        except (ImportError, NotImplementedError) as e:
            raise UsageError(f"the triton target is not available in this install ({e})") from None


# -- show, ir --
def cmd_show(args) -> int:
    _need_target(args.target)
    attn = _compile(args.file, args)
    try:
        text = attn.source(args.target, args.lse)
    except NotImplementedError as e:
        raise UsageError(f"the {args.target} target cannot render this variant yet ({e})") from None
    print(text)
    return 0


def cmd_ir(args) -> int:
    print(_compile(args.file, args).ir(after=args.after, stages=True))
    return 0


# -- check --
def cmd_check(args) -> int:
    import torch
    _need_target(args.target)
    dtype = getattr(torch, DTYPES[args.dtype])
    width = max(len(f) for f in args.files)
    head = ["file".ljust(width), "shape (B,H,HKV,Q,KV,D,Dv)".ljust(28), "max err".rjust(9), "bound".rjust(9),
            "lse err".rjust(9), "lse bound".rjust(9), "time ms".rjust(8), "ok"]
    print("  ".join(head))
    print("  ".join("-" * len(h) for h in head))
    code, n_ok, n_fail = 0, 0, 0
    for path in args.files:
        try:
            attn = _compile(path, args, args.target)
        except (AttncError, UsageError) as e:
            print(str(e), file=sys.stderr)
            code = 2
            continue
        for i, shape in enumerate(SHAPES):
            cells = [path.ljust(width), str(shape).replace(" ", "").ljust(28)]
            try:
                r = check_one(attn, shape, dtype, ATOL[args.dtype], torch.Generator().manual_seed(args.seed * 1009 + i))
            except Exception as e:      # keep checking the rest; the exit code says how bad it was
                label, why, bad = _failure(e, args.target)
                print("  ".join(cells + [label]), flush=True)
                print(f"{path}: {why}", file=sys.stderr)
                code, n_fail = max(code, bad), n_fail + 1
                continue
            cells += [f"{r['err']:9.2e}", f"{r['bound']:9.2e}", f"{r['lse_err']:9.2e}", f"{r['lse_bound']:9.2e}",
                      f"{r['ms']:8.2f}", "ok" if r["ok"] else f"FAIL ({r['why']})"]
            print("  ".join(cells), flush=True)
            n_ok, n_fail = n_ok + r["ok"], n_fail + (not r["ok"])
            if not r["ok"]:
                code = max(code, 1)
    print(f"\n{len(args.files)} file(s), {n_ok + n_fail} check(s): {n_ok} ok, {n_fail} failed "
          f"({args.target}, {args.dtype})")
    return code


def check_one(attn, shape, dtype, atol: float, g) -> dict:
    """One shape: the kernel and the same-dtype eager reference, both measured against the float64 oracle."""
    import torch
    from attnc.runtime.inputs import random_inputs, random_params
    B, H, HKV, Q, KV, D, Dv = shape
    q, k, v = random_inputs(attn, B, H, HKV, Q, KV, D, Dv, dtype, g)
    params = random_params(attn, B, H, HKV, Q, KV, D, g)
    params64 = {n: t.double() if t.is_floating_point() else t for n, t in params.items()}
    ref, ref_lse = attn.reference(q.double(), k.double(), v.double(), return_lse=True, **params64)
    eager, eager_lse = attn.reference(q, k, v, return_lse=True, **params)
    with torch.inference_mode():
        out, lse = attn(q, k, v, return_lse=True, **params)
        ms = _median_ms(lambda: attn(q, k, v, return_lse=True, **params))
    err, eager_err = _max_err(out, ref), _max_err(eager, ref)
    ninf = torch.isneginf(ref_lse)
    finite = torch.isfinite(ref_lse)
    lse_err = _max_err(lse[finite], ref_lse[finite])
    lse_eager = _max_err(eager_lse[finite], ref_lse[finite])
    bound, lse_bound = _bound(eager_err, atol), _bound(lse_eager, atol)
    why = []
    if tuple(out.shape) != (B, H, Q, Dv) or out.dtype != dtype:
        why.append(f"out is {out.dtype} {tuple(out.shape)}")
    if not err <= bound:
        why.append("out")
    if not torch.equal(torch.isneginf(lse), ninf):
        why.append("lse -inf rows")
    if not lse_err <= lse_bound:
        why.append("lse")
    return {"err": err, "bound": bound, "lse_err": lse_err, "lse_bound": lse_bound, "ms": ms, "ok": not why,
            "why": ", ".join(why)}


def _failure(e: Exception, target: str) -> tuple[str, str, int]:
    """(table cell, message, exit code) for a check that raised instead of giving a result."""
    if isinstance(e, CallError):
        return "CALL ERROR", str(e), 2
    if isinstance(e, (NotImplementedError, ImportError)):
        return "NOT AVAILABLE", f"the {target} target cannot run this variant yet ({e})", 2
    return "ERROR", f"internal error {type(e).__name__}: {e}{_where(e)}", 1      # a compiler bug


def _max_err(x, ref) -> float:
    if x.numel() == 0:
        return 0.0
    d = (x.double() - ref).abs()
    return math.nan if d.isnan().any() else d.max().item()


def _bound(eager_err: float, atol: float) -> float:
    """Flex attention's rule: at most twice the same-dtype eager error, and never tighter than atol."""
    return max(2 * eager_err, atol) if math.isfinite(eager_err) else atol


def _median_ms(fn, reps: int = 3) -> float:
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def _where(e: BaseException) -> str:
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return f" (at {tb.tb_frame.f_code.co_filename}:{tb.tb_lineno})" if tb is not None else ""


# -- bench --
def cmd_bench(args) -> int:
    try:
        from attnc import bench
    except ImportError as e:
        raise UsageError(f"benchmarks are not available in this install ({e})") from None
    import torch
    from attnc.runtime.inputs import random_inputs, random_params
    attn = _compile(args.file, args)
    g = torch.Generator().manual_seed(0)
    B, H, S, D = args.batch, args.heads, args.seq, args.dim
    q, k, v = random_inputs(attn, B, H, H, S, S, D, D, torch.float32, g)
    params = random_params(attn, B, H, H, S, S, D, g)
    row = bench.bench_variant(attn, q, k, v, params, sdpa_kind=sdpa_kind(attn.variant), reps=args.reps)
    row["variant"] = attn.variant.name
    print(f"{attn.variant.name}: B={B} H={H} S={S} D={D}, fp32, median of {args.reps} "
          f"({torch.get_num_threads()} threads)")
    print(bench.format_table([row]))
    return 0


def sdpa_kind(variant) -> str | None:
    """'full' or 'causal' when SDPA computes exactly this variant, else None."""
    from attnc.ir import expr as E
    if variant.norm_kind != "softmax" or variant.score != E.SCORE or variant.params:
        return None
    if variant.mask is None:
        return "full"
    causal = E.make(E.Op.GE, E.index("q_idx"), E.index("kv_idx"))
    return "causal" if variant.mask == causal else None


if __name__ == "__main__":
    sys.exit(main())
