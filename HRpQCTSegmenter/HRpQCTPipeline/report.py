"""Quality-control reports: PNG figures and HTML pages, per scan and per cohort.

A scan's page (``<scan>_report.html``) links PNGs in the same folder (relative links, so the
folder can be moved or zipped as a whole):

* ``<scan>_overlay.png`` -- representative slices, the scan above and the seven regions on
  it below, in the region colours of :data:`HRpQCTCore.regions.REGIONS`;
* ``<scan>_profiles.png`` -- per-slice area of each region, and the network's confidence.

Sections of the page (HTML ids): ``warnings``, ``probability``, ``regions``, ``features``,
``images``, ``outputs``, ``provenance``. The cohort page (``index.html``) has ``scans`` and
``failures``. matplotlib draws the figures; without it the pages are written without them
(with a note).
"""

from __future__ import annotations

import html
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from HRpQCTCore.atomic import atomic_path, write_text_atomic
from HRpQCTCore.regions import REGIONS
from HRpQCTPipeline.qc import labelled_box

__all__ = [
    "HU_WINDOW",
    "representative_slices",
    "overlay_figure",
    "profiles_figure",
    "scan_report_html",
    "cohort_report_html",
    "write_scan_report",
    "write_cohort_report",
]

log = logging.getLogger("hrpqct")

#: Display window of the scan (HU): soft tissue and bone both visible.
HU_WINDOW = (-600.0, 2200.0)
#: Opacity of the region fill on the overlay.
OVERLAY_ALPHA = 0.45

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; max-width: 1400px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 1.6em;
  border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.5em 0; }
