"""KernelPlan -> Triton (templates/triton/forward.py.j2): one program per (query tile, batch x head).

Tiles are 2-D: rows are queries (offs_m[:, None]), columns keys (offs_n[None, :]), and row statistics are
[BLOCK_M, 1], so every plan expression broadcasts as printed. Block sparsity reaches the kernel as
FlexAttention-style index lists (partial tiles, full tiles) per query tile; for decoding, split-KV shares a
row's tiles among programs and a merge kernel combines their states through the plan's rescale factors."""
from __future__ import annotations

import linecache
import math
import os
import re
from dataclasses import dataclass, replace

import torch

from attnc.backends.codegen import Target, linearize, render_template
from attnc.errors import CallError
from attnc.ir import expr as E
from attnc.ir.expr import Node, Op
from attnc.ir.printer import ATOM, INFIX, number
from attnc.passes.block_sparsity import FULL, PARTIAL
from attnc.plan import KernelPlan, KVPass, promote

BLOCK_M, BLOCK_N = 128, 64              # the plan's defaults; launch picks per shape and classifies with those
SPLIT_MAX_Q, SPLIT_MIN_KV = 16, 1024    # split-KV decoding: few queries, many keys
MAX_SPLITS = 64
LN2 = 0.6931471805599453

TABLE: dict[Op, tuple] = {
    **INFIX,
    Op.AND: ("{0} & {1}", 7), Op.OR: ("{0} | {1}", 6), Op.NOT: ("~{0}", 12),
    Op.EXP: ("tl.exp2({0} * LOG2E)", ATOM, 11),                      # exp(x) = 2^(x log2 e)
    Op.EXP2: ("tl.exp2({0})", ATOM), Op.LOG: ("tl.log({0})", ATOM), Op.LOG2: ("tl.log2({0})", ATOM),
    Op.SQRT: ("tl.sqrt({0})", ATOM), Op.RSQRT: ("tl.rsqrt({0})", ATOM), Op.TANH: ("tanh({0})", ATOM),
    Op.SIGMOID: ("tl.sigmoid({0})", ATOM), Op.SOFTPLUS: ("softplus({0})", ATOM),
    Op.RELU: ("tl.maximum({0}, 0)", ATOM), Op.ABS: ("tl.abs({0})", ATOM), Op.SIGN: ("sign({0})", ATOM),
    Op.FLOOR: ("tl.floor({0})", ATOM), Op.CEIL: ("tl.ceil({0})", ATOM),
    Op.MIN: ("tl.minimum({0}, {1})", ATOM), Op.MAX: ("tl.maximum({0}, {1})", ATOM),
    Op.WHERE: ("tl.where({0}, {1}, {2})", ATOM),
    Op.DIVZ: ("divz({0}, {1})", ATOM),
    Op.TOFLOAT: ("tl.cast({0}, tl.float32)", ATOM),                  # tl.cast also takes constexpr sizes
    Op.FLOORDIV: ("py_floordiv({0}, {1})", ATOM), Op.MOD: ("py_mod({0}, {1})", ATOM),   # triton's truncate
    Op.POW: ("tl.exp2({1} * tl.log2({0}))", ATOM, 11),               # non-integer exponents only (see lower)
}
INDEX_VARS = {"b": "off_b", "h": "off_h", "q_idx": "offs_m[:, None]", "kv_idx": "offs_n[None, :]"}
SIZE_VARS = {"B": "B", "H": "H", "HKV": "HKV", "Q": "N_Q", "KV": "N_KV", "D": "HEAD_DIM"}
# names the template itself binds: a hoisted param read must not take one
RESERVED = {"q", "k", "v", "p", "s", "qk", "keep", "out", "lse", "acc", "alpha", "split", "num", "part", "row",
            "row_ok", "i", "lo", "hi", "tanh", "sign", "divz", "softplus", "py_mod", "py_floordiv", "start_m",
            "start_n", "off_hz", "off_b", "off_h", "off_hkv", "offs_m", "offs_n", "offs_d", "offs_dv", "qk_scale"}
NEG_INF = 'float("-inf")'


def leaf(n: Node) -> str:
    if n.op is Op.CONST:
        v = n.arg
        if isinstance(v, float) and math.isinf(v):
            return 'float("inf")' if v > 0 else NEG_INF
        return number(v)
    if n.op is Op.INDEX:
        return INDEX_VARS[n.arg]
    if n.op is Op.SIZE:
        return SIZE_VARS.get(n.arg) or f"size_{n.arg}"
    if n.op is Op.TENSOR:
        return n.arg
    raise NotImplementedError(n.op.name)


