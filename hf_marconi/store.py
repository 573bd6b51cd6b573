"""The prefix store: radix tree + admission/eviction policy + capacity + statistics.

One object serves the live cache (payloads hold tensors) and the simulator (payloads are byte counts). A request goes
through :meth:`PrefixStore.plan` (look up and lock the reusable prefix, choose prefill capture positions) and then
:meth:`PrefixStore.commit` (store the new states, evicting per policy) or :meth:`PrefixStore.abort`.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Protocol, Sequence

from hf_marconi.eviction import HeapOrder, ScanOrder, VictimOrder
from hf_marconi.policies.base import CostModel, Policy
from hf_marconi.snapshot import StoreSnapshot, entries_of, tree_from_entries
from hf_marconi.tree import (
    INPUT_OUTPUT,
    PURELY_INPUT,
    EdgePayload,
    LockReceipt,
    Node,
    Payload,
    RadixTree,
    SimulatedCheckpoint,
    SimulatedEdge,
    common_prefix_len,
)

if TYPE_CHECKING:
    from hf_marconi.policies.alpha import Tuner

CommitObserver = Callable[["PrefixStore", "RequestPlan", tuple[int, ...], "AdmitResult"], None]


class Placement(Protocol):
    """Where the stored payloads live (storage tiers: ``hf_marconi.tiers.TieredStorage``), registered with
    :meth:`PrefixStore.set_placement`.

    The store calls ``place(tree)`` with its lock held whenever what it stores or their recency may have changed: after
    every commit (counted or not: a batched row's prompt admission stores entries too), every abort whose lock release
    folded nodes together, every load, and once at registration. Payloads move only through
    :meth:`RadixTree.replace_payloads`, which keeps the tree's byte accounting."""

    def place(self, tree: RadixTree) -> None: ...


# Lookups after which a repeated prompt's weight in the store's repeat rate has halved (the rate admission reads).
REPEAT_HALF_LIFE = 200
_REPEAT_DECAY = 0.5 ** (1 / REPEAT_HALF_LIFE)  # the rate's weight on its past, per lookup



def _as_token_tuple(tokens: Sequence[int]) -> tuple[int, ...]:
    """Token ids as a tuple (a tuple is taken as is: converting 30K-token prompts element by element dominates a
    trace replay)."""
    return tokens if type(tokens) is tuple else tuple(int(t) for t in tokens)


@dataclass(frozen=True)
class StateSizes:
    """Real byte sizes for one sequence (batch row)."""

    kv_bytes_per_token: int
    checkpoint_bytes: int

    def __post_init__(self) -> None:
        if self.kv_bytes_per_token < 0 or self.checkpoint_bytes < 0:
            raise ValueError(f"state sizes must be >= 0 bytes, got {self}")
        if self.kv_bytes_per_token == 0 and self.checkpoint_bytes == 0:
            raise ValueError("a model with neither KV nor checkpoint bytes has no state to cache")


@dataclass(frozen=True)
class RequestPlan:
    """What :meth:`PrefixStore.plan` decided for one request; hand it back to ``commit`` or ``abort`` exactly once."""

    input_ids: tuple[int, ...]
    reuse_len: int  # tokens whose states are restored (0 = miss)
    reuse_edges: tuple[EdgePayload, ...]  # root..reuse node; their tokens concatenate to input_ids[:reuse_len]
    reuse_checkpoint: Payload | None  # checkpoint at reuse_len (None iff reuse_len == 0)
    capture_positions: tuple[int, ...]  # strictly increasing, each in (reuse_len, len(input_ids) - 1]
    hit_kind: str | None  # "purely_input", "input_output", or None on a miss
    matched_len: int  # tokens of input_ids found in the tree, checkpoint or not
    unresumable_len: int  # matched tokens (but the last input token) past reuse_len: stored, but no checkpoint there
    receipt: LockReceipt = field(repr=False, compare=False)
    generation: int = 0  # the store's generation at planning: a plan from before a clear() commits nothing
    counted: bool = True  # a lookup of its own (False: a second plan of a request already counted, plan(count=False))


@dataclass(frozen=True)
class AdmitResult:
    """What one commit stored."""

    refused: bool  # True when the new entries could not fit even after evicting every unlocked entry
    new_tokens: int  # tokens whose KV was stored
    new_checkpoints: tuple[int, ...]  # prefix lengths that received a checkpoint
    nodes_evicted: int
    bytes_freed: int


@dataclass
class StoreStats:
    lookups: int = 0
    hits: int = 0
    hit_tokens: int = 0
    input_tokens: int = 0
    flops_saved: float = 0.0
    input_flops: float = 0.0  # FLOPs to prefill every looked-up input from scratch
    hits_purely_input: int = 0
    hits_input_output: int = 0
    hit_tokens_purely_input: int = 0
    hit_tokens_input_output: int = 0
    # Lookups whose prompt matched stored tokens past the deepest checkpoint: those tokens were cached as KV but could
    # not be resumed (a recurrent state exists only at checkpoints). What users of hybrid prefix caching ask first.
    unresumable_lookups: int = 0
    unresumable_tokens: int = 0
    repeated_lookups: int = 0  # lookups whose whole prompt was stored already (a repeated prompt)
    commits: int = 0
    kv_tokens_admitted: int = 0
    checkpoints_admitted: int = 0
    checkpoints_evicted: int = 0
    nodes_evicted: int = 0
    admissions_refused: int = 0
    bytes: int = 0
    peak_bytes: int = 0
    capacity_bytes: int = 0
    alpha: float | None = None
    alpha_tunings: int = 0

    @property
    def token_hit_rate(self) -> float:
        return self.hit_tokens / self.input_tokens if self.input_tokens else 0.0

    @property
    def request_hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0

    @property
    def flops_saved_fraction(self) -> float:
        return self.flops_saved / self.input_flops if self.input_flops else 0.0

    def asdict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(
            token_hit_rate=self.token_hit_rate,
            request_hit_rate=self.request_hit_rate,
            flops_saved_fraction=self.flops_saved_fraction,
        )
        return out


def branch_points(ids: Sequence[int], others: Iterable[Sequence[int]], limit: int | None) -> tuple[int, ...]:
    """Where ``ids`` branches off each of ``others`` (the length of their shared prefix, at most ``len(ids) - 1``: an
    identical input branches at its last token, as a fully stored one does), ascending. Past ``limit`` new
    checkpoints per request, the shallowest are kept, leaving one place for the branch point against the stored
    paths: a checkpoint at a shallow branch serves every input that shares at least that much."""
    shared = {min(common_prefix_len(tuple(other), ids), len(ids) - 1) for other in others}
    branches = sorted(shared - {0})
    return tuple(branches if limit is None else branches[: max(limit - 1, 1)])


class PrefixStore:
    """Radix tree + admission/eviction policy + capacity + stats. Thread-safe (an internal RLock).

    Args:
        capacity_bytes: the most bytes the stored payloads may hold after any commit.
        policy: admission and eviction (``hf_marconi.policies``).
        costs: FLOPs of extending a prefix (``hf_marconi.costs.CostModel``).
        sizes: byte sizes of one sequence's states; sizes simulated payloads (simulator, alpha tuning).
        tuner: optional alpha tuner for policies with an ``alpha`` (``hf_marconi.policies``: ``ShadowAlphaTuner``,
            ``AlphaTuner``); it attaches itself as a commit observer.
    """

    def __init__(
        self,
        capacity_bytes: int,
        policy: Policy,
        costs: CostModel,
        sizes: StateSizes,
        tuner: "Tuner | None" = None,
    ):
        if capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be >= 0, got {capacity_bytes}")
        if tuner is not None and policy.alpha is None:
            raise ValueError(f"policy {policy.name!r} has no alpha to tune; pass tuner=None or use MarconiPolicy")
        self.capacity_bytes = capacity_bytes
        self.policy = policy
        self.costs = costs
        self.sizes = sizes
        self._tree = RadixTree()
        self._stats = StoreStats(capacity_bytes=capacity_bytes)
        self._clock = 0
        self._open: dict[int, LockReceipt] = {}  # id(receipt) -> receipt of every plan not yet committed or aborted
        self._open_inputs: dict[int, tuple[int, ...]] = {}  # id(receipt) -> the input of each request in flight
        self._generation = 0  # bumped by clear(): plans made before it hold locks on a dropped tree
        self._repeat_rate = 0.0  # decayed share of lookups that found their whole prompt stored (REPEAT_HALF_LIFE)
        self._lock = threading.RLock()
        self._observers: list[CommitObserver] = []
        self._placement: Placement | None = None
        if tuner is not None:
            tuner.attach(self)

    def add_commit_observer(self, observer: CommitObserver) -> None:
        """Call ``observer(store, plan, committed tokens, result)`` after every commit that stored into this tree,
        with the store's lock held (alpha tuners observe the traffic this way)."""
        with self._lock:
            self._observers.append(observer)

    def set_placement(self, placement: Placement) -> None:
        """Have ``placement`` place the stored payloads from now on (see :class:`Placement`), starting with those stored
        already. A store has at most one."""
        with self._lock:
            if self._placement is not None:
                raise ValueError(f"this store already has a placement ({type(self._placement).__name__}); a store has "
                                 "one: build a new cache (or PrefixStore) for another")
            self._placement = placement
            self._place()

    def _place(self) -> None:
        """Let the placement, if any, place the stored payloads (with the lock held)."""
        if self._placement is not None:
            self._placement.place(self._tree)

    # ------------------------------------------------------------------------------------------------- plan
    def plan(self, input_ids: Sequence[int], also_branches_at: Sequence[int] = (), count: bool = True) -> RequestPlan:
        """Look up the deepest reusable prefix of ``input_ids`` (at most all but its last token), lock it, count the
        lookup, and choose the positions to checkpoint during prefill.

        ``also_branches_at``: prefix lengths where ``input_ids`` branches off sequences not stored yet (other rows of
        the same batch), captured as the policy captures the branch point against the stored paths. ``count=False``:
        a second plan for a request already counted (a batched row's admission after its prompt was planned).

        Apart from the lock, planning changes nothing a later request or eviction could see: recency is refreshed at
        :meth:`commit`, so an aborted request leaves every entry exactly as it was. The lookup statistics (lookups,
        hits, hit tokens, FLOPs saved) are counted here, because the lookup did happen and its hit was served to the
        caller whether or not it commits."""
        ids = _as_token_tuple(input_ids)
        if not ids:
            raise ValueError("input_ids is empty: a request needs at least one token to produce logits")
        with self._lock:
            match = self._tree.match(ids)
            limit = len(ids) - 1
            reused: Node | None = None
            for node in match.path:
                if node.depth > limit:
                    break
                if node.checkpoint is not None:
                    reused = node
            reuse_len = reused.depth if reused is not None else 0
            extra = (*also_branches_at, *self._branches_off_requests_in_flight(ids))
            branches = {self._branch_point(ids, match), *(b for b in extra if reuse_len < b <= limit)}
            captures = tuple(sorted({
                p for branch in branches
                for p in self.policy.capture_positions(reuse_len, branch, len(ids), repeat_rate=self._repeat_rate)
            }))
            if any(not reuse_len < p <= limit for p in captures) or list(captures) != sorted(set(captures)):
                raise RuntimeError(f"policy {self.policy.name!r} returned invalid capture positions {captures}")
            receipt = self._tree.lock(reused if reused is not None else self._tree.root)
            self._open[id(receipt)] = receipt
            self._open_inputs[id(receipt)] = ids
            unresumable = max(0, min(match.matched_len, limit) - reuse_len)
            if count:
                self._count_lookup(ids, reused, unresumable, repeated=match.matched_len == len(ids))
            return RequestPlan(
                input_ids=ids,
                reuse_len=reuse_len,
                reuse_edges=tuple(n.edge for n in reused.path()) if reused is not None else (),  # type: ignore[misc]
                reuse_checkpoint=reused.checkpoint if reused is not None else None,
                capture_positions=captures,
                hit_kind=reused.origin if reused is not None else None,
                matched_len=match.matched_len,
                unresumable_len=unresumable,
                receipt=receipt,
                generation=self._generation,
                counted=count,
            )

    def _branches_off_requests_in_flight(self, ids: tuple[int, ...]) -> tuple[int, ...]:
        """Where ``ids`` branches off the inputs of requests planned but not committed yet (calls in other threads):
        as the stored paths' branch point, a checkpoint there lets later requests reuse what both share, which the
        tree cannot show until they commit."""
        return branch_points(ids, self._open_inputs.values(), self.policy.max_new_checkpoints)

    def _branch_point(self, ids: tuple[int, ...], match) -> int | None:
        """Where inserting ``ids`` would branch off the stored paths, capped at ``len(ids) - 1``, or None.

        A fully matched input branches at its own end (capped: the last token must be fed for logits), which makes a
        repeated identical prompt a hit for all but its last token from its third occurrence on."""
        matched = match.matched_len
        if matched == len(ids):
            return len(ids) - 1 if len(ids) > 1 else None
        if matched == 0:
            return None
        if match.partial is not None or match.path[-1].checkpoint is None:
            return matched
        return None

    def _count_lookup(self, ids: tuple[int, ...], reused: Node | None, unresumable: int, repeated: bool) -> None:
        stats = self._stats
        stats.lookups += 1
        stats.repeated_lookups += repeated
        self._repeat_rate = _REPEAT_DECAY * self._repeat_rate + (1 - _REPEAT_DECAY) * repeated
        if unresumable:
            stats.unresumable_lookups += 1
            stats.unresumable_tokens += unresumable
        stats.input_tokens += len(ids)
        stats.input_flops += self.costs.extend_flops(0, len(ids))
        if reused is None:
            return
        stats.hits += 1
        stats.hit_tokens += reused.depth
        stats.flops_saved += self.costs.extend_flops(0, reused.depth)
        if reused.origin == PURELY_INPUT:
            stats.hits_purely_input += 1
            stats.hit_tokens_purely_input += reused.depth
        else:
            stats.hits_input_output += 1
            stats.hit_tokens_input_output += reused.depth

    def checkpoint_positions(self, plan: RequestPlan, total_len: int) -> tuple[int, ...]:
        """Every prefix length the caller should supply a checkpoint for at commit, ascending: the plan's capture
        positions and, if the policy keeps it, the end of the ``total_len`` tokens fed."""
        if total_len < len(plan.input_ids):
            raise ValueError(f"total_len {total_len} is shorter than the input ({len(plan.input_ids)} tokens)")
        end = (total_len,) if self.policy.keeps_end(len(plan.input_ids), total_len) else ()
        return tuple(sorted(set(plan.capture_positions) | set(end)))

    # ----------------------------------------------------------------------------------------------- commit
    def commit(
        self,
        plan: RequestPlan,
        tokens: Sequence[int],
        make_edge: Callable[[int, int], EdgePayload],
        checkpoints: Mapping[int, Payload],
        count: bool = True,
    ) -> AdmitResult:
        """Store ``tokens`` (the input followed by what the caller fed after it) with the checkpoints the policy allows,
        evicting per policy so that the store fits its capacity; releases the plan's lock, also when admitting raises.

        ``make_edge(start, end)`` is called at most once, for the token range not stored yet (``start >=
        plan.reuse_len``). Tokens past the deepest admitted checkpoint are not stored: no lookup could resume there.
        ``count=False``: a partial admission of a request another commit completes (a batched row's prompt, admitted
        before decoding), not counted as a commit nor shown to the alpha tuner.
        """
        seq = _as_token_tuple(tokens)
        with self._lock:
            if seq[: len(plan.input_ids)] != plan.input_ids:
                raise ValueError("tokens must start with plan.input_ids; call abort(plan) to drop this request")
            if self._outlived_by_clear(plan):
                return AdmitResult(False, 0, (), 0, 0)  # its tree was dropped: the states may belong to old weights
            self._check_open(plan)
            return self._commit(plan, seq, make_edge, checkpoints, count)

    def _commit(
        self,
        plan: RequestPlan,
        seq: tuple[int, ...],
        make_edge: Callable[[int, int], EdgePayload],
        checkpoints: Mapping[int, Payload],
        count: bool = True,
    ) -> AdmitResult:
        """commit() once ``seq`` is known to start with the plan's input."""
        with self._lock:
            self._clock += 1
            try:
                result = self._admit(plan, seq, make_edge, checkpoints)
            finally:
                self._release(plan.receipt)
            if count:
                self._stats.commits += 1
                for observer in self._observers:
                    observer(self, plan, seq, result)
            self._place()
            return result

    def _admit(
        self,
        plan: RequestPlan,
        seq: tuple[int, ...],
        make_edge: Callable[[int, int], EdgePayload],
        checkpoints: Mapping[int, Payload],
    ) -> AdmitResult:
        tree = self._tree
        match = tree.match(seq, start=plan.receipt.node)  # the plan's locked reuse node (or the root)
        # The lookup's recency refresh, deferred from plan() so that an abort leaves recency untouched; done before
        # evicting, so the entries this request used count as the most recent ones.
        input_len = len(plan.input_ids)
        reused = plan.receipt.node if plan.reuse_len else None
        self.policy.touch([n for n in match.path if n.depth <= input_len], reused, self._clock)
        if reused is not None and plan.counted:  # a batched row's second plan reuses its own first commit
            self.policy.record_hit(reused, self._clock)
        existing = {n.depth for n in match.path if n.checkpoint is not None}
        wanted = [p for p in self.checkpoint_positions(plan, len(seq)) if p in checkpoints and p not in existing]
        limit = self.policy.max_new_checkpoints
        if limit is not None and len(wanted) > limit:
            wanted = wanted[len(wanted) - limit :]  # keep the deepest: they cover the most tokens
        if not wanted:
            if match.path:
                self.policy.touch_inserted(match.path, self._clock)
            return AdmitResult(False, 0, (), 0, 0)
        end = wanted[-1]
        stored_end = min(match.matched_len, end)
        deepest = self._deepest_within(match, end)
        new_edge = make_edge(stored_end, end) if end > stored_end else None
        needed = (new_edge.nbytes if new_edge is not None else 0) + sum(checkpoints[p].nbytes for p in wanted)

        guard = tree.lock(deepest if deepest is not None else tree.root)
        self._open[id(guard)] = guard
        try:
            if self._locked_bytes() + needed > self.capacity_bytes:
                self._stats.admissions_refused += 1
                return AdmitResult(True, 0, (), 0, 0)
            evicted, freed = self._evict_until(self.capacity_bytes - needed)
            clock = self._clock
            attach = tree.walk_to(seq, [stored_end])[0] if stored_end > 0 else tree.root
            node_at: dict[int, Node] = {}  # prefix length -> the node ending there, for every wanted position
            if new_edge is not None:  # a chain of new nodes, cut at the new checkpoints past the stored path
                cuts = [stored_end] + [p for p in wanted if p > stored_end]
                edges, rest = [], new_edge
                for start, cut in zip(cuts[:-2], cuts[1:-1]):
                    head, rest = rest.split(cut - start)
                    edges.append(head)
                edges.append(rest)
                keys = [seq[start:cut] for start, cut in zip(cuts[:-1], cuts[1:])]
                node_at.update(zip(cuts[1:], tree.add_chain(attach, keys, edges, clock)))
            on_stored_path = [p for p in wanted if p not in node_at]  # may split stored edges, never the new chain
            node_at.update(zip(on_stored_path, tree.walk_to(seq, on_stored_path)))
            for pos in reversed(wanted):  # deepest first: a new checkpoint then clears only its next node's memo
                origin = PURELY_INPUT if pos <= len(plan.input_ids) and pos < len(seq) else INPUT_OUTPUT
                tree.set_checkpoint(node_at[pos], checkpoints[pos], origin, clock)
            self.policy.touch_inserted(node_at[end].path(), clock)
        finally:
            self._release(guard)
        stats = self._stats
        stats.kv_tokens_admitted += end - stored_end
        stats.checkpoints_admitted += len(wanted)
        stats.bytes = tree.nbytes
        stats.peak_bytes = max(stats.peak_bytes, tree.nbytes)
        return AdmitResult(False, end - stored_end, tuple(wanted), evicted, freed)

    @staticmethod
    def _deepest_within(match, end: int) -> Node | None:
        """The deepest node the stored path of the sequence reaches into, up to prefix length ``end``."""
        for node in match.path:
            if node.depth >= end:
                return node
        if match.partial is not None:
            return match.partial  # it will be split where the match ends, so it must stay
        return match.path[-1] if match.path else None

    def _locked_bytes(self) -> int:
        """Bytes held by nodes on any locked path (no eviction can free them)."""
        seen: dict[int, int] = {}
        for receipt in self._open.values():
            for node in receipt.node.path():
                seen[node.uid] = node.nbytes
        return sum(seen.values())

    def _evict_until(self, budget: int) -> tuple[int, int]:
        """Evict per policy until the tree holds at most ``budget`` bytes; returns (nodes evicted, bytes freed)."""
        tree, evicted, freed = self._tree, 0, 0
        order: VictimOrder = (HeapOrder(tree, self.policy) if self.policy.per_node_priority
                              else ScanOrder(tree, self.policy, self.costs, self._clock))
        while tree.nbytes > budget:
            victim = order.next_victim()
            if victim is None:
                raise RuntimeError("no evictable entry is left although the locked bytes fit; the tree is inconsistent")
            # Eviction may fold checkpoint-less ancestors away; the first one holding a checkpoint (or the root) stays.
            survivor = victim.parent
            assert survivor is not None
            while survivor.parent is not None and survivor.checkpoint is None:
                survivor = survivor.parent
            freed += self._evict(victim)
            evicted += 1
            order.after_eviction(survivor)
        return evicted, freed

    def _evict(self, victim: Node) -> int:
        tree, stats = self._tree, self._stats
        stats.nodes_evicted += 1
        if victim.checkpoint is not None:
            stats.checkpoints_evicted += 1
        if victim.children:
            return tree.merge_into_child(victim)
        parent = victim.parent
        before = tree.nbytes
        tree.remove_leaf(victim)
        assert parent is not None
        tree.compact(parent)  # a checkpoint-less branch node left with one child folds into it
        return before - tree.nbytes

    # ------------------------------------------------------------------------------------------- release
    def abort(self, plan: RequestPlan) -> None:
        """Release the plan's lock without storing anything."""
        with self._lock:
            if self._outlived_by_clear(plan):
                return
            self._check_open(plan)
            if self._release(plan.receipt):
                self._place()  # a fold may have joined payloads of two tiers; otherwise nothing moved

    def _outlived_by_clear(self, plan: RequestPlan) -> bool:
        """Whether ``plan`` was made before the latest :meth:`clear` (its lock was on the dropped tree)."""
        return plan.generation != self._generation

    def _check_open(self, plan: RequestPlan) -> None:
        if id(plan.receipt) not in self._open or self._open[id(plan.receipt)] is not plan.receipt:
            raise RuntimeError("this plan was already committed or aborted, or belongs to another store")

    def _release(self, receipt: LockReceipt) -> bool:
        """Unlock ``receipt``'s path; returns whether a node the lock kept from folding away folded now."""
        del self._open[id(receipt)]
        self._open_inputs.pop(id(receipt), None)
        path = receipt.node.path()
        self._tree.unlock(receipt)
        folded = False
        for node in reversed(path):
            if node.parent is not None and self._tree.compact(node):
                folded = True
        self._stats.bytes = self._tree.nbytes
        return folded

    def clear(self) -> int:
        """Drop every stored entry (the counters are kept); returns the bytes freed.

        Requests in flight keep the states they restored (the dropped tree's payloads stay alive as long as their
        plans hold them), but their commit stores nothing and their abort releases nothing: a clear usually means the
        states belong to weights that changed."""
        with self._lock:
            freed = self._tree.nbytes
            self._tree = RadixTree()
            self._open.clear()
            self._open_inputs.clear()
            self._generation += 1
            self._stats.bytes = 0
            return freed

    # -------------------------------------------------------------------------------------------- queries
    @property
    def lock(self) -> threading.RLock:
        """The store's own lock, held by every method for tree work only (never across a model forward): hold it to
        read or move stored payloads as one consistent set (tiers)."""
        return self._lock

    @property
    def nbytes(self) -> int:
        return self._tree.nbytes

    @property
    def tree(self) -> RadixTree:
        """The underlying tree (read-only use: tests, reports)."""
        return self._tree

    def stats(self) -> StoreStats:
        with self._lock:
            self._stats.bytes = self._tree.nbytes
            self._stats.alpha = self.policy.alpha
            return StoreStats(**{k: v for k, v in asdict(self._stats).items()})

    def note_alpha_tuning(self, alpha: float) -> None:
        """Set the policy's alpha (called by the alpha tuner between requests)."""
        with self._lock:
            self.policy.alpha = alpha
            self._stats.alpha_tunings += 1

    def check_invariants(self) -> None:
        """Raise AssertionError naming the broken invariant (tree structure, byte accounting, capacity)."""
        with self._lock:
            self._tree.check_invariants()
            if not self._open and self._tree.nbytes > self.capacity_bytes:
                raise AssertionError(f"capacity exceeded: {self._tree.nbytes} > {self.capacity_bytes} bytes")
            if self._tree.root.lock_ref != len(self._open):
                raise AssertionError(f"{self._tree.root.lock_ref} locks on the tree but {len(self._open)} open plans")

    # ------------------------------------------------------------------------------------------ simulation
    def simulate_request(self, input_ids: Sequence[int], tokens: Sequence[int]) -> tuple[RequestPlan, AdmitResult]:
        """Plan and commit one request with simulated payloads sized from ``self.sizes``."""
        plan = self.plan(input_ids)
        ckpt = SimulatedCheckpoint(self.sizes.checkpoint_bytes)
        positions = self.checkpoint_positions(plan, len(tokens))
        kv = self.sizes.kv_bytes_per_token
        result = self.commit(plan, tokens, lambda start, end: SimulatedEdge(end - start, kv), {p: ckpt for p in positions})
        return plan, result

    def replay_request(self, input_ids: tuple[int, ...], output_ids: tuple[int, ...]) -> tuple[RequestPlan, AdmitResult]:
        """Replay a request given as input and output (the simulator) as a live generate call commits it: the input
        and every output token but the last, which is never fed to the model."""
        return self.replay_fed(input_ids, _as_token_tuple(output_ids)[:-1])

    def replay_fed(self, input_ids: tuple[int, ...], fed: tuple[int, ...]) -> tuple[RequestPlan, AdmitResult]:
        """simulate_request for the input followed by the tokens ``fed`` after it (the alpha tuners replay commits
        this way); the committed tokens are built here, so the check that they start with the input is not needed."""
        plan = self.plan(input_ids)
        seq = plan.input_ids + fed
        ckpt = SimulatedCheckpoint(self.sizes.checkpoint_bytes)
        kv = self.sizes.kv_bytes_per_token
        positions = self.checkpoint_positions(plan, len(seq))
        result = self._commit(plan, seq, lambda start, end: SimulatedEdge(end - start, kv), {p: ckpt for p in positions})
        return plan, result

    # ------------------------------------------------------------------------------------------ snapshots
    def snapshot(self, sizes_only: bool = False) -> StoreSnapshot:
        """Every stored node (:func:`~hf_marconi.snapshot.entries_of`) and the logical clock, taken under the lock. The
        payloads are the stored objects themselves, to be read, never mutated; ``sizes_only``: their byte counts
        instead (for replays: keeps no stored tensor alive and copies none)."""
        with self._lock:
            return StoreSnapshot(entries_of(self._tree, sizes_only), self._clock)

    def load_snapshot(self, snapshot: StoreSnapshot) -> None:
        """Rebuild the tree from ``snapshot`` into this store, which must be empty.

        The tree is built aside and swapped in only when every entry is valid, so on any error (ValueError naming the
        entry and the problem) the store is left unchanged. The logical clock continues from the snapshot's;
        statistics other than bytes are not restored."""
        with self._lock:
            if self._tree.root.children or self._open:
                raise ValueError("load_snapshot needs an empty store with no open plan; load into a new PrefixStore")
            if not isinstance(snapshot, StoreSnapshot):
                raise ValueError(f"expected a StoreSnapshot, got a {type(snapshot).__name__}")
            tree = tree_from_entries(snapshot.entries)
            latest = max((e.last_access for e in snapshot.entries), default=0)
            if type(snapshot.clock) is not int or snapshot.clock < latest:
                raise ValueError(f"the snapshot's clock {snapshot.clock!r} must be an int no smaller than its entries' "
                                 f"latest access ({latest})")
            try:
                tree.check_invariants()  # the structure rule: no checkpoint-less node with fewer than two children
            except AssertionError as error:
                raise ValueError(f"the entries do not form a valid store: {error}") from None
            if tree.nbytes > self.capacity_bytes:
                raise ValueError(f"the entries hold {tree.nbytes} bytes, more than this store's capacity of "
                                 f"{self.capacity_bytes}; load them into a store with a larger capacity_bytes")
            self._tree = tree
            self._clock = max(self._clock, snapshot.clock)
            self._stats.bytes = tree.nbytes
            self._stats.peak_bytes = max(self._stats.peak_bytes, tree.nbytes)
            self._place()  # loaded states sit where the loader put them, e.g. all on the fast tier

    @classmethod
    def from_snapshot(
        cls, snapshot: StoreSnapshot, capacity_bytes: int, policy: Policy, costs: CostModel, sizes: StateSizes
    ) -> "PrefixStore":
        """A simulated store holding the snapshot's entries, payloads reduced to byte counts (alpha tuning)."""
        store = cls(capacity_bytes, policy, costs, sizes)
        store._tree = tree_from_entries(snapshot.simulated().entries)
        store._clock = snapshot.clock
        store._stats.bytes = store._stats.peak_bytes = store._tree.nbytes
        return store
