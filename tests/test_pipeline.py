"""MarconiPipeline: chat sessions reuse their own history through the cache, by the exact ids they generated."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import torch
import transformers
from transformers import TextIteratorStreamer

from hf_marconi import MarconiCache
from hf_marconi.pipeline import SIMPLE_CHAT_TEMPLATE, MarconiPipeline, byte_level_tokenizer, gpt2_tokenizer
from hf_marconi.testing import build_model, make_config

DATA = Path(os.environ.get("HF_MARCONI_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
CAPACITY = 16 * 2**20


@pytest.fixture(scope="module")
def model():
    return build_model("bamba")


@pytest.fixture(scope="module")
def tokenizer():
    return byte_level_tokenizer()


@pytest.fixture
def pipe(model, tokenizer):
    return MarconiPipeline(model, tokenizer, capacity_bytes=CAPACITY, max_new_tokens=12)


def test_byte_level_tokenizer_ids_are_bytes(tokenizer):
    text = "héllo <|end|>"
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == list(text.encode())
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.decode(list(text.encode())) == text


def test_turn_two_reuses_turn_one_input_and_output_when_retokenizing_differs(pipe, tokenizer):
    chat = pipe.chat(system="You answer in one line.")
    reply = chat.send("Hello, how are you?")
    turn1_prompt, turn1_reply = chat.last_prompt_ids, chat.last_reply_ids
    # The case this feature exists for: the decoded reply does not encode back to the generated ids.
    assert tokenizer(reply, add_special_tokens=False)["input_ids"] != turn1_reply
    # A chat that re-tokenized its rendered text would diverge inside turn 1's reply and miss the stored state.
    rendered = tokenizer.apply_chat_template(
        chat.messages + [{"role": "user", "content": "Go on."}], tokenize=False, add_generation_prompt=True
    )
    retokenized = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert retokenized[: len(chat.token_ids)] != chat.token_ids

    before = pipe.cache.stats()
    chat.send("Go on.")
    after = pipe.cache.stats()
    # The model read turn 1's prompt and every reply token but the last (generate never feeds its last token).
    fed = len(turn1_prompt) + len(turn1_reply) - 1
    assert chat.last_prompt_ids[: len(turn1_prompt) + len(turn1_reply)] == turn1_prompt + turn1_reply
    assert after["hits"] == before["hits"] + 1
    assert after["hits_input_output"] == before["hits_input_output"] + 1
    assert after["hit_tokens"] - before["hit_tokens"] == fed
    assert pipe.cache.last_call.reused == fed
    # Cached greedy generation equals uncached generation of the same ids.
    assert chat.last_reply_ids == pipe.reference_ids(chat.last_prompt_ids)
    pipe.cache.check_invariants()


def test_reply_without_eos_keeps_every_generated_id(model, tokenizer):
    pipe = MarconiPipeline(model, tokenizer, capacity_bytes=CAPACITY, max_new_tokens=5, eos_token_id=None)
    chat = pipe.chat()
    chat.send("abc")
    assert len(chat.last_reply_ids) == 5
    first = chat.token_ids
    chat.send("def")
    assert chat.last_prompt_ids[: len(first)] == first
    assert pipe.cache.last_call.reused == len(first) - 1


@pytest.mark.timeout(120)
def test_streaming_by_iterator_and_callback_give_the_reply(pipe, tokenizer):
    chat = pipe.chat()
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    pieces: list[str] = []
    result: dict[str, str] = {}
    worker = threading.Thread(target=lambda: result.update(reply=chat.send("Stream this", streamer=streamer,
                                                                          on_text=pieces.append)))
    worker.start()
    streamed = "".join(streamer)
    worker.join(timeout=60)
    assert result["reply"] == streamed == "".join(pieces)


class _FailOnForward:
    """A forward pre-hook that raises on the n-th forward (a fault in the middle of generate)."""

    def __init__(self, model, at: int):
        self.at, self.seen = at, 0
        self.handle = model.register_forward_pre_hook(self)

    def __call__(self, *_):
        self.seen += 1
        if self.seen == self.at:
            raise RuntimeError("injected fault in forward")


@pytest.mark.timeout(120)
def test_a_streamer_whose_generate_raised_ends_instead_of_hanging(pipe, tokenizer):
    """A TextIteratorStreamer consumed in another thread stops when generate raises (the consumer would otherwise
    wait forever); the error reaches generate's caller."""
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, timeout=60)
    fault = _FailOnForward(pipe.model, at=3)
    outcome: dict[str, BaseException] = {}

    def run() -> None:
        try:
            pipe.chat().send("This will fail", streamer=streamer)
        except RuntimeError as error:
            outcome["error"] = error

    worker = threading.Thread(target=run)
    worker.start()
    try:
        "".join(streamer)  # ends (does not wait for a timeout) once generate has raised
    finally:
        worker.join(timeout=60)
        fault.handle.remove()
    assert "injected fault" in str(outcome["error"])


