"""Corrections that make a family continue exactly from a populated cache, installed per model instance.

A prefix cache resumes a forward pass from cached states; if a model's continuation differs from its full forward,
the cache returns wrong text silently. transformers 5.23 and 5.24 get two families wrong:

- Jamba: a multi-token forward that continues from a cache ignores the cached Mamba1 SSM state (its selective scan
  has no initial-state input). Fixed by a corrected mixer forward (:data:`mamba1.JAMBA_INITIAL_STATE`).
- Bamba: the model forward defaults ``position_ids`` to ``arange(seq_len)``, ignoring the cached length, so
  continuations rotate attention with the wrong positions. Fixed by a cache-aware default
  (:data:`positions.BAMBA_POSITIONS`).

Each family record (:mod:`hf_marconi.families`) lists its fixes; :func:`hf_marconi.support.apply_fixes` installs
the ones the installed release needs.
"""

from __future__ import annotations

from .base import Fix
from .errors import UnsupportedModelError

__all__ = ["Fix", "UnsupportedModelError"]
