"""Reliability of MarconiCache and its persistence under faults, load, threads and fuzzed input.

What tests/test_cache_faults.py already covers (bad prompts, a fault in bamba's forward, 8 threads against
precomputed outputs, a 200-request mix) is not repeated; this file adds faults while saving, faults at random
layers and forwards in several families and both capture modes, a 5,000-request soak with memory checks, 8 threads
that each check against uncached generation while a ninth saves the cache, and hypothesis fuzzing of the public API.

The soak drives 5,000 requests through the cache's store the way the live cache does (plan, the checkpoint
positions it asks for, commit) with payloads of the model's real shapes, dtypes and byte sizes whose values encode
the tokens and positions they belong to, so every hit is checked to restore exactly the states of its prefix; one
request in 50 is a real ``generate`` on the tiny model through the same cache, checked against uncached generation.
A model call costs ~20-30 ms on this 2-core machine, so 5,000 of them would take minutes; the store's work, which is
what a soak stresses, is the same. ``HF_MARCONI_SOAK=1`` runs a longer soak in which every request is a real
``generate`` (``HF_MARCONI_SOAK_REQUESTS``, default 5,000).
"""

from __future__ import annotations

import gc
import os
import random
import threading
from typing import Sequence

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import fresh_cache
from hf_marconi import MarconiCache, MarconiCacheError
from hf_marconi import persistence
from hf_marconi.persistence import PersistenceError, load_cache, save_cache
from hf_marconi.pipeline import MarconiPipeline, byte_level_tokenizer
from hf_marconi.states import KVEdge, StateCheckpoint
from hf_marconi.tiers import TieredStorage
from hf_marconi.testing import build_model

VOCAB = 256
SETTINGS = dict(max_new_tokens=2, do_sample=False, pad_token_id=0, eos_token_id=None)



@pytest.fixture(scope="module")
def bamba():
    return build_model("bamba")


def _tokens(n: int, rng: random.Random, low: int = 3, high: int = 250) -> list[int]:
    return [rng.randrange(low, high) for _ in range(n)]


# Prompts built from earlier outputs may contain the padding id (0) the tiny model can generate; the attention mask is
# passed explicitly so that generate does not infer padding from it (which makes the call run without reuse, see
# the last test of this file).
def _uncached(model, ids: Sequence[int], **settings) -> list[int]:
    prompt = torch.tensor([list(ids)])
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt),
                         **fresh_cache(model), **dict(SETTINGS, **settings))
    return out[0].tolist()


def _cached(model, cache, ids: Sequence[int], **settings) -> list[int]:
    prompt = torch.tensor([list(ids)])
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), past_key_values=cache,
                         **dict(SETTINGS, **settings))
    return out[0].tolist()


def _store_view(cache: MarconiCache) -> tuple:
    """What a failed call or save must leave as it was: stored sequences, checkpointed prefixes, bytes."""
    tree = cache.store.tree
    return (
        frozenset(tree.prefix_tokens(node) for node in tree.nodes()),
        frozenset(tree.checkpointed_prefixes()),
        cache.store.nbytes,
    )


def _warm(model, cache, seed: int) -> list[int]:
    rng = random.Random(seed)
    history = _tokens(16, rng)
    for _ in range(2):
        history = _cached(model, cache, history + _tokens(4, rng))
    return history


