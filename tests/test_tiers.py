"""TieredStorage: the fast tier never exceeds its capacity, spilled entries still hit, accounting per tier is exact.

On a CPU-only machine both tiers are on "cpu"; the tier of a payload is its type, so the logic is the same as with a
GPU fast tier (the CUDA test runs where a GPU is present).
"""

from __future__ import annotations

import random

import pytest
import torch
from transformers import DynamicCache

from hf_marconi import MarconiCache
from hf_marconi.families import cache_keyword_of
from hf_marconi.states import KVEdge, StateCheckpoint
from hf_marconi.tiers import SpilledCheckpoint, SpilledKVEdge, TieredStorage, move_checkpoint, move_edge
from hf_marconi.testing import build_model

SETTINGS = dict(max_new_tokens=3, do_sample=False, pad_token_id=0, eos_token_id=None)


@pytest.fixture(scope="module")
def model():
    return build_model("bamba")


def _generate(model, prompt: torch.Tensor, cache) -> torch.Tensor:
    """Greedy generation through ``cache``; the explicit mask keeps generate from taking a generated pad id that a
    later prompt feeds back for padding."""
    keyword = "past_key_values" if isinstance(cache, MarconiCache) else cache_keyword_of(model)
    return model.generate(prompt, attention_mask=torch.ones_like(prompt), **{keyword: cache}, **SETTINGS)


def _tokens(n: int, rng: random.Random) -> torch.Tensor:
    return torch.tensor([[rng.randrange(3, 250) for _ in range(n)]])


def _edge(tokens: int) -> KVEdge:
    return KVEdge(tokens, {1: (torch.randn(1, 2, tokens, 4), torch.randn(1, 2, tokens, 4))})


def test_spilled_edges_keep_their_tier_through_split_and_concat():
    edge = move_edge(_edge(6), torch.device("cpu"), spilled=True)
    assert isinstance(edge, SpilledKVEdge) and edge.nbytes == _edge(6).nbytes
    head, tail = edge.split(2)
    assert isinstance(head, SpilledKVEdge) and isinstance(tail, SpilledKVEdge)
    assert head.num_tokens == 2 and tail.num_tokens == 4
    merged = head.concat(_edge(3))  # a fast tail joins the spill tier
    assert isinstance(merged, SpilledKVEdge) and merged.num_tokens == 5
    assert torch.equal(merged.kv[1][0][:, :, :2], edge.kv[1][0][:, :, :2])
    checkpoint = StateCheckpoint(conv={(0, 0): torch.ones(1, 3)}, recurrent={(0, 0): torch.zeros(1, 2)})
    spilled = move_checkpoint(checkpoint, torch.device("cpu"), spilled=True)
    assert isinstance(spilled, SpilledCheckpoint) and spilled.nbytes == checkpoint.nbytes
    assert spilled.conv[(0, 0)] is not checkpoint.conv[(0, 0)]  # a copy, never shared
    assert type(move_checkpoint(spilled, torch.device("cpu"), spilled=False)) is StateCheckpoint


def test_fast_tier_stays_within_capacity_and_spilled_entries_hit(model):
    cache = MarconiCache(model, capacity_bytes=16 * 2**20)
    entry = 20 * cache.sizes.kv_bytes_per_token + cache.sizes.checkpoint_bytes
    tiers = TieredStorage(cache, fast_capacity_bytes=2 * entry, fast_device="cpu")
    rng = random.Random(0)
    sessions = [_tokens(12, rng) for _ in range(4)]
    for turn in range(3):
        for index, history in enumerate(sessions):
            prompt = torch.cat([history, _tokens(4, rng)], dim=-1)
            out = _generate(model, prompt, cache)
            reference = _generate(model, prompt, DynamicCache(config=model.config))
            assert torch.equal(out, reference)
            sessions[index] = out
            tiers_now = tiers.tier_bytes()
            assert tiers_now["fast"] <= tiers.fast_capacity_bytes
            assert tiers_now["fast"] + tiers_now["spill"] == cache.store.nbytes
            cache.check_invariants()
    stats = cache.stats()
    assert tiers.moves_to_spill > 0 and tiers.tier_bytes()["spill"] > 0
    # Every session's later turns hit, although its entry was spilled while the other sessions ran.
    assert stats["hits_input_output"] == 8
    # The entry just committed is the most recent: it is on the fast tier.
    newest = max(cache.store.tree.nodes(), key=lambda n: n.last_access)
    assert type(newest.edge) is KVEdge


def test_hit_on_a_spilled_entry_promotes_it(model):
    cache = MarconiCache(model, capacity_bytes=16 * 2**20)
    entry = 30 * cache.sizes.kv_bytes_per_token + cache.sizes.checkpoint_bytes
    tiers = TieredStorage(cache, fast_capacity_bytes=entry, fast_device="cpu")
    rng = random.Random(1)
    first = _generate(model, _tokens(16, rng), cache)
    _generate(model, _tokens(16, rng), cache)  # pushes the first session to the spill tier
    assert tiers.moves_to_spill == 1
    _generate(model, torch.cat([first, _tokens(3, rng)], -1), cache)
    assert cache.last_call.reused == first.shape[1] - 1
    assert tiers.moves_to_fast >= 1
    assert tiers.tier_bytes()["fast"] <= tiers.fast_capacity_bytes


