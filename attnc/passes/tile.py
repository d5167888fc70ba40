"""tile: split m into BLOCK_M tiles and n into BLOCK_N tiles. b, h and the query tile m1 become the
parallel grid; the key tile n1 is the sequential loop of each pass; running reductions become the
loop-carried state. The statements are unchanged: the split is recorded as facts for the plan."""
from __future__ import annotations

from attnc.ir.cascade import Cascade
from attnc.passes.pass_count import pass_of


def tile(c: Cascade) -> Cascade:
    """Block sizes come from the backend (facts block_m, block_n), 128 when none was chosen."""
    block_m, block_n = c.facts.get("block_m", 128), c.facts.get("block_n", 128)
    when = pass_of(c)
    carried = {p: [s.name for s in c.stmts if s.running and when[s.name] == p]
               for p in sorted(set(when.values()))}
    lines = [f"m = m1*{block_m} + m0; n = n1*{block_n} + n0; grid (b, h, m1); loop n1 in each pass"]
    lines += [f"pass {p}: carries {', '.join(v) or '(nothing)'}" for p, v in carried.items() if v]
    return c.with_facts(block_m=block_m, block_n=block_n, pass_of=when, tiling=lines)
