"""What building a MarconiCache installs on a model instance, and nothing else: three methods replaced on the instance
(:mod:`.patching`) and two forward hooks, all picklable and deep-copyable with the model.

- ``generate`` (:func:`patched_generate`): calls with a MarconiCache go through
  :func:`~hf_marconi.wrapper.generate_with_cache`;
- ``_prepare_cache_for_generation`` (:func:`guard_generate_loop`): refuses transformers' generate loop on a
  MarconiCache that did not come through that ``generate``;
- ``prepare_inputs_for_generation`` (:func:`feed_uncached_prompt`, pure recurrent models only): feeds only the prompt
  past the restored prefix;
- forward hooks on the model and its base model (:func:`enter_forward`, :func:`leave_forward`): hand the cache on
  under the installed release's keyword, count the tokens fed, refuse a forward that does not continue the prompt.

Several threads may call ``generate`` on one model with one or several MarconiCaches at once: every per-call fact the
hooks read or write (live layers, tokens fed, the call in flight) is the calling thread's own (``cache.live``).
"""

from __future__ import annotations

import threading
import warnings
from typing import TYPE_CHECKING, Any, Callable

import torch

from . import conventions
from .errors import MarconiCacheError
from .wrapper import generate_with_cache, is_marconi_cache
from .patching import is_patched, patch_method

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from .cache import MarconiCache

_INSTALLED = "_hf_marconi_installed"
PREPARE_INPUTS = "prepare_inputs_for_generation"
_INSTALL_LOCK = threading.Lock()  # two caches built for one model in two threads install once


def patched_generate(model: "PreTrainedModel", generate: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``model.generate``: calls with a MarconiCache go through the cache
    (:func:`~hf_marconi.wrapper.generate_with_cache`); every other call goes straight to the replaced ``generate``.
    A MarconiCache built for the original model is refused by a copy of it (another model instance)."""
    cache = conventions.find_cache(kwargs)
    if getattr(cache, "pure_recurrent", False) and not is_patched(model, PREPARE_INPUTS, feed_uncached_prompt):
        raise MarconiCacheError(
            "model.prepare_inputs_for_generation was replaced after the MarconiCache was built; on a pure "
            "recurrent model the cache needs its own, which feeds only the prompt tokens past the restored prefix. "
            "Build the MarconiCache after the library that replaces it, or pass a DynamicCache"
        )
    return generate_with_cache(model, generate, *args, **kwargs)


def guard_generate_loop(
    model: "PreTrainedModel", prepare: Callable[..., Any], generation_config: Any, model_kwargs: dict[str, Any],
    *args: Any, **kwargs: Any,
) -> Any:
    """``model._prepare_cache_for_generation``: refuses transformers' generate loop on a MarconiCache unless it was
    entered once, through ``model.generate`` (the patched one): ``GenerationMixin.generate(model, ...)`` called
    directly, or a second loop inside a call, would run on stale live states without lookup or admission."""
    cache = conventions.find_cache(model_kwargs)
    if is_marconi_cache(cache) and cache.in_active_call():
        cache.live.loops += 1
    if is_marconi_cache(cache) and (not cache.in_active_call() or cache.live.loops > 1):
        raise MarconiCacheError(
            "a MarconiCache was passed to transformers' generate without going through `model.generate` (e.g. "
            "`GenerationMixin.generate(model, ...)` or a subclass's `super().generate(...)`), which skips its "
            "lookup and admission and would continue stale live states. Call `model.generate(...)`, or pass a "
            "DynamicCache"
        )
    return prepare(generation_config, model_kwargs, *args, **kwargs)


def feed_uncached_prompt(
    model: "PreTrainedModel", prepare: Callable[..., Any], input_ids: torch.Tensor, *args: Any, **kwargs: Any
) -> Any:
    """``model.prepare_inputs_for_generation`` of a pure recurrent model (installed on those only): on the first step
    of a call through a MarconiCache, feed only the prompt tokens past the restored prefix. generate feeds a cache that
    counts no tokens the whole prompt; for caches with attention layers it skips the cached part by itself."""
    cache = conventions.find_cache(kwargs)
    skip = 0
    if (is_marconi_cache(cache) and cache.in_active_call() and kwargs.get("is_first_iteration")
            and kwargs.get("next_sequence_length") is None and cache.live_tokens):
        skip = len(cache.live_tokens)
        kwargs["next_sequence_length"] = input_ids.shape[1] - skip
    inputs = prepare(input_ids, *args, **kwargs)
    mask = inputs.get("attention_mask")
    if skip and isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[1] == input_ids.shape[1]:
        inputs["attention_mask"] = mask[:, skip:]
    return inputs


def _owning_cache(module: torch.nn.Module, kwargs: dict[str, Any]) -> "MarconiCache | None":
    """The MarconiCache a forward of ``module`` (the model or its base model) passes, if it belongs to that model."""
    cache = conventions.find_cache(kwargs)
    if is_marconi_cache(cache) and (module is cache.model or module is cache.model.base_model):
        return cache
    return None


def enter_forward(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Forward pre-hook: hand the cache on under the release's keyword and count the tokens fed."""
    cache = _owning_cache(module, kwargs)
    if cache is None:
        return None
    if torch.compiler.is_compiling():
        raise MarconiCacheError(
            "a MarconiCache cannot be used inside torch.compile (it restores and copies live states between "
            "forwards); run the uncompiled model with it, or pass a DynamicCache to the compiled one"
        )
    live = cache.live
    if live.forward_depth == 0:  # the outermost forward (the inner base model of a CausalLM is counted with it)
        if not live.in_call and not live.ran_call and cache.calls_ran:
            _warn_states_are_per_thread(live)
        ids = kwargs.get("input_ids", args[0] if args else None)
        if cache.live_tokens is not None:
            if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] != 1:
                cache.live_tokens = None  # embeddings or a batch: the fed tokens are unknown from here on
            else:
                fed = ids[0].tolist()
                _check_continues_the_prompt(cache, fed)
                cache.live_tokens.extend(fed)
    live.forward_depth += 1
    if conventions.cache_keywords_used(kwargs) == [cache.keyword]:
        return None
    return args, conventions.with_cache(kwargs, cache.keyword, cache)


