"""OpenAssistant conversation trees: branching chat.

Every root-to-leaf path of every tree is a session, so sibling branches are sessions sharing the prefix up
to their branch point (like users regenerating or editing a reply). A request is made at every assistant
message of a path; requests of the shared part repeat in every path through it. The next request of a
session waits for the typing time of the user's message ("prompter" in the data) at 90 words per minute.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from tqdm.auto import tqdm

from hf_marconi.trace import Request

from .sessions import Message, SessionTiming, session_requests
from .sources import data_file, read_jsonl, resolve_data_dir
from .timing import session_start, word_count
from .tokenizer import TextEncoder, resolve_text_encoder

DATA_FILE = "oasst_en_100_trees.jsonl.gz"
_ROLES = {"prompter": "user", "assistant": "assistant"}


def build_oasst(
    data_dir: str | Path | None = None,
    tokenizer: str | Path | TextEncoder | None = None,
    max_input_tokens: int = 32768,
    sessions_per_second: float = 1.0,
    max_sessions: int | None = None,
) -> list[Request]:
    """The OpenAssistant trace, sorted by arrival.

    Sessions are numbered tree by tree, paths in depth-first order; ``max_sessions`` keeps the first ones.
    Other options as in :func:`eval.traces.build_swebench` (no agent turns here, so no response time).
    """
    path = data_file(data_dir, DATA_FILE)
    encoder = resolve_text_encoder(tokenizer, resolve_data_dir(data_dir))
    paths = [(tree["message_tree_id"], branch) for tree in read_jsonl(path) for branch in _root_to_leaf(tree["prompt"])]
    paths = paths[:max_sessions]
    nodes = {id(node): node for _, branch in paths for node in branch}
    tokens = dict(
        zip(nodes, encoder.encode_messages([_message(node) for node in nodes.values()], desc="oasst: tokenizing"))
    )
    requests: list[Request] = []
    for index, (tree_id, branch) in enumerate(tqdm(paths, desc="oasst: sessions", disable=None, leave=False)):
        messages = [
            Message(
                tokens[id(node)],
                is_model_turn=node["role"] == "assistant",
                typed_by_user=node["role"] == "prompter",
                words=word_count(node["text"]),
            )
            for node in branch
        ]
        timing = SessionTiming(session_start(index, sessions_per_second))
        meta = {
            "dataset": "oasst",
            "session": index,
            "message_tree_id": tree_id,
            "leaf_message_id": branch[-1]["message_id"],
        }
        requests += session_requests(f"oasst-{index}", messages, timing, max_input_tokens, meta)
    requests.sort(key=lambda request: request.arrival)
    return requests


def _root_to_leaf(node: dict, above: tuple[dict, ...] = ()) -> Iterator[list[dict]]:
    """Every path from ``node`` down to a leaf, ``above`` prepended."""
    here = (*above, node)
    if not node["replies"]:
        yield list(here)
    for reply in node["replies"]:
        yield from _root_to_leaf(reply, here)


def _message(node: dict) -> dict:
    if node["role"] not in _ROLES:
        raise ValueError(f"OpenAssistant message {node['message_id']} has unknown role {node['role']!r}")
    return {"role": _ROLES[node["role"]], "content": node["text"]}
