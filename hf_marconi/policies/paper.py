"""The policies the Marconi paper compares, as compositions of its admission and eviction rules."""

from __future__ import annotations

from hf_marconi.policies.admission import (
    REPEAT_THRESHOLD,
    BlockAdmission,
    BranchPointAdmission,
    MarconiAdmission,
    NoAdmission,
)
from hf_marconi.policies.composed import ComposedPolicy
from hf_marconi.policies.lru import LRUEviction
from hf_marconi.policies.marconi import MarconiEviction
from hf_marconi.policies.reuse import REUSE_HALF_LIFE


class MarconiPolicy(ComposedPolicy[MarconiAdmission, MarconiEviction]):
    """Marconi (Pan et al., MLSys 2025): :class:`MarconiAdmission` (branch point, sequence end, and the prompt's end
    once at least ``repeat_threshold`` of recent lookups repeat a stored prompt) with :class:`MarconiEviction`
    (recency + ``alpha`` x FLOP efficiency over nodes with at most one child, ``recency`` per
    :func:`~hf_marconi.policies.marconi.recency_scores`, the efficiency of a shared prompt prefix weighted by its recent
    hits with half-life ``reuse_half_life``; None: the paper's score)."""

    def __init__(self, alpha: float = 0.0, *, recency: str = "linear",
                 repeat_threshold: float | None = REPEAT_THRESHOLD, name: str = "marconi",
                 reuse_half_life: int | None = REUSE_HALF_LIFE) -> None:
        super().__init__(MarconiAdmission(repeat_threshold), MarconiEviction(alpha, recency, reuse_half_life), name)

    @property
    def recency(self) -> str:
        return self.eviction.recency

    @property
    def repeat_threshold(self) -> float | None:
        return self.admission.repeat_threshold

    @property
    def reuse_half_life(self) -> int | None:
        return self.eviction.reuse_half_life


class LRUPolicy(ComposedPolicy[BranchPointAdmission, LRUEviction]):
    """SGLang+ of the Marconi paper: a checkpoint at the branch point and at the end of each sequence (at most two per
    request, :class:`BranchPointAdmission`), eviction of the least recently used leaf with every node on an accessed
    path refreshed (:class:`LRUEviction`)."""

    def __init__(self) -> None:
        super().__init__(BranchPointAdmission(), LRUEviction(), "sglang+")


class BlockPolicy(ComposedPolicy[BlockAdmission, LRUEviction]):
    """vLLM+ of the Marconi paper: a checkpoint at every ``block_size``-token boundary of the prompt, and at the end of
    what was fed when it falls on one (:class:`BlockAdmission`), with :class:`LRUEviction` of leaf blocks."""

    def __init__(self, block_size: int = 32) -> None:
        super().__init__(BlockAdmission(block_size), LRUEviction(), "vllm+")

    @property
    def block_size(self) -> int:
        return self.admission.block_size


class NoCachePolicy(ComposedPolicy[NoAdmission, LRUEviction]):
    """No prefix cache: nothing is checkpointed, so nothing is stored and every request is a miss (the eviction rule,
    LRU, never runs)."""

    def __init__(self) -> None:
        super().__init__(NoAdmission(), LRUEviction(), "no-cache")
