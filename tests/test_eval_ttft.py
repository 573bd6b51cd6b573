"""The TTFT model (latency fit arithmetic, profile file round trip) and the measured replay on a tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from eval.ttft import PROFILE_FORMAT, PrefillProfile, ProfileModelSpec, fit_latency, summarise
from eval.ttft_replay import fold_tokens, replay_policy, shorten
from hf_marconi.trace import Request


def _profile(a: float = 0.02, b: float = 1e-4, c: float = 5e-8) -> PrefillProfile:
    prefixes, extends = (0, 1000, 4000), (10, 100, 1000)
    seconds = [[a + b * e + c * (p * e + e * (e + 1) / 2) for e in extends] for p in prefixes]
    return PrefillProfile.fitted(prefixes, extends, seconds, 3, {"hidden_size": 64}, {"device": "cpu"})


def test_fit_recovers_exact_coefficients():
    profile = _profile()
    assert profile.coefficients == pytest.approx((0.02, 1e-4, 5e-8), rel=1e-6)
    assert profile.fit_error() < 1e-6


def test_fit_keeps_coefficients_non_negative():
    # Latency falling with more tokens would need b < 0; the fit drops that term instead.
    a, b, c = fit_latency([(0, 10, 1.0), (0, 100, 0.9), (0, 1000, 0.8), (100, 10, 1.0)])
    assert min(a, b, c) >= 0


def test_ttft_is_the_prefill_of_the_uncached_suffix():
    profile = _profile()
    ttft = profile.ttft([0, 900, 999], [1000, 1000, 1000])
    expected = [0.02 + 1e-4 * e + 5e-8 * (p * e + e * (e + 1) / 2) for p, e in ((0, 1000), (900, 100), (999, 1))]
    assert ttft == pytest.approx(expected)
    assert ttft[0] > ttft[1] > ttft[2]
    with pytest.raises(ValueError, match="all but its last"):
        profile.ttft([1000], [1000])


def test_profile_file_round_trip(tmp_path):
    profile = _profile()
    path = tmp_path / "profile.json"
    profile.save(path)
    data = json.loads(path.read_text())
    assert data["format"] == PROFILE_FORMAT and "max_relative_error" in data["fit"]
    assert PrefillProfile.load(path) == profile
    data["format"] = PROFILE_FORMAT + 1
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="measure it again"):
        PrefillProfile.load(path)


def test_summarise_percentiles():
    summary = summarise(np.arange(1, 101, dtype=float))
    assert summary["p50"] == pytest.approx(50.5) and summary["p95"] == pytest.approx(95.05)
    assert summary["count"] == 100


def test_fold_tokens_stays_clear_of_special_ids():
    folded = fold_tokens([0, 1, 2, 252, 253, 5000], 256)
    assert all(3 <= t < 256 for t in folded)
    assert folded[0] != folded[1] and fold_tokens([7, 7], 256)[0] == fold_tokens([7], 256)[0]


def test_shorten_keeps_short_inputs_in_arrival_order():
    requests = [Request("s", 2.0, (1,) * 5), Request("s", 1.0, (1,) * 50), Request("t", 0.0, (1,) * 3)]
    assert [r.arrival for r in shorten(requests, 10, 5)] == [0.0, 2.0]
    assert len(shorten(requests, 100, 1)) == 1


def test_measured_replay_reuses_the_previous_turn():
    spec = ProfileModelSpec(hidden_size=64, num_layers=2, attention_layers=(1,), num_heads=4, num_kv_heads=2,
                            mamba_heads=4, mamba_state=16, vocab_size=256, scan_chunk_size=16)
    model = spec.build()
    first = tuple(range(3, 40))
    output = (50, 51, 52)
    second = first + output + tuple(range(60, 70))
    requests = [Request("a", 0.0, first, output), Request("a", 1.0, second, (80,))]
    cached = replay_policy(model, requests, "sglang+", capacity_bytes=10**9, output_tokens=3)
    uncached = replay_policy(model, requests, "no-cache", capacity_bytes=10**9, output_tokens=3)
    assert cached.reused[0] == 0 and cached.reused[1] >= len(first)
    assert uncached.reused == (0, 0)
    assert all(t > 0 for t in cached.ttft_s + uncached.ttft_s)
