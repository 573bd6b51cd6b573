"""Saving and loading traces: a ``datasets.Dataset`` folder or a JSON Lines file.

Schema (one row / line per request, in arrival order):

==============  ==============================  ==================================================
field           type                            meaning
==============  ==============================  ==================================================
``session_id``  string                          requests of one conversation / agent run share it
``arrival``     float64                         seconds from the start of the trace (Unix time in
                                                a recording of ``hf_marconi.recording``)
``input_ids``   list of int32                   the whole prompt as token ids (never empty)
``output_ids``  list of int32                   the tokens the model produced (may be empty)
``meta``        string (Dataset) / object       provenance: ``dataset``, ``turn`` and builder-specific
                (JSON Lines)                    keys; JSON-encoded text in a Dataset
==============  ==============================  ==================================================

A path ending in ``.jsonl`` or ``.jsonl.gz`` is JSON Lines (gzip'd for ``.gz``); any other path is a
``datasets.Dataset.save_to_disk`` folder.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from hf_marconi.trace import Request

from .shared_ints import SharedInts

FIELDS = ("session_id", "arrival", "input_ids", "output_ids", "meta")


def is_jsonl_path(path: str | Path) -> bool:
    name = Path(path).name
    return name.endswith(".jsonl") or name.endswith(".jsonl.gz")


def save_trace(requests: Sequence[Request], path: str | Path) -> None:
    """Write ``requests`` to ``path`` (JSON Lines or a Dataset folder, by the path's name)."""
    if is_jsonl_path(path):
        _save_jsonl(requests, Path(path))
    else:
        _to_dataset(requests).save_to_disk(str(path))


def load_trace(path: str | Path) -> list[Request]:
    """Read a trace written by :func:`save_trace`."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"trace {path} not found: build it with `python -m eval traces build --out ...`")
    if is_jsonl_path(path):
        return _load_jsonl(path)
    import datasets

    return _from_table(datasets.load_from_disk(str(path)).data.table)


def _save_jsonl(requests: Sequence[Request], path: Path) -> None:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as out:
        for request in requests:
            row = {
                "session_id": request.session_id,
                "arrival": request.arrival,
                "input_ids": list(request.input_ids),
                "output_ids": list(request.output_ids),
                "meta": request.meta,
            }
            out.write(json.dumps(row) + "\n")


def _load_jsonl(path: Path) -> list[Request]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as lines:
        return requests_from_rows(json.loads(line) for line in lines if line.strip())


def requests_from_rows(rows: Iterable[dict]) -> list[Request]:
    """Requests from rows of the schema above (``meta`` may be missing), in the rows' order."""
    shared = SharedInts()
    return [
        Request(
            row["session_id"],
            float(row["arrival"]),
            shared.tuple_of(row["input_ids"]),
            shared.tuple_of(row["output_ids"]),
            row.get("meta", {}),
        )
        for row in rows
    ]


def _list_array(sequences: Sequence[tuple[int, ...]]) -> pa.ListArray:
    lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
    offsets = np.zeros(len(sequences) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    values = np.fromiter((t for s in sequences for t in s), dtype=np.int32, count=int(offsets[-1]))
    return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values))


def _to_dataset(requests: Sequence[Request]):
    import datasets

    table = pa.table(
        {
            "session_id": pa.array([r.session_id for r in requests], pa.string()),
            "arrival": pa.array([r.arrival for r in requests], pa.float64()),
            "input_ids": _list_array([r.input_ids for r in requests]),
            "output_ids": _list_array([r.output_ids for r in requests]),
            "meta": pa.array([json.dumps(r.meta) for r in requests], pa.string()),
        }
    )
    return datasets.Dataset(table)


def _from_table(table: pa.Table) -> list[Request]:
    missing = [name for name in FIELDS if name not in table.column_names]
    if missing:
        raise ValueError(f"not a trace: columns {missing} missing; write traces with eval.traces.save_trace")
    shared = SharedInts()
    inputs = shared.tuples_of_column(table.column("input_ids"))
    outputs = shared.tuples_of_column(table.column("output_ids"))
    return [
        Request(session_id, arrival, input_ids, output_ids, json.loads(meta))
        for session_id, arrival, input_ids, output_ids, meta in zip(
            table.column("session_id").to_pylist(),
            table.column("arrival").to_pylist(),
            inputs,
            outputs,
            table.column("meta").to_pylist(),
        )
    ]
