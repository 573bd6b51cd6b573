"""Policy benchmark: replay the SWE-bench agent trace through Marconi, SGLang+ and vLLM+ at several capacities.

    python -m eval.bench_policies                       # 10, 20 and 40 GB, the paper's 7B hybrid, paper alpha grid
    python -m eval.bench_policies --grids paper wide    # Marconi tuned over both alpha grids
    python -m eval.bench_policies --capacities-gb 5 20 --workers 1
    python -m eval.bench_policies --sessions-per-second 4 --mean-response-s 10   # other arrival settings
    python -m eval.bench_policies --arrivals exponential   # exponential response gaps instead of the paper's

Marconi runs with retrospective alpha tuning over the paper's grid (0, 0.1, ..., 2.0) and/or a wide logarithmic
grid (0, 1/8, ..., 128), tuned once (``--retune`` tunes again after every window). Sessions start at
``--sessions-per-second`` (default 1: all 100 sessions start within 100 s and most overlap, since one lasts about
30 turns of ``--mean-response-s`` = 5 s, drawn as the paper's artifact draws them, ``--arrivals poisson``), so about
100 long agent contexts compete for 10-40 GB. Runs are spread over worker processes; every run is deterministic,
only the requests/s column depends on the machine.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from hf_marconi.presets import PRESETS, preset
from hf_marconi.policies import PAPER_ALPHA_GRID, WIDE_ALPHA_GRID, AlphaTuner, BlockPolicy, LRUPolicy, MarconiPolicy
from hf_marconi.simulator import SimulationResult, simulate
from hf_marconi.trace import Request

from eval.traces.timing import ARRIVALS

GRIDS = {"paper": PAPER_ALPHA_GRID, "wide": WIDE_ALPHA_GRID}


@dataclass(frozen=True)
class Run:
    label: str  # "marconi[paper]", "marconi[wide]", "sglang+", "vllm+"
    capacity_bytes: int


_TRACE: list[Request] = []  # set in the parent before the workers fork, so the trace is not pickled per run
_SETTINGS: dict = {}


def _execute(run: Run) -> tuple[Run, SimulationResult]:
    costs = preset(_SETTINGS["preset"])
    tuner = None
    if run.label.startswith("marconi"):
        grid = GRIDS[run.label[len("marconi[") : -1]]
        policy = MarconiPolicy(reuse_half_life=None)  # the paper's Marconi: its eviction score
        tuner = AlphaTuner(grid=grid, window_factor=_SETTINGS["window_factor"], objective=_SETTINGS["objective"],
                           retune=_SETTINGS["retune"])
    elif run.label == "sglang+":
        policy = LRUPolicy()
    else:
        policy = BlockPolicy(block_size=_SETTINGS["block_size"])
    return run, simulate(_TRACE, policy, run.capacity_bytes, costs, tuner=tuner)


def plan_runs(capacities: Sequence[int], grids: Sequence[str]) -> list[Run]:
    labels = [f"marconi[{g}]" for g in grids] + ["sglang+", "vllm+"]
    runs = [Run(label, cap) for cap in capacities for label in labels]
    # Longest first so the workers finish together: vLLM+ and tuned Marconi grow slower with capacity (more nodes
    # churned, longer tuning windows); SGLang+ is quick.
    return sorted(runs, key=lambda r: (r.label == "sglang+", -r.capacity_bytes, r.label))


def format_table(results: list[tuple[Run, SimulationResult]]) -> str:
    header = (f"{'capacity':>9} {'policy':<15} {'token hit':>9} {'req hit':>8} {'FLOPs saved':>11} "
              f"{'alpha':>6} {'evicted':>8} {'req/s':>8}")
    lines = [header, "-" * len(header)]
    for run, res in sorted(results, key=lambda item: (item[0].capacity_bytes, item[0].label)):
        s = res.stats
        alpha = f"{s.alpha:g}" if s.alpha is not None else "-"
        lines.append(
            f"{run.capacity_bytes / 1e9:>7.1f}GB {run.label:<15} {100 * s.token_hit_rate:>8.2f}% "
            f"{100 * s.request_hit_rate:>7.2f}% {100 * s.flops_saved_fraction:>10.2f}% {alpha:>6} "
            f"{s.checkpoints_evicted:>8} {res.requests_per_second:>8.0f}"
        )
    return "\n".join(lines)


def format_checks(results: list[tuple[Run, SimulationResult]], grids: Sequence[str]) -> str:
    """The paper's ordering: Marconi far above vLLM+, at or above SGLang+ under pressure."""
    by = {(r.label, r.capacity_bytes): res.stats.token_hit_rate for r, res in results}
    lines = []
    for cap in sorted({r.capacity_bytes for r, _ in results}):
        vllm, sglang = by[("vllm+", cap)], by[("sglang+", cap)]
        for grid in grids:
            marconi = by[(f"marconi[{grid}]", cap)]
            factor = f"{marconi / vllm:.1f}x" if vllm > 0 else "inf"
            lines.append(f"{cap / 1e9:>7.1f}GB marconi[{grid}]: {factor} vLLM+'s token hit rate, "
                         f"{100 * (marconi - sglang):+.2f} points vs SGLang+")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--capacities-gb", type=float, nargs="+", default=[10.0, 20.0, 40.0])
    parser.add_argument("--preset", default="paper-7b-hybrid", choices=sorted(PRESETS))
    parser.add_argument("--grids", nargs="+", default=["paper"], choices=sorted(GRIDS),
                        help="alpha grids to tune Marconi over, one Marconi run per grid")
    parser.add_argument("--window-factor", type=int, default=5, help="k in the tuning window W = k * N")
    parser.add_argument("--objective", default="token_hits", choices=["token_hits", "flops_saved"])
    parser.add_argument("--retune", action="store_true", help="tune alpha again after every window, not once")
    parser.add_argument("--sessions-per-second", type=float, default=1.0, help="session i starts at i / this")
    parser.add_argument("--mean-response-s", type=float, default=5.0, help="mean agent response time between turns")
    parser.add_argument("--arrivals", choices=ARRIVALS, default="poisson",
                        help="agent response times: poisson (whole seconds, the paper's artifact) or exponential")
    parser.add_argument("--block-size", type=int, default=32, help="vLLM+ block size in tokens")
    parser.add_argument("--max-input-tokens", type=int, default=32768, help="sessions are cut at this input length")
    parser.add_argument("--max-sessions", type=int, default=None, help="use only the first runs of the data file")
    parser.add_argument("--data-dir", default=None, help="the shared data folder (default: located automatically)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="also write every run's numbers here")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be >= 1")

    from eval.traces import build_trace

    start = time.perf_counter()
    trace = build_trace("swebench", data_dir=args.data_dir, max_input_tokens=args.max_input_tokens,
                        max_sessions=args.max_sessions, sessions_per_second=args.sessions_per_second,
                        mean_response_s=args.mean_response_s, arrivals=args.arrivals)
    loaded = time.perf_counter() - start
    _TRACE[:] = trace
    _SETTINGS.update(preset=args.preset, window_factor=args.window_factor, objective=args.objective,
                     block_size=args.block_size, retune=args.retune)
    costs = preset(args.preset)
    input_tokens = sum(len(r.input_ids) for r in trace)
    print(f"trace: swebench, {len(trace)} requests, {len({r.session_id for r in trace})} sessions, "
          f"{input_tokens} input tokens, {args.sessions_per_second:g} sessions/s, mean agent response "
          f"{args.mean_response_s:g} s ({args.arrivals} gaps; loaded in {loaded:.1f}s)")
    print(f"model: {costs}")

    runs = plan_runs([int(gb * 1e9) for gb in args.capacities_gb], args.grids)
    replay_start = time.perf_counter()
    if args.workers == 1:
        results = [_execute(run) for run in runs]
    else:
        with multiprocessing.get_context("fork").Pool(args.workers) as pool:
            results = pool.map(_execute, runs, chunksize=1)
    replay_wall = time.perf_counter() - replay_start
    print(format_table(results))
    print(format_checks(results, args.grids))
    tunings = {(r.label, r.capacity_bytes): [(t.after_request, t.window_len, t.alpha) for t in res.tunings]
               for r, res in results if res.tunings}
    for (label, cap), records in sorted(tunings.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        print(f"tuning {label} at {cap / 1e9:.1f}GB: (after request, window, alpha) {records}")
    cpu = os.times()
    print(f"replays: {len(runs)} runs in {replay_wall:.1f}s on {args.workers} worker(s); "
          f"total {time.perf_counter() - start:.1f}s, {cpu.user + cpu.children_user:.1f}s user CPU (workers included)")
    if args.json is not None:
        args.json.write_text(json.dumps([{"label": r.label, **res.asdict()} for r, res in results], indent=1))


if __name__ == "__main__":
    main()
