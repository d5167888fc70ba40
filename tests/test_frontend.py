"""The .attn frontend: parsing, name resolution, imports, consts, normalizer sugar, and the Variant it builds."""
from __future__ import annotations

import math

import pytest
import torch

import attnc
from attnc.frontend.parser import parse
from attnc.frontend.resolve import load
from attnc.ir import expr as E
from attnc.ir.expr import Op
from attnc.ir.printer import expr_text
from attnc.runtime.reference import evaluate

try:
    from helpers import EXAMPLES, example
except ImportError:
    from tests.helpers import EXAMPLES, example


def value(text: str, score: float = 0.0, **idx) -> float:
    """The score expression of a one-line spec, evaluated at a point."""
    v = load(f"variant t\nscore = {text}\n")
    env = {"score": torch.tensor(score, dtype=torch.float64), **{k: torch.tensor(x) for k, x in idx.items()}}
    return float(evaluate(v.score, env, {}))


# -- parsing --

def test_statements_in_order_with_kinds():
    stmts = parse('variant v\nconst w = 3\nparam p: f32[H, 4]\nimport "causal.attn" as c\nlet d = q_idx - kv_idx\n'
                  "mask = d >= 0\nscore = score\n")
    assert [(s.kind, s.name) for s in stmts] == [("variant", "v"), ("const", "w"), ("param", "p"), ("import", "c"),
                                                 ("let", "d"), ("assign", "mask"), ("assign", "score")]
    assert stmts[1].value == 3 and stmts[3].value == "causal.attn"
    dtype, dims, _ = stmts[2].value
    assert dtype == "f32" and [d for d, _ in dims] == ["H", 4]
    assert [s.loc.line for s in stmts] == [1, 2, 3, 4, 5, 6, 7]


@pytest.mark.parametrize("source", [
    "variant x\nmask = q_idx >= kv_idx",                                  # no final newline
    "variant x\r\nmask = q_idx >= kv_idx\r\n",                            # CRLF
    "\n\n# header\nvariant x   # trailing comment\n\n\n  \nmask = q_idx >= kv_idx\n\n",
    "variant x\n\tmask\t=\tq_idx >= kv_idx\n",
    "# only comments before\n#\nvariant x\nmask = (q_idx >= kv_idx)\n",
])
def test_layout_does_not_matter(source):
    v = load(source)
    assert v.name == "x" and v.mask == load("variant x\nmask = q_idx >= kv_idx\n").mask


def test_empty_spec_is_full_softmax_attention():
    v = load("")
    assert v.mask is None and v.score == E.SCORE and v.norm_kind == "softmax" and v.params == {}


@pytest.mark.parametrize("text, want", [
    ("-2 ** 2", -4.0), ("2 ** 3 ** 2", 512.0), ("10 - 4 - 3", 3.0), ("16 / 4 / 2", 2.0), ("7 // 2 * 2", 6.0),
    ("7 % 3 + 1", 2.0), ("-7 // 2", -4.0), ("-7 % 3", 2.0), ("2 + 3 * 4", 14.0), ("(2 + 3) * 4", 20.0),
    ("where(1 < 2, 1.5, 2.5)", 1.5), ("clamp(5.0, -1, 1)", 1.0), ("clamp(-5.0, -1, 1)", -1.0),
    ("min(3, 4) + max(3, 4)", 7.0), ("abs(-2.5)", 2.5), ("sign(-2.5)", -1.0), ("floor(2.5) + ceil(2.5)", 5.0),
    ("exp(0.0) + log(1.0) + exp2(3) + log2(8.0)", 12.0), ("sqrt(16.0) * rsqrt(4.0)", 2.0),
    ("relu(-1.0) + relu(2.0)", 2.0), ("sigmoid(0.0)", 0.5), ("softplus(0.0)", math.log(2)), ("tanh(0.0)", 0.0),
    ("1.5e2 + .5 + 2.", 152.5), ("+3", 3.0),
])
def test_arithmetic_follows_python(text, want):
    assert value(text) == pytest.approx(want, rel=1e-12)


def test_logic_precedence_follows_python():
    v = load("variant t\nmask = not q_idx >= kv_idx and kv_idx < 3 or q_idx == 0\n")
    for q in range(5):
        for kv in range(5):
            env = {"q_idx": torch.tensor(q), "kv_idx": torch.tensor(kv)}
            assert bool(evaluate(v.mask, env, {})) == ((not q >= kv and kv < 3) or q == 0)


def test_chained_comparisons_are_not_python_chains():
    with pytest.raises(attnc.SpecError):
        load("variant t\nmask = 0 <= q_idx < kv_idx\n")


# -- names and scope --

