"""GPU benchmark of hf_marconi on a ~1B-parameter hybrid model with random weights (issue 6).

Measures, per prompt length:

- ``ttft``: time to first token (``generate(max_new_tokens=1)``) uncached, on a MarconiCache hit of 90% of the
  prompt, and the cost of the unmatched 10% suffix alone (a forward continuing a cache that already holds the
  prefix: the floor a hit can reach);
- ``copy``: the cost of taking a checkpoint (on the device; synchronously to CPU; asynchronously to pinned CPU
  memory with :class:`~hf_marconi.kernels.StateMover`, time to return and to completion), of copying the prefix's
  attention KV, and of a restore (from device copies; from CPU copies prefetched on a side stream);
- ``capture``: the overhead of capturing a branch-point checkpoint relative to an uncached prefill, two-pass
  (two forwards) vs single-pass (:func:`~hf_marconi.kernels.capture_branch_states`);
- ``replay``: requests/s of a short multi-turn replay (sessions sharing a system prompt, greedy decoding) with
  and without a MarconiCache, and how many outputs agree token for token.

Writes ``bench_gpu.json`` and ``bench_gpu.md`` (GPU name, versions, kernel report, the command) to ``--out``.
On a machine without CUDA it runs on the CPU; ``--preset tiny`` with short ``--lengths`` is the smoke mode the
tests run. CPU numbers are indicative only.

    python -m eval.bench_gpu --preset 1b --lengths 1024 2048 4096 8192 16384 32768 --out eval/results/bench_gpu
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import transformers
from transformers import BambaConfig, BambaForCausalLM, DynamicCache

from hf_marconi.families import cache_keyword_of
from hf_marconi.kernels import StateMover, capture_branch_states, kernel_report, package_status
from hf_marconi.states import StateLayout
from hf_marconi.testing import make_config

SECTIONS = ("ttft", "copy", "capture", "replay")
HIT_FRACTION = 0.9


# ------------------------------------------------------------------------------------------------- models
@dataclass(frozen=True)
class Preset:
    """A Bamba-shaped hybrid: Mamba2 mixers with attention at a few layers, random weights."""

    name: str
    hidden_size: int
    num_layers: int
    attention_layers: tuple[int, ...]
    mamba_heads: int
    mamba_head_dim: int
    state_size: int
    chunk_size: int
    mlp_size: int
    attention_heads: int
    kv_heads: int
    vocab_size: int


PRESETS: dict[str, Preset] = {
    # ~1.2B parameters: 24 layers of width 2048, attention at every 6th layer (Bamba-9B has 3 of 32).
    "1b": Preset("1b", 2048, 24, (5, 11, 17, 23), 64, 64, 128, 256, 3072, 16, 8, 32000),
    # The CPU measurement of issue 6: width 512, 8 layers.
    "small": Preset("small", 512, 8, (3, 7), 16, 64, 64, 256, 1024, 8, 4, 32000),
}


def build_model(preset: str, dtype: torch.dtype, device: str) -> BambaForCausalLM:
    """The benchmark model; ``tiny`` is the test zoo's Bamba (width 64)."""
    if preset == "tiny":
        config = make_config("bamba")
    else:
        p = PRESETS[preset]
        config = BambaConfig(
            vocab_size=p.vocab_size, hidden_size=p.hidden_size, intermediate_size=p.mlp_size,
            num_hidden_layers=p.num_layers, attn_layer_indices=list(p.attention_layers),
            num_attention_heads=p.attention_heads, num_key_value_heads=p.kv_heads,
            mamba_n_heads=p.mamba_heads, mamba_d_head=p.mamba_head_dim, mamba_d_state=p.state_size,
            mamba_n_groups=1, mamba_d_conv=4, mamba_expand=p.mamba_heads * p.mamba_head_dim // p.hidden_size,
            mamba_chunk_size=p.chunk_size, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        )
    with torch.device(device):
        torch.manual_seed(0)
        model = BambaForCausalLM(config)
    return model.to(dtype).eval()


# ------------------------------------------------------------------------------------------------- timing
STATISTICS: dict[str, Callable[[list[float]], float]] = {"median": statistics.median, "min": min}


