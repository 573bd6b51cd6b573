"""The classic radix-cache eviction rule (SGLang+ and vLLM+): the least recently used leaf goes first, and every node
on an accessed path is refreshed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Sequence

from hf_marconi.policies.base import CostModel
from hf_marconi.tree import Node


@dataclass(frozen=True)
class LRUEviction:
    """LRU over leaves. A node's order is its own last access (:meth:`priority`), so the store serves victims from a
    heap (``per_node_priority``)."""

    evicts_leaves_only: ClassVar[bool] = True
    per_node_priority: ClassVar[bool] = True

    def touch(self, path: Sequence[Node], reused: Node | None, clock: int) -> None:
        self.touch_inserted(path, clock)

    def touch_inserted(self, path: Sequence[Node], clock: int) -> None:
        for node in path:
            node.last_access = clock

    def record_hit(self, node: Node, clock: int) -> None:
        return None  # recency alone: touch refreshed the path

    @staticmethod
    def priority(node: Node) -> tuple[int, int]:
        """Least recently used first; creation order breaks ties."""
        return (node.last_access, node.uid)

    def choose_victim(self, candidates: Sequence[Node], costs: CostModel, clock: int) -> Node:
        return min(candidates, key=self.priority)