def test_score_rebinds_in_order():
    v = load("variant t\nscore = score + 1\nscore = score * 2\n")
    assert float(evaluate(v.score, {"score": torch.tensor(3.0, dtype=torch.float64)}, {})) == 8.0


def test_let_is_inlined_and_sees_earlier_names():
    v = load("variant t\nconst w = 4\nlet d = q_idx - kv_idx\nlet near = d < w\nmask = d >= 0 and near\n")
    assert v.mask == load("variant t\nmask = q_idx - kv_idx >= 0 and q_idx - kv_idx < 4\n").mask
    assert v.consts == {"w": 4}


def test_let_of_score_captures_the_score_at_that_point():
    v = load("variant t\nscore = score * 2\nlet s2 = score\nscore = score + 1\nnorm = map(s2 * 0 + score)\n")
    assert expr_text(v.score) == expr_text(load("variant t\nscore = score * 2 + 1\n").score)


def test_use_before_definition_is_an_error():
    with pytest.raises(attnc.SpecError, match="unknown name 'w'"):
        load("variant t\nmask = q_idx - kv_idx < w\nconst w = 4\n")


def test_sizes_and_indices_resolve():
    v = load("variant t\nscore = score + B + H + HKV + Q + KV + D + b + h + q_idx + kv_idx\n")
    used = {n.arg for n in v.score.walk() if n.op in (Op.SIZE, Op.INDEX)}
    assert used == {"B", "H", "HKV", "Q", "KV", "D", "b", "h", "q_idx", "kv_idx"}


def test_param_declarations():
    v = load("variant t\nparam a: f32[H]\nparam b2: i32[L]\nparam c: bool[4, KV]\nparam d: bf16[H, R]\n"
             "score = score + a[h] + d[h, kv_idx] + where(c[1, kv_idx], 0.0, 1.0) + b2[q_idx]\n")
    assert {n: (p.dtype, p.dims, p.kind) for n, p in v.params.items()} == {
        "a": ("f32", ("H",), "float"), "b2": ("i32", ("L",), "int"), "c": ("bool", (4, "KV"), "bool"),
        "d": ("bf16", ("H", "R"), "float")}
    loads = {n.arg: n.dtype for n in v.score.walk() if n.op is Op.LOAD}
    assert loads == {"a": "float", "d": "float", "c": "bool", "b2": "int"}


def test_nested_param_index():
    v = load("variant t\nparam doc: i32[L]\nparam off: f32[N]\nscore = score + off[doc[q_idx]]\n")
    outer = next(n for n in v.score.walk() if n.op is Op.LOAD and n.arg == "off")
    assert outer.src[0].op is Op.LOAD and outer.src[0].arg == "doc"


# -- normalizers --

@pytest.mark.parametrize("norm, kind", [
    ("softmax", "softmax"), ("sigmoid", "sigmoid"), ("relu", "relu"), ("linear", "linear"),
    ("map(exp(score))", "map"), ("rownorm(relu(score))", "rownorm"), ("softmax(sink = 0)", "softmax+sink"),
    ("exp(score - rowmax(score)) / rowsum(exp(score - rowmax(score)))", "general"),
])
def test_normalizer_kinds(norm, kind):
    assert load(f"variant t\nnorm = {norm}\n").norm_kind == kind


def test_named_softmax_is_sugar_for_the_general_form():
    general = load("variant t\nnorm = exp(score - rowmax(score)) / rowsum(exp(score - rowmax(score)))\n").norm
    assert general == load("variant t\nnorm = softmax\n").norm == load("").norm
    assert general.op is Op.DIVZ                   # dividing by a row sum: an empty row gives 0, not NaN


def test_rownorm_is_sugar():
    assert load("variant t\nnorm = rownorm(relu(score))\n").norm == \
        load("variant t\nnorm = relu(score) / rowsum(relu(score))\n").norm


def test_sink_joins_the_denominator():
    norm = load("variant t\nparam s: f32[H]\nnorm = softmax(sink = s[h])\n").norm
    den = norm.src[1]
    assert den.op is Op.ADD and any(n.op is Op.LOAD and n.arg == "s" for n in den.walk())


@pytest.mark.parametrize("bad", ["softmax(2)", "softmax(sink = 1, other = 2)", "map(score, score)", "rownorm()",
                                 "map(q_idx >= kv_idx)", "q_idx >= kv_idx", "softmax(sink = q_idx > 0)"])
def test_bad_normalizers(bad):
    with pytest.raises(attnc.SpecError):
        load(f"variant t\nnorm = {bad}\n")


# -- imports --

