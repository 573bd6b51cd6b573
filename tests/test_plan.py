"""Capacity planning (python -m eval plan): a trace recorded from a live cache replays to the live cache's own
counters, plans run on save_pretrained configs of zoo families and on built-in traces, the knee is what it says."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from eval.cli import main
from eval.plan import PlanSpec, format_plan, load_cost_model, plan
from eval.traces import save_trace
from eval.traces.reading import read_trace
from hf_marconi import MarconiCache
from hf_marconi.families import cost_model
from hf_marconi.presets import preset
from hf_marconi.recording import TraceRecorder, session
from hf_marconi.testing import build_model, is_available, make_config
from hf_marconi.trace import Request

DATA_DIR = Path(os.environ.get("HF_MARCONI_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
needs_data = pytest.mark.skipif(not (DATA_DIR / "tokenizer_gpt2" / "vocab.json").is_file(),
                                reason=f"workload data not found in {DATA_DIR}")
SETTINGS = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)


def _tokens(n: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 250, (1, n), generator=torch.Generator().manual_seed(seed))


def _agent_trace() -> list[Request]:
    """Six sessions sharing a system prompt, whose inputs grow by their previous output and a new message."""
    requests = []
    for s in range(6):
        history = tuple(range(40)) + tuple(range(1000 + 100 * s, 1000 + 100 * s + 30))
        for turn in range(5):
            output = tuple(range(5000 + 1000 * s + 50 * turn, 5000 + 1000 * s + 50 * turn + 20))
            requests.append(Request(f"s{s}", float(4 * turn + s), history, output))
            history += output + tuple(range(9000 + 100 * s + 10 * turn, 9000 + 100 * s + 10 * turn + 9))
    return requests


def test_a_trace_recorded_from_a_live_cache_plans_to_its_own_stats(tmp_path):
    """The acceptance test of planning: record a live MarconiCache (default policy and tuner, a capacity that forces
    evictions), plan on the recorded file with the model's config, and find the live counters at the live
    capacity."""
    model = build_model("bamba")
    model.config.save_pretrained(tmp_path / "model")
    capacity = 150_000  # about 18% of this workload's footprint
    with TraceRecorder(tmp_path / "live.jsonl") as recorder:
        cache = MarconiCache(model, capacity_bytes=capacity, recorder=recorder)
        system = _tokens(24, 0)
        histories = {s: torch.cat([system, _tokens(5, 100 + s)], -1) for s in range(6)}
        for turn in range(5):
            for s in range(6):
                with session(f"s{s}"):
                    out = model.generate(histories[s], past_key_values=cache, **SETTINGS)
                histories[s] = torch.cat([out, _tokens(5, 1000 * turn + s)], -1)
    live = cache.stats()
    assert live["nodes_evicted"] > 0 and live["hits"] > 0  # a test worth its name

    costs = load_cost_model(tmp_path / "model", dtype="float32", recurrent_dtype="float32")
    trace = read_trace(tmp_path / "live.jsonl")
    assert len(trace) == 30 and {r.session_id for r in trace} == {f"s{s}" for s in range(6)}
    spec = PlanSpec(fractions=(0.5,), capacities_bytes=(capacity,), policies=("marconi",), knee_steps=0, workers=1)
    result = plan(trace, costs, spec, show_progress=False)
    (planned,) = [r for r in result.rows if r["capacity_bytes"] == capacity]
    assert planned["token_hit_rate"] == live["token_hit_rate"]
    for key in ("lookups", "hits", "hit_tokens", "input_tokens", "flops_saved", "nodes_evicted",
                "checkpoints_admitted", "alpha_tunings", "alpha", "peak_bytes"):
        assert planned[key] == live[key], key


@pytest.mark.parametrize("family, workers", [("jamba", 2), ("bamba", 1), ("qwen3_next", 1)])
def test_plan_reads_a_save_pretrained_config_of_zoo_families(family, workers, tmp_path, capsys):
    if not is_available(family):
        pytest.skip(f"the installed transformers does not ship {family}")
    config = make_config(family)
    config.save_pretrained(tmp_path / family)
    save_trace(_agent_trace(), tmp_path / "trace.jsonl")
    out = tmp_path / "plan"
    status = main(["plan", "--trace", str(tmp_path / "trace.jsonl"), "--model-config", str(tmp_path / family),
                   "--dtype", "bf16", "--workers", str(workers), "--quiet", "--out", str(out)])
    assert status == 0
    printed = capsys.readouterr().out
    assert "knee (smallest capacity reaching 90% of the unlimited-capacity token hit rate" in printed
    record = json.loads((out / "plan.json").read_text())
    assert (out / "plan.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # config.json gives the cost model of the config object it was saved from
    loaded, direct = load_cost_model(tmp_path / family / "config.json"), cost_model(config, dtype="bfloat16")
    assert loaded.state_sizes() == direct.state_sizes() and loaded.extend_flops(7, 13) == direct.extend_flops(7, 13)
    assert record["unlimited"]["token_hit_rate"] > 0.5
    assert {r["policy"] for r in record["rows"]} == {"marconi", "sglang+", "vllm+"}
    assert record["knee"]["share"] >= 0.9


def test_the_knee_is_the_smallest_evaluated_capacity_reaching_the_share():
    spec = PlanSpec(fractions=(0.05, 0.1, 0.2, 0.4, 0.8), policies=("marconi", "sglang+"), workers=1)
    result = plan(_agent_trace(), preset("paper-7b-hybrid"), spec, show_progress=False)
    knee = result.knee
    target = 0.9 * result.unlimited["token_hit_rate"]
    marconi = [r for r in result.rows if r["policy"] == "marconi"]
    assert knee.token_hit_rate >= target and knee.share == knee.token_hit_rate / result.unlimited["token_hit_rate"]
    assert all(r["token_hit_rate"] < target for r in marconi if r["capacity_bytes"] < knee.capacity_bytes)
    assert sum(1 for r in marconi if r.get("bisection")) <= spec.knee_steps
    text = format_plan(result)
    assert knee.sentence() in text and f"{knee.fraction:.1%} of the footprint" in text


@needs_data
def test_plan_runs_on_a_built_in_trace(tmp_path, capsys):
    status = main(["plan", "--trace", "mtbench", "--max-sessions", "12", "--model-config", "bamba-9b", "--workers",
                   "1", "--quiet", "--fractions", "0.1,0.5"])
    assert status == 0
    printed = capsys.readouterr().out
    assert printed.startswith("trace: mtbench") and "knee" in printed


@needs_data
def test_a_mooncake_format_file_reads_as_the_built_in_mooncake_trace():
    from eval.traces import build_trace

    from_file = read_trace(DATA_DIR / "mooncake_conversation_trace.jsonl.gz", max_requests=150)
    assert from_file == build_trace("mooncake", data_dir=DATA_DIR, max_requests=150, use_cache=False)
