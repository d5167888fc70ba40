"""Statements -> Variant: name resolution, imports, type checks and normalizer sugar."""
from __future__ import annotations

import keyword
import re
from pathlib import Path

from attnc.errors import Loc, SpecError
from attnc.frontend.parser import Stmt, parse
from attnc.frontend.variant import DTYPES, Param, Variant
from attnc.ir import expr as E
from attnc.ir.expr import BOOL, FLOAT, INT, Node, Op

RESERVED = set(E.INDEX_NAMES) | set(E.SIZE_NAMES) | set(E.FUNCTIONS) | {
    "score", "mask", "norm", "softmax", "sigmoid", "relu", "linear", "map", "rownorm", "true", "false",
    "inf"} | set(keyword.kwlist)
NAMED_NORMS = ("softmax", "sigmoid", "relu", "linear")
CALL_ARGS = ("q", "k", "v", "scale", "return_lse", "self")


def softmax_norm(sink: Node | None = None) -> Node:
    """exp(s - rowmax(s)) / (rowsum(exp(s - rowmax(s))) [+ exp(sink - rowmax(s))])."""
    m = E.make(Op.ROWMAX, E.SCORE)
    num = E.make(Op.EXP, E.SCORE - m)
    den = E.make(Op.ROWSUM, num)
    if sink is not None:
        den = den + E.make(Op.EXP, sink - m)
    return E.make(Op.DIVZ, num, den)


def rownorm(e: Node) -> Node:
    return E.make(Op.DIVZ, e, E.make(Op.ROWSUM, e))


class _Scope:
    """What names mean while one file is resolved."""

    def __init__(self, file: str, source: str):
        self.file, self.source = file, source
        self.consts: dict[str, int | float] = {}
        self.params: dict[str, Param] = {}
        self.lets: dict[str, Node] = {}
        self.imports: dict[str, Variant] = {}
        self.score: Node = E.SCORE
        self.mask: Node | None = None
        self.norm: tuple[Node, str] | None = None
        self.name: str | None = None
        self.defined: dict[str, Loc] = {}


