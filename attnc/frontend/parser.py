"""Text -> statements: the lark parser for grammar/attn.lark and its transformer to typed nodes."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import lark
from lark import v_args
from lark.visitors import Transformer_NonRecursive

from attnc.errors import Loc, SpecError, loc_in, source_lines
from attnc.ir import expr as E
from attnc.ir.expr import Node, Op, const, make


def resource_dir(name: str) -> Path:
    """grammar/ or templates/: inside the installed package, or at the top of a checkout."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here / name, here.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"attnc installation is missing its {name}/ folder")


@functools.lru_cache(maxsize=1)
def _parser() -> lark.Lark:
    grammar = (resource_dir("grammar") / "attn.lark").read_text()
    return lark.Lark(grammar, parser="lalr", propagate_positions=True, maybe_placeholders=False)


@dataclass(frozen=True)
class Stmt:
    """One line of a spec: kind is variant/const/param/import/let/assign."""
    kind: str
    name: str
    value: object       # Node, number, (dtype, dims) or import path
    loc: Loc


# what the parser can say it wanted, in words a user reads
_TOKEN_WORDS = {
    "NAME": "a name", "NUMBER": "a number", "STRING": "a quoted path", "COMP_OP": "a comparison",
    "_NL": "end of line", "LPAR": "'('", "RPAR": "')'", "LSQB": "'['", "RSQB": "']'", "EQUAL": "'='",
    "COLON": "':'", "COMMA": "','", "PLUS": "'+'", "MINUS": "'-'", "STAR": "'*'", "SLASH": "'/'",
    "DOT": "'.'", "$END": "end of file",
}


def _words(tokens) -> str:
    names = sorted({_TOKEN_WORDS.get(t, repr(t.lower()) if t.isalpha() else t) for t in tokens})
    return ", ".join(names[:8]) + (" or more" if len(names) > 8 else "")


