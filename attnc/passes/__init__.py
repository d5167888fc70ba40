"""The pass pipelines, top to bottom. These names are what `attnc ir --after NAME` accepts; after them come
the plan passes of the target (attnc.plan)."""
from __future__ import annotations

from typing import Callable

from attnc.ir.cascade import Cascade, verify
from attnc.passes.autodiff import autodiff
from attnc.passes.block_sparsity import block_sparsity
from attnc.passes.bounds import bounds
from attnc.passes.defer_division import defer_division
from attnc.passes.online import online
from attnc.passes.pass_count import pass_count
from attnc.passes.schedule import schedule
from attnc.passes.simplify import simplify


def _autodiff(c: Cascade) -> Cascade:
    return simplify(autodiff(c, lse_grad=c.facts.get("lse_grad", False)))


PIPELINE: list[tuple[str, Callable[[Cascade], Cascade]]] = [
    ("simplify", simplify),
    ("defer_division", defer_division),
    ("online", online),
    ("schedule", schedule),
    ("block_sparsity", block_sparsity),
    ("bounds", bounds),
]
BACKWARD_PIPELINE: list[tuple[str, Callable[[Cascade], Cascade]]] = [
    ("simplify", simplify),
    ("autodiff", _autodiff),         # the backward cascade, simplified
    ("schedule", schedule),
    ("block_sparsity", block_sparsity),
    ("bounds", bounds),
]
PASS_NAMES = ["lower"] + [name for name, _ in PIPELINE]
BACKWARD_PASS_NAMES = ["lower"] + [name for name, _ in BACKWARD_PIPELINE]


def run_pipeline(c: Cascade, stop_after: str | None = None, trace: list | None = None,
                 backward: bool = False) -> Cascade:
    """Run every pass in order, verifying after each; `trace` collects (name, cascade, pass count)."""
    verify(c)
    if trace is not None:
        trace.append(("lower", c, pass_count(c)))
    if stop_after == "lower":
        return c
    for name, fn in BACKWARD_PIPELINE if backward else PIPELINE:
        facts = c.facts
        c = fn(c)
        if c.facts is not facts:
            c = c.with_facts(**{k: v for k, v in facts.items() if k not in c.facts})
        verify(c)
        if trace is not None:
            trace.append((name, c, pass_count(c)))
        if name == stop_after:
            break
    return c
