"""Warps: OpenCV agreement, star positions, exactness, tiling independence, masks, feather, Bayer planes."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

import dwarf3gpu.warp as warp_module
from dwarf3gpu.debayer import debayer_bilinear
from dwarf3gpu.geometry import apply_transform, bayer_offsets, even_pixel_shift, plane_transform, to_cv2_warp_matrix
from dwarf3gpu.warp import source_window, warp_affine, warp_bayer_planes, window_margin

METHODS = ("bilinear", "bicubic")
#: Parametrisation values (collection time; the ``bayer_patterns`` fixture holds the same four layouts).
PATTERNS = ("RGGB", "GRBG", "GBRG", "BGGR")


@pytest.fixture(scope="module")
def scene(waves):
    """Sampled smooth scene.

    Returns
    -------
    callable
        ``scene(h, w, phase=0.0) -> ndarray``: ``waves`` at the pixel centres of an (h, w) grid, float32.
    """

    def sample(h: int, w: int, phase: float = 0.0) -> np.ndarray:
        y, x = np.mgrid[0:h, 0:w].astype(np.float64)
        return waves(x, y, phase).astype(np.float32)

    return sample


def shifted_by(image: np.ndarray, dx: int, dy: int, out_shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Plain whole-pixel shift, pixel by pixel: ``out[..., y + dy, x + dx] = image[..., y, x]``; ``valid`` where a
    frame pixel landed (the expected result of an integer translation)."""
    h, w = image.shape[-2:]
    ys, xs = np.mgrid[0:h, 0:w]
    ty, tx = ys + dy, xs + dx
    ok = (ty >= 0) & (ty < out_shape[0]) & (tx >= 0) & (tx < out_shape[1])
    out = np.zeros(image.shape[:-2] + tuple(out_shape), image.dtype)
    valid = np.zeros(out_shape, bool)
    out[..., ty[ok], tx[ok]] = image[..., ys[ok], xs[ok]]
    valid[ty[ok], tx[ok]] = True
    return out, valid


def eroded(mask: np.ndarray, pixels: int) -> np.ndarray:
    kernel = np.ones((2 * pixels + 1, 2 * pixels + 1), np.uint8)
    return cv2.erode(mask.astype(np.uint8), kernel, borderValue=0).astype(bool)


# --------------------------------------------------------------------------- warp_affine


@pytest.mark.parametrize("method, flag", [("bilinear", cv2.INTER_LINEAR), ("bicubic", cv2.INTER_CUBIC)])
def test_matches_opencv(method, flag, monkeypatch, rigid, scene):
    """cv2.warpAffine with to_cv2_warp_matrix: same geometry; OpenCV's cubic is Keys with a = -0.75.

    Tolerance: OpenCV may quantise source coordinates to 1/32 px (INTER_BITS = 5), an error of
    at most |grad| / 32 for this scene (max gradient 1665 ADU/px -> 52 ADU); measured here
    (OpenCV 5.0) 0.03 ADU bilinear and 0.05 ADU bicubic on values of 10000-30000.
    """
    image = scene(200, 240)
    gy, gx = np.gradient(image.astype(np.float64))
    tolerance = np.hypot(gx, gy).max() / 32
    A = rigid(17.0, 7.31, -12.77, centre=(120, 100))
    monkeypatch.setattr(warp_module, "KEYS_A", -0.75)
    ours, valid, _ = warp_affine(image, A, (200, 240), method=method)
    theirs = cv2.warpAffine(image, to_cv2_warp_matrix(A), (240, 200), flags=flag | cv2.WARP_INVERSE_MAP)
    inside = eroded(valid, 3)
    assert inside.sum() > 0.5 * inside.size
    assert np.abs(ours - theirs)[inside].max() <= tolerance


def test_bicubic_beats_bilinear_on_smooth_scene(inverse_coords, rigid, scene, waves):
    """Against the analytic scene: Keys a = -0.5 is third-order accurate, bilinear second."""
    image = scene(200, 240, phase=0.4)
    A = rigid(-31.0, 3.37, 5.91, centre=(120, 100))
    xs, ys = inverse_coords(A, (200, 240))
    truth = waves(xs, ys, phase=0.4)
    errors = {}
    for method in METHODS:
        warped, valid, _ = warp_affine(image, A, (200, 240), method=method)
        errors[method] = np.abs(warped - truth)[valid].max()
    # measured: bilinear 47 ADU, bicubic 0.75 ADU (amplitude 20000 ADU, periods >= 37 px)
    assert errors["bicubic"] < 0.05 * errors["bilinear"]
    assert errors["bicubic"] < 2.0


