"""The pass pipeline: pass counts before and after each rewrite, verify() after every pass, simplify's algebra
and rank analysis, and LSE sharing softmax's statistics."""
from __future__ import annotations

import pytest

import attnc
from attnc.ir import expr as E
from attnc.ir.cascade import Einsum, tensor, verify
from attnc.ir.lower import lower
from attnc.passes import PASS_NAMES, PIPELINE, run_pipeline
from attnc.ir.cascade import IRError
from attnc.passes.pass_count import pass_count, pass_of
from attnc.passes.simplify import simplify

try:
    from helpers import EXAMPLE_IDS, example
except ImportError:
    from tests.helpers import EXAMPLE_IDS, example

SOFTMAX = ["full", "causal", "alibi", "alibi_softcap", "softcap", "sliding_window", "document", "t5_bias",
           "temperature", "sinks", "moa", "natten", "cog"]
ROWNORM = ["relu2", "softplus", "taylor"]


def variant(name_or_text: str):
    spec = example(name_or_text) if "\n" not in name_or_text else name_or_text
    return attnc.compile(spec).variant


def counts(v, lse: bool = False) -> dict[str, int]:
    trace: list = []
    run_pipeline(lower(v, lse), trace=trace)
    return {name: n for name, _, n in trace}


def test_pipeline_names_read_top_to_bottom():
    assert PASS_NAMES[0] == "lower"
    assert PASS_NAMES[1:] == [name for name, _ in PIPELINE]
    assert PASS_NAMES.index("simplify") < PASS_NAMES.index("defer_division") < PASS_NAMES.index("online")
    assert PASS_NAMES.index("online") < PASS_NAMES.index("schedule") < PASS_NAMES.index("block_sparsity")


@pytest.mark.parametrize("name", SOFTMAX)
def test_softmax_is_three_then_two_then_one_pass(name):
    c = counts(variant(name))
    assert (c["lower"], c["simplify"], c["defer_division"], c["online"]) == (3, 3, 2, 1)
    assert c["bounds"] == 1


def test_sigmoid_is_one_pass_from_the_start():
    c = counts(variant("sigmoid"))
    assert set(c.values()) == {1}


@pytest.mark.parametrize("name", ROWNORM)
def test_rownorm_is_one_pass_after_deferring_the_division(name):
    c = counts(variant(name))
    assert (c["lower"], c["defer_division"], c["online"], c["bounds"]) == (2, 1, 1, 1)


def test_hinge_stays_two_passes_and_says_why():
    trace: list = []
    out = run_pipeline(lower(variant("hinge")), trace=trace)
    assert [n for name, _, n in trace if name in ("online", "schedule", "block_sparsity", "bounds")] == [2, 2, 2, 2]
    notes = out.facts.get("notes", [])
    assert notes and any("pass" in n for n in notes), notes
    m = next(s for s in out.stmts if s.reduce == "max")
    assert not m.running                     # relu(x - max) cannot be rescaled: the max is complete first
    when = pass_of(out)
    assert when[m.name] == 1
    assert all(when[s.name] == 2 for s in out.stmts if s.running)
    (kernel,) = out.facts["kernels"]
    assert kernel.passes == 2


def test_ir_text_reports_the_pass_count():
    assert "1 pass over the keys" in attnc.compile(example("causal")).ir()
    assert "2 passes over the keys" in attnc.compile(example("hinge")).ir()
    staged = attnc.compile(example("causal")).ir(stages=True)
    assert "after lower: 3 passes" in staged and "after defer_division: 2 passes" in staged
    assert "after online: 1 pass" in staged


def test_stop_after_each_pass():
    v = variant("causal")
    for name in PASS_NAMES:
        trace: list = []
        run_pipeline(lower(v), stop_after=name, trace=trace)
        assert trace[-1][0] == name


@pytest.mark.parametrize("lse", [False, True], ids=["out", "out+lse"])
@pytest.mark.parametrize("name", EXAMPLE_IDS)
def test_verify_holds_after_every_pass(name, lse):
    trace: list = []
    out = run_pipeline(lower(variant(name), lse), trace=trace)
    assert [t[0] for t in trace] == PASS_NAMES
    for _, c, n in trace:
        verify(c)
        assert n == pass_count(c) >= 1
        assert set(c.outputs) == ({"O", "LSE"} if lse else {"O"})
    assert pass_count(out) == (2 if name == "hinge" else 1)


