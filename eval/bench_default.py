"""Does the default policy earn its place? Replay the issue-13 rows and compare it with the baselines.

    python -m eval.bench_default                      # all ten rows, two worker processes
    python -m eval.bench_default --rows swe:20 bbh:1  # some rows only
    python -m eval.bench_default --static-grid 16 64 256 --workers 1
    python -m eval.bench_default --compare previous inverse-age no-repeat-rule   # where the gain comes from

Every row is a trace built the paper's way (GPT-2 tokens, sessions cut at 32,768 input tokens, agent responses drawn
as Poisson(7.5 s) whole seconds as in the authors' artifact) at one capacity, with the paper's 7B hybrid. For each row
it replays :func:`hf_marconi.policies.default_policy` (what a ``MarconiCache`` and the planner use), SGLang+, vLLM+,
Marconi at every static alpha of ``--static-grid`` (default: the wide grid and the tuner's; the best is printed) and
the unlimited-capacity ceiling, and checks the bar of issue 13: the default at >= 1.10x the anchor (the best policy of the authors' simulator on the same row) or
within 2 points of the ceiling, and never below SGLang+.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import time
from dataclasses import dataclass
from typing import Any, Sequence

from hf_marconi.policies import (
    SHADOW_ALPHA_GRID,
    WIDE_ALPHA_GRID,
    AlphaTuner,
    BlockPolicy,
    LRUPolicy,
    MarconiPolicy,
    Policy,
    ShadowAlphaTuner,
    Tuner,
    default_policy,
)
from hf_marconi.presets import preset
from hf_marconi.simulator import simulate
from hf_marconi.trace import Request

GB = 10**9
UNLIMITED = 2**62
PRESET = "paper-7b-hybrid"
MEAN_RESPONSE_S = 7.5  # the authors' artifact draws agent response gaps as Poisson(7.5) whole seconds


@dataclass(frozen=True)
class Row:
    """One trace x capacity of the issue, with the anchor measured there on the authors' simulator."""

    key: str  # "swe:20"
    trace: str
    options: tuple[tuple[str, Any], ...]  # builder options
    capacity_gb: float
    anchor: float  # token hit rate in percent

    @property
    def trace_key(self) -> tuple[str, tuple[tuple[str, Any], ...]]:
        return self.trace, self.options


_AGENT = (("mean_response_s", MEAN_RESPONSE_S), ("arrivals", "poisson"))
ROWS: tuple[Row, ...] = (
    Row("swe:20", "swebench", _AGENT, 20, 12.82),
    Row("swe:40", "swebench", _AGENT, 40, 24.77),
    Row("swe:60", "swebench", _AGENT, 60, 38.57),
    Row("tau:2", "tau", _AGENT, 2, 45.70),
    Row("tau:5", "tau", _AGENT, 5, 63.90),
    Row("tau:10", "tau", _AGENT, 10, 90.95),
    Row("bbh:0.5", "bbh", (), 0.5, 9.99),
    Row("bbh:1", "bbh", (), 1, 32.29),
    Row("bbh:2", "bbh", (), 2, 74.92),
    Row("mooncake:20", "mooncake", (("max_requests", 3000),), 20, 3.79),
)


# Other (policy, tuner) pairs to set beside the default (--compare), each differing from it in one respect or more.
COMPARISONS = {
    # the default before issue 13: linear recency, retrospective bootstrapping once over the wide grid
    "previous": lambda: (MarconiPolicy(repeat_threshold=None, reuse_half_life=None), AlphaTuner(grid=WIDE_ALPHA_GRID)),
    # the paper's eviction score: FLOP efficiency without the weight of a shared prefix's recent hits
    "paper-score": lambda: (MarconiPolicy(reuse_half_life=None), ShadowAlphaTuner()),
    "inverse-age": lambda: (MarconiPolicy(recency="inverse-age"), ShadowAlphaTuner()),  # the authors' recency
    "no-repeat-rule": lambda: (MarconiPolicy(repeat_threshold=None), ShadowAlphaTuner()),
}


@dataclass(frozen=True)
class Job:
    trace: str
    options: tuple[tuple[str, Any], ...]
    label: str  # "default", "sglang+", "vllm+", "alpha=<a>", "ceiling", or a key of COMPARISONS
    capacity_bytes: int


_TRACES: dict[tuple[str, tuple[tuple[str, Any], ...]], list[Request]] = {}  # built in the parent, shared by fork


def _run(job: Job) -> tuple[Job, float, dict[str, Any]]:
    """Replay one job; returns it with its token hit rate (percent) and details."""
    costs = preset(PRESET)
    tuner: Tuner | None = None
    policy: Policy
    if job.label == "default":
        policy, tuner = default_policy()
    elif job.label in COMPARISONS:
        policy, tuner = COMPARISONS[job.label]()
    elif job.label in ("sglang+", "ceiling"):
        policy = LRUPolicy()  # with unlimited capacity nothing is evicted: the ceiling of Marconi's admission
    elif job.label == "vllm+":
        policy = BlockPolicy()
    else:
        policy = MarconiPolicy(alpha=float(job.label[len("alpha="):]))
    result = simulate(_TRACES[(job.trace, job.options)], policy, job.capacity_bytes, costs, tuner=tuner)
    alphas = [t.alpha for t in result.tunings]
    return job, 100 * result.stats.token_hit_rate, {"wall_s": result.wall_seconds, "alphas": alphas,
                                                     "final_alpha": result.stats.alpha}


