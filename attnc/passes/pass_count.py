"""pass count: cascade -> number of passes over the keys (FuseMax's analysis). Rewrites nothing.

Along every dataflow path, count the edges "complete reduction over n -> a consumer that iterates n";
passes = 1 + the largest count. A running (online) reduction is not complete: its consumers in the same
loop see it as it goes, so its edges count 0. A value computed per row from a complete reduction is itself
known only after that reduction's pass, so it passes the edge on.
"""
from __future__ import annotations

from attnc.ir.cascade import Cascade


def late_values(c: Cascade, rank: str = "n") -> set[str]:
    """Statements known only at the end of their pass: complete reductions over `rank`, and values per row
    computed from them."""
    late: set[str] = set()
    for s in c.stmts:
        if (rank in s.over and not s.running) or (not s.iterates(rank) and any(r in late for r in s.reads())):
            late.add(s.name)
    return late


def pass_of(c: Cascade, rank: str = "n") -> dict[str, int]:
    """The 1-based pass over the `rank` tiles in which each statement can be computed."""
    when: dict[str, int] = {t.name: 1 for t in c.inputs}
    late = late_values(c, rank)
    for s in c.stmts:
        p = 1
        for r in s.reads():
            p = max(p, when.get(r, 1) + (1 if r in late and s.iterates(rank) else 0))
        when[s.name] = p
    return when


def pass_count(c: Cascade) -> int:
    when = pass_of(c)
    return max([when[s.name] for s in c.stmts] or [1])
