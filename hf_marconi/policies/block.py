"""vLLM+: a checkpoint at every block boundary (prefix caching in fixed-size blocks), LRU eviction of leaf blocks."""

from __future__ import annotations

from dataclasses import dataclass

from hf_marconi.policies.lru import LRUEviction


@dataclass
class BlockPolicy(LRUEviction):
    """vLLM+ of the Marconi paper: recurrent states checkpointed at every ``block_size``-token boundary of the prompt
    (and at the end of decoding when it falls on one), so any block-aligned prefix can be resumed; tokens past the last
    full block are not kept (as vLLM caches full blocks only). Unlike vLLM, no state is taken at the block boundaries
    passed while decoding: a generate call hands over none (the simulator follows the live call).
    Eviction takes the least recently used leaf; every node on an accessed path is refreshed."""

    block_size: int = 32
    name: str = "vllm+"
    max_new_checkpoints: int | None = None
    alpha: float | None = None
    evicts_leaves_only: bool = True
    per_node_priority: bool = True

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be a positive number of tokens, got {self.block_size}")

    def _boundaries(self, low: int, high: int) -> tuple[int, ...]:
        """Block boundaries in ``(low, high]``."""
        first = (low // self.block_size + 1) * self.block_size
        return tuple(range(first, high + 1, self.block_size))

    def capture_positions(self, reuse_len: int, branch_len: int | None, input_len: int,
                          repeat_rate: float = 0.0) -> tuple[int, ...]:
        return self._boundaries(reuse_len, input_len - 1)

    def keeps_end(self, input_len: int, end: int) -> bool:
        return end % self.block_size == 0  # decoding passes block boundaries, but only its end can be captured

