"""The report writer: markdown and PNG plots into a folder, from a small sweep result on a hand-made trace."""

from __future__ import annotations

from pathlib import Path

import pytest

from eval.report import findings, gains, render, write_plots
from eval.sweep import VARIANTS, Run, SweepSpec, _spec_dict, replay, result_row
from eval.ttft import PrefillProfile
from hf_marconi.trace import Request


def _trace() -> list[Request]:
    """Three agent-like sessions whose inputs grow by their previous output and a new observation."""
    requests = []
    for s in range(3):
        history = tuple(range(100 * s, 100 * s + 60))
        for turn in range(4):
            output = tuple(range(10_000 + 1000 * s + 10 * turn, 10_005 + 1000 * s + 10 * turn))
            requests.append(Request(f"s{s}", float(3 * turn + s), history, output))
            history = history + output + tuple(range(20_000 + 100 * s + 10 * turn, 20_008 + 100 * s + 10 * turn))
    return requests


def _result(profile: PrefillProfile) -> dict:
    spec = SweepSpec(traces=("swebench", "tau"), variants=("marconi", "sglang+", "vllm+", "no-cache"),
                     fractions=(0.2, 1.0))
    requests = _trace()
    stats, reused, inputs = replay(requests, VARIANTS["sglang+"], 10**15, "paper-7b-hybrid")
    footprint = stats["peak_bytes"]
    rows = []
    for trace in spec.traces:
        rows.append(result_row(Run(trace, "paper-7b-hybrid", "unlimited", None, None), stats, reused, inputs, profile))
        for variant in spec.variants:
            for fraction in spec.fractions:
                capacity = int(footprint * fraction)
                run_stats, run_reused, run_inputs = replay(requests, VARIANTS[variant], capacity, "paper-7b-hybrid")
                rows.append(result_row(Run(trace, "paper-7b-hybrid", variant, fraction, capacity), run_stats,
                                       run_reused, run_inputs, profile))
    return {"spec": _spec_dict(spec), "footprints_gb": {f"{t}/paper-7b-hybrid": footprint / 1e9 for t in spec.traces},
            "rows": rows, "seconds": 1.0}


def _profile() -> PrefillProfile:
    prefixes, extends = (0, 100, 1000), (1, 10, 100)
    seconds = [[0.01 + 1e-4 * e + 1e-7 * (p * e + e * (e + 1) / 2) for e in extends] for p in prefixes]
    return PrefillProfile.fitted(prefixes, extends, seconds, 1,
                                 {"parameters": 1000, "hidden_size": 64, "num_layers": 2, "attention_layers": [1]},
                                 {"processor": "test cpu", "torch_threads": 1, "torch": "x"})


def test_report_writes_markdown_and_plots(tmp_path: Path):
    profile = _profile()
    result = _result(profile)
    measured = {
        "settings": {"trace": "tau", "trace_requests": 3, "sessions": 1, "max_input_tokens": 100, "input_tokens": 300,
                     "output_tokens": 2, "threads": 1, "capacity_fraction": 1.0, "capacity_bytes": 10**6},
        "summaries": [{"policy": p, "p50": 0.1, "p95": 0.2, "mean": 0.12, "count": 3, "token_hit_rate": 0.5}
                      for p in ("marconi", "no-cache")],
        "modelled": {p: {"p50": 0.1, "p95": 0.2, "mean": 0.1, "count": 3} for p in ("marconi", "no-cache")},
        "ttft_s": {"marconi": [0.1, 0.05, 0.2], "no-cache": [0.1, 0.15, 0.2]},
    }
    figures = write_plots(result, measured, tmp_path)
    assert set(figures) == {"hit_rate", "ttft_modelled", "ttft_measured"}
    for path in figures.values():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = render(result, profile, measured, figures, "python -m eval report --out x", {"total": 60.0})
    assert "python -m eval report --out x" in text
    assert "| swebench | paper-7b-hybrid |" in text and "Gain over vLLM+" in text and "Gain over SGLang+" in text
    assert all(f"]({path.name})" in text for path in figures.values())
    assert "Prefill FLOPs saved (in brackets in the table) differ from the token hit rate by at most" in text


def test_gains_are_differences_of_hit_rates():
    rows = [
        {"trace": "t", "fraction": 0.1, "policy": "marconi", "token_hit_rate": 0.5},
        {"trace": "t", "fraction": 0.1, "policy": "vllm+", "token_hit_rate": 0.2},
        {"trace": "t", "fraction": 0.5, "policy": "marconi", "token_hit_rate": 0.6},
    ]
    assert gains(rows, "marconi", "vllm+") == {"t": {0.1: pytest.approx(30.0)}}
    assert any("Gain over vLLM+" in line and "t +30.0" in line for line in findings(rows))
