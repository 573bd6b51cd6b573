"""PNG plots of a sweep (hit rate vs capacity, modelled TTFT), of a measured TTFT replay and of a capacity plan.

Conventions every figure follows, so that the differences the reports discuss can be seen:

- capacity is a fraction of the footprint on a logarithmic axis, each tick labelled with its percentage and its size;
- a policy's difference from SGLang+ (Marconi's admission with LRU eviction, the closest baseline) has a panel of
  its own, in points, since it is a few points on a 0-100% scale;
- Marconi's lines are drawn on top of the baselines, and lines that often coincide differ in style, not only colour;
- logarithmic axes label 1-2-5 steps in plain numbers; medians and P95 are written next to what they summarise.

matplotlib with the Agg backend: no display needed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from matplotlib.ticker import (  # noqa: E402
    FixedFormatter,
    FixedLocator,
    FuncFormatter,
    LogLocator,
    NullFormatter,
    NullLocator,
)

DPI = 160
# Marconi is drawn thin and on top, SGLang+ as a wide translucent band beneath: where the two coincide (often), the
# red line runs inside the blue band, and neither hides the other.
STYLE: dict[str, dict[str, Any]] = {
    "default": {"color": "tab:brown", "marker": "D", "linewidth": 1.8, "markersize": 5, "zorder": 7},
    "marconi": {"color": "tab:red", "marker": "o", "linewidth": 1.8, "markersize": 5, "zorder": 6},
    "marconi-wide": {"color": "tab:orange", "marker": "s", "linestyle": "--", "linewidth": 1.6,
                     "markerfacecolor": "none", "markersize": 8, "zorder": 5},
    "marconi-oracle": {"color": "tab:purple", "marker": "*", "linestyle": ":", "linewidth": 1.6, "markersize": 9,
                       "zorder": 4},
    "sglang+": {"color": "tab:blue", "marker": "^", "linewidth": 4.5, "alpha": 0.45, "markersize": 10, "zorder": 3},
    "vllm+": {"color": "tab:green", "marker": "v", "linewidth": 1.6, "markersize": 6, "zorder": 2},
    "no-cache": {"color": "tab:gray", "marker": "x", "linewidth": 1.6, "zorder": 1},
}
UNLIMITED = "unlimited"
BASELINE = "sglang+"
NOT_IN_DIFFERENCE = ("vllm+", "no-cache", BASELINE)  # far below (or equal to) the baseline: shown in the main panel


def _policies(rows: Sequence[dict[str, Any]]) -> list[str]:
    seen = [r["policy"] for r in rows if r["policy"] != UNLIMITED]
    ordered = [p for p in STYLE if p in seen]
    return ordered + sorted(set(seen) - set(ordered))


def _line_style(policy: str) -> dict[str, Any]:
    return {k: v for k, v in STYLE.get(policy, {}).items() if k not in ("marker", "markersize", "markerfacecolor")}


def format_gb(gigabytes: float) -> str:
    if gigabytes >= 1:
        return f"{gigabytes:,.3g} GB" if gigabytes < 1000 else f"{gigabytes:,.0f} GB"
    return f"{gigabytes * 1e3:.3g} MB"


def _number(value: float) -> str:
    """Three significant digits without exponents: 0.394, 16.3, 245, 1,180."""
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def capacity_axis(ax: Any, fractions: Sequence[float], footprint_gb: float | None, label: bool = True) -> None:
    """A log x axis of capacity as a fraction of the footprint, ticks at ``fractions`` labelled with the percentage
    and (with ``footprint_gb``) the size."""
    ticks = sorted(set(fractions))
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    unit = "GB" if footprint_gb is None or footprint_gb * ticks[0] >= 1 else "MB"
    scale = 1.0 if unit == "GB" else 1e3
    names = [f"{100 * f:.3g}%" + (f"\n{_number(f * footprint_gb * scale)}" if footprint_gb else "") for f in ticks]
    ax.xaxis.set_major_formatter(FixedFormatter(names) if label else NullFormatter())
    ax.tick_params(axis="x", labelsize=8.5)
    ax.set_xlim(ticks[0] / 1.3, ticks[-1] * 1.3)
    if label:
        ax.set_xlabel("cache capacity: % of the footprint" + (f" (top), {unit} (bottom)" if footprint_gb else ""))


def readable_log_axis(axis: Any) -> None:
    """Label a logarithmic axis at 1-2-5 steps in plain numbers (20, 50, 100, 200, ...)."""
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.0f}" if value >= 1 else f"{value:g}"))
    axis.set_minor_locator(LogLocator(base=10, subs=tuple(range(2, 10))))
    axis.set_minor_formatter(NullFormatter())


def _difference_panel(ax: Any, points: dict[str, list[tuple[float, float]]], ylabel: str) -> None:
    """``points``: per policy, (x, points above the baseline); the baseline is the zero line."""
    ax.axhline(0, color=STYLE[BASELINE]["color"], linewidth=1.5, label=f"{BASELINE} (zero line)")
    low, high = -0.5, 0.5
    for policy, values in points.items():
        if values:
            ax.plot(*zip(*sorted(values)), label=policy, **STYLE.get(policy, {}))
            low, high = min(low, *(v for _, v in values)), max(high, *(v for _, v in values))
    pad = 0.15 * (high - low)
    ax.set_ylim(low - pad, high + pad)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def plot_vs_capacity(rows: Sequence[dict[str, Any]], metric: str, ylabel: str, title: str, path: str | Path,
                     preset: str, footprints_gb: dict[str, float] | None = None) -> Path:
    """Per trace, ``metric`` (a fraction, shown in %) against capacity per policy with the unlimited-capacity run as a
    dashed line, and below it each Marconi variant's difference from SGLang+ in points. No-cache (0% everywhere) is
    not drawn. ``footprints_gb``: per ``"trace/preset"``, for the size labels of the capacity axis."""
    rows = [r for r in rows if r["preset"] == preset]
    traces = list(dict.fromkeys(r["trace"] for r in rows))
    cols = min(3, len(traces))
    grid_rows = math.ceil(len(traces) / cols)
    fig = plt.figure(figsize=(5.4 * cols, 5.2 * grid_rows))
    outer = fig.add_gridspec(grid_rows, cols, hspace=0.36, wspace=0.28)
    axes = []
    for index, trace in enumerate(traces):
        inner = outer[index // cols, index % cols].subgridspec(2, 1, height_ratios=(2.6, 1.2), hspace=0.08)
        top, bottom = fig.add_subplot(inner[0]), fig.add_subplot(inner[1])
        axes += [top, bottom]
        mine = [r for r in rows if r["trace"] == trace]
        fractions = sorted({r["fraction"] for r in mine if r["fraction"] is not None})
        for policy in _policies(mine):
            if policy == "no-cache":
                continue
            points = sorted((r["fraction"], 100 * r[metric]) for r in mine if r["policy"] == policy)
            top.plot(*zip(*points), label=policy, **STYLE.get(policy, {}))
        unlimited = [r for r in mine if r["policy"] == UNLIMITED]
        if unlimited:
            top.axhline(100 * unlimited[0][metric], color="black", linestyle="--", linewidth=0.9,
                        label="unlimited capacity")
        footprint = (footprints_gb or {}).get(f"{trace}/{preset}")
        top.set_title(trace + (f" (footprint {format_gb(footprint)})" if footprint else ""))
        top.set_ylabel(ylabel)
        top.set_ylim(0, 105)
        top.grid(alpha=0.3)
        capacity_axis(top, fractions, footprint, label=False)
        baseline = {r["fraction"]: r[metric] for r in mine if r["policy"] == BASELINE}
        differences = {
            policy: [(r["fraction"], 100 * (r[metric] - baseline[r["fraction"]])) for r in mine
                     if r["policy"] == policy and r["fraction"] in baseline]
            for policy in _policies(mine) if policy not in NOT_IN_DIFFERENCE
        }
        _difference_panel(bottom, differences, f"vs {BASELINE}\n(points)")
        capacity_axis(bottom, fractions, footprint)
    _legend(fig, axes)
    fig.suptitle(f"{title} ({preset}); no-cache is 0% everywhere (not drawn)", y=0.995)
    fig.subplots_adjust(top=0.94, bottom=0.11, left=0.06, right=0.98)
    return _save(fig, path)


def plot_ttft_cdf(rows: Sequence[dict[str, Any]], fraction: float, quantiles: Sequence[float], path: str | Path,
                  preset: str) -> Path:
    """One panel per trace: the CDF of modelled TTFT per policy at the capacity ``fraction`` of the footprint, with
    the 50% and 95% levels marked (where a curve crosses them is its P50 / P95)."""
    rows = [r for r in rows if r["preset"] == preset and r.get("ttft_quantiles") and r["fraction"] == fraction]
    traces = list(dict.fromkeys(r["trace"] for r in rows))
    if not traces:
        raise ValueError(f"no run at capacity fraction {fraction} carries modelled TTFT quantiles")
    fig, axes = _grid(len(traces), width=5.0, height=3.9)
    for ax, trace in zip(axes, traces):
        mine = [r for r in rows if r["trace"] == trace]
        for policy in _policies(mine):
            row = next(r for r in mine if r["policy"] == policy)
            ax.plot([1e3 * q for q in row["ttft_quantiles"]], [100 * q for q in quantiles], label=policy,
                    **_line_style(policy))
        for level in (50, 95):
            ax.axhline(level, color="black", linewidth=0.7, linestyle=":")
            ax.annotate(f"P{level}", (1.0, level), xycoords=("axes fraction", "data"), xytext=(3, -3),
                        textcoords="offset points", fontsize=8)
        ax.set_xscale("log")
        readable_log_axis(ax.xaxis)
        ax.tick_params(axis="x", labelrotation=45, labelsize=8)
        ax.set_title(f"{trace}, {format_gb(mine[0]['capacity_gb'])} ({fraction:.0%})")
        ax.set_xlabel("modelled TTFT (ms, log scale)")
        ax.set_ylabel("requests at or below (%)")
        ax.set_ylim(0, 101)
        ax.grid(alpha=0.3, which="major")
    _legend(fig, axes)
    fig.suptitle(f"Modelled TTFT at {fraction:.0%} of each trace's footprint ({preset})")
    fig.tight_layout(rect=(0, 0.05, 0.98, 0.97))
    return _save(fig, path)


def plot_ttft_measured(ttfts: dict[str, Sequence[float]], title: str, path: str | Path) -> Path:
    """Box plots of measured TTFT (seconds) per policy, each box's median and P95 written beside it (P95 also as a
    diamond)."""
    import numpy as np

    policies = [p for p in STYLE if p in ttfts] + sorted(set(ttfts) - set(STYLE))
    fig, ax = plt.subplots(figsize=(2.3 * len(policies) + 1.5, 4.4))
    data = [[1e3 * t for t in ttfts[p]] for p in policies]
    box = ax.boxplot(data, patch_artist=True, showfliers=True, widths=0.45,
                     medianprops={"color": "black", "linewidth": 1.6})
    ax.set_xticks(range(1, len(policies) + 1), policies)
    for position, (patch, policy, values) in enumerate(zip(box["boxes"], policies, data), start=1):
        patch.set_facecolor(STYLE.get(policy, {}).get("color", "white"))
        patch.set_alpha(0.45)
        median, p95 = float(np.percentile(values, 50)), float(np.percentile(values, 95))
        ax.plot([position], [p95], marker="D", color="black", markersize=5, zorder=5)
        ax.annotate(f"P50 {median:,.0f} ms", (position + 0.26, median), va="center", fontsize=9, fontweight="bold")
        ax.annotate(f"P95 {p95:,.0f} ms", (position + 0.26, p95), va="center", fontsize=9)
    ax.set_xlim(0.5, len(policies) + 0.95)
    ax.set_yscale("log")
    readable_log_axis(ax.yaxis)
    ax.set_ylabel("measured TTFT (ms, log scale)")
    ax.set_xlabel("boxes: quartiles; whiskers: 1.5 x IQR; circles: outliers; diamonds: P95", fontsize=8)
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return _save(fig, path)


def plot_plan(result: dict[str, Any], path: str | Path) -> Path:
    """A capacity plan (``eval.plan.PlanResult.asdict()``): token hit rate with the knee marked, the default policy's
    difference from SGLang+, FLOPs saved, and modelled TTFT P50 / P95, against capacity."""
    from matplotlib.lines import Line2D

    rows = result["rows"]
    footprint_gb = result["footprint_bytes"] / 1e9
    unlimited = result["unlimited"]
    knee = result["knee"]
    fractions = sorted({r["fraction"] for r in rows if not r.get("bisection")})
    fig, axes = plt.subplots(2, 2, figsize=(14, 9))
    (hits, diff), (flops, ttft) = axes
    policies = _policies(rows)
    for policy in policies:
        mine = sorted((r for r in rows if r["policy"] == policy), key=lambda r: r["fraction"])
        xs = [r["fraction"] for r in mine]
        style = STYLE.get(policy, {})
        label = f"{policy} (MarconiCache's default)" if policy == "marconi" else policy
        hits.plot(xs, [100 * r["token_hit_rate"] for r in mine], label=label, **style)
        flops.plot(xs, [100 * r["flops_saved_fraction"] for r in mine], **style)
        ttft.plot(xs, [1e3 * r["ttft_p50_s"] for r in mine], **style)
        ttft.plot(xs, [1e3 * r["ttft_p95_s"] for r in mine], **dict(_line_style(policy), linestyle=":"))
    for ax, key in ((hits, "token_hit_rate"), (flops, "flops_saved_fraction")):
        ax.axhline(100 * unlimited[key], color="black", linestyle="--", linewidth=0.9,
                   label="unlimited capacity" if ax is hits else None)
        ax.set_ylim(0, 105)
    no_cache = result["no_cache_ttft"]
    ttft.axhline(1e3 * no_cache["p50_s"], color="gray", linestyle="--", linewidth=1.1)
    ttft.axhline(1e3 * no_cache["p95_s"], color="gray", linestyle=":", linewidth=1.1)
    by_policy = {p: {r["fraction"]: r["token_hit_rate"] for r in rows if r["policy"] == p} for p in policies}
    if BASELINE in by_policy:
        points = {p: [(f, 100 * (v - by_policy[BASELINE][f])) for f, v in by_policy[p].items()
                      if f in by_policy[BASELINE]] for p in policies if p not in NOT_IN_DIFFERENCE}
        _difference_panel(diff, points, "token hit rate minus SGLang+'s (points)")
        diff.set_title(f"Difference from {BASELINE} (same admission, LRU eviction)")
    else:
        diff.set_visible(False)
    if knee is not None:
        for ax in (hits, diff, flops, ttft):
            ax.axvline(knee["fraction"], color="black", linestyle=":", linewidth=1.2)
        hits.annotate(f"knee: {format_gb(knee['capacity_bytes'] / 1e9)} ({100 * knee['fraction']:.3g}%)\n"
                      f"{knee['share']:.0%} of the unlimited hit rate",
                      (knee["fraction"], 100 * knee["token_hit_rate"]), xytext=(14, -46), textcoords="offset points",
                      fontsize=9, arrowprops={"arrowstyle": "->", "linewidth": 0.8},
                      bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.9})
    hits.set_title("Token hit rate")
    hits.set_ylabel("token hit rate (%)")
    flops.set_title("Prefill FLOPs saved")
    flops.set_ylabel("prefill FLOPs saved (%)")
    ttft.set_title(f"Modelled TTFT: P50 solid, P95 dotted (prefill at {result['spec']['prefill_flops_per_s'] / 1e12:g} "
                   "TFLOP/s)")
    ttft.set_ylabel("modelled TTFT (ms, log scale)")
    ttft.set_yscale("log")
    readable_log_axis(ttft.yaxis)
    highest = max([no_cache["p95_s"]] + [r["ttft_p95_s"] for r in rows])
    ttft.set_ylim(top=1e3 * highest * 1.5)
    for ax in (hits, diff, flops, ttft):
        capacity_axis(ax, fractions, footprint_gb)
        ax.grid(alpha=0.3)
    handles, labels = hits.get_legend_handles_labels()
    handles += [Line2D([], [], color="black", linestyle=":", label="knee"),
                Line2D([], [], color="gray", linestyle="--", label="no cache: TTFT P50"),
                Line2D([], [], color="gray", linestyle=":", label="no cache: TTFT P95")]
    fig.legend(handles, labels + ["knee", "no cache: TTFT P50", "no cache: TTFT P95"], loc="lower center",
               ncol=len(handles), frameon=False)
    fig.suptitle(f"Capacity plan: {result['trace'].split(':')[0]}, {result['model'].split(':')[0]}; "
                 f"footprint {format_gb(footprint_gb)}")
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    return _save(fig, path)


def _grid(count: int, width: float, height: float) -> tuple[Any, list[Any]]:
    cols = min(3, count)
    rows = math.ceil(count / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[count:]:
        ax.set_visible(False)
    return fig, flat[:count]


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
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path
