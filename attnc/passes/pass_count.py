"""pass count: cascade -> number of passes over the keys (FuseMax's analysis). Rewrites nothing.

Along every dataflow path, count the edges "complete reduction over n -> a consumer that iterates n";
passes = 1 + the largest count. A running (online) reduction is not complete: its consumers in the same
loop see it as it goes, so its edges count 0.
"""
from __future__ import annotations

from attnc.ir.cascade import Cascade


def pass_of(c: Cascade) -> dict[str, int]:
    """The 1-based pass over the keys in which each statement can be computed."""
    when: dict[str, int] = {"Q": 1, "K": 1, "V": 1}
    for s in c.stmts:
        p = 1
        for r in s.reads():
            src = next((x for x in c.stmts if x.name == r), None)
            hard = src is not None and "n" in src.over and not src.running and s.iterates_n
            p = max(p, when[r] + (1 if hard else 0))
        when[s.name] = p
    return when


def pass_count(c: Cascade) -> int:
    when = pass_of(c)
    return max(when[s.name] for s in c.stmts)
