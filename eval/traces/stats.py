"""Summary statistics of a trace."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from hf_marconi.trace import Request


@dataclass(frozen=True)
class TraceStats:
    sessions: int
    requests: int
    input_tokens: int
    output_tokens: int
    mean_input: float
    max_input: int
    duration_s: float

    HEADER = ("sessions", "requests", "input tokens", "output tokens", "mean input", "max input", "duration s")

    def row(self) -> tuple[str, ...]:
        return (
            f"{self.sessions:,}",
            f"{self.requests:,}",
            f"{self.input_tokens:,}",
            f"{self.output_tokens:,}",
            f"{self.mean_input:,.0f}",
            f"{self.max_input:,}",
            f"{self.duration_s:,.0f}",
        )


def trace_stats(requests: Sequence[Request]) -> TraceStats:
    """Sessions, requests, token totals, mean / max input length and time span of ``requests``."""
    input_lengths = [len(r.input_ids) for r in requests]
    arrivals = [r.arrival for r in requests]
    return TraceStats(
        sessions=len({r.session_id for r in requests}),
        requests=len(requests),
        input_tokens=sum(input_lengths),
        output_tokens=sum(len(r.output_ids) for r in requests),
        mean_input=sum(input_lengths) / len(requests) if requests else 0.0,
        max_input=max(input_lengths, default=0),
        duration_s=max(arrivals, default=0.0) - min(arrivals, default=0.0),
    )