@pytest.mark.timeout(120)
def test_chat_stream_yields_the_reply_and_ends_with_generates_error(pipe, tokenizer):
    chat = pipe.chat()
    assert "".join(chat.stream("Stream this")) == tokenizer.decode(chat.last_reply_ids, skip_special_tokens=True)
    fault = _FailOnForward(pipe.model, at=2)
    try:
        with pytest.raises(RuntimeError, match="injected fault"):
            for _ in chat.stream("and fail"):
                pass
    finally:
        fault.handle.remove()


def test_text_generation_equals_uncached(pipe, tokenizer):
    text = "Once upon a time"
    out = pipe(text)
    prompt = tokenizer(text)["input_ids"]
    assert out == [{"generated_text": text + tokenizer.decode(pipe.reference_ids(prompt), skip_special_tokens=True)}]
    pipe(text + " there")
    assert pipe.cache.stats()["lookups"] == 2


def _transformers_pipeline(model, tokenizer):
    """transformers' own text-generation pipeline on the same model, uncached (a fresh cache per call)."""
    return transformers.pipeline("text-generation", model=model, tokenizer=tokenizer)


@pytest.mark.parametrize("continue_final_message", [None, True, False])
def test_inputs_and_outputs_have_the_shape_of_transformers_pipeline(model, tokenizer, continue_final_message):
    """Strings, chats and lists of either, in and out as TextGenerationPipeline takes and returns them, with the same
    text (greedy), also continuing a final assistant message."""
    pipe = MarconiPipeline(model, tokenizer, capacity_bytes=CAPACITY)
    reference = _transformers_pipeline(model, tokenizer)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    prefilled = chat + [{"role": "assistant", "content": "Hello, I"}]
    inputs = ["Once upon", chat, prefilled, ["a list", "of strings"], [chat, prefilled]]
    settings = dict(max_new_tokens=5, do_sample=False)
    if continue_final_message is not None:
        settings["continue_final_message"] = continue_final_message
    for prompt in inputs:
        if continue_final_message is False and prompt is prefilled:
            continue  # a second assistant message: the simple template renders it, but it is not the case tested
        for full_text in (True, False):
            got = pipe(prompt, return_full_text=full_text, **settings)
            want = reference(prompt, return_full_text=full_text, **settings)
            assert got == want, (prompt, full_text)


def test_generation_config_of_the_model_is_honoured_and_overridable(model, tokenizer):
    """No hidden defaults: the model's generation_config decides (here 3 new tokens), a pipeline default or a call
    overrides it."""
    model.generation_config.max_new_tokens = 3
    try:
        pipe = MarconiPipeline(model, tokenizer, capacity_bytes=CAPACITY)
        assert len(pipe.generate_ids(tokenizer("abc")["input_ids"], eos_token_id=None)) == 3
        assert len(pipe.generate_ids(tokenizer("abc")["input_ids"], eos_token_id=None, max_new_tokens=5)) == 5
        pipe = MarconiPipeline(model, tokenizer, capacity_bytes=CAPACITY, max_new_tokens=2)
        assert len(pipe.generate_ids(tokenizer("abc")["input_ids"], eos_token_id=None)) == 2
    finally:
        model.generation_config.max_new_tokens = None


