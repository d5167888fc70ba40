"""base2: exp(x) -> exp2(x) with log2(e) folded into the logit's scale, wherever the exponent is linear in the
logit, the score and its running maxima (softmax and its relatives, the backward's recomputed weights).

The kernel scales q.k by sm_scale * log2(e), so qk, the score s and every running maximum of it hold their
natural value times log2(e) ("base-2 units"). The score is rewritten to produce s in base 2: log2(e) times
the variant's score of qk * ln(2), with both constants pushed into the factors that absorb them at no cost
(ALiBi's slope, a temperature's divisor, softcap's constants, a bias added to qk: `qk - (log2(e) *
slopes[h]) * d`). Then, in every expression of the plan:

    exp(l)      -> exp2(l')              l linear in base-2 values; l' is l with the rest times log2(e)
    sigmoid(l)  -> sigmoid(ln(2) * l')   which a backend prints as a base-2 sigmoid
    any other read of a base-2 value v -> v * ln(2)   (natural units again, folded into a constant factor)

and values outside the loop that read a maximum (the epilogue's lse, the saved statistics) read it times
ln(2). The pass applies only where it saves per-element multiplies: each exponent rewritten saves one, each
other read of a base-2 value or of a per-element rest costs one."""
from __future__ import annotations

from dataclasses import replace

from attnc.ir import expr as E
from attnc.ir.expr import Node, Op
from attnc.plan.model import KernelPlan, value

LN2 = 0.6931471805599453
LOG2E = 1.4426950408889634          # LOG2E * LN2 == 1.0 exactly in float64
LOOP_INDEX = {"m": "kv_idx", "n": "q_idx"}      # by the plan's parallel rank
LINEAR = {Op.ADD, Op.SUB, Op.NEG}


def scaled_names(plan: KernelPlan) -> set[str]:
    maxes = [s.name for p in plan.passes for s in p.maxes]
    return {"qk", "s"} | set(maxes) | {f"{m}{x}" for m in maxes for x in ("_ref", "_part")}


def _is_const(n: Node) -> bool:
    return n.op is Op.CONST and n.dtype == E.FLOAT