def test_verify_rejects_broken_cascades():
    c = lower(variant("causal"))
    stmts = list(c.stmts)
    with pytest.raises(IRError, match="twice"):
        verify(c.replace(stmts=tuple(stmts + [stmts[1]])))
    with pytest.raises(IRError, match="before"):
        verify(c.replace(stmts=tuple(stmts[:1] + stmts[2:] + stmts[1:2])))
    with pytest.raises(IRError, match="never defined"):
        verify(c.replace(outputs=("O", "LSE")))
    with pytest.raises(IRError, match="keeps a rank"):
        verify(c.replace(stmts=tuple(s.replace(ranks=s.ranks + ("n",)) if s.name == "L1" else s for s in stmts)))
    with pytest.raises(IRError, match="frontend node"):
        verify(c.replace(stmts=tuple(s.replace(body=E.SCORE) if s.name == "S" else s for s in stmts)))


# -- simplify --

def test_simplify_merges_a_duplicate_statement():
    c = lower(variant("causal"))
    stmts = list(c.stmts)
    i = [s.name for s in stmts].index("L1")
    dup = stmts[i].replace(name="L9")                       # the same row sum under another name
    p = stmts[i + 1]
    assert p.name == "P"
    p = p.replace(body=E.substitute(p.body, {tensor("L1"): tensor("L9")}))
    c = c.replace(stmts=tuple(stmts[:i + 1] + [dup, p] + stmts[i + 2:]))
    verify(c)
    out = simplify(c)
    verify(out)
    names = [s.name for s in out.stmts]
    assert "L9" not in names and names.count("L1") == 1
    assert "L1" in out.get("P").reads()
    assert len(out.stmts) == len(c.stmts) - 1


def test_simplify_drops_copies_and_unused_statements():
    c = lower(variant("causal"))
    stmts = list(c.stmts)
    i = [s.name for s in stmts].index("S")
    copy = Einsum("S2", ("b", "h", "m", "n"), tensor("S"))
    unused = Einsum("X", ("b", "h", "m"), E.make(E.Op.EXP, tensor("S")), "max", ("n",))
    rest = [s.replace(body=E.substitute(s.body, {tensor("S"): tensor("S2")})) for s in stmts[i + 1:]]
    c = c.replace(stmts=tuple(stmts[:i + 1] + [copy, unused] + rest))
    verify(c)
    out = simplify(c)
    verify(out)
    assert {s.name for s in out.stmts} == {s.name for s in stmts}
    assert "S" in out.get("M1").reads()


def test_simplify_folds_constants():
    v = variant("variant f\nconst a = 3\nscore = score + a * 2 - 6\nmask = q_idx >= kv_idx and 1 < 2\n")
    out = simplify(lower(v))
    assert out.get("S").body == simplify(lower(variant("full"))).get("S").body     # + 6 - 6 is gone
    causal = variant("variant c\nmask = q_idx >= kv_idx\n")
    assert out.get("MK").body == simplify(lower(causal)).get("MK").body                  # `and True` is gone


def test_simplify_removes_a_mask_that_is_always_true():
    v = variant("variant t\nmask = q_idx >= 0 or 1 < 2\n")
    out = simplify(lower(v))
    assert "MK" not in [s.name for s in out.stmts]
    assert pass_count(run_pipeline(lower(v))) == 1


@pytest.mark.parametrize("name, ranks", [
    ("causal", ("m", "n")),
    ("sliding_window", ("m", "n")),
    ("document", ("m", "n")),          # doc[q_idx] == doc[kv_idx]: shared by every batch and head
    ("moa", ("h", "m", "n")),          # widths[h]: one mask per head
])
def test_simplify_cuts_the_mask_to_the_ranks_it_uses(name, ranks):
    assert lower(variant(name)).get("MK").ranks == ("b", "h", "m", "n")
    assert simplify(lower(variant(name))).get("MK").ranks == ranks


