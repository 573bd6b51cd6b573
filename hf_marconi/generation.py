"""The per-call flow of a MarconiCache: lookup, restore, branch-point capture, generate, admit.

``install`` wraps a model instance's ``generate``, guards the entry of transformers' own generate loop, and adds
forward hooks; everything a call changes in the store happens in :meth:`PrefixCall.finish`, after the model has run,
so an exception anywhere before leaves the store as it was (``PrefixCall.abort`` only releases the lookup's lock).

What the wrapper does with each kind of call is decided up front (:func:`_plan_call`): reuse and admission, a run
without reuse (with the reason, warned once per reason), or a refusal before anything runs. Every convention of
transformers it relies on (cache keywords, which settings fork the cache) comes from :mod:`.conventions`.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
import warnings
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch
from transformers import GenerationConfig

from . import conventions
from .kernels.single_pass import single_pass_prefill
from .states import StateCheckpoint

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from .cache import MarconiCache
    from .store import RequestPlan

logger = logging.getLogger(__name__)

_INSTALLED = "_hf_marconi_installed"
# One lock per model instance, shared by every MarconiCache of that model: a call owns the model's mixers (single-pass
# capture replaces their forwards) and its live cache from lookup to admission.
_MODEL_LOCKS: "weakref.WeakKeyDictionary[torch.nn.Module, threading.RLock]" = weakref.WeakKeyDictionary()
_MODEL_LOCKS_GUARD = threading.Lock()


def model_lock(model: torch.nn.Module) -> threading.RLock:
    """The lock that serialises the MarconiCache calls of one model instance, whichever cache they use."""
    with _MODEL_LOCKS_GUARD:
        return _MODEL_LOCKS.setdefault(model, threading.RLock())


@dataclass
class CallTimings:
    """Wall-clock seconds one call spent in the cache's own work (the model's prefill and decode excluded, except
    the branch-point prefill, which is model work the cache asked for)."""

    lookup_s: float = 0.0  # store.plan: tree match, lock, policy decisions
    restore_s: float = 0.0  # copying the stored prefix into the live layers
    capture_s: float = 0.0  # branch-point prefill(s) and checkpoint copies
    admit_s: float = 0.0  # copying new states out of the live layers and store.commit (evictions included)

    @property
    def overhead_s(self) -> float:
        """Lookup + restore + admission: what a hit costs on top of the model's own work."""
        return self.lookup_s + self.restore_s + self.admit_s


@dataclass
class PrefixCall:
    """One request's passage through the cache (batch size 1).

    Attributes:
        prefilled: how many prompt tokens the live layers hold when the caller takes over (the restored prefix
            plus the branch-point prefill); the caller feeds ``input_ids[:, prefilled:]``.
        reused: tokens restored from the store (0 on a miss).
    """

    cache: "MarconiCache"
    input_ids: torch.Tensor
    plan: "RequestPlan"
    prefilled: int
    checkpoints: dict[int, StateCheckpoint] = field(default_factory=dict)
    timings: CallTimings = field(default_factory=CallTimings)

    @property
    def reused(self) -> int:
        return self.plan.reuse_len

    def __repr__(self) -> str:
        return (f"PrefixCall(prompt={self.input_ids.shape[-1]} tokens, reused={self.reused}, "
                f"prefilled={self.prefilled}, checkpoints={sorted(self.checkpoints)}, timings={self.timings})")

    @classmethod
    def begin(cls, cache: "MarconiCache", input_ids: torch.Tensor) -> "PrefixCall":
        """Look up the prompt, restore the reusable prefix, and prefill up to each capture position."""
        cache.reset_live()
        started = time.perf_counter()
        prompt = input_ids[0].tolist()
        plan = cache.store.plan(prompt)
        call = cls(cache, input_ids, plan, prefilled=plan.reuse_len)
        cache.last_call = call
        cache._active_prompt = prompt
        try:
            looked_up = time.perf_counter()
            cache.layout.restore(cache, plan.reuse_edges, plan.reuse_checkpoint, cache.layer_devices)
            cache.live_tokens = input_ids[0, : plan.reuse_len].tolist()
            restored = time.perf_counter()
            if plan.capture_positions:
                call._capture(plan.capture_positions)
            call.timings = CallTimings(looked_up - started, restored - looked_up, time.perf_counter() - restored)
        except BaseException:
            call.abort()
            raise
        return call

    def _capture(self, positions: tuple[int, ...]) -> None:
        """Prefill the prompt but its last token, copying the fixed-size states at each capture position.

        Single pass where the model's recurrent mixers can split their input (one model forward); otherwise two
        passes: a forward up to each position, a copy, and the rest left to generate.
        """
        cache, end = self.cache, self.input_ids.shape[1] - 1
        if cache.capture == "single_pass":
            captured = single_pass_prefill(cache, self.input_ids[:, :end], self.prefilled, positions)
            if captured is not None:
                self.checkpoints.update(captured)
                self.prefilled = end
                return
        for position in positions:
            _prefill(cache, self.input_ids[:, self.prefilled : position], start=self.prefilled)
            self.checkpoints[position] = cache.layout.take_checkpoint(cache, cache.storage_device)
            self.prefilled = position

    def abort(self) -> None:
        """Forget this call: release the lookup's lock and drop the live states. The store is unchanged."""
        self.cache.store.abort(self.plan)
        self.cache.reset_live()

    def finish(self) -> None:
        """Admit the states of every token fed in this call, per the policy.

        The live states stay in place, as a ``DynamicCache`` returned by ``generate`` holds them: a caller may go on
        from them by hand (``model(next_ids, past_key_values=cache)``). The next call through the cache resets them.
        """
        cache = self.cache
        tokens = cache.live_tokens
        prompt = self.input_ids[0].tolist()
        if tokens is None or len(tokens) < len(prompt) or tokens[: len(prompt)] != prompt:
            warnings.warn(
                "MarconiCache admits nothing for this call: the tokens fed to the model are not the prompt followed "
                "by its continuation (embeddings or a batch were fed inside the call)",
                stacklevel=3,
            )
            self.abort()
            return
        started = time.perf_counter()
        end = len(tokens)
        checkpoints = dict(self.checkpoints)
        if end in cache.store.checkpoint_positions(self.plan, end):
            checkpoints[end] = cache.layout.take_checkpoint(cache, cache.storage_device)

        def make_edge(start: int, stop: int):
            return cache.layout.take_edge(cache, start, stop, cache.storage_device)

        try:
            result = cache.store.commit(self.plan, tokens, make_edge, checkpoints)
        except BaseException:
            cache.reset_live()
            raise
        self.timings.admit_s = time.perf_counter() - started
        logger.debug("MarconiCache admitted %s in %.3f ms", result, self.timings.admit_s * 1e3)


