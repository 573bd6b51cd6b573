"""``python -m eval sweep``: simulated replay sweeps (policies x capacities x traces x model presets)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .traces.cli import add_arrivals_option
from .sweep import DEFAULT_FRACTIONS, DEFAULT_TRACES, DEFAULT_VARIANTS, VARIANTS, SweepSpec

# The default report's trace shortening: keeps the sweep under 30 minutes on a 2-core machine.
DEFAULT_TRACE_SESSIONS = "bbh=2000,mooncake=3000"


def _names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def _per_trace(text: str) -> dict[str, int]:
    out = {}
    for item in _names(text):
        name, sep, value = item.partition("=")
        if not sep or not value.isdigit():
            raise argparse.ArgumentTypeError(f"expected NAME=COUNT items separated by commas, got {item!r}")
        out[name] = int(value)
    return out


def add_sweep_options(parser: argparse.ArgumentParser, trace_sessions_default: str = DEFAULT_TRACE_SESSIONS) -> None:
    """The options that define a :class:`eval.sweep.SweepSpec`."""
    from eval.traces import BUILDERS
    from hf_marconi.presets import PRESETS

    add = parser.add_argument
    add("--traces", type=_names, default=DEFAULT_TRACES,
        help=f"comma-separated traces, from: {', '.join(BUILDERS)} (default: all)")
    add("--policies", type=_names, default=DEFAULT_VARIANTS,
        help="comma-separated policy variants: " + "; ".join(f"{k}: {v.description}" for k, v in VARIANTS.items())
        + " (default: all)")
    add("--fractions", type=lambda s: tuple(float(x) for x in _names(s)), default=DEFAULT_FRACTIONS,
        help="cache capacities as fractions of each trace's footprint (the peak bytes of an unlimited-capacity "
        "replay under Marconi's admission), comma-separated (default: %(default)s)")
    add("--presets", type=_names, default=("paper-7b-hybrid",),
        help=f"comma-separated model presets giving state sizes and FLOPs, from: {', '.join(PRESETS)} "
        "(default: paper-7b-hybrid)")
    add("--max-sessions", type=int,
        help="use only the first sessions of every trace (mooncake: requests) not named in --trace-sessions "
        "(default: all)")
    add("--trace-sessions", type=_per_trace, default=_per_trace(trace_sessions_default),
        help="per-trace shortening as NAME=COUNT,... (first sessions; mooncake: first requests); pass '' for "
        "full traces (default: %(default)s)")
    add("--max-input-tokens", type=int, default=32768,
        help="a session ends before its first request with a longer input (default: %(default)s)")
    add("--mean-response-s", type=float, default=5.0,
        help="mean agent response time of swebench and tau (default: %(default)s)")
    add_arrivals_option(parser)
    add("--oracle-max-tokens", type=int, default=10_000_000,
        help="run marconi-oracle (one replay per alpha) only on traces with at most this many input tokens "
        "(default: %(default)s)")
    add("--workers", type=int, default=2, help="parallel replay processes (default: %(default)s)")


def sweep_spec(args: argparse.Namespace) -> SweepSpec:
    return SweepSpec(
        traces=args.traces, variants=args.policies, fractions=args.fractions, presets=args.presets,
        max_sessions=args.max_sessions, trace_max_sessions=args.trace_sessions,
        trace_options={"max_input_tokens": args.max_input_tokens, "mean_response_s": args.mean_response_s,
                       "arrivals": args.arrivals},
        oracle_max_tokens=args.oracle_max_tokens,
        workers=args.workers,
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sweep",
        help="replay traces through the simulated cache for every policy, capacity and preset",
        description=(
            "Replay workload traces through the simulated prefix cache (byte counts, no tensors) for every policy "
            "variant x capacity x model preset, in parallel processes. Writes results.json and results.csv (one "
            "record per run) and table.md (token hit rate per trace, capacity and policy) into --out. With "
            "--profile, each run also gets modelled TTFT percentiles."
        ),
    )
    add_sweep_options(parser)
    parser.add_argument("--out", type=Path, required=True, help="folder for results.json, results.csv, table.md")
    parser.add_argument("--profile", type=Path,
                        help="a prefill-latency profile (python -m eval ttft profile) for modelled TTFT (default: none)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from .sweep import run_sweep, write_results
    from .ttft import PrefillProfile

    profile = PrefillProfile.load(args.profile) if args.profile is not None else None
    result = run_sweep(sweep_spec(args), profile, show_progress=not args.quiet)
    paths = write_results(result, args.out)
    print(paths["table"].read_text())
    print(f"{len(result['rows'])} runs in {result['seconds'] / 60:.1f} min; wrote {', '.join(map(str, paths.values()))}")
    return 0
