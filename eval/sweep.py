"""Simulated replay sweeps: policies x capacities x traces x model presets, in parallel processes.

For every (trace, preset) the sweep first replays the trace with unlimited capacity under SGLang+ (which never evicts
there): the peak bytes of that run are the *footprint*, the bytes of every state the branch-point-and-end admission
would keep, and its hit rate is the ceiling of any policy with that admission (Marconi's repeat rule, which also
checkpoints prompt ends on traces that repeat prompts, can exceed it). The capacities of the trace are fractions of the footprint (default 5%, 15% and 40%: heavy, medium
and light pressure), rounded to MB and reported in GB, so every trace sees the same pressure levels whatever its
size. Every (policy variant, capacity) is then one run of :func:`replay`, which records each request's reused
prefix length so that TTFT can be modelled from a prefill profile (:mod:`eval.ttft`).

Policy variants (:data:`VARIANTS`): ``default`` (:func:`hf_marconi.policies.default_policy`, what a ``MarconiCache``
and the planner run: alpha tuned online by shadow replays), ``marconi`` (alpha tuned by retrospective bootstrapping over the paper's grid
0..2), ``marconi-wide`` (the same over a logarithmic grid up to 128), ``marconi-oracle`` (the best static alpha
of the wide grid for the whole trace, found by replaying it once per alpha; run only on traces with at most
``oracle_max_tokens`` input tokens), ``sglang+``, ``vllm+`` (32-token blocks) and ``no-cache``.
"""

from __future__ import annotations

import csv
import json
import time
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from hf_marconi.presets import preset
from hf_marconi.policies import (
    PAPER_ALPHA_GRID,
    WIDE_ALPHA_GRID,
    AlphaTuner,
    Tuner,
    default_policy,
    make_policy,
    oracle_alpha,
)
from hf_marconi.simulator import fed_output, replay_one, replay_order
from hf_marconi.store import PrefixStore
from hf_marconi.trace import Request

GB = 1e9
DEFAULT_TRACES: tuple[str, ...] = ("swebench", "tau", "oasst", "bbh", "mtbench", "mooncake")
DEFAULT_FRACTIONS: tuple[float, ...] = (0.05, 0.15, 0.4)
UNLIMITED = "unlimited"
TTFT_QUANTILES = np.linspace(0.0, 1.0, 51)


@dataclass(frozen=True)
class PolicyVariant:
    """A policy as the sweep runs it: a ``make_policy`` name plus alpha tuning (a grid) or an oracle (a grid)."""

    label: str
    policy: str
    tuning_grid: tuple[float, ...] | None = None
    oracle_grid: tuple[float, ...] | None = None
    description: str = ""
    from_default: bool = False  # policy and tuner from hf_marconi.policies.default_policy()
    options: tuple[tuple[str, Any], ...] = ()  # keyword arguments of the policy's constructor


# The paper's Marconi: its eviction score, FLOP efficiency not weighted by a shared prefix's recent hits.
_PAPER_SCORE = (("reuse_half_life", None),)


VARIANTS: dict[str, PolicyVariant] = {
    v.label: v
    for v in (
        PolicyVariant("default", "marconi", from_default=True,
                      description="hf_marconi.policies.default_policy(): Marconi, alpha tuned online by shadow replays"),
        PolicyVariant("marconi", "marconi", tuning_grid=PAPER_ALPHA_GRID, options=_PAPER_SCORE,
                      description="the paper's Marconi, alpha tuned on the paper's grid 0, 0.1, ..., 2"),
        PolicyVariant("marconi-wide", "marconi", tuning_grid=WIDE_ALPHA_GRID, options=_PAPER_SCORE,
                      description="the paper's Marconi, alpha tuned on the wide grid 0, 1/8, ..., 128"),
        PolicyVariant("marconi-oracle", "marconi", oracle_grid=WIDE_ALPHA_GRID, options=_PAPER_SCORE,
                      description="the paper's Marconi, best static alpha of the wide grid for the whole trace "
                                  "(offline)"),
        PolicyVariant("sglang+", "sglang+", description="Marconi's admission, LRU eviction of leaves"),
        PolicyVariant("vllm+", "vllm+", description="a checkpoint every 32 tokens, LRU eviction of leaf blocks"),
        PolicyVariant("no-cache", "no-cache", description="nothing is cached"),
    )
}
DEFAULT_VARIANTS: tuple[str, ...] = ("default", "marconi", "marconi-wide", "marconi-oracle", "sglang+", "vllm+", "no-cache")


