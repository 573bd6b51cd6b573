"""MarconiCache: a transformers ``Cache`` whose prefix states persist across ``generate`` calls.

During a call the object is the model's live cache, with exactly the layers ``DynamicCache(config=...)`` would
create. Across calls it owns a :class:`~hf_marconi.store.PrefixStore` (radix tree + Marconi policy) whose payloads
are copies of the live states (:mod:`hf_marconi.states`).

How it hooks into ``generate``: building a MarconiCache for a model wraps that model instance's ``generate`` (once)
and adds forward hooks. When a call passes a MarconiCache as ``past_key_values``, the wrapper restores the longest
stored prefix into the live layers *before* ``generate`` runs, so ``generate`` sees a cache of that length and feeds
only the unmatched suffix; after it returns, the new states are admitted by the policy (see :mod:`.generation`).
Plain ``model(...)`` forwards use the object as an ordinary live cache; :meth:`MarconiCache.request` gives them the
same lookup / admission as ``generate``.
"""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import DynamicCache

from . import generation
from .costs import CostModel
from .fixes import apply_fixes, check_supported
from .policies import WIDE_ALPHA_GRID, AlphaTuner, Policy, make_policy
from .states import DeviceSpec, StateLayout
from .store import PrefixStore, StateSizes

logger = logging.getLogger(__name__)


class MarconiCacheError(ValueError):
    """Bad input to a MarconiCache: raised before the store is touched, so the store is unchanged."""


