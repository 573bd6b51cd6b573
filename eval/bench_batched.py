"""Benchmark: BIG-Bench-Hard few-shot queries in batches, with and without a MarconiCache.

Every query of a BBH task shares the task's chain-of-thought few-shot prompt (1-2K GPT-2 tokens); evaluations run
them in left-padded batches. For each task, the first ``--queries`` queries run in batches of ``--batch-size``, each
batch once through one MarconiCache shared by all batches and once with a fresh ``DynamicCache``, side by side. It
reports the prompt positions each computed (uncached: the padded batch, ``rows x width``; cached: each row's tokens
past its restored prefix), the wall time, and whether every row's tokens agree.

    python -m eval.bench_batched                       # 3 tasks x 16 queries, batches of 8, small Bamba, CPU
    python -m eval.bench_batched --tasks 3 --queries 16 --out reports/bench_batched.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import DynamicCache

from eval.bench_cache import command_line, small_bamba
from hf_marconi import MarconiCache
from hf_marconi.families import cache_keyword_of


@dataclass
class BatchResult:
    task: str
    rows: int
    width: int  # tokens per row after left padding
    prompt_tokens: int  # real prompt tokens of all rows
    reused_tokens: int
    computed_cached: int  # prompt positions the cached call computed
    computed_uncached: int  # prompt positions the uncached call computed (padding included)
    wall_cached_s: float
    wall_uncached_s: float
    same_tokens: bool


def task_batches(requests, tasks: int, queries: int, batch_size: int) -> list[tuple[str, list[list[int]]]]:
    """The first ``queries`` queries of each of the first ``tasks`` tasks, cut into batches (task by task)."""
    by_task: dict[str, list[list[int]]] = {}
    for request in requests:
        by_task.setdefault(request.meta["task"], []).append(list(request.input_ids))
    batches = []
    for task, prompts in list(by_task.items())[:tasks]:
        prompts = prompts[:queries]
        batches += [(task, prompts[i : i + batch_size]) for i in range(0, len(prompts), batch_size)]
    return batches


def _generate(model, rows: list[list[int]], cache, new_tokens: int):
    width = max(map(len, rows))
    pad = model.config.pad_token_id
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    settings = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad, eos_token_id=None,
                    return_dict_in_generate=True)
    began = time.perf_counter()
    with torch.no_grad():
        output = model.generate(ids, attention_mask=mask, **{cache_keyword_of(model): cache}, **settings)
    return output, time.perf_counter() - began


def run(args: argparse.Namespace) -> list[BatchResult]:
    from eval.traces.bbh import build_bbh  # the eval extra (datasets, tokenizers) is needed only here

    torch.set_num_threads(args.threads)
    requests = build_bbh(max_tasks=args.tasks, max_examples_per_task=args.queries)
    batches = task_batches(requests, args.tasks, args.queries, args.batch_size)
    model = small_bamba(args.hidden, args.layers, vocab=50257, seed=0)
    cache = MarconiCache(model, capacity_bytes=int(args.capacity_mb * 2**20))
    _generate(model, batches[0][1][:1], DynamicCache(config=model.config), 1)  # warm-up
    results = []
    for index, (task, rows) in enumerate(batches):
        cached, wall_cached = _generate(model, rows, cache, args.new_tokens)
        uncached, wall_uncached = _generate(model, rows, DynamicCache(config=model.config), args.new_tokens)
        records = cached.marconi_record.rows
        width = max(map(len, rows))
        result = BatchResult(
            task=task, rows=len(rows), width=width, prompt_tokens=sum(map(len, rows)),
            reused_tokens=sum(r.reused_tokens for r in records),
            computed_cached=sum(len(row) - r.reused_tokens for row, r in zip(rows, records)),
            computed_uncached=len(rows) * width, wall_cached_s=wall_cached, wall_uncached_s=wall_uncached,
            same_tokens=torch.equal(cached.sequences, uncached.sequences),
        )
        results.append(result)
        print(f"batch {index + 1}/{len(batches)} {task[:28]:28s}: {len(rows)} rows x {width} tokens, reused "
              f"{result.reused_tokens:6d}, computed {result.computed_cached:6d} vs {result.computed_uncached:6d}, "
              f"{wall_cached:6.2f} s vs {wall_uncached:6.2f} s, same tokens {result.same_tokens}",
              file=sys.stderr, flush=True)
    return results


def summary_markdown(results: list[BatchResult], command: str, setup: str) -> str:
    computed_cached = sum(r.computed_cached for r in results)
    computed_uncached = sum(r.computed_uncached for r in results)
    wall_cached = sum(r.wall_cached_s for r in results)
    wall_uncached = sum(r.wall_uncached_s for r in results)
    return "\n".join([
        f"Command: `{command}`", "", setup, "",
        f"Every row's tokens equal with and without the cache: {all(r.same_tokens for r in results)}", "",
        "| | batches | prompt tokens | reused | prompt positions computed | wall |",
        "|---|---|---|---|---|---|",
        f"| with MarconiCache | {len(results)} | {sum(r.prompt_tokens for r in results):,} "
        f"| {sum(r.reused_tokens for r in results):,} | {computed_cached:,} | {wall_cached:.1f} s |",
        f"| without (DynamicCache) | {len(results)} | {sum(r.prompt_tokens for r in results):,} | 0 "
        f"| {computed_uncached:,} (padding included) | {wall_uncached:.1f} s |",
        "", f"Positions computed: {computed_cached / computed_uncached:.1%} of uncached; wall time "
            f"{wall_cached / wall_uncached:.1%} of uncached ({wall_uncached / wall_cached:.1f}x faster).",
    ])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=3, help="BBH tasks, in the file's order (default: 3)")
    parser.add_argument("--queries", type=int, default=16, help="queries per task (default: 16)")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per batch (default: 8)")
    parser.add_argument("--new-tokens", type=int, default=8, help="tokens generated per row (default: 8)")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size of the Bamba model (default: 256)")
    parser.add_argument("--layers", type=int, default=8, help="layers, every 4th attention (default: 8)")
    parser.add_argument("--capacity-mb", type=float, default=1024.0, help="cache capacity in MiB (default: 1024)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    parser.add_argument("--out", type=Path, help="write the summary and per-batch results as JSON here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = command_line("eval.bench_batched", argv)
    results = run(args)
    setup = (f"BBH: {args.tasks} tasks x {args.queries} queries in batches of {args.batch_size}, {args.new_tokens} new "
             f"tokens per row, Bamba hidden {args.hidden} x {args.layers} layers (random weights, float32), "
             f"{args.threads} torch threads, CPU")
    summary = summary_markdown(results, command, setup)
    print(summary)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"command": command, "summary_markdown": summary,
                                        "batches": [asdict(r) for r in results]}, indent=1))
    return 0 if all(r.same_tokens for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
