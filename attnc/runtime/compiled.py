"""The object compile() returns: validates a call, compiles the variant's kernels for the call's target and
direction, classifies tiles, and runs them as the torch op attnc::attention (runtime/op.py), whose registered
autograd runs the backward kernels."""
from __future__ import annotations

import dataclasses
import math
import numbers
from collections import OrderedDict

import torch

from attnc.backends import backend as backend_module
from attnc.errors import CallError
from attnc.frontend.variant import Param, Variant
from attnc.ir.expr import Op
from attnc.ir.lower import lower
from attnc.ir.printer import cascade_text
from attnc.passes import BACKWARD_PASS_NAMES, PASS_NAMES, run_pipeline
from attnc.passes.block_sparsity import FULL, PARTIAL
from attnc.passes.bounds import IntRange, check_at_call
from attnc.plan import PLAN_PASSES, KernelPlan, build_plans, run_plan_passes
from attnc.plan.model import fingerprint
from attnc.plan.text import plan_text
from attnc.runtime import cache, op
from attnc.runtime.reference import reference

FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
PARAM_DTYPES = {"float": FLOATS, "int": (torch.int32, torch.int64, torch.int16, torch.int8, torch.uint8),
                "bool": (torch.bool,)}
TARGETS = ("torch", "triton")
TILE_MEMO = 64          # entries (tile lists per tile shape, bounds checks) a variant keeps across call shapes


