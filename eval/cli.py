"""``python -m eval``: the evaluation harness's command line.

Each subcommand lives in a module of its own that exposes ``register(subparsers)``: it adds its parser to
``subparsers`` and sets ``run`` (a function of the parsed arguments returning an exit status) as a default.
Add a subcommand by appending its module to :data:`SUBCOMMAND_MODULES`.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence

SUBCOMMAND_MODULES: tuple[str, ...] = (
    "eval.traces.cli", "eval.sweep_cli", "eval.ttft_cli", "eval.report_cli", "eval.plan_cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m eval",
        description="Evaluation harness for hf_marconi: workload traces, cache replay sweeps and reports.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in SUBCOMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)
