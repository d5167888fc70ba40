"""The object compile() returns: validates a call, classifies tiles, runs the generated kernel."""
from __future__ import annotations

import math

import torch

from attnc.errors import CallError
from attnc.frontend.variant import Param, Variant
from attnc.ir.lower import lower
from attnc.ir.printer import cascade_text
from attnc.passes import PASS_NAMES, run_pipeline
from attnc.passes.block_sparsity import FULL, PARTIAL
from attnc.passes.bounds import check_at_call
from attnc.plan import KernelPlan, build_plan
from attnc.runtime import cache
from attnc.runtime.reference import reference

FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
PARAM_DTYPES = {"float": FLOATS, "int": (torch.int32, torch.int64, torch.int16, torch.int8, torch.uint8),
                "bool": (torch.bool,)}
TARGETS = ("torch", "triton")


class Compiled:
    """attn(q, k, v, *, scale=None, return_lse=False, **params) for one variant."""

    def __init__(self, variant: Variant, backend: str | None = None):
        if backend is not None and backend not in TARGETS:
            raise CallError(f"backend must be one of {', '.join(TARGETS)}, got {backend!r}")
        self.variant = variant
        self.backend = backend
        self._kernels: dict = {}
        self._tiles: dict = {}

    def __repr__(self) -> str:
        return f"<attnc {self.variant.name}: norm {self.variant.norm_kind}, params {list(self.variant.params)}>"

    # -- compilation --
    def cascade(self, return_lse: bool = False, after: str | None = None, trace: list | None = None,
                target: str = "torch"):
        backend = _backend_module(target)
        c = lower(self.variant, return_lse).with_facts(block_m=backend.BLOCK_M, block_n=backend.BLOCK_N)
        return run_pipeline(c, after, trace)

    def plan(self, return_lse: bool = False, target: str = "torch") -> KernelPlan:
        return self._kernel(return_lse, target)[0]

    def _kernel(self, return_lse: bool, target: str):
        key = (return_lse, target)
        if key not in self._kernels:
            self._kernels[key] = self._build(return_lse, target)
        return self._kernels[key]

    def _build(self, return_lse: bool, target: str):
        backend = _backend_module(target)
        plan = build_plan(self.cascade(return_lse, target=target))
        key = cache.cache_key(target, self.variant.key(), repr(plan), cache.code_version(backend))
        source, path = cache.cached_source(plan.name, key, lambda: backend.render_plan(plan))
        return plan, source, cache.load_kernel(source, plan.name, path) if target == "torch" else None

    def source(self, target: str = "torch", return_lse: bool = False) -> str:
        if target not in TARGETS:
            raise CallError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
        return self._kernel(return_lse, target)[1]

    def ir(self, after: str | None = None, stages: bool = False, return_lse: bool = False) -> str:
        """The cascade after `after` (default: every pass), with the pass count; stages=True prints each stage."""
        if after is not None and after not in PASS_NAMES:
            raise CallError(f"unknown pass {after!r}; passes: {', '.join(PASS_NAMES)}")
        trace: list = []
        self.cascade(return_lse, after, trace, target=self.backend or "torch")
        shown = trace if stages else trace[-1:]
        parts = []
        for name, c, passes in shown:
            parts.append(f"-- after {name}: {passes} pass{'es' if passes != 1 else ''} over the keys --")
            parts.append(cascade_text(c))
            for key in ("tiling",):
                parts += [f"# {line}" for line in c.facts.get(key, ())]
            if "sparsity_kind" in c.facts:
                parts.append(f"# block sparsity: {c.facts['sparsity_kind']}")
            if stages:      # bounds describe the params' declarations, which callbacks only get at call time
                parts += [f"# bounds: {a.describe()}" for a in c.facts.get("bounds", ())]
            parts += [f"# note: {n}" for n in c.facts.get("notes", ())]
        return "\n".join(parts)

    @property
    def param_specs(self) -> dict[str, tuple[str, tuple]]:
        return {p.name: (p.dtype, p.dims) for p in self.variant.params.values()}

    def flex_mods(self, sizes: dict | None = None, **params):
        """(score_mod, mask_mod) with FlexAttention's signatures, evaluating this variant's expressions;
        None for a part the variant does not have. sizes binds B, H, Q, KV, ... where the variant reads them."""
        from attnc.ir.expr import Op
        from attnc.runtime.reference import evaluate
        params = {**self.variant.captured, **params}
        missing = set(self.variant.params) - set(params)
        if missing:
            raise CallError(f"flex_mods needs the params {', '.join(sorted(missing))}")
        sizes = dict(sizes or {})

        def env(b, h, q_idx, kv_idx, score=None):
            e = {"b": b, "h": h, "q_idx": q_idx, "kv_idx": kv_idx, "score": score}
            e.update({k: torch.tensor(v) for k, v in sizes.items()})
            return e

        v = self.variant
        score_mod = None
        if v.score.op is not Op.SCORE:
            def score_mod(score, b, h, q_idx, kv_idx):
                return evaluate(v.score, env(b, h, q_idx, kv_idx, score), params, score.dtype).to(score.dtype)
        mask_mod = None
        if v.mask is not None:
            def mask_mod(b, h, q_idx, kv_idx):
                return evaluate(v.mask, env(b, h, q_idx, kv_idx), params)
        return score_mod, mask_mod

    @property
    def flex_compatible(self) -> bool:
        return self.variant.norm_kind == "softmax"

    # -- calling --
    def __call__(self, q, k, v, *, scale: float | None = None, return_lse: bool = False, **params):
        sizes, params, scale = self._validate(q, k, v, scale, params)
        target = self.backend or ("triton" if q.is_cuda else "torch")
        plan, _, kernel = self._kernel(return_lse, target)
        check_at_call(plan.bounds, sizes, params)
        if target == "triton":
            from attnc.backends import triton_backend
            return triton_backend.launch(self, plan, q, k, v, scale, params, sizes, return_lse)
        torch_backend = _backend_module("torch")
        torch_backend.keep_tiles_in_the_heap()
        block_m, tiles = self.schedule(plan, sizes, params, torch_backend.TILE_SHAPES, torch_backend.tile_cost)
        args = [params[p.name] for p in plan.params]
        with torch_backend.flush_denormals():
            return kernel(q, k, v, scale, tiles, block_m, return_lse, *args)

    def tiles(self, plan: KernelPlan, sizes: dict, params: dict, block_m: int | None = None,
              block_n: int | None = None) -> list:
        """[(start_m, [(start_n, end_n, full), ...]), ...] for every query tile with work; empty tiles left out."""
        block_m, block_n = block_m or plan.block_m, block_n or plan.block_n
        uses_params = bool(plan.sparsity.params)
        key = (block_m, block_n, tuple(sorted(sizes.items())))
        if not uses_params and key in self._tiles:
            return self._tiles[key]
        cls = plan.sparsity.classify(sizes, params, block_m, block_n)
        out = []
        KV = sizes["KV"]
        for i, row in enumerate(cls.tolist()):
            kv = [(j * block_n, min((j + 1) * block_n, KV), c == FULL)
                  for j, c in enumerate(row) if c >= PARTIAL]
            if kv:
                out.append((i * block_m, kv))
        if not uses_params:
            self._tiles[key] = out
        return out

    def schedule(self, plan: KernelPlan, sizes: dict, params: dict, shapes, cost) -> tuple[int, list]:
        """(block_m, tiles) for the tile shape whose classified tiles `cost` rates cheapest: a banded mask
        wants small tiles, a dense one large tiles. Classification is O(tiles), so trying a few is cheap."""
        key = ("schedule", tuple(sorted(sizes.items())))
        if not plan.sparsity.params and key in self._tiles:
            return self._tiles[key]
        best = min(((cost(t, bm, sizes), bm, t) for bm, bn in shapes
                    for tiles in [self.tiles(plan, sizes, params, bm, bn)]
                    for t in (tiles, merge_runs(tiles, 4 * bn))), key=lambda x: x[0])
        if not plan.sparsity.params:
            self._tiles[key] = best[1:]
        return best[1:]

    def reference(self, q, k, v, *, scale: float | None = None, return_lse: bool = False, **params):
        """The materialized computation (all Q x KV scores) in q's dtype: float64 inputs give the oracle."""
        sizes, params, scale = self._validate(q, k, v, scale, params)
        return reference(self.variant, q, k, v, scale, params, sizes, return_lse)

    def _validate(self, q, k, v, scale, given: dict):
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor):
                raise CallError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() != 4:
                raise CallError(f"{name} must have 4 dimensions [B, heads, length, head_dim], got shape "
                                f"{tuple(t.shape)}")
            if t.dtype not in FLOATS:
                raise CallError(f"{name} must be float32, float16, bfloat16 or float64, got {t.dtype}")
        B, H, Q, D = q.shape
        if k.shape[0] != B or v.shape[0] != B:
            raise CallError(f"batch sizes differ: q has {B}, k has {k.shape[0]}, v has {v.shape[0]}")
        HKV, KV = k.shape[1], k.shape[2]
        if k.shape[3] != D:
            raise CallError(f"k's head_dim must equal q's ({D}), got {k.shape[3]}")
        if tuple(v.shape[1:3]) != (HKV, KV):
            raise CallError(f"v must have k's heads and length ({HKV}, {KV}), got {tuple(v.shape[1:3])}")
        if H % HKV:
            raise CallError(f"q's heads ({H}) must be a multiple of k's heads ({HKV}) for grouped-query attention")
        if not (q.dtype == k.dtype == v.dtype):
            raise CallError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
        if not (q.device == k.device == v.device):
            raise CallError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
        if Q == 0 or KV == 0:
            raise CallError(f"q and k need at least one position, got lengths {Q} and {KV}")
        if scale is None:
            scale = 1.0 / math.sqrt(D)
        sizes = {"B": B, "H": H, "HKV": HKV, "Q": Q, "KV": KV, "D": D}
        params = dict(self.variant.captured)
        unknown = set(given) - set(self.variant.params)
        if unknown:
            raise CallError(f"unexpected argument{'s' if len(unknown) > 1 else ''} {', '.join(sorted(unknown))}; "
                            f"this variant takes params: {', '.join(self.variant.params) or '(none)'}")
        params.update(given)
        for p in self.variant.params.values():
            if p.name not in params:
                raise CallError(f"missing param '{p.name}': expected a tensor {p}")
            params[p.name] = _check_param(p, params[p.name], sizes, q.device)
        return sizes, params, float(scale)