class Resolver:
    def __init__(self, overrides: dict | None = None, stack: tuple[str, ...] = ()):
        self.overrides = dict(overrides or {})
        self.stack = stack

    # -- entry points --
    def variant(self, source: str, file: str = "<string>", default_name: str = "variant") -> Variant:
        sc = _Scope(file, source)
        for st in parse(source, file):
            getattr(self, "_stmt_" + st.kind)(sc, st)
        unknown = set(self.overrides) - set(sc.consts)
        if unknown:
            raise SpecError(f"compile() was given {', '.join(sorted(unknown))}, which "
                            f"{'is not a const' if len(unknown) == 1 else 'are not consts'} of this variant",
                            Loc(file), f"one of: {', '.join(sc.consts) or '(the variant declares no consts)'}")
        norm, kind = sc.norm if sc.norm else (softmax_norm(), "softmax")
        return Variant(sc.name or default_name, sc.score, sc.mask, norm, kind, sc.params, sc.consts, file)

    # -- statements --
    def _declare(self, sc: _Scope, name: str, loc: Loc, what: str):
        if name in RESERVED:
            raise SpecError(f"'{name}' is a reserved name and cannot name a {what}", loc,
                            "a new name, not one of the built-in names")
        if name in sc.defined:
            first = sc.defined[name]
            raise SpecError(f"'{name}' is already defined (line {first.line})", loc, "each name defined once")
        sc.defined[name] = loc

    def _stmt_variant(self, sc: _Scope, st: Stmt):
        if sc.name is not None:
            raise SpecError("a file holds one variant; 'variant' appears twice", st.loc)
        sc.name = st.name

    def _stmt_const(self, sc: _Scope, st: Stmt):
        self._declare(sc, st.name, st.loc, "const")
        value = st.value
        if st.name in self.overrides:
            new = self.overrides[st.name]
            if isinstance(new, bool) or not isinstance(new, (int, float)) or new != new:
                raise SpecError(f"const '{st.name}' must be overridden with a number, got {new!r}", st.loc,
                                "a float, or an int from -2**31 to 2**31 - 1")
            if isinstance(value, int) and isinstance(new, float) and not new.is_integer():
                raise SpecError(f"const '{st.name}' is an integer; got {new}", st.loc, "a whole number")
            try:
                value = int(new) if isinstance(value, int) else float(new)
            except OverflowError:
                raise SpecError(f"const '{st.name}' cannot hold {new!r}", st.loc, "a float within float64") from None
        if isinstance(value, float) and 0 < abs(value) < E.FLOAT_TINY:
            raise SpecError(f"const '{st.name}' = {value} is below float64's normal range", st.loc, E.TINY_WORDS)
        if isinstance(value, int) and not E.INT_MIN <= value <= E.INT_MAX:
            raise SpecError(f"const '{st.name}' = {value} is outside attnc's integer range", st.loc,
                            E.INT_RANGE_WORDS)
        sc.consts[st.name] = value

    def _stmt_param(self, sc: _Scope, st: Stmt):
        if st.name in CALL_ARGS:        # params are keyword arguments of attn(q, k, v, *, scale, return_lse, ...)
            raise SpecError(f"'{st.name}' is an argument of attn(q, k, v, scale=..., return_lse=...) and cannot "
                            f"name a param", st.loc, "another name")
        self._declare(sc, st.name, st.loc, "param")
        dtype, dims, dloc = st.value
        if dtype not in DTYPES:
            raise SpecError(f"unknown dtype '{dtype}'", dloc, ", ".join(DTYPES))
        out = []
        for d, loc in dims:
            if isinstance(d, str) and (d in E.INDEX_NAMES or d in sc.consts or d in sc.lets or d in sc.params):
                raise SpecError(f"'{d}' cannot be a dimension", loc,
                                "a size (B, H, HKV, Q, KV, D), an integer, or a new name bound from the tensor")
            if isinstance(d, int) and d <= 0:
                raise SpecError("a dimension must be positive", loc)
            out.append(d)
        if not out:
            raise SpecError(f"param '{st.name}' has no dimensions", st.loc, "at least one dimension, e.g. f32[H]")
        sc.params[st.name] = Param(st.name, dtype, tuple(out), st.loc)

    def _stmt_import(self, sc: _Scope, st: Stmt):
        self._declare(sc, st.name, st.loc, "import alias")
        sc.imports[st.name] = self._load_import(sc, st)
        for p in sc.imports[st.name].params.values():
            mine = sc.params.get(p.name)
            if mine is not None and (mine.dtype, mine.dims) != (p.dtype, p.dims):
                raise SpecError(f"import declares param '{p}' but this file declares '{mine}'", st.loc)
            if mine is None and p.name in sc.defined:
                raise SpecError(f"import brings param '{p.name}', which this file already uses as a name", st.loc)
            sc.params.setdefault(p.name, p)

    def _load_import(self, sc: _Scope, st: Stmt) -> Variant:
        """The variant of an imported file: IMPORT_RULE."""
        raw = st.value
        if not raw.endswith(".attn") or any(not ch.isprintable() for ch in raw) or Path(raw).is_absolute():
            raise SpecError(f"cannot import {raw!r}", st.loc, IMPORT_WORDS)
        try:
            base = Path(sc.file).resolve().parent if sc.file not in ("<string>", "<callback>") else Path.cwd().resolve()
            path = (base / raw).resolve()               # after symlinks: where the bytes really are
        except (OSError, RuntimeError):
            raise SpecError(f"cannot import {raw!r}: its path does not resolve", st.loc, IMPORT_WORDS) from None
        if not path.is_relative_to(base) or path.suffix != ".attn":
            raise SpecError(f"cannot import {raw!r}: it leads outside {base}"
                            + ("" if path.suffix == ".attn" else " or to a file that is not an .attn spec"),
                            st.loc, IMPORT_WORDS)
        if str(path) in self.stack:
            chain = " -> ".join(Path(p).name for p in self.stack + (str(path),))
            raise SpecError(f"import cycle: {chain}", st.loc, "imports that form no cycle")
        text = read_spec(path, raw, st.loc)
        inner = Resolver({}, self.stack + (str(path),))
        return inner.variant(text, str(path), default_name(path))

    def _stmt_let(self, sc: _Scope, st: Stmt):
        self._declare(sc, st.name, st.loc, "let")
        sc.lets[st.name] = self.expr(sc, st.value, "let")

    def _stmt_assign(self, sc: _Scope, st: Stmt):
        if st.name == "score":
            e = self.expr(sc, st.value, "score")
            if e.dtype == BOOL:
                raise SpecError("score must be a number, but this expression is a boolean", st.value.loc or st.loc,
                                "an arithmetic expression; a condition belongs in mask or in where(c, a, b)")
            sc.score = e
        elif st.name == "mask":
            if sc.mask is not None:
                raise SpecError("mask is assigned twice", st.loc, "one mask; combine conditions with 'and'")
            e = self.expr(sc, st.value, "mask")
            if e.dtype != BOOL:
                raise SpecError("mask must be a boolean expression", st.value.loc or st.loc,
                                "a comparison or a combination with and/or/not, e.g. q_idx >= kv_idx")
            sc.mask = e
        elif st.name == "norm":
            if sc.norm is not None:
                raise SpecError("norm is assigned twice", st.loc, "one normalizer")
            sc.norm = self.norm(sc, st.value)
            E.check_size(sc.norm[0], st.loc)        # with what the named normalizers wrap around it
        else:
            raise SpecError(f"cannot assign to '{st.name}'", st.loc,
                            "score = ..., mask = ..., norm = ..., or 'let name = ...' for a named expression")

    # -- normalizers --
    def norm(self, sc: _Scope, n: Node) -> tuple[Node, str]:
        if n.op is Op.NAME and n.arg in NAMED_NORMS:
            kind = n.arg
            body = {"softmax": softmax_norm(), "sigmoid": E.make(Op.SIGMOID, E.SCORE),
                    "relu": E.make(Op.RELU, E.SCORE), "linear": E.SCORE}[kind]
            return body, kind
        if n.op is Op.MEMBER and n.arg[1] == "norm":
            imp = self._import_of(sc, n)
            return imp.norm, imp.norm_kind
        if n.op is Op.CALL and n.arg[0] in ("softmax", "map", "rownorm"):
            fname, kws = n.arg
            npos = len(n.src) - len(kws)
            if fname == "softmax":
                if npos or kws != ("sink",):
                    raise SpecError("softmax takes one keyword argument, sink", n.loc, "softmax or softmax(sink = ...)")
                sink = self.expr(sc, n.src[0], "sink")
                if sink.dtype == BOOL:
                    raise SpecError("sink must be a number", n.src[0].loc or n.loc)
                return softmax_norm(E.make(Op.MUL, sink, 1.0) if sink.dtype == INT else sink), "softmax+sink"
            if kws or npos != 1:
                raise SpecError(f"{fname} takes exactly one argument", n.loc, f"{fname}(expression of score)")
            body = self.expr(sc, n.src[0], "norm")
            if body.dtype == BOOL:
                raise SpecError(f"{fname} needs a number, not a boolean", n.src[0].loc or n.loc)
            return (body, "map") if fname == "map" else (rownorm(body), "rownorm")
        body = self.expr(sc, n, "norm")
        if body.dtype == BOOL:
            raise SpecError("a normalizer must be a number, not a boolean", n.loc,
                            "softmax, sigmoid, relu, linear, map(e), rownorm(e) or an expression of score")
        return body, "general"

    # -- expressions --
    def expr(self, sc: _Scope, n: Node, ctx: str) -> Node:
        """Resolve names and check types; ctx is where the expression sits (score/mask/norm/let/sink)."""
        memo: dict[int, Node] = {}

        def go(x: Node) -> Node:
            return memo[id(x)]
        for x in n.walk():          # children first, so go() only looks up: no recursion, however deep n is
            memo[id(x)] = self._node(sc, x, ctx, go)
        out = memo[id(n)]
        E.check_size(out, n.loc)
        E.check_ints(out, n.loc)
        return out

    def _node(self, sc: _Scope, n: Node, ctx: str, go) -> Node:
        op = n.op
        if op is Op.CONST:
            return n
        if op is Op.NAME:
            return self._name(sc, n, ctx)
        if op is Op.MEMBER:
            return self._member(sc, n, ctx)
        if op is Op.LOAD:
            return self._load(sc, n, go)
        if op is Op.CALL:
            return self._call(sc, n, ctx, go)
        srcs = tuple(go(s) for s in n.src)
        _check_operands(op, srcs, n.loc)
        if op is Op.DIV and srcs[1].uses(Op.ROWSUM):
            op = Op.DIVZ   # an empty row's sum is 0: its weights are 0, not NaN
        return _folded(E.make(op, *srcs, loc=n.loc))

    def _name(self, sc: _Scope, n: Node, ctx: str) -> Node:
        name = n.arg
        if name in E.INDEX_NAMES:
            return E.index(name).replace(loc=n.loc)
        if name in E.SIZE_NAMES:
            return E.size(name).replace(loc=n.loc)
        if name == "score":
            if ctx in ("mask", "sink"):
                raise SpecError(f"score cannot be used in a {ctx}", n.loc,
                                f"a {ctx} of indices (b, h, q_idx, kv_idx), sizes, consts and params")
            return sc.score if ctx != "norm" else E.SCORE
        if name in ("inf",):
            return E.const(float("inf"))
        if name in ("true", "false"):
            return E.const(name == "true")
        if name in sc.consts:
            return E.const(sc.consts[name]).replace(loc=n.loc)
        if name in sc.lets:
            val = sc.lets[name]
            if ctx in ("mask", "sink") and val.uses(Op.SCORE):
                raise SpecError(f"'{name}' uses score, and score cannot be used in a {ctx}", n.loc,
                                f"a {ctx} of indices (b, h, q_idx, kv_idx), sizes, consts and params")
            return val
        if name in sc.params:
            p = sc.params[name]
            raise SpecError(f"param '{name}' must be indexed", n.loc, f"{name}[...] with {len(p.dims)} "
                            f"index{'es' if len(p.dims) != 1 else ''} ({p})")
        if name in E.FUNCTIONS or name in NAMED_NORMS:
            raise SpecError(f"'{name}' is a function; call it", n.loc, f"{name}(...)")
        known = list(E.INDEX_NAMES) + ["score"] + list(sc.consts) + list(sc.lets) + list(sc.params)
        raise SpecError(f"unknown name '{name}'", n.loc, "one of: " + ", ".join(known))

    def _import_of(self, sc: _Scope, n: Node) -> Variant:
        alias = n.arg[0]
        if alias not in sc.imports:
            raise SpecError(f"'{alias}' is not an imported variant", n.loc,
                            'import "file.attn" as ' + alias + " before using it")
        return sc.imports[alias]

    def _member(self, sc: _Scope, n: Node, ctx: str) -> Node:
        alias, member = n.arg
        imp = self._import_of(sc, n)
        if member == "mask":
            if imp.mask is None:
                raise SpecError(f"'{alias}' has no mask", n.loc)
            return imp.mask
        if member == "score":
            if ctx in ("mask", "sink"):
                raise SpecError(f"score cannot be used in a {ctx}", n.loc)
            return E.substitute(imp.score, {E.SCORE: sc.score if ctx != "norm" else E.SCORE})
        if member in imp.consts:
            return E.const(imp.consts[member])
        raise SpecError(f"'{alias}' has no member '{member}'", n.loc,
                        "mask, score, norm or one of its consts: " + ", ".join(imp.consts))

    def _load(self, sc: _Scope, n: Node, go) -> Node:
        name = n.arg
        if name not in sc.params:
            if name in E.FUNCTIONS:
                raise SpecError(f"'{name}' is a function; call it with parentheses", n.loc, f"{name}(...)")
            raise SpecError(f"'{name}' is not a declared param", n.loc,
                            f"a line 'param {name}: dtype[dims]' before this use")
        p = sc.params[name]
        if len(n.src) != len(p.dims):
            raise SpecError(f"'{name}' has {len(p.dims)} dimension{'s' if len(p.dims) != 1 else ''} but is "
                            f"indexed with {len(n.src)}", n.loc, f"{len(p.dims)} index expressions ({p})")
        idx = []
        for s in n.src:
            r = go(s)
            if r.dtype != INT:
                raise SpecError(f"an index into '{name}' must be an integer, but this is a {r.dtype}",
                                s.loc or n.loc, "an integer expression of indices, sizes, consts and int params")
            idx.append(r)
        dtype = FLOAT if p.kind == "float" else INT if p.kind == "int" else BOOL
        return Node(Op.LOAD, tuple(idx), name, dtype, n.loc)

    def _call(self, sc: _Scope, n: Node, ctx: str, go) -> Node:
        fname, kws = n.arg
        if fname not in E.FUNCTIONS:
            hint = "as the whole normalizer (norm = ...)" if fname in ("softmax", "map", "rownorm") else ""
            raise SpecError(f"unknown function '{fname}' {hint}".strip(), n.loc,
                            "one of: " + ", ".join(f for f in E.FUNCTIONS if not f.startswith("row")))
        op, arity = E.FUNCTIONS[fname]
        if kws:
            raise SpecError(f"{fname} takes no keyword arguments", n.loc)
        if len(n.src) != arity:
            raise SpecError(f"{fname} takes {arity} argument{'s' if arity != 1 else ''}, got {len(n.src)}", n.loc,
                            f"{fname}({', '.join('xyz'[:arity])})")
        if op in E.ROWSTAT and ctx != "norm":
            raise SpecError(f"{fname} is a row statistic and is only allowed in norm", n.loc,
                            f"use {fname} in 'norm = ...'")
        srcs = tuple(go(s) for s in n.src)
        _check_operands(op, srcs, n.loc)
        if op is Op.CLAMP:   # clamp(x, lo, hi) == min(max(x, lo), hi)
            return _folded(E.make(Op.MIN, _folded(E.make(Op.MAX, srcs[0], srcs[1], loc=n.loc)), srcs[2], loc=n.loc))
        return _folded(E.make(op, *srcs, loc=n.loc))


