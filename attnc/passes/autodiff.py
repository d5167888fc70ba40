"""autodiff: a forward cascade (simplified, before online) -> its backward cascade.

The forward computes P = where(MK, w(S, R), 0) from the score S and row statistics R (rowmax / rowsum over
the kept keys), and O = P V. Given dO it needs, per pair, dL/dS: the weight's own derivative times
dP = dO V^T, plus what flows back through each row statistic. Row statistics and row-level param reads
(sinks) get row adjoints G, computed last statistic first:

    G_X = sum_n dP * dw/dX  +  sum over statistics R that read X of  G_R * sum_n dR/dX

Each sum over the keys is found in closed form when it can be: when dw/dX = r * w with r free of the key
rank, sum_n dP * dw/dX = r * Δ with Δ = rowsum(dO * O) (softmax's classic rule); when the summand of a
rowsum R is h and dh/dX = r * h, sum_n dh/dX = r * R. Otherwise it is a complete reduction over the keys,
which costs the backward one more pass. A rowmax whose adjoint cancels to 0 (the weights are invariant to
it, as softmax's are) carries no gradient; one that does not (a hinge) sends its adjoint to the key holding
the maximum. Then dQ, dK, dV are the usual products and every float param gets the sum of its reads'
gradients. Scores are recomputed per tile from the saved statistics: nothing of size Q x KV is stored.
"""
from __future__ import annotations

import sympy

from attnc.errors import SpecError
from attnc.ir import expr as E
from attnc.ir.cascade import Cascade, Einsum, Tensor, tensor
from attnc.ir.expr import BOOL, Node, Op
from attnc.passes.defer_division import weight_of
from attnc.passes.derivatives import gradients
from attnc.passes.sym import SymMap, canonical

SCALE = Node(Op.SIZE, arg="scale", dtype=E.FLOAT)
ROW = ("b", "h", "m")


class _Builder:
    """The backward cascade under construction: statements in order and the n-dependence of names."""

    def __init__(self, fwd: Cascade):
        self.fwd = fwd
        self.stmts: list[Einsum] = []
        self.ranks = {t.name: t.ranks for t in fwd.inputs} | {s.name: s.ranks for s in fwd.stmts}
        self.count = 0
        self.notes: list[str] = []

    def add(self, name: str, ranks, body: Node, role: str, reduce=None, over=(), **kw) -> Node:
        self.stmts.append(Einsum(name, tuple(ranks), body, reduce, tuple(over), role=role, **kw))
        self.ranks[name] = tuple(ranks)
        return tensor(name, body.dtype if reduce != "argmax" else E.INT)

    def fresh(self, base: str) -> str:
        self.count += 1
        return f"{base}{self.count}"

    def tile_level(self, n: Node) -> bool:
        """n varies with the key: it reads kv_idx, or a tensor with the key rank."""
        for x in n.walk():
            if x.op is Op.INDEX and x.arg == "kv_idx":
                return True
            if x.op is Op.TENSOR and "n" in self.ranks.get(x.arg, ()):
                return True
        return False


def _unmask(n: Node, mk: Node | None) -> Node:
    """where(MK, x, fill) -> x: masking is applied once, where the backward sums over keys."""
    if mk is None:
        return n
    return E.bottom_up(n, lambda x: x.src[1] if x.op is Op.WHERE and x.src[0] == mk else None)


def _plain_div(n: Node) -> Node:
    """x /? d -> x / d, for algebra: where d == 0 the row is empty and every use is masked or guarded."""
    return E.bottom_up(n, lambda x: E.make(Op.DIV, x.src[0], x.src[1]) if x.op is Op.DIVZ else None)


def _guard_div(n: Node) -> Node:
    """x / d -> x /? d for every divisor that is not a nonzero constant: 0, never NaN, for an empty row."""
    def fix(x: Node) -> Node | None:
        d = x.src[1] if x.op is Op.DIV else None
        if d is None or (d.op is Op.CONST and d.arg != 0):
            return None
        return E.make(Op.DIVZ, x.src[0], d)
    return E.bottom_up(n, fix)


def _ratio(num: Node, den: Node, b: _Builder) -> Node | None:
    """num / den simplified, when it is free of the key rank; else None."""
    if num.op is Op.CONST and num.arg == 0:
        return E.ZERO
    m = SymMap()
    x, y = m.to(_plain_div(num)), m.to(_plain_div(den))
    if y == 0:
        return None
    # the plainest form first: simplify() may trade exp(s - M) / D for exp(M) / (D exp(M)), which overflows
    for r in (sympy.powsimp(x / y, force=True), None):
        r = sympy.simplify(sympy.powsimp(x / y, force=True)) if r is None else r
        if not any(b.tile_level(m.to_node[s]) for s in r.free_symbols):
            return canonical(_guard_div(m.back(r, E.FLOAT)))
    return None


def _is_zero(n: Node) -> bool:
    m = SymMap()
    return sympy.simplify(m.to(_plain_div(n))) == 0


