"""An on-disk cache of built traces, keyed by everything a build depends on.

A trace is stored as a Dataset folder ``<cache_dir>/<name>-<key>`` where ``key`` hashes the builder name,
its options, the data file's size and modification time and the tokenizer's identity; change any of them
and the trace is rebuilt. A change to a builder's code is not seen: bump :data:`CACHE_FORMAT` with it
(or delete the folder). The default folder is ``$HF_MARCONI_CACHE/traces`` or
``~/.cache/hf_marconi/traces``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from hf_marconi.trace import Request

from .store import load_trace, save_trace

CACHE_ENV = "HF_MARCONI_CACHE"
CACHE_FORMAT = 1


def default_cache_dir() -> Path:
    root = Path(os.environ[CACHE_ENV]) if CACHE_ENV in os.environ else Path.home() / ".cache" / "hf_marconi"
    return root / "traces"


def cache_key(name: str, options: dict, data_path: Path, tokenizer_identity: str) -> str:
    """A short hash of the build's inputs; ``options`` must be JSON-serialisable."""
    stat = data_path.stat()
    inputs = {
        "format": CACHE_FORMAT,
        "name": name,
        "options": options,
        "data": [data_path.name, stat.st_size, stat.st_mtime_ns],
        "tokenizer": tokenizer_identity,
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def cached(build: Callable[[], list[Request]], cache_dir: Path, entry: str) -> list[Request]:
    """The trace stored under ``entry`` if present, else ``build()``'s result, stored first."""
    path = cache_dir / entry
    if path.is_dir():
        return load_trace(path)
    requests = build()
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = cache_dir / f".{entry}.{os.getpid()}.partial"
    save_trace(requests, partial)
    try:
        partial.rename(path)
    except OSError:  # another process stored the same entry meanwhile: keep theirs
        shutil.rmtree(partial, ignore_errors=True)
    return requests
