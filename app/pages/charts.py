"""Small line charts drawn server-side as inline SVG (no JavaScript, no plotting library)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from html import escape

from markupsafe import Markup

WIDTH, HEIGHT, PAD = 420, 180, 36


def _ticks(lo: float, hi: float) -> tuple[float, float]:
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def line_chart(
    series: Mapping[str, Sequence[tuple[float, float]]],
    *,
    title: str,
    x_label: str,
    y_label: str,
    y_range: tuple[float, float] | None = None,
) -> Markup:
    """An SVG line chart of one or more series of (x, y) points, with its title as a label."""
    points = [p for s in series.values() for p in s]
    if not points:
        return Markup(f'<p class="empty">{escape(title)}: no data yet.</p>')
    x0, x1 = _ticks(min(p[0] for p in points), max(p[0] for p in points))
    y0, y1 = y_range or _ticks(min(p[1] for p in points), max(p[1] for p in points))

    def sx(x: float) -> float:
        return PAD + (x - x0) / (x1 - x0) * (WIDTH - 2 * PAD)

    def sy(y: float) -> float:
        return HEIGHT - PAD - (y - y0) / (y1 - y0) * (HEIGHT - 2 * PAD)

    colours = ["#1f5fd6", "#d6401f", "#1f9d55", "#8a3ffc", "#b07800", "#00828c"]
    parts = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        f'aria-label="{escape(title)}"><title>{escape(title)}</title>',
        f'<line x1="{PAD}" y1="{HEIGHT - PAD}" x2="{WIDTH - PAD}" y2="{HEIGHT - PAD}" '
        'stroke="#888"/>',
        f'<line x1="{PAD}" y1="{PAD}" x2="{PAD}" y2="{HEIGHT - PAD}" stroke="#888"/>',
        f'<text x="{WIDTH / 2}" y="{HEIGHT - 6}" text-anchor="middle">{escape(x_label)}</text>',
        f'<text x="12" y="{HEIGHT / 2}" transform="rotate(-90 12 {HEIGHT / 2})" '
        f'text-anchor="middle">{escape(y_label)}</text>',
        f'<text x="{PAD - 4}" y="{HEIGHT - PAD}" text-anchor="end">{y0:.3g}</text>',
        f'<text x="{PAD - 4}" y="{PAD + 4}" text-anchor="end">{y1:.3g}</text>',
        f'<text x="{WIDTH - PAD}" y="{HEIGHT - PAD + 14}" text-anchor="end">{x1:.3g}</text>',
    ]
    for i, (name, s) in enumerate(series.items()):
        colour = colours[i % len(colours)]
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in s)
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{path}"/>')
        if len(series) > 1:
            parts.append(
                f'<text x="{WIDTH - PAD}" y="{PAD + 12 * i}" text-anchor="end" '
                f'fill="{colour}">{escape(name)}</text>'
            )
    parts.append("</svg>")
    return Markup("".join(parts))
