"""The `attnc` command: show generated source, print the IR, check against the float64 oracle, benchmark,
and look after the kernel cache.

Exit codes: 0 ok, 1 a check failed, 2 usage, spec or call error."""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
import textwrap
import time

import attnc
from attnc.errors import AttncError, CallError, SpecError

TARGETS = ("torch", "triton")
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
ATOL = {"fp32": 1e-5, "bf16": 2e-2, "fp16": 2e-2}
# (B, H, HKV, Q, KV, D, Dv): square, ragged + GQA + Q != KV, decoding with MQA, ragged past a tile edge
SHAPES = ((1, 2, 2, 128, 128, 32, 32), (2, 4, 2, 100, 173, 32, 24), (1, 4, 1, 1, 300, 64, 64),
          (2, 2, 2, 257, 257, 64, 64))
SHAPE_NAMES = ("B", "H", "HKV", "Q", "KV", "D", "Dv")
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class UsageError(Exception):
    """A command line that names something attnc cannot use (exit 2, like argparse's own errors)."""


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:          # --help, --version, usage errors: argparse has printed; return its code
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 2
    try:
        return args.run(args)
    except (AttncError, UsageError) as e:
        print(f"attnc {args.command}: {e}" if not isinstance(e, SpecError) else str(e), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nattnc {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:          # `attnc show ... | head`: the reader left early, which is no error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


# -- the command line --
class Parser(argparse.ArgumentParser):
    """argparse with a one-line usage error: `attnc bench: error: argument --seq: ... (see ...)`, exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


class Formatter(argparse.RawDescriptionHelpFormatter):
    """Names the default of every option that has one worth naming."""

    def _get_help_string(self, action):
        text = action.help or ""
        quiet = action.default is None or action.default is False or action.default == [] \
            or action.default == argparse.SUPPRESS or not action.option_strings or "(default:" in text
        return text if quiet else f"{text} (default: %(default)s)"


def _count(text: str) -> int:
    """A positive integer argument (lengths, heads, repetitions)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {n}")
    return n


def _seed(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return n


def _const(text: str) -> tuple[str, int | float]:
    """NAME=VALUE with a finite int or float value."""
    name, eq, value = text.partition("=")
    name = name.strip()
    if not eq or not NAME.fullmatch(name):
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    try:
        return name, int(value)
    except ValueError:
        pass
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name}: {value!r} is not a number") from None
    if not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"{name}: {value!r} is not a finite number")
    return name, number


def _device(text: str) -> str:
    if not re.fullmatch(r"cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    return text


def build_parser() -> argparse.ArgumentParser:
    def command(name: str, about: str, run, *parents) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=about, description=about[0].upper() + about[1:] + ".",
                           parents=list(parents), formatter_class=Formatter)
        if run is not None:
            p.set_defaults(run=run)
        return p

    examples = ", ".join(example_names()) or "(none installed)"
    p = Parser(prog="attnc", description="A compiler for attention variants.", formatter_class=Formatter,
               epilog=textwrap.fill(f"FILE is an .attn file or the name of a packaged example: {examples}.")
               + "\n\nExit codes: 0 ok, 1 a check failed, 2 a usage, spec or call error.")
    p.add_argument("--version", action="version", version=f"attnc {attnc.__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    consts = Parser(add_help=False)
    consts.add_argument("-D", dest="consts", action="append", default=[], type=_const, metavar="NAME=VALUE",
                        help="override a const of the variant (repeatable), e.g. -D window=512")
    spec = "an .attn file, or the name of a packaged example (causal, alibi, ...)"
    progress = Parser(add_help=False)
    progress.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                          help="report progress on stderr (default: when stderr is a terminal)")

    show = command("show", "print the generated kernel source", cmd_show, consts)
    show.add_argument("file", metavar="FILE", help=spec)
    show.add_argument("--target", choices=TARGETS, default="torch", help="the backend whose kernel is shown")
    show.add_argument("--lse", action="store_true", help="the kernel that also returns the log-sum-exp")
    show.add_argument("--backward", action="store_true",
                      help="the backward kernels (the gradients of q, k, v and float params) instead of the forward")

    from attnc.backends import backend
    from attnc.passes import BACKWARD_PASS_NAMES, PASS_NAMES
    plan_names = ["plan"] + [n for t in TARGETS for n in backend(t).PLAN_PASSES]
    stages = list(dict.fromkeys(PASS_NAMES + BACKWARD_PASS_NAMES + plan_names))
    ir = command("ir", "print the cascade after each pass, with its pass count, then each kernel's plan", cmd_ir,
                 consts)
    ir.add_argument("file", metavar="FILE", help=spec)
    ir.add_argument("--after", choices=stages, default=None, metavar="PASS",
                    help=f"stop after this pass: the cascade's {', '.join(PASS_NAMES)} (backward: "
                         f"{', '.join(BACKWARD_PASS_NAMES)}), then the plan's {', '.join(dict.fromkeys(plan_names))} "
                         f"(default: all)")
    ir.add_argument("--backward", action="store_true", help="the backward cascade and kernels")
    ir.add_argument("--target", choices=TARGETS, default="torch", help="the backend whose plan passes are shown")

    check = command("check", "compare kernels with a float64 reference", cmd_check, consts, progress)
    check.add_argument("files", nargs="+", metavar="FILE",
                       help=".attn files, or names of packaged examples (causal, alibi, ...)")
    check.add_argument("--target", choices=TARGETS, default="torch", help="the backend to check")
    check.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="dtype of q, k and v")
    check.add_argument("--seed", type=_seed, default=0, metavar="N", help="seed of the random inputs and params")
    check.add_argument("--json", action="store_true",
                       help="print one JSON object per check (file and shape) instead of the table")
    check.add_argument("--grad", action="store_true",
                       help="also check the gradients of q, k, v and every float param against autograd of the "
                            "float64 reference")

    bench = command("bench", "time against FlexAttention, SDPA and eager", cmd_bench, consts, progress)
    bench.add_argument("file", metavar="FILE", help=spec)
    bench.add_argument("--seq", type=_count, metavar="N", default=1024, help="query length")
    bench.add_argument("--kv-seq", type=_count, metavar="N", default=None, help="key length (default: --seq)")
    bench.add_argument("--heads", type=_count, metavar="N", default=8, help="query heads")
    bench.add_argument("--kv-heads", type=_count, metavar="N", default=None,
                       help="key/value heads; --heads must be a multiple (default: --heads)")
    bench.add_argument("--dim", type=_count, metavar="N", default=64, help="head dimension of q, k and v")
    bench.add_argument("--batch", type=_count, metavar="N", default=1, help="batch size")
    bench.add_argument("--reps", type=_count, metavar="N", default=5,
                       help="timed calls per peer; the median is reported")
    bench.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="dtype of q, k and v")
    bench.add_argument("--device", type=_device, default="cpu", help="cpu, cuda or cuda:N")
    bench.add_argument("--json", action="store_true", help="print the result as one JSON object")
    bench.add_argument("--plot", metavar="FILE.png", default=None,
                       help="save a bar chart of the times (needs matplotlib: pip install 'attnc[plot]')")

    from attnc.runtime import cache
    cache_cmd = command("cache", f"the kernel cache ({cache.cache_dir()})", None)
    what = cache_cmd.add_subparsers(dest="action", required=True, metavar="ACTION")
    info = what.add_parser("info", help="where the cache is, how many kernels it holds, their size",
                           formatter_class=Formatter)
    info.add_argument("--json", action="store_true", help="print the result as one JSON object")
    info.set_defaults(run=cmd_cache_info)
    clear = what.add_parser("clear", help="remove attnc's kernel files from the cache", formatter_class=Formatter)
    clear.set_defaults(run=cmd_cache_clear)
    return p


