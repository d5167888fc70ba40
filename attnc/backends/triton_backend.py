"""KernelPlan -> Triton (templates/triton/forward.py.j2): one program per (query tile, batch x head).

Tiles are 2-D: rows are queries (offs_m[:, None]), columns keys (offs_n[None, :]), and row statistics are
[BLOCK_M, 1], so every plan expression broadcasts as printed. Block sparsity reaches the kernel as
FlexAttention-style index lists (partial tiles, full tiles) per query tile; for decoding, split-KV shares a
row's tiles among programs and a merge kernel combines their states through the plan's rescale factors."""
from __future__ import annotations

import linecache
import math
import os
from dataclasses import dataclass

import torch

from attnc.backends.codegen import Target, linearize, render_template
from attnc.errors import CallError
from attnc.ir import expr as E
from attnc.ir.expr import Node, Op
from attnc.ir.printer import ATOM, INFIX, number
from attnc.passes.block_sparsity import FULL, PARTIAL
from attnc.plan import KernelPlan, KVPass, promote

BLOCK_M, BLOCK_N = 128, 64          # the plan's defaults; launch picks per shape and classifies with the same
LOG2E = 1.4426950408889634
SPLIT_MAX_Q, SPLIT_MIN_KV = 16, 1024  # split-KV decoding: few queries, many keys
MAX_SPLITS = 64
AUTOTUNE_KEY = ["N_Q", "N_KV", "HEAD_DIM"]

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
    Op.DIVZ: ("tl.where({1} == 0, 0.0, {0} / {1})", ATOM, 12),
    Op.TOFLOAT: ("tl.cast({0}, tl.float32)", ATOM),                  # tl.cast also takes constexpr sizes
    Op.FLOORDIV: ("py_floordiv({0}, {1})", ATOM), Op.MOD: ("py_mod({0}, {1})", ATOM),   # triton's truncate
    Op.POW: ("tl.exp2({1} * tl.log2({0}))", ATOM, 11),               # non-integer exponents only (see lower)
}
INDEX_VARS = {"b": "off_b", "h": "off_h", "q_idx": "offs_m[:, None]", "kv_idx": "offs_n[None, :]"}
SIZE_VARS = {"B": "B", "H": "H", "HKV": "HKV", "Q": "N_Q", "KV": "N_KV", "D": "HEAD_DIM"}
# names the template itself binds: a hoisted param read must not take one
RESERVED = {"q", "k", "v", "p", "s", "qk", "keep", "out", "lse", "acc", "alpha", "split", "num", "tanh", "sign",
            "softplus", "py_mod", "py_floordiv", "start_m", "start_n", "off_hz", "off_b", "off_h", "off_hkv",
            "offs_m", "offs_n", "offs_d", "offs_dv", "qk_scale", "row", "row_ok", "i", "lo", "hi"}
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


def load(n: Node, idx: list[str]) -> str:
    """A param read through its pointer and strides, masked to the rows and columns that exist."""
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
    if n.op is Op.FLOORDIV and n.dtype == E.FLOAT:
        return E.make(Op.FLOOR, E.make(Op.DIV, *n.src))           # a // b -> floor(a / b)
    if n.op is Op.MOD and n.dtype == E.FLOAT:
        a, b = n.src                                              # a % b -> a - b * floor(a / b)
        return E.make(Op.SUB, a, E.make(Op.MUL, b, E.make(Op.FLOOR, E.make(Op.DIV, a, b))))
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
    from dataclasses import replace
    plan = promote(plan)
    passes = tuple(KVPass(tuple(replace(s, value=lower(s.value)) for s in p.states)) for p in plan.passes)
    return replace(plan, score=lower(plan.score), mask=plan.mask and lower(plan.mask), passes=passes,
                   epilogue=tuple((n, lower(e)) for n, e in plan.epilogue))


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


def _row(name: str) -> str:
    return f"tl.full([BLOCK_M, 1], {NEG_INF}, dtype=tl.float32)" if name == "max" else \
        "tl.zeros([BLOCK_M, 1], dtype=tl.float32)"


