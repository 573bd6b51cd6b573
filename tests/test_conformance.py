"""Continuation conformance: resuming a forward from a populated cache gives the logits of one full forward.

For every family of the zoo and both float64 and float32: logits of one forward over a sequence equal the
logits of a forward over a prefix followed by a forward over the rest with the populated cache, for several
split points (1 token, off and on the scan chunk grid, a 1-token rest), and the single-token decode step
that follows agrees too.

Tolerances (relative: max |difference| / max |logit| over the compared positions):

- FLOAT64_RTOL = 1e-9 where the recurrent path computes in the model's dtype (attention, Jamba's Mamba1
  scan after hf_marconi's fix, LFM2's short convolution). Measured: <= 5e-16.
- FLOAT32_RTOL = 5e-5 for float32 models, and for float64 models on the paths transformers computes in
  float32 whatever the model dtype (the SSD chunk scan and the gated-delta-rule / KDA scans cast their
  inputs with ``.float()``; the Mamba1/Mamba2/delta-rule decode steps update the state in float32; flags
  ``scan_casts_to_float32`` / ``decode_casts_to_float32`` of ``hf_marconi.testing.FamilySpec``). A full
  forward and a continuation sum the same terms in a different order (other chunk boundaries, a state
  handed over between passes), so they differ by float32 rounding amplified through the layers. Measured
  on these models: <= 5.2e-6 in float32 and <= 5.5e-6 in float64-with-casts (Qwen3.5 worst); 5e-5 leaves a
  9x margin yet stays 10x below the smallest effect of a lost state (recurrent state of Falcon-H1: 6.5e-4;
  see ``test_tolerance_detects_a_lost_state``) and far below the transformers defects hf_marconi fixes
  (>= 7e-3).
"""

from __future__ import annotations

import inspect

import pytest
import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import LinearAttentionCacheLayerMixin

from conftest import skip_unless_available
from hf_marconi.conventions import INSTALLED
from hf_marconi.families import FAMILIES as FAMILY_RECORDS
from hf_marconi.support import apply_fixes
from hf_marconi.testing import ALL_FAMILIES, build_model, cache_keyword, family_spec

FLOAT64_RTOL = 1e-9
FLOAT32_RTOL = 5e-5
DTYPES = {"float64": torch.float64, "float32": torch.float32}
RECURRENT_FAMILIES = [family for family in ALL_FAMILIES if family_spec(family).recurrent_kind is not None]


ALL_FAMILY_PARAMS = skip_unless_available(ALL_FAMILIES)
RECURRENT_FAMILY_PARAMS = skip_unless_available(RECURRENT_FAMILIES)


