"""A transformers text-generation pipeline wrapped by MarconiPipeline: several chat sessions share one cache, and
replies stream token by token through a ``TextIteratorStreamer``.

The sessions share a system prompt (purely-input reuse once it has been seen a few times) and each session's next
turn resumes from its own last reply (input-and-output reuse).

    python examples/pipeline_chat.py                             # tiny random Bamba
    python examples/pipeline_chat.py --sessions 4 --turns 3
    python examples/pipeline_chat.py --model-path /path/to/local/model
"""

from __future__ import annotations

import argparse
import threading

import torch
from transformers import TextIteratorStreamer, pipeline

from hf_marconi.pipeline import MarconiPipeline, load_model_and_tokenizer
from hf_marconi.testing import FAMILIES

SYSTEM = "You are the support assistant of a bicycle shop. Be friendly and answer in two sentences at most."


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="bamba", choices=FAMILIES, help="tiny zoo model (default: bamba)")
    parser.add_argument("--model-path", help="a local model directory to load instead of a tiny random model")
    parser.add_argument("--sessions", type=int, default=3, help="concurrent conversations (default: 3)")
    parser.add_argument("--turns", type=int, default=2, help="turns per conversation (default: 2)")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="tokens per reply (default: 16)")
    parser.add_argument("--capacity-mb", type=float, default=256.0, help="cache capacity in MiB (default: 256)")
    parser.add_argument("--check", action="store_true", help="compare every reply with uncached generation")
    return parser.parse_args()


def streamed_send(chat, message: str) -> str:
    """Send ``message`` on a worker thread and print the reply as it streams in."""
    streamer = TextIteratorStreamer(chat.pipeline.tokenizer, skip_prompt=True, skip_special_tokens=True)
    worker = threading.Thread(target=chat.send, args=(message,), kwargs={"streamer": streamer})
    worker.start()
    pieces = []
    for piece in streamer:
        print(piece, end="", flush=True)
        pieces.append(piece)
    worker.join()
    print()
    return "".join(pieces)


def main() -> None:
    args = parse_args()
    model, tokenizer = load_model_and_tokenizer(args.model_path, args.family)
    hf_pipe = pipeline("text-generation", model=model, tokenizer=tokenizer)
    pipe = MarconiPipeline.from_pipeline(hf_pipe, capacity_bytes=int(args.capacity_mb * 2**20),
                                         max_new_tokens=args.max_new_tokens)
    chats = [pipe.chat(system=SYSTEM) for _ in range(args.sessions)]
    for turn in range(1, args.turns + 1):
        for index, chat in enumerate(chats):
            message = f"Customer {index + 1}, message {turn}: my bike makes a noise when I brake. What now?"
            print(f"[session {index + 1}, turn {turn}] ", end="")
            streamed_send(chat, message)
            call = pipe.cache.last_call
            print(f"    prompt {len(chat.last_prompt_ids)} tokens, {call.reused} restored")
            if args.check and chat.last_reply_ids != pipe.reference_ids(chat.last_prompt_ids):
                raise SystemExit(f"session {index + 1} turn {turn}: cached and uncached replies differ")
    stats = pipe.cache.stats()
    print(f"hits {stats['hits']}/{stats['lookups']} (purely input {stats['hits_purely_input']}, input+output "
          f"{stats['hits_input_output']}), tokens reused {stats['token_hit_rate']:.0%}")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
