"""Where the raw workload files live and how to read them."""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterator
from pathlib import Path

DATA_DIR_ENV = "HF_MARCONI_DATA"


def default_data_dir() -> Path:
    """``$HF_MARCONI_DATA`` if set, else ``shared/data`` beside the repository checkout."""
    if DATA_DIR_ENV in os.environ:
        return Path(os.environ[DATA_DIR_ENV])
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"


def resolve_data_dir(data_dir: str | Path | None) -> Path:
    """``data_dir`` as a path; ``None`` means :func:`default_data_dir`."""
    return Path(data_dir) if data_dir is not None else default_data_dir()


def data_file(data_dir: str | Path | None, file_name: str) -> Path:
    """The path of ``file_name`` in ``data_dir`` (default: :func:`default_data_dir`), checked to exist."""
    path = resolve_data_dir(data_dir) / file_name
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: pass the folder holding the workload files as data_dir (CLI: --data-dir) "
            f"or set ${DATA_DIR_ENV}"
        )
    return path


def read_jsonl(path: Path) -> Iterator[dict]:
    """The records of a JSON Lines file, gzip'd when its name ends in ``.gz``."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as lines:
        for line in lines:
            if line.strip():
                yield json.loads(line)
