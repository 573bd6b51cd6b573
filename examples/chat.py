"""A multi-turn chat through MarconiPipeline: each turn reuses the whole conversation so far from the cache.

The session keeps the exact token ids of every prompt and reply, so turn t+1 resumes from the state stored after
turn t's reply and the model reads only the new message. With ``--check`` every reply is compared with generation
without the cache (greedy decoding must give the same ids).

    python examples/chat.py                                   # tiny random Bamba, scripted user messages
    python examples/chat.py --interactive                     # type the user messages (empty line ends)
    python examples/chat.py --model-path /path/to/local/model --max-new-tokens 64
"""

from __future__ import annotations

import argparse
import sys

import torch

from hf_marconi.pipeline import MarconiPipeline, load_model_and_tokenizer
from hf_marconi.testing import FAMILIES

SCRIPT = [
    "Hello! Can you help me plan a trip?",
    "I would like to visit three cities in one week.",
    "Which of them should come first?",
    "Thanks. Summarise the plan in one sentence.",
]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="bamba", choices=FAMILIES, help="tiny zoo model (default: bamba)")
    parser.add_argument("--model-path", help="a local model directory to load instead of a tiny random model")
    parser.add_argument("--turns", type=int, default=len(SCRIPT), help="scripted turns to run (default: all)")
    parser.add_argument("--max-new-tokens", type=int, default=24, help="tokens per reply (default: 24)")
    parser.add_argument("--capacity-mb", type=float, default=256.0, help="cache capacity in MiB (default: 256)")
    parser.add_argument("--interactive", action="store_true", help="read user messages from stdin")
    parser.add_argument("--check", action="store_true", help="compare every reply with uncached generation")
    return parser.parse_args()


def user_messages(args: argparse.Namespace):
    if not args.interactive:
        yield from SCRIPT[: args.turns]
        return
    for line in sys.stdin:
        if not line.strip():
            return
        yield line.rstrip("\n")


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_model_and_tokenizer(args.model_path, args.family)
    pipe = MarconiPipeline(model, tokenizer, capacity_bytes=int(args.capacity_mb * 2**20),
                           max_new_tokens=args.max_new_tokens)
    chat = pipe.chat(system="You are a helpful travel assistant.")
    for turn, message in enumerate(user_messages(args), start=1):
        print(f"\n[turn {turn}] user: {message}\nassistant: ", end="", flush=True)
        chat.send(message, on_text=lambda piece: print(piece, end="", flush=True))
        call = pipe.cache.last_call
        print(f"\n  prompt {len(chat.last_prompt_ids)} tokens, {call.reused} restored from the cache, "
              f"{len(chat.last_prompt_ids) - call.reused} read by the model")
        if args.check and chat.last_reply_ids != pipe.reference_ids(chat.last_prompt_ids):
            raise SystemExit(f"turn {turn}: cached and uncached replies differ")
    stats = pipe.cache.stats()
    print(f"\nhits {stats['hits']}/{stats['lookups']}, tokens reused {stats['hit_tokens']}/{stats['input_tokens']}, "
          f"stored {stats['bytes'] / 2**20:.2f} MiB")


if __name__ == "__main__":
    main()
