"""How attnc's CPU costs grow with S: block classification (should follow the tile count, not Q*KV),
the largest memory one call allocates (should follow S*tile, not S^2), and attnc.create_block_mask against
torch's create_block_mask (eager, and compiled once) for FlexAttention masks at S = 4096 and 16384.

    python benchmarks/cpu_scaling.py [--markdown] [--parts classify,memory,block_mask]
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


def _median_ms(fn, reps: int = 5) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1e3


def block_masks(markdown: bool) -> str:
    """attnc.create_block_mask vs torch's, eager and torch.compile'd once, B=H=1 (broadcast), 128x128
    blocks; medians of 5 after a warm-up call (which absorbs torch.compile's compile). Each result is
    checked to keep the same blocks as torch's."""
    from torch.nn.attention import flex_attention as tf
    rows = []
    for S in (4096, 16384):
        doc = torch.repeat_interleave(torch.arange(S // 1024), 1024)
        masks = {
            "causal": lambda b, h, q, kv: q >= kv,
            "sliding window 256": lambda b, h, q, kv: (q >= kv) & (q - kv < 256),
            "document causal": lambda b, h, q, kv: (doc[q] == doc[kv]) & (q >= kv),
            "prefix lm 1024": lambda b, h, q, kv: (kv < 1024) | (q >= kv),
        }
        compiled = torch.compile(tf.create_block_mask, dynamic=False)
        for name, mask in masks.items():
            ours = attnc.create_block_mask(mask, None, None, S, S, device="cpu")
            theirs = tf.create_block_mask(mask, None, None, S, S, device="cpu")
            assert torch.equal(ours.to_dense(), theirs.to_dense()), name
            t_ours = _median_ms(lambda: attnc.create_block_mask(mask, None, None, S, S, device="cpu"))
            t_eager = _median_ms(lambda: tf.create_block_mask(mask, None, None, S, S, device="cpu"))
            t_comp = _median_ms(lambda: compiled(mask, None, None, S, S, device="cpu"))
            rows.append([str(S), name, f"{t_ours:.2f}", f"{t_eager:.1f}", f"{t_comp:.1f}",
                         f"{t_eager / t_ours:.0f}x", f"{t_comp / t_ours:.1f}x"])
    return grid(["S", "mask", "attnc ms", "torch eager ms", "torch compiled ms", "eager / attnc",
                 "compiled / attnc"], rows, markdown)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--parts", default="classify,memory,block_mask", help="comma-separated subset of "
                    "classify,memory,block_mask (default all)")
    args = ap.parse_args()
    parts = args.parts.split(",")
    if "classify" in parts:
        print("block classification, document-causal mask, 128x128 tiles, 2048-token documents")
        print(classification(args.markdown))
        print()
    if "memory" in parts:
        print("peak memory allocated during one causal call")
        print(peak_memory(args.markdown))
        print()
    if "block_mask" in parts:
        print("create_block_mask: attnc's vs torch's (eager and compiled), B=H=1, 128x128 blocks")
        print(block_masks(args.markdown))


if __name__ == "__main__":
    main()
