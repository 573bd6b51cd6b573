"""Policies: which positions they checkpoint, which node they evict, alpha tuning and the oracle."""

from __future__ import annotations

import gc
import random

import pytest

from hf_marconi.policies import (
    PAPER_ALPHA_GRID,
    SHADOW_ALPHA_GRID,
    WIDE_ALPHA_GRID,
    AlphaTuner,
    BlockPolicy,
    BranchPointAdmission,
    ComposedPolicy,
    LRUEviction,
    LRUPolicy,
    MarconiAdmission,
    MarconiEviction,
    MarconiPolicy,
    NoCachePolicy,
    ShadowAlphaTuner,
    default_policy,
    flop_efficiency,
    make_policy,
    oracle_alpha,
)
from hf_marconi.policies.admission import branch_point
from hf_marconi.policies.efficiency import EfficiencyMemo
from hf_marconi.policies.marconi import recency_scores
from hf_marconi.policies.reuse import ReuseCounts
from hf_marconi.presets import preset
from hf_marconi.simulator import simulate
from hf_marconi.trace import Request
from hf_marconi.store import PrefixStore
from hf_marconi.tree import Node, RadixTree, SimulatedCheckpoint, SimulatedEdge
from tests.test_store import SIZES, QuadraticCosts, run


def test_paper_grid_is_0_to_2_by_tenths_and_wide_grid_reaches_far():
    assert PAPER_ALPHA_GRID[0] == 0.0 and PAPER_ALPHA_GRID[-1] == 2.0 and len(PAPER_ALPHA_GRID) == 21
    assert WIDE_ALPHA_GRID[0] == 0.0 and max(WIDE_ALPHA_GRID) >= 64


def test_default_policy_is_marconi_tuned_by_shadows_and_fresh_each_call():
    policy, tuner = default_policy()
    again, other_tuner = default_policy()
    assert isinstance(policy, MarconiPolicy) and policy.recency == "linear"
    assert isinstance(tuner, ShadowAlphaTuner) and tuner.grid == SHADOW_ALPHA_GRID
    assert policy is not again and tuner is not other_tuner  # a tuner keeps state: never shared between stores


def test_block_policy_checkpoints_every_block_boundary():
    policy = BlockPolicy(block_size=4)
    assert policy.capture_positions(reuse_len=4, branch_len=None, input_len=14) == (8, 12)
    assert policy.keeps_end(input_len=14, end=20) and not policy.keeps_end(input_len=14, end=21)
    store = PrefixStore(10**6, policy, QuadraticCosts(), SIZES)
    _, result = run(store, tuple(range(10)), (50, 51, 52))
    assert result.new_checkpoints == (4, 8) and result.new_tokens == 8  # no state at 12: decoding passed it
    _, result = run(store, tuple(range(10)), (50, 51))
    assert result.new_checkpoints == (12,) and result.new_tokens == 4  # the end of what was fed, on a boundary
    plan, _ = run(store, tuple(range(10)) + (50, 51, 52, 53))
    assert plan.reuse_len == 12


def test_marconi_alpha_zero_is_lru_and_large_alpha_keeps_the_flop_efficient_entry():
    # An old long sequence (many FLOPs per byte: attention is quadratic) and a newer short one; the cache must drop one.
    # Entry bytes with run()'s payloads (3 bytes of KV per token, 10-byte checkpoints): 190, 16 and 19.
    long_seq, short_seq, newcomer = tuple(range(100, 160)), (1, 2), (7, 8, 9)
    capacity = 190 + 16 + 10
    for alpha, survivor in [(0.0, short_seq), (10.0, long_seq)]:
        store = PrefixStore(capacity, MarconiPolicy(alpha=alpha), QuadraticCosts(), SIZES)
        run(store, long_seq)
        run(store, short_seq)
        run(store, newcomer)
        stored = store.tree.checkpointed_prefixes()
        assert survivor in stored and newcomer in stored and len(stored) == 2


