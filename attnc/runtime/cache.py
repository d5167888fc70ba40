"""Generated source on disk: written once, atomically, and used again only when its checksum verifies.

An entry is `<cache dir>/<kernel name>-<key>.py`: the kernel source, then one line that seals it,

    # attnc-cache key=<key> sha256=<sha256 of key, NUL, source>

A file whose seal is missing or does not match its key and text (truncated, emptied, NUL-filled, not
UTF-8, edited, or an entry of another key copied over it) is a miss: the source is made again and
replaces it. The key hashes the variant, the plan and every file that shapes generated code.
"""
from __future__ import annotations

import functools
import hashlib
import hmac
import os
import re
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Callable

PACKAGE = Path(__file__).resolve().parents[1]
SAFE = re.compile(r"[A-Za-z0-9_-]+")                       # the only names a cache path is built from
SEAL = re.compile(r"# attnc-cache key=([A-Za-z0-9_-]+) sha256=([0-9a-f]{64})\n")
ENTRY = re.compile(r"[A-Za-z0-9_-]+-[0-9a-f]+\.py")        # <name>-<key>.py
TEMPORARY = re.compile(r"\.[A-Za-z0-9_-]+\.tmp")            # a writer's file before its rename
MAX_BYTES = 16 << 20                                       # far above any kernel; a bigger file is not ours


def package_version() -> str:
    """attnc's version from the installed metadata; in an uninstalled source tree, from its pyproject.toml."""
    try:
        return metadata.version("attnc")
    except metadata.PackageNotFoundError:
        pass
    try:
        text = (PACKAGE.parent / "pyproject.toml").read_text()
    except OSError:
        return "0+unknown"
    found = re.search(r'^version\s*=\s*"([^"]+)"', text, re.M)
    return found.group(1) if found and re.search(r'^name\s*=\s*"attnc"', text, re.M) else "0+unknown"


VERSION = package_version()


def cache_dir() -> Path:
    """$ATTNC_CACHE_DIR, else $XDG_CACHE_HOME/attnc, else ~/.cache/attnc."""
    own = os.environ.get("ATTNC_CACHE_DIR")
    if own:
        return Path(own).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and os.path.isabs(xdg):          # the XDG spec: a relative value is invalid and ignored
        return Path(xdg) / "attnc"
    return Path.home() / ".cache" / "attnc"


# -- keys --
@functools.lru_cache(maxsize=None)
def code_version(backend) -> str:
    """A hash of everything besides the plan that decides a backend's kernel text: attnc's sources,
    templates and grammar, and the versions of attnc, torch and triton. New code never reads an old kernel."""
    h = hashlib.sha256(_sources_digest().encode())
    h.update(f"\0{backend.__name__}\0{VERSION}\0{_dist_version('torch')}\0{_dist_version('triton')}".encode())
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def _sources_digest() -> str:
    """Every .py file of the package, every template and the grammar, read once per process. All of the
    package rather than the modules render imports today: a module the compile path starts to use is
    covered without anyone remembering to list it."""
    from attnc.frontend.parser import resource_dir
    files = [(f.relative_to(PACKAGE), f) for f in PACKAGE.rglob("*.py")]
    for folder in ("templates", "grammar"):
        root = resource_dir(folder)
        files += [(folder / f.relative_to(root), f) for f in root.rglob("*") if f.is_file()]
    h = hashlib.sha256()
    for name, f in sorted(files):
        data = f.read_bytes()
        h.update(f"{name.as_posix()}\0{len(data)}\0".encode())     # names and lengths: no two trees hash alike
        h.update(data)
    return h.hexdigest()


def _dist_version(name: str) -> str:
    module = sys.modules.get(name)
    if module is not None and hasattr(module, "__version__"):
        return str(module.__version__)          # torch's carries the build (+cpu, +cu124)
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "none"


def cache_key(*parts: str) -> str:
    return hashlib.sha256("\x00".join((VERSION,) + parts).encode()).hexdigest()[:20]


