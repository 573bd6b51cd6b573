"""Namespaces (cache_salt): a prefix stored under one namespace is never reused under another, a shared prefix
(cache_salt_from) still is, and the timing probe of the multi-tenant issue learns nothing across namespaces."""

from __future__ import annotations

import pytest
import torch

from conftest import fresh_cache
from hf_marconi import MarconiCache, MarconiCacheError
from hf_marconi.testing import build_model

SETTINGS = dict(max_new_tokens=3, do_sample=False, pad_token_id=0, eos_token_id=None)


def _tokens(n: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 250, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model():
    return build_model("bamba")


def _generate(model, cache, prompt, **salt):
    out = model.generate(prompt, past_key_values=cache, **salt, **SETTINGS)
    assert torch.equal(out, model.generate(prompt, **fresh_cache(model), **SETTINGS))
    return out, cache.last_call.reused


def test_a_prefix_is_reused_only_in_its_own_namespace(model):
    cache = MarconiCache(model, capacity_bytes=2**24)
    first, _ = _generate(model, cache, _tokens(20, 1), cache_salt="tenant-a")
    follow_up = torch.cat([first, _tokens(4, 2)], dim=-1)
    assert _generate(model, cache, follow_up, cache_salt="tenant-b")[1] == 0
    assert _generate(model, cache, follow_up)[1] == 0  # the shared space does not see it either
    assert _generate(model, cache, follow_up, cache_salt="tenant-a")[1] == first.shape[1] - 1


def test_a_shared_prefix_is_reused_across_namespaces_and_the_rest_is_not(model):
    """cache_salt_from=len(system): the system prompt is stored in the shared space (it reaches its branch-point
    checkpoint from its third occurrence, whoever sends it), each tenant's continuation in its own namespace."""
    cache = MarconiCache(model, capacity_bytes=2**24)
    system = _tokens(16, 3)
    reused = []
    for i, tenant in enumerate(["a", "b", "c", "a"]):
        prompt = torch.cat([system, _tokens(5, 10 + i)], dim=-1)
        reused.append(_generate(model, cache, prompt, cache_salt=tenant, cache_salt_from=system.shape[1])[1])
    assert reused == [0, 0, 16, 16]


def test_a_guess_in_another_namespace_is_no_faster_than_a_wrong_one(model):
    """The probe of the multi-tenant issue: a victim's private document after a public system prompt; an attacker
    sends system prompt + guess + 5 tokens twice (the first plants the branch checkpoint, the second reads it). Across
    namespaces a right guess reuses exactly what a wrong one does (the public system prompt at most), so its time
    tells nothing; in one namespace the right guess would reuse the document."""
    system, secret, wrong = _tokens(12, 20), _tokens(30, 21), _tokens(30, 22)

    def probe_reuse(attacker_salt):
        cache = MarconiCache(model, capacity_bytes=2**24)
        victim = torch.cat([system, secret], dim=-1)
        model.generate(victim, past_key_values=cache, cache_salt="victim", cache_salt_from=system.shape[1], **SETTINGS)
        reused = {}
        for name, guess in (("right", secret), ("wrong", wrong)):
            probe = torch.cat([system, guess, _tokens(5, 23)], dim=-1)
            for _ in range(2):
                model.generate(probe, past_key_values=cache, cache_salt=attacker_salt,
                               cache_salt_from=system.shape[1], **SETTINGS)
            reused[name] = cache.last_call.reused
        return reused

    across = probe_reuse("attacker")
    assert across["right"] == across["wrong"] <= system.shape[1]
    same = probe_reuse("victim")  # what the probe learns without isolation: the right guess reuses the document
    assert same["right"] > same["wrong"]


def test_bad_namespace_arguments_are_refused_before_anything_runs(model):
    cache = MarconiCache(model, capacity_bytes=2**24)
    for salt in ({"cache_salt": ""}, {"cache_salt": 3}, {"cache_salt_from": 4},
                 {"cache_salt": "a", "cache_salt_from": -1}):
        with pytest.raises(MarconiCacheError, match="cache_salt"):
            model.generate(_tokens(8, 30), past_key_values=cache, **salt, **SETTINGS)
    assert cache.stats()["lookups"] == 0


def test_request_takes_a_namespace_too(model):
    cache = MarconiCache(model, capacity_bytes=2**24)
    prompt = _tokens(14, 31)
    with cache.request(prompt, cache_salt="a") as call:
        model(prompt[:, call.prefilled:], past_key_values=cache)
    longer = torch.cat([prompt, _tokens(3, 32)], dim=-1)
    assert _generate(model, cache, longer, cache_salt="b")[1] == 0
    assert _generate(model, cache, longer, cache_salt="a")[1] == prompt.shape[1]


def test_a_prompt_shorter_than_the_shared_prefix_is_salted_whole(model):
    cache = MarconiCache(model, capacity_bytes=2**24)
    victim, _ = _generate(model, cache, _tokens(8, 40), cache_salt="victim", cache_salt_from=16)
    probe = torch.cat([victim, _tokens(3, 41)], dim=-1)
    assert _generate(model, cache, probe, cache_salt="attacker", cache_salt_from=16)[1] == 0
    assert _generate(model, cache, probe)[1] == 0
    assert _generate(model, cache, probe, cache_salt="victim", cache_salt_from=16)[1] == victim.shape[1] - 1
