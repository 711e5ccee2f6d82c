"""Tests of dwarf3gpu.register: accuracy on synthetic star lists, failures, helpers."""

from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pytest

from dwarf3gpu.errors import ConfigError, SessionError
from dwarf3gpu.geometry import (
    apply_transform,
    compose,
    even_pixel_shift,
    invert_transform,
    rotation_deg,
    scale,
    to_cv2_warp_matrix,
)
from dwarf3gpu.register import (
    choose_align_mode,
    choose_reference,
    fit_transform,
    pair_variances,
    refine_transform,
    register_frame,
    rotation_range_deg,
    select_model,
    transform_rms_error,
)

WIDTH, HEIGHT = 3856, 2180
CENTRE = (WIDTH / 2 + 37.0, HEIGHT / 2 - 21.0)


def similarity(theta_deg, centre=CENTRE, shift=(0.0, 0.0), factor=1.0):
    """Rotation by theta_deg about centre, then a shift, as a frame -> reference affine."""
    t = math.radians(theta_deg)
    linear = factor * np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
    c = np.asarray(centre, dtype=float)
    return np.hstack([linear, (c - linear @ c + np.asarray(shift, dtype=float))[:, None]])


def compression(k, direction_deg):
    """Compression by a fraction k along direction_deg about the frame centre (refraction-like)."""
    t = math.radians(direction_deg)
    u = np.array([math.cos(t), math.sin(t)])
    linear = np.eye(2) - k * np.outer(u, u)
    c = np.array([WIDTH / 2, HEIGHT / 2])
    return np.hstack([linear, (c - linear @ c)[:, None]])


def star_lists(A_true, seed, per_frame=300, noise=0.07, drop=0.1, spurious=0.1):
    """Frame and reference star lists of one sky seen through A_true, brightest first.

    Stars are spread over a sky larger than the frame (so a rotated frame is full too) with
    power-law fluxes; each list gets Gaussian centroid noise, 10 % lost stars, 10 % spurious
    detections and 10 % flux noise before the flux sort.
    """
    rng = np.random.default_rng(seed)
    span = 2.0 * WIDTH
    n_sky = int(per_frame * span * span / (WIDTH * HEIGHT))
    sky = rng.uniform(-span / 2, span / 2, (n_sky, 2)) + [WIDTH / 2, HEIGHT / 2]
    flux = (rng.pareto(1.5, n_sky) + 1.0) * 100.0

    def observe(xy):
        inside = (
            (xy[:, 0] > -0.5) & (xy[:, 0] < WIDTH - 0.5) & (xy[:, 1] > -0.5) & (xy[:, 1] < HEIGHT - 0.5)
        )
        keep = inside & (rng.random(n_sky) > drop)
        pos = xy[keep] + rng.normal(0.0, noise, (keep.sum(), 2))
        obs_flux = flux[keep] * rng.lognormal(0.0, 0.1, keep.sum())
        n_fake = int(spurious * keep.sum())
        pos = np.vstack([pos, rng.uniform([0, 0], [WIDTH - 1, HEIGHT - 1], (n_fake, 2))])
        obs_flux = np.concatenate([obs_flux, (rng.pareto(1.5, n_fake) + 1.0) * 100.0])
        return pos[np.argsort(-obs_flux)]

    ref = observe(sky)
    frame = observe(apply_transform(invert_transform(A_true), sky))
    return frame, ref


ALTAZ_AND_EQ = {
    "rot0": similarity(0.0, shift=(23.4, -11.7)),
    "rot0.05": similarity(0.05, shift=(5.3, 2.2)),
    "rot5": similarity(5.0, shift=(23.4, -11.7)),
    "rot30": similarity(30.0, shift=(-40.2, 17.9)),
    "rot60": similarity(60.0, shift=(11.0, 12.0)),
    "rot90": similarity(90.0, shift=(-7.7, 30.1)),
    "rot-90": similarity(-90.0, shift=(3.0, -3.0)),
    "eq_drift": similarity(0.0, shift=(37.3, -21.9)),
}