def test_num_return_sequences_gives_one_record_each(model, tokenizer):
    pipe = MarconiPipeline(model, tokenizer, capacity_bytes=CAPACITY, max_new_tokens=3)
    out = pipe("Hello", do_sample=True, num_return_sequences=3)
    assert len(out) == 3 and all(record["generated_text"].startswith("Hello") for record in out)


def test_chat_turn_closed_by_another_eos_id_is_not_repeated(model, tokenizer):
    """The EOS skip knows every EOS id of the generation config, not only the tokenizer's eos_token: a reply that
    ended with a second EOS id (here the pad token, configured as an extra EOS) does not get it rendered again."""
    pipe = MarconiPipeline(model, tokenizer, capacity_bytes=CAPACITY, max_new_tokens=4, eos_token_id=[2, 0])
    assert pipe.eos_token_ids() == {0, 2}
    chat = pipe.chat()
    chat.send("x")
    chat.token_ids[-1] = 0  # as if the reply had ended with the extra EOS id
    chat.messages[-1]["content"] += tokenizer.decode([0], skip_special_tokens=False)
    new = chat._new_prompt_ids({"role": "user", "content": "y"})
    assert new[0] != 0


def test_from_transformers_pipeline(model, tokenizer):
    hf_pipe = transformers.pipeline("text-generation", model=model, tokenizer=tokenizer)
    assert MarconiPipeline.from_pipeline(hf_pipe).cache.store.capacity_bytes == 2**30  # as README writes it
    pipe = MarconiPipeline.from_pipeline(hf_pipe, capacity_bytes=CAPACITY, max_new_tokens=4)
    assert pipe.model is model and pipe.tokenizer is tokenizer
    chat = pipe.chat()
    chat.send("x")
    chat.send("y")
    assert pipe.cache.stats()["hits"] == 1


def test_refusals(model, tokenizer):
    with pytest.raises(TypeError, match="chat"):
        MarconiPipeline(model, tokenizer, capacity_bytes=CAPACITY)(42)
    other = MarconiCache(build_model("bamba", seed=1), capacity_bytes=CAPACITY)
    with pytest.raises(ValueError, match="another model"):
        MarconiPipeline(model, tokenizer, cache=other)
    plain = byte_level_tokenizer()
    plain.chat_template = None
    with pytest.raises(ValueError, match="chat template"):
        MarconiPipeline(model, plain, capacity_bytes=CAPACITY).chat()


@pytest.mark.skipif(not (DATA / "tokenizer_gpt2").is_dir(), reason=f"GPT-2 tokenizer files not found under {DATA}")
def test_gpt2_tokenizer_chat_hits_previous_turn():
    tokenizer = gpt2_tokenizer(str(DATA / "tokenizer_gpt2"), SIMPLE_CHAT_TEMPLATE)
    config = make_config("bamba")
    config.vocab_size = len(tokenizer)
    config.eos_token_id = config.pad_token_id = tokenizer.eos_token_id
    torch.manual_seed(0)
    model = transformers.BambaForCausalLM(config).eval()
    pipe = MarconiPipeline(model, tokenizer, capacity_bytes=CAPACITY, max_new_tokens=8)
    chat = pipe.chat(system="Be brief.")
    chat.send("What is a prefix cache?")
    fed = len(chat.last_prompt_ids) + len(chat.last_reply_ids) - 1
    chat.send("And why keep token ids?")
    assert pipe.cache.last_call.reused == fed
    assert chat.last_reply_ids == pipe.reference_ids(chat.last_prompt_ids)
