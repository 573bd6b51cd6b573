"""MarconiCache under bad input, model faults, threads and a tight capacity: the store is never corrupted."""

from __future__ import annotations

import random
import threading

import pytest
import torch

from conftest import fresh_cache
from hf_marconi import MarconiCache, MarconiCacheError
from hf_marconi.testing import build_model

SETTINGS = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)



def _ids(*tokens: int) -> torch.Tensor:
    return torch.tensor([tokens], dtype=torch.long)


def _random_tokens(n: int, rng: random.Random) -> list[int]:
    return [rng.randrange(3, 250) for _ in range(n)]


def _store_state(cache: MarconiCache) -> tuple:
    """What must not change when a call fails: stored sequences, bytes, and the admission counters."""
    stats = cache.stats()
    return (
        frozenset(cache.store.tree.checkpointed_prefixes()),
        frozenset(cache.store.tree.prefix_tokens(node) for node in cache.store.tree.nodes()),
        cache.store.nbytes,
        stats["checkpoints_admitted"],
        stats["checkpoints_evicted"],
    )


@pytest.fixture(scope="module")
def bamba():
    return build_model("bamba")


@pytest.fixture
def warm_cache(bamba):
    cache = MarconiCache(bamba, capacity_bytes=32 * 2**20)
    rng = random.Random(0)
    history = _ids(*_random_tokens(20, rng))
    for _ in range(2):
        history = bamba.generate(torch.cat([history, _ids(*_random_tokens(5, rng))], -1), past_key_values=cache,
                                 **SETTINGS)
    return cache


@pytest.mark.parametrize(
    "prompt, message",
    [
        (torch.empty((1, 0), dtype=torch.long), "empty"),
        (_ids(5, 100000), "vocabulary"),
        (_ids(5, -1), "vocabulary"),
        (torch.tensor([[1.0, 2.0]]), "integer"),
    ],
)
def test_bad_prompts_raise_and_leave_store_unchanged(bamba, warm_cache, prompt, message):
    before = _store_state(warm_cache)
    with pytest.raises(MarconiCacheError, match=message):
        bamba.generate(prompt, past_key_values=warm_cache, **SETTINGS)
    assert _store_state(warm_cache) == before
    warm_cache.check_invariants()


def test_cache_of_another_model_is_refused(bamba, warm_cache):
    other = build_model("bamba", seed=1)
    before = _store_state(warm_cache)
    with pytest.raises(MarconiCacheError, match="different model|another model"):
        other.generate(_ids(5, 6, 7), past_key_values=warm_cache, **SETTINGS)
    assert _store_state(warm_cache) == before


def test_capacity_too_small_admits_nothing(bamba):
    cache = MarconiCache(bamba, capacity_bytes=1024)
    out = bamba.generate(_ids(*range(3, 30)), past_key_values=cache, **SETTINGS)
    reference = bamba.generate(_ids(*range(3, 30)), **fresh_cache(bamba), **SETTINGS)
    assert torch.equal(out, reference)
    stats = cache.stats()
    assert stats["bytes"] == 0 and stats["admissions_refused"] >= 1


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("fail_at_forward", [0, 1, 3])
def test_exception_inside_model_leaves_store_unchanged(bamba, warm_cache, fail_at_forward):
    """Forward 0 is the prefill; later forwards are decode steps."""
    calls = {"n": 0}

    def explode(_module, _args):
        calls["n"] += 1
        if calls["n"] == fail_at_forward + 1:
            raise Boom("injected fault")

    layer = bamba.model.layers[1]
    handle = layer.register_forward_pre_hook(explode)
    before = _store_state(warm_cache)
    prompt = _ids(*_random_tokens(30, random.Random(7)))
    try:
        with pytest.raises(Boom):
            bamba.generate(prompt, past_key_values=warm_cache, **SETTINGS)
    finally:
        handle.remove()
    assert _store_state(warm_cache) == before
    warm_cache.check_invariants()
    # the next call works and is correct
    out = bamba.generate(prompt, past_key_values=warm_cache, **SETTINGS)
    assert torch.equal(out, bamba.generate(prompt, **fresh_cache(bamba), **SETTINGS))


def test_beam_search_and_assisted_decoding_are_refused(bamba, warm_cache):
    before = _store_state(warm_cache)
    with pytest.raises(ValueError, match="beam search"):
        bamba.generate(_ids(5, 6, 7), past_key_values=warm_cache, num_beams=2, max_new_tokens=2)
    with pytest.raises(ValueError, match="assisted"):
        bamba.generate(_ids(5, 6, 7), past_key_values=warm_cache, prompt_lookup_num_tokens=2, max_new_tokens=2)
    assert _store_state(warm_cache) == before