_ATOM_TEXT = re.compile(r"[A-Za-z_]\w*(\[[^\]]*\])?|\d+")


def load(n: Node, idx: list[str]) -> str:
    """A param read through its pointer and strides, masked to the rows and columns that exist."""
    idx = [i if _ATOM_TEXT.fullmatch(i) else f"({i})" for i in idx]       # each index multiplies its stride
    offset = " + ".join(f"{i} * stride_{n.arg}_{d}" for d, i in enumerate(idx))
    free = E.free_indices(n)
    bounds = [c for ix, c in (("q_idx", "(offs_m[:, None] < N_Q)"), ("kv_idx", "(offs_n[None, :] < N_KV)"))
              if ix in free]
    mask = f", mask={' & '.join(bounds)}, other=0" if bounds else ""
    cast = ".to(tl.float32)" if n.dtype == E.FLOAT else ""
    return f"tl.load(p_{n.arg} + {offset}{mask}){cast}"


TARGET = Target(TABLE, leaf, load)


# -- lowering: ops triton spells differently, as rewrites into ops it has --
def _lower_rule(n: Node) -> Node | None:
    a = n.src[0] if n.src else None
    if n.op is Op.POW and n.src[1].op is Op.CONST and float(n.src[1].arg).is_integer() and abs(n.src[1].arg) <= 4:
        e = int(n.src[1].arg)                                    # x ** 2 -> x * x, x ** -1 -> 1 / x
        if e == 0:
            return E.const(1.0) if n.dtype == E.FLOAT else E.const(1)
        out = a
        for _ in range(abs(e) - 1):
            out = E.make(Op.MUL, out, a)
        return out if e > 0 else E.make(Op.DIV, E.const(1.0), out)
    if n.op is Op.POW and n.src[1].op is Op.CONST and n.src[1].arg == 0.5:
        return E.make(Op.SQRT, a)                                 # x ** 0.5 -> sqrt(x)
    if n.op in (Op.FLOOR, Op.CEIL) and n.dtype == E.INT:
        return a                                                  # floor(i) -> i
    return None


def lower(root: Node) -> Node:
    memo: dict[Node, Node] = {}
    for n in root.walk():
        srcs = tuple(memo[s] for s in n.src)
        m = n if srcs == n.src else Node(n.op, srcs, n.arg, E.keep_dtype(n, srcs), n.loc)
        memo[n] = _lower_rule(m) or m
    return memo[root]


def _lowered(plan: KernelPlan) -> KernelPlan:
    plan = promote(plan)
    passes = tuple(KVPass(tuple(replace(s, value=lower(s.value)) for s in p.states)) for p in plan.passes)
    return replace(plan, score=lower(plan.score), mask=plan.mask and lower(plan.mask), passes=passes,
                   epilogue=tuple((n, lower(e)) for n, e in plan.epilogue))


# -- base 2: exp2 with log2(e) folded into qk_scale --
def _scaled_names(plan: KernelPlan) -> set[str]:
    maxes = [s.name for p in plan.passes for s in p.maxes]
    return {"qk", "s"} | set(maxes) | {f"{m}{x}" for m in maxes for x in ("_ref", "_part")}


def exp2_of(root: Node, scaled: set[str]) -> Node | None:
    """root with exp(linear combination of base-2 values) as exp2 of it; None if a base-2 value is used
    any other way."""
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


def base2(plan: KernelPlan) -> KernelPlan | None:
    """The plan in base-2 units, when qk's only role is exp(linear combination of qk and its running
    maxima): qk_scale then carries log2(e), each such exp becomes exp2 of the same argument, and the
    epilogue reads each maximum times ln 2. None when the plan uses qk any other way."""
    if plan.score != _tensor("qk") or any(s.value != _tensor("s") for p in plan.passes for s in p.maxes):
        return None
    scaled = _scaled_names(plan)
    passes = []
    for p in plan.passes:
        states = []
        for s in p.states:
            value = s.value if s.kind == "max" else exp2_of(s.value, scaled)
            if value is None:
                return None
            states.append(replace(s, value=value))
        passes.append(KVPass(tuple(states)))
    natural = {_tensor(s.name): E.make(Op.MUL, _tensor(s.name), E.const(LN2)) for p in plan.passes for s in p.maxes}
    return replace(plan, passes=tuple(passes),
                   epilogue=tuple((n, E.substitute(e, natural)) for n, e in plan.epilogue))


# -- rendering --
def _hoistable(n: Node) -> bool:
    """A param read that depends on neither key nor score: loaded once per program, outside the key loop."""
    return n.op is Op.LOAD and "kv_idx" not in E.free_indices(n) and not any(x.op is Op.TENSOR for x in n.walk())


