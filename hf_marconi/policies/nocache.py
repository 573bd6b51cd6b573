"""No prefix cache: nothing is checkpointed, so nothing is stored and every request is a miss."""

from __future__ import annotations

from typing import Sequence

from hf_marconi.policies.base import CostModel
from hf_marconi.tree import Node


class NoCachePolicy:
    name = "no-cache"
    max_new_checkpoints = 0
    alpha = None
    evicts_leaves_only = True
    per_node_priority = False

    def capture_positions(self, reuse_len: int, branch_len: int | None, input_len: int,
                          repeat_rate: float = 0.0) -> tuple[int, ...]:
        return ()

    def keeps_end(self, input_len: int, end: int) -> bool:
        return False

    def touch(self, path: Sequence[Node], reused: Node | None, clock: int) -> None:
        return None

    def touch_inserted(self, path: Sequence[Node], clock: int) -> None:
        return None

    def choose_victim(self, candidates: Sequence[Node], costs: CostModel, clock: int) -> Node:
        raise RuntimeError("the no-cache policy stores nothing, so it never evicts")
