"""Image quality of ``dwarf3 stack`` next to Siril on the same frames: star sharpness, colour fringes at star
cores, compact residues, background noise, detections, and, on simulated sessions, flux linearity and trail
rejection against the simulator's truth; with each tool's wall time and peak memory.

Run: ``python benchmarks/bench_quality.py [--sets real eq altaz30 altaz90] [--frames 8] [--size 1920x1080]
[--no-siril] [--settings demosaic=mhc ...] [--keep-outputs DIR]``.

**Sets.** ``real``: every folder of ``../shared/realdata`` (next to the repository) that holds FITS lights (ZWO
Seestar S50 frames; skipped with a message when the folder is absent). ``eq``, ``altaz30``, ``altaz90``: a
DWARF 3 session from :func:`dwarf3gpu.simulate.simulate_session` at ``--size`` with ``--frames`` lights, no
``failed_`` frames, no clouds, no bad seeing, 2 trailed lights, no by-products; ``eq``: linear drift (90 px per
hour) plus 0.6 px jitter per axis; ``altazNN``: field rotation of NN degrees from the first light to the last
(rate = NN / ((frames - 1) x (exposure + 1.5 s)), the simulator's mean cadence). Default size 1920x1080: at
1280x720 Siril's star finder sees only 8-20 stars per simulated frame and registers 1 of 8 frames ("Not enough
star pairs"), so it stacks nothing.

**Tools.** dwarf3: ``python -m dwarf3gpu stack SESSION --out DIR --no-cache --quiet`` (the defaults, plus the
``--KEY VALUE`` flags of one ``--settings`` entry) on the session folder, timed by ``/usr/bin/time -f "%e %M"``:
wall seconds and the peak resident set of the largest process of the tree (GNU time's ``%M``, ``ru_maxrss`` of the
waited-for children; the stacker's worker processes are smaller than the main one). Siril:
``../shared/tools/siril-stack.sh LIGHTS OUT`` (next to the repository) on a folder of symlinks to the lights that
``dwarf3gpu.session.discover`` lists, in observation order (so Siril registers to the first light): RCD debayer,
global star registration to the first frame, 3/3 sigma clip, additive + scale normalisation, output rescaled to
[0, 1]; its ``time.txt`` holds the same two numbers from the same ``time`` command. Frames used: dwarf3's kept
frames (run manifest); Siril's stacked count from its log (``N images have been stacked``), and the frames its
registration skipped (``Image N skipped``: not enough star pairs, no star match).

**Measurement** (the same functions on both masters, each master on its own; both are linear float images, Siril's
in [0, 1], dwarf3's in ADU):

- *Valid area*: pixels finite in every channel and not 0 in all three (dwarf3 writes NaN where no frame
  covers; a zero border would be a Siril black border); ``border`` = share of the master outside it. Measurements use
  the *inner* area, at least 16 px from any invalid pixel.
- *Background* per channel: median of 32 x 32 blocks of sky pixels, nearest-upsampled; *sky* = inner pixels
  outside the source mask. *Source mask*: the background-subtracted R+G+B, 3 x 3 box-smoothed, above 3 x its robust
  spread, dilated by 3 px, plus a disc of radius ``max(6, 3 FWHM)`` around every detected star.
- *Background noise* per channel ``sigma_c = 1.4826 MAD(I_c - bg_c)`` over sky pixels (a per-pixel noise: the
  resamplers correlate neighbours differently, so it compares the images' pixel scatter, not their detection
  depth). Both masters' noise is compared in dwarf3's units: ``scale_c`` = median over stars matched between the two
  masters (``astroalign.find_transform`` on the 50 brightest detections of each, pairs within 2 px) of the ratio
  of their channel-c aperture fluxes (radius 8 px, background the median of the 12-18 px annulus). So the scaled
  noise is noise relative to star signal, whatever the output normalisation.
- *Sources*: ``dwarf3gpu.stars.detect_stars`` on the green channel (mono mode: 2 x 2 binned proxy, 5 sigma,
  invalid pixels NaN, no saturation flag), counted in the inner area; also per megapixel of that area.
- *Star selection* (FWHM, fringe): detections in the inner area with no other detection within 12 px (isolated),
  unsaturated (background-subtracted R+G+B peak below half the brightest star's peak, and at most 4 pixels of its
  5 x 5 core at >= 90 % of its peak: a flat top is a clipped star) and with a green peak >= 20 sigma_G (fringe: R+G+B
  peak >= 50 x its noise); the 200 brightest.
- *FWHM*: circular Moffat (beta free) + constant fitted by least squares to the 15 x 15 green stamp; FWHM
  ``2 a sqrt(2^(1/beta) - 1)``; median over the stars (a fit, not second moments).
- *Star-core colour fringe*: per star, each channel minus its local background (median of the 7-11 px annulus);
  the 9 x 9 stamp centred on the brightest R+G+B pixel; pixels with ``S = R+G+B > 0.2 max(S)``; chromaticities
  ``r = R/S``, ``b = B/S``; the star's integrated chromaticity ``r0 = sum R / sum S``, ``b0 = sum B / sum S`` over
  those pixels; ``fringe = sqrt(sum S ((r - r0)^2 + (b - b0)^2) / sum S)``; median over stars. Measured on the
  unbalanced linear channels of each master (no colour calibration applied to either).
- *Compact positive residues* per channel: ``d = I_c - median5x5(I_c)``, ``s = 1.4826 MAD(d)`` over sky pixels;
  sky pixels with ``d > 5 s`` (hot pixels, cosmic rays, unrejected trail or RGB-noise spikes that a clip should have
  removed); count and per megapixel of sky.

**Against the truth** (simulated sets; ``truth/<session>/truth.json``, ``stars.csv``): the catalogue (in the first
light's pixels) is mapped into each master by the known transforms (dwarf3: the inverse of its reference
frame's truth transform; Siril: identity, as it registers to the first light), refined by an affine fit to the
catalogue stars detected within 2.5 px (3 passes; the residual RMS is reported).

- *FWHM / ideal*: per measured star, the same Moffat fit on a noise-free ideal stack at the star's fitted
  position: mean over the frames the tool used (dwarf3: kept frames; Siril: the lights its log does not report
  as skipped) of ``T_i x Moffat(FWHM_i, beta_i)`` from truth.json, sampled at pixel centres; median of the
  per-star ratios. ``truth FWHM``: the truth's median seeing.
- *Flux linearity*: catalogue stars unsaturated in every frame (peak + sky + pedestal < 80 % of 65535),
  with green flux >= 5000 ADU, no catalogue neighbour within 20 px brighter than 1 % of them, inside the inner area;
  measured green aperture flux ``m`` (as above) against the same aperture on the ideal stack ``e`` (truth flux x
  mean transparency x enclosed fraction); ``slope = sum(e m) / sum(e e)`` (1 = right level; in Siril's normalised
  units the level is arbitrary), ``exponent`` = slope of log m on log e (1 = linear), ``scatter`` = standard
  deviation of ``m / (slope e)`` (and its robust 1.4826 MAD, less sensitive to one blended star).
- *Trail residue*: every truth trail of a frame the tool used, mapped into the master; at 1 px steps along it in
  the inner area and off the star discs, ``r = I_c(p)`` minus the median of ``I_c`` at 8..14 px on both sides;
  ``sigma`` = 1.4826 MAD of the same statistic on control lines 30 px to either side; reported: the largest mean
  ``r / sigma`` and the largest ``|r| / sigma`` over trails and channels, and the smallest share of points within 3
  sigma (pure noise: mean 0, 99.7 %). An unrejected trail leaves ``peak / frames`` ADU on its path.

**Crops** (``--keep-outputs DIR``): ``DIR/<set>/crops.png``: 6 stars matched in both masters, 17 x 17 px, dwarf3
(top row) and Siril (bottom row, scaled per channel into dwarf3's units by ``scale_c``), each channel minus its
local background, the same asinh stretch for both (``asinh(x / a) / asinh(P / a)``, ``P`` the star's dwarf3 peak,
``a = P / 20``), 8x enlarged; ``DIR/<set>/<tool>_full.png``: the whole master, background-subtracted, scaled into
dwarf3's units, asinh-stretched with ``a = 3 sigma_G``, binned to at most 960 px, to show borders and gradients.
The masters, logs and manifests are kept there too.

Nothing is asserted: the tables are printed and saved to ``benchmarks/results/quality-<UTC time>.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, print_table, save  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
REALDATA = REPO.parent / "shared" / "realdata"
SIRIL_SCRIPT = REPO.parent / "shared" / "tools" / "siril-stack.sh"
SETS = ("real", "eq", "altaz30", "altaz90")
INNER_PX = 16
R_AP, R_IN, R_OUT = 8, 12, 18
FIT_R = 7
MAX_STARS = 200


def _size(text: str) -> tuple[int, int]:
    """Parse ``WxH`` into ``(width, height)``."""
    width, height = text.lower().split("x")
    return int(width), int(height)


def _settings(text: str) -> dict[str, str]:
    """Parse ``key=value[,key=value]`` into dwarf3 stack flags (``demosaic=mhc`` -> ``--demosaic mhc``)."""
    out = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        if not key or not value:
            raise argparse.ArgumentTypeError(f"expected key=value, got {part!r}")
        out[key.strip().replace("_", "-")] = value.strip()
    return out


# ------------------------------------------------------------------------------------------ running the tools


def run_dwarf3(session: Path, out: Path, flags: dict[str, str]) -> dict:
    """``dwarf3 stack`` on ``session`` into ``out`` under ``/usr/bin/time``: master path, time, memory, frames."""
    out.mkdir(parents=True, exist_ok=True)
    timing = out / "time.txt"
    cmd = ["/usr/bin/time", "-f", "%e %M", "-o", str(timing), sys.executable, "-m", "dwarf3gpu", "stack",
           str(session), "--out", str(out), "--no-cache", "--quiet"]
    for key, value in flags.items():
        cmd += [f"--{key}", value]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    (out / "dwarf3.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        return {"error": f"dwarf3 exit status {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-300:]}"}
    wall, peak_kb = timing.read_text().split()[-2:]
    masters = sorted(out.glob("*/stacked/master_linear.fits"))
    manifest = json.loads((masters[0].parents[1] / "run_manifest.json").read_text())
    stats = manifest["stats"]
    return {"master": str(masters[0]), "wall_s": float(wall), "peak_mb": int(peak_kb) / 1024,
            "frames_used": int(stats["frames_kept"]), "frames_total": int(stats["frames_total"]),
            "kept": list(manifest["stack"]["applied_transforms"]), "reference": stats["reference"],
            "align_mode": stats["align_mode"], "command": " ".join(cmd[5:])}


def run_siril(lights: list[Path], out: Path) -> dict:
    """Siril through ``siril-stack.sh`` on a folder of symlinks to ``lights`` (observation order)."""
    if not SIRIL_SCRIPT.exists():
        return {"error": f"{SIRIL_SCRIPT} not found"}
    links = out.parent / (out.name + "_lights")
    shutil.rmtree(links, ignore_errors=True)
    links.mkdir(parents=True)
    for i, path in enumerate(lights):
        (links / f"light_{i:05d}.fit").symlink_to(Path(path).resolve())
    proc = subprocess.run(["bash", str(SIRIL_SCRIPT), str(links), str(out)], capture_output=True, text=True)
    shutil.rmtree(links, ignore_errors=True)
    log = (out / "siril.log").read_text(errors="replace") if (out / "siril.log").exists() else ""
    if proc.returncode != 0 or not (out / "result.fit").exists():
        return {"error": f"siril-stack.sh exit status {proc.returncode}: "
                         f"{(proc.stderr or proc.stdout).strip()[-300:]}"}
    wall, peak_kb = (out / "time.txt").read_text().split()[-2:]
    stacked = registered = None
    skipped = []
    for line in log.splitlines():
        if line.startswith("log: ") and line.rstrip().endswith("skipped") and "Image " in line:
            skipped.append(int(line.rsplit("Image ", 1)[1].split()[0]))
        if "images have been stacked" in line:
            stacked = int(line.split("log:")[-1].split()[-5])
        if "registered." in line and "Total:" in line:
            registered = int(line.split(",")[-1].split()[0])
    return {"master": str(out / "result.fit"), "wall_s": float(wall), "peak_mb": int(peak_kb) / 1024,
            "frames_used": stacked, "frames_total": len(lights), "registered": registered,
            "skipped": sorted(skipped), "used": [Path(p).name for i, p in enumerate(lights) if i + 1 not in skipped],
            "command": f"siril-stack.sh LIGHTS {out.name}"}


# ------------------------------------------------------------------------------------------ images


def load_master(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(3, H, W) float64 master (NaN set to 0), its valid mask and its inner mask (>= INNER_PX from invalid)."""
    from astropy.io import fits
    from scipy.ndimage import distance_transform_edt

    data = fits.getdata(path).astype(np.float64)
    if data.ndim != 3 or data.shape[0] != 3:
        raise ValueError(f"{path}: expected a (3, H, W) colour master, got {data.shape}")
    valid = np.isfinite(data).all(axis=0) & (data != 0).any(axis=0)
    data = np.where(np.isfinite(data), data, 0.0)
    inner = distance_transform_edt(np.pad(valid, 1))[1:-1, 1:-1] >= INNER_PX
    return data, valid, inner