def _float_loads(n: Node, params: dict) -> list[Node]:
    out = []
    for x in n.walk():
        if x.op is Op.LOAD and params[x.arg].kind == "float" and x not in out:
            out.append(x)
    return out


def autodiff(fwd: Cascade, lse_grad: bool = False) -> Cascade:
    """The backward cascade of `fwd`: dQ, dK, dV and the gradients of float params."""
    v = fwd.variant
    qk, score, mask, out = fwd.role("qk"), fwd.role("score"), fwd.role("mask"), fwd.role("output")
    stats = fwd.roles("stat")
    lse = fwd.role("lse") if lse_grad else None
    b = _Builder(fwd)
    mk = tensor(mask.name, BOOL) if mask is not None else None
    S = tensor(score.name)
    V, Qn, Kn = (fwd.input(r).name for r in ("v", "q", "k"))

    def keep(x: Node, fill: Node = E.ZERO) -> Node:
        return x if mk is None else E.where(mk, x, fill)

    w0 = _unmask(weight_of(fwd), mk)
    stat_body = {s.name: _unmask(s.body, mk) for s in stats}
    stat_read = {s.name: tensor(s.name) for s in stats}

    # -- the forward's tile computation, recomputed per tile --
    if qk is not None:          # a score that does not read q.k (simplified away) passes q and k no gradient
        b.add(qk.name, qk.ranks, qk.body, "qk", qk.reduce, qk.over)
    b.add(score.name, score.ranks, score.body, "score")
    if mask is not None:
        b.add(mask.name, mask.ranks, mask.body, "mask")
    P = b.add("P", ("b", "h", "m", "n"), keep(w0), "weight")
    DP = b.add("DP", ("b", "h", "m", "n"), E.make(Op.MUL, tensor("dO"), tensor(V)), "dp", "+", ("f",))
    delta: list[Node] = []

    def Delta() -> Node:
        if not delta:
            delta.append(b.add("DELTA", ROW, E.make(Op.MUL, tensor("dO"), tensor("O")), "delta", "+", ("f",)))
        return delta[0]

    # -- derivatives of the weight, each statistic's body, and the lse, by every leaf they read --
    params = v.params
    row_leaves = list(stat_read.values())
    loads = []
    for e in [w0, *stat_body.values()] + ([lse.body] if lse is not None else []):
        loads += [x for x in _float_loads(e, params) if x not in loads]
    row_loads = [x for x in loads if not b.tile_level(x)]
    row_leaves += row_loads
    dw = gradients(w0, [S] + row_leaves + loads)
    dh = {s.name: gradients(stat_body[s.name], [S] + row_leaves + loads) for s in stats}
    dl = gradients(lse.body, row_leaves + loads) if lse is not None else {}

    def key_sum(d: Node, like: Node, total, what: str, dp: bool = False) -> Node:
        """sum over kept keys of d (times dP when dp), in closed form when d = r * like with r free of the
        key: then it is r * total(), where total() is the sum of like (times dP)."""
        r = _ratio(d, like, b)
        if r is not None:
            return E.ZERO if r == E.ZERO else r * total()
        term = DP * d if dp else d
        name = b.fresh("R")
        b.notes.append(f"{name}: {what} has no closed form: one more pass over the keys")
        return b.add(name, ROW, keep(term), "rowgrad", "+", ("n",))

    # -- row adjoints, the last statistic first --
    G: dict = {}                          # stat name or row-level load -> its adjoint's tensor
    inline: dict[Node, Node] = {}         # adjoint tensor -> its expression, for the test that one cancels
    argmax: dict[str, Node] = {}
    first_max = next((s for s in stats if s.reduce == "max"), None)
    for x in list(reversed(list(stat_read.values()))) + row_loads:
        name = x.arg if x.op is Op.TENSOR else f"{x.arg}[...]"
        g = key_sum(dw[x], w0, Delta, f"the weights' derivative by {name}", dp=True)
        for s in stats:
            d = dh[s.name].get(x, E.ZERO)
            if s.name not in G or G[s.name] == E.ZERO or (d.op is Op.CONST and d.arg == 0):
                continue
            if s.reduce == "+":
                g = g + G[s.name] * key_sum(d, stat_body[s.name], lambda: stat_read[s.name], f"d{s.name}/d{name}")
            else:
                g = g + G[s.name] * _at_argmax(b, argmax, s, d, keep)
        if x in dl:
            g = g + tensor("dLSE") * dl[x]
        g = canonical(_guard_div(g))
        if x.op is Op.TENSOR and _is_zero(E.substitute(g, inline)):
            if fwd.get(x.arg).reduce == "max":
                b.notes.append(f"{x.arg}: the weights are invariant to this rowmax: no gradient flows through it")
            G[x.arg] = E.ZERO
            continue
        if x.op is Op.TENSOR and fwd.get(x.arg).reduce == "max":
            b.notes.append(f"{x.arg}: a rowmax the weights depend on: its gradient goes to the first key "
                           f"holding the maximum (autograd of torch.amax splits it among ties)")
        guarded = g
        if first_max is not None:             # a row that kept nothing: its max is -inf and its adjoint 0
            guarded = E.where(E.make(Op.EQ, stat_read[first_max.name], E.NEG_INF), E.ZERO, g)
        key = x.arg if x.op is Op.TENSOR else x
        G[key] = b.add(b.fresh("G"), ROW, guarded, "rowgrad")
        inline[G[key]] = E.substitute(g, inline)

    # -- dL/dS per pair, then by the scaled logit --
    ds = DP * dw[S]
    for s in stats:
        g = G.get(s.name, E.ZERO)
        d = dh[s.name][S]
        if g == E.ZERO or (d.op is Op.CONST and d.arg == 0):
            continue
        if s.reduce == "+":
            ds = ds + g * d
        else:
            ds = ds + g * E.where(E.make(Op.EQ, E.index("kv_idx"), _argmax(b, argmax, s, keep)), d, E.ZERO)
    DS = b.add("DS", ("b", "h", "m", "n"), keep(_guard_div(ds)), "ds")
    dsdx = canonical(gradients(score.body, [tensor(qk.name)])[tensor(qk.name)] / SCALE) if qk is not None else None
    if dsdx is not None and dsdx.op is Op.CONST and dsdx.arg == 0:
        b.notes.append("the score's derivative by q.k is 0 (floor, sign): dQ and dK are 0")
        qk = None
    if qk is not None:
        DQK = b.add("DQK", ("b", "h", "m", "n"), DS * dsdx, "dqk")
        b.add("DQ", ("b", "h", "m", "e"), DQK * tensor(Kn) * SCALE, "dq", "+", ("n",))
        b.add("DK", ("b", "h", "n", "e"), DQK * tensor(Qn) * SCALE, "dk", "+", ("m",),
              note="and over the query heads of a kv head")
    elif dsdx is None:
        b.notes.append("the score does not read q.k: dQ and dK are 0")
    b.add("DV", ("b", "h", "n", "f"), P * tensor("dO"), "dv", "+", ("m",), note="and over the query heads of a kv head")

    # -- float params: every read's gradient, scattered to its index --
    outputs = ["DQ", "DK", "DV"] if qk is not None else ["DV"]
    dscore = gradients(score.body, _float_loads(score.body, params))
    grads = []
    for x in loads + [x for x in dscore if x not in loads]:
        tile = DS * dscore[x] if x in dscore else E.ZERO
        if x not in row_loads and x in dw:
            part = DP * dw[x]
            for s in stats:
                if s.name in G and G[s.name] != E.ZERO and x in dh[s.name]:
                    part = part + G[s.name] * dh[s.name][x] if s.reduce == "+" else \
                        part + G[s.name] * E.where(E.make(Op.EQ, E.index("kv_idx"), _argmax(b, argmax, s, keep)),
                                                   dh[s.name][x], E.ZERO)
            tile = tile + keep(_guard_div(part))
        grads.append((x, tile, ("b", "h", "m", "n")))
        if x in row_loads and x in G and G[x] != E.ZERO:
            grads.append((x, G[x], ROW))
    for i, (x, body, ranks) in enumerate(grads):
        if body.op is Op.CONST and body.arg == 0:
            continue
        name = f"d_{x.arg}" if f"d_{x.arg}" not in outputs else f"d_{x.arg}_{i}"
        outputs.append(name)
        b.add(name, (), body, "dparam", "+", ranks, param=(x.arg, x.src), note=f"scattered to {x.arg}'s index")

    inputs = fwd.inputs + (Tensor("dO", ("b", "h", "m", "f"), "dout"), Tensor("O", ("b", "h", "m", "f"), "saved"))
    inputs += tuple(Tensor(s.name, ROW, "saved") for s in stats)
    if lse is not None:
        inputs += (Tensor("dLSE", ROW, "dlse"),)
    return Cascade(tuple(b.stmts), tuple(outputs), v, {"notes": b.notes}, inputs, "backward")


def _argmax(b: _Builder, argmax: dict, s: Einsum, keep) -> Node:
    """The key index where the rowmax `s` is attained (recomputed: the first key holding it)."""
    if s.name not in argmax:          # s.body is where(MK, g, -inf): masked keys never hold the maximum
        argmax[s.name] = b.add(f"A_{s.name}", ROW, s.body, "rowgrad", "argmax", ("n",))
    return argmax[s.name]


def _at_argmax(b: _Builder, argmax: dict, s: Einsum, d: Node, keep) -> Node:
    """d evaluated at the key holding the rowmax s: a sum over keys picking that one."""
    a = _argmax(b, argmax, s, keep)
    name = b.fresh("R")
    return b.add(name, ROW, keep(E.where(E.make(Op.EQ, E.index("kv_idx"), a), d, E.ZERO)), "rowgrad", "+", ("n",))

