"""Single-pass branch-point capture: the fixed-size states at positions inside one prefill forward.

Two-pass capture (``generation.PrefixCall.begin``) runs one model forward over ``[start, b)``, copies the states,
then another over ``[b, end)``. Here the model runs *once* over ``[start, end)``; only the recurrent mixers of the
model split their own input at ``b``: each mixer runs over ``[start, b)`` from the cache, its conv and recurrent
states are copied, and it goes on over ``[b, end)`` from the states it just wrote. Everything else in the model
(embeddings, attention, MLPs / experts, norms, the LM head) runs once over the whole range.

Why split the mixer call rather than read the state at ``b`` out of one scan:

- the state at ``b`` is then *exactly* the one two-pass capture takes (the mixer computes the same scan over the
  same two segments, with the state carried by the cache as in any continuation), with no new numerics to trust;
- the conv state is the one the model's own ``update_conv_state`` stores (the last ``d_conv`` pre-convolution
  columns before ``b``, zero-padded on a first prefill shorter than the kernel) because it *is* that call;
- the mixer's own code runs, so whatever fast path it dispatches to is used: on CUDA with mamba-ssm and
  causal-conv1d installed, each segment goes through ``mamba_chunk_scan_combined(initial_states=...,
  return_final_states=True)`` and ``causal_conv1d_fn``; on CPU through transformers' torch SSD scan;
- it costs at most one partially filled scan chunk per split and a second launch of the mixer's kernels, against
  a whole second model forward for two-pass. Reading the state at ``b`` from the per-chunk states of a single scan
  would need mamba-ssm's private ``_mamba_chunk_scan_combined_fwd`` (no public API returns chunk states) plus a
  roll-forward from the last chunk boundary: more code, a private dependency, and no measurable gain over this.

Supported: the Mamba2 (SSD) mixers of Mamba2, Bamba, NemotronH, FalconH1, GraniteMoeHybrid and Zamba2, the gated
delta nets of Qwen3-Next, Qwen3.5 and OLMo-hybrid, Kimi's delta attention and LFM2's short convolution: mixers
whose multi-token continuation from the cache is exact, so that splitting them changes nothing but where the
states are copied. Not split: Jamba's Mamba1 mixer (its continuation is only right with hf_marconi's
initial-state fix installed on the instance, so its family record lists no ``splittable_mixers``) and sliding-window
attention (the window at ``b`` is not what the live cache holds after the forward): :func:`single_pass_prefill`
returns None for those models and the caller falls back to two-pass capture.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch
from torch import nn
from transformers.cache_utils import Cache

from ..families import family_of
from ..patching import InstanceMethod, patch_method
from ..states import DeviceSpec, StateCheckpoint, StateLayout, map_payload

if TYPE_CHECKING:
    from ..cache import MarconiCache


def recurrent_mixers(model: nn.Module) -> dict[int, nn.Module]:
    """The splittable mixer of each layer index, for every splittable mixer in ``model`` (the mixer classes the family
    records of :mod:`hf_marconi.families` name: forward(hidden_states, <cache keyword>=..., attention_mask=...,
    **kwargs) reads and writes the conv + recurrent state of exactly its own ``layer_idx``, and continues exactly
    from them)."""
    family = family_of(model)
    classes = family.mixer_classes() if family is not None else ()
    return {module.layer_idx: module for module in model.modules() if type(module) in classes}


def supports_single_pass(model: nn.Module, layout: StateLayout) -> bool:
    """Whether every fixed-size state of the model can be captured inside one forward.

    True when each linear-attention layer of ``layout`` is served by a splittable mixer and there is no
    sliding-window layer (whose window at ``b`` is not what the live cache holds after the forward).
    """
    if layout.window_layers or not layout.linear_layers:
        return False
    return set(recurrent_mixers(model)) == set(layout.linear_layers)


def _copy_layer_states(cache: Cache, layer_idx: int, into: StateCheckpoint) -> None:
    """Clone the conv / recurrent states of one layer (batch row 0) into ``into``, as ``take_checkpoint`` lays them.

    The copy stays on the layer's device: a device-to-host copy here would synchronise inside the forward.
    """
    layer = cache.layers[layer_idx]
    for state_idx in range(layer.number_of_states):
        if not layer.has_previous_state[state_idx]:
            raise RuntimeError(f"layer {layer_idx} state {state_idx} was not written by its mixer before the split")
        if layer.is_conv_states_initialized[state_idx]:
            into.conv[(layer_idx, state_idx)] = layer.conv_states[state_idx][:1].clone()
        if layer.is_recurrent_states_initialized[state_idx]:
            into.recurrent[(layer_idx, state_idx)] = layer.recurrent_states[state_idx][:1].clone()


@dataclass
class BranchCapture:
    """States captured at ``positions`` (absolute token positions) during one forward over ``[start, end)``."""

    cache: Cache
    start: int
    end: int
    positions: tuple[int, ...]
    checkpoints: dict[int, StateCheckpoint] = field(default_factory=dict)

    @property
    def offsets(self) -> tuple[int, ...]:
        """Split points inside the forward's input, relative to ``start``; a position at ``end`` needs no split."""
        return tuple(p - self.start for p in self.positions if p < self.end)

    def split(self, layer_idx: int, forward: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]):
        """Run a mixer's ``forward(*args, **kwargs)`` segment by segment, copying the layer's states between
        segments."""
        if args:
            hidden_states, args = args[0], args[1:]
        else:
            hidden_states = kwargs.pop("hidden_states")
        length = hidden_states.shape[1]
        if length != self.end - self.start:
            raise RuntimeError(
                f"the mixer of layer {layer_idx} got {length} tokens inside a single-pass capture over "
                f"[{self.start}, {self.end}); run exactly one forward over that range inside `capture_branch_states`"
            )
        mask = kwargs.get("attention_mask")
        bounds = (0, *self.offsets, length)
        outputs = []
        for low, high in zip(bounds[:-1], bounds[1:]):
            if isinstance(mask, torch.Tensor):
                kwargs["attention_mask"] = mask[..., low:high]
            output = forward(hidden_states[:, low:high], *args, **kwargs)
            if not isinstance(output, torch.Tensor):
                raise TypeError(
                    f"{type(output).__name__} returned by the mixer of layer {layer_idx}: single-pass capture "
                    "expects mixers that return one tensor; remove the class from its family's splittable_mixers"
                )
            outputs.append(output)
            if high < length:
                position = self.start + high
                _copy_layer_states(self.cache, layer_idx, self.checkpoints.setdefault(position, StateCheckpoint()))
        return torch.cat(outputs, dim=1)


