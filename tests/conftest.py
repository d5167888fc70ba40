"""Session setup: generated kernels go to a temporary cache, never to ~/.cache/attnc."""
import os
import shutil
import tempfile

_saved: dict = {}


def pytest_configure(config):
    _saved["ATTNC_CACHE_DIR"] = os.environ.get("ATTNC_CACHE_DIR")
    _saved["dir"] = tempfile.mkdtemp(prefix="attnc-test-cache-")
    os.environ["ATTNC_CACHE_DIR"] = _saved["dir"]


def pytest_unconfigure(config):
    old = _saved.pop("ATTNC_CACHE_DIR", None)
    if old is None:
        os.environ.pop("ATTNC_CACHE_DIR", None)
    else:
        os.environ["ATTNC_CACHE_DIR"] = old
    shutil.rmtree(_saved.pop("dir", ""), ignore_errors=True)
