"""Every generate mode a transformers user passes, with a MarconiCache: equal to uncached generation, or refused up
front. Never a silent wrong token.

The mode matrix combines generate options with hypothesis over four families (a Mamba1 hybrid, a Mamba2 hybrid, a
gated-delta-net hybrid, pure Mamba2) and three situations of the cache (a miss, a hit on an earlier turn, and a call
that captures a branch-point state). Each numbered case of the generate-modes issue has its own test below.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import GenerationConfig
from transformers.generation.streamers import BaseStreamer

from hf_marconi import MarconiCache
from hf_marconi.pipeline import byte_level_tokenizer
from hf_marconi.testing import build_model

FAMILIES = ("jamba", "bamba", "qwen3_next", "mamba2")
SITUATIONS = ("miss", "hit", "branch")
CAPACITY = 32 * 2**20
BASE = dict(pad_token_id=0, eos_token_id=None)


class _Zoo(dict):
    def __repr__(self) -> str:  # keeps hypothesis' failure report readable
        return f"zoo({', '.join(self)})"


@pytest.fixture(scope="module")
def models():
    return _Zoo({family: build_model(family) for family in FAMILIES})


def _tokens(n: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 250, (1, n), generator=torch.Generator().manual_seed(seed))


class Recorder(BaseStreamer):
    """A streamer that keeps every tensor generate puts (the prompt first, then one token per step)."""

    def __init__(self) -> None:
        self.values: list[list[int]] = []
        self.ended = 0

    def put(self, value: torch.Tensor) -> None:
        self.values.append(value.flatten().tolist())

    def end(self) -> None:
        self.ended += 1


def _prepared(model, situation: str) -> tuple[MarconiCache, torch.Tensor]:
    """A fresh cache and a prompt that is a miss, a hit on a stored turn, or a capture at a branch point."""
    cache = MarconiCache(model, capacity_bytes=CAPACITY)
    greedy = dict(BASE, max_new_tokens=3, do_sample=False)
    if situation == "miss":
        return cache, _tokens(21, 1)
    if situation == "hit":
        first = model.generate(_tokens(18, 2), past_key_values=cache, **greedy)
        return cache, torch.cat([first, _tokens(5, 3)], dim=-1)
    system = _tokens(16, 4)
    model.generate(torch.cat([system, _tokens(6, 5)], dim=-1), past_key_values=cache, **greedy)
    return cache, torch.cat([system, _tokens(7, 6)], dim=-1)  # splits the stored edge: captured at 16


def _run(model, prompt: torch.Tensor, options: dict, cache=None, seed: int = 0):
    """generate with ``options`` (streamers made fresh), through ``cache`` or uncached; returns (output, streamed)."""
    options = dict(options)
    recorder = Recorder() if options.pop("streamer", False) else None
    if recorder is not None:
        options["streamer"] = recorder
    if cache is not None:
        options["past_key_values"] = cache
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "runs without reuse" notices
        output = model.generate(prompt, **options)
    return output, recorder


def _assert_same(cached, reference) -> None:
    (out, streamed), (ref, ref_streamed) = cached, reference
    sequences = out if isinstance(out, torch.Tensor) else out.sequences
    ref_sequences = ref if isinstance(ref, torch.Tensor) else ref.sequences
    assert torch.equal(sequences, ref_sequences)
    if not isinstance(out, torch.Tensor):
        for name in ("scores", "logits"):
            got, want = getattr(out, name, None), getattr(ref, name, None)
            assert (got is None) == (want is None), name
            for a, b in zip(got or (), want or ()):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    if streamed is not None:
        assert streamed.values == ref_streamed.values and streamed.ended == ref_streamed.ended == 1


@st.composite
def generate_options(draw) -> dict:
    options = dict(BASE)
    sampling = draw(st.booleans())
    options["do_sample"] = sampling
    if sampling:
        options.update(top_k=draw(st.sampled_from([0, 5])), temperature=draw(st.sampled_from([0.7, 1.0])))
        options["num_return_sequences"] = draw(st.sampled_from([1, 2]))
    length = draw(st.sampled_from(["max_new_tokens", "max_length"]))
    options["length_mode"] = length  # resolved against the prompt length in the test
    if draw(st.booleans()):
        options[draw(st.sampled_from(["min_length_extra", "min_new_tokens"]))] = 2
    if draw(st.booleans()):
        options["repetition_penalty"] = 1.3
    if draw(st.booleans()):
        options["no_repeat_ngram_size"] = 2
    if draw(st.booleans()):
        options["streamer"] = True
    if draw(st.booleans()):
        options.update(return_dict_in_generate=True, output_scores=True, output_logits=draw(st.booleans()))
        if draw(st.booleans()):
            options["output_hidden_states"] = True
    if draw(st.booleans()):
        options["use_cache"] = False
    if draw(st.booleans()):
        options["prefill_chunk_size"] = 8
    if draw(st.booleans()):
        options["stop_strings"] = ["\x7f"]
    options["as_generation_config"] = draw(st.booleans())
    return options


def _resolve(options: dict, prompt_length: int) -> dict:
    """Turn the drawn options into generate keywords for a prompt of ``prompt_length`` tokens."""
    options = dict(options)
    length_mode = options.pop("length_mode")
    if length_mode == "max_length":
        options["max_length"] = prompt_length + 4
    else:
        options["max_new_tokens"] = 4
    if options.pop("min_length_extra", None):
        options["min_length"] = prompt_length + 2
    if options.pop("as_generation_config"):
        config_keys = set(GenerationConfig().to_dict()) | {"max_length", "max_new_tokens"}
        config = {k: v for k, v in options.items() if k in config_keys and k != "streamer"}
        options = {k: v for k, v in options.items() if k not in config}
        options["generation_config"] = GenerationConfig(**config)
    config = options.get("generation_config")
    if options.get("stop_strings") or getattr(config, "stop_strings", None):
        options["tokenizer"] = byte_level_tokenizer()
    return options


# One option at a time, in every family and situation: each mode is covered whatever hypothesis draws below.
SINGLE_OPTIONS = {
    "greedy": {},
    "sampling": dict(do_sample=True, top_k=5, temperature=0.8),
    "num_return_sequences": dict(do_sample=True, num_return_sequences=2),
    "max_length": dict(length_mode="max_length"),
    "min_length": dict(min_length_extra=True),
    "min_new_tokens": dict(min_new_tokens=3),
    "repetition_penalty": dict(repetition_penalty=1.3),
    "no_repeat_ngram_size": dict(no_repeat_ngram_size=2),
    "stop_strings": dict(stop_strings=["\x7f"]),
    "streamer": dict(streamer=True),
    "scores_and_logits": dict(return_dict_in_generate=True, output_scores=True, output_logits=True),
    "hidden_states": dict(return_dict_in_generate=True, output_hidden_states=True, output_attentions=False),
    "use_cache_false": dict(use_cache=False),
    "generation_config": dict(as_generation_config=True, do_sample=True, repetition_penalty=1.2),
    "prefill_chunk_size": dict(prefill_chunk_size=8),
}


def _check_equals_uncached_or_refused(model, situation: str, drawn: dict) -> None:
    cache, prompt = _prepared(model, situation)
    options = _resolve(dict({"length_mode": "max_new_tokens", "as_generation_config": False}, **drawn, **BASE),
                       prompt.shape[1])
    try:
        reference = _run(model, prompt, options, seed=7)
    except ValueError as refused:  # a combination transformers itself refuses: so must the cached call
        before = (cache.store.nbytes, cache.stats()["commits"])
        with pytest.raises(ValueError):
            _run(model, prompt, options, cache=cache, seed=7)
        assert (cache.store.nbytes, cache.stats()["commits"]) == before, f"changed the store after: {refused}"
        return
    cached = _run(model, prompt, options, cache=cache, seed=7)
    _assert_same(cached, reference)
    cache.check_invariants()
    assert cache.store.nbytes <= cache.store.capacity_bytes


@pytest.mark.parametrize("option", SINGLE_OPTIONS)
@pytest.mark.parametrize("situation", SITUATIONS)
@pytest.mark.parametrize("family", FAMILIES)
def test_each_option_equals_uncached(models, family, situation, option):
    _check_equals_uncached_or_refused(models[family], situation, SINGLE_OPTIONS[option])


@pytest.mark.parametrize("situation", SITUATIONS)
@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=6, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(options=generate_options())
def test_option_combinations_equal_uncached(models, family, situation, options):
    _check_equals_uncached_or_refused(models[family], situation, {k: v for k, v in options.items() if k not in BASE})


def test_each_situation_really_is_what_it_claims(models):
    """Guards the matrix: 'hit' restores a stored prefix, 'branch' captures a state at the branch point."""
    for family in FAMILIES:
        model = models[family]
        for situation in SITUATIONS:
            cache, prompt = _prepared(model, situation)
            model.generate(prompt, past_key_values=cache, **BASE, max_new_tokens=2, do_sample=False)
            if situation == "hit":
                assert cache.last_call.reused > 0, family
            if situation == "branch":
                assert cache.last_call.plan.capture_positions == (16,), family


# ----------------------------------------------------------------------------------------- the numbered cases
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("how", ["keyword", "generation_config"])
def test_1_use_cache_false_equals_uncached_and_admits_nothing(models, family, how):
    model = models[family]
    cache, prompt = _prepared(model, "hit")
    before = cache.store.nbytes
    options = dict(BASE, max_new_tokens=4, do_sample=False)
    if how == "keyword":
        options["use_cache"] = False
    else:
        options["generation_config"] = GenerationConfig(use_cache=False, **options)
        options = {"generation_config": options["generation_config"]}
    out = model.generate(prompt, past_key_values=cache, **options)
    assert torch.equal(out, model.generate(prompt, **options))
    assert cache.store.nbytes == before and cache.stats()["bypassed_calls"] == 1


def test_5_pure_mamba2_hit_counts_the_whole_prompt(models):
    """generate sees the whole prompt on a hit: max_length, min_length and a prompt-echoing streamer count it."""
    model = models["mamba2"]
    cache, prompt = _prepared(model, "hit")
    recorder = Recorder()
    out = model.generate(prompt, past_key_values=cache, max_length=prompt.shape[1] + 5, streamer=recorder, **BASE)
    assert cache.last_call.reused > 0
    assert out.shape[1] == prompt.shape[1] + 5
    assert recorder.values[0] == prompt[0].tolist()
    assert torch.equal(out, model.generate(prompt, max_length=prompt.shape[1] + 5, **BASE))


@pytest.mark.parametrize("keyword", ["past_key_values", "cache", "cache_params"])
def test_6_pure_mamba2_request_with_any_keyword_admits_the_computed_state(models, keyword):
    """README's cache.request snippet on Mamba2ForCausalLM: whatever keyword the caller uses, the forward runs on the
    cache, and a later hit continues exactly."""
    model = models["mamba2"]
    cache = MarconiCache(model, capacity_bytes=CAPACITY)
    prompt = _tokens(20, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # cache_params is deprecated on 5.24
        with cache.request(prompt) as call:
            model(prompt[:, call.prefilled:], **{keyword: cache})
    longer = torch.cat([prompt, _tokens(4, 9)], dim=-1)
    out = model.generate(longer, past_key_values=cache, max_new_tokens=4, do_sample=False, **BASE)
    assert cache.last_call.reused == prompt.shape[1]
    assert torch.equal(out, model.generate(longer, max_new_tokens=4, do_sample=False, **BASE))


@pytest.mark.parametrize("change", ["load_state_dict", "optimizer_step", "bfloat16", "data_write"])
def test_7_changed_weights_drop_the_stored_states(change):
    model = build_model("bamba")
    cache = MarconiCache(model, capacity_bytes=CAPACITY)
    greedy = dict(BASE, max_new_tokens=4, do_sample=False)
    first = model.generate(_tokens(18, 10), past_key_values=cache, **greedy)
    if change == "load_state_dict":
        model.load_state_dict(build_model("bamba", seed=1).state_dict())
    elif change == "optimizer_step":
        model.train()
        loss = model(first, labels=first).loss
        loss.backward()
        torch.optim.SGD(model.parameters(), lr=0.5).step()
        model.eval()
    elif change == "bfloat16":
        model.to(torch.bfloat16)
    else:  # an adapter merged the way PEFT merges LoRA weights: through .data, invisible to the version counter
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, torch.nn.Linear):
                    module.weight.data += 0.05 * torch.randn_like(module.weight)
    prompt = torch.cat([first, _tokens(5, 11)], dim=-1)
    with pytest.warns(UserWarning, match="weights changed"):
        out = model.generate(prompt, past_key_values=cache, **greedy)
    assert cache.stats()["invalidations"] == 1 and cache.last_call.reused == 0
    assert torch.equal(out, model.generate(prompt, **greedy))
    # The states stored after the change are reused again.
    again = torch.cat([out, _tokens(3, 12)], dim=-1)
    assert torch.equal(model.generate(again, past_key_values=cache, **greedy), model.generate(again, **greedy))
    assert cache.last_call.reused > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_9_hidden_states_and_attentions_cover_the_whole_prompt(models, family):
    """Restored positions have no hidden states to return, so such calls run without reuse: the outputs equal
    uncached generation's, prompt positions included."""
    model = models[family]
    cache, prompt = _prepared(model, "hit")
    options = dict(BASE, max_new_tokens=2, do_sample=False, return_dict_in_generate=True, output_hidden_states=True)
    out = model.generate(prompt, past_key_values=cache, **options)
    ref = model.generate(prompt, **options)
    assert out.hidden_states[0][-1].shape[1] == prompt.shape[1]
    torch.testing.assert_close(out.hidden_states[0][-1], ref.hidden_states[0][-1], rtol=1e-4, atol=1e-4)
    assert cache.stats()["bypassed_calls"] == 1