# The capture in flight in each thread: several threads may capture on one model at once, each splitting only its
# own forward (the mixers are shared; what they do depends on the calling thread).
_IN_FLIGHT = threading.local()
# Captures in flight per model (all threads): the mixers carry the splitting forward while there is at least one.
_CAPTURES_PER_MODEL: dict[int, int] = {}
_MIXERS_LOCK = threading.Lock()


def split_when_capturing(mixer: nn.Module, forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """A splittable mixer's ``forward`` while some thread captures on its model: split when the calling thread's
    capture runs on the cache passed; any other forward (another thread's, another cache's) runs unsplit."""
    capture: BranchCapture | None = getattr(_IN_FLIGHT, "capture", None)
    if capture is None or not any(v is capture.cache for v in (*args, *kwargs.values())):
        return forward(*args, **kwargs)
    return capture.split(mixer.layer_idx, forward, args, kwargs)


def _hold_mixers(model: nn.Module) -> None:
    """Give the model's splittable mixers the splitting forward (the first capture in flight on the model)."""
    with _MIXERS_LOCK:
        count = _CAPTURES_PER_MODEL.get(id(model), 0)
        if count == 0:
            for mixer in recurrent_mixers(model).values():
                patch_method(mixer, "forward", split_when_capturing)
        _CAPTURES_PER_MODEL[id(model)] = count + 1


def _release_mixers(model: nn.Module) -> None:
    """Put each mixer's previous forward back (a wrapper that was there before, e.g. an accelerate hook, stays)
    when the last capture in flight on the model ends."""
    with _MIXERS_LOCK:
        count = _CAPTURES_PER_MODEL.pop(id(model)) - 1
        if count:
            _CAPTURES_PER_MODEL[id(model)] = count
            return
        for mixer in recurrent_mixers(model).values():
            patched = vars(mixer).get("forward")
            if isinstance(patched, InstanceMethod) and patched.patch is split_when_capturing:
                if patched.previous is None:
                    del mixer.forward
                else:
                    mixer.forward = patched.previous


@contextmanager
def capture_branch_states(
    model: nn.Module, cache: Cache, start: int, end: int, positions: Sequence[int]
) -> Iterator[BranchCapture]:
    """Split every splittable mixer of ``model`` at ``positions`` for the forwards this thread runs on ``cache``
    inside the block.

    Run exactly one forward over ``input_ids[:, start:end]`` on ``cache`` inside the block; afterwards
    ``capture.checkpoints[p]`` holds the mixer states at each ``p < end`` (on the layers' devices). The mixers'
    ``forward`` is replaced per instance while any thread captures on the model, and put back when the last capture
    ends, even on an exception; other instances of the same class are untouched.
    """
    positions = tuple(sorted(set(positions)))
    if not positions or not start < positions[0] or positions[-1] > end:
        raise ValueError(f"capture positions {positions} must lie in ({start}, {end}]")
    capture = BranchCapture(cache, start, end, positions)
    outer = getattr(_IN_FLIGHT, "capture", None)
    _hold_mixers(model)
    _IN_FLIGHT.capture = capture
    try:
        yield capture
    finally:
        _IN_FLIGHT.capture = outer
        _release_mixers(model)


def single_pass_prefill(
    cache: "MarconiCache", input_ids: torch.Tensor, start: int, positions: Sequence[int]
) -> dict[int, StateCheckpoint] | None:
    """Feed ``input_ids[:, start:]`` in one forward and return the checkpoints at ``positions``.

    ``cache`` holds the states after ``input_ids[:, :start]`` (a restored prefix; nothing when ``start`` is 0) and is
    left holding the states after all of ``input_ids`` (shape ``[1, end]``), as one plain forward leaves it. Each
    returned ``StateCheckpoint`` equals what ``cache.layout.take_checkpoint(cache, cache.storage_device)`` gives
    after a forward ending at that position (two-pass capture); positions must lie in ``(start, end]``.

    Returns None, having run nothing, when the model has a recurrent layer that cannot be split (see
    ``hf_marconi.families``) or a sliding-window layer: the caller then falls back to two-pass capture.
    """
    model = cache.model
    if not supports_single_pass(model, cache.layout):
        return None
    end = input_ids.shape[1]
    chunk = input_ids[:, start:].to(cache.input_device)
    with torch.no_grad(), capture_branch_states(model, cache, start, end, positions) as capture:
        model(input_ids=chunk, **cache.continuation_kwargs(start, end, chunk.device))
    checkpoints = {p: _moved(checkpoint, cache.storage_device) for p, checkpoint in capture.checkpoints.items()}
    if end in capture.positions:
        checkpoints[end] = cache.layout.take_checkpoint(cache, cache.storage_device)
    return checkpoints


def _moved(checkpoint: StateCheckpoint, device: DeviceSpec) -> StateCheckpoint:
    """``checkpoint`` with its tensors on ``device`` (None: where they are); the tensors are already copies."""
    if device is None:
        return checkpoint
    target = torch.device(device)
    return map_payload(checkpoint, lambda t: t.to(target))
