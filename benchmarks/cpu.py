"""The CPU suite: six variants against FlexAttention, SDPA and eager, first-result latency, long document masking, peak memory.

    python benchmarks/cpu.py [--seq 4096,16384] [--quick] [--markdown] [--peers-only]
                             [--parts suite,first,long,memory,heap]

Every number is a median of --reps interleaved rounds (each round calls every peer once) after one warm-up
call, all peers in the same run on the same inputs (fp32, B=1 H=8 D=64); eager is left out above S=8192,
where its materialized scores need 8 GiB apiece. The heap part times attnc in two fresh processes, with and
without ATTNC_HEAP_TILES=1. Results go to benchmarks/results/cpu.json.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

import attnc
from attnc import bench
from attnc.runtime.inputs import random_params

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
RESULTS = ROOT / "benchmarks" / "results" / "cpu.json"

# (row name, example file, consts, sdpa_kind)
SUITE = [
    ("causal", "causal.attn", {}, "causal"),
    ("sliding window 256", "sliding_window.attn", {"window": 256}, None),
    ("alibi causal", "alibi.attn", {}, None),
    ("softcap (full)", "softcap.attn", {}, None),
    ("document causal", "document.attn", {}, None),
    ("sigmoid", "sigmoid.attn", {}, None),
]
B, H, D = 1, 8, 64
LONG_H = 4                 # document masking at S=32768 uses 4 heads: 8 would double every working set for no new information
FIRST_SEQ = 1024           # first-result latency is about compiling, so a small input
MEMORY_PEERS = ("attnc", "flex", "sdpa", "eager")
EAGER_MAX_SEQ = 8192        # above, the materialized B*H*S*S scores take 8 GiB apiece
HEAP_VARIANTS = ("causal", "alibi causal", "softcap (full)", "sigmoid")   # SDPA's spans and the tile loop


def machine():
    """What the numbers were measured on: CPU model, cores, torch threads, versions."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((l.split(":", 1)[1].strip() for l in cpuinfo.splitlines() if l.startswith("model name")), platform.processor())
    return {"cpu": model, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "attnc": getattr(attnc, "__version__", "unknown"),
            "load_1min": os.getloadavg()[0]}


def example(name):
    """The path of an example variant, as compile() takes it."""
    return str(EXAMPLES / name)


def qkv(heads, seq, seed=0):
    """Random fp32 q, k, v of shape [B, heads, seq, D]."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, heads, seq, D, generator=g) for _ in range(3))


def alibi_slopes(heads):
    """ALiBi's geometric slopes 2^(-8(h+1)/H)."""
    return 2.0 ** (-8.0 * torch.arange(1, heads + 1, dtype=torch.float32) / heads)