@dataclass(frozen=True)
class SweepSpec:
    """What a sweep runs.

    Attributes:
        traces: trace names of ``eval.traces.BUILDERS``.
        variants: keys of :data:`VARIANTS`.
        fractions: capacities as fractions of each (trace, preset) footprint (module docstring).
        presets: cost model presets of ``hf_marconi.costs.PRESETS``.
        max_sessions: use only the first sessions of each trace (mooncake: ``max_sessions_mooncake`` requests);
            a per-trace override in ``trace_max_sessions``.
        trace_options: further builder options for every trace (e.g. ``max_input_tokens``).
        oracle_max_tokens: run ``marconi-oracle`` only on traces with at most this many input tokens.
        workers: processes replaying runs in parallel.
    """

    traces: tuple[str, ...] = DEFAULT_TRACES
    variants: tuple[str, ...] = DEFAULT_VARIANTS
    fractions: tuple[float, ...] = DEFAULT_FRACTIONS
    presets: tuple[str, ...] = ("paper-7b-hybrid",)
    max_sessions: int | None = None
    trace_max_sessions: dict[str, int] = field(default_factory=dict)
    trace_options: dict[str, Any] = field(default_factory=dict)
    oracle_max_tokens: int = 10_000_000
    workers: int = 2

    def __post_init__(self) -> None:
        from eval.traces import BUILDERS
        from hf_marconi.presets import PRESETS

        for name in self.traces:
            if name not in BUILDERS:
                raise ValueError(f"unknown trace {name!r}; choose from {', '.join(BUILDERS)}")
        for name in self.variants:
            if name not in VARIANTS:
                raise ValueError(f"unknown policy variant {name!r}; choose from {', '.join(VARIANTS)}")
        for name in self.presets:
            if name not in PRESETS:
                raise ValueError(f"unknown model preset {name!r}; choose from {', '.join(PRESETS)}")
        if not self.fractions or any(not 0 < f <= 1 for f in self.fractions):
            raise ValueError(f"capacity fractions must lie in (0, 1], got {self.fractions}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")

    def sessions_of(self, trace: str) -> int | None:
        return self.trace_max_sessions.get(trace, self.max_sessions)

    def builder_options(self, trace: str) -> dict[str, Any]:
        """Options for ``eval.traces.build_trace(trace, ...)``."""
        from eval.traces import BUILDERS

        accepted = BUILDERS[trace].option_names()
        options = {k: v for k, v in self.trace_options.items() if k in accepted}
        sessions = self.sessions_of(trace)
        if sessions is not None:
            options["max_requests" if "max_requests" in accepted else "max_sessions"] = sessions
        return options


@dataclass(frozen=True)
class Run:
    """One replay of the sweep."""

    trace: str
    preset: str
    variant: str
    fraction: float | None  # None: unlimited capacity (the footprint run)
    capacity_bytes: int | None


# -------------------------------------------------------------------------------------------------- replay
def replay(
    trace: Sequence[Request], variant: PolicyVariant, capacity_bytes: int, preset_name: str
) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """Replay ``trace`` in arrival order (as ``hf_marconi.simulator.simulate`` does) and return the run's stats
    (``StoreStats.asdict()`` plus tuned / oracle alphas and wall seconds), each request's reused prefix length
    and each request's input length."""
    costs = preset(preset_name)
    sizes = costs.state_sizes()
    ordered = replay_order(trace)
    extra: dict[str, Any] = {}
    started = time.perf_counter()
    policy = make_policy(variant.policy, **dict(variant.options))
    if variant.oracle_grid is not None:
        pairs = [(r.input_ids, r.input_ids + fed_output(r)) for r in ordered]
        alpha, by_alpha = oracle_alpha(pairs, capacity_bytes, costs, sizes, grid=variant.oracle_grid, policy=policy)
        extra["oracle_alpha"] = alpha
        extra["oracle_hit_rates"] = {str(a): s.token_hit_rate for a, s in by_alpha.items()}
        policy = policy.with_alpha(alpha)
    tuner: Tuner | None = AlphaTuner(grid=variant.tuning_grid) if variant.tuning_grid is not None else None
    if variant.from_default:
        policy, tuner = default_policy()
    store = PrefixStore(capacity_bytes, policy, costs, sizes, tuner=tuner)
    reused, inputs = replay_store(store, ordered)
    stats = store.stats().asdict()
    stats["tuned_alphas"] = [t.alpha for t in tuner.history] if tuner is not None else []
    stats.update(extra)
    stats["wall_seconds"] = time.perf_counter() - started
    return stats, reused, inputs


