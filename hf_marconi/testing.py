"""A zoo of tiny models of every hybrid family transformers ships, built from configs with random weights.

Every model is small enough to run a forward pass on a CPU in milliseconds (hidden size 64, vocabulary 256),
yet uses the family's real config and model classes, so ``DynamicCache(config=model.config)`` allocates the
family's real cache layer kinds (``DynamicLayer``, ``LinearAttentionLayer``,
``LinearAttentionAndFullAttentionLayer``, ...). Where the family allows, each model has at least two attention
(or hybrid) layers and two recurrent layers, and SSD scan chunks are short (8 tokens) so that continuations
split off the chunk grid are cheap to test.

Nothing is downloaded. Use::

    from hf_marconi.testing import FAMILIES, build_model, is_supported
    model = build_model("bamba", dtype=torch.float64)

``FAMILIES`` lists the families the installed transformers ships (``ALL_FAMILIES`` every family the zoo
knows); ``is_supported(family)`` tells whether hf_marconi caches that family or refuses it
(``hf_marconi.fixes.check_supported`` says why).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import transformers
from transformers import PretrainedConfig, PreTrainedModel

VOCAB_SIZE = 256
HIDDEN_SIZE = 64
SSD_CHUNK_SIZE = 8
# The gated-delta-rule and KDA torch paths scan in chunks of 64 tokens; the size is not configurable.
DELTA_RULE_CHUNK_SIZE = 64
# Weight std. transformers' usual 0.02 leaves the recurrent state's effect on the logits of these tiny models at
# ~1e-6 (Mamba2 families), too small for a float32 test to notice a lost state; at 0.1 it is >= 6e-4.
INITIALIZER_RANGE = 0.1


@dataclass(frozen=True)
class FamilySpec:
    """How to build the tiny model of one family and what to expect from it.

    ``scan_chunk_size`` is the chunk length of the family's chunked scan on the torch path (None: the recurrent
    layers have no chunked scan, e.g. Mamba1 or a short convolution). ``scan_casts_to_float32`` is True when the
    torch multi-token path of the recurrent layers computes in float32 even in a float64 model (the SSD chunk
    scan and the gated-delta-rule / KDA chunk scans cast their inputs with ``.float()``), so a float64
    continuation agrees with a full forward only to float32 precision. ``decode_casts_to_float32`` is the same
    for the single-token decode path (state update in float32). Both are transformers' choices, not bugs.
    ``cache_argument`` is the keyword the model's forward takes its cache under (Mamba2 models: ``cache_params``).
    """

    name: str
    config_class: str
    model_class: str
    config_kwargs: dict[str, Any]
    recurrent_kind: str | None
    scan_chunk_size: int | None
    scan_casts_to_float32: bool
    decode_casts_to_float32: bool
    cache_argument: str = "past_key_values"
    notes: str = field(default="")


_COMMON = dict(vocab_size=VOCAB_SIZE, hidden_size=HIDDEN_SIZE, pad_token_id=0, bos_token_id=1, eos_token_id=2,
               initializer_range=INITIALIZER_RANGE)
_ATTENTION = dict(num_attention_heads=4, num_key_value_heads=2)
# Mamba2 (SSD) mixers: 8 heads of 16 channels over an expanded width of 128, a 16-dim state, short chunks.
_MAMBA2 = dict(mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=1, mamba_d_state=16, mamba_d_conv=4,
               mamba_expand=2, mamba_chunk_size=SSD_CHUNK_SIZE)
# Gated delta net mixers (Qwen3-Next, Qwen3.5, OLMo-hybrid).
_DELTA_NET = dict(linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=16,
                  linear_num_key_heads=2, linear_num_value_heads=4)

_SPECS: tuple[FamilySpec, ...] = (
    FamilySpec(
        name="jamba",
        config_class="JambaConfig",
        model_class="JambaForCausalLM",
        config_kwargs=dict(
            _COMMON, **_ATTENTION, intermediate_size=128, num_hidden_layers=4,
            attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1,
            num_experts=2, num_experts_per_tok=1,
            mamba_d_state=16, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=8,
        ),
        recurrent_kind="mamba1",
        scan_chunk_size=None,
        scan_casts_to_float32=False,
        decode_casts_to_float32=True,
    ),
    FamilySpec(
        name="bamba",
        config_class="BambaConfig",
        model_class="BambaForCausalLM",
        config_kwargs=dict(_COMMON, **_ATTENTION, **_MAMBA2, intermediate_size=128, num_hidden_layers=4,
                           attn_layer_indices=[1, 3]),
        recurrent_kind="mamba2",
        scan_chunk_size=SSD_CHUNK_SIZE,
        scan_casts_to_float32=True,
        decode_casts_to_float32=True,
    ),
    FamilySpec(
        name="zamba2",
        config_class="Zamba2Config",
        model_class="Zamba2ForCausalLM",
        config_kwargs=dict(
            _COMMON, **_ATTENTION, intermediate_size=128,
            num_hidden_layers=4, layers_block_type=["mamba", "hybrid", "mamba", "hybrid"],
            mamba_d_state=16, mamba_d_conv=4, mamba_expand=2, mamba_ngroups=1, n_mamba_heads=8,
            chunk_size=SSD_CHUNK_SIZE, num_mem_blocks=1, adapter_rank=8,
        ),
        recurrent_kind="mamba2",
        scan_chunk_size=SSD_CHUNK_SIZE,
        scan_casts_to_float32=True,
        decode_casts_to_float32=True,
        notes="hybrid layers: a shared attention block followed by a Mamba2 mixer",
    ),
    FamilySpec(
        name="falcon_h1",
        config_class="FalconH1Config",
        model_class="FalconH1ForCausalLM",
        config_kwargs=dict(_COMMON, **_ATTENTION, **_MAMBA2, intermediate_size=128, num_hidden_layers=2,
                           mamba_d_ssm=128, head_dim=16),
        recurrent_kind="mamba2",
        scan_chunk_size=SSD_CHUNK_SIZE,
        scan_casts_to_float32=True,
        decode_casts_to_float32=True,
        notes="every layer runs attention and a Mamba2 mixer in parallel",
    ),
    FamilySpec(
        name="granitemoehybrid",
        config_class="GraniteMoeHybridConfig",
        model_class="GraniteMoeHybridForCausalLM",
        config_kwargs=dict(
            _COMMON, **_ATTENTION, **_MAMBA2, intermediate_size=128, shared_intermediate_size=128,
            num_hidden_layers=4, layer_types=["mamba", "attention", "mamba", "attention"],
            num_local_experts=2, num_experts_per_tok=1, position_embedding_type="rope",
        ),
        recurrent_kind="mamba2",
        scan_chunk_size=SSD_CHUNK_SIZE,
        scan_casts_to_float32=True,
        decode_casts_to_float32=True,
    ),
    FamilySpec(
        name="nemotron_h",
        config_class="NemotronHConfig",
        model_class="NemotronHForCausalLM",
        config_kwargs=dict(
            _COMMON, **_ATTENTION, head_dim=16, intermediate_size=128,
            # Mamba, attention, MLP, twice; MLP blocks are layers of their own (a DummyLayer in the cache). The
            # pattern string is the checkpoint format every transformers 5.x reads (layer type names changed).
            # MLP rather than MoE ("E"): Nemotron-H routes in float32, which would add float32 noise to float64.
            hybrid_override_pattern="M*-M*-",
            num_hidden_layers=6,
            ssm_state_size=16, mamba_num_heads=8, mamba_head_dim=16, n_groups=1, conv_kernel=4, expand=2,
            chunk_size=SSD_CHUNK_SIZE,
        ),
        recurrent_kind="mamba2",
        scan_chunk_size=SSD_CHUNK_SIZE,
        scan_casts_to_float32=True,
        decode_casts_to_float32=True,
    ),
    FamilySpec(
        name="qwen3_next",
        config_class="Qwen3NextConfig",
        model_class="Qwen3NextForCausalLM",
        config_kwargs=dict(
            _COMMON, **_ATTENTION, **_DELTA_NET, head_dim=16, intermediate_size=128, num_hidden_layers=4,
            layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, shared_expert_intermediate_size=64,
        ),
        recurrent_kind="gated_delta_net",
        scan_chunk_size=DELTA_RULE_CHUNK_SIZE,
        scan_casts_to_float32=True,
        decode_casts_to_float32=True,
    ),
    FamilySpec(
        name="lfm2",
        config_class="Lfm2Config",
        model_class="Lfm2ForCausalLM",
        config_kwargs=dict(
            _COMMON, **_ATTENTION, intermediate_size=128, block_auto_adjust_ff_dim=False, num_hidden_layers=4,
            layer_types=["conv", "full_attention", "conv", "full_attention"], conv_L_cache=3,
        ),
        recurrent_kind="short_conv",
        scan_chunk_size=None,
        scan_casts_to_float32=False,
        decode_casts_to_float32=False,
    ),
    FamilySpec(
        name="olmo_hybrid",
        config_class="OlmoHybridConfig",
        model_class="OlmoHybridForCausalLM",
        config_kwargs=dict(
            _COMMON, **_ATTENTION, **_DELTA_NET, intermediate_size=128, num_hidden_layers=4,
            layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
        ),
        recurrent_kind="gated_delta_net",
        scan_chunk_size=DELTA_RULE_CHUNK_SIZE,
        scan_casts_to_float32=True,
        decode_casts_to_float32=True,
    ),
    FamilySpec(
        name="kimi_linear",
        config_class="KimiLinearConfig",
        model_class="KimiLinearForCausalLM",
        config_kwargs=dict(
            _COMMON, num_attention_heads=4, num_key_value_heads=4, intermediate_size=128,
            moe_intermediate_size=64, num_hidden_layers=4,
            layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
            mlp_layer_types=["dense", "sparse", "dense", "sparse"], num_local_experts=4, num_experts_per_tok=2,
            kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
            linear_head_dim=16, linear_num_heads=4, linear_conv_kernel_dim=4,
        ),
        recurrent_kind="kimi_delta_attention",
        scan_chunk_size=DELTA_RULE_CHUNK_SIZE,
        scan_casts_to_float32=True,
        decode_casts_to_float32=True,
    ),
    FamilySpec(
        name="qwen3_5",
        config_class="Qwen3_5TextConfig",
        model_class="Qwen3_5ForCausalLM",
        config_kwargs=dict(
            _COMMON, **_ATTENTION, **_DELTA_NET, head_dim=16, intermediate_size=128, num_hidden_layers=4,
            layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
        ),
        recurrent_kind="gated_delta_net",
        scan_chunk_size=DELTA_RULE_CHUNK_SIZE,
        scan_casts_to_float32=True,
        decode_casts_to_float32=True,
        notes="the text model of Qwen3.5",
    ),
    FamilySpec(
        name="llama",
        config_class="LlamaConfig",
        model_class="LlamaForCausalLM",
        config_kwargs=dict(_COMMON, **_ATTENTION, intermediate_size=128, num_hidden_layers=2),
        recurrent_kind=None,
        scan_chunk_size=None,
        scan_casts_to_float32=False,
        decode_casts_to_float32=False,
        notes="control: pure attention",
    ),
    FamilySpec(
        name="mamba2",
        config_class="Mamba2Config",
        model_class="Mamba2ForCausalLM",
        config_kwargs=dict(
            _COMMON, num_hidden_layers=2, num_heads=8, head_dim=16, state_size=16, expand=2, n_groups=1,
            conv_kernel=4, chunk_size=SSD_CHUNK_SIZE,
        ),
        recurrent_kind="mamba2",
        scan_chunk_size=SSD_CHUNK_SIZE,
        scan_casts_to_float32=True,
        decode_casts_to_float32=True,
        cache_argument="cache_params",
        notes="control: pure Mamba2",
    ),
)

SPECS: dict[str, FamilySpec] = {spec.name: spec for spec in _SPECS}
# Every family the zoo knows, whether or not the installed transformers ships it.
ALL_FAMILIES: tuple[str, ...] = tuple(SPECS)


def family_spec(family: str) -> FamilySpec:
    """The spec of ``family``; raises KeyError naming the known families."""
    try:
        return SPECS[family]
    except KeyError:
        raise KeyError(f"Unknown family {family!r}; the zoo has {', '.join(ALL_FAMILIES)}.") from None


def is_available(family: str) -> bool:
    """Whether the installed transformers ships the config and model classes of ``family``."""
    spec = family_spec(family)
    return hasattr(transformers, spec.config_class) and hasattr(transformers, spec.model_class)


# The families the installed transformers ships (Kimi-Linear needs transformers >= 5.17): what to iterate over.
FAMILIES: tuple[str, ...] = tuple(family for family in ALL_FAMILIES if is_available(family))


def is_supported(family: str) -> bool:
    """Whether hf_marconi caches ``family`` on the installed transformers (``check_supported`` accepts it)."""
    from hf_marconi.fixes import UnsupportedModelError, check_supported

    try:
        check_supported(make_config(family))
    except UnsupportedModelError:
        return False
    return True


def make_config(family: str) -> PretrainedConfig:
    """A fresh tiny config of ``family`` (the real config class of the family)."""
    spec = family_spec(family)
    if not is_available(family):
        raise ImportError(
            f"transformers {transformers.__version__} has no {spec.config_class}/{spec.model_class}; "
            f"upgrade transformers to build the {family!r} model."
        )
    config = getattr(transformers, spec.config_class)(**spec.config_kwargs)
    # The default grouped-matmul experts kernel rejects float64; the eager loop over experts computes the same
    # thing in every dtype. Token-wise, so it does not affect continuation.
    config._experts_implementation = "eager"
    return config


def build_model(family: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> PreTrainedModel:
    """A tiny causal LM of ``family`` with random weights drawn from ``seed``, in ``dtype`` and eval mode.

    The model is returned as transformers builds it, without hf_marconi's fixes; call
    ``hf_marconi.fixes.apply_fixes(model)`` (MarconiCache does) to get the corrected behaviour.
    """
    config = make_config(family)
    model_class = getattr(transformers, family_spec(family).model_class)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    return model.to(dtype).eval()
