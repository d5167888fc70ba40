"""cse: every expression region of a plan -> assignments in order, with a temporary for each subexpression
used twice or more (common subexpressions computed once).

Regions, in the order a kernel runs them: the prologue; per pass the score ('s'), the mask ('keep'), the
values its running maxima take, then every other per-pair value (definitions, sums, products, scatters,
param gradients), and the row values after it; the epilogue and the stores. A subexpression named in a region
that runs before is read by name. The result is plan.lines[region] = (lines, names): lines are
(variable, expression) pairs whose expressions read earlier variables as values, and names maps each root
to the variable holding it (a root that is a leaf or already named gets no line of its own)."""
from __future__ import annotations

from collections import Counter
from dataclasses import replace

from attnc.ir import expr as E
from attnc.ir.expr import Node, Op
from attnc.plan.model import Assign, KernelPlan, value


def linearize(roots: list[Assign], bound: dict[Node, str], prefix: str) -> tuple[list[Assign], dict[str, str]]:
    """Assignments computing each root; `bound` (node -> variable of an enclosing region) is read, not
    extended: the caller decides what later regions may see."""
    uses: Counter = Counter()
    seen: set[Node] = set()
    for _, root in roots:
        stack = [root]
        while stack:
            n = stack.pop()
            uses[n] += 1
            if n in seen or n in bound:
                continue
            seen.add(n)
            stack.extend(n.src)
    names = dict(bound)
    lines: list[Assign] = []
    count = 0
    alias: dict[Node, Node] = {}        # a root held by another variable: later reads of it read that one
    def named(n: Node) -> Node:
        """n with its already-named subexpressions read by name."""
        memo: dict[Node, Node] = {}
        for x in n.walk():
            if x in names and x is not n:
                memo[x] = value(names[x], x.dtype)
                continue
            srcs = tuple(memo[s] for s in x.src)
            memo[x] = x if srcs == x.src else Node(x.op, srcs, x.arg, x.dtype, x.loc)
        return memo[n]

    out: dict[str, str] = {}
    for name, root in roots:                 # root by root: a later root reuses an earlier one by its name
        root = E.substitute(root, alias) if alias else root
        held = names.get(root) or (root.arg if not root.src and root.op is Op.TENSOR else None)
        if held is not None:                 # already computed, or a plain value: no line of its own
            out[name] = held
            alias[value(name, root.dtype)] = value(held, root.dtype)
            if held != name:                 # and later regions that read it by name read the holder
                names[value(name, root.dtype)] = held
            continue
        for n in root.walk():
            if n in names or not n.src or uses[n] < 2 or n is root:
                continue
            count += 1
            temp = f"{prefix}{count}"
            lines.append((temp, named(n)))
            names[n] = temp
        lines.append((name, named(root)))
        if root.src:                         # a constant or an index stays itself: 0.0 elsewhere is not `s`
            names[root] = name
        out[name] = name
    bound.update({n: v for n, v in names.items() if n not in bound})
    return lines, out


def cse(plan: KernelPlan) -> KernelPlan:
    regions: dict = {}
    top: dict[Node, str] = {}
    regions["prologue"] = linearize(list(plan.prologue), top, "t")
    tile = dict(top)
    if plan.score is not None:
        regions["score"] = linearize([("s", plan.score)], tile, "s")
        if plan.score.src:
            tile[plan.score] = regions["score"][1]["s"]
    if plan.mask is not None:
        regions["mask"] = linearize([("keep", plan.mask)], dict(top), "k")
    for i, p in enumerate(plan.passes, 1):
        names = dict(tile)
        regions[(i, "max")] = linearize([(f"{s.name}_tile", s.value) for s in p.states
                                         if s.kind in ("max", "argmax")], names, f"x{i}_")
        defs = [d for d in p.defs]
        dot_name = lambda s: "p" if s.name == "acc" and "p" not in dict(defs) else f"{s.name}_tile"   # noqa: E731
        roots = defs + [(dot_name(s), s.value) for s in p.states if s.kind == "dot"]
        roots += [(f"{s.name}_tile", s.value) for s in p.states if s.kind == "sum"]
        roots += [(f"{s.target}_tile", s.value) for s in p.scatters]
        roots += [(f"g{j}_{g.param}", g.value) for j, g in enumerate(p.grads)]
        roots += [(f"g{j}_{g.param}_i{a}", x) for j, g in enumerate(p.grads) for a, x in enumerate(g.index)]
        regions[(i, "values")] = linearize(roots, names, f"y{i}_")
        regions[(i, "after")] = linearize(list(p.after), dict(top), f"z{i}_")
    ep = list(plan.epilogue) + [(f"store_{s.target}", s.value) for s in plan.stores]
    ep += [(f"g{j}_{g.param}", g.value) for j, g in enumerate(plan.row_grads)]
    ep += [(f"g{j}_{g.param}_i{a}", x) for j, g in enumerate(plan.row_grads) for a, x in enumerate(g.index)]
    regions["epilogue"] = linearize(ep, dict(top), "e")
    return replace(plan, lines=regions)
