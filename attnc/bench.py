"""Side-by-side timing of a compiled variant against FlexAttention, SDPA and eager, shared by `attnc bench` and benchmarks/."""
from __future__ import annotations

import functools
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

PEERS = ("attnc", "flex", "sdpa", "eager")

# Every variant gives flex_attention (and create_block_mask) a new score_mod/mask_mod, and dynamo
# recompiles per callable; past its default limit of 8 it silently falls back to unfused eager flex,
# which would time the wrong thing in a suite of several variants. A float a mod closes over (a
# softcap) becomes a symbolic input unless floats are specialized, and flex's CPU lowering then fails
# with "unbacked_bindings" (torch 2.13). dynamic=False below: once recompiles turned on automatic
# dynamic shapes, the CPU flex template emitted C++ that did not compile (document mask, torch 2.13).
_DYNAMO = dict(recompile_limit=64, specialize_float=True)


def _sync() -> None:
    """Wait for queued GPU work so wall-clock time covers it; a no-op on CPU-only machines."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_ms(fn, warmup=1, reps=5):
    """Call fn warmup times, then time reps calls; return (median ms, [ms per call])."""
    for _ in range(warmup):
        fn()
    _sync()
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples), samples


def interleaved_ms(calls: dict, warmup=1, reps=5) -> dict:
    """Median ms of each call, timed in rounds that run every call once, so that load on a shared machine
    falls on all of them alike; warmup calls of each first. {name: (median ms, [ms per round])}."""
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    samples: dict = {name: [] for name in calls}
    for _ in range(reps):
        for name, fn in calls.items():
            _sync()
            t0 = time.perf_counter()
            fn()
            _sync()
            samples[name].append((time.perf_counter() - t0) * 1e3)
    return {name: (statistics.median(s), s) for name, s in samples.items()}


@functools.cache
def compiled_flex():
    """torch.compile(flex_attention), built once per process."""
    return torch.compile(flex_attention, dynamic=False)


@functools.cache
def compiled_block_mask():
    """torch.compile(create_block_mask), built once per process (what `_compile=True` does, minus a new wrapper per call)."""
    return torch.compile(create_block_mask, dynamic=False)


def flex_peer(attn, q, k, v, params, *, scale=None, mask_bh=False, compiled=True):
    """(make_mask, run) for FlexAttention, or None when the variant's normalizer is not softmax.

    make_mask() builds the BlockMask with compiled create_block_mask; run(block_mask) calls compiled
    flex_attention (with compiled=False: both eager, flex's path that has a backward on a CPU). The mask is
    built for B=H=1 and broadcast unless mask_bh says it depends on b or h.
    """
    if not attn.flex_compatible:
        return None
    B, H, Q, KV = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    sizes = {"B": B, "H": H, "HKV": k.shape[1], "Q": Q, "KV": KV, "D": q.shape[3]}     # a mask may read them
    score_mod, mask_mod = attn.flex_mods(sizes, **params)

    def make_mask():
        if mask_mod is None:
            return None
        bh = (B, H) if mask_bh else (None, None)
        with torch._dynamo.config.patch(**_DYNAMO):
            make = compiled_block_mask() if compiled else create_block_mask
            return make(mask_mod, *bh, Q, KV, device=q.device)

    def run(block_mask, q=q, k=k, v=v):
        with torch._dynamo.config.patch(**_DYNAMO):
            call = compiled_flex() if compiled else flex_attention
            return call(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
                        enable_gqa=q.shape[1] != k.shape[1])
    return make_mask, run


def sdpa_peer(q, k, v, sdpa_kind, *, scale=None):
    """A call of F.scaled_dot_product_attention for sdpa_kind 'full' or 'causal'; None for anything else."""
    if sdpa_kind not in ("full", "causal"):
        return None
    gqa = q.shape[1] != k.shape[1]
    return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=sdpa_kind == "causal", scale=scale, enable_gqa=gqa)


def eager_peer(attn, q, k, v, params, *, scale=None):
    """A call of attn.reference: the materialized score matrix, in the input dtype."""
    return lambda: attn.reference(q, k, v, scale=scale, **params)


def bench_variant(attn, q, k, v, params, sdpa_kind=None, reps=5, *, scale=None, warmup=1, peers=PEERS, mask_bh=False,
                  progress=None):
    """Median ms of attnc and each peer on one input (None where a peer does not apply), plus flex's mask build alone;
    the peers are timed in interleaved rounds (interleaved_ms).

    Keys: attnc, flex, sdpa, eager, flex_mask, max_diff (each peer's largest deviation from attnc's output,
    or from eager's when attnc is not run: a peer that computes something else shows here) and errors (a
    peer that raised: its message; attnc raising raises).
    Warm-up calls absorb compilation, so these are steady-state times; flex excludes create_block_mask.
    progress, when given, is called with a line saying what is being timed.
    """
    say = progress or (lambda text: None)
    out = dict.fromkeys(PEERS + ("flex_mask",))
    calls, errors = {}, {}
    with torch.inference_mode():
        if "attnc" in peers:
            calls["attnc"] = lambda: attn(q, k, v, scale=scale, **params)
        flex = flex_peer(attn, q, k, v, params, scale=scale, mask_bh=mask_bh) if "flex" in peers else None
        if flex is not None:
            make_mask, run = flex
            say("flex: compiling the block mask")
            try:
                if make_mask() is not None:
                    out["flex_mask"] = median_ms(make_mask, warmup, reps)[0]
                block_mask = make_mask()
                calls["flex"] = lambda: run(block_mask)
            except Exception as e:                # recorded, not hidden: the table says the peer failed
                errors["flex"] = _message(e)
        sdpa = sdpa_peer(q, k, v, sdpa_kind, scale=scale) if "sdpa" in peers else None
        if sdpa is not None:
            calls["sdpa"] = sdpa
        if "eager" in peers:
            calls["eager"] = eager_peer(attn, q, k, v, params, scale=scale)
        results = {}
        for i, (name, fn) in enumerate(list(calls.items()), 1):
            say(f"timing {name} ({i}/{len(calls)}: {warmup} warm-up + {reps} calls, in rounds with the others)")
            try:
                results[name] = fn()                  # the first warm-up call; its output is compared below
            except Exception as e:
                if name == "attnc":
                    raise
                errors[name] = _message(e)
                del calls[name]
        out.update({name: ms for name, (ms, _) in interleaved_ms(calls, max(warmup - 1, 0), reps).items()})
    base = results.get("attnc", results.get("eager"))
    out["max_diff"] = {name: (r.float() - base.float()).abs().max().item() for name, r in results.items()
                       if base is not None and r is not base}
    out["errors"] = errors
    return out


def _message(e: Exception) -> str:
    return f"{type(e).__name__}: {e}".splitlines()[0][:200]


TRAIN_PEERS = ("attnc", "sdpa", "eager", "flex_eager")


def bench_train_variant(attn, q, k, v, params, sdpa_kind=None, reps=5, *, peers=TRAIN_PEERS) -> dict:
    """Median ms of forward + backward (out.backward(dO) for random dO; q, k, v require grad, params do not)
    of attnc and each peer, in interleaved rounds: sdpa (SDPA's fused kernel, causal only), eager (autograd
    through attn.reference, the materialized scores), flex_eager (uncompiled flex_attention with its block
    mask: the path with a backward on a CPU). None where a peer does not apply; a peer that raises is
    recorded under errors with its message. max_diff: each peer's largest deviation from attnc's dQ."""
    dout = torch.randn(q.shape[:3] + v.shape[3:], generator=torch.Generator().manual_seed(1)).to(q.dtype)
    out = dict.fromkeys(TRAIN_PEERS)
    forwards = {}
    if "attnc" in peers:
        forwards["attnc"] = lambda q_, k_, v_: attn(q_, k_, v_, **params)
    sdpa = sdpa_peer(q, k, v, sdpa_kind) if "sdpa" in peers else None
    if sdpa is not None:
        forwards["sdpa"] = lambda q_, k_, v_: F.scaled_dot_product_attention(
            q_, k_, v_, is_causal=sdpa_kind == "causal", enable_gqa=q.shape[1] != k.shape[1])
    if "eager" in peers:
        forwards["eager"] = lambda q_, k_, v_: attn.reference(q_, k_, v_, **params)
    flex = flex_peer(attn, q, k, v, params, compiled=False) if "flex_eager" in peers else None
    errors = {}
    if flex is not None:
        make_mask, run = flex
        try:
            block_mask = make_mask()
            forwards["flex_eager"] = lambda q_, k_, v_: run(block_mask, q_, k_, v_)
        except Exception as e:                   # recorded, not hidden: the table says the peer failed
            errors["flex_eager"] = _message(e)
    grads = {}

    def step(name, forward):
        def call():
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]
            forward(*leaves).backward(dout)
            grads[name] = leaves[0].grad
        return call
    calls = {}
    for name, forward in forwards.items():
        try:
            step(name, forward)()                # the warm-up call, which also checks that the peer runs
            calls[name] = step(name, forward)
        except Exception as e:
            errors[name] = _message(e)
    out.update({name: ms for name, (ms, _) in interleaved_ms(calls, 0, reps).items()})
    base = grads.get("attnc")
    out["max_diff"] = {n: (g.float() - base.float()).abs().max().item() for n, g in grads.items()
                       if base is not None and n != "attnc"}
    out["errors"] = errors
    return out


def _cell(ms, base):
    """'12.3 (1.45x)': a peer's ms and its ratio to attnc's (>1 means attnc is faster)."""
    if ms is None:
        return "n/a"
    return f"{ms:.1f} ({ms / base:.2f}x)" if base else f"{ms:.1f}"


def grid(head, body, markdown=False):
    """An aligned plain-text (or markdown) table from a header row and rows of strings."""
    if markdown:
        lines = [head, ["---"] + ["---:"] * (len(head) - 1)] + body
        return "\n".join("| " + " | ".join(row) + " |" for row in lines)
    widths = [max(len(row[i]) for row in [head] + body) for i in range(len(head))]
    fmt = lambda row: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(row) for row in body])


def format_table(rows, markdown=False):
    """A table of bench_variant results, each row also naming its 'variant'; (x) = peer ms / attnc ms, >1: attnc faster."""
    head = ["variant", "attnc ms", "flex ms", "sdpa ms", "eager ms", "flex mask ms"]
    cell = lambda r, p: "fails" if p in r.get("errors", {}) else _cell(r.get(p), r.get("attnc"))  # noqa: E731
    body = [[r["variant"], f"{r['attnc']:.1f}" if r.get("attnc") else "pending",
             cell(r, "flex"), cell(r, "sdpa"), cell(r, "eager"), _cell(r.get("flex_mask"), None)] for r in rows]
    return grid(head, body, markdown)


def sdpa_kind_of(variant, Q: int, KV: int) -> str | None:
    """'full' or 'causal' when SDPA (is_causal: top-left aligned) computes exactly this variant at these
    lengths, else None. Causal masks are recognised in the two forms the examples use; any other
    spelling is left to FlexAttention rather than guessed."""
    from attnc.ir import expr as E
    if variant.norm_kind != "softmax" or variant.score != E.SCORE or variant.params:
        return None
    if variant.mask is None:
        return "full"
    top_left, bottom_right = _causal_masks()
    return "causal" if variant.mask == top_left or (variant.mask == bottom_right and Q == KV) else None


@functools.cache
def _causal_masks():
    """The masks `q_idx >= kv_idx` and `q_idx + KV - Q >= kv_idx` as the frontend builds them."""
    from attnc.frontend.resolve import load
    return tuple(load(f"variant causal\nmask = {m} >= kv_idx\n").mask for m in ("q_idx", "q_idx + KV - Q"))


def record(row, q, k, v, reps, file) -> dict:
    """One bench_variant result as `attnc bench --json` prints it.

    Keys: variant, file, shape {B, H, HKV, Q, KV, D, Dv}, dtype, device, threads, reps, ms {attnc, flex,
    sdpa, eager: median ms, null where the peer does not apply}, flex_mask_ms, max_diff {peer: largest
    deviation from attnc's output}, versions {attnc, torch}.
    """
    import attnc
    B, H, Q, D = q.shape
    shape = {"B": B, "H": H, "HKV": k.shape[1], "Q": Q, "KV": k.shape[2], "D": D, "Dv": v.shape[3]}
    return {"variant": row["variant"], "file": file, "shape": shape, "dtype": str(q.dtype).removeprefix("torch."),
            "device": str(q.device), "threads": torch.get_num_threads(), "reps": reps,
            "ms": {p: row.get(p) for p in PEERS}, "flex_mask_ms": row.get("flex_mask"),
            "max_diff": row.get("max_diff", {}), "versions": {"attnc": attnc.__version__, "torch": torch.__version__}}


class PlotError(Exception):
    """--plot cannot be honoured: matplotlib missing, an unknown image format, no such folder."""


def check_plot_path(path: str) -> None:
    """Raise PlotError unless matplotlib is installed and can write path's format into an existing folder."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotError("--plot needs matplotlib, which is not installed: pip install 'attnc[plot]'") from None
    formats = Figure().canvas.get_supported_filetypes()
    suffix = os.path.splitext(path)[1].lstrip(".").lower()
    if suffix not in formats:
        raise PlotError(f"--plot {path}: the file name must end in one of "
                        f"{', '.join('.' + f for f in sorted(formats))}")
    folder = os.path.dirname(path) or "."
    if not os.path.isdir(folder):
        raise PlotError(f"--plot {path}: no such folder {folder}")


def plot(row, path: str, title: str) -> None:
    """A bar chart of one bench_variant result (median ms per peer, lower is better), saved to path."""
    from matplotlib.figure import Figure        # not pyplot: no GUI backend, no global state
    names = [p for p in PEERS if row.get(p) is not None]
    times = [row[p] for p in names]
    fig = Figure(figsize=(6.4, 3.6), layout="constrained")
    ax = fig.subplots()
    bars = ax.bar(names, times, color=["tab:blue" if n == "attnc" else "tab:gray" for n in names])
    ax.bar_label(bars, labels=[f"{t:.2f}" for t in times], padding=2)
    ax.set_ylabel("median ms (lower is better)")
    ax.set_title(title, fontsize=8)
    ax.margins(y=0.15)
    fig.savefig(path)
