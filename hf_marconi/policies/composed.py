"""A policy composed of an admission rule and an eviction rule."""

from __future__ import annotations

import copy
import dataclasses
from typing import Callable, Generic, Sequence, TypeVar

from hf_marconi.policies.base import AdmissionRule, CostModel, EvictionRule
from hf_marconi.tree import Node

A = TypeVar("A", bound=AdmissionRule)
E = TypeVar("E", bound=EvictionRule)


class ComposedPolicy(Generic[A, E]):
    """The :class:`~hf_marconi.policies.base.Policy` the store calls, made of ``admission`` (where to checkpoint) and
    ``eviction`` (what to refresh and drop): any admission rule runs with any eviction rule, e.g. Marconi's admission
    with LRU eviction. ``name`` defaults to the rules' class names. ``alpha`` is the eviction rule's (None when it
    has none); setting it sets the rule's. The rules are fixed for the policy's life."""

    def __init__(self, admission: A, eviction: E, name: str | None = None) -> None:
        self._admission = admission
        self._eviction = eviction
        self.name = name if name is not None else f"{type(admission).__name__}+{type(eviction).__name__}"
        # The rules' constants, copied: the store reads evicts_leaves_only for every eviction candidate it checks.
        self.max_new_checkpoints: int | None = admission.max_new_checkpoints
        self.evicts_leaves_only: bool = eviction.evicts_leaves_only
        self.per_node_priority: bool = eviction.per_node_priority

    @property
    def admission(self) -> A:
        return self._admission

    @property
    def eviction(self) -> E:
        return self._eviction

    def __repr__(self) -> str:
        return f"{type(self).__name__}(admission={self.admission!r}, eviction={self.eviction!r}, name={self.name!r})"

    @property
    def alpha(self) -> float | None:
        return getattr(self.eviction, "alpha", None)

    @alpha.setter
    def alpha(self, alpha: float) -> None:
        self._require_alpha()
        self.eviction.alpha = alpha  # type: ignore[attr-defined]

    def _require_alpha(self) -> None:
        if self.alpha is None:
            raise AttributeError(f"policy {self.name!r} has no alpha: its eviction rule {self.eviction!r} weighs none")

    def with_alpha(self, alpha: float) -> "ComposedPolicy[A, E]":
        """The same rules at ``alpha``, with none of this policy's state (memo, hit counts): what a tuner replays to
        learn how this policy would do at another alpha."""
        self._require_alpha()
        twin = copy.copy(self)  # the same class and attributes: a subclass's overrides replay too
        twin._eviction = dataclasses.replace(self.eviction, alpha=alpha)  # type: ignore[type-var]
        return twin

    # -------------------------------------------------------------------------------------------- admission
    def capture_positions(self, reuse_len: int, branch_len: int | None, input_len: int,
                          repeat_rate: float = 0.0) -> tuple[int, ...]:
        return self.admission.capture_positions(reuse_len, branch_len, input_len, repeat_rate)

    def keeps_end(self, input_len: int, end: int) -> bool:
        return self.admission.keeps_end(input_len, end)

    # --------------------------------------------------------------------------------------------- eviction
    def touch(self, path: Sequence[Node], reused: Node | None, clock: int) -> None:
        self.eviction.touch(path, reused, clock)

    def touch_inserted(self, path: Sequence[Node], clock: int) -> None:
        self.eviction.touch_inserted(path, clock)

    def record_hit(self, node: Node, clock: int) -> None:
        self.eviction.record_hit(node, clock)

    def choose_victim(self, candidates: Sequence[Node], costs: CostModel, clock: int) -> Node:
        return self.eviction.choose_victim(candidates, costs, clock)

    @property
    def priority(self) -> Callable[[Node], tuple[int, int]]:
        """The eviction rule's per-node priority (rules with ``per_node_priority`` only), handed out as is: the store's
        heap calls it for every candidate pushed or popped, without a detour through this object."""
        return self.eviction.priority  # type: ignore[attr-defined]