def _rss_bytes() -> int:
    """Resident set size of this process, from /proc/self/statm (Linux)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ------------------------------------------------------------------------------------------ faults while saving
class SaveFault(RuntimeError):
    pass


def _half_written(original):
    def save_file(tensors, filename, metadata=None):
        original(tensors, filename, metadata=metadata)
        size = os.path.getsize(filename)
        with open(filename, "r+b") as handle:
            handle.truncate(size // 2)
        raise SaveFault("disk full half way")

    return save_file


def _fail_at_digest(call: int):
    original = persistence._digest
    calls = {"n": 0}

    def digest(tensor):
        calls["n"] += 1
        if calls["n"] == call:
            raise SaveFault(f"fault at checksum {call}")
        return original(tensor)

    return digest


@pytest.mark.parametrize("fault", ["first checksum", "fifth checksum", "half written", "rename", "interrupt"])
def test_fault_while_saving_leaves_old_file_and_store(bamba, tmp_path, monkeypatch, fault):
    cache = MarconiCache(bamba, capacity_bytes=16 * 2**20)
    history = _warm(bamba, cache, seed=1)
    target = tmp_path / "cache.safetensors"
    save_cache(cache, target)
    old_bytes = target.read_bytes()
    _cached(bamba, cache, history + [9, 9, 9])  # the store moves on; the next save would differ
    before = _store_view(cache)
    error: type[BaseException] = SaveFault
    if fault == "first checksum":
        monkeypatch.setattr(persistence, "_digest", _fail_at_digest(1))
    elif fault == "fifth checksum":
        monkeypatch.setattr(persistence, "_digest", _fail_at_digest(5))
    elif fault == "half written":
        monkeypatch.setattr(persistence, "save_file", _half_written(persistence.save_file))
    elif fault == "rename":
        def replace(src, dst):
            raise SaveFault("rename failed")

        monkeypatch.setattr(persistence.os, "replace", replace)
    else:
        def interrupted(*args, **kwargs):
            raise KeyboardInterrupt

        monkeypatch.setattr(persistence, "save_file", interrupted)
        error = KeyboardInterrupt
    with pytest.raises(error):
        save_cache(cache, target)
    monkeypatch.undo()
    assert target.read_bytes() == old_bytes  # the previous save is intact
    assert [p.name for p in tmp_path.iterdir()] == [target.name]  # no temporary file left behind
    assert _store_view(cache) == before
    cache.check_invariants()
    prompt = history + [9, 9, 9, 10]
    assert _cached(bamba, cache, prompt) == _uncached(bamba, prompt)  # the next call works
    save_cache(cache, target)  # and the next save
    reloaded = MarconiCache(bamba, capacity_bytes=16 * 2**20)
    load_cache(reloaded, target)
    assert _store_view(reloaded) == _store_view(cache)


def test_fault_while_saving_a_new_file_leaves_none(bamba, tmp_path, monkeypatch):
    cache = MarconiCache(bamba, capacity_bytes=16 * 2**20)
    _warm(bamba, cache, seed=2)
    monkeypatch.setattr(persistence, "save_file", _half_written(persistence.save_file))
    with pytest.raises(SaveFault):
        save_cache(cache, tmp_path / "new.safetensors")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------- faults at random forwards
@pytest.mark.parametrize("family", ["bamba", "lfm2", "qwen3_next"])
@pytest.mark.parametrize("capture", ["single_pass", "two_pass"])
def test_faults_at_random_layers_and_forwards(family, capture):
    """Each trial branches off a stored sequence (so the prefill captures a branch state) and raises inside a random
    decoder layer at a random forward (capture prefill, prefill, decode steps): the store is unchanged and the same
    request then succeeds with the uncached output."""
    model = build_model(family)
    cache = MarconiCache(model, capacity_bytes=16 * 2**20, capture=capture)
    rng = random.Random(f"{family}-{capture}")
    stored = _cached(model, cache, _tokens(24, rng))
    layers = model.model.layers
    faults = 0
    for trial in range(4):
        prompt = stored[: rng.randint(6, 20)] + _tokens(rng.randint(2, 8), rng)
        fail_at = rng.randint(0, 3)
        seen = {"n": 0}

        def explode(_module, _args, fail_at=fail_at):
            seen["n"] += 1
            if seen["n"] == fail_at + 1:
                raise SaveFault(f"fault in forward {fail_at}")

        handle = layers[rng.randrange(len(layers))].register_forward_pre_hook(explode)
        before = _store_view(cache)
        try:
            output = _cached(model, cache, prompt, max_new_tokens=3)
        except SaveFault:
            faults += 1
            assert _store_view(cache) == before
            output = None
        finally:
            handle.remove()
        cache.check_invariants()
        if output is None:
            output = _cached(model, cache, prompt, max_new_tokens=3)
        assert output == _uncached(model, prompt, max_new_tokens=3)
    assert faults >= 2


# ------------------------------------------------------------------------------------------------------ soak
class EncodedStates:
    """Payloads with the real shapes, dtypes and byte sizes of a model's states, whose values say which tokens and
    positions they hold: keys[0, 0, i, 0] = token id, values[0, 0, i, 0] = position; every checkpoint tensor holds
    a code of its prefix. A hit can then be checked to restore exactly the states of its prefix."""

    def __init__(self, edge: KVEdge, checkpoint: StateCheckpoint):
        self.kv_shapes = {i: (k.shape, k.dtype) for i, (k, _) in edge.kv.items()}
        self.template = checkpoint

    @staticmethod
    def code(prefix: Sequence[int]) -> float:
        return float(hash(tuple(prefix)) % 2**20)

    def edge(self, tokens: Sequence[int], start: int) -> KVEdge:
        kv = {}
        for layer, (shape, dtype) in self.kv_shapes.items():
            size = (shape[0], shape[1], len(tokens), shape[3])
            keys, values = torch.zeros(size, dtype=dtype), torch.zeros(size, dtype=dtype)
            keys[0, 0, :, 0] = torch.tensor(tokens, dtype=dtype)
            values[0, 0, :, 0] = torch.arange(start, start + len(tokens), dtype=dtype)
            kv[layer] = (keys, values)
        return KVEdge(len(tokens), kv)

    def checkpoint(self, prefix: Sequence[int]) -> StateCheckpoint:
        value = self.code(prefix)
        return StateCheckpoint(
            conv={k: torch.full_like(t, value) for k, t in self.template.conv.items()},
            recurrent={k: torch.full_like(t, value) for k, t in self.template.recurrent.items()},
        )

    def check_restores(self, plan) -> None:
        if plan.reuse_len == 0:
            return
        layer = next(iter(self.kv_shapes))
        keys = torch.cat([edge.kv[layer][0] for edge in plan.reuse_edges], dim=-2)
        values = torch.cat([edge.kv[layer][1] for edge in plan.reuse_edges], dim=-2)
        assert keys[0, 0, :, 0].long().tolist() == list(plan.input_ids[: plan.reuse_len]), "restored KV of other tokens"
        assert values[0, 0, :, 0].long().tolist() == list(range(plan.reuse_len)), "restored KV of other positions"
        expected = self.code(plan.input_ids[: plan.reuse_len])
        for tensor in (*plan.reuse_checkpoint.conv.values(), *plan.reuse_checkpoint.recurrent.values()):
            assert bool((tensor == expected).all()), "restored a checkpoint of another prefix"


class Workload:
    """Random requests: new sessions of mixed lengths, next turns, shared system prompts, branches off earlier
    sequences, exact repeats. Token ids in [low, high)."""

    def __init__(self, rng: random.Random, low: int, high: int, max_len: int):
        self.rng, self.low, self.high, self.max_len = rng, low, high, max_len
        self.systems = [self._tokens(rng.randint(8, 24)) for _ in range(4)]
        self.sessions: list[list[int]] = []

    def _tokens(self, n: int) -> list[int]:
        return [self.rng.randrange(self.low, self.high) for _ in range(n)]

    def next(self) -> tuple[list[int], int | None]:
        """A prompt and the session it continues (None: not a session turn)."""
        rng, kind = self.rng, self.rng.random()
        if kind < 0.35 and self.sessions:
            index = rng.randrange(len(self.sessions))
            prompt = self.sessions[index] + self._tokens(rng.randint(1, 8))
        elif kind < 0.6:
            index, prompt = None, rng.choice(self.systems) + self._tokens(rng.randint(1, 10))
        elif kind < 0.75 and self.sessions:
            source = rng.choice(self.sessions)
            index, prompt = None, source[: rng.randint(1, len(source))] + self._tokens(rng.randint(1, 6))
        elif kind < 0.85 and self.sessions:
            index, prompt = None, list(rng.choice(self.sessions))
        else:
            length = rng.randint(1, 40) if rng.random() < 0.9 else rng.randint(41, self.max_len)
            index, prompt = len(self.sessions), self._tokens(length)
            self.sessions.append([])
            if len(self.sessions) > 16:
                self.sessions.pop(0)
                index -= 1
        if len(prompt) > self.max_len:  # a session that grew too long starts over
            prompt = prompt[-self.max_len:]
        return prompt, index

    def record(self, index: int | None, sequence: list[int]) -> None:
        if index is not None and 0 <= index < len(self.sessions):
            self.sessions[index] = sequence


def _payload_objects() -> int:
    gc.collect()
    return sum(1 for obj in gc.get_objects() if type(obj) in (KVEdge, StateCheckpoint))


def run_soak(model, requests: int, real_every: int, check_every: int, seed: int = 0) -> dict[str, float]:
    """Drive ``requests`` random requests through one MarconiCache at a tight capacity; returns measurements.

    Every ``real_every``-th request is a real ``generate`` (token ids < 256), every ``check_every``-th real one is
    compared with uncached generation; the others go through the store with :class:`EncodedStates` payloads (token
    ids >= 1000, so the two kinds never share a stored prefix) and every hit among them is checked.
    """
    cache = MarconiCache(model, capacity_bytes=16 * 2**20)
    first = _cached(model, cache, list(range(3, 20)))
    (entry,) = cache.store.snapshot().entries
    states = EncodedStates(entry.edge, entry.checkpoint)
    entry_bytes = 30 * cache.sizes.kv_bytes_per_token + 2 * cache.sizes.checkpoint_bytes
    cache = MarconiCache(model, capacity_bytes=24 * entry_bytes)
    store = cache.store
    rng = random.Random(seed)
    real = Workload(random.Random(seed + 1), 3, 250, max_len=60)
    encoded = Workload(random.Random(seed + 2), 1000, 1400, max_len=120)
    real_requests = checked = 0
    rss_after_warmup = peak_rss = 0
    objects_after_warmup = 0
    warmup = min(1000, requests // 5)
    assert first  # the template request produced a sequence
    for step in range(requests):
        if step % real_every == 0:
            prompt, index = real.next()
            out = _cached(model, cache, prompt)
            real_requests += 1
            if real_requests % check_every == 0:
                assert out == _uncached(model, prompt), f"request {step} differs from uncached generation"
                checked += 1
            real.record(index, out)
        else:
            prompt, index = encoded.next()
            output = [rng.randrange(1000, 1400) for _ in range(rng.randint(1, 4))]
            plan = store.plan(prompt)
            states.check_restores(plan)
            tokens = prompt + output[:-1]  # the live cache commits all but the last generated token
            positions = store.checkpoint_positions(plan, len(tokens))
            store.commit(plan, tokens, lambda start, end: states.edge(tokens[start:end], start),
                         {p: states.checkpoint(tokens[:p]) for p in positions})
            encoded.record(index, prompt + output)
        assert store.nbytes <= store.capacity_bytes, f"capacity exceeded at request {step}"
        if step % 250 == 0:
            cache.check_invariants()
        if step == warmup:
            rss_after_warmup, objects_after_warmup = _rss_bytes(), _payload_objects()
        peak_rss = max(peak_rss, _rss_bytes()) if step % 100 == 0 else peak_rss
    cache.check_invariants()
    stats = cache.stats()
    nodes = sum(1 for _ in store.tree.nodes())
    return {
        "requests": requests,
        "real_requests": real_requests,
        "checked_against_uncached": checked,
        "hits": stats["hits"],
        "token_hit_rate": stats["token_hit_rate"],
        "nodes_evicted": stats["nodes_evicted"],
        "peak_bytes": stats["peak_bytes"],
        "capacity_bytes": store.capacity_bytes,
        "stored_nodes": nodes,
        "payload_objects_after_warmup": objects_after_warmup,
        "payload_objects_at_end": _payload_objects(),
        "rss_after_warmup_mib": rss_after_warmup / 2**20,
        "rss_peak_mib": peak_rss / 2**20,
        "rss_end_mib": _rss_bytes() / 2**20,
    }


def _assert_soak_healthy(result: dict[str, float]) -> None:
    assert result["peak_bytes"] <= result["capacity_bytes"]
    assert result["hits"] > result["requests"] * 0.2 and result["nodes_evicted"] > result["requests"] * 0.1
    # No payload outlives its eviction: live payload objects stay bounded by the stored nodes (edge + checkpoint each)
    # plus a few held by the latest call's record.
    assert result["payload_objects_at_end"] <= 2 * result["stored_nodes"] + 16
    # Memory is stable: after the warm-up the process grows by less than what leaking 1 request in 10 would take.
    assert result["rss_end_mib"] - result["rss_after_warmup_mib"] < 32, result


def test_soak_5000_requests_tight_capacity(bamba):
    result = run_soak(bamba, requests=5000, real_every=50, check_every=5)
    assert result["real_requests"] == 100 and result["checked_against_uncached"] == 20
    _assert_soak_healthy(result)


@pytest.mark.skipif(os.environ.get("HF_MARCONI_SOAK") != "1", reason="long soak: set HF_MARCONI_SOAK=1 to run it")
def test_long_soak_every_request_real(bamba):
    requests = int(os.environ.get("HF_MARCONI_SOAK_REQUESTS", "5000"))
    result = run_soak(bamba, requests=requests, real_every=1, check_every=25)
    print("long soak:", result)
    _assert_soak_healthy(result)


# ------------------------------------------------------------------------------------------------ concurrency
@pytest.mark.timeout(300)
def test_eight_threads_check_against_uncached_while_a_ninth_saves(bamba, tmp_path):
    """Each thread holds its own conversation (half share a system prompt) and checks every output against uncached
    generation, run in the same thread on a twin of the model (same weights), so that the uncached forwards exercise
    another model instance while the next test checks the same instance; a ninth thread saves the cache in a loop;
    spill tiers rebalance after every commit."""
    twin = build_model("bamba")
    cache = MarconiCache(bamba, capacity_bytes=2 * 2**20)
    tiers = TieredStorage(cache, fast_capacity_bytes=2**19, fast_device="cpu")
    rng = random.Random(5)
    systems = [_tokens(14, rng), _tokens(14, rng)]
    starts = [systems[i % 2] + _tokens(rng.randint(2, 10), rng) for i in range(8)]
    assert _uncached(twin, starts[0]) == _uncached(bamba, starts[0])  # the twin computes what the model does
    errors: list[BaseException] = []
    running = threading.Event()
    running.set()
    saves = {"n": 0}

    def converse(index: int) -> None:
        local = random.Random(index)
        try:
            history = starts[index]
            for _ in range(3):
                prompt = history + _tokens(local.randint(1, 6), local)
                out = _cached(bamba, cache, prompt, max_new_tokens=3)
                assert out == _uncached(twin, prompt, max_new_tokens=3), f"thread {index} differs from uncached"
                history = out
        except BaseException as error:  # reported to the main thread
            errors.append(error)

    def keep_saving() -> None:
        try:
            while running.is_set():
                save_cache(cache, tmp_path / "live.safetensors")
                saves["n"] += 1
        except BaseException as error:
            errors.append(error)

    saver = threading.Thread(target=keep_saving)
    workers = [threading.Thread(target=converse, args=(i,)) for i in range(8)]
    saver.start()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=300)
    running.clear()
    saver.join(timeout=60)
    assert not any(t.is_alive() for t in [*workers, saver]), "a thread deadlocked"
    assert not errors, errors
    cache.check_invariants()
    assert cache.stats()["hits"] >= 8 and saves["n"] > 0
    assert tiers.tier_bytes()["fast"] <= tiers.fast_capacity_bytes
    reloaded = MarconiCache(bamba, capacity_bytes=2 * 2**20)
    load_cache(reloaded, tmp_path / "live.safetensors")  # a save taken mid-traffic is consistent
    reloaded.check_invariants()


@pytest.mark.timeout(300)
def test_other_thread_forward_of_the_same_model_during_a_capture():
    """Deterministic interleaving: while a cached call captures a branch state, another thread runs a plain forward
    of the same model instance with its own DynamicCache; it must compute as if no capture were running."""
    model = build_model("bamba")
    cache = MarconiCache(model, capacity_bytes=16 * 2**20)
    rng = random.Random(8)
    stored = _cached(model, cache, _tokens(20, rng))
    prompt = stored[:10] + _tokens(6, rng)  # branches inside the stored sequence: the prefill captures there
    other = torch.tensor([_tokens(7, rng)])
    expected = model(other).logits
    outcome: dict[str, object] = {}

    def plain_forward() -> None:
        try:
            outcome["logits"] = model(other, **fresh_cache(model)).logits
        except BaseException as error:
            outcome["error"] = error

    def run_other_thread_once(_module, _args) -> None:
        if "started" not in outcome:
            outcome["started"] = True
            worker = threading.Thread(target=plain_forward)
            worker.start()
            worker.join(timeout=60)

    handle = model.model.layers[0].register_forward_pre_hook(run_other_thread_once)
    try:
        out = _cached(model, cache, prompt)
    finally:
        handle.remove()
    assert cache.last_call.plan.capture_positions, "the call was meant to capture a branch state"
    assert out == _uncached(model, prompt)
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    torch.testing.assert_close(outcome["logits"], expected)


# ----------------------------------------------------------------------------------------------------- fuzzing
@pytest.fixture(scope="module")
def fuzz_cache(bamba):
    cache = MarconiCache(bamba, capacity_bytes=2 * 2**20)
    _warm(bamba, cache, seed=7)
    return cache


DTYPES = [torch.int64, torch.int32, torch.int16, torch.uint8, torch.float32, torch.bool]


@st.composite
def prompts(draw):
    ids = draw(st.lists(st.integers(-3, 300), min_size=0, max_size=24))
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.sampled_from(["1d", "2d", "3d", "batch2"]))
    prefix_of_stored = draw(st.booleans())
    return ids, dtype, shape, prefix_of_stored


def _as_tensor(ids: list[int], dtype: torch.dtype, shape: str) -> torch.Tensor:
    tensor = torch.tensor(ids, dtype=torch.int64)
    if dtype == torch.uint8:
        tensor = tensor.clamp(0, 255)  # uint8 cannot hold other values; in range by construction
    tensor = tensor.to(dtype)
    if shape == "2d":
        return tensor.unsqueeze(0)
    if shape == "3d":
        return tensor.reshape(1, 1, -1)
    if shape == "batch2":
        return torch.stack([tensor, tensor])
    return tensor


def _is_valid(ids: list[int], dtype: torch.dtype, shape: str) -> bool:
    if dtype in (torch.float32, torch.bool) or shape == "3d" or not ids:
        return False
    values = [min(max(i, 0), 255) for i in ids] if dtype == torch.uint8 else ids
    return all(0 <= i < VOCAB for i in values)


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=prompts(), entry=st.sampled_from(["generate", "request"]))
def test_fuzz_prompts_give_clear_errors_or_uncached_outputs(bamba, fuzz_cache, case, entry):
    ids, dtype, shape, prefix_of_stored = case
    if prefix_of_stored and ids:  # land on stored paths, where a bug would corrupt entries
        stored = max(fuzz_cache.store.tree.checkpointed_prefixes(), key=len)
        ids = list(stored[: len(ids)]) + ids[len(stored):]
    prompt = _as_tensor(ids, dtype, shape)
    before = _store_view(fuzz_cache)
    valid = _is_valid(ids, dtype, shape)
    # An explicit mask, so that an id equal to the padding id is not taken for padding (the call would run uncached).
    rows = 2 if shape == "batch2" else 1
    mask = {"attention_mask": torch.ones((rows, len(ids)), dtype=torch.long)} if shape != "3d" else {}
    settings = dict(max_new_tokens=1, do_sample=False, pad_token_id=0, **mask)
    if not valid:
        with pytest.raises(MarconiCacheError):
            if entry == "generate":
                bamba.generate(prompt, past_key_values=fuzz_cache, **settings)
            else:
                with fuzz_cache.request(prompt):
                    pass
        assert _store_view(fuzz_cache) == before
    elif entry == "generate":
        lookups = fuzz_cache.stats()["lookups"]
        out = bamba.generate(prompt, past_key_values=fuzz_cache, **settings)
        assert fuzz_cache.stats()["lookups"] == lookups + (2 if shape == "batch2" else 1)  # one per row
        reference = bamba.generate(prompt.long().reshape(-1, prompt.shape[-1]),
                                   **fresh_cache(bamba), **settings)
        assert torch.equal(out, reference)
    elif shape == "batch2":
        with pytest.raises(MarconiCacheError, match="one sequence"):
            with fuzz_cache.request(prompt):
                pass
        assert _store_view(fuzz_cache) == before
    else:
        with fuzz_cache.request(prompt) as call:
            logits = bamba(call.input_ids[:, call.prefilled:], past_key_values=fuzz_cache).logits[0, -1]
        full = bamba(prompt.long().reshape(1, -1)).logits[0, -1]
        torch.testing.assert_close(logits, full, rtol=1e-4, atol=1e-4)
    fuzz_cache.check_invariants()
    assert fuzz_cache.store.nbytes <= fuzz_cache.store.capacity_bytes


@settings(max_examples=8, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(first=st.text(max_size=24), second=st.text(max_size=24))
def test_fuzz_chat_messages(bamba, first, second):
    pipe = MarconiPipeline(bamba, byte_level_tokenizer(), capacity_bytes=2**22, max_new_tokens=3)
    chat = pipe.chat()
    chat.send(first)
    fed = len(chat.last_prompt_ids) + len(chat.last_reply_ids) - 1
    history = chat.token_ids
    chat.send(second)
    assert chat.last_prompt_ids[: len(history)] == history
    assert pipe.cache.last_call.reused == fed
    assert all(0 <= i < VOCAB for i in chat.token_ids)
    pipe.cache.check_invariants()


@pytest.fixture(scope="module")
def saved_file(bamba, tmp_path_factory):
    cache = MarconiCache(bamba, capacity_bytes=2**22)
    _warm(bamba, cache, seed=11)
    path = tmp_path_factory.mktemp("fuzz") / "cache.safetensors"
    save_cache(cache, path)
    return path, _store_view(cache)


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(where=st.floats(0, 1, exclude_max=True), flip=st.integers(1, 255))
def test_fuzz_damaged_files_load_nothing(bamba, saved_file, tmp_path_factory, where, flip):
    path, view = saved_file
    data = bytearray(path.read_bytes())
    at = int(where * len(data))
    data[at] ^= flip
    damaged = tmp_path_factory.mktemp("damaged") / "cache.safetensors"
    damaged.write_bytes(bytes(data))
    cache = MarconiCache(bamba, capacity_bytes=2**22)
    try:
        load_cache(cache, damaged)
    except PersistenceError:
        assert cache.store.nbytes == 0 and not cache.store.snapshot().entries
    else:  # only a byte the format ignores (header padding) may change without effect
        assert _store_view(cache) == view
    cache.check_invariants()


def test_meta_device_prompt_is_refused_clearly(bamba, fuzz_cache):
    before = _store_view(fuzz_cache)
    with pytest.raises(MarconiCacheError, match="meta"):
        bamba.generate(torch.tensor([[5, 6, 7]], device="meta"), past_key_values=fuzz_cache, max_new_tokens=1)
    assert _store_view(fuzz_cache) == before


def test_attention_mask_of_another_shape_is_refused_clearly(bamba, fuzz_cache):
    before = _store_view(fuzz_cache)
    for mask in (torch.ones(2, 3, dtype=torch.long), torch.ones(1, 5, dtype=torch.long)):
        with pytest.raises(MarconiCacheError, match="attention_mask"):
            bamba.generate(torch.tensor([[5, 6, 7]]), attention_mask=mask, past_key_values=fuzz_cache,
                           max_new_tokens=1, pad_token_id=0)
    assert _store_view(fuzz_cache) == before


def test_prompt_with_the_padding_id_and_no_attention_mask_equals_uncached(bamba):
    """Found by the long soak: a prompt that ends with the padding id (here a token the model generated) and no
    attention mask. Uncached generate infers a mask that hides that token for the whole prefill; a restored prefix
    followed by the masked token computes something else, so such a call must run without reuse."""
    prefix = [18, 77, 102, 160, 113, 166, 27, 54, 156, 238]
    settings = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    cache = MarconiCache(bamba, capacity_bytes=2**22)
    bamba.generate(torch.tensor([prefix]), past_key_values=cache, max_new_tokens=1, **settings)
    prompt = torch.tensor([prefix + [0]])
    cached = bamba.generate(prompt, past_key_values=cache, max_new_tokens=2, **settings)
    assert cache.stats()["bypassed_calls"] == 1
    uncached = bamba.generate(prompt, max_new_tokens=2, **settings)
    assert torch.equal(cached, uncached)


def test_padding_id_equal_to_eos_is_not_taken_for_padding(bamba):
    """Many real configs set pad == EOS. transformers then infers no padding from a prompt holding that id (a
    multi-turn prompt holds the earlier turns' EOS), so neither does the cache: the call reuses, and equals uncached."""
    settings = dict(do_sample=False, pad_token_id=2, eos_token_id=2)
    cache = MarconiCache(bamba, capacity_bytes=2**22)
    first = bamba.generate(torch.tensor([[18, 77, 102, 160, 113, 166, 27, 54]]), past_key_values=cache,
                           max_new_tokens=3, **settings)
    prompt = torch.cat([first, torch.tensor([[2, 40, 41, 42]])], dim=-1)  # the earlier turn closed with EOS
    cached = bamba.generate(prompt, past_key_values=cache, max_new_tokens=3, **settings)
    assert cache.stats()["bypassed_calls"] == 0 and cache.stats()["hits"] == 1
    assert torch.equal(cached, bamba.generate(prompt, max_new_tokens=3, **settings))
