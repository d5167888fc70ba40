"""KernelPlan -> Triton (templates/triton/kernel.py.j2): one program per (tile of the parallel rank, batch x head).

Tiles are 2-D, [parallel, loop]: a kernel over query tiles has queries as rows (offs_m[:, None]) and keys as
columns (offs_n[None, :]), row statistics [BLOCK_M, 1]; a kernel over key tiles (dK/dV) is transposed, keys as
rows and queries as columns, and a query row's statistics are [1, BLOCK_M]. Every plan expression broadcasts
as printed. Block sparsity reaches the kernel as FlexAttention-style index lists (partial tiles, full tiles)
per program tile; for decoding, split-KV shares a row's tiles among programs and a merge kernel combines
their states through the plan's rescale factors. Bounds, head-dim padding, the scale's sign and determinism are
constexprs the launcher sets per call (the template's header lists them), so a kernel compiles no test, mask
or select that cannot fail. Param gradients are atomics, or under torch.use_deterministic_algorithms(True)
per-program rows of a workspace summed in a fixed order. Launching lives in triton_launch.py."""
from __future__ import annotations

import math
import re

from attnc.backends.codegen import Target, render_template
from attnc.ir import expr as E
from attnc.ir.expr import Node, Op
from attnc.ir.printer import ATOM, INFIX, number
from attnc.plan.base2 import LN2, exp2_of, scaled_names
from attnc.plan.model import KernelPlan, value

NAME = "triton"
ACCUMULATES_IN_ORDER = False
BLOCK_M, BLOCK_N = 128, 64              # the plan's defaults; a call picks per shape (triton_launch.block_sizes)
BLOCKS_TEXT = ("128x64 (64x64 when the head dims are wide, 64x32 wider still; the backward's 64x32, 32x32, 16x16; "
               "16 or 32 under the interpreter), chosen per call from the head dims, the dtype and the kernel")
PLAN_PASSES = ("promote", "lower_ops", "base2", "hoist", "cse")

TABLE: dict[Op, tuple] = {
    **INFIX,
    Op.AND: ("{0} & {1}", 7), Op.OR: ("{0} | {1}", 6), Op.NOT: ("~{0}", 12),
    Op.EXP: ("tl.exp2({0} * LOG2E)", ATOM, 11),                      # exp(x) = 2^(x log2 e)
    Op.EXP2: ("tl.exp2({0})", ATOM), Op.LOG: ("tl.log({0})", ATOM), Op.LOG2: ("tl.log2({0})", ATOM),
    Op.SQRT: ("tl.sqrt({0})", ATOM), Op.RSQRT: ("tl.rsqrt({0})", ATOM), Op.TANH: ("tanh({0})", ATOM),
    Op.ERF: ("tl.erf({0})", ATOM),
    Op.SIGMOID: ("sigmoid({0})", ATOM), Op.SOFTPLUS: ("softplus({0})", ATOM),
    Op.RELU: ("tl.maximum({0}, 0)", ATOM), Op.ABS: ("tl.abs({0})", ATOM), Op.SIGN: ("sign({0})", ATOM),
    Op.FLOOR: ("tl.floor({0})", ATOM), Op.CEIL: ("tl.ceil({0})", ATOM),
    Op.MIN: ("tl.minimum({0}, {1})", ATOM), Op.MAX: ("tl.maximum({0}, {1})", ATOM),
    Op.WHERE: ("tl.where({0}, {1}, {2})", ATOM),
    Op.DIVZ: ("divz({0}, {1})", ATOM),
    Op.TOFLOAT: ("tl.cast({0}, tl.float32)", ATOM),                  # tl.cast also takes constexpr sizes
    Op.FLOORDIV: ("py_floordiv({0}, {1})", ATOM), Op.MOD: ("py_mod({0}, {1})", ATOM),   # triton's truncate
    Op.POW: ("tl.exp2({1} * tl.log2({0}))", ATOM, 11),               # non-integer exponents only (lower_ops)
}
LN2_TEXT = f" * {number(LN2)}"
SIZE_VARS = {"B": "B", "H": "H", "HKV": "HKV", "Q": "N_Q", "KV": "N_KV", "D": "HEAD_DIM"}
NEG_INF = 'float("-inf")'
# how the indices print, by the plan's parallel rank: rows are the parallel rank's tile
INDEX_VARS = {"m": {"b": "off_b", "h": "off_h", "q_idx": "offs_m[:, None]", "kv_idx": "offs_n[None, :]"},
              "n": {"b": "off_b", "h": "off_h", "q_idx": "offs_m[None, :]", "kv_idx": "offs_n[:, None]"}}
# an index's length and the constexpr that says whether the code at hand may see it past that length
CHECKS = (("q_idx", "N_Q", "CHECK_M"), ("kv_idx", "N_KV", "CHECK_N"))
_ATOM_TEXT = re.compile(r"[A-Za-z_]\w*(\[[^\]]*\])?|\d+")
WIDTH = {"e": ("offs_d", "BLOCK_DMODEL", "HEAD_DIM"), "f": ("offs_dv", "BLOCK_DV", "HEAD_DIM_V")}


def target_for(parallel: str, alias: dict[str, str] | None = None, rows: frozenset = frozenset()) -> Target:
    """The printing rules for a plan over `parallel`'s tiles: indices and param reads in its orientation;
    alias: plan values printed by another name (s as qk when the score is the logit itself); rows: the plan
    values that hold one number per row of the tile (row statistics, row loads, program values)."""
    index = INDEX_VARS[parallel]
    alias = alias or {}
    per_row_index = {"b", "h", "q_idx" if parallel == "m" else "kv_idx"}

    def per_row(n: Node) -> bool:
        """n is one value per row of the tile (or one for the whole tile)."""
        return all(x.arg in rows if x.op is Op.TENSOR else x.arg in per_row_index if x.op is Op.INDEX else True
                   for x in n.walk())

    def custom(n: Node, parts: list[str]) -> tuple[str, int] | None:
        if n.op is Op.DIVZ and per_row(n.src[1]) and not per_row(n.src[0]):
            return f"divz_rows({parts[0]}, {parts[1]})", ATOM      # the divisor's reciprocal once per row
        if n.op is Op.SIGMOID and n.src[0].op is Op.MUL and n.src[0].src[1] == E.const(LN2) \
                and parts[0].endswith(LN2_TEXT):
            return f"sigmoid2({parts[0][:-len(LN2_TEXT)]})", ATOM    # sigmoid(x ln 2) of a base-2 x (base2 pass)
        if n.op is Op.MUL and any(x.op is Op.SIGN for x in n.src):
            i = 0 if n.src[0].op is Op.SIGN else 1
            if parts[i].startswith("sign(") and parts[i].endswith(")"):   # selects, not a float sign times y
                return f"sign_times({parts[i][5:-1]}, {parts[1 - i]})", ATOM
        return None

    def leaf(n: Node) -> str:
        if n.op is Op.CONST:
            v = n.arg
            if isinstance(v, float) and math.isinf(v):
                return 'float("inf")' if v > 0 else NEG_INF
            return number(v)
        if n.op is Op.INDEX:
            return index[n.arg]
        if n.op is Op.SIZE:
            return SIZE_VARS.get(n.arg) or f"size_{n.arg}"
        if n.op is Op.TENSOR:
            return alias.get(n.arg, n.arg)
        raise NotImplementedError(n.op.name)

    def load(n: Node, idx: list[str]) -> str:
        """A param read through its pointer and strides, masked to the rows and columns that exist."""
        idx = [i if _ATOM_TEXT.fullmatch(i) else f"({i})" for i in idx]     # each index multiplies its stride
        offset = " + ".join(f"{i} * stride_{n.arg}_{d}" for d, i in enumerate(idx))
        free = E.free_indices(n)
        cast = ".to(tl.float32)" if n.dtype == E.FLOAT else ""
        if not free & {"q_idx", "kv_idx"}:
            return f"tl.load(p_{n.arg} + {offset}){cast}"
        oks = [f"{index[ix]} < {lim}" if ix in free else "None" for ix, lim, _ in CHECKS]
        flags = [flag if ix in free else "False" for ix, _, flag in CHECKS]
        return f"load_checked(p_{n.arg} + {offset}, {', '.join(oks)}, {', '.join(flags)}, 0){cast}"
    return Target(TABLE, leaf, load, custom=custom)