@pytest.mark.parametrize("name", sorted(ALTAZ_AND_EQ))
def test_registration_accuracy(name):
    A_true = ALTAZ_AND_EQ[name]
    frame, ref = star_lists(A_true, seed=11)
    result = register_frame(frame, ref)
    assert result.ok, result.reason
    assert transform_rms_error(result.matrix, A_true, WIDTH, HEIGHT) <= 0.05
    assert result.n_matches >= 100
    assert result.rms_px < 0.2
    assert result.rotation_deg == pytest.approx(rotation_deg(A_true), abs=0.01)
    assert result.model == "similarity"


def test_refraction_like_anisotropy_needs_the_affine():
    A_true = compose(compression(2e-4, 90.0), similarity(20.0, shift=(12.0, -8.0)))
    frame, ref = star_lists(A_true, seed=3)
    auto = register_frame(frame, ref)
    forced = register_frame(frame, ref, model="similarity")
    assert auto.ok and forced.ok
    assert auto.model == "affine"
    assert transform_rms_error(auto.matrix, A_true, WIDTH, HEIGHT) <= 0.05
    assert transform_rms_error(forced.matrix, A_true, WIDTH, HEIGHT) > 0.05


def test_registration_is_deterministic():
    frame, ref = star_lists(ALTAZ_AND_EQ["rot30"], seed=5)
    first = register_frame(frame, ref)
    second = register_frame(frame, ref)
    assert np.array_equal(first.matrix, second.matrix)
    assert first.to_json() == second.to_json()


def test_refinement_does_not_depend_on_the_starting_guess():
    A_true = ALTAZ_AND_EQ["rot5"]
    frame, ref = star_lists(A_true, seed=7)
    nudged = compose(similarity(0.01, shift=(0.4, -0.3)), A_true)
    a = refine_transform(frame, ref, A_true)
    b = refine_transform(frame, ref, nudged)
    assert np.array_equal(a[0], b[0])
    assert np.array_equal(a[1], b[1]) and np.array_equal(a[2], b[2])


def hetero_lists(A_true, seed, per_frame=300, bright_noise=0.02, faint_noise=0.4, bright_flux=300.0):
    """Like :func:`star_lists`, with fluxes returned and heteroscedastic centroid noise.

    Stars with a true flux of at least ``bright_flux`` (about the brightest 20 %) get ``bright_noise`` px per axis
    in both lists, the others ``faint_noise``; 10 % lost and 10 % spurious stars, 10 % flux noise.
    Returns ``(frame_xy, frame_flux, ref_xy, ref_flux)``, each list brightest first.
    """
    rng = np.random.default_rng(seed)
    span = 2.0 * WIDTH
    n_sky = int(per_frame * span * span / (WIDTH * HEIGHT))
    sky = rng.uniform(-span / 2, span / 2, (n_sky, 2)) + [WIDTH / 2, HEIGHT / 2]
    flux = (rng.pareto(1.5, n_sky) + 1.0) * 100.0
    noise = np.where(flux >= bright_flux, bright_noise, faint_noise)

    def observe(xy):
        inside = (
            (xy[:, 0] > -0.5) & (xy[:, 0] < WIDTH - 0.5) & (xy[:, 1] > -0.5) & (xy[:, 1] < HEIGHT - 0.5)
        )
        keep = inside & (rng.random(n_sky) > 0.1)
        pos = xy[keep] + rng.normal(0.0, 1.0, (keep.sum(), 2)) * noise[keep, None]
        obs_flux = flux[keep] * rng.lognormal(0.0, 0.1, keep.sum())
        n_fake = int(0.1 * keep.sum())
        pos = np.vstack([pos, rng.uniform([0, 0], [WIDTH - 1, HEIGHT - 1], (n_fake, 2))])
        obs_flux = np.concatenate([obs_flux, (rng.pareto(1.5, n_fake) + 1.0) * 100.0])
        order = np.argsort(-obs_flux)
        return pos[order], obs_flux[order]

    ref, ref_flux = observe(sky)
    frame, frame_flux = observe(apply_transform(invert_transform(A_true), sky))
    return frame, frame_flux, ref, ref_flux


