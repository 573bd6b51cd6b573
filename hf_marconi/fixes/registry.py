"""Which model types hf_marconi supports, which fixes each needs, and the two entry points."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import transformers
from packaging.version import Version
from torch import nn
from transformers import DynamicCache, PretrainedConfig
from transformers.cache_utils import CacheLayerMixin

from . import mamba1, positions
from .errors import UnsupportedModelError

# model_type of every family whose continuation the conformance tests verify (tests/test_conformance.py).
SUPPORTED_MODEL_TYPES: frozenset[str] = frozenset({
    "jamba", "bamba", "zamba2", "falcon_h1", "granitemoehybrid", "nemotron_h", "qwen3_next", "lfm2",
    "olmo_hybrid", "kimi_linear", "qwen3_5_text", "llama", "mamba2",
})
# The oldest transformers on which every supported family passes the conformance tests. On 5.14 Zamba2,
# Nemotron-H and LFM2 continue wrongly from a cache, OLMo-hybrid's own cache class lacks the Cache API, and
# Jamba's mixer predates the functions its fix calls; transformers < 5.5 has no layered hybrid cache at all.
MIN_TRANSFORMERS_VERSION = Version("5.15.0")
# Pure-recurrent model classes whose forward never asks the cache for a sequence length.
_PURE_RECURRENT_MODEL_TYPES: frozenset[str] = frozenset({"mamba2"})


@dataclass(frozen=True)
class Fix:
    """One correction: the model types it applies to, a check that it can be installed, and the installer.

    ``install`` patches the modules of the model instance that need it, skipping those it patched before (so
    installing twice changes nothing), and returns how many modules the fix targets in the model: 0 means the
    model is not built the way the fix expects.
    """

    name: str
    model_types: frozenset[str]
    check: Callable[[nn.Module], None]
    install: Callable[[nn.Module], int]


def _bamba_model_class() -> type[nn.Module]:
    from transformers.models.bamba.modeling_bamba import BambaModel

    return BambaModel


FIXES: tuple[Fix, ...] = (
    Fix(
        name="jamba_mamba1_initial_state",
        model_types=frozenset({"jamba"}),
        check=mamba1.check_jamba_fix_applies,
        install=mamba1.install_jamba_mixer_fix,
    ),
    Fix(
        name="bamba_cache_aware_position_ids",
        model_types=frozenset({"bamba"}),
        check=lambda model: None,
        install=lambda model: positions.install_cache_aware_positions(model, _bamba_model_class()),
    ),
)


def _config_of(model_or_config: nn.Module | PretrainedConfig) -> PretrainedConfig:
    config = getattr(model_or_config, "config", model_or_config)
    if not isinstance(config, PretrainedConfig):
        raise TypeError(f"Expected a transformers model or config, got {type(model_or_config).__name__}.")
    return config.get_text_config(decoder=True)


def installed_transformers_version() -> Version:
    return Version(transformers.__version__)


def check_supported(model_or_config: nn.Module | PretrainedConfig) -> None:
    """Raise UnsupportedModelError, saying why and what to do, unless hf_marconi can cache this model exactly.

    Checks: the installed transformers is recent enough; the model type is one whose continuation hf_marconi
    verifies; a hybrid has at least one attention layer (transformers' forwards ask the cache for its sequence
    length, which only attention layers track, so an all-recurrent hybrid config cannot run with a cache at
    all); the family's fixes can be installed on the installed transformers.
    """
    installed = installed_transformers_version()
    if installed < MIN_TRANSFORMERS_VERSION:
        raise UnsupportedModelError(
            f"transformers {installed} is older than {MIN_TRANSFORMERS_VERSION}, the oldest release on which "
            f"hf_marconi verified that hybrid models continue correctly from a cache. Upgrade transformers "
            f"(pip install 'transformers>={MIN_TRANSFORMERS_VERSION},<6')."
        )
    config = _config_of(model_or_config)
    model_type = config.model_type
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"Model type {model_type!r} is not supported by hf_marconi: its continuation from a cache has not "
            f"been verified, and a wrong continuation makes a prefix cache return wrong text silently. "
            f"Supported model types: {', '.join(sorted(SUPPORTED_MODEL_TYPES))}."
        )
    if model_type not in _PURE_RECURRENT_MODEL_TYPES:
        layers = DynamicCache(config=config).layers
        if not any(isinstance(layer, CacheLayerMixin) for layer in layers):
            raise UnsupportedModelError(
                f"This {model_type!r} config has no attention layer. transformers' {model_type} forward asks the "
                f"cache for its sequence length, which only attention layers track, so the model cannot run with "
                f"a cache (DynamicCache.get_seq_length raises). Configure at least one attention layer, or use "
                f"Mamba2ForCausalLM for a pure-SSM model."
            )
    if isinstance(model_or_config, nn.Module):
        for fix in FIXES:
            if model_type in fix.model_types:
                fix.check(model_or_config)


def apply_fixes(model: nn.Module) -> list[str]:
    """Install on ``model`` (this instance only) every fix its family needs; idempotent.

    Raises UnsupportedModelError (see ``check_supported``) for a model hf_marconi refuses. Returns the names
    of the fixes in effect on the model, whether installed by this call or an earlier one; an empty list for
    families that continue correctly as transformers ships them.
    """
    check_supported(model)
    model_type = _config_of(model).model_type
    names = []
    for fix in FIXES:
        if model_type in fix.model_types:
            if fix.install(model) == 0:
                raise UnsupportedModelError(
                    f"hf_marconi's fix {fix.name!r} found none of the modules it corrects in this {model_type!r} "
                    f"model ({type(model).__name__}); without it the model continues wrongly from a cache. Use a "
                    f"{model_type} model class of the transformers version range hf_marconi declares."
                )
            names.append(fix.name)
    return names
