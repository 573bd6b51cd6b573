"""Saving a MarconiCache's stored states to disk and loading them back, without pickle.

One file: a safetensors file holding every stored tensor, whose header metadata carries a JSON manifest under the
key ``"hf_marconi"``: the format name and version, the model config fingerprint, the cache's state layout and sizes,
the tree (every node's tokens, parent, origin, recency, and the names of its tensors), and per tensor its dtype,
shape and the SHA-256 of its bytes; the manifest's own SHA-256 sits beside it (key ``"hf_marconi_sha256"``), so a
damaged token id in the tree is caught as surely as a damaged tensor.

Saving writes a temporary file next to the target and renames it over the target, so an exception while saving
leaves either the old file or none, never a half-written one, and the store is only read. Loading checks
everything (format, version, fingerprint, layout, sizes, every tensor's dtype, shape and checksum, the tree's
structure) before a single entry enters the store: a file for another model or config, or a corrupted or truncated
file, raises :class:`PersistenceError` and loads nothing.

::

    save_cache(cache, "prefixes.safetensors")
    ...                                           # later, in another process, with the same model
    cache = MarconiCache(model, capacity_bytes=...)
    load_cache(cache, "prefixes.safetensors")
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .cache import MarconiCache, StateShapes
from .states import KVEdge, StateCheckpoint
from .store import StoredEntry

FORMAT_NAME = "hf_marconi.prefix_store"
# 2: the config fingerprint leaves out where the model was loaded from (keys starting with _).
FORMAT_VERSION = 2
MANIFEST_KEY = "hf_marconi"
MANIFEST_DIGEST_KEY = "hf_marconi_sha256"  # SHA-256 of the manifest text: the tree's tokens are covered too
MANIFEST_HMAC_KEY = "hf_marconi_hmac"  # HMAC-SHA256 of the manifest text under the caller's key, when one is given
_DTYPE_BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1,
                "int64": 8, "int32": 4, "uint8": 1}


class PersistenceError(ValueError):
    """A saved cache cannot be loaded (other model, other format, corrupted or truncated file); nothing was loaded."""


def _digest(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes in memory order (any dtype), hashed from the tensor's own memory (no copy of a
    contiguous CPU tensor)."""
    flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(memoryview(flat.numpy())).hexdigest()


def _reject_constant(name: str) -> Any:
    raise ValueError(f"the manifest holds {name}, which no saved cache writes")


def _authenticator(manifest: str, key: bytes) -> str:
    return hmac.new(key, manifest.encode(), hashlib.sha256).hexdigest()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def weights_probe(model: torch.nn.Module, elements: int = 1024) -> str:
    """A digest of the model's weights that is cheap for large models: every parameter's name, dtype, shape and its
    first ``elements`` values. Two models with one config but other weights (another checkpoint, another seed) get
    different probes, which the config fingerprint alone cannot tell apart."""
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        digest.update(f"{name}:{_dtype_name(param.dtype)}:{list(param.shape)}".encode())
        digest.update(_digest(param.detach().reshape(-1)[:elements].to("cpu")).encode())
    return digest.hexdigest()[:16]


def _layout_record(cache: MarconiCache) -> dict[str, Any]:
    layout = cache.layout
    return {
        "kv_layers": list(layout.kv_layers),
        "linear_layers": list(layout.linear_layers),
        "window_layers": list(layout.window_layers),
        "kv_bytes_per_token": cache.sizes.kv_bytes_per_token,
        "checkpoint_bytes": cache.sizes.checkpoint_bytes,
    }