def replay_store(store: PrefixStore, ordered: Sequence[Request]) -> tuple[np.ndarray, np.ndarray]:
    """Replay ``ordered`` through ``store`` in that order; returns each request's reused prefix length and input
    length."""
    reused = np.empty(len(ordered), dtype=np.int64)
    inputs = np.empty(len(ordered), dtype=np.int64)
    for index, request in enumerate(ordered):
        plan, _ = replay_one(store, request)
        reused[index] = plan.reuse_len
        inputs[index] = len(request.input_ids)
    return reused, inputs


# ------------------------------------------------------------------------------------------ worker process
_LOADED: dict[str, list[Request]] = {}  # the one trace this worker process holds (traces can take GBs)


def _load(trace: str, options: dict[str, Any]) -> list[Request]:
    from eval.traces import build_trace

    key = json.dumps([trace, options], sort_keys=True)
    if key not in _LOADED:
        _LOADED.clear()
        _LOADED[key] = build_trace(trace, **options)
    return _LOADED[key]


def run_one(run: Run, options: dict[str, Any], profile: Any | None) -> dict[str, Any]:
    """Execute one run in a worker process; returns its result row (see :func:`result_row`)."""
    requests = _load(run.trace, options)
    variant = VARIANTS["sglang+"] if run.fraction is None else VARIANTS[run.variant]
    capacity = run.capacity_bytes if run.capacity_bytes is not None else 2**62
    stats, reused, inputs = replay(requests, variant, capacity, run.preset)
    return result_row(run, stats, reused, inputs, profile)


def result_row(run: Run, stats: dict[str, Any], reused: np.ndarray, inputs: np.ndarray,
               profile: Any | None) -> dict[str, Any]:
    """The flat record of one run: its identity, capacity in GB, the store's stats and, with a prefill profile,
    modelled TTFT percentiles and quantiles (``ttft_quantiles`` at :data:`TTFT_QUANTILES`)."""
    row: dict[str, Any] = {
        "trace": run.trace,
        "preset": run.preset,
        "policy": run.variant,
        "fraction": run.fraction,
        "capacity_gb": run.capacity_bytes / GB if run.capacity_bytes is not None else None,
    }
    row.update(stats)
    row["capacity_bytes"] = run.capacity_bytes
    if profile is not None:
        ttft = profile.ttft(reused, inputs)
        row["ttft_p50_s"] = float(np.percentile(ttft, 50))
        row["ttft_p95_s"] = float(np.percentile(ttft, 95))
        row["ttft_mean_s"] = float(ttft.mean())
        row["ttft_quantiles"] = [float(q) for q in np.quantile(ttft, TTFT_QUANTILES)]
    return row


# ------------------------------------------------------------------------------------------------- driver
def _execute(runs: Sequence[Run], spec: SweepSpec, profile: Any | None, progress: Any) -> list[dict[str, Any]]:
    """Run ``runs`` on ``spec.workers`` processes (in this process when 1), in the given order."""
    if spec.workers == 1:
        rows = []
        for run in runs:
            rows.append(run_one(run, spec.builder_options(run.trace), profile))
            progress.update(1)
        return rows
    with ProcessPoolExecutor(max_workers=spec.workers) as pool:
        futures: dict[Future, int] = {
            pool.submit(run_one, run, spec.builder_options(run.trace), profile): i for i, run in enumerate(runs)
        }
        rows: list[dict[str, Any] | None] = [None] * len(runs)
        for future in as_completed(futures):
            rows[futures[future]] = future.result()
            progress.update(1)
    return [row for row in rows if row is not None]


_COST_ORDER = {"vllm+": 0, "marconi-oracle": 1, "default": 2, "marconi-wide": 3, "marconi": 4, "sglang+": 5,
               "no-cache": 6}


def plan_runs(spec: SweepSpec, footprints: dict[tuple[str, str], int], input_tokens: dict[str, int]) -> list[Run]:
    """The capacity-limited runs, grouped by trace (a worker keeps one trace loaded), slow policies first."""
    runs = []
    for trace in spec.traces:
        for preset_name in spec.presets:
            footprint = footprints[(trace, preset_name)]
            for variant in sorted(spec.variants, key=lambda v: _COST_ORDER.get(v, 9)):
                if VARIANTS[variant].oracle_grid is not None and input_tokens[trace] > spec.oracle_max_tokens:
                    continue
                for fraction in spec.fractions:
                    capacity = max(1, round(footprint * fraction / 1e6)) * 10**6
                    runs.append(Run(trace, preset_name, variant, fraction, capacity))
    return runs


