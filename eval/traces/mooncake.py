"""The Mooncake production chat trace: real arrival times and real prefix structure, synthetic tokens.

Each request of the trace gives its arrival (ms), input and output lengths and the hash ids of its
consecutive 512-token input blocks; equal ids mean an equal prefix block. Every hash id is mapped to its own
block of 512 synthetic token ids (:mod:`eval.traces.hash_blocks`, drawn from the tokenizer's vocabulary), and a
request's input is its blocks back to back, the last block cut to the input length when that is not a multiple
of 512. Outputs are ``output_length`` synthetic ids seeded with ``(seed, request index)``; they are not part of
any later input (the hash blocks alone say what a later request shares).

The trace has no session ids; they are inferred from the prefix structure. Every request shares the first
block (a common system prompt), so a request continues the session of the latest earlier request whose
complete (512-token) blocks, at least two of them, are all a prefix of its own blocks: that request's turn
plus the new messages is this request. Otherwise it starts a new session. Arrival = timestamp / 1000.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from tqdm.auto import tqdm

from hf_marconi.trace import Request

from .hash_blocks import BLOCK_TOKENS, BlockTokens
from .synthetic import synthetic_ids
from .sources import data_file, read_jsonl, resolve_data_dir
from .tokenizer import TextEncoder, resolve_text_encoder

DATA_FILE = "mooncake_conversation_trace.jsonl.gz"
_MIN_CONTINUED_BLOCKS = 2


def build_mooncake(
    data_dir: str | Path | None = None,
    tokenizer: str | Path | TextEncoder | None = None,
    max_input_tokens: int = 32768,
    seed: int = 0,
    max_requests: int | None = None,
) -> list[Request]:
    """The Mooncake trace, sorted by arrival.

    Args:
        tokenizer: only its vocabulary size is used (default: GPT-2 in ``data_dir``, 50,257).
        max_input_tokens: a session ends before its first request with a longer input.
        seed: seeds the synthetic token ids.
        max_requests: use only the first requests of the file.
    """
    path = data_file(data_dir, DATA_FILE)
    vocab_size = resolve_text_encoder(tokenizer, resolve_data_dir(data_dir)).vocab_size
    return requests_from_rows(list(read_jsonl(path))[:max_requests], vocab_size, max_input_tokens, seed)


def requests_from_rows(
    rows: list[dict], vocab_size: int, max_input_tokens: int = 32768, seed: int = 0
) -> list[Request]:
    """The requests of Mooncake-format rows (``timestamp`` ms, ``input_length``, ``output_length``, ``hash_ids``),
    sorted by arrival, as :func:`build_mooncake` builds them from the bundled file."""
    sessions = _infer_sessions(rows)
    blocks = BlockTokens(vocab_size, seed, BLOCK_TOKENS)
    ended: set[int] = set()
    turns: Counter[int] = Counter()
    requests = []
    for index, (row, session) in enumerate(zip(tqdm(rows, desc="mooncake", disable=None, leave=False), sessions)):
        if session in ended or row["input_length"] > max_input_tokens:
            ended.add(session)
            continue
        input_ids = blocks.tokens(row["hash_ids"], row["input_length"])
        output_ids = blocks.shared.tuple_of(synthetic_ids(vocab_size, row["output_length"], seed, index))
        meta = {"dataset": "mooncake", "session": session, "row": index, "turn": turns[session]}
        requests.append(Request(f"mooncake-{session}", row["timestamp"] / 1000.0, input_ids, output_ids, meta))
        turns[session] += 1
    requests.sort(key=lambda request: request.arrival)
    return requests


def _infer_sessions(rows: list[dict]) -> list[int]:
    """A session number per row (see the module docstring), with a trie over complete-block prefixes."""
    children: dict[tuple[int, int], int] = {}
    session_ending_at: dict[int, int] = {}
    sessions: list[int] = []
    session_count = 0
    for row in rows:
        node, session = 0, None
        for depth, hash_id in enumerate(row["hash_ids"], start=1):
            node = children.get((node, hash_id))
            if node is None:
                break
            if depth >= _MIN_CONTINUED_BLOCKS and node in session_ending_at:
                session = session_ending_at[node]
        if session is None:
            session, session_count = session_count, session_count + 1
        sessions.append(session)
        complete = len(row["hash_ids"]) - (1 if row["input_length"] % BLOCK_TOKENS else 0)
        node = 0
        for hash_id in row["hash_ids"][:complete]:
            node = children.setdefault((node, hash_id), len(children) + 1)
        if complete:
            session_ending_at[node] = session
    return sessions