def _tensor(name: str) -> Node:
    return Node(Op.TENSOR, arg=name)


def _alpha(m: str, c: float, old: str) -> Node:
    """exp(c * (old - m_ref)): what a sum kept against the max `old` is worth against the new max."""
    diff = _tensor(old) - _tensor(f"{m}_ref")
    return E.make(Op.EXP, diff if c == 1 else E.const(c) * diff)


def _init(kind: str) -> str:
    if kind == "dot":
        return "tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)"
    return f"tl.full([BLOCK_M, 1], {NEG_INF}, dtype=tl.float32)" if kind == "max" else \
        "tl.zeros([BLOCK_M, 1], dtype=tl.float32)"


def _needs(exprs: list[Node], hoisted: dict[Node, str], params: dict) -> set[str]:
    """Kernel names an expression reads besides the fixed arguments: sizes, param pointers and strides,
    hoisted reads (whose own loads then are not needed), plan states."""
    out: set[str] = set()
    seen: set[Node] = set()
    stack = list(exprs)
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n in hoisted:
            out.add(hoisted[n])
            continue
        if n.op is Op.SIZE:
            out.add(leaf(n))
        elif n.op is Op.TENSOR:
            out.add(n.arg)
        elif n.op is Op.LOAD:
            out |= {f"p_{n.arg}"} | {f"stride_{n.arg}_{d}" for d in range(len(params[n.arg].dims))}
        stack.extend(n.src)
    return out


def _render_pass(i: int, p: KVPass, tile_names: dict[Node, str], exp) -> dict:
    pn = dict(tile_names)
    max_lines = linearize([(f"{s.name}_tile", s.value) for s in p.maxes], TARGET, pn, f"x{i}_")
    alphas = p.alphas()
    alpha_of = {(m, c): a for a, m, c in alphas}
    dot = next((s for s in p.sums if s.kind == "dot"), None)
    roots = [("p" if s.kind == "dot" else f"{s.name}_tile", s.value)
             for s in sorted(p.sums, key=lambda s: s.kind != "dot")]
    sum_lines = linearize(roots, TARGET, pn, f"y{i}_")
    sums = []
    for s in p.sums:
        if s.kind == "dot":
            continue
        tile = "p" if dot is not None and s.value == dot.value else f"tl.where(keep, {pn[s.value]}, 0.0)"
        scaled = " * ".join([s.name] + [alpha_of[r] for r in s.rescale])
        sums.append({"name": s.name, "rhs": f"{scaled} + tl.sum({tile}, 1, keep_dims=True)"})
    return {
        "number": i, "targets": ", ".join(s.name for s in p.states),
        "states": [{"name": s.name, "init": _init(s.kind)} for s in p.states],
        "max_lines": max_lines,
        "maxes": [{"name": s.name, "new": s.name.replace("m_i", "m_ij"), "value": pn[s.value]} for s in p.maxes],
        "alphas": [(a, TARGET.text(exp(_alpha(m, c, m)))) for a, m, c in alphas],
        "sum_lines": sum_lines,
        "sums": sums,
        "dot": None if dot is None else {"name": dot.name, "value": pn[dot.value],
                                         "alpha": " * ".join(alpha_of[r] for r in dot.rescale)},
    }


def _param_args(plan: KernelPlan) -> list[tuple[str, str]]:
    """(kernel argument, launcher expression) for every param: pointer, strides, and free dims' sizes."""
    args, free_done = [], set()
    for p in plan.params:
        args.append((f"p_{p.name}", f"p_{p.name}"))
        args += [(f"stride_{p.name}_{d}", f"p_{p.name}.stride({d})") for d in range(len(p.dims))]
        for d, dim in enumerate(p.dims):
            if isinstance(dim, str) and dim not in SIZE_VARS and dim not in free_done:
                free_done.add(dim)
                args.append((f"size_{dim}", f"p_{p.name}.shape[{d}]"))
    return args


