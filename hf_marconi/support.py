"""Which models hf_marconi caches, on which transformers, and the fixes it installs: the two entry points.

``check_supported(model_or_config)`` raises :class:`~hf_marconi.fixes.UnsupportedModelError` for a model hf_marconi
cannot make correct; ``apply_fixes(model)`` installs on that model instance (only) the fixes its family needs on the
installed transformers release. Both read the family records of :mod:`hf_marconi.families`.
"""

from __future__ import annotations

import warnings

from packaging.version import Version
from torch import nn
from transformers import DynamicCache, PretrainedConfig
from transformers.cache_utils import CacheLayerMixin

from . import conventions
from .families import SUPPORTED_MODEL_TYPES, family_of, text_config
from .fixes import UnsupportedModelError

# The oldest release the package declares and CI tests: older ones are refused.
MIN_TRANSFORMERS_VERSION: Version = conventions.SUPPORTED_RELEASES[0]
# The newest release CI tests: newer ones run, with a warning that they are unverified.
MAX_VERIFIED_VERSION: Version = conventions.SUPPORTED_RELEASES[-1]
_warned_unverified = False


def installed_transformers_version() -> Version:
    """The installed release (without pre-release parts): every check here reads it through this function."""
    return conventions.release(conventions.INSTALLED)


def _config_of(model_or_config: nn.Module | PretrainedConfig) -> PretrainedConfig:
    config = getattr(model_or_config, "config", model_or_config)
    if not isinstance(config, PretrainedConfig):
        raise TypeError(f"Expected a transformers model or config, got {type(model_or_config).__name__}.")
    return text_config(config)


def _check_release() -> None:
    global _warned_unverified
    installed = installed_transformers_version()
    if installed < MIN_TRANSFORMERS_VERSION:
        raise UnsupportedModelError(
            f"transformers {installed} is older than {MIN_TRANSFORMERS_VERSION}, the oldest release hf_marconi is "
            f"tested on. Upgrade transformers (pip install 'transformers>={MIN_TRANSFORMERS_VERSION}')."
        )
    newest = Version(f"{MAX_VERIFIED_VERSION.major}.{MAX_VERIFIED_VERSION.minor + 1}")
    if installed >= newest and not _warned_unverified:
        _warned_unverified = True
        warnings.warn(
            f"transformers {installed} is newer than {MAX_VERIFIED_VERSION}, the newest release hf_marconi is tested "
            "on; its cache conventions may have changed. Run `python -m hf_marconi.check_release` to check, or "
            f"install 'transformers<{newest}'.",
            stacklevel=3,
        )


def check_supported(model_or_config: nn.Module | PretrainedConfig) -> None:
    """Raise UnsupportedModelError, saying why and what to do, unless hf_marconi can cache this model exactly.

    Checks: the installed transformers is a tested release (older ones are refused, newer ones warned about); the
    model type is one whose continuation hf_marconi verifies; a hybrid has at least one attention layer
    (transformers' forwards ask the cache for its sequence length, which only attention layers track, so an
    all-recurrent hybrid config cannot run with a cache at all); the family's fixes can be installed.
    """
    config = _config_of(model_or_config)
    _check_release()
    family = family_of(config)
    if family is None:
        raise UnsupportedModelError(
            f"Model type {config.model_type!r} is not supported by hf_marconi: its continuation from a cache has not "
            f"been verified, and a wrong continuation makes a prefix cache return wrong text silently. "
            f"Supported model types: {', '.join(sorted(SUPPORTED_MODEL_TYPES))}."
        )
    if not family.pure_recurrent:
        layers = DynamicCache(config=config).layers
        if not any(isinstance(layer, CacheLayerMixin) for layer in layers):
            raise UnsupportedModelError(
                f"This {config.model_type!r} config has no attention layer. transformers' {config.model_type} forward "
                f"asks the cache for its sequence length, which only attention layers track, so the model cannot run "
                f"with a cache (DynamicCache.get_seq_length raises). Configure at least one attention layer, or use "
                f"Mamba2ForCausalLM for a pure-SSM model."
            )
    if isinstance(model_or_config, nn.Module):
        for fix in family.needed_fixes(installed_transformers_version()):
            fix.check(model_or_config)


def apply_fixes(model: nn.Module) -> list[str]:
    """Install on ``model`` (this instance only) every fix its family needs on the installed release; idempotent.

    Raises UnsupportedModelError (see ``check_supported``) for a model hf_marconi refuses. Returns the names
    of the fixes in effect on the model, whether installed by this call or an earlier one; an empty list for
    families that continue correctly as the installed transformers ships them.
    """
    check_supported(model)
    config = _config_of(model)
    names = []
    for fix in family_of(config).needed_fixes(installed_transformers_version()):
        if fix.install(model) == 0:
            raise UnsupportedModelError(
                f"hf_marconi's fix {fix.name!r} found none of the modules it corrects in this {config.model_type!r} "
                f"model ({type(model).__name__}); without it the model continues wrongly from a cache. Use a "
                f"{config.model_type} model class of the transformers version range hf_marconi declares."
            )
        names.append(fix.name)
    return names
