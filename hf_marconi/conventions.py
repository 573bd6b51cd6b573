"""transformers' calling conventions: the one module that knows them, release by release.

Everything hf_marconi assumes about how transformers passes a cache around lives here, named by the release that
introduced it, so that a new release that changes a convention is met in one place:

- the keyword a model's ``forward`` and ``generate`` take the cache by (:func:`cache_keyword`), how to find a cache
  under any spelling a caller used (:func:`find_cache`) and how to hand it on under the right one
  (:func:`with_cache`);
- the keyword arguments of a forward that continues from a populated cache (:func:`continuation_kwargs`):
  explicit ``position_ids``, ``logits_to_keep``;
- which ``generate`` settings fork, crop or expand the live cache (:func:`cache_rewriting_settings`), and whether
  ``generate`` feeds only the uncached part of the prompt for a given cache (:func:`generate_skips_cached_prompt`).

Releases (the declared range is in ``setup.cfg``; ``SUPPORTED_RELEASES`` below is what CI tests):

- 5.23: forwards take ``past_key_values=`` (pure Mamba models ``cache_params=``); ``generate`` likewise, and it
  feeds only the uncached part of the prompt for a ``past_key_values`` cache.
- 5.24: forwards and ``generate`` take ``cache=`` (``past_key_values`` and ``cache_params`` are deprecated with a
  ``FutureWarning``, removal announced for 5.40 / 6.0); model outputs carry ``.cache`` (``.past_key_values`` is a
  read-only alias); ``generate`` skips the cached prompt for any cache with at least one non-linear layer.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

import torch
import transformers
from packaging.version import Version

if TYPE_CHECKING:
    from torch import nn
    from transformers.cache_utils import Cache

INSTALLED = Version(transformers.__version__)
# The releases the package declares and CI tests (oldest, newest); setup.cfg's bound is `< next minor`.
SUPPORTED_RELEASES: tuple[Version, ...] = (Version("5.23.0"), Version("5.24.0"))
# 5.24: the cache keyword of forward and generate is `cache` for every model.
CACHE_KEYWORD_RELEASE = Version("5.24.0")
# Every spelling a caller may use for the cache, newest first.
CACHE_KEYWORDS: tuple[str, ...] = ("cache", "past_key_values", "cache_params")


def _release(version: Version) -> Version:
    """``version`` without pre-release / dev / local parts, so 5.24.0.dev0 counts as 5.24."""
    return Version(version.base_version)


def cache_keyword(legacy_keyword: str, installed: Version = INSTALLED) -> str:
    """The keyword the installed transformers' forwards and ``generate`` take a cache by.

    ``legacy_keyword`` is the family's keyword before 5.24 (``past_key_values``, or ``cache_params`` for pure Mamba
    models); from 5.24 every model takes ``cache``.
    """
    return "cache" if _release(installed) >= CACHE_KEYWORD_RELEASE else legacy_keyword


def forward_takes(module: "nn.Module", name: str) -> bool:
    """Whether ``module.forward`` has a parameter ``name`` (transformers' decorators keep the signature)."""
    return name in inspect.signature(module.forward).parameters


def find_cache(kwargs: dict[str, Any]) -> Any:
    """The cache a call passes, under whichever keyword the caller spelled it (None without one)."""
    for name in CACHE_KEYWORDS:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def cache_keywords_used(kwargs: dict[str, Any]) -> list[str]:
    """The cache keywords a call passes a value under."""
    return [name for name in CACHE_KEYWORDS if kwargs.get(name) is not None]


def with_cache(kwargs: dict[str, Any], keyword: str, cache: Any) -> dict[str, Any]:
    """A copy of ``kwargs`` with ``cache`` under ``keyword`` and no other cache spelling (so transformers warns of
    no deprecated keyword and never sees two caches)."""
    out = {name: value for name, value in kwargs.items() if name not in CACHE_KEYWORDS}
    out[keyword] = cache
    return out


def output_cache(output: Any) -> Any:
    """The cache a model or ``generate`` output carries (5.24: ``.cache``; before: ``.past_key_values``)."""
    for name in ("cache", "past_key_values", "cache_params"):
        value = getattr(output, name, None)
        if value is not None:
            return value
    return None


def continuation_kwargs(
    model: "nn.Module", keyword: str, cache: "Cache", start: int, end: int, device: torch.device, *, positions: bool
) -> dict[str, Any]:
    """Keyword arguments of a forward feeding positions ``start .. end-1`` into a populated ``cache``.

    ``positions``: pass ``position_ids`` explicitly (every model whose forward takes them: Bamba's forward, 5.23 and
    5.24, defaults them to ``arange(L)`` whatever the cache holds). Only the last position's logits are computed
    where the model takes ``logits_to_keep``.
    """
    kwargs: dict[str, Any] = {"use_cache": True, keyword: cache}
    if positions and forward_takes(model, "position_ids"):
        kwargs["position_ids"] = torch.arange(start, end, device=device).unsqueeze(0)
    if forward_takes(model, "logits_to_keep"):
        kwargs["logits_to_keep"] = 1
    return kwargs


def generate_setting(model: "nn.Module", kwargs: dict[str, Any], name: str, default: Any = None) -> Any:
    """A generate setting as generate resolves it: the keyword, else the passed ``generation_config``, else the
    model's."""
    value = kwargs.get(name)
    if value is None:
        config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
        value = getattr(config, name, None)
    return default if value is None else value


def cache_rewriting_settings(model: "nn.Module", kwargs: dict[str, Any]) -> dict[str, str]:
    """The generate settings of a call that fork, crop or re-feed the live cache, each with why.

    - ``num_beams > 1``: beam search reorders and forks the cache rows (``Cache.reorder_cache``).
    - ``assistant_model`` / ``prompt_lookup_num_tokens`` / ``assistant_early_exit``: speculative decoding crops the
      cache after rejected tokens, which a recurrent state cannot undo.
    - ``custom_generate``: a decoding loop from the Hub or the caller, whose use of the cache is unknown.
    """
    found: dict[str, str] = {}
    if generate_setting(model, kwargs, "num_beams", 1) > 1:
        found["num_beams"] = "beam search reorders and forks the live cache"
    for name in ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit"):
        if generate_setting(model, kwargs, name) is not None:
            found[name] = "assisted / speculative decoding crops the cache, which a recurrent state cannot undo"
    if kwargs.get("custom_generate") is not None:
        found["custom_generate"] = "a custom decoding loop may use the cache in ways hf_marconi cannot check"
    return found


def generate_skips_cached_prompt(cache: "Cache") -> bool:
    """Whether ``generate`` feeds only the prompt tokens past ``cache.get_seq_length()``.

    5.23 slices the prompt for a cache passed as ``past_key_values`` (never for ``cache_params``, what pure Mamba
    models take); 5.24 for any cache with at least one non-linear layer. Both amount to: the cache has a layer that
    counts tokens (an attention layer).
    """
    from transformers.cache_utils import CacheLayerMixin

    return any(isinstance(layer, CacheLayerMixin) for layer in cache.layers)
