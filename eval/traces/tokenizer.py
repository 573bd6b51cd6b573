"""Turning messages into token ids with a local tokenizer (never the network).

The paper JSON-encoded every chat message and tokenized each one separately, then concatenated the pieces;
a message therefore has the same token ids wherever it appears, so prefixes shared between requests are
shared exactly. :meth:`TextEncoder.encode_messages` does the same.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

from tqdm.auto import tqdm

GPT2_TOKENIZER_DIR = "tokenizer_gpt2"
_ENCODE_BATCH = 256


class TextEncoder:
    """A tokenizer reduced to what trace building needs: batch encoding, vocabulary size, identity.

    ``identity`` names the tokenizer's files (path, sizes, modification times) so cached traces are
    rebuilt when the tokenizer changes.
    """

    def __init__(self, encode_batch: Callable[[list[str]], list[list[int]]], vocab_size: int, identity: str):
        self._encode_batch = encode_batch
        self.vocab_size = vocab_size
        self.identity = identity

    def encode_texts(self, texts: Sequence[str], desc: str = "tokenizing") -> list[tuple[int, ...]]:
        """Token ids of each text; equal texts get the very same tuple."""
        unique = list(dict.fromkeys(texts))
        encoded: dict[str, tuple[int, ...]] = {}
        with tqdm(total=len(unique), desc=desc, unit="msg", disable=None, leave=False) as bar:
            for start in range(0, len(unique), _ENCODE_BATCH):
                batch = unique[start : start + _ENCODE_BATCH]
                for text, ids in zip(batch, self._encode_batch(batch)):
                    encoded[text] = tuple(ids)
                bar.update(len(batch))
        return [encoded[text] for text in texts]

    def encode_messages(self, messages: Sequence[dict], desc: str = "tokenizing") -> list[tuple[int, ...]]:
        """Token ids of each message, JSON-encoded (``json.dumps`` of the dict) and tokenized on its own."""
        return self.encode_texts([message_text(message) for message in messages], desc=desc)


def message_text(message: dict) -> str:
    """The text a message is tokenized as: its JSON encoding, keys in the order given."""
    return json.dumps(message, ensure_ascii=False)


def _files_identity(directory: Path) -> str:
    stats = sorted(
        (p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in directory.iterdir() if p.is_file()
    )
    digest = hashlib.sha256(json.dumps([str(directory.resolve()), stats]).encode()).hexdigest()
    return digest[:16]


def load_text_encoder(path: str | Path) -> TextEncoder:
    """Load a tokenizer from a local directory.

    A directory with ``tokenizer.json`` or ``tokenizer_config.json`` is loaded with
    ``transformers.AutoTokenizer`` (offline); one with ``vocab.json`` and ``merges.txt`` only (like the
    GPT-2 files in the shared data folder) as a byte-level BPE with ``tokenizers``.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"tokenizer folder {directory} not found: pass a local tokenizer directory")
    identity = _files_identity(directory)
    if (directory / "tokenizer.json").is_file() or (directory / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        hf_tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)

        def encode_hf(texts: list[str]) -> list[list[int]]:
            return hf_tokenizer(texts, add_special_tokens=False)["input_ids"]

        return TextEncoder(encode_hf, len(hf_tokenizer), identity)
    if (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
        from tokenizers import ByteLevelBPETokenizer

        bpe = ByteLevelBPETokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"))

        def encode_bpe(texts: list[str]) -> list[list[int]]:
            return [encoding.ids for encoding in bpe.encode_batch(texts)]

        return TextEncoder(encode_bpe, bpe.get_vocab_size(), identity)
    raise ValueError(
        f"{directory} holds neither tokenizer.json/tokenizer_config.json nor vocab.json + merges.txt: "
        "pass a Hugging Face tokenizer folder or a byte-level BPE folder"
    )


def resolve_text_encoder(tokenizer: str | Path | TextEncoder | None, data_dir: Path) -> TextEncoder:
    """``tokenizer`` as a :class:`TextEncoder`; ``None`` means the GPT-2 files in ``data_dir``."""
    if isinstance(tokenizer, TextEncoder):
        return tokenizer
    return load_text_encoder(tokenizer if tokenizer is not None else data_dir / GPT2_TOKENIZER_DIR)