@pytest.mark.parametrize("name", ["rot0", "rot30", "rot90", "eq_drift"])
def test_flux_weights_beat_the_unweighted_fit_on_heteroscedastic_centroids(name):
    """Bright stars at 0.02 px, faint ones at 0.4 px: the flux-weighted fit is closer to the known transform.

    Measured (3 seeds each): unweighted 0.039-0.12 px, weighted 0.013-0.043 px, ratio 0.12-0.62.
    """
    A_true = ALTAZ_AND_EQ[name]
    unweighted, weighted = [], []
    for seed in range(3):
        frame, frame_flux, ref, ref_flux = hetero_lists(A_true, seed)
        plain = register_frame(frame, ref)
        fitted = register_frame(frame, ref, frame_flux=frame_flux, ref_flux=ref_flux)
        assert plain.ok and fitted.ok
        assert fitted.attempt == plain.attempt and fitted.model == "similarity"
        unweighted.append(transform_rms_error(plain.matrix, A_true, WIDTH, HEIGHT))
        weighted.append(transform_rms_error(fitted.matrix, A_true, WIDTH, HEIGHT))
    report = f"unweighted {np.round(unweighted, 4)}, weighted {np.round(weighted, 4)}"
    assert all(w < u for w, u in zip(weighted, unweighted)), report
    assert max(weighted) <= 0.05, report
    assert np.mean(weighted) <= 0.6 * np.mean(unweighted), report


def test_equal_fluxes_give_the_unweighted_answer():
    frame, ref = star_lists(ALTAZ_AND_EQ["rot30"], seed=5)
    plain = refine_transform(frame, ref, ALTAZ_AND_EQ["rot30"])
    same = refine_transform(
        frame, ref, ALTAZ_AND_EQ["rot30"], frame_flux=np.full(len(frame), 5e3), ref_flux=np.full(len(ref), 5e3)
    )
    assert np.array_equal(plain[1], same[1]) and np.array_equal(plain[2], same[2])
    assert np.allclose(plain[0], same[0], rtol=0, atol=1e-9)
    assert plain[3] == same[3]


def test_weighted_refinement_does_not_depend_on_the_starting_guess():
    A_true = ALTAZ_AND_EQ["rot5"]
    frame, frame_flux, ref, ref_flux = hetero_lists(A_true, seed=7)
    nudged = compose(similarity(0.01, shift=(0.4, -0.3)), A_true)
    a = refine_transform(frame, ref, A_true, frame_flux=frame_flux, ref_flux=ref_flux)
    b = refine_transform(frame, ref, nudged, frame_flux=frame_flux, ref_flux=ref_flux)
    assert np.array_equal(a[0], b[0])
    assert np.array_equal(a[1], b[1]) and np.array_equal(a[2], b[2])
    again = register_frame(frame, ref, frame_flux=frame_flux, ref_flux=ref_flux)
    assert again.to_json() == register_frame(frame, ref, frame_flux=frame_flux, ref_flux=ref_flux).to_json()


