"""block sparsity: the mask -> a classifier of (query tile, key tile) pairs as empty, partial or full.

The classifier interprets the mask over each tile's index ranges (intervals.py), all tiles at once: work is
O(tiles) for masks of indices and consts, plus one O(size) min/max pass over each param the mask reads.
For masks of indices and consts, the tiles intervals call partial are then evaluated point by point
(O(S * BLOCK_N) for banded masks), which makes their classification exact; it is cached per shape.
Empty tiles are never visited; full tiles skip mask evaluation. A tile is never called empty or full
wrongly: the interpretation is sound, and the union over batches and heads is taken."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from attnc.ir import expr as E
from attnc.ir.cascade import Cascade
from attnc.ir.expr import Node, Op
from attnc.passes.intervals import Box, Interp

EMPTY, PARTIAL, FULL = 0, 1, 2
REFINE_POINTS = 1 << 24        # most (b, h, q, kv) points a classification evaluates to settle partial tiles
_AFFINE = {Op.CONST, Op.INDEX, Op.SIZE, Op.ADD, Op.SUB, Op.NEG, Op.MUL, Op.AND, Op.OR, Op.NOT} | E.COMPARE


@dataclass(frozen=True)
class BlockSparsity:
    mask: Node | None
    exact: bool                 # affine in indices and consts: partial means partial
    params: tuple[str, ...]     # params the classification reads

    def classify(self, sizes: dict[str, int], params: dict[str, torch.Tensor], block_m: int,
                 block_n: int) -> torch.Tensor:
        """int8 [query tiles, key tiles] of EMPTY / PARTIAL / FULL."""
        nq = -(-sizes["Q"] // block_m)
        nk = -(-sizes["KV"] // block_n)
        if self.mask is None:
            return torch.full((nq, nk), FULL, dtype=torch.int8)
        q0 = torch.arange(nq, dtype=torch.float64)[:, None] * block_m
        k0 = torch.arange(nk, dtype=torch.float64)[None, :] * block_n
        ranges = {
            "b": (torch.tensor(0.0, dtype=torch.float64), torch.tensor(sizes["B"] - 1.0, dtype=torch.float64)),
            "h": (torch.tensor(0.0, dtype=torch.float64), torch.tensor(sizes["H"] - 1.0, dtype=torch.float64)),
            "q_idx": (q0, torch.clamp(q0 + block_m - 1, max=sizes["Q"] - 1)),
            "kv_idx": (k0, torch.clamp(k0 + block_n - 1, max=sizes["KV"] - 1)),
        }
        box = Box(ranges, {k: float(v) for k, v in sizes.items()}, params, {"q_idx": block_m, "kv_idx": block_n})
        lo, hi = Interp(box)(self.mask)
        lo, hi = torch.broadcast_to(lo, (nq, nk)), torch.broadcast_to(hi, (nq, nk))
        out = torch.full((nq, nk), PARTIAL, dtype=torch.int8)
        out[lo >= 1] = FULL
        out[hi <= 0] = EMPTY
        if not self.params:
            self._settle_partial(out, sizes, block_m, block_n)
        return out

    def _settle_partial(self, out: torch.Tensor, sizes: dict, block_m: int, block_n: int) -> None:
        """Evaluate a mask of indices and consts on the points of its PARTIAL tiles, which intervals
        cannot always decide (`or` of two affine forms). There are O(query tiles) such tiles for banded
        masks, so the work is O(S * BLOCK_N); it is skipped when it would exceed REFINE_POINTS."""
        from attnc.runtime.reference import evaluate     # the same evaluator the oracle uses
        tiles = (out == PARTIAL).nonzero()
        uses = {n.arg for n in self.mask.walk() if n.op is Op.INDEX}
        B = sizes["B"] if "b" in uses else 1
        H = sizes["H"] if "h" in uses else 1
        if not len(tiles) or B * H * len(tiles) * block_m * block_n > REFINE_POINTS:
            return
        rows = torch.clamp(tiles[:, 0, None] * block_m + torch.arange(block_m), max=sizes["Q"] - 1)
        cols = torch.clamp(tiles[:, 1, None] * block_n + torch.arange(block_n), max=sizes["KV"] - 1)
        env = {"b": torch.arange(B).view(B, 1, 1, 1, 1), "h": torch.arange(H).view(1, H, 1, 1, 1),
               "q_idx": rows.view(1, 1, -1, block_m, 1), "kv_idx": cols.view(1, 1, -1, 1, block_n)}
        env.update({k: torch.tensor(v) for k, v in sizes.items()})
        kept = evaluate(self.mask, env, {}).expand(B, H, len(tiles), block_m, block_n)
        kept = kept.permute(2, 0, 1, 3, 4).reshape(len(tiles), -1)
        out[tiles[:, 0], tiles[:, 1]] = torch.where(
            kept.all(1), FULL, torch.where(kept.any(1), PARTIAL, EMPTY)).to(torch.int8)


def block_sparsity(c: Cascade) -> Cascade:
    """Both views come from one classification: key tiles per query tile are its rows, query tiles per key
    tile its columns (kernels parallel over key tiles read it transposed)."""
    mk = c.role("mask")
    mask = mk.body if mk is not None else None
    exact = mask is not None and all(n.op in _AFFINE and (n.op is not Op.MUL or any(
        s.op is Op.CONST for s in n.src)) for n in mask.walk())
    params = tuple(E.params_used(mask)) if mask is not None else ()
    kind = "no mask: every tile full" if mask is None else (
        "affine in indices and consts: exact per tile" if exact else
        "indices and consts: intervals, then the points of partial tiles; exact per tile" if not params else
        f"reads {', '.join(params)}: per-block min/max, sound")
    return c.with_facts(sparsity=BlockSparsity(mask, exact, params), sparsity_kind=kind)
