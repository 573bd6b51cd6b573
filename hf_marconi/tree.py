"""A radix tree over token ids whose edges and nodes own opaque state payloads.

The tree knows nothing about tensors: an edge owns an :class:`EdgePayload` holding the per-token state of its tokens
(attention KV), a node may own a :class:`Payload` checkpoint of the fixed-size states (conv + recurrent) valid at its
prefix length. The live cache stores tensors in them, the simulator byte counts (:class:`SimulatedEdge`,
:class:`SimulatedCheckpoint`); the tree only asks for ``nbytes``, ``split`` and ``concat``.

Structure kept by the store (checked by :meth:`RadixTree.check_invariants`): apart from nodes on a locked path, every
non-root node either holds a checkpoint or has at least two children. A node without a checkpoint and with one child
adds nothing a lookup could use, and a leaf without a checkpoint holds KV no lookup can resume from.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterator, Protocol, Sequence, runtime_checkable

# Where a checkpoint came from (``Node.origin``): inside a prompt (a branch point, reused by other prompts sharing it) or
# at the end of what a request fed (reused when the same conversation continues).
PURELY_INPUT = "purely_input"
INPUT_OUTPUT = "input_output"


@runtime_checkable
class Payload(Protocol):
    """A checkpoint: the fixed-size states valid at one prefix length."""

    @property
    def nbytes(self) -> int: ...


@runtime_checkable
class EdgePayload(Payload, Protocol):
    """The per-token state (attention KV) of an edge's tokens."""

    def split(self, offset: int) -> tuple["EdgePayload", "EdgePayload"]:
        """Tokens ``[:offset]`` and ``[offset:]``."""
        ...

    def concat(self, tail: "EdgePayload") -> "EdgePayload":
        """This payload's tokens followed by ``tail``'s."""
        ...


@dataclass(frozen=True)
class SimulatedCheckpoint:
    """A checkpoint that is only a byte count."""

    nbytes: int


@dataclass(frozen=True)
class SimulatedEdge:
    """The KV of ``num_tokens`` tokens, as a byte count."""

    num_tokens: int
    bytes_per_token: int

    @property
    def nbytes(self) -> int:
        return self.num_tokens * self.bytes_per_token

    def split(self, offset: int) -> tuple["SimulatedEdge", "SimulatedEdge"]:
        if not 0 < offset < self.num_tokens:
            raise ValueError(f"split offset {offset} must lie inside the edge's {self.num_tokens} tokens")
        return (SimulatedEdge(offset, self.bytes_per_token), SimulatedEdge(self.num_tokens - offset, self.bytes_per_token))

    def concat(self, tail: "EdgePayload") -> "SimulatedEdge":
        if not isinstance(tail, SimulatedEdge) or tail.bytes_per_token != self.bytes_per_token:
            raise TypeError("a SimulatedEdge can only be concatenated with a SimulatedEdge of the same bytes_per_token")
        return SimulatedEdge(self.num_tokens + tail.num_tokens, self.bytes_per_token)


_node_ids = itertools.count()


