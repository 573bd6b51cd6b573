"""Save a MarconiCache to disk and reuse it after a restart.

The first run chats a few turns, saves the stored states (one safetensors file with a JSON manifest) and continues
the conversation in a fresh cache loaded from that file: the continuation is restored from disk. ``--load-only``
does the second half in a new process, as after a restart (the file records the model's config fingerprint and a
probe of its weights, so only the same model can load it).

    python examples/save_and_reload.py --path /tmp/marconi.safetensors               # chat, save, reload, continue
    python examples/save_and_reload.py --path /tmp/marconi.safetensors --load-only   # another process: load, continue
    python examples/save_and_reload.py --model-path /path/to/local/model --path cache.safetensors
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from hf_marconi import MarconiCache
from hf_marconi.persistence import load_cache, save_cache
from hf_marconi.pipeline import MarconiPipeline, load_model_and_tokenizer
from hf_marconi.testing import FAMILIES

MESSAGES = ["Hi! Please remember the number 42.", "Now add 8 to it.", "What number do we have now?"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="bamba", choices=FAMILIES, help="tiny zoo model (default: bamba)")
    parser.add_argument("--model-path", help="a local model directory to load instead of a tiny random model")
    parser.add_argument("--path", help="where the cache is saved (default: a temporary directory, removed at exit)")
    parser.add_argument("--load-only", action="store_true", help="load the saved cache and continue the conversation")
    parser.add_argument("--max-new-tokens", type=int, default=12, help="tokens per reply (default: 12)")
    parser.add_argument("--capacity-mb", type=float, default=256.0, help="cache capacity in MiB (default: 256)")
    return parser.parse_args()


def conversation_file(path: Path) -> Path:
    """Where the conversation's token ids are kept next to the cache (the next turn must extend them exactly)."""
    return path.with_name(path.name + ".conversation.json")


def main() -> None:
    args = parse_args()
    if args.path is None:
        if args.load_only:
            raise SystemExit("--load-only needs --path, the file an earlier run saved")
        with tempfile.TemporaryDirectory() as scratch:
            run(args, Path(scratch) / "marconi_cache.safetensors")
    else:
        run(args, Path(args.path))


def run(args: argparse.Namespace, path: Path) -> None:
    model, tokenizer = load_model_and_tokenizer(args.model_path, args.family)
    capacity = int(args.capacity_mb * 2**20)
    settings = dict(max_new_tokens=args.max_new_tokens)
    if not args.load_only:
        pipe = MarconiPipeline(model, tokenizer, capacity_bytes=capacity, **settings)
        chat = pipe.chat(system="You are a calculator.")
        for message in MESSAGES[:2]:
            chat.send(message)
            print(f"turn: prompt {len(chat.last_prompt_ids)} tokens, {pipe.cache.last_call.reused} restored")
        manifest = save_cache(pipe.cache, path)
        conversation_file(path).write_text(json.dumps({"messages": chat.messages, "token_ids": chat.token_ids}))
        print(f"saved {manifest['counts']['nodes']} entries, {path.stat().st_size / 1024:.1f} KiB, to {path}")
    saved = json.loads(conversation_file(path).read_text())
    cache = MarconiCache(model, capacity_bytes=capacity)
    loaded = load_cache(cache, path)
    pipe = MarconiPipeline(model, tokenizer, cache=cache, **settings)
    chat = pipe.chat(messages=saved["messages"])
    chat.token_ids = saved["token_ids"]
    chat.send(MESSAGES[2])
    reply_ids_after_load = chat.last_reply_ids
    reused = cache.last_call.reused
    print(f"loaded {loaded} entries into a fresh cache; next turn: prompt {len(chat.last_prompt_ids)} tokens, "
          f"{reused} restored from the loaded cache")
    if reused == 0:
        raise SystemExit("the loaded cache gave no hit")
    if reply_ids_after_load != pipe.reference_ids(chat.last_prompt_ids):
        raise SystemExit("the reply after loading differs from uncached generation")
    reply = tokenizer.decode(reply_ids_after_load, skip_special_tokens=True)
    print("reply identical to uncached generation:", repr(reply))


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
