"""Spec text reaches generated code only through attnc's printer: names are validated identifiers, numbers are
printed by attnc. Each attempt here is rejected with a SpecError or rendered harmlessly."""
from __future__ import annotations

import ast
import os

import pytest
import torch

import attnc
from attnc import SpecError

try:
    from helpers import qkv
except ImportError:
    from tests.helpers import qkv

ALLOWED_IMPORTS = {"math", "torch", "torch.nn.functional"}
FORBIDDEN_CALLS = {"eval", "exec", "compile", "__import__", "open", "getattr", "setattr", "globals", "locals",
                   "vars", "input", "breakpoint", "system", "popen"}


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)          # a relative path that escapes lands in the sandbox, never the repo
    return tmp_path / "cache"


def assert_harmless(attn: attnc.Compiled, injected: list[str], params: dict | None = None):
    """The kernel source parses, imports only what attnc imports, calls nothing dangerous, names only
    identifiers attnc made, and never holds the injected text outside a comment; then it runs."""
    src = attn.source()
    tree = ast.parse(src)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            assert {a.name for a in node.names} <= ALLOWED_IMPORTS
        assert not isinstance(node, ast.ImportFrom)
        if isinstance(node, ast.Call):
            f = node.func
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
            assert name not in FORBIDDEN_CALLS, ast.unparse(node)
        if isinstance(node, ast.Attribute):
            assert not (node.attr.startswith("__") and node.attr.endswith("__")), ast.unparse(node)
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            for text in injected:
                assert text not in node.value
    defs = [n.name for n in tree.body if isinstance(n, ast.FunctionDef)]
    assert defs == ["masked", attn.plan().name]
    assert attn.plan().name.isidentifier()
    code_lines = [line.split("#")[0] for line in src.splitlines()]
    for text in injected:
        assert not any(text in line for line in code_lines), f"{text!r} reaches code:\n{src}"
    q, k, v = qkv(1, 2, 2, 9, 9, 8)
    attn(q, k, v, **(params or {}))


# -- rejected --

@pytest.mark.parametrize("source", [
    "variant x; import os\n",
    "variant x\nimport os\n",
    "variant x\nscore = __import__('os').system('true')\n",
    "variant x\nscore = score + 0x10\n",
    "variant x\nscore = score + 1_000\n",
    "variant x\nscore = score + 1j\n",
    "variant x\nscore = score + 1e5e5\n",
    'variant x\nscore = "score"\n',
    "variant x\nscore = score; import os\n",
    "variant x\nscore = score.__class__\n",
    "variant x\nscore = (lambda: 0)()\n",
    "variant x\nscore = [score][0]\n",
    "variant x\nscore = score if True else 0\n",
    "variant x\nscore = os.system('true')\n",
    "variant x\nmask = q_idx >= kv_idx\n\\\nimport os\n",
    "variant x\nscore = scöre\n",
    "variant x\nscore = score + `id`\n",
    "variant x\nlet class = 1\n",
    "variant x\nconst import = 1\n",
    "variant x\nparam def: f32[H]\n",
    "variant x\nparam lambda: f32[H]\n",
    "variant x\nlet None = 1\n",
    "variant x\nlet True = 1\n",
    "variant x\nparam p: f32[H]; import os\n",
    "variant x\nparam p: os.system[H]\n",
    "variant x\nparam p: f32[__import__('os')]\n",
])
def test_code_in_the_spec_is_rejected(source):
    with pytest.raises(SpecError) as info:
        attnc.compile(source)
    assert "Traceback" not in str(info.value)


@pytest.mark.parametrize("path", [
    "../../etc/passwd",
    "/etc/passwd",
    "../../etc/passwd.attn",
    "x.attn\\\"; import os; \\\"",
    "a.attn\" as b\nimport os\n\"",
    "causal.py",
    "",
])
def test_import_paths_that_escape_or_break_out_are_rejected(path):
    with pytest.raises(SpecError):
        attnc.compile(f'variant x\nimport "{path}" as inc\nmask = inc.mask\n')


def test_import_path_with_a_newline_or_quote_never_parses():
    for raw in ['import "a\nb.attn" as x', 'import "a"b.attn" as x', "import 'a.attn' as x"]:
        with pytest.raises(SpecError):
            attnc.compile(f"variant x\n{raw}\n")


def test_an_imported_file_cannot_inject_either(tmp_path):
    (tmp_path / "evil.attn").write_text("variant evil\nmask = q_idx >= kv_idx\nscore = score; import os\n")
    with pytest.raises(SpecError) as info:
        attnc.compile('variant x\nimport "evil.attn" as evil\nmask = evil.mask\n')
    assert "evil.attn" in str(info.value)


# -- rendered harmlessly --

