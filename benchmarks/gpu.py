"""The GPU suite: attnc's Triton kernels against torch.compile(flex_attention) and SDPA (flash, cuDNN).

    python benchmarks/gpu.py [--markdown] [--seqs 1024,4096,16384] [--dims 64,128]
    TRITON_INTERPRET=1 python benchmarks/gpu.py --smoke     # the plumbing on a CPU, tiny shapes

bf16, B x S = 16k tokens (B = 16384 // S), H = 16 heads at D=64 and 8 at D=128. Times are medians of
triton.testing.do_bench; TFLOP/s count 4·B·H·D per kept (query, key) pair (the mask's real density).
Results go to benchmarks/results/gpu.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import attnc
from attnc import bench
from attnc.runtime.inputs import random_params
from attnc.runtime.reference import evaluate, index_env

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu import SUITE as CPU_SUITE, alibi_slopes, document_ids  # noqa: E402  (the same variants and params)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "gpu.json"

# the CPU suite's variants, plus full attention (the rate the targets compare with)
SUITE = [("full", "full.attn", {}, "full")] + CPU_SUITE


def timer(smoke: bool):
    """Median milliseconds of a call: triton's do_bench on a GPU, attnc.bench.median_ms on a CPU."""
    if smoke:
        return lambda fn: bench.median_ms(fn, 1, 1)[0]
    import triton.testing
    return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def density(attn, params: dict, B: int, H: int, S: int, device) -> float:
    """The fraction of (query, key) pairs the mask keeps, evaluated in query chunks on the device."""
    v = attn.variant
    if v.mask is None:
        return 1.0
    kept, chunk = 0, max(1, 2**26 // (S * B * H))
    for start in range(0, S, chunk):
        rows = min(chunk, S - start)
        env = index_env(B, H, rows, S, {"B": B, "H": H, "HKV": H, "Q": S, "KV": S, "D": 0})
        env = {k: t.to(device) for k, t in env.items()}
        env["q_idx"] = env["q_idx"] + start
        kept += evaluate(v.mask, env, params).expand(B, H, rows, S).sum().item()
    return kept / (B * H * S * S)


def params_for(attn, B: int, H: int, S: int, device) -> dict:
    params = random_params(attn, B, H, H, S, S, 0, torch.Generator().manual_seed(0))
    if "slopes" in params:
        params["slopes"] = alibi_slopes(H)
    if "doc" in params:
        params["doc"] = document_ids(S)
    return {k: t.to(device) for k, t in params.items()}


def sdpa_call(q, k, v, kind: str, backend):
    from torch.nn.attention import sdpa_kernel

    def run():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=kind == "causal")
    return run


def matmul_rate(ms_of, device) -> float:
    """Measured bf16 matmul TFLOP/s (8192^3): the ceiling the attention kernels are compared with."""
    n = 8192
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    return 2 * n**3 / (ms_of(lambda: a @ b) * 1e-3) / 1e12


def run_suite(seqs, dims, smoke: bool) -> dict:
    device = "cpu" if smoke else "cuda"
    dtype = torch.float32 if smoke else torch.bfloat16
    ms_of = timer(smoke)
    rows = []
    for D in dims:
        H = 16 if D <= 64 else 8
        for S in seqs:
            B = max(1, 16384 // S) if not smoke else 1
            g = torch.Generator().manual_seed(0)
            q, k, v = (torch.randn(B, H, S, D, generator=g).to(device, dtype) for _ in range(3))
            for name, file, consts, sdpa_kind in SUITE:
                attn = attnc.compile(str(ROOT / "examples" / file), backend="triton", **consts)
                params = params_for(attn, B, H, S, device)
                flops = 4 * B * H * D * S * S * density(attn, params, B, H, S, device)
                row = {"variant": name, "S": S, "D": D, "B": B, "H": H, "tflops_per_ms": flops / 1e9}
                row["attnc"] = ms_of(lambda: attn(q, k, v, **params))
                flex = None if smoke else bench.flex_peer(attn, q, k, v, params)
                if flex is not None:
                    make_mask, call = flex
                    block_mask = make_mask()
                    row["flex"] = ms_of(lambda: call(block_mask))
                if sdpa_kind and not smoke:
                    from torch.nn.attention import SDPBackend
                    for label, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION),
                                           ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
                        try:
                            row[label] = ms_of(sdpa_call(q, k, v, sdpa_kind, backend))
                        except RuntimeError as e:         # a backend this build or GPU does not offer
                            row[label] = None
                            row[label + "_error"] = str(e).splitlines()[0]
                if smoke:
                    ref = attn.reference(q.double(), k.double(), v.double(), **{
                        n: t.double() if t.is_floating_point() else t for n, t in params.items()})
                    row["max_err"] = (attn(q, k, v, **params).double() - ref).abs().max().item()
                rows.append(row)
                print(f"S={S} D={D} {name}: attnc {row['attnc']:.3f} ms", file=sys.stderr)
    machine = {"device": "cpu (interpreter smoke run)" if smoke else torch.cuda.get_device_name(),
               "torch": torch.__version__, "triton": _triton_version()}
    if not smoke:
        machine["bf16_matmul_tflops"] = matmul_rate(ms_of, device)
    return {"machine": machine, "rows": rows}


