"""KernelPlan -> plain PyTorch over tiles (templates/torch/forward.py.j2).

Tiles are [B, HKV, GROUP, BLOCK_M, BLOCK_N]: every batch and head at once, the query heads that share a
kv head stacked so one bmm serves the group (GQA). Index variables are broadcastable aranges."""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import math

import torch

from attnc.backends.codegen import Target, linearize, render_template
from attnc.ir import expr as E
from attnc.ir.expr import Node, Op
from attnc.ir.printer import ATOM, INFIX, number
from attnc.plan import INIT, KernelPlan, promote

BLOCK_M, BLOCK_N = 256, 512
# tile shapes the runtime chooses from per call (the kernel takes its tiles as an argument)
TILE_SHAPES = ((256, 512), (256, 256), (128, 256), (128, 128), (64, 128))
# a model of this backend on a CPU, fitted to causal and sliding-window runs (BENCHMARKS.md): seconds per
# score element of a full tile, the factor for a partial tile (mask evaluated and applied), and the fixed
# cost of visiting a tile (~20 torch ops)
ELEMENT_S, PARTIAL_FACTOR, TILE_S = 1.65e-9, 2.1, 7e-5


def tile_cost(tiles: list, block_m: int, sizes: dict) -> float:
    """Estimated seconds to run `tiles` (from Compiled.tiles) with query tiles of block_m rows."""
    heads = sizes["B"] * sizes["H"]
    total = 0.0
    for start_m, kv in tiles:
        rows = min(block_m, sizes["Q"] - start_m)
        for start_n, end_n, full in kv:
            area = rows * (end_n - start_n) * heads
            total += area * ELEMENT_S * (1.0 if full else PARTIAL_FACTOR) + TILE_S
    return total

TABLE: dict[Op, tuple[str, int]] = {
    **INFIX,
    Op.AND: ("{0} & {1}", 7), Op.OR: ("{0} | {1}", 6), Op.NOT: ("~{0}", 12),
    Op.EXP: ("torch.exp({0})", ATOM), Op.EXP2: ("torch.exp2({0})", ATOM), Op.LOG: ("torch.log({0})", ATOM),
    Op.LOG2: ("torch.log2({0})", ATOM), Op.SQRT: ("torch.sqrt({0})", ATOM), Op.RSQRT: ("torch.rsqrt({0})", ATOM),
    Op.TANH: ("torch.tanh({0})", ATOM), Op.SIGMOID: ("torch.sigmoid({0})", ATOM),
    Op.SOFTPLUS: ("F.softplus({0})", ATOM), Op.RELU: ("torch.relu({0})", ATOM), Op.ABS: ("abs({0})", ATOM),
    Op.SIGN: ("torch.sign({0})", ATOM), Op.FLOOR: ("torch.floor({0})", ATOM), Op.CEIL: ("torch.ceil({0})", ATOM),
    Op.MIN: ("torch.minimum(torch.as_tensor({0}), torch.as_tensor({1}))", ATOM),
    Op.MAX: ("torch.maximum(torch.as_tensor({0}), torch.as_tensor({1}))", ATOM),
    Op.TOFLOAT: ("torch.as_tensor({0}, dtype=acc_dtype)", ATOM),
    Op.WHERE: ("torch.where({0}, {1}, {2})", ATOM),
    Op.DIVZ: ("torch.where({1} == 0, 0.0, {0} / {1})", ATOM, 12),
}
INDEX_VARS = {"b": "offs_b", "h": "offs_h", "q_idx": "offs_m", "kv_idx": "offs_n"}


def leaf(n: Node) -> str:
    if n.op is Op.CONST:
        v = n.arg
        if isinstance(v, float) and math.isinf(v):
            return "math.inf" if v > 0 else "-math.inf"
        return number(v)
    if n.op is Op.INDEX:
        return INDEX_VARS[n.arg]
    if n.op is Op.SIZE:
        return f"size_{n.arg}"
    if n.op is Op.TENSOR:
        return n.arg
    raise NotImplementedError(n.op.name)


def load(n: Node, idx: list[str]) -> str:
    return f"p_{n.arg}[{', '.join(idx)}]"


# a function of a temporary that nothing else reads overwrites it instead of allocating
INPLACE = {op: (f"{{0}}.{name}_()", ATOM, ATOM) for op, name in (
    (Op.EXP, "exp"), (Op.EXP2, "exp2"), (Op.TANH, "tanh"), (Op.SIGMOID, "sigmoid"), (Op.RELU, "relu"),
    (Op.LOG, "log"), (Op.SQRT, "sqrt"), (Op.ABS, "abs"))} | {
    op: (f"{{0}}.{name}_({{1}})", ATOM, ATOM) for op, name in (
        (Op.SUB, "sub"), (Op.ADD, "add"), (Op.MUL, "mul"), (Op.DIV, "div"))}
