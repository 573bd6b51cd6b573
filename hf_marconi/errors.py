"""The error a MarconiCache raises for bad input or a call it refuses (defined apart so that every module can raise it
without importing the cache)."""


class MarconiCacheError(ValueError):
    """Bad input to a MarconiCache, or a call it refuses: raised before the store is touched, so the store is
    unchanged."""