def example_names() -> list[str]:
    from attnc.frontend.parser import resource_dir
    try:
        return sorted(f.stem for f in resource_dir("examples").glob("*.attn"))
    except FileNotFoundError:
        return []


def spec_path(arg: str) -> str:
    """arg when it names a file; else the packaged example it names (`causal`, `alibi.attn`)."""
    if os.path.exists(arg) or "/" in arg or os.sep in arg:
        return arg
    name = arg[:-len(".attn")] if arg.endswith(".attn") else arg
    if name in example_names():
        from attnc.frontend.parser import resource_dir
        return str(resource_dir("examples") / f"{name}.attn")
    raise UsageError(f"{arg}: no such file, and no packaged example of that name "
                     f"(examples: {', '.join(example_names()) or 'none installed'})")


def _compile(arg: str, args, backend: str | None = None):
    path = spec_path(arg)
    if not path.endswith(".attn"):
        raise UsageError(f"{arg}: expected a path to an .attn file or the name of an example")
    return attnc.compile(path, backend=backend, **dict(args.consts))


def _need_target(target: str) -> None:
    if target == "triton":
        try:
            from attnc.backends import triton_backend  # noqa: F401
        except (ImportError, NotImplementedError) as e:
            raise UsageError(f"the triton target is not available in this install ({e})") from None


