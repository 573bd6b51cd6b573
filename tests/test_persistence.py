"""Saving and loading a MarconiCache: a hit after reload in a new process with the same output; refused files load
nothing."""

from __future__ import annotations

import hashlib
import json
import os
import random
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import DynamicCache

from hf_marconi import MarconiCache
from hf_marconi.families import cache_keyword_of
from hf_marconi.persistence import (
    FORMAT_VERSION,
    MANIFEST_DIGEST_KEY,
    MANIFEST_KEY,
    PersistenceError,
    load_cache,
    read_manifest,
    save_cache,
)
from hf_marconi.states import KVEdge, map_payload
from hf_marconi.snapshot import StoredEntry, StoreSnapshot
from hf_marconi.tree import INPUT_OUTPUT
from hf_marconi.testing import build_model

REPO = Path(__file__).resolve().parents[1]
SETTINGS = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)
CAPACITY = 16 * 2**20


def _tokens(n: int, rng: random.Random) -> list[int]:
    return [rng.randrange(3, 250) for _ in range(n)]


# Prompts extend earlier outputs, which may hold the pad id; an explicit mask keeps generate from inferring padding.
def _generate(model, ids: list[int], **cache: object) -> list[int]:
    prompt = torch.tensor([ids])
    return model.generate(prompt, attention_mask=torch.ones_like(prompt), **cache, **SETTINGS)[0].tolist()


def _uncached(model, ids: list[int]) -> list[int]:
    return _generate(model, ids, **{cache_keyword_of(model): DynamicCache(config=model.config)})


def _warm(model, cache, seed: int = 0) -> list[int]:
    """Two chat turns and a shared prefix; returns the history the next turn extends."""
    rng = random.Random(seed)
    history = _tokens(20, rng)
    for _ in range(2):
        history = _generate(model, history + _tokens(5, rng), past_key_values=cache)
    return history


def _store_view(cache: MarconiCache) -> tuple:
    return (frozenset(cache.store.tree.checkpointed_prefixes()), cache.store.nbytes)


@pytest.fixture(scope="module")
def bamba():
    return build_model("bamba")


@pytest.fixture(scope="module")
def saved(bamba, tmp_path_factory):
    """A warm cache saved to disk, the next prompt, and its output before saving."""
    cache = MarconiCache(bamba, capacity_bytes=CAPACITY)
    history = _warm(bamba, cache)
    path = tmp_path_factory.mktemp("saved") / "cache.safetensors"
    manifest = save_cache(cache, path)
    prompt = history + [7, 8, 9]
    return path, manifest, prompt, _uncached(bamba, prompt), len(history) - 1


_RELOAD = """
import json, sys, torch
torch.set_num_threads(1)
from hf_marconi import MarconiCache
from hf_marconi.persistence import load_cache
from hf_marconi.states import KVEdge, map_payload
from hf_marconi.snapshot import StoredEntry
from hf_marconi.tree import INPUT_OUTPUT
from hf_marconi.testing import build_model
path, prompt = sys.argv[1], json.loads(sys.argv[2])
model = build_model("bamba")
cache = MarconiCache(model, capacity_bytes=int(sys.argv[3]))
loaded = load_cache(cache, path)
cache.check_invariants()
ids = torch.tensor([prompt])
out = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=4,
                     do_sample=False, pad_token_id=0, eos_token_id=None)
print(json.dumps({"loaded": loaded, "reused": cache.last_call.reused, "hits": cache.stats()["hits"],
                  "output": out[0].tolist()}))
"""


