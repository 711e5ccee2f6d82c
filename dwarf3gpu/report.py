"""``report.json`` (summary numbers) and ``report.md`` (tables and plots a person wants to read).

Plots are drawn with matplotlib (Agg, no display needed): score, FWHM, background and field rotation against
time with rejected frames marked, and the coverage map; the preview is linked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .analysis import SessionAnalysis
from .atomic import atomic_path, write_json_atomic, write_text_atomic

__all__ = ["write_reports"]


def write_reports(
    out_dir: Path, analysis: SessionAnalysis, stats: dict[str, Any], outputs: dict[str, Path],
    rejected: list[dict[str, str]], stacked: Any,
) -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and the plots they use; return their paths."""
    written: dict[str, Path] = {}
    summary = {
        "session": str(analysis.session.path),
        "target": analysis.session.metadata.target,
        **stats,
        "rejected": rejected,
        "outputs": {k: str(v) for k, v in outputs.items()},
    }
    written["report_json"] = write_json_atomic(out_dir / "report.json", summary)
    plots = out_dir / "report_files"
    written["plot_frames"] = _plot_frames(analysis, plots / "frames.png")
    if stacked is not None:
        written["plot_coverage"] = _plot_coverage(stacked.coverage, plots / "coverage.png")
    written["report_md"] = write_text_atomic(out_dir / "report.md", _markdown(analysis, stats, outputs, rejected, stacked is not None))
    return written


