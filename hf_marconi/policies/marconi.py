"""Marconi's eviction rule: among nodes with at most one child, the lowest recency + alpha * reuse-weighted FLOP
efficiency."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Sequence

from hf_marconi.policies.base import CostModel
from hf_marconi.policies.efficiency import EfficiencyMemo
from hf_marconi.policies.reuse import REUSE_HALF_LIFE, ReuseCounts
from hf_marconi.tree import Node


RECENCY_SCORES = ("linear", "inverse-age")


def recency_scores(last_access: list[float], clock: int, kind: str) -> list[float]:
    """Recency of each candidate, min-max normalised (1 = most recent).

    ``"linear"`` (the default): the last access itself; its scale is the span between the oldest and newest candidate,
    so the alpha at which efficiency starts to matter moves with the load (16-256 on the traces of
    ``eval.bench_default``), which the online tuner follows. ``"inverse-age"`` (the authors' simulator): 1 / (clock + 1
    - last_access), which keeps the few most recently used nodes near 1 and packs every older node near 0. It was
    meant to make one alpha fit every load, but the best static alphas stay at 16-128 with it too (min-max normalised
    efficiency has outliers of its own), and with online tuning it scores below linear recency on 8 of the 10 rows of
    ``python -m eval.bench_default --compare inverse-age``."""
    if kind == "linear":
        return _normalise(last_access)
    return _normalise([1.0 / (clock + 1 - t) for t in last_access])


def _normalise(values: list[float]) -> list[float]:
    """Min-max to [0, 1]; all equal (or a single value) maps to 1."""
    low, high = min(values), max(values)
    if high == low:
        return [1.0] * len(values)
    span = high - low
    return [(v - low) / span for v in values]


@dataclass
class MarconiEviction:
    """Marconi's eviction (Pan et al., MLSys 2025): among nodes with at most one child, the lowest
    ``recency + alpha * value`` (each min-max normalised over the candidates; recency per ``recency``, see
    :func:`recency_scores`). ``value`` is the FLOP efficiency, weighted by ``1 +`` the decayed hit count of a
    purely-input checkpoint (:mod:`hf_marconi.policies.reuse`, half-life ``reuse_half_life`` requests); with
    ``reuse_half_life=None`` it is the efficiency alone, the paper's score. Only the reused node's recency is refreshed
    on a hit. ``alpha`` may be changed between requests by an alpha tuner. The efficiencies are memoised per node
    (:class:`EfficiencyMemo`)."""

    alpha: float = 0.0
    recency: str = "linear"
    reuse_half_life: int | None = REUSE_HALF_LIFE
    memo: EfficiencyMemo = field(default_factory=EfficiencyMemo, init=False, repr=False, compare=False)
    reuse: ReuseCounts | None = field(default=None, init=False, repr=False, compare=False)
    evicts_leaves_only: ClassVar[bool] = False
    per_node_priority: ClassVar[bool] = False  # min-max normalisation ranks a node against the other candidates

    def __post_init__(self) -> None:
        if self.alpha < 0:
            raise ValueError(f"alpha weighs FLOP efficiency against recency and must be >= 0, got {self.alpha}")
        if self.recency not in RECENCY_SCORES:
            raise ValueError(f"unknown recency score {self.recency!r}; choose one of {RECENCY_SCORES}")
        if self.reuse_half_life is not None:
            self.reuse = ReuseCounts(self.reuse_half_life)  # validates it

    def touch(self, path: Sequence[Node], reused: Node | None, clock: int) -> None:
        if reused is not None:
            reused.last_access = clock

    def record_hit(self, node: Node, clock: int) -> None:
        if self.reuse is not None:
            self.reuse.record_hit(node, clock)

    def touch_inserted(self, path: Sequence[Node], clock: int) -> None:
        return None  # the nodes and checkpoints a commit creates carry the clock already

    def choose_victim(self, candidates: Sequence[Node], costs: CostModel, clock: int) -> Node:
        if len(candidates) == 1:
            return candidates[0]
        recency = recency_scores([float(n.last_access) for n in candidates], clock, self.recency)
        if self.alpha == 0:
            scores = recency
        else:
            efficiency = self.memo.efficiencies(candidates, costs)
            if self.reuse is not None:
                efficiency = [e * w for e, w in zip(efficiency, self.reuse.weights(candidates, clock))]
            value = _normalise(efficiency)
            scores = [r + self.alpha * v for r, v in zip(recency, value)]
        # Lowest score; ties go to the least recent, then the oldest node (tuples compare in C, no key function).
        *_, best = min(zip(scores, [n.last_access for n in candidates], [n.uid for n in candidates], range(len(scores))))
        return candidates[best]