def block_background(channel: np.ndarray, use: np.ndarray, box: int = 32) -> np.ndarray:
    """Median of ``box`` x ``box`` blocks of the ``use`` pixels, upsampled by repetition (NaN blocks filled with the
    median of the others)."""
    h, w = channel.shape
    hb, wb = -(-h // box), -(-w // box)
    padded = np.full((hb * box, wb * box), np.nan)
    padded[:h, :w] = np.where(use, channel, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        grid = np.nanmedian(padded.reshape(hb, box, wb, box).transpose(0, 2, 1, 3).reshape(hb, wb, -1), axis=2)
    grid = np.where(np.isfinite(grid), grid, np.nanmedian(grid) if np.isfinite(grid).any() else 0.0)
    return np.repeat(np.repeat(grid, box, 0), box, 1)[:h, :w]


def robust_sigma(values: np.ndarray) -> float:
    """1.4826 MAD."""
    values = values[np.isfinite(values)]
    if values.size == 0:
        return float("nan")
    return float(1.4826 * np.median(np.abs(values - np.median(values))))


def detect(data: np.ndarray, valid: np.ndarray):
    """Stars of the green channel: ``detect_stars`` in mono mode, invalid pixels NaN."""
    from dwarf3gpu.stars import detect_stars

    green = np.where(valid, data[1], np.nan).astype(np.float32)
    return detect_stars(green, None, threshold_sigma=5.0, max_stars=20000, saturation=None)


def aperture_flux(img: np.ndarray, x: float, y: float) -> float:
    """Sum within R_AP minus the median of the R_IN..R_OUT annulus times the aperture's pixels."""
    xi, yi, r = int(round(x)), int(round(y)), R_OUT + 1
    if not (r <= xi < img.shape[1] - r and r <= yi < img.shape[0] - r):
        return float("nan")
    st = img[yi - r: yi + r + 1, xi - r: xi + r + 1]
    yy, xx = np.mgrid[yi - r: yi + r + 1, xi - r: xi + r + 1]
    d = np.hypot(xx - x, yy - y)
    ap = d <= R_AP
    return float(st[ap].sum() - ap.sum() * np.median(st[(d > R_IN) & (d < R_OUT)]))


def fit_moffat(img: np.ndarray, x: float, y: float, r: int = FIT_R) -> tuple[float, float, float]:
    """(FWHM, x0, y0) of a circular Moffat + constant fitted to the (2r+1)^2 stamp at (x, y), beta free."""
    from scipy.optimize import least_squares

    xi, yi = int(round(x)), int(round(y))
    yy, xx = np.mgrid[yi - r: yi + r + 1, xi - r: xi + r + 1]
    st = img[yy, xx].astype(float)
    bg0 = float(np.median(np.concatenate([st[0], st[-1], st[:, 0], st[:, -1]])))

    def resid(p):
        x0, y0, amp, a, beta, bg = p
        return (bg + amp * (1 + ((xx - x0) ** 2 + (yy - y0) ** 2) / (a * a)) ** (-beta) - st).ravel()

    fit = least_squares(resid, [x, y, max(st.max() - bg0, 1e-12), 1.7, 3.0, bg0],
                        bounds=([x - 2, y - 2, 0, 0.3, 1.01, -np.inf], [x + 2, y + 2, np.inf, 20, 30, np.inf]),
                        x_scale="jac")
    x0, y0, _, a, beta, _ = fit.x
    return 2 * a * math.sqrt(2 ** (1 / beta) - 1), x0, y0


class Measured:
    """Everything measured on one master on its own."""

    def __init__(self, path: str):
        from scipy.ndimage import binary_dilation, uniform_filter

        self.path = path
        self.data, self.valid, self.inner = load_master(path)
        _, h, w = self.data.shape
        self.shape = (h, w)
        self.stars = detect(self.data, self.valid)
        sx, sy = self.stars.x, self.stars.y
        ix, iy = np.clip(np.rint(sx).astype(int), 0, w - 1), np.clip(np.rint(sy).astype(int), 0, h - 1)
        self.star_inner = self.inner[iy, ix] if len(self.stars) else np.zeros(0, bool)
        fwhm0 = float(np.nanmedian(self.stars.fwhm)) if len(self.stars) else 3.0
        # pass 1: background on the inner area; source mask from the smoothed R+G+B
        self.bg = np.stack([block_background(c, self.inner) for c in self.data])
        lum = (self.data - self.bg).sum(axis=0)
        smooth = uniform_filter(np.where(self.inner, lum, 0.0), 3)
        mask = smooth > 3 * robust_sigma(smooth[self.inner])
        mask = binary_dilation(mask, iterations=3)
        self.star_mask = np.zeros_like(mask)
        radius = max(6, int(math.ceil(3 * fwhm0)))
        yy, xx = np.mgrid[-radius: radius + 1, -radius: radius + 1]
        disc = (xx ** 2 + yy ** 2 <= radius * radius)
        for x, y in zip(ix, iy):
            y0, y1, x0, x1 = max(y - radius, 0), min(y + radius + 1, h), max(x - radius, 0), min(x + radius + 1, w)
            self.star_mask[y0:y1, x0:x1] |= disc[y0 - y + radius: y1 - y + radius, x0 - x + radius: x1 - x + radius]
        self.sky = self.inner & ~(mask | self.star_mask)
        # pass 2: background on the sky
        self.bg = np.stack([block_background(c, self.sky) for c in self.data])
        self.noise = [robust_sigma((c - b)[self.sky]) for c, b in zip(self.data, self.bg)]
        self.residues = self._residues()
        self.peaks = self._peaks()

    def _residues(self) -> list[dict]:
        import cv2

        out = []
        sky_mpx = self.sky.sum() / 1e6
        for c in self.data:
            d = c - cv2.medianBlur(c.astype(np.float32), 5).astype(np.float64)
            s = robust_sigma(d[self.sky])
            n = int(((d > 5 * s) & self.sky).sum())
            out.append({"count": n, "per_mpx": n / sky_mpx if sky_mpx else float("nan")})
        return out

    def _peaks(self) -> np.ndarray:
        """Background-subtracted R+G+B peak within 2 px of each detection."""
        h, w = self.shape
        s = (self.data - self.bg).sum(axis=0)
        out = np.full(len(self.stars), np.nan)
        for k, (x, y) in enumerate(zip(self.stars.x, self.stars.y)):
            xi, yi = int(round(x)), int(round(y))
            if 3 <= xi < w - 3 and 3 <= yi < h - 3:
                out[k] = s[yi - 2: yi + 3, xi - 2: xi + 3].max()
        return out

    def selection(self, min_snr_green: float = 20.0, min_snr_sum: float = 0.0) -> np.ndarray:
        """Indices of isolated, unsaturated, bright-enough stars in the inner area, brightest first (at most 200)."""
        from scipy.spatial import cKDTree

        n = len(self.stars)
        if n == 0:
            return np.zeros(0, int)
        xy = np.column_stack([self.stars.x, self.stars.y])
        pairs = cKDTree(xy).query_pairs(12.0, output_type="ndarray")
        crowded = np.zeros(n, bool)
        crowded[pairs.ravel()] = True
        h, w = self.shape
        s = (self.data - self.bg).sum(axis=0)
        g = self.data[1] - self.bg[1]
        top = np.nanmax(self.peaks)
        sum_noise = robust_sigma(s[self.sky])
        chosen = []
        for k in np.argsort(-self.stars.flux):
            if crowded[k] or not self.star_inner[k] or not np.isfinite(self.peaks[k]):
                continue
            xi, yi = int(round(self.stars.x[k])), int(round(self.stars.y[k]))
            core = s[yi - 2: yi + 3, xi - 2: xi + 3]
            peak = core.max()
            if peak >= 0.5 * top or (core >= 0.9 * peak).sum() > 4:
                continue
            faint_green = g[yi - 2: yi + 3, xi - 2: xi + 3].max() < min_snr_green * self.noise[1]
            if faint_green or peak < min_snr_sum * sum_noise:
                continue
            chosen.append(int(k))
            if len(chosen) >= MAX_STARS:
                break
        return np.array(chosen, int)

    def fwhm(self) -> tuple[float, int, list[tuple[float, float, float]]]:
        """Median Moffat FWHM of the green channel over the selected stars; and (fwhm, x0, y0) per star."""
        per = []
        for k in self.selection():
            try:
                per.append(fit_moffat(self.data[1], self.stars.x[k], self.stars.y[k]))
            except (ValueError, IndexError):
                continue
        per = [p for p in per if 0.5 < p[0] < 20]
        return (float(np.median([p[0] for p in per])) if per else float("nan")), len(per), per

    def fringe(self) -> tuple[float, int]:
        """Median star-core colour fringe (module docstring) over the selected stars."""
        values = []
        h, w = self.shape
        r = 11
        yy, xx = np.mgrid[-r: r + 1, -r: r + 1]
        dist = np.hypot(xx, yy)
        ring = (dist >= 7) & (dist <= 11)
        s_all = self.data.sum(axis=0)
        for k in self.selection(min_snr_green=0.0, min_snr_sum=50.0):
            xi, yi = int(round(self.stars.x[k])), int(round(self.stars.y[k]))
            win = s_all[yi - 3: yi + 4, xi - 3: xi + 4]
            dy, dx = np.unravel_index(np.argmax(win), win.shape)
            xc, yc = xi - 3 + dx, yi - 3 + dy
            if not (r <= xc < w - r and r <= yc < h - r):
                continue
            big = self.data[:, yc - r: yc + r + 1, xc - r: xc + r + 1]
            big = big - np.median(big[:, ring], axis=1)[:, None, None]
            st = big[:, r - 4: r + 5, r - 4: r + 5]
            S = st.sum(axis=0)
            sel = S > 0.2 * S.max()
            R, B, Ss = st[0][sel], st[2][sel], S[sel]
            r0, b0 = R.sum() / Ss.sum(), B.sum() / Ss.sum()
            values.append(math.sqrt(float((Ss * ((R / Ss - r0) ** 2 + (B / Ss - b0) ** 2)).sum() / Ss.sum())))
        return (float(np.median(values)) if values else float("nan")), len(values)


# ------------------------------------------------------------------------------------------ across masters


def cross_scale(a: Measured, b: Measured) -> dict:
    """Match the two masters' stars; per channel the median flux ratio a / b and the matched pairs."""
    import astroalign

    xa = np.column_stack([a.stars.x, a.stars.y])[a.star_inner][:50]
    xb = np.column_stack([b.stars.x, b.stars.y])[b.star_inner][:50]
    try:
        tf, _ = astroalign.find_transform(xb, xa, max_control_points=50)
    except Exception as exc:  # astroalign raises MaxIterError and others
        return {"error": f"no match between the masters: {exc}", "scale": [float("nan")] * 3, "pairs": []}
    from scipy.spatial import cKDTree

    sel_a, sel_b = a.selection(min_snr_green=20.0), b.selection(min_snr_green=20.0)
    pa = np.column_stack([a.stars.x[sel_a], a.stars.y[sel_a]])
    pb = tf(np.column_stack([b.stars.x[sel_b], b.stars.y[sel_b]])) if len(sel_b) else np.zeros((0, 2))
    pairs = []
    if len(pa) and len(pb):
        dist, idx = cKDTree(pa).query(pb, distance_upper_bound=2.0)
        pairs = [(int(sel_a[j]), int(sel_b[i])) for i, (d, j) in enumerate(zip(dist, idx)) if np.isfinite(d)]
    scale = []
    for c in range(3):
        ratios = []
        for ka, kb in pairs:
            fa = aperture_flux(a.data[c], a.stars.x[ka], a.stars.y[ka])
            fb = aperture_flux(b.data[c], b.stars.x[kb], b.stars.y[kb])
            if fa > 0 and fb > 0:
                ratios.append(fa / fb)
        scale.append(float(np.median(ratios)) if ratios else float("nan"))
    return {"scale": scale, "pairs": pairs, "rotation_deg": float(np.degrees(tf.rotation))}


# ------------------------------------------------------------------------------------------ truth


def affine(A, xy) -> np.ndarray:
    """Apply a 2x3 affine (project convention: frame pixel -> reference pixel) to (N, 2) points."""
    A, xy = np.asarray(A, float), np.atleast_2d(np.asarray(xy, float))
    return xy @ A[:, :2].T + A[:, 2]


def inverse(A) -> np.ndarray:
    """Inverse of a 2x3 affine."""
    A = np.asarray(A, float)
    L = np.linalg.inv(A[:, :2])
    return np.hstack([L, -L @ A[:, 2:]])


def compose(A, B) -> np.ndarray:
    """A after B."""
    return (np.vstack([np.asarray(A, float), [0, 0, 1]]) @ np.vstack([np.asarray(B, float), [0, 0, 1]]))[:2]


def moffat(d2, fwhm: float, beta: float):
    """Unit-integral Moffat at squared distances ``d2`` (the simulator's PSF)."""
    a = fwhm / (2.0 * math.sqrt(2.0 ** (1.0 / beta) - 1.0))
    return (beta - 1.0) / (math.pi * a * a) * (1.0 + np.asarray(d2, float) / (a * a)) ** (-beta)


def ideal_stamp(shape, x: float, y: float, frames: list[dict], r: int = R_OUT + 1) -> np.ndarray:
    """Noise-free ideal stack of a unit-flux star at (x, y): mean over ``frames`` of T_i Moffat(FWHM_i, beta_i)."""
    out = np.zeros(shape)
    xi, yi = int(round(x)), int(round(y))
    yy, xx = np.mgrid[yi - r: yi + r + 1, xi - r: xi + r + 1]
    d2 = (xx - x) ** 2 + (yy - y) ** 2
    out[yy, xx] = np.mean([f["transparency"] * moffat(d2, f["fwhm_px"], f["moffat_beta"]) for f in frames], 0)
    return out


class Truth:
    """A simulated session's truth: frames, catalogue."""

    def __init__(self, truth_dir: Path):
        self.doc = json.loads((truth_dir / "truth.json").read_text())
        with (truth_dir / "stars.csv").open() as fh:
            rows = list(csv.DictReader(fh))
        self.xy = np.array([[float(r["x_ref"]), float(r["y_ref"])] for r in rows])
        self.flux_g = np.array([float(r["flux_g"]) for r in rows])
        self.frames = {f["file"]: f for f in self.doc["frames"] if f["kind"] == "light"}
        self.lights = list(self.frames)

    def locate(self, m: Measured, guess: np.ndarray) -> tuple[np.ndarray, dict]:
        """Catalogue (first light's pixels) -> master pixels: ``guess`` refined by an affine fit on matched stars."""
        from scipy.spatial import cKDTree

        det = np.column_stack([m.stars.x, m.stars.y])
        if len(det) < 10:
            return guess, {"matches": 0, "rms_px": float("nan")}
        tree = cKDTree(det)
        bright = np.argsort(-self.flux_g)[:2000]
        h, w = m.shape
        best = None
        for flip in (None, "y", "x"):
            A = np.array(guess, float)
            if flip == "y":
                A = compose([[1, 0, 0], [0, -1, h - 1]], A)
            elif flip == "x":
                A = compose([[-1, 0, w - 1], [0, 1, 0]], A)
            for _ in range(3):
                p = affine(A, self.xy[bright])
                dist, idx = tree.query(p, distance_upper_bound=2.5)
                ok = np.isfinite(dist)
                if ok.sum() < 6:
                    break
                src = np.column_stack([self.xy[bright][ok], np.ones(ok.sum())])
                sol, *_ = np.linalg.lstsq(src, det[idx[ok]], rcond=None)
                A = sol.T
            p = affine(A, self.xy[bright])
            dist, _ = tree.query(p, distance_upper_bound=2.5)
            ok = np.isfinite(dist)
            info = {"matches": int(ok.sum()), "rms_px": float(np.sqrt(np.mean(dist[ok] ** 2))) if ok.any() else
                    float("nan"), "flip": flip}
            if best is None or info["matches"] > best[1]["matches"]:
                best = (A, info)
        return best

    def fwhm_ratio(self, m: Measured, per_star, frames: list[dict]) -> float:
        """Median over stars of measured FWHM / FWHM of the ideal stack at the same position."""
        ratios = []
        for f, x, y in per_star:
            try:
                ideal = fit_moffat(ideal_stamp(m.shape, x, y, frames), x, y)[0]
            except (ValueError, IndexError):
                continue
            ratios.append(f / ideal)
        return float(np.median(ratios)) if ratios else float("nan")

    def linearity(self, m: Measured, A: np.ndarray, frames: list[dict]) -> dict:
        """Green aperture flux of isolated unsaturated catalogue stars against the ideal stack's."""
        from scipy.spatial import cKDTree

        sensor = self.doc["sensor"]
        sky = sensor["pedestal_adu"] + max(f["sky_adu"][1] for f in frames) + 200.0
        peak = self.flux_g * max(f["transparency"] * float(moffat(0.0, f["fwhm_px"], f["moffat_beta"]))
                                 for f in frames)
        tree = cKDTree(self.xy)
        pos = affine(A, self.xy)
        h, w = m.shape
        e, meas = [], []
        for i in np.flatnonzero((self.flux_g >= 5000) & (peak + sky < 0.8 * 65535)):
            near = [j for j in tree.query_ball_point(self.xy[i], 20.0) if j != i]
            if any(self.flux_g[j] > 0.01 * self.flux_g[i] for j in near):
                continue
            x, y = pos[i]
            xi, yi = int(round(x)), int(round(y))
            if not (R_OUT + 2 <= xi < w - R_OUT - 2 and R_OUT + 2 <= yi < h - R_OUT - 2) or not m.inner[yi, xi]:
                continue
            e.append(self.flux_g[i] * aperture_flux(ideal_stamp(m.shape, x, y, frames), x, y))
            meas.append(aperture_flux(m.data[1], x, y))
        e, meas = np.array(e), np.array(meas)
        good = meas > 0
        if good.sum() < 5:
            return {"stars": int(good.sum()), "slope": float("nan"), "exponent": float("nan"),
                    "scatter": float("nan"), "scatter_robust": float("nan")}
        e, meas = e[good], meas[good]
        slope = float(e @ meas / (e @ e))
        return {"stars": int(e.size), "slope": slope, "exponent": float(np.polyfit(np.log(e), np.log(meas), 1)[0]),
                "scatter": float(np.std(meas / (slope * e))), "scatter_robust": robust_sigma(meas / (slope * e)),
                "flux_range": [float(e.min()), float(e.max())]}

    def trails(self, m: Measured, A: np.ndarray, used: list[str]) -> dict:
        """Residue of the master along the truth trails of the frames used (module docstring)."""
        from scipy.ndimage import map_coordinates

        h, w = m.shape
        side = np.r_[-np.arange(8, 15), np.arange(8, 15)]
        worst_mean, worst_max, worst_within3, per = 0.0, 0.0, 1.0, []

        def sample(img, pts):
            return map_coordinates(img, [pts[:, 1], pts[:, 0]], order=1, mode="nearest")

        for name in used:
            f = self.frames[name]
            if not f["trail"]:
                continue
            q0, q1 = affine(compose(A, f["transform"]), [f["trail"]["p0"], f["trail"]["p1"]])
            length = float(np.hypot(*(q1 - q0)))
            u = (q1 - q0) / length
            n = np.array([-u[1], u[0]])
            pts = q0 + np.arange(0.0, length, 1.0)[:, None] * u
            probes = np.stack([pts + k * n for k in (-32, -16, 0, 16, 32)])
            inside = ((probes[..., 0] > 1) & (probes[..., 0] < w - 2) & (probes[..., 1] > 1)
                      & (probes[..., 1] < h - 2)).all(0)
            pts = pts[inside]
            ok = np.ones(len(pts), bool)
            for k in (-32, 0, 32):
                q = np.rint(pts + k * n).astype(int)
                ok &= m.inner[q[:, 1], q[:, 0]]
            q = np.rint(pts).astype(int)
            ok &= ~m.star_mask[q[:, 1], q[:, 0]]  # the star discs only: an unrejected trail is in the source mask
            pts = pts[ok]
            if len(pts) < 50:
                per.append({"file": name, "points": int(len(pts))})
                continue
            row = {"file": name, "points": int(len(pts))}
            for c in range(3):
                img = m.data[c]

                def resid(shift):
                    return sample(img, pts + shift) - np.median([sample(img, pts + shift + k * n) for k in side], 0)

                rr = resid(0.0)
                ctrl = np.r_[resid(30 * n), resid(-30 * n)]
                sigma = robust_sigma(ctrl)
                z = rr / sigma
                row["RGB"[c]] = {"mean": float(z.mean()), "max_abs": float(np.abs(z).max()),
                                 "within3": float(np.mean(np.abs(z) <= 3))}
                worst_mean = max(worst_mean, abs(float(z.mean())))
                worst_max = max(worst_max, float(np.abs(z).max()))
                worst_within3 = min(worst_within3, float(np.mean(np.abs(z) <= 3)))
            per.append(row)
        measured = [p for p in per if "R" in p]
        return {"trails": len(measured), "mean_sigma": worst_mean if measured else float("nan"),
                "max_sigma": worst_max if measured else float("nan"),
                "within3": worst_within3 if measured else float("nan"), "per_trail": per}


# ------------------------------------------------------------------------------------------ crops


def _stretch(x: np.ndarray, a: float, top: float) -> np.ndarray:
    return np.clip(np.arcsinh(np.maximum(x, 0) / a) / np.arcsinh(top / a), 0, 1)


def write_pngs(folder: Path, tools: dict[str, Measured], scales: dict[str, list[float]], pairs: list) -> None:
    """Star-core crops of matched stars (dwarf3 top row, Siril bottom row) and whole-master thumbnails."""
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    names = list(tools)
    ref = tools[names[0]]
    a_noise = 3 * ref.noise[1]
    for name, m in tools.items():
        s = np.array(scales[name])[:, None, None]
        img = (m.data - m.bg) * s
        h, w = m.shape
        f = max(1, int(math.ceil(max(h, w) / 960)))
        small = img[:, : h - h % f, : w - w % f].reshape(3, h // f, f, w // f, f).mean(axis=(2, 4))
        small = np.where(np.repeat(m.valid[: h - h % f: f, : w - w % f: f][None], 3, 0), small, 0)
        rgb = _stretch(small, a_noise, 200 * a_noise)
        cv2.imwrite(str(folder / f"{name}_full.png"), (255 * rgb[::-1].transpose(1, 2, 0)).astype(np.uint8))
    if not pairs or len(names) < 2:
        return
    other = tools[names[1]]
    r, zoom, gap = 8, 8, 4
    chosen = sorted(pairs, key=lambda p: -ref.stars.flux[p[0]])
    chosen = chosen[len(chosen) // 10:][:: max(1, len(chosen) // 8)][:6]
    tiles = [[], []]
    for ka, kb in chosen:
        stamps = []
        for m, k, name in ((ref, ka, names[0]), (other, kb, names[1])):
            xi, yi = int(round(m.stars.x[k])), int(round(m.stars.y[k]))
            big = m.data[:, yi - 12: yi + 13, xi - 12: xi + 13] * np.array(scales[name])[:, None, None]
            yy, xx = np.mgrid[-12:13, -12:13]
            ring = (np.hypot(xx, yy) >= 9) & (np.hypot(xx, yy) <= 12)
            big = big - np.median(big[:, ring], axis=1)[:, None, None]
            stamps.append(big[:, 12 - r: 12 + r + 1, 12 - r: 12 + r + 1])
        top = float(stamps[0].max())
        for row, st in enumerate(stamps):
            rgb = _stretch(st, top / 20, top)
            rgb = np.repeat(np.repeat(rgb, zoom, 1), zoom, 2)
            tiles[row].append(np.pad(rgb, ((0, 0), (gap, gap), (gap, gap)), constant_values=0.25))
    grid = np.concatenate([np.concatenate(t, axis=2) for t in tiles], axis=1)
    cv2.imwrite(str(folder / "crops.png"), (255 * grid[::-1].transpose(1, 2, 0)).astype(np.uint8))


# ------------------------------------------------------------------------------------------ one set


def simulate(kind: str, root: Path, frames: int, size: tuple[int, int]):
    """A simulated DWARF 3 session for set ``kind`` (module docstring)."""
    from dwarf3gpu.simulate import SimulationConfig, simulate_session

    exposure = 15.0
    common_cfg = dict(n_frames=frames, width=size[0], height=size[1], exposure_s=exposure, n_failed=0, n_cloudy=0,
                      n_trailed=2, n_bad_seeing=0, clutter=False, seed=3)
    if kind == "eq":
        cfg = SimulationConfig(mode="eq", **common_cfg)
    else:
        angle = float(kind.removeprefix("altaz"))
        rate = angle * 3600.0 / ((frames - 1) * (exposure + 1.5))
        cfg = SimulationConfig(mode="altaz", rotation_rate_deg_per_hour=rate, **common_cfg)
    return simulate_session(root, cfg)


def measure_set(name: str, session: Path, lights: list[Path], work: Path, args, truth: Truth | None) -> dict:
    """Run every tool on one set, measure the masters, return the record."""
    tools: dict[str, dict] = {}
    variants = [("dwarf3", {})] + [("dwarf3 " + ",".join(f"{k}={v}" for k, v in s.items()), s)
                                   for s in args.settings]
    for label, flags in variants:
        print(f"[{name}] {label} ...", file=sys.stderr)
        tools[label] = run_dwarf3(session, work / label.replace(" ", "_").replace("=", "-").replace(",", "_"),
                                  flags)
    if not args.no_siril:
        print(f"[{name}] Siril ...", file=sys.stderr)
        tools["Siril"] = run_siril(lights, work / "siril")
    measured: dict[str, Measured] = {}
    for label, run in tools.items():
        if "error" in run:
            print(f"[{name}] {label} failed: {run['error']}", file=sys.stderr)
            continue
        measured[label] = Measured(run["master"])
    base = "dwarf3" if "dwarf3" in measured else next(iter(measured), None)
    scales = {label: [1.0, 1.0, 1.0] for label in measured}
    pairs: dict[str, list] = {}
    for label, m in measured.items():
        if label != base:
            cs = cross_scale(measured[base], m)
            scales[label] = cs["scale"]
            pairs[label] = cs["pairs"]
            tools[label]["cross_match"] = {k: v for k, v in cs.items() if k != "pairs"} | {"pairs": len(cs["pairs"])}
    metrics: dict[str, dict] = {}
    for label, m in measured.items():
        run = tools[label]
        fwhm, n_fwhm, per = m.fwhm()
        fringe, n_fringe = m.fringe()
        inner_mpx = m.inner.sum() / 1e6
        n_src = int(m.star_inner.sum())
        r = {
            "size": f"{m.shape[1]}x{m.shape[0]}", "border_pct": 100 * (1 - m.valid.mean()),
            "frames_used": run.get("frames_used"), "frames_total": run.get("frames_total"),
            "fwhm_px": fwhm, "fwhm_stars": n_fwhm, "fringe": fringe, "fringe_stars": n_fringe,
            "sources": n_src, "sources_per_mpx": n_src / inner_mpx if inner_mpx else float("nan"),
            "noise": m.noise, "noise_scaled": [n * s for n, s in zip(m.noise, scales[label])],
            "scale_to_dwarf3": scales[label],
            "residues": m.residues, "wall_s": run["wall_s"], "peak_mb": run["peak_mb"],
        }
        if truth is not None:
            if label.startswith("dwarf3"):
                guess = inverse(truth.frames[run["reference"]]["transform"])
                used = run["kept"]
            else:
                guess = np.array([[1.0, 0, 0], [0, 1.0, 0]])
                used = [u for u in run["used"] if u in truth.frames]
            A, loc = truth.locate(m, guess)
            frames = [truth.frames[u] for u in used]
            r["truth_fwhm_px"] = truth.doc["median_fwhm_px"]
            r["fwhm_over_ideal"] = truth.fwhm_ratio(m, per, frames)
            r["geometry"] = loc
            r["linearity"] = truth.linearity(m, A, frames)
            r["trail"] = truth.trails(m, A, used)
        metrics[label] = r
    if args.keep_outputs and measured and base is not None:
        other = next((k for k in measured if k == "Siril"), None) or next((k for k in measured if k != base), None)
        shown = {base: measured[base]} | ({other: measured[other]} if other else {})
        write_pngs(args.keep_outputs / name, shown, scales, pairs.get(other, []))
    return {"set": name, "session": str(session), "lights": len(lights),
            "runs": {k: {kk: vv for kk, vv in v.items() if kk != "kept"} for k, v in tools.items()},
            "metrics": metrics}


# ------------------------------------------------------------------------------------------ tables


def table_rows(record: dict) -> list[dict]:
    """metric | each tool | Siril / dwarf3."""
    metrics = record["metrics"]
    labels = list(record["runs"])
    rows = []

    def add(metric: str, get, ratio: str | None = "ratio"):
        row = {"metric": metric}
        values = {}
        for label in labels:
            try:
                values[label] = get(metrics[label])
            except (KeyError, TypeError, IndexError):
                values[label] = None
            if label not in metrics:
                values[label] = record["runs"][label].get("error", "failed")[:60] if metric == "frames used" \
                    else None
            row[label] = "-" if values[label] is None else values[label]
        d, s = values.get("dwarf3"), values.get("Siril")
        if ratio and isinstance(d, (int, float)) and isinstance(s, (int, float)) and d not in (0,) \
                and math.isfinite(d) and math.isfinite(s):
            row["Siril vs dwarf3"] = f"{s / d:.3g}x" if ratio == "ratio" else f"{s - d:+.3g}"
        else:
            row["Siril vs dwarf3"] = ""
        rows.append(row)

    add("frames used", lambda r: f"{r['frames_used']}/{r['frames_total']}", None)
    add("master size", lambda r: r["size"], None)
    add("uncovered border %", lambda r: round(r["border_pct"], 2), "diff")
    add("FWHM px (Moffat, median)", lambda r: round(r["fwhm_px"], 3))
    if any("fwhm_over_ideal" in m for m in metrics.values()):
        add("FWHM / ideal stack", lambda r: round(r["fwhm_over_ideal"], 3))
        add("truth FWHM px (seeing)", lambda r: round(r["truth_fwhm_px"], 3), None)
    add("stars measured (FWHM)", lambda r: r["fwhm_stars"], None)
    add("colour fringe (chromaticity RMS)", lambda r: round(r["fringe"], 4))
    add("stars measured (fringe)", lambda r: r["fringe_stars"], None)
    for c, ch in enumerate("RGB"):
        add(f"noise {ch} (dwarf3 units)", lambda r, c=c: round(r["noise_scaled"][c], 3))
    for c, ch in enumerate("RGB"):
        add(f"residues >5 sigma {ch} per Mpx", lambda r, c=c: round(r["residues"][c]["per_mpx"], 2))
    add("sources detected (G, 5 sigma)", lambda r: r["sources"])
    add("sources per Mpx", lambda r: round(r["sources_per_mpx"], 1))
    if any("linearity" in m for m in metrics.values()):
        add("truth match: stars / RMS px", lambda r: f"{r['geometry']['matches']} / {r['geometry']['rms_px']:.3f}",
            None)
        add("flux linearity: exponent", lambda r: round(r["linearity"]["exponent"], 4))
        add("flux linearity: scatter", lambda r: round(r["linearity"]["scatter"], 4))
        add("flux linearity: scatter (robust)", lambda r: round(r["linearity"]["scatter_robust"], 4))
        add("flux linearity: slope (own units)", lambda r: float(f"{r['linearity']['slope']:.4g}"), None)
        add("flux linearity: stars", lambda r: r["linearity"]["stars"], None)
        add("trail residue: worst abs mean sigma", lambda r: round(r["trail"]["mean_sigma"], 2))
        add("trail residue: worst max sigma", lambda r: round(r["trail"]["max_sigma"], 2))
        add("trail residue: worst share within 3 sigma", lambda r: round(r["trail"]["within3"], 4))
        add("trails measured", lambda r: r["trail"]["trails"], None)
    add("wall s", lambda r: round(r["wall_s"], 2))
    add("peak RSS MB", lambda r: round(r["peak_mb"], 0))
    return rows


# ------------------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", nargs="+", choices=SETS, default=list(SETS), help="sets to run (default all)")
    parser.add_argument("--frames", type=int, default=8, help="lights per simulated session (default 8)")
    parser.add_argument("--size", type=_size, default=(1920, 1080), help="simulated frame size WxH (default 1920x1080)")
    parser.add_argument("--no-siril", action="store_true", help="run dwarf3 only")
    parser.add_argument("--settings", type=_settings, nargs="*", default=[],
                        help="extra dwarf3 runs, each KEY=VALUE[,KEY=VALUE] of stack flags (e.g. demosaic=mhc)")
    parser.add_argument("--keep-outputs", type=Path, help="keep masters, logs and PNG crops in this folder")
    args = parser.parse_args()
    from dwarf3gpu.session import discover

    records = []
    with tempfile.TemporaryDirectory(prefix="bench-quality-") as tmp:
        work_root = args.keep_outputs or Path(tmp)
        for kind in args.sets:
            if kind == "real":
                if not REALDATA.is_dir():
                    print(f"real: {REALDATA} not found, skipped", file=sys.stderr)
                    continue
                folders = [p for p in sorted(REALDATA.iterdir())
                           if p.is_dir() and (any(p.glob("*.fit")) or any(p.glob("*.fits")))]
                for folder in folders:
                    lights = [f.path for f in discover(folder).lights]
                    if len(lights) < 2:
                        print(f"real: {folder.name}: {len(lights)} light, skipped", file=sys.stderr)
                        continue
                    records.append(measure_set(folder.name, folder, lights, work_root / folder.name, args, None))
                continue
            t0 = time.perf_counter()
            print(f"[{kind}] simulating {args.frames} frames of {args.size[0]}x{args.size[1]} ...", file=sys.stderr)
            sim = simulate(kind, Path(tmp) / f"sim-{kind}", args.frames, args.size)
            print(f"  {time.perf_counter() - t0:.1f} s", file=sys.stderr)
            lights = [f.path for f in discover(sim.session_dir).lights]
            rec = measure_set(kind, sim.session_dir, lights, work_root / kind, args, Truth(sim.truth_dir))
            rec["simulation"] = {"frames": args.frames, "size": list(args.size),
                                 "mode": sim.config.mode, "rotation_rate_deg_per_hour":
                                     sim.config.rotation_rate_deg_per_hour,
                                 "trailed": Truth(sim.truth_dir).doc["trailed"]}
            records.append(rec)
    m = machine()
    for rec in records:
        rows = table_rows(rec)
        rec["table"] = rows
        print()
        print_table(f"{rec['set']} ({rec['lights']} lights) - {m['cpu']} ({m['cores']} cores)", rows)
    extra = {"sets": args.sets, "frames": args.frames, "size": list(args.size), "settings": args.settings,
             "siril": not args.no_siril, "records": records}
    print("saved", save("quality", [{"set": r["set"], "lights": r["lights"]} for r in records], extra))


if __name__ == "__main__":
    main()