def _prefill(cache: "MarconiCache", chunk: torch.Tensor, start: int) -> None:
    """Feed ``chunk`` (shape [1, L]) at positions ``start .. start+L-1`` into the live cache."""
    chunk = chunk.to(cache.input_device)
    with torch.no_grad():
        cache.model(input_ids=chunk, **cache.continuation_kwargs(start, start + chunk.shape[1], chunk.device))


# ------------------------------------------------------------------------------------------------- the wrapper
class _Warnings:
    """Each reason for running without reuse is warned about once per process (not once per call)."""

    def __init__(self) -> None:
        self._seen: set[str] = set()

    def once(self, reason: str, message: str) -> None:
        if reason not in self._seen:
            self._seen.add(reason)
            warnings.warn(message, stacklevel=5)  # once -> _run_without_reuse -> _generate -> wrapper -> caller


_WARN = _Warnings()


@dataclass(frozen=True)
class CallPlan:
    """What the wrapper does with one generate call: ``reuse`` (lookup, restore, admit), or run it without reuse
    (``without_reuse`` names why), or without any cache at all (``uncached``: ``use_cache=False``)."""

    reuse: bool
    without_reuse: str = ""
    uncached: bool = False


def _plan_call(
    config: GenerationConfig, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> CallPlan:
    """What to do with a call, from the settings it runs with (``config``: model defaults, passed config, keywords)."""
    if config.use_cache is False:
        return CallPlan(reuse=False, without_reuse="use_cache=False", uncached=True)
    if input_ids.shape[0] != 1:
        return CallPlan(reuse=False, without_reuse="batch size > 1")
    for name in ("output_hidden_states", "output_attentions"):
        if getattr(config, name, None):
            return CallPlan(reuse=False, without_reuse=f"{name}=True (restored positions have no hidden states or "
                                                        "attentions to return)")
    if (config.num_return_sequences or 1) > 1:
        return CallPlan(reuse=False, without_reuse="num_return_sequences > 1")
    if _may_be_padded(config, input_ids, attention_mask):
        return CallPlan(reuse=False, without_reuse="a padded prompt")
    return CallPlan(reuse=True)


def _refuse_unsupported_modes(
    model: "PreTrainedModel", cache: "MarconiCache", config: GenerationConfig, kwargs: dict[str, Any]
) -> None:
    """Decoding modes that rewrite or fork the cache, inputs_embeds, compiled forwards and a replaced prompt feeder
    are refused before anything runs."""
    from .cache import MarconiCacheError

    why = conventions.cache_rewriting_mode(config, kwargs)
    if why is not None:
        raise ValueError(
            f"{why}; a MarconiCache supports greedy decoding and sampling. Generate without it, or pass a DynamicCache"
        )
    if kwargs.get("inputs_embeds") is not None:
        raise ValueError("a MarconiCache looks prompts up by token ids: pass input_ids, not inputs_embeds")
    if config.prefill_chunk_size is not None and cache.pure_recurrent:
        raise ValueError(
            "prefill_chunk_size needs a model with attention layers: transformers' chunked prefill asks the cache "
            "for its length, which a pure recurrent model's cache does not track (it fails with a DynamicCache too)"
        )
    if _is_compiled(model):
        raise ValueError(
            "this model's forward is wrapped by torch.compile; a MarconiCache restores and copies live states between "
            "forwards, which a compiled graph does not see. Generate with the uncompiled model (or pass a "
            "DynamicCache to the compiled one)"
        )
    if cache.pure_recurrent and not isinstance(model.__dict__.get("prepare_inputs_for_generation"), PrepareInputs):
        raise MarconiCacheError(
            "model.prepare_inputs_for_generation was replaced after the MarconiCache was built; on a pure recurrent "
            "model the cache needs its own, which feeds only the prompt tokens past the restored prefix. Build the "
            "MarconiCache after the library that replaces it, or pass a DynamicCache"
        )


def _is_compiled(model: "PreTrainedModel") -> bool:
    """``model.forward = torch.compile(model.forward)`` or ``model.compile()``."""
    return (getattr(model.forward, "_torchdynamo_orig_callable", None) is not None
            or getattr(model, "_compiled_call_impl", None) is not None)


def _generate(model: "PreTrainedModel", original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    from .cache import MarconiCache, MarconiCacheError

    cache = conventions.find_cache(kwargs)
    if not isinstance(cache, MarconiCache):
        return original(*args, **kwargs)
    try:
        if cache.model is not model:
            raise MarconiCacheError(
                f"this MarconiCache belongs to another model instance ({type(cache.model).__name__}, config "
                f"fingerprint {cache.fingerprint}); build one MarconiCache per model"
            )
        if args:
            input_ids, args = args[0], args[1:]
        else:
            input_ids = kwargs.pop("inputs", None)
            input_ids = kwargs.pop("input_ids", None) if input_ids is None else input_ids
        config = conventions.generation_config_of_call(model, args, kwargs)
        _refuse_unsupported_modes(model, cache, config, kwargs)
        input_ids = cache.validate_input_ids(input_ids)
        attention_mask = kwargs.get("attention_mask")
        if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise MarconiCacheError(
                f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has shape "
                f"{tuple(input_ids.shape)}; they must match"
            )
        with cache.call_lock:
            cache.refuse_nested_call()
            cache.check_weights()
            plan = _plan_call(config, input_ids, attention_mask)
            with cache.active_call():
                if not plan.reuse:
                    return _run_without_reuse(cache, original, input_ids, args, kwargs, plan)
                call = PrefixCall.begin(cache, input_ids)
                try:
                    output = _run_generate(cache, original, input_ids, args, kwargs)
                except BaseException:
                    call.abort()
                    raise
                call.finish()
                return output
    except BaseException:
        _end_stream(kwargs.get("streamer"))
        raise


def _end_stream(streamer: Any) -> None:
    """Close a streamer whose generate raised, so that a consumer iterating it in another thread (e.g. a
    ``TextIteratorStreamer``) stops instead of waiting forever; the error itself propagates to generate's caller."""
    if streamer is not None and hasattr(streamer, "end"):
        try:
            streamer.end()
        except Exception:  # the streamer may be half-fed; the generate error is the one to report
            logger.debug("ending the streamer after a failed generate raised too", exc_info=True)


def _run_without_reuse(
    cache: "MarconiCache", original: Callable[..., Any], input_ids: torch.Tensor, args: tuple[Any, ...],
    kwargs: dict[str, Any], plan: CallPlan,
) -> Any:
    """Run a call that cannot reuse stored states: on the live cache as a plain cache (reset first), or without any
    cache for ``use_cache=False``. Nothing is admitted; the store is untouched."""
    cache.bypassed_calls += 1
    cache.last_call = None
    _WARN.once(plan.without_reuse, (
        f"MarconiCache reuses and admits prefixes for one unpadded sequence per call; a call with "
        f"{plan.without_reuse} runs without reuse and admits nothing"
    ))
    cache.reset_live()
    if plan.uncached:
        kwargs = {name: value for name, value in kwargs.items() if name not in conventions.CACHE_KEYWORDS}
        return original(input_ids, *args, **kwargs)
    cache.live_tokens = None  # several rows or masked positions: the live layers no longer follow one token list
    return original(input_ids, *args, **conventions.with_cache(kwargs, cache.keyword, cache))


def _may_be_padded(config: GenerationConfig, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> bool:
    """Whether generate will mask some prompt positions: a mask with zeros, or no mask and a prompt holding the pad
    token id, from which generate infers padding (a restored prefix would then disagree with the mask).

    Like transformers' ``_prepare_attention_mask_for_generation``, nothing is inferred when the pad id is also an
    EOS id: a multi-turn prompt holding an earlier turn's EOS is not padded.
    """
    if attention_mask is not None:
        return not bool(attention_mask.all())
    pads, eos = _ids(config.pad_token_id), _ids(config.eos_token_id)
    if not pads or set(pads) & set(eos):
        return False
    return any(bool((input_ids == pad).any()) for pad in pads)


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.flatten().tolist()]
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    return [int(value)]


def _run_generate(
    cache: "MarconiCache", original: Callable[..., Any], input_ids: torch.Tensor, args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    """Run transformers' generate on a live cache that already holds the restored prefix (and any branch prefill).

    generate sees the whole prompt (so ``max_length``, ``min_length``, penalties and streamers count it) and feeds
    only the tokens past the cache: by itself where the cache counts tokens (attention layers), else through
    :class:`PrepareInputs` (pure Mamba models).
    """
    return original(input_ids, *args, **conventions.with_cache(kwargs, cache.keyword, cache))


# ------------------------------------------------------------------------------------------ installed on the model
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

    def inner(self) -> Callable[..., Any]:
        """What this attribute replaced, bound to the model."""
        if self.previous is not None:
            return self.previous
        return getattr(type(self.model), self.name).__get__(self.model)

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(self.inner())

    @property
    def __doc__(self) -> str | None:  # type: ignore[override]
        return getattr(type(self.model), self.name).__doc__

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.model, self.previous))

    @classmethod
    def replace_on(cls, model: "PreTrainedModel") -> None:
        setattr(model, cls.name, cls(model, model.__dict__.get(cls.name)))


class GenerateWrapper(_InstanceMethod):
    """``model.generate`` of a model with a MarconiCache installed: calls with a MarconiCache go through the cache
    (:func:`_generate`); every other call goes straight to the replaced ``generate``.

    Picklable and deep-copyable, like the forward hooks (module-level functions): ``copy.deepcopy(model)``,
    ``pickle`` / ``torch.save(model)`` and ``save_pretrained`` work; a MarconiCache built for the original is refused
    by the copy (another model instance).
    """

    name = "generate"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return _generate(self.model, self.inner(), *args, **kwargs)


class PrepareCacheGuard(_InstanceMethod):
    """``model._prepare_cache_for_generation``: refuses transformers' generate loop on a MarconiCache unless it was
    entered through ``model.generate`` (the wrapper), e.g. ``GenerationMixin.generate(model, ...)`` called directly,
    which would run on stale live states without lookup or admission."""

    name = "_prepare_cache_for_generation"

    def __call__(self, generation_config: Any, model_kwargs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        from .cache import MarconiCache, MarconiCacheError

        cache = conventions.find_cache(model_kwargs)
        if isinstance(cache, MarconiCache) and not cache.in_active_call():
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
        from .cache import MarconiCache

        cache = conventions.find_cache(kwargs)
        skip = 0
        if (isinstance(cache, MarconiCache) and cache.in_active_call() and kwargs.get("is_first_iteration")
                and kwargs.get("next_sequence_length") is None and not conventions.generate_skips_cached_prompt(cache)
                and cache.live_tokens):
            skip = len(cache.live_tokens)
            kwargs["next_sequence_length"] = input_ids.shape[1] - skip
        inputs = self.inner()(input_ids, *args, **kwargs)
        mask = inputs.get("attention_mask")
        if skip and isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[1] == input_ids.shape[1]:
            inputs["attention_mask"] = mask[:, skip:]
        return inputs


def _owning_cache(module: torch.nn.Module, kwargs: dict[str, Any]) -> "MarconiCache | None":
    """The MarconiCache a forward of ``module`` (the model or its base model) passes, if it belongs to that model."""
    from .cache import MarconiCache

    cache = conventions.find_cache(kwargs)
    if isinstance(cache, MarconiCache) and (module is cache.model or module is cache.model.base_model):
        return cache
    return None


def enter_forward(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Forward pre-hook: hand the cache on under the release's keyword and count the tokens fed."""
    cache = _owning_cache(module, kwargs)
    if cache is None:
        return None
    if torch.compiler.is_compiling():
        from .cache import MarconiCacheError

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
        from .cache import MarconiCacheError

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
