"""Replay speed beside the authors' simulator: the same SWE-bench requests through their ``RadixCache`` (Marconi with
retrospective alpha tuning, ``radix_cache_hybrid.py``) and through :func:`hf_marconi.policies.default_policy`.

    git clone https://github.com/ruipeterpan/marconi /somewhere/marconi       # never into this repository
    python -m eval.bench_reference --reference-dir /somewhere/marconi --capacities-gb 60

The authors' files are imported from ``--reference-dir`` as they are. They import ``scipy.stats.rankdata`` at module
level for a policy this run does not use; without scipy a stand-in that raises when called is installed. Their tuner
replays its grid in a process pool of ``os.cpu_count()`` workers, so CPU seconds (this process and its children) are
printed beside wall seconds. Both replay the same request list (the trace of :mod:`eval.bench_default`).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import os
import resource
import sys
import time
import types
from pathlib import Path
from typing import Any, Sequence

from hf_marconi.policies import default_policy
from hf_marconi.presets import preset
from hf_marconi.simulator import replay_order, simulate
from hf_marconi.trace import Request

from eval.bench_default import MEAN_RESPONSE_S, PRESET

GB = 10**9


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _import_reference(reference_dir: Path) -> Any:
    """The authors' ``radix_cache_hybrid`` module, imported from ``reference_dir``."""
    if not (reference_dir / "radix_cache_hybrid.py").is_file():
        raise SystemExit(f"{reference_dir} has no radix_cache_hybrid.py; clone ruipeterpan/marconi there")
    try:
        importlib.import_module("scipy.stats")
    except ImportError:
        def rankdata(*_args, **_kwargs):
            raise RuntimeError("scipy is not installed; this run does not use the policy that needs rankdata")

        scipy = types.ModuleType("scipy")
        stats = types.ModuleType("scipy.stats")
        stats.rankdata = rankdata  # type: ignore[attr-defined]
        scipy.stats = stats  # type: ignore[attr-defined]
        sys.modules.update({"scipy": scipy, "scipy.stats": stats})
    sys.path.insert(0, str(reference_dir))
    return importlib.import_module("radix_cache_hybrid")


def run_reference(module: Any, ordered: Sequence[Request], capacity_bytes: int) -> tuple[float, float, float]:
    """Replay ``ordered`` as the authors' ``policy_exploration.py`` does (Marconi, ``evict_policy_version=2``, alpha
    tuned by retrospective bootstrapping, the 7B hybrid's default dimensions); returns (token hit rate, wall s, CPU s)."""
    cache = module.RadixCache(capacity_bytes=capacity_bytes, evict_policy_version=2, eff_weight=0,
                              use_logical_ts=True, bootstrap_multiplier=5)
    wall, cpu = time.perf_counter(), _cpu_seconds()
    with contextlib.redirect_stdout(io.StringIO()):  # the tuner prints every grid value's result
        for request in ordered:
            input_tokens = list(request.input_ids)
            cache.match_prefix(input_tokens)
            cache.insert(token_ids=input_tokens + list(request.output_ids), state_at_leaf=request.session_id,
                         state_at_branchoff=request.session_id)
    wall, cpu = time.perf_counter() - wall, _cpu_seconds() - cpu
    _, token_hit_rate, *_ = cache.get_cache_stats(verbose=False)
    return 100 * float(token_hit_rate), wall, cpu


def run_default(ordered: Sequence[Request], capacity_bytes: int) -> tuple[float, float, float]:
    costs = preset(PRESET)
    policy, tuner = default_policy()
    wall, cpu = time.perf_counter(), _cpu_seconds()
    result = simulate(ordered, policy, capacity_bytes, costs, tuner=tuner)
    return 100 * result.stats.token_hit_rate, time.perf_counter() - wall, _cpu_seconds() - cpu


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference-dir", type=Path, required=True, help="a checkout of ruipeterpan/marconi")
    parser.add_argument("--capacities-gb", type=float, nargs="+", default=[60.0])
    parser.add_argument("--max-sessions", type=int, default=None, help="only the first sessions of the trace")
    args = parser.parse_args(argv)

    from eval.traces import build_trace

    module = _import_reference(args.reference_dir)
    trace = build_trace("swebench", mean_response_s=MEAN_RESPONSE_S, arrivals="poisson",
                        max_sessions=args.max_sessions)
    ordered = replay_order(trace)
    print(f"swebench, {len(ordered)} requests, Poisson({MEAN_RESPONSE_S:g} s) gaps; the reference tuner's pool: "
          f"{os.cpu_count()} processes")
    header = f"{'capacity':>8} {'simulator':<26} {'token hit':>9} {'wall s':>8} {'CPU s':>8}"
    print(header + "\n" + "-" * len(header))
    for gb in args.capacities_gb:
        cap = int(gb * GB)
        runs = {"authors' (Marconi, tuned)": run_reference(module, ordered, cap),
                "hf_marconi default_policy": run_default(ordered, cap)}
        for name, (hit, wall, cpu) in runs.items():
            print(f"{gb:>6g}GB {name:<26} {hit:>8.2f}% {wall:>8.1f} {cpu:>8.1f}")
        (_, ref_wall, ref_cpu), (_, own_wall, own_cpu) = runs.values()
        print(f"{gb:>6g}GB speed-up: {ref_wall / own_wall:.1f}x wall, {ref_cpu / own_cpu:.1f}x CPU")


if __name__ == "__main__":
    main()
