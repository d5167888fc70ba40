"""The on-disk kernel cache: sealed entries, corruption rebuilt, keys that cover the code, safe paths, info/clear."""
from __future__ import annotations

import shutil
from importlib import metadata
from pathlib import Path

import pytest

import attnc
from attnc.runtime import cache

try:
    from helpers import ROOT, check_against_oracle, example, qkv
except ImportError:
    from tests.helpers import ROOT, check_against_oracle, example, qkv

KEY = "0123456789abcdef0123"
BODY = "def k():\n    return 1\n"


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(d))
    return d


def kernel_files(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.suffix == ".py") if d.exists() else []


class Maker:
    """make() for cached_source that counts its calls."""

    def __init__(self, text=BODY):
        self.text, self.calls = text, 0

    def __call__(self):
        self.calls += 1
        return self.text


# -- the seal --
def test_seal_round_trip_and_every_change_breaks_it():
    body = "def k():\n    return 1\n"
    sealed = cache.seal(body, KEY)
    assert sealed.startswith(body) and sealed.count("\n") == body.count("\n") + 1
    assert cache.unseal(sealed) == KEY
    for i in range(len(body)):                          # any one character of the body changed
        changed = sealed[:i] + ("x" if sealed[i] != "x" else "y") + sealed[i + 1:]
        assert cache.unseal(changed) is None, i
    other = cache.seal(body, "ffffffffffffffffffff")
    assert cache.unseal(other) == "ffffffffffffffffffff"
    forged = sealed.replace(f"key={KEY}", "key=ffffffffffffffffffff")       # same checksum, another key
    assert cache.unseal(forged) is None
    assert cache.unseal(body) is None and cache.unseal("") is None
    assert cache.unseal(sealed + "\n") is None and cache.unseal(sealed.rstrip("\n")) is None


def test_source_without_a_final_newline_is_sealed_on_its_own_line():
    sealed = cache.seal("x = 1", KEY)
    assert sealed.splitlines()[0] == "x = 1" and cache.unseal(sealed) == KEY


