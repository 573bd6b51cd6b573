"""The order in which the store's single eviction loop takes victims, for the two kinds of eviction rule.

A rule whose order is a pure function of a node (``policy.per_node_priority``: LRU for SGLang+ and vLLM+) is served
from a heap, O(log candidates) per victim, which matters when every 32-token block is a node (vLLM+). A rule that ranks
candidates against each other (Marconi's min-max normalised scores) is asked again over all current candidates for
every victim. Both see the same candidates: unlocked leaves, or unlocked nodes with at most one child.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Protocol, cast

from hf_marconi.policies.base import CostModel, PerNodePriority, Policy
from hf_marconi.tree import Node, RadixTree


class VictimOrder(Protocol):
    def next_victim(self) -> Node | None:
        """The next node to evict, or None when no candidate is left."""
        ...

    def after_eviction(self, survivor: Node) -> None:
        """``survivor``, the nearest ancestor of the last victim that stays (or the root), may be a candidate now."""
        ...


def is_candidate(policy: Policy, node: Node) -> bool:
    return node.parent is not None and node.lock_ref == 0 and (
        not node.children if policy.evicts_leaves_only else len(node.children) <= 1)


def candidate_pool(policy: Policy, tree: RadixTree) -> dict[int, Node]:
    """The tree's index of nodes that may be candidates (locked ones included)."""
    return tree.leaves if policy.evicts_leaves_only else tree.thin


class ScanOrder:
    """``policy.choose_victim`` over every current candidate, for each victim."""

    def __init__(self, tree: RadixTree, policy: Policy, costs: CostModel, clock: int) -> None:
        self.tree, self.policy, self.costs, self.clock = tree, policy, costs, clock

    def next_victim(self) -> Node | None:
        candidates = [n for n in candidate_pool(self.policy, self.tree).values() if n.lock_ref == 0]
        return self.policy.choose_victim(candidates, self.costs, self.clock) if candidates else None

    def after_eviction(self, survivor: Node) -> None:
        return None  # the next scan sees it


class HeapOrder:
    """The same victims as :class:`ScanOrder` for a per-node priority, from a heap with lazy invalidation."""

    def __init__(self, tree: RadixTree, policy: Policy) -> None:
        self.policy = policy
        self.priority = cast(PerNodePriority, policy).priority
        self.tiebreak = itertools.count()  # keeps tuples comparable when a node is pushed twice with the same key
        self.heap = [(self.priority(n), next(self.tiebreak), n)
                     for n in candidate_pool(policy, tree).values() if n.lock_ref == 0]
        heapq.heapify(self.heap)

    def next_victim(self) -> Node | None:
        while self.heap:
            key, _, node = heapq.heappop(self.heap)
            if is_candidate(self.policy, node) and self.priority(node) == key:
                return node
        return None

    def after_eviction(self, survivor: Node) -> None:
        if is_candidate(self.policy, survivor):
            heapq.heappush(self.heap, (self.priority(survivor), next(self.tiebreak), survivor))
