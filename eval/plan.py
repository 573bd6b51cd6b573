"""Capacity planning on a user's own traffic and model: "how much does the cache save on my workload, at what size?".

:func:`plan` replays a trace (recorded from a live cache by :mod:`hf_marconi.recording`, any file
:func:`eval.traces.reading.read_trace` reads, or a built-in trace) through the policy a ``MarconiCache`` runs by default
(:func:`hf_marconi.policies.default_policy`, labelled ``marconi``) and the baselines, with the state sizes and FLOPs
of the user's model config (:func:`hf_marconi.families.cost_model`), over a range of capacities:

- The *footprint* is the peak bytes of a replay with unlimited capacity under the default policy: every state its
  admission keeps. Its token hit rate, the *unlimited-capacity hit rate*, is the ceiling of that admission.
- Capacities are fractions of the footprint (and any capacities given in bytes).
- The *knee* is the smallest capacity at which the default policy reaches ``knee_share`` (90%) of the
  unlimited-capacity token hit rate: the first capacity of the grid that does, narrowed by bisection against the
  grid capacity below it (``knee_steps`` more replays).
- Modelled TTFT per request is the prefill of its uncached suffix at a sustained throughput
  (:class:`eval.ttft.ComputeBoundPrefill`); P50 and P95 over the trace.

Replaying a recorded token-id trace at the live cache's capacity, with the model's dtype, reproduces the live cache's
counters exactly (``tests/test_plan.py``).
"""

from __future__ import annotations

import multiprocessing
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from hf_marconi.costs import CostModel
from hf_marconi.policies import default_policy, make_policy
from hf_marconi.simulator import replay_order
from hf_marconi.store import PrefixStore
from hf_marconi.trace import Request

from .sweep import replay_store
from .ttft import ComputeBoundPrefill

DEFAULT_FRACTIONS: tuple[float, ...] = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75)
POLICIES: tuple[str, ...] = ("marconi", "sglang+", "vllm+")
DEFAULT_PREFILL_TFLOPS = 400.0  # sustained bf16 prefill of one H100-class GPU (about 40% of its dense peak)
UNLIMITED_BYTES = 2**62


@dataclass(frozen=True)
class PlanSpec:
    """What a plan replays.

    Attributes:
        fractions: capacities as fractions of the footprint, each in (0, 1].
        capacities_bytes: further capacities in bytes.
        policies: ``"marconi"`` (the default policy) and baselines (``"sglang+"``, ``"vllm+"``).
        knee_share: the knee is the smallest capacity reaching this share of the unlimited-capacity token hit rate.
        knee_steps: bisection replays narrowing the knee between two grid capacities.
        prefill_flops_per_s: sustained prefill throughput of the modelled TTFT.
        workers: processes replaying the grid in parallel.
    """

    fractions: tuple[float, ...] = DEFAULT_FRACTIONS
    capacities_bytes: tuple[int, ...] = ()
    policies: tuple[str, ...] = POLICIES
    knee_share: float = 0.9
    knee_steps: int = 3
    prefill_flops_per_s: float = DEFAULT_PREFILL_TFLOPS * 1e12
    workers: int = 2

    def __post_init__(self) -> None:
        if any(not 0 < f <= 1 for f in self.fractions):
            raise ValueError(f"fractions must lie in (0, 1], got {self.fractions}")
        if any(c < 0 for c in self.capacities_bytes):
            raise ValueError(f"capacities must be >= 0 bytes, got {self.capacities_bytes}")
        if not self.fractions and not self.capacities_bytes:
            raise ValueError("give at least one capacity: a fraction of the footprint or a number of bytes")
        unknown = [p for p in self.policies if p not in POLICIES]
        if unknown or "marconi" not in self.policies:
            raise ValueError(f"policies must include 'marconi' (the default policy) and come from {POLICIES}, "
                             f"got {self.policies}")
        if not 0 < self.knee_share <= 1 or self.knee_steps < 0 or self.workers < 1:
            raise ValueError(f"need 0 < knee_share <= 1, knee_steps >= 0 and workers >= 1, got {self}")


