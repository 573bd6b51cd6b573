"""Multi-turn generation with a MarconiCache, checked against generation without it.

Runs offline on a tiny hybrid model built from a config with random weights (default: Bamba), or on a local model
directory with ``--model-path``. Each turn's prompt is the previous prompt, the previous answer and a new user
message, so from turn 2 on the cache restores the whole history and the model only reads the new message.

    python examples/quickstart.py                       # tiny random Bamba
    python examples/quickstart.py --family nemotron_h   # another family of hf_marconi.testing.FAMILIES
    python examples/quickstart.py --model-path /path/to/local/model
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModelForCausalLM, DynamicCache

from hf_marconi import MarconiCache
from hf_marconi.families import cache_keyword_of
from hf_marconi.testing import FAMILIES, build_model


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="bamba", choices=FAMILIES, help="tiny zoo model to build (default: bamba)")
    parser.add_argument("--model-path", help="a local model directory to load instead of a tiny random model")
    parser.add_argument("--turns", type=int, default=4, help="conversation turns (default: 4)")
    parser.add_argument("--user-tokens", type=int, default=48, help="tokens per user message (default: 48)")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="tokens generated per turn (default: 16)")
    parser.add_argument("--capacity-mb", type=float, default=64.0, help="cache capacity in MiB (default: 64)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random user messages (default: 0)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.model_path:
        model = AutoModelForCausalLM.from_pretrained(args.model_path, local_files_only=True).eval()
    else:
        model = build_model(args.family)
    cache = MarconiCache(model, capacity_bytes=int(args.capacity_mb * 2**20))
    vocab = model.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(args.seed)
    history = torch.empty((1, 0), dtype=torch.long)
    settings = dict(max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=model.config.pad_token_id)

    print(f"model: {type(model).__name__}, cache capacity {args.capacity_mb:g} MiB")
    # Warm-up: a process's first forward pays for one-time allocations; keep it out of both timings.
    warm_up = torch.randint(3, vocab, (1, 8), generator=generator)
    model.generate(warm_up, **{cache_keyword_of(model): DynamicCache(config=model.config)}, **settings)
    for turn in range(1, args.turns + 1):
        user = torch.randint(3, vocab, (1, args.user_tokens), generator=generator)
        prompt = torch.cat([history, user], dim=-1)

        reused_before = cache.stats()["hit_tokens"]
        start = time.perf_counter()
        with_cache = model.generate(prompt, past_key_values=cache, **settings)
        cached_s = time.perf_counter() - start
        start = time.perf_counter()
        uncached = {cache_keyword_of(model): DynamicCache(config=model.config)}
        without_cache = model.generate(prompt, **uncached, **settings)
        uncached_s = time.perf_counter() - start

        same = torch.equal(with_cache, without_cache)
        reused = cache.stats()["hit_tokens"] - reused_before
        print(
            f"turn {turn}: prompt {prompt.shape[1]:4d} tokens, reused {reused:4d}, "
            f"{cached_s * 1e3:7.1f} ms with cache vs {uncached_s * 1e3:7.1f} ms without, identical output: {same}"
        )
        if not same:
            raise SystemExit("cached and uncached generation differ")
        history = with_cache

    print("stats:", cache.stats())


if __name__ == "__main__":
    main()
