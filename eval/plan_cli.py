"""``python -m eval plan``: capacity planning on a recorded or given trace with a model's config."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .plan import DEFAULT_FRACTIONS, DEFAULT_PREFILL_TFLOPS, POLICIES

# Short dtype names people type, to the names the cost model reads.
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "fp8": "float8_e4m3fn", "fp64": "float64"}


def _dtype(text: str) -> str:
    from hf_marconi.costs import DTYPE_BYTES

    name = DTYPES.get(text, text)
    if name not in DTYPE_BYTES:
        raise argparse.ArgumentTypeError(
            f"unknown dtype {text!r}; use one of {sorted(DTYPES)} or {sorted(DTYPE_BYTES)}"
        )
    return name


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def register(subparsers: argparse._SubParsersAction) -> None:
    from .traces.cli import add_arrivals_option

    parser = subparsers.add_parser(
        "plan",
        help="how much the cache saves on a trace at each capacity, for a model config (capacity planning)",
        description=(
            "Replay a trace through MarconiCache's default policy (Marconi, alpha tuned on the wide grid) and the "
            "SGLang+ / vLLM+ baselines with the state sizes and FLOPs of a model config, at capacities given as "
            "fractions of the trace's footprint (the peak bytes the default policy stores with unlimited capacity). "
            "Prints token hit rate, prefill FLOPs saved and modelled TTFT per capacity and the knee: the smallest "
            "capacity reaching --knee-share of the unlimited-capacity token hit rate. With --out, also writes "
            "plan.json and plan.png."
        ),
    )
    add = parser.add_argument
    add("--trace", required=True,
        help="a trace recorded by hf_marconi.recording.TraceRecorder (token ids or hashed blocks), a JSON Lines "
        "trace of the documented schema, a Mooncake-style hash-block trace, a trace folder, or a built-in trace "
        "name (swebench, tau, oasst, bbh, mtbench, mooncake)")
    add("--model-config", required=True,
        help="a model's config.json, a folder holding one (save_pretrained output), or a preset name")
    add("--dtype", type=_dtype, default="bfloat16",
        help="dtype of the attention KV and conv states: bf16, fp16, fp32, fp8 (default: bf16)")
    add("--recurrent-dtype", type=_dtype, default="float32",
        help="dtype of the recurrent (SSM / delta-rule) states; transformers keeps them in float32 on its torch path "
        "(default: fp32)")
    add("--fractions", type=_floats, default=DEFAULT_FRACTIONS,
        help="capacities as fractions of the footprint, comma-separated (default: %(default)s)")
    add("--capacities-gb", type=_floats, default=(), help="further capacities in GB (1e9 bytes), comma-separated")
    add("--policies", default=",".join(POLICIES),
        help="comma-separated: marconi (the default policy) and the baselines sglang+, vllm+ (default: %(default)s)")
    add("--knee-share", type=float, default=0.9,
        help="the knee is the smallest capacity reaching this share of the unlimited-capacity token hit rate "
        "(default: %(default)s)")
    add("--knee-steps", type=int, default=3, help="bisection replays that narrow the knee (default: %(default)s)")
    add("--prefill-tflops", type=float, default=DEFAULT_PREFILL_TFLOPS,
        help="sustained prefill throughput of the modelled TTFT, in TFLOP/s (default: %(default)s)")
    add("--max-requests", type=int, help="read only the first requests of a trace file")
    add("--max-sessions", type=int, help="built-in traces: use only their first sessions (mooncake: requests)")
    add_arrivals_option(parser)
    add("--workers", type=int, default=2, help="parallel replay processes (default: %(default)s)")
    add("--out", type=Path, help="folder for plan.json and plan.png")
    add("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from . import plots
    from .plan import PlanSpec, format_plan, load_cost_model, plan
    from .traces import BUILDERS
    from .traces.reading import read_trace

    costs = load_cost_model(args.model_config, dtype=args.dtype, recurrent_dtype=args.recurrent_dtype)
    if args.trace in BUILDERS and not Path(args.trace).exists():
        options = {"arrivals": args.arrivals} if "arrivals" in BUILDERS[args.trace].option_names() else {}
        if args.max_sessions is not None:
            options["max_requests" if args.trace == "mooncake" else "max_sessions"] = args.max_sessions
        requests = read_trace(args.trace, **options)
        name = args.trace + (f" ({args.arrivals} agent gaps)" if "arrivals" in options else "")
    else:
        requests = read_trace(args.trace, max_requests=args.max_requests)
        name = str(args.trace)
    spec = PlanSpec(
        fractions=args.fractions, capacities_bytes=tuple(round(gb * 1e9) for gb in args.capacities_gb),
        policies=tuple(p.strip() for p in args.policies.split(",") if p.strip()), knee_share=args.knee_share,
        knee_steps=args.knee_steps, prefill_flops_per_s=args.prefill_tflops * 1e12, workers=args.workers,
    )
    result = plan(requests, costs, spec, trace_name=name, show_progress=not args.quiet)
    print(format_plan(result))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        record = result.asdict()
        (args.out / "plan.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
        figure = plots.plot_plan(record, args.out / "plan.png")
        print(f"wrote {args.out / 'plan.json'} and {figure} ({result.seconds:.0f} s)")
    return 0
