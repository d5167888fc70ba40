"""Generated source on disk, keyed by content: a file is written once, atomically, and read back after."""
from __future__ import annotations

import functools
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Callable

VERSION = "0.1.0"


def cache_dir() -> Path:
    root = os.environ.get("ATTNC_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "attnc")
    return Path(root)


@functools.lru_cache(maxsize=None)
def code_version(backend) -> str:
    """A hash of a backend's renderer and templates: new code never reads an old kernel."""
    from attnc.frontend.parser import resource_dir
    h = hashlib.sha256(Path(backend.__file__).read_bytes())
    for f in sorted((resource_dir("templates")).rglob("*.j2")):
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def cache_key(*parts: str) -> str:
    return hashlib.sha256("\x00".join((VERSION,) + parts).encode()).hexdigest()[:20]


def cached_source(name: str, key: str, make: Callable[[], str]) -> tuple[str, Path | None]:
    """(source, path): read from the cache when present, else made, written atomically and returned.
    A cache that cannot be written (read-only home, full disk) costs only the write."""
    path = cache_dir() / f"{name}-{key}.py"
    try:
        return path.read_text(), path
    except OSError:
        pass
    text = make()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{name}-", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)          # atomic: readers see the old file or the whole new one
    except OSError:
        return text, None
    return text, path


def load_kernel(source: str, name: str, path: Path | None):
    """Execute generated source as a module and return its kernel function."""
    scope: dict = {"__name__": f"attnc_generated.{name}"}
    code = compile(source, str(path) if path else f"<attnc {name}>", "exec")
    exec(code, scope)        # the source is attnc's own output: spec text reaches it only as printed numbers/names
    return scope[name]