def test_flop_efficiency_divides_by_the_bytes_eviction_frees():
    tree = RadixTree()
    parent = tree.add_leaf(tree.root, (1, 2, 3, 4), SimulatedEdge(4, 5), clock=0)
    tree.set_checkpoint(parent, SimulatedCheckpoint(7), "input_output", clock=0)
    child = tree.add_leaf(parent, (9, 9), SimulatedEdge(2, 5), clock=0)
    tree.set_checkpoint(child, SimulatedCheckpoint(7), "input_output", clock=0)
    costs = QuadraticCosts()
    assert flop_efficiency(child, costs) == costs.extend_flops(4, 2) / (2 * 5 + 7)  # a leaf frees its KV and checkpoint
    assert flop_efficiency(parent, costs) == costs.extend_flops(0, 4) / 7  # its KV folds into the child: only 7 freed


def test_flop_savings_skip_a_parent_without_checkpoint():
    tree = RadixTree()
    anchor = tree.add_leaf(tree.root, (1, 2), SimulatedEdge(2, 5), clock=0)
    tree.set_checkpoint(anchor, SimulatedCheckpoint(7), "input_output", clock=0)
    branch = tree.add_leaf(anchor, (3, 4, 5), SimulatedEdge(3, 5), clock=0)  # a branch point without a checkpoint
    leaf = tree.add_leaf(branch, (6,), SimulatedEdge(1, 5), clock=0)
    tree.set_checkpoint(leaf, SimulatedCheckpoint(7), "input_output", clock=0)
    costs = QuadraticCosts()
    assert flop_efficiency(leaf, costs) == costs.extend_flops(2, 4) / (5 + 7)  # a lookup would resume at 2, not 5


def test_lru_refreshes_ancestors_but_marconi_only_the_reused_node():
    for policy, expect_refreshed in [(LRUPolicy(), True), (MarconiPolicy(), False)]:
        store = PrefixStore(10**6, policy, QuadraticCosts(), SIZES)
        run(store, (1, 2, 3))
        run(store, (1, 2, 3, 4, 5))
        parent = store.tree.walk_to((1, 2, 3), [3])[0]
        before = parent.last_access
        run(store, (1, 2, 3, 4, 5, 6))  # reuses the node at 5
        assert (parent.last_access > before) == expect_refreshed


def test_sglang_evicts_only_leaves_marconi_also_single_child_nodes():
    # Three nested prefixes; the oldest is the shallowest. SGLang+ must drop the leaf, Marconi (alpha 0) the oldest.
    victims = {}
    for policy in (LRUPolicy(), MarconiPolicy()):
        store = PrefixStore(3 * 5 + 30 + 3, policy, QuadraticCosts(), SIZES)
        run(store, (1,))
        run(store, (1, 2, 3))
        run(store, (1, 2, 3, 4, 5))  # 15 bytes of KV, 3 checkpoints: full
        run(store, (9,))  # needs 13 bytes
        victims[policy.name] = set(store.tree.checkpointed_prefixes())
    assert victims["sglang+"] == {(1,), (1, 2, 3), (9,)}
    assert victims["marconi"] == {(1, 2, 3), (1, 2, 3, 4, 5), (9,)}


def _agentic_trace(sessions: int = 6, turns: int = 6):
    """Sessions sharing a system prompt, each turn extending its history: (input, committed tokens) pairs."""
    system = tuple(range(1000, 1040))
    pairs = []
    histories = {s: system + (2000 + s,) for s in range(sessions)}
    for t in range(turns):
        for s in range(sessions):
            inp = histories[s] + tuple(3000 + 100 * s + 10 * t + k for k in range(5))
            out = tuple(5000 + 100 * s + 10 * t + k for k in range(3))
            pairs.append((inp, inp + out))
            histories[s] = inp + out
    return pairs


def test_alpha_tuner_waits_for_first_eviction_then_tunes_once():
    pairs = _agentic_trace()
    tuner = AlphaTuner(grid=(0.0, 1.0, 4.0), window_factor=1)
    store = PrefixStore(400, MarconiPolicy(), QuadraticCosts(), SIZES, tuner=tuner)
    first_eviction = None
    for index, (inp, tokens) in enumerate(pairs, 1):
        _, result = store.simulate_request(inp, tokens)
        if result.nodes_evicted and first_eviction is None:
            first_eviction = index
    assert first_eviction is not None
    (record,) = tuner.history
    assert record.after_request == 2 * first_eviction and record.window_len == first_eviction
    grid = list(tuner.grid)
    assert record.alpha == max(grid, key=lambda a: (record.scores[a], -grid.index(a)))
    assert store.stats().alpha == record.alpha and store.stats().alpha_tunings == 1