class Progress:
    """Status lines on stderr for long runs: one line rewritten in place on a terminal, a line per step
    elsewhere; silent unless enabled (--progress, or by default when stderr is a terminal)."""

    def __init__(self, enabled: bool | None):
        self.tty = sys.stderr.isatty()
        self.on = self.tty if enabled is None else enabled

    def __call__(self, text: str) -> None:
        if self.on:
            sys.stderr.write(f"\r\x1b[K{text}" if self.tty else f"{text}\n")
            sys.stderr.flush()

    def clear(self) -> None:
        if self.on and self.tty:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


def _finite(x) -> float | None:
    """JSON has no NaN or infinity: a value that is not finite is written as null."""
    return x if x is not None and math.isfinite(x) else None


# -- show, ir --
def cmd_show(args) -> int:
    _need_target(args.target)
    attn = _compile(args.file, args)
    try:
        text = attn.source(args.target, args.lse, backward=args.backward)
    except NotImplementedError as e:
        raise UsageError(f"the {args.target} target cannot render this variant yet ({e})") from None
    print(text)
    return 0


def cmd_ir(args) -> int:
    _need_target(args.target)
    print(_compile(args.file, args).ir(after=args.after, stages=True, backward=args.backward, target=args.target))
    return 0


# -- check --
def cmd_check(args) -> int:
    """Each file at each of SHAPES against the float64 oracle: a table, or one JSON object per check.

    JSON keys: file, variant, check ('oracle'), shape {B,H,HKV,Q,KV,D,Dv}, target, dtype, seed, status
    ('ok', 'fail', 'error', 'call_error', 'not_available', 'compile_error'), ok, err, bound, lse_err,
    lse_bound, ms (null where not finite or not measured), why (the parts that failed), error (message).
    """
    import torch
    _need_target(args.target)
    dtype = getattr(torch, DTYPES[args.dtype])
    progress = Progress(args.progress)
    width = max(len(f) for f in args.files)
    head = ["file".ljust(width), "shape (B,H,HKV,Q,KV,D,Dv)".ljust(28), "max err".rjust(9), "bound".rjust(9),
            "lse err".rjust(9), "lse bound".rjust(9), "time ms".rjust(8), "ok"]
    if not args.json:
        print("  ".join(head))
        print("  ".join("-" * len(h) for h in head))
    code, n_ok, n_fail, n_broken = 0, 0, 0, 0
    base = {"target": args.target, "dtype": args.dtype, "seed": args.seed}
    for n_file, arg in enumerate(args.files, 1):
        try:
            attn = _compile(arg, args, args.target)
        except (AttncError, UsageError) as e:
            print(str(e), file=sys.stderr)
            _emit(args, {"file": arg, "variant": None, "check": "oracle", "shape": None, **base,
                         **_failed("compile_error", str(e))},
                  [arg.ljust(width), "-".ljust(28), "CANNOT COMPILE"], progress)
            code, n_fail, n_broken = 2, n_fail + 1, n_broken + 1
            continue
        checks = _checks(attn, args, dtype)
        for i, (kind, shape, run) in enumerate(checks, 1):
            progress(f"checking {arg} ({n_file}/{len(args.files)}): {kind} {shape} ({i}/{len(checks)})")
            record = {"file": arg, "variant": attn.variant.name, "check": kind,
                      "shape": dict(zip(SHAPE_NAMES, shape)), **base}
            cells = [arg.ljust(width), str(shape).replace(" ", "").ljust(28)]
            try:
                r = run()
            except Exception as e:      # keep checking the rest; the exit code says how bad it was
                status, label, why, bad = _failure(e, args.target)
                print(f"{arg}: {why}", file=sys.stderr)
                _emit(args, {**record, **_failed(status, why)}, cells + [label], progress)
                code, n_fail = max(code, bad), n_fail + 1
                continue
            cells += [f"{r['err']:9.2e}", f"{r['bound']:9.2e}", f"{r['lse_err']:9.2e}", f"{r['lse_bound']:9.2e}",
                      f"{r['ms']:8.2f}", "ok" if r["ok"] else f"FAIL ({', '.join(r['why'])})"]
            _emit(args, {**record, "status": "ok" if r["ok"] else "fail", "ok": r["ok"],
                         **{k: _finite(r[k]) for k in ("err", "bound", "lse_err", "lse_bound", "ms")},
                         "why": r["why"], "error": None}, cells, progress)
            n_ok, n_fail = n_ok + r["ok"], n_fail + (not r["ok"])
            if not r["ok"]:
                code = max(code, 1)
    progress.clear()
    summary = (f"{len(args.files)} file(s), {n_ok + n_fail} check(s): {n_ok} ok, {n_fail} failed "
               f"({args.target}, {args.dtype})" + (f"; {n_broken} file(s) did not compile" if n_broken else ""))
    if args.json:                   # stdout holds only the JSON objects
        print(summary, file=sys.stderr)
    else:
        print(f"\n{summary}")
    return code


