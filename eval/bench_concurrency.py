"""Benchmark: threads sharing one MarconiCache, concurrent vs serialised, on real multi-turn chat sessions.

Several client threads each replay chat sessions of a workload from ``../shared/data`` (each turn's prompt: the
previous prompt, the model's own answer and the session's next user message), with a mix of answer lengths. The same
requests run in two arms, alternated round by round so that both see the same machine state:

- ``serialised``: one lock around every ``generate`` call (how hf_marconi ran calls before they could overlap);
- ``concurrent``: the threads call ``generate`` on the shared cache at once.

Each round starts from an empty cache. Reported per arm: wall time, requests and generated tokens per second, P50 /
P95 request latency, token hit rate; every output is compared with uncached generation (after the timed rounds).

    python -m eval.bench_concurrency                       # 4 clients, OpenAssistant sessions, small Bamba, CPU
    python -m eval.bench_concurrency --clients 4 --rounds 3 --out reports/bench_concurrency.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import DynamicCache

from eval.bench_cache import chat_turns, command_line, percentile, small_bamba
from hf_marconi import MarconiCache
from hf_marconi.families import cache_keyword_of

ARMS = ("serialised", "concurrent")


@dataclass
class Client:
    """One client thread's sessions: per session, the user messages and the answer length of each turn."""

    sessions: list[list[tuple[list[int], int]]]


@dataclass
class ArmResult:
    arm: str
    round: int
    wall_s: float
    cpu_s: float  # CPU seconds of the whole process (every thread) during the round
    latencies_s: list[float]
    generated_tokens: int
    token_hit_rate: float
    prefilled_tokens: int  # prompt tokens the model computed (not restored from the cache)
    outputs: dict[tuple[int, int, int], tuple[list[int], list[int]]] = field(repr=False)  # (client, session, turn)

    @property
    def requests_per_s(self) -> float:
        return len(self.latencies_s) / self.wall_s

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.wall_s


def make_clients(sessions: dict[str, list[list[int]]], clients: int, answer_lengths: list[int],
                 seed: int) -> list[Client]:
    """Deal the sessions round-robin to ``clients`` threads; each turn draws its answer length from
    ``answer_lengths``."""
    rng = random.Random(seed)
    dealt: list[list[list[tuple[list[int], int]]]] = [[] for _ in range(clients)]
    for index, messages in enumerate(sessions.values()):
        dealt[index % clients].append([(message, rng.choice(answer_lengths)) for message in messages])
    return [Client(s) for s in dealt]


def _generate(model, prompt: list[int], cache, new_tokens: int) -> list[int]:
    settings = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=model.config.pad_token_id,
                    eos_token_id=None)
    with torch.no_grad():
        return model.generate(torch.tensor([prompt]), **{cache_keyword_of(model): cache}, **settings)[0].tolist()


def run_arm(model, arm: str, round_index: int, clients: list[Client], capacity_bytes: int) -> ArmResult:
    """All clients' sessions through one fresh cache, each client in its own thread."""
    cache = MarconiCache(model, capacity_bytes=capacity_bytes)
    gate = threading.Lock() if arm == "serialised" else None
    latencies: list[float] = []
    outputs: dict[tuple[int, int, int], tuple[list[int], list[int]]] = {}
    errors: list[BaseException] = []
    generated = [0]
    start_together = threading.Barrier(len(clients))

    def client_thread(index: int) -> None:
        try:
            start_together.wait()
            for s, session in enumerate(clients[index].sessions):
                history: list[int] = []
                for turn, (message, new_tokens) in enumerate(session):
                    prompt = history + message
                    began = time.perf_counter()
                    with gate if gate is not None else contextlib.nullcontext():
                        history = _generate(model, prompt, cache, new_tokens)
                    latencies.append(time.perf_counter() - began)
                    generated[0] += len(history) - len(prompt)
                    outputs[(index, s, turn)] = (prompt, history)
        except BaseException as error:  # reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=client_thread, args=(i,), daemon=True) for i in range(len(clients))]
    began, cpu_began = time.perf_counter(), time.process_time()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall, cpu = time.perf_counter() - began, time.process_time() - cpu_began
    if errors:
        raise errors[0]
    stats = cache.stats()
    return ArmResult(arm, round_index, wall, cpu, latencies, generated[0], stats["token_hit_rate"],
                     stats["input_tokens"] - stats["hit_tokens"], outputs)