def render_plan(plan: KernelPlan) -> str:
    plan = _lowered(plan)
    folded = base2(plan)
    scaled = _scaled_names(plan)

    def exp(n: Node) -> Node:                  # the plan's exps of base-2 values as exp2
        return exp2_of(n, scaled) if folded else n

    plan = folded or plan
    exprs = [plan.score] + ([plan.mask] if plan.mask is not None else []) + [
        s.value for p in plan.passes for s in p.states] + [e for _, e in plan.epilogue]
    names: dict[Node, str] = {}
    hoisted = []
    for e in exprs:
        for n in e.walk():
            if _hoistable(n) and n not in names:
                name = "_".join([n.arg] + [x.arg[0] if x.op is Op.INDEX else "x" for x in n.src])
                while name in names.values() or name in RESERVED:
                    name += "_"
                hoisted.append((name, TARGET.text(n, names)))
                names[n] = name
    tile_names = dict(names)
    score_lines = linearize([("s", plan.score)], TARGET, tile_names, "s")
    tile_names[_tensor("s")] = tile_names[plan.score]                    # s may simply be qk
    mask_lines = []
    if plan.mask is not None:                                           # keep = keep & <mask>
        keep = Node(Op.TENSOR, arg="keep", dtype=E.BOOL)
        mask_lines = linearize([("keep", E.make(Op.AND, keep, plan.mask))], TARGET, dict(names), "k")

    params = {p.name: p for p in plan.params}
    param_args = _param_args(plan)
    # every name a helper may take beyond its fixed arguments, in one order; each takes those it reads
    order = ([SIZE_VARS[s] for s in ("B", "H", "HKV")] + [a for a, _ in param_args] + [h for h, _ in hoisted]
             + [s.name for p in plan.passes for s in p.states])

    def context(exprs: list[Node], own: tuple[str, ...] = ()) -> list[str]:
        need = _needs(exprs, names, params) - set(own)
        return [a for a in order if a in need]

    passes = []
    for i, p in enumerate(plan.passes, 1):
        r = _render_pass(i, p, tile_names, exp)
        own = tuple(s.name for s in p.states) + tuple(f"{m.name}_ref" for m in p.maxes)
        r["context"] = context([plan.score] + ([plan.mask] if plan.mask is not None else [])
                               + [s.value for s in p.states], own)
        passes.append(r)
    ep_names = dict(names)
    epilogue = linearize(list(plan.epilogue), TARGET, ep_names, "e")
    results = {n: ep_names[e] for n, e in plan.epilogue}
    states = [s.name for p in plan.passes for s in p.states]
    epilogue_context = context([e for _, e in plan.epilogue], tuple(states))
    one = plan.passes[-1]
    split = len(plan.passes) == 1
    merge = None
    if split:
        alpha_of = {(m, c): a for a, m, c in one.alphas()}
        merge = {
            "hoisted": [(h, e) for h, e in hoisted if h in epilogue_context],
            "maxes": [s.name for s in one.maxes],
            "alphas": [(a, TARGET.text(exp(_alpha(m, c, f"{m}_part")))) for a, m, c in one.alphas()],
            "sums": [{"name": s.name, "dot": s.kind == "dot", "alpha": " * ".join(alpha_of[r] for r in s.rescale)}
                     for s in one.sums],
        }
    v = plan.variant
    return render_template(
        "triton/forward.py.j2", kernel_name=plan.name, variant=v.name, source=v.file, notes=list(plan.notes),
        pass_count=plan.pass_count, params=[p.name for p in plan.params], param_args=param_args,
        qk_scale="sm_scale * LOG2E  # log2(e) folded in: qk and its running maxima are in base 2" if folded
        else "sm_scale", hoisted=hoisted, score_lines=score_lines, mask_lines=mask_lines, has_mask=bool(mask_lines),
        passes=passes, states=states, epilogue=epilogue, epilogue_context=epilogue_context,
        out_value=results["out"], lse_value=results.get("lse", ""), has_lse=plan.has_lse,
        splittable=split, merge=merge,
        split_states=[{"name": s.name, "dot": s.kind == "dot"} for s in one.states] if split else [])


# -- launching --
def interpreting() -> bool:
    """TRITON_INTERPRET=1: triton runs kernels in numpy on CPU tensors (how the tests run without a GPU)."""
    return os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on", "yes")


def autotune_configs() -> list:
    """Launch configurations tried per (N_Q, N_KV, HEAD_DIM); one under the interpreter, where tuning is moot."""
    import triton
    if interpreting():
        return [triton.Config({}, num_warps=4, num_stages=1)]
    return [triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in (2, 3)]


@dataclass(frozen=True)
class LaunchConfig:
    block_m: int
    block_n: int
    n_splits: int
    blocks: tuple           # block_lists() for these block sizes
    dot_dtype: object       # what tl.dot multiplies