def _checks(attn, args, dtype) -> list:
    """(kind, shape, run) for every check of one compiled variant; run() returns check_one's dict.

    First the oracle comparison at each of SHAPES. Properties beyond it (decode equals prefill, from
    attnc.runtime.decode_check.decode_matches_prefill) are appended here, each as more (kind, shape, run)
    whose run() returns the same keys: err, bound, lse_err, lse_bound, ms, ok, why.
    """
    import torch
    from attnc.runtime import decode_check
    seed = args.seed * 1009
    out = [("oracle", shape, lambda shape=shape, i=i: check_one(
                attn, shape, dtype, ATOL[args.dtype], torch.Generator().manual_seed(seed + i)))
           for i, shape in enumerate(SHAPES)]
    out.append(("decode_prefill", decode_check.SHAPE, lambda: decode_check.decode_matches_prefill(
        attn, decode_check.SHAPE, dtype, ATOL[args.dtype], torch.Generator().manual_seed(seed + len(SHAPES)))))
    if getattr(args, "grad", False):
        out += [("grad", shape, lambda shape=shape, i=i: grad_one(
                    attn, shape, dtype, ATOL[args.dtype], torch.Generator().manual_seed(seed + 100 + i)))
                for i, shape in enumerate(GRAD_SHAPES)]
    return out


def _emit(args, record: dict, cells: list[str], progress: Progress) -> None:
    progress.clear()
    print(json.dumps(record) if args.json else "  ".join(cells), flush=True)


def _failed(status: str, message: str) -> dict:
    return {"status": status, "ok": False, "err": None, "bound": None, "lse_err": None, "lse_bound": None,
            "ms": None, "why": [], "error": message}


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
            "why": why}


# gradients: the oracle's shapes without the single-query decode (ragged + GQA + Q != KV, and past a tile edge)
GRAD_SHAPES = (SHAPES[1], (2, 2, 2, 129, 129, 32, 32))


def grad_one(attn, shape, dtype, atol: float, g) -> dict:
    """Gradients of q, k, v and every float param of a random linear loss of out and lse: the kernel's and the
    same-dtype eager reference's, both against autograd of the float64 reference. err and bound are the
    worst gradient's (flex attention's rule on each gradient, at its own scale); lse columns are not used."""
    import torch
    from attnc.runtime.inputs import random_inputs, random_params
    B, H, HKV, Q, KV, D, Dv = shape
    q, k, v = random_inputs(attn, B, H, HKV, Q, KV, D, Dv, dtype, g)
    params = random_params(attn, B, H, HKV, Q, KV, D, g)
    seed = int(torch.randint(0, 2 ** 31, (), generator=g))

    def grads(fn, dt):
        qq, kk, vv = (t.to(dt).detach().requires_grad_() for t in (q, k, v))
        pp = {n: t.to(dt).detach().requires_grad_() if t.is_floating_point() else t for n, t in params.items()}
        out, lse = fn(qq, kk, vv, return_lse=True, **pp)
        w = torch.Generator().manual_seed(seed)
        loss = (out * torch.randn(out.shape, generator=w).to(dt)).sum()
        loss = loss + (torch.where(torch.isinf(lse), 0, lse) * torch.randn(lse.shape, generator=w).to(lse.dtype)).sum()
        loss.backward()
        return {"q": qq.grad, "k": kk.grad, "v": vv.grad, **{n: pp[n].grad for n in pp if pp[n].is_floating_point()}}

    got = grads(attn, dtype)                    # compiles the backward kernels; the second call is timed
    t0 = time.perf_counter()
    grads(attn, dtype)
    ms = (time.perf_counter() - t0) * 1e3
    ref, eager = grads(attn.reference, torch.float64), grads(attn.reference, dtype)
    worst, why = (0.0, atol, 0.0), []
    for name, r in ref.items():
        if got[name] is None:
            why.append(f"no gradient for {name}")
            continue
        err, eager_err = _max_err(got[name], r), _max_err(eager[name], r)
        bound = max(_bound(eager_err, atol), 2e-5 * max(1.0, r.abs().max().item()) if dtype == torch.float32 else 0)
        if not err <= bound:
            why.append(f"d{name}")
        ratio = err / bound if math.isfinite(err) else math.inf
        if ratio >= worst[2]:
            worst = (err, bound, ratio)
    return {"err": worst[0], "bound": worst[1], "lse_err": math.nan, "lse_bound": math.nan, "ms": ms,
            "ok": not why, "why": why}


