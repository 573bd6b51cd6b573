"""Text generation and chat with a MarconiCache threaded through every call.

A chat session keeps the exact token ids the model read and wrote, turn after turn: the prompt of turn t+1 is
turn t's prompt, turn t's generated ids, and only the newly rendered part of the chat template tokenized. Decoding a
reply and tokenizing it again can give other ids (invalid UTF-8 bytes become U+FFFD, BPE merges differently across a
boundary), and any difference would make the stored prefix unusable; keeping the ids makes turn t+1 a hit on turn
t's input and output.

::

    pipe = MarconiPipeline(model, tokenizer, capacity_bytes=2**30)
    chat = pipe.chat(system="You are terse.")
    print(chat.send("Hello!"))
    print(chat.send("And again?", on_text=lambda piece: print(piece, end="")))   # streamed
    pipe("Once upon a time")             # [{"generated_text": "Once upon a time..."}], as TextGenerationPipeline
    pipe([{"role": "user", "content": "Hi"}])   # [{"generated_text": [user message, assistant message]}]

Generation settings come from the model's ``generation_config`` (as in transformers' pipelines, with
``max_new_tokens=256`` where the config sets no length), overridden by the pipeline's defaults and then per call.
"""

from __future__ import annotations

import logging
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from transformers import (
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TextIteratorStreamer,
    TextStreamer,
)
from transformers.generation.streamers import BaseStreamer

from . import conventions
from .cache import MarconiCache
from .families import cache_keyword_of
from .recording import TraceRecorder, session

logger = logging.getLogger(__name__)

# A chat template for tokenizers that ship none (the byte-level tokenizer below, GPT-2): role headers and an
# end-of-turn line.
SIMPLE_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# What transformers' text-generation pipeline adds when the model's generation config sets no length.
PIPELINE_MAX_NEW_TOKENS = 256
# Capacity of the cache a pipeline builds when given neither a cache nor a capacity.
DEFAULT_CAPACITY_BYTES = 2**30
Chat = list[dict[str, str]]


def byte_level_tokenizer(chat_template: str = SIMPLE_CHAT_TEMPLATE) -> PreTrainedTokenizerBase:
    """A tokenizer whose ids are byte values (0..255) and that has no merges: fits the 256-token vocabulary of the
    tiny models of :mod:`hf_marconi.testing`. Id 0 is the padding token, 1 BOS, 2 EOS (as in the tiny configs).

    Decoding generated ids that are not valid UTF-8 gives U+FFFD, which encodes to other ids: the case in which a
    chat must keep its ids rather than re-tokenize its text.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    stand_in = _byte_stand_ins()
    vocab = {stand_in[byte]: byte for byte in range(256)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=stand_in[0],
        bos_token=stand_in[1],
        eos_token=stand_in[2],
    )
    wrapped.chat_template = chat_template
    return wrapped


def gpt2_tokenizer(directory: str, chat_template: str = SIMPLE_CHAT_TEMPLATE) -> PreTrainedTokenizerBase:
    """The GPT-2 BPE from a folder holding ``vocab.json`` and ``merges.txt`` (offline), with a chat template."""
    from pathlib import Path

    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    folder = Path(directory)
    bpe = ByteLevelBPETokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    wrapped = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    wrapped.chat_template = chat_template
    return wrapped


def load_model_and_tokenizer(
    model_path: str | None = None, family: str = "bamba", dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A local model directory's model and tokenizer (offline), or, without a path, a tiny random model of
    ``family`` from :mod:`hf_marconi.testing` with :func:`byte_level_tokenizer`. For examples and quick trials.

    A local tokenizer without a chat template gets :data:`SIMPLE_CHAT_TEMPLATE`.
    """
    if model_path is None:
        from .testing import build_model

        return build_model(family, dtype=dtype), byte_level_tokenizer()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    if tokenizer.chat_template is None:
        tokenizer.chat_template = SIMPLE_CHAT_TEMPLATE
    return model, tokenizer


def _byte_stand_ins() -> dict[int, str]:
    """GPT-2's map from a byte to the printable character byte-level BPE writes it as."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + extra)
            extra += 1
    return chars


class _CallbackStreamer(TextStreamer):
    """Hands each piece of finished text to a callback instead of printing it (the prompt is skipped)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, on_text: Callable[[str], None]):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.on_text = on_text

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.on_text(text)


