"""Several threads generating through one MarconiCache at once.

Each thread's call owns its live states; the store is shared, and its lock is held for tree work only. Every output
equals uncached generation, whatever the interleaving: random schedules (random pauses inside the store's critical
sections and between decode steps) and fixed ones (a call held mid-decode while others run, clear and stats)."""

from __future__ import annotations

import random
import threading
import time

import pytest
import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from conftest import fresh_cache, run_in_threads
from hf_marconi import MarconiCache
from hf_marconi.kernels import recurrent_mixers
from hf_marconi.testing import build_model

SETTINGS = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)
WAIT_S = 60.0  # the longest any test waits for another thread before failing (never reached when the code is right)


def _tokens(n: int, rng: random.Random) -> list[int]:
    return [rng.randrange(3, 250) for _ in range(n)]


def _uncached(model, prompt: list[int]) -> list[int]:
    return model.generate(torch.tensor([prompt]), **fresh_cache(model), **SETTINGS)[0].tolist()


class _Jitter:
    """Random pauses (0-2 ms, seeded per thread) at the points where an interleaving matters: inside the store's
    plan / commit / abort and at every decode step."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._rngs = threading.local()

    def pause(self) -> None:
        rng = getattr(self._rngs, "rng", None)
        if rng is None:
            rng = self._rngs.rng = random.Random(f"{self.seed}-{threading.get_ident()}")
        if rng.random() < 0.5:
            time.sleep(rng.random() * 0.002)

    def wrap_store(self, store) -> None:
        for name in ("plan", "commit", "abort"):
            method = getattr(store, name)

            def paused(*args, _method=method, **kwargs):
                self.pause()
                try:
                    return _method(*args, **kwargs)
                finally:
                    self.pause()

            setattr(store, name, paused)


class _PauseEachStep(StoppingCriteria):
    def __init__(self, jitter: _Jitter) -> None:
        self.jitter = jitter

    def __call__(self, input_ids, scores, **kwargs):
        self.jitter.pause()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("family,seed", [("bamba", 0), ("bamba", 1), ("bamba", 2), ("jamba", 3), ("mamba2", 4),
                                         ("qwen3_next", 5)])
def test_random_schedules_of_multi_turn_sessions_equal_uncached(family, seed):
    """4 threads, each a 3-turn session under one of two shared system prompts, with random pauses inside the store's
    critical sections and between decode steps, at a capacity that forces evictions while entries are locked."""
    model = build_model(family)
    rng = random.Random(seed)
    systems = [_tokens(12, rng), _tokens(12, rng)]
    probe = MarconiCache(model, capacity_bytes=0)
    entry = 30 * probe.sizes.kv_bytes_per_token + 2 * probe.sizes.checkpoint_bytes
    cache = MarconiCache(model, capacity_bytes=4 * entry)
    jitter = _Jitter(seed)
    jitter.wrap_store(cache.store)
    plans = [[_tokens(rng.randint(2, 6), rng) for _ in range(3)] for _ in range(4)]
    results: dict[tuple[int, int], tuple[list[int], list[int]]] = {}

    def session(index: int) -> None:
        history = systems[index % 2]
        for turn, user in enumerate(plans[index]):
            prompt = history + user
            out = model.generate(torch.tensor([prompt]), past_key_values=cache,
                                 stopping_criteria=StoppingCriteriaList([_PauseEachStep(jitter)]), **SETTINGS)
            history = out[0].tolist()
            results[(index, turn)] = (prompt, history)

    run_in_threads(session, 4)
    for prompt, output in results.values():
        assert output == _uncached(model, prompt)
    cache.check_invariants()
    stats = cache.stats()
    assert stats["lookups"] == 12 and stats["hits"] > 0 and stats["bytes"] <= cache.store.capacity_bytes


class _HoldAtStep(StoppingCriteria):
    """Holds the call at its ``step``-th decode step until ``release`` is set (signalling ``reached``)."""

    def __init__(self, step: int) -> None:
        self.step, self.calls = step, 0
        self.reached, self.release = threading.Event(), threading.Event()

    def __call__(self, input_ids, scores, **kwargs):
        self.calls += 1
        if self.calls == self.step:
            self.reached.set()
            assert self.release.wait(WAIT_S), "the held call was never released"
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def _start_held_call(model, cache, prompt: list[int], hold: _HoldAtStep, into: dict) -> threading.Thread:
    def run() -> None:
        try:
            into["output"] = model.generate(torch.tensor([prompt]), past_key_values=cache,
                                            stopping_criteria=StoppingCriteriaList([hold]), **SETTINGS)[0].tolist()
        except BaseException as error:  # surfaced by the test
            into["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert hold.reached.wait(WAIT_S), "the held call never reached its decode step"
    return thread


@pytest.mark.timeout(300)
def test_calls_run_while_another_is_mid_decode_and_locked_entries_survive_evictions():
    """A call held mid-decode holds the lock on its restored prefix; other calls run to completion meanwhile (under a
    whole-call lock they would wait for it), evict everything they can, and the held call still ends with the
    uncached tokens and admits its states."""
    model = build_model("bamba")
    rng = random.Random(7)
    system = _tokens(16, rng)
    probe = MarconiCache(model, capacity_bytes=0)
    cache = MarconiCache(model, capacity_bytes=3 * (40 * probe.sizes.kv_bytes_per_token
                                                    + 2 * probe.sizes.checkpoint_bytes))
    for _ in range(3):  # the system prompt's branch point is stored and hit
        model.generate(torch.tensor([system + _tokens(4, rng)]), past_key_values=cache, **SETTINGS)
    held_prompt = system + _tokens(5, rng)
    own_live = list(cache.live_tokens)
    hold, held = _HoldAtStep(step=2), {}
    thread = _start_held_call(model, cache, held_prompt, hold, held)
    try:
        assert cache.live_tokens == own_live  # this thread's live states: untouched by the held call
        stats = cache.stats()  # never waits for a model call
        assert stats["lookups"] == 4
        others = [_tokens(30, rng) for _ in range(4)]  # unrelated prompts: admitting them evicts
        for prompt in others:
            out = model.generate(torch.tensor([prompt]), past_key_values=cache, **SETTINGS)[0].tolist()
            assert out == _uncached(model, prompt)
        assert cache.stats()["nodes_evicted"] > 0
        locked = [n for n in cache.store.tree.nodes() if n.lock_ref]
        assert locked and max(n.depth for n in locked) == 16, "the held call's restored prefix is still stored"
    finally:
        hold.release.set()
        thread.join(WAIT_S)
    assert not thread.is_alive() and "error" not in held, held.get("error")
    assert held["output"] == _uncached(model, held_prompt)
    assert cache.last_call is not None
    cache.check_invariants()


@pytest.mark.timeout(300)
def test_clear_while_a_call_is_in_flight():
    """clear() does not wait for a call mid-decode; that call ends with the right tokens and stores nothing (its
    states may belong to weights that changed), and the store stays empty and consistent."""
    model = build_model("bamba")
    rng = random.Random(8)
    cache = MarconiCache(model, capacity_bytes=32 * 2**20)
    prompt = _tokens(12, rng)
    for _ in range(3):
        model.generate(torch.tensor([prompt]), past_key_values=cache, **SETTINGS)
    hold, held = _HoldAtStep(step=2), {}
    thread = _start_held_call(model, cache, prompt, hold, held)
    try:
        assert cache.clear() > 0
        assert cache.stats()["bytes"] == 0
    finally:
        hold.release.set()
        thread.join(WAIT_S)
    assert not thread.is_alive() and "error" not in held, held.get("error")
    assert held["output"] == _uncached(model, prompt)
    assert cache.store.nbytes == 0 and not cache.store.tree.root.children
    cache.check_invariants()


@pytest.mark.timeout(300)
def test_concurrent_single_pass_captures_split_only_their_own_forward():
    """Threads capturing branch points on one model at once (one cache, and a second cache of the same model) each
    split only their own forward; the mixers' forwards are put back once the last capture ends."""
    model = build_model("bamba")
    rng = random.Random(9)
    caches = [MarconiCache(model, capacity_bytes=32 * 2**20) for _ in range(2)]
    system = _tokens(16, rng)
    prompts = {(i, turn): system + _tokens(6, rng) for i in range(4) for turn in range(3)}
    outputs: dict[tuple[int, int], list[int]] = {}

    def worker(index: int) -> None:
        for turn in range(3):
            prompt = prompts[(index, turn)]
            outputs[(index, turn)] = model.generate(torch.tensor([prompt]), past_key_values=caches[index % 2],
                                                    **SETTINGS)[0].tolist()

    run_in_threads(worker, 4)
    for key, output in outputs.items():
        assert output == _uncached(model, prompts[key])
    assert all(cache.stats()["hits_purely_input"] >= 1 for cache in caches), "each cache captured the branch point"
    assert all("forward" not in vars(mixer) for mixer in recurrent_mixers(model).values())