def _render_pass(i: int, p: KVPass, tile_names: dict[Node, str], earlier: list[str]) -> dict:
    pn = dict(tile_names)
    max_lines = linearize([(f"{s.name}_tile", s.value) for s in p.maxes], TARGET, pn, f"x{i}_")
    alphas = p.alphas()
    alpha_of = {(m, c): a for a, m, c in alphas}
    dot = next((s for s in p.sums if s.kind == "dot"), None)
    roots = [("p" if s.kind == "dot" else f"{s.name}_tile", s.value) for s in sorted(p.sums, key=lambda s: s.kind != "dot")]
    sum_lines = linearize(roots, TARGET, pn, f"y{i}_")
    sums = []
    for s in p.sums:
        if s.kind == "dot":
            continue
        tile = "p" if dot is not None and s.value == dot.value else f"tl.where(keep, {pn[s.value]}, 0.0)"
        scaled = " * ".join([s.name] + [alpha_of[r] for r in s.rescale])
        sums.append({"name": s.name, "update": f"{scaled} + tl.sum({tile}, 1, keep_dims=True)"})
    names = [s.name for s in p.states]
    return {
        "number": i, "targets": ", ".join(names),
        "states": [{"name": s.name, "init": "tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)" if s.kind == "dot"
                    else _row(s.kind)} for s in p.states],
        "earlier": earlier,
        "max_lines": max_lines,
        "maxes": [{"name": s.name, "new": s.name.replace("m_i", "m_ij"), "value": pn[s.value]} for s in p.maxes],
        "alphas": [(a, TARGET.text(_alpha(m, c, m))) for a, m, c in alphas],
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
        mask_lines = linearize([("keep", E.make(Op.AND, E.Node(Op.TENSOR, arg="keep", dtype=E.BOOL), plan.mask))],
                               TARGET, dict(names), "k")
    passes, earlier = [], []
    for i, p in enumerate(plan.passes, 1):
        passes.append(_render_pass(i, p, tile_names, list(earlier)))
        earlier += [s.name for s in p.states]
    ep_names = dict(names)
    epilogue = linearize(list(plan.epilogue), TARGET, ep_names, "e")
    results = {n: ep_names[e] for n, e in plan.epilogue}
    used_sizes = sorted({n.arg for e in exprs for n in e.walk() if n.op is Op.SIZE})
    param_args = _param_args(plan)
    context = ([SIZE_VARS[s] for s in used_sizes if s in SIZE_VARS and s not in ("Q", "KV", "D")]
               + [a for a, _ in param_args] + [h for h, _ in hoisted])
    one = plan.passes[-1]
    split = len(plan.passes) == 1
    merge = None
    if split:
        merge = {
            "maxes": [s.name for s in one.maxes],
            "alphas": [(a, TARGET.text(_alpha(m, c, f"{m}_part"))) for a, m, c in one.alphas()],
            "sums": [{"name": s.name, "dot": s.kind == "dot", "alpha": " * ".join(
                dict(((m, c), a) for a, m, c in one.alphas())[r] for r in s.rescale)} for s in one.sums],
        }
    v = plan.variant
    return render_template(
        "triton/forward.py.j2", kernel_name=plan.name, variant=v.name, source=v.file, notes=list(plan.notes),
        pass_count=plan.pass_count, params=[p.name for p in plan.params], param_args=param_args,
        context=context, hoisted=hoisted, score_lines=score_lines, mask_lines=mask_lines, has_mask=bool(mask_lines),
        passes=passes, epilogue=epilogue, out_value=results["out"], lse_value=results.get("lse", ""),
        has_lse=plan.has_lse, splittable=split, merge=merge, states=earlier,
        split_states=[{"name": s.name, "dot": s.kind == "dot"} for s in one.states] if split else [])


# -- launching --
def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


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
    if hit is None:
        cls = plan.sparsity.classify(sizes, params, bm, bn)
        row_tiles = int((cls != 0).sum(1).max()) if cls.numel() else 1
        hit = (block_lists(cls, q.device), row_tiles)
        if not plan.sparsity.params:
            compiled._tiles[key] = hit
    blocks, row_tiles = hit
    return LaunchConfig(bm, bn, split_count(plan, dims, bm, row_tiles, q.device), blocks)


_MODULES: dict[str, dict] = {}


def load_module(source: str, name: str) -> dict:
    """Execute generated source once; its text is registered with linecache, where triton.jit reads it."""
    if source not in _MODULES:
        import triton
        filename = f"<attnc-triton {name} {abs(hash(source)):x}>"
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        scope: dict = {"__name__": f"attnc_generated.{name}", "CONFIGS": autotune_configs()}
        exec(compile(source, filename, "exec"), scope)    # attnc's own output: spec text only as printed names
        _MODULES[source] = scope
    return _MODULES[source]


def launch(compiled, plan: KernelPlan, q, k, v, scale: float, params: dict, sizes: dict, return_lse: bool):
    if not q.is_cuda and not interpreting():
        raise CallError("the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors); "
                        f"q is on {q.device}")
    cfg = launch_config(compiled, plan, q, v, params, sizes)
    run = load_module(compiled.source("triton", return_lse), plan.name)[plan.name]
    args = (q, k, v, scale, cfg.blocks, cfg.block_m, cfg.block_n, cfg.n_splits,
            *[params[p.name] for p in plan.params])
    if q.is_cuda:
        with torch.cuda.device(q.device):
            return run(*args)
    import numpy as np
    with np.errstate(all="ignore"):         # the interpreter runs on numpy: masked lanes may divide by zero
        return run(*args)