# ---------------------------------------------------------------------------------------------------------- save
def save_cache(cache: MarconiCache, path: str | os.PathLike[str], key: bytes | None = None) -> dict[str, Any]:
    """Write every stored entry of ``cache`` to ``path`` atomically; returns the manifest written.

    ``key``: a secret; the file then carries an HMAC-SHA256 of its manifest (which holds every tensor's SHA-256), and
    ``load_cache(..., key=key)`` accepts only files written with that key. Without a key the checksums prove the file
    is intact, not who wrote it: load only files you wrote. Calls in flight go on meanwhile: the entries are listed
    under the store's lock and copied outside it (stored payloads are replaced, never written in place).
    """
    target = Path(path)
    if target.is_dir():
        raise PersistenceError(f"{target} is a directory; pass a file path such as {target / 'cache.safetensors'}")
    entries = cache.store.entries()  # one consistent set, under the store's lock; payloads are never written in place
    tensors: dict[str, torch.Tensor] = {}
    records = [_entry_record(i, entry, tensors) for i, entry in enumerate(entries)]
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "fingerprint": cache.fingerprint,
        "weights_probe": weights_probe(cache.model),
        "layout": _layout_record(cache),
        "entries": records,
        "tensors": {
            name: {"dtype": _dtype_name(t.dtype), "shape": list(t.shape), "sha256": _digest(t)}
            for name, t in tensors.items()
        },
    }
    _write_atomically(target, tensors, json.dumps(manifest, separators=(",", ":")), key)
    return manifest