def run_sweep(spec: SweepSpec, profile: Any | None = None, show_progress: bool = True) -> dict[str, Any]:
    """Run the sweep; returns ``{"spec", "footprints", "rows", "seconds"}`` where ``rows`` holds one
    :func:`result_row` per run, the unlimited-capacity runs (policy ``"unlimited"``) included."""
    from tqdm.auto import tqdm

    started = time.perf_counter()
    footprint_runs = [Run(t, p, UNLIMITED, None, None) for t in spec.traces for p in spec.presets]
    with tqdm(total=len(footprint_runs), desc="footprints", disable=not show_progress, unit="run") as bar:
        unlimited = _execute(footprint_runs, spec, profile, bar)
    footprints = {(r["trace"], r["preset"]): int(r["peak_bytes"]) for r in unlimited}
    input_tokens = {r["trace"]: int(r["input_tokens"]) for r in unlimited}
    runs = plan_runs(spec, footprints, input_tokens)
    with tqdm(total=len(runs), desc="sweep", disable=not show_progress, unit="run") as bar:
        rows = _execute(runs, spec, profile, bar)
    return {
        "spec": _spec_dict(spec),
        "footprints_gb": {f"{t}/{p}": b / GB for (t, p), b in footprints.items()},
        "rows": unlimited + rows,
        "seconds": time.perf_counter() - started,
    }


def _spec_dict(spec: SweepSpec) -> dict[str, Any]:
    out = asdict(spec)
    out["variant_descriptions"] = {v: VARIANTS[v].description for v in spec.variants}
    return out


# -------------------------------------------------------------------------------------------------- outputs
CSV_COLUMNS = (
    "trace", "preset", "policy", "fraction", "capacity_gb", "requests", "token_hit_rate", "request_hit_rate",
    "flops_saved_fraction", "hit_tokens", "input_tokens", "flops_saved", "hits_purely_input", "hits_input_output",
    "checkpoints_admitted", "checkpoints_evicted", "nodes_evicted", "admissions_refused", "peak_bytes", "alpha",
    "oracle_alpha", "ttft_p50_s", "ttft_p95_s", "ttft_mean_s", "wall_seconds",
)


def write_results(result: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write ``results.json`` (everything), ``results.csv`` (one line per run) and ``table.md`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "csv": out / "results.csv", "table": out / "table.md"}
    paths["json"].write_text(json.dumps(result, indent=1, default=str) + "\n")
    with paths["csv"].open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in result["rows"]:
            writer.writerow({k: _csv_value(row.get(k)) for k in CSV_COLUMNS})
    paths["table"].write_text(markdown_table(result["rows"]) + "\n")
    return paths


def _csv_value(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else value


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """Token hit rate (%) per trace / capacity (rows) and policy (columns); FLOPs saved (%) in brackets."""
    policies = [p for p in (UNLIMITED, *DEFAULT_VARIANTS) if any(r["policy"] == p for r in rows)]
    policies += sorted({r["policy"] for r in rows} - set(policies))
    keys: list[tuple[str, str, float]] = []
    cells: dict[tuple[str, str, float, str], dict[str, Any]] = {}
    for row in rows:
        if row["policy"] == UNLIMITED:
            continue
        key = (row["trace"], row["preset"], row["capacity_gb"])
        if key not in keys:
            keys.append(key)
        cells[(*key, row["policy"])] = row
    unlimited = {(r["trace"], r["preset"]): r for r in rows if r["policy"] == UNLIMITED}
    shown = [p for p in policies if p != UNLIMITED]
    header = ["trace", "preset", "capacity GB (of footprint)", *shown, "unlimited"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 3 + ["--:"] * (len(header) - 3)) + "|"]
    for trace, preset_name, capacity in sorted(keys, key=lambda k: (k[0], k[1], k[2])):
        any_row = next(cells[(trace, preset_name, capacity, p)] for p in shown if (trace, preset_name, capacity, p) in cells)
        cols = [trace, preset_name, f"{capacity:,.1f} ({any_row['fraction']:.0%})"]
        for policy in shown:
            row = cells.get((trace, preset_name, capacity, policy))
            cols.append("" if row is None else _cell(row))
        top = unlimited.get((trace, preset_name))
        cols.append("" if top is None else _cell(top))
        lines.append("| " + " | ".join(cols) + " |")
    return "\n".join(lines)


def _cell(row: dict[str, Any]) -> str:
    text = f"{100 * row['token_hit_rate']:.1f} ({100 * row['flops_saved_fraction']:.1f})"
    alpha = row.get("oracle_alpha", row.get("alpha")) if row["policy"].startswith("marconi") else None
    if alpha is not None:
        text += f" a={alpha:g}"
    return text
