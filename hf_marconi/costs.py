"""FLOPs and bytes of a hybrid model, derived from its transformers config (no torch, no weights).

For every decoder layer a config describes, the family's config reader (:mod:`hf_marconi.config_readers`, chosen
by :func:`hf_marconi.families.layer_costs`) lists its parts (attention, a recurrent mixer, an
MLP or MoE) as :class:`LayerCost` records; :class:`CostModel` sums them:

- ``extend_flops(P, E)``: forward FLOPs (2 per multiply-add) to extend a cached prefix of ``P`` tokens by ``E`` tokens.
  Projections, recurrent updates and MLPs are linear in ``E``; attention adds ``4 * heads * head_dim`` FLOPs per
  (query, key) pair (the ``Q K^T`` scores and the weighted sum of values), and the new tokens see ``P * E + E(E+1)/2``
  pairs (causal, each token sees itself), or at most the window per token for sliding-window layers. Because the
  pair count is additive, ``extend_flops(0, P) + extend_flops(P, E) == extend_flops(0, P + E)``. Norms, activations,
  rotary embeddings, the embedding lookup and the LM head are left out (the LM head runs once per request, cached or
  not).
- ``kv_bytes_per_token``: K and V of every full-attention layer for one token of one sequence.
- ``checkpoint_bytes``: the fixed-size states valid at one position for one sequence: conv windows and recurrent
  states of every recurrent layer (and the last ``window`` tokens of K/V of sliding-window layers).

The shapes follow what transformers 5.x allocates in ``DynamicCache(config=...)`` (checked against real tensors in
``tests/test_costs.py``): on its torch paths the conv states are kept in the model dtype and the recurrent states in
float32, hence the separate ``recurrent_dtype``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hf_marconi.store import StateSizes

DTYPE_BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1}


def dtype_bytes(dtype: Any) -> int:
    """Bytes per element of a dtype given as a name ("bfloat16"), a torch dtype, or an int byte count."""
    if isinstance(dtype, int):
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPE_BYTES)} or a byte count")
    return DTYPE_BYTES[name]


@dataclass(frozen=True)
class LayerCost:
    """One part of a decoder layer.

    Attributes:
        kind: "attention" (incl. multi-head latent attention), "sliding_attention", "mamba1", "mamba2",
            "gated_delta_net", "kimi_delta_attention", "short_conv", "mlp" or "moe".
        flops_per_token: FLOPs per new token that do not depend on the prefix (projections, recurrent update, MLP).
        flops_per_pair: FLOPs per (query, key) pair (attention only).
        window: key window of a sliding-window layer, else None.
        kv_elements_per_token: K and V elements one token adds (full attention).
        conv_elements: conv state elements of one sequence.
        recurrent_elements: recurrent (SSM / delta-rule) state elements of one sequence.
    """

    kind: str
    flops_per_token: float
    flops_per_pair: float = 0.0
    window: int | None = None
    kv_elements_per_token: int = 0
    conv_elements: int = 0
    recurrent_elements: int = 0


def _pairs(prefix_len: int, extend_len: int) -> int:
    """(query, key) pairs when E tokens attend causally to a P-token prefix and to themselves."""
    return prefix_len * extend_len + extend_len * (extend_len + 1) // 2


def _window_pairs(prefix_len: int, extend_len: int, window: int) -> int:
    """Pairs when each token at position t sees min(t + 1, window) keys."""
    end = prefix_len + extend_len
    grow_end = min(end, window)  # positions t < window see t + 1 keys
    growing = 0
    if grow_end > prefix_len:
        growing = _pairs(prefix_len, grow_end - prefix_len)
    return growing + max(0, end - max(prefix_len, window)) * window


class CostModel:
    """Summed costs of a model's layers for one sequence (see the module docstring)."""

    def __init__(self, layers: tuple[LayerCost, ...], dtype: Any = "bfloat16", recurrent_dtype: Any = "float32",
                 name: str = ""):
        if not layers:
            raise ValueError("a cost model needs at least one layer")
        self.layers = layers
        self.name = name
        self.dtype_bytes = dtype_bytes(dtype)
        self.recurrent_dtype_bytes = dtype_bytes(recurrent_dtype)
        self._flops_per_token = sum(layer.flops_per_token for layer in layers)
        self._full_pair_flops = sum(l.flops_per_pair for l in layers if l.kind == "attention")
        windows: dict[int, float] = {}
        for layer in layers:
            if layer.kind == "sliding_attention":
                assert layer.window is not None
                windows[layer.window] = windows.get(layer.window, 0.0) + layer.flops_per_pair
        self._window_pair_flops = tuple(sorted(windows.items()))

    def extend_flops(self, prefix_len: int, extend_len: int) -> float:
        """Forward FLOPs to extend a cached ``prefix_len``-token prefix by ``extend_len`` tokens."""
        if prefix_len < 0 or extend_len < 0:
            raise ValueError(f"lengths must be >= 0, got prefix_len={prefix_len}, extend_len={extend_len}")
        flops = self._flops_per_token * extend_len + self._full_pair_flops * _pairs(prefix_len, extend_len)
        for window, per_pair in self._window_pair_flops:
            flops += per_pair * _window_pairs(prefix_len, extend_len, window)
        return float(flops)

    @property
    def kv_bytes_per_token(self) -> int:
        return sum(l.kv_elements_per_token for l in self.layers if l.kind == "attention") * self.dtype_bytes

    @property
    def checkpoint_bytes(self) -> int:
        conv = sum(l.conv_elements for l in self.layers) * self.dtype_bytes
        recurrent = sum(l.recurrent_elements for l in self.layers) * self.recurrent_dtype_bytes
        window_kv = sum(
            l.kv_elements_per_token * (l.window or 0) for l in self.layers if l.kind == "sliding_attention"
        ) * self.dtype_bytes
        return conv + recurrent + window_kv

    def state_sizes(self) -> StateSizes:
        return StateSizes(kv_bytes_per_token=self.kv_bytes_per_token, checkpoint_bytes=self.checkpoint_bytes)

    def count(self, kind: str) -> int:
        return sum(1 for layer in self.layers if layer.kind == kind)

    def __repr__(self) -> str:
        kinds = sorted({l.kind for l in self.layers})
        counts = ", ".join(f"{self.count(k)} {k}" for k in kinds)
        return (f"CostModel({self.name or 'model'}: {counts}; {self.kv_bytes_per_token} KV bytes/token, "
                f"{self.checkpoint_bytes} checkpoint bytes)")


