"""Several threads serving chats through one MarconiCache at once.

Each thread runs its own multi-turn conversation behind a shared system prompt; all of them pass the same cache to
``model.generate``. Their calls overlap (each owns its live states; the store is shared), each conversation reuses
its earlier turns, and the system prompt's branch point is shared across threads.

    python examples/threads.py                                   # tiny random Bamba, 4 threads x 3 turns
    python examples/threads.py --threads 8 --turns 4 --check
"""

from __future__ import annotations

import argparse
import threading

import torch

from hf_marconi import MarconiCache
from hf_marconi.pipeline import load_model_and_tokenizer
from hf_marconi.testing import FAMILIES

SYSTEM = "You are a terse assistant. Answer in one short sentence.\n"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="bamba", choices=FAMILIES, help="tiny zoo model (default: bamba)")
    parser.add_argument("--model-path", help="a local model directory to load instead of a tiny random model")
    parser.add_argument("--threads", type=int, default=4, help="conversations run at once (default: 4)")
    parser.add_argument("--turns", type=int, default=3, help="turns per conversation (default: 3)")
    parser.add_argument("--max-new-tokens", type=int, default=6, help="tokens per answer (default: 6)")
    parser.add_argument("--check", action="store_true", help="compare every answer with uncached generation")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    model, tokenizer = load_model_and_tokenizer(args.model_path, args.family)
    cache = MarconiCache(model, capacity_bytes=256 * 2**20)
    settings = dict(max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                    return_dict_in_generate=True)
    calls: dict[tuple[int, int], tuple[list[int], list[int], int]] = {}  # (thread, turn) -> prompt, output, reused
    errors: list[BaseException] = []

    def conversation(index: int) -> None:
        try:
            history = tokenizer(SYSTEM, add_special_tokens=False)["input_ids"]
            for turn in range(args.turns):
                message = tokenizer(f"User {index}, turn {turn}: what now?\n", add_special_tokens=False)["input_ids"]
                prompt = history + message
                out = model.generate(torch.tensor([prompt]), past_key_values=cache, **settings)
                history = out.sequences[0].tolist()
                # The record of this thread's own call: another thread's call cannot overwrite it.
                calls[(index, turn)] = (prompt, history, out.marconi_record.reused_tokens)
        except BaseException as error:  # reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=conversation, args=(i,)) for i in range(args.threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    if errors or any(thread.is_alive() for thread in threads):
        raise SystemExit(f"a conversation failed or hung: {errors[:1]}")
    for (index, turn), (prompt, output, reused) in sorted(calls.items()):
        print(f"thread {index} turn {turn}: prompt {len(prompt)} tokens, {reused} restored")
        if args.check:
            reference = model.generate(torch.tensor([prompt]), **settings).sequences[0].tolist()
            if reference != output:
                raise SystemExit(f"thread {index} turn {turn}: cached and uncached answers differ")
    stats = cache.stats()
    print(f"{stats['lookups']} calls, {stats['hits']} hits, tokens reused {stats['hit_tokens']}/{stats['input_tokens']}")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
