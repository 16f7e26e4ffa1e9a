"""The evaluation as a table (text), as JSON, and as an SVG chart of quality and latency by depth.

The chart is written by hand (no plotting library): two panels sharing the depth axis, quality
(NDCG@10 solid, Recall@k dashed) above, latency (p50 solid, p95 dashed) below, a colour per cascade.
"""

from __future__ import annotations

import math
from collections import Counter
from html import escape
from typing import Any

from .runner import ALL, STAGE1, EvalResult, Row

COLOURS = ["#1f5fa8", "#c0392b", "#2e8b57", "#8e44ad", "#d35400"]


def table(result: EvalResult) -> str:
    data = result.dataset
    relevant = data.candidate_recall() * 100
    mean = sum(len(q.doc_ids) for q in data.queries) / len(data.queries)
    lines = [
        f"reranker-server eval: {len(data.queries)} queries of {data.path} ({data.layout}); "
        f"candidates: {data.source}, {mean:.1f} per query",
        f"  the candidate lists hold {relevant:.1f}% of the relevant documents (the ceiling of "
        "every recall below)"
        + (f"; {data.skipped} queries without a relevant document skipped" if data.skipped else ""),
        f"  server: {result.where}; requests one at a time, cache off",
        *(f"  note: {note}" for note in result.notes),
    ]
    k = result.top_k
    header = (
        f"  {'depth':<8} {'NDCG@10':>8} {'MRR@10':>7} {f'Recall@{k}':>10} {'p50 ms':>8} "
        f"{'p95 ms':>8} {'p50 x':>6} {'CPU s/q':>8}  stage 2"
    )
    for cascade in result.cascades:
        lines += [
            "",
            f"cascade {cascade.model or 'default'}: {' -> '.join(cascade.stages)}",
            header,
        ]
        base = cascade.rows[0].p50_ms or 1.0
        for row in cascade.rows:
            cpu = f"{row.cpu_s:.4f}" if row.cpu_s is not None else "n/a"
            lines.append(
                f"  {row.label:<8} {row.ndcg:>8.3f} {row.mrr:>7.3f} {row.recall:>10.3f} "
                f"{row.p50_ms:>8.1f} {row.p95_ms:>8.1f} {row.p50_ms / base:>5.1f}x {cpu:>8}  "
                f"{_where(row.stage2)}"
            )
    lines += [
        "",
        "  stage 1: stage 1's order (cost: candidates=1, stage 1 plus one stage-2 pair); depth d: "
        "stage 2 reorders stage 1's top d, the rest stay in stage 1's order; p50 x: p50 / stage "
        "1's p50",
    ]
    return "\n".join(lines)


def _where(stage2: Counter[str]) -> str:
    if len(stage2) == 1:
        return next(iter(stage2))
    return ", ".join(f"{device} {n}" for device, n in stage2.most_common())


def as_json(result: EvalResult) -> dict[str, Any]:
    data = result.dataset
    return {
        "dataset": {
            "path": str(data.path),
            "layout": data.layout,
            "candidates_from": data.source,
            "queries": len(data.queries),
            "skipped": data.skipped,
            "candidate_recall": round(data.candidate_recall(), 6),
            "candidates_per_query": round(
                sum(len(q.doc_ids) for q in data.queries) / len(data.queries), 3
            ),
        },
        "server": result.where,
        "top_k": result.top_k,
        "notes": result.notes,
        "cascades": [
            {
                "model": cascade.model,
                "served": cascade.served,
                "stages": cascade.stages,
                "rows": [_row_json(row, result.top_k) for row in cascade.rows],
            }
            for cascade in result.cascades
        ],
    }


def _row_json(row: Row, top_k: int) -> dict[str, Any]:
    depth: Any = "stage1" if row.depth == STAGE1 else "all" if row.depth is ALL else row.depth
    return {
        "depth": depth,
        "ndcg_at_10": round(row.ndcg, 6),
        "mrr_at_10": round(row.mrr, 6),
        f"recall_at_{top_k}": round(row.recall, 6),
        "p50_ms": round(row.p50_ms, 3),
        "p95_ms": round(row.p95_ms, 3),
        "cpu_seconds_per_query": None if row.cpu_s is None else round(row.cpu_s, 6),
        "stage2": dict(row.stage2),
        "fallbacks": dict(row.fallbacks),
    }


# --- the chart

WIDTH, LEFT, RIGHT = 760, 70, 170
PANEL, TOP, GAP = 190, 50, 70


