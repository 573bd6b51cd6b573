"""BIG-Bench-Hard few-shot chain-of-thought queries: purely-input reuse.

Every example is a one-request session whose input is two messages, the task's chain-of-thought few-shot
prompt and the query (``Q: <input>\\nA: Let's think step by step.``), and whose output is the target answer.
All queries of a task therefore share the prompt's tokens as a prefix. Examples of all tasks are
interleaved in a seeded random order, so tasks compete for the cache as different users' requests would;
session ``i`` of that order arrives at ``i / sessions_per_second``.
"""

from __future__ import annotations

import random
from pathlib import Path

from hf_marconi.trace import Request

from .sources import data_file, read_jsonl, resolve_data_dir
from .timing import session_start
from .tokenizer import TextEncoder, resolve_text_encoder

DATA_FILE = "bbh_fewshot.jsonl.gz"


def build_bbh(
    data_dir: str | Path | None = None,
    tokenizer: str | Path | TextEncoder | None = None,
    max_input_tokens: int = 32768,
    sessions_per_second: float = 1.0,
    seed: int = 0,
    max_tasks: int | None = None,
    max_examples_per_task: int | None = None,
    max_sessions: int | None = None,
) -> list[Request]:
    """The BIG-Bench-Hard trace, sorted by arrival.

    Args:
        max_input_tokens: queries with a longer input are dropped.
        seed: seeds the interleaving of the tasks' examples.
        max_tasks: use only the first tasks of the file.
        max_examples_per_task: use only the first examples of each task.
        max_sessions: keep only the first queries of the interleaved order.
        Others as in :func:`eval.traces.build_swebench`.
    """
    path = data_file(data_dir, DATA_FILE)
    encoder = resolve_text_encoder(tokenizer, resolve_data_dir(data_dir))
    tasks = list(read_jsonl(path))[:max_tasks]
    queries = [(task, example) for task in tasks for example in task["examples"][:max_examples_per_task]]
    random.Random(seed).shuffle(queries)
    queries = queries[:max_sessions]
    prompt_messages = [{"role": "user", "content": task["cot_prompt"]} for task in tasks]
    prompts = dict(zip((task["task"] for task in tasks), encoder.encode_messages(prompt_messages, "bbh: prompts")))
    query_tokens = encoder.encode_messages(
        [{"role": "user", "content": f"Q: {example['input']}\nA: Let's think step by step."} for _, example in queries],
        desc="bbh: queries",
    )
    answer_tokens = encoder.encode_messages(
        [{"role": "assistant", "content": example["target"]} for _, example in queries], desc="bbh: answers"
    )
    requests = []
    for index, ((task, _), query, answer) in enumerate(zip(queries, query_tokens, answer_tokens)):
        input_ids = prompts[task["task"]] + query
        if len(input_ids) <= max_input_tokens:
            meta = {"dataset": "bbh", "session": index, "task": task["task"], "turn": 0}
            requests.append(Request(f"bbh-{index}", session_start(index, sessions_per_second), input_ids, answer, meta))
    return requests
