"""PrefixStore: the paper's toy example, admission rules, locking, capacity and hypothesis property tests."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_marconi.policies import BlockPolicy, LRUPolicy, MarconiPolicy, NoCachePolicy, flop_efficiency
from hf_marconi.snapshot import StoredEntry, StoreSnapshot
from hf_marconi.store import PrefixStore, StateSizes
from hf_marconi.tree import SimulatedCheckpoint, SimulatedEdge
from tests.test_tree import TokenEdge


class QuadraticCosts:
    """A tiny cost model: 100 FLOPs per token plus one per attention pair."""

    def extend_flops(self, prefix_len: int, extend_len: int) -> float:
        return 100.0 * extend_len + prefix_len * extend_len + extend_len * (extend_len + 1) / 2


SIZES = StateSizes(kv_bytes_per_token=3, checkpoint_bytes=10)


def words(text: str, vocab: dict[str, int]) -> tuple[int, ...]:
    return tuple(vocab.setdefault(w, len(vocab)) for w in text.split())


def run(store: PrefixStore, input_ids, output_ids=()):
    """Plan and commit one request with token-tracking edges; returns (plan, result)."""
    plan = store.plan(input_ids)
    tokens = tuple(input_ids) + tuple(output_ids)
    positions = store.checkpoint_positions(plan, len(tokens))
    result = store.commit(
        plan, tokens, lambda s, e: TokenEdge(tokens[s:e]), {p: SimulatedCheckpoint(10) for p in positions}
    )
    return plan, result


def test_paper_toy_example():
    vocab: dict[str, int] = {}
    store = PrefixStore(10**6, MarconiPolicy(), QuadraticCosts(), SIZES)
    plan1, _ = run(store, words("NYC is a busy city", vocab))
    assert plan1.reuse_len == 0 and plan1.capture_positions == ()
    plan2, result2 = run(store, words("NYC is very huge", vocab))
    assert plan2.reuse_len == 0 and plan2.capture_positions == (2,)  # the branch point after "NYC is"
    assert result2.new_checkpoints == (2, 4)
    branch = store.tree.walk_to(words("NYC is", vocab), [2])[0]
    assert branch.checkpoint is not None and len(branch.children) == 2 and branch.origin == "purely_input"
    plan3, _ = run(store, words("NYC is cold", vocab))
    assert plan3.reuse_len == 2 and plan3.hit_kind == "purely_input"
    assert sum(e.num_tokens for e in plan3.reuse_edges) == 2
    store.check_invariants()


def test_repeated_identical_prompt_hits_all_but_last_token():
    prompt = tuple(range(10, 30))
    store = PrefixStore(10**6, MarconiPolicy(), QuadraticCosts(), SIZES)
    reuse = [run(store, prompt, (7, 8))[0].reuse_len for _ in range(4)]
    assert reuse == [0, 0, len(prompt) - 1, len(prompt) - 1]


def test_next_turn_reuses_input_and_output():
    store = PrefixStore(10**6, MarconiPolicy(), QuadraticCosts(), SIZES)
    turn1, answer = (1, 2, 3, 4), (5, 6)
    run(store, turn1, answer)
    plan, _ = run(store, turn1 + answer + (7, 8))
    assert plan.reuse_len == 6 and plan.hit_kind == "input_output"
    edges = plan.reuse_edges
    assert tuple(t for e in edges for t in e.tokens) == turn1 + answer
    stats = store.stats()
    assert stats.hits_input_output == 1 and stats.hit_tokens == 6
    assert stats.flops_saved == QuadraticCosts().extend_flops(0, 6)


def test_commit_stores_only_ranges_not_yet_stored():
    store = PrefixStore(10**6, MarconiPolicy(), QuadraticCosts(), SIZES)
    run(store, (1, 2, 3, 4))
    plan = store.plan((1, 2, 3, 4, 5, 6))
    calls = []
    tokens = (1, 2, 3, 4, 5, 6, 7)

    def make_edge(start, end):
        calls.append((start, end))
        return TokenEdge(tokens[start:end])

    store.commit(plan, tokens, make_edge, {7: SimulatedCheckpoint(10)})
    assert calls == [(4, 7)] and plan.reuse_len == 4


def test_admission_refused_when_entry_cannot_fit_leaves_store_unchanged():
    store = PrefixStore(50, MarconiPolicy(), QuadraticCosts(), SIZES)
    run(store, (1, 2, 3))  # 9 + 10 bytes
    before = store.tree.checkpointed_prefixes()
    _, result = run(store, tuple(range(100, 120)))  # 60 + 10 bytes > 50
    assert result.refused and store.tree.checkpointed_prefixes() == before
    assert store.stats().admissions_refused == 1
    store.check_invariants()


def test_abort_releases_locks_and_changes_nothing():
    store = PrefixStore(10**6, MarconiPolicy(), QuadraticCosts(), SIZES)
    run(store, (1, 2, 3), (4,))
    plan = store.plan((1, 2, 3, 4, 5))
    assert store.tree.root.lock_ref == 1
    store.abort(plan)
    store.check_invariants()
    with pytest.raises(RuntimeError):
        store.abort(plan)


@pytest.mark.parametrize("policy", [MarconiPolicy(), LRUPolicy()])
def test_a_request_branching_off_one_in_flight_captures_the_branch_point(policy):
    """Two requests sharing a prefix run at once: the tree shows neither until one commits, so the second to plan takes
    the branch point off the first's input (as it would off the first's stored path); a third then reuses it."""
    store = PrefixStore(10**6, policy, QuadraticCosts(), SIZES)
    first = store.plan((1, 2, 3, 4, 5, 6))
    second, _ = run(store, (1, 2, 3, 4, 9, 9))
    assert second.capture_positions == (4,)
    store.abort(first)
    third, _ = run(store, (1, 2, 3, 4, 7, 7))
    assert third.reuse_len == 4
    store.check_invariants()


def test_locked_prefix_survives_pressure():
    store = PrefixStore(60, LRUPolicy(), QuadraticCosts(), SIZES)
    run(store, (1, 2, 3, 4))  # 22 bytes
    plan = store.plan((1, 2, 3, 4, 5))  # locks (1, 2, 3, 4)
    run(store, (50, 51, 52, 53))  # 22 more
    run(store, (60, 61, 62, 63))  # would evict the LRU leaf, but it is locked: the other one goes
    assert (1, 2, 3, 4) in store.tree.checkpointed_prefixes()
    store.abort(plan)
    store.check_invariants()


def test_no_cache_policy_never_hits():
    store = PrefixStore(10**6, NoCachePolicy(), QuadraticCosts(), SIZES)
    for _ in range(3):
        plan, _ = run(store, (1, 2, 3), (4,))
        assert plan.reuse_len == 0
    assert store.nbytes == 0


def test_commit_rejects_tokens_not_starting_with_input():
    store = PrefixStore(10**6, MarconiPolicy(), QuadraticCosts(), SIZES)
    plan = store.plan((1, 2, 3))
    with pytest.raises(ValueError, match="abort"):
        store.commit(plan, (9, 9, 9), lambda s, e: TokenEdge(()), {})
    store.abort(plan)


POLICIES = {
    "marconi": lambda: MarconiPolicy(alpha=1.0),
    "sglang+": LRUPolicy,
    "vllm+": lambda: BlockPolicy(block_size=4),
}

# Requests over a small alphabet so that prefixes are shared and branch often.
request_lists = st.lists(
    st.tuples(st.lists(st.integers(0, 2), min_size=1, max_size=14), st.lists(st.integers(0, 2), max_size=4)),
    min_size=1,
    max_size=25,
)


@settings(max_examples=80, deadline=None)
@given(requests=request_lists, capacity=st.integers(0, 400), policy=st.sampled_from(sorted(POLICIES)),
       history=st.booleans())
def test_store_properties(requests, capacity, policy, history):
    """Bytes accounted == sum of entries; capacity never exceeded after a request; every hit is a prefix that was
    inserted (its checkpoint is the very payload admitted for it) and is still stored."""
    store = PrefixStore(capacity, POLICIES[policy](), QuadraticCosts(), SIZES)
    admitted: dict[tuple[int, ...], SimulatedCheckpoint] = {}
    session: tuple[int, ...] = ()
    for input_part, output in requests:
        input_ids = (session if history else ()) + tuple(input_part)
        plan = store.plan(input_ids)
        if plan.reuse_len:
            prefix = input_ids[: plan.reuse_len]
            assert admitted[prefix] is plan.reuse_checkpoint
            assert store.tree.checkpointed_prefixes()[prefix] is plan.reuse_checkpoint
            assert tuple(t for e in plan.reuse_edges for t in e.tokens) == prefix
        assert plan.reuse_len <= len(input_ids) - 1
        tokens = input_ids + tuple(output)
        offered = {p: SimulatedCheckpoint(10) for p in store.checkpoint_positions(plan, len(tokens))}
        result = store.commit(plan, tokens, lambda s, e: TokenEdge(tokens[s:e]), offered)
        for p in result.new_checkpoints:
            admitted[tokens[:p]] = offered[p]
        assert store.nbytes <= capacity
        store.check_invariants()  # byte accounting, structure, capacity, locks
        if isinstance(store.policy, MarconiPolicy):  # the memo recomputes every efficiency whose inputs changed
            nodes = list(store.tree.nodes())
            memoised = store.policy.eviction.memo.efficiencies(nodes, store.costs)
            assert memoised == [flop_efficiency(node, store.costs) for node in nodes]
        session = tokens
    stats = store.stats()
    assert stats.hit_tokens <= stats.input_tokens and stats.bytes == store.nbytes <= capacity


def _filled_store(capacity: int = 10**6) -> PrefixStore:
    store = PrefixStore(capacity, MarconiPolicy(), QuadraticCosts(), SIZES)
    for input_ids, output in [((1, 2, 3, 4), (5, 6)), ((1, 2, 7, 8), (9,)), ((1, 2, 3, 4, 5, 6, 10), (11,)), ((20, 21), ())]:
        store.simulate_request(input_ids, input_ids + output)
    return store


def test_snapshot_round_trip_preserves_prefixes_bytes_and_recency():
    store = _filled_store()
    snapshot = store.snapshot()
    entries = snapshot.entries
    assert entries and all(e.parent < i for i, e in enumerate(entries))
    assert all(e.prefix_len == (entries[e.parent].prefix_len if e.parent >= 0 else 0) + len(e.key) for e in entries)
    loaded = PrefixStore(10**6, MarconiPolicy(), QuadraticCosts(), SIZES)
    loaded.load_snapshot(snapshot)
    loaded.check_invariants()
    assert loaded.nbytes == store.nbytes and loaded.stats().bytes == store.nbytes
    assert {k: v.nbytes for k, v in loaded.tree.checkpointed_prefixes().items()} == {
        k: v.nbytes for k, v in store.tree.checkpointed_prefixes().items()}
    assert [(e.key, e.parent, e.origin, e.last_access) for e in loaded.snapshot().entries] == [
        (e.key, e.parent, e.origin, e.last_access) for e in entries]
    assert loaded.snapshot().clock == snapshot.clock
    plan = loaded.plan((1, 2, 3, 4, 5, 6, 10, 11, 12))  # the loaded store serves hits and keeps its clock going
    assert plan.reuse_len == 8 and plan.hit_kind == "input_output"
    loaded.abort(plan)


def test_load_snapshot_rejects_bad_input_and_leaves_store_empty():
    good = _filled_store().snapshot()
    entries = list(good.entries)
    child = next(i for i, e in enumerate(entries) if e.parent >= 0)
    bad_lists = {
        "empty key": [replace(entries[0], key=())] + entries[1:],
        "parent": entries[:child] + [replace(entries[child], parent=child)] + entries[child + 1 :],
        "prefix_len": [replace(entries[0], prefix_len=entries[0].prefix_len + 1)] + entries[1:],
        "origin": [replace(entries[0], origin="somewhere")] + entries[1:],
        "structure": entries[:-1] + [replace(entries[-1], checkpoint=None, origin=None)],  # a leaf no lookup can use
        "siblings": entries + [replace(entries[-1], key=entries[-1].key + (99,),
                                       prefix_len=entries[-1].prefix_len + 1)],
    }
    bad = {name: replace(good, entries=tuple(e)) for name, e in bad_lists.items()}
    bad["clock"] = replace(good, clock=max(e.last_access for e in entries) - 1)  # behind its entries' accesses
    for name, snapshot in bad.items():
        store = PrefixStore(10**6, MarconiPolicy(), QuadraticCosts(), SIZES)
        with pytest.raises(ValueError):
            store.load_snapshot(snapshot)
            pytest.fail(f"{name}: accepted")
        assert store.nbytes == 0 and not store.tree.root.children, name
        store.check_invariants()
    small = PrefixStore(5, MarconiPolicy(), QuadraticCosts(), SIZES)
    with pytest.raises(ValueError, match="capacity"):
        small.load_snapshot(good)
    assert small.nbytes == 0 and not small.tree.root.children
    full = _filled_store()
    before = full.snapshot()
    with pytest.raises(ValueError, match="empty store"):
        full.load_snapshot(good)
    assert full.snapshot() == before


def test_from_snapshot_keeps_every_byte_count_and_simulated_drops_the_payloads():
    store = _filled_store()
    snapshot = store.snapshot()
    simulated = PrefixStore.from_snapshot(snapshot, 10**6, MarconiPolicy(), QuadraticCosts(), SIZES)
    simulated.check_invariants()
    assert simulated.nbytes == store.nbytes
    assert [(e.key, e.parent, e.edge.nbytes, e.checkpoint and e.checkpoint.nbytes, e.origin, e.last_access)
            for e in simulated.snapshot().entries] == [
        (e.key, e.parent, e.edge.nbytes, e.checkpoint and e.checkpoint.nbytes, e.origin, e.last_access)
        for e in snapshot.entries]
    sizes_only = snapshot.simulated()
    assert all(type(e.edge) is SimulatedEdge and type(e.checkpoint) in (SimulatedCheckpoint, type(None))
               for e in sizes_only.entries)
    assert sizes_only.simulated() == sizes_only and sizes_only.clock == snapshot.clock
    entry = next(e for e in snapshot.entries if len(e.key) > 1)
    uneven = replace(snapshot, entries=(replace(entry, edge=SimulatedCheckpoint(len(entry.key) + 1)),))  # 1 extra byte
    with pytest.raises(ValueError, match="same bytes for every token"):
        uneven.simulated()


class RecordingPlacement:
    """A placement that moves nothing and records, at each call, the commits counted and the bytes stored."""

    def __init__(self, store: PrefixStore):
        self.store = store
        self.calls: list[tuple[int, int]] = []

    def place(self, tree) -> None:
        assert tree is self.store.tree and self.store.lock._is_owned()  # the live tree, under the store's lock
        self.calls.append((self.store.stats().commits, tree.nbytes))


def test_the_store_calls_its_placement_after_every_commit_abort_and_load():
    store = PrefixStore(10**6, MarconiPolicy(), QuadraticCosts(), SIZES)
    run(store, (1, 2, 3, 4), (5,))
    placement = RecordingPlacement(store)
    store.set_placement(placement)
    assert placement.calls == [(1, store.nbytes)]  # the entries stored already are placed at registration
    plan = store.plan((1, 2, 3, 4, 5, 6, 7), count=False)  # an uncounted commit (a batched row's prompt) stores too
    store.commit(plan, plan.input_ids, lambda s, e: SimulatedEdge(e - s, 3), {7: SimulatedCheckpoint(10)}, count=False)
    assert placement.calls[-1] == (1, store.nbytes) and store.nbytes > placement.calls[0][1]
    run(store, (1, 2, 3, 4, 5, 6, 7, 8), (9,))
    assert placement.calls[-1] == (2, store.nbytes)
    store.abort(store.plan((1, 2, 3, 4, 5, 6, 7, 8, 9)))
    assert len(placement.calls) == 3  # an abort that folds nothing moves nothing
    with pytest.raises(ValueError, match="already has a placement"):
        store.set_placement(RecordingPlacement(store))
    loaded = PrefixStore(10**6, MarconiPolicy(), QuadraticCosts(), SIZES)
    on_load = RecordingPlacement(loaded)
    loaded.set_placement(on_load)
    loaded.load_snapshot(store.snapshot())
    assert on_load.calls == [(0, 0), (0, store.nbytes)]
    assert "commit" not in vars(store)  # nothing patched on the instance


def test_an_abort_that_folds_a_lock_kept_node_places_again():
    store = PrefixStore(10**6, MarconiPolicy(), QuadraticCosts(), SIZES)
    for tokens in ((1, 2, 3, 4), (1, 2, 7, 8)):  # (1 2): a branch node, checkpoints at the sequence ends only
        plan = store.plan(tokens)
        store.commit(plan, tokens, lambda s, e, t=tokens: TokenEdge(t[s:e]), {4: SimulatedCheckpoint(10)})
    placement = RecordingPlacement(store)
    store.set_placement(placement)
    held = store.plan((1, 2, 3, 4, 5))
    with store.lock:
        store._evict(next(n for n in store.tree.nodes() if n.key[:1] == (7,)))  # the lock keeps (1 2) unfolded
    store.abort(held)  # the fold at release may join payloads of two tiers: placed again
    assert len(placement.calls) == 2 and [n.key for n in store.tree.nodes()] == [(1, 2, 3, 4)]


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_abort_leaves_tree_and_recency_identical(policy):
    store = PrefixStore(10**6, POLICIES[policy](), QuadraticCosts(), SIZES)
    for input_ids, output in [((1, 2, 3, 4, 5, 6, 7, 8), (9,)), ((1, 2, 3, 4, 10, 11, 12, 13), ()), ((20, 21, 22), (23,))]:
        run(store, input_ids, output)
    before = store.snapshot()
    plan = store.plan((1, 2, 3, 4, 5, 6, 7, 8, 9, 30))  # a hit on the whole first sequence
    assert plan.reuse_len > 0
    store.abort(plan)
    assert store.snapshot() == before  # keys, payloads, origins and last_access of every entry
    store.check_invariants()


def test_commit_refreshes_the_reused_entry():
    store = PrefixStore(10**6, MarconiPolicy(), QuadraticCosts(), SIZES)
    run(store, (1, 2, 3, 4), (5,))
    run(store, (40, 41, 42), (43,))
    plan, _ = run(store, (1, 2, 3, 4, 5, 6))
    reused = store.tree.walk_to(plan.input_ids, [plan.reuse_len])[0]
    other = store.tree.walk_to((40, 41, 42, 43), [4])[0]
    assert reused.last_access > other.last_access


def test_a_snapshot_taken_while_a_lock_keeps_a_branch_node_unfolded_still_loads():
    # A request in flight locks the path to (1 2 | 3 4 5); evicting the sibling (7 8 9) leaves the checkpoint-less
    # branch node (1 2) with one child, which the lock keeps from folding. Saving then must still give a valid store.
    edge, checkpoint = (lambda n: SimulatedEdge(n, 3)), SimulatedCheckpoint(10)
    store = PrefixStore(10**6, MarconiPolicy(), QuadraticCosts(), SIZES)
    store.load_snapshot(StoreSnapshot((
        StoredEntry(2, (1, 2), -1, edge(2), None, None, 1),
        StoredEntry(5, (3, 4, 5), 0, edge(3), checkpoint, "input_output", 1),
        StoredEntry(5, (7, 8, 9), 0, edge(3), checkpoint, "input_output", 2),
    ), 2))
    plan = store.plan((1, 2, 3, 4, 5, 6))
    with store.lock:
        store._evict(next(n for n in store.tree.nodes() if n.key[0] == 7))
    saved = store.snapshot()
    assert [(e.prefix_len, e.key, e.parent) for e in saved.entries] == [(5, (1, 2, 3, 4, 5), -1)]
    assert saved.entries[0].edge.nbytes == 15
    reloaded = PrefixStore(10**6, MarconiPolicy(), QuadraticCosts(), SIZES)
    reloaded.load_snapshot(saved)
    assert reloaded.tree.checkpointed_prefixes() == store.tree.checkpointed_prefixes() and reloaded.nbytes == store.nbytes
    store.abort(plan)


def test_a_chain_of_lock_kept_branch_nodes_folds_into_one_entry_and_replays_as_sizes():
    # (1 2) and (1 2 | 3) are checkpoint-less branch nodes; a request in flight locks the path to (1 2 | 3 | 4 5).
    # Evicting the siblings (7) and (9) leaves both with one child: the snapshot lists the three as one entry.
    edge, checkpoint = (lambda n: SimulatedEdge(n, 3)), SimulatedCheckpoint(10)
    store = PrefixStore(10**6, MarconiPolicy(), QuadraticCosts(), SIZES)
    store.load_snapshot(StoreSnapshot((
        StoredEntry(2, (1, 2), -1, edge(2), None, None, 1),
        StoredEntry(3, (3,), 0, edge(1), None, None, 1),
        StoredEntry(5, (4, 5), 1, edge(2), checkpoint, "input_output", 1),
        StoredEntry(4, (9,), 1, edge(1), checkpoint, "input_output", 2),
        StoredEntry(3, (7,), 0, edge(1), checkpoint, "input_output", 3),
    ), 3))
    plan = store.plan((1, 2, 3, 4, 5, 6))
    with store.lock:
        for first in (9, 7):
            store._evict(next(n for n in store.tree.nodes() if n.key[0] == first))
    for sizes_only in (False, True):
        saved = store.snapshot(sizes_only=sizes_only)
        assert [(e.prefix_len, e.key, e.parent, e.edge.nbytes) for e in saved.entries] == [(5, (1, 2, 3, 4, 5), -1, 15)]
        assert isinstance(saved.entries[0].edge, SimulatedEdge)  # the test store holds byte counts either way
        replay = PrefixStore.from_snapshot(saved, 10**6, MarconiPolicy(), QuadraticCosts(), SIZES)
        replay.check_invariants()
        assert replay.nbytes == store.nbytes
    store.abort(plan)


def test_a_sizes_only_snapshot_copies_no_stored_payload():
    class Untouchable(TokenEdge):
        snapshotting = False

        def split(self, offset):
            return Untouchable(self.tokens[:offset]), Untouchable(self.tokens[offset:])

        def concat(self, tail):
            if Untouchable.snapshotting:
                raise AssertionError("a sizes-only snapshot must not join stored payloads")
            return Untouchable(self.tokens + tail.tokens)

    store = PrefixStore(10**6, MarconiPolicy(), QuadraticCosts(), SIZES)
    for tokens in ((1, 2, 3, 4), (1, 2, 7, 8)):
        plan = store.plan(tokens)
        store.commit(plan, tokens, lambda s, e, t=tokens: Untouchable(t[s:e]), {4: SimulatedCheckpoint(10)})
    held = store.plan((1, 2, 3, 4, 5))  # keeps the checkpoint-less branch node (1 2) from folding below
    with store.lock:
        store._evict(next(n for n in store.tree.nodes() if n.key[:1] == (7,)))
    Untouchable.snapshotting = True
    with pytest.raises(AssertionError, match="must not join"):
        store.snapshot()  # a full snapshot joins the lock-kept node's edge to its child's
    entries = store.snapshot(sizes_only=True).entries
    Untouchable.snapshotting = False
    assert [(e.key, type(e.edge), e.edge.nbytes) for e in entries] == [((1, 2, 3, 4), SimulatedEdge, 12)]
    store.abort(held)
