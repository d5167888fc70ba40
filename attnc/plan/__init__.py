"""Plans: a scheduled cascade -> KernelPlans (build), then the plan passes a backend asks for, in order.

These names are what `attnc ir --after NAME` accepts after the cascade passes."""
from __future__ import annotations

from typing import Callable

from attnc.plan.base2 import base2
from attnc.plan.build import build_plans
from attnc.plan.cse import cse
from attnc.plan.factor import factor
from attnc.plan.hoist import hoist
from attnc.plan.identities import identities
from attnc.plan.literals import literals
from attnc.plan.lower_ops import lower_ops
from attnc.plan.promote import promote
from attnc.plan.rowdiv import rowdiv
from attnc.plan.weights import weights
from attnc.plan.model import KernelPlan, KVPass, Load, ParamGrad, Scatter, State, Store, TileDot
from attnc.plan.verify import verify_plan

PLAN_PASSES: dict[str, Callable[[KernelPlan], KernelPlan]] = {
    "promote": promote,
    "literals": literals,
    "lower_ops": lower_ops,
    "base2": base2,
    "hoist": hoist,
    "cse": cse,
    "identities": identities,
    "weights": weights,
    "rowdiv": rowdiv,
    "factor": factor,
}

__all__ = ["KernelPlan", "KVPass", "Load", "ParamGrad", "Scatter", "State", "Store", "TileDot", "PLAN_PASSES",
           "build_plans", "run_plan_passes", "verify_plan"]


def run_plan_passes(plan: KernelPlan, names: tuple[str, ...], stop_after: str | None = None,
                    trace: list | None = None) -> KernelPlan:
    """The plan through the named passes, verified after each; trace collects (name, plan)."""
    verify_plan(plan)
    if trace is not None:
        trace.append(("plan", plan))
    for name in names:
        plan = PLAN_PASSES[name](plan)
        verify_plan(plan)
        if trace is not None:
            trace.append((name, plan))
        if name == stop_after:
            break
    return plan
