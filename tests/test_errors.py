"""Bad specs get one SpecError with file:line:col, the line, a caret and what was expected; bad calls get a
CallError that names the argument."""
from __future__ import annotations

import re

import pytest
import torch

import attnc
from attnc import CallError, SpecError

try:
    from helpers import example, qkv
except ImportError:
    from tests.helpers import example, qkv

LEAKS = ("lark", "sympy", "jinja", "Traceback")


def spec_error(source: str, file=None, **consts) -> SpecError:
    with pytest.raises(SpecError) as info:
        attnc.compile(file if file is not None else source, **consts)
    return info.value


def assert_pointed(e: SpecError, line: int, col: int | None = None, snippet: str | None = None,
                   file: str = "<string>", expected: str | None = None):
    """The message opens with file:line:col, shows the line, puts a caret under the column, says what was expected."""
    text = str(e)
    for word in LEAKS:
        assert word.lower() not in text.lower(), f"{word!r} leaks into the message:\n{text}"
    lines = text.splitlines()
    m = re.match(r"(.+):(\d+):(\d+): ", lines[0])
    assert m, f"no file:line:col in {lines[0]!r}"
    assert m.group(1) == file and int(m.group(2)) == line, lines[0]
    got_col = int(m.group(3))
    if col is not None:
        assert got_col == col, lines[0]
    shown, caret = lines[1], lines[2]
    assert caret.strip() == "^", caret
    assert len(caret) - 1 == len("    ") + got_col - 1, "the caret sits under the column"
    if snippet is not None:
        assert snippet in shown
        assert shown[caret.index("^"):].startswith(snippet), f"caret not under {snippet!r}:\n{shown}\n{caret}"
    exp = [x for x in lines if x.startswith("expected: ")]
    assert len(exp) == 1 and len(exp[0]) > len("expected: "), f"no 'expected' line:\n{text}"
    if expected is not None:
        assert expected in exp[0], exp[0]


# -- syntax --

@pytest.mark.parametrize("source, line, col, expected", [
    ("variant x\nmask = q_idx >= \n", 2, None, "a name"),                     # a comparison with no right side
    ("variant x\nscore = score +* 2\n", 2, 16, "a number"),                  # two operators
    ("variant x\nparam p f32[H]\n", 2, 9, "':'"),                            # missing colon
    ("variant x\nmask = (q_idx >= kv_idx\n", 2, None, "')'"),                # unclosed parenthesis
    ("variant x\nscore = score $ 2\n", 2, 15, None),                         # a character the language lacks
    ("variant 3x\n", 1, 9, "a name"),                                        # a name cannot start with a digit
    ("variant x\nscore = tanh(score\n", 2, None, None),                      # unclosed call
    ("variant x\n\n\nconst = 3\n", 4, 7, "a name"),                          # const without a name
])
def test_syntax_errors_point_at_the_place(source, line, col, expected):
    assert_pointed(spec_error(source), line, col, expected=expected)


def test_syntax_error_in_a_file_names_the_file(tmp_path):
    path = tmp_path / "broken.attn"
    path.write_text("variant broken\n# a comment\nmask = q_idx >= kv_idx and\n")
    e = spec_error("", file=str(path))
    assert_pointed(e, 3, file=str(path))


def test_syntax_error_inside_an_import_names_the_imported_file(tmp_path):
    (tmp_path / "inner.attn").write_text("variant inner\nmask = q_idx >=> kv_idx\n")
    (tmp_path / "outer.attn").write_text('variant outer\nimport "inner.attn" as inner\nmask = inner.mask\n')
    e = spec_error("", file=str(tmp_path / "outer.attn"))
    assert_pointed(e, 2, 16, ">", file=str((tmp_path / "inner.attn").resolve()))


# -- names and types --