def test_alpha_tuning_is_deterministic():
    pairs = _agentic_trace()
    outcomes = []
    for _ in range(2):
        tuner = AlphaTuner(grid=WIDE_ALPHA_GRID, window_factor=1, retune=True)
        store = PrefixStore(400, MarconiPolicy(), QuadraticCosts(), SIZES, tuner=tuner)
        for inp, tokens in pairs:
            store.simulate_request(inp, tokens)
        outcomes.append((tuner.history, store.stats()))
    assert outcomes[0] == outcomes[1]


def test_tuner_needs_a_policy_with_alpha():
    with pytest.raises(ValueError, match="alpha"):
        PrefixStore(100, LRUPolicy(), QuadraticCosts(), SIZES, tuner=AlphaTuner())
    with pytest.raises(ValueError, match="objective"):
        AlphaTuner(objective="latency")


def test_oracle_returns_the_best_static_alpha():
    pairs = _agentic_trace()
    best, results = oracle_alpha(pairs, 400, QuadraticCosts(), SIZES, grid=(0.0, 0.5, 8.0))
    assert set(results) == {0.0, 0.5, 8.0}
    assert results[best].hit_tokens == max(r.hit_tokens for r in results.values())


def test_make_policy_names():
    assert make_policy("vllm+", block_size=16).block_size == 16
    with pytest.raises(ValueError, match="choose one of"):
        make_policy("lfu")


class ScanningLRU(LRUEviction):
    """LRU eviction forced through choose_victim's scan over all candidates: the reference for the heap path."""

    per_node_priority = False


def test_heap_eviction_picks_the_same_victims_as_the_scan():
    pairs = _agentic_trace(sessions=5, turns=5)
    finals = []
    for policy in (LRUPolicy(), ComposedPolicy(BranchPointAdmission(), ScanningLRU())):
        store = PrefixStore(300, policy, QuadraticCosts(), SIZES)
        for inp, tokens in pairs:
            store.simulate_request(inp, tokens)
        store.check_invariants()
        finals.append((store.tree.checkpointed_prefixes(), store.stats().nodes_evicted))
    assert finals[0] == finals[1] and finals[0][1] > 0


def test_efficiency_memo_follows_every_structural_change():
    # top (1 2, checkpoint) -> branch (3 4, none) -> left (5 50 51) and right (6 60 61), both checkpointed.
    tree, costs, memo = RadixTree(), QuadraticCosts(), EfficiencyMemo()
    top = tree.add_leaf(tree.root, (1, 2), SimulatedEdge(2, 5), clock=0)
    tree.set_checkpoint(top, SimulatedCheckpoint(7), "input_output", clock=0)
    branch = tree.add_leaf(top, (3, 4), SimulatedEdge(2, 5), clock=0)
    left = tree.add_leaf(branch, (5, 50, 51), SimulatedEdge(3, 5), clock=0)
    right = tree.add_leaf(branch, (6, 60, 61), SimulatedEdge(3, 5), clock=0)
    for leaf in (left, right):
        tree.set_checkpoint(leaf, SimulatedCheckpoint(7), "input_output", clock=0)
    seen: dict[int, float] = {}

    def assert_memo_fresh(*changed: Node) -> None:
        """The memo agrees with a fresh computation for every node, and the change did move ``changed``'s value."""
        nodes = list(tree.nodes())
        fresh = [flop_efficiency(n, costs) for n in nodes]
        assert memo.efficiencies(nodes, costs) == fresh
        assert all(flop_efficiency(n, costs) != seen[n.uid] for n in changed)
        seen.update({n.uid: f for n, f in zip(nodes, fresh)})

    assert_memo_fresh()
    head = tree.split(left, 1)  # the split edge: left keeps 2 tokens of KV
    assert_memo_fresh(left)
    tree.set_checkpoint(head, SimulatedCheckpoint(7), "purely_input", clock=0)  # a new checkpoint right above left
    assert_memo_fresh(left)
    tree.merge_into_child(top)  # an eviction: right's fallback moves through branch (no checkpoint) to the root
    assert_memo_fresh(branch, right)
    tree.set_checkpoint(branch, SimulatedCheckpoint(7), "purely_input", clock=0)  # and back to the branch point
    assert_memo_fresh(right)
    tree.remove_leaf(right)  # its sibling's parent keeps one child: thin now, a candidate
    assert_memo_fresh()
    tree.remove_leaf(left)  # head is a leaf now: evicting it frees its KV too
    assert_memo_fresh(head)
    tree.add_leaf(head, (7,), SimulatedEdge(1, 5), clock=0)  # and a single-child node again
    assert_memo_fresh(head)