# what a value is on the pairs a tile drops, once the score there is -inf: the lattice of `at_dropped`
NEG, ZERO, FINITE, OTHER = "-inf", "0", "finite", "other"
VANISH_AT_NEG = {Op.EXP, Op.EXP2, Op.RELU, Op.SIGMOID, Op.SOFTPLUS}     # f(-inf) = 0 exactly, never NaN


def at_dropped(n: Node, masked: set[str], finite: set[str]) -> str:
    """n's value at a dropped pair, where the values named in `masked` are -inf and those in `finite` are
    finite: -inf, exactly 0, finite, or anything else. A value that is 0 there needs no select to drop it."""
    memo: dict[Node, str] = {}
    for x in n.walk():
        k = [memo[y] for y in x.src]
        if x.op is Op.TENSOR:
            out = NEG if x.arg in masked else FINITE if x.arg in finite else OTHER
        elif x.op is Op.CONST:
            out = ZERO if x.arg == 0 else FINITE if math.isfinite(x.arg) else OTHER
        elif x.op in (Op.INDEX, Op.SIZE):
            out = FINITE
        elif x.op is Op.TOFLOAT:
            out = k[0] if k[0] in (ZERO, FINITE) else OTHER
        elif x.op in VANISH_AT_NEG:
            out = ZERO if k[0] == NEG else OTHER
        elif x.op is Op.MAX:                                          # max(-inf, 0) = 0: relu
            out = ZERO if sorted(k) == sorted([NEG, ZERO]) else OTHER
        elif x.op in (Op.ADD, Op.SUB):
            a, b = k
            if OTHER in k or (x.op is Op.SUB and b == NEG):
                out = OTHER                     # finite - (-inf) is +inf, -inf - (-inf) is NaN
            elif NEG in k:
                out = NEG                       # -inf plus or minus a finite value, or -inf + -inf
            else:
                out = ZERO if a == b == ZERO else FINITE
        elif x.op is Op.MUL:
            a, b = k
            c = [y.arg for y in x.src if y.op is Op.CONST]
            if NEG in k:                        # -inf times a positive constant
                out = NEG if c and isinstance(c[0], (int, float)) and c[0] > 0 else OTHER
            elif ZERO in k:
                out = ZERO if {a, b} <= {ZERO, FINITE} else OTHER
            else:
                out = FINITE if {a, b} <= {FINITE} else OTHER
        elif x.op is Op.NEG:
            out = k[0] if k[0] in (ZERO, FINITE) else OTHER
        else:
            out = OTHER
        memo[x] = out
    return memo[n]


def _reads(e: Node) -> set[str]:
    return {x.arg for x in e.walk() if x.op is Op.TENSOR}


def pointer(load_name: str) -> str:
    return {"out": "Out", "lse": "Lse"}.get(load_name, load_name.upper())


