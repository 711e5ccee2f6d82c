"""Frame scores and selection: exact formulas, limits, ranking and determinism."""

from __future__ import annotations

import numpy as np
import pytest

from dwarf3gpu.quality import FrameMetrics, SelectionLimits, score_frames, select_frames, transparency


def metrics(**kw) -> FrameMetrics:
    base = dict(background=1000.0, noise=10.0, saturated_fraction=0.0, n_stars=100, fwhm=3.0, eccentricity=0.2)
    base.update(kw)
    return FrameMetrics(**base)


def test_classic_score_is_the_documented_formula():
    ms = [metrics(), metrics(n_stars=50, noise=20.0, saturated_fraction=0.01, background=2000.0)]
    bg_median = np.median([1000.0, 2000.0])
    expected = [
        (1 + 100) / (10.0 * (1 + 0) * (1 + 1000.0 / bg_median)),
        (1 + 50) / (20.0 * (1 + 10 * 0.01) * (1 + 2000.0 / bg_median)),
    ]
    np.testing.assert_allclose(score_frames(ms, "classic"), expected, rtol=1e-12)


def test_weighted_score_is_relative_snr_squared():
    ms = [metrics(), metrics(fwhm=6.0), metrics(transparency=0.5), metrics(noise=20.0), metrics(n_trails=1)]
    s = score_frames(ms, "weighted")
    # medians: noise 10, fwhm 3 -> the first frame scores 1; doubling FWHM or noise quarters it; T = 0.5 quarters it
    np.testing.assert_allclose(s, [1.0, 0.25, 0.25, 0.25, 0.5], rtol=1e-12)


def test_frames_without_stars_score_zero():
    s = score_frames([metrics(), metrics(n_stars=0, fwhm=float("nan"))], "weighted")
    assert s[1] == 0.0 and s[0] > 0


def test_selection_keeps_top_fraction_and_explains_the_rest():
    ms = [metrics() for _ in range(10)]
    scores = np.arange(10, 0, -1, dtype=float)  # frame 0 best
    decisions = select_frames(ms, scores, keep=0.8)
    assert [d.kept for d in decisions] == [True] * 8 + [False] * 2
    assert decisions[9].reason == "low_score" and "rank 10 of 10" in decisions[9].detail
    assert decisions[0].rank == 1


def test_hard_limits_and_failures_have_reasons():
    ms = [
        metrics(transparency=1.0),
        metrics(fwhm=9.0),
        metrics(n_stars=3),
        metrics(eccentricity=0.8),
        metrics(transparency=0.3),
        metrics(background=5000.0, transparency=1.0),
        None,
        metrics(transparency=1.0),
    ]
    limits = SelectionLimits(max_fwhm=6, min_stars=8, max_eccentricity=0.6, min_transparency=0.5, max_background=2.0)
    failures = [""] * 7 + ["alignment_failed: no match"]
    d = select_frames(ms, np.ones(8), keep=1.0, limits=limits, failures=failures)
    assert [x.reason for x in d] == [
        "", "fwhm_above_limit", "too_few_stars", "eccentricity_above_limit", "transparency_below_limit",
        "background_above_limit", "unreadable", "alignment_failed",
    ]
    assert "9.00 px > 6 px" in d[1].detail and d[7].detail == "no match"


def test_ties_are_broken_by_observation_order():
    d = select_frames([metrics()] * 4, [1.0, 1.0, 1.0, 1.0], keep=0.5)
    assert [x.kept for x in d] == [True, True, False, False]


@pytest.mark.parametrize("keep", [0.0, 1.5])
def test_keep_must_be_a_fraction(keep):
    with pytest.raises(ValueError):
        select_frames([metrics()], [1.0], keep=keep)


def test_transparency_from_matched_stars():
    rng = np.random.default_rng(3)
    ref_xy = rng.uniform(0, 1000, (60, 2))
    ref_flux = np.sort(rng.uniform(1e3, 1e5, 60))[::-1]
    angle = np.deg2rad(10)
    A = np.array([[np.cos(angle), -np.sin(angle), 12.0], [np.sin(angle), np.cos(angle), -7.0]])
    # frame star positions: inverse-map the reference stars
    M = np.vstack([A, [0, 0, 1]])
    inv = np.linalg.inv(M)[:2]
    frame_xy = ref_xy @ inv[:, :2].T + inv[:, 2]
    t, n = transparency(frame_xy, 0.6 * ref_flux, ref_xy, ref_flux, A)
    assert t == pytest.approx(0.6) and n == 60
    t_none, n_none = transparency(frame_xy + 50, ref_flux, ref_xy, ref_flux, A)  # nothing matches
    assert t_none is None and n_none < 5