def test_efficiency_memo_stays_bounded_over_a_long_replay():
    # 2,000 distinct prompts behind a shared prefix, in a store that holds a dozen: nearly every one is evicted.
    policy = MarconiPolicy(alpha=1.0)
    memo = policy.eviction.memo
    store = PrefixStore(500, policy, QuadraticCosts(), SIZES)
    most_candidates = largest_memo = 0
    for k in range(2000):
        prompt = (1, 2, 3, 4) + tuple(range(10 * k + 100, 10 * k + 105))
        store.simulate_request(prompt, prompt + (9,))
        most_candidates = max(most_candidates, len(store.tree.thin))
        largest_memo = max(largest_memo, len(memo))
    # At most twice a lookup's candidates plus the slack survive a lookup, which may add its own candidates.
    assert largest_memo <= 3 * most_candidates + 64 < store.stats().nodes_evicted // 10


def test_a_composed_policy_delegates_to_its_rules():
    policy = ComposedPolicy(MarconiAdmission(repeat_threshold=None), LRUEviction())
    assert policy.name == "MarconiAdmission+LRUEviction" and policy.max_new_checkpoints == 3
    assert policy.evicts_leaves_only and policy.per_node_priority and policy.alpha is None
    with pytest.raises(AttributeError, match="no alpha"):
        policy.alpha = 1.0
    policy = ComposedPolicy(BranchPointAdmission(), MarconiEviction(alpha=2.0), name="sglang+ admission, marconi")
    assert policy.max_new_checkpoints == 2 and not policy.evicts_leaves_only and policy.alpha == 2.0
    policy.alpha = 8.0  # as an alpha tuner does
    assert policy.eviction.alpha == 8.0


def test_marconi_hits_a_repeated_prompt_on_its_second_occurrence_once_repeats_are_common():
    store = PrefixStore(10**9, MarconiPolicy(), QuadraticCosts(), SIZES)
    second_hits = []
    for k in range(60):  # every prompt sent twice in a row: half of all lookups are repeats
        prompt = tuple(range(10_000 * (k + 1), 10_000 * (k + 1) + 12))
        run(store, prompt, (7, 8))
        plan, _ = run(store, prompt, (7, 8))
        second_hits.append(plan.reuse_len)
    assert second_hits[0] == 0  # no repeat seen yet: the 2nd occurrence only gets the checkpoint, as in the paper
    assert second_hits[-1] == 11  # the prompt's end was checkpointed on its first occurrence
    assert store.stats().repeated_lookups == 60


def test_marconi_takes_no_prompt_end_checkpoint_without_repeats():
    store = PrefixStore(10**9, MarconiPolicy(), QuadraticCosts(), SIZES)
    for inp, tokens in _agentic_trace():
        plan = store.plan(inp)
        assert plan.capture_positions in ((), (40,), (41,))  # at most the shared system prompt's branch point
        store.abort(plan)
        store.simulate_request(inp, tokens)
    assert store.stats().repeated_lookups == 0
    assert MarconiPolicy(repeat_threshold=None).capture_positions(0, None, 10, repeat_rate=1.0) == ()


def test_branch_point_admission_in_isolation():
    assert branch_point(reuse_len=4, branch_len=9) == (9,)
    assert branch_point(reuse_len=9, branch_len=9) == ()  # already resumable there
    assert branch_point(reuse_len=0, branch_len=None) == ()
    for policy in (MarconiPolicy(), LRUPolicy()):
        assert policy.capture_positions(4, 9, 20) == (9,)


