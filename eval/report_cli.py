"""``python -m eval report``: the whole evaluation (sweep, TTFT, plots, markdown) into one folder."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from .sweep_cli import add_sweep_options, sweep_spec
from .ttft_cli import add_measured_options


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "report",
        help="run the default evaluation and write the report (markdown, PNG plots, JSON/CSV) into a folder",
        description=(
            "Measure (or reuse) the prefill-latency profile, run the simulated sweep with modelled TTFT, measure "
            "TTFT with a real model through MarconiCache, draw the plots and write README.md into --out. The "
            "defaults are the documented default sweep: all six traces (bbh and mooncake shortened, see --trace-sessions), "
            "Marconi (paper and wide alpha grids, oracle where cheap), SGLang+, vLLM+ and no cache at 5%, 15% "
            "and 40% of each trace's footprint with the paper's 7B hybrid."
        ),
    )
    parser.add_argument("--out", type=Path, required=True, help="report folder (created)")
    parser.add_argument("--profile", type=Path,
                        help="prefill-latency profile JSON, measured and saved there when absent "
                        "(default: <out>/ttft_profile.json)")
    parser.add_argument("--reuse", action="store_true",
                        help="reuse results.json and ttft_measured.json already in --out (only redraw and rewrite)")
    parser.add_argument("--skip-measured", action="store_true", help="leave out the real-model TTFT replay")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    add_sweep_options(parser)
    add_measured_options(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from .report import MeasuredSpec, ReportSpec, build_report

    measured = None if args.skip_measured else MeasuredSpec(
        trace=args.measured_trace, sessions=args.measured_sessions, max_requests=args.measured_requests,
        max_input_tokens=args.measured_max_input, output_tokens=args.measured_output_tokens,
        capacity_fraction=args.measured_capacity,
        policies=tuple(p.strip() for p in args.measured_policies.split(",") if p.strip()),
    )
    command = "python -m eval " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    spec = ReportSpec(sweep=sweep_spec(args), measured=measured, profile_path=args.profile, reuse=args.reuse,
                      command=command)
    readme = build_report(spec, args.out, show_progress=not args.quiet)
    print(f"report written to {readme}")
    return 0
