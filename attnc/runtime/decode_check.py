"""Decoding equals prefill: the last Q queries against all KV keys give the last Q rows of the KV x KV run.

With a KV cache the queries of a call are the last Q positions of the sequence, so a variant that reads a
query's position must read it as q_idx + KV - Q (q_idx is the row of q). One that reads q_idx itself
aligns its queries at the top of the keys instead and fails here; the regular checks, which compare the
kernel with the oracle of the same call, cannot see it. Two comparisons, both against the float64 oracle
of the full run: the oracle's decoding rows (the spec's property, exact up to float64 rounding) and the
kernel's decoding rows (bounded like every check: twice the same-dtype eager error, or atol)."""
from __future__ import annotations

import math
import statistics
import time

import torch

from attnc.runtime.inputs import random_inputs, random_params

SPEC_TOL = 1e-9     # float64 rows of the same math: only summation order differs
# (B, H, HKV, Q, KV, D, Dv) of the decoding call, as `attnc check` writes shapes: 4 queries (a short run, as
# in speculative verification) against 300 keys (past a tile edge and a 256-key window), GQA, B > 1
SHAPE = (2, 4, 2, 4, 300, 32, 32)


def decode_matches_prefill(attn, shape: tuple = SHAPE, dtype: torch.dtype = torch.float32, atol: float = 1e-5,
                           generator: torch.Generator | None = None) -> dict:
    """The decoding call of `shape` (q = the last Q of KV queries, all KV keys) against the rows of the full
    KV x KV run. Params are drawn for the full run and reused; an axis declared Q keeps its last Q entries.

    Returns check_one's keys (err, bound, lse_err, lse_bound, ms, ok, why: a list) and spec_err, the float64
    gap between the oracle's decoding rows and its full run's rows."""
    B, H, HKV, n, L, D, Dv = shape
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    q, k, v = random_inputs(attn, B, H, HKV, L, L, D, Dv, dtype, g)
    full = random_params(attn, B, H, HKV, L, L, D, g)
    last = _last_rows(attn, full, n)
    as64 = {name: t.double() if t.is_floating_point() else t for name, t in full.items()}
    gold, gold_lse = attn.reference(q.double(), k.double(), v.double(), return_lse=True, **as64)
    gold, gold_lse = gold[:, :, -n:], gold_lse[:, :, -n:]

    qd = q[:, :, -n:]
    spec, spec_lse = attn.reference(qd.double(), k.double(), v.double(), return_lse=True,
                                    **_last_rows(attn, as64, n))
    eager, eager_lse = attn.reference(qd, k, v, return_lse=True, **last)
    with torch.inference_mode():
        out, lse = attn(qd, k, v, return_lse=True, **last)
        ms = _median_ms(lambda: attn(qd, k, v, return_lse=True, **last))

    finite = torch.isfinite(gold_lse)
    spec_err = max(_err(spec, gold), _err(spec_lse[finite], gold_lse[finite]))
    err, lse_err = _err(out, gold), _err(lse[finite], gold_lse[finite])
    bound = _bound(_err(eager, gold), atol)
    lse_bound = _bound(_err(eager_lse[finite], gold_lse[finite]), atol)
    why = []
    if not spec_err <= SPEC_TOL or not torch.equal(torch.isneginf(spec_lse), torch.isneginf(gold_lse)):
        why.append("the spec's decoding rows differ from its full run")
    if tuple(out.shape) != (B, H, n, Dv) or out.dtype != dtype:
        why.append(f"out is {out.dtype} {tuple(out.shape)}")
    if not err <= bound:
        why.append("out")
    if not torch.equal(torch.isneginf(lse), torch.isneginf(gold_lse)):
        why.append("lse -inf rows")
    if not lse_err <= lse_bound:
        why.append("lse")
    return {"err": err, "bound": bound, "lse_err": lse_err, "lse_bound": lse_bound, "ms": ms, "ok": not why,
            "why": why, "spec_err": spec_err}


def _last_rows(attn, params: dict, n: int) -> dict:
    """params for the decoding call: every axis declared Q keeps its last n entries."""
    out = dict(params)
    for name, (_, dims) in attn.param_specs.items():
        if name in out:
            for axis, d in enumerate(dims):
                if d == "Q":
                    out[name] = out[name].narrow(axis, out[name].shape[axis] - n, n)
    return out


def _err(x: torch.Tensor, ref: torch.Tensor) -> float:
    if x.numel() == 0:
        return 0.0
    d = (x.double() - ref.double()).abs()
    return math.nan if d.isnan().any() else d.max().item()


def _bound(eager_err: float, atol: float) -> float:
    """The rule of every check (flex attention's): twice the same-dtype eager error, never tighter than atol."""
    return max(2 * eager_err, atol) if math.isfinite(eager_err) else atol


def _median_ms(fn, reps: int = 3) -> float:
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)
