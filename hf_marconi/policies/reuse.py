"""How often a stored shared prefix was reused lately: the reuse-likelihood factor of Marconi's eviction score.

Marconi's FLOP efficiency is what one hit on an entry saves per byte the entry holds. A checkpoint inside prompts (a
branch point: a few-shot prefix, a system prompt) is hit by every later prompt that shares it, so what keeping it is
worth per byte is its rate of hits times that efficiency. :class:`ReuseCounts` keeps each such checkpoint's hits,
decayed with a half-life in requests, and Marconi's eviction weighs the efficiency by ``1 + count``. A checkpoint at
the end of what a request fed (input+output reuse: a conversation's latest turn) is hit at most once, by the next
turn, which stores a deeper one and moves on: its past hits say nothing of its future, so it is not counted.

Where it matters: few-shot traffic. A query's own tail (its question and answer) extends a long shared prefix, so its
FLOPs per byte look high, yet no later query shares it; with a large alpha the paper's score keeps such tails and
drops the task prefixes every query needs. ``python -m eval.bench_default --compare paper-score`` measures it on the
issue-13 rows.
"""

from __future__ import annotations

import weakref
from typing import Sequence

from hf_marconi.tree import PURELY_INPUT, Node

# Requests after which a hit's weight has halved: the same "recent" as the shadow tuner's score. Counted on the store's
# logical clock, one tick per commit (a batched row commits its prompt and then the rest: two).
REUSE_HALF_LIFE = 200


class ReuseCounts:
    """Decayed hit counts of purely-input checkpoints, per node (entries go with their nodes: weak keys)."""

    def __init__(self, half_life: int = REUSE_HALF_LIFE) -> None:
        if half_life < 1:
            raise ValueError(f"half_life is a number of requests and must be >= 1, got {half_life}")
        self.half_life = half_life
        self._hits: weakref.WeakKeyDictionary[Node, tuple[float, int]] = weakref.WeakKeyDictionary()

    def __len__(self) -> int:
        return len(self._hits)

    def record_hit(self, node: Node, clock: int) -> None:
        """A lookup resumed from ``node``'s checkpoint at logical time ``clock``."""
        if node.origin == PURELY_INPUT:
            self._hits[node] = (self.count(node, clock) + 1.0, clock)

    def count(self, node: Node, clock: int) -> float:
        """``node``'s hits, each weighted by 2 ** -(requests since it / half_life); 0 for input+output checkpoints."""
        if node.origin != PURELY_INPUT:  # first: most candidates are turn ends, and a weak-key lookup costs a weakref
            return 0.0
        entry = self._hits.get(node)
        if entry is None:
            return 0.0
        hits, at = entry
        return hits * 0.5 ** ((clock - at) / self.half_life)

    def weights(self, nodes: Sequence[Node], clock: int) -> list[float]:
        """``1 + count`` of each of ``nodes``: the factor on its FLOP efficiency."""
        return [1.0 + self.count(node, clock) for node in nodes]
