"""FLOPs and bytes of a hybrid model, derived from its transformers config (no torch, no weights).

For every decoder layer the config describes, :func:`layer_costs` lists its parts (attention, a recurrent mixer, an
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
from typing import Any, Callable

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

    @classmethod
    def from_config(cls, config: Any, dtype: Any = "bfloat16", recurrent_dtype: Any = "float32") -> "CostModel":
        """The cost model of a transformers config (a ``PretrainedConfig`` of a supported family)."""
        return cls(layer_costs(config), dtype=dtype, recurrent_dtype=recurrent_dtype,
                   name=getattr(config, "model_type", ""))


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


# --------------------------------------------------------------------------------------------- families
def _gqa(config: Any, head_dim: int | None = None, **kwargs) -> LayerCost:
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    dim = head_dim or getattr(config, "head_dim", None) or config.hidden_size // heads
    return attention(config.hidden_size, heads, kv_heads, dim, **kwargs)


def _llama(config: Any) -> list[LayerCost]:
    window = getattr(config, "sliding_window", None)
    out = []
    for _ in range(config.num_hidden_layers):
        out += [_gqa(config, window=window), mlp(config.hidden_size, config.intermediate_size)]
    return out


def _jamba(config: Any) -> list[LayerCost]:
    hidden, inner = config.hidden_size, config.mamba_expand * config.hidden_size
    out = []
    for kind, experts in zip(config.layer_types, config.layers_num_experts):
        if kind == "full_attention":
            out.append(_gqa(config))
        else:
            out.append(mamba1(hidden, inner, config.mamba_d_state, config.mamba_d_conv, config.mamba_dt_rank))
        if experts > 1:
            out.append(moe(hidden, experts, config.num_experts_per_tok, config.intermediate_size))
        else:
            out.append(mlp(hidden, config.intermediate_size))
    return out


def _mamba2_of(config: Any, inner: int, heads_attr: str, head_dim_attr: str, groups_attr: str, state_attr: str,
               conv_attr: str) -> LayerCost:
    heads = getattr(config, heads_attr)
    head_dim = getattr(config, head_dim_attr, None) or inner // heads
    return mamba2(config.hidden_size, heads, head_dim, getattr(config, groups_attr), getattr(config, state_attr),
                  getattr(config, conv_attr))


def _bamba(config: Any) -> list[LayerCost]:
    out = []
    for kind in config.layers_block_type:
        if kind == "full_attention":
            out.append(_gqa(config))
        else:
            out.append(_mamba2_of(config, config.mamba_expand * config.hidden_size, "mamba_n_heads", "mamba_d_head",
                                  "mamba_n_groups", "mamba_d_state", "mamba_d_conv"))
        out.append(mlp(config.hidden_size, config.intermediate_size))
    return out


def _granitemoehybrid(config: Any) -> list[LayerCost]:
    out = []
    for kind in config.layer_types:
        if kind == "full_attention":
            out.append(_gqa(config))
        else:
            out.append(_mamba2_of(config, config.mamba_expand * config.hidden_size, "mamba_n_heads", "mamba_d_head",
                                  "mamba_n_groups", "mamba_d_state", "mamba_d_conv"))
        experts = getattr(config, "num_local_experts", 0)
        shared = getattr(config, "shared_intermediate_size", 0)
        if experts:
            out.append(moe(config.hidden_size, experts, config.num_experts_per_tok, config.intermediate_size, shared))
        else:
            out.append(mlp(config.hidden_size, shared))
    return out


def _falcon_h1(config: Any) -> list[LayerCost]:
    inner = config.mamba_d_ssm or config.mamba_expand * config.hidden_size
    out = []
    for _ in range(config.num_hidden_layers):  # attention and Mamba2 run side by side in every layer
        out.append(_gqa(config))
        out.append(_mamba2_of(config, inner, "mamba_n_heads", "mamba_d_head", "mamba_n_groups", "mamba_d_state",
                              "mamba_d_conv"))
        out.append(mlp(config.hidden_size, config.intermediate_size))
    return out


def _zamba2(config: Any) -> list[LayerCost]:
    hidden = config.hidden_size
    inner = config.mamba_expand * hidden
    out = []
    for kind in config.layers_block_type:
        if kind == "hybrid":  # the shared transformer block reads [hidden, embeddings] (2 * hidden) before the mixer
            out.append(_gqa(config, head_dim=config.attention_head_dim, input_dim=2 * hidden))
            out.append(mlp(hidden, config.intermediate_size))
        out.append(mamba2(hidden, config.n_mamba_heads, inner // config.n_mamba_heads, config.mamba_ngroups,
                          config.mamba_d_state, config.mamba_d_conv))
    return out


def _nemotron_h(config: Any) -> list[LayerCost]:
    hidden = config.hidden_size
    out = []
    for kind in config.layer_types:
        if kind == "full_attention":
            out.append(_gqa(config))
        elif kind == "linear_attention":
            out.append(mamba2(hidden, config.mamba_num_heads, config.mamba_head_dim, config.n_groups,
                              config.ssm_state_size, config.conv_kernel))
        elif kind == "mlp":  # squared-ReLU MLP: up and down projections only
            out.append(mlp(hidden, config.intermediate_size, gated=False))
        elif kind == "moe":
            shared = getattr(config, "moe_shared_expert_intermediate_size", 0) * getattr(config, "n_shared_experts", 1)
            out.append(moe(hidden, config.n_routed_experts, config.num_experts_per_tok, config.moe_intermediate_size,
                           shared, gated=False))
        else:
            raise ValueError(f"unsupported Nemotron-H layer kind {kind!r}")
    return out


def _gated_delta_family(config: Any) -> list[LayerCost]:
    """Qwen3-Next, Qwen3.5 text and OLMo-hybrid: gated delta net + gated full attention."""
    hidden = config.hidden_size
    experts = getattr(config, "num_experts", 0) or 0
    mlp_only = set(getattr(config, "mlp_only_layers", None) or ())
    sparse_step = getattr(config, "decoder_sparse_step", 1) or 1
    gated_attention = config.model_type in ("qwen3_next", "qwen3_5_text")
    out = []
    for i, kind in enumerate(config.layer_types):
        if kind == "full_attention":
            out.append(_gqa(config, gated_output=gated_attention))
        else:
            out.append(gated_delta_net(hidden, config.linear_num_key_heads, config.linear_num_value_heads,
                                       config.linear_key_head_dim, config.linear_value_head_dim,
                                       config.linear_conv_kernel_dim))
        if experts and i not in mlp_only and (i + 1) % sparse_step == 0:
            out.append(moe(hidden, experts, config.num_experts_per_tok, config.moe_intermediate_size,
                           getattr(config, "shared_expert_intermediate_size", 0)))
        else:
            out.append(mlp(hidden, config.intermediate_size))
    return out


def _lfm2(config: Any) -> list[LayerCost]:
    intermediate = config.intermediate_size
    if config.block_auto_adjust_ff_dim:  # as Lfm2MLP sizes its projections
        intermediate = int(2 * intermediate / 3)
        if config.block_ffn_dim_multiplier is not None:
            intermediate = int(config.block_ffn_dim_multiplier * intermediate)
            multiple = config.block_multiple_of
            intermediate = multiple * ((intermediate + multiple - 1) // multiple)
    out = []
    for kind in config.layer_types:
        out.append(_gqa(config) if kind == "full_attention" else short_conv(config.hidden_size, config.conv_L_cache))
        out.append(mlp(config.hidden_size, intermediate))
    return out


def _kimi_linear(config: Any) -> list[LayerCost]:
    """Kimi-Linear: MLA full attention and KDA linear attention; dense MLP or MoE (with shared experts) per layer."""
    hidden = config.hidden_size
    out = []
    for kind, mlp_kind in zip(config.layer_types, config.mlp_layer_types):
        if kind == "full_attention":
            out.append(mla_attention(hidden, config.num_attention_heads, config.kv_lora_rank, config.qk_nope_head_dim,
                                     config.qk_rope_head_dim, config.v_head_dim, config.q_lora_rank))
        else:
            out.append(kimi_delta_attention(hidden, config.linear_num_heads, config.linear_head_dim,
                                            config.linear_conv_kernel_dim))
        if mlp_kind == "sparse":
            out.append(moe(hidden, config.num_local_experts, config.num_experts_per_tok, config.moe_intermediate_size,
                           config.moe_intermediate_size * config.n_shared_experts))
        else:
            out.append(mlp(hidden, config.intermediate_size))
    return out


def _mamba2_model(config: Any) -> list[LayerCost]:
    return [mamba2(config.hidden_size, config.num_heads, config.head_dim, config.n_groups, config.state_size,
                   config.conv_kernel) for _ in range(config.num_hidden_layers)]


FAMILY_LAYERS: dict[str, Callable[[Any], list[LayerCost]]] = {
    "llama": _llama,
    "jamba": _jamba,
    "bamba": _bamba,
    "granitemoehybrid": _granitemoehybrid,
    "falcon_h1": _falcon_h1,
    "zamba2": _zamba2,
    "nemotron_h": _nemotron_h,
    "qwen3_next": _gated_delta_family,
    "qwen3_5_text": _gated_delta_family,
    "olmo_hybrid": _gated_delta_family,
    "lfm2": _lfm2,
    "kimi_linear": _kimi_linear,
    "mamba2": _mamba2_model,
}


def layer_costs(config: Any) -> tuple[LayerCost, ...]:
    """The parts of every decoder layer of ``config`` (a transformers config of a supported family)."""
    text_config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    model_type = getattr(text_config, "model_type", None)
    if model_type not in FAMILY_LAYERS:
        raise ValueError(
            f"no cost model for model_type {model_type!r}; supported: {sorted(FAMILY_LAYERS)}. "
            "Build a CostModel from LayerCost records (hf_marconi.costs.attention, mamba2, mlp, ...) instead."
        )
    return tuple(FAMILY_LAYERS[model_type](text_config))


# ------------------------------------------------------------------------------------------------- presets
def _paper_7b_config() -> Any:
    """The Marconi paper's 7B Attention-Mamba2 hybrid: 4 attention, 24 Mamba2 and 28 MLP layers, d_model 4096,
    SSM state 128 (the layer mix of NVIDIA's Mamba-2-Hybrid, arXiv 2406.07887), as a Nemotron-H config.

    Sized like the paper's cost model: multi-head attention (32 KV heads of 128: 64 KiB of fp16 KV per token over
    the 4 layers) and an SSM state of d_model x 128 per layer (expand 1), so one checkpoint is ~26 MB, about 400
    tokens of KV, as the paper states. MLP width 16384 (4 x d_model), squared ReLU."""
    import transformers

    mamba, attn, ffn = "linear_attention", "full_attention", "mlp"
    # 56 layers: a Mamba2 or attention mixer then an MLP; attention at mixers 6, 12, 18, 24 (of 28).
    mixers = [attn if (i + 1) % 7 == 0 else mamba for i in range(28)]
    layer_types = [kind for mixer in mixers for kind in (mixer, ffn)]
    return transformers.NemotronHConfig(
        vocab_size=32000, hidden_size=4096, layers_block_type=layer_types, num_hidden_layers=len(layer_types),
        num_attention_heads=32, num_key_value_heads=32, head_dim=128, intermediate_size=16384,
        mamba_num_heads=64, mamba_head_dim=64, n_groups=1, ssm_state_size=128, conv_kernel=4, expand=1,
    )


def _jamba_1_5_mini() -> Any:
    # ai21labs/AI21-Jamba-1.5-Mini config.json: 32 layers, attention every 8th (offset 4), MoE every 2nd (offset 1)
    # with 16 experts, top-2.
    import transformers

    return transformers.JambaConfig(
        vocab_size=65536, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, attn_layer_period=8, attn_layer_offset=4, expert_layer_period=2,
        expert_layer_offset=1, num_experts=16, num_experts_per_tok=2, mamba_d_state=16, mamba_d_conv=4,
        mamba_expand=2, mamba_dt_rank=256,
    )


def _bamba_9b() -> Any:
    # ibm-ai-platform/Bamba-9B config.json: 32 layers, attention at 9, 18, 27; Mamba2 with 128 heads of 64, state 128.
    import transformers

    return transformers.BambaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, attn_layer_indices=[9, 18, 27], mamba_n_heads=128, mamba_d_head=64,
        mamba_n_groups=1, mamba_d_state=128, mamba_d_conv=4, mamba_expand=2,
    )


def _zamba2_7b() -> Any:
    # Zyphra/Zamba2-7B: d_model 3584, 81 Mamba2 layers (112 heads, 2 groups, state 64), 32 attention heads in the two
    # shared blocks (head dim 2 * 3584 / 32 = 224). The shared block is applied every 6th layer here (13 hybrid
    # layers), an approximation of the published layer list.
    import transformers

    layer_types = ["hybrid" if i % 6 == 5 else "mamba" for i in range(81)]
    return transformers.Zamba2Config(
        vocab_size=32000, hidden_size=3584, intermediate_size=14336, num_hidden_layers=81, num_attention_heads=32,
        num_key_value_heads=32, layers_block_type=layer_types, mamba_d_state=64, mamba_d_conv=4, mamba_expand=2,
        n_mamba_heads=112, mamba_ngroups=2, num_mem_blocks=2,
    )


def _nemotron_h_8b() -> Any:
    # nvidia/Nemotron-H-8B-Base-8K: 52 layers "M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-" (M Mamba2,
    # * attention, - squared-ReLU MLP); 32 heads, 8 KV heads of 128; Mamba2 128 heads of 64, 8 groups, state 128.
    import transformers

    pattern = "M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-"
    kinds = {"M": "linear_attention", "*": "full_attention", "-": "mlp"}
    return transformers.NemotronHConfig(
        vocab_size=131072, hidden_size=4096, layers_block_type=[kinds[c] for c in pattern],
        num_hidden_layers=len(pattern), num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        intermediate_size=21504, mamba_num_heads=128, mamba_head_dim=64, n_groups=8, ssm_state_size=128,
        conv_kernel=4, expand=2,
    )


def _falcon_h1_7b() -> Any:
    # tiiuae/Falcon-H1-7B-Base (transformers' FalconH1 docs table): 44 layers, d_model 3072, 12 attention heads,
    # 2 KV heads, head dim 128; 24 Mamba2 heads of 128 (d_ssm 3072), state 256.
    import transformers

    return transformers.FalconH1Config(
        vocab_size=130049, hidden_size=3072, intermediate_size=12288, num_hidden_layers=44, num_attention_heads=12,
        num_key_value_heads=2, head_dim=128, mamba_d_ssm=3072, mamba_n_heads=24, mamba_d_head=128,
        mamba_n_groups=1, mamba_d_state=256, mamba_d_conv=4, mamba_expand=2,
    )


def _qwen3_next_80b_a3b() -> Any:
    # Qwen/Qwen3-Next-80B-A3B-Instruct config.json: 48 layers, full attention every 4th (16 heads, 2 KV heads of 256),
    # gated delta net (16 key heads, 32 value heads, 128 dims); 512 experts, 10 active, expert width 512, one shared.
    import transformers

    return transformers.Qwen3NextConfig(
        vocab_size=151936, hidden_size=2048, intermediate_size=5120, num_hidden_layers=48, num_attention_heads=16,
        num_key_value_heads=2, head_dim=256, full_attention_interval=4, linear_conv_kernel_dim=4,
        linear_key_head_dim=128, linear_value_head_dim=128, linear_num_key_heads=16, linear_num_value_heads=32,
        num_experts=512, num_experts_per_tok=10, moe_intermediate_size=512, shared_expert_intermediate_size=512,
    )


PRESETS: dict[str, Callable[[], Any]] = {
    "paper-7b-hybrid": _paper_7b_config,
    "jamba-1.5-mini": _jamba_1_5_mini,
    "bamba-9b": _bamba_9b,
    "zamba2-7b": _zamba2_7b,
    "nemotron-h-8b": _nemotron_h_8b,
    "falcon-h1-7b": _falcon_h1_7b,
    "qwen3-next-80b-a3b": _qwen3_next_80b_a3b,
}


def preset_config(name: str) -> Any:
    """The transformers config object of a preset (built locally, nothing downloaded)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()


def preset(name: str, dtype: Any = "bfloat16", recurrent_dtype: Any | None = None) -> CostModel:
    """The cost model of a preset. ``recurrent_dtype`` defaults to float32 (as transformers keeps recurrent states),
    except for "paper-7b-hybrid", whose states are all in ``dtype`` as in the paper's cost model (fp16)."""
    if recurrent_dtype is None:
        recurrent_dtype = dtype if name == "paper-7b-hybrid" else "float32"
    model = CostModel.from_config(preset_config(name), dtype=dtype, recurrent_dtype=recurrent_dtype)
    model.name = name
    return model
