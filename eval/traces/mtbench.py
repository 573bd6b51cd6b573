"""MT-bench: 80 two-turn chat sessions with synthetic answers.

The file holds the two user turns of every question but no answers, so the model's answers are SYNTHETIC:
``output_tokens`` token ids drawn uniformly from the tokenizer's vocabulary by a generator seeded with
``(seed, question_id, turn)``. They stand in for real answers in the history of turn 2, so the reuse
structure (turn 2's input = turn 1's input + answer + new question) is real, the answer text is not.
Turn 2 arrives after the typing time of its words at 90 words per minute.
"""

from __future__ import annotations

from pathlib import Path

from hf_marconi.trace import Request

from .sessions import Message, SessionTiming, session_requests
from .sources import data_file, read_jsonl, resolve_data_dir
from .synthetic import synthetic_ids
from .timing import session_start, word_count
from .tokenizer import TextEncoder, resolve_text_encoder

DATA_FILE = "mt_bench_questions.jsonl"


def build_mtbench(
    data_dir: str | Path | None = None,
    tokenizer: str | Path | TextEncoder | None = None,
    max_input_tokens: int = 32768,
    sessions_per_second: float = 1.0,
    seed: int = 0,
    output_tokens: int = 256,
    max_sessions: int | None = None,
) -> list[Request]:
    """The MT-bench trace, sorted by arrival.

    Args:
        output_tokens: length of every synthetic answer.
        seed: seeds the synthetic answers.
        Others as in :func:`eval.traces.build_swebench`.
    """
    if output_tokens < 1:
        raise ValueError(f"output_tokens must be >= 1, got {output_tokens}")
    path = data_file(data_dir, DATA_FILE)
    encoder = resolve_text_encoder(tokenizer, resolve_data_dir(data_dir))
    questions = list(read_jsonl(path))[:max_sessions]
    turn_tokens = iter(
        encoder.encode_messages(
            [{"role": "user", "content": turn} for q in questions for turn in q["turns"]], desc="mtbench: tokenizing"
        )
    )
    requests: list[Request] = []
    for index, question in enumerate(questions):
        messages = []
        for turn_index, turn in enumerate(question["turns"]):
            messages.append(Message(next(turn_tokens), typed_by_user=True, words=word_count(turn)))
            answer_ids = synthetic_ids(encoder.vocab_size, output_tokens, seed, question["question_id"], turn_index)
            answer = tuple(answer_ids.tolist())
            messages.append(Message(answer, is_model_turn=True))
        meta = {
            "dataset": "mtbench",
            "session": index,
            "question_id": question["question_id"],
            "category": question["category"],
        }
        timing = SessionTiming(session_start(index, sessions_per_second))
        requests += session_requests(f"mtbench-{question['question_id']}", messages, timing, max_input_tokens, meta)
    requests.sort(key=lambda request: request.arrival)
    return requests
