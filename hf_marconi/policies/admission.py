"""Admission rules: where a request's states are checkpointed (:class:`~hf_marconi.policies.base.AdmissionRule`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

# Marconi's default share of recent lookups repeating a stored prompt above which the prompt's end is checkpointed.
REPEAT_THRESHOLD = 0.05


def branch_point(reuse_len: int, branch_len: int | None) -> tuple[int, ...]:
    """The admission Marconi and SGLang+ share during prefill: the branch point, when it lies past the reused
    prefix."""
    return (branch_len,) if branch_len is not None and branch_len > reuse_len else ()


@dataclass(frozen=True)
class BranchPointAdmission:
    """SGLang+'s: a checkpoint at the branch point speculative insertion finds and one at the end of each sequence (at
    most two per request)."""

    max_new_checkpoints: ClassVar[int | None] = 2

    def capture_positions(self, reuse_len: int, branch_len: int | None, input_len: int,
                          repeat_rate: float = 0.0) -> tuple[int, ...]:
        return branch_point(reuse_len, branch_len)

    def keeps_end(self, input_len: int, end: int) -> bool:
        return True


@dataclass(frozen=True)
class MarconiAdmission:
    """Marconi's: the branch point (purely-input reuse) and the sequence end (input+output reuse); when at least
    ``repeat_threshold`` of recent lookups found their whole prompt stored (a workload that repeats prompts), also the
    prompt's last token but one, so that a prompt hits on its second occurrence rather than its third (None: never).
    At most three per request."""

    repeat_threshold: float | None = REPEAT_THRESHOLD
    max_new_checkpoints: ClassVar[int | None] = 3

    def __post_init__(self) -> None:
        if self.repeat_threshold is not None and not 0 < self.repeat_threshold <= 1:
            raise ValueError(f"repeat_threshold is a share of lookups in (0, 1] (or None), got {self.repeat_threshold}")

    def capture_positions(self, reuse_len: int, branch_len: int | None, input_len: int,
                          repeat_rate: float = 0.0) -> tuple[int, ...]:
        positions = branch_point(reuse_len, branch_len)
        prompt_end = input_len - 1
        if (self.repeat_threshold is not None and repeat_rate >= self.repeat_threshold and prompt_end > reuse_len
                and prompt_end not in positions):
            positions += (prompt_end,)  # so that the prompt's next occurrence hits all but its last token
        return positions

    def keeps_end(self, input_len: int, end: int) -> bool:
        return True


@dataclass(frozen=True)
class BlockAdmission:
    """vLLM+'s: a checkpoint at every ``block_size``-token boundary of the prompt, and at the end of what was fed when
    it falls on one, so any block-aligned prefix can be resumed; tokens past the last full block are not kept (as vLLM
    caches full blocks only). Unlike vLLM, no state is taken at the block boundaries passed while decoding: a generate
    call hands over none (the simulator follows the live call)."""

    block_size: int = 32
    max_new_checkpoints: ClassVar[int | None] = None

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be a positive number of tokens, got {self.block_size}")

    def capture_positions(self, reuse_len: int, branch_len: int | None, input_len: int,
                          repeat_rate: float = 0.0) -> tuple[int, ...]:
        first = (reuse_len // self.block_size + 1) * self.block_size  # block boundaries in (reuse_len, input_len - 1]
        return tuple(range(first, input_len, self.block_size))

    def keeps_end(self, input_len: int, end: int) -> bool:
        return end % self.block_size == 0  # decoding passes block boundaries, but only its end can be captured


@dataclass(frozen=True)
class NoAdmission:
    """No prefix cache: nothing is checkpointed, so nothing is stored."""

    max_new_checkpoints: ClassVar[int | None] = 0

    def capture_positions(self, reuse_len: int, branch_len: int | None, input_len: int,
                          repeat_rate: float = 0.0) -> tuple[int, ...]:
        return ()

    def keeps_end(self, input_len: int, end: int) -> bool:
        return False
