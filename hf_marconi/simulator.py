"""Trace replay: the prefix store with byte counts in place of tensors.

Requests are replayed one after another in arrival order; each one is looked up (``plan``), then its input and
output are committed with simulated payloads sized from the cost model. Policy decisions use the store's logical
clock only, so the same trace and settings always give the same numbers; wall time is measured for the
requests-per-second report and nothing else.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

from hf_marconi.costs import CostModel
from hf_marconi.policies.alpha import Tuner, TuningRecord
from hf_marconi.policies.shadow import SwitchRecord
from hf_marconi.policies.base import Policy
from hf_marconi.store import AdmitResult, PrefixStore, RequestPlan, StateSizes, StoreStats
from hf_marconi.trace import Request

RECORDED = "hf_marconi.recording"  # meta["source"] of a request recorded from a live cache (recording.SOURCE)


@dataclass(frozen=True)
class SimulationResult:
    policy: str
    capacity_bytes: int
    requests: int
    stats: StoreStats
    tunings: tuple[TuningRecord | SwitchRecord, ...]  # alpha tunings that ran during the replay (Marconi with a tuner)
    wall_seconds: float  # replay time, for reporting only

    @property
    def requests_per_second(self) -> float:
        return self.requests / self.wall_seconds if self.wall_seconds > 0 else float("inf")

    def asdict(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "capacity_bytes": self.capacity_bytes,
            "requests": self.requests,
            **self.stats.asdict(),
            "tuned_alphas": [t.alpha for t in self.tunings],
            "wall_seconds": self.wall_seconds,
            "requests_per_second": self.requests_per_second,
        }


def fed_output(request: Request) -> tuple[int, ...]:
    """The output tokens a live call serving ``request`` fed to the model (and so commits). A request recorded from a
    live cache (``hf_marconi.recording``) holds exactly those; any other trace's output is what the model generated,
    of which the last token is never fed."""
    return request.output_ids if request.meta.get("source") == RECORDED else request.output_ids[:-1]


def replay_one(store: PrefixStore, request: Request) -> tuple[RequestPlan, AdmitResult]:
    """Plan and commit ``request`` as the live call that served it did."""
    return store.replay_fed(request.input_ids, fed_output(request))


def replay_order(trace: Sequence[Request]) -> list[Request]:
    """Requests by arrival time; ties keep trace order."""
    return sorted(trace, key=lambda request: request.arrival)


def simulate(
    trace: Sequence[Request],
    policy: Policy,
    capacity_bytes: int,
    costs: CostModel,
    sizes: StateSizes | None = None,
    tuner: Tuner | None = None,
    check_every: int = 0,
) -> SimulationResult:
    """Replay ``trace`` through ``policy`` at ``capacity_bytes``.

    Args:
        sizes: byte sizes of one sequence's states (default: ``costs.state_sizes()``).
        tuner: an alpha tuner (Marconi only); its history is returned in ``tunings``.
        check_every: run the store's invariant checker after every ``check_every`` requests (0: never).
    """
    if check_every < 0:
        raise ValueError(f"check_every must be >= 0, got {check_every}")
    store = PrefixStore(capacity_bytes, policy, costs, sizes or costs.state_sizes(), tuner=tuner)
    ordered = replay_order(trace)
    start = time.perf_counter()
    for index, request in enumerate(ordered, 1):
        replay_one(store, request)
        if check_every and index % check_every == 0:
            store.check_invariants()
    wall = time.perf_counter() - start
    return SimulationResult(
        policy=policy.name,
        capacity_bytes=capacity_bytes,
        requests=len(ordered),
        stats=store.stats(),
        tunings=tuple(tuner.history) if tuner is not None else (),
        wall_seconds=wall,
    )

