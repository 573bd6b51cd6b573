"""Recording a live cache's calls (hf_marconi.recording): what a line holds, hashed blocks, threads, the pipeline."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_in_threads
from eval.traces.reading import read_trace
from hf_marconi import MarconiCache
from hf_marconi.pipeline import MarconiPipeline, byte_level_tokenizer
from hf_marconi.recording import SOURCE, TraceRecorder, block_hashes, namespace_id, session
from hf_marconi.testing import build_model

SETTINGS = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)


@pytest.fixture(scope="module")
def model():
    return build_model("bamba")


def _tokens(n: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 250, (1, n), generator=torch.Generator().manual_seed(seed))


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _two_turns(model, cache, salt: dict | None = None) -> list[torch.Tensor]:
    """Two turns of one conversation; returns each call's whole output sequence."""
    with session("conversation-1"):
        first = model.generate(_tokens(20, 1), past_key_values=cache, **(salt or {}), **SETTINGS)
        second = model.generate(torch.cat([first, _tokens(6, 2)], -1), past_key_values=cache, **(salt or {}),
                                **SETTINGS)
    return [first, second]


def test_a_line_holds_what_the_cache_admitted(model, tmp_path):
    path = tmp_path / "calls.jsonl"
    with TraceRecorder(path) as recorder:
        cache = MarconiCache(model, capacity_bytes=2**24, recorder=recorder)
        outputs = _two_turns(model, cache)
        model.generate(_tokens(9, 3), past_key_values=cache, **SETTINGS)  # outside any session
    first, second, third = _lines(path)
    assert first["session_id"] == second["session_id"] == "conversation-1" and third["session_id"] == ""
    assert first["arrival"] <= second["arrival"] <= third["arrival"]
    assert first["meta"] == {"source": SOURCE}
    # The prompt, then every generated token but the last: generate never feeds its last token to the model.
    assert first["input_ids"] == _tokens(20, 1)[0].tolist()
    assert first["input_ids"] + first["output_ids"] == outputs[0][0, :-1].tolist()
    assert second["input_ids"] == torch.cat([outputs[0], _tokens(6, 2)], -1)[0].tolist()
    assert len(second["output_ids"]) == SETTINGS["max_new_tokens"] - 1
    assert recorder.recorded == 3 and recorder.failed == 0


def test_calls_in_a_namespace_are_replayed_in_it(model, tmp_path):
    path = tmp_path / "salted.jsonl"
    with TraceRecorder(path) as recorder:
        cache = MarconiCache(model, capacity_bytes=2**24, recorder=recorder)
        _two_turns(model, cache, {"cache_salt": "tenant-a", "cache_salt_from": 8})
        model.generate(_tokens(20, 1), past_key_values=cache, **SETTINGS)  # the same prompt, shared space
    lines = _lines(path)
    assert lines[0]["meta"] == {"source": SOURCE, "namespace": namespace_id("tenant-a"), "namespace_from": 8}
    assert "tenant-a" not in path.read_text()
    salted, again, shared = sorted(read_trace(path), key=lambda r: r.arrival)
    assert salted.input_ids[:8] == shared.input_ids[:8] and salted.input_ids[8:] != shared.input_ids[8:]
    assert again.input_ids[: len(salted.input_ids)] == salted.input_ids  # the namespace's own turns still match


def test_block_hashes_chain_and_depend_on_salt_and_namespace():
    tokens = list(range(100, 140))
    changed = tokens[:20] + [7] + tokens[21:]
    base = block_hashes(tokens, "salt", block_tokens=8)
    assert len(base) == 5 and all(0 <= h < 2**63 for h in base)
    other = block_hashes(changed, "salt", block_tokens=8)
    assert other[:2] == base[:2] and all(a != b for a, b in zip(other[2:], base[2:]))  # block 2 on differ
    assert block_hashes(tokens[:36], "salt", block_tokens=8)[:4] == base[:4]
    assert block_hashes(tokens[:36], "salt", block_tokens=8)[4] != base[4]  # a partial block is not the whole one
    assert set(block_hashes(tokens, "other salt", block_tokens=8)).isdisjoint(base)
    salted = block_hashes(tokens, "salt", block_tokens=8, namespace=namespace_id("t"), namespace_from=12)
    assert salted[0] == base[0] and all(a != b for a, b in zip(salted[1:], base[1:]))


