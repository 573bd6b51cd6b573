"""SGLang+: Marconi's admission with the classic radix-cache eviction (LRU over leaves, every matched node refreshed)."""

from __future__ import annotations

from typing import Sequence

from hf_marconi.policies.base import CostModel, branch_point
from hf_marconi.tree import Node


def refresh_all(path: Sequence[Node], clock: int) -> None:
    for node in path:
        node.last_access = clock


def recency_priority(node: Node) -> tuple[int, int]:
    """Least recently used first; creation order breaks ties."""
    return (node.last_access, node.uid)


def least_recent(candidates: Sequence[Node]) -> Node:
    return min(candidates, key=recency_priority)


class LRUEviction:
    """The classic radix-cache eviction shared by SGLang+ and vLLM+: every node on an accessed path is refreshed, and
    the least recently used leaf goes first."""

    def touch(self, path: Sequence[Node], reused: Node | None, clock: int) -> None:
        refresh_all(path, clock)

    def touch_inserted(self, path: Sequence[Node], clock: int) -> None:
        refresh_all(path, clock)

    def priority(self, node: Node) -> tuple[int, int]:
        return recency_priority(node)

    def choose_victim(self, candidates: Sequence[Node], costs: CostModel, clock: int) -> Node:
        return least_recent(candidates)


class LRUPolicy(LRUEviction):
    """SGLang+ of the Marconi paper: a checkpoint at the branch point and at the end of each sequence (at most two per
    request), eviction of the least recently used leaf, every node on an accessed path refreshed."""

    name = "sglang+"
    max_new_checkpoints = 2
    alpha = None
    evicts_leaves_only = True
    per_node_priority = True

    def capture_positions(self, reuse_len: int, branch_len: int | None, input_len: int,
                          repeat_rate: float = 0.0) -> tuple[int, ...]:
        return branch_point(reuse_len, branch_len)

    def keeps_end(self, input_len: int, end: int) -> bool:
        return True

