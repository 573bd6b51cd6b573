"""Trace simulator: deterministic replays, statistics, and the paper's policy ordering on real SWE-bench data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hf_marconi.presets import preset
from hf_marconi.policies import (
    AlphaTuner,
    BlockAdmission,
    BlockPolicy,
    BranchPointAdmission,
    ComposedPolicy,
    LRUEviction,
    LRUPolicy,
    MarconiAdmission,
    MarconiEviction,
    MarconiPolicy,
    NoCachePolicy,
)
from hf_marconi.simulator import simulate
from hf_marconi.trace import Request

COSTS = preset("paper-7b-hybrid")


def chat_trace(sessions: int = 4, turns: int = 5) -> list[Request]:
    """Sessions sharing a 64-token system prompt; each turn's input is the whole history plus a new message."""
    system = tuple(range(1, 65))
    requests, histories = [], {s: system for s in range(sessions)}
    for t in range(turns):
        for s in range(sessions):
            message = tuple(1000 + 97 * s + 13 * t + k for k in range(20))
            answer = tuple(5000 + 89 * s + 11 * t + k for k in range(10))
            inp = histories[s] + message
            requests.append(Request(f"s{s}", arrival=t * 10.0 + s, input_ids=inp, output_ids=answer))
            histories[s] = inp + answer
    return requests[::-1]  # out of order on purpose: the simulator replays by arrival


def test_unbounded_cache_hits_history_and_system_prompt():
    trace = chat_trace()
    result = simulate(trace, MarconiPolicy(), 10**15, COSTS)
    stats = result.stats
    assert result.requests == len(trace) == stats.lookups
    # Turn 1 of sessions 3 and 4 hit the system prompt (checkpointed at the branch by session 2); later turns hit
    # their whole previous input + output.
    assert stats.hits_purely_input == 2 and stats.hits_input_output == 16
    assert stats.checkpoints_evicted == 0 and stats.peak_bytes == stats.bytes
    assert 0 < stats.flops_saved < stats.input_flops


def test_replays_are_deterministic():
    trace = chat_trace()
    capacity = 12 * COSTS.checkpoint_bytes
    runs = [simulate(trace, MarconiPolicy(), capacity, COSTS, tuner=AlphaTuner(window_factor=1)) for _ in range(2)]
    assert runs[0].stats == runs[1].stats and runs[0].tunings == runs[1].tunings
    assert runs[0].stats.nodes_evicted > 0


@pytest.mark.parametrize("policy", [MarconiPolicy(alpha=0.5), LRUPolicy(), BlockPolicy(block_size=16)],
                         ids=lambda p: p.name)
def test_capacity_holds_under_pressure(policy):
    capacity = 12 * COSTS.checkpoint_bytes
    result = simulate(chat_trace(), policy, capacity, COSTS, check_every=1)
    assert result.stats.peak_bytes <= capacity and result.stats.nodes_evicted > 0


def test_rules_compose_freely_and_the_paper_policies_are_their_compositions():
    capacity = 12 * COSTS.checkpoint_bytes
    mixed = {
        "marconi admission, lru": ComposedPolicy(MarconiAdmission(), LRUEviction(), "marconi admission, lru"),
        "blocks, marconi eviction": ComposedPolicy(BlockAdmission(16), MarconiEviction(alpha=0.5)),
    }
    stats = {}
    for name, policy in mixed.items():
        result = simulate(chat_trace(), policy, capacity, COSTS, check_every=1)
        assert result.policy == policy.name
        assert 0 < result.stats.hit_tokens and 0 < result.stats.nodes_evicted and result.stats.peak_bytes <= capacity
        stats[name] = result.stats
    paper = {
        "marconi": (MarconiPolicy(alpha=0.5), ComposedPolicy(MarconiAdmission(), MarconiEviction(alpha=0.5))),
        "sglang+": (LRUPolicy(), ComposedPolicy(BranchPointAdmission(), LRUEviction())),
        "vllm+": (BlockPolicy(block_size=16), ComposedPolicy(BlockAdmission(16), LRUEviction())),
    }
    for name, (named, composed) in paper.items():
        expected = simulate(chat_trace(), named, capacity, COSTS).stats
        assert simulate(chat_trace(), composed, capacity, COSTS).stats == expected
        stats[name] = expected
    # Swapping a paper policy's eviction rule changes the replay; Marconi's admission differs from SGLang+'s only by
    # its repeat rule, which a trace without repeated prompts never triggers.
    assert stats["marconi admission, lru"] == stats["sglang+"] and stats["marconi admission, lru"] != stats["marconi"]
    assert stats["blocks, marconi eviction"] != stats["vllm+"] and stats["blocks, marconi eviction"] != stats["marconi"]


def test_no_cache_saves_nothing():
    stats = simulate(chat_trace(), NoCachePolicy(), 10**15, COSTS).stats
    assert stats.hits == 0 and stats.bytes == 0 and stats.flops_saved == 0


def _data_dir() -> Path:
    default = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    return Path(os.environ.get("HF_MARCONI_DATA", default))


def test_swebench_ordering_on_a_slice():
    """On real SWE-bench sessions (GPT-2 tokens, 32K cut) under pressure, Marconi beats vLLM+ by a large factor, and
    Marconi at alpha 0 (recency only, intermediate checkpoints evictable) is within a point of SGLang+.

    Tuned Marconi is *not* asserted to match SGLang+ here: on this trace the single retrospective tuning picks an
    alpha (1.2) that is fine on its early window but costs ~7 points later (see the issue report)."""
    data = _data_dir()
    if not (data / "swebench_trajectories.jsonl.gz").exists():
        pytest.skip(f"SWE-bench data not found in {data} (set HF_MARCONI_DATA)")
    traces = pytest.importorskip("eval.traces")
    trace = traces.build_trace("swebench", data_dir=data, max_sessions=12)
    capacity = int(4e9)
    tuned = simulate(trace, MarconiPolicy(), capacity, COSTS, tuner=AlphaTuner()).stats.token_hit_rate
    recency_only = simulate(trace, MarconiPolicy(alpha=0.0), capacity, COSTS).stats.token_hit_rate
    sglang = simulate(trace, LRUPolicy(), capacity, COSTS).stats.token_hit_rate
    vllm = simulate(trace, BlockPolicy(), capacity, COSTS).stats.token_hit_rate
    assert tuned > 3 * vllm and recency_only > 3 * vllm
    assert abs(recency_only - sglang) < 0.01
