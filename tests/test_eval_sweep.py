"""Simulated replay sweeps: the replay loop on hand-made traces, run planning, outputs; a sweep on a tiny slice
of the real data (skipped when the shared data folder is absent)."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

from eval.sweep import VARIANTS, Run, SweepSpec, markdown_table, plan_runs, replay, result_row, run_sweep, write_results
from hf_marconi.trace import Request

DATA_DIR = Path(os.environ.get("HF_MARCONI_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
HAS_DATA = (DATA_DIR / "tokenizer_gpt2" / "vocab.json").is_file()


def _chat() -> list[Request]:
    """Two sessions of three turns sharing a 300-token system prompt; each turn repeats the previous one."""
    system = tuple(range(1000, 1300))
    requests = []
    for s in range(2):
        history = system
        for turn in range(3):
            history = history + tuple(range(2000 + 100 * s + 10 * turn, 2005 + 100 * s + 10 * turn))
            output = tuple(range(5000 + 100 * s + 10 * turn, 5004 + 100 * s + 10 * turn))
            requests.append(Request(f"s{s}", float(2 * turn + s), history, output))
            history = history + output
    return requests


def test_replay_counts_each_requests_reuse():
    stats, reused, inputs = replay(_chat(), VARIANTS["sglang+"], 10**12, "paper-7b-hybrid")
    assert list(inputs) == [305, 305, 314, 314, 323, 323]  # one entry per request, in arrival order
    assert reused[0] == 0 and reused[1] == 0  # first turns: nothing stored yet
    assert all(r > 300 for r in reused[2:])  # later turns reuse the previous turn (input and output)
    assert stats["hit_tokens"] == reused.sum() and stats["lookups"] == 6
    nothing, reused_none, _ = replay(_chat(), VARIANTS["no-cache"], 10**12, "paper-7b-hybrid")
    assert nothing["token_hit_rate"] == 0 and not reused_none.any()


def test_replay_oracle_records_its_alpha():
    stats, _, _ = replay(_chat(), VARIANTS["marconi-oracle"], 10**12, "paper-7b-hybrid")
    assert stats["oracle_alpha"] in VARIANTS["marconi-oracle"].oracle_grid
    assert stats["alpha"] == stats["oracle_alpha"]


def test_plan_runs_scales_capacities_and_skips_costly_oracles():
    spec = SweepSpec(traces=("tau", "oasst"), variants=("marconi-oracle", "sglang+"), fractions=(0.1, 0.5))
    runs = plan_runs(spec, {("tau", "paper-7b-hybrid"): 10 * 10**9, ("oasst", "paper-7b-hybrid"): 10**9},
                     {"tau": 10**9, "oasst": 10})
    assert {r.variant for r in runs if r.trace == "tau"} == {"sglang+"}
    assert {(r.variant, r.capacity_bytes) for r in runs if r.trace == "oasst"} == {
        ("marconi-oracle", 10**8), ("marconi-oracle", 5 * 10**8), ("sglang+", 10**8), ("sglang+", 5 * 10**8)}


def test_spec_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown trace"):
        SweepSpec(traces=("nope",))
    with pytest.raises(ValueError, match="unknown policy variant"):
        SweepSpec(variants=("lru",))
    with pytest.raises(ValueError, match="fractions"):
        SweepSpec(fractions=(0.0,))


def test_outputs_hold_every_run(tmp_path):
    rows = []
    for variant, fraction in (("sglang+", 0.5), ("no-cache", 0.5), ("unlimited", None)):
        stats, reused, inputs = replay(_chat(), VARIANTS["sglang+" if variant == "unlimited" else variant], 10**12,
                                       "paper-7b-hybrid")
        rows.append(result_row(Run("chat", "paper-7b-hybrid", variant, fraction, None if fraction is None else 10**12),
                               stats, reused, inputs, None))
    paths = write_results({"rows": rows, "spec": {}}, tmp_path)
    with paths["csv"].open() as handle:
        lines = list(csv.DictReader(handle))
    assert [line["policy"] for line in lines] == ["sglang+", "no-cache", "unlimited"]
    table = paths["table"].read_text()
    assert "| chat | paper-7b-hybrid | 1,000.0 (50%) |" in table and "no-cache" in table
    assert markdown_table(rows).count("\n") == 2  # header, rule, one capacity row


@pytest.mark.skipif(not HAS_DATA, reason=f"workload data not found in {DATA_DIR}: set HF_MARCONI_DATA")
def test_sweep_on_a_tiny_slice(tmp_path):
    spec = SweepSpec(traces=("mtbench",), variants=("marconi", "sglang+", "no-cache"), fractions=(0.2, 1.0),
                     max_sessions=6, workers=1)
    result = run_sweep(spec, show_progress=False)
    rows = result["rows"]
    assert len(rows) == 1 + 3 * 2
    unlimited = rows[0]
    assert unlimited["policy"] == "unlimited" and unlimited["token_hit_rate"] > 0
    full = {r["policy"]: r for r in rows if r["fraction"] == 1.0}
    assert full["sglang+"]["token_hit_rate"] == pytest.approx(unlimited["token_hit_rate"])
    assert full["no-cache"]["token_hit_rate"] == 0
    assert all(r["peak_bytes"] <= r["capacity_bytes"] for r in rows if r["fraction"] is not None)
    write_results(result, tmp_path)
    assert (tmp_path / "results.json").is_file() and (tmp_path / "table.md").read_text().startswith("| trace")