td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: right; font-size: 0.92em; }
th { background: #f3f3f3; } td.l, th.l { text-align: left; }
.caveat { background: #fff6d6; border: 1px solid #e0c060; padding: 0.6em 1em; }
.warn { background: #fde8e8; border: 1px solid #d77; padding: 0.6em 1em; }
.ok { background: #e8f6e8; border: 1px solid #7b7; padding: 0.6em 1em; }
.swatch { display: inline-block; width: 0.9em; height: 0.9em; border: 1px solid #555;
  vertical-align: middle; margin-right: 0.3em; }
.prob { font-size: 1.6em; font-weight: bold; }
img { max-width: 100%; border: 1px solid #ddd; }
code { font-size: 0.9em; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        return f"{value:,.{digits}f}"
    return _e(value)


def _class_probability_table(classes: dict[str, Any] | None) -> str:
    """A multiclass classifier's probability of every class ("" for a binary one)."""
    if not classes:
        return ""
    rows = "".join(f"<tr><td class=\"l\">{_e(name)}</td><td>{_fmt(p, 2)}</td></tr>"
                   for name, p in classes.items())
    return ("<table><tr><th class=\"l\">class</th><th>probability</th></tr>"
            f"{rows}</table>")


def _page(title: str, body: str) -> str:
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_e(title)}</title><style>{_CSS}</style></head>\n<body>\n{body}\n"
            "</body></html>\n")


# --- figures -----------------------------------------------------------------------------

def representative_slices(n_slices: int, extra: Sequence[int] = (), count: int = 3
                          ) -> list[int]:
    """Evenly spread slices (at 1/6, 1/2, 5/6 of the stack for 3) plus ``extra`` ones."""
    picks = [round((2 * i + 1) * n_slices / (2 * count) - 0.5) for i in range(count)]
    picks = [min(max(p, 0), n_slices - 1) for p in picks]
    for z in extra:
        if z is not None and 0 <= int(z) < n_slices and int(z) not in picks:
            picks.append(int(z))
    return sorted(dict.fromkeys(picks))


def _colour_lut() -> np.ndarray:
    lut = np.zeros((256, 4), dtype=np.float32)
    for d in REGIONS:
        lut[d.label, :3] = d.color_float
        lut[d.label, 3] = OVERLAY_ALPHA
    return lut


def _matplotlib():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def overlay_figure(hu: np.ndarray, regions: np.ndarray, spacing_mm: tuple[float, float, float],
                   slices: Sequence[int], path: str | Path, *, title: str = "",
                   labels: dict[int, str] | None = None, max_pixels: int = 700) -> Path | None:
    """PNG of ``slices``: the scan (top row) and the seven regions over it (bottom row).

    Slices are cropped to the leg and shown at most ``max_pixels`` wide. ``labels`` adds a
    caption per slice (e.g. "lowest confidence"). Returns None without matplotlib.
    """
    plt = _matplotlib()
    if plt is None:
        return None
    from matplotlib.patches import Patch

    pixel_mm = float(spacing_mm[1])
    box = labelled_box(regions, margin_px=round(3.0 / pixel_mm))
    lut = _colour_lut()
    n = len(slices)
    fig, axes = plt.subplots(2, n, figsize=(4.2 * n, 8.8), squeeze=False)
    for col, z in enumerate(slices):
        image = np.asarray(hu[z][box], dtype=np.float32)
        labels_2d = np.asarray(regions[z][box])
        step = max(1, math.ceil(max(image.shape) / max_pixels))
        image, labels_2d = image[::step, ::step], labels_2d[::step, ::step]
        extent = (0, image.shape[1] * pixel_mm * step, image.shape[0] * pixel_mm * step, 0)
        for row in range(2):
            ax = axes[row][col]
            ax.imshow(image, cmap="gray", vmin=HU_WINDOW[0], vmax=HU_WINDOW[1],
                      extent=extent, interpolation="antialiased")
            if row == 1:
                ax.imshow(lut[labels_2d], extent=extent, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        caption = f"slice {z}"
        if labels and z in labels:
            caption += f" ({labels[z]})"
        axes[0][col].set_title(caption, fontsize=10)
    # scale bar of 10 mm on the first scan panel
    ax = axes[0][0]
    ax.plot([2, 12], [4, 4], color="white", linewidth=3)
    ax.text(7, 6.5, "10 mm", color="white", ha="center", va="top", fontsize=8)
    handles = [Patch(facecolor=d.color_float, edgecolor="black", label=d.name) for d in REGIONS]
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=9, frameon=False)
    if title:
        fig.suptitle(title, fontsize=12)
    fig.tight_layout(rect=(0, 0.07, 1, 0.96 if title else 1))
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def profiles_figure(stats, confidence: dict[str, Any] | None, motion: dict[str, Any] | None,
                    path: str | Path, *, title: str = "") -> Path | None:
    """PNG: per-slice area of each region; per-slice network confidence and motion index."""
    plt = _matplotlib()
    if plt is None:
        return None
    from matplotlib.ticker import MaxNLocator

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10.5, 6.2), sharex=True,
                                   gridspec_kw={"height_ratios": [3, 2]})
    colours = {d.key: d.color_float for d in REGIONS}
    for s in stats:
        ax1.plot(s.area_mm2_per_slice, color=colours[s.key], label=s.name, linewidth=1.8,
                 marker="." if len(s.area_mm2_per_slice) < 20 else None)
    ax1.set_ylabel("area per slice (mm²)")
    ax1.set_ylim(bottom=0)
    ax1.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax1.grid(alpha=0.3)
    has_confidence = bool(confidence and confidence.get("per_slice_foreground"))
    if has_confidence:
        values = [math.nan if v is None else v for v in confidence["per_slice_foreground"]]
        ax2.plot(values, color="black", label="network confidence\n(foreground)")
        ax2.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.09, 1.0), frameon=False)
    else:
        ax2.text(0.5, 0.5, "no network confidence (the regions were given, not segmented)",
                 transform=ax2.transAxes, ha="center", va="center", fontsize=9, color="0.4")
    ax2.set_ylim(0, 1.02)
    ax2.set_ylabel("confidence")
    if motion and motion.get("slices"):
        twin = ax2.twinx()
        twin.plot(motion["slices"], [math.nan if v is None else v for v in motion["values_hu"]],
                  "o--", color="tab:red", label="motion index (HU)", markersize=4)
        twin.set_ylabel("motion index (HU)", color="tab:red")
        twin.set_ylim(bottom=0)
        twin.legend(fontsize=8, loc="lower left", bbox_to_anchor=(1.09, 0.0), frameon=False)
    ax2.set_xlabel("slice")
    ax2.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax2.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    return path


