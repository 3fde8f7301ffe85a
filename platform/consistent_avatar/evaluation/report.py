"""`report.html`: one self-contained page from an evaluation's ``metrics.json``.

The page opens offline: inline CSS, plots drawn here as inline SVG (no matplotlib, no JavaScript, no
CDN), image strips embedded as base64 PNG. It holds

- Table 1 of the paper (L2, PSNR, SSIM, LPIPS, seconds/frame) for the rows that were evaluated, in the
  paper's order: coarse input, w/o stage 2 (baseline), w/o normal, w/o emotion, w/o LCM, full;
- Table 2 (pose error, expression error) plus the platform's temporal columns (flow-curve mean abs
  difference, flicker) and, where synthetic truth exists, emotion accuracy;
- per actor: per-frame PSNR of every row, and the optical-flow magnitude curves of every row against
  the real video's (the paper's Fig. 7);
- the worst and best frames by PSNR of the full row as coarse | ours | real strips;
- the command and machine that produced the metrics (and the renders).

A metric that was not computed is shown as "n/a" with its reason as a footnote. Every string taken
from the metrics (actor names, reasons, commands) is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import ConsistentAvatarError
from ..io import atomic_write_bytes, read_json

# Paper order of Table 1's ablation rows; rows not listed here follow in the order they appear.
ROW_ORDER = ("coarse", "baseline", "without_normal", "without_emotion", "without_lcm", "full")
ROW_LABELS = {
    "coarse": "Coarse input (stage 1)",
    "baseline": "w/o stage 2 (baseline)",
    "without_normal": "w/o normal",
    "without_emotion": "w/o emotion",
    "without_lcm": "w/o LCM",
    "full": "Ours (full)",
}
# metric key → (column title, format, better: "lower" | "higher")
METRIC_COLUMNS: dict[str, tuple[str, str, str]] = {
    "l2": ("L2 ↓", "{:.4f}", "lower"),
    "psnr": ("PSNR ↑", "{:.2f}", "higher"),
    "ssim": ("SSIM ↑", "{:.3f}", "higher"),
    "lpips": ("LPIPS ↓", "{:.3f}", "lower"),
    "seconds_per_frame": ("Time (s/frame) ↓", "{:.3f}", "lower"),
    "pose_error": ("PE ↓", "{:.4f}", "lower"),
    "expression_error": ("EE ↓", "{:.4f}", "lower"),
    "flow_mean_abs_diff": ("Flow-curve |Δ| vs real ↓", "{:.4f}", "lower"),
    "flicker": ("Flicker ↓", "{:.4f}", "lower"),
    "emotion_accuracy": ("Emotion acc. ↑", "{:.3f}", "higher"),
}
TABLE1 = ("l2", "psnr", "ssim", "lpips", "seconds_per_frame")
TABLE2 = ("pose_error", "expression_error", "flow_mean_abs_diff", "flicker", "emotion_accuracy")
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
REAL_COLOUR = "#111111"

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2em auto;max-width:1200px;
color:#222;padding:0 1em}
h1{font-size:1.6em}h2{margin-top:2em;border-bottom:1px solid #ccc;padding-bottom:.2em}h3{margin-top:1.5em}
table{border-collapse:collapse;margin:.8em 0}th,td{border:1px solid #bbb;padding:.3em .7em;text-align:right}
th{background:#f0f0f0}td.name,th.name{text-align:left}tr.full td{background:#fff8e0}
td.na{color:#888}b.best{color:#000}sup{font-size:.7em}
.footnotes{font-size:.85em;color:#444}
.meta{font-size:.85em;background:#f7f7f7;padding:.6em;border:1px solid #ddd;overflow-x:auto}
.plots{display:flex;flex-wrap:wrap;gap:1em}.strip{display:inline-block;margin:.4em;text-align:center;font-size:.85em}
.strip img{image-rendering:pixelated;border:1px solid #999;display:block}
code{background:#f3f3f3;padding:0 .2em}
"""


# ---------------------------------------------------------------------------------------------
# Value helpers
# ---------------------------------------------------------------------------------------------


