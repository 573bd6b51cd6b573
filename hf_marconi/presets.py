"""Cost models of real hybrid models and of the Marconi paper's 7B hybrid, built from local configs (nothing
downloaded): what the simulator and the evaluation harness replay traces against."""

from __future__ import annotations

from typing import Any, Callable

from .costs import CostModel
from .families import cost_model


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
    model = cost_model(preset_config(name), dtype=dtype, recurrent_dtype=recurrent_dtype)
    model.name = name
    return model