class Clock:
    """Wall-clock timing that waits for the device before reading the clock.

    ``statistic`` summarises the timed runs: the median, or the minimum (the better estimate of the undisturbed
    cost on a machine shared with other work, where interference only ever adds time).
    """

    def __init__(self, device: torch.device, statistic: str = "median") -> None:
        self.cuda = device.type == "cuda"
        self.summarise = STATISTICS[statistic]

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def time(self, run: Callable[[], Any], repeats: int, setup: Callable[[], Any] | None = None) -> float:
        """Seconds of ``run()`` over ``repeats`` runs after one warm-up; ``setup()`` runs untimed before each."""
        return self.times({"run": run}, repeats, setup)["run"]

    def times(
        self, runs: dict[str, Callable[[], Any]], repeats: int, setup: Callable[[], Any] | None = None
    ) -> dict[str, float]:
        """Seconds of each of ``runs`` over ``repeats`` rounds after a warm-up round (kernels, allocators),
        interleaved run by run so that drifting load hits them alike; ``setup()`` runs untimed before each run."""
        times: dict[str, list[float]] = {name: [] for name in runs}
        for attempt in range(repeats + 1):
            for name, run in runs.items():
                if setup is not None:
                    setup()
                self.sync()
                begin = time.perf_counter()
                run()
                self.sync()
                if attempt:
                    times[name].append(time.perf_counter() - begin)
        return {name: self.summarise(values) for name, values in times.items()}


class Bench:
    """One model, its device, and the forwards every section needs."""

    def __init__(self, model: BambaForCausalLM, repeats: int, statistic: str = "median", seed: int = 0) -> None:
        self.model = model
        self.device = model.device
        self.config = model.config
        self.clock = Clock(self.device, statistic)
        self.repeats = repeats
        self.generator = torch.Generator().manual_seed(seed)

    def tokens(self, length: int) -> torch.Tensor:
        """Random token ids, shape [1, length], avoiding the special ids 0-2."""
        return torch.randint(3, self.config.vocab_size, (1, length), generator=self.generator).to(self.device)

    def fresh_cache(self) -> DynamicCache:
        return DynamicCache(config=self.config)

    def forward(self, cache: DynamicCache, ids: torch.Tensor, start: int) -> None:
        """Prefill ``ids`` at positions ``start..`` into ``cache`` (positions explicit: Bamba's default ignores it)."""
        positions = torch.arange(start, start + ids.shape[1], device=self.device).unsqueeze(0)
        with torch.no_grad():
            self.model(input_ids=ids, **{cache_keyword_of(self.model): cache}, position_ids=positions, use_cache=True,
                       logits_to_keep=1)

    def generate(self, ids: torch.Tensor, cache: Any, new_tokens: int) -> torch.Tensor:
        with torch.no_grad():
            return self.model.generate(
                ids, **{cache_keyword_of(self.model): cache}, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                do_sample=False,
                attention_mask=torch.ones_like(ids),
            )

    def ms(self, seconds: float) -> float:
        return round(seconds * 1e3, 3)


# ------------------------------------------------------------------------------------------------ sections
def make_marconi_cache(model: BambaForCausalLM, capacity_bytes: int) -> Any:
    from hf_marconi import MarconiCache

    return MarconiCache(model, capacity_bytes=capacity_bytes, policy="marconi")


def section_ttft(bench: Bench, length: int, capacity_bytes: int) -> dict[str, Any]:
    """TTFT uncached, on a 90% hit, and the unmatched suffix's forward alone."""
    prefix_len = int(length * HIT_FRACTION)
    prefix = bench.tokens(prefix_len)
    full = torch.cat([prefix, bench.tokens(length - prefix_len)], dim=1)
    uncached = bench.clock.time(lambda: bench.generate(full, bench.fresh_cache(), 1), bench.repeats)

    cache = make_marconi_cache(bench.model, capacity_bytes)
    bench.generate(prefix, cache, 1)  # admits a checkpoint at the end of the prefix (input+output reuse)
    prompts = []

    def next_prompt() -> None:
        prompts.append(torch.cat([prefix, bench.tokens(length - prefix_len)], dim=1))

    before = cache.stats()
    hit = bench.clock.time(lambda: bench.generate(prompts[-1], cache, 1), bench.repeats, setup=next_prompt)
    after = cache.stats()
    requests = after["lookups"] - before["lookups"]
    reused = (after["hit_tokens"] - before["hit_tokens"]) / max(requests, 1)

    live = bench.fresh_cache()

    def prefill_prefix() -> None:
        nonlocal live
        live = bench.fresh_cache()
        bench.forward(live, prefix, 0)

    suffix = bench.tokens(length - prefix_len)
    suffix_only = bench.clock.time(lambda: bench.forward(live, suffix, prefix_len), bench.repeats,
                                     setup=prefill_prefix)
    return {
        "uncached_ms": bench.ms(uncached),
        "hit_ms": bench.ms(hit),
        "suffix_only_ms": bench.ms(suffix_only),
        "hit_tokens_per_request": reused,
        "hit_fraction": round(reused / length, 4),
        "hit_over_suffix_only": round(hit / suffix_only, 3),
        "speedup": round(uncached / hit, 3),
    }


