"""Abstract interpretation of expressions over index ranges: every node becomes a (lo, hi) pair of float64
tensors that bound its value over a box of (b, h, q_idx, kv_idx); booleans are bounded in {0, 1}.

Used per tile (block sparsity: one box per (query tile, key tile), all tiles at once) and over the whole
domain (bounds: one box). Sound always; exact for a comparison of one affine form of indices and consts,
since the tile's index box attains every integer value of such a form between its bounds."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from attnc.ir import expr as E
from attnc.ir.expr import Node, Op
from attnc.passes.sym import canonical

INF = math.inf
Interval = tuple[torch.Tensor, torch.Tensor]
MONOTONE = {Op.EXP: torch.exp, Op.EXP2: torch.exp2, Op.LOG: torch.log, Op.LOG2: torch.log2, Op.SQRT: torch.sqrt,
            Op.TANH: torch.tanh, Op.ERF: torch.erf, Op.SIGMOID: torch.sigmoid, Op.SOFTPLUS: torch.nn.functional.softplus,
            Op.RELU: torch.relu, Op.SIGN: torch.sign, Op.FLOOR: torch.floor, Op.CEIL: torch.ceil}


@dataclass
class Box:
    """Index ranges: each a (lo, hi) pair of tensors broadcastable to the output grid (inclusive bounds)."""
    ranges: dict[str, Interval]
    sizes: dict[str, float]
    params: dict[str, torch.Tensor]
    blocks: dict[str, int]          # 'q_idx' / 'kv_idx' -> block size, for per-block param min/max


def _t(v) -> torch.Tensor:
    return torch.as_tensor(v, dtype=torch.float64)


class Interp:
    def __init__(self, box: Box):
        self.box = box
        self.memo: dict[Node, Interval] = {}

    def __call__(self, n: Node) -> Interval:
        if n not in self.memo:
            for x in n.walk():                  # children first: _eval never recurses more than a level
                if x not in self.memo:
                    lo, hi = self._eval(x)
                    # a NaN bound (log of a range reaching below 0) claims nothing: as a bound it would make
                    # every comparison false, and a tile where the mask holds would be called empty
                    r = torch.nan_to_num(lo, nan=-INF), torch.nan_to_num(hi, nan=INF)
                    self.memo[x] = _exact_ints(r) if x.dtype == E.INT else r
        return self.memo[n]

    def _eval(self, n: Node) -> Interval:
        op, a = n.op, n.arg
        if op is Op.CONST:
            return _t(float(a)), _t(float(a))
        if op is Op.INDEX:
            return self.box.ranges[a]
        if op is Op.SIZE:
            v = _t(self.box.sizes[a])
            return v, v
        if op is Op.LOAD:
            return self._load(n)
        if op in E.COMPARE:
            return self._compare(n)
        x = [self(s) for s in n.src]
        if op is Op.ADD:
            return x[0][0] + x[1][0], x[0][1] + x[1][1]
        if op is Op.SUB:
            return x[0][0] - x[1][1], x[0][1] - x[1][0]
        if op is Op.NEG:
            return -x[0][1], -x[0][0]
        if op is Op.MUL:
            return _hull([_mul(p, q) for p in x[0] for q in x[1]])
        if op in (Op.FLOORDIV, Op.DIV):
            return self._div(op, x[0], x[1])
        if op is Op.MOD:
            return self._mod(x[0], x[1])
        if op is Op.MIN:
            return torch.minimum(x[0][0], x[1][0]), torch.minimum(x[0][1], x[1][1])
        if op is Op.MAX:
            return torch.maximum(x[0][0], x[1][0]), torch.maximum(x[0][1], x[1][1])
        if op is Op.ABS:
            lo, hi = x[0]
            return torch.where(lo >= 0, lo, torch.where(hi <= 0, -hi, _t(0.0))), torch.maximum(-lo, hi)
        if op in MONOTONE:
            f = MONOTONE[op]
            return f(x[0][0]), f(x[0][1])
        if op is Op.AND:
            return torch.minimum(x[0][0], x[1][0]), torch.minimum(x[0][1], x[1][1])
        if op is Op.OR:
            return torch.maximum(x[0][0], x[1][0]), torch.maximum(x[0][1], x[1][1])
        if op is Op.NOT:
            return 1 - x[0][1], 1 - x[0][0]
        if op is Op.WHERE:
            (clo, chi), (alo, ahi), (blo, bhi) = x
            lo = torch.where(clo >= 1, alo, torch.where(chi <= 0, blo, torch.minimum(alo, blo)))
            hi = torch.where(clo >= 1, ahi, torch.where(chi <= 0, bhi, torch.maximum(ahi, bhi)))
            return lo, hi
        return _t(-INF), _t(INF)          # anything else: no claim

    def _compare(self, n: Node) -> Interval:
        # compare one canonical affine form against 0, so `2*q >= kv + q` is as exact as `q >= kv`
        a, b = n.src
        if n.op in (Op.EQ, Op.NE) and a.dtype == E.BOOL:
            (alo, ahi), (blo, bhi) = self(a), self(b)
        else:
            (alo, ahi) = self(canonical(a - b)) if a.dtype != E.BOOL else self(a)
            blo = bhi = _t(0.0)
        if n.op in (Op.GT, Op.GE):
            (alo, ahi), (blo, bhi) = (blo, bhi), (alo, ahi)
            op = Op.LT if n.op is Op.GT else Op.LE
        else:
            op = n.op
        if op is Op.LT:
            return (ahi < blo).double(), (alo < bhi).double()
        if op is Op.LE:
            return (ahi <= blo).double(), (alo <= bhi).double()
        same = (alo == ahi) & (blo == bhi) & (alo == blo)
        apart = (ahi < blo) | (bhi < alo)
        if op is Op.EQ:
            return same.double(), (~apart).double()
        return apart.double(), (~same).double()

    def _div(self, op, x, y) -> Interval:
        (alo, ahi), (blo, bhi) = x, y
        safe = (blo > 0) | (bhi < 0)
        cands = [p / q for p in (alo, ahi) for q in (blo, bhi)]
        lo, hi = _hull([torch.nan_to_num(c, nan=0.0) for c in cands])
        if op is Op.FLOORDIV:
            lo, hi = torch.floor(lo), torch.floor(hi)
        return torch.where(safe, lo, _t(-INF)), torch.where(safe, hi, _t(INF))

    def _mod(self, x, y) -> Interval:
        (alo, ahi), (dlo, dhi) = x, y
        exact = (dlo == dhi) & (dlo > 0) & (alo > -INF) & (ahi < INF)
        d = torch.where(exact, dlo, _t(1.0))
        rlo, rhi = torch.remainder(alo, d), torch.remainder(ahi, d)
        same_period = exact & (ahi - alo < d) & (rlo <= rhi)
        full_lo = torch.where(dlo > 0, _t(0.0), _t(-INF))
        full_hi = torch.where(dlo > 0, dhi - 1, _t(INF))
        return torch.where(same_period, rlo, full_lo), torch.where(same_period, rhi, full_hi)

    def _positions(self, idx: Node, var: str) -> torch.Tensor:
        """idx at every position 0 .. length-1 of var, as int64 (computed as the reference computes it)."""
        from attnc.runtime.reference import evaluate
        length = int(self.box.ranges[var][1].max().item()) + 1
        env = {var: torch.arange(length)} | {k: torch.tensor(int(v)) for k, v in self.box.sizes.items()}
        return evaluate(idx, env, {}).long().expand(length)

    def _load(self, n: Node) -> Interval:
        """A param's values over the box: per-block min/max along axes indexed by a function of q_idx alone or
        of kv_idx alone (doc[q_idx], doc[q_idx + KV - Q], table[kv_idx // 64]), the whole axis's min/max
        otherwise. A computed index is evaluated at each position once (O(length)), and the entries it reads
        are reduced per block like a plain index's."""
        t = self.box.params[n.arg].detach()
        t = t.to(torch.float64) if t.dtype != torch.bool else t.to(torch.float64)
        lo, hi = t, t
        kept: list[str] = []
        for axis in reversed(range(t.dim())):
            idx = n.src[axis]
            var = _one_position(idx)
            if var in self.box.blocks and var not in kept:
                if idx.op is not Op.INDEX:            # the entry each position reads, position by position
                    at = self._positions(idx, var).clamp(0, t.shape[axis] - 1)
                    lo, hi = lo.index_select(axis, at), hi.index_select(axis, at)
                kept.insert(0, var)
                continue
            lo, hi = lo.amin(dim=axis), hi.amax(dim=axis)
        for i, name in enumerate(kept):
            lo, hi = _blockwise(lo, hi, i, self.box.blocks[name], self.box.ranges[name])
        if not kept:
            return lo, hi
        # lay the kept axes out as the grid: q blocks on dim 0, kv blocks on dim 1
        if kept == ["kv_idx", "q_idx"]:
            lo, hi = lo.t(), hi.t()
        if kept == ["kv_idx"]:
            lo, hi = lo[None, :], hi[None, :]
        elif kept == ["q_idx"]:
            lo, hi = lo[:, None], hi[:, None]
        return lo, hi


def _one_position(idx: Node) -> str | None:
    """'q_idx' or 'kv_idx' when idx is a function of that index alone (with sizes and consts), else None."""
    names = set()
    for x in idx.walk():
        if x.op in (Op.LOAD, Op.TENSOR, Op.SCORE):
            return None
        if x.op is Op.INDEX:
            names.add(x.arg)
    return names.pop() if len(names) == 1 and names <= {"q_idx", "kv_idx"} else None


def _blockwise(lo: torch.Tensor, hi: torch.Tensor, axis: int, block: int, rng: Interval) -> Interval:
    """Reduce `axis` into blocks of `block` entries, one per tile of the index range."""
    ntiles = rng[0].numel()
    length = int(rng[1].max().item()) + 1
    lo, hi = lo.narrow(axis, 0, length), hi.narrow(axis, 0, length)
    pad = ntiles * block - length
    if pad:
        lo, hi = _pad_edge(lo, axis, pad), _pad_edge(hi, axis, pad)
    shape = list(lo.shape)
    shape[axis:axis + 1] = [ntiles, block]
    return lo.reshape(shape).amin(dim=axis + 1), hi.reshape(shape).amax(dim=axis + 1)


def _pad_edge(x: torch.Tensor, axis: int, pad: int) -> torch.Tensor:
    reps = [1] * x.dim()
    reps[axis] = pad
    return torch.cat([x, x.narrow(axis, x.shape[axis] - 1, 1).repeat(reps)], axis)


EXACT = 2.0 ** 53      # float64 holds every integer up to here, and +, -, * of such integers round correctly


def _exact_ints(r: Interval) -> Interval:
    """An integer range as float64 can vouch for it: a bound past 2**53 may have been rounded inward, so it
    is moved out (rounding is monotone: a true bound below 2**53 never rounds past it)."""
    lo, hi = r
    lo = torch.where(lo > EXACT, _t(EXACT), torch.where(lo < -EXACT, _t(-INF), lo))
    hi = torch.where(hi < -EXACT, _t(-EXACT), torch.where(hi > EXACT, _t(INF), hi))
    return lo, hi


def _mul(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return torch.nan_to_num(p * q, nan=0.0, posinf=INF, neginf=-INF)   # 0 * inf bounds 0


def _hull(xs: list[torch.Tensor]) -> Interval:
    xs = torch.broadcast_tensors(*xs)
    s = torch.stack(xs)
    return s.amin(0), s.amax(0)


# -- exact integer ranges over the whole domain --
# The call-time bounds check and the divisor proof need integer ranges that are exact, not float64: one
# (lo, hi) pair of Python ints per node (or +-inf where nothing is known), walked children first.

class IntOverflow(Exception):
    """An integer subexpression whose range leaves [INT_MIN, INT_MAX]: the kernels would disagree there."""

    def __init__(self, node: Node, lo, hi):
        super().__init__(f"{lo}..{hi}")
        self.node, self.lo, self.hi = node, lo, hi


def _imul(a, b):
    return 0 if a == 0 or b == 0 else a * b          # 0 * inf bounds 0


def _corners(f, x, y) -> tuple:
    vals = [f(a, b) for a in x for b in y]
    return min(vals), max(vals)


def _ifloordiv(x, y):
    if y[0] <= 0 <= y[1]:
        return -INF, INF
    if any(math.isinf(v) for v in x + y):
        return -INF, INF
    return _corners(lambda a, b: a // b, x, y)       # monotone in each operand while the divisor keeps its sign


def _imod(x, y):
    (alo, ahi), (dlo, dhi) = x, y
    if dlo > 0:
        if dlo == dhi and not math.isinf(alo) and not math.isinf(ahi) and ahi - alo < dlo and alo % dlo <= ahi % dlo:
            return alo % dlo, ahi % dlo                  # one period: the remainders keep their order
        return 0, dhi - 1
    if dhi < 0:
        return dlo + 1, 0
    return -INF, INF


def _ipow(x, e: int, node: Node, limit: bool):
    lo, hi = x
    if e == 0:
        return 1, 1
    big = max(abs(lo), abs(hi))
    if math.isinf(big) or (big > 1 and e > 62):
        if limit:
            raise IntOverflow(node, -INF if lo < 0 else 0, INF)
        return -INF, INF
    vals = [lo ** e, hi ** e] + ([0] if lo < 0 < hi else [])
    return min(vals), max(vals)


_INT_OPS = {
    Op.ADD: lambda x, y: (x[0] + y[0], x[1] + y[1]),
    Op.SUB: lambda x, y: (x[0] - y[1], x[1] - y[0]),
    Op.NEG: lambda x: (-x[1], -x[0]),
    Op.MUL: lambda x, y: _corners(_imul, x, y),
    Op.FLOORDIV: _ifloordiv, Op.MOD: _imod,
    Op.MIN: lambda x, y: (min(x[0], y[0]), min(x[1], y[1])),
    Op.MAX: lambda x, y: (max(x[0], y[0]), max(x[1], y[1])),
    Op.ABS: lambda x: (x[0] if x[0] >= 0 else -x[1] if x[1] <= 0 else 0, max(-x[0], x[1])),
    Op.RELU: lambda x: (max(x[0], 0), max(x[1], 0)),
    Op.SIGN: lambda x: ((x[0] > 0) - (x[0] < 0), (x[1] > 0) - (x[1] < 0)),
    Op.FLOOR: lambda x: x, Op.CEIL: lambda x: x,
}


def int_ranges(root: Node, leaf, limit: bool, out: dict | None = None) -> dict[Node, tuple]:
    """(lo, hi) of every integer and boolean node of root, exact integers or +-inf; leaf(n) gives INDEX,
    SIZE, LOAD and TENSOR nodes theirs. Booleans are [0, 1] unless a comparison of integer ranges decides
    them. limit: raise IntOverflow at the first integer node whose range leaves [INT_MIN, INT_MAX].
    out: ranges already known (shared between the expressions of one call)."""
    out = {} if out is None else out
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:                        # children first; a subexpression already known is not entered again
        n, ready = stack.pop()
        if n in out:
            continue
        if not ready:
            stack.append((n, True))
            stack.extend((s, False) for s in n.src if s not in out)
            continue
        r = None if n.dtype == E.FLOAT else _int_node(n, out, leaf)
        if limit and n.dtype == E.INT and not (E.INT_MIN <= r[0] and r[1] <= E.INT_MAX):
            raise IntOverflow(n, *r)
        out[n] = r
    return out


def _int_node(n: Node, out: dict, leaf) -> tuple:
    op = n.op
    if op is Op.CONST:
        return int(n.arg), int(n.arg)
    if op in (Op.INDEX, Op.SIZE, Op.LOAD, Op.TENSOR):
        return leaf(n)
    x = [out.get(s) for s in n.src]
    if n.dtype == E.BOOL:
        if op in E.COMPARE and all(r is not None for r in x):
            return _icompare(op, *x)
        if op is Op.NOT and x[0] is not None:
            return 1 - x[0][1], 1 - x[0][0]
        if op in (Op.AND, Op.OR) and all(r is not None for r in x):
            f = min if op is Op.AND else max
            return f(x[0][0], x[1][0]), f(x[0][1], x[1][1])
        return 0, 1
    if op is Op.WHERE:
        c, a, b = x
        return a if c == (1, 1) else b if c == (0, 0) else (min(a[0], b[0]), max(a[1], b[1]))
    if op is Op.POW:
        return _ipow(x[0], int(n.src[1].arg), n, False)
    if op in _INT_OPS and all(r is not None for r in x):
        return _INT_OPS[op](*x)
    return -INF, INF


def _icompare(op: Op, x, y) -> tuple:
    (alo, ahi), (blo, bhi) = x, y
    if op in (Op.GT, Op.GE):
        (alo, ahi), (blo, bhi), op = (blo, bhi), (alo, ahi), Op.LT if op is Op.GT else Op.LE
    if op is Op.LT:
        return int(ahi < blo), int(alo < bhi)
    if op is Op.LE:
        return int(ahi <= blo), int(alo <= bhi)
    same = alo == ahi == blo == bhi
    apart = ahi < blo or bhi < alo
    return (int(same), int(not apart)) if op is Op.EQ else (int(apart), int(not same))