def _triton_version() -> str:
    try:
        import triton
        return triton.__version__
    except ImportError:
        return "missing"


def targets(results: dict) -> list[list[str]]:
    rows = results["rows"]

    def ratio(row, peer):
        return row[peer] / row["attnc"] if row.get(peer) else None
    flex = [ratio(r, "flex") for r in rows if r.get("flex")]
    flash = [ratio(r, "sdpa_flash") for r in rows if r["variant"] == "causal" and r.get("sdpa_flash")]
    sig = [(r, s) for r in rows if r["variant"] == "sigmoid" for s in rows
           if s["variant"] == "full" and (s["S"], s["D"]) == (r["S"], r["D"])]
    sig_speedup = [s["attnc"] / r["attnc"] for r, s in sig]
    peak = results["machine"].get("bf16_matmul_tflops")
    big = [r["tflops_per_ms"] / r["attnc"] for r in rows if r["variant"] == "full" and r["S"] >= 16384 and r["D"] == 128]

    def line(what, values, goal, better=max):
        if not values:
            return [what, "n/a", "not measured"]
        v = min(values) if better is max else max(values)
        return [what, f"{v:.2f}", "met" if v >= goal else "NOT met"]
    out = [line("forward vs FlexAttention, worst variant (flex ms / attnc ms) >= 1.1", flex, 1.1),
           line("causal vs SDPA flash, worst shape (flash ms / attnc ms) >= 0.9", flash, 0.9),
           line("sigmoid vs our softmax (full), worst shape (softmax ms / sigmoid ms) >= 1.15", sig_speedup, 1.15)]
    if peak and big:
        out.append(line(f"non-causal S=16k D=128 TFLOP/s over the bf16 matmul rate ({peak:.0f}) >= 0.6",
                        [b / peak for b in big], 0.6))
    else:
        out.append(["non-causal S=16k D=128 at 60% of the bf16 matmul rate", "n/a", "not measured"])
    return out


def report(results: dict, markdown: bool) -> str:
    head = ["variant", "S", "D", "attnc ms", "attnc TFLOP/s", "flex ms (x)", "sdpa flash ms (x)", "sdpa cudnn ms (x)"]
    body = []
    for r in results["rows"]:
        def cell(peer):
            return "n/a" if not r.get(peer) else f"{r[peer]:.3f} ({r[peer] / r['attnc']:.2f}x)"
        body.append([r["variant"], str(r["S"]), str(r["D"]), f"{r['attnc']:.3f}",
                     f"{r['tflops_per_ms'] / r['attnc']:.1f}", cell("flex"), cell("sdpa_flash"), cell("sdpa_cudnn")])
    if "max_err" in results["rows"][0]:
        head.append("max err vs float64")
        for row, r in zip(body, results["rows"]):
            row.append(f"{r['max_err']:.1e}")
    lines = [f"machine: {results['machine']}", "", bench.grid(head, body, markdown), ""]
    if "interpreter" in results["machine"]["device"]:
        lines.append("smoke run on the Triton interpreter: these times say nothing about a GPU; no targets judged")
    else:
        lines.append(bench.grid(["target", "value", "status"], targets(results), markdown))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", default="1024,4096,16384")
    ap.add_argument("--dims", default="64,128")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="CPU tensors under TRITON_INTERPRET=1, S=64, D=16")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            ap.error("--smoke runs the Triton interpreter: set TRITON_INTERPRET=1")
        seqs, dims = [64], [16]
    else:
        if not torch.cuda.is_available():
            ap.error("no CUDA device: run with --smoke under TRITON_INTERPRET=1 to check the script on a CPU")
        seqs, dims = [int(s) for s in args.seqs.split(",")], [int(d) for d in args.dims.split(",")]
    results = run_suite(seqs, dims, args.smoke)
    print(report(results, args.markdown))
    if not args.smoke:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
