"""PNG plots of a sweep (hit rate and FLOPs saved vs capacity, modelled TTFT) and of a measured TTFT replay.

matplotlib with the Agg backend: no display needed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from matplotlib.ticker import NullFormatter  # noqa: E402

STYLE: dict[str, dict[str, Any]] = {
    "marconi": {"color": "tab:red", "marker": "o"},
    "marconi-wide": {"color": "tab:orange", "marker": "s"},
    "marconi-oracle": {"color": "tab:pink", "marker": "*", "linestyle": ":"},
    "sglang+": {"color": "tab:blue", "marker": "^"},
    "vllm+": {"color": "tab:green", "marker": "v"},
    "no-cache": {"color": "tab:gray", "marker": "x"},
}
UNLIMITED = "unlimited"


def _grid(count: int) -> tuple[Any, list[Any]]:
    cols = min(3, count)
    rows = math.ceil(count / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[count:]:
        ax.set_visible(False)
    return fig, flat[:count]


def _policies(rows: Sequence[dict[str, Any]]) -> list[str]:
    seen = [r["policy"] for r in rows if r["policy"] != UNLIMITED]
    ordered = [p for p in STYLE if p in seen]
    return ordered + sorted(set(seen) - set(ordered))


def plot_vs_capacity(rows: Sequence[dict[str, Any]], metric: str, ylabel: str, title: str, path: str | Path,
                     preset: str) -> Path:
    """One panel per trace: ``metric`` (a fraction, shown in %) against capacity (GB) per policy; the
    unlimited-capacity run of the trace as a dashed line."""
    rows = [r for r in rows if r["preset"] == preset]
    traces = list(dict.fromkeys(r["trace"] for r in rows))
    fig, axes = _grid(len(traces))
    for ax, trace in zip(axes, traces):
        mine = [r for r in rows if r["trace"] == trace]
        for policy in _policies(mine):
            points = sorted((r["capacity_gb"], 100 * r[metric]) for r in mine if r["policy"] == policy)
            ax.plot(*zip(*points), label=policy, **STYLE.get(policy, {}))
        top = [r for r in mine if r["policy"] == UNLIMITED]
        if top:
            ax.axhline(100 * top[0][metric], color="black", linestyle="--", linewidth=0.8, label="unlimited")
        ax.set_title(trace)
        ax.set_xlabel("cache capacity (GB)")
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    _legend(fig, axes)
    fig.suptitle(f"{title} ({preset})")
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    return _save(fig, path)


def plot_ttft_cdf(rows: Sequence[dict[str, Any]], fraction: float, quantiles: Sequence[float], path: str | Path,
                  preset: str) -> Path:
    """One panel per trace: the CDF of modelled TTFT per policy at the capacity ``fraction`` of the footprint."""
    rows = [r for r in rows if r["preset"] == preset and r.get("ttft_quantiles") and r["fraction"] == fraction]
    traces = list(dict.fromkeys(r["trace"] for r in rows))
    if not traces:
        raise ValueError(f"no run at capacity fraction {fraction} carries modelled TTFT quantiles")
    fig, axes = _grid(len(traces))
    for ax, trace in zip(axes, traces):
        mine = [r for r in rows if r["trace"] == trace]
        for policy in _policies(mine):
            row = next(r for r in mine if r["policy"] == policy)
            style = {k: v for k, v in STYLE.get(policy, {}).items() if k != "marker"}
            ax.plot([1e3 * q for q in row["ttft_quantiles"]], [100 * q for q in quantiles], label=policy, **style)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels overlap on narrow log ranges
        ax.set_title(f"{trace}, {mine[0]['capacity_gb']:.1f} GB")
        ax.set_xlabel("modelled TTFT (ms, log)")
        ax.set_ylabel("requests (%)")
        ax.grid(alpha=0.3)
    _legend(fig, axes)
    fig.suptitle(f"Modelled TTFT, capacity {fraction:.0%} of the footprint ({preset})")
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    return _save(fig, path)


def plot_ttft_measured(ttfts: dict[str, Sequence[float]], title: str, path: str | Path) -> Path:
    """Box plots of measured TTFT (seconds) per policy."""
    policies = [p for p in STYLE if p in ttfts] + sorted(set(ttfts) - set(STYLE))
    fig, ax = plt.subplots(figsize=(1.6 * len(policies) + 2, 3.8))
    box = ax.boxplot([[1e3 * t for t in ttfts[p]] for p in policies], patch_artist=True, showfliers=True)
    ax.set_xticks(range(1, len(policies) + 1), policies)
    for patch, policy in zip(box["boxes"], policies):
        patch.set_facecolor(STYLE.get(policy, {}).get("color", "white"))
        patch.set_alpha(0.5)
    ax.set_yscale("log")
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_ylabel("measured TTFT (ms, log)")
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return _save(fig, path)


def _legend(fig: Any, axes: Sequence[Any]) -> None:
    """One legend below the panels with every label any panel drew (a policy may be missing from some)."""
    entries: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    fig.legend(list(entries.values()), list(entries), loc="lower center", ncol=len(entries), frameon=False)


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
