"""The calibrate stage: master dark, hot-pixel map, dark subtraction and cosmetic correction, the "does it help"
check, and their use by ``stack_session``.

One small EQ session is simulated per module without drift (every frame lands on the same sensor pixels, so hot
pixels stack onto the same master pixels and no sigma clipping can remove them: the worst case) with many hot
pixels, a ``DWARF_DARK`` set, a ``CALI_FRAME`` master and a strong fixed pedestal pattern (30 ADU instead of 2, so
that its removal is measurable in a short stack). It is stacked with ``dark="auto"`` and ``dark="none"`` into the
same output folder (so the stack cache key must tell them apart).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy.ndimage import median_filter
from typer.testing import CliRunner

from dwarf3gpu import simulate
from dwarf3gpu.calibrate import (
    HOT_REACH, DarkCalibration, build_master_dark, calibrate_window, check_dark, dark_offset, hot_pixel_map,
    hot_pixels_from_lights,
)
from dwarf3gpu.cache import cache_path
from dwarf3gpu.cli import app
from dwarf3gpu.config import StackConfig
from dwarf3gpu.errors import ConfigError
from dwarf3gpu.fitsio import read_fits, read_raw_uint16, read_raw_window, write_raw_uint16
from dwarf3gpu.pipeline import stack_session
from dwarf3gpu.session import discover


SIM = simulate.SimulationConfig(
    n_frames=8, width=384, height=256, mode="eq", drift_px_per_hour=0.0, jitter_px=0.0, n_failed=0, n_cloudy=0,
    n_trailed=0, n_bad_seeing=0, clutter=False, seed=5, galaxy=False, with_darks=True,
    hot_pixels_per_megapixel=2000.0,
)
STACK = dict(keep=1.0, align_mode="integer", debayer="none", memory_budget=1 << 30)
FIXED_PATTERN = 30.0
_SAME_COLOUR = np.zeros((5, 5), bool)
_SAME_COLOUR[::2, ::2] = True
_SAME_COLOUR[2, 2] = False


def _master(result) -> np.ndarray:
    return read_fits(result.outputs["master_linear"]).data.astype(np.float64)


@pytest.fixture(scope="module")
def session(tmp_path_factory, hash_tree):
    """(simulation, truth, output root, rawData hash before stacking, results): ``results[dark]`` is (StackResult,
    master, manifest, report.json) of the runs with ``dark="auto"`` and ``"none"``, read right after each run."""
    root = tmp_path_factory.mktemp("calibrate")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(simulate, "FIXED_PATTERN_ADU", FIXED_PATTERN)
        sim = simulate.simulate_session(root, SIM)
    truth = json.loads(next(sim.truth_dir.glob("*.json")).read_text())
    before = hash_tree(root / "rawData")
    out = root / "processedData"
    results = {}
    for dark in ("auto", "none"):
        result = stack_session(sim.session_dir, out, StackConfig(dark=dark, **STACK), workers=2)
        results[dark] = (result, _master(result), json.loads(result.outputs["manifest"].read_text()),
                         json.loads(result.outputs["report_json"].read_text()))
    return sim, truth, root, before, results


def _hot_excess(master: np.ndarray, truth: dict) -> np.ndarray:
    """(master - median of the 8 same-colour neighbours) / robust noise at every truth hot pixel."""
    local = median_filter(master, footprint=_SAME_COLOUR, mode="mirror")
    resid = master - local
    sigma = 1.4826 * np.median(np.abs(resid - np.median(resid)))
    xy = np.array([(x, y) for x, y, _ in truth["sensor"]["hot_pixels"]])
    return resid[xy[:, 1], xy[:, 0]] / sigma


def test_hot_pixels_removed_with_the_dark_present_without(session):
    """With the matched dark, >= 99 % of the truth hot pixels are within 5 sigma of their neighbours in the
    master; without it, >= 95 % stand out by more than 5 sigma (so the test can fail)."""
    _, truth, _, _, results = session
    assert len(truth["sensor"]["hot_pixels"]) > 150
    with_dark = np.abs(_hot_excess(results["auto"][1], truth))
    without = _hot_excess(results["none"][1], truth)
    assert np.mean(with_dark < 5) >= 0.99, np.sort(with_dark)[-5:]
    assert np.mean(without > 5) >= 0.95


def test_pedestal_pattern_removed(session):
    """The fixed pedestal pattern (30 ADU rms, identical in every frame) does not average down in a stack; the dark
    removes it, so the master's same-colour noise drops well below the undarked master's."""
    _, _, _, _, results = session

    def noise(m):
        d = (m[:, 2:] - m[:, :-2])[8:-8, 8:-8]
        return 1.4826 * np.median(np.abs(d - np.median(d))) / np.sqrt(2)

    n_dark, n_none = noise(results["auto"][1]), noise(results["none"][1])
    assert n_none > 25  # the pattern dominates
    assert n_dark < 0.7 * n_none, (n_dark, n_none)


def test_manifest_and_report_record_the_dark(session):
    """run_manifest.json names the dark (raw set, exposure/gain/temperature match), the check's numbers and the
    hot-pixel count; report.json has the summary; the none run says why."""
    sim, truth, _, _, results = session
    cal = results["auto"][2]["calibration"]
    assert cal["used"] is True and cal["setting"] == "auto"
    assert cal["dark"]["kind"] == "raw_dark_set" and Path(cal["dark"]["path"]) == sim.dark_dir
    assert cal["dark"]["matches"] and cal["dark"]["exposure_s"] == SIM.exposure_s and cal["dark"]["gain"] == SIM.gain
    assert cal["dark"]["temperature_c"] == truth["darks"]["temperature_c"]
    check = cal["check"]
    assert check["helps"] and check["with"]["outliers"] < check["without"]["outliers"]
    assert check["with"]["noise_adu"] < check["without"]["noise_adu"]  # the pattern is gone
    n_truth = len(truth["sensor"]["hot_pixels"])
    assert n_truth * 0.95 <= cal["hot_pixels"] <= n_truth * 1.05
    report = results["auto"][3]
    assert report["calibration"]["dark_used"] and report["calibration"]["hot_pixels"] == cal["hot_pixels"]
    none = results["none"][2]["calibration"]
    assert none["used"] is False and none["reason"] == "--dark none"


def test_cache_and_session_folder(session, hash_tree):
    """The master dark is cached under <out>/cache/dark/; the two runs did not share a stack cache; nothing
    was written under rawData (session and dark folders)."""
    sim, _, root, before, results = session
    assert results["none"][0].stats.get("calibration")["dark_used"] is False
    assert not results["none"][0].manifest["stack"]["from_cache"]
    assert not np.array_equal(results["auto"][1], results["none"][1])
    out = root / "processedData" / sim.session_dir.name
    assert cache_path(out, "dark") == out / "cache" / "dark"
    assert list(cache_path(out, "dark").glob("*/master_dark.fits"))
    assert hash_tree(root / "rawData") == before


def test_tiles_and_modes_give_identical_bytes(session, tmp_path):
    """With the dark, several tiles give the same bytes as one (hot pixels near a tile's window edge are repaired
    from the same neighbours), in the CFA and the default RGB (lattice) modes."""
    sim, _, _, _, _ = session
    for mode in ("none", "rgb"):
        base = stack_session(sim.session_dir, tmp_path / f"one_{mode}", StackConfig(**{**STACK, "debayer": mode}),
                             workers=2, use_cache=False)
        plan = base.manifest["stack"]["tile_plan"]
        budget = int(plan["fixed_bytes"] + 64 * 64 * plan["bytes_per_pixel"])
        tiled = stack_session(sim.session_dir, tmp_path / f"tiled_{mode}",
                              StackConfig(**{**STACK, "debayer": mode, "memory_budget": budget}), workers=2,
                              use_cache=False)
        assert tiled.manifest["stack"]["tile_plan"]["n_tiles"] >= 3
        assert base.manifest["calibration"]["used"]
        assert np.array_equal(_master(base), _master(tiled), equal_nan=True), mode


def test_explicit_device_master_and_bad_paths(session, tmp_path):
    """An explicit FITS master dark is used; a missing file or a dark of another size is a clear ConfigError."""
    sim, truth, root, _, _ = session
    device_master = root / "rawData" / truth["darks"]["master"]
    result = stack_session(sim.session_dir, tmp_path / "explicit", StackConfig(**{**STACK, "dark": str(device_master)}),
                           workers=2)
    cal = result.manifest["calibration"]
    assert cal["used"] and cal["dark"]["path"] == str(device_master)
    with pytest.raises(ConfigError, match="no such file"):
        stack_session(sim.session_dir, tmp_path / "missing", StackConfig(**{**STACK, "dark": str(tmp_path / "x.fits")}))
    small = write_raw_uint16(np.full((64, 96), 256, np.uint16), tmp_path / "small_dark.fits")
    with pytest.raises(ConfigError, match="96x64"):
        stack_session(sim.session_dir, tmp_path / "small", StackConfig(**{**STACK, "dark": str(small)}), workers=2)


def test_a_dark_that_hurts_is_not_used(session, tmp_path):
    """A dark from another sensor (its hot pixels elsewhere) would punch holes: the check rejects it and the
    manifest says why; the stack is then the undarked one."""
    sim, _, _, _, results = session
    rng = np.random.default_rng(3)
    wrong = np.full((SIM.height, SIM.width), 256.0) + rng.normal(0, 3, (SIM.height, SIM.width))
    wrong[rng.integers(0, SIM.height, 300), rng.integers(0, SIM.width, 300)] += 5000
    path = write_raw_uint16(np.rint(wrong).astype(np.uint16), tmp_path / "wrong_dark.fits")
    result = stack_session(sim.session_dir, tmp_path / "out", StackConfig(**{**STACK, "dark": str(path)}), workers=2)
    cal = result.manifest["calibration"]
    assert cal["used"] is False and not cal["check"]["helps"]
    assert "outliers" in cal["reason"] and cal["check"]["with"]["outliers"] > cal["check"]["without"]["outliers"]
    assert np.array_equal(_master(result), results["none"][1], equal_nan=True)


def _interior(truth: dict, height: int, width: int, margin: int = 3) -> np.ndarray:
    """Which truth hot pixels the lights' search is meant to find: at least ``margin`` px inside the frame, and
    alone (no other hot pixel among their 8 nearest neighbours: a touching pair looks like a 2-pixel object)."""
    xy = np.array([(x, y) for x, y, _ in truth["sensor"]["hot_pixels"]])
    taken = {(int(x), int(y)) for x, y in xy}
    alone = np.array([not any((x + dx, y + dy) in taken for dx in (-1, 0, 1) for dy in (-1, 0, 1) if dx or dy)
                      for x, y in xy])
    inside = (xy[:, 0] >= margin) & (xy[:, 0] < width - margin) & (xy[:, 1] >= margin) & (xy[:, 1] < height - margin)
    return inside & alone


def test_session_without_darks_repairs_hot_pixels_found_in_the_lights(tmp_path):
    """No dark next to the session: the manifest says so, the hot pixels are found in the lights instead, and in
    the master >= 97 % of the truth hot pixels (those alone and inside the 3-px edge the search skips; this session
    has 2000 per megapixel, so 4 % touch another) are within 5 sigma of their neighbours, against >= 95 % standing
    out by more than 5 sigma with --dark none (so the test can fail)."""
    sim = simulate.simulate_session(tmp_path, simulate.SimulationConfig(**{**SIM.__dict__, "with_darks": False}))
    truth = json.loads(next(sim.truth_dir.glob("*.json")).read_text())
    auto = stack_session(sim.session_dir, tmp_path / "auto", StackConfig(**STACK), workers=2)
    none = stack_session(sim.session_dir, tmp_path / "none", StackConfig(**{**STACK, "dark": "none"}), workers=2)
    cal = auto.manifest["calibration"]
    assert cal["used"] is False and cal["reason"] == "no dark found next to the session"
    found = cal["hot_pixels_from_lights"]
    assert found["hot_pixels"] == cal["hot_pixels"] > 150 and len(found["frames"]) == SIM.n_frames
    assert none.manifest["calibration"].get("hot_pixels_from_lights") is None
    inside = _interior(truth, SIM.height, SIM.width)
    with_lights = np.abs(_hot_excess(_master(auto), truth))[inside]
    without = _hot_excess(_master(none), truth)[inside]
    assert np.mean(with_lights < 5) >= 0.97, np.sort(with_lights)[-5:]
    assert np.mean(without > 5) >= 0.95
    assert "found in the lights" in auto.outputs["report_md"].read_text()


def test_hot_pixels_from_lights_spare_stars_that_do_not_move(tmp_path):
    """The hardest case for a search in the lights: an EQ session without drift or dither (every star stays on the
    same pixels, so the lights' minimum keeps it) with dense, sharp stars (FWHM 2 px, 3000 per megapixel): every
    flagged pixel is a truth hot pixel, and >= 97 % of the lone truth hot pixels inside the edge are flagged."""
    config = simulate.SimulationConfig(
        n_frames=6, width=512, height=384, mode="eq", drift_px_per_hour=0.0, jitter_px=0.0, n_failed=0, n_cloudy=0,
        n_trailed=0, n_bad_seeing=0, clutter=False, seed=6, galaxy=False, with_darks=False,
        hot_pixels_per_megapixel=500.0, stars_per_megapixel=3000.0, fwhm_px=2.0)
    sim = simulate.simulate_session(tmp_path, config)
    truth = json.loads(next(sim.truth_dir.glob("*.json")).read_text())
    hot, record = hot_pixels_from_lights(list(sim.lights), (config.height, config.width))
    truth_xy = {(int(x), int(y)) for x, y, _ in truth["sensor"]["hot_pixels"]}
    inside = {xy for xy, ok in zip(((int(x), int(y)) for x, y, _ in truth["sensor"]["hot_pixels"]),
                                   _interior(truth, config.height, config.width)) if ok}
    found = {(int(x), int(y)) for y, x in zip(*np.nonzero(hot))}
    assert record["hot_pixels"] == len(found) and len(inside) > 80
    assert found <= truth_xy, sorted(found - truth_xy)[:5]
    assert len(found & inside) >= 0.97 * len(inside)


def test_master_dark_median_and_hot_map(session, tmp_path):
    """The raw-set master is the per-pixel median of its frames (float32) and its hot map finds the truth hot
    pixels."""
    sim, truth, _, _, _ = session
    candidate = discover(sim.session_dir).best_dark
    master, key = build_master_dark(candidate, tmp_path, shape=(SIM.height, SIM.width))
    frames = np.stack([read_raw_uint16(p)[0] for p in sorted(sim.dark_dir.glob("raw_*.fits"))])
    assert master.dtype == np.float32 and np.array_equal(master, np.median(frames, axis=0).astype(np.float32))
    again, key2 = build_master_dark(candidate, tmp_path, shape=(SIM.height, SIM.width))
    assert key2 == key and np.array_equal(again, master)
    hot = hot_pixel_map(master)
    truth_xy = {(x, y) for x, y, _ in truth["sensor"]["hot_pixels"]}
    found = {(int(x), int(y)) for y, x in zip(*np.nonzero(hot))}
    assert len(found & truth_xy) >= 0.95 * len(truth_xy) and len(found - truth_xy) <= 0.05 * len(truth_xy)


def test_calibrate_window_edges_and_neighbours():
    """Dark offset subtracted; a hot pixel becomes the median of its same-colour neighbours inside the window,
    hot neighbours excluded; at a corner only the neighbours present are used."""
    h, w = 12, 12
    master = np.full((h, w), 100.0, np.float32)
    master[5, 5] = master[5, 7] = master[0, 0] = 5000.0
    offset = dark_offset(master)
    cal = DarkCalibration(offset, hot_pixel_map(master), "x", {})
    assert cal.hot.sum() == 3
    light = np.arange(h * w, dtype=np.float32).reshape(h, w) + 1000
    light[5, 5] += 4900
    light[5, 7] += 4900
    light[0, 0] += 4900
    win = light.copy()
    calibrate_window(win, (0, 0), cal)
    expected = np.median([light[r, c] for r in (3, 5, 7) for c in (3, 5, 7) if (r, c) not in ((5, 5), (5, 7))])
    assert win[5, 5] == pytest.approx(expected)
    assert win[0, 0] == pytest.approx(np.median([light[0, 2], light[2, 0], light[2, 2]]))
    assert win[1, 1] == light[1, 1]
    # a window cut HOT_REACH pixels beyond a hot pixel repairs it exactly as the full frame does
    sub = light[3:10, 3:10].copy()
    calibrate_window(sub, (3, 3), cal)
    assert sub[2, 2] == win[5, 5] and HOT_REACH == 2
    # hot pixels only (no dark, as found in the lights): nothing subtracted, a uint16 window stays uint16 and the
    # repaired value is the neighbours' median rounded half to even (13.5 -> 14, 12.5 -> 12)
    hot = np.zeros((9, 9), bool)
    hot[4, 4] = True
    lights_only = DarkCalibration(None, hot, "y", {})
    for values, want in (([10, 11, 12, 13, 14, 15, 16, 17], 14), ([9, 10, 11, 12, 13, 14, 15, 16], 12)):
        raw = np.full((9, 9), 7, np.uint16)
        raw[4, 4] = 60000
        for (dr, dc), v in zip([(dr, dc) for dr in (-2, 0, 2) for dc in (-2, 0, 2) if dr or dc], values):
            raw[4 + dr, 4 + dc] = v
        repaired = calibrate_window(raw.copy(), (0, 0), lights_only)
        assert repaired.dtype == np.uint16 and repaired[4, 4] == want
        assert np.array_equal(repaired[~hot], raw[~hot])


def test_check_dark_rule():
    """A matched dark passes; a dark that adds noise only (no hot pixels to remove) fails on the noise rule."""
    rng = np.random.default_rng(0)
    light = rng.normal(1000, 10, (128, 128)).astype(np.float32)
    assert check_dark(light, np.zeros_like(light))["helps"]
    noisy = rng.normal(0, 10, light.shape).astype(np.float32)
    verdict = check_dark(light, noisy)
    assert not verdict["helps"] and "noise" in verdict["reason"]


def test_cli_dark_option(session, tmp_path):
    """``dwarf3 stack --dark`` is documented in --help and a missing file is a clear error."""
    sim, *_ = session
    runner = CliRunner()
    help_text = runner.invoke(app, ["stack", "--help"], terminal_width=200).output
    assert "--dark" in help_text and "auto" in help_text
    res = runner.invoke(app, ["stack", str(sim.session_dir), "--out", str(tmp_path),
                              "--dark", str(tmp_path / "no.fits")])
    assert res.exit_code != 0
    assert "no such file" in " ".join(res.output.split())


def test_hot_pixels_from_real_seestar_lights_are_lone_and_persistent(realdata):
    """Real lights (Seestar S50, GRBG, 6 frames, no dark; 3 hot pixels found): every flagged pixel stands above its
    same-colour neighbours' median by the search threshold in EVERY single light, as a pixel fixed on the sensor
    does and a star drifting through would not."""
    frames = sorted(realdata("seestar_m94_s2").glob("*.fit"))
    lights = [read_raw_window(p).astype(np.float32) for p in frames]
    hot, record = hot_pixels_from_lights(frames, lights[0].shape)
    assert record["hot_pixels"] == int(hot.sum()) >= 1
    rows, cols = np.nonzero(hot)
    same_colour = [(dr, dc) for dr in (-2, 0, 2) for dc in (-2, 0, 2) if dr or dc]
    for light in lights:
        local = np.median([light[rows + dr, cols + dc] for dr, dc in same_colour], axis=0)
        assert np.all(light[rows, cols] - local > record["threshold_adu"])
