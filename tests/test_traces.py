"""Trace builders (eval.traces): schema, timing rules, prefix structure, length cut, storage, cache, CLI.

Runs on small slices of the real data in ../shared/data (or $HF_MARCONI_DATA) and skips when it is absent.
"""

from __future__ import annotations

import gzip
import json
import os
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from hf_marconi.trace import Request

DATA_DIR = Path(os.environ.get("HF_MARCONI_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
if not (DATA_DIR / "tokenizer_gpt2" / "vocab.json").is_file():
    pytest.skip(
        f"workload data not found in {DATA_DIR}: set HF_MARCONI_DATA to the shared data folder",
        allow_module_level=True,
    )

from eval.cli import main  # noqa: E402
from eval.traces import BUILDERS, build_trace, load_text_encoder, load_trace, save_trace  # noqa: E402
from eval.traces.mooncake import BLOCK_TOKENS  # noqa: E402
from eval.traces.timing import agent_response_times, typing_seconds  # noqa: E402

SMALL = {
    "swebench": {"max_sessions": 3},
    "tau": {"max_sessions": 3},
    "oasst": {"max_sessions": 6},
    "bbh": {"max_examples_per_task": 2},
    "mtbench": {"max_sessions": 5},
    "mooncake": {"max_requests": 150},
}
CONVERSATIONS = ("swebench", "tau", "oasst", "mtbench")


@pytest.fixture(scope="module")
def encoder():
    return load_text_encoder(DATA_DIR / "tokenizer_gpt2")


@pytest.fixture(scope="module")
def small_traces(encoder) -> dict[str, list[Request]]:
    return {
        name: BUILDERS[name].build(data_dir=DATA_DIR, tokenizer=encoder, **options) for name, options in SMALL.items()
    }


def by_session(requests: list[Request]) -> dict[str, list[Request]]:
    sessions = defaultdict(list)
    for request in requests:
        sessions[request.session_id].append(request)
    return {sid: sorted(reqs, key=lambda r: r.meta["turn"]) for sid, reqs in sessions.items()}


def read_rows(file_name: str) -> list[dict]:
    opener = gzip.open if file_name.endswith(".gz") else open
    with opener(DATA_DIR / file_name, "rt") as lines:
        return [json.loads(line) for line in lines]


@pytest.mark.parametrize("name", list(SMALL))
def test_schema_and_order(name, small_traces, encoder):
    requests = small_traces[name]
    assert requests, f"{name}: no requests"
    for request in requests:
        assert isinstance(request, Request)
        assert isinstance(request.session_id, str) and isinstance(request.arrival, float)
        assert request.arrival >= 0
        assert isinstance(request.input_ids, tuple) and isinstance(request.output_ids, tuple)
        assert all(isinstance(t, int) and 0 <= t < encoder.vocab_size for t in request.input_ids + request.output_ids)
        assert request.meta["dataset"] == name
        assert json.loads(json.dumps(request.meta)) == request.meta
    assert [r.arrival for r in requests] == sorted(r.arrival for r in requests)
    for session in by_session(requests).values():
        assert [r.meta["turn"] for r in session] == list(range(len(session)))
        assert [r.arrival for r in session] == sorted(r.arrival for r in session)


@pytest.mark.parametrize("name", ["swebench", "tau", "oasst", "bbh", "mtbench"])
def test_session_i_starts_at_i_over_rate(name, encoder):
    requests = BUILDERS[name].build(data_dir=DATA_DIR, tokenizer=encoder, sessions_per_second=0.25, **SMALL[name])
    for session in by_session(requests).values():
        assert session[0].arrival == pytest.approx(session[0].meta["session"] / 0.25)


def test_chat_turn_waits_for_typing_time(small_traces):
    questions = {q["question_id"]: q for q in read_rows("mt_bench_questions.jsonl")}
    sessions = by_session(small_traces["mtbench"])
    assert len(sessions) == SMALL["mtbench"]["max_sessions"]
    for first, second in sessions.values():
        words = len(questions[first.meta["question_id"]]["turns"][1].split())
        assert second.arrival - first.arrival == pytest.approx(words * 60 / 90)
    assert typing_seconds(90) == pytest.approx(60.0)


def test_agent_response_times_are_exponential_with_the_configured_mean():
    draws = np.array([agent_response_times(7, session, 7.5, "exponential")() for session in range(4000)])
    one_session = agent_response_times(7, 0, 7.5, "exponential")
    draws_in_session = np.array([one_session() for _ in range(4000)])
    for sample in (draws, draws_in_session):
        assert sample.mean() == pytest.approx(7.5, rel=0.1)
        assert sample.std() == pytest.approx(7.5, rel=0.15)  # exponential: std == mean
        assert sample.min() >= 0


def test_poisson_convention_draws_whole_seconds_and_few_short_gaps():
    """The Marconi artifact's convention: numpy.random.poisson(mean) whole seconds, so at mean 7.5 s about 0.5% of gaps
    are under 2 s (P(0) + P(1) = 8.5 e^-7.5), where exponential gaps put 23% there (1 - e^(-2 / 7.5))."""
    one_session = agent_response_times(7, 0, 7.5, "poisson")
    poisson = np.array([one_session() for _ in range(20000)])
    other_session = agent_response_times(7, 0, 7.5, "exponential")
    exponential = np.array([other_session() for _ in range(20000)])
    assert (poisson == np.round(poisson)).all() and poisson.min() >= 0
    assert poisson.mean() == pytest.approx(7.5, rel=0.03) and poisson.var() == pytest.approx(7.5, rel=0.06)
    assert (poisson < 2).mean() == pytest.approx(8.5 * np.exp(-7.5), abs=0.002)
    assert (exponential < 2).mean() == pytest.approx(1 - np.exp(-2 / 7.5), abs=0.015)
    with pytest.raises(ValueError, match="unknown arrival convention"):
        agent_response_times(7, 0, 7.5, "uniform")


def test_arrival_convention_is_a_builder_option_and_part_of_the_cache_key(encoder, tmp_path):
    options = dict(data_dir=DATA_DIR, tokenizer=encoder, cache_dir=tmp_path, max_sessions=2)
    paper = build_trace("tau", **options)
    exponential = build_trace("tau", arrivals="exponential", **options)
    assert len(list(tmp_path.iterdir())) == 2  # one cached entry per convention
    assert build_trace("tau", arrivals="poisson", **options) == paper  # the default is the paper's convention
    assert sorted(r.input_ids for r in paper) == sorted(r.input_ids for r in exponential)
    gaps = [b.arrival - a.arrival for s in by_session(paper).values() for a, b in zip(s, s[1:])]
    agent_gaps = [g for g in gaps if g == round(g)]
    assert agent_gaps and [r.arrival for r in paper] != [r.arrival for r in exponential]


def test_swebench_turns_follow_poisson_response_times(encoder):
    requests = BUILDERS["swebench"].build(data_dir=DATA_DIR, tokenizer=encoder, mean_response_s=10.0, max_sessions=8)
    gaps = [b.arrival - a.arrival for s in by_session(requests).values() for a, b in zip(s, s[1:])]
    assert len(gaps) > 100
    assert np.mean(gaps) == pytest.approx(10.0, rel=0.3)
    again = BUILDERS["swebench"].build(data_dir=DATA_DIR, tokenizer=encoder, mean_response_s=10.0, max_sessions=8)
    assert [r.arrival for r in again] == [r.arrival for r in requests]


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_next_request_extends_previous_input_and_output(name, small_traces):
    multi_turn = 0
    for session in by_session(small_traces[name]).values():
        for previous, request in zip(session, session[1:]):
            history = previous.input_ids + previous.output_ids
            assert request.input_ids[: len(history)] == history
            assert len(request.input_ids) > len(history)
            multi_turn += 1
    assert multi_turn > 0


def test_oasst_sibling_paths_share_prefixes(small_traces):
    requests = small_traces["oasst"]
    first_inputs = [s[0].input_ids for s in by_session(requests).values()]
    same_tree = defaultdict(list)
    for request in requests:
        same_tree[request.meta["message_tree_id"]].append(request.meta["session"])
    assert any(len(set(sessions)) > 1 for sessions in same_tree.values()), "no branching tree in the slice"
    assert len(set(first_inputs)) < len(first_inputs)  # paths of one tree start with the same prompt


def test_bbh_queries_of_a_task_share_the_cot_prompt(small_traces, encoder):
    prompts = {row["task"]: row["cot_prompt"] for row in read_rows("bbh_fewshot.jsonl.gz")}
    tasks = defaultdict(list)
    for request in small_traces["bbh"]:
        tasks[request.meta["task"]].append(request)
    assert len(tasks) == len(prompts) and all(len(reqs) == 2 for reqs in tasks.values())
    for task, (first, second) in tasks.items():
        (prompt,) = encoder.encode_messages([{"role": "user", "content": prompts[task]}])
        assert first.input_ids[: len(prompt)] == prompt == second.input_ids[: len(prompt)]
        assert first.input_ids != second.input_ids
    tasks_in_order = [r.meta["task"] for r in small_traces["bbh"]]
    assert tasks_in_order != sorted(tasks_in_order, key=list(prompts).index)  # tasks interleaved


def test_mooncake_blocks_timestamps_and_lengths(small_traces):
    rows = read_rows("mooncake_conversation_trace.jsonl.gz")[: SMALL["mooncake"]["max_requests"]]
    requests = {r.meta["row"]: r for r in small_traces["mooncake"]}
    for index, request in requests.items():
        assert request.arrival == pytest.approx(rows[index]["timestamp"] / 1000)
        assert len(request.input_ids) == rows[index]["input_length"]
        assert len(request.output_ids) == rows[index]["output_length"]
    pairs = 0
    for i in list(requests)[:40]:
        for j in list(requests)[:40]:
            if i < j:
                a, b = rows[i]["hash_ids"], rows[j]["hash_ids"]
                shared = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                common = min(shared * BLOCK_TOKENS, len(requests[i].input_ids), len(requests[j].input_ids))
                assert requests[i].input_ids[:common] == requests[j].input_ids[:common]
                if shared < min(len(a), len(b)):
                    start = shared * BLOCK_TOKENS
                    assert requests[i].input_ids[start : start + 8] != requests[j].input_ids[start : start + 8]
                pairs += 1
    assert pairs > 100


def test_sessions_cut_before_first_too_long_input(encoder):
    full = by_session(BUILDERS["swebench"].build(data_dir=DATA_DIR, tokenizer=encoder, max_sessions=3))
    cut = by_session(
        BUILDERS["swebench"].build(data_dir=DATA_DIR, tokenizer=encoder, max_sessions=3, max_input_tokens=6000)
    )
    for session_id, whole in full.items():
        kept = cut.get(session_id, [])
        assert all(len(r.input_ids) <= 6000 for r in kept)
        assert [r.input_ids for r in kept] == [r.input_ids for r in whole[: len(kept)]]
        assert len(kept) < len(whole) and len(whole[len(kept)].input_ids) > 6000


def test_collapsing_observations_breaks_prefix_reuse(encoder):
    plain = by_session(BUILDERS["swebench"].build(data_dir=DATA_DIR, tokenizer=encoder, max_sessions=2))
    collapsed = by_session(
        BUILDERS["swebench"].build(
            data_dir=DATA_DIR, tokenizer=encoder, max_sessions=2, collapse_observations=True, keep_observations=1
        )
    )
    for session_id, session in collapsed.items():
        # turns 0 and 1 see at most one observation: nothing to collapse yet
        assert [r.input_ids for r in session[:2]] == [r.input_ids for r in plain[session_id][:2]]
        assert len(session[3].input_ids) < len(plain[session_id][3].input_ids)
        breaks = [
            b.input_ids[: len(a.input_ids) + len(a.output_ids)] != a.input_ids + a.output_ids
            for a, b in zip(session, session[1:])
        ]
        assert breaks[0] is False and all(breaks[1:])


@pytest.mark.parametrize("file_name", ["trace.jsonl", "trace.jsonl.gz", "trace_dataset"])
def test_save_load_round_trip(file_name, small_traces, tmp_path):
    requests = small_traces["tau"] + small_traces["mtbench"]
    save_trace(requests, tmp_path / file_name)
    loaded = load_trace(tmp_path / file_name)
    assert loaded == requests
    assert [r.meta for r in loaded] == [r.meta for r in requests]


def test_dataset_schema(small_traces, tmp_path):
    import datasets

    save_trace(small_traces["mtbench"], tmp_path / "mt")
    features = datasets.load_from_disk(str(tmp_path / "mt")).features
    assert list(features) == ["session_id", "arrival", "input_ids", "output_ids", "meta"]
    assert features["arrival"].dtype == "float64" and features["session_id"].dtype == "string"


def test_build_trace_caches_by_options(tmp_path):
    first = build_trace("mtbench", data_dir=DATA_DIR, cache_dir=tmp_path, max_sessions=3)
    assert len(list(tmp_path.iterdir())) == 1
    assert build_trace("mtbench", data_dir=DATA_DIR, cache_dir=tmp_path, max_sessions=3) == first
    shorter = build_trace("mtbench", data_dir=DATA_DIR, cache_dir=tmp_path, max_sessions=3, output_tokens=8)
    assert len(list(tmp_path.iterdir())) == 2
    assert all(len(r.output_ids) == 8 for r in shorter)
    with pytest.raises(ValueError, match="unknown trace"):
        build_trace("sharegpt", data_dir=DATA_DIR)
    with pytest.raises(TypeError, match="takes no option"):
        build_trace("mtbench", data_dir=DATA_DIR, mean_response_s=5.0)


def test_hugging_face_tokenizer_folder_gives_the_same_ids(encoder, tmp_path):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    gpt2 = DATA_DIR / "tokenizer_gpt2"
    bpe = ByteLevelBPETokenizer(str(gpt2 / "vocab.json"), str(gpt2 / "merges.txt"))
    PreTrainedTokenizerFast(tokenizer_object=bpe).save_pretrained(tmp_path)
    hf_encoder = load_text_encoder(tmp_path)
    messages = [{"role": "user", "content": "Hello there,  world!\n\tdef f(x): return x"}]
    assert hf_encoder.encode_messages(messages) == encoder.encode_messages(messages)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither tokenizer.json"):
        load_text_encoder(tmp_path / "empty")


def test_cli_builds_prints_and_saves(tmp_path, capsys):
    status = main(
        ["traces", "build", "--names", "mtbench,oasst", "--max-sessions", "2", "--data-dir", str(DATA_DIR),
         "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out"), "--format", "jsonl"]
    )
    assert status == 0
    table = capsys.readouterr().out
    assert "sessions" in table and "mean input" in table and "max input" in table
    assert len(load_trace(tmp_path / "out" / "mtbench.jsonl.gz")) == 4
    rows = {line.split()[0]: line.split()[1:] for line in table.splitlines() if line.startswith(("mtbench", "oasst"))}
    assert rows["mtbench"][:2] == ["2", "4"]  # sessions, requests
    assert rows["oasst"][0] == "2"
