"""Many questions behind one shared system prompt and few-shot examples: purely-input reuse.

Every request is the same long prefix (instructions and worked examples) followed by a different question. Marconi
checkpoints the branch point where the questions part from the shared prefix during the prefill of the second
request, and from the third request on the prefix is restored from the cache instead of being read again.

    python examples/shared_prompt.py                             # tiny random Bamba
    python examples/shared_prompt.py --questions 20 --check
    python examples/shared_prompt.py --model-path /path/to/local/model
"""

from __future__ import annotations

import argparse

import torch

from hf_marconi.pipeline import MarconiPipeline, load_model_and_tokenizer
from hf_marconi.testing import FAMILIES

INSTRUCTIONS = "Answer each arithmetic question with the number only.\n\n"
FEW_SHOT = [("What is 2 + 3?", "5"), ("What is 7 - 4?", "3"), ("What is 6 * 2?", "12"), ("What is 9 / 3?", "3")]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="bamba", choices=FAMILIES, help="tiny zoo model (default: bamba)")
    parser.add_argument("--model-path", help="a local model directory to load instead of a tiny random model")
    parser.add_argument("--questions", type=int, default=8, help="questions to ask (default: 8)")
    parser.add_argument("--max-new-tokens", type=int, default=8, help="tokens per answer (default: 8)")
    parser.add_argument("--capacity-mb", type=float, default=256.0, help="cache capacity in MiB (default: 256)")
    parser.add_argument("--check", action="store_true", help="compare every answer with uncached generation")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    model, tokenizer = load_model_and_tokenizer(args.model_path, args.family)
    pipe = MarconiPipeline(model, tokenizer, capacity_bytes=int(args.capacity_mb * 2**20),
                           max_new_tokens=args.max_new_tokens)
    prefix = INSTRUCTIONS + "".join(f"Q: {q}\nA: {a}\n\n" for q, a in FEW_SHOT)
    prefix_ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    print(f"shared prefix: {len(prefix_ids)} tokens")
    for index in range(args.questions):
        question = f"Q: What is {index + 3} + {2 * index + 1}?\nA:"
        prompt = prefix_ids + tokenizer(question, add_special_tokens=False)["input_ids"]
        answer = pipe.generate_ids(prompt)
        reused = pipe.cache.last_call.reused
        print(f"question {index + 1}: prompt {len(prompt)} tokens, {reused:3d} restored "
              f"({reused / len(prompt):4.0%}), answer {tokenizer.decode(answer, skip_special_tokens=True)!r}")
        if args.check and answer != pipe.reference_ids(prompt):
            raise SystemExit(f"question {index + 1}: cached and uncached answers differ")
    stats = pipe.cache.stats()
    print(f"purely-input hits {stats['hits_purely_input']}, tokens reused {stats['hit_tokens']}/"
          f"{stats['input_tokens']}, FLOPs saved {stats['flops_saved_fraction']:.0%}")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