@dataclass(frozen=True)
class Knee:
    """The smallest capacity found at which the default policy reaches ``target_share`` of the unlimited-capacity
    token hit rate."""

    capacity_bytes: int
    fraction: float  # of the footprint
    token_hit_rate: float
    unlimited_hit_rate: float
    target_share: float

    @property
    def share(self) -> float:
        return self.token_hit_rate / self.unlimited_hit_rate

    def sentence(self) -> str:
        return (f"at {format_bytes(self.capacity_bytes)} ({self.fraction:.1%} of the footprint) the default policy "
                f"gets {self.share:.0%} of the unlimited-capacity token hit rate ({100 * self.token_hit_rate:.1f}% of "
                f"{100 * self.unlimited_hit_rate:.1f}%)")


@dataclass
class PlanResult:
    trace: str  # what was replayed, in words
    model: str  # the cost model, in words
    footprint_bytes: int
    unlimited: dict[str, Any]  # the default policy's unlimited-capacity run
    no_cache_ttft: dict[str, float]  # modelled TTFT P50 / P95 (seconds) with nothing cached
    rows: list[dict[str, Any]]  # one per (policy, capacity), bisection replays included, by policy then capacity
    knee: Knee | None  # None when the trace has no reuse at all
    spec: PlanSpec
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def asdict(self) -> dict[str, Any]:
        out = asdict(self)
        out["knee"] = None if self.knee is None else dict(asdict(self.knee), share=self.knee.share,
                                                            sentence=self.knee.sentence())
        return out


# ----------------------------------------------------------------------------------------------------- model
def load_cost_model(source: str | Path, dtype: str = "bfloat16", recurrent_dtype: str = "float32") -> CostModel:
    """The cost model of a model config: a ``config.json``, a folder holding one (``save_pretrained`` output), or
    the name of a preset (:data:`hf_marconi.presets.PRESETS`). Nothing is downloaded."""
    from hf_marconi.families import cost_model
    from hf_marconi.presets import PRESETS, preset

    path = Path(source)
    if not path.exists():
        if str(source) in PRESETS:
            return preset(str(source), dtype=dtype, recurrent_dtype=recurrent_dtype)
        raise FileNotFoundError(f"{path} is neither a config.json, nor a folder holding one, nor a preset "
                                f"({', '.join(PRESETS)})")
    if path.is_dir() and not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} holds no config.json")
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    model = cost_model(config, dtype=dtype, recurrent_dtype=recurrent_dtype)
    model.name = f"{model.name} ({path})"
    return model


def describe_model(costs: CostModel) -> str:
    return (f"{costs.name}: {format_bytes(costs.kv_bytes_per_token)} of KV per token, "
            f"{format_bytes(costs.checkpoint_bytes)} per recurrent-state checkpoint "
            f"(one checkpoint = {costs.checkpoint_bytes / max(costs.kv_bytes_per_token, 1):,.0f} tokens of KV)")


# ---------------------------------------------------------------------------------------------------- replay
_TRACE: list[Request] = []  # the trace, in replay order; set before worker processes fork so it is never pickled


def _store(policy: str, capacity_bytes: int, costs: CostModel) -> PrefixStore:
    if policy == "marconi":
        chosen, tuner = default_policy()
    else:
        chosen, tuner = make_policy(policy), None
    return PrefixStore(capacity_bytes, chosen, costs, costs.state_sizes(), tuner=tuner)


def run_one(policy: str, capacity_bytes: int, costs: CostModel, ttft_model: ComputeBoundPrefill) -> dict[str, Any]:
    """Replay the loaded trace through ``policy`` at ``capacity_bytes``; the run's counters and modelled TTFT."""
    started = time.perf_counter()
    store = _store(policy, capacity_bytes, costs)
    reused, inputs = replay_store(store, _TRACE)
    stats = store.stats()
    ttft = ttft_model.ttft(reused, inputs)
    row = {"policy": policy, "capacity_bytes": capacity_bytes, **stats.asdict()}
    row.update(ttft_p50_s=float(np.percentile(ttft, 50)), ttft_p95_s=float(np.percentile(ttft, 95)),
               wall_seconds=time.perf_counter() - started)
    return row


