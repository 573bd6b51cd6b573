"""What Marconi's repeat rule gains where prompts repeat: BBH queries each asked a second time shortly after.

    python -m eval.bench_repeats                       # first 2,000 queries, 1 / 2 / 4 GB
    python -m eval.bench_repeats --queries 500 --capacities-gb 1

Each query of the BBH trace is sent twice, the copy 1-20 requests later (a retry, an evaluation rerun). The default
policy (:func:`hf_marconi.policies.default_policy`) replays it with its repeat rule (a checkpoint at the prompt's last
token but one once repeats are common, so a repeat hits on its 2nd occurrence) and without it
(``repeat_threshold=None``), with the paper's 7B hybrid.
"""

from __future__ import annotations

import argparse
import random
from dataclasses import replace
from typing import Sequence

from hf_marconi.policies import MarconiPolicy, default_policy
from hf_marconi.policies.admission import REPEAT_THRESHOLD
from hf_marconi.presets import preset
from hf_marconi.simulator import simulate
from hf_marconi.trace import Request

GB = 10**9


def with_repeats(trace: Sequence[Request], seed: int = 0, max_delay: int = 20) -> list[Request]:
    """``trace`` with every request sent a second time 1..``max_delay`` requests after its first (arrivals renumbered:
    request i of ``trace`` arrives at second i)."""
    rng = random.Random(seed)
    out = []
    for i, request in enumerate(trace):
        out.append(replace(request, arrival=float(i)))
        out.append(replace(request, arrival=i + rng.randint(1, max_delay) + 0.5))
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=2000, help="the first queries of the BBH trace")
    parser.add_argument("--capacities-gb", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    args = parser.parse_args(argv)

    from eval.traces import build_trace

    trace = with_repeats(build_trace("bbh")[: args.queries])
    costs = preset("paper-7b-hybrid")
    print(f"bbh, first {args.queries} queries each sent twice ({len(trace)} requests), paper-7b-hybrid, default policy")
    print(f"{'capacity':>8} {'repeat rule':>11} {'without':>8} {'extra hit tokens':>16}")
    for gb in args.capacities_gb:
        rates, hits = [], []
        for threshold in (REPEAT_THRESHOLD, None):
            _, tuner = default_policy()
            result = simulate(trace, MarconiPolicy(repeat_threshold=threshold), int(gb * GB), costs, tuner=tuner)
            rates.append(100 * result.stats.token_hit_rate)
            hits.append(result.stats.hit_tokens)
        print(f"{gb:>6g}GB {rates[0]:>10.2f}% {rates[1]:>7.2f}% {hits[0] - hits[1]:>+16,d}")


if __name__ == "__main__":
    main()
