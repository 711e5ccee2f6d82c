"""Time per full-size frame (3856x2180) of each stage of the measure-and-match path, and end to end.

Run: ``python benchmarks/bench_frames.py [--frames 12] [--size 3856x2180] [--repeat 3]``.

A default alt-az session is simulated into a temporary folder. Every light is then taken through the stages of
:func:`dwarf3gpu.analysis.analyze_session` on one core (``cv2.setNumThreads(1)``): **read** (``read_raw_window``,
the pipeline's raw reader, from the page cache), **detect** (``detect_stars``; its luminance proxy is also shown
on its own), **measure** (``frame_metrics``) and **match** (``register_frame`` onto the first light's star list,
with the flux weights and the image fallback the pipeline uses, plus ``transparency``; the first light is the
reference and is not matched). Each stage is timed ``--repeat`` times per frame, after the untimed call that
gives the next stage its input; a frame's time is its best run, and the table gives the median, best and worst
over the frames. The per-core total is the sum of the stage medians.

References, in the same run:

- **sep**: ``sep.Background`` + ``sep.extract`` (threshold in sigma of the global background RMS) on the
  luminance proxy, the classic detection a matcher needs (no proxy, no full-resolution centroids or FWHM);
- **astroalign on images**: ``astroalign.find_transform(proxy, reference proxy)``, which detects the stars of
  both images itself (sep) and matches them by triangles, with no refinement; failures count with their time.

End to end, ``analyze_session`` runs with 1 and 2 workers without a cache, then once more over the cache that
the 2-worker run wrote. Nothing is asserted: the numbers are printed and saved to ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import astroalign
import cv2
import numpy as np
import sep

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import best_of, machine, print_table, save  # noqa: E402

from dwarf3gpu.analysis import AnalysisConfig, analyze_session  # noqa: E402
from dwarf3gpu.fitsio import read_raw_window  # noqa: E402
from dwarf3gpu.quality import frame_metrics, transparency  # noqa: E402
from dwarf3gpu.register import register_frame  # noqa: E402
from dwarf3gpu.session import LightFrame, discover  # noqa: E402
from dwarf3gpu.simulate import SimulationConfig, simulate_session  # noqa: E402
from dwarf3gpu.stars import StarList, detect_stars, luminance_proxy  # noqa: E402

TARGET_S = 0.25
"""Target: seconds per frame per core for the whole measure-and-match path."""


def _size(text: str) -> tuple[int, int]:
    """Parse ``WxH`` into ``(width, height)``."""
    width, height = text.lower().split("x")
    return int(width), int(height)


def _match(stars: StarList, ref: StarList, path: Path, ref_path: Path, bayer: str) -> bool:
    """Register a frame's stars on the reference's and measure the transparency, as the pipeline does (a saturated
    star's flux weight is the centroid floor's, inf)."""

    def images() -> tuple[np.ndarray, np.ndarray]:
        return luminance_proxy(read_raw_window(path), bayer), luminance_proxy(read_raw_window(ref_path), bayer)

    flux, ref_flux = (np.where(np.asarray(s.saturated, bool), np.inf, np.asarray(s.flux, float)) for s in (stars, ref))
    reg = register_frame(stars.xy(), ref.xy(), frame_flux=flux, ref_flux=ref_flux, images=images, image_bin=2)
    if reg.ok:
        good, ref_good = ~stars.saturated, ~ref.saturated
        transparency(stars.xy()[good], stars.flux[good], ref.xy()[ref_good], ref.flux[ref_good], reg.matrix)
    return reg.ok


def _astroalign_images(proxy: np.ndarray, ref_proxy: np.ndarray) -> bool:
    """Reference matcher: astroalign on the two images; False when it finds no transform."""
    try:
        astroalign.find_transform(proxy, ref_proxy)
    except Exception:  # MaxIterError, ValueError (too few stars): a failure, timed like a success
        return False
    return True


def _sep_extract(proxy: np.ndarray, threshold_sigma: float) -> int:
    """Reference detector: sep background and extraction on the proxy; returns the number of objects."""
    background = sep.Background(proxy)
    return len(sep.extract(proxy - background, threshold_sigma, err=background.globalrms))


def _stage_row(stage: str, times: list[float], note: str) -> dict:
    """Median, best and worst of per-frame times, in milliseconds."""
    return {
        "stage": stage,
        "median_ms": statistics.median(times) * 1e3,
        "best_ms": min(times) * 1e3,
        "worst_ms": max(times) * 1e3,
        "frames": len(times),
        "note": note,
    }


def time_stages(lights: list[LightFrame], config: AnalysisConfig, repeat: int) -> tuple[list[dict], float]:
    """Time every stage on every light, single-threaded.

    Returns
    -------
    rows : list of dict
        One table row per stage and reference.
    total : float
        Sum of the median read, detect, measure and match times: seconds per frame per core.
    """
    times: dict[str, list[float]] = {k: [] for k in ("read", "proxy", "detect", "measure", "match", "sep", "aa")}
    n_stars, n_sep, n_matched, n_aa = [], [], 0, 0
    ref_path, bayer = lights[0].path, lights[0].bayer_pattern
    ref_mosaic = read_raw_window(ref_path)
    ref_stars = detect_stars(ref_mosaic, bayer, threshold_sigma=config.threshold_sigma, max_stars=config.max_stars,
                             saturation=config.saturation)
    ref_proxy = luminance_proxy(ref_mosaic, bayer)
    for i, light in enumerate(lights):
        path = light.path
        mosaic = read_raw_window(path)
        proxy = luminance_proxy(mosaic, bayer)

        def detect() -> StarList:
            return detect_stars(mosaic, bayer, threshold_sigma=config.threshold_sigma, max_stars=config.max_stars,
                                saturation=config.saturation)

        stars = detect()
        n_stars.append(len(stars))
        n_sep.append(_sep_extract(proxy, config.threshold_sigma))
        stages = {
            "read": lambda: read_raw_window(path),
            "proxy": lambda: luminance_proxy(mosaic, bayer),
            "detect": detect,
            "measure": lambda: frame_metrics(mosaic, stars, saturation=config.saturation),
            "sep": lambda: _sep_extract(proxy, config.threshold_sigma),
        }
        if i > 0:
            n_matched += _match(stars, ref_stars, path, ref_path, bayer)
            n_aa += _astroalign_images(proxy, ref_proxy)
            stages["match"] = lambda: _match(stars, ref_stars, path, ref_path, bayer)
            stages["aa"] = lambda: _astroalign_images(proxy, ref_proxy)
        for name, func in stages.items():
            times[name].append(best_of(func, repeat)[0])
        print(f"  frame {i + 1}/{len(lights)}: {len(stars)} stars", file=sys.stderr)
    n_pairs = len(lights) - 1
    total = sum(statistics.median(times[k]) for k in ("read", "detect", "measure", "match"))
    rows = [
        _stage_row("read (read_raw_window)", times["read"], "page cache, decode only"),
        _stage_row("detect (detect_stars)", times["detect"], f"median {statistics.median(n_stars):.0f} stars kept"),
        _stage_row("  of which luminance_proxy", times["proxy"], "inside detect"),
        _stage_row("measure (frame_metrics)", times["measure"], ""),
        _stage_row("match (register_frame + transparency)", times["match"], f"{n_matched}/{n_pairs} registered"),
        _stage_row("ref: sep Background + extract on proxy", times["sep"],
                   f"median {statistics.median(n_sep):.0f} objects"),
        _stage_row("ref: astroalign.find_transform(images)", times["aa"], f"{n_aa}/{n_pairs} found"),
    ]
    return rows, total


def time_end_to_end(session_dir: Path, out_root: Path, config: AnalysisConfig) -> list[dict]:
    """Wall time of ``analyze_session``: 1 worker, 2 workers (both uncached), then 2 workers over the cache."""
    session = discover(session_dir)
    runs = [
        ("workers=1, no cache", 1, False, out_root / "w1"),
        ("workers=2, no cache", 2, True, out_root / "w2"),  # empty cache: everything computed, then written
        ("workers=2, cached (second call)", 2, True, out_root / "w2"),
    ]
    rows = []
    for label, workers, use_cache, out_dir in runs:
        t0 = time.perf_counter()
        result = analyze_session(session, config, out_dir=out_dir, workers=workers, use_cache=use_cache)
        wall = time.perf_counter() - t0
        n = len(result.records)
        hits = sum(c["hits"] for c in result.cache.values())
        rows.append({
            "run": label,
            "wall_s": wall,
            "s_per_frame": wall / n,
            "frames_per_s": n / wall,
            "cache_hits": f"{hits}/{2 * n}",
            "kept": f"{len(result.kept)}/{n}",
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=12,
                        help="lights to simulate (default 12; at least 6, as the session has 5 bad ones)")
    parser.add_argument("--size", type=_size, default=(3856, 2180), help="frame size WxH (default 3856x2180)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per stage and frame (default 3)")
    args = parser.parse_args()
    cv2.setNumThreads(1)
    width, height = args.size
    config = AnalysisConfig()
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        print(f"simulating {args.frames} frames of {width}x{height} ...", file=sys.stderr)
        sim = simulate_session(Path(tmp) / "sim", SimulationConfig(n_frames=args.frames, width=width, height=height))
        stage_rows, total = time_stages(discover(sim.session_dir).lights, config, args.repeat)
        e2e_rows = time_end_to_end(sim.session_dir, Path(tmp) / "out", config)
    m = machine()
    print_table(f"Per frame, one core, {width}x{height}, {args.frames} frames, {m['cpu']} ({m['cores']} cores)",
                stage_rows)
    verdict = "within" if total < TARGET_S else "OVER"
    print(f"total read + detect + measure + match: {total:.3f} s per frame per core "
          f"({verdict} the {TARGET_S} s target)")
    print()
    print_table("analyze_session end to end", e2e_rows)
    print(f"load average before the run: {load:.2f}")
    extra = {
        "size": [width, height],
        "frames": args.frames,
        "repeat": args.repeat,
        "total_s_per_frame_per_core": total,
        "target_s_per_frame_per_core": TARGET_S,
        "end_to_end": e2e_rows,
        "loadavg_1min_before": load,
    }
    print("saved", save("frames", stage_rows, extra))


if __name__ == "__main__":
    main()