def _folded(n: Node) -> Node:
    """n, or its value when every operand is a constant (SpecError at n when that value does not exist)."""
    return E.fold(n) or n


def _check_operands(op: Op, srcs: tuple[Node, ...], loc: Loc | None):
    """Booleans only where a condition is expected; numbers everywhere else."""
    if op in (Op.AND, Op.OR, Op.NOT):
        for s in srcs:
            if s.dtype != BOOL:
                raise SpecError(f"'{op.name.lower()}' needs booleans, but an operand is a {s.dtype}", s.loc or loc,
                                "a comparison such as q_idx >= kv_idx")
        return
    if op is Op.WHERE:
        if srcs[0].dtype != BOOL:
            raise SpecError("the condition of where(c, a, b) must be a boolean", srcs[0].loc or loc)
        if (srcs[1].dtype == BOOL) != (srcs[2].dtype == BOOL):
            raise SpecError("both branches of where(c, a, b) must be numbers, or both booleans", loc)
        return
    if op in (Op.EQ, Op.NE) and all(s.dtype == BOOL for s in srcs):
        return
    for s in srcs:
        if s.dtype == BOOL:
            raise SpecError(f"'{op.name.lower()}' needs numbers, but an operand is a boolean", s.loc or loc,
                            "a number; use where(cond, a, b) to turn a condition into a number")
    if op in (Op.FLOORDIV, Op.MOD) and any(s.dtype == FLOAT for s in srcs):
        raise SpecError(f"'{'//' if op is Op.FLOORDIV else '%'}' needs integers", loc,
                        "integer operands (indices, sizes, int consts, int params)")