@pytest.mark.parametrize("method", METHODS)
def test_gaussian_star_lands_where_apply_transform_says(method, rigid):
    h, w, sigma = 160, 200, 1.6
    star = np.array([83.37, 71.81])
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    image = (1e4 * np.exp(-((x - star[0]) ** 2 + (y - star[1]) ** 2) / (2 * sigma**2))).astype(np.float32)
    for A in (rigid(23.0, 4.63, -7.29, centre=(100, 80)), rigid(-101.0, 0.5, 0.25, centre=(100, 80))):
        warped, _, _ = warp_affine(image, A, (h, w), method=method)
        expected = apply_transform(A, star)
        window = (np.hypot(x - expected[0], y - expected[1]) < 12) * warped
        centroid = np.array([(window * x).sum(), (window * y).sum()]) / window.sum()
        assert np.abs(centroid - expected).max() < 0.01, (method, centroid - expected)


@pytest.mark.parametrize("method", METHODS)
def test_identity_and_integer_translation_are_exact(method):
    image = np.random.default_rng(0).random((3, 40, 50), dtype=np.float32) * 1000
    edge = 0 if method == "bilinear" else 1
    out, valid, weight = warp_affine(image, np.eye(2, 3), (40, 50), method=method)
    inner = (slice(edge, 40 - edge), slice(edge, 50 - edge))
    assert np.array_equal(out[(slice(None),) + inner], image[(slice(None),) + inner])
    assert valid[inner].all() and valid.sum() == valid[inner].size
    assert np.array_equal(weight, valid.astype(np.float32))
    dx, dy = 7, -4
    A = np.array([[1.0, 0.0, dx], [0.0, 1.0, dy]])
    out, valid, _ = warp_affine(image, A, (40, 50), method=method)
    shifted, shifted_valid = shifted_by(image, dx, dy, (40, 50))
    if method == "bilinear":
        assert np.array_equal(valid, shifted_valid)
    assert np.array_equal(out[:, valid], shifted[:, valid])
    assert np.all(out[:, ~valid] == 0)


@pytest.mark.parametrize("method", METHODS)
def test_tiling_and_bands_do_not_change_a_bit(method, monkeypatch, rigid, tiles):
    frame = np.random.default_rng(1).random((2, 90, 110), dtype=np.float32) * 5000
    A = rigid(13.0, 6.71, -3.19, centre=(55, 45))
    out_shape = (84, 120)
    full = warp_affine(frame, A, out_shape, method=method, feather_px=9.5)
    monkeypatch.setattr(warp_module, "CHUNK_PIXELS", 50)  # several row chunks per tile as well
    for tile_size in [(17, 23), (84, 1), (5, 120), (40, 61)]:
        result = [np.zeros_like(a) for a in full]
        for origin, shape in tiles(out_shape, tile_size):
            row0, row1, col0, col1 = source_window(A, shape, origin, (90, 110), window_margin(method))
            assert row0 % 2 == 0 and col0 % 2 == 0
            part = warp_affine(
                frame[:, row0:row1, col0:col1], A, shape, out_origin=origin, src_origin=(row0, col0),
                method=method, feather_px=9.5, src_size=(90, 110),
            )
            box = (slice(origin[0], origin[0] + shape[0]), slice(origin[1], origin[1] + shape[1]))
            result[0][(slice(None),) + box] = part[0]
            result[1][box], result[2][box] = part[1], part[2]
        for got, expected in zip(result, full):
            assert np.array_equal(got, expected), tile_size


def test_band_missing_taps_raises(rigid):
    frame = np.ones((60, 80), np.float32)
    A = rigid(5.0, 1.5, 2.5)
    with pytest.raises(ValueError, match="lacks the taps"):
        warp_affine(frame[10:30], A, (60, 80), src_origin=(10, 0), src_size=(60, 80))
    with pytest.raises(ValueError, match="src_size"):
        warp_affine(frame[10:30], A, (60, 80), src_origin=(10, 0))
    with pytest.raises(ValueError, match="does not fit"):
        warp_affine(frame[10:30], A, (60, 80), src_origin=(50, 0), src_size=(60, 80))
    with pytest.raises(ValueError, match="method"):
        warp_affine(frame, A, (60, 80), method="lanczos")


