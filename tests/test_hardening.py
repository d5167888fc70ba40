"""Hostile specs: each either compiles and computes what the float64 reference computes, or fails with a
SpecError (or, at call time, a CallError) that points at the cause. Never a crash, a hang, a read out of
bounds or a wrong number.

The limits and rules under test: an expression (lets, score rebinding and imports inlined) is at most
MAX_DEPTH levels deep and MAX_NODES operations long; integer constants and every integer an index computes
lie in int32; a constant expression folds to a value or is refused; an integer divisor is never 0; imports
stay inside the importing file's folder tree and errors never quote a file that is not a spec."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import attnc
from attnc import CallError, SpecError
from attnc.ir import expr as E

try:
    from helpers import generator, qkv
except ImportError:
    from tests.helpers import generator, qkv

ROOT = Path(__file__).resolve().parent.parent
LIMIT = E.MAX_DEPTH


def spec_error(source: str, **consts) -> SpecError:
    with pytest.raises(SpecError) as info:
        attnc.compile(source, **consts)
    return info.value


def where(e: SpecError) -> tuple[int, int]:
    m = re.match(r".*?:(\d+):(\d+): ", str(e).splitlines()[0])
    assert m, str(e)
    return int(m.group(1)), int(m.group(2))


def as64(params: dict) -> dict:
    return {n: t.double() if t.is_floating_point() else t for n, t in params.items()}


def matches_reference(attn, shape=(2, 2, 1, 5, 7, 4), params=None, seed=0):
    """attn on the torch backend in float64 against the float64 reference, on random inputs."""
    B, H, HKV, Q, KV, D = shape
    q, k, v = qkv(B, H, HKV, Q, KV, D, dtype=torch.float64, seed=seed)
    if params is None:
        from attnc.runtime.inputs import random_params
        params = random_params(attn, B, H, HKV, Q, KV, D, generator(seed + 1))
    got, got_lse = attn(q, k, v, return_lse=True, **as64(params))
    ref, ref_lse = attn.reference(q, k, v, return_lse=True, **as64(params))
    assert_matches(got, ref)
    assert_matches(got_lse, ref_lse)
    return got


def assert_matches(got: torch.Tensor, ref: torch.Tensor, text: str = ""):
    """Equal to float64 rounding wherever the reference is finite. Where it overflows (an inf score, a NaN
    row), float arithmetic in another order is no less right, so those entries are not compared."""
    finite = torch.isfinite(ref)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    if finite.any():
        atol = 1e-9 * max(1.0, ref[finite].abs().max().item())
        torch.testing.assert_close(got[finite], ref[finite], rtol=1e-7, atol=atol, msg=lambda m: f"{text!r}\n{m}")


# -- the Triton interpreter, in a process of its own: TRITON_INTERPRET must be set before triton loads --

TRITON_SCRIPT = r"""
import json, sys
import torch
import attnc
from attnc.runtime.inputs import random_params
specs, shape, seed = json.loads(sys.stdin.read())
B, H, HKV, Q, KV, D = shape
out = []
for text in specs:
    try:
        attn = attnc.compile(text, backend="triton")
        g = torch.Generator().manual_seed(seed)
        q, k, v = torch.randn(B, H, Q, D, generator=g), torch.randn(B, HKV, KV, D, generator=g), torch.randn(B, HKV, KV, D, generator=g)
        params = random_params(attn, B, H, HKV, Q, KV, D, g)
        p64 = {n: t.double() if t.is_floating_point() else t for n, t in params.items()}
        got = attn(q, k, v, **params)
        gold = attn.reference(q.double(), k.double(), v.double(), **p64)
        eager = attn.reference(q, k, v, **params)
        finite = torch.isfinite(gold)
        err = (got.double() - gold)[finite].abs().max().item() if finite.any() else 0.0
        ref_err = (eager.double() - gold)[finite].abs().max().item() if finite.any() else 0.0
        same_nonfinite = bool(torch.equal(torch.isfinite(got), finite))
        out.append(["ok", err, ref_err, gold.abs()[finite].max().item() if finite.any() else 0.0, same_nonfinite])
    except attnc.SpecError as e:
        out.append(["SpecError", str(e)])
    except attnc.CallError as e:
        out.append(["CallError", str(e)])
    except Exception as e:
        out.append(["crash", f"{type(e).__name__}: {e}"])
