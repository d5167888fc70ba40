"""The pass pipeline, top to bottom. These names are what `attnc ir --after NAME` accepts."""
from __future__ import annotations

from typing import Callable

from attnc.ir.cascade import Cascade, verify
from attnc.passes.block_sparsity import block_sparsity
from attnc.passes.bounds import bounds
from attnc.passes.defer_division import defer_division
from attnc.passes.online import online
from attnc.passes.pass_count import pass_count
from attnc.passes.simplify import simplify
from attnc.passes.tile import tile

PIPELINE: list[tuple[str, Callable[[Cascade], Cascade]]] = [
    ("simplify", simplify),
    ("defer_division", defer_division),
    ("online", online),
    ("tile", tile),
    ("block_sparsity", block_sparsity),
    ("bounds", bounds),
]
PASS_NAMES = ["lower"] + [name for name, _ in PIPELINE]


def run_pipeline(c: Cascade, stop_after: str | None = None, trace: list | None = None) -> Cascade:
    """Run every pass in order, verifying after each; `trace` collects (name, cascade, pass count)."""
    verify(c)
    if trace is not None:
        trace.append(("lower", c, pass_count(c)))
    if stop_after == "lower":
        return c
    for name, fn in PIPELINE:
        c = fn(c)
        verify(c)
        if trace is not None:
            trace.append((name, c, pass_count(c)))
        if name == stop_after:
            break
    return c
