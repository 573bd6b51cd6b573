"""Two storage tiers for a MarconiCache: a fast tier (the layers' own device, e.g. the GPU) and a spill tier (CPU).

The store's ``capacity_bytes`` bounds both tiers together; the fast tier has its own, smaller capacity.
:class:`TieredStorage` is the store's placement (:class:`~hf_marconi.store.Placement`): after every commit and load
(and an abort that folded a node), the store has it keep the most recently used entries on the fast tier, as many as
fit its capacity (visited by recency, an entry that does not fit is skipped), and move the others' tensors to the
spill tier. A payload on a node is replaced through the tree by a moved copy of equal ``nbytes``, so the store's accounting and policy see no change.
A restore copies stored tensors to each layer's device from either tier, so spilled entries still hit.

Which tier a payload lies in is told by its type (:class:`SpilledKVEdge`, :class:`SpilledCheckpoint`), not by its
device, so the accounting is the same when both tiers are on one device (as in CPU-only tests).

::

    cache = MarconiCache(model, capacity_bytes=8 * 2**30)             # both tiers together
    tiers = TieredStorage(cache, fast_capacity_bytes=2 * 2**30)       # at most 2 GiB stay on the GPU
    ...
    tiers.tier_bytes()   # {"fast": ..., "spill": ...}
"""

from __future__ import annotations

import torch

from .cache import MarconiCache
from .states import DeviceSpec, KVEdge, StateCheckpoint, copy_to, map_payload
from .tree import Node, RadixTree


class SpilledKVEdge(KVEdge):
    """A :class:`KVEdge` on the spill tier; its splits and concatenations stay there."""

    def split(self, offset: int) -> tuple["SpilledKVEdge", "SpilledKVEdge"]:
        head, tail = KVEdge.split(self, offset)
        return SpilledKVEdge(head.num_tokens, head.kv), SpilledKVEdge(tail.num_tokens, tail.kv)

    def concat(self, tail: KVEdge) -> "SpilledKVEdge":
        merged = KVEdge.concat(self, tail)  # the tail's tensors join this edge's device
        return SpilledKVEdge(merged.num_tokens, merged.kv)


class SpilledCheckpoint(StateCheckpoint):
    """A :class:`StateCheckpoint` on the spill tier."""


def move_edge(edge: KVEdge, device: torch.device, spilled: bool) -> KVEdge:
    """A copy of ``edge`` with every tensor on ``device``, typed for its tier."""
    moved = map_payload(edge, lambda t: copy_to(t, device))
    return (SpilledKVEdge if spilled else KVEdge)(moved.num_tokens, moved.kv)


def move_checkpoint(checkpoint: StateCheckpoint, device: torch.device, spilled: bool) -> StateCheckpoint:
    """A copy of ``checkpoint`` with every tensor on ``device``, typed for its tier."""
    moved = map_payload(checkpoint, lambda t: copy_to(t, device))
    return (SpilledCheckpoint if spilled else StateCheckpoint)(moved.conv, moved.recurrent, moved.windows)


def _spilled_bytes(node: Node) -> int:
    """Bytes of ``node``'s payloads that lie on the spill tier (an eviction's merge may leave the edge on one tier and
    the checkpoint on the other until the next rebalance)."""
    spilled = node.edge.nbytes if isinstance(node.edge, SpilledKVEdge) else 0
    return spilled + (node.checkpoint.nbytes if isinstance(node.checkpoint, SpilledCheckpoint) else 0)


def _on_tier(node: Node, spilled: bool) -> bool:
    """Whether every payload of ``node`` lies on the given tier."""
    on_spill = isinstance(node.edge, SpilledKVEdge) and (
        node.checkpoint is None or isinstance(node.checkpoint, SpilledCheckpoint)
    )
    on_fast = not isinstance(node.edge, SpilledKVEdge) and not isinstance(node.checkpoint, SpilledCheckpoint)
    return on_spill if spilled else on_fast


