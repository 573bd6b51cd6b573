"""Measured TTFT: replay a shortened trace through MarconiCache with a real (small, random-weight) model.

Each request runs ``model.generate`` with the cache as ``past_key_values``. Token ids are folded into the model's
vocabulary (``3 + id % (vocab - 3)``, keeping clear of the pad / bos / eos ids), so prefix sharing is preserved.
The trace's output tokens are forced as the generated tokens (at most ``output_tokens`` of them), so that the cache
stores what the next turn's input repeats, as in serving. TTFT is the wall time from the ``generate`` call until
the streamer receives the first generated token: lookup, restore, branch-point capture, the prefill of the
uncached suffix and the first token. Requests run one at a time (no queueing). With policy ``no-cache`` the
same cache object stores nothing, so the baseline pays the same per-call overheads.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from hf_marconi.trace import Request

from .ttft import PrefillProfile, ProfileModelSpec, spec_of, summarise, torch_threads

MEASURED_POLICIES: tuple[str, ...] = ("marconi", "sglang+", "vllm+", "no-cache")


@dataclass(frozen=True)
class MeasuredRun:
    """TTFTs of one policy over the replayed trace (in replay order) and the cache's final stats."""

    policy: str
    ttft_s: tuple[float, ...]
    reused: tuple[int, ...]
    input_lens: tuple[int, ...]
    stats: dict[str, Any]

    def summary(self) -> dict[str, Any]:
        return {"policy": self.policy, **summarise(self.ttft_s), "token_hit_rate": self.stats["token_hit_rate"]}


def fold_tokens(ids: Sequence[int], vocab_size: int) -> list[int]:
    """Token ids mapped into ``[3, vocab_size)``."""
    if vocab_size <= 3:
        raise ValueError(f"vocab_size must exceed 3 (ids 0-2 are pad/bos/eos), got {vocab_size}")
    return [3 + int(t) % (vocab_size - 3) for t in ids]


def shorten(requests: Sequence[Request], max_input_tokens: int, max_requests: int) -> list[Request]:
    """The first ``max_requests`` requests (arrival order) whose inputs have at most ``max_input_tokens`` tokens."""
    kept = [r for r in sorted(requests, key=lambda r: r.arrival) if len(r.input_ids) <= max_input_tokens]
    return kept[:max_requests]


class _ForcedTokens:
    """A logits processor that makes generation emit ``tokens`` in order (greedy picks the only finite logit)."""

    def __init__(self, tokens: Sequence[int], prompt_len: int):
        self.tokens = list(tokens)
        self.prompt_len = prompt_len

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        step = input_ids.shape[1] - self.prompt_len
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.tokens[min(step, len(self.tokens) - 1)]] = 0.0
        return forced


class _FirstTokenClock:
    """A generate streamer recording when the first generated token arrives (the prompt is put first)."""

    def __init__(self) -> None:
        self.puts = 0
        self.first_token_at: float | None = None

    def put(self, value: Any) -> None:
        self.puts += 1
        if self.puts == 2:
            self.first_token_at = time.perf_counter()

    def end(self) -> None:
        pass


def replay_policy(model: Any, requests: Sequence[Request], policy: str, capacity_bytes: int,
                  output_tokens: int, progress: Callable[[], None] | None = None) -> MeasuredRun:
    """Replay ``requests`` (already folded to the model's vocabulary) through a fresh MarconiCache."""
    import torch
    from transformers import LogitsProcessorList

    from hf_marconi.cache import MarconiCache

    cache = MarconiCache(model, capacity_bytes=capacity_bytes, policy=policy)
    ttfts, reused = [], []
    for request in requests:
        prompt = torch.tensor([request.input_ids])
        forced = list(request.output_ids[:output_tokens]) or [3]
        clock = _FirstTokenClock()
        hits_before = cache.store.stats().hit_tokens
        began = time.perf_counter()
        with torch.no_grad():
            model.generate(prompt, past_key_values=cache, max_new_tokens=len(forced), do_sample=False,
                           logits_processor=LogitsProcessorList([_ForcedTokens(forced, prompt.shape[1])]),
                           streamer=clock, pad_token_id=0, eos_token_id=None)
        if clock.first_token_at is None:
            raise RuntimeError("generate produced no token; the measured replay needs at least one")
        ttfts.append(clock.first_token_at - began)
        reused.append(cache.store.stats().hit_tokens - hits_before)
        if progress is not None:
            progress()
    return MeasuredRun(policy, tuple(ttfts), tuple(reused), tuple(len(r.input_ids) for r in requests), cache.stats())


def measure_replay(
    requests: Sequence[Request],
    profile: PrefillProfile,
    policies: Sequence[str] = MEASURED_POLICIES,
    capacity_fraction: float = 0.3,
    max_input_tokens: int = 2048,
    max_requests: int = 40,
    output_tokens: int = 8,
    threads: int = 1,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Measured TTFT per policy on a shortened trace, with the profile's model.

    The capacity is ``capacity_fraction`` of the bytes the shortened trace's states take under Marconi's
    admission with unlimited capacity (measured with the model's own state sizes). Returns a JSON-ready dict:
    settings, per-policy summaries (P50 / P95 / mean TTFT, token hit rate), the per-request TTFTs, and the
    modelled TTFT of the same requests (the profile applied to each request's reused length) for comparison."""
    from tqdm.auto import tqdm

    from hf_marconi.families import cost_model
    from hf_marconi.policies import make_policy
    from hf_marconi.store import PrefixStore

    spec: ProfileModelSpec = spec_of(profile)
    shortened = shorten(requests, max_input_tokens, max_requests)
    if not shortened:
        raise ValueError(f"no request has at most {max_input_tokens} input tokens; raise max_input_tokens")
    folded = [
        Request(r.session_id, r.arrival, tuple(fold_tokens(r.input_ids, spec.vocab_size)),
                tuple(fold_tokens(r.output_ids[:output_tokens], spec.vocab_size)))
        for r in shortened
    ]
    model = spec.build()
    from hf_marconi.cache import MarconiCache

    probe = MarconiCache(model, capacity_bytes=0, policy="no-cache")
    costs = cost_model(model.config, dtype="float32", recurrent_dtype="float32")
    unlimited = PrefixStore(2**62, make_policy("sglang+"), costs, probe.sizes)
    for r in folded:
        unlimited.simulate_request(r.input_ids, r.input_ids + (r.output_ids or (3,)))
    capacity = max(1, int(unlimited.stats().peak_bytes * capacity_fraction))
    runs = []
    with torch_threads(threads), tqdm(total=len(policies) * len(folded), desc="measured TTFT",
                                      disable=not show_progress, unit="req") as bar:
        for policy in policies:
            runs.append(replay_policy(model, folded, policy, capacity, output_tokens, lambda: bar.update(1)))
    return {
        "settings": {
            "trace_requests": len(folded), "max_input_tokens": max_input_tokens, "max_requests": max_requests,
            "output_tokens": output_tokens, "capacity_fraction": capacity_fraction, "capacity_bytes": capacity,
            "footprint_bytes": unlimited.stats().peak_bytes, "threads": threads, "model": profile.model,
            "input_tokens": int(sum(len(r.input_ids) for r in folded)),
        },
        "summaries": [run.summary() for run in runs],
        "modelled": {
            run.policy: summarise(profile.ttft(np.array(run.reused), np.array(run.input_lens))) for run in runs
        },
        "ttft_s": {run.policy: list(run.ttft_s) for run in runs},
        "reused": {run.policy: list(run.reused) for run in runs},
    }