def section_copy(bench: Bench, length: int) -> dict[str, Any]:
    """Cost of taking a checkpoint and the prefix's KV, and of a restore, for a prefix of 90% of ``length``."""
    prefix_len = int(length * HIT_FRACTION)
    cache = bench.fresh_cache()
    layout = StateLayout.of(cache)
    bench.forward(cache, bench.tokens(prefix_len), 0)
    device = bench.device
    mover = StateMover(storage_device="cpu")
    result: dict[str, Any] = {}
    checkpoint = layout.take_checkpoint(cache)
    edge = layout.take_edge(cache, 0, prefix_len)
    result["checkpoint_bytes"] = checkpoint.nbytes
    result["kv_bytes"] = edge.nbytes
    result["checkpoint_copy_device_ms"] = bench.ms(
        bench.clock.time(lambda: layout.take_checkpoint(cache), bench.repeats)
    )
    result["checkpoint_copy_to_cpu_sync_ms"] = bench.ms(
        bench.clock.time(lambda: layout.take_checkpoint(cache, "cpu"), bench.repeats)
    )
    # Asynchronous offload: what the hot path pays (the call returns) vs when the copy has landed.
    returns, completes = [], []
    for _ in range(bench.repeats + 1):
        bench.clock.sync()
        begin = time.perf_counter()
        pending = mover.offload(layout.take_checkpoint(cache))
        returned = time.perf_counter()
        pending.synchronize()
        done = time.perf_counter()
        returns.append(returned - begin)
        completes.append(done - begin)
    result["checkpoint_offload_async_return_ms"] = bench.ms(bench.clock.summarise(returns[1:]))
    result["checkpoint_offload_async_complete_ms"] = bench.ms(bench.clock.summarise(completes[1:]))
    result["kv_copy_device_ms"] = bench.ms(
        bench.clock.time(lambda: layout.take_edge(cache, 0, prefix_len), bench.repeats)
    )

    devices = {idx: device for idx in range(len(cache.layers))}
    result["restore_from_device_ms"] = bench.ms(
        bench.clock.time(lambda: layout.restore(bench.fresh_cache(), (edge,), checkpoint, devices), bench.repeats)
    )
    stored_checkpoint = mover.offload(checkpoint).synchronize()
    stored_edge = mover.offload(edge).synchronize()

    def restore_prefetched() -> None:
        ready_checkpoint = mover.prefetch(stored_checkpoint, device)
        ready_edge = mover.prefetch(stored_edge, device)
        layout.restore(bench.fresh_cache(), (ready_edge.wait(),), ready_checkpoint.wait(), devices)

    result["restore_from_cpu_prefetched_ms"] = bench.ms(bench.clock.time(restore_prefetched, bench.repeats))
    return result


def section_capture(bench: Bench, length: int) -> dict[str, Any]:
    """Uncached prefill vs two-pass and single-pass capture of one branch point off the scan-chunk grid."""
    ids = bench.tokens(length)
    branch = length // 2 + 1
    layout = StateLayout.of(bench.fresh_cache())
    holder: dict[str, DynamicCache] = {}

    def fresh() -> None:
        holder["cache"] = bench.fresh_cache()

    def uncached() -> None:
        bench.forward(holder["cache"], ids, 0)

    def two_pass() -> None:
        cache = holder["cache"]
        bench.forward(cache, ids[:, :branch], 0)
        layout.take_checkpoint(cache)
        bench.forward(cache, ids[:, branch:], branch)

    def single_pass() -> None:
        cache = holder["cache"]
        with capture_branch_states(bench.model, cache, 0, length, [branch]):
            bench.forward(cache, ids, 0)

    seconds = bench.clock.times(
        {"uncached": uncached, "two_pass": two_pass, "single_pass": single_pass}, bench.repeats, setup=fresh
    )
    base, two, one = seconds["uncached"], seconds["two_pass"], seconds["single_pass"]
    return {
        "branch": branch,
        "uncached_ms": bench.ms(base),
        "two_pass_ms": bench.ms(two),
        "single_pass_ms": bench.ms(one),
        "two_pass_overhead": round(two / base - 1, 4),
        "single_pass_overhead": round(one / base - 1, 4),
    }


