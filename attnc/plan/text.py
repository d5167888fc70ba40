"""Plans as text, for `attnc ir`: what each kernel loads, computes per tile, carries and stores."""
from __future__ import annotations

from attnc.ir.printer import expr_text
from attnc.plan.model import KernelPlan

RANK_WORDS = {"m": "query", "n": "key"}


def _assigns(lines, indent: str = "    ") -> list[str]:
    return [f"{indent}{n} = {expr_text(e)}" for n, e in lines]


def plan_text(plan: KernelPlan, blocks: str | None = None) -> str:
    """The plan; blocks says how a call picks the tile sizes (the plan's own are the defaults)."""
    par, loop = plan.parallel, plan.loop
    sizes = {"m": "BLOCK_M", "n": "BLOCK_N"}
    out = [f"kernel {plan.name} ({plan.kind}): programs over {RANK_WORDS[par]} tiles of {sizes[par]} ({par}), "
           f"sweeping {RANK_WORDS[loop]} tiles of {sizes[loop]} ({loop}); "
           + (f"tiles {blocks}" if blocks else f"tiles {plan.block_m}x{plan.block_n}")]

    def tile(x) -> str:
        return f"{x.name}[{x.rank}{', ' + x.width if x.width else ''}]"
    prog = [tile(x) for x in plan.loads if x.at == "program"]
    step = [tile(x) for x in plan.loads if x.at == "step"]
    out.append(f"  loads: {', '.join(prog) or '-'} per program; {', '.join(step) or '-'} per {RANK_WORDS[loop]} tile")
    lines = plan.lines
    if plan.rowdots or plan.prologue:
        out.append("  prologue:")
        out += [f"    {n} = rowsum({a} * {b})" for n, a, b in plan.rowdots]
        out += _assigns(lines["prologue"][0] if lines else plan.prologue)
    for i, p in enumerate(plan.passes, 1):
        out.append(f"  pass {i} over {loop}:")
        for d in p.dots:
            out.append(f"    {d.name} = {d.a} @ {d.b}^T{' * sm_scale' if d.scaled else ''}")
        if plan.score is not None:
            out += _assigns(lines["score"][0] if lines else [("s", plan.score)])
        if plan.mask is not None:
            out += [f"{x}    (partial tiles only)" for x in _assigns(lines["mask"][0] if lines else [("keep", plan.mask)])]
        if lines:
            out += _assigns(lines[(i, "max")][0]) + _assigns(lines[(i, "values")][0])
        else:
            out += _assigns(p.defs)
        for s in p.states:
            what = {"max": "running max of", "sum": "running sum of", "argmax": "first key index of the max of",
                    "dot": "running sum of"}[s.kind]
            rhs = f"{expr_text(s.value)}{' @ ' + s.operand if s.operand else ''}"
            exp = "exp2" if plan.base2 else "exp"
            scale = ("  rescaled by " + " * ".join(f"{exp}({c:g}*({m}_old - {m}))" for m, c in s.rescale)
                     if s.rescale else "")
            out.append(f"    {s.name}: {what} {rhs}{scale}")
        for s in p.scatters:
            out.append(f"    {s.target}[{loop} tile] += ({expr_text(s.value)})^T @ {s.operand}"
                       f"{'   (times sm_scale at the end)' if s.scaled else ''}")
        for g in p.grads:
            out.append(f"    grad {g.param}[{', '.join(expr_text(i) for i in g.index)}] += {expr_text(g.value)}")
        if p.after:
            out += _assigns(lines[(i, "after")][0] if lines else p.after)
    if plan.epilogue:
        out.append("  epilogue:")
        out += _assigns(plan.epilogue)
    for g in plan.row_grads:
        out.append(f"    grad {g.param}[{', '.join(expr_text(i) for i in g.index)}] += {expr_text(g.value)}   (per row)")
    stores = [f"{s.target}[{par}{', ' + s.width if s.width else ''}]{' * sm_scale' if s.scaled else ''}"
              for s in plan.stores]
    out.append(f"  stores: {', '.join(stores) or '-'}")
    return "\n".join(out)
