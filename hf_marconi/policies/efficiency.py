"""A node's FLOP efficiency (what Marconi's eviction weighs against recency), and its memo.

Every input of the efficiency is structure the tree stamps with :attr:`~hf_marconi.tree.Node.version`, so the memo is
keyed by node uid and checked against that stamp; the tree itself keeps no efficiency.
"""

from __future__ import annotations

from typing import Sequence

from hf_marconi.policies.base import CostModel
from hf_marconi.tree import Node

# Entries the memo may hold beyond twice the candidates of its latest lookup before it drops those of other nodes.
_MEMO_SLACK = 64


def fallback_depth(node: Node) -> int:
    """Prefix length a lookup would resume from if ``node``'s checkpoint were gone: that of the nearest ancestor holding
    a checkpoint (0 at the root). A checkpoint-less parent (a branch node) cannot be resumed from."""
    ancestor = node.parent
    while ancestor is not None and ancestor.parent is not None and ancestor.checkpoint is None:
        ancestor = ancestor.parent
    return ancestor.depth if ancestor is not None else 0


def bytes_freed_by_eviction(node: Node) -> int:
    """What evicting ``node`` gives back, which is also what keeping it costs: a leaf's edge KV and checkpoint; only the
    checkpoint of a single-child node, whose edge KV folds into its child and stays stored."""
    if node.children:
        return node.checkpoint.nbytes if node.checkpoint is not None else 0
    return node.nbytes


def flops_saved_over_parent(node: Node, costs: CostModel) -> float:
    """FLOPs a hit on ``node`` saves beyond the hit a lookup would get without it: extending the prefix of the nearest
    checkpointed ancestor (the paper's "parent"; a checkpoint-less parent is skipped) to the node's."""
    start = fallback_depth(node)
    return costs.extend_flops(start, node.depth - start)


def flop_efficiency(node: Node, costs: CostModel) -> float:
    """FLOPs saved over the parent per byte evicting the node frees (:func:`bytes_freed_by_eviction`).

    The reference simulator divides by the KV of the whole prefix instead. Dividing a single-child node's savings by
    its edge KV too would count bytes its eviction does not free (that KV folds into the child and stays): the node
    would look less efficient than it is, and a large alpha would pick it, freeing one checkpoint, where a leaf of
    lower value per byte freed should go."""
    return flops_saved_over_parent(node, costs) / max(bytes_freed_by_eviction(node), 1)


class EfficiencyMemo:
    """:func:`flop_efficiency` per node for one cost model, recomputed when the node's structural version moved on.

    Entries of nodes gone from the tree (or no longer candidates) are dropped whenever the memo holds more than twice
    the nodes of the latest lookup (plus a slack), so over a long replay its size follows the candidate pool instead of
    every node ever evicted; the drop costs one pass over the lookup's nodes, amortised over the entries added since.
    """

    def __init__(self) -> None:
        self._costs: CostModel | None = None
        self._entries: dict[int, tuple[int, float]] = {}  # uid -> (version when computed, efficiency)

    def __len__(self) -> int:
        return len(self._entries)

    def efficiencies(self, nodes: Sequence[Node], costs: CostModel) -> list[float]:
        """``flop_efficiency(node, costs)`` of each of ``nodes``, memoised."""
        if costs is not self._costs:
            self._costs, self._entries = costs, {}
        elif len(self._entries) > 2 * len(nodes) + _MEMO_SLACK:
            kept = self._entries
            self._entries = {n.uid: kept[n.uid] for n in nodes if n.uid in kept}
        entries, values = self._entries, []
        for node in nodes:
            entry = entries.get(node.uid)
            if entry is None or entry[0] != node.version:
                entry = entries[node.uid] = (node.version, flop_efficiency(node, costs))
            values.append(entry[1])
        return values
