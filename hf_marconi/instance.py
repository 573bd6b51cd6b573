"""What building a MarconiCache installs on a model instance, and nothing else: instance-level replacements of three
methods and two forward hooks, all picklable and deep-copyable with the model.

- ``generate`` (:class:`GenerateWrapper`): calls with a MarconiCache go through
  :func:`~hf_marconi.generation.generate_with_cache`;
- ``_prepare_cache_for_generation`` (:class:`PrepareCacheGuard`): refuses transformers' generate loop on a
  MarconiCache that did not come through that wrapper;
- ``prepare_inputs_for_generation`` (:class:`PrepareInputs`, pure recurrent models only): feeds only the prompt past
  the restored prefix;
- forward hooks on the model and its base model (:func:`enter_forward`, :func:`leave_forward`): hand the cache on
  under the installed release's keyword, count the tokens fed, refuse a forward that does not continue the prompt.

One lock per model instance (:func:`model_lock`) serialises the calls of every MarconiCache of that model.
"""

from __future__ import annotations

import inspect
import threading
import weakref
from typing import TYPE_CHECKING, Any, Callable

import torch

from . import conventions
from .errors import MarconiCacheError
from .generation import generate_with_cache, is_marconi_cache

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from .cache import MarconiCache

_INSTALLED = "_hf_marconi_installed"
# One lock per model instance, shared by every MarconiCache of that model: a call owns the model's mixers (single-pass
# capture replaces their forwards) and its live cache from lookup to admission.
_MODEL_LOCKS: "weakref.WeakKeyDictionary[torch.nn.Module, threading.RLock]" = weakref.WeakKeyDictionary()
_MODEL_LOCKS_GUARD = threading.Lock()


def model_lock(model: torch.nn.Module) -> threading.RLock:
    """The lock that serialises the MarconiCache calls of one model instance, whichever cache they use."""
    with _MODEL_LOCKS_GUARD:
        return _MODEL_LOCKS.setdefault(model, threading.RLock())


class _InstanceMethod:
    """A method of one model instance replaced by an instance attribute that delegates to what was there before (an
    earlier instance attribute, e.g. another library's wrapper, or the class's method).

    It keeps the replaced method's signature (transformers inspects some of them) and pickles / deep-copies with the
    model: a copy wraps the copied model, not the original.
    """

    name: str = ""

    def __init__(self, model: "PreTrainedModel", previous: Callable[..., Any] | None = None) -> None:
        self.model = model
        self.previous = previous
        self.__doc__ = getattr(type(model), self.name).__doc__  # what help(model.generate) shows

    def inner(self) -> Callable[..., Any]:
        """What this attribute replaced, bound to the model."""
        if self.previous is not None:
            return self.previous
        return getattr(type(self.model), self.name).__get__(self.model)

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(self.inner())

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.model, self.previous))

    @classmethod
    def replace_on(cls, model: "PreTrainedModel") -> None:
        setattr(model, cls.name, cls(model, model.__dict__.get(cls.name)))


class GenerateWrapper(_InstanceMethod):
    """``model.generate`` of a model with a MarconiCache installed: calls with a MarconiCache go through the cache
    (:func:`~hf_marconi.generation.generate_with_cache`); every other call goes straight to the replaced ``generate``.

    Picklable and deep-copyable, like the forward hooks (module-level functions): ``copy.deepcopy(model)``,
    ``pickle`` / ``torch.save(model)`` and ``save_pretrained`` work; a MarconiCache built for the original is refused
    by the copy (another model instance).
    """

    name = "generate"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        cache = conventions.find_cache(kwargs)
        if getattr(cache, "pure_recurrent", False) and not isinstance(
            self.model.__dict__.get(PrepareInputs.name), PrepareInputs
        ):
            raise MarconiCacheError(
                "model.prepare_inputs_for_generation was replaced after the MarconiCache was built; on a pure "
                "recurrent model the cache needs its own, which feeds only the prompt tokens past the restored prefix. "
                "Build the MarconiCache after the library that replaces it, or pass a DynamicCache"
            )
        return generate_with_cache(self.model, self.inner(), *args, **kwargs)


class PrepareCacheGuard(_InstanceMethod):
    """``model._prepare_cache_for_generation``: refuses transformers' generate loop on a MarconiCache unless it was
    entered through ``model.generate`` (the wrapper), e.g. ``GenerationMixin.generate(model, ...)`` called directly,
    which would run on stale live states without lookup or admission."""

    name = "_prepare_cache_for_generation"

    def __call__(self, generation_config: Any, model_kwargs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        cache = conventions.find_cache(model_kwargs)
        if is_marconi_cache(cache) and cache.in_active_call():
            cache._loops_in_call += 1
        if is_marconi_cache(cache) and (not cache.in_active_call() or cache._loops_in_call > 1):
            raise MarconiCacheError(
                "a MarconiCache was passed to transformers' generate without going through `model.generate` (e.g. "
                "`GenerationMixin.generate(model, ...)` or a subclass's `super().generate(...)`), which skips its "
                "lookup and admission and would continue stale live states. Call `model.generate(...)`, or pass a "
                "DynamicCache"
            )
        return self.inner()(generation_config, model_kwargs, *args, **kwargs)


class PrepareInputs(_InstanceMethod):
    """``model.prepare_inputs_for_generation`` of a pure recurrent model (installed on those only): on the first step
    of a call through a MarconiCache, feed only the prompt tokens past the restored prefix. generate feeds a cache that
    counts no tokens the whole prompt; for caches with attention layers it skips the cached part by itself."""

    name = "prepare_inputs_for_generation"

    def __call__(self, input_ids: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        cache = conventions.find_cache(kwargs)
        skip = 0
        if (is_marconi_cache(cache) and cache.in_active_call() and kwargs.get("is_first_iteration")
                and kwargs.get("next_sequence_length") is None and cache.live_tokens):
            skip = len(cache.live_tokens)
            kwargs["next_sequence_length"] = input_ids.shape[1] - skip
        inputs = self.inner()(input_ids, *args, **kwargs)
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
    if cache._forward_depth == 0:  # the outermost forward (the inner base model of a CausalLM is counted with it)
        ids = kwargs.get("input_ids", args[0] if args else None)
        if cache.live_tokens is not None:
            if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] != 1:
                cache.live_tokens = None  # embeddings or a batch: the fed tokens are unknown from here on
            else:
                fed = ids[0].tolist()
                _check_continues_the_prompt(cache, fed)
                cache.live_tokens.extend(fed)
    cache._forward_depth += 1
    if conventions.cache_keywords_used(kwargs) == [cache.keyword]:
        return None
    return args, conventions.with_cache(kwargs, cache.keyword, cache)


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
    if cache is not None and cache._forward_depth > 0:
        cache._forward_depth -= 1


def install(model: "PreTrainedModel", pure_recurrent: bool) -> None:
    """Wrap ``model.generate``, guard transformers' generate loop, feed pure recurrent models only the uncached prompt,
    and hook the forwards of the model and its base model (once per model instance)."""
    if getattr(model, _INSTALLED, False):
        return
    GenerateWrapper.replace_on(model)
    PrepareCacheGuard.replace_on(model)
    if pure_recurrent:
        PrepareInputs.replace_on(model)
    for module in {model, model.base_model}:
        module.register_forward_pre_hook(enter_forward, with_kwargs=True)
        module.register_forward_hook(leave_forward, with_kwargs=True, always_call=True)
    setattr(model, _INSTALLED, True)