class _Render:
    """The values the template receives, for one plan."""

    def __init__(self, plan: KernelPlan):
        self.plan = plan
        self.par = plan.parallel
        self.loop = plan.loop
        s_var = plan.lines["score"][1]["s"] if plan.score is not None else "s"
        self.alias = {"s": s_var} if s_var != "s" else {}
        self.t = target_for(self.par, self.alias, frozenset(self.row_values()))
        self.lines = plan.lines
        self.exp_base2 = plan.base2
        self.scaled = scaled_names(plan) if plan.base2 else set()
        self.param_args = self._param_args()
        self.matrix_loads = [x for x in plan.loads if x.width is not None]
        # factors applied where a value is read, not where it is made: the logit tile holds q.k times dot_scale
        # and every read multiplies by late_scale (see the pass); a score c * x with a constant c > 0 is kept
        # as x, every read times c. Either way a row max is taken before the factor (max(x) c = max(x c)).
        # Only where every reader goes through text(), which multiplies the factor in: a state, scatter or
        # gradient whose value is the logit or the score itself (linear weights) reads the variable as it is.
        self.late: dict[Node, Node] = {}
        self.late_logit = any(d.scaled for p in plan.passes for d in p.dots) and not (
            {value("qk")} | ({value("s")} if s_var == "qk" else set())) & set(self._plain_reads())
        if self.late_logit:
            self.late = {value(n): value("late_scale") for n in ("qk", "s") if n == "qk" or self.alias.get(n) == "qk"}
        self.score_factor = self._score_factor()
        if self.score_factor is not None:
            self.late[value("s")] = self.score_factor[0]
        self.row_loads = [x for x in plan.loads if x.width is None]

    def text(self, e: Node) -> str:
        return self.t.text(self.late_scaled(e) if self.late else e)

    def _plain_reads(self) -> list[Node]:
        """The values states (but running maxima), scatters, gradients and definitions take: one that is a
        variable itself is printed as that variable's name, not through text()."""
        plain = [st.value for p in self.plan.passes for st in p.states if st.kind != "max"]
        plain += [x.value for p in self.plan.passes for x in (*p.scatters, *p.grads)]
        return plain + [e for p in self.plan.passes for _, e in p.defs]

    def _score_factor(self) -> tuple[Node, Node] | None:
        """(c, x) for a score c * x (or x * c) with a constant c > 0: the score line computes x. Only where
        every reader of s is printed through text(), which multiplies c in: a state, scatter or gradient whose
        value is s itself (linear weights) reads the variable s as it is, so then the score keeps c."""
        if self.plan.score is None or "score" not in self.lines or self.lines["score"][1].get("s") != "s":
            return None
        if value("s") in self._plain_reads():
            return None
        e = dict(self.lines["score"][0]).get("s")
        if e is None or e.op is not Op.MUL:
            return None
        for c, x in (e.src, e.src[::-1]):
            if c.op is Op.CONST and c.dtype == E.FLOAT and 0 < c.arg < math.inf:
                return c, x
        return None

    def late_scaled(self, root: Node) -> Node:
        """root reading each value of self.late times its factor: qk -> qk * late_scale, and a * qk -> qk *
        (a * late_scale), one multiply per element where the constant would make two."""
        memo: dict[Node, Node] = {}
        for n in root.walk():
            if n in self.late:
                memo[n] = E.make(Op.MUL, n, self.late[n])
                continue
            if n.op is Op.MUL and any(x in self.late for x in n.src) and any(
                    x.op is Op.CONST and x.dtype == E.FLOAT for x in n.src):
                a, read = sorted(n.src, key=lambda x: x in self.late)
                factor = self.late[read]
                memo[n] = E.make(Op.MUL, read, E.const(a.arg * factor.arg) if factor.op is Op.CONST
                                 else E.make(Op.MUL, a, factor))
                continue
            srcs = tuple(memo[x] for x in n.src)
            memo[n] = n if srcs == n.src else Node(n.op, srcs, n.arg, E.keep_dtype(n, srcs), n.loc)
        return memo[root]

    def row_values(self) -> set[str]:
        """Plan values with one number per row of the tile: row loads, the prologue's, Δ, the states that
        are not products, the references of running maxima, values after a pass and in the epilogue."""
        plan = self.plan
        out = {x.name for x in plan.loads if x.width is None}
        out |= {n for n, _ in plan.prologue} | {n for n, _, _ in plan.rowdots} | {n for n, _ in plan.epilogue}
        for p in plan.passes:
            out |= {st.name for st in p.states if st.kind != "dot"} | {f"{m.name}_ref" for m in p.maxes}
            out |= {n for n, _ in p.after}
        for region, (lines, _) in self.plan.lines.items():
            if region in ("prologue", "epilogue") or isinstance(region, tuple) and region[1] == "after":
                out |= {n for n, _ in lines}
        return out

    def names(self, region) -> tuple[list, dict[str, str]]:
        """A cse region's lines, and its roots' variables as printed (aliases resolved)."""
        lines, names = self.lines[region]
        return lines, {k: self.alias.get(v, v) for k, v in names.items()}

    def assigns(self, lines) -> list[tuple[str, str]]:
        return [(n, self.text(e)) for n, e in lines]

    def exp(self, n: Node) -> Node:
        """An exp of base-2 values (the base2 pass's running maxima) as exp2."""
        return (exp2_of(n, self.scaled) or n) if self.exp_base2 else n

    def _param_args(self) -> list[tuple[str, str]]:
        """(kernel argument, launcher expression) for every param: pointer, strides, free dims' sizes."""
        args, free_done = [], set()
        for p in self.plan.params:
            args.append((f"p_{p.name}", f"p_{p.name}"))
            args += [(f"stride_{p.name}_{d}", f"p_{p.name}.stride({d})") for d in range(len(p.dims))]
            for d, dim in enumerate(p.dims):
                if isinstance(dim, str) and dim not in SIZE_VARS and dim not in free_done:
                    free_done.add(dim)
                    args.append((f"size_{dim}", f"p_{p.name}.shape[{d}]"))
        for name in self.grad_params():
            p = next(x for x in self.plan.params if x.name == name)
            args.append((f"grad_{name}", f"grad_{name}"))
            args += [(f"gstride_{name}_{d}", f"grad_{name}.stride({d + 1})") for d in range(len(p.dims))]
            args.append((f"gnumel_{name}", f"p_{name}.numel()"))
        return args

    def grad_params(self) -> list[str]:
        out = []
        for g in [g for p in self.plan.passes for g in p.grads] + list(self.plan.row_grads):
            if g.param not in out:
                out.append(g.param)
        return out

    # -- strides and offsets of the kernel's tensors --
    @staticmethod
    def strides(name: str, rank: str) -> list[str]:
        return [f"stride_{name}z", f"stride_{name}h", f"stride_{name}{rank}", f"stride_{name}k"]

    def head_of(self, x) -> str:
        """The head a tensor is read at: kv tensors at the kv head, the rest at the query head."""
        return "off_hkv" if x.role in ("k", "v") else "off_h"

    def load_line(self, x, at: str, transposed: bool) -> str:
        """A matrix tile of input x: rows from x's rank, columns its head dim (transposed: [dim, rows]).
        At a loop step the pointers are the pass's loop-invariant <x>_ptrs moved by the tile's first row."""
        rows, lim, check = ("offs_m", "N_Q", "CHECK_M") if x.rank == "m" else ("offs_n", "N_KV", "CHECK_N")
        offs_w, _, width = WIDTH[x.width]
        sr, sk = self.strides(x.name, x.rank)[2:]
        pad = "PAD_D" if x.width == "e" else "PAD_DV"
        r, w = ("[None, :]", "[:, None]") if transposed else ("[:, None]", "[None, :]")
        if at == "program":
            ptrs = f"{pointer(x.name)} + {x.name}_offset + times({rows}{r}, {sr}, WIDE) + {offs_w}{w} * {sk}"
        else:
            start = "start_m" if x.rank == "m" else "start_n"
            ptrs = f"{x.name}_ptrs + times({start}, {sr}, WIDE)"
        cast = "tl.float32" if x.role == "saved" else "DOT_DTYPE"
        return (f"{x.name} = load_checked({ptrs}, {rows}{r} < {lim}, {offs_w}{w} < {width}, {check}, {pad}, "
                f"0.0).to({cast})")

    def step_pointers(self, x, transposed: bool) -> str:
        """The pointers of a step tile at the loop rank's row 0: loop-invariant, each step adds a scalar."""
        block = "BLOCK_M" if x.rank == "m" else "BLOCK_N"
        offs_w = WIDTH[x.width][0]
        sr, sk = self.strides(x.name, x.rank)[2:]
        r, w = ("[None, :]", "[:, None]") if transposed else ("[:, None]", "[None, :]")
        return f"{x.name}_ptrs = {pointer(x.name)} + tl.arange(0, {block}){r} * {sr} + {offs_w}{w} * {sk}"

    def row_load_line(self, x, at: str) -> str:
        """A per-query-row vector: [BLOCK_M, 1] in a kernel over query tiles, [1, BLOCK_M] over key tiles."""
        shape = "[:, None]" if self.par == "m" else "[None, :]"
        base = f"{pointer(x.name)} + row_offset"
        other = "0" if x.dtype == E.INT else "0.0"
        return f"{x.name} = load_checked({base} + offs_m{shape}, offs_m{shape} < N_Q, None, CHECK_M, False, {other})"

    # -- the passes --
    def used_as(self, name: str, p) -> tuple[bool, bool]:
        """(as the second factor of a tile product, as the operand of a state's product) in pass p."""
        return any(d.b == name for d in p.dots), any(s.operand == name for s in p.states)

    def pass_values(self, i: int, p) -> dict:
        plan, par = self.plan, self.par
        lp = self.loop
        start, offs, block = ("start_n", "offs_n", "BLOCK_N") if lp == "n" else ("start_m", "offs_m", "BLOCK_M")
        header = [f"{start} = tl.multiple_of({start}, {block})", f"{offs} = {start} + tl.arange(0, {block})"]
        setup = []
        step_loads = []
        transposed: dict[str, bool] = {}
        for x in plan.loads:
            if x.at != "step":
                continue
            if x.width is None:
                if any(x.name in _reads(e) for e in p.exprs()):
                    step_loads.append(self.row_load_line(x, "step"))
                continue
            as_b, as_operand = self.used_as(x.name, p)
            if not (as_b or as_operand):
                continue
            transposed[x.name] = as_b and not as_operand
            setup.append(self.step_pointers(x, transposed[x.name]))
            step_loads.append(self.load_line(x, "step", transposed[x.name]))
        if any(d.scaled for d in p.dots) and not self.late_logit:
            setup += ["dot_scale = qk_scale  # the logit itself is read as the weights: scaled in the product"]
        elif any(d.scaled for d in p.dots):
            setup += ["# the logit's scale: after the row max where it is positive (max(x) * c = max(x * c) for c > 0),",
                      "# so that each exponent takes it in its multiply-add; on the product itself otherwise",
                      "if POS_SCALE:", "    dot_scale, late_scale = 1.0, qk_scale", "else:",
                      "    dot_scale, late_scale = qk_scale, 1.0"]
        setup.append(f"{start} = tl.load(tiles + lo) * {block}")
        advance = [f"{start} = tl.load(tiles + i + 1) * {block}  # the list holds one entry past its last tile"]
        dots = []
        for d in p.dots:
            b = d.b if transposed.get(d.b, True) else f"tl.trans({d.b})"
            scale = " * dot_scale" if d.scaled else ""
            dots.append((f"compute {d.name}", d.name,
                         f"tl.dot({d.a}, {b}, input_precision=INPUT_PRECISION){scale}"))
        score_lines = []
        if plan.score is not None:
            lines = self.lines["score"][0]
            if self.score_factor is not None:           # s = c * x computes x; reads of s multiply by c
                lines = [(n, self.score_factor[1] if n == "s" else e) for n, e in lines]
            score_lines = self.assigns(lines)
        idx = INDEX_VARS[par]
        bounds = f"({idx['kv_idx']} < N_KV)" if lp == "n" else f"({idx['q_idx']} < N_Q)"
        mask_lines = []
        if plan.mask is not None:
            mlines, mnames = self.lines["mask"]
            mask_lines = self.assigns(mlines)
            if mnames["keep"] != "keep":
                mask_lines.append(("keep", mnames["keep"]))
        # -- what the dropped pairs need: a score of -inf there makes every value that vanishes at -inf 0 --
        s_var = self.alias.get("s", "s")
        dropped = lambda v: at_dropped(v, {"s", s_var}, {f"{m.name}_ref" for m in p.maxes})    # noqa: E731
        tile_shape = "(BLOCK_M, BLOCK_N)" if par == "m" else "(BLOCK_N, BLOCK_M)"
        full_names = {d.name for d in p.dots}       # whole tiles: the products, and what the score makes of them
        if plan.score is not None:
            for n, e in self.lines["score"][0]:
                if any(x.op is Op.TENSOR and x.arg in full_names for x in e.walk()):
                    full_names.add(n)
        full_names |= {a for a, b in self.alias.items() if b in full_names}

        def whole(s, v: str) -> str:
            """v as a whole tile: a value that reads no product (a constant, one index) is broadcast."""
            if any(n.op is Op.TENSOR and n.arg in full_names for n in s.value.walk()):
                return v
            return f"tl.broadcast_to({v}, {tile_shape})"

        # -- maxima --
        max_lines, max_names = self.names((i, "max"))
        updates_max = []
        unmasked = set()           # states whose tiles need no select once the score is masked
        for s in p.states:
            v = max_names.get(f"{s.name}_tile")
            if s.kind == "max":
                new = s.name.replace("m_i", "m_ij") if s.name.startswith("m_i") else f"{s.name}_new"
                raw = s.value in self.late          # the row max of the logit or score itself: scaled after
                v = self.alias.get(s.value.arg, s.value.arg) if raw else v
                factor = self.text(self.late[s.value]) if raw else None
                tile = whole(s, v) if dropped(s.value) == NEG else f"tl.where(keep, {whole(s, v)}, {NEG_INF})"
                if dropped(s.value) == NEG:
                    unmasked.add(s.name)
                if raw:             # partial tiles scale first: with the mask's select, fewer values stay live
                    updates_max += ["if IS_FULL:",
                                    f"    {new} = tl.maximum({s.name}, tl.max({tile}, 1, keep_dims=True) * {factor})",
                                    "else:",
                                    f"    {new} = tl.maximum({s.name}, tl.max({tile} * {factor}, 1, keep_dims=True))"]
                else:
                    updates_max.append(f"{new} = tl.maximum({s.name}, tl.max({tile}, 1, keep_dims=True))")
                updates_max.append(f"{s.name}_ref = tl.where({new} == {NEG_INF}, 0.0, {new})  "
                                   f"# a row with nothing kept yet")
            elif s.kind == "argmax":
                updates_max += [f"{s.name}_tile = tl.where(keep, {whole(s, v)}, {NEG_INF})",
                                f"{s.name}_val = tl.max({s.name}_tile, 1, keep_dims=True)",
                                f"{s.name}_at = tl.argmax({s.name}_tile, 1, keep_dims=True) + start_n",
                                f"{s.name}_better = {s.name}_val > {s.name}_max  # the first key holding the max wins",
                                f"{s.name}_max = tl.where({s.name}_better, {s.name}_val, {s.name}_max)",
                                f"{s.name} = tl.where({s.name}_better, {s.name}_at, {s.name})"]
        alphas = []
        for a, m, c in p.alphas():
            diff = value(m) - value(f"{m}_ref")
            alphas.append((a, self.text(self.exp(E.make(Op.EXP, diff if c == 1 else E.const(c) * diff)))))
        val_lines, val_names = self.names((i, "values"))
        value_lines = self.assigns(val_lines)
        alpha_of = {(m, c): a for a, m, c in p.alphas()}
        updates = []
        dot = next((s for s in p.states if s.kind == "dot" and s.operand == "v"), None)
        pre, sums, products = [], [], []
        for s in p.states:
            if s.kind in ("sum", "dot") and dropped(s.value) == ZERO:
                unmasked.add(s.name)
        kept = lambda s, v: whole(s, v) if s.name in unmasked else f"tl.where(keep, {whole(s, v)}, 0.0)"  # noqa: E731
        if dot is not None:             # the weights p, masked once: P V and the row sums of P read them
            v = val_names["p" if "p" not in dict(p.defs) else f"{dot.name}_tile"]
            if not (v == "p" and (self._masked_def(dot.value, p) or dot.name in unmasked)):
                pre.append(f"p = {whole(dot, v) if self._masked_def(dot.value, p) else kept(dot, v)}")
            elif whole(dot, v) != v:
                pre.append(f"p = {whole(dot, v)}")
        for s in p.states:
            if s.kind != "sum":
                continue
            v = val_names[f"{s.name}_tile"]
            tile = "p" if dot is not None and s.value == dot.value else kept(s, v)
            scaled = " * ".join([s.name] + [alpha_of[r] for r in s.rescale])
            sums.append(f"{s.name} = {scaled} + tl.sum({tile}, 1, keep_dims=True)")
        for s in p.states:
            if s.kind != "dot":
                continue
            if s is dot:
                w = "p"
            else:
                v = val_names[f"{s.name}_tile"]
                w = whole(s, v) if self._masked_def(s.value, p) else kept(s, v)
            operand = s.operand if not transposed.get(s.operand, False) else f"tl.trans({s.operand})"
            alpha = " * ".join(alpha_of[r] for r in s.rescale)
            if alpha:
                products.append(f"{s.name} = {s.name} * {alpha}")
            products.append(f"{s.name} = tl.dot({w}.to(DOT_DTYPE), {operand}, {s.name}, "
                            f"input_precision=INPUT_PRECISION)")
        if pre or sums:
            updates.append(("update the running sums", pre + sums))
        if products:
            updates.append(("update " + ", ".join(s.name for s in p.states if s.kind == "dot"), products))
        grads = []
        for j, g in enumerate(p.grads):
            grads += self.grad_lines(g, val_names[f"g{j}_{g.param}"],
                                     [val_names[f"g{j}_{g.param}_i{a}"] for a in range(len(g.index))], "keep",
                                     self._masked_def(g.value, p))
        if grads:
            updates.append(("add the params' gradients", grads))
        finals = [f"{s.name} = {s.name.replace('m_i', 'm_ij') if s.name.startswith('m_i') else s.name + '_new'}"
                  for s in p.maxes]
        if finals:
            updates.append(("the new maxima", finals))
        states = [s.name for s in p.states] + [f"{s.name}_max" for s in p.states if s.kind == "argmax"]
        reads_score = any(n.op is Op.TENSOR and n.arg in ("s", s_var)
                          for st in p.states if st.name in unmasked for n in st.value.walk())
        mask_score = f"{s_var} = tl.where(keep, {s_var}, {NEG_INF})  # dropped pairs: exp2 of -inf is 0" \
            if reads_score else None
        out = {"number": i, "setup": setup, "mask_score": mask_score, "header": header, "step_loads": step_loads, "dots": dots,
               "score_lines": score_lines, "bounds": bounds, "loop_check": "CHECK_N" if lp == "n" else "CHECK_M",
               "advance": advance, "mask_lines": mask_lines, "max_lines": self.assigns(max_lines),
               "updates_max": updates_max, "alphas": alphas, "value_lines": value_lines, "updates": updates,
               "states": states,
               "values_comment": "weights" if plan.kind == "forward" else "per-pair values"}
        out["args"] = self.pass_args(out, p, states)
        out["inits"] = self.inits(p)
        out["calls"] = self.calls(out, p, states)
        return out

    @staticmethod
    def _masked_def(v: Node, p) -> bool:
        defs = dict(p.defs)
        if v.op is not Op.TENSOR or v.arg not in defs:
            return False
        e = defs[v.arg]
        return e.op is Op.WHERE and e.src[0] == value("keep", E.BOOL) and e.src[2].op is Op.CONST and e.src[2].arg == 0

    def grad_lines(self, g, v: str, index: list[str], keep: str, masked: bool) -> list[str]:
        """grad[index] += v, after summing the pairs that share an entry (axes the index ignores): atomics, or
        with DETERMINISTIC this program's own row of a workspace, added to in a fixed order (add_in_order sorts
        a tile's entries by index), which the launcher sums over programs in a fixed order afterwards."""
        free = set().union(*(E.free_indices(i) for i in g.index)) if g.index else set()
        row_ix, col_ix = ("q_idx", "kv_idx") if self.par == "m" else ("kv_idx", "q_idx")
        w = v if masked else f"tl.where({keep}, {v}, 0.0)"
        offset = " + ".join(f"({i}) * gstride_{g.param}_{d}" for d, i in enumerate(index)) or "0"
        ptr, row = f"grad_{g.param} + {offset}", f"grad_{g.param} + prog * gnumel_{g.param}"
        rows = "offs_m[:, None] < N_Q" if self.par == "m" else "offs_n[:, None] < N_KV"
        cols = "offs_n[None, :] < N_KV" if self.par == "m" else "offs_m[None, :] < N_Q"
        if keep != "keep":          # a row-level value after the passes: rows that exist
            w = f"tl.where({rows}, {v}, 0.0)"
        if keep == "keep" and free & {row_ix} and not free & {col_ix}:
            value, ok = f"tl.sum({w}, 1, keep_dims=True)", rows                 # one entry per row
        elif keep == "keep" and free & {col_ix} and not free & {row_ix}:
            value, ok = f"tl.sum({w}, 0, keep_dims=True)", cols                 # one per column
        elif keep == "keep" and free & {row_ix, col_ix}:
            value, ok = w, keep                                                 # one per pair
        elif keep != "keep" and "q_idx" in free:
            value, ok = w, rows
        else:                                                                   # one for the whole tile
            total = f"tl.sum(tl.sum({w}, 1), 0)"
            return ["if DETERMINISTIC:", f"    tl.store({row} + {offset}, tl.load({row} + {offset}) + {total})",
                    "else:", f"    tl.atomic_add({ptr}, {total})"]
        return ["if DETERMINISTIC:", f"    add_in_order({row}, {offset}, {value}, {ok}, gnumel_{g.param})",
                "else:", f"    tl.atomic_add({ptr}, {value}, mask={ok})"]

    def inits(self, p) -> list[str]:
        out = []
        rows = "BLOCK_M" if self.par == "m" else "BLOCK_N"
        for s in p.states:
            if s.kind == "dot":
                out.append(f"{s.name} = tl.zeros([{rows}, {WIDTH[s.width][1]}], dtype=tl.float32)")
            elif s.kind == "argmax":
                out.append(f"{s.name}_max = tl.full([{rows}, 1], {NEG_INF}, dtype=tl.float32)")
                out.append(f"{s.name} = tl.zeros([{rows}, 1], dtype=tl.int32)")
            else:
                fill = NEG_INF if s.kind == "max" else "0.0"
                out.append(f"{s.name} = tl.full([{rows}, 1], {fill}, dtype=tl.float32)")
        return out

    def pass_args(self, r: dict, p, states: list[str]) -> list[str]:
        """What the pass's helper reads besides its constexprs: every name its lines use that it does not
        define, in one order (states first, then tiles, tensors, offsets, sizes, params)."""
        body = "\n".join(r["setup"] + r["header"] + r["step_loads"] + [e for _, _, e in r["dots"]]
                         + [e for _, e in r["score_lines"]]
                         + [r["bounds"]] + [e for _, e in r["mask_lines"]] + [e for _, e in r["max_lines"]]
                         + r["updates_max"] + [e for _, e in r["alphas"]] + [e for _, e in r["value_lines"]]
                         + [line for _, lines in r["updates"] for line in lines])
        defined = set(states) | {n for _, n, _ in r["dots"]} | {n for n, _ in r["score_lines"]} | {
            n for n, _ in r["mask_lines"]} | {n for n, _ in r["max_lines"]} | {n for n, _ in r["alphas"]} | {
            n for n, _ in r["value_lines"]} | {"keep", "i", "start_n", "start_m"}
        defined |= {line.split(" = ")[0] for line in r["setup"] + r["step_loads"] + r["updates_max"] + r["header"]}
        defined |= {"dot_scale", "late_scale"}
        earlier = [st.name for q in self.plan.passes[:self.plan.passes.index(p)] for st in q.states]
        candidates = (states + earlier + [x.name for x in self.plan.loads if x.at == "program"] +
                      [x for x in self.program_values()] +
                      [pointer(x.name) for x in self.plan.loads if x.at == "step"] +
                      [s for x in self.matrix_loads if x.at == "step" for s in self.strides(x.name, x.rank)[2:]] +
                      ["row_offset", "qk_scale", "prog", "off_b", "off_h", "off_hkv", "offs_m", "offs_n", "offs_d", "offs_dv",
                       "B", "H", "HKV", "N_Q", "N_KV", "HEAD_DIM", "HEAD_DIM_V"] + [a for a, _ in self.param_args])
        used = set(re.findall(r"[A-Za-z_]\w*", body))
        args = [c for c in dict.fromkeys(candidates) if c in used and (c in states or c not in defined)]
        return args + ["tiles", "lo", "hi"]

    def program_values(self) -> list[str]:
        """Names the program computes before its passes: hoisted reads, row values, Δ."""
        return [n for n, _ in self.lines["prologue"][0]] + [n for n, _, _ in self.plan.rowdots] + [
            n for p in self.plan.passes for n, _ in self.lines[(self.plan.passes.index(p) + 1, "after")][0]]

    def calls(self, r: dict, p, states: list[str]) -> list[str]:
        """The kernel's calls of the pass helper: partial tiles (mask evaluated; the ragged last tile is
        one, checked when the loop's length is ragged), then full ones (nothing checked along the loop).
        Without a mask the partial list holds only the ragged tile, so it is swept only when there is one."""
        args = []
        for a in r["args"][:-3]:
            if a in [pointer(x.name) for x in self.matrix_loads if x.at == "step"]:
                x = next(x for x in self.matrix_loads if pointer(x.name) == a)
                args.append(f"{a} + {x.name}_offset")
            else:
                args.append(a)
        targets = ", ".join(states)
        const = "BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_DMODEL=BLOCK_DMODEL, BLOCK_DV=BLOCK_DV, " \
                "PAD_D=PAD_D, PAD_DV=PAD_DV, POS_SCALE=POS_SCALE, WIDE=WIDE, DETERMINISTIC=DETERMINISTIC, " \
                "DOT_DTYPE=DOT_DTYPE, INPUT_PRECISION=INPUT_PRECISION"
        loop_check, par_check = (r["loop_check"], "CHECK_M" if self.par == "m" else "CHECK_N")
        out = []
        for full, lst, lo, hi in ((False, "IDX", "lo", "hi"), (True, "FULL_IDX", "full_lo", "full_hi")):
            stride = "stride_idx" if not full else "stride_full_idx"
            checks = f"{par_check}={par_check}, {loop_check}={'False' if full else loop_check}"
            call = (f"{targets + ' = ' if targets else ''}_{self.plan.name}_pass{r['number']}(" + ", ".join(args) +
                    f", {lst} + start * {stride}, {lo}, {hi}, IS_FULL={full}, {checks}, {const})")
            if not full and self.plan.mask is None:
                out += [f"if {loop_check}:", "    " + call]
            else:
                out.append(call)
        if self.par == "n":        # every query head of the kv head, each with its own rows
            body = ["off_h = off_hkv * GROUP + g", "row_offset = (off_b * H + off_h).to(tl.int64) * N_Q"]
            body += [f"{x.name}_offset = off_b.to(tl.int64) * {self.strides(x.name, x.rank)[0]} + "
                     f"off_h.to(tl.int64) * {self.strides(x.name, x.rank)[1]}"
                     for x in self.matrix_loads if x.at == "step"]
            out = ["for g in range(GROUP):  # a constexpr: without grouped-query attention, no loop at all"] + [
                "    " + line for line in body + out]
        return out

    # -- the kernel --
    def kernel_args(self) -> list[str]:
        plan = self.plan
        args = []
        for x in plan.loads:
            args.append(pointer(x.name))
            if x.width is not None:
                args += self.strides(x.name, x.rank)
        for s in plan.stores:
            args.append(pointer(s.target))
            if s.width is not None:
                args += self.strides(s.target, self.par)
        args += ["sm_scale", "NUM_BLKS", "IDX", "FULL_NUM_BLKS", "FULL_IDX", "stride_idx", "stride_full_idx"]
        args += [f"ws_{s}" for s in self.split_states()]
        args += [a for a, _ in self.param_args]
        args += ["B", "H", "HKV", "N_Q", "N_KV", "HEAD_DIM", "HEAD_DIM_V", "N_SPLITS"]
        return args

    def splittable(self) -> bool:
        return self.plan.kind == "forward" and len(self.plan.passes) == 1 and not self.grad_params()

    def split_states(self) -> list[str]:
        return [s.name for s in self.plan.passes[-1].states] if self.splittable() else []

    def program_lines(self) -> list[str]:
        plan = self.plan
        if self.par == "m":
            lines = ["start_m = tl.program_id(0)", "off_hz = tl.program_id(1)", "split = tl.program_id(2)",
                     "off_b = off_hz // H", "off_h = off_hz % H",
                     "off_hkv = off_h // GROUP  # grouped-query attention: GROUP = H // HKV query heads share a kv head",
                     "start = start_m", "offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)",
                     "row_offset = off_hz.to(tl.int64) * N_Q"]
        else:
            lines = ["start_n = tl.program_id(0)", "off_bkv = tl.program_id(1)", "split = tl.program_id(2)",
                     "off_b = off_bkv // HKV", "off_hkv = off_bkv % HKV", "start = start_n",
                     "offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)"]
        lines += ["offs_d = tl.arange(0, BLOCK_DMODEL)", "offs_dv = tl.arange(0, BLOCK_DV)"]
        if self.grad_params():
            lines.append("prog = tl.program_id(0) + tl.num_programs(0) * (tl.program_id(1) + tl.num_programs(1) * "
                         "tl.program_id(2))  # this program's row of the param gradients' workspace")
        lines.append("qk_scale = sm_scale * LOG2E  # log2(e) folded in: qk and its running maxima are in base 2"
                     if plan.base2 else "qk_scale = sm_scale")
        for x in self.matrix_loads:
            head = self.head_of(x)
            sz, sh = self.strides(x.name, x.rank)[:2]
            if x.at == "program":
                lines.append(f"{x.name}_offset = off_b.to(tl.int64) * {sz} + {head}.to(tl.int64) * {sh}")
                lines.append(self.load_line(x, "program", False))
            elif self.par == "m":
                lines.append(f"{x.name}_offset = off_b.to(tl.int64) * {sz} + {head}.to(tl.int64) * {sh}")
        for x in self.row_loads:
            if x.at == "program":
                lines.append(self.row_load_line(x, "program"))
        for n, a, b in plan.rowdots:
            lines.append(f"{n} = tl.sum({a}.to(tl.float32) * {b}.to(tl.float32), 1, keep_dims=True)  # rowsum({a} * {b})")
        lines += [f"{n} = {e}" for n, e in self.assigns(self.lines["prologue"][0])]
        if self.par == "m":
            lines += ["# this program's share of the tile's sweep: all of it unless split-KV",
                      "num = tl.load(NUM_BLKS + start_m)",
                      "lo, hi = num * split // N_SPLITS, num * (split + 1) // N_SPLITS",
                      "full_num = tl.load(FULL_NUM_BLKS + start_m)",
                      "full_lo, full_hi = full_num * split // N_SPLITS, full_num * (split + 1) // N_SPLITS"]
        else:
            lines += ["lo, hi = 0, tl.load(NUM_BLKS + start_n)", "full_lo, full_hi = 0, tl.load(FULL_NUM_BLKS + start_n)"]
        return lines

    def store_lines(self) -> list[str]:
        plan = self.plan
        ep_lines, names = self.names("epilogue")
        out = []
        rows = "offs_m" if self.par == "m" else "offs_n"
        lim = "N_Q" if self.par == "m" else "N_KV"
        head = "off_h" if self.par == "m" else "off_hkv"
        for s in plan.stores:
            v = names[f"store_{s.target}"]
            if s.scaled:
                v = f"{v} * sm_scale"
            ptr = pointer(s.target)
            if s.width is None:
                cast = ".to(tl.int32)" if s.target.startswith("A_") else ""
                out.append(f"store_checked({ptr} + row_offset + offs_m[:, None], {v}{cast}, offs_m[:, None] < N_Q, "
                           "None, CHECK_M, False)")
                continue
            offs_w, _, width = WIDTH[s.width]
            sz, sh, sr, sk = self.strides(s.target, self.par)
            out.append(f"{s.target}_offset = off_b.to(tl.int64) * {sz} + {head}.to(tl.int64) * {sh}")
            check, pad = ("CHECK_M" if self.par == "m" else "CHECK_N"), ("PAD_D" if s.width == "e" else "PAD_DV")
            out.append(f"store_checked({ptr} + {s.target}_offset + times({rows}[:, None], {sr}, WIDE) + "
                       f"{offs_w}[None, :] * {sk}, "
                       f"({v}).to({ptr}.dtype.element_ty), {rows}[:, None] < {lim}, {offs_w}[None, :] < {width}, "
                       f"{check}, {pad})")
        for j, g in enumerate(plan.row_grads):
            out += self.grad_lines(g, names[f"g{j}_{g.param}"], [names[f"g{j}_{g.param}_i{a}"]
                                                                   for a in range(len(g.index))], "rows", False)
        return out

    def split_lines(self) -> list[str]:
        out = ["row = (split.to(tl.int64) * tl.num_programs(1) + off_hz) * N_Q + offs_m[:, None]"]
        for s in self.plan.passes[-1].states:
            if s.kind == "dot":
                out.append(f"tl.store(ws_{s.name} + row * HEAD_DIM_V + offs_dv[None, :], {s.name}, "
                           f"mask=(offs_m[:, None] < N_Q) & (offs_dv[None, :] < HEAD_DIM_V))")
            else:
                out.append(f"tl.store(ws_{s.name} + row, {s.name}, mask=offs_m[:, None] < N_Q)")
        return out

    def merge(self) -> dict | None:
        if not self.splittable():
            return None
        one = self.plan.passes[-1]
        alpha_of = {(m, c): a for a, m, c in one.alphas()}
        alphas = []
        for a, m, c in one.alphas():
            diff = value(f"{m}_part") - value(f"{m}_ref")        # a split's sums were kept against its own max
            alphas.append((a, self.text(self.exp(E.make(Op.EXP, diff if c == 1 else E.const(c) * diff)))))
        # the merge needs what the epilogue reads: hoisted values and the program's row values
        ep = "\n".join(self.store_lines() + [e for _, e in self.assigns(self.lines["epilogue"][0])])
        setup = [f"{n} = {e}" for n, e in self.assigns(self.lines["prologue"][0])
                 if re.search(rf"\b{n}\b", ep)]
        setup.append("row_offset = off_hz.to(tl.int64) * N_Q")
        args = [f"ws_{s.name}" for s in one.states]
        args += [pointer(s.target) for s in self.plan.stores]
        args += [a for s in self.plan.stores if s.width is not None for a in self.strides(s.target, "m")]
        args += [a for a, _ in self.param_args] + ["B", "H", "HKV", "N_Q", "N_KV", "HEAD_DIM", "HEAD_DIM_V", "N_SPLITS"]
        return {"args": args, "setup": setup, "maxes": [s.name for s in one.maxes], "alphas": alphas,
                "sums": [{"name": s.name, "dot": s.kind == "dot", "alpha": " * ".join(alpha_of[r] for r in s.rescale)}
                         for s in one.sums]}

    def launcher(self) -> dict:
        plan = self.plan
        names = []
        for x in plan.loads:
            if x.name not in names:
                names.append(x.name)
        args = names + ["sm_scale", "blocks", "BLOCK_M", "BLOCK_N", "N_SPLITS", "DOT_DTYPE", "DTYPE", "sizes"]
        args += [f"p_{p.name}" for p in plan.params] + ["DETERMINISTIC=False"]
        setup = ["B, H, HKV, N_Q, N_KV = (sizes[k] for k in ('B', 'H', 'HKV', 'Q', 'KV'))",
                 "HEAD_DIM, HEAD_DIM_V = sizes['D'], sizes['Dv']",
                 "NUM_BLKS, IDX, FULL_NUM_BLKS, FULL_IDX = blocks",
                 f"device = {names[0]}.device"]
        for x in self.row_loads:
            setup.append(f"{x.name} = {x.name}.contiguous()")
        returns = []
        for s in plan.stores:
            if s.width is None:
                dtype = "torch.int32" if s.target.startswith("A_") else "torch.float32"
                setup.append(f"{s.target} = torch.empty((B, H, N_Q), dtype={dtype}, device=device)")
            else:
                w = "HEAD_DIM" if s.width == "e" else "HEAD_DIM_V"
                shape = f"(B, H, N_Q, {w})" if self.par == "m" else f"(B, HKV, N_KV, {w})"
                setup.append(f"{s.target} = torch.empty({shape}, dtype=DTYPE, device=device)")
            returns.append(s.target)
        if self.par == "m":
            setup.append("grid = (triton.cdiv(N_Q, BLOCK_M), B * H, N_SPLITS)")
        else:
            setup.append("grid = (triton.cdiv(N_KV, BLOCK_N), B * HKV, 1)")
        if self.grad_params():
            setup.append("# param gradients: one row per program when DETERMINISTIC, summed in a fixed order after")
            setup.append("rows = grid[0] * grid[1] * grid[2] if DETERMINISTIC else 1")
        for name in self.grad_params():
            setup.append(f"grad_{name} = torch.zeros((rows, *p_{name}.shape), dtype=torch.float32, device=device)")
            returns.append(f"grad_{name}.sum(0) if DETERMINISTIC else grad_{name}[0]")
        setup += ["BLOCK_DMODEL = max(16, triton.next_power_of_2(HEAD_DIM))  # padded head dims, masked on the d axis",
                  "BLOCK_DV = max(16, triton.next_power_of_2(HEAD_DIM_V))",
                  "INPUT_PRECISION = \"tf32\" if DTYPE == torch.float32 and torch.backends.cuda.matmul.allow_tf32 "
                  "else \"ieee\"",
                  "SPLIT_KV = N_SPLITS > 1",
                  "# what the kernel checks, as constexprs: no test, mask or select is compiled where none can fail",
                  "CHECK_M, CHECK_N = N_Q % BLOCK_M != 0, N_KV % BLOCK_N != 0  # a ragged last tile of queries, keys",
                  "PAD_D, PAD_DV = BLOCK_DMODEL != HEAD_DIM, BLOCK_DV != HEAD_DIM_V  # head dims padded to a power of 2",
                  "POS_SCALE = sm_scale > 0  # the scale commutes with the row max",
                  "# a row offset of some tensor may pass int32 (past 2^31 elements in one batch and head): int64",
                  "WIDE = max(((t.shape[2] + 256) * abs(t.stride(2)) + t.shape[3] * abs(t.stride(3)) for t in ("
                  + "".join(f"{t}, " for t in [x.name for x in plan.loads if x.width is not None]
                            + [st.target for st in plan.stores if st.width is not None]) + ")), default=0) >= 2 ** 31",
                  "GROUP = H // HKV"]
        for s in self.split_states():
            dot = next(x for x in plan.passes[-1].states if x.name == s).kind == "dot"
            setup.append(f"ws_{s} = torch.empty((N_SPLITS, B * H, N_Q{', HEAD_DIM_V' if dot else ''}), "
                         f"dtype=torch.float32, device=device) if SPLIT_KV else None")
        call = []
        for x in plan.loads:
            call.append(x.name)
            if x.width is not None:
                call.append(f"*{x.name}.stride()")
        for s in plan.stores:
            call.append(s.target)
            if s.width is not None:
                call.append(f"*{s.target}.stride()")
        call += ["sm_scale", "NUM_BLKS", "IDX", "FULL_NUM_BLKS", "FULL_IDX", "IDX.stride(0)", "FULL_IDX.stride(0)"]
        call += [f"ws_{s}" for s in self.split_states()]
        call += [e for _, e in self.param_args]
        call += ["B", "H", "HKV", "N_Q", "N_KV", "HEAD_DIM", "HEAD_DIM_V", "N_SPLITS"]
        merge_call = [f"ws_{s}" for s in self.split_states()]
        merge_call += [s.target for s in plan.stores]
        merge_call += [f"*{s.target}.stride()" for s in plan.stores if s.width is not None]
        merge_call += [e for _, e in self.param_args] + ["B", "H", "HKV", "N_Q", "N_KV", "HEAD_DIM", "HEAD_DIM_V",
                                                         "N_SPLITS"]
        doc = ", ".join(f"{x.name} {'[B, H, N_Q, D]' if x.rank == 'm' and x.width else '[B, H, N_Q]' if x.width is None else '[B, HKV, N_KV, D]'}"
                        for x in plan.loads) + " -> " + ", ".join(returns)
        return {"args": args, "setup": setup, "kernel_call": call, "merge_call": merge_call, "returns": returns,
                "doc": doc}


