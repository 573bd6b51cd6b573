"""The per-call flow of a MarconiCache: lookup, restore, branch-point capture, generate, admit.

:class:`PrefixCall` is one request's passage through the cache (``cache.request`` and ``generate`` both use it);
everything a call changes in the store happens in :meth:`PrefixCall.finish`, after the model has run, so an exception
anywhere before leaves the store as it was (``PrefixCall.abort`` only releases the lookup's lock).

:func:`generate_with_cache` is what ``model.generate`` does when it is given a MarconiCache (the instance-level
wrapper of :mod:`.instance` calls it). What it does with each kind of call is decided up front (:func:`_plan_call`):
reuse and admission, a run without reuse (with the reason, warned once per reason), or a refusal before anything
runs. Every convention of transformers it relies on (cache keywords, how settings resolve, which modes fork the
cache) comes from :mod:`.conventions`.
"""

from __future__ import annotations

import hashlib
import logging
import time
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch
from transformers import GenerationConfig

from . import conventions
from .errors import MarconiCacheError
from .kernels.single_pass import single_pass_prefill
from .states import StateCheckpoint

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from .cache import MarconiCache
    from .store import RequestPlan

logger = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class CacheSalt:
    """A namespace for the stored prefixes of one tenant: tokens from position ``start`` on are stored and looked up
    under ``name``, so they never match another namespace's (the first ``start`` tokens, e.g. a public system prompt,
    stay in the shared space). The model is fed the real token ids; only the store's keys change."""

    name: str
    start: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise MarconiCacheError(f"cache_salt must be a non-empty string, got {self.name!r}")
        if isinstance(self.start, bool) or not isinstance(self.start, int) or self.start < 0:
            raise MarconiCacheError(f"cache_salt_from must be a non-negative int, got {self.start!r}")

    @property
    def _offset(self) -> int:
        # Keys above every vocabulary (ids < 2**32); the whole 256-bit digest, so that no two names share a namespace
        # by accident or by a searched collision. Keys are Python ints (never stored as int64).
        digest = int.from_bytes(hashlib.sha256(self.name.encode()).digest(), "big")
        return (digest + 1) << 32

    def for_prompt(self, prompt_len: int) -> "CacheSalt":
        """This salt for a prompt of ``prompt_len`` tokens: a prompt shorter than the shared prefix is salted whole
        (else it, and the reply up to ``start``, would be stored in the shared space)."""
        return self if prompt_len >= self.start else CacheSalt(self.name, 0)

    def key(self, tokens: list[int]) -> list[int]:
        """The store's key of ``tokens`` in this namespace."""
        offset = self._offset
        return tokens[: self.start] + [token + offset for token in tokens[self.start :]]

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any]) -> "CacheSalt | None":
        """Pop hf_marconi's own generate keywords ``cache_salt`` / ``cache_salt_from`` (transformers never sees
        them)."""
        name, start = kwargs.pop("cache_salt", None), kwargs.pop("cache_salt_from", 0)
        if name is None:
            if start:
                raise MarconiCacheError("cache_salt_from needs a cache_salt")
            return None
        return cls(name, start)


def _store_key(salt: CacheSalt | None, tokens: list[int]) -> list[int]:
    return tokens if salt is None else salt.key(tokens)


@dataclass(frozen=True)
class CallRecord:
    """What one call got from the cache, for the caller that made it (``output.marconi_record`` on a generate output
    with ``return_dict_in_generate=True``; ``call.record()`` in ``cache.request``): unlike ``cache.last_call``, another
    thread's call cannot overwrite it."""

    prompt_tokens: int
    reused_tokens: int  # restored from the store instead of prefilled (0 on a miss)
    unresumable_tokens: int  # stored tokens the prompt matched past the deepest checkpoint: cached but not resumable
    hit_kind: str | None  # "purely_input" (a shared prompt's branch point), "input_output" (an earlier turn), None
    timings: CallTimings
    without_reuse: str = ""  # why the call ran without reuse; "" when it looked its prompt up


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
    salt: CacheSalt | None = None
    started: float = field(default_factory=time.time)  # Unix time of the lookup (a recorded trace's arrival)

    @property
    def reused(self) -> int:
        return self.plan.reuse_len

    def record(self) -> CallRecord:
        return CallRecord(self.input_ids.shape[-1], self.reused, self.plan.unresumable_len, self.plan.hit_kind,
                          self.timings)

    def __repr__(self) -> str:
        return (f"PrefixCall(prompt={self.input_ids.shape[-1]} tokens, reused={self.reused}, "
                f"prefilled={self.prefilled}, checkpoints={sorted(self.checkpoints)}, timings={self.timings})")

    @classmethod
    def begin(cls, cache: "MarconiCache", input_ids: torch.Tensor, salt: CacheSalt | None = None) -> "PrefixCall":
        """Look up the prompt (in ``salt``'s namespace), restore the reusable prefix, and prefill up to each capture
        position."""
        cache.reset_live()
        started = time.perf_counter()
        prompt = input_ids[0].tolist()
        salt = salt.for_prompt(len(prompt)) if salt is not None else None
        plan = cache.store.plan(_store_key(salt, prompt))
        call = cls(cache, input_ids, plan, prefilled=plan.reuse_len, salt=salt)
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
            result = cache.store.commit(self.plan, _store_key(self.salt, tokens), make_edge, checkpoints)
        except BaseException:
            cache.reset_live()
            raise
        self.timings.admit_s = time.perf_counter() - started
        if cache.recorder is not None:
            cache.recorder.record(tokens, len(prompt), self.started, self.salt)
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
            # once <- _run_without_reuse <- generate_with_cache <- patched_generate <- InstanceMethod <- the caller
            warnings.warn(message, stacklevel=6)


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
        with cache.call_lock:
            cache.refuse_nested_call()
            cache.check_weights()
            plan = _plan_call(config, input_ids, attention_mask)
            with cache.active_call():
                if not plan.reuse:
                    return _run_without_reuse(cache, original, input_ids, args, kwargs, plan)
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
    cache.bypassed_calls += 1
    cache.last_call = None
    _WARN.once(plan.without_reuse, (
        f"MarconiCache reuses and admits prefixes for one unpadded sequence per call; a call with "
        f"{plan.without_reuse} runs without reuse and admits nothing"
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


def _may_be_padded(config: GenerationConfig, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> bool:
    """Whether generate will mask some prompt positions: a mask with zeros, or no mask and a prompt holding the pad
    token id, from which generate infers padding (a restored prefix would then disagree with the mask).

    Like transformers' ``_prepare_attention_mask_for_generation``, nothing is inferred when the pad id is also an
    EOS id: a multi-turn prompt holding an earlier turn's EOS is not padded.
    """
    if attention_mask is not None:
        return not bool(attention_mask.all())
    pads, eos = conventions.token_ids(config.pad_token_id), conventions.token_ids(config.eos_token_id)
    if not pads or set(pads) & set(eos):
        return False
    return any(bool((input_ids == pad).any()) for pad in pads)


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


# ------------------------------------------------------------------------------------------ installed on the model
