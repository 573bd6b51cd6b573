"""Make every supported family continue correctly from a populated cache, or refuse it with a reason.

A prefix cache resumes a forward pass from cached states; if a model's continuation differs from its
full forward, the cache returns wrong text silently. transformers 5.x gets two families wrong:

- Jamba: a multi-token forward that continues from a cache ignores the cached Mamba1 SSM state (its
  selective scan has no initial-state input). Fixed by a corrected mixer forward (``mamba1``).
- Bamba: the model forward defaults ``position_ids`` to ``arange(seq_len)``, ignoring the cached length, so
  continuations rotate attention with the wrong positions. Fixed by a cache-aware default (``positions``).

``apply_fixes(model)`` installs the fixes on that model instance only (other models, and transformers'
classes, are untouched); ``check_supported(model_or_config)`` raises ``UnsupportedModelError`` for models
hf_marconi cannot make correct.
"""

from __future__ import annotations

from .errors import UnsupportedModelError
from .registry import FIXES, MIN_TRANSFORMERS_VERSION, SUPPORTED_MODEL_TYPES, apply_fixes, check_supported

__all__ = ["FIXES", "MIN_TRANSFORMERS_VERSION", "SUPPORTED_MODEL_TYPES", "UnsupportedModelError", "apply_fixes", "check_supported"]
