"""The backends, behind one interface, in one registry.

A backend is a module that provides:
    NAME                   'torch' | 'triton'
    ACCUMULATES_IN_ORDER   its programs run one after another, so a kernel may add into the loop rank's
                           tiles as it goes (dK, dV from a kernel parallel over query tiles)
    BLOCK_M, BLOCK_N       the plans' default tile sizes; BLOCKS_TEXT says how a call picks its own
    PLAN_PASSES            the plan passes its plans go through, in order (names of attnc.plan.PLAN_PASSES)
    render(plan) -> str    the kernel source of one plan, from the backend's one skeleton template
    load(source, name, path) -> callable   the plan's entry point, ready to call
    launch(compiled, plan, kernel, tensors, ...) -> tuple   run it on one call's tensors
"""
from __future__ import annotations

import importlib

REGISTRY = {"torch": "attnc.backends.torch_backend", "triton": "attnc.backends.triton_backend"}


def backend(name: str):
    """The backend module for a target name."""
    if name not in REGISTRY:
        raise KeyError(f"unknown target {name!r}; targets: {', '.join(REGISTRY)}")
    return importlib.import_module(REGISTRY[name])
