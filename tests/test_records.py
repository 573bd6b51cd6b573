"""Per-call records and the matched-but-not-resumable counters: what a call got from the cache reaches the caller
that made it, also when other threads call at the same time."""

from __future__ import annotations

import pytest
import torch

from conftest import run_in_threads
from hf_marconi import MarconiCache
from hf_marconi.testing import build_model

SETTINGS = dict(max_new_tokens=3, do_sample=False, pad_token_id=0, eos_token_id=None, return_dict_in_generate=True)


def _tokens(n: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 250, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model():
    return build_model("bamba")


def test_a_prefix_matched_without_a_checkpoint_is_counted_as_unresumable(model):
    """The second prompt shares 12 stored tokens with the first but no checkpoint sits there yet (a branch point is
    checkpointed on its second occurrence): 12 tokens matched, none resumable, and the record and stats say so."""
    cache = MarconiCache(model, capacity_bytes=2**24)
    first = _tokens(20, 1)
    model.generate(first, past_key_values=cache, **SETTINGS)
    second = torch.cat([first[:, :12], _tokens(5, 2)], dim=-1)
    record = model.generate(second, past_key_values=cache, **SETTINGS).marconi_record
    assert (record.reused_tokens, record.unresumable_tokens, record.hit_kind) == (0, 12, None)
    stats = cache.stats()
    assert (stats["unresumable_lookups"], stats["unresumable_tokens"]) == (1, 12)
    third = torch.cat([first[:, :12], _tokens(5, 3)], dim=-1)  # the branch point now has its checkpoint
    record = model.generate(third, past_key_values=cache, **SETTINGS).marconi_record
    assert (record.reused_tokens, record.unresumable_tokens, record.hit_kind) == (12, 0, "purely_input")


def test_calls_without_reuse_carry_their_reason(model):
    cache = MarconiCache(model, capacity_bytes=2**24)
    record = model.generate(_tokens(8, 4), past_key_values=cache, use_cache=False, **SETTINGS).marconi_record
    assert record.without_reuse == "use_cache=False" and record.reused_tokens == 0


def test_request_gives_the_record_of_its_own_call(model):
    cache = MarconiCache(model, capacity_bytes=2**24)
    sequence = model.generate(_tokens(16, 5), past_key_values=cache, **SETTINGS).sequences  # 19 tokens
    longer = torch.cat([sequence, _tokens(4, 6)], dim=-1)
    with cache.request(longer) as call:
        model(longer[:, call.prefilled:], past_key_values=cache)
    assert call.record().reused_tokens == 18 and call.record().prompt_tokens == 23


@pytest.mark.timeout(300)
def test_each_thread_gets_the_record_of_its_own_call(model):
    """Calls from 4 threads at once: each output's record matches its own prompt, while cache.last_call is whichever
    call ended last."""
    cache = MarconiCache(model, capacity_bytes=2**24)
    stored = {i: model.generate(_tokens(10 + i, 10 + i), past_key_values=cache, **SETTINGS).sequences
              for i in range(4)}
    records: dict[int, list] = {i: [] for i in range(4)}

    def worker(i: int) -> None:
        for turn in range(3):
            prompt = torch.cat([stored[i], _tokens(2, 100 * i + turn)], dim=-1)
            output = model.generate(prompt, past_key_values=cache, **SETTINGS)
            records[i].append((prompt.shape[1], stored[i].shape[1], output.marconi_record))

    run_in_threads(worker, 4)
    for i in range(4):  # prompt lengths differ between threads, so each record is recognisably its own call's
        for prompt_len, stored_len, record in records[i]:
            assert record.prompt_tokens == prompt_len
            assert stored_len - 1 <= record.reused_tokens < prompt_len


def test_clear_empties_the_store_and_the_stats_say_so(model):
    cache = MarconiCache(model, capacity_bytes=2**24)
    sequence = model.generate(_tokens(12, 40), past_key_values=cache, **SETTINGS).sequences
    assert cache.stats()["bytes"] > 0
    freed = cache.clear()
    assert freed > 0 and cache.stats()["bytes"] == 0 and not cache.store.tree.root.children
    record = model.generate(torch.cat([sequence, _tokens(2, 41)], dim=-1), past_key_values=cache,
                            **SETTINGS).marconi_record
    assert record.reused_tokens == 0 and cache.stats()["lookups"] == 2  # counters are kept