def _entry_record(index: int, entry: StoredEntry, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The manifest record of one entry; adds its tensors (contiguous CPU copies) to ``tensors``."""
    edge = entry.edge
    if not isinstance(edge, KVEdge):
        raise PersistenceError(
            f"entry {index} holds a {type(edge).__name__} edge; only real KVEdge states can be saved"
        )
    edge_names = {}
    for layer, (keys, values) in edge.kv.items():
        for part, tensor in (("keys", keys), ("values", values)):
            name = f"entry{index}.kv.{layer}.{part}"
            tensors[name] = tensor.detach().to("cpu", copy=True).contiguous()
            edge_names[f"{layer}.{part}"] = name
    record: dict[str, Any] = {
        "prefix_len": entry.prefix_len,
        "key": list(entry.key),
        "parent": entry.parent,
        "origin": entry.origin,
        "last_access": entry.last_access,
        "edge": {"num_tokens": edge.num_tokens, "tensors": edge_names},
        "checkpoint": None,
    }
    checkpoint = entry.checkpoint
    if checkpoint is not None:
        if not isinstance(checkpoint, StateCheckpoint):
            raise PersistenceError(f"entry {index} holds a {type(checkpoint).__name__} checkpoint; cannot save it")
        names = {}
        for flat, tensor in checkpoint.tensors().items():
            name = f"entry{index}.ckpt.{flat}"
            tensors[name] = tensor.detach().to("cpu", copy=True).contiguous()
            names[flat] = name
        record["checkpoint"] = {
            "tensors": names,
            "window_lengths": {str(i): n for i, (_, _, n) in checkpoint.windows.items()},
        }
    return record


def _write_atomically(target: Path, tensors: dict[str, torch.Tensor], manifest: str, key: bytes | None) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(handle)
    try:
        metadata = {MANIFEST_KEY: manifest, MANIFEST_DIGEST_KEY: hashlib.sha256(manifest.encode()).hexdigest()}
        if key is not None:
            metadata[MANIFEST_HMAC_KEY] = _authenticator(manifest, key)
        save_file(tensors, temp, metadata=metadata)
        with open(temp, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(temp, target)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------------------------- load
def read_manifest(path: str | os.PathLike[str], key: bytes | None = None) -> dict[str, Any]:
    """The JSON manifest of a saved cache (format, fingerprint, layout, entries, tensor dtypes/shapes/checksums),
    authenticated with ``key`` when one is given. Anything malformed raises :class:`PersistenceError`."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise PersistenceError(f"no saved cache at {path}") from None
    except OSError as error:
        raise PersistenceError(f"{path} cannot be read: {error}") from None
    if not stat.S_ISREG(mode):
        raise PersistenceError(f"{path} is not a regular file (a FIFO, device or directory); pass a saved cache file")
    try:
        with safe_open(str(path), framework="pt") as reader:
            metadata = reader.metadata() or {}
    except FileNotFoundError:
        raise PersistenceError(f"no saved cache at {path}") from None
    except (SafetensorError, OSError, ValueError) as error:
        raise PersistenceError(
            f"{path} is not a readable safetensors file (corrupted or truncated?): {error}"
        ) from None
    if MANIFEST_KEY not in metadata:
        raise PersistenceError(f"{path} is a safetensors file without an hf_marconi manifest; save it with save_cache")
    if hashlib.sha256(metadata[MANIFEST_KEY].encode()).hexdigest() != metadata.get(MANIFEST_DIGEST_KEY):
        raise PersistenceError(f"the manifest of {path} fails its SHA-256 check: the file is corrupted")
    if key is not None and not hmac.compare_digest(
        str(metadata.get(MANIFEST_HMAC_KEY, "")), _authenticator(metadata[MANIFEST_KEY], key)
    ):
        raise PersistenceError(
            f"{path} is not authenticated by the given key (written without it, with another key, or altered): "
            "refusing to load it"
        )
    try:
        manifest = json.loads(metadata[MANIFEST_KEY], parse_constant=_reject_constant)
    except (ValueError, RecursionError, OverflowError) as error:  # JSONDecodeError is a ValueError
        raise PersistenceError(f"the manifest of {path} is not valid JSON (corrupted file?): {error}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise PersistenceError(f"{path} holds no {FORMAT_NAME} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise PersistenceError(
            f"{path} was written in format version {manifest.get('format_version')!r}; this hf_marconi reads version "
            f"{FORMAT_VERSION}: save the cache again with this version"
        )
    return manifest


def load_cache(cache: MarconiCache, path: str | os.PathLike[str], key: bytes | None = None) -> int:
    """Load the entries saved at ``path`` into ``cache``, whose store must be empty; returns the number of entries.

    Raises :class:`PersistenceError` (nothing loaded) when the file was saved for another model or config, is not
    authenticated by ``key`` (when given), declares more tensor bytes than the cache holds or tensors no entry uses,
    or is malformed, corrupted or truncated. Sizes and references are checked from the manifest before any tensor is
    read.
    """
    manifest = read_manifest(path, key)
    if manifest.get("fingerprint") != cache.fingerprint:
        raise PersistenceError(
            f"{path} was saved for a model whose config fingerprint is {manifest.get('fingerprint')!r}, but this "
            f"cache's model has {cache.fingerprint!r}: stored states only fit the model (config) they came from"
        )
    if manifest.get("layout") != _layout_record(cache):
        raise PersistenceError(
            f"{path} was saved with state layout {manifest.get('layout')}, this cache has {_layout_record(cache)} "
            "(another dtype or model?)"
        )
    if manifest.get("weights_probe") != weights_probe(cache.model):
        raise PersistenceError(
            f"{path} was saved for a model with other weights (weights probe {manifest.get('weights_probe')!r}, this "
            f"model's is {weights_probe(cache.model)!r}): stored states only fit the weights they came from"
        )
    _check_declared_tensors(path, manifest, cache.store.capacity_bytes)
    tensors = _read_tensors(path, manifest["tensors"])
    devices = cache.layer_devices
    storage = cache.storage_device
    try:
        entries = [_entry_from_record(record, tensors, devices, storage) for record in manifest["entries"]]
    except (KeyError, TypeError, ValueError, OverflowError) as error:
        raise PersistenceError(f"the manifest of {path} describes an invalid entry: {error!r}") from None
    sizes = cache.sizes
    for entry in entries:
        _check_entry_shapes(path, entry, cache.state_shapes)
        checkpoint_bytes = entry.checkpoint.nbytes if entry.checkpoint is not None else sizes.checkpoint_bytes
        if entry.edge.nbytes != len(entry.key) * sizes.kv_bytes_per_token or checkpoint_bytes != sizes.checkpoint_bytes:
            raise PersistenceError(
                f"the entry of prefix_len {entry.prefix_len} in {path} does not have this model's state sizes {sizes}"
            )
    with cache.store.lock:
        if cache.store.nbytes or cache.store.tree.root.children:
            raise PersistenceError(
                f"{path} can only be loaded into an empty MarconiCache; this one holds {cache.store.nbytes} bytes of "
                "states. Load into a freshly built MarconiCache, or call cache.clear() first"
            )
        try:
            cache.store.load_entries(entries)
        except ValueError as error:
            raise PersistenceError(f"{path} cannot be loaded into this cache: {error}") from None
        # Loaded states sit on the layers' devices; a TieredStorage on this cache spills what its fast tier cannot hold.
        tiers = getattr(cache.store, "_hf_marconi_tiers", None)
        if tiers is not None:
            tiers.rebalance()
    return len(entries)


def _check_entry_shapes(path: str | os.PathLike[str], entry: StoredEntry, shapes: "StateShapes") -> None:
    """An entry's tensors have exactly this cache's layers, shapes and dtypes (else a hit would fail, or compute
    garbage, long after loading)."""
    edge, checkpoint = entry.edge, entry.checkpoint
    if set(edge.kv) != set(shapes.kv):
        raise PersistenceError(f"the entry of prefix_len {entry.prefix_len} in {path} has KV of layers "
                               f"{sorted(edge.kv)}, this cache has {sorted(shapes.kv)}")
    for layer, (keys, values) in edge.kv.items():
        heads, head_dim, dtype = shapes.kv[layer]
        for tensor in (keys, values):
            if (tensor.dim() != 4 or (tensor.shape[0], tensor.shape[1], tensor.shape[3]) != (1, heads, head_dim)
                    or tensor.dtype != dtype):
                raise PersistenceError(f"the entry of prefix_len {entry.prefix_len} in {path} has layer {layer} KV "
                                       f"of shape {list(tensor.shape)} {tensor.dtype}, this cache [1, {heads}, n, "
                                       f"{head_dim}] {dtype}")
    if checkpoint is not None:
        found = {name: (tuple(t.shape), t.dtype) for name, t in checkpoint.tensors().items()}
        if found != shapes.checkpoint:
            raise PersistenceError(f"the checkpoint of prefix_len {entry.prefix_len} in {path} does not have this "
                                   "cache's state tensors (names, shapes, dtypes)")


def _check_declared_tensors(path: str | os.PathLike[str], manifest: dict[str, Any], capacity_bytes: int) -> None:
    """Before reading any tensor: the manifest's tensor table is well formed, every tensor is used by an entry, and
    their bytes together fit the cache's capacity (a hostile file cannot make the loader allocate more)."""
    declared, entries = manifest.get("tensors"), manifest.get("entries")
    if not isinstance(declared, dict) or not isinstance(entries, list):
        raise PersistenceError(f"the manifest of {path} lacks its tensor table or entry list")
    total = 0
    for name, facts in declared.items():
        shape = facts.get("shape") if isinstance(facts, dict) else None
        dtype = facts.get("dtype") if isinstance(facts, dict) else None
        if (dtype not in _DTYPE_BYTES or not isinstance(shape, list)
                or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
                or not isinstance(facts.get("sha256"), str)):
            raise PersistenceError(f"the manifest of {path} describes tensor {name!r} malformedly: {facts!r:.200}")
        count = 1
        for n in shape:
            count *= n
        total += count * _DTYPE_BYTES[dtype]
    if total > capacity_bytes:
        raise PersistenceError(
            f"{path} declares {total} bytes of tensors, more than this cache's capacity ({capacity_bytes} bytes): "
            "refusing to read them"
        )
    used: list[str] = []
    try:
        for record in entries:
            used.extend(record["edge"]["tensors"].values())
            if record.get("checkpoint") is not None:
                used.extend(record["checkpoint"]["tensors"].values())
    except (AttributeError, KeyError, TypeError) as error:
        raise PersistenceError(f"the manifest of {path} describes an invalid entry: {error!r}") from None
    if len(used) != len(set(used)):
        raise PersistenceError(f"{path} uses one tensor in several places; each stored tensor belongs to one entry")
    if set(declared) != set(used):
        unused, missing = sorted(set(declared) - set(used))[:5], sorted(set(used) - set(declared))[:5]
        raise PersistenceError(f"{path} declares tensors no entry uses ({unused}) or misses some ({missing})")


def _read_tensors(path: str | os.PathLike[str], expected: dict[str, dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Every tensor of the file, checked against the manifest's dtype, shape and SHA-256."""
    tensors = {}
    try:
        with safe_open(str(path), framework="pt") as reader:
            names = set(reader.keys())
            if names != set(expected):
                raise PersistenceError(
                    f"{path} holds tensors {sorted(names ^ set(expected))[:5]} that differ from its manifest"
                )
            for name, facts in expected.items():
                # An own copy: a tensor read from the file stays mapped from it, so writing or truncating the file later
                # would change (or crash) stored states that passed the checks below.
                tensor = reader.get_tensor(name).clone()
                if _dtype_name(tensor.dtype) != facts["dtype"] or list(tensor.shape) != facts["shape"]:
                    raise PersistenceError(
                        f"tensor {name} of {path} is {_dtype_name(tensor.dtype)} {list(tensor.shape)}, its manifest "
                        f"says {facts['dtype']} {facts['shape']}"
                    )
                if _digest(tensor) != facts["sha256"]:
                    raise PersistenceError(f"tensor {name} of {path} fails its SHA-256 check: the file is corrupted")
                tensors[name] = tensor
    except (SafetensorError, OSError) as error:
        raise PersistenceError(f"{path} cannot be read (corrupted or truncated?): {error}") from None
    return tensors


def _entry_from_record(
    record: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    devices: dict[int, torch.device],
    storage: Any,
) -> StoredEntry:
    def placed(name: str, layer: int) -> torch.Tensor:
        return tensors[name].to(storage if storage is not None else devices[layer])

    edge_names = record["edge"]["tensors"]
    kv = {}
    for label in edge_names:
        layer = int(label.split(".")[0])
        kv[layer] = (placed(edge_names[f"{layer}.keys"], layer), placed(edge_names[f"{layer}.values"], layer))
    edge = KVEdge(int(record["edge"]["num_tokens"]), kv)
    for keys, values in kv.values():
        if keys.shape[-2] != edge.num_tokens or values.shape[-2] != edge.num_tokens:
            raise ValueError(f"edge tensors of prefix_len {record['prefix_len']} do not hold {edge.num_tokens} tokens")
    checkpoint = None
    if record["checkpoint"] is not None:
        names = record["checkpoint"]["tensors"]
        lengths = record["checkpoint"]["window_lengths"]
        checkpoint = StateCheckpoint()
        for flat, name in names.items():
            kind, layer, part = flat.split(".")
            if kind == "conv":
                checkpoint.conv[(int(layer), int(part))] = placed(name, int(layer))
            elif kind == "recurrent":
                checkpoint.recurrent[(int(layer), int(part))] = placed(name, int(layer))
            elif kind == "window" and part == "keys":
                values = placed(names[f"window.{layer}.values"], int(layer))
                checkpoint.windows[int(layer)] = (placed(name, int(layer)), values, int(lengths[layer]))
            elif kind != "window":
                raise ValueError(f"unknown checkpoint tensor {flat!r}")
    return StoredEntry(
        prefix_len=int(record["prefix_len"]),
        key=tuple(int(t) for t in record["key"]),
        parent=int(record["parent"]),
        edge=edge,
        checkpoint=checkpoint,
        origin=record["origin"],
        last_access=int(record["last_access"]),
    )
