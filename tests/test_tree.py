"""Unit tests of the radix tree: matching, splitting, leaf eviction, merging, locks, byte accounting."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_marconi.tree import RadixTree, SimulatedCheckpoint, SimulatedEdge


@dataclass(frozen=True)
class TokenEdge:
    """An edge payload that remembers its tokens, so tests can check what split and concat produce."""

    tokens: tuple[int, ...]
    bytes_per_token: int = 3

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def nbytes(self) -> int:
        return len(self.tokens) * self.bytes_per_token

    def split(self, offset: int):
        return TokenEdge(self.tokens[:offset], self.bytes_per_token), TokenEdge(self.tokens[offset:], self.bytes_per_token)

    def concat(self, tail):
        return TokenEdge(self.tokens + tail.tokens, self.bytes_per_token)


def insert(tree: RadixTree, tokens: tuple[int, ...], ckpt_bytes: int = 10) -> None:
    """Store ``tokens`` with a checkpoint at their end (test helper mirroring the store's commit)."""
    match = tree.match(tokens)
    attach = tree.walk_to(tokens, [match.matched_len])[0] if match.matched_len else tree.root
    if match.matched_len < len(tokens):
        tree.add_leaf(attach, tokens[match.matched_len :], TokenEdge(tokens[match.matched_len :]), clock=0)
    (node,) = tree.walk_to(tokens, [len(tokens)])
    if node.checkpoint is None:
        tree.set_checkpoint(node, SimulatedCheckpoint(ckpt_bytes), "input_output", clock=0)


def test_match_reports_partial_edge_and_split_keeps_tokens():
    tree = RadixTree()
    insert(tree, (1, 2, 3, 4, 5))
    match = tree.match((1, 2, 3, 9))
    assert match.matched_len == 3 and match.path == () and match.partial is not None
    (upper,) = tree.walk_to((1, 2, 3, 9), [3])
    assert upper.depth == 3 and upper.checkpoint is None
    assert upper.edge.tokens == (1, 2, 3) and next(iter(upper.children.values())).edge.tokens == (4, 5)
    assert tree.nbytes == 5 * 3 + 10


def test_remove_leaf_and_merge_free_the_right_bytes():
    tree = RadixTree()
    insert(tree, (1, 2, 3))
    insert(tree, (1, 2, 3, 4, 5))
    node3 = tree.walk_to((1, 2, 3), [3])[0]
    assert tree.merge_into_child(node3) == 10  # only the checkpoint goes; its KV moves to the child
    (leaf,) = tree.root.children.values()
    assert leaf.edge.tokens == (1, 2, 3, 4, 5) and leaf.depth == 5
    assert tree.remove_leaf(leaf) == 5 * 3 + 10
    assert tree.nbytes == 0
    tree.check_invariants()


def test_locked_nodes_cannot_be_evicted_and_double_unlock_fails():
    tree = RadixTree()
    insert(tree, (1, 2))
    (leaf,) = tree.root.children.values()
    receipt = tree.lock(leaf)
    with pytest.raises(ValueError):
        tree.remove_leaf(leaf)
    tree.unlock(receipt)
    with pytest.raises(RuntimeError):
        tree.unlock(receipt)


def test_simulated_edge_split_and_concat_conserve_bytes():
    edge = SimulatedEdge(10, 7)
    head, tail = edge.split(4)
    assert (head.num_tokens, tail.num_tokens) == (4, 6)
    assert head.nbytes + tail.nbytes == edge.nbytes
    assert head.concat(tail) == edge
    with pytest.raises(ValueError):
        edge.split(10)


sequences = st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=8).map(tuple), min_size=1, max_size=12)


@settings(max_examples=60, deadline=None)
@given(seqs=sequences, data=st.data())
def test_merges_preserve_every_stored_prefix(seqs, data):
    tree = RadixTree()
    for seq in seqs:
        insert(tree, seq)
    tree.check_invariants()
    before = tree.checkpointed_prefixes()
    singles = [n for n in tree.nodes() if len(n.children) == 1]
    if not singles:
        return
    victim = data.draw(st.sampled_from(singles))
    victim_prefix = tree.prefix_tokens(victim)
    tree.merge_into_child(victim)
    after = tree.checkpointed_prefixes()
    expected = {p: c for p, c in before.items() if p != victim_prefix}
    assert after.keys() == expected.keys()
    assert all(after[p] is expected[p] for p in after)
    for node in tree.nodes():  # every edge payload still holds exactly its key's tokens
        assert node.edge.tokens == node.key
    tree.check_invariants()


def test_add_chain_matches_repeated_add_leaf():
    chained, single = RadixTree(), RadixTree()
    keys = [(1, 2), (3,), (4, 5, 6)]
    nodes = chained.add_chain(chained.root, keys, [TokenEdge(k) for k in keys], clock=3)
    node = single.root
    for key in keys:
        node = single.add_leaf(node, key, TokenEdge(key), clock=3)
    for tree in (chained, single):
        for n in tree.nodes():
            tree.set_checkpoint(n, SimulatedCheckpoint(1), "input_output", clock=3)
        tree.check_invariants()  # candidate pools, bytes, structure
    assert [n.depth for n in nodes] == [2, 3, 6] and chained.nbytes == single.nbytes
    assert [len(p) for p in (chained.thin, chained.leaves)] == [len(p) for p in (single.thin, single.leaves)]


def test_replace_payloads_takes_equal_bytes_only():
    tree = RadixTree()
    insert(tree, (1, 2, 3))
    (node,) = tree.nodes()
    moved_edge, moved_checkpoint = TokenEdge((1, 2, 3)), SimulatedCheckpoint(10)  # copies of equal bytes
    tree.replace_payloads(node, moved_edge, moved_checkpoint)
    assert node.edge is moved_edge and node.checkpoint is moved_checkpoint
    tree.check_invariants()
    refused = {
        "edge bytes": (TokenEdge((1, 2, 3), bytes_per_token=4), SimulatedCheckpoint(10)),
        "checkpoint bytes": (TokenEdge((1, 2, 3)), SimulatedCheckpoint(11)),
        "dropped checkpoint": (TokenEdge((1, 2, 3)), None),
        "tokens": (TokenEdge((1, 2)), SimulatedCheckpoint(10)),
    }
    for name, (edge, checkpoint) in refused.items():
        with pytest.raises(ValueError):
            tree.replace_payloads(node, edge, checkpoint)
            pytest.fail(f"{name}: accepted")
        assert node.edge is moved_edge and node.checkpoint is moved_checkpoint, name
    with pytest.raises(ValueError, match="root"):
        tree.replace_payloads(tree.root, TokenEdge(()), None)
    tree.check_invariants()
