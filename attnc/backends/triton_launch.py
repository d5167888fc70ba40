"""Running Triton plans: block sizes per call, block-sparse tile lists (both views), split-KV decoding, and
loading the generated module so that the source Python compiles is the source Triton reads."""
from __future__ import annotations

import io
import linecache
import os
from dataclasses import dataclass

import torch

from attnc.errors import CallError
from attnc.passes.block_sparsity import FULL, PARTIAL
from attnc.plan.model import KernelPlan

SPLIT_MAX_Q, SPLIT_MIN_KV = 16, 1024    # split-KV decoding: few queries, many keys
MAX_SPLITS = 64
# deterministic param gradients keep one copy of each param's gradient per program
DETERMINISTIC_WORKSPACE_BYTES = 1 << 30


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
    blocks: tuple           # block_lists() for these block sizes, in the plan's view
    dot_dtype: object       # what tl.dot multiplies


# (program tile, step tile) by the widest head dim in 16-bit elements, up to each limit. The backward's kernels
# keep more tiles live than the forward (dK and dV beside four [program, step] tiles), so their steps are
# shorter; at D = 64 in fp16, 128x64 backward tiles spill even in a plain FlashAttention-2 (benchmarks/sass.py).
# A program tile of 64 rows keeps the warpgroup MMAs of sm_90.
TILES = {"forward": ((128, (128, 64)), (256, (64, 64)), (None, (64, 32))),
         "backward": ((64, (64, 32)), (128, (32, 32)), (None, (16, 16)))}


def block_sizes(sizes: dict, dtype: torch.dtype, kind: str = "forward") -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) from the head dims, the plan's kind and the mode: small tiles under the interpreter.
    A dK/dV kernel's program tile is its keys (BLOCK_N), its step the queries (BLOCK_M)."""
    if interpreting():
        return (16 if sizes["Q"] <= 16 else 32), 32
    wide = max(sizes["D"], sizes.get("Dv", sizes["D"])) * (2 if dtype == torch.float32 else 1)
    table = TILES["forward" if kind == "forward" else "backward"]
    program, step = next(tiles for limit, tiles in table if limit is None or wide <= limit)
    if kind == "dkdv":
        return step, program
    return (16 if sizes["Q"] <= 16 else program), step


def split_count(plan: KernelPlan, sizes: dict, block_m: int, row_tiles: int, device: torch.device) -> int:
    """Programs per (query tile, b, h): more than one only for single-pass decoding (few queries, many keys)."""
    if plan.kind != "forward" or len(plan.passes) != 1 or sizes["Q"] > SPLIT_MAX_Q or sizes["KV"] < SPLIT_MIN_KV:
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
    """(NUM_BLKS, IDX, FULL_NUM_BLKS, FULL_IDX): per program tile (a row of cls), the partial tiles and the
    full ones it sweeps, as counts and index rows (FlexAttention's BlockMask layout). Empty tiles appear in
    neither. Each index row holds one entry past its longest list: a pass reads the next tile's index at the
    end of every step, the last step included."""
    out = []
    for kind in (PARTIAL, FULL):
        hit = cls == kind
        num = hit.sum(1, dtype=torch.int32)
        order = torch.argsort((~hit).to(torch.int8), dim=1, stable=True)    # this kind's tiles first, in order
        order = torch.cat([order, order[:, :1]], 1)         # any valid index does for the entry past the end
        width = (int(num.max()) if num.numel() else 0) + 1
        out += [num.to(device), order[:, :width].to(torch.int32).contiguous().to(device)]
    return tuple(out)


def plan_tiles(plan: KernelPlan, sizes: dict, params: dict, block_m: int, block_n: int) -> torch.Tensor:
    """The classification in the plan's view (rows: its program tiles, columns: the tiles it sweeps), with a
    ragged last tile of the sweep made partial: full tiles are read without any bounds check, so only a
    partial tile may run past the end."""
    cls = plan.sparsity.classify(sizes, params, block_m, block_n)
    cls = cls if plan.parallel == "m" else cls.t()
    length, block = (sizes["KV"], block_n) if plan.parallel == "m" else (sizes["Q"], block_m)
    if length % block and cls.shape[1]:
        last = cls[:, -1:]
        cls = torch.cat([cls[:, :-1], torch.where(last == FULL, torch.full_like(last, PARTIAL), last)], 1)
    return cls