@pytest.mark.parametrize("source, line, col, snippet, words", [
    ("variant x\nscore = score + foo\n", 2, 17, "foo", "unknown name 'foo'"),
    ("variant x\nmask = score > 0\n", 2, 8, "score", "score cannot be used in a mask"),
    ("variant x\nlet s2 = score * 2\nmask = s2 > 0\n", 3, 8, "s2", "score"),
    ("variant x\nscore = tanh(score, 2)\n", 2, 9, "tanh", "takes 1 argument"),
    ("variant x\nscore = where(score > 0, score)\n", 2, 9, "where", "takes 3 arguments"),
    ("variant x\nscore = max(score)\n", 2, 9, "max", "takes 2 arguments"),
    ("variant x\nscore = score + bias[h]\n", 2, 17, "bias", "not a declared param"),
    ("variant x\nparam bias: f32[H]\nscore = score + bias[h, q_idx]\n", 3, 17, "bias", "indexed with 2"),
    ("variant x\nparam bias: f32[H, KV]\nscore = score + bias[h]\n", 3, 17, "bias", "indexed with 1"),
    ("variant x\nparam bias: f32[H]\nscore = score + bias[h / 2]\n", 3, 22, "h / 2", "must be an integer"),
    ("variant x\nparam bias: f32[H]\nscore = score + bias[score]\n", 3, 22, "score", "must be an integer"),
    ("variant x\nparam bias: f32[H]\nscore = score + bias\n", 3, 17, "bias", "must be indexed"),
    ("variant x\nmask = q_idx - kv_idx\n", 2, 8, "q_idx", "mask must be a boolean"),
    ("variant x\nscore = q_idx >= kv_idx\n", 2, None, None, "score must be a number"),
    ("variant x\nconst a = 1\nconst a = 2\n", 3, 1, "const a", "already defined"),
    ("variant x\nconst a = 1\nlet a = q_idx\n", 3, 1, "let a", "already defined"),
    ("variant x\nparam a: f32[H]\nconst a = 2\n", 3, 1, "const a", "already defined"),
    ("variant x\nlet q_idx = 3\n", 2, 1, "let", "reserved"),
    ("variant x\nscore = score - rowmax(score)\n", 2, 17, "rowmax", "only allowed in norm"),
    ("variant x\nmask = rowsum(q_idx) > 0\n", 2, 8, "rowsum", "only allowed in norm"),
    ("variant x\nparam p: f33[H]\nscore = score + p[h]\n", 2, 10, "f33", "unknown dtype"),
    ("variant x\nfoo = q_idx\n", 2, 1, "foo", "cannot assign to 'foo'"),
    ("variant x\nmask = q_idx >= kv_idx\nmask = q_idx >= 0\n", 3, 1, "mask", "assigned twice"),
    ("variant x\nnorm = softmax\nnorm = sigmoid\n", 3, 1, "norm", "assigned twice"),
    ("variant x\nmask = q_idx >= kv_idx and 1\n", 2, None, None, "needs booleans"),
    ("variant x\nscore = score + (q_idx >= 3)\n", 2, None, None, "needs numbers"),
    ("variant x\nscore = score % 2\n", 2, None, None, "needs integers"),
    ("variant x\nscore = frobnicate(score)\n", 2, 9, "frobnicate", "unknown function"),
    ("variant x\nmask = causal.mask\n", 2, 8, "causal", "not an imported variant"),
    ("variant x\nnorm = softmax(sink = score)\n", 2, None, None, "score cannot be used in a sink"),
    ("variant x\nnorm = rownorm(score, score)\n", 2, 8, "rownorm", "exactly one argument"),
    ("variant x\nparam p: f32[]\n", 2, 1, "param", "no dimensions"),
    ("variant x\nparam p: f32[q_idx]\n", 2, 14, "q_idx", "cannot be a dimension"),
])
def test_name_and_type_errors_point_at_the_place(source, line, col, snippet, words):
    e = spec_error(source)
    assert words in e.message, e.message
    assert_pointed(e, line, col, snippet)


def test_missing_import_file_says_which(tmp_path):
    path = tmp_path / "main.attn"
    path.write_text('variant main\nimport "nowhere.attn" as nowhere\nmask = nowhere.mask\n')
    e = spec_error("", file=str(path))
    assert "nowhere.attn" in e.message
    assert_pointed(e, 2, 1, 'import "nowhere.attn"', file=str(path))


def test_import_of_a_non_attn_path(tmp_path):
    e = spec_error('variant x\nimport "causal.py" as c\n')
    assert_pointed(e, 2, 1, "import")


def test_missing_top_level_file_is_a_spec_error(tmp_path):
    e = spec_error("", file=str(tmp_path / "absent.attn"))
    assert "absent.attn" in str(e)
    for word in LEAKS:
        assert word.lower() not in str(e).lower()


def test_cyclic_imports_between_two_files(tmp_path):
    (tmp_path / "a.attn").write_text('variant va\nimport "b.attn" as fb\nmask = fb.mask\n')
    (tmp_path / "b.attn").write_text('variant vb\nimport "a.attn" as fa\nmask = q_idx >= kv_idx\n')
    e = spec_error("", file=str(tmp_path / "a.attn"))
    assert "cycle" in e.message and "a.attn" in e.message and "b.attn" in e.message
    assert_pointed(e, 2, 1, 'import "a.attn"', file=str((tmp_path / "b.attn").resolve()))


def test_a_file_that_imports_itself(tmp_path):
    (tmp_path / "self.attn").write_text('variant me\nimport "self.attn" as me_again\nmask = q_idx >= kv_idx\n')
    e = spec_error("", file=str(tmp_path / "self.attn"))
    assert "cycle" in e.message
    assert_pointed(e, 2, 1, "import", file=str(tmp_path / "self.attn"))