class _Fanout(BaseStreamer):
    """Forwards generate's stream to several streamers."""

    def __init__(self, streamers: Sequence[BaseStreamer]):
        self.streamers = streamers

    def put(self, value: torch.Tensor) -> None:
        for streamer in self.streamers:
            streamer.put(value)

    def end(self) -> None:
        for streamer in self.streamers:
            streamer.end()


def _is_chat(value: Any) -> bool:
    return (isinstance(value, (list, tuple)) and bool(value)
            and all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in value))


class MarconiPipeline:
    """A model, its tokenizer and a MarconiCache: text generation and chat sessions that reuse stored prefixes.

    Args:
        model: a causal LM supported by MarconiCache.
        tokenizer: its tokenizer; chat needs a chat template (``tokenizer.chat_template``).
        cache: the MarconiCache to thread through every call; built from ``capacity_bytes`` when None. Several
            pipelines and sessions may share one cache (it is thread-safe).
        capacity_bytes: capacity of the cache built when ``cache`` is None (default 1 GiB).
        record_to: a trace file (or a :class:`~hf_marconi.recording.TraceRecorder`, e.g. one that hashes blocks)
            for the cache the pipeline builds to record every call into; chat sessions record under their
            ``session_id``. For a cache passed in, give the recorder to ``MarconiCache(..., recorder=...)``.
        **generate_defaults: generate settings applied on top of the model's ``generation_config``, overridable per
            call.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        cache: MarconiCache | None = None,
        capacity_bytes: int | None = None,
        record_to: str | Path | TraceRecorder | None = None,
        **generate_defaults: Any,
    ) -> None:
        if cache is None:
            capacity = DEFAULT_CAPACITY_BYTES if capacity_bytes is None else capacity_bytes
            recorder = TraceRecorder(record_to) if isinstance(record_to, (str, Path)) else record_to
            cache = MarconiCache(model, capacity_bytes=capacity, recorder=recorder)
        elif record_to is not None:
            raise ValueError("record_to applies to the cache the pipeline builds; pass the recorder to the "
                             "MarconiCache you built instead (MarconiCache(model, ..., recorder=TraceRecorder(path)))")
        elif cache.model is not model:
            raise ValueError("the cache was built for another model instance; build the pipeline with that model")
        self.model = model
        self.tokenizer = tokenizer
        self.cache = cache
        self.generate_defaults: dict[str, Any] = {}
        config = model.generation_config
        if config.max_new_tokens is None and config.max_length == GenerationConfig().max_length:
            self.generate_defaults["max_new_tokens"] = PIPELINE_MAX_NEW_TOKENS
        if config.pad_token_id is None and tokenizer.pad_token_id is not None:
            self.generate_defaults["pad_token_id"] = tokenizer.pad_token_id
        self.generate_defaults.update(generate_defaults)

    @classmethod
    def from_pipeline(cls, pipe: Any, cache: MarconiCache | None = None, capacity_bytes: int | None = None,
                      record_to: str | Path | TraceRecorder | None = None,
                      **generate_defaults: Any) -> "MarconiPipeline":
        """Wrap a transformers ``text-generation`` pipeline's model and tokenizer."""
        return cls(pipe.model, pipe.tokenizer, cache=cache, capacity_bytes=capacity_bytes, record_to=record_to,
                   **generate_defaults)

    # -------------------------------------------------------------------------------------------------- ids
    def generate_ids(
        self,
        prompt_ids: Sequence[int],
        streamer: BaseStreamer | None = None,
        on_text: Callable[[str], None] | None = None,
        **generate_kwargs: Any,
    ) -> list[int]:
        """Generate after ``prompt_ids`` through the cache; returns the new token ids (of the first sequence).

        ``streamer`` (e.g. ``TextIteratorStreamer``) and ``on_text`` (called with each finished piece of text)
        stream the reply as it is generated. Every id is attended to: the attention mask is passed explicitly, so
        a generated id equal to the padding id is not taken for padding when a later turn feeds it back.
        """
        return self._generate(prompt_ids, self.cache, streamer, on_text, **generate_kwargs)[0]

    def _generate(
        self,
        prompt_ids: Sequence[int],
        cache: Any,
        streamer: BaseStreamer | None = None,
        on_text: Callable[[str], None] | None = None,
        **generate_kwargs: Any,
    ) -> list[list[int]]:
        """The new ids of every returned sequence (``num_return_sequences`` of them), generated through ``cache``."""
        ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=self.cache.input_device)
        settings = dict(self.generate_defaults, **generate_kwargs)
        streamers = [s for s in (streamer, _CallbackStreamer(self.tokenizer, on_text) if on_text else None)
                     if s is not None]
        if streamers:
            settings["streamer"] = streamers[0] if len(streamers) == 1 else _Fanout(streamers)
        settings[cache_keyword_of(self.model)] = cache
        output = self.model.generate(ids, attention_mask=torch.ones_like(ids), **settings)
        sequences = output if isinstance(output, torch.Tensor) else output.sequences
        return sequences[:, ids.shape[1]:].tolist()

    # ------------------------------------------------------------------------------------------- pipeline
    def __call__(
        self,
        inputs: str | Chat | list[str] | list[Chat],
        return_full_text: bool = True,
        continue_final_message: bool | None = None,
        **generate_kwargs: Any,
    ) -> list[dict[str, Any]] | list[list[dict[str, Any]]]:
        """Text generation in the shape of transformers' ``TextGenerationPipeline``.

        ``inputs``: a string, a chat (a list of ``{"role", "content"}`` messages), or a list of either. Returns, per
        input, a list with one ``{"generated_text": ...}`` record per returned sequence: the prompt and its
        continuation (``return_full_text=False``: the continuation alone) for a string; for a chat, the messages
        followed by the assistant's reply, or with ``continue_final_message`` (default: when the chat ends with an
        assistant message) that message continued. Inputs are generated one by one, each through the cache.
        """
        if isinstance(inputs, str) or _is_chat(inputs):
            return self._one(inputs, return_full_text, continue_final_message, generate_kwargs)
        if not isinstance(inputs, (list, tuple)) or not all(isinstance(x, str) or _is_chat(x) for x in inputs):
            raise TypeError(
                "inputs must be a string, a chat (a list of {'role': ..., 'content': ...} messages) or a list of "
                f"those; got {type(inputs).__name__}"
            )
        return [self._one(x, return_full_text, continue_final_message, generate_kwargs) for x in inputs]

    def _one(
        self, prompt: str | Chat, return_full_text: bool, continue_final_message: bool | None,
        generate_kwargs: dict[str, Any],
    ) -> list[dict[str, Any]]:
        if isinstance(prompt, str):
            ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
            return [{"generated_text": (prompt if return_full_text else "") + self._decode(new)}
                    for new in self._generate(ids, self.cache, **generate_kwargs)]
        messages = [dict(message) for message in prompt]
        if continue_final_message is None:
            continue_final_message = messages[-1]["role"] == "assistant"
        text = self._chat_template().apply_chat_template(
            messages, tokenize=False, add_generation_prompt=not continue_final_message,
            continue_final_message=continue_final_message,
        )
        records = []
        prompt_ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        for new in self._generate(prompt_ids, self.cache, **generate_kwargs):
            reply = self._decode(new)
            if not return_full_text:
                records.append({"generated_text": reply})
            elif continue_final_message:
                last = dict(messages[-1], content=messages[-1]["content"] + reply)
                records.append({"generated_text": messages[:-1] + [last]})
            else:
                records.append({"generated_text": messages + [{"role": "assistant", "content": reply}]})
        return records

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _chat_template(self) -> PreTrainedTokenizerBase:
        if self.tokenizer.chat_template is None:
            raise ValueError(
                "the tokenizer has no chat template; set tokenizer.chat_template (e.g. "
                "hf_marconi.pipeline.SIMPLE_CHAT_TEMPLATE) or use the pipeline for plain text generation"
            )
        return self.tokenizer

    def eos_token_ids(self) -> set[int]:
        """Every id that ends a reply: the generation config's EOS ids and the tokenizer's."""
        configured = self.generate_defaults.get("eos_token_id", self.model.generation_config.eos_token_id)
        return set(conventions.token_ids(configured)) | set(conventions.token_ids(self.tokenizer.eos_token_id))

    def chat(self, system: str | None = None, messages: Sequence[dict[str, str]] = ()) -> "ChatSession":
        """A new conversation, optionally starting with a system prompt and earlier messages."""
        self._chat_template()
        history = [{"role": "system", "content": system}] if system is not None else []
        return ChatSession(self, history + [dict(m) for m in messages])

    # ---------------------------------------------------------------------------------------- uncached ids
    def reference_ids(self, prompt_ids: Sequence[int], **generate_kwargs: Any) -> list[int]:
        """Generate without the cache (a fresh ``DynamicCache``): what the cached call must equal under greedy
        decoding. For checks and examples."""
        from transformers import DynamicCache

        return self._generate(prompt_ids, DynamicCache(config=self.model.config), **generate_kwargs)[0]