def jobs_for(rows: Sequence[Row], static_grid: Sequence[float], compare: Sequence[str] = ()) -> list[Job]:
    jobs: list[Job] = []
    for trace_key in dict.fromkeys(r.trace_key for r in rows):
        jobs.append(Job(*trace_key, "ceiling", UNLIMITED))
    for row in rows:
        cap = int(row.capacity_gb * GB)
        labels = ["default", *compare, "sglang+", "vllm+"] + [f"alpha={a:g}" for a in static_grid]
        jobs.extend(Job(row.trace, row.options, label, cap) for label in labels)
    # The long replays first so the workers finish together (vLLM+ churns many nodes, the default tunes).
    return sorted(jobs, key=lambda j: (j.label.startswith("alpha=") or j.label == "sglang+", -j.capacity_bytes))


def verdict(row: Row, default: float, sglang: float, ceiling: float) -> str:
    """The issue's bar for one row: "ok" or what fails."""
    fails = []
    if default < 1.10 * row.anchor and default < ceiling - 2.0:
        fails.append("below 1.10x anchor and 2 pts under the ceiling")
    if default < sglang:
        fails.append("below SGLang+")
    return "ok" if not fails else "; ".join(fails)


def format_table(rows: Sequence[Row], results: dict[tuple[str, int, str], tuple[float, dict[str, Any]]],
                 ceilings: dict[tuple[str, tuple], float], static_grid: Sequence[float]) -> str:
    header = (f"{'row':<12} {'ceiling':>7} {'anchor':>6} {'default':>7} {'x anch':>6} {'sglang+':>7} {'vllm+':>6} "
              f"{'best static':>13} {'alphas tuned':<22} verdict")
    lines = [header, "-" * len(header)]
    for row in rows:
        cap = int(row.capacity_gb * GB)
        default, details = results[("default", cap, row.trace)]
        sglang = results[("sglang+", cap, row.trace)][0]
        vllm = results[("vllm+", cap, row.trace)][0]
        statics = {a: results[(f"alpha={a:g}", cap, row.trace)][0] for a in static_grid}
        best = max(statics, key=lambda a: statics[a]) if statics else None
        best_cell = f"{statics[best]:.2f}@{best:g}" if best is not None else "-"
        ceiling = ceilings[row.trace_key]
        tuned = ",".join(f"{a:g}" for a in details["alphas"][:6]) + ("..." if len(details["alphas"]) > 6 else "")
        lines.append(f"{row.key:<12} {ceiling:>7.2f} {row.anchor:>6.2f} {default:>7.2f} "
                     f"{default / row.anchor:>5.2f}x {sglang:>7.2f} {vllm:>6.2f} {best_cell:>13} {tuned or '-':<22} "
                     f"{verdict(row, default, sglang, ceiling)}")
    return "\n".join(lines)


def format_comparison(rows: Sequence[Row], results: dict[tuple[str, int, str], tuple[float, dict[str, Any]]],
                      compare: Sequence[str]) -> str:
    """The default's token hit rate beside each comparison's (percent)."""
    header = f"{'row':<12} {'default':>8} " + " ".join(f"{label:>15}" for label in compare)
    lines = [header, "-" * len(header)]
    for row in rows:
        cap = int(row.capacity_gb * GB)
        cells = " ".join(f"{results[(label, cap, row.trace)][0]:>15.2f}" for label in compare)
        lines.append(f"{row.key:<12} {results[('default', cap, row.trace)][0]:>8.2f} {cells}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", default=[r.key for r in ROWS], choices=[r.key for r in ROWS])
    parser.add_argument("--static-grid", type=float, nargs="*", default=sorted({*WIDE_ALPHA_GRID, *SHADOW_ALPHA_GRID}),
                        help="static alphas to replay for the best-static column (none: skip it)")
    parser.add_argument("--compare", nargs="*", default=[], choices=sorted(COMPARISONS),
                        help="other (policy, tuner) pairs to replay beside the default (a second table)")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be >= 1")

    from eval.traces import build_trace

    start = time.perf_counter()
    rows = [r for r in ROWS if r.key in args.rows]
    for row in rows:
        if row.trace_key not in _TRACES:
            _TRACES[row.trace_key] = build_trace(row.trace, **dict(row.options))
    jobs = jobs_for(rows, args.static_grid, args.compare)
    if args.workers == 1:
        done = [_run(j) for j in jobs]
    else:
        with multiprocessing.get_context("fork").Pool(args.workers) as pool:
            done = pool.map(_run, jobs, chunksize=1)
    results = {(j.label, j.capacity_bytes, j.trace): (rate, d) for j, rate, d in done}
    ceilings = {(j.trace, j.options): rate for j, rate, _ in done if j.label == "ceiling"}
    default_wall = {j.trace + f":{j.capacity_bytes / GB:g}": d["wall_s"] for j, _, d in done if j.label == "default"}
    print(f"token hit rates (%), {PRESET}, GPT-2 tokens, 32K cut, Poisson({MEAN_RESPONSE_S:g} s) agent gaps; "
          f"default = hf_marconi.policies.default_policy()")
    print(format_table(rows, results, ceilings, args.static_grid))
    if args.compare:
        print(format_comparison(rows, results, args.compare))
    print("default replay wall (s): " + ", ".join(f"{k} {v:.1f}" for k, v in default_wall.items()))
    cpu = os.times()
    print(f"{len(jobs)} replays in {time.perf_counter() - start:.0f}s wall on {args.workers} worker(s), "
          f"{cpu.user + cpu.children_user:.0f}s user CPU")


if __name__ == "__main__":
    main()
