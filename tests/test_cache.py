"""MarconiCache with real tiny models: cached generation equals uncached, hits happen, only suffixes are fed."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import DynamicCache

from hf_marconi import MarconiCache
from hf_marconi.families import cache_keyword_of
from hf_marconi.fixes import UnsupportedModelError
from hf_marconi.support import check_supported
from hf_marconi.testing import FAMILIES, build_model, make_config

CAPACITY = 64 * 2**20
NEW_TOKENS = 6


def _supported(family: str) -> bool:
    try:
        check_supported(build_model(family))
    except UnsupportedModelError:
        return False
    return True


SUPPORTED = [family for family in FAMILIES if _supported(family)]


class FedTokens:
    """Counts the tokens fed to a model's forward while attached (a forward pre-hook)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.count = 0
        self.handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, _module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.count += ids.shape[1]

    def take(self) -> int:
        count, self.count = self.count, 0
        return count


def _uncached(model, prompt: torch.Tensor, **settings):
    return model.generate(prompt, **{cache_keyword_of(model): DynamicCache(config=model.config)}, **settings)


def _generate_both(model, cache: MarconiCache, prompt: torch.Tensor, keyword: str = "past_key_values"):
    """Cached generation (the cache passed as ``keyword``) equals uncached; no deprecation warning on any release."""
    settings = dict(max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True, return_dict_in_generate=True,
                    pad_token_id=0, eos_token_id=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        cached = model.generate(prompt, **{keyword: cache}, **settings)
    reference = _uncached(model, prompt, **settings)
    assert torch.equal(cached.sequences, reference.sequences), "cached greedy output differs from uncached"
    tolerance = 1e-4 if model.dtype == torch.float32 else 1e-9
    torch.testing.assert_close(cached.logits[0], reference.logits[0], atol=tolerance, rtol=tolerance)
    cache.check_invariants()
    return cached.sequences


def _random_tokens(n: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 250, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=SUPPORTED)
def model(request):
    return build_model(request.param)


# Both spellings on every declared release: `past_key_values=` (what existing code passes) and 5.24's `cache=`.
KEYWORDS = ["past_key_values", "cache"]


@pytest.mark.parametrize("keyword", KEYWORDS)
def test_multi_turn_reuses_input_and_output(model, keyword):
    cache = MarconiCache(model, capacity_bytes=CAPACITY)
    fed = FedTokens(model)
    history = _random_tokens(20, seed=1)
    for turn in range(3):
        prompt = torch.cat([history, _random_tokens(11, seed=10 + turn)], dim=-1) if turn else history
        before = cache.stats()
        history = _generate_both(model, cache, prompt, keyword)
        fed_cached = None
        after = cache.stats()
        if turn:
            reused = after["hit_tokens"] - before["hit_tokens"]
            # the whole previous sequence but its last generated token (never fed) is restored
            assert reused == prompt.shape[1] - 11 - 1
            assert after["hits_input_output"] == before["hits_input_output"] + 1
            fed_cached = prompt.shape[1] - reused + NEW_TOKENS - 1
        fed_total = fed.take()
        uncached_fed = prompt.shape[1] + NEW_TOKENS - 1
        if fed_cached is not None:
            # the cached call fed only the unmatched suffix and its decode steps
            assert fed_total == fed_cached + uncached_fed
    fed.handle.remove()


@pytest.mark.parametrize("keyword", KEYWORDS)
@pytest.mark.parametrize("capture", ["single_pass", "two_pass"])
def test_shared_system_prompt_hits_from_third_occurrence(model, capture, keyword):
    cache = MarconiCache(model, capacity_bytes=CAPACITY, capture=capture)
    system = _random_tokens(24, seed=2)
    hits = []
    for i in range(4):
        user = _random_tokens(7, seed=20 + i)
        user[0, 0] = 3 + i  # distinct first tokens: the requests diverge exactly at the end of the system prompt
        prompt = torch.cat([system, user], dim=-1)
        before = cache.stats()["hit_tokens"]
        _generate_both(model, cache, prompt, keyword)
        hits.append(cache.stats()["hit_tokens"] - before)
    assert hits[:2] == [0, 0]
    assert hits[2] == hits[3] == system.shape[1]
    assert cache.stats()["hits_purely_input"] == 2


@pytest.mark.parametrize("keyword", KEYWORDS)
def test_branching_conversation(model, keyword):
    cache = MarconiCache(model, capacity_bytes=CAPACITY)
    first = _generate_both(model, cache, _random_tokens(18, seed=3), keyword)
    for branch in range(3):
        before = cache.stats()["hit_tokens"]
        _generate_both(model, cache, torch.cat([first, _random_tokens(5, seed=30 + branch)], dim=-1), keyword)
        # the first sequence (but its last token) is restored; later branches also reuse the branch point after it
        assert cache.stats()["hit_tokens"] - before >= first.shape[1] - 1


@pytest.mark.parametrize("keyword", KEYWORDS)
def test_repeated_identical_prompt_hits_all_but_last_token(model, keyword):
    cache = MarconiCache(model, capacity_bytes=CAPACITY)
    prompt = _random_tokens(17, seed=4)
    reused = []
    for _ in range(3):
        before = cache.stats()["hit_tokens"]
        _generate_both(model, cache, prompt, keyword)
        reused.append(cache.stats()["hit_tokens"] - before)
    assert reused[2] == prompt.shape[1] - 1


def test_refused_model_raises_before_anything_is_built():
    """A hybrid config without attention layers cannot run with a cache in transformers: MarconiCache refuses it."""
    config = make_config("bamba")
    config.attn_layer_indices = []
    model = type(build_model("bamba"))(config).eval()
    with pytest.raises(UnsupportedModelError, match="no attention layer"):
        MarconiCache(model, capacity_bytes=CAPACITY)
    assert not hasattr(model, "_hf_marconi_installed"), "a refused model must not have its generate wrapped"