print("RESULT " + json.dumps(out))
"""


def triton_interpreted(specs: list[str], shape=(1, 2, 1, 5, 7, 16), seed=0, timeout=300) -> list:
    """Run each spec through the Triton backend under TRITON_INTERPRET=1 in a fresh process: a list of
    ["ok", kernel error, eager float32 error, |reference| max, same non-finite entries] or [error kind, text]."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", TRITON_SCRIPT], input=json.dumps([specs, shape, seed]),
                          capture_output=True, text=True, env=env, timeout=timeout, cwd=str(ROOT))
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert line, proc.stderr[-3000:]
    return json.loads(line[-1][len("RESULT "):])


def assert_triton_ok(result, spec: str):
    assert result[0] == "ok", (spec, result)
    _, err, ref_err, scale, same_nonfinite = result
    if not math.isfinite(ref_err):
        return          # float32 cannot hold the computation (a const of 1e308): eager float32 fails as well
    assert same_nonfinite, (spec, "kernel and reference are non-finite at different entries")
    assert err <= max(2 * ref_err, 1e-4 * max(1.0, scale)), (spec, err, ref_err)


# -- 1. depth: one limit, on the expression with its lets inlined --

def nested_calls(n: int) -> str:
    """score under n - 1 alternating functions: n levels."""
    e = "score"
    for i in range(n - 1):
        e = f"{['tanh', 'sigmoid', 'softplus'][i % 3]}({e})"
    return f"variant deep\nscore = {e}\n"


def nested_minmax(n: int) -> str:
    """min/max around score, n levels: the torch backend prints two parentheses per level."""
    e = "score"
    for i in range(n - 1):
        e = f"min({e}, 2.5)" if i % 2 else f"max({e}, -2.5)"
    return f"variant deep\nscore = {e}\n"


