"""GPU tests: MarconiCache on the mamba-ssm / causal-conv1d kernel path, single-pass capture and async offload on CUDA.

Skipped without CUDA. On a CUDA machine they *fail* (not skip) when the kernels are not in use, so a run that
silently fell back to the torch paths cannot pass: install the ``cuda`` extra first (see README).

    pytest -q tests/gpu
"""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import DynamicCache

from hf_marconi.kernels import StateMover, capture_branch_states, kernel_report, supports_single_pass
from hf_marconi.states import StateCheckpoint, StateLayout
from hf_marconi.testing import family_spec

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (and the `cuda` extra: mamba-ssm, causal-conv1d)"
)

# Shapes the kernels accept comfortably (channel counts multiple of 8, head_dim 64, several 64-token scan chunks
# in a prompt), still small enough to build in a second.
_GPU_SHAPES = {
    "bamba": dict(hidden_size=256, mamba_n_heads=8, mamba_d_head=64, mamba_d_state=64, mamba_chunk_size=64,
                  intermediate_size=512),
    "nemotron_h": dict(hidden_size=256, mamba_num_heads=8, mamba_head_dim=64, ssm_state_size=64, chunk_size=64,
                       intermediate_size=512, head_dim=64),
    # One expert: a top-1 router flips on a rounding-level difference and turns it into a large one.
    "jamba": dict(hidden_size=256, mamba_d_state=16, mamba_dt_rank=16, intermediate_size=512, num_experts=1),
}
# Relative tolerance on logits (max |cached - uncached| / max |uncached|) and the top-1 margin below which a
# different greedy token is a tie at this precision rather than an error.
_TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 5e-3}
NEW_TOKENS = 8


def build_gpu_model(family: str, dtype: torch.dtype):
    spec = family_spec(family)
    config = getattr(transformers, spec.config_class)(**{**spec.config_kwargs, **_GPU_SHAPES[family]})
    config._experts_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = getattr(transformers, spec.model_class)(config)
    return model.to(device="cuda", dtype=dtype).eval()


def _tokens(n: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 250, (1, n), generator=torch.Generator().manual_seed(seed)).cuda()


def _assert_greedy_agrees(cached, reference, tolerance: float) -> None:
    """Tokens equal step by step; a different token is accepted only where the reference's top-1 / top-2 logits
    are within the dtype tolerance (a tie), and then the sequences may diverge, so comparison stops there."""
    for step, (cached_logits, reference_logits) in enumerate(zip(cached.logits, reference.logits)):
        scale = reference_logits.float().abs().max().item()
        error = (cached_logits.float() - reference_logits.float()).abs().max().item()
        assert error <= tolerance * scale, f"step {step}: logits differ by {error:.3g} (scale {scale:.3g})"
        top2 = reference_logits.float().topk(2, dim=-1).values[0]
        chosen_cached, chosen_reference = cached_logits.argmax(-1), reference_logits.argmax(-1)
        if not torch.equal(chosen_cached, chosen_reference):
            margin = (top2[0] - top2[1]).item()
            assert margin <= 2 * tolerance * scale, f"step {step}: greedy token differs with a margin of {margin:.3g}"
            return


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("family", ["bamba", "nemotron_h", "jamba"])
def test_cached_generation_matches_uncached_with_kernels(family, dtype):
    from hf_marconi import MarconiCache

    model = build_gpu_model(family, dtype)
    cache = MarconiCache(model, capacity_bytes=1 << 30)
    report = kernel_report(model)
    assert report.kernels_in_use, f"the kernels are not in use:\n{report}"

    settings = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                    return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
    system = _tokens(150, seed=1)  # shared by every request: a purely-input branch point from the 3rd occurrence
    prompts = [torch.cat([system, _tokens(40 + 7 * i, seed=10 + i)], dim=1) for i in range(3)]
    history = None
    for i, prompt in enumerate(prompts + [None]):
        if prompt is None:  # the next turn of the first conversation: input + output reuse
            prompt = torch.cat([history, _tokens(23, seed=99)], dim=1)
        cached = model.generate(prompt, past_key_values=cache, **settings)
        reference = model.generate(prompt, past_key_values=DynamicCache(config=model.config), **settings)
        _assert_greedy_agrees(cached, reference, _TOLERANCE[dtype])
        if i == 0:
            history = cached.sequences
    stats = cache.stats()
    assert stats["hits"] >= 2 and stats["hit_tokens"] > system.shape[1], stats
    cache.check_invariants()