def test_hashed_recording_keeps_no_ids_and_replays_at_block_granularity(model, tmp_path):
    path = tmp_path / "hashed.jsonl"
    with TraceRecorder(path, hash_salt="secret", block_tokens=8) as recorder:
        cache = MarconiCache(model, capacity_bytes=2**24, recorder=recorder)
        outputs = _two_turns(model, cache)
    lines = _lines(path)
    assert all(set(line) == {"session_id", "arrival", "input_length", "output_length", "block_tokens", "hash_ids",
                             "meta"} for line in lines)
    fed = [outputs[0][0, :-1].tolist(), outputs[1][0, :-1].tolist()]
    assert [line["input_length"] + line["output_length"] for line in lines] == [len(f) for f in fed]
    assert [line["hash_ids"] for line in lines] == [block_hashes(f, "secret", 8) for f in fed]
    first, second = sorted(read_trace(path), key=lambda r: r.arrival)
    assert len(first.input_ids) == lines[0]["input_length"] and len(second.output_ids) == lines[1]["output_length"]
    # Turn 2 starts with turn 1's 23 fed tokens: the 2 whole blocks of them (16 tokens) are shared, not more.
    shared = next(i for i, (a, b) in enumerate(zip(first.input_ids + first.output_ids, second.input_ids)) if a != b)
    assert shared == 16


def test_threads_recording_at_once_lose_no_line(tmp_path):
    path = tmp_path / "threads.jsonl"
    recorder = TraceRecorder(path)

    def worker(index: int) -> None:
        with session(f"thread-{index}"):
            for call in range(50):
                recorder.record([index, call, 7], 2, float(call))

    run_in_threads(worker, 8, timeout_s=60)
    assert recorder.flush(timeout_s=60)
    recorder.close()
    lines = _lines(path)
    assert len(lines) == 400 == recorder.recorded
    assert sorted((line["session_id"], line["input_ids"][1]) for line in lines) == sorted(
        (f"thread-{i}", c) for i in range(8) for c in range(50))
    recorder.record([1, 2], 1, 0.0)  # after close: dropped with a warning, never raised into the call
    assert len(_lines(path)) == 400


def test_pipeline_records_chat_turns_under_the_chat_session(model, tmp_path):
    path = tmp_path / "chat.jsonl"
    pipe = MarconiPipeline(model, byte_level_tokenizer(), capacity_bytes=2**24, record_to=path, max_new_tokens=5)
    chat = pipe.chat(system="Be brief.")
    chat.send("Hello")
    chat.send("Again")
    pipe.cache.recorder.close()
    first, second = _lines(path)
    assert first["session_id"] == second["session_id"] == chat.session_id
    assert second["input_ids"] == chat.last_prompt_ids
    fed = first["input_ids"] + first["output_ids"]
    assert second["input_ids"][: len(fed)] == fed
    with pytest.raises(ValueError, match="record_to applies to the cache the pipeline builds"):
        MarconiPipeline(model, byte_level_tokenizer(), cache=pipe.cache, record_to=path)


def test_each_row_of_a_batched_call_is_one_line(model, tmp_path):
    """A left-padded batch records one line per row: its prompt without the padding, then what it admitted."""
    path = tmp_path / "calls.jsonl"
    rows = [_tokens(5, 4)[0].tolist(), _tokens(9, 5)[0].tolist()]
    ids = torch.tensor([[0] * 4 + rows[0], rows[1]])
    mask = torch.tensor([[0] * 4 + [1] * 5, [1] * 9])
    with TraceRecorder(path) as recorder:
        cache = MarconiCache(model, capacity_bytes=2**24, recorder=recorder)
        out = model.generate(ids, attention_mask=mask, past_key_values=cache, **SETTINGS)
    lines = _lines(path)
    assert [line["input_ids"] for line in lines] == rows
    assert [line["output_ids"] for line in lines] == [row[9:-1].tolist() for row in out]