def chained_lets(n: int) -> str:
    lines = ["variant deep", "let a0 = score"] + [f"let a{i} = tanh(a{i - 1}) * 0.9" for i in range(1, (n - 1) // 2 + 1)]
    last = (n - 1) // 2
    return "\n".join(lines + [f"score = {'a' + str(last) if (n - 1) % 2 == 0 else 'sigmoid(a' + str(last) + ')'}"]) + "\n"


def long_sum(n: int) -> str:
    """score + p[0] + ... : a chain of n - 2 additions of constant-index loads, n levels."""
    terms = " + ".join(f"p[{i}]" for i in range(n - 2))
    return f"variant deep\nparam p: f32[{n}]\nscore = score + {terms}\n"


def long_mask(n: int) -> str:
    """n - 2 comparisons joined by `and`: n levels."""
    cmps = " and ".join(f"q_idx + {i} >= kv_idx" for i in range(n - 2))
    return f"variant deep\nmask = {cmps}\n"


def deep_norm(n: int) -> str:
    """rownorm(x) is x / rowsum(x), two levels above x = 1.0 + e."""
    e = "score"
    for i in range(n - 4):
        e = f"sigmoid({e})" if i % 2 else f"tanh({e})"
    return f"variant deep\nnorm = rownorm(1.0 + {e})\n"


BUILDERS = [nested_calls, nested_minmax, chained_lets, long_sum, long_mask, deep_norm]


@pytest.mark.parametrize("build", BUILDERS, ids=[b.__name__ for b in BUILDERS])
def test_a_spec_at_the_depth_limit_runs_end_to_end(build):
    text = build(LIMIT)
    attn = attnc.compile(text)
    v = attn.variant
    assert max(E.height(e) for e in (v.score, v.mask, v.norm) if e is not None) == LIMIT
    matches_reference(attn)
    src = attn.source("triton")
    compile(src, "<triton kernel>", "exec")         # Python's compiler takes the generated source


def test_specs_at_the_depth_limit_run_under_the_triton_interpreter():
    texts = [b(LIMIT) for b in BUILDERS]
    for text, result in zip(texts, triton_interpreted(texts)):
        assert_triton_ok(result, text)


@pytest.mark.parametrize("build", BUILDERS, ids=[b.__name__ for b in BUILDERS])
def test_a_spec_one_level_past_the_limit_is_refused(build):
    e = spec_error(build(LIMIT + 1))
    assert f"deeper than {LIMIT} levels" in e.message
    assert where(e)[0] >= 2


@pytest.mark.parametrize("text, line", [
    ("variant x\nscore = " + "-" * 300 + "score\n", 2),
    ("variant x\nscore = score" + " + 1.0" * 300 + "\n", 2),
    ("variant x\nscore = " + "tanh(" * 400 + "score" + ")" * 400 + "\n", 2),
    ("variant x\nlet a0 = score\n" + "".join(f"let a{i + 1} = a{i} + 1.0\n" for i in range(600)) + "score = a600\n",
     LIMIT + 2),
    ("variant x\n" + "score = tanh(score)\n" * 300, LIMIT + 1),
])
def test_deep_specs_are_refused_where_they_cross_the_limit(text, line):
    e = spec_error(text)
    assert "deeper than" in e.message
    assert where(e)[0] == line


def test_shared_lets_cannot_blow_up_exponentially():
    # each let uses the previous twice: 2**40 operations when written out
    text = "variant x\nlet a0 = score\n" + "".join(f"let a{i + 1} = a{i} * tanh(a{i})\n" for i in range(40))
    t = time.perf_counter()
    e = spec_error(text + "score = a40\n")
    assert time.perf_counter() - t < 5
    assert f"more than {E.MAX_NODES} operations" in e.message


def test_variant_key_does_not_recurse():
    attn = attnc.compile(nested_calls(LIMIT))
    depth = len(__import__("inspect").stack())
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(depth + 30)           # far fewer frames than the expression has levels
    try:
        key = attn.variant.key()
    finally:
        sys.setrecursionlimit(old)
    assert key == attnc.compile(nested_calls(LIMIT)).variant.key() != attnc.compile(nested_calls(LIMIT - 1)).variant.key()


def test_deep_nodes_hash_and_compare_without_recursion():
    a, b = E.SCORE, E.SCORE
    for _ in range(20000):
        a, b = E.make(E.Op.NEG, a), E.make(E.Op.NEG, b)
    assert a == b and hash(a) == hash(b) and E.height(a) == 20001
    assert E.fingerprint(a) == E.fingerprint(b)
    assert a != E.make(E.Op.TANH, b)


# -- 2. every Unicode line break: lines as the parser counts them --

BREAKS = ["\r", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]


def assert_shown_at(e: SpecError, line: int, col: int, snippet: str):
    text = str(e)
    lines = text.splitlines()             # the message itself holds no stray break characters
    assert re.match(rf"<string>:{line}:{col}: ", lines[0]), text
    assert not any(ch in text for ch in BREAKS), repr(text)
    shown, caret = lines[1], lines[2]
    assert caret.strip() == "^" and shown[caret.index("^"):].startswith(snippet), repr(text)


@pytest.mark.parametrize("ch", BREAKS, ids=[hex(ord(c)) for c in BREAKS])
def test_a_line_break_in_a_comment_does_not_shift_lines(ch):
    e = spec_error(f"variant x\n# one{ch}two {ch} three\nmask = q_idx >= foo\n")
    assert_shown_at(e, 3, 17, "foo")


@pytest.mark.parametrize("ch", BREAKS, ids=[hex(ord(c)) for c in BREAKS])
def test_a_line_break_between_tokens(ch):
    source = f"variant x\nscore = score +{ch} 1.0\nmask = q_idx >= foo\n"
    e = spec_error(source)
    if ch == "\x0c":                              # form feed is blank space in the language
        assert_shown_at(e, 3, 17, "foo")
    else:
        assert_shown_at(e, 2, 16, "  1.0")                 # the break shows as a blank, under the caret
        assert repr(ch) in e.message


@pytest.mark.parametrize("ch", BREAKS + ["\x00", "\u202e", "\x7f"], ids=[hex(ord(c)) for c in BREAKS + ["\x00", "\u202e", "\x7f"]])
def test_a_line_break_as_the_offending_character(ch):
    source = f"variant x\n\nscore = score{ch} * 2\nmask = q_idx >= kv_idx\n"
    if ch == "\x0c":                              # form feed is blank space in the language
        assert attnc.compile(source).variant.score.op is E.Op.MUL
        return
    e = spec_error(source)
    assert_shown_at(e, 3, 14, "  * 2")
    assert repr(ch) in e.message


def test_windows_line_ends_parse():
    attn = attnc.compile("variant x\r\nmask = q_idx >= kv_idx\r\nscore = score * 2\r\n")
    assert attn.variant.mask is not None


# -- 3. imports: inside the importing file's folder tree, and no file that is not a spec is ever quoted --

SECRET = "aws_secret_access_key = AKIAEXAMPLESECRET"


@pytest.fixture
def tree(tmp_path, monkeypatch):
    """tmp/outside/secret.cfg, tmp/outside/x.attn and the spec folder tmp/specs (the current directory)."""
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.cfg").write_text(SECRET + "\n")
    (tmp_path / "outside" / "x.attn").write_text("variant x\nmask = q_idx >= kv_idx\n")
    specs = tmp_path / "specs"
    (specs / "lib").mkdir(parents=True)
    (specs / "lib" / "causal.attn").write_text("variant causal\nmask = q_idx >= kv_idx\n")
    monkeypatch.chdir(specs)
    return tmp_path


def refused_import(text: str, file: Path | None = None) -> SpecError:
    if file is not None:
        file.write_text(text)
    e = spec_error(str(file) if file is not None else text)
    assert SECRET not in str(e) and "AKIA" not in str(e)
    return e


def test_imports_inside_the_tree_work(tree):
    attnc.compile('variant a\nimport "lib/causal.attn" as c\nmask = c.mask\n')
    (tree / "specs" / "lib" / "top.attn").write_text('variant t\nimport "causal.attn" as c\nmask = c.mask\n')
    attnc.compile(str(tree / "specs" / "lib" / "top.attn"))


@pytest.mark.parametrize("path", ["../outside/x.attn", "lib/../../outside/x.attn", "/etc/passwd.attn",
                                  "../outside/secret.cfg", "lib\\..\\..\\outside\\x.attn", "lib/\x0b.attn"])
def test_imports_that_leave_the_tree_are_refused(tree, path):
    e = refused_import(f'variant a\nimport "{path}" as c\nmask = c.mask\n')
    assert where(e) == (2, 1)


def test_a_symlinked_spec_that_points_outside_is_refused(tree):
    (tree / "specs" / "evil.attn").symlink_to(tree / "outside" / "secret.cfg")
    (tree / "specs" / "far.attn").symlink_to(tree / "outside" / "x.attn")
    refused_import('variant a\nimport "evil.attn" as c\nmask = c.mask\n')
    refused_import('variant a\nimport "far.attn" as c\nmask = c.mask\n')
    e = spec_error(str(tree / "specs" / "evil.attn"))          # given directly, a link to a non-spec
    assert SECRET not in str(e)


def test_a_symlink_inside_the_tree_to_a_file_that_is_not_a_spec(tree):
    (tree / "specs" / "notes.txt").write_text(SECRET + "\n")
    (tree / "specs" / "notes.attn").symlink_to(tree / "specs" / "notes.txt")
    refused_import('variant a\nimport "notes.attn" as c\nmask = c.mask\n')


def test_a_spec_that_is_not_utf8_is_not_quoted(tree):
    (tree / "specs" / "bin.attn").write_bytes(b"\xff\xfe" + SECRET.encode("utf-16-le"))
    e = refused_import('variant a\nimport "bin.attn" as c\nmask = c.mask\n')
    assert "UTF-8" in e.message
    e = spec_error(str(tree / "specs" / "bin.attn"))
    assert "UTF-8" in e.message and "AKIA" not in str(e)


def test_a_fifo_named_attn_does_not_hang(tree):
    os.mkfifo(tree / "specs" / "pipe.attn")
    e = refused_import('variant a\nimport "pipe.attn" as c\nmask = c.mask\n')
    assert "regular file" in e.message


def test_the_import_rule_is_stated():
    from attnc.frontend.resolve import IMPORT_RULE
    assert "relative" in IMPORT_RULE and ".attn" in IMPORT_RULE and "symbolic links" in IMPORT_RULE


# -- 4. hangs: bounded time for every spec --

@pytest.mark.parametrize("text", [
    "variant x\nscore = score + 10 ** 10 ** 10\n",
    "variant x\nscore = score + 2 ** 100000\n",
    "variant x\nscore = score + (q_idx - q_idx + 2) ** 64 ** 64\n",
    "variant x\nscore = score + ((((q_idx - q_idx + 2) ** 64) ** 64) ** 64) ** 64\n",
    "variant x\nscore = score + (((((score - score + 3.0) ** 60) ** 60) ** 60) ** 60) * 0.0\n",
    "variant x\nscore = (score + 1) ** 1000\n",
    "variant x\nscore = score + exp(exp(exp(exp(q_idx - q_idx + 50))))\n",
    "variant x\nscore = score + log(log(log(log(exp(exp(exp(exp(score))))))))\n",
    "variant x\nscore = score * 1e308 * 1e308\n",
    "variant x\nscore = score + (q_idx + 1) ** 64 * 0.0\n",
    "variant x\nparam t: f32[4096]\nscore = score + t[(q_idx + 1) ** 64 % 4096]\n",
])
def test_every_spec_compiles_or_fails_in_bounded_time(text):
    t = time.perf_counter()
    try:
        attn = attnc.compile(text)
        attn.source()
        attn.source("triton")
        try:
            matches_reference(attn)
        except CallError:
            pass
    except SpecError as e:
        assert where(e)[0] == 2
    assert time.perf_counter() - t < 20, text


# -- 5. constant folding: a value, the same everywhere, or a SpecError at the place --

@pytest.mark.parametrize("text, col, words", [
    ("score = score / 0", 17, "division by zero"),
    ("score = score + log(0)", 17, "division by zero"),
    ("score = score + 0 ** -1", 17, "division by zero"),
    ("score = score + 0.0 / 0.0", 17, "NaN"),
    ("score = score + 10 ** 400", 17, "integer range"),
    ("score = score + 10.0 ** 400", 17, "infinity"),
    ("score = score + 2 ** 100000", 17, "integer range"),
    ("score = score + exp(1000)", 17, "infinity"),
    ("score = score + sqrt(-1)", 17, "NaN"),
    ("score = score + log(-1.0)", 17, "NaN"),
    ("score = score + (-8.0) ** 0.5", 17, "NaN"),
    ("score = score + (inf - inf)", 18, "NaN"),
    ("mask = q_idx % 0 == 0", 16, "can be 0"),
    ("mask = q_idx // (3 - 3) == 0", 18, "can be 0"),
    ("mask = q_idx // kv_idx == 0", 17, "can be 0"),
    ("mask = q_idx % (kv_idx - 1) == 0", 17, "can be 0"),
    ("mask = 2 ** 63 >= kv_idx", 8, "integer range"),
    ("mask = 2 ** 31 >= kv_idx", 8, "integer range"),
    ("mask = 65536 * 65536 > kv_idx", 8, "integer range"),
    ("mask = kv_idx < 2147483648", 17, "too large"),
    ("const window = 9223372036854775807\nmask = q_idx - kv_idx < window", 16, "too large"),
    ("mask = q_idx - kv_idx < -2147483647 - 2", 25, "integer range"),
    ("mask = q_idx - kv_idx < 1e-320", 25, "normal range"),
    ("mask = q_idx - kv_idx < 1e-300 * 1e-10", 25, "normal numbers"),
])
def test_constants_without_a_value_are_refused_at_their_place(text, col, words):
    e = spec_error("variant x\n" + text + "\n")
    assert words in e.message, e.message
    assert where(e) == (2, col)


@pytest.mark.parametrize("text", [
    "score = score + tanh(1e400)",            # a literal past float64 is inf; tanh(inf) = 1
    "score = score + 1.0 / log(inf) + exp(-inf)",
    "score = score + sigmoid(-1e400) + softplus(-800.0)",
    "score = where(q_idx >= kv_idx, score, -inf)",
    "mask = q_idx - kv_idx < 2147483647",
    "mask = q_idx - kv_idx > -2147483647 - 1",
    "score = score + 2 ** -1 + 4 ** 0.5 + (-2) ** 3",
    "score = score + 7 // -2 + 7 % -2 + (-7) // 2",
    "mask = q_idx // (KV - kv_idx) >= 0 and q_idx % max(HKV, 1) == q_idx % HKV",
    "score = score * 1e-300 + 1e-400",      # 1e-400 is 0.0, as in Python
    "score = score + rsqrt(inf) + 1e308 * 0.5 * 1e-300",
])
def test_constants_with_a_value_fold_to_it_in_every_backend(text):
    attn = attnc.compile("variant x\n" + text + "\n")
    matches_reference(attn)
    assert not re.search(r"(torch\.(?!as_tensor|full|tensor)\w+|F\.softplus)\(-?(\d|math\.inf)", attn.source()), \
        "a torch function applied to a Python number"


def test_folded_constants_are_the_reference_values():
    v = attnc.compile("variant x\nscore = score + 2 ** -1 + 7 // -2 + tanh(1e400)\n").variant
    consts = [n.arg for n in v.score.walk() if n.op is E.Op.CONST]
    assert consts == [2 ** -1 + 7 // -2 + 1.0] or sorted(consts) == sorted([0.5, -4, 1.0])


def test_const_overrides_follow_the_integer_range():
    text = "variant x\nconst window = 4\nmask = q_idx - kv_idx < window\n"
    attnc.compile(text, window=2 ** 31 - 1)
    for bad in (2 ** 31, -(2 ** 31) - 1, 2 ** 63 - 1, 10 ** 400):
        assert "window" in spec_error(text, window=bad).message
    assert "cap" in spec_error("variant x\nconst cap = 4.0\nscore = cap * tanh(score / cap)\n", cap=10 ** 400).message


def test_triton_agrees_on_folded_constants_and_the_integer_edge():
    texts = ["variant x\nconst window = 2147483647\nmask = q_idx - kv_idx < window and kv_idx > -2147483647 - 1\n",
             "variant x\nscore = score + tanh(1e400) + 1.0 / log(inf) + 2 ** -1\n",
             "variant x\nscore = score + q_idx ** -1 * 0.5\nmask = q_idx ** -1 >= 0.2\n"]
    for text, result in zip(texts, triton_interpreted(texts)):
        assert_triton_ok(result, text)


# -- 6. an integer to a negative power is a float everywhere --

def test_an_integer_to_a_negative_power_is_a_float():
    attn = attnc.compile("variant x\nscore = score + (q_idx + 1) ** -1\nmask = q_idx ** -1 > 0.3 or kv_idx == 0\n")
    assert attn.variant.score.dtype == E.FLOAT
    assert next(n for n in attn.variant.mask.walk() if n.op is E.Op.POW).dtype == E.FLOAT
    out = matches_reference(attn, shape=(1, 1, 1, 9, 9, 4))
    assert torch.isfinite(out).all()
    # q_idx ** -1 > 0.3 keeps q_idx 0 (inf), 1, 2, 3 and kv 0: a tile classified empty would drop them
    from attnc.runtime.reference import evaluate, index_env
    env = index_env(1, 1, 9, 9, {})
    kept = evaluate(attn.variant.mask, env, {}).expand(1, 1, 9, 9)[0, 0]
    assert kept[:4].all() and kept[4:, 0].all() and not kept[4:, 1:].any()


def test_integer_exponents_that_are_not_constants_make_floats():
    attn = attnc.compile("variant x\nscore = score + 0.01 * (h + 1) ** (1 - kv_idx)\n")
    assert attn.variant.score.dtype == E.FLOAT
    matches_reference(attn)


def test_a_mask_through_log_of_a_negative_range_keeps_its_keys():
    # log over a tile whose range reaches below 0 has NaN as a bound: block sparsity once read that as
    # "never true" and skipped tiles the mask keeps
    for text in ["variant x\nmask = log(q_idx - 1.5) + 2.0 > kv_idx * 0.5\n",
                 "variant x\nparam widths: i32[H]\nlet q_pos = log(q_idx ** KV)\n"
                 "mask = q_pos >= kv_idx and q_pos - kv_idx < widths[h]\n"]:
        attn = attnc.compile(text)
        for shape in [(1, 2, 1, 5, 7, 4), (2, 2, 2, 9, 4, 8), (1, 2, 2, 40, 33, 4)]:
            widths = {"widths": torch.tensor([3, 5], dtype=torch.int32)} if "widths" in text else {}
            matches_reference(attn, shape=shape, params=widths or None)


# -- 7. the call-time bounds check computes exactly what a kernel computes, or refuses --

def test_int32_wraparound_in_an_index_is_refused():
    attn = attnc.compile("variant x\nparam off: i32[H]\nparam tab: f32[16]\n"
                         "score = score + tab[(off[h] * 2) // 536870912 + 8]\n")
    q, k, v = qkv(1, 2, 2, 4, 4, 4)
    off = torch.full((2,), -(2 ** 30 + 2 ** 29), dtype=torch.int32)       # * 2 wraps in int32
    with pytest.raises(CallError, match=r"tab.*2 \* off\[h\]"):
        attn(q, k, v, off=off, tab=torch.rand(16))
    matches_reference(attn, shape=(1, 2, 2, 4, 4, 4), params={"off": torch.tensor([-(2 ** 28), 2 ** 28],
                                                                                       dtype=torch.int32),
                                                               "tab": torch.rand(16)})


def test_an_index_past_float64_precision_is_refused():
    attn = attnc.compile("variant x\nparam off: i64[H]\nparam tab: f32[16]\n"
                         "score = score + tab[off[h] - 2147483647 - 1]\n")
    q, k, v = qkv(1, 2, 2, 4, 4, 4)
    with pytest.raises(CallError, match="tab"):
        attn(q, k, v, off=torch.full((2,), 2 ** 53, dtype=torch.int64), tab=torch.rand(16))
    with pytest.raises(CallError, match="tab"):                           # within int32 but out of bounds
        attn(q, k, v, off=torch.full((2,), 2 ** 31 + 16, dtype=torch.int64), tab=torch.rand(16))
    ok = {"off": torch.tensor([2 ** 31, 2 ** 31 + 15], dtype=torch.int64), "tab": torch.rand(16)}
    with pytest.raises(CallError, match="off"):                           # off itself is not an int32
        attn(q, k, v, **ok)


def test_a_load_at_a_constant_index():
    attn = attnc.compile("variant x\nparam ids: i32[4]\nparam tab: f32[L]\nscore = score + tab[ids[0]] + tab[ids[3]]\n")
    from attnc.passes.bounds import Access
    assert {(a.param, a.axis) for a in attn.plan().bounds if isinstance(a, Access)} == {("ids", 0), ("tab", 0)}
    matches_reference(attn, params={"ids": torch.tensor([2, 0, 0, 5], dtype=torch.int32), "tab": torch.rand(6)})
    q, k, v = qkv(1, 2, 2, 4, 4, 4)
    with pytest.raises(CallError, match="tab"):
        attn(q, k, v, ids=torch.tensor([2, 0, 0, 6], dtype=torch.int32), tab=torch.rand(6))


def test_proven_reads_still_obey_the_int32_rule():
    attn = attnc.compile("variant x\nparam bias: f32[KV]\nscore = score + bias[KV - 1 - kv_idx]\n")
    from attnc.passes.bounds import Access
    assert all(a.proven for a in attn.plan().bounds if isinstance(a, Access))
    from attnc.passes.bounds import check_at_call
    sizes = {"B": 1, "H": 1, "HKV": 1, "Q": 1, "KV": 2 ** 31 + 5, "D": 1}
    with pytest.raises(CallError, match="32-bit"):
        check_at_call(attn.plan().bounds, sizes, {"bias": torch.empty(0)})


def test_the_reference_never_wraps_a_negative_index():
    attn = attnc.compile("variant x\nparam tab: f32[L]\nscore = score + tab[q_idx - 1]\n")
    q, k, v = qkv(1, 1, 1, 4, 4, 4)
    with pytest.raises(CallError, match="tab"):
        attn.reference(q, k, v, tab=torch.rand(8))
    with pytest.raises(CallError, match="tab"):
        attn(q, k, v, tab=torch.rand(8))