def document_ids(seq, seed=0):
    """Sorted int32 document ids for seq tokens; lengths uniform in [1, 2*mean), mean ~1k tokens up to S=4096, ~2k beyond."""
    mean = min(seq // 4, 1024) if seq <= 4096 else 2048
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 2 * mean, (2 * seq // mean + 16,), generator=g)   # ~2x seq tokens: always enough
    return torch.repeat_interleave(torch.arange(len(lengths), dtype=torch.int32), lengths)[:seq].contiguous()


def realistic_params(attn, heads, seq):
    """The variant's params, with ALiBi slopes and document ids as real models use them instead of random values."""
    params = random_params(attn, B, heads, heads, seq, seq, D, torch.Generator().manual_seed(0))
    if "slopes" in params:
        params["slopes"] = alibi_slopes(heads)
    if "doc" in params:
        params["doc"] = document_ids(seq)
    return params


def suite(seq, reps, peers):
    """bench_variant for each variant of SUITE at one sequence length."""
    q, k, v = qkv(H, seq)
    rows = []
    peers = [p for p in peers if p != "eager" or seq <= EAGER_MAX_SEQ]
    for name, file, consts, sdpa_kind in SUITE:
        attn = attnc.compile(example(file), **consts)
        row = bench.bench_variant(attn, q, k, v, realistic_params(attn, H, seq), sdpa_kind, reps, peers=peers)
        rows.append({"variant": name, "seq": seq, **row})
        log(f"suite S={seq}: {name}" + (f" ({row['errors']})" if row["errors"] else ""))
    return rows


def heap_child(seq, reps):
    """In a fresh process (ATTNC_HEAP_TILES set or not by the parent): attnc's median ms on HEAP_VARIANTS."""
    q, k, v = qkv(H, seq)
    calls = {}
    for name, file, consts, _ in SUITE:
        if name in HEAP_VARIANTS:
            attn = attnc.compile(example(file), **consts)
            params = realistic_params(attn, H, seq)
            calls[name] = lambda attn=attn, params=params: attn(q, k, v, **params)
    with torch.inference_mode():
        return {name: ms for name, (ms, _) in bench.interleaved_ms(calls, 1, reps).items()}


def heap(seq, reps, rounds=2):
    """What raising glibc's mmap threshold buys: the same timings in processes without and with it, the
    settings alternating for `rounds` rounds; each variant's lowest median per setting."""
    out = {"seq": seq, "0": {}, "1": {}}
    for _ in range(rounds):
        for setting in ("0", "1"):
            got = child("heap", seq, reps, env={"ATTNC_HEAP_TILES": setting}) or {}
            for name, ms in got.items():
                out[setting][name] = min(ms, out[setting].get(name, ms))
    log(f"heap S={seq}")
    return out


def first_result_child(seq):
    """In a fresh process with an empty ATTNC_CACHE_DIR: compile + first call of a never-seen variant, for attnc and for flex."""
    q, k, v = qkv(H, seq)
    window = 257 + time.time_ns() % 700      # a width this process never compiled; flex's FX-cache hits are recorded
    warm = attnc.compile(example("causal.attn"))
    warm(q, k, v)                            # imports and one-time setup, paid by an unrelated variant
    t0 = time.perf_counter()
    attn = attnc.compile(example("sliding_window.attn"), window=window)
    attn(q, k, v)
    attnc_s = time.perf_counter() - t0

    causal = lambda b, h, q_idx, kv_idx: q_idx >= kv_idx
    torch.compile(flex_attention)(q, k, v, block_mask=create_block_mask(causal, None, None, seq, seq, device="cpu"))
    torch._dynamo.reset()                    # forget compiled code; imports and inductor's on-disk headers stay warm
    _, mask_mod = attn.flex_mods({"Q": seq, "KV": seq})   # the window reads the query's position
    hits = torch._dynamo.utils.counters["inductor"]["fxgraph_cache_hit"]
    t0 = time.perf_counter()
    block_mask = create_block_mask(mask_mod, None, None, seq, seq, device="cpu")
    torch.compile(flex_attention)(q, k, v, block_mask=block_mask)
    flex_s = time.perf_counter() - t0
    return {"seq": seq, "window": window, "attnc_s": attnc_s, "flex_s": flex_s,
            "flex_fxgraph_cache_hits": torch._dynamo.utils.counters["inductor"]["fxgraph_cache_hit"] - hits}


def document_long(seq, reps, peers):
    """Document-causal at a long sequence with mask preparation included: attnc's call vs create_block_mask + flex."""
    q, k, v = qkv(LONG_H, seq)
    attn = attnc.compile(example("document.attn"))
    params = realistic_params(attn, LONG_H, seq)
    out = {"seq": seq, "heads": LONG_H, "documents": len(torch.unique(params["doc"])), "attnc_ms": None}
    with torch.inference_mode():
        if "attnc" in peers:
            out["attnc_ms"] = bench.median_ms(lambda: attn(q, k, v, **params), 1, reps)[0]
        make_mask, run = bench.flex_peer(attn, q, k, v, params)
        out["flex_mask_ms"] = bench.median_ms(make_mask, 1, reps)[0]
        out["flex_with_mask_ms"] = bench.median_ms(lambda: run(make_mask()), 1, reps)[0]
    log(f"document causal S={seq}")
    return out


def _status_kib(field):
    """A field of /proc/self/status in KiB (VmRSS: resident now, VmHWM: resident peak)."""
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field + ":"))
    return int(line.split()[1])


def peak_child(seq, peer):
    """In a fresh process: the resident-memory peak one causal call of peer adds, after a warm-up call."""
    q, k, v = qkv(H, seq)
    attn = attnc.compile(example("causal.attn"))
    if peer == "flex":
        make_mask, run = bench.flex_peer(attn, q, k, v, {})
        block_mask = make_mask()
        fn = lambda: run(block_mask)
    else:
        fn = {"attnc": lambda: attn(q, k, v), "sdpa": bench.sdpa_peer(q, k, v, "causal"),
              "eager": bench.eager_peer(attn, q, k, v, {})}[peer]
    with torch.inference_mode():
        fn()                                             # compilation and first-touch allocations
        gc.collect()
        Path("/proc/self/clear_refs").write_text("5")     # resets VmHWM to the current VmRSS (Linux >= 4.0)
        before = _status_kib("VmRSS")
        fn()
        return {"seq": seq, "peer": peer, "peak_mib": (_status_kib("VmHWM") - before) / 1024}