@dataclass
class ChatSession:
    """One conversation. ``token_ids`` are exactly the ids the model read and wrote so far (the prompt of the
    latest turn followed by its reply); ``messages`` the conversation as text; ``session_id`` what a recorded trace
    (``record_to``) files its turns under."""

    pipeline: MarconiPipeline
    messages: list[dict[str, str]]
    token_ids: list[int] = field(default_factory=list)
    last_prompt_ids: list[int] = field(default_factory=list)
    last_reply_ids: list[int] = field(default_factory=list)
    session_id: str = field(default_factory=lambda: f"chat-{uuid.uuid4().hex[:12]}")

    def send(
        self,
        content: str,
        role: str = "user",
        streamer: BaseStreamer | None = None,
        on_text: Callable[[str], None] | None = None,
        **generate_kwargs: Any,
    ) -> str:
        """Add a message, generate the assistant's reply through the cache, and return its text."""
        prompt = self.token_ids + self._new_prompt_ids({"role": role, "content": content})
        with session(self.session_id):
            reply_ids = self.pipeline.generate_ids(prompt, streamer=streamer, on_text=on_text, **generate_kwargs)
        reply = self.pipeline.tokenizer.decode(reply_ids, skip_special_tokens=True)
        self.messages += [{"role": role, "content": content}, {"role": "assistant", "content": reply}]
        self.last_prompt_ids, self.last_reply_ids = prompt, reply_ids
        self.token_ids = prompt + reply_ids
        return reply

    def stream(
        self, content: str, role: str = "user", timeout_s: float = 600.0, **generate_kwargs: Any
    ) -> Iterator[str]:
        """Like :meth:`send`, yielding the reply's text piece by piece as it is generated.

        Generation runs in a worker thread; if it raises, the iteration ends with that error (never a silent stop or
        a hang). ``timeout_s`` bounds the wait for each piece.
        """
        streamer = TextIteratorStreamer(self.pipeline.tokenizer, skip_prompt=True, skip_special_tokens=True,
                                        timeout=timeout_s)
        failure: list[BaseException] = []

        def run() -> None:
            try:
                self.send(content, role=role, streamer=streamer, **generate_kwargs)
            except BaseException as error:  # re-raised in the consumer below
                failure.append(error)
                streamer.end()

        worker = threading.Thread(target=run, name="hf_marconi-chat-stream", daemon=True)
        worker.start()
        yield from streamer
        worker.join(timeout=timeout_s)
        if failure:
            raise failure[0]

    def _render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        return self.pipeline.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def _encode(self, text: str) -> list[int]:
        # The chat template writes any special tokens itself.
        return self.pipeline.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _new_prompt_ids(self, message: dict[str, str]) -> list[int]:
        """Ids of what the chat template adds after the stored ids for ``message`` and the generation prompt."""
        full = self._render(self.messages + [message], add_generation_prompt=True)
        if not self.token_ids:
            return self._encode(full)
        # The stored ids end with the last reply's ids as generated: the text the template renders after the
        # reply (end-of-turn marker, the new message, the generation prompt) is all that is new.
        *earlier, last_reply = self.messages
        rendered_up_to_reply = self._render(earlier, add_generation_prompt=True) + last_reply["content"]
        if not full.startswith(rendered_up_to_reply):
            logger.warning(
                "the chat template does not render the conversation as the previous prompt followed by the reply; "
                "re-tokenizing the whole conversation (no reuse of the last reply for this turn)"
            )
            self.token_ids = []
            return self._encode(full)
        tail = full[len(rendered_up_to_reply):]
        last = self.token_ids[-1]
        if last in self.pipeline.eos_token_ids():
            eos = self.pipeline.tokenizer.decode([last], skip_special_tokens=False)
            if eos and tail.startswith(eos):
                tail = tail[len(eos):]  # the reply's own end-of-sequence token already closes the turn
        return self._encode(tail)