def _warn_states_are_per_thread(live: Any) -> None:
    """A forward outside any call, in a thread that never ran a call through the cache while other threads did: most
    likely a caller continuing another thread's ``generate`` output by hand, which would start from this thread's
    empty live states (wrong tokens). Warned once per thread: a fresh forward from position 0 is fine."""
    if live.warned_empty:
        return
    live.warned_empty = True
    warnings.warn(
        "a forward on a MarconiCache in a thread that ran no call through it: each thread has its own live states, so "
        "this forward starts from empty ones, not from the states another thread's generate left. Continue a "
        "generate output by hand in the thread that called generate",
        stacklevel=4,
    )


def _check_continues_the_prompt(cache: "MarconiCache", fed: list[int]) -> None:
    """Inside a call that restored a prefix, refuse (before the model runs) a forward whose tokens are not the prompt's
    next ones: whatever fed them (a replaced prompt feeder, a caller re-feeding the prompt) would extend the restored
    states with the wrong tokens."""
    prompt, live = cache.active_prompt(), cache.live_tokens
    if prompt is None or live is None or len(live) >= len(prompt):
        return
    expected = prompt[len(live) : len(live) + len(fed)]
    if fed[: len(expected)] != expected:
        raise MarconiCacheError(
            f"a forward inside a MarconiCache call fed tokens that do not continue the prompt past the {len(live)} "
            "tokens the live cache holds (the restored prefix); feed input_ids[:, call.prefilled:] "
            "(cache.request) or call model.generate with the whole prompt"
        )


def leave_forward(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
    """Forward hook (always called, also after an exception)."""
    cache = _owning_cache(module, kwargs)
    if cache is not None and cache.live.forward_depth > 0:
        cache.live.forward_depth -= 1


def install(model: "PreTrainedModel", pure_recurrent: bool) -> None:
    """Wrap ``model.generate``, guard transformers' generate loop, feed pure recurrent models only the uncached prompt,
    and hook the forwards of the model and its base model (once per model instance)."""
    with _INSTALL_LOCK:
        if not getattr(model, _INSTALLED, False):
            _install(model, pure_recurrent)


def _install(model: "PreTrainedModel", pure_recurrent: bool) -> None:
    patch_method(model, "generate", patched_generate)
    patch_method(model, "_prepare_cache_for_generation", guard_generate_loop)
    if pure_recurrent:
        patch_method(model, PREPARE_INPUTS, feed_uncached_prompt)
    for module in {model, model.base_model}:
        module.register_forward_pre_hook(enter_forward, with_kwargs=True)
        module.register_forward_hook(leave_forward, with_kwargs=True, always_call=True)
    setattr(model, _INSTALLED, True)