# ------------------------------------------------------------------------------------------------ layer parts
def attention(hidden: int, q_heads: int, kv_heads: int, head_dim: int, window: int | None = None,
              input_dim: int | None = None, gated_output: bool = False) -> LayerCost:
    """Multi-head attention with grouped KV heads. ``input_dim`` is the width the projections read (Zamba2's shared
    block reads the concatenation of two streams); ``gated_output`` adds an output gate as wide as the queries
    (Qwen3-Next)."""
    width = input_dim or hidden
    q_out = q_heads * head_dim * (2 if gated_output else 1)
    projections = 2 * width * (q_out + 2 * kv_heads * head_dim) + 2 * q_heads * head_dim * hidden
    return LayerCost(
        kind="sliding_attention" if window is not None else "attention",
        flops_per_token=projections,
        flops_per_pair=4 * q_heads * head_dim,
        window=window,
        kv_elements_per_token=2 * kv_heads * head_dim,
    )


def mamba1(hidden: int, inner: int, state: int, conv_kernel: int, dt_rank: int) -> LayerCost:
    """Mamba (selective scan). Per token: in_proj to 2 * inner, depthwise conv, x_proj to dt_rank + 2 * state, dt_proj,
    the scan (about 8 FLOPs per channel and state: discretise, decay, input, readout) and out_proj."""
    flops = (2 * hidden * 2 * inner + 2 * inner * conv_kernel + 2 * inner * (dt_rank + 2 * state)
             + 2 * dt_rank * inner + 8 * inner * state + 2 * inner * hidden)
    return LayerCost("mamba1", flops, conv_elements=inner * conv_kernel, recurrent_elements=inner * state)


def mamba2(hidden: int, heads: int, head_dim: int, groups: int, state: int, conv_kernel: int) -> LayerCost:
    """Mamba2 / SSD. Per token: in_proj to (z, x, B, C, dt), depthwise conv over x, B, C, the state update and readout
    (about 5 FLOPs per channel and state: decay, input outer product, readout) and out_proj."""
    inner = heads * head_dim
    conv_dim = inner + 2 * groups * state
    flops = (2 * hidden * (2 * inner + 2 * groups * state + heads) + 2 * conv_dim * conv_kernel
             + 5 * inner * state + 2 * inner * hidden)
    return LayerCost("mamba2", flops, conv_elements=conv_dim * conv_kernel, recurrent_elements=inner * state)