def test_reload_in_a_new_process_hits_and_gives_the_same_output(saved):
    path, manifest, prompt, expected, history_fed = saved
    done = subprocess.run(
        [sys.executable, "-c", _RELOAD, str(path), json.dumps(prompt), str(CAPACITY)],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["loaded"] == manifest["counts"]["nodes"] > 0
    assert result["hits"] == 1 and result["reused"] == history_fed
    assert result["output"] == expected


def test_manifest_records_version_fingerprint_dtypes_shapes_checksums(saved, bamba):
    path, manifest, *_ = saved
    assert read_manifest(path) == manifest
    assert manifest["format_version"] == FORMAT_VERSION
    assert manifest["fingerprint"] == MarconiCache(bamba, capacity_bytes=CAPACITY).fingerprint
    assert set(manifest) == {"format", "format_version", "fingerprint", "weights_probe", "layout", "counts", "tensors"}
    tensors = load_file(str(path))
    assert set(tensors) == set(manifest["tensors"])
    for name, tensor in tensors.items():
        facts = manifest["tensors"][name]
        tree_dtype = "uint8" if name in ("tree.origins", "tree.namespaces") else "int64"
        assert facts["dtype"] == (tree_dtype if name.startswith("tree.") else "float32")
        assert facts["shape"] == list(tensor.shape)
        assert facts["sha256"] == hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()
    counts = manifest["counts"]
    assert tensors["tree.offsets"].tolist()[-1] == counts["tokens"] and len(tensors["tree.parents"]) == counts["nodes"]


@pytest.mark.parametrize("family", ["lfm2", "mamba2", "qwen3_next", "nemotron_h"])
def test_round_trip_per_family(family, tmp_path):
    model = build_model(family)
    cache = MarconiCache(model, capacity_bytes=CAPACITY)
    history = _warm(model, cache, seed=3)
    save_cache(cache, tmp_path / "c.safetensors")
    reloaded = MarconiCache(model, capacity_bytes=CAPACITY)
    load_cache(reloaded, tmp_path / "c.safetensors")
    assert _store_view(reloaded) == _store_view(cache)
    prompt = history + [11, 12]
    out = _generate(model, prompt, past_key_values=reloaded)
    assert reloaded.last_call.reused == len(history) - 1
    assert out == _uncached(model, prompt)


def _rewrite_manifest(source: Path, target: Path, change, change_tensors=lambda tensors: None) -> None:
    """Edit the tensors (their SHA-256 recomputed) and the manifest, and write a file that is consistent apart from
    the edit (the manifest's digest recomputed)."""
    manifest, tensors = read_manifest(source), load_file(str(source))
    change_tensors(tensors)
    for name, tensor in tensors.items():
        manifest["tensors"][name]["sha256"] = hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()
    change(manifest)
    text = json.dumps(manifest)
    metadata = {MANIFEST_KEY: text, MANIFEST_DIGEST_KEY: hashlib.sha256(text.encode()).hexdigest()}
    save_file(tensors, str(target), metadata=metadata)


def _edit_token_in_place(source: Path, target: Path) -> None:
    """Change one token id of the tree (a byte of the tree.tokens tensor), keeping the file's structure valid."""
    data = bytearray(source.read_bytes())
    (header_len,) = struct.unpack("<Q", data[:8])
    start, _ = json.loads(data[8:8 + header_len])["tree.tokens"]["data_offsets"]
    data[8 + header_len + start] ^= 0x01
    target.write_bytes(bytes(data))


def _parent_out_of_range(tensors: dict) -> None:
    tensors["tree.parents"][-1] = 99


def _corrupt_tensor_byte(source: Path, target: Path) -> None:
    data = bytearray(source.read_bytes())
    data[-5] ^= 0x40  # inside the last tensor's data
    target.write_bytes(bytes(data))


def _corrupt_header(source: Path, target: Path) -> None:
    data = bytearray(source.read_bytes())
    (header_len,) = struct.unpack("<Q", data[:8])
    at = 8 + header_len // 2
    data[at] = ord("}") if data[at] != ord("}") else ord("{")
    target.write_bytes(bytes(data))


BAD_FILES = {
    "truncated": (lambda s, t: t.write_bytes(s.read_bytes()[: s.stat().st_size * 2 // 3]), "corrupted or truncated"),
    "tensor byte flipped": (_corrupt_tensor_byte, "SHA-256"),
    "header damaged": (_corrupt_header, "corrupted|truncated|JSON"),
    "not safetensors": (lambda s, t: t.write_bytes(b"hello world, not a cache"), "corrupted or truncated"),
    "future version": (lambda s, t: _rewrite_manifest(s, t, lambda m: m.update(format_version=99)), "version"),
    "checksum edited": (
        lambda s, t: _rewrite_manifest(s, t, lambda m: next(iter(m["tensors"].values())).update(sha256="0" * 64)),
        "SHA-256",
    ),
    "format version 2": (lambda s, t: _rewrite_manifest(s, t, lambda m: m.update(format_version=2)), "version 2"),
    "tree edited": (lambda s, t: _rewrite_manifest(s, t, lambda m: None, _parent_out_of_range), "parent"),
    "token id edited": (_edit_token_in_place, "tree.tokens .* SHA-256"),
}


@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_corrupted_files_raise_and_load_nothing(saved, bamba, tmp_path, kind):
    path = saved[0]
    damage, message = BAD_FILES[kind]
    bad = tmp_path / "bad.safetensors"
    damage(path, bad)
    cache = MarconiCache(bamba, capacity_bytes=CAPACITY)
    with pytest.raises(PersistenceError, match=message):
        load_cache(cache, bad)
    assert cache.store.nbytes == 0 and not cache.store.snapshot().entries
    cache.check_invariants()
    load_cache(cache, path)  # the intact file still loads into the same cache
    assert cache.store.nbytes > 0


@pytest.mark.parametrize(
    "other, message",
    [
        (lambda: build_model("bamba", seed=1), "other weights"),
        (lambda: build_model("lfm2"), "fingerprint"),
        (lambda: build_model("bamba", dtype=torch.float64), "fingerprint|layout"),
    ],
)
def test_another_model_is_refused(saved, other, message):
    cache = MarconiCache(other(), capacity_bytes=CAPACITY)
    with pytest.raises(PersistenceError, match=message):
        load_cache(cache, saved[0])
    assert cache.store.nbytes == 0


def test_refused_into_a_non_empty_or_too_small_store(saved, bamba):
    path = saved[0]
    busy = MarconiCache(bamba, capacity_bytes=CAPACITY)
    _warm(bamba, busy, seed=9)
    before = _store_view(busy)
    with pytest.raises(PersistenceError, match="empty"):
        load_cache(busy, path)
    assert _store_view(busy) == before
    small = MarconiCache(bamba, capacity_bytes=1000)
    with pytest.raises(PersistenceError, match="capacity"):
        load_cache(small, path)
    assert small.store.nbytes == 0


def test_missing_file_and_directory_target(bamba, tmp_path):
    cache = MarconiCache(bamba, capacity_bytes=CAPACITY)
    with pytest.raises(PersistenceError, match="no saved cache"):
        load_cache(cache, tmp_path / "absent.safetensors")
    with pytest.raises(PersistenceError, match="directory"):
        save_cache(cache, tmp_path)


def test_empty_store_round_trips(bamba, tmp_path):
    cache = MarconiCache(bamba, capacity_bytes=CAPACITY)
    manifest = save_cache(cache, tmp_path / "empty.safetensors")
    assert manifest["counts"] == {"nodes": 0, "tokens": 0, "checkpoints": 0, "namespaces": 0}
    fresh = MarconiCache(bamba, capacity_bytes=CAPACITY)
    assert load_cache(fresh, tmp_path / "empty.safetensors") == 0


def test_a_salted_cache_round_trips(bamba, tmp_path):
    """CacheSalt keys lie far above 2**63: they are saved as a namespace table and 32-bit token ids and come back
    exactly, so a tenant's prompt hits its own stored prefix after loading."""
    cache = MarconiCache(bamba, capacity_bytes=CAPACITY)
    rng = random.Random(5)
    shared = _tokens(8, rng)
    history = {name: _generate(bamba, shared + _tokens(12, rng), past_key_values=cache, cache_salt=name,
                               cache_salt_from=8) for name in ("alice", "bob")}
    manifest = save_cache(cache, tmp_path / "salted.safetensors")
    assert manifest["counts"]["namespaces"] == 2
    reloaded = MarconiCache(bamba, capacity_bytes=CAPACITY)
    load_cache(reloaded, tmp_path / "salted.safetensors")
    stored = [(e.key, e.parent, e.origin) for e in reloaded.store.snapshot().entries]
    assert stored == [(e.key, e.parent, e.origin) for e in cache.store.snapshot().entries]
    assert max(max(key) for key, _, _ in stored) > 2**256
    prompt = history["alice"] + [11, 12]
    out = _generate(bamba, prompt, past_key_values=reloaded, cache_salt="alice", cache_salt_from=8)
    assert reloaded.last_call.reused == len(history["alice"]) - 1
    assert out == _uncached(bamba, prompt)


def _chain(model, nodes: int, tokens_per_node: int) -> MarconiCache:
    """A cache whose store is a chain of ``nodes`` edges of random tokens, each with a copy of a real checkpoint:
    loaded straight into the store, so that a model without attention (no KV per token) holds many tokens cheaply."""
    rng = random.Random(nodes)
    scratch = MarconiCache(model, capacity_bytes=CAPACITY)
    _generate(model, _tokens(6, rng), past_key_values=scratch)
    template = scratch.store.snapshot().entries[0].checkpoint
    cache = MarconiCache(model, capacity_bytes=CAPACITY)
    entries = [
        StoredEntry((i + 1) * tokens_per_node, tuple(_tokens(tokens_per_node, rng)), i - 1,
                    KVEdge(tokens_per_node, {}), map_payload(template, torch.clone), INPUT_OUTPUT, i)
        for i in range(nodes)
    ]
    cache.store.load_snapshot(StoreSnapshot(tuple(entries), nodes - 1))
    return cache


def test_the_header_does_not_grow_with_stored_tokens(tmp_path):
    """The tree is stored as tensors: 10 tokens in one node and 200k tokens in 20 nodes give headers that differ only
    by the digits of the counts and shapes (version 2 wrote every token id into the header, capped at 100 MB)."""
    model = build_model("mamba2")
    header_bytes = {}
    for nodes, tokens_per_node in ((1, 10), (20, 10_000)):
        cache = _chain(model, nodes, tokens_per_node)
        path = tmp_path / f"{nodes}.safetensors"
        save_cache(cache, path)
        with open(path, "rb") as handle:
            (header_bytes[nodes],) = struct.unpack("<Q", handle.read(8))
        reloaded = MarconiCache(model, capacity_bytes=CAPACITY)
        assert load_cache(reloaded, path) == nodes
        assert [e.key for e in reloaded.store.snapshot().entries] == [e.key for e in cache.store.snapshot().entries]
    assert sum(len(e.key) for e in reloaded.store.snapshot().entries) == 200_000
    assert abs(header_bytes[20] - header_bytes[1]) < 1024, header_bytes