@pytest.mark.parametrize("family", ["bamba", "nemotron_h"])
def test_single_pass_capture_matches_two_pass_with_kernels(family):
    dtype = torch.bfloat16
    model = build_gpu_model(family, dtype)
    assert kernel_report(model).kernels_in_use
    ids = _tokens(300, seed=3)
    length, branch = ids.shape[1], 131  # off the 64-token chunk grid

    def forward(cache, chunk, start):
        positions = torch.arange(start, start + chunk.shape[1], device="cuda").unsqueeze(0)
        with torch.no_grad():
            return model(input_ids=chunk, past_key_values=cache, position_ids=positions, use_cache=True).logits

    single = DynamicCache(config=model.config)
    layout = StateLayout.of(single)
    assert supports_single_pass(model, layout)
    with capture_branch_states(model, single, 0, length, [branch]) as capture:
        single_logits = forward(single, ids, 0)
    two_pass = DynamicCache(config=model.config)
    first = forward(two_pass, ids[:, :branch], 0)
    expected = layout.take_checkpoint(two_pass)
    second = forward(two_pass, ids[:, branch:], branch)

    def relative(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)).item()

    got = capture.checkpoints[branch].tensors()
    for name, tensor in expected.tensors().items():
        assert relative(got[name], tensor) <= _TOLERANCE[dtype], name
    for name, tensor in layout.take_checkpoint(two_pass).tensors().items():
        assert relative(layout.take_checkpoint(single).tensors()[name], tensor) <= _TOLERANCE[dtype], name
    assert relative(single_logits, torch.cat([first, second], dim=1)) <= _TOLERANCE[dtype]


def _cuda_checkpoint() -> StateCheckpoint:
    return StateCheckpoint(
        conv={(0, 0): torch.randn(1, 640, 4, device="cuda", dtype=torch.bfloat16)},
        recurrent={(0, 0): torch.randn(1, 8, 64, 64, device="cuda", dtype=torch.bfloat16)},
    )


def test_offload_and_prefetch_never_synchronise_the_host():
    mover = StateMover(storage_device="cpu")
    assert mover.pin_memory
    source = _cuda_checkpoint()
    expected = {name: t.cpu() for name, t in source.tensors().items()}
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host-device synchronisation raises from here on
    try:
        stored = mover.offload(source)
        back = mover.prefetch(stored.payload, "cuda")
        restored = back.wait()
        doubled = {name: t * 2 for name, t in restored.tensors().items()}  # GPU work ordered after the copy
    finally:
        torch.cuda.set_sync_debug_mode("default")
    stored_values = stored.synchronize()
    assert all(t.is_pinned() for t in stored_values.tensors().values())
    for name, tensor in expected.items():
        assert torch.equal(stored_values.tensors()[name], tensor)
        assert torch.equal(doubled[name].cpu(), tensor * 2)


def test_offload_keeps_values_when_the_source_is_freed_and_reused():
    mover = StateMover(storage_device="cpu")
    source = _cuda_checkpoint()
    expected = {name: t.cpu() for name, t in source.tensors().items()}
    pending = mover.offload(source)
    del source
    scribble = [torch.full((1, 8, 64, 64), 7.0, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
    stored = pending.synchronize()
    assert scribble[0].sum().item() != 0
    for name, tensor in expected.items():
        assert torch.equal(stored.tensors()[name], tensor)
