"""Few-shot evaluation in batches: every row of a left-padded batch restores the shared examples from the cache.

An evaluation asks many questions behind the same few-shot examples, several at a time. With a MarconiCache each
row of a batch looks its prompt up on its own: in the first batch, the first row computes the examples and the others
restore them (their branch point is captured during the first row's prefill); later batches restore them in every row.

    python examples/batched_fewshot.py                           # tiny random Bamba, 3 batches of 4
    python examples/batched_fewshot.py --batches 2 --batch-size 8 --check
    python examples/batched_fewshot.py --model-path /path/to/local/model
"""

from __future__ import annotations

import argparse

import torch

from hf_marconi import MarconiCache
from hf_marconi.pipeline import load_model_and_tokenizer
from hf_marconi.testing import FAMILIES

FEW_SHOT = "".join(f"Q: What is {a} + {b}?\nA: {a + b}\n\n" for a, b in [(2, 3), (7, 4), (6, 2), (9, 3), (5, 8)])


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="bamba", choices=FAMILIES, help="tiny zoo model (default: bamba)")
    parser.add_argument("--model-path", help="a local model directory to load instead of a tiny random model")
    parser.add_argument("--batches", type=int, default=3, help="batches to run (default: 3)")
    parser.add_argument("--batch-size", type=int, default=4, help="questions per batch (default: 4)")
    parser.add_argument("--max-new-tokens", type=int, default=6, help="tokens per answer (default: 6)")
    parser.add_argument("--check", action="store_true", help="compare every batch with uncached generation")
    return parser.parse_args()


def left_padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(row)) + row for row in rows])
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows])
    return ids, mask


def main() -> None:
    args = parse_args()
    model, tokenizer = load_model_and_tokenizer(args.model_path, args.family)
    cache = MarconiCache(model, capacity_bytes=256 * 2**20)
    pad = tokenizer.pad_token_id
    settings = dict(max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=pad,
                    return_dict_in_generate=True)
    for batch in range(args.batches):
        questions = [f"Q: What is {batch * 10 + i} + {7 ** i}?\nA:" for i in range(args.batch_size)]  # of several lengths
        rows = [tokenizer(FEW_SHOT + q, add_special_tokens=False)["input_ids"] for q in questions]
        ids, mask = left_padded(rows, pad)
        out = model.generate(ids, attention_mask=mask, past_key_values=cache, **settings)
        reused = [record.reused_tokens for record in out.marconi_record.rows]
        print(f"batch {batch + 1}: {len(rows)} rows of {min(map(len, rows))}-{max(map(len, rows))} tokens, "
              f"restored per row {reused}")
        if args.check:
            reference = model.generate(ids, attention_mask=mask, **settings)  # transformers' own cache, no reuse
            if not torch.equal(out.sequences, reference.sequences):
                raise SystemExit(f"batch {batch + 1}: cached and uncached tokens differ")
    stats = cache.stats()
    print(f"tokens reused {stats['hit_tokens']}/{stats['input_tokens']} ({stats['token_hit_rate']:.0%}), "
          f"{stats['lookups']} lookups (one per row)")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
