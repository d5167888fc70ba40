"""KernelPlan -> plain PyTorch over tiles (templates/torch/kernel.py.j2), for forward and backward plans alike.

Tiles are [B, HKV, GROUP, BLOCK_M, BLOCK_N]: every batch and head at once, the query heads that share a
kv head stacked so one bmm serves the group (GQA). Index variables are broadcastable aranges. Programs run
one after another, so a kernel over query tiles may add into the key tiles' outputs as it goes: the backward
is one kernel that carries dQ and accumulates dK and dV. A plan of plain softmax attention runs spans of key
tiles through SDPA's fused CPU kernel instead (sdpa_pass, torch_spans.py). How a call is tiled is
torch_schedule.py's. A call changes no process-wide state: ATTNC_HEAP_TILES=1 opts into glibc's larger mmap
threshold (keep_tiles_in_the_heap)."""
from __future__ import annotations

import ctypes
import functools
import math
import os
from collections import Counter

from attnc.backends import torch_spans
from attnc.backends.codegen import Target, render_template
from attnc.backends.torch_schedule import Schedules, blocks_text
from attnc.ir import expr as E
from attnc.ir.expr import Node, Op
from attnc.ir.printer import ATOM, INFIX, number
from attnc.plan.model import KernelPlan, State, value

NAME = "torch"
ACCUMULATES_IN_ORDER = True
BLOCK_M, BLOCK_N = 256, 512
BLOCKS_TEXT = blocks_text()
PLAN_PASSES = ("promote", "identities", "weights", "rowdiv", "literals", "hoist", "factor", "cse")
SCHEDULES = Schedules()


TABLE: dict[Op, tuple[str, int]] = {
    **INFIX,
    Op.AND: ("{0} & {1}", 7), Op.OR: ("{0} | {1}", 6), Op.NOT: ("~{0}", 12),
    Op.EXP: ("torch.exp({0})", ATOM), Op.EXP2: ("torch.exp2({0})", ATOM), Op.LOG: ("torch.log({0})", ATOM),
    Op.LOG2: ("torch.log2({0})", ATOM), Op.SQRT: ("torch.sqrt({0})", ATOM), Op.RSQRT: ("torch.rsqrt({0})", ATOM),
    Op.TANH: ("torch.tanh({0})", ATOM), Op.ERF: ("torch.erf({0})", ATOM), Op.SIGMOID: ("torch.sigmoid({0})", ATOM),
    Op.SOFTPLUS: ("F.softplus({0})", ATOM), Op.RELU: ("torch.relu({0})", ATOM), Op.ABS: ("abs({0})", ATOM),
    Op.SIGN: ("torch.sign({0})", ATOM), Op.FLOOR: ("torch.floor({0})", ATOM), Op.CEIL: ("torch.ceil({0})", ATOM),
    Op.MIN: ("torch.minimum(torch.as_tensor({0}), torch.as_tensor({1}))", ATOM),
    Op.MAX: ("torch.maximum(torch.as_tensor({0}), torch.as_tensor({1}))", ATOM),
    Op.TOFLOAT: ("torch.as_tensor({0}, dtype=acc_dtype)", ATOM),
    Op.WHERE: ("torch.where({0}, {1}, {2})", ATOM),
    Op.DIVZ: ("torch.where({1} == 0, 0.0, {0} / {1})", ATOM, 12),
}
INDEX_VARS = {"b": "offs_b", "h": "offs_h", "q_idx": "offs_m", "kv_idx": "offs_n"}
KEEP = value("keep", E.BOOL)


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


def masked_where(n: Node, parts: list[str]) -> tuple[str, int] | None:
    """where(keep, x, fill) reads the mask, which a full tile does not compute: masked() passes x through.
    A fresh tile x (computed right here from the tile's products) is filled in place instead of copied."""
    if n.op is not Op.WHERE or n.src[0] != KEEP:
        return None
    x = n.src[1]
    if x.op in FRESH and not parts[1].isidentifier() and _reads(x) & TILE_PRODUCTS:
        return f"({parts[1]} if drop is None else ({parts[1]}).masked_fill_(drop, {parts[2]}))", ATOM
    return f"masked({parts[1]}, keep, {parts[2]})", ATOM


BINARY_INPLACE = {Op.ADD: "add_", Op.SUB: "sub_", Op.MUL: "mul_", Op.DIV: "div_"}