def summary_markdown(results: list[ArmResult], all_equal: bool, command: str, setup: str) -> str:
    lines = [f"Command: `{command}`", "", setup, "",
             f"Every output equal to uncached generation: {all_equal}", "",
             "| arm | rounds | wall (s, median) | requests/s | generated tokens/s | latency P50 | latency P95 "
             "| token hit rate | prompt tokens prefilled | cores busy (CPU s / wall s) |", "|---|---|---|---|---|---|---|---|---|---|"]
    by_arm = {arm: [r for r in results if r.arm == arm] for arm in ARMS}
    for arm, rows in by_arm.items():
        latencies = [x for r in rows for x in r.latencies_s]
        lines.append(
            f"| {arm} | {len(rows)} | {statistics.median(r.wall_s for r in rows):.2f} "
            f"| {statistics.median(r.requests_per_s for r in rows):.2f} "
            f"| {statistics.median(r.tokens_per_s for r in rows):.1f} "
            f"| {percentile(latencies, .5) * 1e3:.0f} ms | {percentile(latencies, .95) * 1e3:.0f} ms "
            f"| {statistics.mean(r.token_hit_rate for r in rows):.1%} "
            f"| {statistics.median(r.prefilled_tokens for r in rows):,.0f} "
            f"| {statistics.median(r.cpu_s / r.wall_s for r in rows):.2f} |"
        )
    speedups = [c.requests_per_s / s.requests_per_s for s, c in zip(by_arm["serialised"], by_arm["concurrent"])]
    lines += ["", f"Throughput, concurrent / serialised, per round: {', '.join(f'{x:.2f}x' for x in speedups)}"]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> tuple[list[ArmResult], bool]:
    from eval.traces import build_trace  # the eval extra (datasets, tokenizers) is needed only here

    torch.set_num_threads(args.torch_threads)
    trace = build_trace(args.trace, max_sessions=max(args.sessions * 4, 8))
    sessions = chat_turns(trace, args.sessions, args.max_input)
    clients = make_clients(sessions, args.clients, [int(x) for x in args.answer_lengths.split(",")], seed=0)
    model = small_bamba(args.hidden, args.layers, vocab=50257, seed=0)
    capacity = int(args.capacity_mb * 2**20)
    _generate(model, next(iter(sessions.values()))[0], DynamicCache(config=model.config), 2)  # warm-up
    results = []
    for round_index in range(args.rounds):
        for arm in ARMS if round_index % 2 == 0 else ARMS[::-1]:
            result = run_arm(model, arm, round_index, clients, capacity)
            results.append(result)
            print(f"round {round_index} {arm:10s}: {result.wall_s:6.2f} s, {result.requests_per_s:5.2f} req/s, "
                  f"P95 {percentile(result.latencies_s, .95) * 1e3:6.0f} ms, hit rate {result.token_hit_rate:.1%}",
                  file=sys.stderr, flush=True)
    checked: dict[tuple[int, ...], bool] = {}
    for result in results:
        for prompt, output in result.outputs.values():
            key = (*prompt, -1, len(output))
            if key not in checked:
                checked[key] = _generate(model, prompt, DynamicCache(config=model.config),
                                         len(output) - len(prompt)) == output
            if not checked[key]:
                print(f"MISMATCH: {result.arm} round {result.round}, prompt of {len(prompt)} tokens",
                      file=sys.stderr)
    return results, all(checked.values())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trace", default="oasst", help="workload of eval.traces to take sessions from (default: oasst)")
    parser.add_argument("--clients", type=int, default=4, help="client threads (default: 4)")
    parser.add_argument("--sessions", type=int, default=8, help="sessions, dealt to the clients (default: 8)")
    parser.add_argument("--max-input", type=int, default=1024, help="stop a session at a longer prompt (default: 1024)")
    parser.add_argument("--answer-lengths", default="1,8,32",
                        help="answer lengths each turn draws from, comma-separated (default: 1,8,32)")
    parser.add_argument("--hidden", type=int, default=512, help="hidden size of the Bamba model (default: 512)")
    parser.add_argument("--layers", type=int, default=8, help="layers, every 4th attention (default: 8)")
    parser.add_argument("--capacity-mb", type=float, default=512.0, help="cache capacity in MiB (default: 512)")
    parser.add_argument("--torch-threads", type=int, default=1, help="torch intra-op threads (default: 1)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per arm, alternated (default: 3)")
    parser.add_argument("--out", type=Path, help="write the summary and per-round results as JSON here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = command_line("eval.bench_concurrency", argv)
    results, all_equal = run(args)
    setup = (f"{args.clients} client threads, {args.sessions} {args.trace} sessions (prompts up to {args.max_input} "
             f"tokens), answers of {args.answer_lengths} tokens, Bamba hidden {args.hidden} x {args.layers} layers, "
             f"float32, {args.torch_threads} torch thread(s), {torch.get_num_threads()} in use, "
             f"{os.cpu_count()} CPUs")
    summary = summary_markdown(results, all_equal, command, setup)
    print(summary)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        payload = {"command": command, "summary_markdown": summary, "rounds": [
            {"arm": r.arm, "round": r.round, "wall_s": r.wall_s, "cpu_s": r.cpu_s, "latencies_s": r.latencies_s,
             "generated_tokens": r.generated_tokens, "token_hit_rate": r.token_hit_rate,
             "prefilled_tokens": r.prefilled_tokens} for r in results]}
        args.out.write_text(json.dumps(payload, indent=1))
    return 0 if all_equal else 1


if __name__ == "__main__":
    raise SystemExit(main())