class TieredStorage:
    """Keeps a MarconiCache's most recently used entries within ``fast_capacity_bytes`` on the fast tier and the rest
    on the spill tier.

    Args:
        cache: the cache whose store it manages. Its ``storage_device`` must be None (new states are stored on each
            layer's device: the fast tier); the store's ``capacity_bytes`` bounds both tiers together.
        fast_capacity_bytes: the most bytes the fast tier holds after any commit (at most the store's capacity).
        fast_device: where fast-tier tensors live (default: the model's device).
        spill_device: where spilled tensors live (default: ``"cpu"``).

    It registers itself as the store's placement (``store.set_placement``, one per store): the store calls
    :meth:`place` after every commit and load and after an abort that folded a node, and once at registration for the
    entries stored already.
    Moving an edge that an eviction later concatenates with one on the other tier needs ``KVEdge.concat`` to put both
    on one device (the spill tier's concatenations do).
    """

    def __init__(
        self,
        cache: MarconiCache,
        fast_capacity_bytes: int,
        fast_device: DeviceSpec = None,
        spill_device: DeviceSpec = "cpu",
    ) -> None:
        capacity = cache.store.capacity_bytes
        if not isinstance(fast_capacity_bytes, int) or not 0 <= fast_capacity_bytes <= capacity:
            raise ValueError(
                f"fast_capacity_bytes must be an int in [0, {capacity}] (the store's capacity, both tiers together); "
                f"got {fast_capacity_bytes!r}"
            )
        if cache.storage_device is not None:
            raise ValueError(
                f"the cache stores new states on {cache.storage_device!r}; build it with storage_device=None so that "
                "new states start on the fast tier"
            )
        self.cache = cache
        self.fast_capacity_bytes = fast_capacity_bytes
        self.fast_device = torch.device(fast_device) if fast_device is not None else cache.input_device
        self.spill_device = torch.device(spill_device)
        self.moves_to_spill = 0
        self.moves_to_fast = 0
        cache.store.set_placement(self)

    @property
    def spill_capacity_bytes(self) -> int:
        """Room of the spill tier: the store's capacity less the fast tier's."""
        return self.cache.store.capacity_bytes - self.fast_capacity_bytes

    def tier_bytes(self) -> dict[str, int]:
        """Bytes of stored payloads per tier."""
        with self.cache.store.lock:
            spilled = sum(_spilled_bytes(n) for n in self.cache.store.tree.nodes())
            return {"fast": self.cache.store.nbytes - spilled, "spill": spilled}

    def rebalance(self) -> None:
        """Place the store's entries now (the store does so itself after every commit and load and after an abort that
        folded a node)."""
        store = self.cache.store
        with store.lock:
            self.place(store.tree)

    def place(self, tree: RadixTree) -> None:
        """Fill the fast tier with the most recently used entries that fit and spill the others (promoting spilled
        entries that became recent). Called by the store with its lock held (requests in flight keep the payloads
        they restored)."""
        nodes = sorted(tree.nodes(), key=lambda n: (-n.last_access, n.depth, n.uid))
        room = self.fast_capacity_bytes
        for node in nodes:
            keep_fast = node.nbytes <= room
            if keep_fast:
                room -= node.nbytes
            if not _on_tier(node, spilled=not keep_fast):
                self._move(tree, node, spilled=not keep_fast)

    def _move(self, tree: RadixTree, node: Node, spilled: bool) -> None:
        device = self.spill_device if spilled else self.fast_device
        assert node.edge is not None
        edge = move_edge(node.edge, device, spilled)  # type: ignore[arg-type]
        checkpoint = move_checkpoint(node.checkpoint, device, spilled) if node.checkpoint is not None else None
        tree.replace_payloads(node, edge, checkpoint)
        if spilled:
            self.moves_to_spill += 1
        else:
            self.moves_to_fast += 1