def tile_text(n: Node, parts: list[str]) -> tuple[str, int] | None:
    """masked_where, and a binary op whose left operand is a fresh tile computed right here overwrites it
    ((dp * r1).add_(g1)): the result has the tile's shape, so no other tile is allocated."""
    hit = masked_where(n, parts)
    if hit is not None or n.op not in BINARY_INPLACE or n.dtype != E.FLOAT:
        return hit
    x = n.src[0]
    if x.op in FRESH and not parts[0].isidentifier() and _reads(x) & TILE_PRODUCTS:
        return f"({parts[0]}).{BINARY_INPLACE[n.op]}({parts[1]})", ATOM
    return None


# a function of a temporary that nothing else reads overwrites it instead of allocating
INPLACE = {op: (f"{{0}}.{name}_()", ATOM, ATOM) for op, name in (
    (Op.EXP, "exp"), (Op.EXP2, "exp2"), (Op.TANH, "tanh"), (Op.ERF, "erf"), (Op.SIGMOID, "sigmoid"), (Op.RELU, "relu"),
    (Op.LOG, "log"), (Op.SQRT, "sqrt"), (Op.ABS, "abs"))} | {
    op: (f"{{0}}.{name}_({{1}})", ATOM, ATOM) for op, name in (
        (Op.SUB, "sub"), (Op.ADD, "add"), (Op.MUL, "mul"), (Op.DIV, "div"))}
TARGET = Target(TABLE, leaf, load, INPLACE, custom=tile_text)
# Per-pair weights exp(x - m) of a running max m of x: the argument is clamped at -87 (exp(-87) ~ 1.6e-38,
# still a normal float). Far-away keys (ALiBi, long rows) otherwise send exp down its underflow path, about
# ten times slower on a CPU; the weights that changes are below 1e-37 and join a row sum of at least 1 (the
# key holding the max contributes exp(0)). Only such exps are clamped: any other exp is exact.
EXP_FLOOR = -87.0


def _clamped_exp(maxima: dict[str, Node]):
    """custom printing: exp(x - m_ref) of a running max m of x is clamped (see EXP_FLOOR)."""
    def custom(n: Node, parts: list[str]) -> tuple[str, int] | None:
        hit = tile_text(n, parts)
        if hit is not None or n.op is not Op.EXP:
            return hit
        a = n.src[0]
        if a.op is Op.SUB and a.src[1].op is Op.TENSOR and maxima.get(a.src[1].arg) == a.src[0]:
            inner = parts[0]
            return f"({inner}).clamp_(min={EXP_FLOOR}).exp_()", ATOM      # the difference is a fresh tile
        return None
    return custom


HEAP_TILES = "ATTNC_HEAP_TILES"          # set to 1: raise glibc's mmap threshold for this process (opt-in)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


@functools.lru_cache(maxsize=1)
def keep_tiles_in_the_heap() -> bool:
    """With ATTNC_HEAP_TILES=1, raise glibc's mmap threshold to its maximum (32 MiB) once per process, so
    tile temporaries of a few MiB are recycled from the heap instead of being mapped and page-faulted at
    every tile. It changes how the whole process allocates, so it is the caller's choice, never a default
    (BENCHMARKS.md records what it buys); without glibc it does nothing."""
    if os.environ.get(HEAP_TILES, "") != "1":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))
    except (OSError, AttributeError):
        return False


# -- plain softmax through SDPA's fused CPU kernel --
# A plan whose one pass is plain softmax attention (the score is the scaled logit, the weights exp(s - m) / l,
# any mask) runs a span of like key tiles per call of torch's fused CPU kernel, which returns each row's
# log-sum-exp besides the output: full spans without a mask, partial ones with it as an additive bias. The
# forward merges the spans into the plan's own states: l_i = sum exp(s - m_i) holds for any reference m_i,
# and everything read of them (out = acc / l_i, lse = m_i + log l_i, the saved m1 and l1 the backward reads
# as exp(s - m1) / l1) is the same for every choice. The backward hands each span to the kernel's backward
# with the row's lse over all its keys, so the span's share of dQ, dK and dV comes out as the loop's would.


def _role_of(plan: KernelPlan, name: str | None) -> str | None:
    x = plan.load(name) if name else None
    return x.role if x is not None else None