def config_fingerprint(config: Any) -> str:
    """A stable digest of a model config: two models share stored states only if their fingerprints agree."""
    import hashlib
    import json

    text = json.dumps(config.to_dict(), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _layer_devices(model: PreTrainedModel, num_layers: int) -> dict[int, torch.device]:
    """Where each decoder layer computes: the device of the first module carrying that ``layer_idx``.

    Models dispatched over devices with accelerate keep each layer's states next to the layer.
    """
    devices: dict[int, torch.device] = {}
    for module in model.modules():
        idx = getattr(module, "layer_idx", None)
        if isinstance(idx, int) and idx not in devices:
            param = next(module.parameters(), None)
            if param is not None:
                devices[idx] = param.device
    default = model.device
    return {idx: devices.get(idx, default) for idx in range(num_layers)}


def _probe(model: PreTrainedModel) -> tuple[StateLayout, StateSizes]:
    """Which layers hold state, and the real bytes of one token of KV and of one checkpoint, from a one-token
    forward into a scratch cache."""
    config = model.config.get_text_config(decoder=True)
    scratch = DynamicCache(config=config)
    token = torch.zeros((1, 1), dtype=torch.long, device=model.device)
    with torch.no_grad():
        model(input_ids=token, use_cache=True, **{cache_argument(model): scratch})
    layout = StateLayout.of(scratch, written_only=True)
    kv = layout.take_edge(scratch, 0, 1).nbytes if layout.kv_layers else 0
    checkpoint = layout.take_checkpoint(scratch).nbytes
    return layout, StateSizes(kv_bytes_per_token=kv, checkpoint_bytes=checkpoint)


def cache_argument(model: PreTrainedModel) -> str:
    """The keyword a model's forward and ``generate`` take its cache by: ``cache_params`` for pure Mamba models
    (transformers decides by the class name the same way), else ``past_key_values``."""
    return "cache_params" if "mamba" in type(model).__name__.lower() else "past_key_values"


class MarconiCache(DynamicCache):
    """A prefix cache for hybrid models, passed as ``past_key_values`` to ``model.generate`` call after call.

    Args:
        model: the model the cache serves. Building the cache installs hf_marconi's continuation fixes for the
            model's family (see ``hf_marconi.fixes``) and wraps ``model.generate``; families whose continuation
            cannot be made exact are refused with ``UnsupportedModelError``.
        capacity_bytes: the most bytes the stored states may occupy (real tensor bytes, ``stats()["bytes"]``).
        policy: ``"marconi"`` (default), ``"sglang+"`` (LRU), ``"vllm+"`` (block checkpoints), ``"no-cache"``, or
            a policy object (``hf_marconi.policies``).
        storage_device: where stored states live: None keeps them on each layer's own device; ``"cpu"`` moves
            them to CPU memory.
        alpha_tuner: for Marconi, tunes alpha by retrospective bootstrapping (default: an ``AlphaTuner`` over a
            logarithmic grid, since the paper's 0..2 grid is too narrow for long contexts); None keeps alpha fixed.
        capture: how branch-point states are taken during a prefill: ``"single_pass"`` (one model forward in which
            the recurrent mixers split their input at the branch point; falls back to two passes for models whose
            mixers cannot split, e.g. Jamba) or ``"two_pass"`` (a forward up to the branch point, then the rest).
        **policy_options: passed to the policy factory (e.g. ``alpha=0.5``, ``block_size=32`` for vLLM+).

    Only batch-size-1 calls reuse and admit states; larger batches run without reuse (with a warning).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        capacity_bytes: int,
        policy: str | Policy = "marconi",
        storage_device: DeviceSpec = None,
        alpha_tuner: AlphaTuner | None | str = "default",
        capture: str = "single_pass",
        **policy_options: Any,
    ) -> None:
        if not isinstance(capacity_bytes, int) or capacity_bytes < 0:
            raise MarconiCacheError(f"capacity_bytes must be a non-negative int, got {capacity_bytes!r}")
        if capture not in ("single_pass", "two_pass"):
            raise MarconiCacheError(f"capture must be 'single_pass' or 'two_pass', got {capture!r}")
        check_supported(model)
        apply_fixes(model)
        self.config = model.config.get_text_config(decoder=True)
        super().__init__(config=self.config)
        self.model = model
        self.fingerprint = config_fingerprint(self.config)
        self.storage_device = storage_device
        self.capture = capture
        self.layer_devices = _layer_devices(model, len(self.layers))
        self.uses_cache_params = cache_argument(model) == "cache_params"
        self.vocab_size = model.get_input_embeddings().num_embeddings
        self.layout, self.sizes = _probe(model)
        self.costs = CostModel.from_config(self.config, dtype=model.dtype, recurrent_dtype=model.dtype)
        if isinstance(policy, str):
            policy = make_policy(policy, **policy_options)
        if alpha_tuner == "default":
            alpha_tuner = AlphaTuner(grid=WIDE_ALPHA_GRID) if policy.alpha is not None else None
        self.store = PrefixStore(capacity_bytes, policy, self.costs, self.sizes, tuner=alpha_tuner)
        # Tokens whose states the live layers hold, in order; None once a forward fed embeddings instead of ids.
        self.live_tokens: list[int] | None = []
        self._forward_depth = 0
        # The latest call's record (reused tokens, capture positions, timings of the cache's own work).
        self.last_call: "generation.PrefixCall | None" = None
        # One call at a time owns the live layers; reentrant so a generate wrapper may run forwards under it.
        self.call_lock = threading.RLock()
        generation.install(model, self)

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
        if self._forward_depth == 0:
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
        """Counters of the store: lookups, hits, tokens reused, FLOPs saved, bytes, admissions, evictions, alpha."""
        with self.call_lock:
            return self.store.stats().asdict()

    def check_invariants(self) -> None:
        self.store.check_invariants()

    def __repr__(self) -> str:
        model = type(self.model).__name__
        return f"MarconiCache(model={model}, store={self.store.nbytes} bytes, layers={len(self.layers)})"

    # ------------------------------------------------------- manual forwards
    @contextmanager
    def request(self, input_ids: torch.Tensor) -> Iterator["generation.PrefixCall"]:
        """Lookup and admission around plain forwards (what ``generate`` gets automatically).

        ::

            with cache.request(ids) as call:          # restores the stored prefix, captures branch states
                out = model(ids[:, call.prefilled:], past_key_values=cache)
                ...                                   # more forwards (decode steps) on the same cache
            # on leaving without an exception, the tokens fed are admitted; on an exception, the store is unchanged
        """
        with self.call_lock:
            call = generation.PrefixCall.begin(self, self.validate_input_ids(input_ids))
            try:
                yield call
            except BaseException:
                call.abort()
                raise
            call.finish()