def section_replay(
    bench: Bench, sessions: int, turns: int, system_len: int, user_len: int, new_tokens: int, capacity_bytes: int
) -> dict[str, Any]:
    """Requests/s of a multi-turn replay (sessions round-robin, shared system prompt) with and without the cache."""
    # The cache is built first: it installs hf_marconi's continuation fixes on the model, which both runs share.
    cache = make_marconi_cache(bench.model, capacity_bytes)
    system = bench.tokens(system_len)
    users = [[bench.tokens(user_len) for _ in range(turns)] for _ in range(sessions)]

    def replay(make_cache: Callable[[], Any]) -> tuple[float, list[torch.Tensor]]:
        histories = [system for _ in range(sessions)]
        outputs = []
        bench.clock.sync()
        begin = time.perf_counter()
        for turn in range(turns):
            for session in range(sessions):
                prompt = torch.cat([histories[session], users[session][turn]], dim=1)
                sequence = bench.generate(prompt, make_cache(), new_tokens)
                outputs.append(sequence[:, prompt.shape[1]:])
                histories[session] = sequence
        bench.clock.sync()
        return time.perf_counter() - begin, outputs

    replay(bench.fresh_cache)  # warm-up
    plain_time, plain_outputs = replay(bench.fresh_cache)
    cached_time, cached_outputs = replay(lambda: cache)
    requests = sessions * turns
    stats = cache.stats()
    return {
        "requests": requests,
        "requests_per_s_without_cache": round(requests / plain_time, 3),
        "requests_per_s_with_cache": round(requests / cached_time, 3),
        "speedup": round(plain_time / cached_time, 3),
        "identical_outputs": sum(torch.equal(a, b) for a, b in zip(plain_outputs, cached_outputs)),
        "token_hit_rate": round(stats["hit_tokens"] / max(stats["input_tokens"], 1), 4),
        "cache_stats": stats,
    }


# ------------------------------------------------------------------------------------------------- report
def environment(model: BambaForCausalLM, command: str, preset: str, dtype: torch.dtype, timing: str) -> dict[str, Any]:
    cuda = model.device.type == "cuda"
    cpu_name = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return {
        "command": command,
        "timing": timing,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(model.device) if cuda else cpu_name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "transformers": transformers.__version__,
        "packages": {s.name: s.version or s.error for s in map(package_status, ("mamba_ssm", "causal_conv1d"))},
        "preset": preset,
        "dtype": str(dtype).removeprefix("torch."),
        "parameters": sum(p.numel() for p in model.parameters()),
        "config": {k: v for k, v in model.config.to_diff_dict().items() if not k.startswith("_")},
        "kernels": str(kernel_report(model)),
    }


