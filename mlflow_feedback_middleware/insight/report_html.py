"""A self-contained HTML page for a feedback report: inline SVG charts, no scripts, no network."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

_WIDTH, _HEIGHT, _PAD, _LEFT = 720, 260, 40, 56
_COLOURS = {"feedback_rate": "#2563eb", "positive_rate": "#16a34a"}
_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2rem auto; max-width: 780px; color: #111; }
h1 { font-size: 1.4rem; } h2 { font-size: 1.1rem; margin-top: 2rem; }
table { border-collapse: collapse; } td, th { padding: .2rem .8rem; text-align: right; }
td:first-child, th:first-child { text-align: left; }
.figures td { font-size: 1.1rem; white-space: nowrap; } .figures td.why { white-space: normal; }
.figures td.why { font-size: .85rem; color: #555; text-align: left; }
svg text { font-size: 11px; fill: #444; } svg text.axis { font-size: 12px; fill: #222; }
table.comments td { text-align: left; vertical-align: top; } table.periods { margin-top: .5rem; font-size: .9rem; }
.legend span { margin-right: 1rem; }
h3 { font-size: 1rem; margin: 1.2rem 0 .4rem; } table.confusion td, table.confusion th { border: 1px solid #ccc; }
.legend i { display: inline-block; width: 1rem; height: .3rem; margin-right: .3rem; vertical-align: middle; }
"""


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _short(key: str) -> str:
    """A period's label on the axis: ``2026-11-30`` as ``11-30``, ``2026-11-30T23:00Z`` as ``11-30 23:00``."""
    if len(key) >= 10 and key[4] == "-":
        day = key[5:10]
        return f"{day} {key[11:16]}" if "T" in key else day
    return key


def rate_chart(timeline: dict[str, dict[str, Any]], by: str = "day") -> str:
    """Feedback rate and positive rate (0-100 %) per period, as an SVG line chart with labelled axes, and the
    same figures as a table (the chart alone says little with a few periods)."""
    keys = list(timeline)
    if not keys:
        return "<p>No traced requests in this window.</p>"
    plot_w, plot_h = _WIDTH - _LEFT - _PAD, _HEIGHT - 2 * _PAD - 10
    # A single period sits in the middle; more spread over the width, the first and last inside it.
    step = plot_w / max(len(keys) - 1, 1)

    def point(i: int, percent: float) -> tuple[float, float]:
        x = _LEFT + (plot_w / 2 if len(keys) == 1 else i * step)
        return x, _PAD + plot_h * (1 - percent / 100)

    parts = [f'<svg role="img" aria-label="feedback and positive rate over time" width="{_WIDTH}" height="{_HEIGHT}">']
    for percent in (0, 25, 50, 75, 100):
        _, y = point(0, percent)
        parts.append(f'<line x1="{_LEFT}" x2="{_WIDTH - _PAD}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>')
        parts.append(f'<text x="{_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{percent}%</text>')
    mid = _PAD + plot_h / 2
    parts.append(
        f'<text class="axis" x="14" y="{mid:.1f}" text-anchor="middle" transform="rotate(-90 14 {mid:.1f})">'
        "% of requests</text>"
    )
    label_every = max(1, -(-len(keys) // 8))
    for i, key in enumerate(keys):
        if i % label_every == 0 or i == len(keys) - 1:
            x, _ = point(i, 0)
            anchor = (
                "start" if i == 0 and len(keys) > 1 else "end" if i == len(keys) - 1 and len(keys) > 1 else "middle"
            )
            y = _PAD + plot_h + 16
            parts.append(f'<text x="{x:.1f}" y="{y}" text-anchor="{anchor}">{_esc(_short(key))}</text>')
    centre = _LEFT + plot_w / 2
    parts.append(f'<text class="axis" x="{centre:.1f}" y="{_HEIGHT - 6}" text-anchor="middle">{_esc(by)} (UTC)</text>')
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
    rows = "".join(
        f"<tr><td>{_esc(key)}</td><td>{g['total_traces']}</td><td>{g['traces_with_feedback']}</td>"
        f"<td>{g['feedback_rate']:.1f}%</td><td>{g['positive_rate']:.1f}%</td></tr>"
        for key, g in timeline.items()
    )
    table = (
        f"<details{' open' if len(keys) <= 3 else ''}><summary>Figures per {_esc(by)}</summary>"
        '<table class="periods"><tr><th>period</th><th>requests</th><th>with feedback</th>'
        f"<th>feedback rate</th><th>positive rate</th></tr>{rows}</table></details>"
    )
    return f'<div class="legend">{legend}</div>' + "".join(parts) + table


def distribution_chart(dimension: str, distribution: dict[str, int]) -> str:
    """Counts per rating value of one dimension (on the scale users gave), as SVG bars."""
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


def render_html(report: dict[str, Any], timeline: dict[str, dict[str, Any]], by: str = "day") -> str:
    """The page: headline figures, rates over time, rating distributions, latest negative comments."""
    window = report.get("window", {})
    title = f"Feedback report: {report.get('experiment', '')}"
    thumbs = report["positive_count"] + report["negative_count"]
    rows = [
        ("Traced requests", report["total_traces"], ""),
        (
            "With feedback",
            f"{report['traces_with_feedback']} ({report['feedback_rate']:.1f}%)",
            "requests with any feedback, of all traced requests",
        ),
        (
            "Thumbs up",
            f"{report['thumbs_positive_rate']:.1f}% ({report['positive_count']} of {thumbs})",
            "positive thumbs votes, of all thumbs votes",
        ),
        (
            "Positive rate",
            f"{report['positive_rate']:.1f}%",
            "MLflow guide's figure: thumbs up per request with any feedback (ratings-only requests count too)",
        ),
    ]
    if report.get("withdrawn_count"):
        rows.append(("Withdrawn votes", report["withdrawn_count"], "votes their users took back; not counted above"))
    for name, signal in report.get("signals", {}).items():
        rows.append((name, f"{signal['rate']:.1f}% ({signal['count']})", "implicit signal, of all traced requests"))
    body = [
        f"<h1>{_esc(title)}</h1>",
        f"<p>{_esc(window.get('since') or 'start')} → {_esc(window.get('until') or 'now')}</p>",
        '<table class="figures">'
        + "".join(f'<tr><td>{_esc(k)}</td><td>{_esc(v)}</td><td class="why">{_esc(w)}</td></tr>' for k, v, w in rows)
        + "</table>",
        "<h2>Feedback rate and positive rate over time</h2>",
        rate_chart(timeline, by),
    ]
    for dimension, stats in report["ratings"].items():
        scale = stats.get("scale_max")
        if scale:
            heading = f"Rating: {dimension} (mean {stats['mean_on_scale']:.2f} of {scale:g}, n={stats['count']})"
            distribution = stats["distribution_on_scale"]
        else:
            heading = f"Rating: {dimension} (mean {stats['mean']:.2f} on 0-1, n={stats['count']})"
            distribution = stats["distribution"]
        body.append(f"<h2>{_esc(heading)}</h2>")
        body.append(distribution_chart(dimension, distribution))
    if report["latest_negative_comments"]:
        body.append('<h2>Latest negative comments</h2><table class="comments">')
        for c in report["latest_negative_comments"]:
            body.append(f"<tr><td>{_esc(c['time'])}</td><td>{_esc(c['user'])}</td><td>{_esc(c['comment'])}</td></tr>")
        body.append("</table>")
    if "agreement" in report:
        body.append(agreement_section(report["agreement"]))
    data = json.dumps(report, ensure_ascii=False).replace("</", "<\\/")  # cannot close the script element
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}</title>'
        f"<style>{_STYLE}</style></head><body>{''.join(body)}"
        f'<script type="application/json" id="report-data">{data}</script></body></html>\n'
    )


