"""Every GPU check in one prepared run that fits a 15-minute device lease: ``python -m eval.gpu_check --out DIR``.

Steps, each under a hard time budget (12 minutes in all; a rerun of the steps that failed fits what is left of the
lease, the compiled wheel being kept), with its command, wall time, status and log written under ``--out``
(``summary.json``, ``<step>.log``):

1. ``install`` (90 s): the wheels carried in ``.whl/`` (transformers of the declared range, fla-core and
   flash-linear-attention, mamba-ssm built with ``MAMBA_SKIP_CUDA_BUILD=TRUE``: its Mamba2 kernels are Triton) go to
   ``--site`` without the registry; later steps see them through ``PYTHONPATH``.
2. ``build`` (300 s): causal-conv1d compiled from its carried sdist for sm_90 only (``TORCH_CUDA_ARCH_LIST=9.0``,
   ``CAUSAL_CONV1D_FORCE_BUILD=TRUE``, ``MAX_JOBS`` = all cores); the wheel is kept in ``DIR/wheels`` and a rerun
   installs it instead of compiling again.
3. ``kernels`` (60 s): ``python -m hf_marconi.kernels --strict`` for the Mamba2 and gated-delta-net families.
4. ``gpu_tests`` (120 s): ``pytest tests/gpu``: bf16 / fp16 cached vs uncached with the kernels asserted in use; a
   family whose kernel cannot be had (Jamba without ``selective_scan_cuda``) is reported as skipped with the reason.
5. ``bench`` (150 s): ``python -m eval.bench_gpu --preset 1b --require-kernels``: TTFT uncached vs a 90% hit vs the
   suffix alone at 1K-32K tokens, single-pass vs two-pass capture, copy / restore / offload costs.

``--smoke`` runs the same steps on the CPU in seconds (no install or build; the kernel report without ``--strict``,
the GPU tests skip, the benchmark on its tiny preset): what CI runs, so the script cannot rot between leases.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from hf_marconi.families import FAMILIES

REPO = Path(__file__).resolve().parents[1]
# The families whose kernels the lease checks: Mamba2 (SSD) and gated-delta-rule / KDA mixers (Triton kernels).
MAMBA2_AND_GDN = tuple(name for name, record in FAMILIES.items()
                       if record.zoo.recurrent_kind in ("mamba2", "gated_delta_net", "kimi_delta_attention"))
TOTAL_BUDGET_S = 12 * 60


@dataclass
class Step:
    name: str
    command: list[str]
    budget_s: int
    env: dict[str, str] | None = None


@dataclass
class Outcome:
    name: str
    command: str
    budget_s: int
    wall_s: float
    status: str  # ok, failed (exit N), timed out, skipped (why)
    log: str


def _python(*args: str) -> list[str]:
    return [sys.executable, *args]


def plan(out: Path, site: Path, smoke: bool) -> list[Step]:
    """The steps of a run (``smoke``: the CPU variant CI runs)."""
    if smoke:
        return [
            Step("kernels", _python("-m", "hf_marconi.kernels", "--family", "bamba", "--family", "qwen3_next",
                                    "--device", "cpu", "--dtype", "float32"), 60),
            Step("gpu_tests", _python("-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests/gpu"), 120),
            Step("bench", _python("-m", "eval.bench_gpu", "--preset", "tiny", "--device", "cpu", "--dtype", "float32",
                                  "--lengths", "40", "--repeats", "1", "--sessions", "2", "--turns", "2",
                                  "--system-len", "16", "--user-len", "6", "--new-tokens", "3",
                                  "--out", str(out / "bench_gpu")), 150),
        ]
    wheels = out / "wheels"
    build_env = {"TORCH_CUDA_ARCH_LIST": "9.0", "CAUSAL_CONV1D_FORCE_BUILD": "TRUE",
                 "MAX_JOBS": str(os.cpu_count() or 16)}
    families = [arg for family in MAMBA2_AND_GDN for arg in ("--family", family)]
    return [
        Step("install", _python("-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--upgrade",
                                "--target", str(site), *map(str, sorted((REPO / ".whl").glob("*.whl")))), 90),
        Step("build", _build_causal_conv1d(wheels, site), 300, build_env),
        Step("kernels", _python("-m", "hf_marconi.kernels", *families, "--strict"), 60),
        Step("gpu_tests", _python("-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests/gpu"), 120),
        Step("bench", _python("-m", "eval.bench_gpu", "--preset", "1b", "--require-kernels",
                              "--out", str(out / "bench_gpu")), 150),
    ]


def _build_causal_conv1d(wheels: Path, site: Path) -> list[str]:
    """Install a wheel kept by an earlier run, else compile the carried sdist into ``wheels`` and install that."""
    script = (
        f"set -e; mkdir -p {wheels}; "
        f"if ! ls {wheels}/causal_conv1d-*.whl >/dev/null 2>&1; then "
        f"{sys.executable} -m pip wheel -v --no-index --no-deps --no-build-isolation -w {wheels} "
        f"{REPO}/.whl/causal_conv1d-*.tar.gz; fi; "
        f"{sys.executable} -m pip install -q --no-index --no-deps --upgrade --target {site} "
        f"{wheels}/causal_conv1d-*.whl"
    )
    return ["bash", "-c", script]


def run_step(step: Step, out: Path, deadline: float, env: dict[str, str]) -> Outcome:
    log = out / f"{step.name}.log"
    budget = min(step.budget_s, max(0, int(deadline - time.monotonic())))
    command = " ".join(step.command)
    if budget <= 0:
        return Outcome(step.name, command, step.budget_s, 0.0, "skipped (no time left)", str(log))
    started = time.monotonic()
    print(f"[{step.name}] budget {budget} s: {command}", flush=True)
    with log.open("w") as handle:
        try:
            result = subprocess.run(step.command, cwd=REPO, env=dict(env, **(step.env or {})), stdout=handle,
                                    stderr=subprocess.STDOUT, timeout=budget)
            status = "ok" if result.returncode == 0 else f"failed (exit {result.returncode})"
        except subprocess.TimeoutExpired:
            status = "timed out"
    wall = time.monotonic() - started
    print(f"[{step.name}] {status} in {wall:.1f} s (log: {log})", flush=True)
    return Outcome(step.name, command, budget, round(wall, 2), status, str(log))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for summary.json, logs and results")
    parser.add_argument("--site", type=Path, default=Path("/tmp/site"), help="where carried wheels are installed")
    parser.add_argument("--smoke", action="store_true", help="the CPU variant (what CI runs)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if not args.smoke:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(args.site), env.get("PYTHONPATH")]))
    deadline = time.monotonic() + TOTAL_BUDGET_S
    outcomes = [run_step(step, args.out, deadline, env) for step in plan(args.out, args.site, args.smoke)]
    summary = {"command": "python -m eval.gpu_check " + " ".join(argv if argv is not None else sys.argv[1:]),
               "smoke": args.smoke, "total_budget_s": TOTAL_BUDGET_S, "steps": [asdict(o) for o in outcomes]}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    failed = [o.name for o in outcomes if o.status != "ok"]
    print(f"summary: {args.out / 'summary.json'}; " + (f"not ok: {', '.join(failed)}" if failed else "every step ok"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
