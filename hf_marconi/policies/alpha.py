"""Retrospective bootstrapping of Marconi's alpha, and the offline oracle (best static alpha for a whole trace).

alpha stays 0 (pure LRU) until the first eviction, which happens after N requests. The tuner then snapshots the tree,
records the next ``window_factor * N`` requests as the live store sees them, replays that window from the snapshot with
every alpha of the grid on simulated payloads, and keeps the best by the objective. With ``retune=True`` it repeats
this for every later window of the same length. The replays are deterministic: no wall clock enters them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Protocol, Sequence

from hf_marconi.policies.base import CostModel, Policy
from hf_marconi.policies.paper import MarconiPolicy

if TYPE_CHECKING:
    from hf_marconi.snapshot import StoreSnapshot
    from hf_marconi.store import AdmitResult, PrefixStore, RequestPlan, StateSizes, StoreStats


class Tuner(Protocol):
    """What a store needs of an alpha tuner: it attaches itself (as a commit observer) to the store it tunes; its
    ``history`` lists the alpha changes it made (records with an ``alpha``)."""

    history: list

    def attach(self, store: "PrefixStore") -> None: ...

# The paper's grid: 0, 0.1, ..., 2.0.
PAPER_ALPHA_GRID: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(21))
# A logarithmic grid for long agentic contexts, where the best alpha can lie far above 2 (DESIGN.md).
WIDE_ALPHA_GRID: tuple[float, ...] = (0.0,) + tuple(2.0**e for e in range(-3, 8))

OBJECTIVES = ("token_hits", "flops_saved")


def objective_value(stats: "StoreStats", objective: str) -> float:
    if objective == "token_hits":
        return float(stats.hit_tokens)
    if objective == "flops_saved":
        return stats.flops_saved
    raise ValueError(f"unknown objective {objective!r}; choose one of {OBJECTIVES}")


def replay_window(
    snapshot: "StoreSnapshot",
    window: Sequence[tuple[tuple[int, ...], tuple[int, ...]]],
    policy: Policy,
    capacity_bytes: int,
    costs: CostModel,
    sizes: "StateSizes",
) -> "StoreStats":
    """Replay ``(input_ids, tokens committed after them)`` pairs from ``snapshot`` through ``policy`` (a fresh policy at
    one static alpha); returns the replay's stats."""
    from hf_marconi.store import PrefixStore

    store = PrefixStore.from_snapshot(snapshot, capacity_bytes, policy, costs, sizes)
    for input_ids, continuation in window:
        store.replay_fed(input_ids, continuation)
    return store.stats()


@dataclass(frozen=True)
class TuningRecord:
    after_request: int  # requests committed when the tuning ran
    window_len: int
    scores: dict[float, float]  # alpha -> objective over the window
    alpha: float  # the alpha chosen


@dataclass
class AlphaTuner:
    """Retrospective bootstrapping for a store whose policy has an ``alpha`` (see the module docstring).

    Args:
        grid: alphas to try; ties go to the one listed first.
        window_factor: k in W = k * N (N = requests before the first eviction); the paper's artifact uses 5.
        objective: "token_hits" or "flops_saved" summed over the replayed window.
        retune: tune again after every further window of W requests.
    """

    grid: tuple[float, ...] = PAPER_ALPHA_GRID
    window_factor: int = 5
    objective: str = "token_hits"
    retune: bool = False
    history: list[TuningRecord] = field(default_factory=list)
    _requests: int = 0
    _finished: bool = False  # a single tuning (retune=False) has run
    _window_len: int | None = None
    _snapshot: "StoreSnapshot | None" = None  # simulated: holding stored states would keep evicted ones alive
    _window: list[tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.grid or any(a < 0 for a in self.grid):
            raise ValueError(f"grid must be a non-empty sequence of alphas >= 0, got {self.grid}")
        if self.window_factor < 1:
            raise ValueError(f"window_factor must be >= 1, got {self.window_factor}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}; choose one of {OBJECTIVES}")

    def attach(self, store: "PrefixStore") -> None:
        """Observe every later commit of ``store`` (whose policy must have an alpha)."""
        if store.policy.alpha is None:
            raise ValueError(f"policy {store.policy.name!r} has no alpha to tune; pass tuner=None or use MarconiPolicy")
        store.add_commit_observer(self.observe)

    def observe(self, store: "PrefixStore", plan: "RequestPlan", tokens: tuple[int, ...], result: "AdmitResult") -> None:
        """Called by the store after every commit (with its lock held)."""
        input_ids, evicted = plan.input_ids, result.nodes_evicted > 0
        self._requests += 1
        if self._finished:
            return
        if self._snapshot is None:
            if evicted:
                self._window_len = self.window_factor * self._requests
                self._snapshot = store.snapshot(sizes_only=True)
            return
        self._window.append((input_ids, tokens[len(input_ids) :]))
        assert self._window_len is not None
        if len(self._window) < self._window_len:
            return
        scores = {
            alpha: objective_value(
                replay_window(self._snapshot, self._window, store.policy.with_alpha(alpha), store.capacity_bytes,
                              store.costs, store.sizes),
                self.objective,
            )
            for alpha in self.grid
        }
        best = max(self.grid, key=lambda a: (scores[a], -self.grid.index(a)))
        self.history.append(TuningRecord(self._requests, len(self._window), scores, best))
        store.note_alpha_tuning(best)
        self._window = []
        self._snapshot = store.snapshot(sizes_only=True) if self.retune else None
        self._finished = not self.retune


def oracle_alpha(
    requests: Iterable[tuple[Sequence[int], Sequence[int]]],
    capacity_bytes: int,
    costs: CostModel,
    sizes: "StateSizes",
    grid: Sequence[float] = PAPER_ALPHA_GRID,
    objective: str = "token_hits",
    policy: Policy | None = None,
) -> tuple[float, dict[float, "StoreStats"]]:
    """Offline oracle: replay the whole trace (``(input_ids, committed tokens)`` pairs) once per static alpha of
    ``policy`` (default: :class:`MarconiPolicy`); returns the best alpha by ``objective`` (ties: first in ``grid``) and
    every alpha's stats."""
    from hf_marconi.store import PrefixStore

    pairs = [(tuple(i), tuple(t)[len(i) :]) for i, t in requests]
    results: dict[float, "StoreStats"] = {}
    template = policy if policy is not None else MarconiPolicy()
    for alpha in grid:
        store = PrefixStore(capacity_bytes, template.with_alpha(alpha), costs, sizes)
        for input_ids, continuation in pairs:
            store.replay_fed(input_ids, continuation)
        results[alpha] = store.stats()
    best = max(grid, key=lambda a: (objective_value(results[a], objective), -list(grid).index(a)))
    return best, results
