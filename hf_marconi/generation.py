"""The per-call flow of a MarconiCache: lookup, restore, branch-point capture, admit.

:class:`PrefixCall` is one request's passage through the cache (``cache.request``, ``generate`` and each row of a
batched ``generate`` use it); everything a one-sequence call changes in the store happens in
:meth:`PrefixCall.finish`, after the model has run, so an exception anywhere before leaves the store as it was
(``PrefixCall.abort`` only releases the lookup's lock). A batched row also admits its prompt's captures before
decoding (:meth:`PrefixCall.admit_prompt`). :class:`CacheSalt` is a call's namespace, :class:`CallRecord` what the
caller gets back.

What ``model.generate`` does with a MarconiCache is in :mod:`.wrapper`; batched calls in :mod:`.batched`.
"""

from __future__ import annotations

import hashlib
import logging
import time
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .errors import MarconiCacheError
from .kernels.single_pass import single_pass_prefill
from .states import StateCheckpoint

if TYPE_CHECKING:
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


def store_key(salt: CacheSalt | None, tokens: list[int]) -> list[int]:
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
    rows: tuple["CallRecord", ...] = ()  # a batched call: one record per prompt row (the fields above are their sums)


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
    def begin(
        cls, cache: "MarconiCache", input_ids: torch.Tensor, salt: CacheSalt | None = None,
        also_branches_at: tuple[int, ...] = (),
    ) -> "PrefixCall":
        """Look up the prompt (in ``salt``'s namespace), restore the reusable prefix, and prefill up to each capture
        position (``also_branches_at``: where the prompt branches off other rows of its batch)."""
        cache.reset_live()
        started = time.perf_counter()
        prompt = input_ids[0].tolist()
        salt = salt.for_prompt(len(prompt)) if salt is not None else None
        plan = cache.store.plan(store_key(salt, prompt), also_branches_at)
        call = cls(cache, input_ids, plan, prefilled=plan.reuse_len, salt=salt)
        cache.last_call = call
        cache.live.prompt = prompt
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
            prefill_live(cache, self.input_ids[:, self.prefilled : position], start=self.prefilled)
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
        self._commit(tokens, checkpoints, started)
        self.record_to_trace(tokens)

    def record_to_trace(self, tokens: list[int]) -> None:
        """Append this call (its prompt, then ``tokens``' continuation: what it admitted) to the cache's recorder."""
        if self.cache.recorder is not None:
            self.cache.recorder.record(tokens, self.input_ids.shape[-1], self.started, self.salt)

    def admit_prompt(self) -> None:
        """Admit the checkpoints captured in the prefill and the prompt's KV up to the deepest of them, nothing past
        the prompt: a batched row's admission before decoding, so that later rows of the batch can reuse it."""
        self._commit(self.input_ids[0].tolist(), dict(self.checkpoints), time.perf_counter(), count=False)

    def _commit(self, tokens: list[int], checkpoints: dict[int, StateCheckpoint], started: float,
                count: bool = True) -> None:
        cache = self.cache

        def make_edge(start: int, stop: int):
            return cache.layout.take_edge(cache, start, stop, cache.storage_device)

        try:
            result = cache.store.commit(self.plan, store_key(self.salt, tokens), make_edge, checkpoints, count)
        except BaseException:
            cache.reset_live()
            raise
        self.timings.admit_s = time.perf_counter() - started
        logger.debug("MarconiCache admitted %s in %.3f ms", result, self.timings.admit_s * 1e3)


def prefill_live(cache: "MarconiCache", chunk: torch.Tensor, start: int) -> None:
    """Feed ``chunk`` (shape [1, L]) at positions ``start .. start+L-1`` into the live cache."""
    chunk = chunk.to(cache.input_device)
    with torch.no_grad():
        cache.model(input_ids=chunk, **cache.continuation_kwargs(start, start + chunk.shape[1], chunk.device))
