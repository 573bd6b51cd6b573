"""The live cache and the simulator drive the same plan: for every policy, replaying the requests a MarconiCache served
(their prompts and generated tokens) through a byte-count store gives the same reuse, the same checkpoint positions, the
same admitted lengths and the same evictions, request by request."""

from __future__ import annotations

import pytest
import torch

from hf_marconi import MarconiCache
from hf_marconi.policies import BlockPolicy, LRUPolicy, MarconiPolicy, NoCachePolicy, default_policy
from hf_marconi.store import PrefixStore
from hf_marconi.testing import build_model

NEW_TOKENS = 5


def _tokens(n: int, seed: int) -> list[int]:
    return torch.randint(3, 250, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _prompts() -> list[list[int]]:
    """Multi-turn sessions, a shared system prompt and a repeated prompt; the turns depend on what was generated, so
    they are built while generating (see :func:`_serve`)."""
    system = _tokens(24, seed=1)
    return [system + _tokens(9, seed=10 + i) for i in range(3)] + [_tokens(19, seed=5)] * 3


def _recorder(log: list):
    def observe(store, plan, tokens, result) -> None:
        log.append((plan.reuse_len, plan.capture_positions, result.new_checkpoints, result.new_tokens,
                    result.nodes_evicted))
    return observe


def _serve(model, cache: MarconiCache) -> list[tuple[list[int], list[int]]]:
    """Generate for the prompts of :func:`_prompts` and two follow-up turns; returns (prompt, generated) pairs."""
    served = []
    prompts = _prompts()
    for turn in range(2):  # a session continuing the first prompt's answer
        prompts.insert(1 + turn, None)
    history: list[int] = []
    for i, prompt in enumerate(prompts):
        prompt = history + _tokens(6, seed=40 + i) if prompt is None else prompt
        out = model.generate(torch.tensor([prompt]), past_key_values=cache, max_new_tokens=NEW_TOKENS,
                             do_sample=False, pad_token_id=0, eos_token_id=None)
        generated = out[0, len(prompt):].tolist()
        served.append((prompt, generated))
        if i <= 2:
            history = prompt + generated
    return served


POLICIES = {
    "marconi": lambda: MarconiPolicy(alpha=2.0),
    "sglang+": LRUPolicy,
    "vllm+": lambda: BlockPolicy(block_size=4),
    "no-cache": NoCachePolicy,
    "default": lambda: default_policy()[0],
}


@pytest.fixture(scope="module")
def model():
    return build_model("bamba")


ROOMY = 10**9


def _peak_bytes(model, name: str) -> int:
    """What the policy stores of :func:`_serve`'s requests with room for everything."""
    cache = MarconiCache(model, capacity_bytes=ROOMY, policy=POLICIES[name](), alpha_tuner=None)
    _serve(model, cache)
    return cache.store.stats().peak_bytes


@pytest.mark.parametrize("name", sorted(POLICIES))
@pytest.mark.parametrize("tight", [False, True], ids=["roomy", "tight"])
def test_live_and_simulated_stores_admit_the_same(model, name, tight):
    # "tight": room for half of what the policy would store, so that evictions happen in both.
    capacity = max(1, _peak_bytes(model, name) // 2) if tight else ROOMY
    tuner = default_policy()[1] if name == "default" else None
    cache = MarconiCache(model, capacity_bytes=capacity, policy=POLICIES[name](), alpha_tuner=tuner)
    live: list = []
    cache.store.add_commit_observer(_recorder(live))
    steps: list[int] = []  # shadow replays each generate call's admission ran (the tuner observes first)
    if tuner is not None:
        cache.store.add_commit_observer(lambda *_: steps.append(tuner.steps_taken - sum(steps)))
    served = _serve(model, cache)

    simulated: list = []
    sim_tuner = default_policy()[1] if name == "default" else None
    store = PrefixStore(capacity, POLICIES[name](), cache.costs, cache.sizes, tuner=sim_tuner)
    store.add_commit_observer(_recorder(simulated))
    for prompt, generated in served:
        store.replay_request(tuple(prompt), tuple(generated))

    assert simulated == live
    assert store.stats().hit_tokens == cache.store.stats().hit_tokens
    assert store.stats().bytes == cache.store.stats().bytes
    if name == "vllm+":
        assert any(len(checkpoints) > 2 for _, _, checkpoints, _, _ in live)  # block boundaries, not just the end
    if tuner is not None:  # every call's admission replayed each request once per shadow, never more
        assert steps == [tuner.step_bound] * len(served)
    if tight and name != "no-cache":
        assert any(evicted for *_, evicted in live)
