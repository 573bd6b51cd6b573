"""What recording costs a call: ``TraceRecorder.record`` on the caller's path, and the writer thread's work per call.

    python -m eval.bench_record                      # 1K- and 32K-token calls, token ids and hashed blocks
    python -m eval.bench_record --tokens 4096 --calls 500

Calls are spaced by ``--gap-ms`` so that the writer works while later calls are recorded, as in a serving process.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Sequence

from hf_marconi.recording import TraceRecorder


def measure(tokens: int, calls: int, gap_s: float, hash_salt: str | None, folder: Path) -> dict[str, float]:
    """Median and largest ``record`` time (seconds) over ``calls`` calls of ``tokens`` tokens, and the writer's time
    per call (formatting and writing a burst of calls, timed until ``flush`` returns)."""
    ids = [random.randrange(50257) for _ in range(tokens)]
    recorder = TraceRecorder(folder / f"{tokens}-{hash_salt}.jsonl", hash_salt=hash_salt)
    spent = []
    for _ in range(calls):
        started = time.perf_counter()
        recorder.record(ids, tokens - 100, time.time())
        spent.append(time.perf_counter() - started)
        time.sleep(gap_s)
    recorder.flush()
    burst = time.perf_counter()
    for _ in range(calls):
        recorder.record(ids, tokens - 100, time.time())
    recorder.flush()
    writer = (time.perf_counter() - burst) / calls
    recorder.close()
    return {"median_s": statistics.median(spent), "max_s": max(spent), "writer_s": writer}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 32768], help="tokens per recorded call")
    parser.add_argument("--calls", type=int, default=200, help="calls per setting")
    parser.add_argument("--gap-ms", type=float, default=10.0, help="time between two calls")
    args = parser.parse_args(argv)
    print(f"{'tokens':>7} {'mode':<13} {'record() median':>16} {'record() max':>13} {'writer per call':>16}")
    with tempfile.TemporaryDirectory() as folder:
        for tokens in args.tokens:
            for salt in (None, "salt"):
                result = measure(tokens, args.calls, args.gap_ms / 1e3, salt, Path(folder))
                mode = "token ids" if salt is None else "hashed blocks"
                print(f"{tokens:>7} {mode:<13} {result['median_s'] * 1e6:>13.0f} us {result['max_s'] * 1e6:>10.0f} us "
                      f"{result['writer_s'] * 1e3:>13.2f} ms")


if __name__ == "__main__":
    main()
