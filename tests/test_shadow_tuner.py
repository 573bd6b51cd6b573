"""Online alpha by shadow replays: the shadows are exact static-alpha replays, a commit never runs more than a fixed
number of shadow replays while tuning is under way, and the live alpha follows the best shadow."""

from __future__ import annotations

import pytest

from hf_marconi.policies import MarconiPolicy, ShadowAlphaTuner
from hf_marconi.store import PrefixStore
from tests.test_store import SIZES, QuadraticCosts

CAPACITY = 600


def _trace(sessions: int = 8, turns: int = 10) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Agent sessions of different lengths sharing a system prompt: (input, output) pairs."""
    system = tuple(range(1000, 1030))
    histories = {s: system + (2000 + s,) for s in range(sessions)}
    pairs = []
    for t in range(turns):
        for s in range(sessions):
            inp = histories[s] + tuple(3000 + 1000 * s + 10 * t + k for k in range(2 + 3 * (s % 3)))
            out = tuple(9000 + 1000 * s + 10 * t + k for k in range(3))
            pairs.append((inp, out))
            histories[s] = inp + out
    return pairs


def _tuned_store(tuner: ShadowAlphaTuner) -> PrefixStore:
    return PrefixStore(CAPACITY, MarconiPolicy(), QuadraticCosts(), SIZES, tuner=tuner)


def test_shadows_are_the_static_alpha_replays():
    tuner = ShadowAlphaTuner(grid=(0.0, 4.0, 64.0), initial_alpha=4.0, check_every=5, half_life=20)
    store = _tuned_store(tuner)
    pairs = _trace()
    for inp, out in pairs:
        store.replay_request(inp, out)
    for alpha, shadow in zip(tuner.grid, tuner._shadows):
        static = PrefixStore(CAPACITY, MarconiPolicy(alpha=alpha), QuadraticCosts(), SIZES)
        for inp, out in pairs:
            static.replay_request(inp, out)
        assert shadow.stats().hit_tokens == static.stats().hit_tokens
        assert shadow.tree.checkpointed_prefixes() == static.tree.checkpointed_prefixes()


@pytest.mark.parametrize("steps_per_commit", [None, 1, 2])
def test_no_commit_runs_more_than_the_step_bound_while_tuning(steps_per_commit):
    tuner = ShadowAlphaTuner(grid=(0.0, 4.0, 64.0), initial_alpha=0.0, check_every=2, half_life=10, margin=0.0,
                             steps_per_commit=steps_per_commit, max_pending=4)
    store = _tuned_store(tuner)
    steps_per_call = []
    for inp, out in _trace():
        before = tuner.steps_taken
        store.replay_request(inp, out)
        steps_per_call.append(tuner.steps_taken - before)
    bound = steps_per_commit if steps_per_commit is not None else 3
    assert max(steps_per_call) == bound  # work is done, never more than the bound in one call
    assert store.stats().nodes_evicted > 0
    if steps_per_commit is None:
        assert tuner.history and tuner.dropped == 0  # tuning switched alpha, with the shadows level with the store
    else:
        assert tuner.dropped > 0  # too few steps to keep up: requests are dropped, callers never wait


def test_live_alpha_follows_the_best_shadow_and_margin_holds_it():
    tuner = ShadowAlphaTuner(grid=(0.0, 4.0, 64.0), initial_alpha=64.0, check_every=1, half_life=10, margin=0.0)
    store = _tuned_store(tuner)
    for inp, out in _trace():
        store.replay_request(inp, out)
    for record in tuner.history:
        best = max(record.scores.values())
        assert record.scores[record.alpha] == best
    assert store.stats().alpha_tunings == len(tuner.history)

    stubborn = ShadowAlphaTuner(grid=(0.0, 4.0, 64.0), initial_alpha=64.0, check_every=1, margin=1e9)
    store = _tuned_store(stubborn)
    for inp, out in _trace():
        store.replay_request(inp, out)
    assert not stubborn.history and store.policy.alpha == 64.0


def test_settings_are_checked():
    with pytest.raises(ValueError, match="initial_alpha"):
        ShadowAlphaTuner(grid=(0.0, 1.0), initial_alpha=2.0)
    with pytest.raises(ValueError, match="steps_per_commit"):
        ShadowAlphaTuner(steps_per_commit=0)