def test_saturated_and_invalid_fluxes():
    A_true = ALTAZ_AND_EQ["rot30"]
    frame, frame_flux, ref, ref_flux = hetero_lists(A_true, seed=2)
    # the brightest stars saturated (inf: capped weight), a few fluxes unknown (NaN, 0: weight of the faintest)
    frame_flux, ref_flux = frame_flux.copy(), ref_flux.copy()
    frame_flux[:5] = np.inf
    ref_flux[:3] = np.inf
    frame_flux[[40, 41]] = [np.nan, 0.0]
    result = register_frame(frame, ref, frame_flux=frame_flux, ref_flux=ref_flux)
    assert result.ok and transform_rms_error(result.matrix, A_true, WIDTH, HEIGHT) <= 0.05
    # a non-finite position drops that star's flux with it
    frame[10] = np.nan
    assert register_frame(frame, ref, frame_flux=frame_flux, ref_flux=ref_flux).ok
    with pytest.raises(ValueError):
        register_frame(frame, ref, frame_flux=frame_flux)
    with pytest.raises(ValueError):
        register_frame(frame, ref, frame_flux=frame_flux[:-1], ref_flux=ref_flux)
    with pytest.raises(ValueError):
        refine_transform(frame, ref, A_true, ref_flux=ref_flux)


def test_pair_variances_recover_the_flux_model():
    rng = np.random.default_rng(3)
    n = 400
    flux_f = (rng.pareto(1.5, n) + 1.0) * 1e3
    flux_r = flux_f * rng.lognormal(0.7, 0.1, n)  # the reference is twice as bright (a cloudy frame)
    inv_f, inv_r = 1.0 / flux_f, 1.0 / flux_r
    alpha, beta, gamma = 1500.0**2, 20.0, 0.015**2
    true_var = alpha * (inv_f**2 + inv_r**2) + beta * (inv_f + inv_r) + 2 * gamma
    resid = np.linalg.norm(rng.normal(0.0, 1.0, (n, 2)) * np.sqrt(true_var)[:, None], axis=1)
    resid[:8] += 3.0  # mismatches
    var = pair_variances(resid, inv_f, inv_r)
    assert np.median(np.abs(np.log(var / true_var))) < 0.1  # measured 0.017; 5-95 % of pairs within 9 %
    # a saturated pair (0 = floor only) gets the capped variance, never zero
    assert pair_variances(np.array([0.01, 0.5, 0.3, 0.2]), np.zeros(4), np.zeros(4)).min() >= 2 * 0.01**2


def test_too_few_stars_fails_without_raising():
    frame, ref = star_lists(ALTAZ_AND_EQ["rot5"], seed=2)
    result = register_frame(frame[:3], ref)
    assert not result.ok
    assert result.matrix is None
    assert result.reason.startswith("alignment_failed: ")
    assert "too few stars" in result.reason


def test_unrelated_fields_fail_without_raising():
    frame, _ = star_lists(ALTAZ_AND_EQ["rot0"], seed=21)
    _, ref = star_lists(ALTAZ_AND_EQ["rot0"], seed=22)
    result = register_frame(frame, ref, counts=(30,))
    assert not result.ok
    assert result.reason.startswith("alignment_failed: ")
    payload = result.to_json()
    assert payload["matrix"] is None and payload["rms_px"] is None
    json.dumps(payload)


def test_degenerate_lists_fail_without_raising():
    same = np.full((20, 2), 100.0)
    result = register_frame(same, same)
    assert not result.ok and result.reason.startswith("alignment_failed: ")


def test_to_json_is_plain():
    frame, ref = star_lists(ALTAZ_AND_EQ["rot5"], seed=4)
    payload = json.loads(json.dumps(register_frame(frame, ref).to_json()))
    assert payload["ok"] is True
    assert np.asarray(payload["matrix"]).shape == (2, 3)
    assert isinstance(payload["rms_px"], float) and payload["attempt"]


def render(xy_full, flux, image_bin, shape):
    """Gaussian stars on a binned image; full-res x maps to binned (x - (bin - 1) / 2) / bin."""
    image = np.zeros(shape, dtype=np.float32)
    offset = (image_bin - 1) / 2.0
    yy, xx = np.mgrid[-6:7, -6:7]
    for (x, y), f in zip((xy_full - offset) / image_bin, flux):
        cx, cy = int(round(x)), int(round(y))
        if 6 <= cx < shape[1] - 6 and 6 <= cy < shape[0] - 6:
            stamp = np.exp(-((xx + cx - x) ** 2 + (yy + cy - y) ** 2) / (2 * 1.5**2))
            image[cy - 6 : cy + 7, cx - 6 : cx + 7] += f * stamp
    return image + np.random.default_rng(0).normal(0.0, 0.5, shape).astype(np.float32)


