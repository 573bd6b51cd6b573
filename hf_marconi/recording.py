"""Recording a live cache's traffic as a trace the capacity planner replays (``python -m eval plan``).

A :class:`TraceRecorder` given to ``MarconiCache(model, ..., recorder=recorder)`` (or to ``MarconiPipeline(...,
record_to=path)``) appends one JSON line per call that admitted its states, in the order the cache committed them:

- the call's session id (``""`` unless the call ran inside :func:`session`; chat sessions of
  :class:`~hf_marconi.pipeline.MarconiPipeline` set theirs),
- its arrival (Unix time in seconds of the lookup),
- the prompt as ``input_ids`` and the tokens fed after it as ``output_ids``: what the cache admitted, so the
  generated tokens but the last one (the last token ``generate`` returns is never fed back to the model). A
  replay of these requests through the same policy and capacity reproduces the live cache's decisions and counters.

That is the JSON Lines trace schema of ``eval.traces.store`` (``meta.source`` is ``"hf_marconi.recording"``). With
``hash_salt``, no token id reaches the disk: a line holds ``input_length``, ``output_length`` and ``hash_ids``,
one salted hash per 512-token block of the input followed by the output, chained as Mooncake's trace chains its
hash ids (a block's hash covers its own tokens and the hash of the block before, so two sequences share the hash of
block i exactly when their first i + 1 blocks are equal). The planner replays such a trace at block granularity:
reuse is counted up to the last whole block two requests share.

Calls in a namespace (``cache_salt=``) carry ``meta.namespace`` (the first 16 hex digits of the salt's SHA-256, not
the salt) and ``meta.namespace_from``; the planner keeps namespaces apart as the live cache did (hashed lines mix
them into their hashes). Calls that ran without reuse, raised, or fed something other than the prompt's continuation
(nothing admitted) are not recorded; each row of a batched call is one line. A replay of a token-id trace is exact
when the recording started with the cache's store empty and the calls ran one after another, one sequence each
(overlapping calls in several threads, and the rows of a batch, which also capture branch points between rows, are
approximated by a replay in arrival order).

Cost on the caller's path: copying the call's token list and appending it to a queue; a writer thread formats and
writes the lines and flushes the file after each batch. :meth:`TraceRecorder.close` (also run at interpreter exit)
writes what is queued.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import threading
from array import array
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

logger = logging.getLogger(__name__)

BLOCK_TOKENS = 512
SOURCE = "hf_marconi.recording"  # hf_marconi.simulator.RECORDED: its replay commits output_ids whole
_SESSION: ContextVar[str] = ContextVar("hf_marconi_session", default="")


@contextmanager
def session(session_id: str) -> Iterator[None]:
    """Record the calls made inside the block (in this thread or task) under ``session_id``."""
    if not isinstance(session_id, str):
        raise TypeError(f"session_id must be a string, got {type(session_id).__name__}")
    token = _SESSION.set(session_id)
    try:
        yield
    finally:
        _SESSION.reset(token)


def namespace_id(name: str) -> str:
    """What a recorded line keeps of a namespace's name: 16 hex digits of its SHA-256."""
    return hashlib.sha256(name.encode()).hexdigest()[:16]


def block_hashes(
    tokens: Sequence[int], salt: bytes | str, block_tokens: int = BLOCK_TOKENS, namespace: str = "",
    namespace_from: int = 0,
) -> list[int]:
    """Chained salted hashes of the consecutive ``block_tokens``-token blocks of ``tokens`` (the last block may be
    shorter), each a non-negative int below 2**63.

    Block i's hash is BLAKE2b, keyed by the salt, over block i-1's hash and block i's token ids, so equal hashes at i
    mean equal first i + 1 blocks. With a ``namespace`` (a :func:`namespace_id`), the blocks holding positions from
    ``namespace_from`` on also cover the namespace and where it starts in the block: they never match another
    namespace's blocks."""
    key = hashlib.sha256(salt.encode() if isinstance(salt, str) else salt).digest()
    marker = bytes.fromhex(namespace) if namespace else b""
    hashes, previous = [], b""
    for start in range(0, len(tokens), block_tokens):
        block = tokens[start : start + block_tokens]
        data = previous + array("Q", block).tobytes()
        if marker and start + len(block) > namespace_from:
            # 12 bytes: never a multiple of 8, so a marked block cannot read as an unmarked one with more tokens.
            data += marker + max(0, namespace_from - start).to_bytes(4, "big")
        previous = hashlib.blake2b(data, digest_size=8, key=key).digest()
        hashes.append(int.from_bytes(previous, "big") >> 1)
    return hashes


@dataclass(frozen=True)
class _Call:
    session_id: str
    arrival: float
    tokens: tuple[int, ...]  # the prompt followed by the tokens fed after it
    input_len: int
    namespace: str  # namespace_id of the call's cache_salt, "" outside any namespace
    namespace_from: int


