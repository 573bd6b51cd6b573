"""Default ``position_ids`` that continue from the cache, for model forwards that restart them at 0.

Bamba's model forward (transformers 5.x, 5.24 included) defaults ``position_ids`` to ``arange(seq_len)`` whatever
the cache already holds, so a forward that continues from a populated cache without explicit positions rotates its
attention queries and keys as if the sequence started again: every continuation is wrong (~1e-1 relative in
the zoo's float64 Bamba) while the Mamba layers are exact. ``generate()`` passes explicit positions and is
not affected; any other caller (a branch-point prefill, a manual decode loop) is. The fix fills the default
the way the other families do: ``arange(past, past + seq_len)`` with ``past = cache.get_seq_length()``.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn
from packaging.specifiers import SpecifierSet
from transformers.cache_utils import Cache, CacheLayerMixin

from ..conventions import find_cache
from ..patching import patch_method
from .base import Fix


def _cached_length(cache: Cache | None) -> int:
    """Tokens the cache holds, 0 without a cache or an attention layer (then no layer reads positions)."""
    if cache is None or not any(isinstance(layer, CacheLayerMixin) for layer in cache.layers):
        return 0
    return cache.get_seq_length()


def cache_aware_positions(module: nn.Module, forward: Any, *args: Any, **kwargs: Any) -> Any:
    """A base-model forward whose missing ``position_ids`` start at the cache's length (installed as an
    :class:`~hf_marconi.patching.InstanceMethod` patch; ``forward`` is the module's unpatched forward)."""
    signature = inspect.signature(forward)
    extra_keywords = next(
        (name for name, parameter in signature.parameters.items() if parameter.kind is parameter.VAR_KEYWORD), None
    )
    # Everything by keyword: transformers' forward decorators inject keywords of their own.
    arguments = dict(signature.bind_partial(*args, **kwargs).arguments)
    arguments.update(arguments.pop(extra_keywords, {}) if extra_keywords else {})
    if arguments.get("position_ids") is None:
        reference = arguments.get("input_ids")
        if reference is None:
            reference = arguments["inputs_embeds"]
        past = _cached_length(find_cache(arguments))
        positions = torch.arange(past, past + reference.shape[1], device=reference.device)
        arguments["position_ids"] = positions.unsqueeze(0)
    return forward(**arguments)


def install_cache_aware_positions(model: nn.Module, base_model_class: type[nn.Module]) -> int:
    """Patch the forward of every ``base_model_class`` module inside ``model`` (this instance only), skipping
    those already patched. Returns how many such modules the model has."""
    targets = [module for module in model.modules() if isinstance(module, base_model_class)]
    for module in targets:
        patch_method(module, "forward", cache_aware_positions)
    return len(targets)


def _install_bamba_positions(model: nn.Module) -> int:
    from transformers.models.bamba.modeling_bamba import BambaModel

    return install_cache_aware_positions(model, BambaModel)


BAMBA_POSITIONS = Fix(
    name="bamba_cache_aware_position_ids",
    # Verified wrong on 5.23 and 5.24.
    broken_in=SpecifierSet(">=5.15"),
    check=lambda model: None,
    install=_install_bamba_positions,
    why="the model forward defaults position_ids to arange(seq_len), ignoring the cached length",
)
