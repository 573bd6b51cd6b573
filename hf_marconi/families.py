"""One record per model family: everything hf_marconi knows about a family, in one place.

A :class:`Family` names the family's ``model_type`` values, the reader that turns its config into layer costs, the
continuation fixes it needs (with the releases that need them), the recurrent mixer classes that single-pass capture
may split, the keyword its forward took the cache by before transformers 5.24, and the tiny model the test zoo builds
(:class:`ZooSpec`). ``costs`` (via :func:`layer_costs`), ``support`` (supported types and fixes), capture
(:meth:`Family.mixer_classes`), :mod:`hf_marconi.testing` and the tests all derive from :data:`FAMILIES`: adding a
family is one record here and its tests.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

from . import config_readers, conventions
from .costs import CostModel, LayerCost
from .fixes.base import Fix
from .fixes.mamba1 import JAMBA_INITIAL_STATE
from .fixes.positions import BAMBA_POSITIONS

VOCAB_SIZE = 256
HIDDEN_SIZE = 64
SSD_CHUNK_SIZE = 8
# The gated-delta-rule and KDA torch paths scan in chunks of 64 tokens; the size is not configurable.
DELTA_RULE_CHUNK_SIZE = 64
# Weight std. transformers' usual 0.02 leaves the recurrent state's effect on the logits of these tiny models at
# ~1e-6 (Mamba2 families), too small for a float32 test to notice a lost state; at 0.1 it is >= 6e-4.
INITIALIZER_RANGE = 0.1


@dataclass(frozen=True)
class ZooSpec:
    """How the test zoo builds the family's tiny model, and what to expect from it.

    ``scan_chunk_size`` is the chunk length of the family's chunked scan on the torch path (None: the recurrent
    layers have no chunked scan, e.g. Mamba1 or a short convolution). ``scan_casts_to_float32`` is True when the
    torch multi-token path of the recurrent layers computes in float32 even in a float64 model (the SSD chunk
    scan and the gated-delta-rule / KDA chunk scans cast their inputs with ``.float()``), so a float64
    continuation agrees with a full forward only to float32 precision. ``decode_casts_to_float32`` is the same
    for the single-token decode path (state update in float32). Both are transformers' choices, not bugs.
    """

    config_class: str
    model_class: str
    config_kwargs: dict[str, Any]
    recurrent_kind: str | None
    scan_chunk_size: int | None
    scan_casts_to_float32: bool
    decode_casts_to_float32: bool
    notes: str = field(default="")


@dataclass(frozen=True)
class Family:
    """A model family hf_marconi supports.

    Attributes:
        name: the zoo name (``hf_marconi.testing.build_model(name)``).
        model_types: the ``model_type`` values of the family's text configs.
        layer_costs: reads a config of the family into the parts of every decoder layer (:mod:`.config_readers`).
        fixes: continuation fixes; each is installed on the releases in its ``broken_in``.
        splittable_mixers: recurrent mixer classes, as ``"<model module>:<class>"`` under ``transformers.models``,
            whose multi-token continuation is exact so that single-pass capture may split their input.
        legacy_cache_keyword: the keyword the family's forward and ``generate`` took the cache by before 5.24
            (``cache_params`` for pure Mamba models); from 5.24 every family takes ``cache``.
        zoo: the test zoo's tiny model.
    """

    name: str
    model_types: frozenset[str]
    layer_costs: Callable[[Any], list[LayerCost]]
    zoo: ZooSpec
    fixes: tuple[Fix, ...] = ()
    splittable_mixers: tuple[str, ...] = ()
    legacy_cache_keyword: str = "past_key_values"

    @property
    def pure_recurrent(self) -> bool:
        """No attention layer at all: the cache counts no tokens, and generate never skips a cached prompt."""
        return self.legacy_cache_keyword == "cache_params"

    @property
    def cache_keyword(self) -> str:
        """The keyword the installed transformers' forward and generate take this family's cache by."""
        return conventions.cache_keyword(self.legacy_cache_keyword)

    def needed_fixes(self, installed: Any = conventions.INSTALLED) -> tuple[Fix, ...]:
        """The fixes transformers release ``installed`` (default: the installed one) needs for this family."""
        return tuple(fix for fix in self.fixes if fix.needed(installed))

    def mixer_classes(self) -> tuple[type, ...]:
        """The splittable mixer classes the installed transformers ships."""
        classes = []
        for path in self.splittable_mixers:
            module_name, class_name = path.split(":")
            try:
                module = importlib.import_module(f"transformers.models.{module_name}.modeling_{module_name}")
            except ImportError:
                continue
            if hasattr(module, class_name):
                classes.append(getattr(module, class_name))
        return tuple(classes)


_COMMON = dict(vocab_size=VOCAB_SIZE, hidden_size=HIDDEN_SIZE, pad_token_id=0, bos_token_id=1, eos_token_id=2,
               initializer_range=INITIALIZER_RANGE)
_ATTENTION = dict(num_attention_heads=4, num_key_value_heads=2)
# Mamba2 (SSD) mixers: 8 heads of 16 channels over an expanded width of 128, a 16-dim state, short chunks.
_MAMBA2 = dict(mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=1, mamba_d_state=16, mamba_d_conv=4,
               mamba_expand=2, mamba_chunk_size=SSD_CHUNK_SIZE)
# Gated delta net mixers (Qwen3-Next, Qwen3.5, OLMo-hybrid).
_DELTA_NET = dict(linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=16,
                  linear_num_key_heads=2, linear_num_value_heads=4)

_FAMILIES: tuple[Family, ...] = (
    Family(
        name="jamba",
        model_types=frozenset({"jamba"}),
        layer_costs=config_readers.jamba_layers,
        fixes=(JAMBA_INITIAL_STATE,),
        splittable_mixers=(),
        zoo=ZooSpec(
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
    ),
    Family(
        name="bamba",
        model_types=frozenset({"bamba"}),
        layer_costs=config_readers.bamba_layers,
        fixes=(BAMBA_POSITIONS,),
        splittable_mixers=("bamba:BambaMixer",),
        zoo=ZooSpec(
            config_class="BambaConfig",
            model_class="BambaForCausalLM",
            config_kwargs=dict(_COMMON, **_ATTENTION, **_MAMBA2, intermediate_size=128, num_hidden_layers=4,
                               attn_layer_indices=[1, 3]),
            recurrent_kind="mamba2",
            scan_chunk_size=SSD_CHUNK_SIZE,
            scan_casts_to_float32=True,
            decode_casts_to_float32=True,
        ),
    ),
    Family(
        name="zamba2",
        model_types=frozenset({"zamba2"}),
        layer_costs=config_readers.zamba2_layers,
        fixes=(),
        splittable_mixers=("zamba2:Zamba2MambaMixer",),
        zoo=ZooSpec(
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
    ),
    Family(
        name="falcon_h1",
        model_types=frozenset({"falcon_h1"}),
        layer_costs=config_readers.falcon_h1_layers,
        fixes=(),
        splittable_mixers=("falcon_h1:FalconH1Mixer",),
        zoo=ZooSpec(
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
    ),
    Family(
        name="granitemoehybrid",
        model_types=frozenset({"granitemoehybrid"}),
        layer_costs=config_readers.granitemoehybrid_layers,
        fixes=(),
        splittable_mixers=("granitemoehybrid:GraniteMoeHybridMambaLayer",),
        zoo=ZooSpec(
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
    ),
    Family(
        name="nemotron_h",
        model_types=frozenset({"nemotron_h"}),
        layer_costs=config_readers.nemotron_h_layers,
        fixes=(),
        splittable_mixers=("nemotron_h:NemotronHMamba2Mixer",),
        zoo=ZooSpec(
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
    ),
    Family(
        name="qwen3_next",
        model_types=frozenset({"qwen3_next"}),
        layer_costs=config_readers.gated_delta_layers,
        fixes=(),
        splittable_mixers=("qwen3_next:Qwen3NextGatedDeltaNet",),
        zoo=ZooSpec(
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
    ),
    Family(
        name="lfm2",
        model_types=frozenset({"lfm2"}),
        layer_costs=config_readers.lfm2_layers,
        fixes=(),
        splittable_mixers=("lfm2:Lfm2ShortConv",),
        zoo=ZooSpec(
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
    ),
    Family(
        name="olmo_hybrid",
        model_types=frozenset({"olmo_hybrid"}),
        layer_costs=config_readers.gated_delta_layers,
        fixes=(),
        splittable_mixers=("olmo_hybrid:OlmoHybridGatedDeltaNet",),
        zoo=ZooSpec(
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
    ),
    Family(
        name="kimi_linear",
        model_types=frozenset({"kimi_linear"}),
        layer_costs=config_readers.kimi_linear_layers,
        fixes=(),
        splittable_mixers=("kimi_linear:KimiLinearDeltaAttention",),
        zoo=ZooSpec(
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
    ),
    Family(
        name="qwen3_5",
        model_types=frozenset({"qwen3_5_text"}),
        layer_costs=config_readers.gated_delta_layers,
        fixes=(),
        splittable_mixers=("qwen3_5:Qwen3_5GatedDeltaNet",),
        zoo=ZooSpec(
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
    ),
    Family(
        name="llama",
        model_types=frozenset({"llama"}),
        layer_costs=config_readers.llama_layers,
        fixes=(),
        splittable_mixers=(),
        zoo=ZooSpec(
            config_class="LlamaConfig",
            model_class="LlamaForCausalLM",
            config_kwargs=dict(_COMMON, **_ATTENTION, intermediate_size=128, num_hidden_layers=2),
            recurrent_kind=None,
            scan_chunk_size=None,
            scan_casts_to_float32=False,
            decode_casts_to_float32=False,
            notes="control: pure attention",
        ),
    ),
    Family(
        name="mamba2",
        model_types=frozenset({"mamba2"}),
        layer_costs=config_readers.mamba2_model_layers,
        fixes=(),
        splittable_mixers=("mamba2:Mamba2Mixer",),
        legacy_cache_keyword="cache_params",
        zoo=ZooSpec(
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
            notes="control: pure Mamba2",
        ),
    ),
)

FAMILIES: dict[str, Family] = {family.name: family for family in _FAMILIES}
_BY_MODEL_TYPE: dict[str, Family] = {model_type: family for family in _FAMILIES for model_type in family.model_types}
SUPPORTED_MODEL_TYPES: frozenset[str] = frozenset(_BY_MODEL_TYPE)


def text_config(model_or_config: Any) -> Any:
    """The decoder text config of a model or config."""
    config = getattr(model_or_config, "config", model_or_config)
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def family_of(model_or_config: Any) -> Family | None:
    """The family of a model or config (None for a model type hf_marconi does not know)."""
    return _BY_MODEL_TYPE.get(getattr(text_config(model_or_config), "model_type", None))


def cache_keyword_of(model_or_config: Any) -> str:
    """The keyword the installed transformers' forward and generate take this model's cache by."""
    family = family_of(model_or_config)
    return family.cache_keyword if family is not None else conventions.cache_keyword("past_key_values")


def layer_costs(config: Any) -> tuple[LayerCost, ...]:
    """The parts of every decoder layer of ``config`` (a transformers config of a supported family)."""
    family = family_of(config)
    if family is None:
        raise ValueError(
            f"no cost model for model_type {getattr(text_config(config), 'model_type', None)!r}; supported: "
            f"{sorted(SUPPORTED_MODEL_TYPES)}. Build a CostModel from LayerCost records (hf_marconi.costs.attention, "
            "mamba2, mlp, ...) instead."
        )
    return tuple(family.layer_costs(text_config(config)))


def cost_model(config: Any, dtype: Any = "bfloat16", recurrent_dtype: Any = "float32") -> CostModel:
    """The cost model of a transformers config (a ``PretrainedConfig`` of a supported family)."""
    return CostModel(layer_costs(config), dtype=dtype, recurrent_dtype=recurrent_dtype,
                     name=getattr(text_config(config), "model_type", ""))
