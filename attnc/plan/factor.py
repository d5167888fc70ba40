"""factor: per-pair sums and products arranged so that each row value reaches the tile once.

    a*f + b*f -> (a + b)*f     f a per-pair factor of both terms: one multiplication of the tile, not two
    a*f - b*f -> (a - b)*f
    x*r1*r2   -> x*(r1*r2)     the row factors multiplied together per row, then once into the tile

then every row value inside a per-pair expression (1 /? l1, the product r1*r2) -> a prologue value,
computed once per program instead of once per key tile. Factors are matched by structure; a rearranged
sum or product rounds differently, never by more than its own operations do."""
from __future__ import annotations

from attnc.ir import expr as E
from attnc.ir.expr import Node, Op
from attnc.plan.model import KernelPlan, value
from attnc.plan.rows import fresh, is_row, map_pairs, prologue_rows, with_prologue


def _factors(n: Node) -> list[Node]:
    """The operands of a chain of float multiplications, in order."""
    out, stack = [], [n]
    while stack:
        x = stack.pop()
        if x.op is Op.MUL and x.dtype == E.FLOAT and all(s.dtype == E.FLOAT for s in x.src):
            stack += [x.src[1], x.src[0]]
        else:
            out.append(x)
    return out


def _product(factors: list[Node]) -> Node:
    out = factors[0] if factors else E.const(1.0)
    for f in factors[1:]:
        out = out * f
    return out


def factor(plan: KernelPlan) -> KernelPlan:
    rows = prologue_rows(plan)
    row = lambda n: is_row(n, plan, rows)

    def fix(n: Node) -> Node | None:
        if n.dtype != E.FLOAT:
            return None
        if n.op in (Op.ADD, Op.SUB):
            a, b = _factors(n.src[0]), _factors(n.src[1])
            common = next((f for f in a if not row(f) and f in b), None)
            if common is None:
                return None
            a.remove(common)
            b.remove(common)
            return E.make(n.op, _product(a), _product(b)) * common          # a*f + b*f -> (a + b)*f
        if n.op is Op.MUL:
            fs = _factors(n)
            pairs, rs = [f for f in fs if not row(f)], [f for f in fs if row(f)]
            if not pairs or len(rs) < 2 and (not rs or fs[-1] is rs[0]):
                return None
            return _product(pairs) * _product(rs)                           # x*r1*r2 -> x*(r1*r2)
        return None

    out = map_pairs(plan, lambda root: E.bottom_up(root, fix))
    return _hoist_rows(out, rows)


def _hoist_rows(plan: KernelPlan, rows: set[str]) -> KernelPlan:
    """Each largest row subexpression of a per-pair expression that computes something (reads a value and is
    not just that value) -> a prologue value."""
    names: dict[Node, str] = {e: n for n, e in plan.prologue}      # a value the prologue has is read from it
    lines: list[tuple[str, Node]] = []

    def worth(n: Node) -> bool:
        return (n.dtype == E.FLOAT and n.src and n.op is not Op.TOFLOAT and is_row(n, plan, rows)
                and any(x.op in (Op.TENSOR, Op.LOAD) for x in n.walk()))

    def hoist(root: Node) -> Node:
        found, stack, seen = [], [root], set()
        while stack:                                     # the largest ones: never below one already found
            n = stack.pop()
            if id(n) in seen:
                continue
            seen.add(id(n))
            if n is not root and worth(n):
                found.append(n)
            else:
                stack.extend(n.src)
        for n in found:
            if n not in names:
                names[n] = fresh(plan.replace(prologue=plan.prologue + tuple(lines)), f"r{len(lines) + 1}")
                lines.append((names[n], n))
        return E.substitute(root, {n: value(names[n]) for n in found}) if found else root
    out = map_pairs(plan, hoist)
    return with_prologue(out, lines) if lines else plan
