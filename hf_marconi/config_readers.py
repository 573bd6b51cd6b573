"""Per-family config readers: the parts (:class:`~hf_marconi.costs.LayerCost`) of every decoder layer a transformers
config of that family describes. Each family record (:mod:`hf_marconi.families`) names its reader."""

from __future__ import annotations

from typing import Any

from .costs import (
    LayerCost,
    attention,
    gated_delta_net,
    kimi_delta_attention,
    mamba1,
    mamba2,
    mla_attention,
    mlp,
    moe,
    short_conv,
)


# --------------------------------------------------------------------------------------------- families
def _gqa(config: Any, head_dim: int | None = None, **kwargs) -> LayerCost:
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    dim = head_dim or getattr(config, "head_dim", None) or config.hidden_size // heads
    return attention(config.hidden_size, heads, kv_heads, dim, **kwargs)


def llama_layers(config: Any) -> list[LayerCost]:
    window = getattr(config, "sliding_window", None)
    out = []
    for _ in range(config.num_hidden_layers):
        out += [_gqa(config, window=window), mlp(config.hidden_size, config.intermediate_size)]
    return out


def jamba_layers(config: Any) -> list[LayerCost]:
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


def bamba_layers(config: Any) -> list[LayerCost]:
    out = []
    for kind in config.layers_block_type:
        if kind == "full_attention":
            out.append(_gqa(config))
        else:
            out.append(_mamba2_of(config, config.mamba_expand * config.hidden_size, "mamba_n_heads", "mamba_d_head",
                                  "mamba_n_groups", "mamba_d_state", "mamba_d_conv"))
        out.append(mlp(config.hidden_size, config.intermediate_size))
    return out


def granitemoehybrid_layers(config: Any) -> list[LayerCost]:
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


def falcon_h1_layers(config: Any) -> list[LayerCost]:
    inner = config.mamba_d_ssm or config.mamba_expand * config.hidden_size
    out = []
    for _ in range(config.num_hidden_layers):  # attention and Mamba2 run side by side in every layer
        out.append(_gqa(config))
        out.append(_mamba2_of(config, inner, "mamba_n_heads", "mamba_d_head", "mamba_n_groups", "mamba_d_state",
                              "mamba_d_conv"))
        out.append(mlp(config.hidden_size, config.intermediate_size))
    return out


def zamba2_layers(config: Any) -> list[LayerCost]:
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


def nemotron_h_layers(config: Any) -> list[LayerCost]:
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


def gated_delta_layers(config: Any) -> list[LayerCost]:
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


def lfm2_layers(config: Any) -> list[LayerCost]:
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


def kimi_linear_layers(config: Any) -> list[LayerCost]:
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


def mamba2_model_layers(config: Any) -> list[LayerCost]:
    return [mamba2(config.hidden_size, config.num_heads, config.head_dim, config.n_groups, config.state_size,
                   config.conv_kernel) for _ in range(config.num_hidden_layers)]