def test_imports_compose_mask_and_score():
    v = load(example("alibi_softcap"))
    alibi, softcap = load(example("alibi")), load(example("softcap"))
    assert v.mask == alibi.mask
    assert v.params == alibi.params
    # softcap applied to alibi's score
    assert v.score == E.substitute(softcap.score, {E.SCORE: alibi.score})


def test_import_order_of_score_matters(tmp_path):
    for f in ("alibi", "softcap"):
        (tmp_path / f"{f}.attn").write_text(open(example(f)).read())
    (tmp_path / "swapped.attn").write_text('import "alibi.attn" as a\nimport "softcap.attn" as s\n'
                                           "mask = a.mask\nscore = s.score\nscore = a.score\n")
    v = load(str(tmp_path / "swapped.attn"))
    assert v.score != load(example("alibi_softcap")).score


def test_import_consts_and_norm(tmp_path):
    (tmp_path / "base.attn").write_text("variant base\nconst w = 7\nmask = q_idx - kv_idx < w\nnorm = sigmoid\n")
    (tmp_path / "top.attn").write_text('variant top\nimport "base.attn" as base\n'
                                       "mask = base.mask and kv_idx < base.w * 2\nnorm = base.norm\n")
    v = load(str(tmp_path / "top.attn"))
    assert v.norm_kind == "sigmoid"
    env = {"q_idx": torch.arange(30).view(30, 1), "kv_idx": torch.arange(30).view(1, 30)}
    m = evaluate(v.mask, env, {})
    assert torch.equal(m, (env["q_idx"] - env["kv_idx"] < 7) & (env["kv_idx"] < 14))


def test_import_paths_are_relative_to_the_importing_file(tmp_path, monkeypatch):
    sub = tmp_path / "lib"
    sub.mkdir()
    (sub / "inner.attn").write_text("variant inner\nmask = q_idx >= kv_idx\n")
    (sub / "outer.attn").write_text('variant outer\nimport "inner.attn" as i\nmask = i.mask\n')
    monkeypatch.chdir(tmp_path)
    assert load("lib/outer.attn").mask == load("variant c\nmask = q_idx >= kv_idx\n").mask


def test_imported_params_merge():
    v = load(example("document"))
    assert set(v.params) == {"doc"} and v.mask is not None


def test_an_imported_param_declared_differently_is_an_error(tmp_path):
    (tmp_path / "a.attn").write_text("variant a\nparam p: f32[H]\nscore = score + p[h]\n")
    (tmp_path / "b.attn").write_text('variant b\nparam p: f32[KV]\nimport "a.attn" as a\nscore = a.score\n')
    with pytest.raises(attnc.SpecError, match="p"):
        load(str(tmp_path / "b.attn"))


def test_importing_a_missing_member(tmp_path, monkeypatch):
    (tmp_path / "a.attn").write_text("variant a\nscore = score * 2\n")
    monkeypatch.chdir(tmp_path)                 # spec text imports from the current directory
    with pytest.raises(attnc.SpecError, match="has no mask"):
        attnc.compile('variant b\nimport "a.attn" as a\nmask = a.mask\n')
    with pytest.raises(attnc.SpecError, match="no member"):
        attnc.compile('variant b\nimport "a.attn" as a\nscore = a.nothing\n')


# -- path or text, names, keys --

def test_path_or_text():
    assert load(example("causal")).file.endswith("causal.attn")
    assert load("variant c\nmask = q_idx >= kv_idx\n").file == "<string>"
    with pytest.raises(attnc.SpecError, match="nope.attn"):
        load("nope.attn")


def test_name_defaults_to_the_file_stem(tmp_path):
    (tmp_path / "my-variant 2.attn").write_text("mask = q_idx >= kv_idx\n")
    v = load(str(tmp_path / "my-variant 2.attn"))
    assert v.name.isidentifier() and "my" in v.name and "variant" in v.name
    (tmp_path / "3d.attn").write_text("mask = q_idx >= kv_idx\n")
    assert load(str(tmp_path / "3d.attn")).name.isidentifier()


def test_keys_follow_content():
    a, b = load(example("sliding_window")), load(example("sliding_window"))
    assert a.key() == b.key()
    assert load(example("sliding_window"), {"window": 512}).key() != a.key()
    assert load(example("causal")).key() != a.key()


def test_const_overrides_keep_the_type():
    assert load(example("sliding_window"), {"window": 512.0}).consts == {"window": 512}
    assert isinstance(load(example("softcap"), {"cap": 50}).consts["cap"], float)
    with pytest.raises(attnc.SpecError, match="whole number"):
        load(example("sliding_window"), {"window": 512.5})


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_every_example_names_itself_after_its_file(path):
    text = path.read_text()
    assert text.startswith("# "), "one header line naming the source"
    v = load(str(path))
    assert v.name == path.stem
