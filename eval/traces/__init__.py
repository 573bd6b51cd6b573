"""Workload traces for hf_marconi's evaluation, built from the real data in ``shared/data``.

Every builder returns a list of :class:`hf_marconi.trace.Request` sorted by arrival time:

============  ====================================================================================
name          workload
============  ====================================================================================
swebench      SWE-bench agent runs (:func:`build_swebench`)
tau           tau-bench airline customer service (:func:`build_tau`)
oasst         OpenAssistant trees, every root-to-leaf path a session (:func:`build_oasst`)
bbh           BIG-Bench-Hard few-shot chain-of-thought queries (:func:`build_bbh`)
mtbench       MT-bench two-turn questions, synthetic answers (:func:`build_mtbench`)
mooncake      Mooncake production chat trace, synthetic tokens, real timestamps (:func:`build_mooncake`)
============  ====================================================================================

:func:`build_trace` builds any of them by name and caches the result on disk; :func:`save_trace` /
:func:`load_trace` store traces (schema in :mod:`eval.traces.store`); :func:`trace_stats` summarises one.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hf_marconi.trace import Request

from . import bbh, mooncake, mtbench, oasst, swebench, tau
from .bbh import build_bbh
from .cache import cache_key, cached, default_cache_dir
from .sources import data_file, resolve_data_dir
from .stats import TraceStats, trace_stats
from .store import load_trace, save_trace
from .mooncake import build_mooncake
from .mtbench import build_mtbench
from .oasst import build_oasst
from .swebench import build_swebench
from .tau import build_tau
from .tokenizer import TextEncoder, load_text_encoder, resolve_text_encoder


@dataclass(frozen=True)
class TraceBuilder:
    """A registered workload: its builder function and the data file it reads."""

    build: Callable[..., list[Request]]
    data_file: str
    description: str

    def option_names(self) -> list[str]:
        """Keyword options the builder takes besides ``data_dir`` and ``tokenizer``."""
        return [n for n in inspect.signature(self.build).parameters if n not in ("data_dir", "tokenizer")]


BUILDERS: dict[str, TraceBuilder] = {
    "swebench": TraceBuilder(build_swebench, swebench.DATA_FILE, "SWE-bench agent runs"),
    "tau": TraceBuilder(build_tau, tau.DATA_FILE, "tau-bench airline customer service"),
    "oasst": TraceBuilder(build_oasst, oasst.DATA_FILE, "OpenAssistant trees, root-to-leaf paths"),
    "bbh": TraceBuilder(build_bbh, bbh.DATA_FILE, "BIG-Bench-Hard few-shot chain-of-thought queries"),
    "mtbench": TraceBuilder(build_mtbench, mtbench.DATA_FILE, "MT-bench two-turn questions, synthetic answers"),
    "mooncake": TraceBuilder(build_mooncake, mooncake.DATA_FILE, "Mooncake production chat, synthetic tokens"),
}


def build_trace(
    name: str,
    data_dir: str | Path | None = None,
    tokenizer: str | Path | TextEncoder | None = None,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    **options,
) -> list[Request]:
    """Build the trace ``name`` (a key of :data:`BUILDERS`) with the builder's keyword ``options``.

    The result is cached in ``cache_dir`` (default :func:`eval.traces.cache.default_cache_dir`) unless
    ``use_cache`` is false; a later call with the same inputs loads it instead of tokenizing again.
    """
    if name not in BUILDERS:
        raise ValueError(f"unknown trace {name!r}: choose one of {', '.join(BUILDERS)}")
    builder = BUILDERS[name]
    unknown = sorted(set(options) - set(builder.option_names()))
    if unknown:
        raise TypeError(f"trace {name!r} takes no option(s) {unknown}; it takes {builder.option_names()}")
    data_dir = resolve_data_dir(data_dir)
    encoder = resolve_text_encoder(tokenizer, data_dir)

    def build() -> list[Request]:
        return builder.build(data_dir=data_dir, tokenizer=encoder, **options)

    if not use_cache:
        return build()
    all_options = inspect.signature(builder.build).bind_partial(**options)
    all_options.apply_defaults()
    hashed = {k: v for k, v in all_options.arguments.items() if k not in ("data_dir", "tokenizer")}
    key = cache_key(name, hashed, data_file(data_dir, builder.data_file), encoder.identity)
    return cached(build, Path(cache_dir) if cache_dir is not None else default_cache_dir(), f"{name}-{key}")


__all__ = [
    "BUILDERS",
    "Request",
    "TextEncoder",
    "TraceBuilder",
    "TraceStats",
    "build_bbh",
    "build_mooncake",
    "build_mtbench",
    "build_oasst",
    "build_swebench",
    "build_tau",
    "build_trace",
    "load_text_encoder",
    "load_trace",
    "save_trace",
    "trace_stats",
]