def _failure(e: Exception, target: str) -> tuple[str, str, str, int]:
    """(status, table cell, message, exit code) for a check that raised instead of giving a result."""
    if isinstance(e, CallError):
        return "call_error", "CALL ERROR", str(e), 2
    if isinstance(e, (NotImplementedError, ImportError)):
        return "not_available", "NOT AVAILABLE", f"the {target} target cannot run this variant yet ({e})", 2
    return "error", "ERROR", f"internal error {type(e).__name__}: {e}{_where(e)}", 1      # a compiler bug


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
    """One shape, attnc and its peers: a table, or one JSON object (keys in attnc.bench.record)."""
    try:
        from attnc import bench
    except ImportError as e:
        raise UsageError(f"benchmarks are not available in this install ({e})") from None
    import torch
    from attnc.runtime.inputs import random_inputs, random_params
    B, H, Q, D = args.batch, args.heads, args.seq, args.dim
    HKV, KV = args.kv_heads or H, args.kv_seq or Q
    if H % HKV:
        raise UsageError(f"--heads {H} must be a multiple of --kv-heads {HKV}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: no CUDA device is available")
    if args.plot is not None:
        try:
            bench.check_plot_path(args.plot)      # before the run, not after minutes of timing
        except bench.PlotError as e:
            raise UsageError(str(e)) from None
    attn = _compile(args.file, args)
    progress = Progress(args.progress)
    dtype = getattr(torch, DTYPES[args.dtype])
    g = torch.Generator().manual_seed(0)
    q, k, v = random_inputs(attn, B, H, HKV, Q, KV, D, D, dtype, g, device=args.device)
    params = random_params(attn, B, H, HKV, Q, KV, D, g, device=args.device)
    row = bench.bench_variant(attn, q, k, v, params, sdpa_kind=bench.sdpa_kind_of(attn.variant, Q, KV), reps=args.reps,
                              progress=progress)
    progress.clear()
    row["variant"] = attn.variant.name
    record = bench.record(row, q, k, v, args.reps, spec_path(args.file))
    title = (f"{attn.variant.name}: B={B} H={H} HKV={HKV} Q={Q} KV={KV} D={D}, {args.dtype} on {args.device}, "
             f"median of {args.reps} ({record['threads']} threads)")
    if args.plot is not None:
        bench.plot(row, args.plot, title)
    if args.json:
        print(json.dumps(record))
    else:
        print(title)
        print(bench.format_table([row]))
        if args.plot is not None:
            print(f"plot: {args.plot}")
    return 0


# -- cache --
def cmd_cache_info(args) -> int:
    from attnc.runtime import cache
    info = cache.info()
    if args.json:
        print(json.dumps(info))
    else:
        print(f"path     {info['path']}\nentries  {info['entries']}\nsize     {_size(info['bytes'])}")
    return 0


def cmd_cache_clear(args) -> int:
    from attnc.runtime import cache
    print(f"removed {cache.clear()} file(s) from {cache.cache_dir()}")
    return 0


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} bytes"
    return f"{n / 1024:.1f} KiB" if n < 1 << 20 else f"{n / (1 << 20):.1f} MiB"


if __name__ == "__main__":
    sys.exit(main())