class _ToStmts(Transformer_NonRecursive):
    """Parse tree -> Stmt list. Every alias in the grammar has a method here; anything else raises.
    Non-recursive: a spec may nest deeper than Python's stack; the resolver measures its expressions."""

    def __init__(self, source: str, file: str):
        super().__init__()
        self.source, self.file = source, file

    def __default__(self, data, children, meta):
        raise SpecError(f"internal: grammar rule {data!r} has no transformer method")

    def _loc(self, meta) -> Loc:
        return loc_in(self.source, self.file, getattr(meta, "line", 0), getattr(meta, "column", 0))

    def _tok_loc(self, tok) -> Loc:
        return loc_in(self.source, self.file, tok.line, tok.column)

    def _number(self, tok) -> int | float:
        v = _number(tok)
        if isinstance(v, int) and v > E.INT_MAX:
            raise SpecError("integer literal too large", self._tok_loc(tok), E.INT_RANGE_WORDS)
        if isinstance(v, float) and 0 < v < E.FLOAT_TINY:
            raise SpecError("number below float64's normal range", self._tok_loc(tok), E.TINY_WORDS)
        return v

    def start(self, children):
        return list(children)

    # -- statements --
    @v_args(meta=True)
    def variant_stmt(self, meta, c): return Stmt("variant", str(c[0]), None, self._loc(meta))
    @v_args(meta=True)
    def const_stmt(self, meta, c): return Stmt("const", str(c[0]), c[1], self._loc(meta))
    @v_args(meta=True)
    def param_stmt(self, meta, c):
        dims = c[2] if len(c) > 2 else ()
        return Stmt("param", str(c[0]), (str(c[1]), dims, self._tok_loc(c[1])), self._loc(meta))
    @v_args(meta=True)
    def import_stmt(self, meta, c): return Stmt("import", str(c[1]), str(c[0])[1:-1], self._loc(meta))
    @v_args(meta=True)
    def let_stmt(self, meta, c): return Stmt("let", str(c[0]), c[1], self._loc(meta))
    @v_args(meta=True)
    def assign_stmt(self, meta, c): return Stmt("assign", str(c[0]), c[1], self._tok_loc(c[0]))

    def dims(self, c): return tuple(c)
    def dim_name(self, c): return (str(c[0]), self._tok_loc(c[0]))
    def dim_int(self, c):
        if not str(c[0]).isdigit():
            raise SpecError("a dimension must be a whole number or a size name", self._tok_loc(c[0]),
                            "an integer like 64, or a name like H or KV")
        return (int(c[0]), self._tok_loc(c[0]))
    def pos_number(self, c): return self._number(c[0])
    def neg_number(self, c): return -self._number(c[0])

    # -- expressions --
    def number(self, c): return const(self._number(c[0])).replace(loc=self._tok_loc(c[0]))
    def name(self, c): return Node(Op.NAME, arg=str(c[0]), loc=self._tok_loc(c[0]))
    def member(self, c): return Node(Op.MEMBER, arg=(str(c[0]), str(c[1])), loc=self._tok_loc(c[0]))
    def index(self, c): return Node(Op.LOAD, tuple(c[1:]), str(c[0]), loc=self._tok_loc(c[0]))
    def call(self, c):
        pos = [a for a in c[1:] if not isinstance(a, tuple)]
        kws = [a for a in c[1:] if isinstance(a, tuple)]
        if kws and c[1:].index(kws[0]) < len(pos):
            raise SpecError("positional argument after a keyword argument", self._tok_loc(c[0]))
        return Node(Op.CALL, tuple(pos) + tuple(v for _, v in kws), (str(c[0]), tuple(k for k, _ in kws)),
                    loc=self._tok_loc(c[0]))
    def kwarg(self, c): return (str(c[0]), c[1])

    def _bin(op):
        @v_args(meta=True)
        def build(self, meta, c):
            return make(op, c[0], c[1], loc=self._loc(meta))
        return build
    add, sub, mul, div = _bin(Op.ADD), _bin(Op.SUB), _bin(Op.MUL), _bin(Op.DIV)
    floordiv, mod, pow = _bin(Op.FLOORDIV), _bin(Op.MOD), _bin(Op.POW)
    and_, or_ = _bin(Op.AND), _bin(Op.OR)

    @v_args(meta=True)
    def neg(self, meta, c): return make(Op.NEG, c[0], loc=self._loc(meta))
    @v_args(meta=True)
    def not_(self, meta, c): return make(Op.NOT, c[0], loc=self._loc(meta))
    @v_args(meta=True)
    def compare(self, meta, c):
        op = {"<": Op.LT, "<=": Op.LE, ">": Op.GT, ">=": Op.GE, "==": Op.EQ, "!=": Op.NE}[str(c[1])]
        return make(op, c[0], c[2], loc=self._tok_loc(c[1]))


def _number(tok) -> int | float:
    s = str(tok)
    return int(s) if s.isdigit() else float(s)


def parse(source: str, file: str = "<string>") -> list[Stmt]:
    """Parse spec text into statements; every failure is a SpecError pointing at the text."""
    try:
        tree = _parser().parse(source + "\n")
    except lark.exceptions.UnexpectedCharacters as e:
        ch = (source + "\n")[e.pos_in_stream]
        raise SpecError(f"unexpected character {ch!r}",
                        loc_in(source, file, e.line, e.column), _words(e.allowed) if e.allowed else None) from None
    except lark.exceptions.UnexpectedToken as e:
        got = "end of line" if e.token.type == "_NL" else "end of file" if e.token.type == "$END" else repr(str(e.token))
        line, col = (e.line, e.column) if e.line and e.line > 0 else (len(source_lines(source)), 1)
        raise SpecError(f"unexpected {got}", loc_in(source, file, line, col), _words(e.expected)) from None
    except lark.exceptions.UnexpectedInput as e:
        raise SpecError("cannot parse this", loc_in(source, file, getattr(e, "line", 0), getattr(e, "column", 0))) from None
    try:
        return _ToStmts(source, file).transform(tree)
    except lark.exceptions.VisitError as e:
        if isinstance(e.orig_exc, SpecError):
            raise e.orig_exc from None
        raise SpecError(f"internal error while reading the spec: {e.orig_exc}") from None
