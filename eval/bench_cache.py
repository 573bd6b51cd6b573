"""Benchmark: time to first token of a small hybrid model with and without a MarconiCache, on real chat sessions.

Replays a few multi-turn sessions of a workload from ``../shared/data`` as a chat would: each turn's prompt is the
previous turn's prompt, the model's own answer and the next user message of the session (token ids from the trace).
For every turn it measures, on the same prompt, the time to the first generated token with the cache and with a
fresh ``DynamicCache``, and the cache's own work (lookup, restore, admission) as a share of the uncached prefill.

    python -m eval.bench_cache                        # tau-bench sessions, small Bamba, CPU
    python -m eval.bench_cache --trace swebench --sessions 2 --max-input 2048 --out reports/bench_cache.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers
from transformers import DynamicCache
from transformers.generation.streamers import BaseStreamer

from hf_marconi import MarconiCache
from hf_marconi.families import cache_keyword_of
from hf_marconi.generation import CallTimings
from hf_marconi.trace import Request


class FirstTokenClock(BaseStreamer):
    """A streamer that notes when generate emits its first new token (its first ``put`` is the prompt)."""

    def __init__(self) -> None:
        self.puts = 0
        self.first_token_at: float | None = None

    def put(self, value: torch.Tensor) -> None:
        self.puts += 1
        if self.puts == 2 and self.first_token_at is None:
            self.first_token_at = time.perf_counter()

    def end(self) -> None:
        pass


@dataclass
class TurnResult:
    session: str
    turn: int
    prompt_tokens: int
    reused_tokens: int
    ttft_cached_s: float
    ttft_uncached_s: float
    timings: CallTimings  # the cache's own work in the cached call
    same_output: bool

    @property
    def overhead_share(self) -> float:
        """Lookup + restore + admission relative to an uncached prefill of the same prompt."""
        return self.timings.overhead_s / self.ttft_uncached_s


def small_bamba(hidden: int, layers: int, vocab: int, seed: int) -> transformers.PreTrainedModel:
    """A Bamba model with random weights: every 4th layer attention, the rest Mamba2; float32, eval mode."""
    config = transformers.BambaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=max(hidden // 64, 1), num_key_value_heads=max(hidden // 128, 1),
        attn_layer_indices=[i for i in range(layers) if i % 4 == 3],
        mamba_n_heads=hidden * 2 // 32, mamba_d_head=32, mamba_d_state=64, mamba_chunk_size=64,
        pad_token_id=vocab - 1, bos_token_id=vocab - 1, eos_token_id=vocab - 1,
    )
    torch.manual_seed(seed)
    return transformers.BambaForCausalLM(config).eval()


def chat_turns(trace: list[Request], sessions: int, max_input: int) -> dict[str, list[list[int]]]:
    """Per session, the user messages of each turn: the tokens a request adds after the previous request's output."""
    by_session: dict[str, list[Request]] = {}
    for request in sorted(trace, key=lambda r: r.arrival):
        by_session.setdefault(request.session_id, []).append(request)
    turns: dict[str, list[list[int]]] = {}
    for session_id, requests in by_session.items():
        messages, seen = [], 0
        for request in requests:
            if len(request.input_ids) > max_input:
                break
            messages.append(list(request.input_ids[seen:]))
            seen = len(request.input_ids) + len(request.output_ids)
        if len(messages) >= 2:
            turns[session_id] = messages
        if len(turns) == sessions:
            break
    return turns


def timed_generate(model, prompt: torch.Tensor, cache, new_tokens: int) -> tuple[torch.Tensor, float]:
    clock = FirstTokenClock()
    # GPT-2's last id (<|endoftext|>) never occurs in the traces' text, so no prompt token is taken for padding.
    pad = model.config.pad_token_id
    settings = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad, eos_token_id=None, streamer=clock)
    start = time.perf_counter()
    with torch.no_grad():
        # The installed release's keyword: a MarconiCache takes any spelling, a DynamicCache warns on the old one.
        output = model.generate(prompt, **{cache_keyword_of(model): cache}, **settings)
    return output, clock.first_token_at - start


