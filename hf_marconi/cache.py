"""MarconiCache: a transformers ``Cache`` whose prefix states persist across ``generate`` calls.

During a call the object is the model's live cache, with exactly the layers ``DynamicCache(config=...)`` would
create. Across calls it owns a :class:`~hf_marconi.store.PrefixStore` (radix tree + Marconi policy) whose payloads
are copies of the live states (:mod:`hf_marconi.states`).

How it hooks into ``generate``: building a MarconiCache for a model wraps that model instance's ``generate`` (once)
and adds forward hooks. When a call passes a MarconiCache (as ``past_key_values=`` or ``cache=``, on every declared
transformers release; see :mod:`.conventions`), the wrapper restores the longest
stored prefix into the live layers *before* ``generate`` runs, so ``generate`` sees a cache of that length and feeds
only the unmatched suffix; after it returns, the new states are admitted by the policy (see :mod:`.wrapper` and :mod:`.generation`).
Plain ``model(...)`` forwards use the object as an ordinary live cache; :meth:`MarconiCache.request` gives them the
same lookup / admission as ``generate``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import DynamicCache

from . import conventions, generation, instance
from .errors import MarconiCacheError
from .families import cache_keyword_of, cost_model, family_of
from .policies import Policy, Tuner, default_policy, make_policy
from .states import DeviceSpec, KVEdge, StateCheckpoint, StateLayout
from .store import PrefixStore, StateSizes
from .support import apply_fixes, check_supported

if TYPE_CHECKING:
    from .recording import TraceRecorder

logger = logging.getLogger(__name__)


def config_fingerprint(config: Any) -> str:
    """A stable digest of what in a model config decides its states: two models share stored states only if their
    fingerprints agree. Entries that do not (where the model was loaded from, the transformers version, private
    runtime settings: every key starting with ``_``) are left out, so the same model loaded from another folder reads
    a saved cache."""
    fields = {k: v for k, v in config.to_dict().items() if not k.startswith("_") and k != "transformers_version"}
    text = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def execution_device(module: torch.nn.Module) -> torch.device:
    """Where ``module`` computes: its accelerate hook's execution device when it is dispatched or offloaded (its
    parameters may then sit on the meta device), else the device of its first parameter (CPU without any)."""
    device = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
    if device is not None:
        return torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    param = next(module.parameters(), None)
    if param is None or param.device.type == "meta":
        return torch.device("cpu")
    return param.device


def _probe(model: PreTrainedModel, keyword: str, device: torch.device) -> tuple[DynamicCache, StateLayout]:
    """A one-token forward into a scratch cache: which layers hold state (and the scratch, whose tensors say where each
    layer computes and how one sequence's states are shaped)."""
    config = model.config.get_text_config(decoder=True)
    scratch = DynamicCache(config=config)
    token = torch.zeros((1, 1), dtype=torch.long, device=device)
    with torch.no_grad():
        model(input_ids=token, use_cache=True, **{keyword: scratch})
    return scratch, StateLayout.of(scratch, written_only=True)


@dataclass(frozen=True)
class StateShapes:
    """The shapes and dtypes of one sequence's states in this cache, as a forward writes them: per attention layer
    (KV heads, head dim, dtype), and per checkpoint tensor name (shape, dtype). What a loaded entry must match."""

    kv: dict[int, tuple[int, int, torch.dtype]]
    checkpoint: dict[str, tuple[tuple[int, ...], torch.dtype]]

    @classmethod
    def of(cls, edge: KVEdge, checkpoint: StateCheckpoint) -> "StateShapes":
        """From one token's edge and one checkpoint of the probe."""
        kv = {layer: (keys.shape[1], keys.shape[3], keys.dtype) for layer, (keys, _) in edge.kv.items()}
        return cls(kv, {name: (tuple(t.shape), t.dtype) for name, t in checkpoint.tensors().items()})


def _state_devices(scratch: DynamicCache, default: torch.device) -> dict[int, torch.device]:
    """The device of each layer's live states after a forward (models dispatched over devices keep each layer's states
    next to the layer); ``default`` for layers that hold nothing."""
    devices = {}
    for idx, layer in enumerate(scratch.layers):
        tensors = [getattr(layer, "keys", None)]
        tensors += [*getattr(layer, "conv_states", {}).values(), *getattr(layer, "recurrent_states", {}).values()]
        found = next((t.device for t in tensors if isinstance(t, torch.Tensor) and t.numel()), default)
        devices[idx] = found
    return devices


class WeightsWatch:
    """Notices when a model's weights change, cheaply enough to ask before every call.

    It compares each parameter's storage, in-place version counter and dtype (``load_state_dict``, optimizer steps
    and ``.to`` move them) and 8 values sampled along each parameter (writes through ``param.data``, e.g. an adapter
    merged by ``weight.data += delta``, bypass the version counter). The sample views are built once per storage
    layout and read with one ``torch.cat`` and one sync per device. Not seen: an edit that misses every sampled value,
    adapter switches that change no parameter, and parameters offloaded to the meta device between calls; call
    ``cache.clear()`` after those.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self._storage: tuple[Any, ...] | None = None
        self._views: dict[torch.device, list[tuple[torch.nn.Parameter, torch.Tensor]]] = {}
        self.signature = self._current()

    def _current(self) -> tuple[Any, ...]:
        params = list(self.model.parameters())
        layout = tuple((p.data_ptr(), p.dtype, p.device) for p in params)
        if layout != self._storage:
            self._storage, self._views = layout, {}
            for param in params:
                if param.device.type != "meta" and param.numel():
                    count = param.numel()
                    positions = torch.arange(0, count, max(1, count // 8), device=param.device)[:8]
                    self._views.setdefault(param.device, []).append((param, positions))
        samples = tuple(
            # take() reads the sampled positions of any layout without copying the tensor; NaN and inf become numbers,
            # so that a weight holding them still equals itself.
            torch.cat([torch.take(p.detach(), idx) for p, idx in views]).float().nan_to_num(0.0, 1.0, -1.0).tolist()
            for views in self._views.values()
        )
        return layout, tuple(p._version for p in params), samples

    def changed(self) -> bool:
        """Whether the weights changed since the last call to ``changed`` (or since construction)."""
        current = self._current()
        if current == self.signature:
            return False
        self.signature = current
        return True


class MarconiCache(DynamicCache):
    """A prefix cache for hybrid models, passed to ``model.generate`` call after call (as ``past_key_values=`` or
    ``cache=``).

    Args:
        model: the model the cache serves. Building the cache installs hf_marconi's continuation fixes for the
            model's family (see ``hf_marconi.fixes``) and wraps ``model.generate``; families whose continuation
            cannot be made exact are refused with ``UnsupportedModelError``.
        capacity_bytes: the most bytes the stored states may occupy (real tensor bytes, ``stats()["bytes"]``).
        policy: None (default: ``hf_marconi.policies.default_policy()``, Marconi), ``"marconi"``, ``"sglang+"``
            (LRU), ``"vllm+"`` (block checkpoints), ``"no-cache"``, or a policy object (``hf_marconi.policies``).
        storage_device: where stored states live: None keeps them on each layer's own device; ``"cpu"`` moves
            them to CPU memory.
        alpha_tuner: for Marconi, tunes alpha (default: the tuner of ``default_policy()``, shadow replays of a few
            alphas that follow every commit in bounded steps, ``hf_marconi.policies.ShadowAlphaTuner``); an
            ``AlphaTuner`` for the paper's retrospective bootstrapping; None keeps alpha fixed.
        capture: how branch-point states are taken during a prefill: ``"single_pass"`` (one model forward in which
            the recurrent mixers split their input at the branch point; falls back to two passes for models whose
            mixers cannot split, e.g. Jamba) or ``"two_pass"`` (a forward up to the branch point, then the rest).
        recorder: a :class:`~hf_marconi.recording.TraceRecorder` that appends every call's request to a trace file
            (for ``python -m eval plan``); None records nothing.
        **policy_options: passed to the policy factory (e.g. ``alpha=0.5``, ``block_size=32`` for vLLM+).

    Each row of a left-padded batch reuses and admits states on its own (:mod:`hf_marconi.batched`). When the
    model's weights change (in place, or by ``.to(dtype)``), the stored states are dropped at the next call.
    """

    # What the generate wrapper and the forward hooks recognise a MarconiCache by (they do not import this module).
    is_marconi_cache = True

    def __init__(
        self,
        model: PreTrainedModel,
        capacity_bytes: int,
        policy: str | Policy | None = None,
        storage_device: DeviceSpec = None,
        alpha_tuner: Tuner | None | str = "default",
        capture: str = "single_pass",
        recorder: TraceRecorder | None = None,
        **policy_options: Any,
    ) -> None:
        capacity_bytes = _capacity(capacity_bytes)
        if capture not in ("single_pass", "two_pass"):
            raise MarconiCacheError(f"capture must be 'single_pass' or 'two_pass', got {capture!r}")
        _check_storage_device(storage_device)
        check_supported(model)
        apply_fixes(model)
        self.config = model.config.get_text_config(decoder=True)
        # Each thread's calls own their live layers and call markers (several threads may generate at once).
        self._live = _ThreadLive(self.config)
        super().__init__(config=self.config)
        self.model = model
        self.fingerprint = config_fingerprint(self.config)
        self.storage_device = storage_device
        self.capture = capture
        self.recorder = recorder
        # The keyword the installed transformers' forward and generate take this model's cache by.
        self.keyword = cache_keyword_of(model)
        # No attention layer at all (pure Mamba models): the cache counts no tokens itself.
        self.pure_recurrent = family_of(model).pure_recurrent
        self.vocab_size = model.get_input_embeddings().num_embeddings
        # Guards what is shared outside the store: the weights watch, re-measuring, the counters below.
        self._shared_lock = threading.RLock()
        self._measure()
        default, default_tuner = default_policy()
        if policy is None:
            policy = _make_policy(default.name, policy_options) if policy_options else default
        elif isinstance(policy, str):
            policy = _make_policy(policy, policy_options)
        if alpha_tuner == "default":
            alpha_tuner = default_tuner if policy.alpha is not None else None
        self.store = PrefixStore(capacity_bytes, policy, self.costs, self.sizes, tuner=alpha_tuner)
        # The latest call's record in any thread (reused tokens, capture positions, timings of the cache's own work);
        # a caller gets its own call's record from generate's output or from cache.request.
        self.last_call: "generation.PrefixCall | None" = None
        # Calls that ran without reuse (use_cache=False, hidden states asked for, batches it cannot align).
        self.bypassed_calls = 0
        # Times the store was dropped because the model's weights changed.
        self.invalidations = 0
        # A call ran through the cache, in any thread (a forward in a thread that ran none starts from empty states).
        self.calls_ran = False
        self._weights = WeightsWatch(model)
        instance.install(model, self.pure_recurrent)

    # ----------------------------------------------------------- calls
    @property
    def live(self) -> "_ThreadLive":
        """The calling thread's live layers, fed tokens and call markers."""
        return self._live

    @property
    def layers(self) -> list[Any]:  # type: ignore[override]
        return self._live.layers

    @layers.setter
    def layers(self, value: list[Any]) -> None:
        self._live.layers = value

    @property
    def live_tokens(self) -> list[int] | None:
        """Tokens whose states this thread's live layers hold, in order; None once a forward fed embeddings or a batch
        instead of one sequence's ids."""
        return self._live.tokens

    @live_tokens.setter
    def live_tokens(self, value: list[int] | None) -> None:
        self._live.tokens = value

    @contextmanager
    def active_call(self) -> Iterator[None]:
        """Mark the current thread as inside a call that went through the cache (generate wrapper or request)."""
        live = self._live
        live.in_call, live.prompt, live.loops, live.ran_call = True, None, 0, True
        self.calls_ran = True
        try:
            yield
        finally:
            live.in_call, live.prompt, live.loops = False, None, 0

    def in_active_call(self) -> bool:
        return self._live.in_call

    def active_prompt(self) -> list[int] | None:
        """The prompt of the call in flight in this thread, when it restored a prefix (None otherwise)."""
        return self._live.prompt if self._live.in_call else None

    def refuse_nested_call(self) -> None:
        """A call while another call through this cache is in flight in the same thread (a stopping criterion, logits
        processor or streamer calling generate, generate inside ``cache.request``) would reset the live states under
        the outer call: refused. Calls in other threads have live states of their own."""
        if self._live.in_call:
            raise MarconiCacheError(
                "a MarconiCache call was started inside another call through the same cache in this thread (e.g. from "
                "a stopping criterion, a logits processor or a streamer, or inside `with cache.request(...)`); it "
                "would reset the outer call's live states. Finish the outer call first, or use a DynamicCache for "
                "the inner one"
            )

    def count_bypassed_call(self) -> None:
        with self._shared_lock:
            self.bypassed_calls += 1

    def continuation_kwargs(self, start: int, end: int, device: torch.device) -> dict[str, Any]:
        """Keyword arguments of a forward feeding positions ``start .. end-1`` into this live cache."""
        return conventions.continuation_kwargs(
            self.model, self.keyword, self, start, end, device, positions=self.layout.has_attention
        )

    def check_weights(self) -> None:
        """Drop the stored states if the model's weights changed since they were stored (a stored state is a function
        of the weights; reusing it after a training step, a merged adapter or a dtype change gives wrong tokens)."""
        with self._shared_lock:
            if not self._weights.changed():
                return
            freed = self.store.clear()
            self._measure()
            self.invalidations += 1
        self.reset_live()
        warnings.warn(
            f"the model's weights changed since MarconiCache stored its states; dropped {freed} bytes of stored "
            "states (they belong to the old weights)",
            stacklevel=5,  # check_weights <- generate_with_cache <- patched_generate <- InstanceMethod <- the caller
        )

    def _measure(self) -> None:
        """Where the model computes, which layers hold state, their real byte sizes and the cost model (again after
        the weights change dtype or device)."""
        model = self.model
        self.input_device = execution_device(model.get_input_embeddings())
        scratch, self.layout = _probe(model, self.keyword, self.input_device)
        self.layer_devices = _state_devices(scratch, self.input_device)
        # One token's KV and one checkpoint, copied once: their real bytes and shapes.
        edge = self.layout.take_edge(scratch, 0, 1) if self.layout.kv_layers else KVEdge(1, {})
        checkpoint = self.layout.take_checkpoint(scratch)
        self.sizes = StateSizes(kv_bytes_per_token=edge.nbytes, checkpoint_bytes=checkpoint.nbytes)
        self.state_shapes = StateShapes.of(edge, checkpoint)
        self.costs = cost_model(self.config, dtype=model.dtype, recurrent_dtype=model.dtype)
        if hasattr(self, "store"):
            with self.store.lock:
                self.store.sizes, self.store.costs = self.sizes, self.costs

    def clear(self) -> int:
        """Drop every stored state (e.g. after changing the model's weights by a route the cache cannot see);
        returns the bytes freed. Counters are kept."""
        freed = self.store.clear()
        if not self._live.in_call:  # a call of this thread in flight (clear from a callback) keeps its live states
            self.reset_live()
        return freed

    # ----------------------------------------------------------- live layers
    def reset_live(self) -> None:
        """Drop the live states (the store is untouched): the next forward starts from an empty cache."""
        fresh = DynamicCache(config=self.config)
        self.layers = fresh.layers
        self.live_tokens = []

    @property
    def is_compileable(self) -> bool:
        # The stored-state restore rewrites live tensors between calls; never let generate auto-compile around it.
        return False

    def get_seq_length(self, layer_idx: int = 0) -> int:
        if self.layout.has_attention:
            return super().get_seq_length(layer_idx)
        # An all-recurrent model has no layer that counts tokens: the hooks count what was fed.
        return len(self.live_tokens) if self.live_tokens is not None else 0

    def _check_in_forward(self) -> None:
        if self._live.forward_depth == 0:
            raise MarconiCacheError(
                "this MarconiCache was built for a different model instance (config fingerprint "
                f"{self.fingerprint}); build one MarconiCache per model and pass it only to that model"
            )

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        self._check_in_forward()
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def update_conv_state(self, conv_states: torch.Tensor, layer_idx: int, state_idx: int = 0, **kwargs):
        self._check_in_forward()
        return super().update_conv_state(conv_states, layer_idx, state_idx, **kwargs)

    def update_recurrent_state(self, recurrent_states: torch.Tensor, layer_idx: int, state_idx: int = 0, **kwargs):
        self._check_in_forward()
        return super().update_recurrent_state(recurrent_states, layer_idx, state_idx, **kwargs)

    # ----------------------------------------------------- validation, stats
    def validate_input_ids(self, input_ids: Any) -> torch.Tensor:
        """Check a prompt before anything changes; returns it as a 2-D LongTensor."""
        if not isinstance(input_ids, torch.Tensor):
            raise MarconiCacheError(f"input_ids must be a torch.Tensor of token ids, got {type(input_ids).__name__}")
        if input_ids.device.type == "meta":
            raise MarconiCacheError("input_ids is on the meta device and holds no token ids; pass a real tensor")
        if input_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise MarconiCacheError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        if input_ids.dim() != 2:
            raise MarconiCacheError(f"input_ids must have shape [batch, seq_len], got {tuple(input_ids.shape)}")
        if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
            raise MarconiCacheError(
                f"the prompt is empty (input_ids shape {tuple(input_ids.shape)}); pass at least one token"
            )
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= self.vocab_size:
            raise MarconiCacheError(
                f"token ids must lie in [0, {self.vocab_size}) for this model's vocabulary; got ids in [{low}, {high}]"
            )
        return input_ids.long()

    def stats(self) -> dict[str, Any]:
        """Counters of the store (lookups, hits, tokens reused, FLOPs saved, bytes, admissions, evictions, alpha),
        calls that ran without reuse (``bypassed_calls``) and stores dropped after a weight change
        (``invalidations``)."""
        # The store's own lock only: a scrape or a dashboard never waits for a model call.
        return dict(self.store.stats().asdict(), bypassed_calls=self.bypassed_calls, invalidations=self.invalidations)

    def check_invariants(self) -> None:
        self.store.check_invariants()

    def __repr__(self) -> str:
        model = type(self.model).__name__
        return f"MarconiCache(model={model}, store={self.store.nbytes} bytes, layers={len(self.layers)})"

    # ------------------------------------------------------- manual forwards
    @contextmanager
    def request(
        self, input_ids: torch.Tensor, cache_salt: str | None = None, cache_salt_from: int = 0
    ) -> Iterator["generation.PrefixCall"]:
        """Lookup and admission around plain forwards (what ``generate`` gets automatically).

        ::

            with cache.request(ids) as call:          # restores the stored prefix, captures branch states
                out = model(ids[:, call.prefilled:], past_key_values=cache)   # or cache=cache
                ...                                   # more forwards (decode steps) on the same cache
            # on leaving without an exception, the tokens fed are admitted; on an exception, the store is unchanged

        ``cache_salt`` / ``cache_salt_from``: the call's namespace, as for ``generate`` (see
        :class:`~hf_marconi.generation.CacheSalt`).
        """
        input_ids = self.validate_input_ids(input_ids)
        if input_ids.shape[0] != 1:
            raise MarconiCacheError(
                f"cache.request takes one sequence (input_ids of shape [1, L]); got batch size {input_ids.shape[0]}"
            )
        self.refuse_nested_call()
        salt = generation.CacheSalt.from_kwargs({"cache_salt": cache_salt, "cache_salt_from": cache_salt_from})
        self.check_weights()
        with self.active_call():
            call = generation.PrefixCall.begin(self, input_ids, salt)
            try:
                yield call
            except BaseException:
                call.abort()
                raise
            call.finish()


class _ThreadLive(threading.local):
    """What the calls of one thread own in a MarconiCache: the live layers a forward reads and writes, the tokens
    they hold, and the markers of the call in flight. Built anew (empty) the first time a thread touches the cache."""

    def __init__(self, config: Any) -> None:
        self.layers: list[Any] = DynamicCache(config=config).layers
        self.tokens: list[int] | None = []
        self.forward_depth = 0  # nested model forwards in flight (a CausalLM's base model counts with it)
        self.in_call = False  # inside generate's wrapper or cache.request
        self.ran_call = False  # this thread ran a call through the cache (its live states are that call's)
        self.warned_empty = False  # warned that a forward here does not continue another thread's call
        self.prompt: list[int] | None = None  # that call's prompt
        self.loops = 0  # transformers generate loops the call entered (one is allowed)


def _capacity(capacity_bytes: Any) -> int:
    """``capacity_bytes`` as an int: a non-negative int, or a float holding a whole number (``4e9``)."""
    if isinstance(capacity_bytes, float) and capacity_bytes.is_integer():
        capacity_bytes = int(capacity_bytes)
    if isinstance(capacity_bytes, bool) or not isinstance(capacity_bytes, int) or capacity_bytes < 0:
        raise MarconiCacheError(
            f"capacity_bytes must be a non-negative whole number of bytes (e.g. 4 * 2**30), got {capacity_bytes!r}"
        )
    return capacity_bytes


def _check_storage_device(storage_device: DeviceSpec) -> None:
    if storage_device is None:
        return
    try:
        device = torch.device(storage_device)
    except (RuntimeError, TypeError) as error:
        raise MarconiCacheError(f"storage_device {storage_device!r} is not a torch device: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MarconiCacheError(
            f"storage_device {storage_device!r} needs CUDA, which this machine does not have; use storage_device=None "
            "(each layer's own device) or 'cpu'"
        )
    if device.type == "meta":
        raise MarconiCacheError("storage_device 'meta' holds no data; use None, 'cpu' or a CUDA device")


def _make_policy(name: str, options: dict[str, Any]) -> Policy:
    """``make_policy``, with an option the policy does not take reported as the caller's error."""
    try:
        return make_policy(name, **options)
    except TypeError as error:
        raise MarconiCacheError(
            f"policy {name!r} does not take the options {sorted(options)} ({error}); alpha applies to "
            "policy='marconi' only, block_size to 'vllm+'"
        ) from None
