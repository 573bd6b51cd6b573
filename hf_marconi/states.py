"""Taking and restoring the per-layer states of a live transformers cache, as tree payloads.

A live ``DynamicCache(config=...)`` holds, per layer, some of:

- attention KV that grows per token (``DynamicLayer``): it can be cut at any prefix, so it is stored on the tree's
  edges, token range by token range (:class:`KVEdge`);
- fixed-size states valid at exactly one position (conv and recurrent states of ``LinearAttentionLayer``; the
  window of a ``DynamicSlidingWindowLayer``): stored as a checkpoint on a tree node (:class:`StateCheckpoint`).

:class:`StateLayout` maps each layer of a cache to the parts it holds, so that the rest of the code never asks what
kind a layer is. Stored tensors are always copies: nothing handed to the tree aliases a live tensor, and a restore
copies out of the tree, so a model writing into its live cache can never change a stored entry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers.cache_utils import (
    Cache,
    DynamicLayer,
    DynamicSlidingWindowLayer,
    LinearAttentionCacheLayerMixin,
)

DeviceSpec = torch.device | str | None


def _tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def copy_to(tensor: torch.Tensor, device: DeviceSpec) -> torch.Tensor:
    """A contiguous copy of ``tensor`` on ``device`` (its own device when None); never a view of the input."""
    target = tensor.device if device is None else torch.device(device)
    if target == tensor.device:
        return tensor.detach().clone(memory_format=torch.contiguous_format)
    return tensor.detach().to(target, copy=True).contiguous()


@dataclass
class KVEdge:
    """Attention keys and values of a run of consecutive tokens, for every full-attention layer.

    ``kv[layer_idx] = (keys, values)``, each of shape ``[1, num_kv_heads, num_tokens, head_dim]``.
    A model without full-attention layers gives edges with an empty ``kv`` that still count their tokens.
    """

    num_tokens: int
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]]

    @property
    def nbytes(self) -> int:
        return sum(_tensor_bytes(k) + _tensor_bytes(v) for k, v in self.kv.values())

    def split(self, offset: int) -> tuple["KVEdge", "KVEdge"]:
        if not 0 < offset < self.num_tokens:
            raise ValueError(f"cannot split an edge of {self.num_tokens} tokens at {offset}")
        # Clones, so that each half owns exactly its own bytes and the accounting stays true.
        head = {i: (k[:, :, :offset].clone(), v[:, :, :offset].clone()) for i, (k, v) in self.kv.items()}
        tail = {i: (k[:, :, offset:].clone(), v[:, :, offset:].clone()) for i, (k, v) in self.kv.items()}
        return KVEdge(offset, head), KVEdge(self.num_tokens - offset, tail)

    def concat(self, tail: "KVEdge") -> "KVEdge":
        # The tail may live on another tier (a spilled edge on CPU): the merged edge stays where ``self`` is.
        merged = {
            i: (torch.cat([k, tail.kv[i][0].to(k.device)], dim=-2), torch.cat([v, tail.kv[i][1].to(v.device)], dim=-2))
            for i, (k, v) in self.kv.items()
        }
        return KVEdge(self.num_tokens + tail.num_tokens, merged)


@dataclass
class StateCheckpoint:
    """The fixed-size states of every layer at one prefix length.

    ``conv[(layer_idx, state_idx)]`` and ``recurrent[(layer_idx, state_idx)]`` are the conv / recurrent states of
    linear-attention layers (shapes as the model allocates them, batch 1); ``windows[layer_idx]`` is the
    ``(keys, values, cumulative_length)`` of a sliding-window attention layer.
    """

    conv: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    recurrent: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    windows: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        states = sum(_tensor_bytes(t) for t in (*self.conv.values(), *self.recurrent.values()))
        return states + sum(_tensor_bytes(k) + _tensor_bytes(v) for k, v, _ in self.windows.values())

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor under a stable flat name (used by persistence and tests)."""
        named = {f"conv.{i}.{s}": t for (i, s), t in self.conv.items()}
        named.update({f"recurrent.{i}.{s}": t for (i, s), t in self.recurrent.items()})
        for i, (k, v, _) in self.windows.items():
            named[f"window.{i}.keys"] = k
            named[f"window.{i}.values"] = v
        return named


def _is_written(layer: object) -> bool:
    if isinstance(layer, LinearAttentionCacheLayerMixin) and any(layer.has_previous_state.values()):
        return True
    return isinstance(layer, DynamicLayer) and layer.is_initialized


