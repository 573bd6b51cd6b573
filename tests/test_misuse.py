"""Ways to misuse a model with a MarconiCache installed: each works (same tokens as without the cache) or is refused
with a clear error before the model or the store changes. Never a wrong token."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from transformers.generation import GenerationMixin

from conftest import fresh_cache, run_in_threads
from hf_marconi import MarconiCache, MarconiCacheError, conventions
from hf_marconi.kernels import recurrent_mixers
from hf_marconi.testing import build_model

CAPACITY = 32 * 2**20
SETTINGS = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)


def _tokens(n: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 250, (1, n), generator=torch.Generator().manual_seed(seed))


def _uncached(model, prompt: torch.Tensor, **settings) -> torch.Tensor:
    return model.generate(prompt, **fresh_cache(model), **dict(SETTINGS, **settings))


def _store_view(cache: MarconiCache) -> tuple:
    return cache.store.nbytes, cache.stats()["lookups"], tuple(sorted(cache.store.tree.checkpointed_prefixes()))


@pytest.fixture()
def warmed():
    """A Bamba model and a cache holding one conversation turn."""
    model = build_model("bamba")
    cache = MarconiCache(model, capacity_bytes=CAPACITY)
    first = model.generate(_tokens(20, 1), past_key_values=cache, **SETTINGS)
    return model, cache, first


@pytest.mark.parametrize("keyword", ["past_key_values", "cache"])
def test_direct_generation_mixin_call_is_refused_before_anything_runs(warmed, keyword):
    """GenerationMixin.generate(model, ...) bypasses the instance's wrapper: without the guard it would continue the
    previous call's live states (wrong tokens, no error). It is refused before any forward runs."""
    model, cache, first = warmed
    before = _store_view(cache)
    forwards = []
    handle = model.register_forward_pre_hook(lambda *_: forwards.append(1))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # transformers' own notice for a past_key_values= call
            with pytest.raises(ValueError) as raised:
                GenerationMixin.generate(model, _tokens(9, 2), **{keyword: cache}, **SETTINGS)
    finally:
        handle.remove()
    # transformers before 5.24 refuses the unknown `cache` keyword itself; otherwise hf_marconi's guard refuses.
    if keyword == conventions.cache_keyword("past_key_values"):
        assert isinstance(raised.value, MarconiCacheError) and "model.generate" in str(raised.value)
    assert forwards == [] and _store_view(cache) == before
    prompt = torch.cat([first, _tokens(5, 3)], dim=-1)
    assert torch.equal(model.generate(prompt, past_key_values=cache, **SETTINGS), _uncached(model, prompt))


def test_num_return_sequences_after_a_hit_equals_uncached_sampling(warmed):
    model, cache, first = warmed
    prompt = torch.cat([first, _tokens(5, 4)], dim=-1)
    hit_tokens = cache.stats()["hit_tokens"]
    settings = dict(do_sample=True, num_return_sequences=2, max_new_tokens=5)
    torch.manual_seed(11)
    cached = model.generate(prompt, past_key_values=cache, **dict(SETTINGS, **settings))
    torch.manual_seed(11)
    assert torch.equal(cached, _uncached(model, prompt, **settings))
    stats = cache.stats()
    assert stats["bypassed_calls"] == 0, "the prompt's prefix is restored once and expanded"
    assert stats["hit_tokens"] - hit_tokens == first.shape[1] - 1  # the first turn, less its last (never fed) token


@pytest.mark.parametrize("how", ["forward", "module"])
def test_compiled_forward_is_refused_before_anything_runs(warmed, how):
    model, cache, _ = warmed
    before = _store_view(cache)
    if how == "forward":
        model.forward = torch.compile(model.forward)
    else:
        model.compile()
    with pytest.raises(ValueError, match="torch.compile"):
        model.generate(_tokens(9, 5), past_key_values=cache, **SETTINGS)
    assert _store_view(cache) == before