class Node:
    """One node of the radix tree: the edge from its parent and an optional checkpoint at its prefix length.

    Invariants (checked by :meth:`RadixTree.check_invariants`):
        ``depth == parent.depth + len(key)``; ``parent.children[key[0]] is self``;
        ``lock_ref >= child.lock_ref`` for every child (a lock covers a whole root-to-node path).
    """

    __slots__ = ("uid", "key", "edge", "checkpoint", "origin", "children", "parent", "depth", "last_access", "lock_ref",
                 "nbytes", "version", "__weakref__")  # weak refs: policies keep per-node state keyed by node

    def __init__(self, key: tuple[int, ...], edge: EdgePayload | None, parent: "Node | None", last_access: int):
        self.uid = next(_node_ids)  # creation order: a deterministic tie-breaker
        self.key = key  # the edge's tokens
        self.edge = edge  # their per-token state; None only at the root
        self.checkpoint: Payload | None = None
        self.origin: str | None = None  # "purely_input" or "input_output": how the checkpoint was admitted
        self.children: dict[int, Node] = {}  # first token of the child's key -> child
        self.parent = parent
        self.depth = (parent.depth if parent is not None else 0) + len(key)
        self.last_access = last_access  # logical clock, never wall time
        self.lock_ref = 0
        self.nbytes = edge.nbytes if edge is not None else 0  # its edge's KV and its checkpoint, kept by the tree
        # Structural version stamp: bumped whenever the node's edge or checkpoint, whether it has children, or its
        # nearest ancestor holding a checkpoint changes, so that a value derived from those can be memoised by
        # (uid, version) outside the tree.
        self.version = 0

    @property
    def is_leaf(self) -> bool:
        return not self.children

    def path(self) -> list["Node"]:
        """Nodes from the root's first child down to this node (empty for the root)."""
        nodes = []
        node: Node | None = self
        while node is not None and node.parent is not None:
            nodes.append(node)
            node = node.parent
        nodes.reverse()
        return nodes

    def __repr__(self) -> str:
        ckpt = "ckpt" if self.checkpoint is not None else "-"
        return f"Node(uid={self.uid}, depth={self.depth}, edge_len={len(self.key)}, {ckpt}, lock={self.lock_ref})"


@dataclass(frozen=True)
class Match:
    """Result of walking a token sequence down the tree.

    Attributes:
        path: fully matched nodes, root excluded, shallowest first.
        matched_len: tokens matched, including a partial match into the next edge.
        partial: the node whose edge the match ends inside (``matched_len < partial.depth``), or None.
    """

    path: tuple[Node, ...]
    matched_len: int
    partial: Node | None

    @property
    def deepest(self) -> Node | None:
        """The deepest node the match reaches into (partially or fully), None for an empty match."""
        if self.partial is not None:
            return self.partial
        return self.path[-1] if self.path else None


def common_prefix_len(key: tuple[int, ...], tokens: Sequence[int], start: int = 0) -> int:
    """Length of the common prefix of ``key`` and ``tokens[start:]``."""
    n = min(len(key), len(tokens) - start)
    if tuple(tokens[start : start + n]) == key[:n]:
        return n
    lo, hi = 0, n  # key[:lo] matches, key[:hi] does not: bisect on slice equality (C speed on long edges)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if tuple(tokens[start + lo : start + mid]) == key[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


class LockReceipt:
    """Proof that a root-to-node path was locked; hand it back to :meth:`RadixTree.unlock` exactly once."""

    __slots__ = ("node", "released")

    def __init__(self, node: Node):
        self.node = node
        self.released = False