def test_sequence_end_admission_of_every_policy():
    assert MarconiPolicy().keeps_end(10, 17) and LRUPolicy().keeps_end(10, 17)
    assert BlockPolicy(block_size=8).keeps_end(10, 16) and not BlockPolicy(block_size=8).keeps_end(10, 17)
    assert not NoCachePolicy().keeps_end(10, 16)


def test_inverse_age_recency_protects_the_newest_and_flattens_the_old():
    last_access = [1.0, 50.0, 90.0, 99.0, 100.0]
    inverse = recency_scores(last_access, clock=100, kind="inverse-age")
    linear = recency_scores(last_access, clock=100, kind="linear")
    assert inverse[-1] == linear[-1] == 1.0 and inverse[0] == linear[0] == 0.0
    assert inverse[2] < 0.1 < 0.85 < linear[2]  # ten requests old: already near the oldest under 1 / age
    assert inverse == sorted(inverse) and linear == sorted(linear)


def test_marconi_eviction_weighs_efficiency_by_alpha_in_isolation():
    tree, costs = RadixTree(), QuadraticCosts()
    old_long = tree.add_leaf(tree.root, tuple(range(40)), SimulatedEdge(40, 5), clock=1)
    tree.set_checkpoint(old_long, SimulatedCheckpoint(7), "input_output", clock=1)
    new_short = tree.add_leaf(tree.root, (100, 101), SimulatedEdge(2, 5), clock=9)
    tree.set_checkpoint(new_short, SimulatedCheckpoint(7), "input_output", clock=9)
    candidates = [old_long, new_short]
    assert flop_efficiency(old_long, costs) > flop_efficiency(new_short, costs)
    assert MarconiPolicy(alpha=0.0).choose_victim(candidates, costs, clock=10) is old_long  # recency alone
    assert MarconiPolicy(alpha=2.0).choose_victim(candidates, costs, clock=10) is new_short  # efficiency wins
    with pytest.raises(ValueError, match="recency"):
        MarconiPolicy(recency="lfu")


def test_reuse_counts_decay_and_count_only_shared_prompt_checkpoints():
    tree = RadixTree()
    shared = tree.add_leaf(tree.root, (1, 2, 3), SimulatedEdge(3, 5), clock=0)
    tree.set_checkpoint(shared, SimulatedCheckpoint(7), "purely_input", clock=0)
    turn_end = tree.add_leaf(tree.root, (9, 8), SimulatedEdge(2, 5), clock=0)
    tree.set_checkpoint(turn_end, SimulatedCheckpoint(7), "input_output", clock=0)
    counts = ReuseCounts(half_life=10)
    for clock in (1, 1, 1):
        counts.record_hit(shared, clock)
        counts.record_hit(turn_end, clock)
    assert counts.count(shared, clock=1) == pytest.approx(3.0)
    assert counts.count(shared, clock=11) == pytest.approx(1.5)  # one half-life later
    assert counts.count(turn_end, clock=1) == 0.0  # a conversation's latest turn: its past hits predict nothing
    assert counts.weights([shared, turn_end], clock=21) == pytest.approx([1.75, 1.0])
    with pytest.raises(ValueError, match="half_life"):
        ReuseCounts(half_life=0)


def test_reuse_counts_go_with_their_nodes():
    tree, counts = RadixTree(), ReuseCounts()
    for i in range(50):
        node = tree.add_leaf(tree.root, (i,), SimulatedEdge(1, 5), clock=i)
        tree.set_checkpoint(node, SimulatedCheckpoint(7), "purely_input", clock=i)
        counts.record_hit(node, i)
        tree.remove_leaf(node)
    del node
    gc.collect()
    assert len(counts) == 0


def test_marconi_eviction_keeps_the_often_reused_prefix_in_isolation():
    # Two shared prompt prefixes of equal length and checkpoint: the one hit more often lately is worth more per byte,
    # although the other was used last.
    tree, costs = RadixTree(), QuadraticCosts()
    prefixes = []
    for first in (1, 2):
        node = tree.add_leaf(tree.root, (first,) + tuple(range(10, 30)), SimulatedEdge(21, 5), clock=0)
        tree.set_checkpoint(node, SimulatedCheckpoint(7), "purely_input", clock=0)
        prefixes.append(node)
    often, once = prefixes
    weighted, paper = MarconiPolicy(alpha=4.0), MarconiPolicy(alpha=4.0, reuse_half_life=None)
    for policy in (weighted, paper):
        for clock in (1, 2, 3, 4):
            policy.touch([often], often, clock)
            policy.record_hit(often, clock)
        policy.touch([once], once, 5)
        policy.record_hit(once, 5)
    assert weighted.choose_victim(prefixes, costs, clock=6) is once
    assert paper.choose_victim(prefixes, costs, clock=6) is often  # equal efficiency: the less recent goes


