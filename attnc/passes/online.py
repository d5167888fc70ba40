"""online: complete reductions over n -> running reductions carried across key tiles (FlashAttention-2).

A max statistic R whose every consumer that iterates n is a sum with summand exp(c*(x - R)) * G, G free of
R and c >= 0, becomes a running max; each such sum runs too, rescaled by exp(c*(R_old - R_new)) whenever R moves.
A sum whose consumers do not iterate n runs as it is. Anything else stays a complete reduction and costs
another pass over the keys; the pass says which statistic and why.
"""
from __future__ import annotations

import sympy

from attnc.ir.cascade import Cascade, Einsum, tensor
from attnc.ir.expr import Node, Op, substitute
from attnc.passes.sym import SymMap


def exp_factor(body: Node, r: str) -> float | None:
    """c if body == exp(-c*R) * G with G free of R (seen through where(k, x, 0)), else None."""
    def drop_mask(n: Node) -> Node | None:      # where(k, x, 0) == [k] * x, and [k] is free of R
        if n.op is Op.WHERE and n.src[2].op is Op.CONST and n.src[2].arg == 0 and not n.src[0].uses(Op.TENSOR, r):
            return drop_mask(n.src[1]) or n.src[1]
        return None
    body = substitute(body, drop_mask)
    m = SymMap()
    x = m.to(body)
    rsym = m.symbol(tensor(r))
    for sym, node in m.to_node.items():
        if sym is not rsym and node.uses(Op.TENSOR, r):
            return None                           # R hides inside an opaque node (relu, where, a load ...)
    if rsym not in x.free_symbols:
        return 0.0
    ratio = sympy.powsimp(sympy.diff(x, rsym) / x, force=True)
    ratio = sympy.simplify(ratio) if not ratio.is_number else ratio
    return float(-ratio) if ratio.is_number else None


def online(c: Cascade) -> Cascade:
    stmts = {s.name: s for s in c.stmts}
    notes = list(c.facts.get("notes", []))
    for s in c.stmts:
        if s.reduce != "max" or s.over != ("n",):
            continue
        plan: dict[str, float] = {}
        for user in c.consumers(s.name):
            if not user.iterates_n:
                continue
            f = exp_factor(user.body, s.name) if user.reduce == "+" and user.over == ("n",) else None
            if f is None:
                notes.append(f"{user.name} uses {s.name} inside an n-loop in a form that is not "
                             f"exp(c*(x - {s.name})) * rest: {s.name} needs its own pass over the keys")
                plan = {}
                break
            if f < 0:       # exp(-c (R_old - R_new)) is exp(+inf) while R_old is still -inf: no rescale then
                notes.append(f"{user.name} grows with {s.name} (exp({f:g}*(x - {s.name}))): {s.name} is "
                             f"computed first, in a pass over the keys of its own")
                plan = {}
                break
            plan[user.name] = f
        if plan or not any(u.iterates_n for u in c.consumers(s.name)):
            stmts[s.name] = stmts[s.name].replace(running=True)
            for name, f in plan.items():
                if f:
                    u = stmts[name]
                    stmts[name] = u.replace(rescale=u.rescale + ((s.name, f),))
    for s in c.stmts:
        u = stmts[s.name]
        if u.reduce == "+" and u.over == ("n",) and not any(x.iterates_n for x in c.consumers(s.name)):
            stmts[s.name] = u.replace(running=True)
    return c.replace(stmts=tuple(stmts[s.name] for s in c.stmts)).with_facts(notes=notes)
