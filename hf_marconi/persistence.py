"""Saving a MarconiCache's stored states to disk and loading them back, without pickle.

One safetensors file (format version 3). The tree and the states are tensors, so the file's header has the same
size however many tokens and nodes are stored (safetensors caps a header at 100 MB). With N nodes (parents before
children), T tokens, C checkpoints and K key namespaces:

- ``tree.offsets`` int64 [N + 1]: node i's tokens are ``tree.tokens[offsets[i]:offsets[i + 1]]``;
- ``tree.tokens`` int64 [T]: each key as ``namespace << 32 | token id``, where namespace 0 is the shared space and
  namespace j >= 1 is row j - 1 of ``tree.namespaces`` uint8 [K, 33] (the big-endian ``key >> 32`` of a
  :class:`~hf_marconi.generation.CacheSalt` key, which is too large for int64);
- ``tree.parents`` int64 [N] (-1 for the root), ``tree.origins`` uint8 [N] (0: no checkpoint, 1: purely input,
  2: input and output), ``tree.last_access`` int64 [N];
- ``kv.{layer}.keys`` / ``kv.{layer}.values`` [T * heads * head_dim]: every node's ``[1, heads, n, head_dim]`` edge
  tensor, flattened, in node order (node i's part starts at ``offsets[i] * heads * head_dim``);
- ``ckpt.{name}`` [C, *shape]: the checkpoints of the nodes with an origin, in node order, one tensor per state
  tensor name; ``tree.window_lengths`` int64 [C, window layers]: each checkpoint's sliding-window lengths (only for
  models with sliding-window layers).

The header metadata holds a JSON manifest under ``"hf_marconi"`` with only fixed-size facts: format and version,
config fingerprint, weights probe, state layout, the counts N, T, C, K, and per tensor its dtype, shape and SHA-256;
the manifest's own SHA-256 sits beside it (``"hf_marconi_sha256"``), so a damaged token id is caught as surely as a
damaged state, and an optional HMAC of the manifest (``"hf_marconi_hmac"``) authenticates the whole file.

Saving writes a temporary file next to the target and renames it over the target, so an exception while saving
leaves either the old file or none, never a half-written one, and the store is only read. Loading treats the file as
input from outside: the counts, and from them every tensor's dtype and shape, are checked against this cache's layout
and capacity before any tensor is read; the tree (offsets, parents, origins, token ids, namespaces) is checked
before any state is copied; every tensor's bytes are hashed as they are copied out of the file. A file for another
model or config, or a malformed, corrupted or truncated file, raises :class:`PersistenceError` and loads nothing.

::

    save_cache(cache, "prefixes.safetensors")
    ...                                           # later, in another process, with the same model
    cache = MarconiCache(model, capacity_bytes=...)
    load_cache(cache, "prefixes.safetensors")
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any, NoReturn, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .cache import MarconiCache
from .states import DeviceSpec, KVEdge, StateCheckpoint
from .snapshot import StoredEntry, StoreSnapshot
from .tree import INPUT_OUTPUT, PURELY_INPUT

FORMAT_NAME = "hf_marconi.prefix_store"
# 2: the config fingerprint leaves out where the model was loaded from (keys starting with _).
# 3: the tree is stored as tensors; the manifest holds only fixed-size facts (no header cap on stored tokens).
FORMAT_VERSION = 3
MANIFEST_KEY = "hf_marconi"
MANIFEST_DIGEST_KEY = "hf_marconi_sha256"  # SHA-256 of the manifest text, which holds every tensor's SHA-256
MANIFEST_HMAC_KEY = "hf_marconi_hmac"  # HMAC-SHA256 of the manifest text under the caller's key, when one is given
COUNTS = ("nodes", "tokens", "checkpoints", "namespaces")
ORIGINS = (None, PURELY_INPUT, INPUT_OUTPUT)  # the codes of tree.origins
NAMESPACE_BYTES = 33  # a CacheSalt namespace (a SHA-256 digest + 1) needs up to 257 bits
_TOKEN_BITS = 32  # token ids are below 2**32; CacheSalt keys add their namespace above them
_TOKEN_MASK = (1 << _TOKEN_BITS) - 1


class PersistenceError(ValueError):
    """A saved cache cannot be loaded (other model, other format, corrupted or truncated file); nothing was loaded."""


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor (any dtype) in memory order, without a copy."""
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def _digest(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes in memory order (no copy of a contiguous CPU tensor)."""
    return hashlib.sha256(_bytes_of(tensor.detach().contiguous())).hexdigest()


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


def _expected_tensors(cache: MarconiCache, counts: dict[str, int]) -> dict[str, tuple[torch.dtype, list[int]]]:
    """Every tensor of a file holding ``counts`` (see the module docstring) for this cache: name -> (dtype, shape)."""
    nodes, tokens, checkpoints = counts["nodes"], counts["tokens"], counts["checkpoints"]
    table = {
        "tree.offsets": (torch.int64, [nodes + 1]),
        "tree.tokens": (torch.int64, [tokens]),
        "tree.namespaces": (torch.uint8, [counts["namespaces"], NAMESPACE_BYTES]),
        "tree.parents": (torch.int64, [nodes]),
        "tree.origins": (torch.uint8, [nodes]),
        "tree.last_access": (torch.int64, [nodes]),
    }
    if cache.layout.window_layers:
        table["tree.window_lengths"] = (torch.int64, [checkpoints, len(cache.layout.window_layers)])
    for layer, (heads, head_dim, dtype) in cache.state_shapes.kv.items():
        for part in ("keys", "values"):
            table[f"kv.{layer}.{part}"] = (dtype, [tokens * heads * head_dim])
    for name, (shape, dtype) in cache.state_shapes.checkpoint.items():
        table[f"ckpt.{name}"] = (dtype, [checkpoints, *shape])
    return table


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
    snapshot = cache.store.snapshot()  # one consistent set, under the store's lock; payloads are never written in place
    counts, tensors = _tensors_of(snapshot.entries, cache)
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "fingerprint": cache.fingerprint,
        "weights_probe": weights_probe(cache.model),
        "layout": _layout_record(cache),
        "counts": counts,
        "tensors": {
            name: {"dtype": _dtype_name(t.dtype), "shape": list(t.shape), "sha256": _digest(t)}
            for name, t in tensors.items()
        },
    }
    _write_atomically(target, tensors, json.dumps(manifest, separators=(",", ":")), key)
    return manifest


def _tensors_of(entries: Sequence[StoredEntry], cache: MarconiCache) -> tuple[dict[str, int], dict[str, torch.Tensor]]:
    """The counts and the tensors (CPU copies) of a file holding ``entries``."""
    shapes = cache.state_shapes
    for index, entry in enumerate(entries):
        _check_saveable(index, entry, cache)
    tokens, namespaces = _encode_keys(entries)
    checkpoints = [entry.checkpoint for entry in entries if entry.checkpoint is not None]
    counts = {"nodes": len(entries), "tokens": len(tokens), "checkpoints": len(checkpoints),
              "namespaces": len(namespaces)}
    offsets = [0, *itertools.accumulate(len(entry.key) for entry in entries)]
    tensors = {
        "tree.offsets": torch.tensor(offsets, dtype=torch.int64),
        "tree.tokens": tokens,
        "tree.namespaces": namespaces,
        "tree.parents": torch.tensor([entry.parent for entry in entries], dtype=torch.int64),
        "tree.origins": torch.tensor([ORIGINS.index(entry.origin) for entry in entries], dtype=torch.uint8),
        "tree.last_access": torch.tensor([entry.last_access for entry in entries], dtype=torch.int64),
    }
    for name, (dtype, shape) in _expected_tensors(cache, counts).items():
        if name not in tensors:  # the states, filled below
            tensors[name] = torch.empty(shape, dtype=dtype)
    for entry, start, end in zip(entries, offsets, offsets[1:]):
        for layer, pair in entry.edge.kv.items():
            heads, head_dim, _ = shapes.kv[layer]
            for part, tensor in zip(("keys", "values"), pair):
                span = tensors[f"kv.{layer}.{part}"][start * heads * head_dim:end * heads * head_dim]
                span.view_as(tensor).copy_(tensor)
    windows = cache.layout.window_layers
    for row, checkpoint in enumerate(checkpoints):
        for name, tensor in checkpoint.tensors().items():
            tensors[f"ckpt.{name}"][row].copy_(tensor)
        if windows:
            tensors["tree.window_lengths"][row] = torch.tensor([checkpoint.windows[i][2] for i in windows])
    return counts, tensors


def _check_saveable(index: int, entry: StoredEntry, cache: MarconiCache) -> None:
    """An entry holds real states of exactly this cache's layers, shapes and dtypes (what the file's layout assumes)."""
    edge, checkpoint, shapes = entry.edge, entry.checkpoint, cache.state_shapes
    if not isinstance(edge, KVEdge):
        raise PersistenceError(
            f"entry {index} holds a {type(edge).__name__} edge; only real KVEdge states can be saved"
        )
    if set(edge.kv) != set(shapes.kv) or any(
        (*tensor.shape, tensor.dtype) != (1, heads, len(entry.key), head_dim, dtype)
        for layer, (heads, head_dim, dtype) in shapes.kv.items() for tensor in edge.kv[layer]
    ):
        raise PersistenceError(f"entry {index} holds KV whose layers, shapes or dtypes are not this cache's")
    if checkpoint is not None and (
        not isinstance(checkpoint, StateCheckpoint)
        or {name: (tuple(t.shape), t.dtype) for name, t in checkpoint.tensors().items()} != shapes.checkpoint
    ):
        raise PersistenceError(f"entry {index} holds a checkpoint whose tensors (names, shapes, dtypes) are not this "
                               "cache's")


def _encode_keys(entries: Sequence[StoredEntry]) -> tuple[torch.Tensor, torch.Tensor]:
    """``tree.tokens`` and ``tree.namespaces``: a key below 2**32 is stored as is, a larger one (a CacheSalt key) as
    ``j << 32 | key & 0xFFFFFFFF`` with ``key >> 32`` in row j - 1 of the namespace table."""
    spaces: dict[int, int] = {}  # namespace -> j
    codes: list[int] = []
    for index, entry in enumerate(entries):
        key = entry.key
        if 0 <= min(key) and max(key) <= _TOKEN_MASK:
            codes.extend(key)
            continue
        for token in key:
            space = token >> _TOKEN_BITS
            if token < 0 or space.bit_length() > 8 * NAMESPACE_BYTES:
                raise PersistenceError(
                    f"entry {index} has key {token}, which is neither a token id nor a CacheSalt key"
                )
            j = spaces.setdefault(space, len(spaces) + 1) if space else 0
            codes.append(j << _TOKEN_BITS | token & _TOKEN_MASK)
    table = [list(space.to_bytes(NAMESPACE_BYTES, "big")) for space in spaces]
    return (torch.tensor(codes, dtype=torch.int64),
            torch.tensor(table, dtype=torch.uint8).reshape(len(table), NAMESPACE_BYTES))


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
    """The JSON manifest of a saved cache (format, fingerprint, layout, counts, tensor dtypes/shapes/checksums),
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
    authenticated by ``key`` (when given), declares more state bytes than the cache holds, or tensors its counts and
    this cache's layout do not make, or is malformed, corrupted or truncated. Counts, dtypes and shapes are checked
    from the manifest before any tensor is read, and the tree before any state is copied.
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
    counts = _check_declared_tensors(path, manifest, cache)
    snapshot = _read_snapshot(path, manifest["tensors"], counts, cache)
    with cache.store.lock:
        if cache.store.nbytes or cache.store.tree.root.children:
            raise PersistenceError(
                f"{path} can only be loaded into an empty MarconiCache; this one holds {cache.store.nbytes} bytes of "
                "states. Load into a freshly built MarconiCache, or call cache.clear() first"
            )
        try:
            cache.store.load_snapshot(snapshot)
        except ValueError as error:
            raise PersistenceError(f"{path} cannot be loaded into this cache: {error}") from None
    return len(snapshot.entries)