def relative_error(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    return ((reference - candidate).abs().max() / reference.abs().max()).item()


def sequence_and_splits(family: str) -> tuple[torch.Tensor, list[int]]:
    """Token ids of two scan chunks and a bit, and split points: a 1-token prefix, splits off and on the chunk
    grid, and a split that leaves a 1-token rest. The last token is kept for the decode step."""
    chunk = family_spec(family).scan_chunk_size or 8
    length = 2 * chunk + 6
    ids = torch.randint(3, 256, (1, length), generator=torch.Generator().manual_seed(1))
    return ids, [1, 5, chunk, chunk + 3, length - 2]


def position_kwargs(model: PreTrainedModel, start: int, stop: int) -> dict[str, torch.Tensor]:
    """Explicit positions of tokens start..stop-1, under the keywords this model's forward accepts."""
    parameters = inspect.signature(model.forward).parameters
    positions = torch.arange(start, stop)
    kwargs = {}
    if "position_ids" in parameters:
        kwargs["position_ids"] = positions[None]
    if "cache_position" in parameters:
        kwargs["cache_position"] = positions
    return kwargs


@torch.no_grad()
def continuation_errors(
    model: PreTrainedModel, family: str, ids: torch.Tensor, full: torch.Tensor, split: int,
    explicit_positions: bool, between=None,
) -> tuple[float, float]:
    """Relative errors (prefix + rest, decode step) of a split forward against ``full``, the logits of one
    forward over ``ids``.

    Runs prefix ids[:, :split], rest ids[:, split:-1], then a decode step on the last token, all through one
    cache. ``between(cache)``, if given, runs after the prefix (to tamper with the cache).
    """
    cache_argument = cache_keyword(family)
    length = ids.shape[1]
    cache = DynamicCache(config=model.config)
    pieces = []
    for start, stop in ((0, split), (split, length - 1), (length - 1, length)):
        kwargs = position_kwargs(model, start, stop) if explicit_positions else {}
        pieces.append(model(ids[:, start:stop], **{cache_argument: cache}, use_cache=True, **kwargs).logits)
        if between is not None and stop == split:
            between(cache)
    continued = torch.cat(pieces[:2], dim=1)
    return relative_error(full[:, :-1], continued), relative_error(full[:, -1:], pieces[2])


@torch.no_grad()
def full_logits(model: PreTrainedModel, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits


def tolerances(family: str, dtype: torch.dtype) -> tuple[float, float]:
    """(multi-token continuation, decode step) tolerances; see the module docstring."""
    if dtype == torch.float32:
        return FLOAT32_RTOL, FLOAT32_RTOL
    spec = family_spec(family)
    return (
        FLOAT32_RTOL if spec.scan_casts_to_float32 else FLOAT64_RTOL,
        FLOAT32_RTOL if spec.decode_casts_to_float32 else FLOAT64_RTOL,
    )


def assert_conforms(model: PreTrainedModel, family: str, dtype: torch.dtype, explicit_positions: bool) -> None:
    ids, splits = sequence_and_splits(family)
    full = full_logits(model, ids)
    continuation_rtol, decode_rtol = tolerances(family, dtype)
    for split in splits:
        continuation, decode = continuation_errors(model, family, ids, full, split, explicit_positions)
        # A 1-token rest after a prefix runs the decode path.
        rest_is_one_token = split == ids.shape[1] - 2
        assert continuation <= (max(continuation_rtol, decode_rtol) if rest_is_one_token else continuation_rtol), f"split at {split}: continuation off by {continuation:.2e}"
        assert decode <= decode_rtol, f"split at {split}: decode step off by {decode:.2e}"


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("family", ALL_FAMILY_PARAMS)
def test_fixed_model_continues_exactly_with_default_arguments(family, dtype_name):
    """What a user gets: the model with hf_marconi's fixes, called without positions."""
    model = build_model(family, dtype=DTYPES[dtype_name])
    apply_fixes(model)
    assert_conforms(model, family, DTYPES[dtype_name], explicit_positions=False)


@pytest.mark.parametrize("family", ALL_FAMILY_PARAMS)
def test_fixed_model_continues_exactly_with_explicit_positions(family):
    """What hf_marconi's own forwards do: pass the positions of the continued tokens."""
    model = build_model(family, dtype=torch.float64)
    apply_fixes(model)
    assert_conforms(model, family, torch.float64, explicit_positions=True)


@pytest.mark.parametrize("kind", ["conv_states", "recurrent_states"])
@pytest.mark.parametrize("family", RECURRENT_FAMILY_PARAMS)
def test_tolerance_detects_a_lost_state(family, kind):
    """Zeroing the cached conv states, or the cached recurrent states, after the prefix breaks the continuation
    by more than 10x the float32 tolerance, so the conformance tests above catch a continuation that drops
    either (as transformers' Jamba drops its SSM state)."""
    if kind == "recurrent_states" and family_spec(family).recurrent_kind == "short_conv":
        pytest.skip(f"{family} keeps only a convolution window, no recurrent state")

    def forget(cache):
        for layer in cache.layers:
            if isinstance(layer, LinearAttentionCacheLayerMixin):
                for state in getattr(layer, kind).values():
                    if state is not None:
                        state.zero_()

    model = build_model(family, dtype=torch.float64)
    apply_fixes(model)
    ids, _ = sequence_and_splits(family)
    continuation, _ = continuation_errors(model, family, ids, full_logits(model, ids), 11, True, between=forget)
    assert continuation > 10 * FLOAT32_RTOL


# What transformers gets wrong without hf_marconi's fixes, release by release: each family record says which releases
# need each fix (Fix.broken_in); the unfixed model on the installed release must be wrong exactly there.
FIXED_FAMILIES = [pytest.param(name, fix, id=f"{name}-{fix.name}")
                  for name, record in FAMILY_RECORDS.items() for fix in record.fixes]


@torch.no_grad()
@pytest.mark.parametrize(("family", "fix"), FIXED_FAMILIES)
def test_unfixed_model_on_this_release_is_what_its_record_says(family, fix):
    """Jamba's multi-token continuation runs its selective scan from a zero state; Bamba's forward defaults
    position_ids to arange(seq_len). On a release whose record says the fix is needed, the unfixed model (called as a
    user calls it, without positions) continues wrongly by far more than the tolerance; on a release that fixed it,
    it conforms (and the fix is not installed: see test_fixes)."""
    model = build_model(family, dtype=torch.float64)
    ids, _ = sequence_and_splits(family)
    continuation, decode = continuation_errors(model, family, ids, full_logits(model, ids), 11, False)
    needed = fix.needed(INSTALLED)
    message = (f"transformers {INSTALLED}: unfixed {family} continuation off by {continuation:.1e} (decode "
               f"{decode:.1e}), but {fix.name}.broken_in = {fix.broken_in}; update the family record")
    if needed:
        assert continuation > 100 * FLOAT32_RTOL and decode > 100 * FLOAT32_RTOL, message
    else:
        continuation_rtol, decode_rtol = tolerances(family, torch.float64)
        assert continuation <= max(continuation_rtol, decode_rtol) and decode <= decode_rtol, message


def test_unfixed_bamba_is_exact_with_explicit_positions():
    """The cause of Bamba's defect is its position default alone: its Mamba layers continue exactly."""
    model = build_model("bamba", dtype=torch.float64)
    assert_conforms(model, "bamba", torch.float64, explicit_positions=True)
