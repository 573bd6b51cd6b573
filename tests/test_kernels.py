"""CPU tests of hf_marconi.kernels: single-pass branch capture, kernel detection, state offload.

Single-pass capture is checked against two-pass capture (the reference: one forward up to the branch point,
``take_checkpoint``, one forward after it) on the tiny float64 models of every family with splittable mixers. The
two agree to float64 rounding, because the mixers compute the same two segments. Both differ from one plain forward
over the whole range at float32 level: transformers' torch SSD and delta-rule scans compute in float32 even in a
float64 model, so any split of a scan moves its rounding (a one-token segment also takes the float32 decode path).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache
from transformers.integrations import use_kernel_func_from_hub_with_fallback

import pytest

from hf_marconi.kernels import (
    StateMover,
    capture_branch_states,
    kernel_report,
    map_payload,
    recurrent_mixers,
    single_pass_prefill,
    supports_single_pass,
)
from hf_marconi.kernels.__main__ import main as kernels_main
from hf_marconi.states import KVEdge, StateCheckpoint, StateLayout
from hf_marconi import conventions
from hf_marconi.families import FAMILIES, family_of
from hf_marconi.testing import DELTA_RULE_CHUNK_SIZE, SSD_CHUNK_SIZE, build_model, cache_keyword

SSD_FAMILIES = tuple(name for name, record in FAMILIES.items() if record.zoo.recurrent_kind == "mamba2")
DELTA_AND_CONV_FAMILIES = tuple(name for name, record in FAMILIES.items()
                                if record.zoo.recurrent_kind in ("gated_delta_net", "kimi_delta_attention", "short_conv"))
TWO_PASS_ATOL = 1e-10  # single pass vs two pass: the same computation, float64 rounding only
# ...except after a mixture-of-experts layer: its router's softmax runs in float32, so the 1e-16 differences from
# running attention / MLPs over [start, end) at once instead of in two pieces can flip a float32 rounding there.
MOE_FAMILIES = ("granitemoehybrid", "qwen3_next", "kimi_linear")
MOE_TWO_PASS_ATOL = 1e-6
PLAIN_ATOL = 2e-4  # vs one plain forward: float32 scan rounding (see the module docstring)

# (start, positions) over a prompt of 40 tokens: branch points on and off the SSD chunk grid (chunks of 8), from an
# empty and from a restored cache, one-token segments on either side, several positions in one pass, one at the end.
SSD_PROMPT_LEN = 40
SSD_CASES = [
    (0, (SSD_CHUNK_SIZE,)),
    (5, (23,)),
    (7, (8, SSD_PROMPT_LEN - 1)),
    (3, (11, 2 * SSD_CHUNK_SIZE, 29)),
    (3, (16, SSD_PROMPT_LEN)),
]
# The same over 150 tokens for the delta-rule scans (chunks of 64); the short convolution has no chunks.
DELTA_PROMPT_LEN = 150
DELTA_CASES = [
    (0, (DELTA_RULE_CHUNK_SIZE,)),
    (5, (70,)),
    (7, (8, DELTA_PROMPT_LEN - 1)),
    (3, (40, 2 * DELTA_RULE_CHUNK_SIZE, DELTA_PROMPT_LEN)),
]


def _forward(model, family: str, cache, ids: torch.Tensor, start: int) -> torch.Tensor:
    """Logits of a forward over ``ids`` at positions ``start..``, continuing ``cache``."""
    kwargs = {cache_keyword(family): cache, "use_cache": True}
    if not FAMILIES[family].pure_recurrent:
        kwargs["position_ids"] = torch.arange(start, start + ids.shape[1]).unsqueeze(0)
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


def _fresh_cache(model) -> DynamicCache:
    return DynamicCache(config=model.config.get_text_config(decoder=True))


def _max_diff(a: StateCheckpoint, b: StateCheckpoint) -> float:
    assert a.tensors().keys() == b.tensors().keys()
    return max((a.tensors()[name] - t).abs().max().item() for name, t in b.tensors().items())


def _kv_diff(a: DynamicCache, b: DynamicCache, layout: StateLayout) -> float:
    diffs = [0.0]
    for idx in layout.kv_layers:
        diffs.append((a.layers[idx].keys - b.layers[idx].keys).abs().max().item())
        diffs.append((a.layers[idx].values - b.layers[idx].values).abs().max().item())
    return max(diffs)


@pytest.fixture(scope="module", params=SSD_FAMILIES)
def ssd_model(request):
    return request.param, build_model(request.param, dtype=torch.float64)


@pytest.fixture(scope="module", params=DELTA_AND_CONV_FAMILIES)
def delta_model(request):
    return request.param, build_model(request.param, dtype=torch.float64)


@pytest.mark.parametrize("start,positions", SSD_CASES)
def test_single_pass_equals_two_pass_ssd(ssd_model, start, positions):
    _check_single_pass(*ssd_model, SSD_PROMPT_LEN, start, positions)


@pytest.mark.parametrize("start,positions", DELTA_CASES)
def test_single_pass_equals_two_pass_delta_rule_and_short_conv(delta_model, start, positions):
    _check_single_pass(*delta_model, DELTA_PROMPT_LEN, start, positions)


def _check_single_pass(family: str, model, prompt_len: int, start: int, positions: tuple[int, ...]) -> None:
    """Single pass vs two pass (to float64 rounding) and vs one plain forward (to float32 rounding)."""
    two_pass_atol = MOE_TWO_PASS_ATOL if family in MOE_FAMILIES else TWO_PASS_ATOL
    ids = torch.randint(3, 256, (1, prompt_len), generator=torch.Generator().manual_seed(start + sum(positions)))

    single = _fresh_cache(model)
    layout = StateLayout.of(single)
    assert supports_single_pass(model, layout)
    if start:
        _forward(model, family, single, ids[:, :start], 0)
    with capture_branch_states(model, single, start, prompt_len, positions) as capture:
        single_logits = _forward(model, family, single, ids[:, start:], start)

    two_pass = _fresh_cache(model)
    if start:
        _forward(model, family, two_pass, ids[:, :start], 0)
    expected, pieces, fed = {}, [], start
    for position in positions:
        if position > fed:
            pieces.append(_forward(model, family, two_pass, ids[:, fed:position], fed))
            fed = position
        expected[position] = layout.take_checkpoint(two_pass)
    if fed < prompt_len:
        pieces.append(_forward(model, family, two_pass, ids[:, fed:], fed))

    plain = _fresh_cache(model)
    if start:
        _forward(model, family, plain, ids[:, :start], 0)
    plain_logits = _forward(model, family, plain, ids[:, start:], start)

    inner = {p: c for p, c in expected.items() if p < prompt_len}
    assert set(capture.checkpoints) == set(inner)
    for position, checkpoint in inner.items():
        assert _max_diff(capture.checkpoints[position], checkpoint) <= two_pass_atol
    assert _max_diff(layout.take_checkpoint(single), layout.take_checkpoint(two_pass)) <= two_pass_atol
    assert _kv_diff(single, two_pass, layout) <= two_pass_atol
    torch.testing.assert_close(single_logits, torch.cat(pieces, dim=1), rtol=0, atol=two_pass_atol)

    assert _max_diff(layout.take_checkpoint(single), layout.take_checkpoint(plain)) <= PLAIN_ATOL
    assert _kv_diff(single, plain, layout) <= PLAIN_ATOL
    torch.testing.assert_close(single_logits, plain_logits, rtol=0, atol=PLAIN_ATOL)


def test_checkpoints_are_copies_shaped_like_take_checkpoint():
    model = build_model("bamba", dtype=torch.float64)
    cache = _fresh_cache(model)
    layout = StateLayout.of(cache)
    ids = torch.randint(3, 256, (1, 20))
    with capture_branch_states(model, cache, 0, 20, [9]) as capture:
        _forward(model, "bamba", cache, ids, 0)
    got, live = capture.checkpoints[9], layout.take_checkpoint(cache)
    assert {n: (t.shape, t.dtype) for n, t in got.tensors().items()} == {
        n: (t.shape, t.dtype) for n, t in live.tensors().items()
    }
    for idx in layout.linear_layers:
        assert got.recurrent[(idx, 0)].data_ptr() != cache.layers[idx].recurrent_states[0].data_ptr()
        assert got.conv[(idx, 0)].data_ptr() != cache.layers[idx].conv_states[0].data_ptr()


def test_mixers_are_restored_after_the_block_even_on_error():
    model = build_model("nemotron_h", dtype=torch.float64)
    mixers = recurrent_mixers(model)
    assert mixers and all(type(m) in family_of(model).mixer_classes() for m in mixers.values())
    cache = _fresh_cache(model)
    with pytest.raises(RuntimeError, match="got 5 tokens"):
        with capture_branch_states(model, cache, 0, 12, [6]):
            _forward(model, "nemotron_h", cache, torch.randint(3, 256, (1, 5)), 0)
    assert all("forward" not in vars(m) for m in mixers.values())

    # An instance-level forward that was there before (another wrapper) is put back, not dropped.
    mixer = next(iter(mixers.values()))
    calls = []
    original = mixer.forward

    def counting(*args, **kwargs):
        calls.append(args[0].shape[1] if args else kwargs["hidden_states"].shape[1])
        return original(*args, **kwargs)

    mixer.forward = counting
    cache = _fresh_cache(model)
    with capture_branch_states(model, cache, 0, 12, [5]):
        _forward(model, "nemotron_h", cache, torch.randint(3, 256, (1, 12)), 0)
    assert vars(mixer)["forward"] is counting
    assert calls == [5, 7]


@pytest.mark.parametrize("positions", [(), (0,), (13,), (4, 20)])
def test_capture_positions_are_validated(positions):
    model = build_model("mamba2", dtype=torch.float64)
    with pytest.raises(ValueError, match="must lie in"):
        with capture_branch_states(model, _fresh_cache(model), 0, 12, positions):
            pass


class _PrefixCacheDouble(DynamicCache):
    """The attributes of MarconiCache that ``single_pass_prefill`` reads, on a plain DynamicCache."""

    def __init__(self, model, family: str, storage_device=None):
        super().__init__(config=model.config.get_text_config(decoder=True))
        self.model = model
        self.layout = StateLayout.of(self)
        self.storage_device = storage_device
        self.keyword = cache_keyword(family)
        self.input_device = torch.device("cpu")

    def continuation_kwargs(self, start, end, device):
        return conventions.continuation_kwargs(self.model, self.keyword, self, start, end, device,
                                               positions=self.layout.has_attention)


@pytest.mark.parametrize("family", ["jamba", "llama"])
def test_families_without_splittable_mixers_fall_back(family):
    model = build_model(family, dtype=torch.float32)
    forwards = []
    model.register_forward_pre_hook(lambda *_: forwards.append(1))
    cache = _PrefixCacheDouble(model, family)
    assert not supports_single_pass(model, cache.layout)
    assert single_pass_prefill(cache, torch.randint(3, 256, (1, 12)), 0, [6]) is None
    assert forwards == []


@pytest.mark.parametrize("family", ["bamba", "mamba2"])
def test_single_pass_prefill_returns_two_pass_checkpoints(family):
    model = build_model(family, dtype=torch.float64)
    ids = torch.randint(3, 256, (1, 30), generator=torch.Generator().manual_seed(1))
    cache = _PrefixCacheDouble(model, family, storage_device="cpu")
    _forward(model, family, cache, ids[:, :4], 0)
    checkpoints = single_pass_prefill(cache, ids, 4, [17, 30])
    assert set(checkpoints) == {17, 30}

    reference = _fresh_cache(model)
    _forward(model, family, reference, ids[:, :4], 0)
    _forward(model, family, reference, ids[:, 4:17], 4)
    assert _max_diff(checkpoints[17], cache.layout.take_checkpoint(reference)) <= TWO_PASS_ATOL
    _forward(model, family, reference, ids[:, 17:], 17)
    assert _max_diff(checkpoints[30], cache.layout.take_checkpoint(reference)) <= TWO_PASS_ATOL
    assert _max_diff(cache.layout.take_checkpoint(cache), cache.layout.take_checkpoint(reference)) <= TWO_PASS_ATOL
    assert all(t.device.type == "cpu" for c in checkpoints.values() for t in c.tensors().values())


# ------------------------------------------------------------------------------------------- kernel detection
def test_report_on_cpu_names_the_torch_fallbacks():
    report = kernel_report(build_model("bamba"))
    functions = {use.function for use in report.uses}
    assert {"mamba_chunk_scan_combined", "causal_conv1d_fn", "selective_state_update"} <= functions
    assert all(use.layers == (0, 2) and use.mixer == "BambaMixer" for use in report.uses)
    assert report.fallbacks == report.uses and not report.kernels_in_use
    assert {p.name for p in report.packages} == {"mamba_ssm", "causal_conv1d"}
    assert "torch fallbacks in use" in str(report)


def test_report_of_a_pure_attention_model_is_empty():
    report = kernel_report(build_model("llama"))
    assert report.uses == () and not report.kernels_in_use


# A mixer whose "kernel" resolves, exactly as transformers resolves mamba-ssm, to an importable package function.
@use_kernel_func_from_hub_with_fallback("sqrt", "math")
def _fake_kernel(x):
    return x.sqrt()


class _FakeMixer(nn.Module):
    def __init__(self, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.proj = nn.Linear(2, 2)

    def forward(self, x):
        return _fake_kernel(F.relu(self.proj(x)))


def test_report_names_a_resolved_kernel():
    model = nn.Sequential(_FakeMixer(0), _FakeMixer(1))
    report = kernel_report(model)
    assert len(report.uses) == 1
    use = report.uses[0]
    assert (use.mixer, use.layers, use.function, use.package) == ("_FakeMixer", (0, 1), "sqrt", "math")
    assert use.is_kernel and use.implementation.startswith("math.")
    assert not report.fallbacks
    assert not report.kernels_in_use  # a kernel, but the model sits on the CPU


def test_cli_reports_and_strict_mode_fails_without_kernels(capsys):
    assert kernels_main(["--family", "mamba2", "--dtype", "float32", "--device", "cpu"]) == 0
    assert "[mamba2] Mamba2ForCausalLM on cpu" in capsys.readouterr().out
    assert kernels_main(["--family", "mamba2", "--dtype", "float32", "--device", "cpu", "--strict"]) == 1


# ------------------------------------------------------------------------------------------------- offload
def _checkpoint() -> StateCheckpoint:
    return StateCheckpoint(
        conv={(0, 0): torch.randn(1, 6, 4)},
        recurrent={(0, 0): torch.randn(1, 2, 3, 5)},
        windows={3: (torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8), 17)},
    )


def test_offload_on_cpu_gives_ready_independent_copies():
    mover = StateMover()
    assert not mover.pin_memory
    source = _checkpoint()
    pending = mover.offload(source)
    assert pending.is_ready()
    moved = pending.wait()
    assert moved.windows[3][2] == 17
    for name, tensor in source.tensors().items():
        assert torch.equal(moved.tensors()[name], tensor)
        assert moved.tensors()[name].data_ptr() != tensor.data_ptr()
    source.recurrent[(0, 0)].add_(1.0)
    assert not torch.equal(moved.recurrent[(0, 0)], source.recurrent[(0, 0)])
    assert pending.synchronize() is moved


def test_prefetch_on_cpu_copies_an_edge():
    edge = KVEdge(4, {1: (torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8))})
    pending = StateMover().prefetch(edge, "cpu")
    assert pending.is_ready()
    moved = pending.wait()
    assert moved.num_tokens == 4 and moved.nbytes == edge.nbytes
    assert torch.equal(moved.kv[1][0], edge.kv[1][0]) and moved.kv[1][0].data_ptr() != edge.kv[1][0].data_ptr()


def test_map_payload_keeps_structure_and_refuses_other_types():
    doubled = map_payload(_checkpoint(), lambda t: torch.zeros(2))
    assert set(doubled.conv) == {(0, 0)} and doubled.windows[3][2] == 17
    with pytest.raises(TypeError, match="StateCheckpoint or a KVEdge"):
        map_payload({"a": torch.zeros(1)}, lambda t: t)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised on a machine without CUDA")
def test_pinned_memory_needs_cuda():
    with pytest.raises(ValueError, match="needs CUDA"):
        StateMover(pin_memory=True)


def test_a_kernel_whose_extension_is_missing_is_reported_broken(monkeypatch):
    from hf_marconi.kernels import detect

    monkeypatch.setitem(detect._NEEDS_EXTENSION, ("math", "sqrt"), "hf_marconi_no_such_extension")
    report = kernel_report(nn.Sequential(_FakeMixer(0)))
    assert report.broken == report.uses
    assert report.uses[0].missing_extension == "hf_marconi_no_such_extension"
    assert "BROKEN" in str(report) and not report.kernels_in_use


# ------------------------------------------------------------------------------------------ GPU benchmark smoke
def test_bench_gpu_smoke_mode_writes_its_record(tmp_path):
    import json

    from eval.bench_gpu import main as bench_main

    argv = ["--preset", "tiny", "--device", "cpu", "--dtype", "float32", "--lengths", "40", "--repeats", "1",
            "--sessions", "2", "--turns", "2", "--system-len", "16", "--user-len", "6", "--new-tokens", "3",
            "--out", str(tmp_path)]
    assert bench_main(argv) == 0
    record = json.loads((tmp_path / "bench_gpu.json").read_text())
    assert record["environment"]["command"].startswith("python -m eval.bench_gpu --preset tiny")
    assert record["environment"]["device"].startswith("CPU")
    results = record["results"]
    assert set(results) == {"ttft", "copy", "capture", "replay"}
    ttft = results["ttft"]["40"]
    assert ttft["hit_tokens_per_request"] == 36  # the 90% prefix, restored from the checkpoint the first call left
    assert results["copy"]["40"]["checkpoint_bytes"] > 0 and results["copy"]["40"]["kv_bytes"] > 0
    assert results["capture"]["40"]["branch"] == 21
    replay = results["replay"]
    assert replay["identical_outputs"] == replay["requests"] == 4
    assert replay["cache_stats"]["hits"] > 0
    assert "## Branch-point capture" in (tmp_path / "bench_gpu.md").read_text()


def test_single_pass_prefill_on_a_marconi_cache():
    from hf_marconi import MarconiCache

    model = build_model("nemotron_h", dtype=torch.float64)
    cache = MarconiCache(model, capacity_bytes=1 << 24)
    ids = torch.randint(3, 256, (1, 27), generator=torch.Generator().manual_seed(2))
    cache.reset_live()
    checkpoints = single_pass_prefill(cache, ids, 0, [13])
    assert cache.live_tokens == ids[0].tolist()  # the cache's forward hooks saw one forward over the prompt
    reference = _fresh_cache(model)
    _forward(model, "nemotron_h", reference, ids[:, :13], 0)
    assert _max_diff(checkpoints[13], cache.layout.take_checkpoint(reference)) <= TWO_PASS_ATOL
    cache.reset_live()


def test_report_summary_says_why_kernels_are_not_in_use():
    assert "no kernel-backed functions" in str(kernel_report(build_model("llama")))
    summary = kernel_report(nn.Sequential(_FakeMixer(0))).summary
    assert summary == "kernels resolved, but the model is not on a CUDA device"


def test_gpu_check_script_smoke_mode_runs_every_step(tmp_path):
    """The one prepared script for a GPU lease (eval/gpu_check.py), in its CPU smoke mode: every step runs within its
    budget and the summary names each command and outcome."""
    import json

    from eval.gpu_check import main as gpu_check

    assert gpu_check(["--smoke", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [step["name"] for step in summary["steps"]] == ["kernels", "gpu_tests", "bench"]
    assert all(step["status"] == "ok" and step["wall_s"] <= step["budget_s"] for step in summary["steps"])
    assert (tmp_path / "bench_gpu" / "bench_gpu.json").exists()
    assert "skipped" in (tmp_path / "gpu_tests.log").read_text()