def _check_declared_tensors(
    path: str | os.PathLike[str], manifest: dict[str, Any], cache: MarconiCache
) -> dict[str, int]:
    """Before reading any tensor: the counts are well formed and their states fit the cache's capacity, and the tensor
    table is exactly what the counts and this cache's layout make it (no tensor missing or unused, each with its
    dtype and shape), so a hostile file cannot make the loader allocate more. Returns the counts."""
    counts, declared = manifest.get("counts"), manifest.get("tensors")
    if (not isinstance(declared, dict) or not isinstance(counts, dict) or set(counts) != set(COUNTS)
            or not all(type(counts[name]) is int and counts[name] >= 0 for name in COUNTS)):
        raise PersistenceError(f"the manifest of {path} lacks its tensor table or its counts {COUNTS} "
                               f"(non-negative ints): {counts!r:.200}")
    if not counts["checkpoints"] <= counts["nodes"] <= counts["tokens"] or counts["namespaces"] > counts["tokens"]:
        raise PersistenceError(f"the counts of {path} are inconsistent ({counts}): every node holds at least one token "
                               "and at most one checkpoint, every namespace at least one token")
    sizes, capacity = cache.sizes, cache.store.capacity_bytes
    total = counts["tokens"] * sizes.kv_bytes_per_token + counts["checkpoints"] * sizes.checkpoint_bytes
    if total > capacity:
        raise PersistenceError(
            f"{path} declares {total} bytes of states, more than this cache's capacity ({capacity} bytes): "
            "refusing to read them"
        )
    expected = _expected_tensors(cache, counts)
    if set(declared) != set(expected):
        unused, missing = sorted(set(declared) - set(expected))[:5], sorted(set(expected) - set(declared))[:5]
        raise PersistenceError(f"{path} declares tensors that no part of the tree or states uses ({unused}) or misses "
                               f"some ({missing})")
    for name, (dtype, shape) in expected.items():
        facts = declared[name]
        if (not isinstance(facts, dict) or facts.get("dtype") != _dtype_name(dtype) or facts.get("shape") != shape
                or not isinstance(facts.get("sha256"), str)):
            raise PersistenceError(f"the manifest of {path} describes tensor {name!r} as {facts!r:.200}; its counts "
                                   f"and this cache's layout make it {_dtype_name(dtype)} {shape}")
    return counts


