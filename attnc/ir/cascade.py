"""The cascade of Einsums: each statement defines one tensor once, as a map over named ranks."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from attnc.ir.expr import Node, Op

# rank names: batch, head, query, key, qk-dim, v-dim
RANKS = ("b", "h", "m", "n", "e", "f")
INDEX_RANK = {"b": "b", "h": "h", "q_idx": "m", "kv_idx": "n"}
INPUTS = ("Q", "K", "V")


@dataclass(frozen=True)
class Einsum:
    """name[ranks] = body, optionally reduced over `over` with '+' or 'max'.

    running: the reduction over n is carried across key tiles (online), and every
    sum whose summand holds exp(c * (x - R)) of a running max R is rescaled by
    exp(c * (R_old - R_new)) when R moves; `rescale` lists those (R, c) pairs.
    """
    name: str
    ranks: tuple[str, ...]
    body: Node
    reduce: str | None = None
    over: tuple[str, ...] = ()
    running: bool = False
    rescale: tuple[tuple[str, float], ...] = ()
    note: str = ""

    def replace(self, **kw) -> "Einsum":
        return replace(self, **kw)

    def reads(self) -> list[str]:
        return [n.arg for n in self.body.walk() if n.op is Op.TENSOR]

    @property
    def iterates_n(self) -> bool:
        return "n" in self.ranks or "n" in self.over


@dataclass(frozen=True)
class Cascade:
    """A variant's forward pass as statements in dependency order, plus what the passes learned."""
    stmts: tuple[Einsum, ...]
    outputs: tuple[str, ...]                 # ('O',) or ('O', 'LSE')
    variant: object                          # the frontend Variant it came from
    facts: dict = field(default_factory=dict, compare=False)   # pass results: block_m, sparsity, bounds, notes

    def replace(self, **kw) -> "Cascade":
        return replace(self, **kw)

    def get(self, name: str) -> Einsum:
        for s in self.stmts:
            if s.name == name:
                return s
        raise KeyError(name)

    def consumers(self, name: str) -> list[Einsum]:
        return [s for s in self.stmts if name in s.reads()]

    def with_facts(self, **kw) -> "Cascade":
        return replace(self, facts={**self.facts, **kw})


def tensor(name: str, dtype: str = "float") -> Node:
    """A read of a cascade tensor at the reading statement's own ranks."""
    return Node(Op.TENSOR, arg=name, dtype=dtype)


def verify(c: Cascade) -> None:
    """The cascade's invariants: single definition, defined-before-use, known ranks, reductions drop their ranks."""
    defined = set(INPUTS)
    for s in c.stmts:
        assert s.name not in defined, f"{s.name} defined twice"
        for r in s.reads():
            assert r in defined, f"{s.name} reads {r} before it is defined"
        assert set(s.ranks) <= set(RANKS), f"{s.name} has unknown ranks {s.ranks}"
        assert not set(s.over) & set(s.ranks), f"{s.name} keeps a rank it reduces"
        assert (s.reduce is None) == (not s.over), f"{s.name}: reduce and over disagree"
        assert s.reduce in (None, "+", "max"), f"{s.name}: unknown reduction {s.reduce}"
        assert not s.running or s.over == ("n",), f"{s.name}: only reductions over n run online"
        for n in s.body.walk():
            assert n.op not in (Op.NAME, Op.MEMBER, Op.CALL, Op.SCORE, Op.ROWMAX, Op.ROWSUM), \
                f"{s.name} still holds a frontend node {n.op.name}"
        defined.add(s.name)
    for o in c.outputs:
        assert o in defined, f"output {o} is never defined"
