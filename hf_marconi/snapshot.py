"""The store's tree as a list of entries (parents first) and back: the one form persistence saves and alpha tuning
replays from (:class:`StoreSnapshot`), and the validating builder a loaded file goes through."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

from hf_marconi.tree import (
    INPUT_OUTPUT,
    PURELY_INPUT,
    EdgePayload,
    Node,
    Payload,
    RadixTree,
    SimulatedCheckpoint,
    SimulatedEdge,
)


@dataclass(frozen=True)
class StoredEntry:
    """One stored node, as a :class:`StoreSnapshot` lists it.

    The payloads are the store's own objects and must not be mutated (copy out of them): stored payloads are replaced,
    never written in place.
    """

    prefix_len: int  # tokens from the root to the end of this node's edge
    key: tuple[int, ...]  # the edge's tokens (non-empty)
    parent: int  # index of the parent entry in the list, -1 for the root
    edge: EdgePayload  # per-token state (attention KV) of the key's tokens
    checkpoint: Payload | None  # fixed-size states valid at prefix_len, or None
    origin: str | None  # "purely_input" or "input_output" when a checkpoint is held, else None
    last_access: int  # the store's logical clock at the last access


@dataclass(frozen=True)
class StoreSnapshot:
    """Every stored entry at one moment (parents before children) and the store's logical clock.

    What persistence saves and :meth:`PrefixStore.load_snapshot` rebuilds a live store from, and what alpha tuning
    replays from (:meth:`PrefixStore.from_snapshot` reduces the payloads to byte counts)."""

    entries: tuple[StoredEntry, ...]
    clock: int

    def simulated(self) -> "StoreSnapshot":
        """The same entries with byte counts in place of their payloads (:class:`SimulatedEdge`,
        :class:`SimulatedCheckpoint`, same bytes): keeping it keeps no stored state alive after the store evicts it."""
        return StoreSnapshot(tuple(_simulated(entry) for entry in self.entries), self.clock)


def entries_of(tree: RadixTree, sizes_only: bool = False) -> tuple[StoredEntry, ...]:
    """Every node of ``tree``, parents before children (depth-first, children in key order); the caller holds the
    store's lock. ``sizes_only``: byte counts in place of the payloads (what a tuner replays from).

    A checkpoint-less node with one child, which a request in flight keeps from folding into its child after an
    eviction, is listed folded (its key and edge joined to the child's), so the entries always keep the structure rule
    :meth:`~hf_marconi.store.PrefixStore.load_snapshot` checks."""
    index = {tree.root.uid: -1}  # node uid -> its entry's index (a folded node: its parent's entry)
    folded: dict[int, tuple[tuple[int, ...], EdgePayload]] = {}  # folded node uid -> the key and edge it hands down
    out: list[StoredEntry] = []
    for node in tree.nodes():
        assert node.parent is not None and node.edge is not None
        key, edge, checkpoint = node.key, node.edge, node.checkpoint
        if sizes_only:  # before folding: a fold then joins byte counts, not stored tensors
            edge, checkpoint = _simulated_payloads(node.depth, key, edge, checkpoint)
        head = folded.pop(node.parent.uid, None)
        if head is not None:
            key, edge = head[0] + key, head[1].concat(edge)
        if node.checkpoint is None and len(node.children) == 1:
            index[node.uid] = index[node.parent.uid]
            folded[node.uid] = (key, edge)
            continue
        index[node.uid] = len(out)
        out.append(StoredEntry(node.depth, key, index[node.parent.uid], edge, checkpoint, node.origin,
                               node.last_access))
    return tuple(out)


def _simulated(entry: StoredEntry) -> StoredEntry:
    """``entry`` with byte counts of its payloads' sizes in place of the payloads."""
    edge, checkpoint = _simulated_payloads(entry.prefix_len, entry.key, entry.edge, entry.checkpoint)
    return replace(entry, edge=edge, checkpoint=checkpoint)


def _simulated_payloads(prefix_len: int, key: tuple[int, ...], edge: EdgePayload,
                        checkpoint: Payload | None) -> tuple[SimulatedEdge, SimulatedCheckpoint | None]:
    """Byte counts of the same sizes as ``edge`` (``key``'s tokens) and ``checkpoint``."""
    tokens, edge_bytes = len(key), edge.nbytes
    if edge_bytes % tokens:
        raise ValueError(f"the edge at prefix length {prefix_len} holds {edge_bytes} bytes for {tokens} tokens; "
                         "a simulated edge holds the same bytes for every token")
    return (SimulatedEdge(tokens, edge_bytes // tokens),
            SimulatedCheckpoint(checkpoint.nbytes) if checkpoint is not None else None)


def tree_from_entries(entries: Sequence[StoredEntry]) -> RadixTree:
    """A new tree holding ``entries``; raises ValueError naming the first invalid entry. The structure rule (no
    checkpoint-less node with fewer than two children) is left to the caller: ``load_snapshot`` checks it on what a
    file holds, while a store's own snapshots keep it by construction (:func:`entries_of`)."""
    tree = RadixTree()
    built: list[Node] = []
    for i, entry in enumerate(entries):
        where = f"entry {i} (prefix_len {getattr(entry, 'prefix_len', '?')})"
        if not isinstance(entry, StoredEntry):
            raise ValueError(f"{where} is a {type(entry).__name__}, expected StoredEntry")
        if not entry.key:
            raise ValueError(f"{where} has an empty key; every stored edge holds at least one token")
        if not -1 <= entry.parent < i:
            raise ValueError(f"{where} names parent {entry.parent}; a parent must be listed before its child (or -1)")
        parent = tree.root if entry.parent < 0 else built[entry.parent]
        if entry.prefix_len != parent.depth + len(entry.key):
            raise ValueError(f"{where}: prefix_len should be the parent's {parent.depth} + {len(entry.key)} key tokens")
        if entry.key[0] in parent.children:
            raise ValueError(f"{where} starts with the same token as a sibling; siblings must differ in their first token")
        if not isinstance(entry.edge, EdgePayload) or entry.edge.nbytes < 0:
            raise ValueError(f"{where} has no valid edge payload (needs nbytes >= 0, split, concat)")
        num_tokens = getattr(entry.edge, "num_tokens", len(entry.key))
        if num_tokens != len(entry.key):
            raise ValueError(f"{where}: the edge payload holds {num_tokens} tokens for a {len(entry.key)}-token key")
        if (entry.checkpoint is None) != (entry.origin is None) or entry.origin not in (None, PURELY_INPUT, INPUT_OUTPUT):
            raise ValueError(f"{where}: origin must be {PURELY_INPUT!r} or {INPUT_OUTPUT!r} exactly when a checkpoint is "
                             f"held, got checkpoint {entry.checkpoint!r} with origin {entry.origin!r}")
        if entry.checkpoint is not None and (not isinstance(entry.checkpoint, Payload) or entry.checkpoint.nbytes < 0):
            raise ValueError(f"{where} has an invalid checkpoint payload (needs nbytes >= 0)")
        node = tree.add_leaf(parent, entry.key, entry.edge, entry.last_access)
        if entry.checkpoint is not None:
            tree.set_checkpoint(node, entry.checkpoint, entry.origin, entry.last_access)
        built.append(node)
    return tree