def _run_grid(runs: Sequence[tuple[str, int]], costs: CostModel, ttft_model: ComputeBoundPrefill, workers: int,
              progress: Any) -> list[dict[str, Any]]:
    if workers == 1 or len(runs) == 1:
        rows = []
        for policy, capacity in runs:
            rows.append(run_one(policy, capacity, costs, ttft_model))
            progress.update(1)
        return rows
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        pending = [pool.apply_async(run_one, (policy, capacity, costs, ttft_model)) for policy, capacity in runs]
        rows = []
        for result in pending:
            rows.append(result.get())
            progress.update(1)
    return rows


def plan(trace: Sequence[Request], costs: CostModel, spec: PlanSpec = PlanSpec(), trace_name: str = "trace",
         show_progress: bool = True) -> PlanResult:
    """Replay ``trace`` per ``spec`` (module docstring) with the sizes and FLOPs of ``costs``."""
    from tqdm.auto import tqdm

    from .traces import trace_stats

    if not trace:
        raise ValueError("the trace holds no request")
    started = time.perf_counter()
    _TRACE[:] = replay_order(trace)
    ttft_model = ComputeBoundPrefill(costs, spec.prefill_flops_per_s)
    try:
        unlimited = run_one("marconi", UNLIMITED_BYTES, costs, ttft_model)
        footprint = int(unlimited["peak_bytes"])
        capacities = sorted({max(1, round(f * footprint)) for f in spec.fractions} | set(spec.capacities_bytes))
        runs = [(policy, capacity) for policy in spec.policies for capacity in capacities]
        with tqdm(total=len(runs), desc="plan", unit="run", disable=not show_progress) as bar:
            rows = _run_grid(runs, costs, ttft_model, spec.workers, bar)
        knee = None
        if unlimited["token_hit_rate"] > 0:
            knee, narrowing = _knee(rows, unlimited, footprint, spec, costs, ttft_model)
            rows += narrowing
        inputs = np.array([len(r.input_ids) for r in _TRACE])
        no_cache = ttft_model.ttft(np.zeros_like(inputs), inputs)
    finally:
        _TRACE.clear()
    for row in rows:
        row["fraction"] = row["capacity_bytes"] / footprint if footprint else None
    rows.sort(key=lambda r: (spec.policies.index(r["policy"]), r["capacity_bytes"]))
    stats = trace_stats(trace)
    notes = []
    if any(r.meta.get("source") == "hf_marconi.recording" and "namespace" in r.meta for r in trace):
        notes.append("calls recorded in a namespace (cache_salt) are replayed in their namespace")
    return PlanResult(
        trace=(f"{trace_name}: {stats.requests:,} requests, {stats.sessions:,} sessions, "
               f"{stats.input_tokens:,} input tokens (mean {stats.mean_input:,.0f}, max {stats.max_input:,})"),
        model=describe_model(costs),
        footprint_bytes=footprint,
        unlimited=unlimited,
        no_cache_ttft={"p50_s": float(np.percentile(no_cache, 50)), "p95_s": float(np.percentile(no_cache, 95))},
        rows=rows,
        knee=knee,
        spec=spec,
        seconds=time.perf_counter() - started,
        notes=notes,
    )


def _knee(rows: list[dict[str, Any]], unlimited: dict[str, Any], footprint: int, spec: PlanSpec, costs: CostModel,
          ttft_model: ComputeBoundPrefill) -> tuple[Knee, list[dict[str, Any]]]:
    """The knee (module docstring) and the bisection replays made to narrow it."""
    target = spec.knee_share * unlimited["token_hit_rate"]
    grid = sorted((r for r in rows if r["policy"] == "marconi"), key=lambda r: r["capacity_bytes"])
    # A capacity of the whole footprint evicts nothing: the unlimited run is its result.
    reached = [r for r in grid if r["token_hit_rate"] >= target] + [dict(unlimited, capacity_bytes=footprint)]
    best = reached[0]
    below = [r["capacity_bytes"] for r in grid if r["capacity_bytes"] < best["capacity_bytes"]]
    low = below[-1] if below else 0
    narrowing = []
    for _ in range(spec.knee_steps):
        middle = round((low * best["capacity_bytes"]) ** 0.5) if low else best["capacity_bytes"] // 2
        if not low < middle < best["capacity_bytes"]:
            break
        row = run_one("marconi", middle, costs, ttft_model)
        row["bisection"] = True
        narrowing.append(row)
        if row["token_hit_rate"] >= target:
            best = row
        else:
            low = middle
    knee = Knee(best["capacity_bytes"], best["capacity_bytes"] / footprint, best["token_hit_rate"],
                unlimited["token_hit_rate"], spec.knee_share)
    return knee, narrowing