class _Units:
    """Rewrites of one plan's expressions into base-2 units, with a count of the per-element multiplies they
    save (each exponent rewritten) and cost (each other read of a base-2 value, each rest times log2(e))."""

    def __init__(self, plan: KernelPlan):
        self.scaled = scaled_names(plan)
        self.loop = LOOP_INDEX[plan.parallel]
        self.per_pair = {"qk", "s", "dp", "keep"} | {n for p in plan.passes for n, _ in p.defs}
        self.saves: set[Node] = set()
        self.costs: set[Node] = set()

    # -- what a value is --
    def base2(self, n: Node) -> bool:
        return any(x.op is Op.TENSOR and x.arg in self.scaled for x in n.walk())

    def per_row(self, n: Node) -> bool:
        """n is the same for every element of a tile row (or of the tile): a multiply by it is not per element."""
        return self.loop not in E.free_indices(n) and not any(
            x.op is Op.TENSOR and x.arg in self.per_pair for x in n.walk())

    def linear(self, n: Node) -> bool:
        """n is a linear combination of base-2 values, with coefficients and a rest that are not."""
        if not self.base2(n) or n.op is Op.TENSOR:
            return True
        if n.op in LINEAR:
            return all(self.linear(x) for x in n.src)
        if n.op is Op.MUL:
            a, b = n.src
            return (self.linear(a) and not self.base2(b)) or (self.linear(b) and not self.base2(a))
        if n.op is Op.DIV:
            return self.linear(n.src[0]) and not self.base2(n.src[1])
        return False

    @staticmethod
    def natural_read(n: Node) -> bool:
        """v * ln(2): a base-2 value read in natural units."""
        return n.op is Op.MUL and n.src[1] == E.const(LN2) and n.src[0].op is Op.TENSOR

    # -- constants pushed into the factor that absorbs them --
    def absorbs(self, n: Node) -> bool:
        """c * n costs no multiply per element of its own."""
        if _is_const(n) or self.per_row(n) or self.natural_read(n):
            return True
        if n.op is Op.MUL:
            return any(self.absorbs(x) for x in n.src)
        if n.op in (Op.DIV, Op.NEG):
            return self.absorbs(n.src[0])
        if n.op in (Op.ADD, Op.SUB):
            return all(self.absorbs(x) for x in n.src)
        return False

    def times(self, c: float, n: Node) -> Node:
        """c * n, with c folded into a constant, a row value or a natural-units read where n has one."""
        if _is_const(n):
            return E.const(c * n.arg)                                   # c * a -> (c a)
        if self.natural_read(n) and c == LOG2E:
            return n.src[0]                                             # log2(e) * (v ln 2) -> v
        if n.op is Op.MUL:
            # the factor to take c: a constant, else a row value, else one that absorbs it further down
            order = sorted((0, 1), key=lambda i: (not _is_const(n.src[i]), not self.per_row(n.src[i])))
            for i in order:
                if self.absorbs(n.src[i]):
                    srcs = list(n.src)
                    srcs[i] = self.times(c, srcs[i])
                    return E.make(Op.MUL, *srcs)                        # c (a b) -> (c a) b
        if n.op is Op.DIV and self.absorbs(n.src[0]):
            return E.make(Op.DIV, self.times(c, n.src[0]), n.src[1])   # c (a / b) -> (c a) / b
        if n.op is Op.NEG:
            return E.make(Op.NEG, self.times(c, n.src[0]))              # c (-a) -> -(c a)
        if n.op in (Op.ADD, Op.SUB) and all(self.absorbs(x) for x in n.src):
            return E.make(n.op, *(self.times(c, x) for x in n.src))     # c (a + b) -> c a + c b
        if not self.per_row(n):
            self.costs.add(n)                                           # a multiply per element
        return E.make(Op.MUL, E.const(c), n)

    # -- the rewrites --
    def exponent(self, n: Node) -> Node:
        """A linear combination with its base-2 values kept and its rest times log2(e)."""
        if not self.base2(n):
            return self.times(LOG2E, n)
        if n.op is Op.TENSOR:
            return n
        if n.op in LINEAR:
            return E.make(n.op, *(self.exponent(x) for x in n.src))     # term by term
        if n.op is Op.MUL:
            a, b = n.src
            return E.make(Op.MUL, self.exponent(a), b) if self.base2(a) else E.make(Op.MUL, a, self.exponent(b))
        return E.make(Op.DIV, self.exponent(n.src[0]), n.src[1])        # (l / d)' = l' / d

    def natural(self, root: Node) -> Node:
        """root with its exponentials of linear combinations in base 2, its other reads of base-2 values in
        natural units (times ln 2, folded into a constant factor where there is one)."""
        memo: dict[Node, Node] = {}
        base2_sigmoid: set[Node] = set()         # the operands of sigmoids in base 2: not reads in natural units
        for n in root.walk():
            if n.op in (Op.EXP, Op.SIGMOID) and self.base2(n.src[0]) and self.linear(n.src[0]):
                self.saves.add(n)
                x = self.exponent(n.src[0])
                if n.op is Op.EXP:
                    memo[n] = Node(Op.EXP2, (x,), dtype=E.FLOAT)                    # exp(x) = 2^(x log2 e)
                else:
                    base2_sigmoid.add(E.make(Op.MUL, x, E.const(LN2)))
                    memo[n] = Node(Op.SIGMOID, (E.make(Op.MUL, x, E.const(LN2)),), dtype=E.FLOAT)
            elif n.op is Op.TENSOR and n.arg in self.scaled:
                memo[n] = E.make(Op.MUL, n, E.const(LN2))                       # v = v2 ln 2
            else:
                srcs = tuple(memo[x] for x in n.src)
                m = n if srcs == n.src else Node(n.op, srcs, n.arg, E.keep_dtype(n, srcs), n.loc)
                memo[n] = self.fold(m)
        out = memo[root]
        self.costs |= {n for n in out.walk() if self.natural_read(n) and n.src[0].arg in self.scaled
                       and not self.per_row(n.src[0]) and n not in base2_sigmoid}
        return out

    def fold(self, n: Node) -> Node:
        """A natural-units read under a constant factor takes ln(2) into it: a (v ln 2) -> (a ln 2) v."""
        if n.op is not Op.MUL:
            return n
        for i in (0, 1):
            c, x = n.src[i], n.src[1 - i]
            if _is_const(c) and self.natural_read(x):
                return E.make(Op.MUL, E.const(c.arg * LN2), x.src[0])
        return n