def _read_snapshot(
    path: str | os.PathLike[str], declared: dict[str, dict[str, Any]], counts: dict[str, int], cache: MarconiCache
) -> StoreSnapshot:
    """The file's entries, placed where this cache keeps states, with the clock at their latest access. Every tensor is
    checked against the manifest's dtype, shape and SHA-256, and the tree before any state is copied."""
    try:
        with safe_open(str(path), framework="pt") as reader:
            differing = sorted(set(reader.keys()) ^ set(declared))[:5]
            if differing:
                raise PersistenceError(f"{path} holds tensors {differing} that differ from its manifest")
            mapped = {name: reader.get_tensor(name) for name in declared}  # views of the file, nothing copied yet
            for name, tensor in mapped.items():
                facts = declared[name]
                if _dtype_name(tensor.dtype) != facts["dtype"] or list(tensor.shape) != facts["shape"]:
                    raise PersistenceError(
                        f"tensor {name} of {path} is {_dtype_name(tensor.dtype)} {list(tensor.shape)}, its manifest "
                        f"says {facts['dtype']} {facts['shape']}"
                    )

            def copied(name: str, bounds: Sequence[int], device: DeviceSpec) -> list[torch.Tensor]:
                return _copy_checked(path, name, mapped[name], declared[name]["sha256"], bounds, device)

            tree = {name: copied(name, [0, len(t)], "cpu")[0] for name, t in mapped.items() if name.startswith("tree.")}
            bounds, keys = _decode_tree(path, tree, counts, cache.vocab_size)
            devices, storage = cache.layer_devices, cache.storage_device

            def device(layer: int) -> DeviceSpec:
                return storage if storage is not None else devices[layer]

            kv = {}
            for layer, (heads, head_dim, _) in cache.state_shapes.kv.items():
                scaled = [bound * heads * head_dim for bound in bounds]
                kv[layer] = [
                    [piece.view(1, heads, -1, head_dim) for piece in copied(name, scaled, device(layer))]
                    for name in (f"kv.{layer}.keys", f"kv.{layer}.values")
                ]
            rows = range(counts["checkpoints"] + 1)
            states = {
                name: [piece.view(shape) for piece in copied(f"ckpt.{name}", rows, device(int(name.split(".")[1])))]
                for name, (shape, _) in cache.state_shapes.checkpoint.items()
            }
    except (SafetensorError, OSError) as error:
        raise PersistenceError(f"{path} cannot be read (corrupted or truncated?): {error}") from None
    lengths = tree["tree.window_lengths"].tolist() if "tree.window_lengths" in tree else [[]] * counts["checkpoints"]
    parents, origins, clock = (tree[name].tolist() for name in ("tree.parents", "tree.origins", "tree.last_access"))
    entries: list[StoredEntry] = []
    row = 0
    for index, key in enumerate(keys):
        parent = parents[index]
        checkpoint = None
        if origins[index]:
            windows = dict(zip(cache.layout.window_layers, lengths[row]))
            checkpoint = _checkpoint_of({name: pieces[row] for name, pieces in states.items()}, windows)
            row += 1
        edge = KVEdge(len(key), {layer: (pair[0][index], pair[1][index]) for layer, pair in kv.items()})
        prefix_len = (entries[parent].prefix_len if parent >= 0 else 0) + len(key)
        entries.append(StoredEntry(prefix_len, key, parent, edge, checkpoint, ORIGINS[origins[index]], clock[index]))
    return StoreSnapshot(tuple(entries), max(clock, default=0))


