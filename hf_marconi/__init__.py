"""hf_marconi: Marconi prefix caching for hybrid (attention + SSM / linear-attention) LLMs in transformers.

``MarconiCache`` is imported lazily so that the torch-free parts (``hf_marconi.tree``, ``hf_marconi.policies``,
``hf_marconi.simulator``) load without torch.
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["MarconiCache", "MarconiCacheError", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("MarconiCache", "MarconiCacheError"):
        from . import cache

        return getattr(cache, name)
    raise AttributeError(f"module 'hf_marconi' has no attribute {name!r}")
