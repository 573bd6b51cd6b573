"""``python -m eval ttft``: measure the prefill-latency profile, and measure TTFT with a real model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .ttft import DEFAULT_EXTEND_LENS, DEFAULT_PREFIX_LENS


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def add_measured_options(parser: argparse.ArgumentParser) -> None:
    """Options of the real-model TTFT replay (shared with ``python -m eval report``)."""
    add = parser.add_argument
    add("--measured-trace", default="tau", help="trace replayed with the real model (default: %(default)s)")
    add("--measured-sessions", type=int, default=8,
        help="build the measured trace from its first sessions (default: %(default)s)")
    add("--measured-requests", type=int, default=40, help="replay at most this many requests (default: %(default)s)")
    add("--measured-max-input", type=int, default=2048,
        help="skip requests with longer inputs: the model runs on the CPU (default: %(default)s)")
    add("--measured-output-tokens", type=int, default=8,
        help="force at most this many of each request's trace output tokens as generated tokens, so the next "
        "turn can reuse them (default: %(default)s)")
    add("--measured-capacity", type=float, default=1.0,
        help="cache capacity as a fraction of the replay's footprint (default: %(default)s)")
    add("--measured-policies", default="marconi,sglang+,vllm+,no-cache",
        help="comma-separated MarconiCache policies (default: %(default)s)")


def register(subparsers: argparse._SubParsersAction) -> None:
    ttft = subparsers.add_parser(
        "ttft",
        help="time to first token: measure the prefill profile, or replay a trace through MarconiCache",
        description="Time to first token on this machine with a small random-weight Bamba model (CPU).",
    )
    actions = ttft.add_subparsers(dest="ttft_command", required=True, metavar="ACTION")
    profile = actions.add_parser(
        "profile",
        help="measure the prefill-latency profile and save it as JSON",
        description=(
            "Time one forward of E new tokens after a cached prefix of P tokens on a grid of (P, E), fit "
            "latency = a + b*E + c*(P*E + E(E+1)/2), and save both as JSON. The sweep and the report model each "
            "request's TTFT from this file."
        ),
    )
    add = profile.add_argument
    add("--out", type=Path, required=True, help="JSON file to write (an existing one is kept unless --force)")
    add("--force", action="store_true", help="measure again even when --out exists")
    add("--prefix-lens", type=_ints, default=DEFAULT_PREFIX_LENS,
        help="cached prefix lengths P, comma-separated (default: %(default)s)")
    add("--extend-lens", type=_ints, default=DEFAULT_EXTEND_LENS,
        help="new token counts E, comma-separated (default: %(default)s)")
    add("--repeats", type=int, default=3, help="timed runs per grid point; the median is kept (default: %(default)s)")
    add("--threads", type=int, default=1, help="torch threads while timing (default: %(default)s)")
    add("--hidden-size", type=int, default=256, help="the Bamba model's hidden size (default: %(default)s)")
    add("--layers", type=int, default=4, help="decoder layers; attention at every second one (default: %(default)s)")
    profile.set_defaults(run=run_profile)

    replay = actions.add_parser(
        "replay",
        help="measure TTFT per policy by replaying a shortened trace through MarconiCache",
        description=(
            "Replay a shortened trace through MarconiCache with the profile's model, one request at a time, and "
            "report P50/P95 TTFT per policy next to the TTFT the profile predicts for the same reused prefixes."
        ),
    )
    replay.add_argument("--profile", type=Path, required=True, help="profile JSON (python -m eval ttft profile)")
    replay.add_argument("--out", type=Path, required=True, help="JSON file for the per-request results")
    add_measured_options(replay)
    replay.set_defaults(run=run_replay)


def run_profile(args: argparse.Namespace) -> int:
    from .ttft import ProfileModelSpec, load_or_measure_profile

    layers = tuple(range(1, args.layers, 2))
    spec = ProfileModelSpec(hidden_size=args.hidden_size, num_layers=args.layers, attention_layers=layers)
    profile = load_or_measure_profile(args.out, force=args.force, progress=print, spec=spec,
                                      prefix_lens=args.prefix_lens, extend_lens=args.extend_lens,
                                      repeats=args.repeats, threads=args.threads)
    a, b, c = profile.coefficients
    print(f"fit: {a * 1e3:.3f} ms + {b * 1e6:.2f} us/token + {c * 1e9:.4f} ns/pair; "
          f"largest relative error {profile.fit_error():.1%}; saved in {args.out}")
    return 0


def run_replay(args: argparse.Namespace) -> int:
    from .traces import build_trace
    from .ttft import PrefillProfile
    from .ttft_replay import measure_replay

    profile = PrefillProfile.load(args.profile)
    requests = build_trace(args.measured_trace, max_sessions=args.measured_sessions)
    measured = measure_replay(
        requests, profile, policies=tuple(p.strip() for p in args.measured_policies.split(",") if p.strip()),
        capacity_fraction=args.measured_capacity, max_input_tokens=args.measured_max_input,
        max_requests=args.measured_requests, output_tokens=args.measured_output_tokens,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(measured, indent=1) + "\n")
    for summary in measured["summaries"]:
        modelled = measured["modelled"][summary["policy"]]
        print(f"{summary['policy']:>9}: P50 {summary['p50'] * 1e3:7.0f} ms  P95 {summary['p95'] * 1e3:7.0f} ms  "
              f"hit rate {summary['token_hit_rate']:.1%}  (modelled P50 {modelled['p50'] * 1e3:.0f} ms)")
    return 0