def _copy_checked(
    path: str | os.PathLike[str], name: str, mapped: torch.Tensor, sha256: str, bounds: Sequence[int],
    device: DeviceSpec,
) -> list[torch.Tensor]:
    """Own copies of ``mapped[a:b]`` for consecutive ``bounds`` (which tile its first dimension), on ``device``; their
    bytes, hashed as they are copied, must have the SHA-256 ``sha256``.

    Copies, because a tensor read from the file stays mapped from it: writing or truncating the file later would
    change (or crash) stored states that passed the checks."""
    digest = hashlib.sha256()
    pieces = []
    for start, end in zip(bounds, bounds[1:]):
        piece = mapped[start:end].clone()
        digest.update(_bytes_of(piece))
        pieces.append(piece.to(device))
    if digest.hexdigest() != sha256:
        raise PersistenceError(f"tensor {name} of {path} fails its SHA-256 check: the file is corrupted")
    return pieces


def _decode_tree(
    path: str | os.PathLike[str], tree: dict[str, torch.Tensor], counts: dict[str, int], vocab_size: int
) -> tuple[list[int], list[tuple[int, ...]]]:
    """Check the tree tensors (offsets, parents, origins, clock, window lengths, token ids, namespaces); returns the
    token offsets and every node's key. The store checks the rest when it builds the tree (prefix lengths, siblings,
    which nodes need a checkpoint)."""
    offsets, parents, origins, codes = (tree[name] for name in ("tree.offsets", "tree.parents", "tree.origins",
                                                                "tree.tokens"))

    def refuse(problem: str) -> NoReturn:
        raise PersistenceError(f"the tree of {path} is invalid: {problem}")

    if int(offsets[0]) != 0 or int(offsets[-1]) != counts["tokens"] or bool((offsets[1:] <= offsets[:-1]).any()):
        refuse(f"tree.offsets must rise strictly from 0 to the {counts['tokens']} tokens (every node holds a token)")
    if bool(((parents < -1) | (parents >= torch.arange(counts["nodes"]))).any()):
        refuse("tree.parents names a parent that is not listed before its child (nor -1, the root)")
    if bool((origins >= len(ORIGINS)).any()) or int((origins > 0).sum()) != counts["checkpoints"]:
        refuse(f"tree.origins must hold codes below {len(ORIGINS)}, non-zero for the {counts['checkpoints']} "
               "checkpointed nodes")
    if any(bool((tree[name] < 0).any()) for name in ("tree.last_access", "tree.window_lengths") if name in tree):
        refuse("tree.last_access or tree.window_lengths holds a negative value")
    spaces, ids = codes >> _TOKEN_BITS, codes & _TOKEN_MASK
    if bool(((codes < 0) | (spaces > counts["namespaces"])).any()):
        refuse(f"tree.tokens holds a negative code or a namespace outside the {counts['namespaces']} stored")
    if bool((ids >= vocab_size).any()):
        refuse(f"tree.tokens holds a token id outside this model's vocabulary ({vocab_size})")
    table = [int.from_bytes(bytes(row), "big") for row in tree["tree.namespaces"].tolist()]
    if 0 in table or len(set(table)) != len(table) or len(torch.unique(spaces[spaces > 0])) != len(table):
        refuse("tree.namespaces must hold distinct non-zero namespaces, each used by a token")
    shifts = [0] + [space << _TOKEN_BITS for space in table]
    flat = codes.tolist() if not table else [shifts[s] + t for s, t in zip(spaces.tolist(), ids.tolist())]
    bounds = offsets.tolist()
    return bounds, [tuple(flat[start:end]) for start, end in zip(bounds, bounds[1:])]


def _checkpoint_of(named: dict[str, torch.Tensor], window_lengths: dict[int, int]) -> StateCheckpoint:
    """The checkpoint holding ``named`` tensors (this cache's flat names, as ``StateCheckpoint.tensors`` gives them)."""
    checkpoint = StateCheckpoint()
    for name, tensor in named.items():
        kind, layer, part = name.split(".")
        if kind == "conv":
            checkpoint.conv[(int(layer), int(part))] = tensor
        elif kind == "recurrent":
            checkpoint.recurrent[(int(layer), int(part))] = tensor
        elif part == "keys":
            checkpoint.windows[int(layer)] = (tensor, named[f"window.{layer}.values"], window_lengths[int(layer)])
    return checkpoint