# -- corrupted entries are rebuilt --
def _corruptions(text: str) -> dict[str, bytes]:
    data = text.encode()
    edited = text.replace("return 1", "return 2")
    return {
        "truncated": data[: len(data) // 2],
        "truncated seal": data[:-5],
        "emptied": b"",
        "NUL-filled": b"\0" * len(data),
        "not UTF-8": b"\xff\xfe\x80" + data[3:],
        "edited": edited.encode(),
        "edited seal": text.replace("sha256=", "sha256=0").encode(),
        "another key's entry": cache.seal(text[: text.index("# attnc-cache")], "ffffffffffffffffffff").encode(),
    }


@pytest.mark.parametrize("kind", list(_corruptions(cache.seal(BODY, KEY))))
def test_a_corrupted_entry_is_rebuilt_and_repaired(cache_dir, kind):
    make = Maker()
    text, path = cache.cached_source("k", KEY, make)
    assert make.calls == 1 and path.read_text() == text
    path.write_bytes(_corruptions(text)[kind])
    again, path2 = cache.cached_source("k", KEY, make)
    assert make.calls == 2, "a corrupted entry was used"
    assert again == text and path2 == path
    assert path.read_text() == text, "the rebuilt entry replaced the corrupted one"
    assert cache.cached_source("k", KEY, make)[0] == text and make.calls == 2       # and is used from then on


def test_an_oversized_entry_is_rebuilt(cache_dir, monkeypatch):
    make = Maker()
    cache.cached_source("k", KEY, make)
    monkeypatch.setattr(cache, "MAX_BYTES", 10)
    cache.cached_source("k", KEY, make)
    assert make.calls == 2


def test_an_edited_kernel_never_runs(cache_dir):
    """A kernel file edited into valid Python that computes something else is rebuilt, and the result is right."""
    attn = attnc.compile(example("causal"))
    fresh = attn.source()
    (path,) = kernel_files(cache_dir)
    body = fresh[: fresh.index("# attnc-cache")]
    path.write_text(body + "\ndef attnc_causal_fwd(q, k, v, *args):\n    return torch.zeros_like(q), None\n"
                    + fresh[fresh.index("# attnc-cache"):])
    again = attnc.compile(example("causal"))
    assert again.source() == fresh
    q, k, v = qkv(2, 4, 2, 37, 53, 8, seed=3)
    check_against_oracle(again, q, k, v, {})
    assert path.read_text() == fresh


def test_a_resealed_entry_is_what_runs(cache_dir):
    """The cache is really read: an entry sealed for its key is executed as found."""
    attn = attnc.compile(example("causal"))
    fresh = attn.source()
    (path,) = kernel_files(cache_dir)
    key = cache.unseal(fresh)
    path.write_text(cache.seal(fresh[: fresh.index("# attnc-cache")] + "MARK = 'from the cache'\n", key))
    again = attnc.compile(example("causal"))
    assert "MARK = 'from the cache'" in again.source()
    q, k, v = qkv(1, 2, 2, 20, 20, 8)
    check_against_oracle(again, q, k, v, {})


def test_load_kernel_refuses_unverified_source(tmp_path):
    body = "def k():\n    return 1\n"
    assert cache.load_kernel(cache.seal(body, KEY), "k", None)() == 1
    assert cache.load_kernel(cache.seal(body, KEY), "k", tmp_path / f"k-{KEY}.py")() == 1
    with pytest.raises(RuntimeError, match="does not verify"):
        cache.load_kernel(body, "k", None)
    with pytest.raises(RuntimeError, match="does not verify"):
        cache.load_kernel(cache.seal(body, KEY), "k", tmp_path / "k-ffffffffffffffffffff.py")


# -- writes --
def test_a_failed_write_leaves_nothing_and_still_returns_the_source(cache_dir, monkeypatch):
    def no_rename(src, dst):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(cache.os, "replace", no_rename)
    text, path = cache.cached_source("k", KEY, Maker())
    assert path is None and cache.unseal(text) == KEY
    assert list(cache_dir.iterdir()) == []


def test_a_planted_symlink_is_neither_read_nor_written_through(cache_dir):
    make = Maker()
    text, path = cache.cached_source("k", KEY, make)
    victim = cache_dir.parent / "victim.py"
    victim.write_text(text)                         # even a target that verifies is not read through a link
    path.unlink()
    path.symlink_to(victim)
    again, path2 = cache.cached_source("k", KEY, make)
    assert make.calls == 2 and again == text and path2 == path
    assert not path.is_symlink() and path.read_text() == text
    assert victim.read_text() == text and victim.stat().st_nlink == 1


def test_a_symlink_to_a_file_outside_is_not_overwritten(cache_dir):
    cache_dir.mkdir()
    victim = cache_dir.parent / "victim.txt"
    victim.write_text("keep me")
    (cache_dir / f"k-{KEY}.py").symlink_to(victim)
    cache.cached_source("k", KEY, Maker())
    assert victim.read_text() == "keep me"


@pytest.mark.parametrize("name, key", [("../k", KEY), ("k/x", KEY), ("", KEY), ("k.py", KEY), ("kä", KEY),
                                       ("k", "../../etc"), ("k", ""), ("k", KEY + "\n"), ("k", None)])
def test_a_path_is_built_only_from_safe_names(cache_dir, name, key):
    with pytest.raises(ValueError, match=r"\[A-Za-z0-9_-\]"):
        cache.cached_source(name, key, Maker())
    assert not cache_dir.exists()


# -- the key covers every file that shapes generated code --
@pytest.fixture
def package_copy(tmp_path, monkeypatch):
    """attnc's sources, templates and grammar copied to tmp_path, where the digest reads them."""
    from attnc.frontend import parser
    pkg = tmp_path / "attnc"
    shutil.copytree(cache.PACKAGE, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    for folder in ("templates", "grammar"):
        shutil.copytree(parser.resource_dir(folder), tmp_path / folder)
    monkeypatch.setattr(cache, "PACKAGE", pkg)
    monkeypatch.setattr(parser, "resource_dir", lambda name: tmp_path / name)
    return tmp_path


@pytest.mark.parametrize("rel", ["attnc/backends/codegen.py", "attnc/ir/printer.py", "attnc/plan/build.py",
                                 "attnc/passes/online.py", "templates/torch/kernel.py.j2",
                                 "templates/triton/kernel.py.j2", "grammar/attn.lark"])
def test_an_edit_to_any_file_that_shapes_code_changes_the_key(package_copy, rel):
    digest = cache._sources_digest.__wrapped__
    before = digest()
    f = package_copy / rel
    original = f.read_text()
    f.write_text(original + "\n# edited\n")
    assert digest() != before
    f.write_text(original)
    assert digest() == before


def test_a_new_module_changes_the_key(package_copy):
    before = cache._sources_digest.__wrapped__()
    (package_copy / "attnc" / "passes" / "new_pass.py").write_text("")
    assert cache._sources_digest.__wrapped__() != before


def test_versions_are_in_the_key(monkeypatch):
    from attnc.backends import torch_backend
    version = cache.code_version.__wrapped__
    before = version(torch_backend)
    monkeypatch.setattr(cache, "VERSION", "9.9.9")
    assert version(torch_backend) != before
    monkeypatch.undo()
    real = cache._dist_version
    for dist in ("torch", "triton"):
        monkeypatch.setattr(cache, "_dist_version", lambda name, d=dist: "0.0" if name == d else real(name))
        assert version(torch_backend) != before, dist
    monkeypatch.undo()
    assert version(torch_backend) == before


def test_compiles_with_the_same_code_share_an_entry(cache_dir):
    attnc.compile(example("alibi")).source()
    attnc.compile(example("alibi")).source()
    assert len(kernel_files(cache_dir)) == 1


# -- the version --
def test_version_comes_from_the_metadata_or_the_source_tree(monkeypatch):
    assert attnc.__version__ == metadata.version("attnc")

    def not_installed(name):
        raise metadata.PackageNotFoundError(name)
    monkeypatch.setattr(cache.metadata, "version", not_installed)
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'version = "{cache.package_version()}"' in pyproject
    monkeypatch.setattr(cache, "PACKAGE", ROOT / "nowhere" / "attnc")
    assert cache.package_version() == "0+unknown"


# -- where the cache lives --
def test_cache_dir_order(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(tmp_path / "own"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_dir() == tmp_path / "own"
    monkeypatch.delenv("ATTNC_CACHE_DIR")
    assert cache.cache_dir() == tmp_path / "xdg" / "attnc"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")          # the XDG spec: relative values are ignored
    assert cache.cache_dir() == tmp_path / "home" / ".cache" / "attnc"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache.cache_dir() == tmp_path / "home" / ".cache" / "attnc"
    monkeypatch.setenv("ATTNC_CACHE_DIR", "")                       # empty means unset
    assert cache.cache_dir() == tmp_path / "home" / ".cache" / "attnc"


def test_xdg_cache_home_is_where_kernels_go(tmp_path, monkeypatch):
    monkeypatch.delenv("ATTNC_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    attnc.compile(example("causal")).source()
    assert len(kernel_files(tmp_path / "xdg" / "attnc")) == 1


# -- info and clear --
def test_info_and_clear(cache_dir):
    assert cache.info() == {"path": str(cache_dir), "entries": 0, "bytes": 0}
    assert cache.clear() == 0
    attnc.compile(example("causal")).source()
    attnc.compile(example("alibi")).source()
    files = kernel_files(cache_dir)
    assert cache.info() == {"path": str(cache_dir), "entries": 2, "bytes": sum(f.stat().st_size for f in files)}
    (cache_dir / ".attnc_causal_fwd-0123-abc_1.tmp").write_text("left by a killed writer")
    (cache_dir / "notes.txt").write_text("not attnc's")
    (cache_dir / "subdir-0abc.py").mkdir()
    victim = cache_dir.parent / "victim.py"
    victim.write_text("keep me")
    (cache_dir / f"planted-{KEY[:16]}.py").symlink_to(victim)
    assert cache.info()["entries"] == 2                            # the symlink is no entry
    assert cache.clear() == 4
    assert sorted(p.name for p in cache_dir.iterdir()) == ["notes.txt", "subdir-0abc.py"]
    assert victim.read_text() == "keep me"
    assert cache.info()["entries"] == 0


def test_info_of_a_missing_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(tmp_path / "never" / "made"))
    assert cache.info()["entries"] == 0 and cache.clear() == 0
    assert not (tmp_path / "never").exists()


def test_a_cleared_cache_compiles_again(cache_dir):
    source = attnc.compile(example("sliding_window"), window=8).source()
    assert cache.clear() == 1 and kernel_files(cache_dir) == []
    attn = attnc.compile(example("sliding_window"), window=8)
    q, k, v = qkv(1, 2, 2, 30, 30, 8)
    check_against_oracle(attn, q, k, v, {})                  # runs the kernel that returns the lse
    assert [f.read_text() for f in kernel_files(cache_dir)] == [attn.source(return_lse=True)]
    assert attn.source() == source
