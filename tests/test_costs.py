"""Cost model: bytes match what transformers allocates in DynamicCache, FLOPs add up, presets build offline."""

from __future__ import annotations

import pytest

from hf_marconi.costs import CostModel, attention, mamba2, mlp, moe
from hf_marconi.families import FAMILIES, cost_model
from hf_marconi.presets import PRESETS, preset


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("dtype_name", ["bfloat16"])  # conv states in bf16, recurrent in fp32: both dtypes checked
def test_bytes_match_real_cache_tensors(family, dtype_name):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    testing = pytest.importorskip("hf_marconi.testing")
    if not testing.is_available(family):
        pytest.skip(f"transformers {transformers.__version__} has no {family}")
    dtype = getattr(torch, dtype_name)
    model = testing.build_model(family, dtype=dtype)
    cache = transformers.DynamicCache(config=model.config)
    length = 9
    with torch.no_grad():
        model(torch.arange(3, 3 + length)[None], use_cache=True, **{FAMILIES[family].cache_keyword: cache})
    kv = checkpoint = 0
    for layer in cache.layers:
        if getattr(layer, "keys", None) is not None:
            kv += (layer.keys.numel() + layer.values.numel()) * layer.keys.element_size()
        for states in (getattr(layer, "conv_states", {}), getattr(layer, "recurrent_states", {})):
            checkpoint += sum(t.numel() * t.element_size() for t in states.values() if t is not None)
    costs = cost_model(model.config, dtype=dtype, recurrent_dtype="float32")
    assert kv == costs.kv_bytes_per_token * length
    assert checkpoint == costs.checkpoint_bytes


def test_extending_in_pieces_costs_the_same_as_at_once():
    costs = preset("paper-7b-hybrid")
    assert costs.extend_flops(0, 300) + costs.extend_flops(300, 200) == pytest.approx(costs.extend_flops(0, 500))
    assert costs.extend_flops(1000, 10) > costs.extend_flops(0, 10)  # the new tokens attend to the prefix


def test_attention_counts_score_and_value_pairs():
    layer = attention(hidden=64, q_heads=4, kv_heads=2, head_dim=16)
    only = CostModel((layer,), dtype="float16", recurrent_dtype="float16")
    projections = 2 * 64 * (4 * 16 + 2 * 2 * 16) + 2 * 4 * 16 * 64
    pairs = 5 * 3 + 3 * 4 // 2  # 3 new tokens after a 5-token prefix
    assert only.extend_flops(5, 3) == projections * 3 + 4 * 4 * 16 * pairs
    assert only.kv_bytes_per_token == 2 * 2 * 16 * 2 and only.checkpoint_bytes == 0


def test_sliding_window_caps_pairs_and_is_a_checkpoint():
    layer = attention(hidden=8, q_heads=1, kv_heads=1, head_dim=8, window=4)
    costs = CostModel((layer,), dtype=2, recurrent_dtype=4)
    per_pair = 4 * 8
    linear = layer.flops_per_token
    # tokens at positions 10..12 each see 4 keys
    assert costs.extend_flops(10, 3) == 3 * linear + 3 * 4 * per_pair
    # positions 0..5 see 1, 2, 3, 4, 4, 4 keys
    assert costs.extend_flops(0, 6) == 6 * linear + 18 * per_pair
    assert costs.kv_bytes_per_token == 0 and costs.checkpoint_bytes == 4 * 2 * 8 * 2


def test_moe_counts_active_experts_only():
    many = moe(hidden=16, experts=64, active=2, expert_intermediate=8)
    few = moe(hidden=16, experts=4, active=2, expert_intermediate=8)
    assert many.flops_per_token - few.flops_per_token == 2 * 16 * (64 - 4)  # only the router grows
    assert few.flops_per_token == 2 * 16 * 4 + 2 * mlp(16, 8).flops_per_token


def test_paper_preset_matches_the_papers_sizes():
    costs = preset("paper-7b-hybrid")
    assert (costs.count("attention"), costs.count("mamba2"), costs.count("mlp")) == (4, 24, 28)
    assert costs.kv_bytes_per_token == 64 * 1024  # fp16 K and V of 32 heads x 128 in 4 layers
    assert 25e6 < costs.checkpoint_bytes < 28e6  # "~27 MB, as much as ~400 tokens of its KV"
    assert 380 < costs.checkpoint_bytes / costs.kv_bytes_per_token < 420


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_build_offline(name):
    pytest.importorskip("transformers")
    costs = preset(name)
    assert costs.checkpoint_bytes > 0 and costs.kv_bytes_per_token > 0 and costs.extend_flops(0, 1) > 1e9


def test_mamba2_state_shapes():
    layer = mamba2(hidden=64, heads=8, head_dim=16, groups=1, state=16, conv_kernel=4)
    assert layer.recurrent_elements == 8 * 16 * 16 and layer.conv_elements == (128 + 2 * 16) * 4


def test_unknown_family_and_dtype_fail_with_a_fix():
    class Config:
        model_type = "gpt2"

    with pytest.raises(ValueError, match="supported"):
        cost_model(Config())
    with pytest.raises(ValueError, match="byte count"):
        CostModel((mlp(4, 8),), dtype="complex32")


def test_mla_caches_the_latent_and_counts_full_head_pairs():
    from hf_marconi.costs import kimi_delta_attention, mla_attention

    layer = mla_attention(hidden=64, heads=4, kv_lora_rank=16, qk_nope_dim=8, qk_rope_dim=8, v_dim=16)
    assert layer.kv_elements_per_token == 16 + 8  # one latent and one shared rotary key per token, not per head
    assert layer.flops_per_pair == 2 * 4 * (8 + 8) + 2 * 4 * 16
    kda = kimi_delta_attention(hidden=64, heads=4, head_dim=16, conv_kernel=4)
    assert kda.conv_elements == 3 * 64 * 4 and kda.recurrent_elements == 4 * 16 * 16
