"""schedule: a cascade -> the kernels that compute it, each parallel over the tiles of one rank and looping
over the tiles of the other, with the block sizes the kernels run with. Rewrites nothing.

Forward: one kernel, parallel over query tiles, one sweep over the key tiles per pass. Backward, on a target
that may accumulate into the loop rank's tiles as it goes (the torch backend, which visits tiles in order):
one kernel parallel over query tiles that carries dQ and adds into dK and dV at each key tile. On a target
whose programs run at once (Triton): a row preprocess (Δ, the statistics' adjoints, and any sums over the
keys they need), a dQ kernel parallel over query tiles, and a dK/dV kernel parallel over key tiles that loops
over the query tiles of every query head of its kv head.
"""
from __future__ import annotations

from dataclasses import dataclass

from attnc.ir.cascade import Cascade, Tensor
from attnc.passes.pass_count import pass_of

ROW_ROLES = ("delta", "rowgrad")


@dataclass(frozen=True)
class KernelSpec:
    kind: str                       # forward | backward | preprocess | dq | dkdv
    parallel: str                   # 'm': programs over query tiles; 'n': over key tiles
    stmts: tuple[str, ...]          # the statements it computes, in cascade order
    stores: tuple[str, ...]         # those it writes out: outputs, or values a later kernel reads
    passes: int                     # sweeps over the loop rank
    given: tuple[str, ...] = ()     # values an earlier kernel computed, which this one loads

    def describe(self) -> str:
        par, loop = ("query", "key") if self.parallel == "m" else ("key", "query")
        loads = f"; loads {', '.join(self.given)}" if self.given else ""
        return (f"kernel {self.kind}: programs over {par} tiles, {self.passes} sweep{'s' if self.passes != 1 else ''} "
                f"over {loop} tiles{loads}; computes {', '.join(self.stmts)}; stores {', '.join(self.stores)}")


def _closure(c: Cascade, names: set[str], given: set[str]) -> set[str]:
    """names and every statement they read, transitively, stopping at values a kernel is given."""
    out, todo = set(), list(names)
    defined = {s.name for s in c.stmts}
    while todo:
        n = todo.pop()
        if n in out or n not in defined:
            continue
        out.add(n)
        if n not in given:
            todo += c.get(n).reads()
    return out


def _kernel(c: Cascade, kind: str, parallel: str, wanted: set[str], stores: list[str],
            given: set[str] = frozenset()) -> KernelSpec:
    need = _closure(c, wanted, given)
    stmts = tuple(s.name for s in c.stmts if s.name in need and s.name not in given)
    own = c.replace(stmts=tuple(c.get(n) for n in stmts),
                    inputs=c.inputs + tuple(Tensor(n, c.get(n).ranks, c.get(n).role) for n in sorted(need & given)))
    loop = "n" if parallel == "m" else "m"
    when = pass_of(own, loop)
    loops = {when[n] for n in stmts if c.get(n).iterates(loop)}
    return KernelSpec(kind, parallel, stmts, tuple(stores), max(loops) if loops else 0,
                      tuple(n for n in (s.name for s in c.stmts) if n in need & given))


def kernels(c: Cascade, split: bool) -> tuple[KernelSpec, ...]:
    """The kernels of a cascade; split: a backward without accumulation into the loop rank's tiles."""
    if c.direction == "forward":       # training saves the final statistics for the backward
        saved = [s.name for s in c.roles("stat")] if c.facts.get("save") else []
        return (_kernel(c, "forward", "m", set(c.outputs) | set(saved), list(c.outputs) + saved),)
    if not split:
        return (_kernel(c, "backward", "m", set(c.outputs), list(c.outputs)),)
    # dq and dk are absent where the score does not read q.k
    dq, dk = ([c.role(r).name] if c.role(r) is not None else [] for r in ("dq", "dk"))
    dv = c.role("dv").name
    row = [s.name for s in c.stmts if s.role in ROW_ROLES]
    row_grads = [s.name for s in c.stmts if s.role == "dparam" and "n" not in s.over]
    tile_grads = [s.name for s in c.stmts if s.role == "dparam" and "n" in s.over]
    tile_need = _closure(c, {*dq, *dk, dv} | set(tile_grads), set(row))
    given = {n for n in row if n in tile_need}
    out = []
    if given or row_grads:
        out.append(_kernel(c, "preprocess", "m", given | set(row_grads), sorted(given, key=row.index) + row_grads))
    if dq or tile_grads:
        out.append(_kernel(c, "dq", "m", set(dq) | set(tile_grads), dq + tile_grads, given))
    out.append(_kernel(c, "dkdv", "n", {*dk, dv}, dk + [dv], given))
    return tuple(out)


def schedule(c: Cascade) -> Cascade:
    """Records the kernels (facts 'kernels') and the block sizes they run with (facts 'blocks', from the
    target's backend: facts 'target')."""
    from attnc.backends import backend
    target = backend(c.facts.get("target", "torch"))
    specs = kernels(c, split=not target.ACCUMULATES_IN_ORDER)
    lines = [spec.describe() for spec in specs]
    lines.append(f"tiles: {target.BLOCKS_TEXT}")
    return c.with_facts(kernels=specs, schedule=lines, block_m=target.BLOCK_M, block_n=target.BLOCK_N)
