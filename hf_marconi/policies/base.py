"""The policy protocol: where to take checkpoints (admission), what to refresh on access, what to drop (eviction).

A policy never mutates the tree: it returns positions, refreshes recency fields, and picks a victim among the
candidates the store hands it. The store does the mutation (decide, then act).
"""

from __future__ import annotations

from typing import Protocol, Sequence

from hf_marconi.tree import Node


class CostModel(Protocol):
    """What the store and the policies need from :class:`hf_marconi.costs.CostModel`."""

    def extend_flops(self, prefix_len: int, extend_len: int) -> float: ...


class Policy(Protocol):
    name: str
    max_new_checkpoints: int | None  # checkpoints one request may add; None for no limit
    alpha: float | None  # the FLOP-efficiency weight for policies that have one (Marconi), else None
    # Eviction candidates: unlocked leaves (True) or unlocked nodes with at most one child (False).
    evicts_leaves_only: bool
    # True when a node's eviction order is a pure function of the node (``priority``): the store then pops victims
    # from a heap instead of asking ``choose_victim`` to scan all candidates for every victim.
    per_node_priority: bool

    def capture_positions(self, reuse_len: int, branch_len: int | None, input_len: int,
                          repeat_rate: float = 0.0) -> tuple[int, ...]:
        """Prefix lengths in ``(reuse_len, input_len - 1]`` to checkpoint during prefill, ascending. ``branch_len`` is
        the branch point speculative insertion found (already capped at ``input_len - 1``), or None; ``repeat_rate``
        the share of recent lookups whose whole prompt was already stored (the store's decayed estimate)."""
        ...

    def keeps_end(self, input_len: int, end: int) -> bool:
        """Whether to checkpoint the end of the fed sequence (``end`` tokens: the input and every generated token but
        the last, which is never fed). A live call can take a state there and nowhere else during decoding."""
        ...

    def touch(self, path: Sequence[Node], reused: Node | None, clock: int) -> None:
        """Refresh recency after a lookup: ``path`` are the fully matched nodes, ``reused`` the node reused (or None)."""
        ...

    def touch_inserted(self, path: Sequence[Node], clock: int) -> None:
        """Refresh recency after a commit stored a sequence along ``path`` (new nodes already carry ``clock``)."""
        ...

    def choose_victim(self, candidates: Sequence[Node], costs: CostModel, clock: int) -> Node:
        """The candidate to evict next (``candidates`` is non-empty)."""
        ...


def branch_point(reuse_len: int, branch_len: int | None) -> tuple[int, ...]:
    """The admission Marconi and SGLang+ share during prefill: the branch point, when it lies past the reused
    prefix."""
    return (branch_len,) if branch_len is not None and branch_len > reuse_len else ()


class PerNodePriorityPolicy(Policy, Protocol):
    """A policy with ``per_node_priority = True``: ``choose_victim`` returns the candidate of lowest ``priority``."""

    def priority(self, node: Node) -> tuple[int, int]: ...