# -- entries --
def entry_path(name: str, key: str) -> Path:
    """<cache dir>/<name>-<key>.py; a name or key outside [A-Za-z0-9_-] is refused, never escaped."""
    for what, text in (("kernel name", name), ("cache key", key)):
        if not isinstance(text, str) or not SAFE.fullmatch(text):
            raise ValueError(f"attnc cache: {what} {text!r} is not made of [A-Za-z0-9_-]")
    return cache_dir() / f"{name}-{key}.py"


def seal(source: str, key: str) -> str:
    """source with the line that lets a reader verify it: its key and a checksum of key and text."""
    body = source if source.endswith("\n") else source + "\n"
    return f"{body}# attnc-cache key={key} sha256={_checksum(key, body)}\n"


def unseal(text: str) -> str | None:
    """The key a sealed text carries when its checksum verifies, else None."""
    cut = text.rfind("\n", 0, len(text) - 1) + 1
    found = SEAL.fullmatch(text, cut)
    if found is None:
        return None
    key, digest = found.groups()
    return key if hmac.compare_digest(digest, _checksum(key, text[:cut])) else None


def _checksum(key: str, body: str) -> str:
    return hashlib.sha256(f"{key}\0{body}".encode()).hexdigest()


def cached_source(name: str, key: str, make: Callable[[], str]) -> tuple[str, Path | None]:
    """(sealed source, path): the cached entry when it verifies, else made, sealed, written atomically and
    returned. A cache that cannot be written (read-only home, full disk) costs only the write."""
    path = entry_path(name, key)
    text = _read_verified(path, key)
    if text is not None:
        return text, path
    text = seal(make(), key)
    return text, path if _write_atomic(path, text) else None


def _read_verified(path: Path, key: str) -> str | None:
    """The entry's text if it is a regular file (a symlink is not followed) that verifies against key."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None
    try:
        with os.fdopen(fd, "rb") as f:
            data = f.read(MAX_BYTES + 1)
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    if len(data) > MAX_BYTES or path.is_symlink() or unseal(text) != key:
        return None
    return text


def _write_atomic(path: Path, text: str) -> bool:
    """Write through a temporary file beside the target and rename it over the target: readers see the
    old file or the whole new one, and a symlink planted at the target is replaced, never followed."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".tmp")   # O_EXCL
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
        return True
    except OSError:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        return False


def load_kernel(source: str, name: str, path: Path | None):
    """Execute sealed generated source as a module and return its kernel function; source whose seal does
    not verify (or names another key than its path) is refused."""
    key = unseal(source)
    if key is None or (path is not None and path.name != f"{name}-{key}.py"):
        raise RuntimeError(f"attnc cache: the source of {name} does not verify; it is not executed")
    scope: dict = {"__name__": f"attnc_generated.{name}"}
    code = compile(source, str(path) if path else f"<attnc {name}>", "exec")
    exec(code, scope)        # attnc's own output, verified: spec text reaches it only as printed numbers/names
    return scope[name]


# -- the `attnc cache` command --
def _entries(kinds=(ENTRY, TEMPORARY)) -> list[os.DirEntry]:
    try:
        with os.scandir(cache_dir()) as it:
            return [e for e in it if any(k.fullmatch(e.name) for k in kinds) and not e.is_dir(follow_symlinks=False)]
    except OSError:
        return []


def info() -> dict:
    """{'path', 'entries', 'bytes'}: the cache folder, its kernel files and their total size."""
    files = [e for e in _entries((ENTRY,)) if e.is_file(follow_symlinks=False)]
    return {"path": str(cache_dir()), "entries": len(files),
            "bytes": sum(e.stat(follow_symlinks=False).st_size for e in files)}


def clear() -> int:
    """Remove attnc's files (kernels, leftover temporaries) from the cache folder, nothing else; return how many."""
    removed = 0
    for e in _entries():
        try:
            os.unlink(e.path)            # a symlink is removed itself, its target untouched
            removed += 1
        except FileNotFoundError:
            pass                         # another process got there first
    return removed
