"""Online alpha tuning by shadow replays: a byte-count store per candidate alpha follows the live requests, and the
live alpha follows the shadow that has recently hit the most tokens.

Each shadow is a simulated :class:`~hf_marconi.store.PrefixStore` with the live store's capacity, costs and state
sizes and a static alpha; it replays every committed request (input, then the tokens committed after it). Its score is
the hit tokens of recent requests, exponentially decayed with a half-life of ``half_life`` requests, so the choice keeps
adapting when the workload shifts. The live alpha moves to the best shadow's when that one beats the live alpha's
shadow by ``margin`` (relative), checked every ``check_every`` requests.

The work is done in bounded steps inside the commits that feed it: one step replays one request on one shadow, and a
commit runs at most ``steps_per_commit`` steps (default: one per shadow, which keeps the shadows level with the live
store). When the live store commits faster than that (a smaller ``steps_per_commit``), requests wait in a queue of
at most ``max_pending``; the oldest are dropped beyond it, so a shadow sees a sample of the traffic rather than
stalling a caller. The replays use the logical clock only: a replay is deterministic.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING


if TYPE_CHECKING:
    from hf_marconi.store import AdmitResult, PrefixStore, RequestPlan

# Recency alone and four weights a factor of 4 apart: with linear recency the useful alpha lies in 16..256 and moves
# with load (python -m eval.bench_default); this grid scored best of the five compared there, with the fewest shadows.
SHADOW_ALPHA_GRID: tuple[float, ...] = (0.0, 8.0, 32.0, 128.0, 512.0)


@dataclass(frozen=True)
class SwitchRecord:
    after_request: int  # requests the shadows had replayed when the switch happened
    scores: dict[float, float]  # alpha -> decayed hit tokens
    alpha: float  # the alpha switched to


@dataclass
class ShadowAlphaTuner:
    """Online alpha for a Marconi store (see the module docstring).

    Args:
        grid: one shadow per alpha; the live store starts at ``initial_alpha``.
        half_life: requests after which a hit's weight in a shadow's score has halved.
        margin: relative lead the best shadow needs over the live alpha's shadow to switch.
        check_every: compare the shadows every this many replayed requests.
        steps_per_commit: most shadow replays one commit runs (None: one per shadow).
        max_pending: most requests waiting for the shadows; older ones are dropped.
    """

    grid: tuple[float, ...] = SHADOW_ALPHA_GRID
    initial_alpha: float = 32.0
    half_life: int = 200
    margin: float = 0.02
    check_every: int = 10  # 25 switched too late on short traces (MT-bench at 15%: 34.8 against 41.2 with 10)
    steps_per_commit: int | None = None
    max_pending: int = 1000
    history: list[SwitchRecord] = field(default_factory=list)
    steps_taken: int = 0  # shadow replays run so far (one request on one shadow each)
    dropped: int = 0  # requests dropped from a full queue
    _shadows: list["PrefixStore"] = field(default_factory=list)
    _scores: list[float] = field(default_factory=list)
    _pending: deque = field(default_factory=deque)  # (input_ids, continuation) waiting for the shadows
    _next_shadow: int = 0  # the shadow that replays the head of the queue next
    _replayed: int = 0  # requests every shadow has replayed

    def __post_init__(self) -> None:
        if not self.grid or any(a < 0 for a in self.grid) or len(set(self.grid)) != len(self.grid):
            raise ValueError(f"grid must be distinct alphas >= 0, got {self.grid}")
        if self.initial_alpha not in self.grid:
            raise ValueError(f"initial_alpha {self.initial_alpha} must be one of the grid's alphas {self.grid}")
        if self.half_life < 1 or self.check_every < 1 or self.max_pending < 1 or self.margin < 0:
            raise ValueError("half_life, check_every and max_pending must be >= 1 and margin >= 0")
        if self.steps_per_commit is not None and self.steps_per_commit < 1:
            raise ValueError(f"steps_per_commit must be >= 1 (or None), got {self.steps_per_commit}")

    @property
    def step_bound(self) -> int:
        """The most shadow replays a single commit runs."""
        return self.steps_per_commit if self.steps_per_commit is not None else len(self.grid)

    def attach(self, store: "PrefixStore") -> None:
        """Start following ``store``: shadows start from its current entries, the live alpha is set to
        ``initial_alpha``, and every later commit is observed."""
        from hf_marconi.store import PrefixStore

        if store.policy.alpha is None:
            raise ValueError(f"policy {store.policy.name!r} has no alpha to tune; use MarconiPolicy")
        snapshot = store.snapshot(sizes_only=True)
        self._shadows = [
            PrefixStore.from_snapshot(snapshot, store.capacity_bytes, store.policy.with_alpha(a), store.costs,
                                      store.sizes)
            for a in self.grid
        ]
        self._scores = [0.0] * len(self.grid)
        store.policy.alpha = self.initial_alpha
        store.add_commit_observer(self.observe)

    def observe(self, store: "PrefixStore", plan: "RequestPlan", tokens: tuple[int, ...],
                result: "AdmitResult") -> None:
        """Queue the committed request and run at most :attr:`step_bound` shadow replays (called by the store after
        each commit, with its lock held)."""
        self._pending.append((plan.input_ids, tokens[len(plan.input_ids):]))
        if len(self._pending) > self.max_pending:
            self._pending.popleft()
            self._next_shadow = 0  # the dropped head may have been replayed by some shadows only: restart it
            self.dropped += 1
        for _ in range(self.step_bound):
            if not self._pending:
                break
            self._step(store)

    def _step(self, store: "PrefixStore") -> None:
        input_ids, continuation = self._pending[0]
        shadow = self._shadows[self._next_shadow]
        plan, _ = shadow.replay_fed(input_ids, continuation)
        self._scores[self._next_shadow] += plan.reuse_len
        self.steps_taken += 1
        self._next_shadow += 1
        if self._next_shadow < len(self._shadows):
            return
        self._pending.popleft()
        self._next_shadow = 0
        self._replayed += 1
        decay = 0.5 ** (1.0 / self.half_life)
        self._scores = [s * decay for s in self._scores]
        if self._replayed % self.check_every == 0:
            self._maybe_switch(store)

    def _maybe_switch(self, store: "PrefixStore") -> None:
        live = self.grid.index(store.policy.alpha) if store.policy.alpha in self.grid else None
        best = max(range(len(self.grid)), key=lambda i: (self._scores[i], -i))
        live_score = self._scores[live] if live is not None else float("-inf")
        if best == live or self._scores[best] <= live_score * (1 + self.margin):
            return
        self.history.append(SwitchRecord(self._replayed, dict(zip(self.grid, self._scores)), self.grid[best]))
        store.note_alpha_tuning(self.grid[best])
