"""Tests of the synthetic DWARF 3 sessions: layout, headers, determinism and consistency with the ground truth."""

from __future__ import annotations

import csv
import json
import re
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from dwarf3gpu.errors import ConfigError
from dwarf3gpu.fitsio import read_fits, read_header, read_raw_uint16
from dwarf3gpu.simulate import SimulatedSession, SimulationConfig, simulate_session

SMALL = {"width": 384, "height": 256}
BRIGHT_FIELD = {"stars_per_megapixel": 800.0, "star_flux_range": (10000.0, 4.0e5), "star_flux_alpha": 1.6}
STRUCTURAL = {"SIMPLE", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "NAXIS3", "EXTEND", "BZERO", "BSCALE"}
LIGHT_NAME = re.compile(
    r"^(?P<failed>failed_)?(?P<target>[^_]+)_(?P<exp>[0-9.]+)s(?P<gain>\d+)_(?P<filter>[^_]+)_"
    r"(?P<time>\d{8}-\d{9})_(?P<temp>-?\d+)C\.fits$"
)
CLUTTER = ("stacked.jpg", "stacked_thumbnail.jpg", "img_reference.png", "img_stacked_all.tif",
           "img_stacked_counter.png", "shotsInfo.json")


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def altaz(tmp_path_factory) -> SimulatedSession:
    """Alt-az session rotating fast enough to span more than 30 degrees, with darks and clutter."""
    config = SimulationConfig(n_frames=8, rotation_rate_deg_per_hour=1000.0, with_darks=True, seed=3,
                              **BRIGHT_FIELD, **SMALL)
    return simulate_session(tmp_path_factory.mktemp("altaz"), config)


@pytest.fixture(scope="module")
def eq(tmp_path_factory) -> SimulatedSession:
    """EQ session drifting by tens of pixels."""
    config = SimulationConfig(n_frames=7, mode="eq", drift_px_per_hour=2000.0, clutter=False, seed=4,
                              **BRIGHT_FIELD, **SMALL)
    return simulate_session(tmp_path_factory.mktemp("eq"), config)


@pytest.fixture(scope="module")
def sparse(tmp_path_factory) -> SimulatedSession:
    """One clear, practically noise-free frame of a sparse, galaxy-free field, for exact photometry."""
    config = SimulationConfig(n_frames=1, n_failed=0, n_cloudy=0, n_trailed=0, n_bad_seeing=0, galaxy=False,
                              clutter=False, stars_per_megapixel=500.0, star_flux_range=(10000.0, 4.0e5),
                              star_flux_alpha=1.5, sky_adu=(40.0, 50.0, 35.0), read_noise_adu=0.0, e_per_adu=1e6,
                              width=512, height=384, seed=6)
    return simulate_session(tmp_path_factory.mktemp("sparse"), config)


# ------------------------------------------------------------------------------------------------- helpers


def truth_of(sim: SimulatedSession) -> dict:
    """The parsed truth.json of a session."""
    return json.loads((sim.truth_dir / "truth.json").read_text())


