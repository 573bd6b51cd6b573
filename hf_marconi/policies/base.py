"""The protocols of a policy: an admission rule (where to take checkpoints) and an eviction rule (what to refresh on
access, what to drop), which :class:`~hf_marconi.policies.composed.ComposedPolicy` joins into the :class:`Policy` the
store calls.

A rule never mutates the tree's structure: admission returns positions, eviction refreshes recency fields and picks a
victim among the candidates the store hands it. The store does the mutation (decide, then act). The tree holds no
policy value: a rule that memoises something per node keeps the memo itself (Marconi's, keyed by the tree's
structural version stamps).
"""

from __future__ import annotations

from typing import Protocol, Sequence

from hf_marconi.tree import Node


class CostModel(Protocol):
    """What the store and the policies need from :class:`hf_marconi.costs.CostModel`."""

    def extend_flops(self, prefix_len: int, extend_len: int) -> float: ...


class AdmissionRule(Protocol):
    """Where a request's states are checkpointed."""

    max_new_checkpoints: int | None  # checkpoints one request may add; None for no limit

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


class EvictionRule(Protocol):
    """What an access refreshes and which stored node goes first when the store needs room."""

    # Eviction candidates: unlocked leaves (True) or unlocked nodes with at most one child (False).
    evicts_leaves_only: bool
    # True when a node's eviction order is a pure function of the node (``priority``): the store then pops victims
    # from a heap instead of asking ``choose_victim`` to scan all candidates for every victim.
    per_node_priority: bool

    def touch(self, path: Sequence[Node], reused: Node | None, clock: int) -> None:
        """Refresh recency after a lookup: ``path`` are the fully matched nodes, ``reused`` the node reused (or None)."""
        ...

    def record_hit(self, node: Node, clock: int) -> None:
        """A request's lookup resumed from ``node``'s checkpoint (once per request, when its commit refreshes recency;
        not for a second plan of a request already counted)."""
        ...

    def touch_inserted(self, path: Sequence[Node], clock: int) -> None:
        """Refresh recency after a commit stored a sequence along ``path`` (new nodes already carry ``clock``)."""
        ...

    def choose_victim(self, candidates: Sequence[Node], costs: CostModel, clock: int) -> Node:
        """The candidate to evict next (``candidates`` is non-empty)."""
        ...


class PerNodePriority(EvictionRule, Protocol):
    """An eviction rule with ``per_node_priority = True``: ``choose_victim`` returns the candidate of lowest
    ``priority``."""

    def priority(self, node: Node) -> tuple[int, int]: ...


class Policy(AdmissionRule, EvictionRule, Protocol):
    """What the store calls: an admission rule and an eviction rule under one name. ``alpha`` is the FLOP-efficiency
    weight of an eviction rule that has one (Marconi's), else None; alpha tuners set it between requests and replay
    ``with_alpha`` copies to compare alphas."""

    name: str
    alpha: float | None

    def with_alpha(self, alpha: float) -> "Policy":
        """The same rules at ``alpha``, without this policy's state (policies that have an alpha only)."""
        ...