def block_sizes(sizes: dict, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) from the head dims and the mode: small tiles under the interpreter."""
    if interpreting():
        return (16 if sizes["Q"] <= 16 else 32), 32
    wide = max(sizes["D"], sizes.get("Dv", sizes["D"])) * (2 if dtype == torch.float32 else 1)
    bm, bn = (128, 64) if wide <= 128 else (64, 64) if wide <= 256 else (64, 32)
    return (16 if sizes["Q"] <= 16 else bm), bn


def split_count(plan: KernelPlan, sizes: dict, block_m: int, row_tiles: int, device: torch.device) -> int:
    """Programs per (query tile, b, h): more than one only for single-pass decoding (few queries, many keys)."""
    if len(plan.passes) != 1 or sizes["Q"] > SPLIT_MAX_Q or sizes["KV"] < SPLIT_MIN_KV:
        return 1
    programs = -(-sizes["Q"] // block_m) * sizes["B"] * sizes["H"]
    target = 2 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
    return max(1, min(-(-target // programs), row_tiles, MAX_SPLITS))


def dot_dtype(dtype: torch.dtype):
    """tl.dot's operand type: the input's, but float32 for float64 inputs and for bfloat16 under the
    interpreter (whose tl.dot multiplies bfloat16 bit patterns as integers)."""
    import triton.language as tl
    if dtype == torch.float16:
        return tl.float16
    if dtype == torch.bfloat16 and not interpreting():
        return tl.bfloat16
    return tl.float32


def block_lists(cls: torch.Tensor, device) -> tuple[torch.Tensor, ...]:
    """(KV_NUM_BLKS, KV_IDX, FULL_KV_NUM_BLKS, FULL_KV_IDX): per query tile, the partial key tiles and the
    full ones, as counts and index rows (FlexAttention's BlockMask layout). Empty tiles appear in neither."""
    out = []
    for kind in (PARTIAL, FULL):
        hit = cls == kind
        num = hit.sum(1, dtype=torch.int32)
        order = torch.argsort((~hit).to(torch.int8), dim=1, stable=True)    # this kind's tiles first, in order
        width = max(int(num.max()) if num.numel() else 0, 1)
        out += [num.to(device), order[:, :width].to(torch.int32).contiguous().to(device)]
    return tuple(out)


def launch_config(compiled, plan: KernelPlan, q, v, params: dict, sizes: dict) -> LaunchConfig:
    """Block sizes, split count and block-sparse tile lists for one call; lists cached unless params shape them."""
    dims = dict(sizes, Dv=v.shape[-1])
    bm, bn = block_sizes(dims, q.dtype)
    key = ("triton", bm, bn, tuple(sorted(sizes.items())), str(q.device))
    hit = None if plan.sparsity.params else compiled._tiles.get(key)
    if hit is None:        # classified on the host: per-block min/max of the params the mask reads
        cls = plan.sparsity.classify(sizes, {n: params[n].cpu() for n in plan.sparsity.params}, bm, bn)
        row_tiles = int((cls != 0).sum(1).max()) if cls.numel() else 1
        hit = (block_lists(cls, q.device), row_tiles)
        if not plan.sparsity.params:
            compiled._tiles[key] = hit
    blocks, row_tiles = hit
    return LaunchConfig(bm, bn, split_count(plan, dims, bm, row_tiles, q.device), blocks, dot_dtype(q.dtype))


_MODULES: dict[tuple[str, bool], dict] = {}


def load_module(source: str, name: str) -> dict:
    """Execute generated source once per mode (triton.jit decides at decoration whether to interpret);
    its text is registered with linecache, where triton.jit reads it."""
    key = (source, interpreting())
    if key not in _MODULES:
        import triton
        filename = f"<attnc-triton {name} {abs(hash(source)):x}>"
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        scope: dict = {"__name__": f"attnc_generated.{name}", "CONFIGS": autotune_configs()}
        exec(compile(source, filename, "exec"), scope)    # attnc's own output: spec text only as printed names
        _MODULES[key] = scope
    return _MODULES[key]


def launch(compiled, plan: KernelPlan, q, k, v, scale: float, params: dict, sizes: dict, return_lse: bool):
    if not q.is_cuda and not interpreting():
        raise CallError("the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors); "
                        f"q is on {q.device}")
    try:
        import triton  # noqa: F401
    except ImportError:
        raise CallError("the triton backend needs the triton package: pip install 'attnc[triton]'") from None
    cfg = launch_config(compiled, plan, q, v, params, sizes)
    run = load_module(compiled.source("triton", return_lse), plan.name)[plan.name]
    args = (q, k, v, scale, cfg.blocks, cfg.block_m, cfg.block_n, cfg.n_splits, cfg.dot_dtype,
            *[params[p.name] for p in plan.params])
    if q.is_cuda:
        with torch.cuda.device(q.device):
            return run(*args)
    import numpy as np
    with np.errstate(all="ignore"):         # the interpreter runs on numpy: masked lanes may divide by zero
        return run(*args)