@pytest.mark.parametrize("method, first, last", [("bilinear", 0, 0), ("bicubic", 1, 1)])
def test_valid_mask_at_edges(method, first, last):
    """Translation by (2.5, -1.25): xs = X - 2.5, ys = Y + 1.25 must lie in [first, size - 1 - last]."""
    h, w = 30, 40
    image = np.full((h, w), 7.0, np.float32)
    A = np.array([[1.0, 0.0, 2.5], [0.0, 1.0, -1.25]])
    out, valid, _ = warp_affine(image, A, (h + 4, w + 4), method=method)
    Y, X = np.mgrid[0 : h + 4, 0 : w + 4]
    xs, ys = X - 2.5, Y + 1.25
    expected = (xs >= first) & (xs <= w - 1 - last) & (ys >= first) & (ys <= h - 1 - last)
    assert np.array_equal(valid, expected)
    assert np.all(out[valid] == 7.0) and np.all(out[~valid] == 0.0)


def test_feather_weight_is_analytic():
    h, w, feather = 30, 40, 6.0
    A = np.array([[1.0, 0.0, -0.75], [0.0, 1.0, 3.5]])
    _, valid, weight = warp_affine(np.ones((h, w), np.float32), A, (h, w), feather_px=feather)
    Y, X = np.mgrid[0:h, 0:w].astype(np.float64)
    xs, ys = X + 0.75, Y - 3.5
    d = np.minimum.reduce([xs + 0.5, w - 0.5 - xs, ys + 0.5, h - 0.5 - ys])
    expected = np.where(valid, np.clip(d / feather, 0, 1), 0.0)
    assert np.abs(weight - expected).max() < 1e-7
    assert weight[15, 20] == 1.0 and weight[0, 20] == 0.0  # row 0 maps to ys = -3.5: outside
    assert weight[4, 20] == pytest.approx(1.0 / feather)  # ys = 0.5: 1 px from the top edge


def test_source_window_values():
    A = np.array([[1.0, 0.0, 10.0], [0.0, 1.0, -5.0]])  # xs = X - 10, ys = Y + 5
    assert source_window(A, (10, 20), (3, 17), (100, 200), 0) == (8, 19, 6, 28)
    assert source_window(A, (10, 20), (3, 17), (100, 200), 1) == (6, 20, 6, 29)
    assert source_window(A, (10, 20), (0, 0), (100, 200), 0) == (4, 16, 0, 11)
    row0, row1, col0, col1 = source_window(A, (10, 20), (500, 500), (100, 200), 0)
    assert row0 == row1 or col0 == col1  # entirely outside: empty band


# --------------------------------------------------------------------------- integer shifts


@pytest.mark.parametrize("method", METHODS)
def test_even_pixel_shift_through_the_warp_moves_pixels_unchanged(method):
    """Integer alignment is the even translation of even_pixel_shift through the normal warp: a pixel moves to
    ``(x + dx, y + dy)`` with its value unchanged, and frames with a channel axis move the same way."""
    frame = np.zeros((40, 60), np.float32)
    frame[11, 23] = 1000
    A = np.array([[1.0, 0.0, 4.1], [0.0, 1.0, -5.9]])
    dx, dy = even_pixel_shift(A)
    assert (dx, dy) == (4, -6)
    shifted, valid, _ = warp_affine(frame, np.array([[1.0, 0.0, dx], [0.0, 1.0, dy]]), (40, 60), method=method)
    y, x = np.argwhere(shifted == 1000)[0]
    assert np.abs(np.array([x, y]) - apply_transform(A, [23, 11])).max() < 1.0
    assert shifted[11 + dy, 23 + dx] == 1000 and np.count_nonzero(shifted) == 1
    if method == "bilinear":
        assert valid.sum() == (60 - 4) * (40 - 6) and not valid[:, :4].any() and not valid[-6:].any()
    cube, cube_valid, _ = warp_affine(np.stack([frame, 2 * frame]), np.array([[1.0, 0.0, -2], [0.0, 1.0, 2]]),
                                      (30, 70), method=method)
    assert cube.shape == (2, 30, 70) and cube[1, 13, 21] == 2000 and cube_valid[13, 21]


# --------------------------------------------------------------------------- Bayer planes


def test_plane_transform(rigid):
    A = rigid(41.0, 3.3, -7.7, centre=(50, 40))
    points = np.array([[0.0, 0.0], [13.0, 7.0], [-2.5, 30.25]])
    for r, c in [(0, 0), (0, 1), (1, 0), (1, 1)]:
        offset = np.array([c, r], dtype=np.float64)
        expected = (apply_transform(A, 2 * points + offset) - offset) / 2
        assert np.allclose(apply_transform(plane_transform(A, (r, c)), points), expected, atol=1e-12)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("method", METHODS)