def test_reuse_weight_keeps_few_shot_prefixes_over_query_tails_under_pressure():
    # Few-shot traffic with the paper's 7B hybrid: 12 task prefixes of 1,000 tokens, each query adds 100 tokens and 50
    # generated ones, tasks in random order, room for about 5 prefixes. A query's tail extends a long prefix, so its
    # FLOPs per byte look high, but no later query shares it; the prefixes are hit by every query of their task. The
    # paper's score keeps tails; weighing efficiency by recent hits keeps prefixes.
    costs = preset("paper-7b-hybrid")
    sizes = costs.state_sizes()
    rng = random.Random(0)
    prefixes = [tuple(range(10_000 * t, 10_000 * t + 1000)) for t in range(12)]
    trace = [
        Request(f"q{i}", float(i), prefixes[task] + tuple(range(10**6 + 1000 * i, 10**6 + 1000 * i + 100)),
                tuple(range(5 * 10**6, 5 * 10**6 + 50)))
        for i, task in enumerate(rng.choices(range(12), k=600))
    ]
    capacity = 5 * (1000 * sizes.kv_bytes_per_token + sizes.checkpoint_bytes)
    rates = {
        half_life: simulate(trace, MarconiPolicy(alpha=32.0, reuse_half_life=half_life), capacity, costs,
                            sizes).stats.token_hit_rate
        for half_life in (None, 200)
    }
    assert rates[200] > rates[None] + 0.05


def test_a_request_planned_twice_counts_one_hit():
    # A batched row plans (counted), admits its prompt (count=False), plans again (count=False) and commits: the second
    # plan reuses the branch point its own first commit stored, which is no hit of another request.
    policy = MarconiPolicy(alpha=1.0)
    store = PrefixStore(10**6, policy, QuadraticCosts(), SIZES)
    shared = tuple(range(100, 140))
    run(store, shared + (1, 2, 3), (50,))

    def commit(plan, tokens, count=True):
        positions = store.checkpoint_positions(plan, len(tokens))
        return store.commit(plan, tokens, lambda s, e: SimulatedEdge(e - s, 3),
                            {p: SimulatedCheckpoint(10) for p in positions}, count=count)

    prompt = shared + (7, 8, 9)
    first = store.plan(prompt)
    commit(first, prompt, count=False)
    second = store.plan(prompt, count=False)
    assert second.reuse_len == len(shared) and not second.counted
    commit(second, prompt + (60, 61))
    branch_point = store.tree.walk_to(prompt, [len(shared)])[0]
    assert policy.eviction.reuse.count(branch_point, clock=store.stats().commits) == 0.0
    third = store.plan(shared + (4, 5))  # another request's hit counts
    commit(third, shared + (4, 5, 6))
    assert policy.eviction.reuse.count(branch_point, clock=3) > 0.0


def test_with_alpha_keeps_the_policy_class_and_its_options_but_not_its_state():
    class EndlessMarconi(MarconiPolicy):
        def keeps_end(self, input_len: int, end: int) -> bool:
            return False

    policy = EndlessMarconi(alpha=1.0, reuse_half_life=50)
    twin = policy.with_alpha(8.0)
    assert type(twin) is EndlessMarconi and not twin.keeps_end(5, 9)  # a tuner replays the overrides too
    assert (twin.alpha, policy.alpha, twin.reuse_half_life, twin.name) == (8.0, 1.0, 50, "marconi")
    assert twin.eviction is not policy.eviction and twin.eviction.reuse is not policy.eviction.reuse
    with pytest.raises(AttributeError, match="no alpha"):
        LRUPolicy().with_alpha(1.0)
    with pytest.raises(TypeError):
        MarconiPolicy(1.0, "linear")  # options past alpha are keyword-only
