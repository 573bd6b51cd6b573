"""An agent loop whose context grows every step: input-and-output reuse.

Each step's prompt is the whole trajectory so far (the task, every earlier action the model generated and every
tool observation) plus the newest observation. Marconi checkpoints the state after each generated action, so the
next step restores everything but the new observation and the model reads only that.

    python examples/agent_loop.py                                # tiny random Bamba, 6 steps
    python examples/agent_loop.py --steps 20 --check
    python examples/agent_loop.py --model-path /path/to/local/model
"""

from __future__ import annotations

import argparse
import random

import torch

from hf_marconi.pipeline import MarconiPipeline, load_model_and_tokenizer
from hf_marconi.testing import FAMILIES

TASK = "Task: find the failing test in the repository and fix it. Think, then call one tool per step.\n"
TOOLS = ["ls tests/", "cat tests/test_io.py", "pytest -x tests/test_io.py", "grep -n parse src/io.py"]


def observation(step: int, rng: random.Random) -> str:
    """A made-up tool result of a few lines (an agent would run the tool the model asked for)."""
    lines = [f"{rng.choice(TOOLS)}: line {rng.randint(1, 400)} ok" for _ in range(rng.randint(1, 4))]
    return f"\nObservation {step}:\n" + "\n".join(lines) + "\nAction:"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="bamba", choices=FAMILIES, help="tiny zoo model (default: bamba)")
    parser.add_argument("--model-path", help="a local model directory to load instead of a tiny random model")
    parser.add_argument("--steps", type=int, default=6, help="agent steps (default: 6)")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="tokens per action (default: 16)")
    parser.add_argument("--capacity-mb", type=float, default=256.0, help="cache capacity in MiB (default: 256)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the made-up observations (default: 0)")
    parser.add_argument("--check", action="store_true", help="compare every action with uncached generation")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    model, tokenizer = load_model_and_tokenizer(args.model_path, args.family)
    pipe = MarconiPipeline(model, tokenizer, capacity_bytes=int(args.capacity_mb * 2**20),
                           max_new_tokens=args.max_new_tokens)
    rng = random.Random(args.seed)
    context = tokenizer(TASK, add_special_tokens=False)["input_ids"]  # exact ids: generated actions are kept as is
    for step in range(1, args.steps + 1):
        prompt = context + tokenizer(observation(step, rng), add_special_tokens=False)["input_ids"]
        action = pipe.generate_ids(prompt)
        reused = pipe.cache.last_call.reused
        print(f"step {step}: context {len(prompt):5d} tokens, {reused:5d} restored, {len(prompt) - reused:4d} read")
        if args.check and action != pipe.reference_ids(prompt):
            raise SystemExit(f"step {step}: cached and uncached actions differ")
        context = prompt + action
    stats = pipe.cache.stats()
    print(f"input+output hits {stats['hits_input_output']}/{stats['lookups']}, tokens reused {stats['hit_tokens']}/"
          f"{stats['input_tokens']} ({stats['token_hit_rate']:.0%})")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
