"""transformers' calling conventions: the one module that knows them, release by release.

Everything hf_marconi assumes about how transformers passes a cache around lives here, named by the release that
introduced it, so that a new release that changes a convention is met in one place:

- the keyword a model's ``forward`` and ``generate`` take the cache by (:func:`cache_keyword`), how to find a cache
  under any spelling a caller used (:func:`find_cache`) and how to hand it on under the right one
  (:func:`with_cache`);
- the keyword arguments of a forward that continues from a populated cache (:func:`continuation_kwargs`):
  explicit ``position_ids``, ``logits_to_keep``;
- the settings a ``generate`` call runs with (:func:`generation_config_of_call`), and which decoding modes fork,
  crop or reorder the live cache (:func:`cache_rewriting_mode`).

Releases (the declared range is in ``setup.cfg``; ``SUPPORTED_RELEASES`` below is what CI tests):

- 5.23: forwards take ``past_key_values=`` (pure Mamba models ``cache_params=``); ``generate`` likewise, and it
  feeds only the uncached part of the prompt for a ``past_key_values`` cache (never for ``cache_params``).
- 5.24: forwards and ``generate`` take ``cache=`` (``past_key_values`` and ``cache_params`` are deprecated with a
  ``FutureWarning``, removal announced for 5.40 / 6.0); model outputs carry ``.cache`` (``.past_key_values`` is a
  read-only alias); ``generate`` skips the cached prompt for any cache with at least one non-linear layer.
  On both, a pure Mamba model's cache counts no tokens, so generate feeds it the whole prompt: the instance-level
  ``prepare_inputs_for_generation`` of :mod:`.instance` skips the restored part.
"""

from __future__ import annotations

import copy
import inspect
from typing import TYPE_CHECKING, Any

import torch
import transformers
from packaging.version import Version
from transformers import GenerationConfig
from transformers.generation.configuration_utils import GenerationMode

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


def release(version: Version) -> Version:
    """``version`` without pre-release / dev / local parts, so 5.24.0.dev0 counts as 5.24."""
    return Version(version.base_version)


def cache_keyword(legacy_keyword: str, installed: Version = INSTALLED) -> str:
    """The keyword the installed transformers' forwards and ``generate`` take a cache by.

    ``legacy_keyword`` is the family's keyword before 5.24 (``past_key_values``, or ``cache_params`` for pure Mamba
    models); from 5.24 every model takes ``cache``.
    """
    return "cache" if release(installed) >= CACHE_KEYWORD_RELEASE else legacy_keyword


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


def token_ids(value: Any) -> list[int]:
    """A token-id setting of a generation config (``pad_token_id``, ``eos_token_id``: None, an int, a list or a
    tensor) as a list of ints."""
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.flatten().tolist()]
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(value)]


def generation_config_of_call(model: "nn.Module", args: tuple[Any, ...], kwargs: dict[str, Any]) -> GenerationConfig:
    """The settings a ``generate`` call runs with, resolved as ``GenerationMixin._prepare_generation_config`` resolves
    them (5.23 and 5.24): the passed config (``generation_config=`` or the first positional argument after the
    inputs; else an empty one), its unset (None) fields filled from the model's ``generation_config`` and then from
    transformers' global defaults, then the call's keywords (an explicit None included). A copy: nothing of the
    model's or the caller's config changes."""
    passed = kwargs.get("generation_config")
    if passed is None and args and isinstance(args[0], GenerationConfig):
        passed = args[0]
    config = copy.deepcopy(passed) if passed is not None else GenerationConfig()
    model_config = getattr(model, "generation_config", None) or GenerationConfig()
    config.update(**model_config.to_dict(), defaults_only=True, allow_custom_entries=True)
    config.update(**model_config._get_default_generation_params(), defaults_only=True)
    config.update(**{key: value for key, value in kwargs.items() if key != "generation_config"})
    return config


# Generation modes that keep one row per prompt and only append to the cache.
_APPENDING_MODES = frozenset({GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE})


def cache_rewriting_mode(config: GenerationConfig, kwargs: dict[str, Any]) -> str | None:
    """Why a call's decoding mode would fork, crop or reorder the live cache (None when it only appends).

    Beam search reorders and forks cache rows (``Cache.reorder_cache``); assisted / speculative decoding crops the
    cache after rejected tokens, which a recurrent state cannot undo; contrastive search and DoLa run as Hub
    ``custom_generate`` loops (5.x), as does an explicit ``custom_generate``, whose use of the cache is unknown.
    """
    if kwargs.get("custom_generate") is not None:
        return "`custom_generate` runs a decoding loop whose use of the cache hf_marconi cannot check"
    mode = config.get_generation_mode(kwargs.get("assistant_model"))
    if mode in _APPENDING_MODES:
        return None
    why = {
        GenerationMode.ASSISTED_GENERATION: "assisted / speculative decoding crops the cache, which a recurrent state "
                                            "cannot undo",
    }.get(mode, "it forks or reorders the live cache, or runs a custom decoding loop")
    return f"the {mode.value.replace('_', ' ')} mode: {why}"
