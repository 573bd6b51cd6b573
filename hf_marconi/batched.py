"""Batched ``generate`` with reuse: each row of a left-padded batch looks up and restores its own stored prefix.

How a call with several rows (or one padded row, or ``num_return_sequences > 1``) runs:

1. **Each row alone** (its tokens without the padding), in batch order: lookup, restore, branch-point capture and a
   prefill up to its last prompt token, exactly as a batch-1 call prepares. The positions where a row branches off the
   later rows of the batch count as branch points, and each row's captured checkpoints are admitted at once, so a
   later row of the same batch (few-shot queries sharing their examples) restores the shared prefix instead of
   prefilling it again. The row's KV and fixed-size states are copied aside.
2. **One batched cache**: the rows' states are written side by side, attention KV left-padded to the longest row
   (the call's attention mask already covers the padding), recurrent and conv states stacked; with
   ``num_return_sequences`` each row's states are repeated as generate repeats the row. Transformers' ``generate``
   then sees a cache holding all but the last prompt column and decodes the batch as usual.
3. **Each row's continuation is admitted** as a batch-1 call admits it (its KV and the end checkpoint), read from its
   row of the batched cache. A row that stopped early (EOS or a stop string) was fed padding afterwards, so its final
   states are not those of its tokens: only its prompt's entries (step 1) are kept.

Why rows are prepared one by one rather than as one padded prefill: a recurrent state cannot skip padding placed
between a restored prefix and the rest of the prompt (the mixer would advance its state over the pads), so rows
whose restored prefixes differ in length can only be aligned once each holds all but its last prompt token.

Models without attention layers (their cache counts no tokens per row) and models with sliding-window layers run
batches without reuse, as do attention masks with right padding or holes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch
from transformers import GenerationConfig

from . import conventions
from .generation import CacheSalt, CallRecord, CallTimings, PrefixCall, prefill_live, store_key
from .states import KVEdge, StateCheckpoint
from .store import branch_points

if TYPE_CHECKING:
    from .cache import MarconiCache


def left_padded_rows(input_ids: torch.Tensor, mask: torch.Tensor | None) -> list[list[int]] | None:
    """Each row's tokens without its left padding (``mask`` None: no padding); None when a row's mask is not zeros
    followed by ones (right padding, holes, an empty row)."""
    if mask is None:
        return [row.tolist() for row in input_ids]
    rows = []
    for ids, row_mask in zip(input_ids, mask.to(torch.bool)):
        length = int(row_mask.sum())
        if length == 0 or not bool(row_mask[row_mask.shape[0] - length :].all()):
            return None
        rows.append(ids[ids.shape[0] - length :].tolist())
    return rows


def why_not_batched(cache: "MarconiCache", rows: list[list[int]] | None) -> str | None:
    """Why a batched call cannot reuse per row (None when it can)."""
    if cache.pure_recurrent:
        return "a batch or padding on a model without attention layers (its cache counts no tokens per row)"
    if cache.layout.window_layers:
        return "a batch or padding on a model with sliding-window layers"
    if rows is None:
        return "right padding or holes in the attention mask (only left padding is reused per row)"
    return None


@dataclass
class _PreparedRow:
    """One row after step 1: its call (lookup and capture, already admitted) and its states at its last prompt token
    (None for a one-token prompt, which has none)."""

    call: PrefixCall
    states: tuple[KVEdge, StateCheckpoint] | None


def _prepare_row(cache: "MarconiCache", prompt: list[int], later: list[list[int]],
                 salt: CacheSalt | None) -> _PreparedRow:
    """Step 1 for one row: lookup, restore, capture, prefill to the last prompt token, admit the captures, copy the
    states aside."""
    ids = torch.tensor([prompt])
    # Where it branches off the later rows (the earlier ones are in the store already).
    branches = branch_points(prompt, later, cache.store.policy.max_new_checkpoints)
    call = PrefixCall.begin(cache, ids, salt, also_branches_at=branches)
    end = len(prompt) - 1
    try:
        if call.prefilled < end:
            prefill_live(cache, ids[:, call.prefilled : end], start=call.prefilled)
            call.prefilled = end
        states = None
        if end > 0:
            states = (cache.layout.take_edge(cache, 0, end), cache.layout.take_checkpoint(cache))
    except BaseException:
        call.abort()
        raise
    call.admit_prompt()
    return _PreparedRow(call, states)


def _fed_padding(new_tokens: list[int], config: GenerationConfig) -> bool:
    """Whether generate fed a row padding after it finished (EOS or a stop string): its new tokens end in two or more
    pad ids (the last new token is never fed). Such a row's states are still exactly those of the tokens it was fed,
    pads included (generate feeds them unmasked), but no request would continue from them: its continuation is not
    admitted. A row that produced pad ids itself is treated alike; admitting less is never wrong."""
    pads = set(conventions.token_ids(config.pad_token_id)) or set(conventions.token_ids(config.eos_token_id))
    return len(new_tokens) >= 2 and new_tokens[-1] in pads and new_tokens[-2] in pads


def _admit_continuation(cache: "MarconiCache", prompt: list[int], new_tokens: list[int], row: int, pad: int,
                        salt: CacheSalt | None, generation: int) -> float:
    """Step 3 for one row of the batched cache (its tokens start at cache position ``pad``); returns the seconds.
    Nothing is admitted when the store is no longer at ``generation`` (that of the row's lookup): a clear means the
    states may belong to weights that changed."""
    started = time.perf_counter()
    tokens = prompt + new_tokens[:-1]  # the last new token was never fed
    plan = cache.store.plan(store_key(salt, prompt), count=False)
    if plan.generation != generation:  # the store was cleared (or the weights changed) while the batch decoded
        cache.store.abort(plan)
        return 0.0
    checkpoints = {}
    if len(tokens) in cache.store.checkpoint_positions(plan, len(tokens)):
        checkpoints[len(tokens)] = cache.layout.take_checkpoint(cache, cache.storage_device, row=row)

    def make_edge(start: int, stop: int) -> KVEdge:
        return cache.layout.take_edge(cache, pad + start, pad + stop, cache.storage_device, row=row)

    cache.store.commit(plan, store_key(salt, tokens), make_edge, checkpoints)  # releases the plan, also on errors
    return time.perf_counter() - started


def generate_rows(
    cache: "MarconiCache", original: Callable[..., Any], input_ids: torch.Tensor, rows: list[list[int]],
    args: tuple[Any, ...], kwargs: dict[str, Any], salt: CacheSalt | None, config: GenerationConfig,
) -> tuple[Any, CallRecord]:
    """Run a batched call (steps 1-3 above); returns generate's output and the call's record (one per prompt row in
    ``record.rows``)."""
    prepared = [_prepare_row(cache, prompt, rows[i + 1 :], salt) for i, prompt in enumerate(rows)]
    samples = config.num_return_sequences or 1
    width = input_ids.shape[1]
    cache.reset_live()
    cache.layout.restore_rows(cache, [p.states for p in prepared for _ in range(samples)], width - 1,
                              cache.layer_devices)
    cache.live_tokens = None  # several rows: the live layers no longer follow one token list
    cache.live.prompt = None
    output = original(input_ids, *args, **conventions.with_cache(kwargs, cache.keyword, cache))
    sequences = output if isinstance(output, torch.Tensor) else output.sequences
    admit_s = [0.0] * len(rows)
    for row in range(sequences.shape[0]):
        index = row // samples
        prompt, call = rows[index], prepared[index].call
        new_tokens = sequences[row, width:].tolist()
        if new_tokens and not _fed_padding(new_tokens, config):
            admit_s[index] += _admit_continuation(cache, prompt, new_tokens, row, width - len(prompt), call.salt,
                                                  call.plan.generation)
            call.record_to_trace(prompt + new_tokens[:-1])
        else:
            call.record_to_trace(prompt)
    records = []
    for p, extra_s in zip(prepared, admit_s):
        record = p.call.record()
        record.timings.admit_s += extra_s
        records.append(record)
    total = CallRecord(
        prompt_tokens=sum(r.prompt_tokens for r in records), reused_tokens=sum(r.reused_tokens for r in records),
        unresumable_tokens=sum(r.unresumable_tokens for r in records), hit_kind=None,
        timings=CallTimings(*(sum(getattr(r.timings, f) for r in records)
                              for f in ("lookup_s", "restore_s", "capture_s", "admit_s"))),
        rows=tuple(records),
    )
    return output, total