def esc(value: Any) -> str:
    """HTML-escape anything (quotes too: values also land in attributes)."""
    return html.escape(str(value), quote=True)


def as_float(value: Any) -> float | None:
    """A metrics.json number back to float: numbers, the strings "inf"/"-inf"/"nan", or None."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def format_value(value: Any, fmt: str) -> str:
    v = as_float(value)
    if v is None:
        return "n/a"
    if math.isinf(v):
        return "∞" if v > 0 else "−∞"
    if math.isnan(v):
        return "nan"
    return fmt.format(v)


def ordered_rows(rows: Sequence[str]) -> list[str]:
    known = [r for r in ROW_ORDER if r in rows]
    return known + [r for r in rows if r not in ROW_ORDER]


def row_label(row: str) -> str:
    return ROW_LABELS.get(row, row)


# ---------------------------------------------------------------------------------------------
# Footnotes
# ---------------------------------------------------------------------------------------------


class Footnotes:
    """Numbered, de-duplicated reasons for n/a cells."""

    def __init__(self) -> None:
        self.notes: list[str] = []

    def ref(self, text: str) -> str:
        if text not in self.notes:
            self.notes.append(text)
        n = self.notes.index(text) + 1
        return f'<sup><a href="#fn{n}">[{n}]</a></sup>'

    def html(self) -> str:
        if not self.notes:
            return ""
        items = "".join(f'<li id="fn{i}">{esc(t)}</li>' for i, t in enumerate(self.notes, 1))
        return f'<ol class="footnotes">{items}</ol>'


def _cell(entry: dict[str, Any], metric: str, fmt: str, notes: Footnotes, best: bool) -> str:
    values = entry.get("metrics") or entry.get("mean") or {}
    if metric not in values and metric not in (entry.get("unavailable") or {}):
        return '<td class="na">—</td>'  # does not apply to this line
    value = values.get(metric)
    if as_float(value) is None:
        reason = (entry.get("unavailable") or {}).get(metric) or "not computed"
        title = METRIC_COLUMNS[metric][0].rstrip(" ↑↓")
        return f'<td class="na">n/a{notes.ref(f"{title}: {reason}")}</td>'
    text = esc(format_value(value, fmt))
    return f"<td><b class=\"best\">{text}</b></td>" if best else f"<td>{text}</td>"


def _best_rows(entries: dict[str, dict[str, Any]], metric: str) -> set[str]:
    """The rows holding the best finite-or-infinite value of ``metric`` (bold in the table)."""
    better = METRIC_COLUMNS[metric][2]
    vals = {}
    for row, e in entries.items():
        v = as_float((e.get("metrics") or e.get("mean") or {}).get(metric))
        if v is not None and not math.isnan(v):
            vals[row] = v
    if len(vals) < 2:
        return set()
    target = min(vals.values()) if better == "lower" else max(vals.values())
    return {r for r, v in vals.items() if v == target}


def metrics_table(
    entries: dict[str, dict[str, Any]],
    metrics: Sequence[str],
    notes: Footnotes,
    extra: Sequence[tuple[str, str, dict[str, Any]]] = (),
) -> str:
    """A table: one line per row (paper order), one column per metric; best values in bold.
    ``extra``: (label, code, entry) lines appended below (reference lines, never bold)."""
    head = "".join(f"<th>{esc(METRIC_COLUMNS[m][0])}</th>" for m in metrics)
    best = {m: _best_rows(entries, m) for m in metrics}
    lines = []
    for row in ordered_rows(list(entries)):
        e = entries[row]
        cells = "".join(_cell(e, m, METRIC_COLUMNS[m][1], notes, row in best[m]) for m in metrics)
        cls = ' class="full"' if row == "full" else ""
        lines.append(f'<tr{cls}><td class="name">{esc(row_label(row))}</td>'
                     f'<td class="name"><code>{esc(row)}</code></td>{cells}</tr>')
    for label, code, e in extra:
        cells = "".join(_cell(e, m, METRIC_COLUMNS[m][1], notes, False) for m in metrics)
        lines.append(f'<tr><td class="name"><i>{esc(label)}</i></td>'
                     f'<td class="name"><code>{esc(code)}</code></td>{cells}</tr>')
    return (
        f'<table><thead><tr><th class="name">Method</th><th class="name">row</th>{head}</tr></thead>'
        f"<tbody>{''.join(lines)}</tbody></table>"
    )


# ---------------------------------------------------------------------------------------------
# Inline SVG line plots
# ---------------------------------------------------------------------------------------------


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / max(1, n)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(s * mag for s in (1, 2, 2.5, 5, 10) if s * mag >= raw)
    start = math.ceil(lo / step) * step
    ticks = []
    t = start
    while t <= hi + 1e-9 * step:
        ticks.append(round(t, 10))
        t += step
    return ticks


def _fmt_tick(v: float) -> str:
    return f"{v:.4g}"


def line_plot_svg(
    series: Sequence[tuple[str, Sequence[float], Sequence[Any], str]],
    title: str,
    xlabel: str,
    ylabel: str,
    width: int = 560,
    height: int = 300,
) -> str:
    """An inline ``<svg>`` line plot. ``series``: (label, xs, ys, colour); ys may hold None (a gap),
    +inf (drawn on the top edge, marked in the legend) and -inf (bottom edge)."""
    ml, mr, mt, mb = 58, 12, 28, 42
    pw, ph = width - ml - mr, height - mt - mb
    xs_all = [float(x) for _, xs, _, _ in series for x in xs]
    finite = [v for _, _, ys, _ in series for y in ys if (v := as_float(y)) is not None and math.isfinite(v)]
    has_inf = any((v := as_float(y)) is not None and math.isinf(v) for _, _, ys, _ in series for y in ys)
    parts = [
        f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'role="img" aria-label="{esc(title)}" style="background:#fff;border:1px solid #ddd">',
        f'<text x="{width / 2:.1f}" y="18" text-anchor="middle" font-size="13" font-weight="bold">{esc(title)}</text>',
    ]
    if not xs_all or (not finite and not has_inf):
        parts.append(f'<text x="{width / 2:.1f}" y="{height / 2:.1f}" text-anchor="middle" font-size="12" '
                     'fill="#888">no data</text></svg>')
        return "".join(parts)
    x0, x1 = min(xs_all), max(xs_all)
    if x1 == x0:
        x1 = x0 + 1
    y0, y1 = (min(finite), max(finite)) if finite else (0.0, 1.0)
    if y1 - y0 < 1e-12:
        y0, y1 = y0 - 0.5 if y0 else -0.5, y1 + 0.5 if y1 else 0.5
    pad = 0.05 * (y1 - y0)
    y0, y1 = y0 - pad, y1 + pad

    def px(x: float) -> float:
        return ml + (x - x0) / (x1 - x0) * pw

    def py(y: float) -> float:
        return mt + (1 - (y - y0) / (y1 - y0)) * ph

    parts.append(f'<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>')
    for t in _nice_ticks(y0, y1):
        if y0 <= t <= y1:
            parts.append(f'<line x1="{ml}" x2="{ml + pw}" y1="{py(t):.1f}" y2="{py(t):.1f}" stroke="#eee"/>')
            parts.append(f'<text x="{ml - 4}" y="{py(t) + 4:.1f}" text-anchor="end" '
                         f'font-size="10">{esc(_fmt_tick(t))}</text>')
    for t in _nice_ticks(x0, x1, 6):
        if x0 <= t <= x1:
            parts.append(f'<line x1="{px(t):.1f}" x2="{px(t):.1f}" y1="{mt + ph}" y2="{mt + ph + 4}" stroke="#666"/>')
            parts.append(f'<text x="{px(t):.1f}" y="{mt + ph + 15}" text-anchor="middle" '
                         f'font-size="10">{esc(_fmt_tick(t))}</text>')
    parts.append(f'<text x="{ml + pw / 2:.1f}" y="{height - 6}" text-anchor="middle" font-size="11">{esc(xlabel)}</text>')
    parts.append(
        f'<text x="12" y="{mt + ph / 2:.1f}" text-anchor="middle" font-size="11" '
        f'transform="rotate(-90 12 {mt + ph / 2:.1f})">{esc(ylabel)}</text>'
    )
    legend = []
    # the real video's curve is drawn last, dashed, so that a render that follows it exactly shows both
    drawn = sorted(series, key=lambda s: s[3] == REAL_COLOUR)
    for label, xs, ys, colour in drawn:
        dash = ' stroke-dasharray="5,3"' if colour == REAL_COLOUR else ""
        segments: list[list[str]] = [[]]
        inf_here = False
        for x, y in zip(xs, ys):
            v = as_float(y)
            if v is None or math.isnan(v):
                segments.append([])
                continue
            if math.isinf(v):
                inf_here = True
                v = y1 if v > 0 else y0
            segments[-1].append(f"{px(float(x)):.1f},{py(v):.1f}")
        for seg in segments:
            if len(seg) > 1:
                points = " ".join(seg)
                parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5"{dash} points="{points}"/>')
            elif len(seg) == 1:
                cx, cy = seg[0].split(",")
                parts.append(f'<circle cx="{cx}" cy="{cy}" r="2" fill="{colour}"/>')
        legend.append((label + (" (∞ on the top edge)" if inf_here else ""), colour))
    legend.sort(key=lambda item: item[1] != REAL_COLOUR)
    longest = max((len(label) for label, _ in legend), default=0)
    box_w, box_h = min(pw - 8, 34 + 5.6 * longest), 13 * len(legend) + 4
    parts.append(f'<rect x="{ml + 4}" y="{mt + 3}" width="{box_w:.0f}" height="{box_h}" '
                 'fill="#fff" fill-opacity="0.8" stroke="#ddd"/>')
    for i, (label, colour) in enumerate(legend):
        ly = mt + 12 + 13 * i
        dash = ' stroke-dasharray="5,3"' if colour == REAL_COLOUR else ""
        parts.append(f'<line x1="{ml + 8}" x2="{ml + 26}" y1="{ly - 4}" y2="{ly - 4}" stroke="{colour}" '
                     f'stroke-width="2"{dash}/>')
        parts.append(f'<text x="{ml + 30}" y="{ly}" font-size="10">{esc(label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


# ---------------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------------


def _reference_lines(reference: dict[str, Any] | None, actor: str | None) -> list[tuple[str, str, dict[str, Any]]]:
    """The "real frames" reference line: the face estimator's PE/EE/emotion accuracy on the real
    frames (the floor a perfect render would reach), when an estimator ran."""
    if not reference:
        return []
    values = reference.get("mean") if actor is None else (reference.get("actors") or {}).get(actor)
    if not values:
        return []
    keys = ("pose_error", "expression_error", "emotion_accuracy")
    entry = {"metrics": {k: values.get(k) for k in keys},
             "unavailable": {k: (reference.get("unavailable") or {}).get(k) or "not computed"
                             for k in keys if values.get(k) is None}}
    if all(values.get(k) is None for k in keys):
        return []
    return [("Real frames (estimator floor)", "real", entry)]


def _row_colours(rows: Sequence[str]) -> dict[str, str]:
    return {r: PALETTE[i % len(PALETTE)] for i, r in enumerate(ordered_rows(list(rows)))}


def _actor_plots(metrics: dict[str, Any], actor: str, colours: dict[str, str]) -> str:
    psnr_series, flow_series = [], []
    real_curve: tuple[list[float], list[Any]] | None = None
    for row in ordered_rows(list(metrics.get("rows", {}))):
        a = metrics["rows"][row].get("actors", {}).get(actor)
        if not a:
            continue
        curves = a.get("curves") or {}
        frames = curves.get("frame") or []
        if curves.get("psnr"):
            psnr_series.append((row_label(row), frames, curves["psnr"], colours[row]))
        if curves.get("flow_rendered"):
            fx = curves.get("flow_frame") or frames[1:]
            flow_series.append((row_label(row), fx, curves["flow_rendered"], colours[row]))
            if real_curve is None and curves.get("flow_real"):
                real_curve = (fx, curves["flow_real"])
    if real_curve is not None:
        flow_series.insert(0, ("real video", real_curve[0], real_curve[1], REAL_COLOUR))
    return (
        '<div class="plots">'
        + line_plot_svg(psnr_series, f"Per-frame PSNR — {actor}", "frame", "PSNR (dB)")
        + line_plot_svg(flow_series, f"Optical-flow magnitude between adjacent frames — {actor}", "frame",
                        "mean |flow| (px)")
        + "</div>"
    )


def _image_tag(path: Path, alt: str) -> str | None:
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if not data.startswith(b"\x89PNG"):
        return None
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode("ascii")}">'


def _strips(metrics: dict[str, Any], base: Path | None, notes: Footnotes) -> str:
    strips = metrics.get("strips") or {}
    if not strips:
        reason = metrics.get("strips_unavailable") or "no row was evaluated with per-frame PSNR"
        return f"<p>n/a{notes.ref('image strips: ' + reason)}</p>"
    out = []
    for actor, info in strips.items():
        row = info.get("row", "full")
        out.append(f"<h3>{esc(actor)} — row <code>{esc(row)}</code> (coarse | ours | real)</h3>")
        for kind in ("worst", "best"):
            items = []
            for item in info.get(kind, []):
                rel = item.get("image")
                tag = None
                if rel:
                    p = Path(rel)
                    where = p if p.is_absolute() or base is None else base / p
                    tag = _image_tag(where, f"{actor} frame {item.get('frame')}")
                caption = f"frame {item.get('frame')} · PSNR {format_value(item.get('psnr'), '{:.2f}')}"
                if tag is None:
                    tag = f"<span>n/a{notes.ref('image strip file not found: ' + str(rel))}</span>"
                items.append(f'<div class="strip">{tag}{esc(caption)}</div>')
            out.append(f"<p><b>{kind} frames by PSNR</b></p><div>{''.join(items) or 'none'}</div>")
    return "".join(out)


def _meta_block(title: str, command: Any, machine: Any, created: Any) -> str:
    rows = [f"<tr><th class=\"name\">command</th><td class=\"name\"><code>{esc(command or 'unknown')}</code></td></tr>"]
    if isinstance(machine, dict):
        for k, v in machine.items():
            rows.append(f'<tr><th class="name">{esc(k)}</th><td class="name">{esc(v)}</td></tr>')
    elif machine:
        rows.append(f'<tr><th class="name">machine</th><td class="name">{esc(machine)}</td></tr>')
    rows.append(f'<tr><th class="name">created at</th><td class="name">{esc(created or "unknown")}</td></tr>')
    return f"<h3>{esc(title)}</h3><table class=\"meta\">{''.join(rows)}</table>"


def render_html(metrics: dict[str, Any], base_dir: str | os.PathLike[str] | None = None) -> str:
    """The report page as a string (see :func:`write_report`)."""
    if not isinstance(metrics, dict) or "rows" not in metrics:
        raise ConsistentAvatarError("not an evaluation metrics.json (no 'rows'): run `cavatar evaluate` first")
    base = Path(base_dir) if base_dir is not None else None
    notes = Footnotes()
    rows: dict[str, Any] = metrics["rows"]
    colours = _row_colours(list(rows))
    actors: list[str] = []
    for r in ordered_rows(list(rows)):
        for a in rows[r].get("actors", {}):
            if a not in actors:
                actors.append(a)

    split = metrics.get("split", "?")
    res = metrics.get("resolution")
    body = [
        "<h1>ConsistentAvatar evaluation</h1>",
        f"<p>Run <code>{esc(metrics.get('run', '?'))}</code> · shards <code>{esc(metrics.get('shards', '?'))}</code> · "
        f"split <code>{esc(split)}</code>{' · ' + esc(res) + '²' if res else ''} · "
        f"{len(actors)} actor(s): {esc(', '.join(actors)) or 'none'}</p>",
    ]
    means = {r: {"metrics": rows[r].get("mean", {}), "unavailable": rows[r].get("unavailable", {})} for r in rows}
    body.append("<h2>Table 1 — image quality and speed</h2>")
    body.append("<p>Per row: the mean of the per-actor means (each actor weighs the same, as in the paper's "
                "per-dataset tables; frame-weighted means are in metrics.json). L2 is the mean squared error on "
                "[0, 1] intensities; PSNR of frames identical to the real ones (+∞) is left out of means.</p>")
    body.append(metrics_table(means, TABLE1, notes))
    body.append("<h2>Table 2 — pose, expression and temporal consistency</h2>")
    face = (metrics.get("components") or {}).get("face_estimator") or {}
    against = ("its reading of the real frame (its codes are not the shards')"
               if face.get("reference") == "estimate on the real frames" else "the shard's tracked values")
    body.append("<p>PE / EE: distance between the face-parameter estimator's pose / expression on the frame and "
                f"{esc(against)}. Flow-curve |Δ|: mean absolute difference between the optical-flow magnitude "
                "curve of the rendered video and the real video's (Fig. 7); flicker: frame-to-frame change of the "
                "rendered video that the real video does not have (mean excess squared difference, 0 = none).</p>")
    body.append(metrics_table(means, TABLE2, notes, _reference_lines(metrics.get("reference"), None)))
    tracked = ((metrics.get("reference") or {}).get("mean") or {}).get("tracked_emotion_accuracy")
    if tracked is not None:
        body.append("<p>Emotion labelling of the shards (nearest neighbour of each frame's tracked expression in the "
                    f"labelled database, as <code>cavatar prepare</code> labels them) against the synthetic truth: "
                    f"<b>{100 * tracked:.1f} %</b> of frames.</p>")

    body.append("<h2>Per actor</h2>")
    for actor in actors:
        body.append(f"<h3>{esc(actor)}</h3>")
        entries = {r: rows[r]["actors"][actor] for r in rows if actor in rows[r].get("actors", {})}
        ref = _reference_lines(metrics.get("reference"), actor)
        body.append(metrics_table(entries, TABLE1 + TABLE2, notes, ref))
        body.append(_actor_plots(metrics, actor, colours))

    body.append("<h2>Worst and best frames</h2>")
    body.append(_strips(metrics, base, notes))

    body.append("<h2>Provenance</h2>")
    body.append(_meta_block("evaluation", metrics.get("command"), metrics.get("machine"), metrics.get("created_at")))
    render = metrics.get("render") or {}
    if render:
        body.append(_meta_block("renders", render.get("command"), render.get("machine"), render.get("created_at")))
    settings = {r: rows[r].get("settings") for r in ordered_rows(list(rows)) if rows[r].get("settings")}
    if settings:
        items = "".join(
            f'<tr><td class="name"><code>{esc(r)}</code></td>'
            f'<td class="name"><code>{esc(json.dumps(s, sort_keys=True, default=str))}</code></td></tr>'
            for r, s in settings.items()
        )
        body.append(f"<h3>render settings per row</h3><table class=\"meta\">{items}</table>")
    if notes.notes:
        body.append("<h2>Notes</h2>")
        body.append(notes.html())
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>ConsistentAvatar evaluation — {esc(metrics.get('run', ''))}</title>"
        f"<style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def write_report(
    metrics: str | os.PathLike[str] | dict[str, Any],
    out_html: str | os.PathLike[str],
    base_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Write the self-contained ``report.html`` for ``metrics`` (a metrics.json path or its dict).

    Image strips named in the metrics by relative path are looked up under ``base_dir`` (default: the
    folder of the metrics.json, or the dict's ``eval_dir``). The file is written atomically.
    """
    if isinstance(metrics, (str, os.PathLike)):
        path = Path(metrics)
        if not path.is_file():
            raise ConsistentAvatarError(
                f"{path} does not exist: run `cavatar evaluate` first (it writes EVAL/metrics.json)"
            )
        try:
            data = read_json(path)
        except ValueError as exc:
            raise ConsistentAvatarError(f"{path} is not valid JSON ({exc}): re-run `cavatar evaluate`") from exc
        base = base_dir if base_dir is not None else path.parent
    else:
        data = metrics
        base = base_dir if base_dir is not None else data.get("eval_dir")
    page = render_html(data, base)
    out = Path(out_html)
    atomic_write_bytes(out, page.encode("utf-8"))
    return out
