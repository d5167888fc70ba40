"""The typed AST both frontends produce: a Variant is a score modifier, a mask and a normalizer."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from attnc.errors import Loc
from attnc.ir import expr as E
from attnc.ir.expr import Node, Op

DTYPES = ("f32", "f16", "bf16", "i32", "i64", "bool")
FLOAT_DTYPES = ("f32", "f16", "bf16")
INT_DTYPES = ("i32", "i64")


@dataclass(frozen=True)
class Param:
    """A tensor supplied at call time: `param name: dtype[dims]`. A dim is a size name, an int or a free name."""
    name: str
    dtype: str
    dims: tuple[int | str, ...]
    loc: Loc | None = field(default=None, compare=False, repr=False)

    @property
    def kind(self) -> str:
        return "float" if self.dtype in FLOAT_DTYPES else "int" if self.dtype in INT_DTYPES else "bool"

    def __str__(self) -> str:
        return f"{self.name}: {self.dtype}[{', '.join(map(str, self.dims))}]"


@dataclass(frozen=True)
class Variant:
    """A resolved attention variant.

    score: the modified score, an expression of SCORE (the scaled q.k logit), indices, sizes and params.
    mask:  a boolean expression of indices, sizes and params, or None (every pair kept).
    norm:  the normalizer's weight, an expression of SCORE (the modified score), ROWMAX and ROWSUM.
    """
    name: str
    score: Node
    mask: Node | None
    norm: Node
    norm_kind: str                                  # softmax, softmax+sink, sigmoid, relu, linear, map, rownorm, general
    params: dict[str, Param]
    consts: dict[str, int | float]
    file: str = "<string>"
    captured: dict = field(default_factory=dict, compare=False, repr=False)   # callback closures: name -> tensor

    def __post_init__(self):
        """Whatever the frontend, a Variant is within the expression limits and the integer range, and
        divides integers only by what cannot be 0: what the passes and backends rely on."""
        from attnc.passes.bounds import check_divisors
        where = Loc(self.file)
        for e in (self.score, self.mask, self.norm):
            if e is not None:
                E.check_size(e, where)
                E.check_ints(e, where)
                check_divisors(e, where)

    def key(self) -> str:
        """A content hash: equal variants compile to the same kernels. Built without recursion. Every field a
        backend reads is in it: the normalizer's kind (a softmax written out is not the builtin one) and the
        file the kernel's header names."""
        text = repr((self.name, E.fingerprint(self.score, self.mask, self.norm), self.norm_kind, self.file,
                     sorted(map(str, self.params.values())), sorted(self.consts.items())))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def has_row_stats(self) -> bool:
        return self.norm.uses(Op.ROWMAX) or self.norm.uses(Op.ROWSUM)