def merge_runs(tiles: list, width: int) -> list:
    """Adjacent key tiles of a query tile joined into one of at most `width` keys (partial if any part
    is): fewer, wider tiles cost fewer operations, and the mask is evaluated on the joined ones."""
    out = []
    for start_m, kv in tiles:
        runs = []
        for start_n, end_n, full in kv:
            if runs and runs[-1][1] == start_n and end_n - runs[-1][0] <= width:
                runs[-1] = (runs[-1][0], end_n, runs[-1][2] and full)
            else:
                runs.append((start_n, end_n, full))
        out.append((start_m, runs))
    return out


def _check_param(p: Param, t, sizes: dict, device) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise CallError(f"param '{p.name}' must be a tensor {p}, got {type(t).__name__}")
    if t.dtype not in PARAM_DTYPES[p.kind]:
        raise CallError(f"param '{p.name}' must have a {p.kind} dtype ({p.dtype}), got {t.dtype}")
    if t.dim() != len(p.dims):
        raise CallError(f"param '{p.name}' must have {len(p.dims)} dimension(s) ({p}), got shape {tuple(t.shape)}")
    if t.device != device:
        raise CallError(f"param '{p.name}' is on {t.device} but q is on {device}")
    for axis, (d, n) in enumerate(zip(p.dims, t.shape)):
        want = d if isinstance(d, int) else sizes.get(d)
        if want is None:
            sizes[d] = n                     # a free dim, bound by the first param that has it
        elif n != want:
            raise CallError(f"param '{p.name}' axis {axis} must have size {d}"
                            f"{'' if isinstance(d, int) else f' = {want}'}, got {n} (shape {tuple(t.shape)})")
    return t


def _backend_module(target: str):
    if target == "torch":
        from attnc.backends import torch_backend
        return torch_backend
    from attnc.backends import triton_backend
    return triton_backend