def run(args: argparse.Namespace) -> list[TurnResult]:
    from eval.traces import build_trace  # the eval extra (datasets, tokenizers) is needed only here

    torch.set_num_threads(args.threads)
    trace = build_trace(args.trace, max_sessions=max(args.sessions * 4, 8))
    model = small_bamba(args.hidden, args.layers, vocab=50257, seed=0)
    cache = MarconiCache(model, capacity_bytes=int(args.capacity_mb * 2**20))
    sessions = chat_turns(trace, args.sessions, args.max_input)
    if not sessions:
        raise SystemExit(f"no session of {args.trace!r} has two turns within --max-input {args.max_input}")
    # Warm-up: the first forwards of a process pay for allocations and kernel selection; measure neither run with it.
    timed_generate(model, torch.tensor([next(iter(sessions.values()))[0]]), DynamicCache(config=model.config), 2)
    results = []
    for session_id, messages in sessions.items():
        history: list[int] = []
        for turn, message in enumerate(messages):
            prompt = torch.tensor([history + message])
            cached, ttft_cached = timed_generate(model, prompt, cache, args.new_tokens)
            call = cache.last_call
            uncached, ttft_uncached = timed_generate(model, prompt, DynamicCache(config=model.config), args.new_tokens)
            result = TurnResult(
                session=session_id, turn=turn, prompt_tokens=prompt.shape[1], reused_tokens=call.reused,
                ttft_cached_s=ttft_cached, ttft_uncached_s=ttft_uncached, timings=call.timings,
                same_output=torch.equal(cached, uncached),
            )
            results.append(result)
            print(f"{session_id[:24]:24s} turn {turn:2d}: prompt {result.prompt_tokens:5d}, reused "
                  f"{result.reused_tokens:5d}, TTFT {ttft_cached * 1e3:8.1f} ms cached vs {ttft_uncached * 1e3:8.1f} "
                  f"ms uncached, overhead {result.overhead_share:6.1%}", file=sys.stderr, flush=True)
            history = cached[0].tolist()
    return results


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile of ``values`` (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary_markdown(results: list[TurnResult], command: str) -> str:
    hits = [r for r in results if r.reused_tokens]
    lines = [
        f"Command: `{command}`",
        "",
        f"{len(results)} turns, {len(hits)} hits, outputs identical with and without the cache: "
        f"{all(r.same_output for r in results)}",
        "",
        "| turns | TTFT P50 cached | TTFT P50 uncached | TTFT P95 cached | TTFT P95 uncached | mean reused share "
        "| overhead (lookup+restore+admit) / uncached prefill |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, rows in (("all", results), ("hits", hits)):
        if not rows:
            continue
        cached = [r.ttft_cached_s * 1e3 for r in rows]
        uncached = [r.ttft_uncached_s * 1e3 for r in rows]
        reused = statistics.mean(r.reused_tokens / r.prompt_tokens for r in rows)
        overhead = statistics.mean(r.overhead_share for r in rows)
        lines.append(
            f"| {label} ({len(rows)}) | {percentile(cached, .5):.1f} ms | {percentile(uncached, .5):.1f} ms "
            f"| {percentile(cached, .95):.1f} ms | {percentile(uncached, .95):.1f} ms | {reused:.0%} | {overhead:.1%} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trace", default="tau", help="workload of eval.traces to take sessions from (default: tau)")
    parser.add_argument("--sessions", type=int, default=3, help="sessions to replay (default: 3)")
    parser.add_argument("--max-input", type=int, default=2048, help="stop a session at a longer prompt (default: 2048)")
    parser.add_argument("--new-tokens", type=int, default=8, help="tokens generated per turn (default: 8)")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size of the Bamba model (default: 256)")
    parser.add_argument("--layers", type=int, default=8, help="layers, every 4th attention (default: 8)")
    parser.add_argument("--capacity-mb", type=float, default=512.0, help="cache capacity in MiB (default: 512)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    parser.add_argument("--out", type=Path, help="write per-turn results and the summary as JSON here")
    return parser.parse_args(argv)


def command_line(module: str, argv: list[str] | None) -> str:
    """The command that ran ``python -m module`` with ``argv`` (None: this process's arguments), for a report."""
    return " ".join(["python", "-m", module, *(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = command_line("eval.bench_cache", argv)
    results = run(args)
    summary = summary_markdown(results, command)
    print(summary)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        payload = {"command": command, "torch_threads": args.threads, "summary_markdown": summary,
                   "turns": [asdict(r) | {"overhead_share": r.overhead_share} for r in results]}
        args.out.write_text(json.dumps(payload, indent=1))
    return 0 if all(r.same_output for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