# ---------------------------------------------------------------------------------------------------- output
def format_bytes(count: float) -> str:
    """``count`` bytes in GB, MB or KB (decimal units), three significant digits."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if count >= size:
            return f"{count / size:.3g} {unit}"
    return f"{count:.0f} B"


def format_plan(result: PlanResult) -> str:
    """The plan as text: what was replayed, the table of every capacity, the knee."""
    policies = list(result.spec.policies)
    lines = [f"trace: {result.trace}", f"model: {result.model}",
             f"footprint: {format_bytes(result.footprint_bytes)} (every state the default policy admits, nothing "
             f"evicted); unlimited-capacity token hit rate {100 * result.unlimited['token_hit_rate']:.1f}%, "
             f"FLOPs saved {100 * result.unlimited['flops_saved_fraction']:.1f}%"]
    lines += [f"note: {note}" for note in result.notes]
    tflops = result.spec.prefill_flops_per_s / 1e12
    lines.append(f"modelled TTFT: prefill FLOPs of the uncached suffix at {tflops:g} TFLOP/s, no queueing; without a "
                 f"cache P50 {_ms(result.no_cache_ttft['p50_s'])}, P95 {_ms(result.no_cache_ttft['p95_s'])}")
    lines.append("")
    groups = [("token hit rate (%)", "token_hit_rate", _pct), ("FLOPs saved (%)", "flops_saved_fraction", _pct),
              ("modelled TTFT P50 / P95 (ms)", "ttft", None)]
    by = {(r["policy"], r["capacity_bytes"]): r for r in result.rows}
    body = []
    for capacity in sorted({r["capacity_bytes"] for r in result.rows}):
        marker = " *" if result.knee is not None and capacity == result.knee.capacity_bytes else ""
        cells = [[format_bytes(capacity) + marker, f"{capacity / result.footprint_bytes:.1%}"]]
        for _, key, fmt in groups:
            group = []
            for policy in policies:
                row = by.get((policy, capacity))
                if row is None:
                    group.append("")
                elif fmt is None:
                    group.append(f"{_ms(row['ttft_p50_s'], unit=False)} / {_ms(row['ttft_p95_s'], unit=False)}")
                else:
                    group.append(fmt(row[key]))
            cells.append(group)
        body.append(cells)
    titles = ["", *(title for title, _, _ in groups)]
    header = [["capacity", "of footprint"], *([*policies] for _ in groups)]
    lines += _grouped_table(titles, header, body)
    lines.append("")
    if result.knee is None:
        lines.append("knee: none (nothing in the trace is reused, at any capacity)")
    else:
        definition = (f"smallest capacity reaching {result.spec.knee_share:.0%} of the unlimited-capacity token hit "
                      "rate, marked *")
        lines.append(f"knee ({definition}): {result.knee.sentence()}")
    return "\n".join(lines)


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def _ms(seconds: float, unit: bool = True) -> str:
    text = f"{seconds * 1e3:,.0f}" if seconds >= 0.01 else f"{seconds * 1e3:.2f}"
    return text + (" ms" if unit else "")


def _grouped_table(titles: list[str], header: list[list[str]], body: list[list[list[str]]]) -> list[str]:
    """Right-aligned columns in groups separated by " | ", each group's title centred above its columns."""
    widths = [[max(len(row[g][i]) for row in [header, *body]) for i in range(len(header[g]))]
              for g in range(len(header))]
    for group, title in zip(widths, titles):
        span = sum(group) + 2 * (len(group) - 1)
        group[-1] += max(0, len(title) - span)
    spans = [sum(group) + 2 * (len(group) - 1) for group in widths]

    def render(row: list[list[str]]) -> str:
        return " | ".join("  ".join(cell.rjust(width) for cell, width in zip(cells, group))
                          for cells, group in zip(row, widths))

    top = " | ".join(title.center(span) for title, span in zip(titles, spans))
    return [top.rstrip(), render(header), *(render(row) for row in body)]