def default_name(path: Path) -> str:
    """The variant name of a file without a `variant` line: its stem cut to an identifier, since the name
    becomes part of the kernel's name in generated code."""
    name = re.sub(r"[^A-Za-z0-9_]", "_", path.stem)
    return name if name and not name[0].isdigit() else "v_" + name


IMPORT_RULE = ("an import names a relative path ending in .attn that, after symbolic links are followed, lies inside "
               "the importing file's folder or one below it (for spec text, the current directory)")
IMPORT_WORDS = 'a relative path to an .attn file in this folder or below, e.g. "causal.attn"'


def read_spec(path: Path, shown: str, loc: Loc | None) -> str:
    """The text of a spec file: a regular .attn file of UTF-8 text, or SpecError. The error never quotes
    the file: what it holds is not known to be a spec."""
    try:
        if not path.is_file():
            raise SpecError(f"cannot read {shown!r}: {'no such file' if not path.exists() else 'not a regular file'}",
                            loc, "an .attn spec file")
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise SpecError(f"cannot read {shown!r}: it is not UTF-8 text", loc, "an .attn spec file") from None
    except OSError as e:
        raise SpecError(f"cannot read {shown!r} ({e.strerror})", loc, "an .attn spec file") from None


def load(source_or_path: str, overrides: dict | None = None) -> Variant:
    """A Variant from a path to an .attn file or from spec text."""
    text, file, stem = source_or_path, "<string>", "variant"
    looks_like_path = "\n" not in source_or_path and source_or_path.strip().endswith(".attn")
    if looks_like_path:
        if any(ord(ch) < 32 or ord(ch) == 127 for ch in source_or_path):
            # the path is written into the generated source's header: a '\r' there would end the comment line
            raise SpecError(f"the path {source_or_path!r} holds a control character", Loc("<path>"),
                            "a path of printable characters")
        path = Path(source_or_path)
        try:
            real = path.resolve()
        except (OSError, RuntimeError):
            raise SpecError(f"cannot read {source_or_path}: its path does not resolve", Loc(source_or_path)) from None
        if real.suffix != ".attn":              # a link named .attn to something else: never show its contents
            raise SpecError(f"cannot read {source_or_path}: it links to a file that is not an .attn spec",
                            Loc(source_or_path), "an .attn spec file")
        text = read_spec(real, source_or_path, Loc(source_or_path))
        file, stem = str(path), default_name(path)
        return Resolver(overrides, (str(real),)).variant(text, file, stem)
    return Resolver(overrides).variant(text, file, stem)
