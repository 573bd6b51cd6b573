"""Batched generate with reuse: every row of a left-padded batch restores its own stored prefix, and its tokens equal
uncached batched generation (and batch-1 generation, which these families match under left padding)."""

from __future__ import annotations

import random

import pytest
import torch

from conftest import fresh_cache
from hf_marconi import MarconiCache
from hf_marconi.families import family_of
from hf_marconi.testing import FAMILIES as ZOO
from hf_marconi.testing import build_model, make_config

FAMILIES = ["jamba", "bamba", "qwen3_next"]  # Mamba1 hybrid, Mamba2 hybrid, gated-delta-net hybrid
FAMILIES_WITH_ATTENTION = [f for f in ZOO if not family_of(make_config(f)).pure_recurrent]
PAD = 0
GREEDY = dict(max_new_tokens=5, do_sample=False, pad_token_id=PAD, eos_token_id=None, return_dict_in_generate=True)


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    return build_model(request.param, dtype=torch.float64)  # float64: no near-tie decides a token by rounding


def _tokens(n: int, rng: random.Random) -> list[int]:
    return [rng.randrange(3, 250) for _ in range(n)]


def _batch(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and mask."""
    width = max(map(len, rows))
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def _generate(model, rows, cache=None, seed=None, **settings):
    ids, mask = _batch(rows)
    if seed is not None:
        torch.manual_seed(seed)
    keyword = {"past_key_values": cache} if cache is not None else fresh_cache(model)
    return model.generate(ids, attention_mask=mask, **keyword, **dict(GREEDY, **settings))


def _new_tokens(output, rows) -> list[list[int]]:
    width = max(map(len, rows))
    return [row[width:].tolist() for row in output.sequences]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("batch_size", [2, 5, 16])
def test_rows_sharing_and_not_sharing_prefixes_reuse_per_row_and_equal_uncached(model, batch_size):
    """Few-shot style: most rows share a long prefix (with suffixes of different lengths), some share nothing. The
    first batch already reuses the shared prefix in every row after the first that holds it; a second batch with new
    queries reuses it in every such row; each row's tokens equal uncached batched and batch-1 generation."""
    rng = random.Random(batch_size)
    cache = MarconiCache(model, capacity_bytes=64 * 2**20)
    shots = _tokens(24, rng)
    for round_index in range(2):
        sharing = [i % 4 != 3 for i in range(batch_size)]
        rows = [(shots if share else []) + _tokens(rng.randint(1, 9), rng) for share in sharing]
        cached = _generate(model, rows, cache)
        assert torch.equal(cached.sequences, _generate(model, rows).sequences)
        for row, new in zip(rows, _new_tokens(cached, rows)):
            single = model.generate(torch.tensor([row]), **fresh_cache(model), **GREEDY)
            assert single.sequences[0, len(row):].tolist() == new
        reused = [record.reused_tokens for record in cached.marconi_record.rows]
        first_sharing = sharing.index(True)
        for i, share in enumerate(sharing):
            if share and (round_index == 1 or i > first_sharing):
                assert reused[i] >= len(shots), (round_index, i, reused)  # more where random suffixes agree
            elif not share:
                assert reused[i] == 0
    assert cache.stats()["bypassed_calls"] == 0
    cache.check_invariants()


@pytest.mark.timeout(600)
def test_multi_turn_batches_continue_each_row_from_its_own_previous_turn(model):
    """Each row of the next batch is its previous prompt, its answer and a new message: it restores the end of its own
    previous turn (an input-output hit), whatever its length relative to the other rows."""
    rng = random.Random(1)
    cache = MarconiCache(model, capacity_bytes=64 * 2**20)
    rows = [_tokens(n, rng) for n in (3, 11, 7, 15)]
    for turn in range(3):
        cached = _generate(model, rows, cache)
        assert torch.equal(cached.sequences, _generate(model, rows).sequences)
        if turn:
            assert all(r.hit_kind == "input_output" for r in cached.marconi_record.rows)
            assert [r.reused_tokens for r in cached.marconi_record.rows] == [len(row) - 1 - 3 for row in rows]
        rows = [row + new + _tokens(3, rng) for row, new in zip(rows, _new_tokens(cached, rows))]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("samples", [1, 3])
def test_seeded_sampling_batches_equal_uncached(model, samples):
    """Seeded sampling, with ``num_return_sequences``: each prompt row is looked up and restored once, its states
    repeated for its samples, and every sample equals uncached sampling."""
    rng = random.Random(samples)
    cache = MarconiCache(model, capacity_bytes=64 * 2**20)
    shared = _tokens(20, rng)
    sampling = dict(do_sample=True, top_k=0, num_return_sequences=samples)
    for seed in range(3):
        rows = [shared + _tokens(rng.randint(1, 6), rng) for _ in range(3)]
        cached = _generate(model, rows, cache, seed=seed, **sampling)
        assert torch.equal(cached.sequences, _generate(model, rows, seed=seed, **sampling).sequences)
        if seed:
            assert all(r.reused_tokens >= 20 for r in cached.marconi_record.rows)
    assert cache.stats()["lookups"] == 9, "one lookup per prompt row, not per returned sequence"


@pytest.mark.timeout(600)
def test_a_row_that_stops_early_admits_only_its_prompt(model):
    """A row that emits EOS early is fed padding afterwards: its end state belongs to a sequence ending in pads, so
    only its prompt's entries are stored; the other rows' continuations are admitted."""
    rng = random.Random(4)
    rows = [_tokens(n, rng) for n in (6, 9, 12)]
    reference = _new_tokens(_generate(model, rows), rows)
    eos = reference[0][1]  # row 0 stops at its 2nd new token (and any row that emits it before its 4th)
    stopping = [i for i, new in enumerate(reference) if eos in new[:-2]]  # fed padding afterwards
    settings = dict(eos_token_id=eos, max_new_tokens=5)
    cache = MarconiCache(model, capacity_bytes=64 * 2**20)
    cached = _generate(model, rows, cache, **settings)
    assert torch.equal(cached.sequences, _generate(model, rows, **settings).sequences)
    stored_ends = set(cache.store.tree.checkpointed_prefixes())
    for i, (row, new) in enumerate(zip(rows, _new_tokens(cached, rows))):
        full_end = tuple(row + new[:-1])
        assert (full_end in stored_ends) == (i not in stopping), (i, stopping)


@pytest.mark.timeout(600)
def test_rows_in_a_namespace_do_not_reuse_another_namespaces_prefix(model):
    rng = random.Random(5)
    cache = MarconiCache(model, capacity_bytes=64 * 2**20)
    shared = _tokens(20, rng)
    rows = [shared + _tokens(3, rng), shared + _tokens(5, rng)]
    for _ in range(2):
        _generate(model, rows, cache, cache_salt="tenant-a")
    other = _generate(model, [shared + _tokens(4, rng)] * 2, cache, cache_salt="tenant-b")
    first = other.marconi_record.rows[0].reused_tokens
    assert first == 0, "nothing of tenant-a's is reused by tenant-b"


@pytest.mark.timeout(600)
@pytest.mark.parametrize("mode", [
    dict(prefill_chunk_size=8),
    dict(repetition_penalty=1.3, min_new_tokens=3, no_repeat_ngram_size=2),
    dict(max_new_tokens=None, max_length=48),
])
def test_generate_options_on_batches_equal_uncached(model, mode):
    """Options that read the whole prompt (penalties, lengths) or chunk its prefill see the padded batch, as without
    the cache."""
    rng = random.Random(6)
    cache = MarconiCache(model, capacity_bytes=64 * 2**20)
    shared = _tokens(30, rng)
    for _ in range(2):
        rows = [shared + _tokens(n, rng) for n in (2, 7, 12)]
        cached = _generate(model, rows, cache, **mode)
        assert torch.equal(cached.sequences, _generate(model, rows, **mode).sequences)
    assert all(r.reused_tokens >= 30 for r in cached.marconi_record.rows)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("family", [f for f in FAMILIES_WITH_ATTENTION])
def test_every_family_with_attention_layers_reuses_per_row(family):
    """Rows of one token (no states before the last), shared and unshared rows, a cold and a warm batch, in every zoo
    family with attention layers (Kimi-Linear's values have another head dim than its keys)."""
    model = build_model(family, dtype=torch.float64)
    rng = random.Random(7)
    cache = MarconiCache(model, capacity_bytes=64 * 2**20)
    shared = _tokens(12, rng)
    for _ in range(2):
        rows = [_tokens(1, rng), shared + _tokens(3, rng), shared + _tokens(5, rng), _tokens(4, rng)]
        cached = _generate(model, rows, cache)
        assert torch.equal(cached.sequences, _generate(model, rows).sequences)
    assert [r.reused_tokens >= 12 for r in cached.marconi_record.rows] == [False, True, True, False]
    cache.check_invariants()


@pytest.mark.timeout(600)
def test_a_shared_prefix_survives_deeper_branches_between_later_rows(model):
    """The first row shares the few-shot prefix with every later row and longer prefixes with some: the checkpoint at
    the shared prefix is the one admitted (the policy keeps few new checkpoints per request), so every later row
    restores at least the shared prefix in the first batch already."""
    rng = random.Random(8)
    cache = MarconiCache(model, capacity_bytes=64 * 2**20)
    shots, first = _tokens(20, rng), _tokens(8, rng)
    rows = [shots + first] + [shots + first[:k] + _tokens(3, rng) for k in (0, 2, 4, 6)]
    cached = _generate(model, rows, cache)
    assert torch.equal(cached.sequences, _generate(model, rows).sequences)
    assert all(r.reused_tokens >= 20 for r in cached.marconi_record.rows[1:])


@pytest.mark.timeout(600)
def test_identical_rows_restore_all_but_the_last_token_from_the_first(model):
    rng = random.Random(9)
    cache = MarconiCache(model, capacity_bytes=64 * 2**20)
    prompt = _tokens(15, rng)
    cached = _generate(model, [prompt] * 3, cache)
    assert torch.equal(cached.sequences, _generate(model, [prompt] * 3).sequences)
    assert [r.reused_tokens for r in cached.marconi_record.rows] == [0, 14, 14]