def agreement_section(figures: dict[str, Any]) -> str:
    """Users versus judges: per judge its agreement, kappa, confusion matrix, and the latest disagreements."""
    out = [
        "<h2>Users versus judges</h2>",
        f"<p>{figures['traces_with_both']} traces have both end-user votes and a judge's or scorer's feedback"
        f" ({figures['traces_with_tied_users']} more with tied users are left out). Kappa near 0: no better than"
        " chance; below about 0.4 a judge is rarely trusted alone.</p>",
    ]
    for judge, stats in figures["judges"].items():
        rate, kappa, confusion = stats["agreement_rate"], stats["cohens_kappa"], stats["confusion"]
        shown_rate = "-" if rate is None else f"{rate:.1f}%"
        shown_kappa = "-" if kappa is None else f"{kappa:.2f}"
        out.append(
            f"<h3>{_esc(judge)}: agreement {shown_rate}, Cohen's kappa {shown_kappa}, n={stats['traces_compared']}</h3>"
            '<table class="confusion"><tr><th></th><th>judge passes</th><th>judge fails</th></tr>'
            f"<tr><th>users positive</th><td>{confusion['users_positive']['judge_pass']}</td>"
            f"<td>{confusion['users_positive']['judge_fail']}</td></tr>"
            f"<tr><th>users negative</th><td>{confusion['users_negative']['judge_pass']}</td>"
            f"<td>{confusion['users_negative']['judge_fail']}</td></tr></table>"
        )
        if stats["disagreements"]:
            out.append('<table class="comments">')
            for case in stats["disagreements"]:
                out.append(
                    f"<tr><td>{_esc(case['time'])}</td><td>{_esc(case['trace_id'])}</td>"
                    f"<td>users {_esc(case['users'])}, judge {_esc(case['judge'])}</td>"
                    f"<td>{_esc(case['judge_rationale'] or '')}</td></tr>"
                )
            out.append("</table>")
    return "".join(out)


def write_html(report: dict[str, Any], timeline: dict[str, dict[str, Any]], path: str | Path, by: str = "day") -> None:
    """Write the page for `report` to `path`; `timeline` holds its figures per `by` period (day or hour)."""
    Path(path).write_text(render_html(report, timeline, by), encoding="utf-8")
