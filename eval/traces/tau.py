"""tau-bench airline: customer-service sessions sharing one long policy system prompt.

Each of the 200 runs is a session: the ~1.4K-token airline policy (the same for every run: purely-input
reuse), then a simulated customer, the agent's replies and tool calls, and the tools' results (input+output
reuse). A request is made at every assistant message. An assistant message that calls tools has empty
content in the data; its tool calls, JSON-encoded, are used as its content. Tool results are history like
any other message. After a customer message the next request waits for the typing time of its words;
after tool results it waits for an agent response time (:mod:`eval.traces.timing`).
"""

from __future__ import annotations

import json
from pathlib import Path

from tqdm.auto import tqdm

from hf_marconi.trace import Request

from .sessions import Message, SessionTiming, session_requests
from .sources import data_file, read_jsonl, resolve_data_dir
from .timing import agent_response_times, session_start, word_count
from .tokenizer import TextEncoder, resolve_text_encoder

DATA_FILE = "tau_bench_airline.jsonl.gz"


def build_tau(
    data_dir: str | Path | None = None,
    tokenizer: str | Path | TextEncoder | None = None,
    max_input_tokens: int = 32768,
    mean_response_s: float = 5.0,
    sessions_per_second: float = 1.0,
    seed: int = 0,
    arrivals: str = "poisson",
    max_sessions: int | None = None,
) -> list[Request]:
    """The tau-bench airline trace, sorted by arrival (options as in :func:`eval.traces.build_swebench`)."""
    path = data_file(data_dir, DATA_FILE)
    encoder = resolve_text_encoder(tokenizer, resolve_data_dir(data_dir))
    runs = list(read_jsonl(path))[:max_sessions]
    encoded = [_tokenized_message(m) for run in runs for m in run["messages"]]
    token_ids = iter(encoder.encode_messages(encoded, desc="tau: tokenizing"))
    requests: list[Request] = []
    for index, run in enumerate(tqdm(runs, desc="tau: sessions", disable=None, leave=False)):
        messages = [
            Message(
                next(token_ids),
                is_model_turn=m["role"] == "assistant",
                typed_by_user=m["role"] == "user",
                words=word_count(m["content"]),
                observation=m["role"] == "tool",
            )
            for m in run["messages"]
        ]
        timing = SessionTiming(
            session_start(index, sessions_per_second), agent_response_times(seed, index, mean_response_s, arrivals)
        )
        meta = {
            "dataset": "tau",
            "session": index,
            "task_id": run["task_id"],
            "trial": run["trial"],
            "reward": run["reward"],
        }
        requests += session_requests(f"tau-{run['task_id']}-{run['trial']}", messages, timing, max_input_tokens, meta)
    requests.sort(key=lambda request: request.arrival)
    return requests


def _tokenized_message(message: dict) -> dict:
    """The message as it is JSON-encoded for tokenizing: tool calls become the content."""
    content = json.dumps(message["tool_calls"]) if message.get("tool_calls") else message["content"]
    if message["role"] == "tool":
        return {"role": "tool", "name": message["name"], "content": content}
    return {"role": message["role"], "content": content}