def child(*args, env=None):
    """Run one child measurement in a fresh interpreter; its JSON result, or None (with its stderr logged) on failure."""
    proc = subprocess.run([sys.executable, __file__, "--child", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        log(f"child {args} failed:\n" + "\n".join(proc.stderr.splitlines()[-15:]))
        return None
    return json.loads(proc.stdout.splitlines()[-1])


def memory(seqs, peers):
    """Peak memory of one causal call per peer and sequence length, each in its own process."""
    rows = []
    for seq in seqs:
        row = {"seq": seq}
        for peer in (p for p in MEMORY_PEERS if p in peers):
            result = child("peak", seq, peer)
            row[peer] = result and result["peak_mib"]
        rows.append(row)
        log(f"memory S={seq}")
    return rows


def targets(results):
    """Each target of the issue: its measured value and whether it is met (None while unmeasured)."""
    def target(value, met):
        return {"value": value, "met": None if value is None else bool(met)}
    rows = [r for r in results.get("suite") or [] if r["attnc"]]
    flex = [r["flex"] / r["attnc"] for r in rows if r["flex"]]
    causal = max((r["attnc"] / r["sdpa"] for r in rows if r["variant"] == "causal" and r["sdpa"]), default=None)
    first = (results.get("first_result") or {}).get("attnc_s")
    long = results.get("document_long") or {}
    mem = [r for r in results.get("memory") or [] if r.get("attnc")]
    slope = None
    if len(mem) >= 2:
        slope = math.log(mem[-1]["attnc"] / mem[0]["attnc"]) / math.log(mem[-1]["seq"] / mem[0]["seq"])
    return {
        "at least as fast as flex on every variant and S (min flex/attnc)":
            target(min(flex, default=None), flex and min(flex) >= 1 and not any(r["errors"] for r in rows)),
        "causal within 1.2x of SDPA at every S (max attnc/sdpa)": target(causal, causal is not None and causal <= 1.2),
        "first result of a never-seen variant under 0.3 s": target(first, first is not None and first < 0.3),
        "long document causal faster than create_block_mask + flex (ms)":
            target(long.get("attnc_ms"), long.get("attnc_ms") and long["attnc_ms"] < long["flex_with_mask_ms"]),
        "peak memory grows like S, not S^2 (exponent of S)": target(slope, slope is not None and slope < 1.5),
        "block classification work grows with tiles, not Q*KV": target(None, None),   # not observable from outside attnc
    }


def report(results, markdown):
    """The result tables, as plain text or markdown."""
    m = results["machine"]
    fmt = lambda x, spec=".1f": "n/a" if x is None else format(x, spec)
    parts = [f"machine: {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads, torch {m['torch']}, "
             f"python {m['python']}, attnc {m['attnc']}; medians of {results['reps']} runs, all peers in the same run; "
             f"load average {m['load_1min']:.2f} at start"]
    for seq in sorted({r["seq"] for r in results.get("suite") or []}):
        rows = [r for r in results["suite"] if r["seq"] == seq]
        parts.append(f"variants at S={seq}, B={B} H={H} D={D} fp32; (x) = peer ms / attnc ms, >1: attnc faster\n"
                     + bench.format_table(rows, markdown))
        errors = {f"{r['variant']} {p}": e for r in rows for p, e in r["errors"].items()}
        if errors:
            parts.append("peers that failed:\n" + "\n".join(f"- {k}: {e}" for k, e in errors.items()))
    if results.get("heap"):
        h = results["heap"]
        names = [n for n in HEAP_VARIANTS if (h.get("0") or {}).get(n) and (h.get("1") or {}).get(n)]
        parts.append(f"attnc with and without ATTNC_HEAP_TILES=1 (glibc's mmap threshold raised), S={h['seq']}, ms\n"
                     + bench.grid(["variant", "default ms", "ATTNC_HEAP_TILES=1 ms", "default / heap"],
                                  [[n, fmt(h["0"][n]), fmt(h["1"][n]), fmt(h["0"][n] / h["1"][n], ".2f")] for n in names],
                                  markdown))
    if results.get("first_result"):
        f = results["first_result"]
        parts.append(f"first result, never-seen variant (sliding window {f['window']}, S={f['seq']}): compile + first call\n"
                     + bench.grid(["", "attnc s", "flex s", "flex s / attnc s"],
                                  [["first result", fmt(f["attnc_s"], ".3f"), fmt(f["flex_s"], ".2f"),
                                    fmt(f["attnc_s"] and f["flex_s"] / f["attnc_s"], ".0f")]], markdown))
    if results.get("document_long"):
        d = results["document_long"]
        parts.append(f"document causal, S={d['seq']}, B={B} H={d['heads']} D={D}, {d['documents']} documents, mask preparation included\n"
                     + bench.grid(["", "attnc ms", "flex mask ms", "flex mask + call ms", "ratio"],
                                  [["document causal", fmt(d["attnc_ms"]) if d["attnc_ms"] else "pending", fmt(d["flex_mask_ms"]),
                                    fmt(d["flex_with_mask_ms"]), fmt(d["attnc_ms"] and d["flex_with_mask_ms"] / d["attnc_ms"], ".2f")]],
                                  markdown))
    if results.get("memory"):
        peers = [p for p in MEMORY_PEERS if any(p in r for r in results["memory"])]
        parts.append("peak resident memory added by one causal call, MiB (fresh process per cell)\n"
                     + bench.grid(["S"] + peers, [[str(r["seq"])] + [fmt(r.get(p)) for p in peers] for r in results["memory"]],
                                  markdown))
    t = results["targets"]
    verdict = lambda x: "pending" if x["met"] is None else "met" if x["met"] else "NOT met"
    parts.append("targets\n" + bench.grid(["target", "value", "status"],
                                          [[k, fmt(v["value"], ".3g"), verdict(v)] for k, v in t.items()], markdown))
    return "\n\n".join(parts)


def log(message):
    """Progress on stderr, so stdout stays the report."""
    print(message, file=sys.stderr, flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", default="4096,16384", help="sequence lengths of the variant suite (default 4096,16384)")
    ap.add_argument("--long-seq", type=int, default=32768, help="sequence length of the document-masking run (default 32768)")
    ap.add_argument("--reps", type=int, default=5, help="timed calls per median (default 5)")
    ap.add_argument("--quick", action="store_true", help="S=1024, long S=8192, reps=3, memory up to S=2048")
    ap.add_argument("--markdown", action="store_true", help="print markdown tables")
    ap.add_argument("--peers-only", action="store_true", help="time FlexAttention, SDPA and eager only; attnc columns read 'pending'")
    ap.add_argument("--parts", default="suite,first,long,memory,heap",
                    help="comma-separated subset of suite,first,long,memory,heap")
    ap.add_argument("--out", type=Path, default=RESULTS, help=f"JSON results file (default {RESULTS.relative_to(ROOT)})")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        kind, *rest = args.child
        result = (first_result_child(int(rest[0])) if kind == "first" else heap_child(int(rest[0]), int(rest[1]))
                  if kind == "heap" else peak_child(int(rest[0]), rest[1]))
        print(json.dumps(result))
        return 0
    seqs = [int(s) for s in str(args.seq).split(",")]
    if args.quick:
        seqs, args.long_seq, args.reps = [1024], 8192, 3
    peers = bench.PEERS[1:] if args.peers_only else bench.PEERS
    parts = set(args.parts.split(","))
    memory_seqs = (512, 1024, 2048) if args.quick else (1024, 2048, 4096, 8192)

    if os.getloadavg()[0] > 0.5:
        log(f"warning: load average {os.getloadavg()[0]:.2f}: other work on this machine will skew the timings")
    results = {"machine": machine(), "seqs": seqs, "reps": args.reps, "peers_only": args.peers_only}
    if "suite" in parts:
        results["suite"] = [row for seq in seqs for row in suite(seq, args.reps, peers)]
    if "first" in parts:
        with tempfile.TemporaryDirectory(prefix="attnc-bench-cache-") as cache:   # nothing attnc compiled before
            results["first_result"] = child("first", FIRST_SEQ, env={"ATTNC_CACHE_DIR": cache})
        if results["first_result"] and args.peers_only:
            results["first_result"]["attnc_s"] = None
    if "long" in parts:
        results["document_long"] = document_long(args.long_seq, args.reps, peers)
    if "memory" in parts:
        results["memory"] = memory(memory_seqs, peers)
    if "heap" in parts and not args.peers_only:
        results["heap"] = heap(seqs[0], args.reps)
    results["targets"] = targets(results)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    tmp.replace(args.out)                         # atomic: a reader never sees half a file
    print(report(results, args.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