def sdpa_pass(plan: KernelPlan) -> dict | None:
    """The plan values a fused rendering names when the plan is one pass of plain softmax attention, else None
    (the tile loop renders it): forward m, l, acc (the states); backward dq (the state), dk, dv (the
    scattered outputs), m, l (the saved statistics) and o (the saved output)."""
    v = plan.variant
    if v.norm_kind != "softmax" or v.score.op is not Op.SCORE or len(plan.passes) != 1 or plan.row_grads:
        return None
    p = plan.passes[0]
    s = value("s")
    if plan.score != value("qk") or p.grads or p.after or not any(d.name == "qk" and d.scaled for d in p.dots):
        return None
    if plan.kind == "forward":
        m = next((x for x in p.states if x.kind == "max" and x.value == s), None)
        if m is None or len(p.states) != 3 or p.scatters:
            return None
        weight = E.make(Op.EXP, s - value(f"{m.name}_ref"))
        like = lambda x: x.value == weight and x.rescale == ((m.name, 1.0),)
        l = next((x for x in p.states if x.kind == "sum" and like(x)), None)
        acc = next((x for x in p.states if x.kind == "dot" and like(x) and _role_of(plan, x.operand) == "v"), None)
        return None if l is None or acc is None else {"m": m.name, "l": l.name, "acc": acc.name}
    if plan.kind != "backward" or any(x.role == "dlse" for x in plan.loads) or len(p.states) != 1:
        return None
    dq = p.states[0]
    by_role = {_role_of(plan, sc.operand): sc for sc in p.scatters}
    dk, dv = by_role.get("q"), by_role.get("dout")
    if dq.kind != "dot" or _role_of(plan, dq.operand) != "k" or len(p.scatters) != 2 or not dk or not dv:
        return None
    defs = dict(p.defs)
    weight = defs.get(dv.value.arg) if dv.value.op is Op.TENSOR else None
    if weight is None:
        return None
    # the weight is exp(s - m1) /? l1 (under the mask), or exp(s - lse) with the row's lse from them (the
    # weights pass): m1 and l1 are the saved row statistics
    ref = next((n.src[0].src[1] for n in weight.walk() if n.op is Op.EXP and n.src[0].op is Op.SUB
                and n.src[0].src[0] == s and n.src[0].src[1].op is Op.TENSOR), None)
    lse = dict(plan.prologue).get(ref.arg) if ref is not None else None
    if lse is not None and lse.op is Op.WHERE and lse.src[2].op is Op.ADD and lse.src[2].src[1].op is Op.LOG:
        m, l = lse.src[2].src[0], lse.src[2].src[1].src[0]
        m, l = (m.arg if m.op is Op.TENSOR else None), (l.arg if l.op is Op.TENSOR else None)
    else:
        m = ref.arg if ref is not None else None
        l = next((n.src[1].arg for n in weight.walk() if n.op in (Op.DIV, Op.DIVZ) and n.src[1].op is Op.TENSOR),
                 None)
    o = next((x.name for x in plan.loads if x.role == "saved" and x.width is not None), None)
    if not (m and l and o) or {_role_of(plan, m), _role_of(plan, l)} != {"saved"}:
        return None
    return {"dq": dq.name, "dk": dk.target, "dv": dv.target, "m": m, "l": l, "o": o,
            "do": next(x.name for x in plan.loads if x.role == "dout")}


SIZE_SOURCES = {"B": "B", "H": "H", "HKV": "HKV", "Q": "N_Q", "KV": "N_KV", "D": "HEAD_DIM"}
WIDTHS = {"e": "HEAD_DIM", "f": "HEAD_DIM_V", None: "1"}


def _reads(e: Node) -> set[str]:
    return {x.arg for x in e.walk() if x.op is Op.TENSOR}


def _new(s: State) -> str:
    """The name of a running max's value after this tile: m_i -> m_ij, as in the tutorial."""
    return s.name.replace("m_i", "m_ij") if s.name.startswith("m_i") else f"{s.name}_new"


# operations whose result is always a new tensor (never one of their operands): safe to overwrite later
TILE_PRODUCTS = {"qk", "dp", "s"}          # full tiles [B, HKV, GROUP, rows, cols]: so is what is computed from them
FRESH = {Op.ADD, Op.SUB, Op.MUL, Op.DIV, Op.NEG, Op.EXP, Op.EXP2, Op.TANH, Op.ERF, Op.SIGMOID, Op.DIVZ, Op.LOG,
         Op.SQRT}