def _figure(figsize: tuple[float, float]):
    """A matplotlib figure on the Agg canvas, without pyplot (no global state, no pyplot import)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def _times(analysis: SessionAnalysis) -> tuple[np.ndarray, str]:
    """Mid-exposure times since the first frame and the axis label (minutes under 2 h, else hours; frame index
    when times are unknown)."""
    times = [r.frame.mid_time for r in analysis.records]
    if any(t is None for t in times):
        return np.arange(len(times), dtype=float), "frame"
    t0 = min(times)
    seconds = np.array([(t - t0).total_seconds() for t in times])
    if seconds.max(initial=0) < 7200:
        return seconds / 60, "minutes since the first frame"
    return seconds / 3600, "hours since the first frame"


def _plot_frames(analysis: SessionAnalysis, path: Path) -> Path:
    """Four panels against time: score, FWHM, background, rotation; rejected frames in red."""
    t, t_label = _times(analysis)
    kept = np.array([r.decision.kept for r in analysis.records])
    nan = float("nan")
    series = {
        "score": [r.score for r in analysis.records],
        "FWHM (px)": [r.metrics.fwhm if r.metrics else nan for r in analysis.records],
        "background (ADU)": [r.metrics.background if r.metrics else nan for r in analysis.records],
        "field rotation (deg)": [
            r.registration.rotation_deg if r.registration is not None and r.registration.ok else nan
            for r in analysis.records
        ],
    }
    fig = _figure((10, 6))
    axes = fig.subplots(2, 2, sharex=True)
    for ax, (label, values) in zip(axes.ravel(), series.items()):
        v = np.array(values, float)
        ax.plot(t[kept], v[kept], "o", ms=4, color="tab:blue", label="kept")
        ax.plot(t[~kept], v[~kept], "x", ms=6, color="tab:red", label="rejected")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel(t_label)
    axes[0, 0].legend(loc="best", fontsize=8)
    fig.suptitle(f"{analysis.session.metadata.target or analysis.session.path.name}: frames")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    return path


def _plot_coverage(coverage: np.ndarray, path: Path) -> Path:
    """The coverage map (frames per pixel), downsampled for the page."""
    step = max(1, int(np.ceil(max(coverage.shape) / 1000)))
    fig = _figure((8, 8 * coverage.shape[0] / max(1, coverage.shape[1]) + 0.6))
    ax = fig.subplots()
    im = ax.imshow(coverage[::step, ::step], origin="upper", cmap="viridis", interpolation="nearest")
    fig.colorbar(im, ax=ax, label="frames per pixel", shrink=0.8)
    ax.set_title("coverage")
    ax.set_axis_off()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    return path


def _fmt(value: Any, spec: str = ".3g") -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "-"
    return format(value, spec) if isinstance(value, (int, float)) else str(value)


def _markdown(
    analysis: SessionAnalysis, stats: dict[str, Any], outputs: dict[str, Path], rejected: list[dict[str, str]],
    stacked: bool,
) -> str:
    """The human report."""
    meta = analysis.session.metadata
    lines = [
        f"# {meta.target or analysis.session.path.name}",
        "",
        f"Session `{analysis.session.path.name}` ({meta.device}, {meta.camera or '-'} camera, "
        f"{_fmt(meta.exposure_s, 'g')} s, gain {_fmt(meta.gain, 'g')}, filter {meta.filter or '-'}, "
        f"Bayer {meta.bayer_pattern or '-'}).",
        "",
        "## Summary",
        "",
        "| | |",
        "|---|---|",
        f"| frames kept | {stats['frames_kept']} of {stats['frames_total']} |",
        f"| total exposure | {stats['total_exposure_s'] / 60:.1f} min |",
        f"| reference | `{stats['reference']}` |",
        f"| field rotation | {_fmt(stats['rotation_range_deg'], '.2f')} deg -> align mode `{stats['align_mode']}` |",
        f"| median FWHM | {_fmt(stats['fwhm_median_px'], '.2f')} px |",
        f"| median background | {_fmt(stats['background_median_adu'], '.0f')} ADU |",
        f"| dark | {_dark_line(stats.get('calibration'))} |",
        f"| snr_proxy | {_fmt(stats.get('snr_proxy'), '.1f')} |",
        f"| noise gain vs one frame | {_fmt(stats.get('noise_gain'), '.2f')} (sqrt of frames kept: "
        f"{np.sqrt(stats['frames_kept']):.2f}) |",
        f"| time | {stats['timings_s']['total']:.1f} s ({stats['seconds_per_frame']:.2f} s per frame) |",
        "",
    ]
    if stacked and "quicklook_png" in outputs:
        lines += ["## Preview", "", "![preview](master_quicklook.png)", ""]
    lines += ["## Frames", "", "![frames](report_files/frames.png)", ""]
    if stacked:
        lines += ["## Coverage", "", "![coverage](report_files/coverage.png)", ""]
    lines += ["## Rejected frames", ""]
    if rejected:
        lines += ["| frame | reason | detail |", "|---|---|---|"]
        lines += [f"| `{r['name']}` | {r['reason']} | {r['detail']} |" for r in rejected]
    else:
        lines.append("None.")
    lines += ["", "## Per-frame table", "",
              "| # | frame | stars | FWHM | bkg | transp. | rot. deg | score | decision |",
              "|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(analysis.records):
        m, reg = r.metrics, r.registration
        lines.append(
            f"| {i} | `{r.frame.name}` | {m.n_stars if m else '-'} | {_fmt(m.fwhm if m else None, '.2f')} | "
            f"{_fmt(m.background if m else None, '.0f')} | {_fmt(m.transparency if m else None, '.2f')} | "
            f"{_fmt(reg.rotation_deg if reg is not None and reg.ok else None, '.2f')} | {_fmt(r.score)} | "
            f"{'kept' if r.decision.kept else r.decision.reason} |"
        )
    lines += ["", "## Timings", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in stats["timings_s"].items()]
    lines += ["", "Outputs: " + ", ".join(f"`{Path(p).name}`" for p in outputs.values()), ""]
    return "\n".join(lines)


def _dark_line(cal: dict[str, Any] | None) -> str:
    """The calibration summary in words: which dark, hot pixels repaired, or why none was used."""
    if not cal:
        return "-"
    if not cal.get("dark_used"):
        lights = (f"; {cal['hot_pixels']} hot pixels found in the lights and repaired"
                  if cal.get("hot_pixels_from_lights") else "")
        return f"none ({cal.get('reason') or '-'}){lights}"
    return (f"`{Path(cal['dark_path']).name}` ({cal['dark_kind']}); {cal['hot_pixels']} hot pixels repaired; "
            f"outliers on the reference {cal['outliers_without']} -> {cal['outliers_with']}")
