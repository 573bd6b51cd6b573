"""``python -m eval traces``: build the workload traces and print their statistics."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from . import BUILDERS, build_trace, save_trace, trace_stats
from .stats import TraceStats
from .timing import ARRIVALS

_COMMON_OPTIONS = (
    "max_input_tokens", "sessions_per_second", "mean_response_s", "arrivals", "seed", "max_sessions",
)


def register(subparsers: argparse._SubParsersAction) -> None:
    traces = subparsers.add_parser(
        "traces",
        help="build workload traces from the shared data folder",
        description="Build workload traces (lists of timed requests with token ids) from the shared data folder.",
    )
    actions = traces.add_subparsers(dest="traces_command", required=True, metavar="ACTION")
    build = actions.add_parser(
        "build",
        help="build traces (cached on disk), print their statistics, optionally save them",
        description=(
            "Build the named traces, print per trace: sessions, requests, total input and output tokens, mean "
            "and max input length, time span. Built traces are cached on disk and reused by later builds "
            "with the same options, data and tokenizer."
        ),
    )
    names = ", ".join(f"{name} ({b.description})" for name, b in BUILDERS.items())
    add = build.add_argument
    add("--names", default=",".join(BUILDERS), help=f"comma-separated traces to build, from: {names} (default: all)")
    add(
        "--data-dir",
        type=Path,
        help="folder holding the workload files (default: $HF_MARCONI_DATA, else shared/data beside the repository)",
    )
    add(
        "--tokenizer",
        type=Path,
        help="local tokenizer folder: a Hugging Face tokenizer or vocab.json + merges.txt "
        "(default: tokenizer_gpt2 in the data folder)",
    )
    add(
        "--out",
        type=Path,
        help="folder to save the traces in, one per name: <out>/<name> as a datasets.Dataset folder, or "
        "<out>/<name>.jsonl.gz with --format jsonl (default: do not save, only print statistics)",
    )
    add("--format", choices=("dataset", "jsonl"), default="dataset", help="saved traces' format (default: %(default)s)")
    add(
        "--max-input-tokens",
        type=int,
        default=32768,
        help="a session ends before its first request whose input is longer than this (default: %(default)s)",
    )
    add(
        "--sessions-per-second",
        type=float,
        default=1.0,
        help="session i starts at i / this; not used by mooncake, which keeps its real timestamps "
        "(default: %(default)s)",
    )
    add(
        "--mean-response-s",
        type=float,
        default=5.0,
        help="mean agent response time between agent turns of swebench and tau; the paper used 5, 7.5 and 10 "
        "(default: %(default)s)",
    )
    add_arrivals_option(build)
    add("--seed", type=int, default=0, help="seed of response times, orders, synthetic tokens (default: %(default)s)")
    add(
        "--max-sessions",
        type=int,
        help="use only the first sessions of each trace (mooncake: the first requests), for quick looks "
        "(default: all)",
    )
    add(
        "--collapse-observations",
        action="store_true",
        help="swebench: replace all but the most recent tool observations by a placeholder, as agent "
        "frameworks do (breaks prefix reuse at the collapse point)",
    )
    add(
        "--keep-observations",
        type=int,
        default=3,
        help="swebench with --collapse-observations: how many most recent observations stay whole "
        "(default: %(default)s)",
    )
    add(
        "--bbh-examples-per-task",
        type=int,
        help="bbh: use only the first examples of each task (default: all 6,511 examples)",
    )
    add("--mtbench-output-tokens", type=int, default=256, help="mtbench: synthetic answer length (default: 256)")
    add(
        "--cache-dir",
        type=Path,
        help="where built traces are cached (default: $HF_MARCONI_CACHE/traces, else ~/.cache/hf_marconi/traces)",
    )
    add("--no-cache", action="store_true", help="build from scratch and do not store the result")
    build.set_defaults(run=run_build)


def add_arrivals_option(parser: argparse.ArgumentParser) -> None:
    """``--arrivals``: how agent response times are drawn (every command that builds swebench or tau traces)."""
    parser.add_argument(
        "--arrivals", choices=ARRIVALS, default="poisson",
        help="agent response times of swebench and tau: poisson = numpy.random.poisson(mean) whole seconds, the "
        "Marconi authors' artifact; exponential = exponentially distributed seconds, up to 2.4x the hit rates at "
        "the same capacity on swebench (default: %(default)s)",
    )


def builder_options(name: str, args: argparse.Namespace) -> dict:
    """The command-line options that the builder ``name`` takes, under its own parameter names."""
    given = {option: getattr(args, option) for option in _COMMON_OPTIONS}
    given["max_requests"] = args.max_sessions
    given["collapse_observations"] = args.collapse_observations
    given["keep_observations"] = args.keep_observations
    given["max_examples_per_task"] = args.bbh_examples_per_task
    given["output_tokens"] = args.mtbench_output_tokens
    accepted = BUILDERS[name].option_names()
    return {option: value for option, value in given.items() if option in accepted}


def run_build(args: argparse.Namespace) -> int:
    names = [name.strip() for name in args.names.split(",") if name.strip()]
    unknown = [name for name in names if name not in BUILDERS]
    if unknown:
        raise SystemExit(f"unknown trace name(s) {unknown}: choose from {', '.join(BUILDERS)}")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in names:
        started = time.perf_counter()
        requests = build_trace(
            name,
            data_dir=args.data_dir,
            tokenizer=args.tokenizer,
            cache_dir=args.cache_dir,
            use_cache=not args.no_cache,
            **builder_options(name, args),
        )
        if args.out is not None:
            save_trace(requests, args.out / (f"{name}.jsonl.gz" if args.format == "jsonl" else name))
        rows.append((name, trace_stats(requests), time.perf_counter() - started))
        print(f"{name}: done in {rows[-1][2]:.1f} s", flush=True)
    print()
    print(_table(rows))
    return 0


def _table(rows: list[tuple[str, TraceStats, float]]) -> str:
    header = ("trace", *TraceStats.HEADER, "build s")
    body = [(name, *stats.row(), f"{seconds:.1f}") for name, stats, seconds in rows]
    widths = [max(len(line[i]) for line in (header, *body)) for i in range(len(header))]
    lines = [header, tuple("-" * w for w in widths), *body]
    return "\n".join(
        "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths)))
        for line in lines
    )
