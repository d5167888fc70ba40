"""build: a scheduled cascade -> one KernelPlan per kernel of the schedule.

Roles decide what each statement becomes: the q.k and dO.V products are tile products; the score and the
mask are the plan's two hooks; a reduction over the loop rank is a loop-carried state (a product with an
input, like P V or dS K, is a state that accumulates tile products); a reduction over the parallel rank in a
kernel over query tiles is a scatter into the loop rank's tiles (dK, dV); other values per pair are the
pass's definitions, recomputed in every pass that needs them; values per row are computed before the first
pass, between passes, or after the last, by when their inputs are final.
"""
from __future__ import annotations

from dataclasses import replace

from attnc.ir import expr as E
from attnc.ir.cascade import Cascade, Einsum, Tensor, tensor
from attnc.ir.expr import Node, Op
from attnc.ir.lower import SCALE
from attnc.passes.pass_count import late_values, pass_of
from attnc.passes.schedule import KernelSpec
from attnc.passes.sym import canonical
from attnc.plan.model import KernelPlan, KVPass, Load, ParamGrad, Scatter, State, Store, TileDot, value

# tile products by role: (the operand's role of a kernel over query tiles, the other's); over key tiles they swap
TILE_DOTS = {"qk": ("q", "k"), "dp": ("dout", "v")}
# names of values by role; statements of other roles keep their own name, lowercased
ROLE_NAMES = {"qk": "qk", "score": "s", "mask": "keep", "weight": "p", "dp": "dp", "ds": "ds", "dqk": "dqk",
              "acc": "acc", "output": "out", "lse": "lse", "dq": "dq", "dk": "dk", "dv": "dv", "delta": "delta",
              "q": "q", "k": "k", "v": "v", "dout": "do", "dlse": "dlse"}
# an input tile's rows and width
INPUT_AXES = {"q": ("m", "e"), "k": ("n", "e"), "v": ("n", "f"), "dout": ("m", "f")}
PRODUCTS = ("acc", "dq", "dk", "dv")         # sums of a value times an input tile


def kernel_name(variant, kind: str) -> str:
    suffix = {"forward": "fwd", "backward": "bwd"}.get(kind, f"bwd_{kind}")
    return f"attnc_{variant.name}_{suffix}"


def build_plans(c: Cascade) -> tuple[KernelPlan, ...]:
    return tuple(_Builder(c, spec).plan() for spec in c.facts["kernels"])