class Memo(OrderedDict):
    """A dict that forgets its oldest entries past `size`: caches keyed by a call's sizes stay bounded when a
    decoding loop grows KV by one key at every step."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        if len(self) > self.size:
            self.popitem(last=False)


class Kernel:
    """One compiled plan: its source and the callable that runs it."""

    def __init__(self, plan: KernelPlan, source: str, run):
        self.plan, self.source, self.run = plan, source, run


class Compiled:
    """attn(q, k, v, *, scale=None, return_lse=False, **params) for one variant.

    q [B, H, Q, D], k [B, HKV, KV, D], v [B, HKV, KV, Dv], float32/float16/bfloat16/float64; H a multiple of
    HKV. Returns out [B, H, Q, Dv] in q's dtype (and lse [B, H, Q] with return_lse=True: float32, float64 for
    float64 inputs on the torch backend). Params are keyword arguments, tensors shaped as the spec declares them.
    Differentiable with respect to q, k, v and every float param, on both backends: when any of them
    requires grad, the call records a backward that runs attnc's derived backward kernels. A call is one
    attnc::attention op, so torch.compile (fullgraph, dynamic shapes) and torch.export trace it whole.
    """

    def __init__(self, variant: Variant, backend: str | None = None):
        if backend is not None and backend not in TARGETS:
            raise CallError(f"backend must be one of {', '.join(TARGETS)}, got {backend!r}")
        self.variant = variant
        self.backend = backend
        self.op_key = op.key_of(variant, backend)
        self._kernels: dict = {}
        self._tiles = Memo(TILE_MEMO)
        self._checked = Memo(TILE_MEMO)
        self._results: dict = {}
        if variant.captured:    # the op's Compiled keeps no captured tensors (every call passes them): a twin
            twin = Compiled(dataclasses.replace(variant, captured={}), backend)       # that registers itself
            self._kernels, self._tiles, self._checked, self._results = (twin._kernels, twin._tiles,
                                                                        twin._checked, twin._results)
        else:
            op.register(self)

    def __repr__(self) -> str:
        return f"<attnc {self.variant.name}: norm {self.variant.norm_kind}, params {list(self.variant.params)}>"

    # -- compilation --
    def cascade(self, return_lse: bool = False, after: str | None = None, trace: list | None = None,
                target: str = "torch", backward: bool = False, save: bool = False):
        """The cascade after the passes (up to `after`): forward, or with backward=True the backward."""
        c = lower(self.variant, return_lse).with_facts(target=target, save=save, lse_grad=return_lse)
        return run_pipeline(c, after, trace, backward)

    def plans(self, target: str = "torch", return_lse: bool = False, backward: bool = False,
              save: bool = False) -> tuple[KernelPlan, ...]:
        """The plans of one direction's kernels for a target, after its plan passes (backward: preprocess,
        dq, dkdv on Triton; one fused kernel on torch)."""
        return tuple(k.plan for k in self._compiled(target, return_lse, backward, save))

    def plan(self, return_lse: bool = False, target: str = "torch") -> KernelPlan:
        """The forward kernel's plan."""
        return self.plans(target, return_lse)[0]

    def _compiled(self, target: str, return_lse: bool, backward: bool, save: bool = False) -> list[Kernel]:
        key = (target, return_lse, backward, save or backward)
        if key not in self._kernels:
            self._kernels[key] = self._build(*key)
        return self._kernels[key]

    def _build(self, target: str, return_lse: bool, backward: bool, save: bool) -> list[Kernel]:
        be = backend_module(target)
        c = self.cascade(return_lse, target=target, backward=backward, save=save)
        out = []
        for plan in build_plans(c):
            plan = run_plan_passes(plan, be.PLAN_PASSES)
            key = cache.cache_key(target, self.variant.key(), fingerprint(plan), cache.code_version(be))
            source, path = cache.cached_source(plan.name, key, lambda p=plan: be.render(p))
            out.append(Kernel(plan, source, be.load_kernel(source, plan.name, path)))
        return out

    def source(self, target: str = "torch", return_lse: bool = False, backward: bool = False) -> str:
        """The generated source: the forward kernel, or with backward=True every backward kernel."""
        if target not in TARGETS:
            raise CallError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
        return "\n\n".join(k.source for k in self._compiled(target, return_lse, backward))

    def ir(self, after: str | None = None, stages: bool = False, return_lse: bool = False,
           backward: bool = False, target: str | None = None) -> str:
        """The cascade after `after` (default: every pass) with its pass count, then the kernels' plans
        after the target's plan passes; stages=True prints every stage."""
        target = target or self.backend or "torch"
        names = (BACKWARD_PASS_NAMES if backward else PASS_NAMES)
        plan_names = ["plan"] + list(backend_module(target).PLAN_PASSES)
        if after is not None and after not in names + plan_names:
            raise CallError(f"unknown pass {after!r}; passes: {', '.join(names + plan_names)}")
        trace: list = []
        c = self.cascade(return_lse, after if after in names else None, trace, target, backward)
        shown = trace if stages else trace[-1:]
        parts = []
        if after is None or after in names:
            for name, cc, passes in shown:
                parts.append(f"-- after {name}: {passes} pass{'es' if passes != 1 else ''} over the keys --")
                parts.append(cascade_text(cc))
                parts += [f"# {line}" for line in cc.facts.get("schedule", ())]
                if "sparsity_kind" in cc.facts:
                    parts.append(f"# block sparsity: {cc.facts['sparsity_kind']} (key tiles per query tile, and "
                                 f"query tiles per key tile)")
                if stages:      # bounds describe the params' declarations, which callbacks only get at call time
                    parts += [f"# bounds: {a.describe()}" for a in cc.facts.get("bounds", ())]
                parts += [f"# note: {n}" for n in cc.facts.get("notes", ())]
        if after is not None and after in names:
            return "\n".join(parts)
        stop = after if after in plan_names else None
        for plan in build_plans(c):
            ptrace: list = []
            run_plan_passes(plan, backend_module(target).PLAN_PASSES, stop, ptrace)
            for name, p in (ptrace if stages else ptrace[-1:]):
                parts.append(f"-- plan after {name} ({target}) --")
                parts.append(plan_text(p, backend_module(target).BLOCKS_TEXT))
        return "\n".join(parts)

    @property
    def param_specs(self) -> dict[str, tuple[str, tuple]]:
        return {p.name: (p.dtype, p.dims) for p in self.variant.params.values()}

    def flex_mods(self, sizes: dict | None = None, **params):
        """(score_mod, mask_mod) with FlexAttention's signatures, evaluating this variant's expressions;
        None for a part the variant does not have. sizes binds B, H, Q, KV, ... where the variant reads them.
        They index params as torch code does (FlexAttention traces them: no call-time bounds check)."""
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
                return evaluate(v.score, env(b, h, q_idx, kv_idx, score), params, score.dtype,
                                check_reads=False).to(score.dtype)
        mask_mod = None
        if v.mask is not None:
            def mask_mod(b, h, q_idx, kv_idx):
                return evaluate(v.mask, env(b, h, q_idx, kv_idx), params, check_reads=False)
        return score_mod, mask_mod

    @property
    def flex_compatible(self) -> bool:
        return self.variant.norm_kind == "softmax"

    # -- calling --
    def __call__(self, q, k, v, *, scale: float | None = None, return_lse: bool = False, **params):
        """Attention of q [B, H, Q, D] over k [B, HKV, KV, D] and v [B, HKV, KV, Dv].

        scale: the logit scale (default 1/sqrt(D)), a real number or a 0-d tensor. return_lse: also return
        the log-sum-exp of each row's kept scores, [B, H, Q] (-inf for a row that keeps nothing). params:
        the variant's params by name (see .param_specs). CPU tensors run the torch backend, CUDA tensors the
        Triton one, unless compile() named a backend. Differentiable in q, k, v and every float param.
        Raises CallError naming the argument for a bad shape, dtype, device or value.
        """
        if not isinstance(return_lse, bool):
            raise CallError(f"return_lse must be True or False, got {return_lse!r}")
        _, params, scale = self._validate(q, k, v, scale, params)
        values = [params[n] for n in self.variant.params]
        # decided here, where torch.compile traces: a call that records a backward saves the row statistics
        save = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, *values))
        if save or op.dispatcher_needed((q, k, v, *values)):
            res = torch.ops.attnc.attention(self.op_key, q, k, v, values, scale, return_lse, save)
        else:
            res = op.run(self, q, k, v, values, scale, return_lse, save)
        return (res[0], res[1]) if return_lse else res[0]

    def target(self, q) -> str:
        """The backend a call runs on: the one asked for, else Triton for CUDA tensors and torch otherwise."""
        return self.backend or ("triton" if q.is_cuda else "torch")

    def named_params(self, values) -> dict:
        """The op's param list by name, in the variant's order."""
        return dict(zip(self.variant.params, values))

    def sizes(self, q, k, params: dict) -> dict:
        """B, H, HKV, Q, KV, D of a validated call, and the free dims its params bind."""
        B, H, Q, D = q.shape
        sizes = {"B": B, "H": H, "HKV": k.shape[1], "Q": Q, "KV": k.shape[2], "D": D}
        for p in self.variant.params.values():
            for d, n in zip(p.dims, params[p.name].shape):
                if isinstance(d, str):
                    sizes.setdefault(d, n)
        return sizes

    def forward_results(self, target: str, return_lse: bool, save: bool) -> list[str]:
        """What attnc::attention returns, in order: out, lse (with return_lse), then the forward kernel's
        other results (with save, the row statistics the backward reads)."""
        key = ("forward", target, return_lse, save)
        if key not in self._results:
            names = self._compiled(target, return_lse, False, save)[0].plan.results()
            self._results[key] = ["out"] + ["lse"] * return_lse + [n for n in names if n not in ("out", "lse")]
        return self._results[key]

    def grad_params(self, target: str, return_lse: bool) -> tuple[str, ...]:
        """The params whose gradient the backward kernels compute, in the variant's order (compiles them)."""
        key = ("backward", target, return_lse)
        if key not in self._results:
            got = {n for kernel in self._compiled(target, return_lse, True) for n in kernel.plan.results()}
            self._results[key] = tuple(n for n in self.variant.params if f"grad_{n}" in got)
        return self._results[key]

    def forward(self, target: str, q, k, v, scale: float, params: dict, sizes: dict, return_lse: bool,
                save: bool = False) -> dict:
        """The forward kernel's results by name: out, lse (with return_lse), and with save the final row
        statistics the backward reads."""
        kernel = self._compiled(target, return_lse, False, save)[0]
        self._check_bounds(kernel.plan, sizes, params)
        return self.launch(target, kernel, {"Q": q, "K": k, "V": v}, scale, params, sizes)

    def _check_bounds(self, plan: KernelPlan, sizes: dict, params: dict) -> None:
        """check_at_call, once per sizes where the checks read no param values (sizes then decide them)."""
        key = (plan.name, tuple(sizes.items()))
        if key in self._checked:
            return
        check_at_call(plan.bounds, sizes, params)
        reads = ("reads params", plan.name)
        if reads not in self._results:
            self._results[reads] = any(n.op is Op.LOAD for c in plan.bounds
                                       for n in (c.expr if isinstance(c, IntRange) else c.index).walk())
        if not self._results[reads]:
            self._checked[key] = True

    def backward(self, target: str, tensors: dict, scale: float, params: dict, sizes: dict,
                 return_lse: bool) -> dict:
        """Every backward kernel in order; tensors holds the forward's inputs, saved values, dO (and dLSE).
        Returns dq, dk, dv and grad_<param> for each float param with a gradient."""
        results: dict = {}
        for kernel in self._compiled(target, return_lse, True):
            got = self.launch(target, kernel, {**tensors, **results}, scale, params, sizes)
            for name, t in got.items():     # a param read per pair and per row: two kernels' parts, added
                results[name] = results[name] + t if name.startswith("grad_") and name in results else t
        return results

    def launch(self, target: str, kernel: Kernel, tensors: dict, scale: float, params: dict, sizes: dict) -> dict:
        """One kernel on a call's tensors (by cascade name), through its backend; its results by name."""
        be = backend_module(target)
        return be.launch(self, kernel, tensors, scale, params, sizes)

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
        """The materialized computation (all Q x KV scores) in q's dtype: float64 inputs give the oracle.
        Differentiable through torch's autograd: the oracle of attnc's gradients."""
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
        if HKV == 0:
            raise CallError(f"k must have at least one head, got shape {tuple(k.shape)}")
        if D == 0:
            raise CallError(f"q and k must have a head_dim of at least 1, got shape {tuple(q.shape)}")
        if H % HKV:
            raise CallError(f"q's heads ({H}) must be a multiple of k's heads ({HKV}) for grouped-query attention")
        if not (q.dtype == k.dtype == v.dtype):
            raise CallError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
        if not (q.device == k.device == v.device):
            raise CallError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
        if Q == 0 or KV == 0:
            raise CallError(f"q and k need at least one position, got lengths {Q} and {KV}")
        scale = 1.0 / math.sqrt(D) if scale is None else _check_scale(scale)
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
        return sizes, params, scale


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


def _check_scale(scale) -> float:
    """A real number, or a 0-d real tensor without a gradient (attnc does not differentiate the scale)."""
    if isinstance(scale, torch.Tensor):
        if scale.dim() != 0 or scale.is_complex() or scale.dtype == torch.bool:
            raise CallError(f"scale must be a real number or a 0-d real tensor, got a {scale.dtype} tensor of shape "
                            f"{tuple(scale.shape)}")
        if scale.requires_grad and torch.is_grad_enabled():
            raise CallError("scale requires grad, but attnc gives no gradient for the scale; expected a number or "
                            "a tensor without requires_grad (scale.detach())")
        scale = scale.item()
    elif isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise CallError(f"scale must be a real number, got {type(scale).__name__} {scale!r}")
    scale = float(scale)
    if not math.isfinite(scale):
        raise CallError(f"scale must be finite, got {scale}")
    return scale


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
