"""How attnc's CPU costs grow with S: block classification (should follow the tile count, not Q*KV)
and the largest memory one call allocates (should follow S*tile, not S^2).

    python benchmarks/cpu_scaling.py [--markdown]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import attnc
from attnc.bench import grid

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def classification(markdown: bool) -> str:
    """Time to classify every (query tile, key tile) of a document-causal mask, 128x128 tiles."""
    attn = attnc.compile(str(EXAMPLES / "document.attn"))
    plan = attn.plan()
    rows = []
    for S in (4096, 16384, 65536, 262144):
        doc = torch.repeat_interleave(torch.arange(S // 2048), 2048).int()
        sizes = {"B": 1, "H": 8, "HKV": 8, "Q": S, "KV": S, "D": 64}
        plan.sparsity.classify(sizes, {"doc": doc}, 128, 128)
        t0 = time.perf_counter()
        reps = 5
        for _ in range(reps):
            cls = plan.sparsity.classify(sizes, {"doc": doc}, 128, 128)
        ms = (time.perf_counter() - t0) / reps * 1e3
        rows.append([str(S), str(cls.numel()), f"{S * S:.2e}", f"{ms:.2f}", f"{ms / cls.numel() * 1e6:.1f}"])
    return grid(["S", "tiles", "Q*KV", "classify ms", "ns per tile"], rows, markdown)


def peak_memory(markdown: bool) -> str:
    """The largest total of live tensors the torch profiler sees during one causal call (B=1 H=8 D=64)."""
    attn = attnc.compile(str(EXAMPLES / "causal.attn"))
    rows = []
    for S in (1024, 2048, 4096, 8192):
        q, k, v = (torch.randn(1, 8, S, 64) for _ in range(3))
        attn(q, k, v)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            attn(q, k, v)
        live, peak = 0, 0
        events = sorted((e for e in prof.events() if e.cpu_memory_usage), key=lambda e: e.time_range.start)
        for e in events:
            live += e.cpu_memory_usage
            peak = max(peak, live)
        io = 4 * q.numel() * 4 / 2**20
        rows.append([str(S), f"{peak / 2**20:.1f}", f"{io:.1f}", f"{4 * 8 * S * S / 2**20:.0f}"])
    return grid(["S", "attnc peak allocated MiB", "q,k,v,out MiB", "one S x S fp32 matrix per head MiB"],
                rows, markdown)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    print("block classification, document-causal mask, 128x128 tiles, 2048-token documents")
    print(classification(args.markdown))
    print()
    print("peak memory allocated during one causal call")
    print(peak_memory(args.markdown))


if __name__ == "__main__":
    main()