def test_batch_on_a_pure_recurrent_model_runs_without_reuse():
    """A pure Mamba model's cache counts no tokens per row, so a batch cannot be aligned over restored prefixes: it
    runs without reuse (and admits nothing), with the same tokens as uncached generation."""
    model = build_model("mamba2")
    cache = MarconiCache(model, capacity_bytes=8 * 2**20)
    prompts = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    out = model.generate(prompts, past_key_values=cache, **SETTINGS)
    assert cache.stats()["bypassed_calls"] == 1 and cache.store.nbytes == 0
    assert torch.equal(out, model.generate(prompts, **fresh_cache(model), **SETTINGS))


@pytest.mark.timeout(300)
def test_threads_share_one_cache(bamba):
    cache = MarconiCache(bamba, capacity_bytes=8 * 2**20)
    rng = random.Random(3)
    system = _random_tokens(16, rng)
    prompts = [_ids(*(system + _random_tokens(6, rng))) for _ in range(8)]
    expected = [bamba.generate(p, **fresh_cache(bamba), **SETTINGS) for p in prompts]
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        try:
            # Calls run at once: the first round misses everywhere, the second captures the shared system prompt's
            # branch point, the third reuses it.
            for _ in range(3):
                out = bamba.generate(prompts[index], past_key_values=cache, **SETTINGS)
                assert torch.equal(out, expected[index])
        except BaseException as error:  # reported to the main thread
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), "a generate call deadlocked"
    assert not errors, errors
    cache.check_invariants()
    assert cache.stats()["hits"] > 0


def test_tight_capacity_mixed_workload(bamba):
    """200 requests (multi-turn, shared prefixes, branches, repeats) in a cache that holds a few entries."""
    rng = random.Random(11)
    cache = MarconiCache(bamba, capacity_bytes=0)
    entry_bytes = cache.sizes.kv_bytes_per_token * 40 + 2 * cache.sizes.checkpoint_bytes
    cache = MarconiCache(bamba, capacity_bytes=3 * entry_bytes)
    systems = [_random_tokens(12, rng) for _ in range(3)]
    sessions: list[list[int]] = []
    settings = dict(SETTINGS, max_new_tokens=3)
    for step in range(200):
        kind = rng.random()
        if kind < 0.4 and sessions:  # next turn of a session
            index = rng.randrange(len(sessions))
            prompt = sessions[index] + _random_tokens(rng.randint(1, 6), rng)
        elif kind < 0.7:  # shared system prompt
            index = None
            prompt = rng.choice(systems) + _random_tokens(rng.randint(1, 8), rng)
        elif kind < 0.85 and sessions:  # repeat a past prompt exactly
            index = None
            prompt = list(rng.choice(sessions))
        else:  # a new session
            index = len(sessions)
            sessions.append([])
            prompt = _random_tokens(rng.randint(4, 20), rng)
        prompt = prompt[-60:]  # keep sequences short
        out = bamba.generate(_ids(*prompt), past_key_values=cache, **settings)
        reference = bamba.generate(_ids(*prompt), **fresh_cache(bamba), **settings)
        assert torch.equal(out, reference), f"request {step} differs from uncached generation"
        if index is not None:
            sessions[index] = out[0].tolist()
        stats = cache.stats()
        assert stats["bytes"] <= cache.store.capacity_bytes
        assert stats["bytes"] == cache.store.nbytes
        assert stats["hits"] <= stats["lookups"] == step + 1
        cache.check_invariants()
    assert cache.stats()["checkpoints_evicted"] > 0
    assert cache.stats()["hits"] > 0


@pytest.mark.parametrize("batched", [False, True])
def test_an_error_while_admitting_releases_the_lookups_lock(bamba, warm_cache, batched, monkeypatch):
    """Copying the new states out fails (e.g. out of memory): the error reaches the caller, no lock is left on the
    tree (a leaked lock would keep its path from ever being evicted), and the next call works."""
    layout = warm_cache.layout

    def failing_take_edge(*args, **kwargs):
        raise MemoryError("simulated: no memory for the copy")

    monkeypatch.setattr(type(layout), "take_edge", failing_take_edge)
    prompt = _ids(*range(30, 52))
    ids = torch.cat([prompt, prompt.flip(-1)]) if batched else prompt
    with pytest.raises(MemoryError):
        bamba.generate(ids, past_key_values=warm_cache, **SETTINGS)
    monkeypatch.undo()
    assert warm_cache.store.tree.root.lock_ref == 0
    warm_cache.check_invariants()
    out = bamba.generate(prompt, past_key_values=warm_cache, **SETTINGS)
    assert torch.equal(out, bamba.generate(prompt, **fresh_cache(bamba), **SETTINGS))