# --- pages ---------------------------------------------------------------------------------

def _rel(path: str | Path | None, base: Path) -> str | None:
    if not path:
        return None
    path = Path(path)
    try:
        return path.resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        return path.name


def _uncertainty_html(uncertainty: dict[str, Any] | None) -> str:
    """One paragraph: the model's per-slice uncertainty and the slices above its threshold."""
    if not uncertainty:
        return ""
    slices = uncertainty.get("uncertain_slices") or []
    listed = (", ".join(str(z) for z in slices[:20]) + (" ..." if len(slices) > 20 else "")
              if slices else "none")
    return (f"<p>Model uncertainty ({_e(uncertainty.get('method'))}: "
            f"{_e(uncertainty.get('signal'))}, per slice): mean "
            f"{_fmt(uncertainty.get('mean'), 3)}, max {_fmt(uncertainty.get('max'), 3)}; slices "
            f"above {_fmt(uncertainty.get('threshold'), 3)}: {_e(listed)}.</p>")


def scan_report_html(info: dict[str, Any], base: Path) -> str:
    """The HTML page of one scan from the pipeline's record (see :mod:`.pipeline`).

    ``info`` keys used: ``scan_id``, ``subject``, ``input``, ``warnings`` (list of
    ``{code, message}``), ``skipped`` (stage messages), ``regions`` (region stats dicts),
    ``confidence``, ``motion``, ``uncertainty``, ``probability`` (dict or None),
    ``key_features``
    (region -> feature -> value), ``figures`` (name -> path), ``outputs`` (name -> path),
    ``provenance``, ``caveat``.
    """
    parts = [f"<h1>HR-pQCT report: {_e(info['scan_id'])}</h1>"]
    subject = info.get("subject") or info["scan_id"]
    parts.append(f"<p>Subject <b>{_e(subject)}</b> · input <code>{_e(info.get('input', ''))}"
                 f"</code> · {_e(info.get('created', ''))}</p>")
    parts.append(f"<p class=\"caveat\">{_e(info.get('caveat', ''))}</p>")

    warnings = info.get("warnings") or []
    parts.append("<h2 id=\"warnings\">Warnings</h2>")
    if warnings:
        items = "".join(f"<li><b>{_e(w['code'])}</b>: {_e(w['message'])}</li>"
                        for w in warnings)
        parts.append(f"<div class=\"warn\"><ul>{items}</ul></div>")
    else:
        parts.append("<p class=\"ok\">No quality-control warning.</p>")
    skipped = info.get("skipped") or []
    if skipped:
        items = "".join(f"<li>{_e(m)}</li>" for m in skipped)
        parts.append(f"<p>Steps not run:</p><ul>{items}</ul>")

    parts.append("<h2 id=\"probability\">Osteoporosis probability</h2>")
    prob = info.get("probability")
    if prob and prob.get("withheld"):
        # QC failed for the regions the classifier uses: no number, the reason instead
        items = "".join(f"<li>{_e(m)}</li>" for m in prob.get("qc_messages") or [])
        parts.append(
            f"<div class=\"warn\"><p><span class=\"prob\">Withheld</span></p><p>Osteoporosis "
            f"probability {_e(prob.get('withheld_reason', 'withheld'))}.</p>"
            f"<ul>{items}</ul><p>Classifier <code>{_e(prob.get('classifier', ''))}</code>, "
            f"regions {_e(', '.join(prob.get('regions') or []))}.</p></div>")
    elif prob:
        parts.append(
            f"<p><span class=\"prob\">{prob['probability']:.2f}</span> ({_e(prob['aggregation'])}"
            f" over {prob['n_slices']} slice(s); classifier <code>{_e(prob['classifier'])}</code>,"
            f" regions {_e(', '.join(prob['regions']))}).</p>")
        parts.append(_class_probability_table(prob.get("class_probabilities")))
        parts.append(f"<p class=\"caveat\">{_e(prob.get('caveat', ''))}</p>")
    else:
        parts.append("<p>Not computed (no classifier; see the steps not run above).</p>")

    parts.append("<h2 id=\"regions\">Regions</h2>")
    rows = ["<tr><th class=\"l\">region</th><th>volume (mm³)</th><th>mean area (mm²)</th>"
            "<th>slices present</th><th>mean HU</th></tr>"]
    colours = {d.key: d.color_rgb for d in REGIONS}
    for r in info.get("regions") or []:
        rgb = "rgb({},{},{})".format(*colours[r["key"]])
        rows.append(
            f"<tr><td class=\"l\"><span class=\"swatch\" style=\"background:{rgb}\"></span>"
            f"{_e(r['name'])}</td><td>{_fmt(r['volume_mm3'])}</td>"
            f"<td>{_fmt(r['mean_area_mm2'])}</td><td>{r['slices_present']} / {r['leg_slices']}"
            f"</td><td>{_fmt(r['mean_hu'], 0)}</td></tr>")
    parts.append("<table>" + "".join(rows) + "</table>")
    conf = info.get("confidence")
    if conf:
        parts.append(f"<p>Network confidence (foreground, per slice): mean "
                     f"{_fmt(conf.get('mean_foreground'), 3)}, lowest "
                     f"{_fmt(conf.get('min_foreground'), 3)} (slice "
                     f"{_e(conf.get('lowest_slice'))}).</p>")
    motion = info.get("motion")
    if motion:
        parts.append(f"<p>Motion index (streaks in air, HU): median "
                     f"{_fmt(motion.get('median_hu'))}, max {_fmt(motion.get('max_hu'))} over "
                     f"{len(motion.get('slices') or [])} slices.</p>")
    parts.append(_uncertainty_html(info.get("uncertainty")))

    parts.append("<h2 id=\"features\">Key features</h2>")
    key_features = info.get("key_features") or {}
    if key_features:
        names = list(dict.fromkeys(n for f in key_features.values() for n in f))
        head = "".join(f"<th>{_e(region)}</th>" for region in key_features)
        rows = [f"<tr><th class=\"l\">feature (mean over slices)</th>{head}</tr>"]
        for name in names:
            cells = "".join(f"<td>{_fmt(values.get(name), 3)}</td>"
                            for values in key_features.values())
            rows.append(f"<tr><td class=\"l\"><code>{_e(name)}</code></td>{cells}</tr>")
        parts.append("<table>" + "".join(rows) + "</table>")
        parts.append("<p>All values per region and slice are in the features CSV.</p>")
    else:
        parts.append("<p>No radiomic features were extracted.</p>")

    parts.append("<h2 id=\"images\">Images</h2>")
    figures = info.get("figures") or {}
    if figures:
        for name, path in figures.items():
            rel = _rel(path, base)
            parts.append(f"<p><img src=\"{_e(rel)}\" alt=\"{_e(name)}\"></p>")
    else:
        parts.append("<p>No figures (matplotlib is not installed, or nothing to show).</p>")

    parts.append("<h2 id=\"outputs\">Outputs</h2><ul>")
    for name, path in (info.get("outputs") or {}).items():
        rel = _rel(path, base)
        parts.append(f"<li>{_e(name)}: <a href=\"{_e(rel)}\">{_e(rel)}</a></li>")
    parts.append("</ul>")

    parts.append("<h2 id=\"provenance\">Provenance</h2><table>")
    for key, value in (info.get("provenance") or {}).items():
        parts.append(f"<tr><th class=\"l\">{_e(key)}</th><td class=\"l\">{_e(value)}</td></tr>")
    parts.append("</table>")
    return _page(f"HR-pQCT report {info['scan_id']}", "\n".join(parts))