def catalogue(sim: SimulatedSession) -> tuple[np.ndarray, np.ndarray]:
    """Star positions (n, 2) in the reference frame and fluxes (n, 3)."""
    with open(sim.truth_dir / "stars.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    xy = np.array([[float(r["x_ref"]), float(r["y_ref"])] for r in rows])
    flux = np.array([[float(r["flux_r"]), float(r["flux_g"]), float(r["flux_b"])] for r in rows])
    return xy, flux


def to_frame(transform: list, xy: np.ndarray) -> np.ndarray:
    """Map reference pixels into a frame through the inverse of its frame -> reference transform."""
    full = np.vstack([np.asarray(transform), [0.0, 0.0, 1.0]])
    inv = np.linalg.inv(full)
    return xy @ inv[:2, :2].T + inv[:2, 2]


def isolated_bright(xy: np.ndarray, flux: np.ndarray, low: float, high: float, radius: float = 14.0) -> np.ndarray:
    """Indices of stars with G flux in [low, high] and no neighbour brighter than 1 % of them within ``radius``."""
    picked = np.flatnonzero((flux[:, 1] >= low) & (flux[:, 1] <= high))
    return picked[neighbour_distance(xy, flux, picked) >= radius]


def neighbour_distance(xy: np.ndarray, flux: np.ndarray, picked: np.ndarray) -> np.ndarray:
    """Distance from each picked star to its nearest neighbour brighter than 1 % of it."""
    out = np.full(len(picked), np.inf)
    for k, i in enumerate(picked):
        d = np.hypot(*(xy - xy[i]).T)
        relevant = (flux[:, 1] > 0.01 * flux[i, 1]) & (d > 0)
        if relevant.any():
            out[k] = d[relevant].min()
    return out


def galaxy_scales(truth: dict, xy: np.ndarray) -> np.ndarray:
    """Elliptical distance of reference positions from the galaxy centre, in disk scale lengths."""
    gal = truth["galaxy"]
    t = np.radians(gal["pa_deg"])
    dx, dy = xy[:, 0] - gal["xc"], xy[:, 1] - gal["yc"]
    u, v = dx * np.cos(t) + dy * np.sin(t), (-dx * np.sin(t) + dy * np.cos(t)) / gal["axis_ratio"]
    return np.hypot(u, v) / gal["disk_scale"]


def centroid(data: np.ndarray, x: float, y: float, half: int) -> tuple[float, float]:
    """Intensity-weighted centroid of the background-subtracted window around the pixel nearest (x, y).

    The background is a plane fitted (with 3-sigma clipping) to the annulus [half + 2, half + 6): the galaxy
    under a star would bias a constant background.
    """
    cx, cy = int(round(x)), int(round(y))
    reach = half + 6
    yy, xx = np.mgrid[cy - reach: cy + reach + 1, cx - reach: cx + reach + 1]
    patch = data[cy - reach: cy + reach + 1, cx - reach: cx + reach + 1].astype(float)
    d = np.hypot(xx - x, yy - y)
    ring = (d >= half + 2) & (d < half + 6)
    design = np.stack([np.ones(ring.sum()), xx[ring] - x, yy[ring] - y], axis=1)
    keep = np.ones(ring.sum(), dtype=bool)
    for _ in range(3):
        coef = np.linalg.lstsq(design[keep], patch[ring][keep], rcond=None)[0]
        resid = patch[ring] - design @ coef
        keep = np.abs(resid) < 3.0 * 1.4826 * np.median(np.abs(resid[keep]))
    window = np.abs(xx - cx) <= half
    window &= np.abs(yy - cy) <= half
    weight = np.maximum(patch - (coef[0] + coef[1] * (xx - x) + coef[2] * (yy - y)), 0.0) * window
    return float((xx * weight).sum() / weight.sum()), float((yy * weight).sum() / weight.sum())


def aperture(data: np.ndarray, x: float, y: float, r: float) -> float:
    """Sum within radius r minus the median of the annulus [r + 3, r + 8)."""
    yy, xx = np.mgrid[: data.shape[0], : data.shape[1]]
    d = np.hypot(xx - x, yy - y)
    return float((data[d < r] - np.median(data[(d >= r + 3) & (d < r + 8)])).sum())


def plane_background(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Plane fitted to the pixels of ``mask``, iteratively dropping the pixels that stars lift above it."""
    yy, xx = np.mgrid[: image.shape[0], : image.shape[1]]
    design = np.stack([np.ones(image.size), xx.ravel(), yy.ravel()], axis=1)
    keep = mask.ravel().copy()
    for _ in range(6):
        coef = np.linalg.lstsq(design[keep], image.ravel()[keep].astype(float), rcond=None)[0]
        resid = image.ravel() - design @ coef
        spread = 1.4826 * np.median(np.abs(resid[keep]))
        keep = mask.ravel() & (resid < max(3.0 * spread, 1e-3))
    return (design @ coef).reshape(image.shape)


def photometry_stars(sim: SimulatedSession, low: float, high: float) -> list[int]:
    """Bright stars of the sparse session with 30 px of empty sky around them, away from the edges."""
    xy, flux = catalogue(sim)
    return [i for i in isolated_bright(xy, flux, low, high, radius=30.0)
            if 25 <= xy[i, 0] <= 512 - 26 and 25 <= xy[i, 1] <= 384 - 26]


def date_obs(path: Path) -> datetime:
    """DATE-OBS of a frame."""
    return datetime.strptime(read_header(path)["DATE-OBS"], "%Y-%m-%dT%H:%M:%S.%f")


@pytest.fixture(scope="module")
def real_dumps(realdata_root) -> Path:
    """The shared folder of real DWARF 3 header dumps and ``shotsInfo`` (it may be absent)."""
    return realdata_root / "dwarf3_reference_text"


@pytest.fixture(scope="module")
def real_header(real_dumps, header_from_dump):
    """Reader of the real DWARF 3 header dumps.

    Returns
    -------
    callable
        ``real_header(name) -> astropy.io.fits.Header``: the dump ``name`` of the shared reference folder; skips the
        calling test when that folder is absent.
    """

    def read(name: str) -> fits.Header:
        if not real_dumps.is_dir():
            pytest.skip(f"real DWARF 3 header dumps not available ({real_dumps})")
        return header_from_dump(real_dumps / name)

    return read


def device_cards(header: fits.Header) -> list[tuple[str, str]]:
    """(keyword, comment) of the non-structural cards, in order."""
    return [(c.keyword, c.comment) for c in header.cards if c.keyword not in STRUCTURAL]


# --------------------------------------------------------------------------------------------- determinism


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path):
    config = SimulationConfig(n_frames=3, n_failed=1, n_cloudy=1, n_trailed=1, n_bad_seeing=0, seed=11, **SMALL)
    first = simulate_session(tmp_path / "a", config)
    second = simulate_session(tmp_path / "b", config)
    files = sorted(p.relative_to(first.session_dir) for p in first.session_dir.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(second.session_dir) for p in second.session_dir.rglob("*") if p.is_file())
    for rel in files:
        assert (first.session_dir / rel).read_bytes() == (second.session_dir / rel).read_bytes(), rel
    for name in ("truth.json", "stars.csv", "clean_sky.fits"):
        assert (first.truth_dir / name).read_bytes() == (second.truth_dir / name).read_bytes()
    other = simulate_session(tmp_path / "c", SimulationConfig(n_frames=3, n_failed=1, n_cloudy=1, n_trailed=1,
                                                               n_bad_seeing=0, seed=12, **SMALL))
    for a, b in zip(first.lights, other.lights):
        assert read_raw_uint16(a)[0].tobytes() != read_raw_uint16(b)[0].tobytes()


# ------------------------------------------------------------------------------------------ layout, names


def test_session_folder_and_light_names(altaz):
    assert re.fullmatch(r"DWARF_RAW_TELE_M 31_EXP_15_GAIN_60_2025-10-18-04-51-22-420", altaz.session_dir.name)
    assert altaz.session_dir.parent.name == "rawData"
    assert len(altaz.lights) == 8 and len(altaz.failed) == 2
    frames = sorted(altaz.lights + altaz.failed, key=date_obs)
    for path in frames:
        m = LIGHT_NAME.match(path.name)
        assert m, path.name
        assert (m["target"], m["exp"], m["gain"], m["filter"]) == ("M 31", "15", "60", "Astro")
        assert bool(m["failed"]) == (path in altaz.failed)
        assert datetime.strptime(m["time"], "%Y%m%d-%H%M%S%f") == date_obs(path)
        assert int(m["temp"]) == read_header(path)["DET-TEMP"]
    ends = [date_obs(p) for p in frames]
    gaps = np.diff(ends) / timedelta(seconds=1)
    assert np.all((gaps >= 16.0) & (gaps <= 17.0)), gaps  # 15 s exposure + 1-2 s overhead
    assert ends[0] > datetime(2025, 10, 18, 4, 51, 22, 420000) + timedelta(seconds=15)
    assert frames[0] == altaz.lights[0]  # the reference light comes first, failed frames among the rest


def test_truth_times_are_end_and_mid_of_exposure(altaz):
    truth = truth_of(altaz)
    for frame in truth["frames"]:
        end = datetime.strptime(frame["date_obs"], "%Y-%m-%dT%H:%M:%S.%f")
        assert datetime.fromisoformat(frame["date_mid"]) == end - timedelta(seconds=7.5)
        assert end == date_obs(altaz.session_dir / frame["file"])


def test_clutter_present_and_truth_outside_session(altaz):
    names = {p.name for p in altaz.session_dir.iterdir()}
    for name in CLUTTER:
        assert name in names
    stem = altaz.lights[0].stem.rsplit("_", 1)[0]
    assert f"stacked-16_{stem}.fits" in names and f"stacked-16_{stem}.png" in names
    assert any(re.fullmatch(r"[0-9a-f]{32}\.fits", n) for n in names)
    assert len(list((altaz.session_dir / "Thumbnail").glob("*.jpg"))) == len(altaz.lights)
    cube = read_header(altaz.session_dir / f"stacked-16_{stem}.fits")
    assert cube["NAXIS3"] == 3 and cube["EXPTIME"] == 15.0 * len(altaz.lights) and "CRTL1X" in cube
    assert altaz.truth_dir == altaz.session_dir.parents[1] / "truth" / altaz.session_dir.name
    inside = {p.name for p in altaz.session_dir.rglob("*")}
    assert not inside & {"truth.json", "stars.csv", "clean_sky.fits"}


def test_no_clutter_when_disabled(eq):
    names = {p.name for p in eq.session_dir.iterdir()}
    assert names == {p.name for p in eq.lights + eq.failed} | {"shotsInfo.json"}


def test_fractional_exposure_is_written_like_the_device(tmp_path):
    config = SimulationConfig(n_frames=1, n_failed=0, n_cloudy=0, n_trailed=0, n_bad_seeing=0, exposure_s=0.004,
                              clutter=False, **SMALL)
    sim = simulate_session(tmp_path, config)
    assert "_EXP_0.004_GAIN_60_" in sim.session_dir.name
    assert LIGHT_NAME.match(sim.lights[0].name)["exp"] == "0.004"
    assert json.loads((sim.session_dir / "shotsInfo.json").read_text())["exp"] == "0.004"


def test_shots_info_like_the_real_file(altaz, real_dumps):
    info = json.loads((altaz.session_dir / "shotsInfo.json").read_text())
    if real_dumps.is_dir():
        real = json.loads((real_dumps / "shotsInfo_IC434.json").read_text())
        assert list(info) == list(real)
        assert {k: type(v) for k, v in info.items()} == {k: type(v) for k, v in real.items()}
    header = read_header(altaz.lights[0])
    assert info["RA"] == pytest.approx(header["RA"] / 15.0) and info["DEC"] == pytest.approx(header["DEC"])
    settings = (info["exp"], info["gain"], info["ir"], info["binning"], info["format"])
    assert settings == ("15", 60, "Astro", "1*1", "FITS")
    assert info["shotsTaken"] == 10 and info["shotsStacked"] == 8 and info["target"] == "M 31"
    temps = [read_header(p)["DET-TEMP"] for p in altaz.lights + altaz.failed]
    assert (info["minTemp"], info["maxTemp"]) == (min(temps), max(temps))


def test_darks_and_master_layout(altaz):
    assert altaz.dark_dir is not None
    assert re.fullmatch(r"tele_exp_15_gain_60_bin_1_\d{4}(-\d\d){5}-\d{3}", altaz.dark_dir.name)
    assert altaz.dark_dir.parent == altaz.session_dir.parent / "DWARF_DARK"
    darks = sorted(altaz.dark_dir.glob("*.fits"))
    assert [re.fullmatch(r"raw_15s_60_(\d{4})_\d{8}-\d{9}_(-?\d+)C\.fits", p.name)[1] for p in darks] == [
        f"{i:04d}" for i in range(10)]
    masters = list((altaz.session_dir.parent / "CALI_FRAME" / "dark" / "cam_0").glob("*.fits"))
    assert len(masters) == 1
    assert re.fullmatch(r"dark_exp_15\.000000_gain_60_bin_1_-?\d+C_stack_8\.fits", masters[0].name)


# ------------------------------------------------------------------------------------------------- headers


def test_light_header_matches_the_real_dump(altaz, real_header):
    ours = read_header(altaz.lights[0])
    assert (ours["BITPIX"], ours["BZERO"], ours["BSCALE"]) == (16, 32768, 1)
    assert (ours["NAXIS1"], ours["NAXIS2"]) == (384, 256)
    assert (ours["BAYERPAT"], ours["TELESCOP"], ours["CAMERA"], ours["OBJECT"]) == ("RGGB", "DWARFIII", "TELE", "M 31")
    assert isinstance(ours["DET-TEMP"], int)
    assert device_cards(ours) == device_cards(real_header("typ-light_IC434.txt"))


def test_device_stack_header_matches_the_real_dump(altaz, real_header):
    stem = altaz.lights[0].stem.rsplit("_", 1)[0]
    ours = read_header(altaz.session_dir / f"stacked-16_{stem}.fits")
    assert device_cards(ours) == device_cards(real_header("typ-stacked-16.txt"))


def test_dark_and_master_headers_match_the_real_dumps(altaz, real_header):
    dark = read_header(next(altaz.dark_dir.glob("*.fits")))
    assert (dark["FILTER"], dark["OBJECT"], dark["RA"], dark["DEC"]) == ("", "", 0.0, 0.0)
    master = read_header(next((altaz.session_dir.parent / "CALI_FRAME").rglob("*.fits")))
    assert master["BAYERPAT"] == "RGGB" and "EXPTIME" not in master
    assert device_cards(dark) == device_cards(real_header("typ-raw-dark_DWARF_DARK.txt"))
    assert device_cards(master) == device_cards(real_header("typ-CALI_FRAME.txt"))


# ----------------------------------------------------------------------------------------- truth vs pixels


def test_reference_is_first_light_with_identity_and_rotation_spans_30_degrees(altaz):
    truth = truth_of(altaz)
    first = truth["frames"][0]
    assert truth["reference"] == first["file"] == altaz.lights[0].name
    np.testing.assert_allclose(first["transform"], [[1, 0, 0], [0, 1, 0]], atol=1e-12)
    rotations = [f["rotation_deg"] for f in truth["frames"]]
    assert max(rotations) - min(rotations) > 30.0
    for f in truth["frames"]:
        a = np.asarray(f["transform"])
        assert np.degrees(np.arctan2(a[1, 0], a[0, 0])) == pytest.approx(f["rotation_deg"])


@pytest.mark.parametrize("session", ["altaz", "eq"])
def test_catalogue_stars_land_on_observed_peaks(session, request):
    sim = request.getfixturevalue(session)
    truth = truth_of(sim)
    xy, flux = catalogue(sim)
    picked = np.flatnonzero((flux[:, 1] >= 40000.0) & (flux[:, 1] <= 300000.0) & (galaxy_scales(truth, xy) > 4.0))
    isolation = neighbour_distance(xy, flux, picked)
    hot = np.array([h[:2] for h in truth["sensor"]["hot_pixels"]])
    checked = 0
    for frame in truth["frames"]:
        if frame["trailed"]:
            continue
        data = read_fits(sim.session_dir / frame["file"]).data
        half = max(3, int(np.ceil(frame["fwhm_px"])))
        margin = half + 7
        pos = to_frame(frame["transform"], xy[picked])
        usable = [p for p, iso in zip(pos, isolation)
                  if margin <= p[0] <= 383 - margin and margin <= p[1] <= 255 - margin
                  and iso > margin + frame["fwhm_px"] and not np.any(np.max(np.abs(hot - p), axis=1) <= margin)]
        assert usable, frame["file"]
        errors = [np.hypot(*(np.array(centroid(data, *p, half)) - p)) for p in usable]
        assert max(errors) < 0.5, (frame["file"], errors)
        checked += len(errors)
    assert checked >= 20
    if session == "eq":
        shifts = [np.asarray(f["transform"])[:, 2] for f in truth["frames"]]
        assert np.ptp(np.array(shifts), axis=0).max() > 20.0
        assert all(f["rotation_deg"] == 0.0 for f in truth["frames"])


def test_clean_sky_star_fluxes_match_the_catalogue(sparse):
    truth = truth_of(sparse)
    clean = read_fits(sparse.truth_dir / "clean_sky.fits").data
    assert clean.shape == (3, 384, 512)
    xy, flux = catalogue(sparse)
    picked = photometry_stars(sparse, 5000.0, 1e7)
    assert len(picked) >= 5
    yy, xx = np.mgrid[:384, :512]
    fwhm, beta = truth["median_fwhm_px"], truth["median_moffat_beta"]
    r = 4.0 * fwhm
    alpha = fwhm / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))
    enclosed = 1.0 - (1.0 + (r / alpha) ** 2) ** (1.0 - beta)  # Moffat flux within radius r
    for c in range(3):
        stars = clean[c] - plane_background(clean[c], np.ones(clean[c].shape, dtype=bool))
        for i in picked:
            measured = stars[np.hypot(xx - xy[i, 0], yy - xy[i, 1]) < r].sum()
            assert measured == pytest.approx(flux[i, c] * enclosed, rel=0.006)


def test_clean_sky_holds_the_galaxy(altaz):
    truth = truth_of(altaz)
    clean = read_fits(altaz.truth_dir / "clean_sky.fits").data
    gal = truth["galaxy"]
    core = clean[1, int(round(gal["yc"])), int(round(gal["xc"]))]
    assert core - np.median(clean[1]) > gal["disk_peak"]


def test_mosaic_is_rggb_with_catalogue_fluxes(sparse):
    """R pixels of a frame collect F_R / 4 of each star, G pixels F_G / 2, B pixels F_B / 4 ((0, 0) is R)."""
    truth = truth_of(sparse)
    data = read_fits(sparse.lights[0]).data
    xy, flux = catalogue(sparse)
    hot = np.array([h[:2] for h in truth["sensor"]["hot_pixels"]])
    picked = [i for i in photometry_stars(sparse, 20000.0, 300000.0) if np.hypot(*(hot - xy[i]).T).min() > 11]
    assert len(picked) >= 3
    yy, xx = np.mgrid[:384, :512]
    transparency = truth["frames"][0]["transparency"]
    parity = (yy % 2) * 2 + xx % 2
    for channel, share, mask in ((0, 0.25, parity == 0), (1, 0.5, (parity == 1) | (parity == 2)),
                                 (2, 0.25, parity == 3)):
        stars = data - plane_background(data, mask)
        measured = np.array([stars[mask & (np.hypot(xx - xy[i, 0], yy - xy[i, 1]) < 10.0)].sum() for i in picked])
        expected = flux[picked, channel] * transparency * share
        np.testing.assert_allclose(measured, expected, rtol=0.06)  # a sub-lattice samples a 2.5 px PSF coarsely
        assert measured.sum() == pytest.approx(expected.sum(), rel=0.025)


def test_hot_pixels_are_high_in_every_frame_and_dark(altaz):
    hot = np.array(truth_of(altaz)["sensor"]["hot_pixels"])
    assert len(hot) >= 3
    x, y, adu = hot[:, 0].astype(int), hot[:, 1].astype(int), hot[:, 2]
    for path in altaz.lights + altaz.failed + sorted(altaz.dark_dir.glob("*.fits")):
        data = read_fits(path).data
        assert np.all(data[y, x] - np.median(data) > 0.5 * adu), path.name


def test_cloudy_frames_lose_star_flux_and_gain_sky(altaz):
    truth = truth_of(altaz)
    xy, flux = catalogue(altaz)
    picked = isolated_bright(xy, flux, 40000.0, 300000.0)
    hot = np.array([h[:2] for h in truth["sensor"]["hot_pixels"]])
    lights = [f for f in truth["frames"] if f["kind"] == "light"]
    cloudy = [f for f in lights if f["cloudy"]]
    assert [f["index"] for f in cloudy] == truth["cloudy"] and len(cloudy) == 2

    def photometry(frame):
        """Median over stars of aperture flux / catalogue G flux, and the median sky level."""
        data = read_fits(altaz.session_dir / frame["file"]).data
        pos = to_frame(frame["transform"], xy[picked])
        inside = (pos[:, 0] >= 12) & (pos[:, 0] <= 371) & (pos[:, 1] >= 12) & (pos[:, 1] <= 243)
        inside &= [not np.any(np.hypot(*(hot - p).T) < 17) for p in pos]
        ratios = [aperture(data, *p, 8.0) / f for p, f in zip(pos[inside], flux[picked][inside, 1])]
        return np.median(ratios), np.median(data)

    ref_flux, ref_sky = photometry(lights[0])
    for frame in cloudy:
        star_flux, sky = photometry(frame)
        ratio = star_flux / ref_flux
        assert ratio < 0.75
        assert ratio == pytest.approx(frame["transparency"] / lights[0]["transparency"], rel=0.15)
        assert sky > ref_sky + 100


def test_trails_are_where_the_truth_says(altaz):
    truth = truth_of(altaz)
    trailed = [f for f in truth["frames"] if f["trailed"]]
    assert [f["index"] for f in trailed] == truth["trailed"] and len(trailed) == 2
    yy, xx = np.mgrid[:256, :384]
    for frame in trailed:
        (x0, y0), (x1, y1) = frame["trail"]["p0"], frame["trail"]["p1"]
        dist = np.abs((x1 - x0) * (yy - y0) - (y1 - y0) * (xx - x0)) / np.hypot(x1 - x0, y1 - y0)
        band = dist < 0.7
        peak_g = frame["trail"]["peak_adu"][1]
        for other in truth["frames"]:
            data = read_fits(altaz.session_dir / other["file"]).data
            excess = np.median(data[band]) - np.median(data)
            if other is frame:
                assert excess > 0.3 * peak_g, frame["file"]
            elif not other["trailed"]:
                assert excess < 0.1 * peak_g, other["file"]


def test_bad_seeing_frames_are_clearly_worse(altaz):
    truth = truth_of(altaz)
    good = [f["fwhm_px"] for f in truth["frames"] if not f["bad_seeing"]]
    bad = [f["fwhm_px"] for f in truth["frames"] if f["bad_seeing"]]
    assert len(bad) == 1 and min(bad) > 1.4 * max(good)


# ---------------------------------------------------------------------------------------------- API, errors


def test_progress_reports_every_frame(tmp_path):
    calls = []
    config = SimulationConfig(n_frames=2, n_failed=1, n_cloudy=0, n_trailed=0, n_bad_seeing=0, clutter=False,
                              with_darks=True, **SMALL)
    simulate_session(tmp_path, config, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(i, 3 + 11) for i in range(1, 15)]


@pytest.mark.parametrize("changes", [
    {"n_frames": 0}, {"width": 385}, {"height": 32}, {"mode": "polar"}, {"exposure_s": 0.0}, {"camera": "SIDE"},
    {"n_frames": 3, "n_cloudy": 2, "n_trailed": 1}, {"target": "a/b"}, {"start": "yesterday"},
    {"star_flux_range": (10.0, 5.0)}, {"star_flux_alpha": 1.0}, {"fwhm_px": 0.5}, {"e_per_adu": 0.0},
    {"sky_adu": (1.0, -1.0, 1.0)}, {"sky_adu": (1.0, 1.0)}, {"gain": 1.5}, {"n_failed": -1}, {"filter": "a_b"},
])
def test_invalid_config_raises_config_error(changes):
    with pytest.raises(ConfigError):
        SimulationConfig(**{**SMALL, **changes})


def test_existing_session_is_not_overwritten(tmp_path):
    config = SimulationConfig(n_frames=1, n_failed=0, n_cloudy=0, n_trailed=0, n_bad_seeing=0, clutter=False, **SMALL)
    simulate_session(tmp_path, config)
    with pytest.raises(ConfigError, match="already exists"):
        simulate_session(tmp_path, config)