TARGET = Target(TABLE, leaf, load, INPLACE)
# Per-pair weights: exp's argument is clamped at -87 (exp(-87) ~ 1.6e-38, still a normal float). Far-away
# keys (ALiBi, long rows) otherwise send exp down its underflow path, about ten times slower on a CPU;
# the weights that changes are below 1e-37 and are added to a row sum of at least 1.
EXP_FLOOR = -87.0
PAIR_TARGET = Target({**TABLE, Op.EXP: (f"torch.exp({{0}}.clamp(min={EXP_FLOOR}))", ATOM, ATOM)}, leaf, load,
                     {**INPLACE, Op.EXP: (f"{{0}}.clamp_(min={EXP_FLOOR}).exp_()", ATOM, ATOM)})


@functools.lru_cache(maxsize=1)
def keep_tiles_in_the_heap() -> bool:
    """Raise glibc's mmap threshold to its maximum (32 MiB) once per process, so the per-tile temporaries
    (a few MiB each) are recycled from the heap instead of being mapped and page-faulted on every tile.
    This roughly halves the torch backend's time on large tiles; without glibc it does nothing."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))
    except (OSError, AttributeError):
        return False


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


@contextlib.contextmanager
def flush_denormals():
    """Flush denormal floats to zero while a kernel runs. exp(s - m) of far-away keys (ALiBi, long rows)
    lands in the denormal range, where x86 arithmetic is many times slower; the weights lost are below
    1e-38 of the row's largest. The caller's setting is restored after."""
    was_on = torch.tensor([1e-39]).mul(1.0).item() == 0.0     # torch has no getter: probe it
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if not was_on:
            torch.set_flush_denormal(False)


def _hoistable(n: Node) -> bool:
    """A param read that depends on neither key nor score: compute it once, outside the key loop."""
    return n.op is Op.LOAD and not E.free_indices(n) & {"kv_idx"} and not any(
        x.op is Op.TENSOR for x in n.walk())


SIZE_SOURCES = {"B": "B", "H": "H", "HKV": "HKV", "Q": "N_Q", "KV": "N_KV", "D": "HEAD_DIM"}


def size_lines(plan: KernelPlan, exprs: list[Node]) -> list[tuple[str, str]]:
    """0-d tensors for the sizes the expressions read: sizes of the call, or dims of a param's shape."""
    used = sorted({n.arg for e in exprs for n in e.walk() if n.op is Op.SIZE})
    free = {d: f"p_{p.name}.shape[{i}]" for p in plan.params for i, d in enumerate(p.dims) if isinstance(d, str)}
    return [(f"size_{s}", f"torch.tensor({SIZE_SOURCES.get(s) or free[s]})") for s in used]


S_READ = E.Node(Op.TENSOR, arg="s")


def read_once(x: Node, roots: list[Node]) -> bool:
    """x is read by exactly one operation, as the first operand of arithmetic, across all of roots:
    that operation may overwrite it (the maxima that also read it are computed before)."""
    parents = [n for n in set(roots) for r in [n] for n in r.walk() if x in n.src]
    parents = list({id(p): p for p in parents}.values())
    distinct = set(parents)
    if len(distinct) != 1 or x in roots:
        return False
    (p,) = distinct
    return p.op in (Op.SUB, Op.ADD, Op.MUL, Op.DIV) and p.src[0] == x and p.src[1] != x and p.dtype == E.FLOAT


def literal_floats(root: Node) -> Node:
    """Float literals that where/min/max would otherwise turn into float32 scalars: make them tensors
    of the accumulation dtype (torch.as_tensor(0.1, dtype=acc_dtype))."""
    def fix(n: Node) -> Node | None:
        if n.op not in (Op.WHERE, Op.MIN, Op.MAX) or n.dtype != E.FLOAT:
            return None
        if not any(s.op is Op.CONST and s.dtype == E.FLOAT for s in n.src):
            return None
        srcs = tuple(E.Node(Op.TOFLOAT, (s,), dtype=E.FLOAT) if s.op is Op.CONST and s.dtype == E.FLOAT else s
                     for s in n.src)
        return E.Node(n.op, srcs, n.arg, n.dtype)
    return E.bottom_up(root, fix)


def state_init(s, with_ones: bool) -> str:
    """A state's value before the first key tile: -inf for a max, zeros for a sum or the P·V accumulator
    (with the ones column when a row sum rides along)."""
    if s.kind == "dot":
        return f"torch.zeros(B, HKV, GROUP, rows, HEAD_DIM_V{' + 1' if with_ones else ''}, dtype=acc_dtype)"
    return f"torch.full((B, HKV, GROUP, rows, 1), {leaf(INIT[s.kind])}, dtype=acc_dtype)"


