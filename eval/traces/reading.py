"""Reading a workload trace from what a user has: for the capacity planner (``python -m eval plan``).

:func:`read_trace` takes the name of a built-in trace (:data:`eval.traces.BUILDERS`), a ``datasets`` folder written
by :func:`eval.traces.save_trace`, or a JSON Lines file (gzip'd when its name ends in ``.gz``) with one request per
line in one of these formats, told apart by the first line's fields:

- **token ids**: ``session_id``, ``arrival`` (seconds), ``input_ids``, ``output_ids``, ``meta`` (optional): the
  schema of :mod:`eval.traces.store` (``save_trace``), and what a ``TraceRecorder`` writes by default;
- **hashed blocks**: ``session_id``, ``arrival`` (seconds), ``input_length``, ``output_length``, ``block_tokens``,
  ``hash_ids``: what a ``TraceRecorder`` writes with a ``hash_salt``; the hashes cover the input, then the output;
- **mooncake**: ``timestamp`` (ms), ``input_length``, ``output_length``, ``hash_ids``: Mooncake's trace format; the
  hashes cover the input only, outputs are synthetic.

Hash ids become synthetic token blocks (:mod:`eval.traces.hash_blocks`), so reuse is replayed at block granularity.
Token-id lines recorded in a namespace (``meta.namespace``, ``meta.namespace_from``: a call with a ``cache_salt``)
are keyed as the live cache keyed them: the ids from ``namespace_from`` on move above every vocabulary by an offset
of the namespace's own, so they match only the same namespace.
"""

from __future__ import annotations

import gzip
import json
from itertools import islice
from pathlib import Path
from typing import Any, Iterator

from hf_marconi.trace import Request

from .hash_blocks import VOCAB_SIZE, BlockTokens
from .mooncake import requests_from_rows as mooncake_requests
from .store import load_trace, requests_from_rows

FORMATS = ("token ids", "hashed blocks", "mooncake")


def read_trace(source: str | Path, max_requests: int | None = None, **builder_options: Any) -> list[Request]:
    """The requests of ``source`` (module docstring), sorted by arrival.

    Args:
        source: a built-in trace's name, a trace folder, or a JSON Lines file.
        max_requests: read only the first requests of a file (built-in traces take ``max_sessions`` /
            ``max_requests`` among ``builder_options``).
        builder_options: options of a built-in trace's builder (e.g. ``arrivals``); refused for files.
    """
    from . import BUILDERS, build_trace

    path = Path(source)
    if str(source) in BUILDERS and not path.exists():
        return build_trace(str(source), **builder_options)
    if builder_options:
        raise TypeError(f"options {sorted(builder_options)} apply to built-in traces only, not to the file {path}")
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is neither a trace file nor a folder, nor a built-in trace ({', '.join(BUILDERS)})"
        )
    if path.is_dir():
        requests = [_keyed(r) for r in load_trace(path)[:max_requests]]
    else:
        rows = list(islice(_rows(path), max_requests))
        if not rows:
            raise ValueError(f"{path} holds no request")
        requests = _from_rows(rows, path)
    return sorted(requests, key=lambda r: r.arrival)


def detect_format(row: dict[str, Any]) -> str:
    """The format (:data:`FORMATS`) of a trace line; ValueError naming the formats when it is none of them."""
    if "input_ids" in row:
        return "token ids"
    if "hash_ids" in row and "timestamp" in row:
        return "mooncake"
    if "hash_ids" in row and "arrival" in row:
        return "hashed blocks"
    raise ValueError(
        f"a trace line has fields {sorted(row)}; expected one of: token ids (session_id, arrival, input_ids, "
        "output_ids), hashed blocks (session_id, arrival, input_length, output_length, block_tokens, hash_ids), "
        "mooncake (timestamp, input_length, output_length, hash_ids)"
    )


def _rows(path: Path) -> Iterator[dict[str, Any]]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}, line {number}: not JSON ({error})") from None


def _from_rows(rows: list[dict[str, Any]], path: Path) -> list[Request]:
    kind = detect_format(rows[0])
    mixed = {detect_format(row) for row in rows} - {kind}
    if mixed:
        raise ValueError(f"{path} mixes trace formats: {kind} and {', '.join(sorted(mixed))}")
    if kind == "token ids":
        return [_keyed(r) for r in requests_from_rows(rows)]
    if kind == "mooncake":
        return mooncake_requests(rows, VOCAB_SIZE)
    return _hashed_requests(rows)


def _hashed_requests(rows: list[dict[str, Any]]) -> list[Request]:
    """Requests of a hashed-blocks trace: the blocks cover the input followed by the output."""
    sizes = {row["block_tokens"] for row in rows}
    if len(sizes) != 1:
        raise ValueError(f"a hashed-blocks trace must use one block size, found {sorted(sizes)}")
    blocks = BlockTokens(VOCAB_SIZE, block_tokens=sizes.pop())
    requests = []
    for row in rows:
        tokens = blocks.tokens(row["hash_ids"], row["input_length"] + row["output_length"])
        split = row["input_length"]
        requests.append(Request(row["session_id"], float(row["arrival"]), tokens[:split], tokens[split:],
                                row.get("meta", {})))
    return requests


def _keyed(request: Request) -> Request:
    """``request`` with the ids of its namespace (``meta.namespace``) moved to that namespace's keys."""
    namespace = request.meta.get("namespace")
    if namespace is None:
        return request
    start = int(request.meta.get("namespace_from", 0))
    offset = (int(namespace, 16) + 1) << 32  # above every id below 2**32, one offset per namespace
    ids = request.input_ids + request.output_ids
    keys = ids[:start] + tuple(token + offset for token in ids[start:])
    split = len(request.input_ids)
    return Request(request.session_id, request.arrival, keys[:split], keys[split:], request.meta)
