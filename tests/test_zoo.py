"""The tiny-model zoo builds every family from its real config, offline, with both kinds of cache state."""

import pytest
import torch
from packaging.version import Version
from transformers import DynamicCache
from transformers.cache_utils import CacheLayerMixin, LinearAttentionCacheLayerMixin

from conftest import skip_unless_available
from hf_marconi import support
from hf_marconi.testing import (
    ALL_FAMILIES, FAMILIES, build_model, cache_keyword, is_supported, make_config,
)

# Families with only one kind of layer: the controls.
PURE_ATTENTION = {"llama"}
PURE_RECURRENT = {"mamba2"}


ALL_FAMILY_PARAMS = skip_unless_available(ALL_FAMILIES)


@pytest.mark.parametrize("family", ALL_FAMILY_PARAMS)
def test_cache_has_both_state_kinds(family):
    cache = DynamicCache(config=make_config(family))
    attention = [layer for layer in cache.layers if isinstance(layer, CacheLayerMixin)]
    recurrent = [layer for layer in cache.layers if isinstance(layer, LinearAttentionCacheLayerMixin)]
    assert len(attention) >= (0 if family in PURE_RECURRENT else 2)
    assert len(recurrent) >= (0 if family in PURE_ATTENTION else 2)
    if family in PURE_ATTENTION:
        assert not recurrent
    if family in PURE_RECURRENT:
        assert not attention


@pytest.mark.parametrize("family", ALL_FAMILY_PARAMS)
def test_build_model_is_tiny_seeded_and_in_eval_mode(family):
    model = build_model(family, dtype=torch.float64, seed=3)
    assert not model.training
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    same = build_model(family, dtype=torch.float64, seed=3)
    other = build_model(family, dtype=torch.float64, seed=4)
    params, same_params, other_params = (list(m.parameters()) for m in (model, same, other))
    assert all(torch.equal(a, b) for a, b in zip(params, same_params))
    assert not all(torch.equal(a, b) for a, b in zip(params, other_params))


@pytest.mark.parametrize("family", ALL_FAMILY_PARAMS)
def test_forward_runs_and_fills_the_cache(family):
    model = build_model(family)
    cache = DynamicCache(config=model.config)
    ids = torch.randint(3, model.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids, **{cache_keyword(family): cache}, use_cache=True).logits
    assert logits.shape == (1, 5, model.config.vocab_size)
    assert torch.isfinite(logits).all()
    if family not in PURE_RECURRENT:
        assert cache.get_seq_length() == 5


def test_unknown_family_names_the_known_ones():
    with pytest.raises(KeyError, match="jamba"):
        make_config("no_such_family")


def test_is_supported_follows_check_supported(monkeypatch):
    assert all(is_supported(family) for family in FAMILIES)
    monkeypatch.setattr(support, "installed_transformers_version", lambda: Version("5.0.0"))
    assert not is_supported("llama")