def map_payload(payload: KVEdge | StateCheckpoint, copy: Callable[[torch.Tensor], torch.Tensor]):
    """The same payload with every tensor replaced by ``copy(tensor)`` (token counts, keys and window lengths kept)."""
    if isinstance(payload, KVEdge):
        return KVEdge(payload.num_tokens, {i: (copy(k), copy(v)) for i, (k, v) in payload.kv.items()})
    if isinstance(payload, StateCheckpoint):
        return StateCheckpoint(
            conv={key: copy(t) for key, t in payload.conv.items()},
            recurrent={key: copy(t) for key, t in payload.recurrent.items()},
            windows={i: (copy(k), copy(v), length) for i, (k, v, length) in payload.windows.items()},
        )
    raise TypeError(f"cannot move a {type(payload).__name__}: expected a StateCheckpoint or a KVEdge")


@dataclass(frozen=True)
class StateLayout:
    """Which layers of a cache hold per-token KV, linear-attention states, or a sliding window.

    Built once from a freshly made ``DynamicCache(config=...)``; a layer may appear in several lists (a hybrid
    layer holds both KV and linear-attention states).
    """

    kv_layers: tuple[int, ...]
    linear_layers: tuple[int, ...]
    window_layers: tuple[int, ...]

    @classmethod
    def of(cls, cache: Cache, written_only: bool = False) -> "StateLayout":
        """The layout of ``cache``'s layers; with ``written_only``, only the layers a forward has written (some
        transformers releases give layers that hold nothing, e.g. Nemotron-H's MLP blocks, a state layer)."""
        kv, linear, window = [], [], []
        for idx, layer in enumerate(cache.layers):
            if written_only and not _is_written(layer):
                continue
            if isinstance(layer, DynamicSlidingWindowLayer):
                window.append(idx)
            elif isinstance(layer, DynamicLayer):
                kv.append(idx)
            elif not isinstance(layer, LinearAttentionCacheLayerMixin) and type(layer).__name__ != "DummyLayer":
                raise TypeError(
                    f"layer {idx} of the cache is a {type(layer).__name__}, which hf_marconi cannot snapshot; "
                    "supported layer kinds are DynamicLayer, DynamicSlidingWindowLayer, LinearAttention* and DummyLayer"
                )
            if isinstance(layer, LinearAttentionCacheLayerMixin):
                linear.append(idx)
        return cls(tuple(kv), tuple(linear), tuple(window))

    @property
    def has_attention(self) -> bool:
        return bool(self.kv_layers or self.window_layers)

    # ------------------------------------------------------------------ take
    def take_edge(self, cache: Cache, start: int, end: int, device: DeviceSpec = None, row: int = 0) -> KVEdge:
        """Copy the attention KV of cache positions ``[start, end)`` of batch row ``row`` of a live cache."""
        if not 0 <= start < end:
            raise ValueError(f"empty or negative token range [{start}, {end})")
        kv = {}
        for idx in self.kv_layers:
            layer = cache.layers[idx]
            if layer.get_seq_length() < end:
                raise ValueError(f"layer {idx} holds {layer.get_seq_length()} tokens, fewer than the {end} asked for")
            kv[idx] = (
                copy_to(layer.keys[row : row + 1, :, start:end], device),
                copy_to(layer.values[row : row + 1, :, start:end], device),
            )
        return KVEdge(end - start, kv)

    def take_checkpoint(self, cache: Cache, device: DeviceSpec = None, row: int = 0) -> StateCheckpoint:
        """Copy the fixed-size states of batch row ``row`` of a live cache at its current position."""
        checkpoint = StateCheckpoint()
        for idx in self.linear_layers:
            layer = cache.layers[idx]
            for state_idx in range(layer.number_of_states):
                if not layer.has_previous_state[state_idx]:
                    raise RuntimeError(
                        f"layer {idx} state {state_idx} has not been written yet: a checkpoint needs a forward first"
                    )
                if layer.is_conv_states_initialized[state_idx]:
                    checkpoint.conv[(idx, state_idx)] = copy_to(layer.conv_states[state_idx][row : row + 1], device)
                if layer.is_recurrent_states_initialized[state_idx]:
                    checkpoint.recurrent[(idx, state_idx)] = copy_to(
                        layer.recurrent_states[state_idx][row : row + 1], device
                    )
        for idx in self.window_layers:
            layer = cache.layers[idx]
            checkpoint.windows[idx] = (
                copy_to(layer.keys[row : row + 1], device),
                copy_to(layer.values[row : row + 1], device),
                layer.cumulative_length,
            )
        return checkpoint

    # --------------------------------------------------------------- restore
    def restore(
        self,
        cache: Cache,
        edges: tuple[KVEdge, ...],
        checkpoint: StateCheckpoint | None,
        devices: dict[int, torch.device],
    ) -> None:
        """Write a stored prefix into the freshly reset layers of a live cache.

        ``edges`` concatenate to the prefix's KV; ``checkpoint`` holds the fixed-size states at its end (None only
        for an empty prefix). ``devices[layer_idx]`` is where that layer computes. Every tensor written is a copy.
        """
        if not edges:
            return
        if checkpoint is None:
            raise ValueError("a non-empty prefix needs the checkpoint of its last node")
        for idx in self.kv_layers:
            device = devices[idx]
            keys = torch.cat([edge.kv[idx][0].to(device) for edge in edges], dim=-2)
            values = torch.cat([edge.kv[idx][1].to(device) for edge in edges], dim=-2)
            cache.layers[idx].update(keys, values)
        _write_fixed_states(
            cache,
            {key: copy_to(conv, devices[key[0]]) for key, conv in checkpoint.conv.items()},
            {key: copy_to(recurrent, devices[key[0]]) for key, recurrent in checkpoint.recurrent.items()},
        )
        for idx, (keys, values, cumulative_length) in checkpoint.windows.items():
            layer = cache.layers[idx]
            layer.lazy_initialization(keys, values)
            layer.keys = copy_to(keys, devices[idx])
            layer.values = copy_to(values, devices[idx])
            layer.cumulative_length = cumulative_length

    def restore_rows(
        self,
        cache: Cache,
        rows: list[tuple[KVEdge, StateCheckpoint] | None],
        length: int,
        devices: dict[int, torch.device],
    ) -> None:
        """Write one sequence's states per batch row into the freshly reset layers of a live cache, left-padded to a
        common ``length`` of cache positions (the caller's attention mask covers the padding).

        ``rows[i]`` holds row ``i``'s KV of all its tokens (at most ``length``) and its fixed-size states after them;
        None for a row without any token yet (zero states: the same as starting fresh). Sliding-window layers are not
        supported (their window would have to hold the padding too).
        """
        if self.window_layers:
            raise ValueError("batched restore does not support sliding-window layers")
        known = [row for row in rows if row is not None]
        if not known or length <= 0:
            return
        edge0, checkpoint0 = known[0]
        for idx in self.kv_layers:
            keys, values = [], []
            for row in rows:
                # A row without tokens: empty keys and values (whose head dims may differ) of the first known row.
                row_keys, row_values = row[0].kv[idx] if row is not None else (t[..., :0, :] for t in edge0.kv[idx])
                pad = length - row_keys.shape[-2]
                keys.append(torch.nn.functional.pad(row_keys.to(devices[idx]), (0, 0, pad, 0)))
                values.append(torch.nn.functional.pad(row_values.to(devices[idx]), (0, 0, pad, 0)))
            cache.layers[idx].update(torch.cat(keys), torch.cat(values))

        def stacked(name: str, key: tuple[int, int]) -> torch.Tensor:
            parts = [getattr(row[1] if row is not None else checkpoint0, name)[key] for row in rows]
            return torch.cat([p if row is not None else torch.zeros_like(p) for p, row in zip(parts, rows)]).to(
                devices[key[0]]
            )

        _write_fixed_states(
            cache,
            {key: stacked("conv", key) for key in checkpoint0.conv},
            {key: stacked("recurrent", key) for key in checkpoint0.recurrent},
        )


def _write_fixed_states(
    cache: Cache,
    conv: dict[tuple[int, int], torch.Tensor],
    recurrent: dict[tuple[int, int], torch.Tensor],
) -> None:
    """Write conv and recurrent states, keyed (layer, state index), into the layers of a live cache (the tensors are
    the caller's copies, on each layer's device), marking each layer as continuing from them."""
    for (idx, state_idx), tensor in conv.items():
        cache.layers[idx].update_conv_state(tensor, state_idx=state_idx)
    for (idx, state_idx), tensor in recurrent.items():
        layer = cache.layers[idx]
        layer.update_recurrent_state(tensor, state_idx=state_idx)
        # A layer with a recurrent state but no conv state is only marked as continuing by this flag.
        layer.has_previous_state[state_idx] = True
