"""The cascade of Einsums: each statement defines one tensor once, as a map over named ranks.

Every tensor carries a role that says what it is (the q.k logits, the score, the mask, a row statistic, the
weights, the output; for backward dO, Δ, dP, dS, dQ, dK, dV and param gradients). Passes, the scheduler and
the plan read roles, never names: names are only what the printer shows.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from attnc.errors import AttncError
from attnc.ir.expr import Node, Op

# rank names: batch, head, query, key, qk-dim, v-dim
RANKS = ("b", "h", "m", "n", "e", "f")
INDEX_RANK = {"b": "b", "h": "h", "q_idx": "m", "kv_idx": "n"}

# what a tensor can be. Forward: qk (Q.K), score, mask, stat (a row statistic), weight (P), acc (the sum of
# weight * V before the epilogue), output (O), lse. Inputs: q, k, v; for backward also dout (dO), saved
# (O and the forward's final row statistics) and dlse. Backward: dp (dO.V), delta (Δ = rowsum(dO * O)),
# rowgrad (the adjoint of a row statistic, or a sum over keys it needs), ds (d loss / d score), dqk (d loss /
# d scaled logit), dq, dk, dv, dparam (a float param's gradient).
ROLES = ("q", "k", "v", "qk", "score", "mask", "stat", "weight", "acc", "output", "lse",
         "dout", "saved", "dlse", "dp", "delta", "rowgrad", "ds", "dqk", "dq", "dk", "dv", "dparam", "temp")


class IRError(AttncError):
    """A cascade or plan that breaks an invariant: a compiler bug, never a user's."""


@dataclass(frozen=True)
class Tensor:
    """A tensor the cascade reads but does not define: a kernel input."""
    name: str
    ranks: tuple[str, ...]
    role: str
    dtype: str = "float"


FORWARD_INPUTS = (Tensor("Q", ("b", "h", "m", "e"), "q"), Tensor("K", ("b", "h", "n", "e"), "k"),
                  Tensor("V", ("b", "h", "n", "f"), "v"))


@dataclass(frozen=True)
class Einsum:
    """name[ranks] = body, optionally reduced over `over` with '+', 'max' or 'argmax' (the first index of n
    holding the max).

    running: the reduction over the loop rank is carried across its tiles (online), and every sum whose
    summand holds exp(c * (x - R)) of a running max R is rescaled by exp(c * (R_old - R_new)) when R moves;
    `rescale` lists those (R, c) pairs. param: for a dparam statement, the param whose gradient it is and
    its index expressions (the gradient is scattered there).
    """
    name: str
    ranks: tuple[str, ...]
    body: Node
    reduce: str | None = None
    over: tuple[str, ...] = ()
    running: bool = False
    rescale: tuple[tuple[str, float], ...] = ()
    note: str = ""
    role: str = "temp"
    param: tuple = ()

    def replace(self, **kw) -> "Einsum":
        return replace(self, **kw)

    def reads(self) -> list[str]:
        return [n.arg for n in self.body.walk() if n.op is Op.TENSOR]

    @property
    def iterates_n(self) -> bool:
        return "n" in self.ranks or "n" in self.over

    def iterates(self, rank: str) -> bool:
        return rank in self.ranks or rank in self.over


@dataclass(frozen=True)
class Cascade:
    """A computation as statements in dependency order, its inputs and outputs, and what passes learned."""
    stmts: tuple[Einsum, ...]
    outputs: tuple[str, ...]                 # ('O',) or ('O', 'LSE'); backward: dQ, dK, dV, param grads
    variant: object                          # the frontend Variant it came from
    facts: dict = field(default_factory=dict, compare=False)   # pass results: schedule, sparsity, bounds, notes
    inputs: tuple[Tensor, ...] = FORWARD_INPUTS
    direction: str = "forward"               # 'forward' | 'backward'

    def replace(self, **kw) -> "Cascade":
        return replace(self, **kw)

    def get(self, name: str) -> Einsum:
        for s in self.stmts:
            if s.name == name:
                return s
        raise KeyError(name)

    def role(self, role: str) -> Einsum | None:
        """The one statement with this role, or None."""
        found = [s for s in self.stmts if s.role == role]
        if len(found) > 1:
            raise IRError(f"{len(found)} statements have role {role}: {', '.join(s.name for s in found)}")
        return found[0] if found else None

    def roles(self, role: str) -> list[Einsum]:
        return [s for s in self.stmts if s.role == role]

    def input(self, role: str) -> Tensor | None:
        return next((t for t in self.inputs if t.role == role), None)

    def ranks_of(self, name: str) -> tuple[str, ...]:
        for t in self.inputs:
            if t.name == name:
                return t.ranks
        return self.get(name).ranks

    def role_of(self, name: str) -> str:
        for t in self.inputs:
            if t.name == name:
                return t.role
        return self.get(name).role

    def consumers(self, name: str) -> list[Einsum]:
        return [s for s in self.stmts if name in s.reads()]

    def with_facts(self, **kw) -> "Cascade":
        return replace(self, facts={**self.facts, **kw})


def tensor(name: str, dtype: str = "float") -> Node:
    """A read of a cascade tensor at the reading statement's own ranks."""
    return Node(Op.TENSOR, arg=name, dtype=dtype)


FRONTEND_OPS = (Op.NAME, Op.MEMBER, Op.CALL, Op.SCORE, Op.ROWMAX, Op.ROWSUM)


def verify(c: Cascade) -> None:
    """The cascade's invariants: single definition, defined-before-use, known ranks and roles, reductions drop
    their ranks, only reductions over a tiled rank run online, no frontend node left. Raises IRError."""
    def check(ok: bool, what: str) -> None:
        if not ok:
            raise IRError(f"invalid cascade: {what}")

    defined = {t.name for t in c.inputs}
    check(len(defined) == len(c.inputs), "two inputs share a name")
    for s in c.stmts:
        check(s.name not in defined, f"{s.name} defined twice")
        for r in s.reads():
            check(r in defined, f"{s.name} reads {r} before it is defined")
        check(set(s.ranks) <= set(RANKS), f"{s.name} has unknown ranks {s.ranks}")
        check(s.role in ROLES, f"{s.name} has unknown role {s.role!r}")
        check(not set(s.over) & set(s.ranks), f"{s.name} keeps a rank it reduces")
        check((s.reduce is None) == (not s.over), f"{s.name}: reduce and over disagree")
        check(s.reduce in (None, "+", "max", "argmax"), f"{s.name}: unknown reduction {s.reduce}")
        check(not s.running or s.over in (("n",), ("m",)), f"{s.name}: only reductions over n or m run online")
        for n in s.body.walk():
            check(n.op not in FRONTEND_OPS, f"{s.name} still holds a frontend node {n.op.name}")
        defined.add(s.name)
    for o in c.outputs:
        check(o in defined, f"output {o} is never defined")
    for role in ("qk", "score", "mask", "weight", "output", "lse", "ds", "dp", "delta"):
        check(len(c.roles(role)) <= 1, f"more than one statement has role {role}")