def gated_delta_net(hidden: int, key_heads: int, value_heads: int, key_dim: int, value_dim: int,
                    conv_kernel: int) -> LayerCost:
    """Gated delta net (Qwen3-Next). Per token: in_proj to q, k, v, z and the two gates, depthwise conv over q, k, v,
    the delta-rule update of each value head's key_dim x value_dim state (decay, k^T S, rank-1 update, q S: about 7
    FLOPs per state element) and out_proj."""
    keys, values = key_heads * key_dim, value_heads * value_dim
    conv_dim = 2 * keys + values
    flops = (2 * hidden * (2 * keys + 2 * values + 2 * value_heads) + 2 * conv_dim * conv_kernel
             + 7 * value_heads * key_dim * value_dim + 2 * values * hidden)
    return LayerCost("gated_delta_net", flops, conv_elements=conv_dim * conv_kernel,
                     recurrent_elements=value_heads * key_dim * value_dim)


def mla_attention(hidden: int, heads: int, kv_lora_rank: int, qk_nope_dim: int, qk_rope_dim: int, v_dim: int,
                  q_lora_rank: int | None = None) -> LayerCost:
    """Multi-head latent attention (DeepSeek-V2 style, Kimi-Linear). The cache holds, per token, the compressed latent
    (``kv_lora_rank``) and the shared rotary key (``qk_rope_dim``), one "head" each. Per token: the query projection
    (direct or through ``q_lora_rank``), the latent projection, the latent's up-projection to per-head keys and values,
    and the output projection; per (query, key) pair the scores over ``qk_nope_dim + qk_rope_dim`` and the weighted
    sum over ``v_dim``, in every head.

    transformers' torch path re-expands the whole cached latent every forward (a cost linear in the prefix length
    that an absorbed-weight kernel avoids); it is not counted, so extending in pieces costs the same as at once."""
    qk_dim = qk_nope_dim + qk_rope_dim
    if q_lora_rank:
        query = 2 * hidden * q_lora_rank + 2 * q_lora_rank * heads * qk_dim
    else:
        query = 2 * hidden * heads * qk_dim
    latent = 2 * hidden * (kv_lora_rank + qk_rope_dim) + 2 * kv_lora_rank * heads * (qk_nope_dim + v_dim)
    return LayerCost(
        kind="attention",
        flops_per_token=query + latent + 2 * heads * v_dim * hidden,
        flops_per_pair=2 * heads * (qk_dim + v_dim),
        kv_elements_per_token=kv_lora_rank + qk_rope_dim,
    )


def kimi_delta_attention(hidden: int, heads: int, head_dim: int, conv_kernel: int) -> LayerCost:
    """Kimi delta attention (KDA). Per token: q, k, v projections, a depthwise short conv over each of them, the
    low-rank forget gate (hidden -> head_dim -> heads * head_dim) and output gate (same shape), the per-head beta,
    the delta-rule update of each head's head_dim x head_dim state with channel-wise decay (about 7 FLOPs per state
    element, as the gated delta net) and the output projection."""
    width = heads * head_dim
    conv_dim = 3 * width
    flops = (2 * hidden * conv_dim + 2 * conv_dim * conv_kernel + 2 * (2 * hidden * head_dim + 2 * head_dim * width)
             + 2 * hidden * heads + 7 * heads * head_dim * head_dim + 2 * width * hidden)
    return LayerCost("kimi_delta_attention", flops, conv_elements=conv_dim * conv_kernel,
                     recurrent_elements=heads * head_dim * head_dim)


def short_conv(hidden: int, cache_len: int) -> LayerCost:
    """Gated short convolution (LFM2): in_proj to 3 * hidden, depthwise conv over ``cache_len`` taps, out_proj."""
    flops = 2 * hidden * 3 * hidden + 2 * hidden * cache_len + 2 * hidden * hidden
    return LayerCost("short_conv", flops, conv_elements=hidden * cache_len)


def mlp(hidden: int, intermediate: int, gated: bool = True) -> LayerCost:
    """Dense MLP: gated (SwiGLU: gate, up, down) or plain (up, down)."""
    return LayerCost("mlp", 2 * hidden * intermediate * (3 if gated else 2))


def moe(hidden: int, experts: int, active: int, expert_intermediate: int, shared_intermediate: int = 0,
        gated: bool = True) -> LayerCost:
    """Mixture of experts counting only the ``active`` routed experts per token, the router and any shared expert."""
    per_expert = 2 * hidden * expert_intermediate * (3 if gated else 2)
    shared = 2 * hidden * shared_intermediate * (3 if gated else 2)
    return LayerCost("moe", 2 * hidden * experts + active * per_expert + shared)
