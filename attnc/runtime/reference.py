"""The materialized reference: the whole score matrix, straight from the Variant, no passes involved.

Run in float64 it is the oracle every kernel is checked against; run in the input dtype it is the
"eager" peer of the benchmarks. It also evaluates single expressions for FlexAttention's mods."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from attnc.frontend.variant import Variant
from attnc.errors import CallError
from attnc.ir.expr import BOOL, FLOAT, INT, Node, Op
from attnc.ir.printer import expr_text

_FN = {
    Op.ADD: torch.add, Op.SUB: torch.sub, Op.MUL: torch.mul, Op.DIV: torch.true_divide,
    Op.FLOORDIV: lambda a, b: torch.div(a, b, rounding_mode="floor"), Op.MOD: torch.remainder,
    Op.POW: torch.pow, Op.NEG: torch.neg,
    # x /? d: 0 where d == 0; the divisor is made safe first, so autograd never sees 0 / 0 either
    Op.DIVZ: lambda a, d: torch.where(d == 0, torch.zeros((), dtype=torch.result_type(a, d)),
                                      a / torch.where(d == 0, torch.ones((), dtype=torch.result_type(d, 1.0)), d)),
    Op.LT: torch.lt, Op.LE: torch.le, Op.GT: torch.gt, Op.GE: torch.ge, Op.EQ: torch.eq, Op.NE: torch.ne,
    Op.AND: torch.logical_and, Op.OR: torch.logical_or, Op.NOT: torch.logical_not,
    Op.WHERE: torch.where,
    Op.EXP: torch.exp, Op.EXP2: torch.exp2, Op.LOG: torch.log, Op.LOG2: torch.log2, Op.SQRT: torch.sqrt,
    Op.RSQRT: torch.rsqrt, Op.TANH: torch.tanh, Op.ERF: torch.erf, Op.SIGMOID: torch.sigmoid, Op.SOFTPLUS: F.softplus,
    Op.RELU: torch.relu, Op.ABS: torch.abs, Op.SIGN: torch.sign, Op.FLOOR: torch.floor, Op.CEIL: torch.ceil,
    Op.MIN: torch.minimum, Op.MAX: torch.maximum,
}


def evaluate(root: Node, env: dict, params: dict[str, torch.Tensor], dtype=torch.float64,
             rows: dict | None = None, check_reads: bool = True) -> torch.Tensor:
    """root over broadcastable index tensors in env ('b', 'h', 'q_idx', 'kv_idx', 'score', sizes).
    rows: how to evaluate ROWMAX / ROWSUM (the reference passes a function), None where not allowed.
    check_reads: a param read out of bounds is a CallError; off where the caller's code is traced (vmap and
    torch.compile cannot read a tensor's value), which reads the params as plain torch indexing does."""
    memo: dict[Node, torch.Tensor] = {}
    for n in root.walk():
        if n in memo:
            continue
        op = n.op
        if op is Op.CONST:
            t = {BOOL: torch.bool, INT: torch.int64}.get(n.dtype, dtype)
            val = torch.tensor(n.arg, dtype=t)
        elif op is Op.INDEX or op is Op.SIZE:
            val = env[n.arg]
        elif op is Op.SCORE:
            val = env["score"]
        elif op is Op.LOAD:
            val = _load(n, params[n.arg], [memo[s] for s in n.src], check_reads)
            val = val.to(dtype) if val.is_floating_point() else val
        elif op is Op.TOFLOAT:
            val = memo[n.src[0]].to(dtype)
        elif op in (Op.ROWMAX, Op.ROWSUM):
            val = rows(op, memo[n.src[0]])
        else:
            args = [memo[s] for s in n.src]
            if n.dtype == FLOAT:        # an integer operand of a float op is a float: q_idx ** -1 is 1 / q_idx
                args = [a.to(dtype) if not a.is_floating_point() and (op is not Op.WHERE or i) else a
                        for i, a in enumerate(args)]
            val = _FN[op](*args)
        memo[n] = val
    return memo[root]


def _load(n: Node, t: torch.Tensor, index: list[torch.Tensor], check: bool = True) -> torch.Tensor:
    """t at the index tensors, or CallError where one leaves t: torch would wrap a negative index around."""
    idx = []
    for axis, i in enumerate(index):
        i = i.long()
        if check and i.numel() and (int(i.min()) < 0 or int(i.max()) >= t.shape[axis]):
            raise CallError(f"param '{n.arg}' would be read out of bounds: axis {axis} is indexed by "
                            f"{expr_text(n.src[axis])}, which reaches [{int(i.min())}, {int(i.max())}], but the "
                            f"tensor has {t.shape[axis]} entries there")
        idx.append(i)
    return t[tuple(idx)]


def index_env(B: int, H: int, Q: int, KV: int, sizes: dict) -> dict:
    env = {"b": torch.arange(B).view(B, 1, 1, 1), "h": torch.arange(H).view(1, H, 1, 1),
           "q_idx": torch.arange(Q).view(1, 1, Q, 1), "kv_idx": torch.arange(KV).view(1, 1, 1, KV)}
    env.update({k: torch.tensor(v) for k, v in sizes.items()})
    return env


def reference(v: Variant, q, k, v_, scale: float, params: dict, sizes: dict, return_lse: bool = False):
    """Materialized attention for variant v; the computation runs in q's dtype (float64 for the oracle)."""
    dtype = q.dtype
    B, H, Q, D = q.shape
    HKV, KV = k.shape[1], k.shape[2]
    k = k.repeat_interleave(H // HKV, dim=1)
    v_ = v_.repeat_interleave(H // HKV, dim=1)
    env = index_env(B, H, Q, KV, sizes)
    env["score"] = torch.matmul(q, k.transpose(-1, -2)) * scale
    s = evaluate(v.score, env, params, dtype).to(dtype).expand(B, H, Q, KV)
    keep = torch.ones((), dtype=torch.bool) if v.mask is None else evaluate(v.mask, env, params, dtype)
    keep = keep.expand(B, H, Q, KV)

    live = keep.any(-1, keepdim=True)        # rows that keep a key; the others are 0, and so are their gradients

    def rows(op, x):
        x = x.expand(B, H, Q, KV)
        if op is Op.ROWMAX:                  # a row that keeps nothing: 0, not -inf, so nothing downstream is inf
            return torch.where(live, torch.where(keep, x, -math.inf).amax(-1, keepdim=True), 0.0)
        return torch.where(keep, x, 0.0).sum(-1, keepdim=True)

    env["score"] = s
    weights = evaluate(v.norm, env, params, dtype, rows).expand(B, H, Q, KV)
    weights = torch.where(keep, weights, torch.zeros((), dtype=weights.dtype))
    out = torch.matmul(weights.to(dtype), v_)
    if not return_lse:
        return out
    safe = torch.where(live, torch.where(keep, s, -math.inf), 0.0)
    lse = torch.where(live.squeeze(-1), torch.logsumexp(safe, dim=-1), -math.inf)
    return out, lse