@pytest.mark.timeout(300)
def test_each_thread_continues_its_own_returned_cache():
    """After generate returns, a thread continues the returned cache by hand from its own call's live states, while
    other threads' calls have run through the same cache object."""
    model = build_model("bamba")
    rng = random.Random(10)
    cache = MarconiCache(model, capacity_bytes=32 * 2**20)
    prompts = [_tokens(10, rng) for _ in range(3)]
    barrier = threading.Barrier(3, timeout=WAIT_S)
    continued: dict[int, torch.Tensor] = {}

    def worker(index: int) -> None:
        out = model.generate(torch.tensor([prompts[index]]), past_key_values=cache, **SETTINGS)
        barrier.wait()  # every thread's call has returned before any continues
        with torch.no_grad():
            logits = model(out[:, -1:], past_key_values=cache).logits
        continued[index] = logits[0, -1]

    run_in_threads(worker, 3)
    for index, prompt in enumerate(prompts):
        full = model.generate(torch.tensor([prompt]), **fresh_cache(model), **SETTINGS)
        with torch.no_grad():
            expected = model(full, **fresh_cache(model)).logits[0, -1]
        torch.testing.assert_close(continued[index], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.timeout(300)
def test_continuing_another_threads_output_by_hand_is_warned():
    """Live states are per thread: continuing, in the main thread, an output that generate returned in a worker thread
    would start from the main thread's empty states. It is warned about (once), not silent."""
    model = build_model("bamba")
    cache = MarconiCache(model, capacity_bytes=32 * 2**20)
    outputs = {}

    def worker(_: int) -> None:
        outputs["out"] = model.generate(torch.tensor([_tokens(10, random.Random(11))]), past_key_values=cache,
                                        **SETTINGS)

    run_in_threads(worker, 1)
    with pytest.warns(UserWarning, match="thread that called generate"):
        with torch.no_grad():
            model(outputs["out"][:, -1:], past_key_values=cache)


@pytest.mark.timeout(300)
def test_clear_from_a_callback_inside_a_batched_call_keeps_its_tokens_right():
    """clear() from a stopping criterion of the calling thread's own batched call: the call finishes on its live
    states with the uncached tokens, and stores nothing (the store was cleared under it)."""
    model = build_model("bamba")
    cache = MarconiCache(model, capacity_bytes=32 * 2**20)

    class ClearOnce(StoppingCriteria):
        done = False

        def __call__(self, input_ids, scores, **kwargs):
            if not self.done:
                self.done = True
                cache.clear()
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    ids = torch.tensor([[0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])
    mask = (ids != 0).long()
    out = model.generate(ids, attention_mask=mask, past_key_values=cache,
                         stopping_criteria=StoppingCriteriaList([ClearOnce()]), **SETTINGS)
    assert torch.equal(out, model.generate(ids, attention_mask=mask, **fresh_cache(model), **SETTINGS))
    assert cache.store.nbytes == 0
    cache.check_invariants()


@pytest.mark.timeout(300)
def test_clear_while_a_batched_call_is_in_flight_stores_nothing_afterwards():
    """A batched row admits its continuation with a second plan after decoding; a clear() in between (or a weight
    change) must still drop that admission, as it drops a one-sequence call's."""
    model = build_model("bamba")
    cache = MarconiCache(model, capacity_bytes=32 * 2**20)
    ids = torch.tensor([[0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])
    mask = (ids != 0).long()
    hold, held = _HoldAtStep(step=2), {}

    def run() -> None:
        try:
            held["output"] = model.generate(ids, attention_mask=mask, past_key_values=cache,
                                            stopping_criteria=StoppingCriteriaList([hold]), **SETTINGS)
        except BaseException as error:  # surfaced by the test
            held["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert hold.reached.wait(WAIT_S)
    try:
        cache.clear()
    finally:
        hold.release.set()
        thread.join(WAIT_S)
    assert not thread.is_alive() and "error" not in held, held.get("error")
    assert torch.equal(held["output"], model.generate(ids, attention_mask=mask, **fresh_cache(model), **SETTINGS))
    assert cache.store.nbytes == 0, "nothing admitted after the clear"
    cache.check_invariants()


@pytest.mark.timeout(300)
def test_calls_sharing_a_prefix_while_in_flight_store_their_branch_point():
    """A call that starts while another with the same system prompt is mid-decode captures the branch point off the
    other's prompt (the tree shows neither yet), so the next call with that system prompt restores it, as it would
    after the same two calls run one after the other."""
    model = build_model("bamba")
    rng = random.Random(12)
    cache = MarconiCache(model, capacity_bytes=32 * 2**20)
    system = _tokens(16, rng)
    hold, held = _HoldAtStep(step=2), {}
    thread = _start_held_call(model, cache, system + _tokens(5, rng), hold, held)
    try:
        second = system + _tokens(6, rng)
        assert model.generate(torch.tensor([second]), past_key_values=cache, **SETTINGS)[0].tolist() == \
            _uncached(model, second)
    finally:
        hold.release.set()
        thread.join(WAIT_S)
    assert not thread.is_alive() and "error" not in held, held.get("error")
    third = system + _tokens(4, rng)
    out = model.generate(torch.tensor([third]), past_key_values=cache, return_dict_in_generate=True, **SETTINGS)
    assert out.marconi_record.reused_tokens == len(system)
    assert out.sequences[0].tolist() == _uncached(model, third)