def render(plan: KernelPlan) -> str:
    r = _Render(plan)
    passes = [r.pass_values(i, p) for i, p in enumerate(plan.passes, 1)]
    words = ("query tiles", "key tiles") if plan.parallel == "m" else ("key tiles", "query tiles")
    v = plan.variant
    return render_template(
        "triton/kernel.py.j2", kernel_name=plan.name, kind=plan.kind, variant=v.name,
        source=ascii(v.file)[1:-1], notes=[ascii(n)[1:-1] for n in plan.notes], pass_count=plan.pass_count,
        parallel_words=words, passes=passes, kernel_args=r.kernel_args(),
        autotune_key='["N_Q", "N_KV", "HEAD_DIM"]', program_lines=r.program_lines(),
        epilogue_lines=[f"{n} = {e}" for n, e in r.assigns(r.lines["epilogue"][0])], store_lines=r.store_lines(),
        splittable=r.splittable(), split_lines=r.split_lines() if r.splittable() else [], merge=r.merge(),
        launcher=r.launcher())


def load_kernel(source: str, name: str, path):
    """The generated module's launcher, with the module executed once per mode."""
    from attnc.backends.triton_launch import load_module
    return load_module(source, name)[name]


def launch(compiled, kernel, tensors: dict, scale: float, params: dict, sizes: dict) -> dict:
    from attnc.backends.triton_launch import launch as run
    return run(compiled, kernel, tensors, scale, params, sizes)