class _Render:
    """The values the template receives, for one plan."""

    def __init__(self, plan: KernelPlan):
        self.plan = plan
        self.lines = plan.lines
        self.kernel_names: set[str] = set()
        self.exprs = plan.exprs() + [e for region in plan.lines.values() for _, e in region[0]]
        self.fused = sdpa_pass(plan)

    def text(self, e: Node, target: Target = TARGET) -> str:
        return target.text(e)

    def assigns(self, lines, target: Target = TARGET) -> list[tuple[str, str]]:
        return [(n, self.text(e, target)) for n, e in lines]

    # -- setup: full tensors, results --
    def setup(self) -> list[tuple[str, str]]:
        out = []
        loads = self.plan.loads
        if any(x.width == "f" for x in loads):
            src = next(x.name for x in loads if x.width == "f")
            out.append(("HEAD_DIM_V", f"{src}.shape[3]"))
        scaled_q = any(d.scaled for p in self.plan.passes for d in p.dots)
        for x in loads:
            if x.width is None:
                cast = "" if x.dtype == E.INT else ".to(acc_dtype)"
                out.append((f"{x.name}_all", f"{x.name}{cast}.view(B, HKV, GROUP, N_Q, 1)"))
            elif x.rank == "m":
                scale = " * sm_scale" if x.role == "q" and scaled_q else ""
                what = f"({x.name}.to(acc_dtype){scale})" if scale else f"{x.name}.to(acc_dtype)"
                out.append((f"{x.name}_all", f"{what}.view(B, HKV, GROUP, N_Q, -1)"))
            else:
                out.append((f"{x.name}_all", f"{x.name}.to(acc_dtype)"))
        if self.riders():
            out.append(("v_ones", "torch.cat([v_all, v_all.new_ones(B, HKV, N_KV, 1)], dim=-1)  "
                                  "# P·[V, 1] gives the row sum of P as one more column of the product"))
        for p in self.plan.params:
            if p.kind == "float":
                out.append((f"p_{p.name}", f"p_{p.name}.to(acc_dtype)"))
        used = sorted({n.arg for e in self.exprs for n in e.walk() if n.op is Op.SIZE})
        free = {d: f"p_{p.name}.shape[{i}]" for p in self.plan.params for i, d in enumerate(p.dims)
                if isinstance(d, str)}
        out += [(f"size_{s}", f"torch.tensor({SIZE_SOURCES.get(s) or free[s]})") for s in used]
        return out

    def results(self) -> tuple[list[tuple[str, str]], list[str]]:
        """(inits, returns): every output the kernel fills, and what it returns, in the runtime's order:
        the stores, the scattered outputs, the param gradients."""
        inits, returns = [], []
        maxes = {s.name for p in self.plan.passes for s in p.maxes}
        for s in self.plan.stores:
            width = WIDTHS[s.width]
            neg = s.target == "lse" or (s.value.op is Op.TENSOR and s.value.arg in maxes)
            fill = "-math.inf" if neg else "0.0"
            inits.append((f"{s.target}_all", f"torch.full((B, HKV, GROUP, N_Q, {width}), {fill}, dtype=acc_dtype)"))
            full = f"({s.target}_all * sm_scale)" if s.scaled else f"{s.target}_all"
            if s.width is None:
                returns.append(f"{full}.view(B, H, N_Q)")
            else:
                returns.append(f"{full}.view(B, H, N_Q, {width}).to(out_dtype)")
        for sc in self.scatters():
            inits.append((f"{sc.target}_all", f"torch.zeros(B, HKV, N_KV, {WIDTHS[sc.width]}, dtype=acc_dtype)"))
            # an operand q is pre-scaled (q * sm_scale), which is the scale such a product needs
            scaled = sc.scaled and self.plan.load(sc.operand).role != "q"
            returns.append(f"({sc.target}_all * sm_scale).to(out_dtype)" if scaled else f"{sc.target}_all.to(out_dtype)")
        for name in self.grad_params():
            # a param's gradient sums every pair of every tile: in float64, so its rounding stays that of a pair
            inits.append((f"grad_{name}", f"torch.zeros(p_{name}.shape, dtype=torch.float64)"))
            returns.append(f"grad_{name}")
        return inits, returns

    def scatters(self):
        seen = {}
        for p in self.plan.passes:
            for sc in p.scatters:
                seen.setdefault(sc.target, sc)
        return list(seen.values())

    def grad_params(self) -> list[str]:
        out = []
        for g in [g for p in self.plan.passes for g in p.grads] + list(self.plan.row_grads):
            if g.param not in out:
                out.append(g.param)
        return out

    def riders(self) -> bool:
        return not self.fused and any(self.rider_names(p) for p in self.plan.passes)

    @staticmethod
    def rider_names(p) -> list[str]:
        """A row sum of the product's own weights rides along P·V as a column of ones in V (forward)."""
        dot = next((s for s in p.states if s.kind == "dot" and s.operand == "v"), None)
        return [s.name for s in p.states if dot is not None and s.kind == "sum" and s.value == dot.value
                and s.rescale == dot.rescale][:1]

    # -- the loop --
    def kernel_and_program_lines(self) -> tuple[list, list]:
        """Prologue lines that depend on no query index go once per kernel; the rest once per query tile,
        after the tile's slices of the program's tensors."""
        kernel, program = [], []
        program_names = {x.name for x in self.plan.loads} | {n for n, _, _ in self.plan.rowdots}
        for n, e in self.lines["prologue"][0]:
            if "q_idx" in E.free_indices(e) or _reads(e) & program_names:
                program.append((n, self.text(e)))
                program_names.add(n)
            else:
                kernel.append((n, self.text(e)))
        slices = []
        needed = self.program_tiles()
        for x in self.plan.loads:
            if x.at != "program":
                continue
            if x.width is None:
                if x.name in needed:
                    slices.append((x.name, f"{x.name}_all[:, :, :, start_m:end_m]"))
                continue
            if x.name in needed or any(x.name in (a, b) for _, a, b in self.plan.rowdots):
                slices.append((f"{x.name}_t", f"{x.name}_all[:, :, :, start_m:end_m]"))
            if x.name in needed:
                slices.append((f"{x.name}_blk", f"{x.name}_t.reshape(B * HKV, GROUP * rows, -1)"))
        slices += [(n, f"({a}_t * {b}_t).sum(-1, keepdim=True)  # rowsum({a} * {b})") for n, a, b in self.plan.rowdots]
        return kernel, slices + program

    def fused_program_lines(self) -> tuple[list, list]:
        """kernel_and_program_lines of a fused plan: the query tile's slices, the prologue values the mask and
        the epilogue read (the backward's row values are the SDPA kernel's business), and for the backward
        each row's lse over all its keys (+inf where a row keeps none: its weights exp(s - lse) are 0)."""
        plan, f = self.plan, self.fused
        need: set[str] = set()
        regions = [self.lines[r][0] for r in ("mask", "epilogue") if r in self.lines]
        for e in [e for lines in regions for _, e in lines] + [s.value for s in plan.stores]:
            need |= _reads(e)
        for n, e in reversed(self.lines["prologue"][0]):
            if n in need:
                need |= _reads(e)
        loads = {x.name for x in plan.loads}
        kernel, program = [], []
        for x in plan.loads:
            if x.at == "program":
                program.append((x.name if x.width is None else f"{x.name}_t", f"{x.name}_all[:, :, :, start_m:end_m]"))
        for n, e in self.lines["prologue"][0]:
            if n in need:
                per_program = "q_idx" in E.free_indices(e) or _reads(e) & loads
                (program if per_program else kernel).append((n, self.text(e)))
                loads |= {n} if per_program else set()
        if plan.kind == "backward":
            program.append(("lse_t", f"torch.where({f['l']} == 0, math.inf, {f['m']} + torch.log({f['l']}))"))
        return kernel, program

    def fused_pass_values(self, i: int, p) -> dict:
        """A fused pass: each span's call, and the merge of its result into the pass's states."""
        f = self.fused
        role = {x.role: x.name for x in self.plan.loads}
        k, v = f"{role['k']}_all", f"{role['v']}_all"
        if self.plan.kind == "forward":
            width = WIDTHS[next(s.width for s in p.states if s.name == f["acc"])]
            inits = [("parts", "[]  # each span's (out, lse)")]
            lines = [f"part = spans.softmax_span({role['q']}_t, {k}, {v}, start_n, end_n, keep, {width})",
                     "if part is not None:",
                     "    parts.append(part)"]
            finish = [f"{f['m']}, {f['l']}, {f['acc']} = spans.merge_spans(parts, {role['q']}_t[..., :1], {width})"]
        else:
            inits, finish = self.inits(p, []), []
            lines = [f"spans.softmax_span_grad({f['dq']}, {f['dk']}_all, {f['dv']}_all, {f['do']}_t, {role['q']}_t, "
                     f"{f['o']}_t, lse_t, {k}, {v}, start_n, end_n, keep)"]
        return {"number": i, "inits": inits, "span_lines": lines, "finish_lines": finish,
                "mask_lines": self.assigns(self.lines["mask"][0]) if self.plan.mask is not None else [],
                "after_lines": self.assigns(self.lines[(i, "after")][0])}

    def program_tiles(self) -> set[str]:
        used = set()
        for p in self.plan.passes:
            used |= {d.a for d in p.dots} | {s.operand for s in p.scatters}
        for e in self.exprs:
            used |= _reads(e)
        return used

    def pass_values(self, i: int, p) -> dict:
        if self.fused:
            return self.fused_pass_values(i, p)
        plan = self.plan
        score_lines, s_var = [], None
        if plan.score is not None:
            score_lines = self.assigns(self.lines["score"][0])
            s_var = self.lines["score"][1]["s"]
            if not plan.score.uses(Op.TENSOR, "qk"):       # a score that ignores q.k has a value per pair still
                score_lines.append(("s", f"torch.as_tensor({s_var}, dtype=acc_dtype).expand_as(qk).contiguous()"))
            elif s_var != "s":
                score_lines.append(("s", s_var))            # the score is the logit itself: one tile, two names
        score_wide = plan.score is not None and plan.score.uses(Op.TENSOR, "qk")
        mask_lines = self.assigns(self.lines["mask"][0]) if plan.mask is not None else []
        riders = self.rider_names(p)
        used = {d.b for d in p.dots} | {s.operand for s in p.states if s.operand}
        steps = []
        for x in plan.loads:
            if x.at == "step" and x.width is not None and x.name in used:
                src = "v_ones" if x.name == "v" and riders else f"{x.name}_all"
                steps.append((f"{x.name}_blk", f"{src}[:, :, start_n:end_n].reshape(B * HKV, cols, -1)"))
        dots = [(f"compute {d.name}", d.name, f"torch.bmm({d.a}_blk, {d.b}_blk.transpose(1, 2))"
                 f".view(B, HKV, GROUP, rows, cols)") for d in p.dots]
        # a running max of the score itself: partial tiles fill the score with -inf in place instead of a where
        premask = "s" if score_wide and plan.mask is not None and any(
            s.kind == "max" and s.value == value("s") for s in p.states) else None
        # what holds a whole tile: the products, the score's tile, and every line that reads one of them
        self.wide_vars = {"qk", "dp", "s"}
        for n, e in self.lines["score"][0] if plan.score is not None else []:
            if _reads(e) & self.wide_vars and score_wide:
                self.wide_vars.add(n)
        for n, e in self.lines[(i, "max")][0] + self.lines[(i, "values")][0]:
            if _reads(e) & self.wide_vars:
                self.wide_vars.add(n)
        # -- maxima --
        max_lines, max_names = self.lines[(i, "max")]
        max_text = self.assigns(max_lines)
        maxes, alphas = [], []
        needs_ref = {m.name for m in p.maxes if any(f"{m.name}_ref" in _reads(e) for e in p.exprs())}
        for s in p.states:
            if s.kind not in ("max", "argmax"):
                continue
            v = self.wide(max_names[f"{s.name}_tile"], s.value, p, max_text)
            if s.kind == "max":
                tile = f"{v}.amax(-1, keepdim=True)" if premask and s.value == value("s") else \
                    f"masked({v}, keep, -math.inf).amax(-1, keepdim=True)"
                maxes.append(f"{_new(s)} = torch.maximum({s.name}, {tile})")
                if s.name in needs_ref:
                    maxes.append(f"{s.name}_ref = torch.where({_new(s)} == -math.inf, 0.0, {_new(s)})  "
                                 f"# a row with nothing kept yet")
            else:
                maxes += [f"{s.name}_val, {s.name}_at = masked({v}, keep, -math.inf).max(-1, keepdim=True)",
                          f"{s.name}_better = {s.name}_val > {s.name}_max  # the first key holding the max wins",
                          f"{s.name}_max = torch.where({s.name}_better, {s.name}_val, {s.name}_max)",
                          f"{s.name} = torch.where({s.name}_better, {s.name}_at + start_n, {s.name})"]
        for a, m, c in p.alphas():
            diff = value(m) - value(f"{m}_ref")
            alphas.append((a, self.text(E.make(Op.EXP, diff if c == 1 else E.const(c) * diff))))
        # -- per-pair values; temporaries nothing reads afterwards are overwritten in place --
        val_lines, val_names = self.lines[(i, "values")]
        target = Target(TABLE, leaf, load, INPLACE, custom=_clamped_exp({f"{s.name}_ref": s.value for s in p.maxes}))
        tile_vars = set()               # the score's temporaries that hold a whole tile (not 0.1 * q_idx)
        if score_wide:
            tile_vars = {"s"}
            for n, e in self.lines["score"][0]:
                if _reads(e) & (tile_vars | {"qk"}):
                    tile_vars.add(n)
        value_lines = self.donating(val_lines, val_names, tile_vars | {"dp"}, target, {n for n, _ in p.defs})
        updates = []
        alpha_of = {(m, c): a for a, m, c in p.alphas()}
        for s in p.states:
            if s.kind in ("max", "argmax") or s.name in riders:
                continue
            v = self.wide(val_names[self.root_name(s, p)], s.value, p, value_lines)
            alpha = " * ".join(alpha_of[r] for r in s.rescale)
            if alpha:
                updates.append(f"{s.name}.mul_({alpha})")
            w = v if self.masked_def(s.value, p) else f"masked({v}, keep, 0.0)"
            if s.kind == "sum":
                updates.append(f"{s.name}.add_({w}.sum(-1, keepdim=True))")
                continue
            if v == "p" and s.operand == "v" and not self.masked_def(s.value, p):   # a fresh temporary
                updates += ["if keep is not None:", "    p.masked_fill_(drop, 0.0)"]
                w = "p"
            updates.append(f"{s.name}.view(B * HKV, GROUP * rows, -1).baddbmm_("
                           f"{w}.reshape(B * HKV, GROUP * rows, cols), {s.operand}_blk)")
        for sc in p.scatters:
            v = self.wide(val_names[f"{sc.target}_tile"], sc.value, p, value_lines)
            w = v if self.masked_def(sc.value, p) else f"masked({v}, keep, 0.0)"
            updates.append(f"{sc.target}_all[:, :, start_n:end_n] += torch.bmm({w}.reshape(B * HKV, GROUP * rows, "
                           f"cols).transpose(1, 2), {sc.operand}_blk).view(B, HKV, cols, -1)")
        for j, g in enumerate(p.grads):
            v = val_names[f"g{j}_{g.param}"]
            w = v if self.masked_def(g.value, p) else f"masked({v}, keep, 0.0)"
            index = [val_names[f"g{j}_{g.param}_i{a}"] for a in range(len(g.index))]
            updates.append(f"scatter_add(grad_{g.param}, ({', '.join(index)},), {w})")
        updates += [f"{s.name} = {_new(s)}" for s in p.maxes]
        dot = next((s for s in p.states if s.kind == "dot" and s.operand == "v"), None)
        finish = [f"{r}, {dot.name} = {dot.name}[..., HEAD_DIM_V:], {dot.name}[..., :HEAD_DIM_V]" for r in riders]
        return {
            "number": i, "inits": self.inits(p, riders), "step_lines": steps, "dots": dots,
            "score_lines": score_lines, "mask_lines": mask_lines, "premask": premask,
            "max_lines": max_text, "maxes": maxes, "alphas": alphas,
            "value_lines": value_lines, "updates": updates, "finish_lines": finish,
            "after_lines": self.assigns(self.lines[(i, "after")][0]),
            "values_comment": "weights and running sums" if plan.kind == "forward" else "per-pair values",
        }

    @staticmethod
    def root_name(s: State, p) -> str:
        return "p" if s.name == "acc" and "p" not in dict(p.defs) else f"{s.name}_tile"

    @staticmethod
    def masked_def(v: Node, p) -> bool:
        """v is a definition of the pass that applies the mask itself (p, ds): nothing to mask again."""
        defs = dict(p.defs)
        if v.op is not Op.TENSOR or v.arg not in defs:
            return False
        e = defs[v.arg]
        if e.op is not Op.WHERE or e.src[0] != KEEP:
            return False
        fill = e.src[2].src[0] if e.src[2].op is Op.TOFLOAT else e.src[2]      # the literals pass wraps it
        return fill.op is Op.CONST and fill.arg == 0

    def wide(self, var: str, v: Node, p, lines: list) -> str:
        """The variable of a per-pair value; one that does not vary over the whole tile (as printed, it reads
        neither the tile's products nor a line that does: 0.1 * q_idx, a param's value per head) is expanded."""
        if var in self.wide_vars:
            return var
        lines.append((f"{var}_pairs", f"torch.as_tensor({var}, dtype=acc_dtype).expand_as(qk).contiguous()"))
        return f"{var}_pairs"

    def donating(self, lines, names: dict, tile_vars: set[str], target: Target,
                 defs: set[str] = frozenset()) -> list[tuple[str, str]]:
        """Print the pass's value lines. A line whose first operand is a per-pair temporary that nothing reads
        afterwards overwrites it (sub_, mul_ ...) instead of allocating another tile. Only results that are
        surely fresh tensors count as temporaries: masked() may return its input itself."""
        roots = {v for k, v in names.items() if k not in defs}      # read by the updates after the lines
        later, reads_after = [], set(roots)
        for _, e in reversed(lines):
            later.append(set(reads_after))
            reads_after |= _reads(e)
        later.reverse()
        # a donor holds the whole tile already (an in-place result keeps its operand's shape): a line is
        # one when it reads a tile product or another such line
        wide = set(tile_vars) | TILE_PRODUCTS
        for n, e in lines:
            if _reads(e) & wide:
                wide.add(n)
        fresh = (set(tile_vars) | {n for n, e in lines if e.op in FRESH}) & wide
        # masked(x, keep, fill) is x itself on a full tile: x may not be overwritten while that alias lives
        fresh -= {w.src[1].arg for _, e in lines for w in e.walk()
                  if w.op is Op.WHERE and w.src[0] == KEEP and w.src[1].op is Op.TENSOR}
        out = []
        for (n, e), after in zip(lines, later):
            reads = Counter(s for x in e.walk() for s in x.src if s.op is Op.TENSOR)
            donor = next((x.src[0] for x in e.walk() if x.op in (Op.SUB, Op.ADD, Op.MUL, Op.DIV)
                          and x.dtype == E.FLOAT and x.src[0].op is Op.TENSOR and x.src[0].arg in fresh
                          and x.src[0].arg not in after and reads[x.src[0]] == 1), None)
            t = Target(target.table, target.leaf, target.load, target.inplace, donor, target.custom)
            out.append((n, t.text(e)))
        return out

    def inits(self, p, riders: list[str]) -> list[tuple[str, str]]:
        """Each state's value before the first key tile."""
        out = []
        for s in p.states:
            if s.name in riders:
                continue
            if s.kind == "dot":
                extra = " + 1" if riders and s.operand == "v" else ""
                out.append((s.name, f"torch.zeros(B, HKV, GROUP, rows, {WIDTHS[s.width]}{extra}, dtype=acc_dtype)"))
            elif s.kind == "argmax":
                out.append((f"{s.name}_max", "torch.full((B, HKV, GROUP, rows, 1), -math.inf, dtype=acc_dtype)"))
                out.append((s.name, "torch.zeros((B, HKV, GROUP, rows, 1), dtype=torch.int64)"))
            else:
                fill = "-math.inf" if s.kind == "max" else "0.0"
                out.append((s.name, f"torch.full((B, HKV, GROUP, rows, 1), {fill}, dtype=acc_dtype)"))
        return out

    def stores(self) -> list[str]:
        ep_lines, ep_names = self.lines["epilogue"]
        out = []
        for s in self.plan.stores:
            v = ep_names[f"store_{s.target}"]
            out.append(f"{s.target}_all[:, :, :, start_m:end_m] = {v}")
        for j, g in enumerate(self.plan.row_grads):
            index = [ep_names[f"g{j}_{g.param}_i{a}"] for a in range(len(g.index))]
            out.append(f"scatter_add(grad_{g.param}, ({', '.join(index)},), {ep_names[f'g{j}_{g.param}']})")
        return out


