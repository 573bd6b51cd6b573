"""Token ids for traces that give hash ids of fixed-size token blocks instead of tokens: Mooncake's trace, and the
traces a ``hf_marconi.recording.TraceRecorder`` writes with a hash salt.

Every distinct hash id becomes its own block of synthetic token ids, drawn uniformly from a vocabulary by a generator
seeded with ``(seed, hash_id)``; a request's tokens are its blocks back to back, cut to its length. Equal hash ids
give equal blocks, so requests share exactly the prefixes their hash ids share. Two different blocks start with the
same id with probability 1 / vocabulary size, so spurious matches longer than a few tokens do not occur in practice.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain

from .shared_ints import SharedInts
from .synthetic import synthetic_ids

BLOCK_TOKENS = 512
# GPT-2's vocabulary size: what the built-in Mooncake trace draws from, so a Mooncake file read by the planner gives
# the same ids as the built-in trace.
VOCAB_SIZE = 50257


class BlockTokens:
    """Synthetic token ids per hash id (module docstring); blocks are made once and shared between requests."""

    def __init__(self, vocab_size: int = VOCAB_SIZE, seed: int = 0, block_tokens: int = BLOCK_TOKENS) -> None:
        if vocab_size < 2 or block_tokens < 1:
            raise ValueError(f"vocab_size must be >= 2 and block_tokens >= 1, got {vocab_size}, {block_tokens}")
        self.vocab_size = vocab_size
        self.seed = seed
        self.block_tokens = block_tokens
        self.shared = SharedInts()
        self._blocks: dict[int, tuple[int, ...]] = {}

    def block(self, hash_id: int) -> tuple[int, ...]:
        """The ids of the block ``hash_id`` (``block_tokens`` of them)."""
        block = self._blocks.get(hash_id)
        if block is None:
            block = self.shared.tuple_of(synthetic_ids(self.vocab_size, self.block_tokens, self.seed, hash_id))
            self._blocks[hash_id] = block
        return block

    def tokens(self, hash_ids: Sequence[int], length: int) -> tuple[int, ...]:
        """The first ``length`` ids of the blocks ``hash_ids`` back to back."""
        if length > len(hash_ids) * self.block_tokens:
            raise ValueError(f"{len(hash_ids)} blocks of {self.block_tokens} tokens cannot hold {length} tokens")
        return tuple(chain.from_iterable(self.block(h) for h in hash_ids))[:length]
