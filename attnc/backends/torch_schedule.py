"""How the torch backend tiles one call: the tile shapes it tries, a cost model per kind of kernel that rates
a shape's classified tiles, and spans (runs of key tiles of one kind) for passes handed to SDPA's kernel.

Every model is seconds on a CPU, fitted to runs of benchmarks/cpu.py and benchmarks/train_cpu.py
(BENCHMARKS.md): a fixed cost per visit (a tile of the loop, or one SDPA call over a span) and a cost per
score element of every head, with partial tiles dearer (the mask is evaluated and applied)."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

# (BLOCK_M, BLOCK_N) the runtime chooses from per call (every kernel takes its tiles as an argument)
TILE_SHAPES = ((256, 512), (256, 256), (128, 256), (128, 128), (64, 128))
# spans join runs of key tiles, so BLOCK_N only sets how finely the mask's partial area is found
SPAN_SHAPES = ((1024, 128), (768, 128), (512, 128), (256, 128), (128, 128), (128, 64), (64, 64))
SPAN_ROWS = (64, 128)   # a partial span is attended by blocks of so many query rows, each over the keys it keeps
JOIN = 4            # the tile loop joins up to JOIN adjacent key tiles of a query tile into one


@dataclass(frozen=True)
class Cost:
    """visit: seconds per tile (or call) visited; element: seconds of one thread per score element of one
    head of a full tile; partial: the factor for an element of a partial tile."""
    visit: float
    element: float
    partial: float


# the tile loop: forward ~20 torch ops per tile; the backward ~30 and five products instead of two
LOOP = {"forward": Cost(7e-5, 3.3e-9, 2.1), "backward": Cost(1.2e-4, 10e-9, 1.6)}
# SDPA's fused kernel: a call and the merge of its result cost tens of microseconds; an element of a partial
# span also has its mask evaluated and turned into an additive bias
SPANS = {"forward": Cost(6e-5, 4.1e-9, 1.1), "backward": Cost(1.0e-4, 11e-9, 1.1)}


def cost(tiles: list, block_m: int, sizes: dict, model: Cost) -> float:
    """Estimated seconds to run `tiles` with query tiles of block_m rows."""
    heads = sizes["B"] * sizes["H"] / torch.get_num_threads()
    total = 0.0
    for start_m, kv in tiles:
        rows = min(block_m, sizes["Q"] - start_m)
        for start_n, end_n, full in kv:
            total += model.visit + rows * (end_n - start_n) * heads * model.element * (1.0 if full else model.partial)
    return total


def partial(tiles: list) -> list:
    """The tiles, every one marked partial."""
    return [(start_m, [(start_n, end_n, False) for start_n, end_n, _ in kv]) for start_m, kv in tiles]


def join(tiles: list, width: int | None, by_kind: bool) -> list:
    """Adjacent key tiles of each query tile joined into one of at most `width` keys (None: no limit).
    by_kind joins only tiles of one kind (spans: full with full, partial with partial); otherwise a joined
    tile is partial if any part is."""
    out = []
    for start_m, kv in tiles:
        runs: list = []
        for start_n, end_n, full in kv:
            last = runs[-1] if runs else None
            if last and last[1] == start_n and (width is None or end_n - last[0] <= width) \
                    and (not by_kind or last[2] == full):
                runs[-1] = (last[0], end_n, last[2] and full)
            else:
                runs.append((start_n, end_n, full))
        out.append((start_m, runs))
    return out


# SDPA's CPU kernel works through its query rows in blocks of 256 rows when a call has at least 768, of 64
# from 192, else of 32; smaller blocks reread the keys more often. Seconds per element relative to the best,
# measured over 4096 keys (benchmarks/train_cpu.py --calibrate)
SDPA_ROWS = ((768, 1.0), (192, 1.12), (0, 1.22))


def rows_factor(rows: int) -> float:
    return next(f for least, f in SDPA_ROWS if rows >= least)


def spans_cost(tiles: list, fine: list, block_m: int, rows: int, sizes: dict, model: Cost) -> float:
    """Estimated seconds of a fused kernel with query tiles of block_m rows (`tiles`, not yet joined): each
    run of full tiles is one call over the tile's rows; the rest is attended by blocks of `rows` rows, one
    call per run of their tiles, which `fine` (the mask classified with tiles of `rows` rows) says where."""
    heads = sizes["B"] * sizes["H"] / torch.get_num_threads()
    total, full_at = 0.0, set()
    for start_m, kv in join(tiles, None, True):
        n = min(block_m, sizes["Q"] - start_m)
        for start_n, end_n, full in kv:
            if full:
                total += model.visit + n * (end_n - start_n) * heads * model.element * rows_factor(n)
    for start_m, kv in tiles:
        full_at.update((start_m, start_n) for start_n, _, full in kv if full)
    for start_m, kv in fine:
        n = min(rows, sizes["Q"] - start_m)
        tile_m, last = start_m - start_m % block_m, None
        for start_n, end_n, _ in kv:
            if (tile_m, start_n) in full_at:
                continue
            total += n * (end_n - start_n) * heads * model.element * model.partial * rows_factor(n)
            total += model.visit if last != start_n else 0.0         # a new run: one more call
            last = end_n
    return total


class Schedules:
    """(block_m, tiles) per kernel and call sizes, remembered for the last few where the tiles read no param."""

    def __init__(self, size: int = 64):
        self.size = size
        self.memo: OrderedDict = OrderedDict()

    def get(self, compiled, kernel, sizes: dict, params: dict, spans) -> tuple[int, list, int | None]:
        """(block_m, tiles, rows): rows is None for the tile loop, else the rows of the blocks partial spans are
        attended by; spans() says whether the kernel runs spans (asked only when the memo does not answer)."""
        plan = kernel.plan
        key = (id(kernel), tuple(sizes.items()))
        hit = self.memo.get(key)
        if hit is not None and hit[0] is kernel:
            return hit[1:]
        kind = "forward" if plan.kind == "forward" else "backward"
        candidates = []
        if spans():
            for bm, bn in SPAN_SHAPES:
                tiles = compiled.tiles(plan, sizes, params, bm, bn)
                for rows in (r for r in SPAN_ROWS if r <= bm):
                    fine = compiled.tiles(plan, sizes, params, rows, bn) if bm > rows else tiles
                    rate = lambda t, f: spans_cost(t, f, bm, rows, sizes, SPANS[kind])       # noqa: E731
                    candidates.append((rate(tiles, fine), bm, join(tiles, None, True), rows))
                    # or each run of tiles one partial span: one call per row block where full tiles lie
                    # between partial ones (a band), the mask evaluated over all of them
                    candidates.append((rate(partial(tiles), partial(fine)), bm, join(partial(tiles), None, True), rows))
        else:
            for bm, bn in TILE_SHAPES:
                tiles = compiled.tiles(plan, sizes, params, bm, bn)
                candidates += [(cost(t, bm, sizes, LOOP[kind]), bm, t, None)
                               for t in (tiles, join(tiles, JOIN * bn, False))]
        _, block_m, tiles, rows = min(candidates, key=lambda c: c[0])
        if not plan.sparsity.params:
            self.memo[key] = (kernel, block_m, tiles, rows)    # holds kernel: its id is not reused while remembered
            if len(self.memo) > self.size:
                self.memo.popitem(last=False)
        return block_m, tiles, rows


def blocks_text() -> str:
    shapes = lambda s: ", ".join(f"{m}x{n}" for m, n in s)
    return (f"BLOCK_M x BLOCK_N chosen per call by a cost model of the classified tiles (banded masks take small "
            f"tiles, dense ones large): the tile loop among {shapes(TILE_SHAPES)}; plain softmax passes go to "
            f"SDPA's CPU kernel in spans of like tiles, classified at {shapes(SPAN_SHAPES)}, partial spans by "
            f"blocks of {' or '.join(map(str, SPAN_ROWS))} rows")