class _Builder:
    def __init__(self, c: Cascade, spec: KernelSpec):
        self.c, self.spec = c, spec
        self.par = spec.parallel
        self.loop = "n" if self.par == "m" else "m"
        self.mine = [c.get(n) for n in spec.stmts]
        self.names: dict[str, str] = {}
        counters = {"max": 0, "+": 0}
        for s in self.mine:            # the forward's statistics read as in the tutorial: m_i, l_i, m_i2, ...
            if s.role == "stat" and self.loop in s.over and s.reduce in counters:
                counters[s.reduce] += 1
                base = "m_i" if s.reduce == "max" else "l_i"
                self.names[s.name] = base if counters[s.reduce] == 1 else f"{base}{counters[s.reduce]}"
        given = tuple(Tensor(n, c.get(n).ranks, c.get(n).role) for n in spec.given)
        own = c.replace(stmts=tuple(self.mine), inputs=c.inputs + given)
        self.when = pass_of(own, self.loop)
        self.late = late_values(own, self.loop)

    # -- names --
    def name(self, cascade_name: str) -> str:
        if cascade_name in self.names:
            return self.names[cascade_name]
        if cascade_name == "O" and self.c.role_of("O") == "saved":
            return "o"
        role = self.c.role_of(cascade_name)
        return ROLE_NAMES[role] if role in ROLE_NAMES else cascade_name.lower()

    def to_plan(self, n: Node, refs: dict[str, str] | None = None) -> Node:
        """A cascade expression in plan values: reads become the kernel's names (refs override)."""
        refs = refs or {}

        def rename(x: Node) -> Node | None:
            if x == SCALE:                  # qk is the scaled logit: the scale only ever comes multiplied by QK
                return E.const(1)
            if x.op is not Op.TENSOR:
                return None
            return Node(Op.TENSOR, arg=refs.get(x.arg) or self.name(x.arg), dtype=x.dtype)
        return E.substitute(n, rename)

    def refs(self, s: Einsum) -> dict[str, str]:
        """Reads of a running reduction of the same pass see its per-tile reference, '<state>_ref'."""
        return {r: f"{self.names[r]}_ref" for r in s.reads()
                if r in self.names and self.when.get(r) == self.when[s.name] and self.c.get(r).running}

    @staticmethod
    def strip_mask(n: Node) -> Node:
        """where(keep, x, fill) -> x at the top: a state's mask is applied by the template, on partial tiles."""
        while n.op is Op.WHERE and n.src[0].op is Op.TENSOR and n.src[0].arg == "keep":
            n = n.src[1]
        return n

    # -- the plan --
    def plan(self) -> KernelPlan:
        c, spec = self.c, self.spec
        score, mask = c.role("score"), c.role("mask")
        score = score if score is not None and score.name in spec.stmts else None
        mask = mask if mask is not None and mask.name in spec.stmts else None
        plan_score = None
        if score is not None:
            qk = {tensor(c.role("qk").name): value("qk")} if c.role("qk") is not None else {}
            plan_score = canonical(E.substitute(score.body, {**qk, SCALE: E.const(1)}))
        passes = [self.kv_pass(p) for p in range(1, spec.passes + 1)]
        prologue, epilogue, rowdots = [], [], []
        after: dict[str, int] = {}          # a row value: the pass whose loop it waits for (0: none)
        for s in self.mine:
            # the score and the mask are the plan's hooks, per tile even when they vary along one rank only
            if s.iterates(self.loop) or self.par in s.over or s.role in ("dparam", "score", "mask"):
                after[s.name] = self.when[s.name] if self.loop in s.over else 0
                continue
            after[s.name] = max([after.get(r, 0) for r in s.reads()] or [0])
            if s.role == "delta":                       # rowsum(dO * O) over the head dim
                rowdots.append((self.name(s.name),) + tuple(sorted(self.name(r) for r in s.reads())))
                continue
            line = (self.name(s.name), self.to_plan(s.body))
            if after[s.name] == 0:
                prologue.append(line)
            elif after[s.name] < spec.passes:
                i = after[s.name] - 1
                passes[i] = replace(passes[i], after=passes[i].after + (line,))
            else:
                epilogue.append(line)
        stores = tuple(self.store(c.get(n)) for n in spec.stores       # scattered outputs are returned whole
                       if c.get(n).role != "dparam" and self.par not in c.get(n).over)
        row_grads = tuple(self.param_grad(s) for s in self.mine if s.role == "dparam" and self.loop not in s.over)
        v = c.variant
        plan = KernelPlan(
            kernel_name(v, spec.kind), spec.kind, v, self.par, (), plan_score,
            mask.body if mask is not None else None, tuple(passes), stores, tuple(rowdots), tuple(prologue),
            tuple(epilogue), row_grads, c.facts.get("sparsity"), c.facts.get("bounds", ()),
            c.facts.get("block_m", 128), c.facts.get("block_n", 64), max(spec.passes, 1),
            tuple(c.facts.get("notes", ())), tuple(v.params.values()))
        return plan.replace(loads=self.loads(plan))

    def kv_pass(self, p: int) -> KVPass:
        """Pass p: its states, scatters and param gradients, and every per-pair value they read."""
        roots = [s for s in self.mine if self.when[s.name] == p and s.iterates(self.loop) and
                 (self.loop in s.over or self.par in s.over or s.role == "dparam")]
        need: set[str] = set()
        todo = [r for s in roots for r in s.reads()]
        mine = {s.name for s in self.mine}
        while todo:
            n = todo.pop()
            if n in need or n not in mine:
                continue
            s = self.c.get(n)
            if not s.iterates(self.loop) or s.reduce and s.role not in TILE_DOTS:
                continue                                   # a row value or another state: read, not recomputed
            need.add(n)
            todo += s.reads()
        dots = [self.tile_dot(r) for r in ("qk", "dp") if self.c.role(r) is not None and
                (self.c.role(r).name in need or r == "qk" and need)]
        if roots and not any(d.name == "qk" for d in dots):     # every pass computes the logit tile, if only
            dots = [self.tile_dot("qk")] + dots                 # for its shape (a score that reads no q.k)
        defs = tuple((self.name(s.name), self.to_plan(s.body, self.refs(s))) for s in self.mine
                     if s.name in need and s.reduce is None and s.role not in ("score", "mask"))
        states, scatters, grads = [], [], []
        for s in roots:
            if s.role == "dparam":
                grads.append(self.param_grad(s))
            elif self.loop in s.over:
                states.append(self.state(s))
            else:
                scatters.append(self.scatter(s))
        return KVPass(tuple(dots), tuple(states), defs, tuple(scatters), tuple(grads))

    def tile_dot(self, role: str) -> TileDot:
        a, b = (self.name(self.c.input(r).name) for r in TILE_DOTS[role])
        if self.par == "n":
            a, b = b, a
        return TileDot(ROLE_NAMES[role], a, b, scaled=role == "qk")

    def split_product(self, s: Einsum) -> tuple[Node, str, str, bool]:
        """body = value * <input tile> [* scale] -> (value, the input's name, its width, scaled)."""
        operand = next(r for r in s.reads() if r in {t.name for t in self.c.inputs}
                       and self.c.role_of(r) in INPUT_AXES)
        scaled = s.body.uses(Op.SIZE, "scale")
        body = canonical(s.body / (tensor(operand) * SCALE if scaled else tensor(operand)))
        return body, self.name(operand), INPUT_AXES[self.c.role_of(operand)][1], scaled

    def state(self, s: Einsum) -> State:
        refs = self.refs(s)
        rescale = tuple((self.names[m], cc) for m, cc in s.rescale)
        if s.role in PRODUCTS:
            body, operand, width, _ = self.split_product(s)
            return State(self.name(s.name), "dot", self.strip_mask(self.to_plan(body, refs)), rescale, operand, width)
        kind = {"max": "max", "+": "sum", "argmax": "argmax"}[s.reduce]
        return State(self.name(s.name), kind, self.strip_mask(self.to_plan(s.body, refs)), rescale)

    def scatter(self, s: Einsum) -> Scatter:
        body, operand, width, scaled = self.split_product(s)
        return Scatter(self.name(s.name), self.to_plan(body), operand, width, scaled)

    def param_grad(self, s: Einsum) -> ParamGrad:
        param, index = s.param
        return ParamGrad(param, tuple(index), self.to_plan(s.body))

    def store(self, s: Einsum) -> Store:
        """What a program writes: an output, a final statistic for the backward, or a row value for the
        kernels after it (named as in the cascade, which is how those kernels load it)."""
        width = "f" if "f" in s.ranks else "e" if "e" in s.ranks else None
        scaled = s.role in PRODUCTS and self.split_product(s)[3]
        target = self.name(s.name) if s.role in ROLE_NAMES else s.name
        return Store(target, value(self.name(s.name)), width, scaled)

    def loads(self, plan: KernelPlan) -> tuple[Load, ...]:
        """Every input tile the kernel reads, and where: once per program, or at every loop step."""
        used: set[str] = set()
        for p in plan.passes:
            used |= {d.a for d in p.dots} | {d.b for d in p.dots}
            used |= {st.operand for st in p.states if st.operand} | {sc.operand for sc in p.scatters}
        for _, a, b in plan.rowdots:
            used |= {a, b}
        for e in plan.exprs():
            used |= {x.arg for x in e.walk() if x.op is Op.TENSOR}
        out = []
        for t in self.c.inputs:
            if self.name(t.name) in used:
                out.append(self.load_of(self.name(t.name), t.name, t.role, t.ranks, t.dtype))
        for g in self.spec.given:
            s = self.c.get(g)
            if self.name(g) in used:
                out.append(self.load_of(self.name(g), g, s.role, s.ranks, E.INT if s.reduce == "argmax" else E.FLOAT))
        return tuple(out)

    def load_of(self, name: str, tensor_name: str, role: str, ranks, dtype) -> Load:
        if role in INPUT_AXES:
            rank, width = INPUT_AXES[role]
        elif "f" in ranks:                              # the saved output, for Δ
            rank, width = "m", "f"
        else:                                           # a value per query row
            rank, width = "m", None
        return Load(name, tensor_name, role, rank, width, "program" if rank == self.par else "step", dtype)
