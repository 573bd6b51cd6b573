"""eval.bench_default: the issue's bar per row, and the replays a run plans."""

from __future__ import annotations

from eval.bench_default import ROWS, Row, jobs_for, verdict

ROW = Row("x:1", "bbh", (), 1, anchor=30.0)


def test_verdict_is_the_issues_bar():
    assert verdict(ROW, default=33.0, sglang=20.0, ceiling=90.0) == "ok"  # 1.10x the anchor
    assert verdict(ROW, default=89.0, sglang=20.0, ceiling=90.0) == "ok"  # within 2 points of the ceiling
    assert "anchor" in verdict(ROW, default=32.9, sglang=20.0, ceiling=90.0)
    assert "SGLang+" in verdict(ROW, default=40.0, sglang=41.0, ceiling=90.0)


def test_jobs_cover_every_row_once_per_label_and_each_trace_ceiling_once():
    rows = [r for r in ROWS if r.trace == "swebench"]
    jobs = jobs_for(rows, static_grid=(0.0, 8.0), compare=("previous",))
    labels = {"default", "previous", "sglang+", "vllm+", "alpha=0", "alpha=8"}
    assert sum(j.label == "ceiling" for j in jobs) == 1
    assert {(j.label, j.capacity_bytes) for j in jobs if j.label != "ceiling"} == {
        (label, int(r.capacity_gb * 10**9)) for r in rows for label in labels}