def render_plan(plan: KernelPlan) -> str:
    plan = promote(plan, literal_floats)
    names: dict[Node, str] = {}
    hoisted_kernel, hoisted_row = [], []
    exprs = [plan.score] + ([plan.mask] if plan.mask is not None else []) + [
        s.value for p in plan.passes for s in p.states] + [e for _, e in plan.epilogue]
    for e in exprs:
        for n in e.walk():
            if _hoistable(n) and n not in names:
                name = "_".join([n.arg] + [x.arg[0] if x.op is Op.INDEX else "x" for x in n.src])
                while name in names.values():
                    name += "_"
                level = hoisted_row if "q_idx" in E.free_indices(n) else hoisted_kernel
                level.append((name, TARGET.text(n, names)))
                names[n] = name
    tile_names = dict(names)
    score_wide = plan.score.uses(Op.TENSOR, "qk")
    score_lines = linearize([("s", plan.score)], TARGET, tile_names, "s")
    if not score_wide:      # a score that ignores q.k still has one value per pair of the tile
        score_lines.append(("s", f"torch.as_tensor({tile_names[plan.score]}, dtype=acc_dtype).expand_as(qk)"))
        tile_names[plan.score] = "s"
    tile_names[E.Node(Op.TENSOR, arg="s")] = tile_names[plan.score]     # s may simply be qk

    def wide(n: Node) -> bool:
        return n.uses(Op.TENSOR, "qk") or n.uses(Op.TENSOR, "s")

    def widen(lines: list, states, pn: dict) -> dict[str, str]:
        """Each state's per-pair variable; values that do not vary over the whole tile are expanded to it."""
        out = {}
        for st in states:
            out[st.name] = pn[st.value]
            if not wide(st.value):
                lines.append((f"{st.name}_pairs", f"torch.as_tensor({pn[st.value]}, dtype=acc_dtype).expand_as(qk)"))
                out[st.name] = f"{st.name}_pairs"
        return out
    mask_lines = linearize([("keep", plan.mask)], TARGET, dict(names), "k") if plan.mask is not None else []
    passes = []
    for i, p in enumerate(plan.passes):
        pn = dict(tile_names)
        max_lines = linearize([(f"{s.name}_tile", s.value) for s in p.maxes], TARGET, pn, f"x{i + 1}_")
        max_value = widen(max_lines, p.maxes, pn)
        # a max of the score itself: partial tiles fill the score tile with -inf in place instead of a where
        premask = tile_names[S_READ] if score_wide and plan.mask is not None and any(
            s.value == S_READ for s in p.maxes) else None
        alphas = [(a, TARGET.text(E.make(Op.EXP, E.const(c) * (E.Node(Op.TENSOR, arg=m) -
                                                                 E.Node(Op.TENSOR, arg=f"{m}_ref"))) if c != 1 else
                                  E.make(Op.EXP, E.Node(Op.TENSOR, arg=m) - E.Node(Op.TENSOR, arg=f"{m}_ref"))))
                  for a, m, c in p.alphas()]
        alpha_of = {(m, c): a for a, m, c in p.alphas()}
        value_roots = [("p" if s.kind == "dot" else f"{s.name}_tile", s.value)
                       for s in sorted(p.sums, key=lambda s: s.kind != "dot")]
        donate = S_READ if score_wide and read_once(S_READ, [r for _, r in value_roots]) else None
        sum_lines = linearize(value_roots, dataclasses.replace(PAIR_TARGET, donated=donate), pn, f"y{i + 1}_")
        sum_value = widen(sum_lines, p.sums, pn)
        dot = next((s for s in p.sums if s.kind == "dot"), None)
        # a sum of the dot's own weights rides along the P·V product as a column of ones in V
        riders = [s.name for s in p.sums if dot is not None and s.kind == "sum" and s.value == dot.value
                  and s.rescale == dot.rescale][:1]
        passes.append({
            "number": i + 1,
            "inits": [(s.name, state_init(s, bool(riders))) for s in p.states if s.name not in riders],
            "maxes": [{"name": s.name, "new": s.name.replace("m_i", "m_ij"), "value": max_value[s.name],
                       "needs_ref": any(x.uses(Op.TENSOR, f"{s.name}_ref") for x in [y.value for y in p.sums]),
                       "premasked": premask is not None and s.value == S_READ}
                      for s in p.maxes],
            "premask": premask,
            "has_dot": dot is not None,
            "max_lines": max_lines,
            "alphas": alphas,
            "sum_lines": sum_lines,
            "sums": [{"name": s.name, "value": sum_value[s.name], "is_dot": s.kind == "dot",
                      "adds_p": s.kind != "dot" and sum_value[s.name] == "p",
                      "alpha": " * ".join(alpha_of[r] for r in s.rescale)} for s in p.sums if s.name not in riders],
            "dot_value": sum_value[dot.name] if dot is not None else None,
            "riders": riders,
            "dot_fresh": dot is not None and sum_value[dot.name] == "p",
        })
    epilogue = [(n, TARGET.text(e, dict(names))) for n, e in plan.epilogue]
    v = plan.variant
    return render_template(
        "torch/forward.py.j2", kernel_name=plan.name, variant=v.name, source=ascii(v.file)[1:-1],
        notes=list(plan.notes),
        pass_count=plan.pass_count, params=[p.name for p in plan.params],
        size_lines=size_lines(plan, exprs), float_params=[p.name for p in plan.params if p.kind == "float"],
        hoisted_kernel=hoisted_kernel, hoisted_row=hoisted_row, score_lines=score_lines,
        mask_lines=mask_lines, passes=passes, any_riders=any(p["riders"] for p in passes), epilogue=epilogue, has_lse=plan.has_lse,
        uses_index={k: any(n.op is Op.INDEX and n.arg == k for e in exprs for n in e.walk())
                    for k in INDEX_VARS})
