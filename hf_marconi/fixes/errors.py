"""The error hf_marconi raises for a model whose continuation from a cache it cannot make correct."""


class UnsupportedModelError(ValueError):
    """A model (or config) that hf_marconi refuses: prefix caching would silently return wrong logits.

    The message says which model, why, and what to do instead.
    """