def launch_config(compiled, plan: KernelPlan, dtype, device, params: dict, sizes: dict) -> LaunchConfig:
    """Block sizes, split count and block-sparse tile lists for one call; lists cached unless params shape them.
    A kernel over key tiles reads the classification transposed: query tiles per key tile."""
    bm, bn = block_sizes(sizes, dtype, plan.kind)
    key = ("triton", plan.parallel, bm, bn, tuple(sorted(sizes.items())), str(device))
    hit = None if plan.sparsity.params else compiled._tiles.get(key)
    if hit is None:        # classified on the host: per-block min/max of the params the mask reads
        cls = plan_tiles(plan, sizes, {n: params[n].cpu() for n in plan.sparsity.params}, bm, bn)
        row_tiles = int((cls != 0).sum(1).max()) if cls.numel() else 1
        hit = (block_lists(cls, device), row_tiles)
        if not plan.sparsity.params:
            compiled._tiles[key] = hit
    blocks, row_tiles = hit
    return LaunchConfig(bm, bn, split_count(plan, sizes, bm, row_tiles, device), blocks, dot_dtype(dtype))


_MODULES: dict[tuple[str, bool], dict] = {}
LINE_BREAKS = {"\r", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"}


def load_module(source: str, name: str) -> dict:
    """Execute generated source once per mode (triton.jit decides at decoration whether to interpret). Its
    lines are registered with linecache, where triton.jit reads a kernel's text, split exactly as Python's
    compiler splits them, so the text Triton reads is the text that was compiled."""
    if LINE_BREAKS & set(source):
        raise RuntimeError(f"internal: generated kernel {name} holds a line break other than \\n")
    key = (source, interpreting())
    if key not in _MODULES:
        import triton  # noqa: F401
        filename = f"<attnc-triton {name} {abs(hash(source)):x}>"
        linecache.cache[filename] = (len(source), None, io.StringIO(source, newline="").readlines(), filename)
        scope: dict = {"__name__": f"attnc_generated.{name}", "CONFIGS": autotune_configs()}
        exec(compile(source, filename, "exec"), scope)    # attnc's own output: spec text only as printed names
        _MODULES[key] = scope
    return _MODULES[key]


def deterministic_workspace(plan: KernelPlan, cfg: LaunchConfig, params: dict, sizes: dict) -> bool:
    """Whether the plan adds param gradients (then, with torch.use_deterministic_algorithms(True), each program
    adds into its own copy of them, summed in a fixed order after the kernel); refuses a workspace too big."""
    names = {g.param for p in plan.passes for g in p.grads} | {g.param for g in plan.row_grads}
    if not names:
        return False
    rows, keys = (sizes["Q"], cfg.block_m) if plan.parallel == "m" else (sizes["KV"], cfg.block_n)
    programs = -(-rows // keys) * sizes["B"] * (sizes["H"] if plan.parallel == "m" else sizes["HKV"]) * cfg.n_splits
    need = programs * sum(params[n].numel() for n in names) * 4
    if need > DETERMINISTIC_WORKSPACE_BYTES:
        raise CallError(f"deterministic gradients of {', '.join(sorted(names))} need {need / 2 ** 30:.1f} GiB of "
                        f"workspace (one copy per program, {programs} programs), more than the "
                        f"{DETERMINISTIC_WORKSPACE_BYTES / 2 ** 30:.0f} GiB attnc allows; expected smaller params "
                        "or torch.use_deterministic_algorithms(False)")
    return True


def launch(compiled, kernel, tensors: dict, scale: float, params: dict, sizes: dict) -> dict:
    """Run one plan's kernel on a call's tensors (by cascade name); returns its results by name."""
    q = tensors["Q"]
    if not q.is_cuda and not interpreting():
        raise CallError("the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors); "
                        f"q is on {q.device}")
    try:
        import triton  # noqa: F401
    except ImportError:
        raise CallError("the triton backend needs the triton package: pip install 'attnc[triton]'") from None
    plan = kernel.plan
    dims = dict(sizes, Dv=tensors["V"].shape[-1])
    cfg = launch_config(compiled, plan, q.dtype, q.device, params, dims)
    args = {x.name: tensors[x.tensor] for x in plan.loads}
    args.update({f"p_{p.name}": params[p.name] for p in plan.params})
    deterministic = torch.are_deterministic_algorithms_enabled() and deterministic_workspace(plan, cfg, params, dims)
    run = lambda: kernel.run(**args, sm_scale=scale, blocks=cfg.blocks, BLOCK_M=cfg.block_m,  # noqa: E731
                             BLOCK_N=cfg.block_n, N_SPLITS=cfg.n_splits, DOT_DTYPE=cfg.dot_dtype, DTYPE=q.dtype,
                             sizes=dims, DETERMINISTIC=deterministic)
    if q.is_cuda:
        with torch.cuda.device(q.device):
            got = run()
    else:
        import numpy as np
        with np.errstate(all="ignore"):         # the interpreter runs on numpy: masked lanes may divide by zero
            got = run()
    return dict(zip(plan.results(), got))