def render(plan: KernelPlan) -> str:
    r = _Render(plan)
    results, returns = r.results()
    kernel_lines, program_lines = r.fused_program_lines() if r.fused else r.kernel_and_program_lines()
    passes = [r.pass_values(i, p) for i, p in enumerate(plan.passes, 1)]
    args = []
    for x in plan.loads:
        if x.name not in args:
            args.append(x.name)
    args += [f"p_{p.name}" for p in plan.params]
    doc = [f"{x.name}: {'[B, H, N_Q, ' + ('D' if x.width == 'e' else 'DV') + ']' if x.rank == 'm' and x.width else '[B, H, N_Q]' if x.width is None else '[B, HKV, N_KV, ' + ('D' if x.width == 'e' else 'DV') + ']'}"
           for x in plan.loads]
    doc.append("returns " + ", ".join(s.target for s in plan.stores) + "".join(
        f", {s.target}" for s in r.scatters()) + "".join(f", grad_{n}" for n in r.grad_params()))
    v = plan.variant
    exprs = r.exprs
    return render_template(
        "torch/kernel.py.j2", kernel_name=plan.name, kind=plan.kind, fused=bool(r.fused), variant=v.name, source=ascii(v.file)[1:-1],
        notes=list(plan.notes), pass_count=plan.pass_count, args=args, doc=doc, setup=r.setup(),
        results=results, returns=returns, grad_params=r.grad_params(), kernel_lines=kernel_lines, program_lines=program_lines, passes=passes,
        epilogue_lines=r.assigns(r.lines["epilogue"][0]), stores=r.stores(),
        uses_index={k: any(n.op is Op.INDEX and n.arg == k for e in exprs for n in e.walk()) for k in INDEX_VARS})


def load_kernel(source: str, name: str, path):
    """The generated module's kernel function."""
    from attnc.runtime.cache import load_kernel as load
    return load(source, name, path)


def launch(compiled, kernel, tensors: dict, scale: float, params: dict, sizes: dict) -> dict:
    """Run one kernel on a call's tensors (by cascade name: Q, K, V, dO, saved statistics ...); returns
    its results by name (plan.results())."""
    plan = kernel.plan
    block_m, tiles, rows = SCHEDULES.get(compiled, kernel, sizes, params, lambda: sdpa_pass(plan) is not None)
    args = {x.name: tensors[x.tensor] for x in plan.loads}
    args.update({f"p_{p.name}": params[p.name] for p in plan.params})
    if rows is not None:
        args["spans"] = torch_spans.Spans(rows)
    keep_tiles_in_the_heap()
    got = kernel.run(**args, sm_scale=scale, tiles=tiles, BLOCK_M=block_m)
    return dict(zip(plan.results(), got))
