"""What ``model.generate`` does when it is given a MarconiCache (the instance-level wrapper of :mod:`.instance` calls
:func:`generate_with_cache`).

What it does with each kind of call is decided up front (:func:`_plan_call`): reuse and admission for one sequence
(:class:`~hf_marconi.generation.PrefixCall`) or per row of a batch (:mod:`.batched`), a run without reuse (with the
reason, warned once per reason), or a refusal before anything runs. Every convention of transformers it relies on
(cache keywords, how settings resolve, which modes fork the cache) comes from :mod:`.conventions`.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch
from transformers import GenerationConfig

from . import batched, conventions
from .errors import MarconiCacheError
from .generation import CacheSalt, CallRecord, CallTimings, PrefixCall

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from .cache import MarconiCache

logger = logging.getLogger(__name__)


class _Warnings:
    """Each reason for running without reuse is warned about once per process (not once per call)."""

    def __init__(self) -> None:
        self._seen: set[str] = set()

    def once(self, reason: str, message: str) -> None:
        if reason not in self._seen:
            self._seen.add(reason)
            # once <- _run_without_reuse <- generate_with_cache <- patched_generate <- InstanceMethod <- the caller
            warnings.warn(message, stacklevel=6)


_WARN = _Warnings()


@dataclass(frozen=True)
class CallPlan:
    """What the wrapper does with one generate call: ``reuse`` (lookup, restore, admit; per row when ``rows`` is set),
    or run it without reuse (``without_reuse`` names why), or without any cache at all (``uncached``:
    ``use_cache=False``)."""

    reuse: bool
    without_reuse: str = ""
    uncached: bool = False
    rows: list[list[int]] | None = None  # a batched call: each row's prompt without its left padding


def _plan_call(
    cache: "MarconiCache", config: GenerationConfig, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> CallPlan:
    """What to do with a call, from the settings it runs with (``config``: model defaults, passed config, keywords)."""
    if config.use_cache is False:
        return CallPlan(reuse=False, without_reuse="use_cache=False", uncached=True)
    for name in ("output_hidden_states", "output_attentions"):
        if getattr(config, name, None):
            return CallPlan(reuse=False, without_reuse=f"{name}=True (restored positions have no hidden states or "
                                                        "attentions to return)")
    mask = _generation_mask(config, input_ids, attention_mask)
    if input_ids.shape[0] == 1 and (config.num_return_sequences or 1) == 1 and mask is None:
        return CallPlan(reuse=True)
    rows = batched.left_padded_rows(input_ids, mask)
    why = batched.why_not_batched(cache, rows)
    if why is not None:
        return CallPlan(reuse=False, without_reuse=why)
    return CallPlan(reuse=True, rows=rows)


def _refuse_unsupported_modes(
    model: "PreTrainedModel", cache: "MarconiCache", config: GenerationConfig, kwargs: dict[str, Any]
) -> None:
    """Decoding modes that rewrite or fork the cache, inputs_embeds and compiled forwards are refused before anything
    runs."""
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


def _is_compiled(model: "PreTrainedModel") -> bool:
    """``model.forward = torch.compile(model.forward)`` or ``model.compile()``."""
    return (getattr(model.forward, "_torchdynamo_orig_callable", None) is not None
            or getattr(model, "_compiled_call_impl", None) is not None)


def is_marconi_cache(value: Any) -> bool:
    """Whether ``value`` is a MarconiCache (recognised by its marker, so that this module need not import the cache)."""
    return bool(getattr(value, "is_marconi_cache", False))


def generate_with_cache(
    model: "PreTrainedModel", original: Callable[..., Any], *args: Any, **kwargs: Any
) -> Any:
    """``model.generate(*args, **kwargs)`` (``original``: the generate it replaces) through the MarconiCache passed,
    if any."""
    cache = conventions.find_cache(kwargs)
    if not is_marconi_cache(cache):
        return original(*args, **kwargs)
    try:
        salt = CacheSalt.from_kwargs(kwargs)
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
        cache.refuse_nested_call()
        cache.check_weights()
        plan = _plan_call(cache, config, input_ids, attention_mask)
        with cache.active_call():
            if not plan.reuse:
                return _run_without_reuse(cache, original, input_ids, args, kwargs, plan)
            if plan.rows is not None:
                return _with_record(*batched.generate_rows(cache, original, input_ids, plan.rows, args, kwargs, salt,
                                                           config))
            call = PrefixCall.begin(cache, input_ids, salt)
            try:
                output = _run_generate(cache, original, input_ids, args, kwargs)
            except BaseException:
                call.abort()
                raise
            call.finish()
            return _with_record(output, call.record())
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
    cache.count_bypassed_call()
    cache.last_call = None
    _WARN.once(plan.without_reuse, (
        f"MarconiCache runs a call with {plan.without_reuse} without reuse and admits nothing"
    ))
    cache.reset_live()
    record = CallRecord(input_ids.shape[-1], 0, 0, None, CallTimings(), without_reuse=plan.without_reuse)
    if plan.uncached:
        kwargs = {name: value for name, value in kwargs.items() if name not in conventions.CACHE_KEYWORDS}
        return _with_record(original(input_ids, *args, **kwargs), record)
    cache.live_tokens = None  # several rows or masked positions: the live layers no longer follow one token list
    return _with_record(original(input_ids, *args, **conventions.with_cache(kwargs, cache.keyword, cache)), record)


def _with_record(output: Any, record: CallRecord) -> Any:
    """``output`` with the call's record attached, where generate returned an output object (not a bare tensor)."""
    if not isinstance(output, torch.Tensor):
        output.marconi_record = record
    return output


def _generation_mask(
    config: GenerationConfig, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> torch.Tensor | None:
    """The attention mask generate will apply to the prompt, or None when it masks nothing: a passed mask with zeros,
    or, without a mask, one inferred from the pad token id as generate infers it.

    Like transformers' ``_prepare_attention_mask_for_generation``, nothing is inferred when the pad id is also an
    EOS id: a multi-turn prompt holding an earlier turn's EOS is not padded.
    """
    if attention_mask is not None:
        return None if bool(attention_mask.all()) else attention_mask
    pads, eos = conventions.token_ids(config.pad_token_id), conventions.token_ids(config.eos_token_id)
    if not pads or set(pads) & set(eos):
        return None
    inferred = ~torch.isin(input_ids, torch.tensor(pads, device=input_ids.device))
    return None if bool(inferred.all()) else inferred.long()


def _run_generate(
    cache: "MarconiCache", original: Callable[..., Any], input_ids: torch.Tensor, args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    """Run transformers' generate on a live cache that already holds the restored prefix (and any branch prefill).

    generate sees the whole prompt (so ``max_length``, ``min_length``, penalties and streamers count it) and feeds
    only the tokens past the cache: by itself where the cache counts tokens (attention layers), else through
    :func:`~hf_marconi.instance.feed_uncached_prompt` (pure Mamba models).
    """
    return original(input_ids, *args, **conventions.with_cache(kwargs, cache.keyword, cache))
