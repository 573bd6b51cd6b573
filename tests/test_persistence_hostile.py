"""Persistence treats a file as input from outside: authentication with a key, sizes and references checked before
any tensor is read, malformed manifests and non-regular files refused with PersistenceError."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hf_marconi import MarconiCache
from hf_marconi import persistence
from hf_marconi.cache import config_fingerprint
from hf_marconi.persistence import PersistenceError, load_cache, save_cache
from hf_marconi.testing import build_model, make_config

SETTINGS = dict(max_new_tokens=3, do_sample=False, pad_token_id=0, eos_token_id=None)


@pytest.fixture(scope="module")
def model():
    return build_model("bamba")


@pytest.fixture()
def saved(model, tmp_path):
    """A file of a tree with a branch: a root edge with two children."""
    cache = MarconiCache(model, capacity_bytes=2**22)
    prompt = torch.randint(3, 250, (1, 20), generator=torch.Generator().manual_seed(0))
    model.generate(prompt, past_key_values=cache, **SETTINGS)
    model.generate(torch.cat([prompt[:, :10], prompt[:, 10:] + 1], dim=1), past_key_values=cache, **SETTINGS)
    assert len(cache.store.snapshot().entries) == 3
    path = tmp_path / "cache.safetensors"
    save_cache(cache, path, key=b"secret")
    return path


def _rewrite(path, edit, key: bytes | None = None):
    """Rewrite a saved file the way an attacker can: edit the manifest (and tensors), recompute its SHA-256 (and an
    HMAC if the attacker knew the key)."""
    with safe_open(str(path), framework="pt") as reader:
        tensors = {name: reader.get_tensor(name) for name in reader.keys()}
        manifest = json.loads(reader.metadata()[persistence.MANIFEST_KEY])
    edit(manifest, tensors)
    text = json.dumps(manifest)
    metadata = {persistence.MANIFEST_KEY: text,
                persistence.MANIFEST_DIGEST_KEY: hashlib.sha256(text.encode()).hexdigest()}
    if key is not None:
        metadata[persistence.MANIFEST_HMAC_KEY] = persistence._authenticator(text, key)
    save_file(tensors, str(path), metadata=metadata)


def _edit_tree(path, change, counts: dict | None = None) -> None:
    """Rewrite the tree tensors (and counts) as a writer without the key can: every SHA-256 recomputed."""
    def edit(manifest, tensors):
        change(tensors)
        manifest["counts"].update(counts or {})
        for name, tensor in tensors.items():
            manifest["tensors"][name].update(shape=list(tensor.shape), sha256=persistence._digest(tensor))

    _rewrite(path, edit)


def _empty_cache(model):
    return MarconiCache(model, capacity_bytes=2**22)


def test_a_key_authenticates_the_file(model, saved):
    assert load_cache(_empty_cache(model), saved, key=b"secret") >= 1
    with pytest.raises(PersistenceError, match="not authenticated"):
        load_cache(_empty_cache(model), saved, key=b"other")


def test_states_altered_with_recomputed_checksums_are_refused_under_a_key(model, saved):
    """The attack of the multi-tenant issue: perturbed states, every SHA-256 recomputed. Without a key the file looks
    intact; with one, it is refused."""
    def perturb(manifest, tensors):
        name = next(iter(tensors))
        tensors[name] = tensors[name] + 1.0
        manifest["tensors"][name]["sha256"] = persistence._digest(tensors[name])

    _rewrite(saved, perturb)
    with pytest.raises(PersistenceError, match="not authenticated"):
        load_cache(_empty_cache(model), saved, key=b"secret")


def _must_not_read(*args, **kwargs):
    raise AssertionError("the loader read tensors of a file it should refuse on size")


def test_declared_sizes_beyond_capacity_are_refused_before_any_tensor_is_read(model, saved, monkeypatch):
    def inflate(manifest, tensors):
        manifest["counts"]["tokens"] = 10**12
        for name, facts in manifest["tensors"].items():
            if name.startswith("kv."):
                facts["shape"] = [10**12 * 32]

    _rewrite(saved, inflate, key=b"secret")
    monkeypatch.setattr(persistence, "_read_snapshot", _must_not_read)
    with pytest.raises(PersistenceError, match="more than this cache's capacity"):
        load_cache(_empty_cache(model), saved, key=b"secret")


def test_a_shape_its_counts_do_not_make_is_refused_before_any_tensor_is_read(model, saved, monkeypatch):
    def inflate(manifest, tensors):
        manifest["tensors"]["kv.1.keys"]["shape"] = [10**9]

    _rewrite(saved, inflate, key=b"secret")
    monkeypatch.setattr(persistence, "_read_snapshot", _must_not_read)
    with pytest.raises(PersistenceError, match="tensor 'kv.1.keys' .* make it float32"):
        load_cache(_empty_cache(model), saved, key=b"secret")


def test_an_unreferenced_tensor_is_refused(model, saved):
    def add(manifest, tensors):
        tensors["extra"] = torch.zeros(4)
        digest = persistence._digest(tensors["extra"])
        manifest["tensors"]["extra"] = {"dtype": "float32", "shape": [4], "sha256": digest}

    _rewrite(saved, add)
    with pytest.raises(PersistenceError, match="no part of the tree or states uses"):
        load_cache(_empty_cache(model), saved)


@pytest.mark.parametrize(
    "damage", ["counts_not_a_dict", "count_not_an_int", "count_negative", "shape_not_ints", "tensors_missing"]
)
def test_malformed_manifests_raise_persistence_error(model, saved, damage):
    def edit(manifest, tensors):
        if damage == "counts_not_a_dict":
            manifest["counts"] = [1, 2]
        elif damage == "count_not_an_int":
            manifest["counts"]["nodes"] = "3"
        elif damage == "count_negative":
            manifest["counts"]["namespaces"] = -1
        elif damage == "shape_not_ints":
            manifest["tensors"][next(iter(manifest["tensors"]))]["shape"] = ["x"]
        else:
            del manifest["tensors"]

    _rewrite(saved, edit)
    with pytest.raises(PersistenceError):
        load_cache(_empty_cache(model), saved)


@pytest.mark.timeout(60)
def test_a_fifo_is_refused_instead_of_hanging(model, tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(PersistenceError, match="not a regular file"):
        load_cache(_empty_cache(model), fifo)


def test_the_fingerprint_ignores_where_the_model_was_loaded_from():
    one, other = make_config("bamba"), make_config("bamba")
    other._name_or_path = "/elsewhere/bamba"
    assert config_fingerprint(one) == config_fingerprint(other)
    other.hidden_size += 1
    assert config_fingerprint(one) != config_fingerprint(other)


def test_loaded_states_do_not_depend_on_the_file_afterwards(model, saved):
    """Loaded tensors are copies: overwriting (or truncating) the file after loading changes no stored state."""
    cache = _empty_cache(model)
    load_cache(cache, saved, key=b"secret")

    def stored() -> list[torch.Tensor]:
        tensors = []
        for entry in cache.store.snapshot().entries:
            tensors += [t for pair in entry.edge.kv.values() for t in pair]
            if entry.checkpoint is not None:
                tensors += list(entry.checkpoint.tensors().values())
        return tensors

    before = [t.clone() for t in stored()]
    assert before
    size = saved.stat().st_size
    with open(saved, "r+b") as handle:
        handle.seek(size - 4096)
        handle.write(os.urandom(4096))
    os.truncate(saved, size // 2)
    assert all(torch.equal(old, new) for old, new in zip(before, stored(), strict=True))


def test_non_finite_numbers_in_the_manifest_are_refused(model, saved):
    def infinite(manifest, tensors):
        manifest["counts"]["tokens"] = float("inf")

    _rewrite(saved, infinite)
    with pytest.raises(PersistenceError, match="not valid JSON"):
        load_cache(_empty_cache(model), saved)


def test_kv_of_another_shape_or_dtype_is_refused_at_load_not_at_the_next_hit(model, saved):
    def reshape(manifest, tensors):
        for name, facts in manifest["tensors"].items():
            if name.startswith("kv."):
                tensors[name] = tensors[name].reshape(2, -1).double()
                facts.update(dtype="float64", shape=list(tensors[name].shape), sha256=persistence._digest(tensors[name]))

    _rewrite(saved, reshape)
    with pytest.raises(PersistenceError, match="make it float32"):
        load_cache(_empty_cache(model), saved)


def test_a_file_whose_tensors_differ_from_its_manifest_is_refused(model, saved):
    def shorten(manifest, tensors):
        tensors["tree.tokens"] = tensors["tree.tokens"][:-1].clone()

    _rewrite(saved, shorten)
    with pytest.raises(PersistenceError, match="tree.tokens .* its manifest says int64"):
        load_cache(_empty_cache(model), saved)


def _swap_offsets(tensors):
    offsets = tensors["tree.offsets"]
    offsets[1], offsets[2] = offsets[2].item(), offsets[1].item()


def _tokens_beyond_vocabulary(tensors):
    tensors["tree.tokens"][3] = 256  # the zoo's vocabulary is 256 ids


def _unknown_namespace(tensors):
    tensors["tree.tokens"][3] = 1 << 32 | 5  # namespace 1 of a table with none


def _uncheckpointed_origin(tensors):
    tensors["tree.origins"][-1] = 0


# Each edit leaves every SHA-256 right: only the tree's own checks can catch it.
TREE_DAMAGE = {
    "offsets not rising": (_swap_offsets, {}, "tree.offsets must rise"),
    "offsets short of the tokens": (lambda t: t["tree.offsets"].__setitem__(-1, 5), {}, "tree.offsets must rise"),
    "parent after its child": (lambda t: t["tree.parents"].__setitem__(1, 2), {}, "parent"),
    "parent below -1": (lambda t: t["tree.parents"].__setitem__(0, -2), {}, "parent"),
    "token id beyond the vocabulary": (_tokens_beyond_vocabulary, {}, r"vocabulary \(256\)"),
    "unknown namespace": (_unknown_namespace, {}, "namespace outside the 0 stored"),
    "negative token code": (lambda t: t["tree.tokens"].__setitem__(0, -1), {}, "tree.tokens holds a negative code"),
    "origin code out of range": (lambda t: t["tree.origins"].__setitem__(0, 7), {}, "tree.origins"),
    "checkpoint count mismatch": (_uncheckpointed_origin, {}, "tree.origins .* non-zero for the 3"),
    "negative clock": (lambda t: t["tree.last_access"].__setitem__(0, -5), {}, "tree.last_access"),
    "unused namespace": (
        lambda t: t.__setitem__("tree.namespaces", torch.ones(1, persistence.NAMESPACE_BYTES, dtype=torch.uint8)),
        {"namespaces": 1},
        "tree.namespaces",
    ),
    "node count beyond its tensors": (lambda t: None, {"nodes": 4}, "tree.offsets"),
    "inconsistent counts": (lambda t: None, {"checkpoints": 4}, "counts .* inconsistent"),
}


@pytest.mark.parametrize("kind", list(TREE_DAMAGE))
def test_a_damaged_tree_is_refused_before_any_state_is_copied(model, saved, monkeypatch, kind):
    change, counts, message = TREE_DAMAGE[kind]
    _edit_tree(saved, change, counts)
    copied = []
    original = persistence._copy_checked
    monkeypatch.setattr(persistence, "_copy_checked", lambda path, name, *args: copied.append(name) or original(
        path, name, *args))
    cache = _empty_cache(model)
    with pytest.raises(PersistenceError, match=message):
        load_cache(cache, saved)
    assert all(name.startswith("tree.") for name in copied)
    assert cache.store.nbytes == 0 and not cache.store.snapshot().entries


def test_siblings_with_one_first_token_are_refused(model, saved):
    def twins(tensors):
        offsets, tokens = tensors["tree.offsets"].tolist(), tensors["tree.tokens"]
        tokens[offsets[2]] = tokens[offsets[1]]  # both children of the root edge start alike

    _edit_tree(saved, twins)
    with pytest.raises(PersistenceError, match="same token as a sibling"):
        load_cache(_empty_cache(model), saved)
