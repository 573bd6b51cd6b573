"""The per-call flow of a MarconiCache: lookup, restore, branch-point capture, generate, admit.

``install`` wraps a model instance's ``generate`` and adds forward hooks; everything a call changes in the store
happens in :meth:`PrefixCall.finish`, after the model has run, so an exception anywhere before leaves the store as
it was (``PrefixCall.abort`` only releases the lookup's lock).
"""

from __future__ import annotations

import functools
import logging
import time
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch

from .kernels.single_pass import prefill_kwargs, single_pass_prefill
from .states import StateCheckpoint

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from .cache import MarconiCache
    from .store import RequestPlan

logger = logging.getLogger(__name__)

_INSTALLED = "_hf_marconi_installed"


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

    @classmethod
    def begin(cls, cache: "MarconiCache", input_ids: torch.Tensor) -> "PrefixCall":
        """Look up the prompt, restore the reusable prefix, and prefill up to each capture position."""
        cache.reset_live()
        started = time.perf_counter()
        plan = cache.store.plan(input_ids[0].tolist())
        call = cls(cache, input_ids, plan, prefilled=plan.reuse_len)
        cache.last_call = call
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
        """Admit the states of every token fed in this call, per the policy, then drop the live states."""
        cache = self.cache
        tokens = cache.live_tokens
        prompt = self.input_ids[0].tolist()
        if tokens is None or len(tokens) < len(prompt) or tokens[: len(prompt)] != prompt:
            warnings.warn(
                "MarconiCache admits nothing for this call: the tokens fed to the model are not the prompt followed "
                "by its continuation (inputs_embeds, batch > 1, or fewer tokens than the prompt were fed)",
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
        finally:
            cache.reset_live()
        self.timings.admit_s = time.perf_counter() - started
        logger.debug("MarconiCache admitted %s in %.3f ms", result, self.timings.admit_s * 1e3)


def _prefill(cache: "MarconiCache", chunk: torch.Tensor, start: int) -> None:
    """Feed ``chunk`` (shape [1, L]) at positions ``start .. start+L-1`` into the live cache."""
    chunk = chunk.to(cache.model.device)
    with torch.no_grad():
        cache.model(input_ids=chunk, **prefill_kwargs(cache, start, start + chunk.shape[1], chunk.device))


def _with_cache(cache: "MarconiCache", kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` with the cache under the keyword the model takes it by (pure Mamba models: ``cache_params``)."""
    if not cache.uses_cache_params:
        return kwargs
    kwargs = dict(kwargs)
    kwargs.pop("past_key_values", None)
    kwargs["cache_params"] = cache
    return kwargs


def _find_cache(kwargs: dict[str, Any]) -> Any:
    return kwargs.get("past_key_values", kwargs.get("cache_params"))


def _refuse_unsupported_modes(model: "PreTrainedModel", kwargs: dict[str, Any]) -> None:
    """Generation modes that rewrite or fork the cache are refused before anything runs."""
    config = kwargs.get("generation_config") or model.generation_config

    def setting(name: str, default: Any) -> Any:
        value = kwargs.get(name)
        value = getattr(config, name, None) if value is None else value
        return default if value is None else value

    if setting("num_beams", 1) > 1:
        raise ValueError(
            "beam search is not supported with a MarconiCache (beams reorder and fork the live cache); "
            "use greedy or sampling, or pass a DynamicCache for beam search"
        )
    if kwargs.get("assistant_model") is not None or setting("prompt_lookup_num_tokens", None) is not None:
        raise ValueError(
            "assisted / speculative decoding is not supported with a MarconiCache (it crops the cache, which a "
            "recurrent state cannot undo); generate without an assistant, or pass a DynamicCache"
        )
    if kwargs.get("inputs_embeds") is not None:
        raise ValueError("a MarconiCache looks prompts up by token ids: pass input_ids, not inputs_embeds")


def _generate(model: "PreTrainedModel", original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    from .cache import MarconiCache, MarconiCacheError

    cache = _find_cache(kwargs)
    if not isinstance(cache, MarconiCache):
        return original(*args, **kwargs)
    if cache.model is not model:
        raise MarconiCacheError(
            f"this MarconiCache belongs to another model instance ({type(cache.model).__name__}, config fingerprint "
            f"{cache.fingerprint}); build one MarconiCache per model"
        )
    _refuse_unsupported_modes(model, kwargs)
    if args:
        input_ids, args = args[0], args[1:]
    else:
        input_ids = kwargs.pop("inputs", None)
        input_ids = kwargs.pop("input_ids", None) if input_ids is None else input_ids
    input_ids = cache.validate_input_ids(input_ids)
    attention_mask = kwargs.get("attention_mask")
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise MarconiCacheError(
            f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has shape {tuple(input_ids.shape)}; "
            "they must match"
        )
    with cache.call_lock:
        padded = _may_be_padded(model, input_ids, attention_mask, kwargs)
        if input_ids.shape[0] != 1 or padded:
            warnings.warn(
                "MarconiCache reuses and admits prefixes for batch size 1 without padding only; this call "
                f"(batch {input_ids.shape[0]}, padded: {padded}) runs without reuse",
                stacklevel=2,
            )
            cache.reset_live()
            try:
                return original(input_ids, *args, **_with_cache(cache, kwargs))
            finally:
                cache.reset_live()
        call = PrefixCall.begin(cache, input_ids)
        try:
            output = _run_generate(cache, original, input_ids, call.prefilled, args, kwargs)
        except BaseException:
            call.abort()
            raise
        call.finish()
        return output


def _may_be_padded(
    model: "PreTrainedModel", input_ids: torch.Tensor, attention_mask: torch.Tensor | None, kwargs: dict[str, Any]
) -> bool:
    """Whether generate will mask some prompt positions: a mask with zeros, or no mask and a prompt holding the pad
    token id, from which generate infers padding (a restored prefix would then disagree with the mask)."""
    if attention_mask is not None:
        return not bool(attention_mask.all())
    config = kwargs.get("generation_config") or model.generation_config
    pad = kwargs.get("pad_token_id", getattr(config, "pad_token_id", None))
    if isinstance(pad, (list, tuple)):
        return any(bool((input_ids == p).any()) for p in pad)
    return pad is not None and bool((input_ids == int(pad)).any())


def _run_generate(
    cache: "MarconiCache",
    original: Callable[..., Any],
    input_ids: torch.Tensor,
    prefilled: int,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    """Run transformers' generate on a live cache that already holds ``prefilled`` prompt tokens."""
    if not cache.uses_cache_params:
        # generate compares the cache length with the prompt and feeds only the tokens past it.
        return original(input_ids, *args, **kwargs)
    # Pure Mamba models take the cache as `cache_params` and generate never asks it for its length: feed the suffix
    # ourselves and put the prefix back in front of the returned sequences.
    kwargs = _with_cache(cache, kwargs)
    if kwargs.get("attention_mask") is not None:
        kwargs["attention_mask"] = kwargs["attention_mask"][:, prefilled:]
    output = original(input_ids[:, prefilled:], *args, **kwargs)
    prefix = input_ids[:, :prefilled].to(_sequences(output).device)
    if isinstance(output, torch.Tensor):
        return torch.cat([prefix, output], dim=-1)
    output.sequences = torch.cat([prefix, output.sequences], dim=-1)
    return output


def _sequences(output: Any) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.sequences


def _enter_forward(model: "PreTrainedModel", args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    from .cache import MarconiCache

    cache = _find_cache(kwargs)
    if not isinstance(cache, MarconiCache) or cache.model is not model:
        return
    cache._forward_depth += 1
    if cache._forward_depth > 1:  # the inner base model of a CausalLM: already counted
        return
    ids = kwargs.get("input_ids", args[0] if args else None)
    if cache.live_tokens is None:
        return
    if not isinstance(ids, torch.Tensor) or ids.shape[0] != 1:
        cache.live_tokens = None  # embeddings or a batch: the fed tokens are unknown from here on
    else:
        cache.live_tokens.extend(ids[0].tolist())


def _leave_forward(model: "PreTrainedModel", kwargs: dict[str, Any]) -> None:
    from .cache import MarconiCache

    cache = _find_cache(kwargs)
    if isinstance(cache, MarconiCache) and cache.model is model and cache._forward_depth > 0:
        cache._forward_depth -= 1


def install(model: "PreTrainedModel", cache: "MarconiCache") -> None:
    """Wrap ``model.generate`` and hook the forwards of the model and its base model (once per model)."""
    if getattr(model, _INSTALLED, False):
        return
    original = model.generate
    model.generate = functools.wraps(original)(functools.partial(_generate, model, original))
    for module in {model, model.base_model}:
        module.register_forward_pre_hook(
            lambda _m, args, kwargs: _enter_forward(model, args, kwargs), with_kwargs=True
        )
        module.register_forward_hook(
            lambda _m, _args, kwargs, _out: _leave_forward(model, kwargs), with_kwargs=True, always_call=True
        )
    setattr(model, _INSTALLED, True)
