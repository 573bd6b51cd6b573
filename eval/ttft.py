"""Time to first token (TTFT) modelled from a prefill-latency profile measured with a real hybrid model.

The profile times one forward of ``E`` new tokens on top of a cached prefix of ``P`` tokens, on a grid of
``(P, E)``, with a small transformers Bamba model (Mamba2 + attention, random weights) on the machine at hand. A
fit of the form ::

    latency(P, E) = a + b * E + c * (P * E + E * (E + 1) / 2)

(a fixed cost, a per-token cost of projections, scans and MLPs, and a per-(query, key)-pair cost of attention,
the same structure as :meth:`hf_marconi.costs.CostModel.extend_flops`) turns the grid into a latency for any
request. The modelled TTFT of a request whose first ``P`` input tokens were restored from the cache is
``latency(P, len(input) - P)``: prefill of the uncached suffix only. Queueing is not modelled (each request is
served alone, as in the measured replay of :mod:`eval.ttft_replay`), nor the time to copy states in and out of
the cache (the measured replay includes it).

The profile is a JSON file (:meth:`PrefillProfile.save`); :func:`load_or_measure_profile` reuses it when present.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import numpy as np

PROFILE_FORMAT = 1
DEFAULT_PREFIX_LENS: tuple[int, ...] = (0, 1024, 4096, 8192)
DEFAULT_EXTEND_LENS: tuple[int, ...] = (16, 128, 512, 2048)


@dataclass(frozen=True)
class ProfileModelSpec:
    """The small Bamba model the profile and the measured replay use (random weights, float32, CPU).

    Attention sits at the layers in ``attention_layers``; every other layer is a Mamba2 mixer (expand 2). Each
    layer has a gated MLP of width ``mlp_ratio * hidden_size``.
    """

    hidden_size: int = 256
    num_layers: int = 4
    attention_layers: tuple[int, ...] = (1, 3)
    num_heads: int = 8
    num_kv_heads: int = 4
    mamba_heads: int = 8
    mamba_state: int = 64
    mlp_ratio: int = 3
    vocab_size: int = 4096
    scan_chunk_size: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(f"hidden_size must divide by num_heads and num_heads by num_kv_heads, got {self}")
        if not self.attention_layers or any(not 0 <= i < self.num_layers for i in self.attention_layers):
            raise ValueError(f"attention_layers must be non-empty indices below num_layers, got {self}")
        if len(self.attention_layers) == self.num_layers:
            raise ValueError("the profile model needs at least one Mamba2 layer (all layers are attention)")

    def config(self) -> Any:
        """The ``transformers.BambaConfig``."""
        import transformers

        return transformers.BambaConfig(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, num_hidden_layers=self.num_layers,
            intermediate_size=self.mlp_ratio * self.hidden_size, num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads, attn_layer_indices=list(self.attention_layers),
            mamba_n_heads=self.mamba_heads, mamba_d_head=2 * self.hidden_size // self.mamba_heads, mamba_n_groups=1,
            mamba_d_state=self.mamba_state, mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=self.scan_chunk_size,
            pad_token_id=0, bos_token_id=1, eos_token_id=2,
        )

    def build(self) -> Any:
        """The model (``BambaForCausalLM``) with random weights drawn from ``seed``, float32, eval mode."""
        import torch
        import transformers

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = transformers.BambaForCausalLM(self.config())
        return model.float().eval()


def _pairs(prefix_len: float, extend_len: float) -> float:
    return prefix_len * extend_len + extend_len * (extend_len + 1) / 2


def _features(prefix_len: float, extend_len: float) -> tuple[float, float, float]:
    return (1.0, float(extend_len), _pairs(prefix_len, extend_len))


def fit_latency(points: Sequence[tuple[int, int, float]]) -> tuple[float, float, float]:
    """Non-negative coefficients ``(a, b, c)`` of the latency form (module docstring) that minimise the squared
    *relative* error over ``(prefix_len, extend_len, seconds)`` points.

    Every subset of the three terms is fitted by least squares and the best fit with no negative coefficient
    wins (an exact non-negative least squares for three unknowns)."""
    if len(points) < 3:
        raise ValueError(f"a latency fit needs at least 3 measured points, got {len(points)}")
    if any(s <= 0 for _, _, s in points):
        raise ValueError("measured latencies must be positive seconds")
    seconds = np.array([s for _, _, s in points])
    design = np.array([_features(p, e) for p, e, _ in points]) / seconds[:, None]
    target = np.ones(len(points))
    best: tuple[float, np.ndarray] | None = None
    for size in (1, 2, 3):
        for terms in itertools.combinations(range(3), size):
            coef, *_ = np.linalg.lstsq(design[:, terms], target, rcond=None)
            if (coef < 0).any():
                continue
            full = np.zeros(3)
            full[list(terms)] = coef
            error = float(((design @ full - target) ** 2).sum())
            if best is None or error < best[0] - 1e-15:
                best = (error, full)
    assert best is not None  # a single term always fits non-negatively (positive features and targets)
    a, b, c = (float(x) for x in best[1])
    return a, b, c


@dataclass(frozen=True)
class PrefillProfile:
    """Measured prefill latencies on a ``(prefix_len, extend_len)`` grid and their fit (module docstring).

    ``seconds[i][j]`` is the median time of extending a ``prefix_lens[i]``-token cached prefix by
    ``extend_lens[j]`` tokens, over ``repeats`` runs; ``coefficients`` is the fit ``(a, b, c)`` of those times
    (build with :meth:`fitted`).
    """

    prefix_lens: tuple[int, ...]
    extend_lens: tuple[int, ...]
    seconds: tuple[tuple[float, ...], ...]
    repeats: int
    model: dict[str, Any]
    machine: dict[str, Any]
    coefficients: tuple[float, float, float]

    def __post_init__(self) -> None:
        if len(self.seconds) != len(self.prefix_lens) or any(len(r) != len(self.extend_lens) for r in self.seconds):
            raise ValueError("seconds must have one row per prefix length and one column per extend length")

    @classmethod
    def fitted(cls, prefix_lens: Sequence[int], extend_lens: Sequence[int], seconds: Sequence[Sequence[float]],
               repeats: int, model: dict[str, Any], machine: dict[str, Any]) -> "PrefillProfile":
        """A profile of the measured grid with its latency fit."""
        rows = tuple(tuple(float(s) for s in row) for row in seconds)
        points = [(p, e, s) for p, row in zip(prefix_lens, rows) for e, s in zip(extend_lens, row)]
        return cls(tuple(prefix_lens), tuple(extend_lens), rows, repeats, model, machine, fit_latency(points))

    def points(self) -> list[tuple[int, int, float]]:
        return [(p, e, s) for p, row in zip(self.prefix_lens, self.seconds) for e, s in zip(self.extend_lens, row)]

    def latency(self, prefix_len: int | np.ndarray, extend_len: int | np.ndarray) -> float | np.ndarray:
        """Modelled seconds to prefill ``extend_len`` tokens after a cached ``prefix_len``-token prefix."""
        a, b, c = self.coefficients
        prefix = np.asarray(prefix_len, dtype=np.float64)
        extend = np.asarray(extend_len, dtype=np.float64)
        if (prefix < 0).any() or (extend < 1).any():
            raise ValueError("prefix_len must be >= 0 and extend_len >= 1 (a request feeds at least one token)")
        out = a + b * extend + c * _pairs(prefix, extend)
        return float(out) if out.ndim == 0 else out

    def fit_error(self) -> float:
        """Largest relative error of the fit over the measured grid."""
        return max(abs(self.latency(p, e) - s) / s for p, e, s in self.points())

    def ttft(self, reused: Sequence[int] | np.ndarray, input_lens: Sequence[int] | np.ndarray) -> np.ndarray:
        """Modelled TTFT (seconds) of requests with ``input_lens`` tokens of which the first ``reused`` were restored
        from the cache: the prefill of the rest."""
        reused_arr = np.asarray(reused, dtype=np.int64)
        inputs = np.asarray(input_lens, dtype=np.int64)
        if reused_arr.shape != inputs.shape:
            raise ValueError(f"reused and input_lens differ in shape: {reused_arr.shape} vs {inputs.shape}")
        if (reused_arr >= inputs).any():
            raise ValueError("a request reuses at most all but its last input token (reused < input length)")
        return np.asarray(self.latency(reused_arr, inputs - reused_arr), dtype=np.float64).reshape(inputs.shape)

    # ---------------------------------------------------------------------------------------------- files
    def asdict(self) -> dict[str, Any]:
        out = asdict(self)
        out["format"] = PROFILE_FORMAT
        out["fit"] = {"form": "a + b*E + c*(P*E + E*(E+1)/2) seconds", "max_relative_error": self.fit_error()}
        return out

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.asdict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "PrefillProfile":
        """Read a saved profile; the fit is recomputed from the measured seconds (the stored one is for readers)."""
        data = json.loads(Path(path).read_text())
        if data.get("format") != PROFILE_FORMAT:
            raise ValueError(
                f"{path} holds a profile of format {data.get('format')!r}, expected {PROFILE_FORMAT}; "
                "measure it again with `python -m eval ttft profile --force`"
            )
        return cls.fitted(data["prefix_lens"], data["extend_lens"], data["seconds"], data["repeats"], data["model"],
                          data["machine"])


@dataclass(frozen=True)
class ComputeBoundPrefill:
    """TTFT of a model known only by its config: the prefill FLOPs of the uncached suffix
    (:meth:`hf_marconi.costs.CostModel.extend_flops`) divided by a sustained prefill throughput. No fixed cost, no
    queueing, restoring states taken as free; the ratio between two policies' TTFTs does not depend on the throughput
    assumed. Takes the place of a :class:`PrefillProfile` where no profile of the model exists (the planner)."""

    costs: Any  # a hf_marconi.costs.CostModel
    flops_per_second: float

    def __post_init__(self) -> None:
        if self.flops_per_second <= 0:
            raise ValueError(f"flops_per_second must be > 0, got {self.flops_per_second}")

    def ttft(self, reused: Sequence[int] | np.ndarray, input_lens: Sequence[int] | np.ndarray) -> np.ndarray:
        """Modelled TTFT (seconds) of requests with ``input_lens`` tokens, the first ``reused`` of them restored."""
        reused_arr = np.asarray(reused, dtype=np.int64)
        inputs = np.asarray(input_lens, dtype=np.int64)
        if reused_arr.shape != inputs.shape or (reused_arr >= inputs).any():
            raise ValueError("reused and input_lens must match in shape, with reused < input length per request")
        flops = [self.costs.extend_flops(int(p), int(n - p)) for p, n in zip(reused_arr, inputs)]
        return np.asarray(flops, dtype=np.float64) / self.flops_per_second


# ------------------------------------------------------------------------------------------------ measuring
@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run the block with ``threads`` torch intra-op threads, then restore the previous setting."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def machine_description() -> dict[str, Any]:
    import torch

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": "cpu",
    }


def prefill_seconds(model: Any, prefix_cache: Any, new_ids: Any, start: int) -> float:
    """Wall seconds of one forward of ``new_ids`` (shape [1, E]) at positions ``start..start+E-1`` on a copy of
    ``prefix_cache`` (a ``DynamicCache`` holding ``start`` tokens, left unchanged)."""
    import torch

    from hf_marconi.families import cache_keyword_of

    cache = copy.deepcopy(prefix_cache)
    positions = torch.arange(start, start + new_ids.shape[1]).unsqueeze(0)
    with torch.no_grad():
        began = time.perf_counter()
        model(input_ids=new_ids, **{cache_keyword_of(model): cache}, position_ids=positions, use_cache=True,
              logits_to_keep=1)
        return time.perf_counter() - began


def measure_profile(
    spec: ProfileModelSpec = ProfileModelSpec(),
    prefix_lens: Sequence[int] = DEFAULT_PREFIX_LENS,
    extend_lens: Sequence[int] = DEFAULT_EXTEND_LENS,
    repeats: int = 3,
    threads: int = 1,
    progress: Callable[[str], None] | None = None,
) -> PrefillProfile:
    """Time every ``(P, E)`` of the grid on the model of ``spec`` (median of ``repeats`` runs, after a short warm-up
    forward) with ``threads`` torch threads; ``progress`` receives a line per grid point.

    One thread by default: on a small shared machine, timings with several threads swing with the load of other
    processes far more than single-thread timings do."""
    if repeats < 1 or threads < 1:
        raise ValueError(f"repeats and threads must be >= 1, got repeats={repeats}, threads={threads}")
    if not prefix_lens or not extend_lens or min(prefix_lens) < 0 or min(extend_lens) < 1:
        raise ValueError("prefix_lens must be non-empty and >= 0, extend_lens non-empty and >= 1")
    with torch_threads(threads):
        return _measure(spec, prefix_lens, extend_lens, repeats, progress)


def _measure(spec: ProfileModelSpec, prefix_lens: Sequence[int], extend_lens: Sequence[int], repeats: int,
             progress: Callable[[str], None] | None) -> PrefillProfile:
    import torch

    from hf_marconi.families import cache_keyword_of
    from transformers.cache_utils import DynamicCache

    model = spec.build()
    config = model.config
    generator = torch.Generator().manual_seed(spec.seed)
    longest = max(prefix_lens) + max(extend_lens)
    ids = torch.randint(3, spec.vocab_size, (1, longest), generator=generator)
    seconds = []
    for prefix_len in prefix_lens:
        prefix_cache = DynamicCache(config=config)
        if prefix_len:
            with torch.no_grad():
                model(input_ids=ids[:, :prefix_len], **{cache_keyword_of(model): prefix_cache},
                      position_ids=torch.arange(prefix_len).unsqueeze(0), use_cache=True, logits_to_keep=1)
        row = []
        for extend_len in extend_lens:
            new_ids = ids[:, prefix_len : prefix_len + extend_len]
            prefill_seconds(model, prefix_cache, new_ids[:, : min(extend_len, 16)], prefix_len)  # warm-up
            runs = [prefill_seconds(model, prefix_cache, new_ids, prefix_len) for _ in range(repeats)]
            row.append(statistics.median(runs))
            if progress is not None:
                progress(f"prefix {prefix_len:>6} + extend {extend_len:>6}: {row[-1] * 1e3:9.1f} ms")
        seconds.append(tuple(row))
    described = json.loads(json.dumps(asdict(spec)))  # as a JSON round trip gives it back (lists, not tuples)
    described["family"] = "bamba"
    described["parameters"] = sum(p.numel() for p in model.parameters())
    return PrefillProfile.fitted(prefix_lens, extend_lens, seconds, repeats, described, machine_description())


def load_or_measure_profile(path: str | Path, force: bool = False, progress: Callable[[str], None] | None = None,
                            **measure_options: Any) -> PrefillProfile:
    """The profile stored at ``path``, or a new measurement (``measure_profile(**measure_options)``) saved there
    when the file is absent or ``force`` is set."""
    path = Path(path)
    if path.exists() and not force:
        return PrefillProfile.load(path)
    profile = measure_profile(progress=progress, **measure_options)
    profile.save(path)
    return profile


def spec_of(profile: PrefillProfile) -> ProfileModelSpec:
    """The model spec a profile was measured with (to replay on the same model)."""
    known = {f for f in ProfileModelSpec.__dataclass_fields__}
    values = {k: v for k, v in profile.model.items() if k in known}
    if "attention_layers" in values:
        values["attention_layers"] = tuple(values["attention_layers"])
    return ProfileModelSpec(**values)


def summarise(seconds: Sequence[float] | np.ndarray) -> dict[str, float]:
    """P50, P95, mean and count of TTFTs in seconds."""
    values = np.asarray(seconds, dtype=np.float64)
    if values.size == 0:
        raise ValueError("no TTFT values to summarise")
    return {
        "p50": float(np.percentile(values, 50)),
        "p95": float(np.percentile(values, 95)),
        "mean": float(values.mean()),
        "count": int(values.size),
    }
