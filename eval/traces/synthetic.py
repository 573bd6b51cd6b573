"""Synthetic token ids for workloads whose text is missing (MT-bench answers, the Mooncake trace)."""

from __future__ import annotations

import numpy as np


def synthetic_ids(vocab_size: int, length: int, *seed: int) -> np.ndarray:
    """``length`` token ids drawn uniformly below ``vocab_size``; the same ``seed`` values give the same ids."""
    return np.random.default_rng(list(seed)).integers(0, vocab_size, length)