def svg(result: EvalResult) -> str:
    labels = [row.label for row in result.cascades[0].rows]
    step = (WIDTH - LEFT - RIGHT) / max(1, len(labels) - 1)
    xs = [LEFT + i * step for i in range(len(labels))]
    height = TOP + 2 * PANEL + GAP + 60
    slowest = max(
        max(row.p95_ms, (row.cpu_s or 0) * 1000) for c in result.cascades for row in c.rows
    )
    tick = _nice_step(slowest / 4)
    top_ms = tick * math.ceil(slowest / tick)
    quality_top, latency_top = TOP, TOP + PANEL + GAP
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
        f'viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="12">',
        f"<title>Quality and latency by candidates depth ({escape(str(result.dataset.path))})"
        "</title>",
        f'<rect width="{WIDTH}" height="{height}" fill="white"/>',
        f'<text x="{LEFT}" y="24" font-size="15" font-weight="bold">Quality and latency by '
        f"candidates depth: {len(result.dataset.queries)} queries</text>",
    ]
    parts += _panel(quality_top, xs, labels, 1.0, "quality", [0, 0.25, 0.5, 0.75, 1.0], "{:.2f}")
    ticks = [tick * i for i in range(round(top_ms / tick) + 1)]
    parts += _panel(
        latency_top, xs, labels, top_ms, "latency and CPU (ms per query)", ticks, "{:g}"
    )
    legend_y = TOP
    for n, cascade in enumerate(result.cascades):
        colour = COLOURS[n % len(COLOURS)]
        k = result.top_k
        series = [
            (quality_top, 1.0, [r.ndcg for r in cascade.rows], "", "NDCG@10"),
            (quality_top, 1.0, [r.recall for r in cascade.rows], "6 4", f"Recall@{k}"),
            (latency_top, top_ms, [r.p50_ms for r in cascade.rows], "", "p50"),
            (latency_top, top_ms, [r.p95_ms for r in cascade.rows], "6 4", "p95"),
        ]
        if all(r.cpu_s is not None for r in cascade.rows):
            cpu_ms = [(r.cpu_s or 0) * 1000 for r in cascade.rows]
            series.append((latency_top, top_ms, cpu_ms, "2 3", "CPU"))
        name = escape(cascade.model or "default")
        parts.append(
            f'<text x="{WIDTH - RIGHT + 20}" y="{legend_y}" font-weight="bold">{name}</text>'
        )
        legend_y += 16
        for top, peak, values, dash, what in series:
            points = " ".join(
                f"{x:.1f},{top + PANEL - v / peak * PANEL:.1f}"
                for x, v in zip(xs, values, strict=True)
            )
            dashes = f' stroke-dasharray="{dash}"' if dash else ""
            parts.append(
                f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="2"'
                f"{dashes}/>"
            )
            parts += [
                f'<circle cx="{x:.1f}" cy="{top + PANEL - v / peak * PANEL:.1f}" r="3" '
                f'fill="{colour}"/>'
                for x, v in zip(xs, values, strict=True)
            ]
            x0 = WIDTH - RIGHT + 20
            parts.append(
                f'<line x1="{x0}" y1="{legend_y - 4}" x2="{x0 + 24}" y2="{legend_y - 4}" '
                f'stroke="{colour}" stroke-width="2"{dashes}/>'
                f'<text x="{x0 + 30}" y="{legend_y}">{what}</text>'
            )
            legend_y += 16
        legend_y += 10
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def _nice_step(raw: float) -> float:
    """The smallest of 1, 2, 2.5, 5 times a power of ten that is at least `raw`."""
    if raw <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)


def _panel(
    top: float,
    xs: list[float],
    labels: list[str],
    peak: float,
    title: str,
    ticks: list[float],
    fmt: str,
) -> list[str]:
    bottom = top + PANEL
    parts = [
        f'<text x="{LEFT}" y="{top - 10}" font-weight="bold">{title}</text>',
        f'<line x1="{LEFT}" y1="{bottom}" x2="{xs[-1]}" y2="{bottom}" stroke="#333"/>',
        f'<line x1="{LEFT}" y1="{top}" x2="{LEFT}" y2="{bottom}" stroke="#333"/>',
    ]
    for tick in ticks:
        y = bottom - tick / peak * PANEL
        parts.append(
            f'<line x1="{LEFT}" y1="{y:.1f}" x2="{xs[-1]}" y2="{y:.1f}" stroke="#ddd"/>'
            f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{fmt.format(tick)}</text>'
        )
    for x, label in zip(xs, labels, strict=True):
        parts.append(
            f'<text x="{x:.1f}" y="{bottom + 16}" text-anchor="middle">{escape(label)}</text>'
        )
    parts.append(
        f'<text x="{(LEFT + xs[-1]) / 2:.1f}" y="{bottom + 34}" text-anchor="middle" '
        'fill="#555">candidates (stage-1 documents reordered by stage 2)</text>'
    )
    return parts