def test_image_attempt_when_star_lists_fail():
    A_true = similarity(12.0, shift=(20.0, -14.0))
    frame, ref = star_lists(A_true, seed=8, noise=0.0, drop=0.0, spurious=0.0)
    flux = np.linspace(400.0, 40.0, 120)
    shape = (HEIGHT // 2, WIDTH // 2)

    def images():
        return render(frame[:120], flux, 2, shape), render(ref[:120], flux, 2, shape)

    result = register_frame(frame[:3], ref[:3], images=images, image_bin=2)
    assert result.ok, result.reason
    assert result.attempt == "image"
    assert transform_rms_error(result.matrix, A_true, WIDTH, HEIGHT) <= 0.05


def test_image_callable_is_not_used_when_stars_suffice():
    frame, ref = star_lists(ALTAZ_AND_EQ["rot0"], seed=9)

    def images():
        raise AssertionError("images requested although the star lists matched")

    assert register_frame(frame, ref, images=images).ok


def test_unknown_model_is_a_config_error():
    with pytest.raises(ConfigError):
        register_frame(np.zeros((10, 2)), np.zeros((10, 2)), model="projective")


# ------------------------------------------------------------------------------ helpers


def test_fit_transform_recovers_exact_transforms():
    rng = np.random.default_rng(1)
    src = rng.uniform(0, 3000, (20, 2))
    A_sim = similarity(33.0, shift=(5.0, 7.0), factor=1.001)
    A_aff = np.array([[1.001, 0.002, 4.0], [-0.003, 0.998, -2.0]])
    assert np.allclose(fit_transform(src, apply_transform(A_sim, src), "similarity"), A_sim, atol=1e-9)
    assert np.allclose(fit_transform(src, apply_transform(A_aff, src), "affine"), A_aff, atol=1e-9)
    assert select_model(src, apply_transform(A_aff, src) + rng.normal(0, 0.05, (20, 2))) == "affine"
    # weighted: still exact, and a pair with a negligible weight does not pull the fit
    weights = rng.uniform(0.1, 10.0, 20)
    for model, A in (("similarity", A_sim), ("affine", A_aff)):
        dst = apply_transform(A, src)
        assert np.allclose(fit_transform(src, dst, model, weights=weights), A, atol=1e-9)
        dst[0] += 5.0
        weights[0] = 1e-12
        assert np.allclose(fit_transform(src, dst, model, weights=weights), A, atol=1e-6)
        assert not np.allclose(fit_transform(src, dst, model), A, atol=1e-3)
        weights[0] = 1.0


def test_invert_compose_apply_round_trip():
    rng = np.random.default_rng(2)
    A = np.array([[0.99, -0.12, 31.5], [0.13, 1.01, -7.25]])
    B = similarity(-47.0, shift=(100.0, 50.0))
    xy = rng.uniform(0, 4000, (50, 2))
    assert np.allclose(apply_transform(invert_transform(A), apply_transform(A, xy)), xy, atol=1e-9)
    assert np.allclose(apply_transform(compose(A, B), xy), apply_transform(A, apply_transform(B, xy)), atol=1e-9)
    assert np.allclose(compose(A, invert_transform(A)), [[1, 0, 0], [0, 1, 0]], atol=1e-12)
    assert apply_transform(A, xy[0]).shape == (2,)


def test_rotation_and_scale():
    assert rotation_deg(similarity(30.0)) == pytest.approx(30.0)
    assert rotation_deg(similarity(-170.0)) == pytest.approx(-170.0)
    assert rotation_deg(similarity(180.0)) == pytest.approx(180.0)
    assert scale(similarity(10.0, factor=1.02)) == pytest.approx(1.02)
    # +x turns towards +y: (1, 0) goes to (0, 1) for +90 degrees
    assert np.allclose(apply_transform(similarity(90.0, centre=(0, 0)), [1.0, 0.0]), [0.0, 1.0])


def test_transform_rms_error():
    A = similarity(3.0)
    assert transform_rms_error(A, A, WIDTH, HEIGHT) == 0.0
    shifted = A + np.array([[0, 0, 0.03], [0, 0, 0.04]])
    assert transform_rms_error(shifted, A, WIDTH, HEIGHT) == pytest.approx(0.05)


def test_cv2_warp_puts_the_star_where_apply_transform_says():
    shape = (240, 320)
    A = similarity(17.0, centre=(160.0, 120.0), shift=(6.3, -4.7))
    star = np.array([140.3, 101.6])
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    frame = np.exp(-((xx - star[0]) ** 2 + (yy - star[1]) ** 2) / (2 * 2.0**2)).astype(np.float64)
    warped = cv2.warpAffine(
        frame, to_cv2_warp_matrix(A), (shape[1], shape[0]), flags=cv2.INTER_CUBIC | cv2.WARP_INVERSE_MAP
    )
    expected = apply_transform(A, star)
    window = (np.abs(xx - expected[0]) < 10) & (np.abs(yy - expected[1]) < 10)
    weights = np.where(window, warped, 0.0)
    centroid = np.array([(weights * xx).sum(), (weights * yy).sum()]) / weights.sum()
    assert np.allclose(centroid, expected, atol=0.02)


def test_even_pixel_shift():
    A = np.array([[1.0, 0.0, 5.2], [0.0, 1.0, -3.9]])
    assert even_pixel_shift(A) == (6, -4)
    small_rotation = similarity(0.05, centre=(WIDTH / 2, HEIGHT / 2), shift=(10.9, 0.2))
    centre = ((WIDTH - 1) / 2, (HEIGHT - 1) / 2)
    assert even_pixel_shift(small_rotation, centre) == (10, 0)
    assert even_pixel_shift(small_rotation) != (10, 0)


# ------------------------------------------------------------------------------ session choices


def test_choose_reference():
    assert choose_reference([1.0, 3.0, 2.0, 3.0]) == 1
    assert choose_reference([float("nan"), 2.0, 5.0], "best") == 2
    assert choose_reference([float("nan"), 2.0, 5.0], "first") == 1
    with pytest.raises(SessionError):
        choose_reference([float("nan")])
    with pytest.raises(ConfigError):
        choose_reference([1.0], "median")


def test_choose_align_mode():
    assert choose_align_mode([0.0, 0.02, -0.03], "auto") == ("integer", pytest.approx(0.05))
    mode, spread = choose_align_mode([0.0, 0.3, -1.2])
    assert mode == "rgb_affine" and spread == pytest.approx(1.5)
    mode, spread = choose_align_mode([179.97, -179.98, 180.0])
    assert mode == "integer" and spread == pytest.approx(0.05)
    assert choose_align_mode([0.0, 5.0], "integer") == ("integer", pytest.approx(5.0))
    assert choose_align_mode([0.0], "rgb_affine") == ("rgb_affine", 0.0)
    assert choose_align_mode([0.0, 0.1])[0] == "rgb_affine"
    with pytest.raises(ConfigError):
        choose_align_mode([0.0], "nearest")


def test_rotation_range_wraps_and_ignores_failures():
    assert rotation_range_deg([170.0, -170.0, float("nan")]) == pytest.approx(20.0)
    assert rotation_range_deg([-90.0, 0.0, 90.0]) == pytest.approx(180.0)
    assert rotation_range_deg([]) == 0.0