def test_ranks_of_the_other_statements():
    c = simplify(lower(variant("alibi")))
    assert c.get("S").ranks == ("b", "h", "m", "n")
    assert c.get("M1").ranks == ("b", "h", "m") and c.get("O").ranks == ("b", "h", "m", "f")
    c = simplify(lower(variant("variant p\nmask = kv_idx < 5\n")))
    assert c.get("MK").ranks == ("n",)


# -- lse --

@pytest.mark.parametrize("name", [n for n in SOFTMAX if n != "cog"])     # cog's softmax is over |score|
def test_lse_reuses_softmax_statistics(name):
    v = variant(name)
    plain, with_lse = run_pipeline(lower(v)), run_pipeline(lower(v, lse=True))
    extra = [s for s in with_lse.stmts if s.name not in {x.name for x in plain.stmts}]
    assert [s.name for s in extra] == ["LSE"]
    lse = with_lse.get("LSE")
    assert lse.reduce is None
    assert set(lse.reads()) <= {s.name for s in plain.stmts if s.reduce and s.over == ("n",)}
    assert pass_count(with_lse) == pass_count(plain) == 1


@pytest.mark.parametrize("name", ["sigmoid", "cog"])
def test_lse_of_a_variant_without_softmax_of_score_adds_its_own_statistics(name):
    v = variant(name)
    plain, with_lse = run_pipeline(lower(v)), run_pipeline(lower(v, lse=True))
    assert len([s for s in with_lse.stmts if s.reduce and s.over == ("n",)]) == \
        len([s for s in plain.stmts if s.reduce and s.over == ("n",)]) + 2      # a running max and a running sum
    assert pass_count(with_lse) == 1


# -- online and defer_division, alone --

def test_defer_division_moves_the_row_sum_after_the_key_sum():
    from attnc.passes.defer_division import defer_division
    c = defer_division(simplify(lower(variant("causal"))))
    verify(c)
    assert "P" not in [s.name for s in c.stmts]
    u, o = c.get("U"), c.get("O")
    assert u.reduce == "+" and u.over == ("n",) and "V" in u.reads()
    assert o.reduce is None and set(o.reads()) == {"U", "L1"}


def test_online_rescales_every_sum_by_the_running_max():
    c = run_pipeline(lower(variant("causal")), stop_after="online")
    m, l, u = c.get("M1"), c.get("L1"), c.get("U")
    assert m.running and l.running and u.running
    assert l.rescale == (("M1", 1.0),) and u.rescale == (("M1", 1.0),)


def test_schedule_records_the_kernels_and_their_block_sizes():
    c = run_pipeline(lower(variant("causal")), stop_after="schedule")
    assert c.facts["block_m"] > 0 and c.facts["block_n"] > 0
    (kernel,) = c.facts["kernels"]
    assert (kernel.kind, kernel.parallel, kernel.passes) == ("forward", "m", 1)
    assert {"M1", "L1", "U", "O"} <= set(kernel.stmts) and kernel.stores == ("O",)
    assert any("tiles" in line for line in c.facts["schedule"])


def test_simplify_folds_functions_of_constants():
    v = variant("variant f\nscore = score + relu(-0.5) + sigmoid(0.0) + max(1, 2) + sqrt(4.0) + floor(1.5)\n")
    s = simplify(lower(v)).get("S").body
    assert not any(n.op in (E.Op.RELU, E.Op.SIGMOID, E.Op.MAX, E.Op.SQRT, E.Op.FLOOR) for n in s.walk())
    assert s == simplify(lower(variant("variant f\nscore = score + 5.5\n"))).get("S").body


def test_simplify_keeps_the_score_statement_even_when_constant_or_unread():
    for text in ["variant c\nscore = 0.0\n", "variant c\nnorm = map(0.5)\n",
                 "variant c\nnorm = rownorm(exp(0.1 * q_idx))\n"]:
        out = run_pipeline(lower(variant(text)))
        assert "S" in [s.name for s in out.stmts], text


def test_defer_division_leaves_the_score_alone_when_it_is_the_weight():
    # norm = linear: O = S * V. The scale inside S belongs to the score hook, not to the epilogue
    out = run_pipeline(lower(variant("variant l\nnorm = linear\n")))
    for s in out.stmts:
        if s.name != "S":
            assert not s.body.uses(E.Op.SIZE, "scale"), s
    assert set(out.get("U").reads()) == {"S", "V"}