def exp2_of(root: Node, scaled: set[str]) -> Node | None:
    """root with exp(linear combination of base-2 values) as exp2 of it; None if a base-2 value is used any
    other way. (The backends' rescale factors exp(c (m_old - m)) of running maxima.)"""
    def linear(n: Node) -> bool:
        if n.op is Op.TENSOR:
            return n.arg in scaled
        if n.op in (Op.ADD, Op.SUB):
            return all(linear(x) for x in n.src)
        if n.op is Op.NEG:
            return linear(n.src[0])
        if n.op is Op.MUL:
            a, b = n.src
            return (a.op is Op.CONST and linear(b)) or (b.op is Op.CONST and linear(a))
        return False

    memo: dict[Node, Node] = {}
    exposed: set[Node] = set()          # nodes that carry a base-2 value outside a linear exp
    for n in root.walk():
        if n.op is Op.EXP and linear(n.src[0]):
            memo[n] = Node(Op.EXP2, n.src, dtype=E.FLOAT)          # exp(x) = exp2(x log2 e), x already scaled
            continue
        if (n.op is Op.TENSOR and n.arg in scaled) or any(x in exposed for x in n.src):
            exposed.add(n)
        srcs = tuple(memo[x] for x in n.src)
        memo[n] = n if srcs == n.src else Node(n.op, srcs, n.arg, E.keep_dtype(n, srcs), n.loc)
    return None if root in exposed else memo[root]


def base2(plan: KernelPlan) -> KernelPlan:
    if plan.kind not in ("forward", "dq", "dkdv") or not any(d.scaled for p in plan.passes for d in p.dots):
        return plan
    if any(s.value != value("s") for p in plan.passes for s in p.maxes):
        return plan                                     # a running max of anything but the score itself
    units = _Units(plan)
    score = plan.score if plan.score is not None else value("qk")
    natural_qk = E.bottom_up(E.substitute(score, {value("qk"): E.make(Op.MUL, value("qk"), E.const(LN2))}),
                             units.fold)
    new_score = units.times(LOG2E, natural_qk)          # s2 = log2(e) * score(qk2 * ln 2)
    units.costs |= {n for n in new_score.walk() if units.natural_read(n)}
    passes = tuple(replace(
        p, states=tuple(s if s.kind == "max" else replace(s, value=units.natural(s.value)) for s in p.states),
        defs=tuple((n, units.natural(e)) for n, e in p.defs),
        scatters=tuple(replace(s, value=units.natural(s.value)) for s in p.scatters),
        grads=tuple(replace(g, value=units.natural(g.value), index=tuple(units.natural(i) for i in g.index))
                    for g in p.grads),
        after=tuple((n, units.natural(e)) for n, e in p.after)) for p in plan.passes)
    out = replace(plan, passes=passes, prologue=tuple((n, units.natural(e)) for n, e in plan.prologue),
                  epilogue=tuple((n, units.natural(e)) for n, e in plan.epilogue),
                  stores=tuple(replace(s, value=units.natural(s.value)) for s in plan.stores),
                  row_grads=tuple(replace(g, value=units.natural(g.value),
                                          index=tuple(units.natural(i) for i in g.index)) for g in plan.row_grads))
    if len(units.saves) <= len(units.costs):
        return plan                                     # no fewer multiplies per element
    return replace(out, score=new_score if plan.score is not None else None, base2=True)