def test_diamond_imports_are_not_a_cycle(tmp_path):
    (tmp_path / "base.attn").write_text("variant base\nmask = q_idx >= kv_idx\n")
    (tmp_path / "left.attn").write_text('variant left\nimport "base.attn" as base\nmask = base.mask\n')
    (tmp_path / "right.attn").write_text('variant right\nimport "base.attn" as base\nmask = base.mask\n')
    (tmp_path / "top.attn").write_text('variant top\nimport "left.attn" as l\nimport "right.attn" as r\n'
                                       "mask = l.mask and r.mask\n")
    attn = attnc.compile(str(tmp_path / "top.attn"))
    assert attn.variant.mask is not None


# -- const overrides --

def test_override_of_an_unknown_const():
    with pytest.raises(SpecError) as info:
        attnc.compile(example("sliding_window"), windw=512)
    assert "windw" in str(info.value) and "window" in str(info.value)


def test_override_of_a_variant_without_consts():
    with pytest.raises(SpecError, match="window"):
        attnc.compile(example("causal"), window=512)


@pytest.mark.parametrize("value", ["512", None, True, 2.5, float("nan")])
def test_override_with_a_value_that_is_not_a_whole_number(value):
    with pytest.raises(SpecError, match="window"):
        attnc.compile(example("sliding_window"), window=value)


def test_errors_from_a_spec_never_leak_internals():
    sources = ["variant", "variant x\n)\n", "variant x\nscore = score[", 'import "', "param x: f32[1.5]",
               "variant x\nnorm = softmax(temperature = 2)\n", "\x00", "variant x\nmask = q_idx.mask\n"]
    for s in sources:
        e = spec_error(s)
        for word in LEAKS:
            assert word.lower() not in str(e).lower(), (s, str(e))


# -- call-time errors --

@pytest.fixture(scope="module")
def alibi():
    return attnc.compile(example("alibi"))


def call_error(fn) -> str:
    with pytest.raises(CallError) as info:
        fn()
    return str(info.value)


def test_q_of_the_wrong_rank(alibi):
    q, k, v = qkv(1, 4, 2, 8, 8, 16)
    msg = call_error(lambda: alibi(q[0], k, v, slopes=torch.rand(4)))
    assert "q" in msg.split()[0] and "4 dimensions" in msg


def test_heads_not_divisible(alibi):
    q, k, v = qkv(1, 3, 2, 8, 8, 16)
    msg = call_error(lambda: alibi(q, k, v, slopes=torch.rand(3)))
    assert "heads" in msg and "3" in msg and "2" in msg


def test_mismatched_head_dim(alibi):
    q, _, v = qkv(1, 4, 2, 8, 8, 16)
    k = torch.randn(1, 2, 8, 8)
    msg = call_error(lambda: alibi(q, k, v, slopes=torch.rand(4)))
    assert "k" in msg and "head_dim" in msg and "16" in msg and "8" in msg


def test_missing_param(alibi):
    q, k, v = qkv(1, 4, 2, 8, 8, 16)
    msg = call_error(lambda: alibi(q, k, v))
    assert "slopes" in msg and "f32[H]" in msg


@pytest.mark.parametrize("bad, words", [
    (torch.rand(3), ("slopes", "size", "H")),
    (torch.rand(4, 1), ("slopes", "dimension")),
    (torch.arange(4), ("slopes", "dtype", "int64")),
    ([0.1, 0.2, 0.3, 0.4], ("slopes", "tensor")),
])
def test_param_of_the_wrong_shape_or_dtype(alibi, bad, words):
    q, k, v = qkv(1, 4, 2, 8, 8, 16)
    msg = call_error(lambda: alibi(q, k, v, slopes=bad))
    for w in words:
        assert w in msg, msg


def test_int_param_given_floats():
    moa = attnc.compile(example("moa"))
    q, k, v = qkv(1, 4, 2, 8, 8, 16)
    msg = call_error(lambda: moa(q, k, v, widths=torch.rand(4)))
    assert "widths" in msg and "int" in msg


def test_unexpected_keyword(alibi):
    q, k, v = qkv(1, 4, 2, 8, 8, 16)
    msg = call_error(lambda: alibi(q, k, v, slopes=torch.rand(4), slpoes=torch.rand(4)))
    assert "slpoes" in msg and "slopes" in msg


def test_mixed_dtypes_and_batches(alibi):
    q, k, v = qkv(1, 4, 2, 8, 8, 16)
    assert "dtype" in call_error(lambda: alibi(q, k.double(), v, slopes=torch.rand(4)))
    assert "batch" in call_error(lambda: alibi(q, k.expand(2, -1, -1, -1), v, slopes=torch.rand(4)))
    assert "v" in call_error(lambda: alibi(q, k, v[:, :, :5], slopes=torch.rand(4)))


def test_call_errors_are_value_errors(alibi):
    q, k, v = qkv(1, 4, 2, 8, 8, 16)
    with pytest.raises(ValueError):
        alibi(q, k, v)
