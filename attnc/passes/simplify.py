"""simplify: cascade -> cascade with canonical map bodies (sympy), folded constants, merged duplicate
statements, unused statements dropped, and each statement's ranks cut to the ones its body really uses."""
from __future__ import annotations

from typing import Callable

from attnc.ir import expr as E
from attnc.ir.cascade import INDEX_RANK, Cascade, Einsum, tensor
from attnc.ir.expr import BOOL, Node, Op
from attnc.passes.sym import canonical

_T, _F = E.const(True), E.const(False)


def _is(n: Node, v) -> bool:
    return n.op is Op.CONST and n.arg == v and (n.dtype == BOOL) == isinstance(v, bool)


# each rule: node -> replacement or None. The comment states the algebra.
RULES: list[Callable[[Node], Node | None]] = [
    lambda n: n.src[1] if n.op is Op.WHERE and n.src[1] == n.src[2] else None,          # where(c, x, x) -> x
    lambda n: n.src[1] if n.op is Op.WHERE and _is(n.src[0], True) else None,           # where(True, a, b) -> a
    lambda n: n.src[2] if n.op is Op.WHERE and _is(n.src[0], False) else None,          # where(False, a, b) -> b
    lambda n: n.src[1] if n.op is Op.AND and _is(n.src[0], True) else None,             # True and x -> x
    lambda n: n.src[0] if n.op is Op.AND and _is(n.src[1], True) else None,             # x and True -> x
    lambda n: _F if n.op is Op.AND and (_is(n.src[0], False) or _is(n.src[1], False)) else None,  # False and x -> False
    lambda n: n.src[1] if n.op is Op.OR and _is(n.src[0], False) else None,             # False or x -> x
    lambda n: n.src[0] if n.op is Op.OR and _is(n.src[1], False) else None,             # x or False -> x
    lambda n: _T if n.op is Op.OR and (_is(n.src[0], True) or _is(n.src[1], True)) else None,  # True or x -> True
    lambda n: n.src[0] if n.op in (Op.AND, Op.OR) and n.src[0] == n.src[1] else None,   # x and x -> x
    lambda n: n.src[0].src[0] if n.op is Op.NOT and n.src[0].op is Op.NOT else None,    # not not x -> x
    lambda n: _fold_compare(n),                                                          # i == i -> True
    lambda n: E.fold(n, strict=False),                 # 3 < 4 -> True, relu(-0.5) -> 0.0: constants, as the reference computes them
]

def _fold_compare(n: Node) -> Node | None:
    if n.op in (Op.EQ, Op.LE, Op.GE) and n.src[0] == n.src[1] and n.src[0].dtype != E.FLOAT:
        return _T                                  # x == x -> True (not for floats: NaN == NaN is False)
    return None


def rewrite(root: Node) -> Node:
    """Apply RULES bottom-up until none fires."""
    def step(n: Node) -> Node | None:
        for rule in RULES:
            out = rule(n)
            if out is not None:
                return out
        return None
    prev = None
    while prev != root:
        prev, root = root, E.substitute(root, step)
    return root


def simplify_body(n: Node) -> Node:
    x = canonical(rewrite(n))
    y = rewrite(x)
    return y if y == x else rewrite(canonical(y))     # a rule folded something sympy can now combine


def rank_of(c_ranks: dict[str, tuple[str, ...]], s: Einsum) -> tuple[str, ...]:
    """The ranks a statement's body really depends on, in canonical order."""
    used = {INDEX_RANK[x.arg] for x in s.body.walk() if x.op is Op.INDEX}
    for r in s.reads():
        used |= set(c_ranks[r])
    if s.role in CONTRACTIONS:
        used = {"b", "h"} | {r for t in s.reads() for r in c_ranks[t]}
    used -= set(s.over)
    return tuple(r for r in ("b", "h", "m", "n", "e", "f") if r in used)


KEEP = ("score",)     # the score statement is the plan's score hook: kept even when constant or unread
CONTRACTIONS = ("qk", "dp")     # products of two inputs reduced over a head dim: left as they are


def simplify(c: Cascade) -> Cascade:
    ranks = {t.name: t.ranks for t in c.inputs}
    keep = tuple(s.name for s in c.stmts if s.role in KEEP)
    rename: dict[str, Node] = {}          # a statement read by name -> what to read instead

    def renamed(n: Node) -> Node | None:
        return rename.get(n.arg) if n.op is Op.TENSOR else None
    seen: dict[tuple, str] = {}
    out: list[Einsum] = []
    for s in c.stmts:
        body = E.substitute(s.body, renamed) if rename else s.body
        body = body if s.role in CONTRACTIONS else simplify_body(body)
        if body.op in (Op.TENSOR, Op.CONST) and s.reduce is None and s.name not in c.outputs + keep:
            rename[s.name] = body                                    # a copy or a constant: read it directly
            continue
        key = (body, s.reduce, s.over, s.running, s.rescale, s.role, s.param)
        if key in seen and s.name not in c.outputs:
            rename[s.name] = tensor(seen[key], body.dtype)        # X = Y, same body -> one
            continue
        seen[key] = s.name
        s = s.replace(body=body)
        # an output keeps its shape even when its value is constant along some rank, and so does the score:
        # it is a value per pair (the plan's score hook), which the weights read inside the loop over keys
        s = s.replace(ranks=s.ranks if s.name in c.outputs or s.role in KEEP else rank_of(ranks, s))
        ranks[s.name] = s.ranks
        out.append(s)
    return c.replace(stmts=tuple(drop_unused(out, c.outputs)))


def drop_unused(stmts: list[Einsum], outputs: tuple[str, ...]) -> list[Einsum]:
    live = set(outputs) | {s.name for s in stmts if s.role in KEEP}
    for s in reversed(stmts):
        if s.name in live:
            live |= set(s.reads())
    return [s for s in stmts if s.name in live]
