"""A self-contained HTML page for a feedback report: inline SVG charts, no scripts, no network."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

_WIDTH, _HEIGHT, _PAD = 720, 240, 40
_COLOURS = {"feedback_rate": "#2563eb", "positive_rate": "#16a34a"}
_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2rem auto; max-width: 780px; color: #111; }
h1 { font-size: 1.4rem; } h2 { font-size: 1.1rem; margin-top: 2rem; }
table { border-collapse: collapse; } td, th { padding: .2rem .8rem; text-align: right; }
td:first-child, th:first-child { text-align: left; }
.figures td { font-size: 1.1rem; } svg text { font-size: 11px; fill: #444; }
.legend span { margin-right: 1rem; }
.legend i { display: inline-block; width: 1rem; height: .3rem; margin-right: .3rem; vertical-align: middle; }
"""


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def rate_chart(timeline: dict[str, dict[str, Any]]) -> str:
    """Feedback rate and positive rate (0-100 %) per period, as an SVG line chart."""
    keys = list(timeline)
    if not keys:
        return "<p>No traced requests in this window.</p>"
    plot_w, plot_h = _WIDTH - 2 * _PAD, _HEIGHT - 2 * _PAD
    step = plot_w / max(len(keys) - 1, 1)

    def point(i: int, percent: float) -> tuple[float, float]:
        return _PAD + i * step, _PAD + plot_h * (1 - percent / 100)

    parts = [f'<svg role="img" aria-label="feedback and positive rate over time" width="{_WIDTH}" height="{_HEIGHT}">']
    for percent in (0, 25, 50, 75, 100):
        _, y = point(0, percent)
        parts.append(f'<line x1="{_PAD}" x2="{_WIDTH - _PAD}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>')
        parts.append(f'<text x="{_PAD - 6}" y="{y + 4:.1f}" text-anchor="end">{percent}%</text>')
    label_every = max(1, len(keys) // 8)
    for i, key in enumerate(keys):
        if i % label_every == 0:
            x, _ = point(i, 0)
            parts.append(f'<text x="{x:.1f}" y="{_HEIGHT - _PAD + 16}" text-anchor="middle">{_esc(key)}</text>')
    for figure, colour in _COLOURS.items():
        points = [point(i, timeline[k][figure]) for i, k in enumerate(keys)]
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
        parts.append(f'<polyline class="{figure}" fill="none" stroke="{colour}" stroke-width="2" points="{path}"/>')
        for (x, y), key in zip(points, keys, strict=True):
            label = f"{key}: {figure.replace('_', ' ')} {timeline[key][figure]:.1f}%"
            parts.append(
                f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{colour}"><title>{_esc(label)}</title></circle>'
            )
    parts.append("</svg>")
    legend = "".join(f'<span><i style="background:{c}"></i>{f.replace("_", " ")}</span>' for f, c in _COLOURS.items())
    return f'<div class="legend">{legend}</div>' + "".join(parts)


def distribution_chart(dimension: str, distribution: dict[str, int]) -> str:
    """Counts per rating value of one dimension, as SVG bars."""
    if not distribution:
        return ""
    height, bar_gap = 140, 8
    top = max(distribution.values())
    width = max(len(distribution) * 60, 240)
    bar_w = width / len(distribution) - bar_gap
    parts = [f'<svg role="img" aria-label="{_esc(dimension)} distribution" width="{width}" height="{height + 30}">']
    for i, (value, count) in enumerate(distribution.items()):
        h = (height - 20) * count / top
        x = i * (bar_w + bar_gap)
        parts.append(f'<rect x="{x:.1f}" y="{height - h:.1f}" width="{bar_w:.1f}" height="{h:.1f}" fill="#7c3aed">')
        parts.append(f"<title>{_esc(value)}: {count}</title></rect>")
        parts.append(f'<text x="{x + bar_w / 2:.1f}" y="{height - h - 4:.1f}" text-anchor="middle">{count}</text>')
        parts.append(f'<text x="{x + bar_w / 2:.1f}" y="{height + 16}" text-anchor="middle">{_esc(value)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def render_html(report: dict[str, Any], timeline: dict[str, dict[str, Any]]) -> str:
    """The page: headline figures, rates over time, rating distributions, latest negative comments."""
    window = report.get("window", {})
    title = f"Feedback report: {report.get('experiment', '')}"
    rows = [
        ("Traced requests", report["total_traces"]),
        ("With feedback", f"{report['traces_with_feedback']} ({report['feedback_rate']:.1f}%)"),
        (
            "Positive rate",
            f"{report['positive_rate']:.1f}% ({report['positive_count']} up, {report['negative_count']} down)",
        ),
    ]
    body = [
        f"<h1>{_esc(title)}</h1>",
        f"<p>{_esc(window.get('since') or 'start')} → {_esc(window.get('until') or 'now')}</p>",
        '<table class="figures">'
        + "".join(f"<tr><td>{_esc(k)}</td><td>{_esc(v)}</td></tr>" for k, v in rows)
        + "</table>",
        "<h2>Feedback rate and positive rate over time</h2>",
        rate_chart(timeline),
    ]
    for dimension, stats in report["ratings"].items():
        body.append(f"<h2>Rating: {_esc(dimension)} (mean {stats['mean']:.2f}, n={stats['count']})</h2>")
        body.append(distribution_chart(dimension, stats["distribution"]))
    if report["latest_negative_comments"]:
        body.append("<h2>Latest negative comments</h2><table>")
        for c in report["latest_negative_comments"]:
            body.append(f"<tr><td>{_esc(c['time'])}</td><td>{_esc(c['user'])}</td><td>{_esc(c['comment'])}</td></tr>")
        body.append("</table>")
    data = json.dumps(report, ensure_ascii=False).replace("</", "<\\/")  # cannot close the script element
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}</title>'
        f"<style>{_STYLE}</style></head><body>{''.join(body)}"
        f'<script type="application/json" id="report-data">{data}</script></body></html>\n'
    )


def write_html(report: dict[str, Any], timeline: dict[str, dict[str, Any]], path: str | Path) -> None:
    """Write the page for `report` to `path`."""
    Path(path).write_text(render_html(report, timeline), encoding="utf-8")
