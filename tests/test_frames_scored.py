"""End-to-end tests of ``dwarf3 frames --scored``: registration accuracy against the simulator's truth, ranking of
cloudy / trailed / bad-seeing frames, hot pixels, the real Seestar frames, worker invariance, the caches and the CLI.

Every expectation comes from an independent reference: the simulator's ground truth (transforms, flags, hot
pixels, catalogue), the real frames' headers and their documented re-pointing jump, or exact arithmetic (the number
of kept frames). Each simulated session is written and analysed once per module.

Sessions
--------
* ``altaz``, ``eq``: full DWARF 3 tele frames (3856 x 2180, the simulator's default sky): the 0.05 px target is
  for the device's frames, and a smaller frame holds fewer stars to fit. The alt-az session turns by more than 180
  degrees, so that whichever frame becomes the reference (the best-scored one, not the simulator's first light)
  some frames are at least 90 degrees away from it. The EQ session drifts by about 45 px and has five times the
  default hot-pixel density.
* Registration accuracy: every frame of ``altaz`` and ``eq`` (clean, trailed, cloudy and bad seeing) within
  0.05 px RMS of the truth over the whole frame.
* ``small``: 1024 x 640 frames with five times the default star density (so that a small frame still holds a few
  hundred stars, as a full frame does), for the CLI and the cache tests, where accuracy is not the point.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from scipy.spatial import cKDTree
from typer.testing import CliRunner

from dwarf3gpu.analysis import AnalysisConfig, SessionAnalysis, analyze_session, output_dir_for
from dwarf3gpu.cli import app
from dwarf3gpu.fitsio import read_fits
from dwarf3gpu.register import apply_transform, compose, invert_transform, transform_rms_error
from dwarf3gpu.session import discover
from dwarf3gpu.simulate import SimulationConfig, simulate_session
from dwarf3gpu.stars import detect_stars


runner = CliRunner()

#: The registration accuracy required, px RMS over the whole frame, held for every frame, bad seeing included
#: (centroids on every pixel of the mosaic, METHODS.md "Star detection"; flux-weighted fit, "Registration"). These
#: two sessions reach 0.027 px (clean, trailed, cloudy) and 0.041 px (the alt-az bad-seeing frame: FWHM 6.3 px,
#: 64 degrees from the reference, 164 pairs; 0.085 px with the former green-only centroids). Over 23 sessions
#: (alt-az seeds 1 and 3-15, EQ seeds 2-8, 10 and 11; 207 registered frames, 73 of them bad seeing) the worst
#: frames reach 0.021 (clean), 0.017 (trailed), 0.028 (cloudy) and 0.049 px (bad seeing).
MAX_REGISTRATION_ERROR_PX = 0.05
FLAGS = ("cloudy", "trailed", "bad_seeing")

#: EQ session: five times the simulator's default hot-pixel density (about 2500 per frame, as on a warm uncooled
#: sensor), so that hot pixels also fall on the galaxy and in the wings of stars, where a ring test alone lets
#: them through; in EQ they stay put while the stars drift, the worst case for matching.
HOT_PIXELS_PER_MEGAPIXEL = 300.0
ALTAZ = SimulationConfig(
    n_frames=10, mode="altaz", exposure_s=60.0, rotation_rate_deg_per_hour=1250.0, n_failed=1,
    n_cloudy=1, n_trailed=2, n_bad_seeing=1, clutter=False, seed=1,
)
EQ = SimulationConfig(
    n_frames=10, mode="eq", exposure_s=30.0, drift_px_per_hour=600.0, n_failed=1,
    n_cloudy=2, n_trailed=1, n_bad_seeing=1, clutter=False, seed=2, hot_pixels_per_megapixel=HOT_PIXELS_PER_MEGAPIXEL,
)
SMALL = SimulationConfig(
    n_frames=5, width=1024, height=640, mode="eq", drift_px_per_hour=600.0, stars_per_megapixel=3000.0,
    n_failed=1, n_cloudy=0, n_trailed=1, n_bad_seeing=0, clutter=True, seed=3,
)


@dataclass
class Case:
    """A simulated session, its truth and its analysis (workers=1, cache on)."""

    session_dir: Path
    truth: dict
    lights: list[dict]  # truth entries of the lights, observation order
    analysis: SessionAnalysis

    @property
    def width(self) -> int:
        return self.truth["config"]["width"]

    @property
    def height(self) -> int:
        return self.truth["config"]["height"]

    def flagged(self, light: dict) -> bool:
        return any(light[k] for k in FLAGS)


def _make_case(tmp_path_factory, name: str, config: SimulationConfig) -> Case:
    out = tmp_path_factory.mktemp(name)
    sim = simulate_session(out / "sim", config)
    truth = json.loads((sim.truth_dir / "truth.json").read_text())
    lights = [f for f in truth["frames"] if f["kind"] == "light"]
    out_root = out / "processedData"
    analysis = analyze_session(
        discover(sim.session_dir), AnalysisConfig(), out_dir=output_dir_for(sim.session_dir, out_root), workers=1
    )
    assert [r.frame.name for r in analysis.records] == [f["file"] for f in lights]
    return Case(sim.session_dir, truth, lights, analysis)


@pytest.fixture(scope="module")
def altaz(tmp_path_factory) -> Case:
    return _make_case(tmp_path_factory, "altaz", ALTAZ)


@pytest.fixture(scope="module")
def eq(tmp_path_factory) -> Case:
    return _make_case(tmp_path_factory, "eq", EQ)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Case:
    return _make_case(tmp_path_factory, "small", SMALL)


def _truth_onto_reference(case: Case) -> list[np.ndarray]:
    """Truth transform of every light onto OUR reference: frame -> simulator reference -> our reference."""
    back = invert_transform(np.array(case.lights[case.analysis.reference_index]["transform"]))
    return [compose(back, np.array(f["transform"])) for f in case.lights]


def _rotation_deg(A: np.ndarray) -> float:
    return math.degrees(math.atan2(A[1, 0], A[0, 0]))


def _without_timings(data: dict) -> dict:
    return {k: v for k, v in data.items() if k != "timings_s"}


def _results(analysis: SessionAnalysis) -> dict:
    """Everything an analysis decided, without timings and cache statistics."""
    return {k: v for k, v in analysis.to_json().items() if k not in ("timings_s", "cache")}


# ----------------------------------------------------------------------------------------------- registration


@pytest.mark.parametrize("name", ["altaz", "eq"])
def test_registration_error_against_truth(name, request):
    case: Case = request.getfixturevalue(name)
    truth = _truth_onto_reference(case)
    if name == "altaz":  # the session really reaches 90 degrees away from whichever frame is the reference
        assert max(abs(_rotation_deg(A)) for A in truth) >= 90.0
    else:
        shifts = [np.hypot(*A[:, 2]) for A in truth]
        assert max(shifts) >= 20.0 and all(abs(_rotation_deg(A)) < 1e-9 for A in truth)
    rows, errors = [], []
    for record, light, A_true in zip(case.analysis.records, case.lights, truth):
        reg = record.registration
        assert reg is not None and reg.ok, f"{light['file']}: {reg.reason if reg else 'not registered'}"
        error = transform_rms_error(reg.matrix, A_true, case.width, case.height)
        errors.append(error)
        rows.append(f"{light['index']:2d} rot {_rotation_deg(A_true):8.2f} err {error:.4f} "
                    f"{reg.model:10s} pairs {reg.n_matches:3d} " + " ".join(k for k in FLAGS if light[k]))
    table = "\n".join(rows)
    print(f"\n{name}: reference {case.analysis.reference_index}\n{table}")
    assert max(errors) <= MAX_REGISTRATION_ERROR_PX, table
    # the reference itself is the identity
    assert np.array_equal(case.analysis.reference.registration.matrix, np.eye(2, 3))


# ---------------------------------------------------------------------------------------------------- ranking


@pytest.mark.parametrize("name", ["altaz", "eq"])
def test_cloudy_trailed_and_bad_seeing_frames_rank_last(name, request):
    case: Case = request.getfixturevalue(name)
    scores = np.array([r.score for r in case.analysis.records])
    flagged = np.array([case.flagged(f) for f in case.lights])
    assert flagged.sum() >= 4 and (~flagged).sum() >= 5
    table = "\n".join(
        f"{f['index']:2d} score {s:.3f} " + " ".join(k for k in FLAGS if f[k])
        for f, s in zip(case.lights, scores)
    )
    print(f"\n{name}:\n{table}")
    assert scores[flagged].max() < scores[~flagged].min(), table
    # the reference (best preliminary score, before transparency is known) is an unflagged frame
    assert not flagged[case.analysis.reference_index]


# ------------------------------------------------------------------------------------------------- hot pixels


@pytest.mark.parametrize("name", ["altaz", "eq"])
def test_hot_pixels_are_never_stars(name, request):
    """No detected star lies within 2 px of a hot pixel that has no brighter catalogue star within 3 px, unless
    the detection sits on a catalogue star (within 1 px: a faint star beside a hot pixel, measured correctly)."""
    case: Case = request.getfixturevalue(name)
    catalogue = np.loadtxt(case.session_dir.parents[1] / "truth" / case.session_dir.name / "stars.csv",
                           delimiter=",", skiprows=1, ndmin=2)
    hot = np.array(case.truth["sensor"]["hot_pixels"], float)
    assert len(hot) >= 400
    config = case.analysis.config
    found = []
    for light, record in zip(case.lights, case.analysis.records):
        # catalogue stars at their positions in this frame (G flux at transparency 1 against the hot pixel's ADU)
        in_frame = apply_transform(invert_transform(np.array(light["transform"])), catalogue[:, 1:3])
        stars_tree = cKDTree(in_frame)
        near = stars_tree.query_ball_point(hot[:, :2], 3.0)
        isolated = hot[[not any(catalogue[j, 4] > adu for j in idx) for idx, adu in zip(near, hot[:, 2])], :2]
        stars = detect_stars(read_fits(record.frame.path).data, record.frame.bayer_pattern,
                             threshold_sigma=config.threshold_sigma, max_stars=config.max_stars,
                             saturation=config.saturation)
        assert len(stars) == record.metrics.n_stars
        to_hot, _ = cKDTree(isolated).query(stars.xy())
        to_star, _ = stars_tree.query(stars.xy())
        bad = (to_hot <= 2.0) & (to_star > 1.0)
        found += [(light["index"], *np.round(xy, 1)) for xy in stars.xy()[bad]]
    assert not found, f"hot pixels listed as stars (frame, x, y): {found}"


# -------------------------------------------------------------------------------------------------- real data


def test_real_seestar_frames_all_register_across_the_jump(tmp_path, hash_tree, realdata):
    folder = realdata("seestar_m94_s2")
    before = hash_tree(folder)
    session = discover(folder)
    assert len(session.lights) == 6
    for light in session.lights:
        header_pattern = fits.getheader(light.path)["BAYERPAT"].strip()
        assert header_pattern == "GRBG" and light.bayer_pattern == "GRBG"
    analysis = analyze_session(session, AnalysisConfig(), out_dir=tmp_path / "out", workers=1, use_cache=False)
    assert hash_tree(folder) == before
    for r in analysis.records:
        assert r.registration.ok, f"{r.frame.name}: {r.registration.reason}"
        assert r.registration.n_matches >= 20 and r.registration.rms_px <= 0.5
    width, height = session.lights[0].width, session.lights[0].height
    centre = np.array([(width - 1) / 2, (height - 1) / 2])
    where = np.array([apply_transform(r.registration.matrix, centre) for r in analysis.records])
    steps = np.linalg.norm(np.diff(where, axis=0), axis=1)
    jump = np.linalg.norm(where[3:].mean(axis=0) - where[:3].mean(axis=0))
    print(f"\nreal frames: centre steps {np.round(steps, 2)} px, jump {jump:.2f} px")
    assert 40.0 <= steps[2] <= 60.0 and 40.0 <= jump <= 60.0
    assert np.all(np.delete(steps, 2) < 6.0)  # the other steps are tracking drift
    for r in analysis.records:
        assert abs(r.registration.rotation_deg) < 0.5


# -------------------------------------------------------------------------------------------- workers, caches


def test_workers_give_identical_json(small, tmp_path):
    outputs = []
    for workers in ("1", "2"):
        out = tmp_path / f"w{workers}"
        result = runner.invoke(app, ["frames", str(small.session_dir), "--scored", "--json", "--no-cache",
                                     "--workers", workers, "--out", str(out)])
        assert result.exit_code == 0, result.output
        assert not out.exists()  # --no-cache writes nothing
        data = json.loads(result.stdout)
        outputs.append({"session": data["session"], "analysis": _without_timings(data["analysis"])})
    assert outputs[0] == outputs[1]
    # and the same as the in-process analysis of the fixture (cache on, workers=1)
    assert outputs[0]["analysis"]["frames"] == small.analysis.to_json()["frames"]


@pytest.mark.parametrize("name", ["altaz", "eq"])
def test_workers_give_identical_results_full_frames(name, request, tmp_path):
    case: Case = request.getfixturevalue(name)
    session = discover(case.session_dir)
    two = analyze_session(session, AnalysisConfig(), out_dir=tmp_path / "w2", workers=2, use_cache=False)
    assert _results(two) == _results(case.analysis)


def test_caches(tmp_path_factory):
    config = replace(SMALL, seed=4, clutter=False)
    sim = simulate_session(tmp_path_factory.mktemp("cache") / "sim", config)
    session = discover(sim.session_dir)
    n = len(session.lights)
    out = output_dir_for(sim.session_dir, sim.session_dir.parents[1] / "processedData")

    first = analyze_session(session, AnalysisConfig(), out_dir=out, workers=1)
    assert first.cache == {"scores": {"hits": 0, "misses": n}, "transforms": {"hits": 0, "misses": n}}
    assert sorted(p.name for p in (out / "cache").iterdir()) == ["scores.json", "transforms.json"]

    # second call: everything from the cache, nothing measured or matched (progress reports every computed
    # frame; a stage served from the cache reports once, already complete)
    reports = []
    second = analyze_session(session, AnalysisConfig(), out_dir=out, workers=1,
                             progress=lambda stage, done, total: reports.append((done, total)))
    assert reports and all(done == total == n for done, total in reports)
    # a setting that the cached values do not depend on keeps them
    other_keep = analyze_session(session, AnalysisConfig(keep=0.5), out_dir=out, workers=1)
    assert second.cache == {"scores": {"hits": n, "misses": 0}, "transforms": {"hits": n, "misses": 0}}
    assert _results(second) == _results(first)
    assert other_keep.cache == second.cache

    # a touched frame (new modification time) is measured and matched again, alone
    touched = next(i for i in range(n) if i != first.reference_index)
    path = session.lights[touched].path
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    third = analyze_session(session, AnalysisConfig(), out_dir=out, workers=1)
    assert third.cache == {"scores": {"hits": n - 1, "misses": 1}, "transforms": {"hits": n - 1, "misses": 1}}
    assert _results(third) == _results(first)

    # a relevant setting invalidates everything
    stricter = analyze_session(session, AnalysisConfig(threshold_sigma=6.0), out_dir=out, workers=1)
    assert stricter.cache["scores"] == {"hits": 0, "misses": n}
    assert stricter.cache["transforms"] == {"hits": 0, "misses": n}

    # --cache-refresh recomputes everything (and gives the same answer)
    refreshed = analyze_session(session, AnalysisConfig(), out_dir=out, workers=1, refresh_cache=True)
    assert refreshed.cache == {"scores": {"hits": 0, "misses": n}, "transforms": {"hits": 0, "misses": n}}
    assert _results(refreshed) == _results(first)
    again = analyze_session(session, AnalysisConfig(), out_dir=out, workers=1)
    assert again.cache["scores"]["hits"] == n and again.cache["transforms"]["hits"] == n

    # --no-cache neither reads nor writes
    fresh = out.parent / "elsewhere"
    uncached = analyze_session(session, AnalysisConfig(), out_dir=fresh, workers=1, use_cache=False)
    assert not fresh.exists()
    assert uncached.cache == {"scores": {"hits": 0, "misses": n}, "transforms": {"hits": 0, "misses": n}}
    assert _results(uncached) == _results(first)


# ------------------------------------------------------------------------------------------------------- CLI


def test_cli_json_structure_and_caches_under_out(small, tmp_path, hash_tree):
    before = hash_tree(small.session_dir)
    out = tmp_path / "root"
    result = runner.invoke(app, ["frames", str(small.session_dir), "--scored", "--json", "--workers", "1",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert hash_tree(small.session_dir) == before
    assert (out / small.session_dir.name / "cache" / "scores.json").is_file()
    assert (out / small.session_dir.name / "cache" / "transforms.json").is_file()
    data = json.loads(result.stdout)
    frames = data["analysis"]["frames"]
    assert [f["name"] for f in frames] == [f["file"] for f in small.lights]
    metric_keys = {"background", "noise", "saturated_fraction", "n_stars", "fwhm", "eccentricity", "n_trails",
                   "transparency"}
    for f in frames:
        assert set(f["metrics"]) >= metric_keys
        assert isinstance(f["score"], float) and f["score"] >= 0
        assert isinstance(f["kept"], bool) and isinstance(f["reason"], str)
        assert (f["reason"] == "") == f["kept"]
        A = np.array(f["transform"], float)
        assert A.shape == (2, 3) and np.all(np.isfinite(A))
    # transforms map frame pixels onto the reference as the truth does (loose: this is a small, crowded frame)
    truth = _truth_onto_reference(small)
    ref = data["analysis"]["reference"]
    assert ref == small.lights[small.analysis.reference_index]["file"]
    for f, A_true in zip(frames, truth):
        assert transform_rms_error(np.array(f["transform"]), A_true, small.width, small.height) < 0.2
    n = len(frames)
    assert sum(f["kept"] for f in frames) == math.floor(0.92 * n + 0.5)
    # a second call reads the cache
    again = runner.invoke(app, ["frames", str(small.session_dir), "--scored", "--json", "--workers", "1",
                                "--out", str(out)])
    assert again.exit_code == 0
    cached = json.loads(again.stdout)["analysis"]
    assert cached["cache"]["scores"] == {"hits": n, "misses": 0}
    assert cached["cache"]["transforms"] == {"hits": n, "misses": 0}
    assert cached["frames"] == frames
    # --cache-refresh recomputes
    refresh = runner.invoke(app, ["frames", str(small.session_dir), "--scored", "--json", "--workers", "1",
                                  "--out", str(out), "--cache-refresh"])
    assert refresh.exit_code == 0
    refreshed = json.loads(refresh.stdout)["analysis"]
    assert refreshed["cache"]["scores"] == {"hits": 0, "misses": n}
    assert refreshed["frames"] == frames
    assert hash_tree(small.session_dir) == before


def test_cli_keep_and_save(small, tmp_path, hash_tree):
    before = hash_tree(small.session_dir)
    out, saved = tmp_path / "root", tmp_path / "list.txt"
    n = len(small.lights)
    assert n % 2 == 1  # 0.5 * n ends in .5: round half up, not to even
    result = runner.invoke(app, ["frames", str(small.session_dir), "--scored", "--json", "--keep", "0.5",
                                 "--save", str(saved), "--workers", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    frames = json.loads(result.stdout)["analysis"]["frames"]
    kept = [f["name"] for f in frames if f["kept"]]
    assert len(kept) == (n + 1) // 2
    assert saved.read_text() == "".join(name + "\n" for name in kept)
    # the kept frames are the best scores; the others say why they were dropped
    scores = {f["name"]: f["score"] for f in frames}
    assert min(scores[k] for k in kept) > max(s for name, s in scores.items() if name not in kept)
    assert {f["reason"] for f in frames if not f["kept"]} == {"low_score"}
    assert hash_tree(small.session_dir) == before


def test_cli_table_shows_metrics_score_and_decision(small, tmp_path, hash_tree):
    before = hash_tree(small.session_dir)
    result = runner.invoke(app, ["frames", str(small.session_dir), "--scored", "--keep", "0.5", "--workers", "1",
                                 "--out", str(tmp_path / "root")], terminal_width=200)
    assert result.exit_code == 0, result.output
    text = result.stdout
    for column in ("stars", "FWHM", "bkg", "noise", "transp", "rot deg", "rms px", "score", "decision"):
        assert column in text
    n = len(small.lights)
    assert text.count("kept") >= (n + 1) // 2 and text.count("low_score") >= n - (n + 1) // 2
    assert "(ref)" in text and f"kept {(n + 1) // 2} of {n}" in text
    assert hash_tree(small.session_dir) == before
    # --save without --scored is a usage error, and nothing is written
    saved = tmp_path / "nope.txt"
    usage = runner.invoke(app, ["frames", str(small.session_dir), "--save", str(saved)])
    assert usage.exit_code == 2 and not saved.exists()