@pytest.mark.parametrize("name", ["__import__", "__builtins__", "os", "sys", "torch", "math", "F", "eval", "exec",
                                  "out", "lse", "masked", "acc", "tiles", "print", "sm_scale", "BLOCK_M", "p_x"])
def test_param_names_that_shadow_python_or_the_kernel(name):
    attn = attnc.compile(f"variant shadow\nparam {name}: f32[H]\nscore = score + {name}[h] * 0.0\n"
                         f"mask = q_idx >= kv_idx\n")
    assert_harmless(attn, [], {name: torch.rand(2)})
    assert f"p_{name}" in attn.source()                   # a param is only ever read through its p_ prefix
    q, k, v = qkv(1, 2, 2, 9, 9, 8)
    expected = attnc.compile("variant c\nmask = q_idx >= kv_idx\n")(q, k, v)
    assert torch.allclose(attn(q, k, v, **{name: torch.rand(2)}), expected, atol=1e-6)


@pytest.mark.parametrize("name", ["import", "lambda", "class", "os", "__init__"])
def test_variant_names_end_up_as_identifiers(name):
    try:
        attn = attnc.compile(f"variant {name}\nmask = q_idx >= kv_idx\n")
    except SpecError:
        return
    assert_harmless(attn, [])


def test_integer_literals_beyond_32_bits_are_rejected():
    with pytest.raises(SpecError, match="too large"):
        attnc.compile("variant n\nmask = kv_idx < 123456789012345678901234567890\n")
    with pytest.raises(SpecError, match="too large"):
        attnc.compile("variant n\nconst w = 99999999999999999999\n")
    with pytest.raises(SpecError, match="too large"):
        attnc.compile("variant n\nmask = kv_idx < 9223372036854775807\n")
    with pytest.raises(SpecError, match="too large"):
        attnc.compile("variant n\nmask = kv_idx < 2147483648\n")


@pytest.mark.parametrize("number, value", [("1e999", float("inf")), ("2147483647", 2147483647),
                                          ("0.1e-400", 0.0), ("00012", 12), ("1.5e+2", 150.0)])
def test_numbers_are_printed_by_attnc(number, value):
    attn = attnc.compile(f"variant n\nscore = score + where({number} > kv_idx, 1.0, 2.0)\n")
    assert_harmless(attn, [])
    literals = [n.value for n in ast.walk(ast.parse(attn.source())) if isinstance(n, ast.Constant)]
    if value is not None:
        assert value in literals or (value == float("inf") and "math.inf" in attn.source())


@pytest.mark.parametrize("name", ["q", "k", "v", "scale", "return_lse", "self"])
def test_param_names_that_are_arguments_of_the_call_are_rejected(name):
    with pytest.raises(SpecError, match=name):
        attnc.compile(f"variant a\nparam {name}: f32[H]\nscore = score + {name}[h]\n")


def test_const_override_values_must_be_numbers():
    for bad in ["1); import os; (", b"1", [1], {"a": 1}, object(), float("nan"), 2 ** 70]:
        with pytest.raises(SpecError):
            attnc.compile("variant c\nconst w = 4\nmask = q_idx - kv_idx < w\n", w=bad)


def test_a_file_name_that_is_code(tmp_path):
    marker = tmp_path / "pwned"
    evil = f"x(a=__import__('os').system('touch {marker.name}')) -> y"
    path = tmp_path / f"{evil}.attn"
    path.write_text("mask = q_idx >= kv_idx\n")               # no `variant` line: the name comes from the file
    attn = attnc.compile(str(path))
    assert attn.variant.name.isidentifier()
    assert_harmless(attn, ["__import__(", "system("])
    assert not marker.exists() and not (tmp_path / "cache" / marker.name).exists()
    assert not os.path.exists(marker.name)


def test_a_file_name_with_a_carriage_return(tmp_path):
    path = tmp_path / "r\rimport os\r#.attn"
    path.write_text("variant r\nmask = q_idx >= kv_idx\n")
    try:
        attn = attnc.compile(str(path))
    except SpecError:
        return
    assert_harmless(attn, ["\rimport os"])
    assert "\r" not in attn.source()


def test_comments_never_reach_the_kernel():
    attn = attnc.compile("variant c\n# '''; import os; x = '''\nmask = q_idx >= kv_idx   # \"\"\"; exec('1')\n")
    src = attn.source()
    assert "import os" not in src and "exec(" not in src
    assert_harmless(attn, ["import os", "exec("])


def test_let_and_const_names_never_reach_the_kernel():
    attn = attnc.compile("variant c\nconst exec_me = 3\nlet eval_me = q_idx - kv_idx\n"
                         "mask = eval_me >= 0 and eval_me < exec_me\n")
    assert "exec_me" not in attn.source() and "eval_me" not in attn.source()
    assert_harmless(attn, [])
