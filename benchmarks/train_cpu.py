"""The CPU training suite: forward + backward of the six variants against SDPA, eager autograd and flex's eager path, and peak memory.

    python benchmarks/train_cpu.py [--seqs 1024,4096] [--reps 5] [--markdown] [--parts suite,memory]
                                   [--memory-seqs 1024,2048,4096,8192,16384] [--quick]

Every time is the median of --reps interleaved rounds (each round runs every peer once) after one warm-up
call, fp32, B=1 H=8 D=64, q, k, v requiring grad, out.backward(dO) for a random dO. Peers: SDPA's fused
forward + backward (causal only), autograd through attn.reference (the materialized scores, every variant),
flex_attention uncompiled with its block mask (its compiled CPU path has no backward). Peak memory: the
resident memory one forward + backward adds, each S and variant in a fresh process. Results go to
benchmarks/results/train_cpu.json.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import attnc                                                            # noqa: E402
from attnc import bench                                                 # noqa: E402
from cpu import B, D, H, SUITE, _status_kib, example, log, machine, qkv, realistic_params    # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "train_cpu.json"
EAGER_MAX_SEQ = 8192           # the reference materializes B*H*S*S scores several times over: 8 GiB each at 16k
MEMORY_VARIANTS = ("causal", "alibi causal")     # one through SDPA's kernel, one through the tile loop


def suite(seqs, reps, peers):
    rows = []
    for seq in seqs:
        q, k, v = qkv(H, seq)
        for name, file, consts, sdpa_kind in SUITE:
            attn = attnc.compile(example(file), **consts)
            use = [p for p in peers if p != "eager" or seq <= EAGER_MAX_SEQ]
            row = bench.bench_train_variant(attn, q, k, v, realistic_params(attn, H, seq), sdpa_kind, reps, peers=use)
            rows.append({"variant": name, "seq": seq, **row})
            log(f"train S={seq}: {name}" + (f" ({row['errors']})" if row["errors"] else ""))
    return rows


def peak_child(seq, name):
    """In a fresh process: the resident-memory peak one forward + backward adds, MiB. Kernels are compiled
    and run once at a small S first; the inputs exist before the count starts, the gradients do not."""
    file, consts = next((f, c) for n, f, c, _ in SUITE if n == name)
    attn = attnc.compile(example(file), **consts)

    def step(seq):
        q, k, v = qkv(H, seq)
        dout = torch.randn_like(q)
        params = realistic_params(attn, H, seq)
        leaves = [t.requires_grad_() for t in (q, k, v)]
        return lambda: attn(*leaves, **params).backward(dout)
    step(256)()
    run = step(seq)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")        # resets VmHWM to the current VmRSS (Linux >= 4.0)
    before = _status_kib("VmRSS")
    run()
    return {"seq": seq, "variant": name, "peak_mib": (_status_kib("VmHWM") - before) / 1024}


def peak_memory(seqs):
    """The resident memory one forward + backward adds, MiB, per variant of MEMORY_VARIANTS and S, each in a
    fresh process (what the allocator holds counts: it is memory the call takes from the machine)."""
    rows = []
    for seq in seqs:
        row = {"seq": seq, "io_mib": 4 * B * H * seq * D * 4 / 2**20}       # out, dQ, dK, dV
        for name in MEMORY_VARIANTS:
            result = child("peak", seq, name)
            row[name] = result and result["peak_mib"]
        rows.append(row)
        log(f"memory S={seq}")
    return rows


def child(*args):
    """One measurement in a fresh interpreter; its JSON result, or None (with its stderr logged) on failure."""
    proc = subprocess.run([sys.executable, __file__, "--child", *map(str, args)], capture_output=True, text=True)
    if proc.returncode != 0:
        log(f"child {args} failed:\n" + "\n".join(proc.stderr.splitlines()[-15:]))
        return None
    return json.loads(proc.stdout.splitlines()[-1])


def targets(results):
    """Each target: its measured value and whether it is met (None while unmeasured)."""
    def target(value, met):
        return {"value": value, "met": None if value is None else bool(met)}
    rows = results.get("suite") or []
    top = max((r["seq"] for r in rows), default=None)
    at_top = [r for r in rows if r["seq"] == top and r["attnc"]]
    eager = [r["eager"] / r["attnc"] for r in at_top if r["eager"]]
    causal = next((r["attnc"] / r["sdpa"] for r in at_top if r["variant"] == "causal" and r["sdpa"]), None)
    mem = results.get("memory") or []
    slopes = []
    for name in MEMORY_VARIANTS:
        got = [r for r in mem if r.get(name)]
        if len(got) >= 2:
            slopes.append(math.log(got[-1][name] / got[0][name]) / math.log(got[-1]["seq"] / got[0]["seq"]))
    return {
        f"every variant at least 5x faster than eager at S={top} (min eager/attnc)":
            target(min(eager, default=None), eager and min(eager) >= 5 and len(eager) == len(at_top)),
        f"causal within 2.5x of SDPA forward+backward at S={top} (attnc/sdpa)":
            target(causal, causal is not None and causal <= 2.5),
        "peak memory grows like S*tile, not S^2 (largest exponent of S)":
            target(max(slopes, default=None), slopes and max(slopes) < 1.5),
    }


def report(results, markdown):
    m = results["machine"]
    fmt = lambda x, spec=".1f": "n/a" if x is None else format(x, spec)       # noqa: E731
    parts = [f"machine: {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads, torch {m['torch']}, "
             f"python {m['python']}; medians of {results['reps']} interleaved rounds; load average "
             f"{m['load_1min']:.2f} at start"]
    if results.get("suite"):
        cell = lambda r, p: ("fails" if p in r["errors"] else                   # noqa: E731
                             bench._cell(r.get(p), r.get("attnc")) if p != "attnc" else fmt(r.get("attnc")))
        body = [[r["variant"], str(r["seq"])] + [cell(r, p) for p in bench.TRAIN_PEERS] for r in results["suite"]]
        parts.append(f"forward + backward, B={B} H={H} D={D} fp32, ms; (x) = peer ms / attnc ms, >1: attnc faster\n"
                     + bench.grid(["variant", "S", "attnc ms", "sdpa ms", "eager ms", "flex eager ms"], body, markdown))
        errors = {f"{r['variant']} S={r['seq']} {p}": e for r in results["suite"] for p, e in r["errors"].items()}
        if errors:
            parts.append("peers that failed:\n" + "\n".join(f"- {k}: {e}" for k, e in errors.items()))
    if results.get("memory"):
        parts.append("resident memory one forward + backward adds, MiB (fresh process per cell)\n" + bench.grid(
            ["S"] + [f"{n} MiB" for n in MEMORY_VARIANTS] + ["out, dQ, dK, dV MiB", "one S x S fp32 score matrix MiB"],
            [[str(r["seq"])] + [fmt(r.get(n)) for n in MEMORY_VARIANTS] + [fmt(r["io_mib"]),
                                                                           fmt(B * H * r["seq"] ** 2 * 4 / 2**20, ".0f")]
             for r in results["memory"]], markdown))
    t = results["targets"]
    verdict = lambda x: "pending" if x["met"] is None else "met" if x["met"] else "NOT met"     # noqa: E731
    parts.append("targets\n" + bench.grid(["target", "value", "status"],
                                          [[k, fmt(v["value"], ".3g"), verdict(v)] for k, v in t.items()], markdown))
    return "\n\n".join(parts)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", default="1024,4096", help="sequence lengths of the suite (default 1024,4096)")
    ap.add_argument("--memory-seqs", default="1024,2048,4096,8192,16384", help="sequence lengths of the memory part")
    ap.add_argument("--reps", type=int, default=5, help="interleaved rounds per median (default 5)")
    ap.add_argument("--quick", action="store_true", help="S=512,1024, memory up to 2048, reps=3")
    ap.add_argument("--markdown", action="store_true", help="print markdown tables")
    ap.add_argument("--parts", default="suite,memory", help="comma-separated subset of suite,memory")
    ap.add_argument("--peers", default=",".join(bench.TRAIN_PEERS), help="comma-separated subset of "
                    + ",".join(bench.TRAIN_PEERS))
    ap.add_argument("--out", type=Path, default=RESULTS, help=f"JSON results file (default {RESULTS.relative_to(ROOT)})")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(peak_child(int(args.child[1]), args.child[2])))
        return 0
    seqs = [int(s) for s in args.seqs.split(",")]
    memory_seqs = [int(s) for s in args.memory_seqs.split(",")]
    if args.quick:
        seqs, memory_seqs, args.reps = [512, 1024], [512, 1024, 2048], 3
    parts = set(args.parts.split(","))
    if os.getloadavg()[0] > 0.5:
        log(f"warning: load average {os.getloadavg()[0]:.2f}: other work on this machine will skew the timings")
    results = {"machine": machine(), "reps": args.reps}
    if "suite" in parts:
        results["suite"] = suite(seqs, args.reps, args.peers.split(","))
    if "memory" in parts:
        results["memory"] = peak_memory(memory_seqs)
    results["targets"] = targets(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    tmp.replace(args.out)
    print(report(results, args.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