class TraceRecorder:
    """Appends one JSON line per call of a live cache to ``path`` (see the module docstring).

    Args:
        path: the trace file (JSON Lines), created or appended to.
        hash_salt: when given, lines hold salted block hashes instead of token ids; keep the salt to compare traces
            recorded with it, and secret if the hashes must not confirm guessed contents.
        block_tokens: tokens per hashed block (512, Mooncake's block size).

    Thread-safe: calls of several threads are queued under one lock and written by one writer thread.
    """

    def __init__(self, path: str | Path, hash_salt: str | bytes | None = None, block_tokens: int = BLOCK_TOKENS):
        if hash_salt is not None and not hash_salt:
            raise ValueError("hash_salt must be a non-empty string or bytes (or None to record token ids)")
        if block_tokens < 1:
            raise ValueError(f"block_tokens must be >= 1, got {block_tokens}")
        self.path = Path(path)
        self.hash_salt = hash_salt
        self.block_tokens = block_tokens
        self._file = self.path.open("a", encoding="utf-8")
        self._ready = threading.Condition()
        self._queue: list[_Call] = []
        self._queued = 0  # calls accepted by record()
        self._handled = 0  # calls the writer has written (or failed to write)
        self._closing = False
        self.failed = 0  # calls lost to a write error (logged)
        self._writer = threading.Thread(target=self._write_loop, name="hf_marconi-recorder", daemon=True)
        self._writer.start()
        atexit.register(self.close)

    @property
    def recorded(self) -> int:
        """Calls accepted so far."""
        return self._queued

    def record(self, tokens: Sequence[int], input_len: int, arrival: float, salt: Any = None) -> None:
        """Queue one call: ``tokens`` (its prompt of ``input_len`` tokens, then the tokens fed after it), its
        ``arrival`` (Unix seconds) and its namespace (a ``CacheSalt`` with ``name`` and ``start``, or None). Never
        raises into the call: a closed recorder drops the call with a warning."""
        namespace = namespace_id(salt.name) if salt is not None else ""
        start = salt.start if salt is not None else 0
        call = _Call(_SESSION.get(), arrival, tuple(tokens), input_len, namespace, start)
        with self._ready:
            if self._closing:
                logger.warning("TraceRecorder(%s) is closed; a call was not recorded", self.path)
                return
            self._queue.append(call)
            self._queued += 1
            self._ready.notify_all()

    def flush(self, timeout_s: float | None = 60.0) -> bool:
        """Wait until every call queued so far is written and flushed; False if ``timeout_s`` ran out first."""
        with self._ready:
            target = self._queued
            return self._ready.wait_for(lambda: self._handled >= target, timeout=timeout_s)

    def close(self, timeout_s: float = 60.0) -> None:
        """Write what is queued, stop the writer and close the file. Later calls are not recorded."""
        with self._ready:
            if self._closing:
                return
            self._closing = True
            self._ready.notify_all()
        self._writer.join(timeout=timeout_s)
        if self._writer.is_alive():
            logger.warning("TraceRecorder(%s): the writer did not finish within %.0f s", self.path, timeout_s)
        else:
            self._file.close()
        atexit.unregister(self.close)

    def __enter__(self) -> "TraceRecorder":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = "hashed blocks" if self.hash_salt is not None else "token ids"
        return f"TraceRecorder({str(self.path)!r}, {mode}, {self._queued} calls recorded)"

    # ------------------------------------------------------------------------------------------------ writing
    def _write_loop(self) -> None:
        while True:
            with self._ready:
                self._ready.wait_for(lambda: self._queue or self._closing)
                batch, self._queue = self._queue, []
                done = self._closing
            if batch:
                self._write(batch)
            with self._ready:
                self._handled += len(batch)
                self._ready.notify_all()
            if done:
                return

    def _write(self, batch: list[_Call]) -> None:
        try:
            self._file.write("".join(json.dumps(self.line(call), separators=(",", ":")) + "\n" for call in batch))
            self._file.flush()
        except (OSError, ValueError) as error:  # a full disk or a closed file must not kill the writer
            self.failed += len(batch)
            logger.warning("TraceRecorder(%s) could not write %d call(s): %s", self.path, len(batch), error)

    def line(self, call: _Call) -> dict[str, Any]:
        """The JSON object written for ``call``."""
        meta: dict[str, Any] = {"source": SOURCE}
        if call.namespace:
            meta.update(namespace=call.namespace, namespace_from=call.namespace_from)
        row: dict[str, Any] = {"session_id": call.session_id, "arrival": call.arrival}
        if self.hash_salt is None:
            row.update(input_ids=list(call.tokens[: call.input_len]), output_ids=list(call.tokens[call.input_len :]))
        else:
            row.update(
                input_length=call.input_len,
                output_length=len(call.tokens) - call.input_len,
                block_tokens=self.block_tokens,
                hash_ids=block_hashes(call.tokens, self.hash_salt, self.block_tokens, call.namespace,
                                      call.namespace_from),
            )
        row["meta"] = meta
        return row