def _copies(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return {"deepcopy": copy.deepcopy(model), "torch.save": torch.load(buffer, weights_only=False)}


@pytest.mark.parametrize("family", ["bamba", "jamba"])  # both carry a per-instance fix
def test_copies_of_a_model_with_a_cache_generate_as_the_original(family, tmp_path):
    model = build_model(family)
    cache = MarconiCache(model, capacity_bytes=CAPACITY)
    prompt = _tokens(14, 6)
    first = model.generate(prompt, past_key_values=cache, **SETTINGS)
    model.save_pretrained(tmp_path)  # works with the hooks and wrappers installed
    assert (tmp_path / "config.json").exists()
    for name, duplicate in _copies(model).items():
        assert duplicate.generate.owner is duplicate, name
        assert torch.equal(duplicate.generate(prompt, **SETTINGS), first), name
        with pytest.raises(MarconiCacheError, match="another model instance"):
            duplicate.generate(prompt, past_key_values=cache, **SETTINGS)
        # The copy's fixes patch the copy: a cache of its own continues exactly.
        own = MarconiCache(duplicate, capacity_bytes=CAPACITY)
        duplicate.generate(prompt, past_key_values=own, **SETTINGS)
        longer = torch.cat([first, _tokens(4, 7)], dim=-1)
        assert torch.equal(duplicate.generate(longer, past_key_values=own, **SETTINGS), _uncached(model, longer))
        assert own.stats()["hits"] == 1, name


@pytest.mark.timeout(300)
def test_two_caches_on_one_model_in_two_threads_capture_without_interference():
    """Two caches of one model share its mixers; their calls run at once, each single-pass capture splits only its own
    thread's forward, and no split wrapper is left behind."""
    model = build_model("bamba")
    caches = [MarconiCache(model, capacity_bytes=CAPACITY) for _ in range(2)]
    system = _tokens(16, 8)
    outputs: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def worker(index: int) -> None:
        for turn in range(4):
            prompt = torch.cat([system, _tokens(6, 100 * index + turn)], dim=-1)
            outputs[(index, turn)] = (prompt, model.generate(prompt, past_key_values=caches[index], **SETTINGS))

    run_in_threads(worker, 2)
    for prompt, output in outputs.values():
        assert torch.equal(output, _uncached(model, prompt))
    assert all(cache.stats()["hits_purely_input"] >= 1 for cache in caches), "each cache captured its branch point"
    assert all("forward" not in vars(mixer) for mixer in recurrent_mixers(model).values())


@pytest.mark.parametrize("dispatch", ["cpu_offload", "dispatch_model"])
def test_models_dispatched_with_accelerate_reuse_and_match_uncached(dispatch):
    from accelerate import cpu_offload, dispatch_model

    model = build_model("bamba")
    reference = build_model("bamba")
    if dispatch == "cpu_offload":
        cpu_offload(model, execution_device=torch.device("cpu"))
        assert next(model.parameters()).device.type == "meta"
    else:
        dispatch_model(model, device_map={"": "cpu"})
    cache = MarconiCache(model, capacity_bytes=CAPACITY)
    sequence = _tokens(15, 9)
    for turn in range(3):
        prompt = torch.cat([sequence, _tokens(4, 20 + turn)], dim=-1) if turn else sequence
        sequence = model.generate(prompt, past_key_values=cache, **SETTINGS)
        assert torch.equal(sequence, _uncached(reference, prompt))
    assert cache.stats()["hits"] == 2


@pytest.mark.parametrize("keyword", ["past_key_values", "cache"])
def test_continuing_by_hand_from_the_returned_cache(warmed, keyword):
    """generate returns the MarconiCache holding the call's live states, as it returns a DynamicCache: a forward of
    the next token from it gives the logits of a full forward."""
    model, cache, first = warmed
    prompt = torch.cat([first, _tokens(5, 10)], dim=-1)
    output = model.generate(prompt, past_key_values=cache, return_dict_in_generate=True, **SETTINGS)
    returned = output.cache if hasattr(output, "cache") else output.past_key_values
    assert returned is cache and cache.get_seq_length() == output.sequences.shape[1] - 1
    with torch.no_grad():
        logits = model(output.sequences[:, -1:], **{keyword: returned}).logits[0, -1]
        full = model(output.sequences).logits[0, -1]
    torch.testing.assert_close(logits, full, rtol=1e-4, atol=1e-4)


def test_no_deprecation_warning_from_hf_marconi_calls(warmed):
    """Whatever spelling the caller uses, hf_marconi hands the cache to transformers under the installed release's
    keyword: no FutureWarning reaches the user from its generate, request, capture or forward calls."""
    model, cache, first = warmed
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        for keyword in ("past_key_values", "cache"):
            model.generate(torch.cat([first, _tokens(3, 12)], dim=-1), **{keyword: cache}, **SETTINGS)
            prompt = _tokens(18, 13)
            with cache.request(prompt) as call:
                model(prompt[:, call.prefilled:], **{keyword: cache})


# ------------------------------------------------------------------------------------------------ rough edges
def test_constructor_options_are_checked_with_the_fix_in_the_message():
    model = build_model("bamba")
    with pytest.raises(MarconiCacheError, match="alpha applies to policy='marconi' only"):
        MarconiCache(model, capacity_bytes=CAPACITY, policy="sglang+", alpha=0.5)
    if not torch.cuda.is_available():
        with pytest.raises(MarconiCacheError, match="needs CUDA"):
            MarconiCache(model, capacity_bytes=CAPACITY, storage_device="cuda")
    with pytest.raises(MarconiCacheError, match="whole number of bytes"):
        MarconiCache(model, capacity_bytes=1.5)
    assert MarconiCache(model, capacity_bytes=4e6).store.capacity_bytes == 4_000_000


def test_last_call_has_a_short_repr(warmed):
    model, cache, first = warmed
    model.generate(torch.cat([first, _tokens(300, 14)], dim=-1), past_key_values=cache, **SETTINGS)
    assert len(repr(cache.last_call)) < 400


def test_warnings_about_calls_without_reuse_come_once_per_reason(warmed):
    from hf_marconi import wrapper

    model, cache, _ = warmed
    batch = torch.cat([_tokens(6, 15), _tokens(6, 16)])
    right_padded = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    reason = "right padding or holes in the attention mask (only left padding is reused per row)"
    wrapper._WARN._seen.discard(reason)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            model.generate(batch, attention_mask=right_padded, past_key_values=cache, **SETTINGS)
    assert sum("without reuse" in str(w.message) for w in caught) == 1
    assert cache.stats()["bypassed_calls"] == 3


def test_loading_into_a_cache_that_holds_states_names_the_fix(warmed, tmp_path):
    from hf_marconi.persistence import PersistenceError, load_cache, save_cache

    model, cache, _ = warmed
    save_cache(cache, tmp_path / "c.safetensors")
    with pytest.raises(PersistenceError, match="empty MarconiCache.*cache.clear"):
        load_cache(cache, tmp_path / "c.safetensors")
    cache.clear()
    assert load_cache(cache, tmp_path / "c.safetensors") >= 1


def test_the_package_does_not_install_a_top_level_eval_module():
    import configparser
    from pathlib import Path

    config = configparser.ConfigParser()
    config.read(Path(__file__).resolve().parents[1] / "setup.cfg")
    included = config["options.packages.find"]["include"].split()
    assert included and all(name.startswith("hf_marconi") for name in included)


# --------------------------------------------------------------------------------- settings and nested calls
def test_settings_on_the_models_generation_config_or_a_positional_config_are_honoured(warmed):
    """The wrapper decides from the settings generate will run with: the model's generation_config, then a passed
    config (keyword or positional), then keywords. num_beams=2 from any of them is refused before anything runs."""
    from transformers import GenerationConfig

    model, cache, first = warmed
    before = _store_view(cache)
    prompt = torch.cat([first, _tokens(4, 17)], dim=-1)
    model.generation_config.num_beams = 2
    try:
        with pytest.raises(ValueError, match="beam search"):
            model.generate(prompt, past_key_values=cache, max_new_tokens=2)
    finally:
        model.generation_config.num_beams = 1
    for passed in ({"generation_config": GenerationConfig(num_beams=2, max_new_tokens=2)},):
        with pytest.raises(ValueError, match="beam search"):
            model.generate(prompt, past_key_values=cache, **passed)
    with pytest.raises(ValueError, match="beam search"):
        model.generate(prompt, GenerationConfig(num_beams=2, max_new_tokens=2), past_key_values=cache)
    assert _store_view(cache) == before


def test_pad_id_from_the_models_generation_config_is_seen_with_a_passed_config(warmed):
    """A prompt holding the pad id, no mask, settings from a passed config that does not repeat pad_token_id:
    generate takes the pad id from the model's config and infers padding, so the call must run without reuse."""
    from transformers import GenerationConfig

    model, cache, first = warmed
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, 2
    prompt = torch.cat([first, torch.tensor([[0, 40, 41]])], dim=-1)
    config = GenerationConfig(max_new_tokens=3, do_sample=False)
    out = model.generate(prompt, config, past_key_values=cache)
    assert cache.stats()["bypassed_calls"] == 1
    assert torch.equal(out, model.generate(prompt, config))


def test_a_call_inside_another_call_of_the_same_model_is_refused(warmed):
    from transformers import StoppingCriteria, StoppingCriteriaList

    model, cache, first = warmed
    errors: list[BaseException] = []

    class CallsGenerate(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            try:
                model.generate(_tokens(5, 18), past_key_values=cache, **SETTINGS)
            except MarconiCacheError as error:
                errors.append(error)
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    prompt = torch.cat([first, _tokens(4, 19)], dim=-1)
    out = model.generate(prompt, past_key_values=cache, stopping_criteria=StoppingCriteriaList([CallsGenerate()]),
                         **SETTINGS)
    assert errors and "inside another call" in str(errors[0])
    assert torch.equal(out, _uncached(model, prompt))
    with pytest.raises(MarconiCacheError, match="inside another call"):
        with cache.request(prompt):
            model.generate(prompt, past_key_values=cache, **SETTINGS)


def test_a_forward_that_does_not_continue_the_prompt_is_refused_before_it_runs(warmed):
    model, cache, first = warmed
    prompt = torch.cat([first, _tokens(4, 20)], dim=-1)
    before = _store_view(cache)
    with pytest.raises(MarconiCacheError, match="do not continue the prompt"):
        with cache.request(prompt) as call:
            assert call.prefilled > 0
            model(prompt, past_key_values=cache)  # the whole prompt again, on top of the restored prefix
    after = _store_view(cache)
    assert (after[0], after[2]) == (before[0], before[2]), "stored states unchanged (the lookup was counted)"


def test_a_replaced_prompt_feeder_on_a_pure_mamba_model_is_refused():
    model = build_model("mamba2")
    cache = MarconiCache(model, capacity_bytes=CAPACITY)
    first = model.generate(_tokens(16, 21), past_key_values=cache, **SETTINGS)
    model.prepare_inputs_for_generation = type(model).prepare_inputs_for_generation.__get__(model)
    with pytest.raises(MarconiCacheError, match="prepare_inputs_for_generation was replaced"):
        model.generate(torch.cat([first, _tokens(3, 22)], dim=-1), past_key_values=cache, **SETTINGS)


@pytest.mark.parametrize("family", ["llama", "qwen3_next"])
def test_generate_without_a_marconi_cache_is_unchanged_after_building_one(family):
    """The instance-level attributes keep the signatures transformers inspects: inputs_embeds generation (no
    MarconiCache) works as on a model that never had a cache."""
    model = build_model(family)
    embeds = model.get_input_embeddings()(_tokens(6, 23))
    expected = model.generate(inputs_embeds=embeds, **SETTINGS)
    MarconiCache(model, capacity_bytes=CAPACITY)
    assert torch.equal(model.generate(inputs_embeds=embeds, **SETTINGS), expected)


def test_an_earlier_instance_level_generate_is_kept():
    model = build_model("bamba")
    seen = []
    original = model.generate

    def wrapper(*args, **kwargs):  # another library's per-instance wrapper
        seen.append(1)
        return original(*args, **kwargs)

    model.generate = wrapper
    cache = MarconiCache(model, capacity_bytes=CAPACITY)
    model.generate(_tokens(8, 24), **SETTINGS)
    model.generate(_tokens(8, 24), past_key_values=cache, **SETTINGS)
    assert len(seen) == 2


@pytest.mark.timeout(120)
def test_a_streamer_is_ended_when_the_call_is_refused(warmed):
    from transformers import TextIteratorStreamer

    from hf_marconi.pipeline import byte_level_tokenizer

    model, cache, _ = warmed
    streamer = TextIteratorStreamer(byte_level_tokenizer(), timeout=60)
    with pytest.raises(ValueError, match="beam search"):
        model.generate(_tokens(6, 25), past_key_values=cache, streamer=streamer, num_beams=2, max_new_tokens=2)
    assert "".join(streamer) == ""  # ended at once, not after the timeout


def test_a_weight_holding_nan_does_not_invalidate_every_call():
    model = build_model("bamba")
    with torch.no_grad():
        model.get_input_embeddings().weight[0, 0] = float("nan")  # e.g. a never-loaded padding row
    cache = MarconiCache(model, capacity_bytes=CAPACITY)
    first = model.generate(_tokens(12, 26), past_key_values=cache, **SETTINGS)
    model.generate(torch.cat([first, _tokens(3, 27)], dim=-1), past_key_values=cache, **SETTINGS)
    assert cache.stats()["invalidations"] == 0 and cache.stats()["hits"] == 1


def test_contrastive_search_from_penalty_alpha_alone_is_refused(warmed):
    """transformers fills top_k=50 from its global defaults, so penalty_alpha alone selects contrastive search."""
    model, cache, _ = warmed
    before = _store_view(cache)
    with pytest.raises(ValueError, match="contrastive search"):
        model.generate(_tokens(6, 28), past_key_values=cache, penalty_alpha=0.6, max_new_tokens=2)
    assert _store_view(cache) == before


def test_a_direct_generate_loop_nested_in_an_active_call_is_refused(warmed):
    from transformers import StoppingCriteria, StoppingCriteriaList

    model, cache, first = warmed
    errors: list[BaseException] = []

    class CallsTransformersGenerate(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            try:
                keyword = conventions.cache_keyword("past_key_values")
                GenerationMixin.generate(model, _tokens(40, 29), **{keyword: cache}, max_new_tokens=1, pad_token_id=0)
            except MarconiCacheError as error:
                errors.append(error)
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    prompt = torch.cat([first, _tokens(4, 30)], dim=-1)
    out = model.generate(prompt, past_key_values=cache,
                         stopping_criteria=StoppingCriteriaList([CallsTransformersGenerate()]), **SETTINGS)
    assert errors and "model.generate" in str(errors[0])
    assert torch.equal(out, _uncached(model, prompt))