def test_evictions_across_tiers_keep_accounting(model):
    probe = MarconiCache(model, capacity_bytes=0)
    entry = 24 * probe.sizes.kv_bytes_per_token + 2 * probe.sizes.checkpoint_bytes
    cache = MarconiCache(model, capacity_bytes=4 * entry)
    tiers = TieredStorage(cache, fast_capacity_bytes=entry, fast_device="cpu")
    rng = random.Random(2)
    system = _tokens(10, rng)
    for step in range(30):
        prompt = torch.cat([system, _tokens(rng.randint(2, 10), rng)], -1) if step % 2 else _tokens(14, rng)
        _generate(model, prompt, cache)
        split = tiers.tier_bytes()
        assert split["fast"] <= tiers.fast_capacity_bytes
        assert split["fast"] + split["spill"] == cache.store.nbytes <= cache.store.capacity_bytes
        cache.check_invariants()
    assert cache.stats()["nodes_evicted"] > 0


def test_loading_a_saved_cache_spills_what_the_fast_tier_cannot_hold(model, tmp_path):
    from hf_marconi.persistence import load_cache, save_cache

    cache = MarconiCache(model, capacity_bytes=16 * 2**20)
    rng = random.Random(4)
    for _ in range(3):
        _generate(model, _tokens(20, rng), cache)
    save_cache(cache, tmp_path / "c.safetensors")
    tiered = MarconiCache(model, capacity_bytes=16 * 2**20)
    tiers = TieredStorage(tiered, fast_capacity_bytes=cache.store.nbytes // 2, fast_device="cpu")
    load_cache(tiered, tmp_path / "c.safetensors")
    split = tiers.tier_bytes()
    assert 0 < split["fast"] <= tiers.fast_capacity_bytes and split["fast"] + split["spill"] == cache.store.nbytes


def test_the_store_places_after_a_batched_rows_uncounted_commit_too(model):
    """Placement is the store's own step (its commit is not patched on the instance): it also runs after each row's
    prompt admission in a batched call, an uncounted commit that stores entries the next rows reuse."""
    cache = MarconiCache(model, capacity_bytes=16 * 2**20)
    commits_at_placement = []

    class Recording(TieredStorage):
        def place(self, tree):
            commits_at_placement.append(cache.store.stats().commits)
            super().place(tree)

    entry = 20 * cache.sizes.kv_bytes_per_token + cache.sizes.checkpoint_bytes
    tiers = Recording(cache, fast_capacity_bytes=entry, fast_device="cpu")
    assert "commit" not in vars(cache.store)
    rng = random.Random(5)
    prompts = torch.cat([_tokens(14, rng), _tokens(14, rng)])
    model.generate(prompts, attention_mask=torch.ones_like(prompts), past_key_values=cache, **SETTINGS)
    # registration, the two rows' prompt admissions (uncounted), then their continuations (counted)
    assert commits_at_placement == [0, 0, 0, 1, 2]
    split = tiers.tier_bytes()
    assert split["fast"] <= tiers.fast_capacity_bytes and split["spill"] > 0
    assert split["fast"] + split["spill"] == cache.store.nbytes
    cache.check_invariants()


def test_refusals(model):
    cache = MarconiCache(model, capacity_bytes=1000)
    with pytest.raises(ValueError, match="fast_capacity_bytes"):
        TieredStorage(cache, fast_capacity_bytes=2000)
    TieredStorage(cache, fast_capacity_bytes=500, fast_device="cpu")
    with pytest.raises(ValueError, match="already"):
        TieredStorage(cache, fast_capacity_bytes=500, fast_device="cpu")
    on_cpu = MarconiCache(model, capacity_bytes=1000, storage_device="cpu")
    with pytest.raises(ValueError, match="storage_device=None"):
        TieredStorage(on_cpu, fast_capacity_bytes=500)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU for the fast tier")
def test_gpu_fast_tier_spills_to_cpu():
    model = build_model("bamba").to("cuda")
    cache = MarconiCache(model, capacity_bytes=16 * 2**20)
    entry = 20 * cache.sizes.kv_bytes_per_token + cache.sizes.checkpoint_bytes
    tiers = TieredStorage(cache, fast_capacity_bytes=entry)
    rng = random.Random(3)
    sessions = [_tokens(12, rng).cuda() for _ in range(3)]
    for _ in range(2):
        for index, history in enumerate(sessions):
            prompt = torch.cat([history, _tokens(4, rng).cuda()], -1)
            out = _generate(model, prompt, cache)
            reference = _generate(model, prompt, DynamicCache(config=model.config))
            assert torch.equal(out, reference)
            sessions[index] = out
    for node in cache.store.tree.nodes():
        device = next(iter(node.edge.kv.values()))[0].device
        assert (device.type == "cpu") == isinstance(node.edge, SpilledKVEdge)
    assert tiers.tier_bytes()["spill"] > 0 and cache.stats()["hits"] == 3