def cohort_report_html(scans: list[dict[str, Any]], failures: list[dict[str, Any]],
                       base: Path, *, title: str = "HR-pQCT cohort", caveat: str = "",
                       files: dict[str, str | Path] | None = None) -> str:
    """The cohort summary page: one row per scan (link to its page), then the failures."""
    parts = [f"<h1>{_e(title)}</h1>",
             f"<p>{len(scans)} scan(s) processed, {len(failures)} failed.</p>"]
    if caveat:
        parts.append(f"<p class=\"caveat\">{_e(caveat)}</p>")
    if files:
        links = " · ".join(f"<a href=\"{_e(_rel(p, base))}\">{_e(n)}</a>"
                           for n, p in files.items())
        parts.append(f"<p>Cohort files: {links}</p>")
    parts.append("<h2 id=\"scans\">Scans</h2>")
    region_keys = [d.key for d in REGIONS]
    head = "".join(f"<th>{_e(k)} (mm³)</th>" for k in region_keys)
    rows = [f"<tr><th class=\"l\">scan</th><th class=\"l\">subject</th><th>probability</th>"
            f"<th class=\"l\">warnings</th>{head}<th class=\"l\">run</th></tr>"]
    for s in scans:
        report = _rel(s.get("report"), base)
        name = (f"<a href=\"{_e(report)}\">{_e(s['scan_id'])}</a>" if report
                else _e(s["scan_id"]))
        codes = ", ".join(s.get("warning_codes") or []) or "none"
        cls = " style=\"background:#fde8e8\"" if s.get("warning_codes") else ""
        probability = ("withheld (QC)" if s.get("probability_withheld")
                       else _fmt(s.get("probability"), 3))
        volumes = s.get("volumes_mm3") or {}
        cells = "".join(f"<td>{_fmt(volumes.get(k), 0)}</td>" for k in region_keys)
        rows.append(f"<tr><td class=\"l\">{name}</td><td class=\"l\">{_e(s.get('subject', ''))}"
                    f"</td><td>{_e(probability)}</td><td class=\"l\"{cls}>"
                    f"{_e(codes)}</td>{cells}<td class=\"l\">{_e(s.get('action', ''))}</td>"
                    "</tr>")
    parts.append("<table>" + "".join(rows) + "</table>")
    parts.append("<h2 id=\"failures\">Failures</h2>")
    if failures:
        rows = ["<tr><th class=\"l\">scan</th><th class=\"l\">input</th><th class=\"l\">error"
                "</th><th>exit code</th><th class=\"l\">message</th></tr>"]
        for f in failures:
            rows.append(f"<tr><td class=\"l\">{_e(f['scan_id'])}</td><td class=\"l\">"
                        f"{_e(f['input'])}</td><td class=\"l\">{_e(f['error'])}</td>"
                        f"<td>{_e(f['exit_code'])}</td><td class=\"l\">{_e(f['message'])}</td>"
                        "</tr>")
        parts.append("<div class=\"warn\"><table>" + "".join(rows) + "</table></div>")
    else:
        parts.append("<p class=\"ok\">No scan failed.</p>")
    return _page(title, "\n".join(parts))


def write_scan_report(path: str | Path, info: dict[str, Any]) -> Path:
    """Write a scan's page atomically (figures must already be written)."""
    path = Path(path)
    write_text_atomic(path, scan_report_html(info, path.parent))
    return path


def write_cohort_report(path: str | Path, scans: list[dict[str, Any]],
                        failures: list[dict[str, Any]], **kwargs: Any) -> Path:
    """Write the cohort page atomically."""
    path = Path(path)
    write_text_atomic(path, cohort_report_html(scans, failures, path.parent, **kwargs))
    return path
