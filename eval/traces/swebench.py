"""SWE-bench agent trajectories: input+output reuse with long, growing contexts.

Each run of ``swebench_trajectories.jsonl.gz`` is one session: a system prompt, the task (first user
message), then alternating assistant actions and user messages carrying the tool observations. The request
for assistant turn ``t`` has everything before it as input and the turn as output; turns follow agent response
times (:mod:`eval.traces.timing`).

With ``collapse_observations`` the history is rendered as agent frameworks do to save context: all but the
``keep_observations`` most recent observations are replaced by a short placeholder. This breaks prefix reuse
at the first collapsed observation (request ``t+1`` no longer starts with request ``t``'s input), which is
what measuring it is for.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm

from hf_marconi.trace import Request

from .sessions import Message, SessionTiming, concatenate, session_requests
from .sources import data_file, read_jsonl, resolve_data_dir
from .timing import agent_response_times, session_start
from .tokenizer import TextEncoder, message_text, resolve_text_encoder

DATA_FILE = "swebench_trajectories.jsonl.gz"
COLLAPSED_OBSERVATION = {"role": "user", "content": "[older observation omitted]"}


def build_swebench(
    data_dir: str | Path | None = None,
    tokenizer: str | Path | TextEncoder | None = None,
    max_input_tokens: int = 32768,
    mean_response_s: float = 5.0,
    sessions_per_second: float = 1.0,
    seed: int = 0,
    arrivals: str = "poisson",
    collapse_observations: bool = False,
    keep_observations: int = 3,
    max_sessions: int | None = None,
) -> list[Request]:
    """The SWE-bench agent trace, sorted by arrival.

    Args:
        data_dir: folder holding the workload files (default: the shared data folder).
        tokenizer: local tokenizer folder or a :class:`TextEncoder` (default: GPT-2 in ``data_dir``).
        max_input_tokens: a session ends before its first request with a longer input.
        mean_response_s: mean agent response time between requests of a session.
        sessions_per_second: session ``i`` starts at ``i / sessions_per_second``.
        seed: seeds the response times.
        arrivals: how response times are drawn: ``"poisson"`` (whole seconds, the Marconi artifact's convention) or
            ``"exponential"`` (see :mod:`eval.traces.timing`).
        collapse_observations: replace older tool observations by a placeholder message.
        keep_observations: how many most recent observations stay whole when collapsing.
        max_sessions: use only the first runs of the file (small slices for tests).
    """
    if keep_observations < 0:
        raise ValueError(f"keep_observations must be >= 0, got {keep_observations}")
    path = data_file(data_dir, DATA_FILE)
    encoder = resolve_text_encoder(tokenizer, resolve_data_dir(data_dir))
    runs = list(read_jsonl(path))[:max_sessions]
    texts = [message_text(m) for run in runs for m in run["messages"]]
    token_ids = iter(encoder.encode_texts(texts, desc="swebench: tokenizing"))
    (placeholder,) = encoder.encode_messages([COLLAPSED_OBSERVATION])
    render = _collapsing_render(placeholder, keep_observations) if collapse_observations else concatenate
    requests: list[Request] = []
    for index, run in enumerate(tqdm(runs, desc="swebench: sessions", disable=None, leave=False)):
        messages = _messages(run["messages"], token_ids)
        timing = SessionTiming(
            session_start(index, sessions_per_second), agent_response_times(seed, index, mean_response_s, arrivals)
        )
        meta = {"dataset": "swebench", "session": index, "instance_id": run["instance_id"]}
        requests += session_requests(f"swebench-{index}", messages, timing, max_input_tokens, meta, render)
    requests.sort(key=lambda request: request.arrival)
    return requests


def _messages(raw_messages: list[dict], token_ids) -> list[Message]:
    """Tokenized messages; user messages after the first one (the task) are tool observations."""
    messages = []
    seen_task = False
    for raw in raw_messages:
        is_user = raw["role"] == "user"
        messages.append(
            Message(next(token_ids), is_model_turn=raw["role"] == "assistant", observation=is_user and seen_task)
        )
        seen_task = seen_task or is_user
    return messages


def _collapsing_render(placeholder: tuple[int, ...], keep_observations: int):
    def render(history: Sequence[Message]) -> tuple[int, ...]:
        observations = [i for i, message in enumerate(history) if message.observation]
        collapsed = set(observations[: max(len(observations) - keep_observations, 0)])
        return tuple(
            token
            for i, message in enumerate(history)
            for token in (placeholder if i in collapsed else message.tokens)
        )

    return render
