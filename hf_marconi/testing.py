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
(``hf_marconi.support.check_supported`` says why).
The specs are part of each family's record in :mod:`hf_marconi.families`.
"""

from __future__ import annotations

import torch
import transformers
from transformers import PretrainedConfig, PreTrainedModel

from .families import (  # noqa: F401  (the zoo's constants live in the family records; re-exported for tests)
    DELTA_RULE_CHUNK_SIZE,
    FAMILIES as _RECORDS,
    HIDDEN_SIZE,
    INITIALIZER_RANGE,
    SSD_CHUNK_SIZE,
    VOCAB_SIZE,
    ZooSpec,
)

__all__ = ["ALL_FAMILIES", "DELTA_RULE_CHUNK_SIZE", "FAMILIES", "HIDDEN_SIZE", "INITIALIZER_RANGE", "SSD_CHUNK_SIZE",
           "VOCAB_SIZE", "build_model", "cache_keyword", "family_spec", "is_available", "is_supported", "make_config"]

# Every family the zoo knows, whether or not the installed transformers ships it.
ALL_FAMILIES: tuple[str, ...] = tuple(_RECORDS)


def family_spec(family: str) -> ZooSpec:
    """The zoo spec of ``family``; raises KeyError naming the known families."""
    try:
        return _RECORDS[family].zoo
    except KeyError:
        raise KeyError(f"Unknown family {family!r}; the zoo has {', '.join(ALL_FAMILIES)}.") from None


def is_available(family: str) -> bool:
    """Whether the installed transformers ships the config and model classes of ``family``."""
    spec = family_spec(family)
    return hasattr(transformers, spec.config_class) and hasattr(transformers, spec.model_class)


# The families the installed transformers ships (Kimi-Linear needs transformers >= 5.17): what to iterate over.
FAMILIES: tuple[str, ...] = tuple(family for family in ALL_FAMILIES if is_available(family))


def cache_keyword(family: str) -> str:
    """The keyword the installed transformers' forwards take ``family``'s cache by."""
    family_spec(family)
    return _RECORDS[family].cache_keyword


def is_supported(family: str) -> bool:
    """Whether hf_marconi caches ``family`` on the installed transformers (``check_supported`` accepts it)."""
    from hf_marconi.fixes import UnsupportedModelError
    from hf_marconi.support import check_supported

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
    # The default grouped-matmul experts kernel rejects float64; the eager loop over experts computes the same
    # thing in every dtype. Token-wise, so it does not affect continuation.
    return getattr(transformers, spec.config_class)(**spec.config_kwargs, experts_implementation="eager")


def build_model(family: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> PreTrainedModel:
    """A tiny causal LM of ``family`` with random weights drawn from ``seed``, in ``dtype`` and eval mode.

    The model is returned as transformers builds it, without hf_marconi's fixes; call
    ``hf_marconi.support.apply_fixes(model)`` (MarconiCache does) to get the corrected behaviour.
    """
    config = make_config(family)
    model_class = getattr(transformers, family_spec(family).model_class)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    return model.to(dtype).eval()
