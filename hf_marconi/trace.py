"""The request record shared by the trace builders (``eval.traces``), the simulator and real-model replay."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Request:
    """One inference request of a workload trace.

    Attributes:
        session_id: requests of one conversation / agent run share it.
        arrival: arrival time in seconds from the start of the trace; traces are replayed in this order.
        input_ids: the whole prompt (history + new turn) as token ids.
        output_ids: the tokens the model produced for this request (empty when unknown).
        meta: free-form provenance (dataset, turn index, ...); never read by the cache or the policies.
    """

    session_id: str
    arrival: float
    input_ids: tuple[int, ...]
    output_ids: tuple[int, ...] = ()
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if len(self.input_ids) == 0:
            raise ValueError(f"request of session {self.session_id!r} has an empty input")
        if self.arrival < 0:
            raise ValueError(f"request of session {self.session_id!r} arrives at negative time {self.arrival}")