class RadixTree:
    """The tree, its byte count and the pools eviction draws from: nodes with at most one child, and leaves."""

    def __init__(self) -> None:
        self.root = Node((), None, None, last_access=0)
        self.nbytes = 0
        self.thin: dict[int, Node] = {}  # uid -> non-root node with at most one child
        self.leaves: dict[int, Node] = {}  # uid -> non-root node without children

    # ----------------------------------------------------------------------------------------------- lookup
    def match(self, tokens: Sequence[int], start: Node | None = None) -> Match:
        """Walk ``tokens`` from the root as far as they agree with stored edges. With ``start``, the caller vouches that
        ``tokens`` begin with ``start``'s prefix, and the walk resumes there (saves comparing long reused prefixes)."""
        node = start if start is not None else self.root
        pos, path = node.depth, node.path()
        while pos < len(tokens):
            child = node.children.get(tokens[pos])
            if child is None:
                break
            common = common_prefix_len(child.key, tokens, pos)
            pos += common
            if common < len(child.key):
                return Match(tuple(path), pos, child)
            path.append(child)
            node = child
        return Match(tuple(path), pos, None)

    def walk_to(self, tokens: Sequence[int], positions: Sequence[int]) -> list[Node]:
        """Nodes ending exactly at each of ``positions`` (ascending) along the stored path of ``tokens``, splitting edges
        where a position falls inside one. The path must already be stored up to ``max(positions)``."""
        nodes, node = [], self.root
        for pos in positions:
            while node.depth < pos:
                child = node.children.get(tokens[node.depth])
                if child is None:
                    raise KeyError(f"position {pos} is past the stored path (stored up to {node.depth})")
                if child.depth > pos:
                    child = self.split(child, pos - node.depth)
                node = child
            if node.depth != pos:
                raise ValueError(f"positions must be ascending and positive, got {list(positions)}")
            nodes.append(node)
        return nodes

    # ------------------------------------------------------------------------------------------- mutation
    @staticmethod
    def _bump_versions_below(node: Node) -> None:
        """Bump the version of the descendants whose nearest checkpointed ancestor is ``node`` or lies above it: those
        reached through checkpoint-less nodes (branch points, rare)."""
        stack = list(node.children.values())
        while stack:
            below = stack.pop()
            below.version += 1
            if below.checkpoint is None:
                stack.extend(below.children.values())

    def _update_thin(self, node: Node) -> None:
        if node.parent is not None and len(node.children) <= 1:
            self.thin[node.uid] = node
        else:
            self.thin.pop(node.uid, None)
        if node.parent is not None and not node.children:
            self.leaves[node.uid] = node
        else:
            self.leaves.pop(node.uid, None)

    def split(self, node: Node, offset: int) -> Node:
        """Split ``node``'s edge after ``offset`` tokens; returns the new upper node (no checkpoint)."""
        if not 0 < offset < len(node.key):
            raise ValueError(f"split offset {offset} must lie inside the edge's {len(node.key)} tokens")
        parent = node.parent
        assert parent is not None and node.edge is not None
        old_edge_bytes = node.edge.nbytes
        head_edge, tail_edge = node.edge.split(offset)
        upper = Node(node.key[:offset], head_edge, parent, node.last_access)
        upper.lock_ref = node.lock_ref  # every lock through node passes through upper
        parent.children[upper.key[0]] = upper
        node.key = node.key[offset:]
        node.edge = tail_edge
        node.parent = upper
        node.nbytes += tail_edge.nbytes - old_edge_bytes
        node.version += 1
        self.nbytes += head_edge.nbytes + tail_edge.nbytes - old_edge_bytes
        upper.children[node.key[0]] = node
        self._update_thin(upper)
        return upper

    def add_leaf(self, parent: Node, key: tuple[int, ...], edge: EdgePayload, clock: int) -> Node:
        """Attach a new leaf under ``parent`` (whose children must not start with ``key[0]``)."""
        if not key:
            raise ValueError("a leaf needs at least one token")
        if key[0] in parent.children:
            raise ValueError("parent already has a child starting with this token; split it instead")
        leaf = Node(key, edge, parent, clock)
        parent.children[key[0]] = leaf
        parent.version += 1
        self.nbytes += edge.nbytes
        self._update_thin(parent)
        self._update_thin(leaf)
        return leaf

    def add_chain(self, parent: Node, keys: Sequence[tuple[int, ...]], edges: Sequence[EdgePayload],
                  clock: int) -> list[Node]:
        """Attach new nodes under ``parent``, each the only child of the one before (as repeated :meth:`add_leaf`
        would, with the candidate pools updated once per node); returns them top down."""
        if len(keys) != len(edges) or not keys:
            raise ValueError(f"a chain needs one edge per key and at least one node, got {len(keys)} and {len(edges)}")
        if any(not key for key in keys):
            raise ValueError("every node of a chain needs at least one token")
        if keys[0][0] in parent.children:
            raise ValueError("parent already has a child starting with this token; split it instead")
        nodes, node = [], parent
        for key, edge in zip(keys, edges):
            child = Node(key, edge, node, clock)
            node.children[key[0]] = child
            self.nbytes += edge.nbytes
            nodes.append(child)
            if node is not parent:
                self.thin[node.uid] = node  # one child: a candidate for single-child eviction, not a leaf
            node = child
        parent.version += 1
        self._update_thin(parent)
        self._update_thin(node)
        return nodes

    def set_checkpoint(self, node: Node, checkpoint: Payload, origin: str, clock: int) -> None:
        if node is self.root:
            raise ValueError("the root (empty prefix) cannot hold a checkpoint")
        if node.checkpoint is not None:
            raise ValueError(f"{node} already holds a checkpoint")
        node.checkpoint = checkpoint
        node.origin = origin
        node.last_access = clock
        node.nbytes += checkpoint.nbytes
        node.version += 1
        self._bump_versions_below(node)
        self.nbytes += checkpoint.nbytes

    def replace_payloads(self, node: Node, edge: EdgePayload, checkpoint: Payload | None) -> None:
        """Put ``edge`` and ``checkpoint`` in place of ``node``'s payloads (copies held elsewhere, e.g. on another
        storage tier). Refuses (ValueError) a replacement that changes what the node holds: its tokens, whether it has
        a checkpoint, or either payload's bytes, so the byte accounting (and any score of the node) stays true."""
        if node.parent is None or node.edge is None:
            raise ValueError(f"{node} is the root or no longer in the tree: it holds no payloads to replace")
        num_tokens = getattr(edge, "num_tokens", len(node.key))
        if num_tokens != len(node.key):
            raise ValueError(f"the new edge payload holds {num_tokens} tokens for the {len(node.key)}-token key of "
                             f"{node}")
        if (checkpoint is None) != (node.checkpoint is None):
            raise ValueError(f"replacing the payloads of {node} would add or drop its checkpoint; use set_checkpoint "
                             "or evict it instead")
        old = (node.edge.nbytes, node.checkpoint.nbytes if node.checkpoint is not None else 0)
        new = (edge.nbytes, checkpoint.nbytes if checkpoint is not None else 0)
        if new != old:
            raise ValueError(f"replacing the payloads of {node} would change their bytes (edge, checkpoint) from {old} "
                             f"to {new}; a replacement must hold the same bytes")
        node.edge = edge
        node.checkpoint = checkpoint

    def remove_leaf(self, node: Node) -> int:
        """Drop a leaf with its edge and checkpoint; returns the bytes freed."""
        if node.children or node.parent is None or node.lock_ref:
            raise ValueError(f"{node} is not an unlocked leaf")
        freed = node.nbytes
        parent = node.parent
        del parent.children[node.key[0]]
        parent.version += 1
        self.thin.pop(node.uid, None)
        self.leaves.pop(node.uid, None)
        self._update_thin(parent)
        node.parent = None
        self.nbytes -= freed
        return freed

    def merge_into_child(self, node: Node) -> int:
        """Drop the checkpoint of a single-child node and fold its edge into the child; returns the bytes freed."""
        if len(node.children) != 1 or node.parent is None or node.lock_ref:
            raise ValueError(f"{node} is not an unlocked single-child node")
        (child,) = node.children.values()
        freed = node.checkpoint.nbytes if node.checkpoint is not None else 0
        parent = node.parent
        assert node.edge is not None and child.edge is not None
        old_edge_bytes = node.edge.nbytes + child.edge.nbytes
        child.key = node.key + child.key
        child.edge = node.edge.concat(child.edge)
        child.parent = parent
        child.nbytes += child.edge.nbytes - old_edge_bytes + node.edge.nbytes
        child.version += 1
        if node.checkpoint is not None:
            self._bump_versions_below(child)
        freed += old_edge_bytes - child.edge.nbytes
        parent.children[child.key[0]] = child
        self.thin.pop(node.uid, None)
        node.parent = None
        self.nbytes -= freed
        return freed

    def compact(self, node: Node) -> bool:
        """Restore the structure rule at ``node`` and upwards: an unlocked checkpoint-less node with one child is merged
        into it, one with no child is removed (its KV cannot be resumed from). Returns whether any node went."""
        changed = False
        while node.parent is not None and node.checkpoint is None and node.lock_ref == 0 and len(node.children) <= 1:
            parent = node.parent
            if node.children:
                self.merge_into_child(node)
            else:
                self.remove_leaf(node)
            node, changed = parent, True
        return changed

    def lock(self, node: Node) -> LockReceipt:
        """Protect the path root..node against eviction until the receipt is handed to :meth:`unlock`."""
        walker: Node | None = node
        while walker is not None:
            walker.lock_ref += 1
            walker = walker.parent
        return LockReceipt(node)

    def unlock(self, receipt: LockReceipt) -> None:
        if receipt.released:
            raise RuntimeError("this lock was already released; release each plan exactly once")
        receipt.released = True
        walker: Node | None = receipt.node
        while walker is not None:
            walker.lock_ref -= 1
            walker = walker.parent

    # -------------------------------------------------------------------------------------------- queries
    def nodes(self) -> Iterator[Node]:
        """Every non-root node, depth-first, children in key order (deterministic)."""
        stack = [self.root]
        while stack:
            node = stack.pop()
            if node is not self.root:
                yield node
            stack.extend(node.children[k] for k in sorted(node.children, reverse=True))

    def prefix_tokens(self, node: Node) -> tuple[int, ...]:
        return tuple(itertools.chain.from_iterable(n.key for n in node.path()))

    def checkpointed_prefixes(self) -> dict[tuple[int, ...], Payload]:
        """Every stored checkpoint keyed by the token prefix it is valid for."""
        return {self.prefix_tokens(n): n.checkpoint for n in self.nodes() if n.checkpoint is not None}

    def locked_bytes(self) -> int:
        """Bytes no eviction can free: those of nodes on locked paths."""
        return sum(n.nbytes for n in self.nodes() if n.lock_ref > 0)

    def check_invariants(self) -> None:
        """Raise AssertionError naming the first broken structural invariant."""
        total = 0
        thin = {}
        for node in self.nodes():
            parent = node.parent
            if parent is None or parent.children.get(node.key[0]) is not node:
                raise AssertionError(f"parent link broken at {node}")
            if node.depth != parent.depth + len(node.key) or not node.key:
                raise AssertionError(f"depth or key broken at {node}")
            if node.lock_ref < 0 or parent.lock_ref < node.lock_ref:
                raise AssertionError(f"lock counts broken at {node}: parent {parent.lock_ref}, node {node.lock_ref}")
            num_tokens = getattr(node.edge, "num_tokens", len(node.key))
            if num_tokens != len(node.key):
                raise AssertionError(f"edge payload of {node} holds {num_tokens} tokens for a {len(node.key)}-token key")
            if node.checkpoint is None and node.lock_ref == 0 and len(node.children) <= 1:
                raise AssertionError(f"structure rule broken: unlocked {node} has no checkpoint and <= 1 child")
            if (node.checkpoint is None) != (node.origin is None):
                raise AssertionError(f"checkpoint origin broken at {node}")
            if len(node.children) <= 1:
                thin[node.uid] = node
            held = node.edge.nbytes + (node.checkpoint.nbytes if node.checkpoint is not None else 0)
            if node.nbytes != held:
                raise AssertionError(f"byte count of {node} is {node.nbytes}, its payloads hold {held}")
            total += held
        if self.root.lock_ref < 0:
            raise AssertionError("root lock count is negative")
        if total != self.nbytes:
            raise AssertionError(f"byte accounting broken: entries hold {total}, tree counts {self.nbytes}")
        if thin.keys() != self.thin.keys():
            raise AssertionError("eviction candidate pool differs from the nodes with at most one child")
        if {uid for uid, n in thin.items() if not n.children} != self.leaves.keys():
            raise AssertionError("leaf pool differs from the nodes without children")
