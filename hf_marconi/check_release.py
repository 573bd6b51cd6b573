"""Early warning for the next transformers release: run the conformance and cache tests against it.

    python -m hf_marconi.check_release [--version X.Y.Z] [--venv DIR] [--keep]

From a checkout of hf_marconi (the tests live in ``tests/``): builds a scratch virtual environment, installs the
newest transformers on the package registry (or ``--version``) next to the torch this interpreter runs, installs
hf_marconi into it without its dependency pins, runs ``tests/test_conformance.py``, ``tests/test_cache.py`` and
``tests/test_fixes.py``, ``tests/test_generate_modes.py`` and ``tests/test_misuse.py`` there, and prints which families
break. Exit status 0 when everything passes. Not run by CI:
it reaches the registry for a release the package does not declare yet.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
import venv
from collections import defaultdict
from pathlib import Path

import torch

from .conventions import SUPPORTED_RELEASES
from .families import FAMILIES

REPO = Path(__file__).resolve().parents[1]
TESTS = ("tests/test_conformance.py", "tests/test_cache.py", "tests/test_fixes.py", "tests/test_generate_modes.py",
         "tests/test_misuse.py")
TEST_DEPENDENCIES = ("accelerate>=1.0", "packaging", "pytest>=8", "pytest-timeout>=2.2", "hypothesis>=6.100")


def newest_release(python: Path) -> str:
    """The newest transformers release the registry serves, as ``pip index versions`` reports it."""
    listing = _run([python, "-m", "pip", "index", "versions", "transformers"], capture=True)
    match = re.search(r"transformers \(([^)]+)\)", listing)
    if match is None:
        raise RuntimeError(f"could not read the newest transformers release from:\n{listing}")
    return match.group(1)


def _run(command: list, capture: bool = False, check: bool = True) -> str:
    print("$", " ".join(map(str, command)), flush=True)
    result = subprocess.run(command, cwd=REPO, text=True, capture_output=capture)
    if check and result.returncode != 0:
        raise RuntimeError(f"{command[0]} exited with {result.returncode}\n{result.stdout or ''}{result.stderr or ''}")
    return result.stdout if capture else ""


def _family_of(test_id: str) -> str:
    """The zoo family a test id is parametrised with ("-" when it has none)."""
    params = test_id.partition("[")[2].rstrip("]")
    for part in re.split(r"[-\[\]]", params):
        if part in FAMILIES:
            return part
    return "-"


def summarise(report_lines: list[str]) -> dict[str, dict[str, int]]:
    """Outcomes per family from pytest's ``-rA`` summary lines (``PASSED tests/...::test[fam-...]``)."""
    table: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for line in report_lines:
        match = re.match(r"(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) (\S+)", line)
        if match:
            outcome, test_id = match.groups()
            table[_family_of(test_id)][outcome.lower()] += 1
    return {family: dict(counts) for family, counts in table.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", help="transformers release to check (default: the newest on the registry)")
    parser.add_argument("--venv", type=Path, help="scratch virtual environment to create (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch environment")
    args = parser.parse_args(argv)
    if not all((REPO / test).is_file() for test in TESTS):
        parser.error(f"run it from a checkout of hf_marconi: the tests {', '.join(TESTS)} are not under {REPO}")
    if args.venv is not None and args.venv.exists() and any(args.venv.iterdir()):
        parser.error(f"--venv {args.venv} exists and is not empty; name a new folder")
    started = time.perf_counter()
    scratch = args.venv or Path(tempfile.mkdtemp(prefix="hf_marconi_release_")) / "venv"
    print(f"[1/4] scratch venv {scratch}", flush=True)
    venv.create(scratch, with_pip=True)
    python = scratch / "bin" / "python"
    version = args.version or newest_release(python)
    torch_pin = f"torch=={torch.__version__.split('+')[0]}"
    print(f"[2/4] installing transformers {version} with {torch_pin}", flush=True)
    _run([python, "-m", "pip", "install", "-q", torch_pin])
    _run([python, "-m", "pip", "install", "-q", f"transformers=={version}", *TEST_DEPENDENCIES])
    _run([python, "-m", "pip", "install", "-q", "--no-deps", "-e", str(REPO)])
    print(f"[3/4] running {' '.join(TESTS)}", flush=True)
    result = subprocess.run([python, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", *TESTS], cwd=REPO,
                            text=True, capture_output=True)
    table = summarise(result.stdout.splitlines())
    failed = {family: counts for family, counts in table.items() if counts.get("failed") or counts.get("error")}
    declared = ", ".join(str(v) for v in SUPPORTED_RELEASES)
    print(f"[4/4] transformers {version} (declared: {declared}), {time.perf_counter() - started:.0f} s", flush=True)
    print(json.dumps({"transformers": version, "per_family": table, "breaks": sorted(failed)}, indent=2))
    if result.returncode != 0:
        print(result.stdout[-6000:])
        print(f"families that break on transformers {version}: {', '.join(sorted(failed)) or '(none by family)'}")
    else:
        print(f"every family passes on transformers {version}")
    if args.keep or args.venv:
        print(f"scratch venv kept at {scratch}")
    else:
        import shutil

        shutil.rmtree(scratch.parent, ignore_errors=True)
    return 0 if result.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