def test_bayer_even_translation_is_a_plain_shift(pattern, method):
    mosaic = np.random.default_rng(2).integers(0, 65536, (36, 48)).astype(np.uint16)
    dx, dy = 6, -4
    A = np.array([[1.0, 0.0, dx], [0.0, 1.0, dy]])
    warped, valid, weight = warp_bayer_planes(mosaic, pattern, A, (36, 48), method=method)
    shifted, shifted_valid = shifted_by(mosaic, dx, dy, (36, 48))
    if method == "bilinear":
        assert np.array_equal(valid, shifted_valid)
    assert valid.any() and np.all(shifted_valid[valid])
    assert np.array_equal(warped[valid], shifted[valid].astype(np.float32))
    assert np.all(warped[~valid] == 0) and np.array_equal(weight, valid.astype(np.float32))


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("method", METHODS)
def test_bayer_warp_keeps_uniform_colours_exactly(pattern, method, rigid):
    colour = {"R": 1234.0, "G": 40321.0, "B": 777.0}
    frame = np.zeros((50, 64), np.float32)
    expected_frame = np.zeros((41, 57), np.float32)
    out_origin = (3, 5)
    for name, sites in bayer_offsets(pattern).items():
        for r, c in sites:
            frame[r::2, c::2] = colour[name]
            expected_frame[(r - out_origin[0]) % 2 :: 2, (c - out_origin[1]) % 2 :: 2] = colour[name]
    A = rigid(23.7, 1.37, -2.91, centre=(32, 25))
    warped, valid, _ = warp_bayer_planes(frame, pattern, A, (41, 57), out_origin=out_origin, method=method)
    assert valid.sum() > 0.5 * valid.size
    assert np.array_equal(warped[valid], expected_frame[valid])


@pytest.mark.parametrize("method", METHODS)
def test_bayer_tiling_and_odd_bands_do_not_change_a_bit(method, rigid, tiles):
    mosaic = np.random.default_rng(6).integers(0, 65536, (70, 90)).astype(np.uint16)
    A = rigid(-8.0, 2.21, 1.63, centre=(45, 35))
    full = warp_bayer_planes(mosaic, "GRBG", A, (66, 96), method=method, feather_px=7.0)
    margin = window_margin(method, bayer_planes=True)
    result = [np.zeros_like(a) for a in full]
    for origin, shape in tiles((66, 96), (23, 29)):
        row0, row1, col0, col1 = source_window(A, shape, origin, (70, 90), margin)
        row0 = max(row0 - 1, 0)  # odd band starts: the Bayer phase must come from src_origin
        part = warp_bayer_planes(
            mosaic[row0:row1, col0:col1], "GRBG", A, shape, out_origin=origin, src_origin=(row0, col0),
            src_size=(70, 90), method=method, feather_px=7.0,
        )
        box = (slice(origin[0], origin[0] + shape[0]), slice(origin[1], origin[1] + shape[1]))
        for target, piece in zip(result, part):
            target[box] = piece
    for got, expected in zip(result, full):
        assert np.array_equal(got, expected)


@pytest.mark.parametrize("pattern", ["RGGB", "BGGR"])
def test_bayer_rotation_agrees_with_debayered_warp(pattern, inverse_coords, mosaic_of, rigid, waves):
    """Rotate a smooth scene's mosaic as planes, and as debayered channels; compare with the truth.

    The plane warp interpolates on each colour's own lattice (2 px spacing), the
    debayer-then-warp path interpolates twice (debayer, then warp). Measured maximum errors
    against the analytic truth, amplitude 20000 ADU: planes 166 ADU, debayered channels
    144-152 ADU, planes vs channels 130 ADU (bilinear); bicubic planes 5.3 ADU.
    """
    h, w = 120, 150
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    phases = (0.0, 0.9, 2.1)
    rgb = np.stack([waves(x, y, p) for p in phases]).astype(np.float32)
    mosaic = mosaic_of(rgb, pattern)
    A = rigid(37.0, 2.3, -1.7, centre=(75, 60))
    planes, valid, _ = warp_bayer_planes(mosaic, pattern, A, (h, w))
    cubic, cubic_valid, _ = warp_bayer_planes(mosaic, pattern, A, (h, w), method="bicubic")
    channels, channels_valid, _ = warp_affine(debayer_bilinear(mosaic, pattern), A, (h, w))
    via_rgb = mosaic_of(channels, pattern)
    xs, ys = inverse_coords(A, (h, w))
    truth = mosaic_of(np.stack([waves(xs, ys, p) for p in phases]), pattern)
    inside = eroded(valid & channels_valid & cubic_valid, 2)
    assert inside.sum() > 0.4 * inside.size
    assert np.abs(planes - truth)[inside].max() < 250.0
    assert np.abs(via_rgb - truth)[inside].max() < 250.0
    assert np.abs(planes - via_rgb)[inside].max() < 250.0
    assert np.abs(cubic - truth)[inside].max() < 20.0