def markdown(record: dict[str, Any]) -> str:
    env = record["environment"]
    lines = [
        f"# hf_marconi GPU benchmark: {env['device']}",
        "",
        f"- command: `{env['command']}`",
        f"- date: {env['date']}; torch {env['torch']} (CUDA {env['cuda']}), transformers {env['transformers']}",
        f"- kernel packages: {env['packages']}",
        f"- timing: {env['timing']}",
        f"- model: Bamba-shaped hybrid, preset `{env['preset']}`, {env['parameters'] / 1e6:.1f}M parameters, "
        f"{env['dtype']}, random weights",
        "",
        "```",
        env["kernels"],
        "```",
    ]
    tables = {
        "ttft": ("Time to first token (ms): uncached, on a 90% hit, and the 10% suffix alone",
                 ["uncached_ms", "hit_ms", "suffix_only_ms", "hit_over_suffix_only", "speedup", "hit_fraction"]),
        "copy": ("Checkpoint / KV copy and restore cost (ms) for a 90% prefix",
                 ["checkpoint_bytes", "kv_bytes", "checkpoint_copy_device_ms", "checkpoint_copy_to_cpu_sync_ms",
                  "checkpoint_offload_async_return_ms", "checkpoint_offload_async_complete_ms", "kv_copy_device_ms",
                  "restore_from_device_ms", "restore_from_cpu_prefetched_ms"]),
        "capture": ("Branch-point capture vs an uncached prefill (ms; overhead relative to uncached)",
                    ["branch", "uncached_ms", "two_pass_ms", "single_pass_ms", "two_pass_overhead",
                     "single_pass_overhead"]),
    }
    for section, (title, columns) in tables.items():
        rows = record["results"].get(section)
        if not rows:
            continue
        lines += ["", f"## {title}", "", "| prompt | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
        for length, row in rows.items():
            lines.append(f"| {length} | " + " | ".join(str(row[c]) for c in columns) + " |")
    replay = record["results"].get("replay")
    if replay:
        lines += ["", "## Multi-turn replay", ""]
        lines += [f"- {key}: {value}" for key, value in replay.items() if key != "cache_stats"]
    return "\n".join(lines) + "\n"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


# ---------------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    cuda = torch.cuda.is_available()
    parser.add_argument("--preset", choices=("tiny", *PRESETS), default="1b" if cuda else "tiny")
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                        default="bfloat16" if cuda else "float32")
    parser.add_argument("--lengths", type=int, nargs="+",
                        default=[1024, 2048, 4096, 8192, 16384, 32768] if cuda else [64, 128])
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--repeats", type=int, default=3 if cuda else 1)
    parser.add_argument("--statistic", choices=sorted(STATISTICS), default="median",
                        help="how timed repeats are summarised (min: for machines shared with other work)")
    parser.add_argument("--capacity-gb", type=float, default=8.0)
    parser.add_argument("--sessions", type=int, default=4)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--system-len", type=int, default=1024 if cuda else 32)
    parser.add_argument("--user-len", type=int, default=256 if cuda else 8)
    parser.add_argument("--new-tokens", type=int, default=32 if cuda else 4)
    parser.add_argument("--require-kernels", action="store_true",
                        help="stop unless mamba-ssm and causal-conv1d kernels serve every mixer")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for bench_gpu.json / bench_gpu.md (default: eval/results/bench_gpu/<device>)")


def run(args: argparse.Namespace) -> int:
    if args.repeats < 1:
        raise SystemExit("--repeats must be at least 1")
    dtype = getattr(torch, args.dtype)
    model = build_model(args.preset, dtype, args.device)
    report = kernel_report(model)
    if args.require_kernels and not report.kernels_in_use:
        print(report, file=sys.stderr)
        raise SystemExit("kernels are not in use (see the report above); install the `cuda` extra, see README")
    bench = Bench(model, args.repeats, args.statistic)
    capacity = int(args.capacity_gb * 2**30)
    results: dict[str, Any] = {}
    for section in ("ttft", "copy", "capture"):
        if section in args.sections:
            results[section] = {}
            for length in args.lengths:
                print(f"[bench_gpu] {section} {length}", file=sys.stderr, flush=True)
                if section == "ttft":
                    results[section][length] = section_ttft(bench, length, capacity)
                elif section == "copy":
                    results[section][length] = section_copy(bench, length)
                else:
                    results[section][length] = section_capture(bench, length)
    if "replay" in args.sections:
        print("[bench_gpu] replay", file=sys.stderr, flush=True)
        results["replay"] = section_replay(bench, args.sessions, args.turns, args.system_len, args.user_len,
                                           args.new_tokens, capacity)
    timing = f"{args.statistic} of {args.repeats} timed runs after a warm-up run"
    record = {"environment": environment(model, args.command, args.preset, dtype, timing), "results": results}
    out = args.out or Path("eval/results/bench_gpu") / slug(record["environment"]["device"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_gpu.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    (out / "bench_gpu.md").write_text(markdown(record))
    print(markdown(record))
    return 0


def register(subparsers: Any) -> None:
    """``python -m eval bench-gpu`` (add ``eval.bench_gpu`` to ``eval.cli.SUBCOMMAND_MODULES``)."""
    parser = subparsers.add_parser("bench-gpu", help="GPU benchmark: TTFT, copy/restore, capture, replay")
    add_arguments(parser)
    parser.set_defaults(run=run, command="python -m eval " + shlex.join(sys.argv[1:]))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.bench_gpu", description=__doc__.splitlines()[0])
    add_arguments(parser)
    argv = list(sys.argv[1:] if argv is None else argv)
    parser.set_defaults(command="python -m eval.bench_gpu " + shlex.join(argv))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
