"""Lattice resampling (``warp_lattice``): every colour straight from its own CFA lattice with Lanczos weights.

Checked against a per-pixel brute-force reference (explicit tap loops in float64), for exactness (uniform colours,
integer shifts), accuracy on a smooth scene, star positions per channel, tiling and band independence, masks,
the source-window margin, and the sharpness it exists for (an undersampled star stacked from rotated frames).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import dwarf3gpu.warp as warp_module
from dwarf3gpu.debayer import debayer_bilinear
from dwarf3gpu.geometry import apply_transform, bayer_offsets, invert_transform
from dwarf3gpu.warp import (
    LANCZOS_PHASES,
    LATTICE_LOBES,
    LATTICE_MARGIN,
    lanczos_table,
    lattice_chroma_planes,
    lattice_layout,
    lattice_planes,
    source_window,
    warp_affine,
    warp_lattice,
    warp_lattice_chroma,
)

#: Parametrisation values (collection time; the ``bayer_patterns`` fixture holds the same four layouts).
PATTERNS = ("RGGB", "GRBG", "GBRG", "BGGR")


def brute_force(mosaic: np.ndarray, pattern: str, A: np.ndarray, out_shape, out_origin=(0, 0)):
    """Per-pixel reference: for each output pixel and colour, loop over the kernel's taps by their PIXEL positions
    (float64 sums of table weight x sample); valid where every tap lies in the frame."""
    h, w = mosaic.shape
    B = invert_transform(A)
    offsets = bayer_offsets(pattern)
    (rr, rc), (br, bc) = offsets["R"][0], offsets["B"][0]
    g = (rr + rc + 1) % 2
    out = np.zeros((3,) + tuple(out_shape))
    valid = np.zeros(out_shape, bool)
    P = LANCZOS_PHASES
    tables = {lobes: lanczos_table(lobes).astype(np.float64) for lobes in set(LATTICE_LOBES.values())}

    def split(coord):
        q = math.floor(coord * P + 0.5)
        return q // P, q % P

    for i in range(out_shape[0]):
        for j in range(out_shape[1]):
            X, Y = out_origin[1] + j, out_origin[0] + i
            xs = B[0, 0] * X + (B[0, 1] * Y + B[0, 2])
            ys = B[1, 0] * X + (B[1, 1] * Y + B[1, 2])
            ok, values = True, []
            lattices = [  # (lobes, coordinate a, coordinate b, pixel of lattice point (a, b))
                (LATTICE_LOBES["RB"], (xs - rc) * 0.5, (ys - rr) * 0.5, lambda a, b: (2 * a + rc, 2 * b + rr)),
                (LATTICE_LOBES["G"], ((xs - ys) - g) * 0.5, ((xs + ys) - g) * 0.5, lambda a, b: (b + a + g, b - a)),
                (LATTICE_LOBES["RB"], (xs - bc) * 0.5, (ys - br) * 0.5, lambda a, b: (2 * a + bc, 2 * b + br)),
            ]
            for lobes, ca, cb, pixel in lattices:
                table = tables[lobes]
                (a0, pa), (b0, pb) = split(ca), split(cb)
                total = 0.0
                for kb in range(2 * lobes):
                    for ka in range(2 * lobes):
                        x, y = pixel(a0 - lobes + 1 + ka, b0 - lobes + 1 + kb)
                        if not (0 <= x < w and 0 <= y < h):
                            ok = False
                            continue
                        total += table[pa, ka] * table[pb, kb] * float(mosaic[y, x])
                values.append(total)
            if ok:
                out[:, i, j] = values
                valid[i, j] = True
    return out, valid


def test_lanczos_table():
    for lobes in (3, 5):
        table = lanczos_table(lobes)
        assert table.shape == (LANCZOS_PHASES, 2 * lobes) and table.dtype == np.float32
        assert np.array_equal(table[0], (np.arange(2 * lobes) == lobes - 1).astype(np.float32))
        np.testing.assert_allclose(table.astype(np.float64).sum(axis=1), 1.0, atol=1e-6)
        # symmetry: the weight of tap k at phase t is the weight of tap 1 - k at phase 1 - t
        np.testing.assert_allclose(table[1:], table[:0:-1, ::-1], atol=1e-7)
        t = 0.3125  # an exact phase
        d = np.arange(-(lobes - 1), lobes + 1) - t
        expected = np.sinc(d) * np.sinc(d / lobes)
        np.testing.assert_allclose(table[int(t * LANCZOS_PHASES)], expected / expected.sum(), rtol=1e-6)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_matches_brute_force_reference(pattern, rigid):
    mosaic = np.random.default_rng(3).integers(0, 65536, (44, 52)).astype(np.float32)
    A = rigid(-31.0, 3.1, -2.7, centre=(26, 22))
    rgb, valid, weight = warp_lattice(mosaic, pattern, A, (40, 48), out_origin=(3, 1))
    ref, ref_valid = brute_force(mosaic, pattern, A, (40, 48), out_origin=(3, 1))
    assert np.array_equal(valid, ref_valid) and valid.sum() > 100
    np.testing.assert_allclose(rgb[:, valid], ref[:, valid], rtol=0, atol=0.05)  # float32 sums of ~1e5 values
    assert np.all(rgb[:, ~valid] == 0) and np.array_equal(weight, valid.astype(np.float32))


@pytest.mark.parametrize("pattern", ["RGGB", "GBRG"])
def test_lattice_planes_hold_every_pixel_where_the_layout_says(pattern):
    band = np.arange(1, 11 * 8 + 1, dtype=np.float32).reshape(11, 8)
    for origin in [(0, 0), (3, 0), (4, 7), (-1, 2)]:  # a negative origin only exercises the floor arithmetic
        L = lattice_layout(band.shape, origin, pattern)
        red, blue, green = lattice_planes(band, origin, pattern)
        assert red.shape == (L.rows[0], L.cols[0]) and blue.shape == (L.rows[1], L.cols[1])
        (rr, rc), (br, bc) = bayer_offsets(pattern)["R"][0], bayer_offsets(pattern)["B"][0]
        seen = 0
        for y in range(band.shape[0]):
            for x in range(band.shape[1]):
                Y, X = y + origin[0], x + origin[1]
                for s, (r, c), plane in ((0, (rr, rc), red), (1, (br, bc), blue)):
                    if Y % 2 == r and X % 2 == c:  # lattice point (j, i) = ((X - c) / 2, (Y - r) / 2)
                        assert plane[(Y - r) // 2 - L.iy0[s], (X - c) // 2 - L.jx0[s]] == band[y, x]
                        seen += 1
                if (X + Y) % 2 == L.g:  # (U, V) with X = U + V + g, Y = U - V
                    U, V = (X + Y - L.g) // 2, (X - Y - L.g) // 2
                    assert green[U - L.u_lo, V - L.v_lo] == band[y, x]
                    seen += 1
        assert seen == band.size
        assert np.count_nonzero(green) == np.count_nonzero((np.add.outer(np.arange(11) + origin[0],
                                                                          np.arange(8) + origin[1]) % 2) == L.g)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_uniform_colours_and_integer_shifts_are_exact(pattern, rigid):
    colour = {"R": 1234.0, "G": 40321.0, "B": 777.0}
    frame = np.zeros((60, 70), np.float32)
    for name, sites in bayer_offsets(pattern).items():
        for r, c in sites:
            frame[r::2, c::2] = colour[name]
    rgb, valid, _ = warp_lattice(frame, pattern, rigid(23.7, 1.37, -2.91, centre=(35, 30)), (60, 70), out_origin=(1, 3))
    assert valid.sum() > 0.3 * valid.size
    for k, name in enumerate("RGB"):
        assert np.all(rgb[k][valid] == colour[name])
    # any whole-pixel translation (odd ones too): every colour keeps its samples exactly at its own sites
    mosaic = np.random.default_rng(4).integers(0, 65536, (50, 60)).astype(np.float32)
    for dx, dy in [(0, 0), (3, -2), (-5, 7)]:
        rgb, valid, _ = warp_lattice(mosaic, pattern, np.array([[1.0, 0, dx], [0, 1.0, dy]]), (50, 60))
        assert valid.sum() > 100
        Y, X = np.nonzero(valid)
        ys, xs = Y - dy, X - dx
        for k, name in enumerate("RGB"):
            own = np.zeros(len(Y), bool)
            for r, c in bayer_offsets(pattern)[name]:
                own |= (ys % 2 == r) & (xs % 2 == c)
            assert np.array_equal(rgb[k][Y[own], X[own]], mosaic[ys[own], xs[own]])


def test_smooth_scene_accuracy(inverse_coords, mosaic_of, rigid, waves):
    """Rotating a smooth scene's mosaic by 37 degrees: max errors against the analytic truth (amplitude 20000 ADU,
    periods >= 37 px) measured 25 ADU in G and 52 ADU in R/B (Lanczos' passband ripple, ~0.1-0.2 %, not the
    phase rounding: <= 1 ADU here), against 152 ADU for bilinear debayer + bilinear warp (Keys' bicubic on the
    Bayer planes, exact for quadratics, gets 5.3 ADU on this low-frequency scene but blurs stars: METHODS.md)."""
    h, w = 120, 150
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    phases = (0.0, 0.9, 2.1)
    mosaic = mosaic_of(np.stack([waves(x, y, p) for p in phases]).astype(np.float32), "RGGB")
    A = rigid(37.0, 2.3, -1.7, centre=(75, 60))
    rgb, valid, _ = warp_lattice(mosaic, "RGGB", A, (h, w))
    xs, ys = inverse_coords(A, (h, w))
    truth = np.stack([waves(xs, ys, p) for p in phases])
    assert valid.sum() > 0.4 * valid.size
    err = np.abs(rgb - truth)[:, valid].max(axis=1)
    assert err[1] < 35.0 and err[0] < 70.0 and err[2] < 70.0, err
    two_step, two_valid, _ = warp_affine(debayer_bilinear(mosaic, "RGGB"), A, (h, w))
    assert np.abs(two_step - truth)[:, valid & two_valid].max() > 2 * err.max()


def test_star_lands_where_apply_transform_says_in_every_channel(mosaic_of, rigid):
    """A Gaussian star (sigma 1.6 px) on the mosaic, rotated: each channel's centroid within 0.02 px of
    apply_transform (the red/blue lattices sample it every 2 px, so their aliasing is the larger error)."""
    h, w, sigma = 160, 200, 1.6
    star = np.array([83.37, 71.81])
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    image = 1e4 * np.exp(-((x - star[0]) ** 2 + (y - star[1]) ** 2) / (2 * sigma**2))
    mosaic = mosaic_of(np.stack([image] * 3).astype(np.float32), "GBRG")
    for A in (rigid(23.0, 4.63, -7.29, centre=(100, 80)), rigid(-101.0, 0.5, 0.25, centre=(100, 80))):
        rgb, _, _ = warp_lattice(mosaic, "GBRG", A, (h, w))
        expected = apply_transform(A, star)
        for k in range(3):
            window = (np.hypot(x - expected[0], y - expected[1]) < 12) * rgb[k]
            centroid = np.array([(window * x).sum(), (window * y).sum()]) / window.sum()
            assert np.abs(centroid - expected).max() < 0.02, (k, centroid - expected)


def test_tiling_odd_bands_and_chunks_do_not_change_a_bit(monkeypatch, rigid, tiles):
    mosaic = np.random.default_rng(6).integers(0, 65536, (70, 90)).astype(np.uint16)
    A = rigid(-8.0, 2.21, 1.63, centre=(45, 35))
    full = warp_lattice(mosaic, "GRBG", A, (66, 96), feather_px=7.0)
    monkeypatch.setattr(warp_module, "CHUNK_PIXELS", 50)
    result = [np.zeros_like(a) for a in full]
    for origin, shape in tiles((66, 96), (23, 29)):
        row0, row1, col0, col1 = source_window(A, shape, origin, (70, 90), LATTICE_MARGIN)
        row0, col0 = max(row0 - 1, 0), max(col0 - 1, 0)  # odd band starts: the Bayer phase comes from src_origin
        part = warp_lattice(mosaic[row0:row1, col0:col1], "GRBG", A, shape, out_origin=origin,
                            src_origin=(row0, col0), src_size=(70, 90), feather_px=7.0)
        box = (slice(origin[0], origin[0] + shape[0]), slice(origin[1], origin[1] + shape[1]))
        result[0][(slice(None),) + box] = part[0]
        result[1][box], result[2][box] = part[1], part[2]
    for got, expected in zip(result, full):
        assert np.array_equal(got, expected)
    assert full[1].sum() > 0.5 * full[1].size


def test_source_window_margin_covers_every_tap(rigid):
    """Fuzz: tiles and transforms at random; a band cut with LATTICE_MARGIN never lacks a tap."""
    rng = np.random.default_rng(9)
    size = (61, 75)
    mosaic = rng.integers(0, 65536, size).astype(np.float32)
    for _ in range(300):
        A = rigid(rng.uniform(-180, 180), *rng.uniform(-6, 6, 2), centre=(37, 30))
        A[:, :2] *= rng.uniform(0.97, 1.03)
        shape = tuple(int(v) for v in rng.integers(1, 30, 2))
        origin = tuple(int(v) for v in rng.integers(-5, 50, 2))
        row0, row1, col0, col1 = source_window(A, shape, origin, size, LATTICE_MARGIN)
        if row1 <= row0 or col1 <= col0:
            continue
        warp_lattice(mosaic[row0:row1, col0:col1], "BGGR", A, shape, out_origin=origin, src_origin=(row0, col0),
                     src_size=size)


def test_errors_and_feather(rigid):
    mosaic = np.ones((60, 80), np.float32)
    A = rigid(5.0, 1.5, 2.5)
    with pytest.raises(ValueError, match="lacks the taps"):
        warp_lattice(mosaic[10:40], "RGGB", A, (60, 80), src_origin=(10, 0), src_size=(60, 80))
    with pytest.raises(ValueError, match="src_size"):
        warp_lattice(mosaic[10:40], "RGGB", A, (60, 80), src_origin=(10, 0))
    with pytest.raises(ValueError, match="pattern"):
        warp_lattice(mosaic, "RGBG", A, (60, 80))
    with pytest.raises(ValueError, match="feather"):
        warp_lattice(mosaic, "RGGB", A, (60, 80), feather_px=-1.0)
    with pytest.raises(ValueError, match="2-D"):
        warp_lattice(np.ones((3, 20, 20), np.float32), "RGGB", A, (20, 20))
    h, w, feather = 60, 80, 15.0
    T = np.array([[1.0, 0.0, -0.75], [0.0, 1.0, 3.5]])
    _, valid, weight = warp_lattice(mosaic, "RGGB", T, (h, w), feather_px=feather)
    Y, X = np.mgrid[0:h, 0:w].astype(np.float64)
    xs, ys = X + 0.75, Y - 3.5
    d = np.minimum.reduce([xs + 0.5, w - 0.5 - xs, ys + 0.5, h - 0.5 - ys])
    assert valid.any() and np.abs(weight - np.where(valid, np.clip(d / feather, 0, 1), 0.0)).max() < 1e-7
    # the valid region: the green kernel reaches 10 px along the axes, so about 10 px of every edge is lost
    rows, cols = np.nonzero(valid)
    assert 8 <= cols.min() <= 12 and 8 <= (w - 1) - cols.max() <= 12


def _moffat(d2, fwhm, beta=3.0):
    a = fwhm / (2 * math.sqrt(2 ** (1 / beta) - 1))
    return (1 + d2 / (a * a)) ** (-beta)


def _fwhm(img, x0, y0):
    """FWHM of a circular Moffat (beta 3) fitted by least squares on a 15 x 15 stamp."""
    from scipy.optimize import least_squares

    yi, xi = int(round(y0)), int(round(x0))
    yy, xx = np.mgrid[yi - 7: yi + 8, xi - 7: xi + 8]
    st = img[yy, xx]

    def resid(p):
        return (p[0] * _moffat((xx - p[2]) ** 2 + (yy - p[3]) ** 2, p[1]) - st).ravel()

    return least_squares(resid, [st.max(), 2.7, x0, y0]).x[1]


def test_undersampled_star_stays_sharp(mosaic_of):
    """The reason for the method: a coloured star of FWHM 2.7 px (R, G, B = 0.6, 1, 0.8), point-sampled on the
    CFA of 8 frames at random rotations and sub-pixel phases, each resampled onto one grid and averaged. Master
    G FWHM over the truth's (median of 6 stars; the simulated alt-az session of test_stack_session measures 1.039
    against 1.217 for bilinear demosaic + bilinear warp): here measured 1.012 and 1.155 (noise-free, beta fixed), asserted <= 1.04 and >= 1.10."""
    rng = np.random.default_rng(2)
    ratios = {"lattice": [], "bilinear": []}
    Y, X = np.mgrid[0:31, 0:31].astype(np.float64)
    for _ in range(6):
        X0, Y0 = 15 + rng.random(), 15 + rng.random()
        acc = {k: np.zeros((31, 31)) for k in ratios}
        for _ in range(8):
            t = rng.uniform(0, 2 * np.pi)
            L = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
            src = np.array([32.0, 32.0]) + rng.random(2)
            A = np.hstack([L.T, (np.array([X0, Y0]) - L.T @ src)[:, None]])  # frame -> reference
            yy, xx = np.mgrid[0:64, 0:64].astype(np.float64)
            star = 1e4 * _moffat((xx - src[0]) ** 2 + (yy - src[1]) ** 2, 2.7)
            mosaic = mosaic_of(np.stack([0.6 * star, star, 0.8 * star]).astype(np.float32), "RGGB")
            acc["lattice"] += warp_lattice(mosaic, "RGGB", A, (31, 31))[0][1]
            acc["bilinear"] += warp_affine(debayer_bilinear(mosaic, "RGGB"), A, (31, 31))[0][1]
        ideal = _fwhm(1e4 * _moffat((X - X0) ** 2 + (Y - Y0) ** 2, 2.7), X0, Y0)
        for k in ratios:
            ratios[k].append(_fwhm(acc[k] / 8, X0, Y0) / ideal)
    lattice, bilinear = np.median(ratios["lattice"]), np.median(ratios["bilinear"])
    assert lattice <= 1.04 and bilinear >= 1.10, (lattice, bilinear)


# ------------------------------------------------------------------------------------------ chroma variant


def _flat(pattern: str, colour: dict, shape=(60, 70), dtype=np.float32) -> np.ndarray:
    frame = np.zeros(shape, dtype)
    for name, sites in bayer_offsets(pattern).items():
        for r, c in sites:
            frame[r::2, c::2] = colour[name]
    return frame


@pytest.mark.parametrize("pattern", PATTERNS)
def test_chroma_uniform_colours_are_exact(pattern, rigid):
    """A uniform colour comes out exactly: integer counts, and float channels within a factor 2 of green."""
    A = rigid(23.7, 1.37, -2.91, centre=(35, 30))
    for colour in ({"R": 1234.0, "G": 40321.0, "B": 777.0}, {"R": 0.7316, "G": 0.5123, "B": 0.9871},
                   {"R": 65535.0, "G": 0.0, "B": 3.0}):
        rgb, valid, _ = warp_lattice_chroma(_flat(pattern, colour), pattern, A, (60, 70), out_origin=(1, 3))
        assert valid.sum() > 0.3 * valid.size
        for k, name in enumerate("RGB"):
            assert np.all(rgb[k][valid] == np.float32(colour[name])), (name, colour)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_chroma_planes_are_colour_differences(pattern):
    """Red and blue entries are C - G with G the Malvar-He-Cutler estimate; green is the lattice plane; frame edges
    reflect (so a band that is the whole frame and one cut from a bigger frame agree inside)."""
    rng = np.random.default_rng(31)
    frame = rng.integers(0, 65536, (16, 18)).astype(np.float32)
    red, blue, green = lattice_chroma_planes(frame, (0, 0), pattern, frame.shape)
    plain = lattice_planes(frame, (0, 0), pattern)
    assert np.array_equal(green, plain[2])
    padded = np.pad(frame.astype(np.float64), 2, mode="reflect")
    offsets = bayer_offsets(pattern)
    for plane, name in ((red, "R"), (blue, "B")):
        (r, c), = offsets[name]
        for i in range(plane.shape[0]):
            for j in range(plane.shape[1]):
                y, x = 2 * i + r + 2, 2 * j + c + 2
                g4 = padded[y - 1, x] + padded[y + 1, x] + padded[y, x - 1] + padded[y, x + 1]
                lap = 4 * padded[y, x] - (padded[y - 2, x] + padded[y + 2, x] + padded[y, x - 2] + padded[y, x + 2])
                assert abs(plane[i, j] - (padded[y, x] - (g4 / 4 + lap / 8))) <= 0.02
    band = lattice_chroma_planes(frame[3:13, 5:16], (3, 5), pattern, frame.shape)
    L = lattice_layout((10, 11), (3, 5), pattern)
    for s in (0, 1):  # interior entries (neighbours inside the band) equal the full frame's
        whole = (red, blue)[s]
        r_site, c_site = L.sites[s]
        for i in range(band[s].shape[0]):
            for j in range(band[s].shape[1]):
                y, x = 3 + L.row_off[s] + 2 * i, 5 + L.col_off[s] + 2 * j
                if 5 <= y <= 10 and 7 <= x <= 13:
                    assert band[s][i, j] == whole[(y - r_site) // 2, (x - c_site) // 2]


def test_chroma_keeps_green_valid_and_weight_and_cuts_colour_rings(mosaic_of, rigid):
    """Green, the valid mask and the weight are the lattice warp's; a white undersampled star (sigma 0.9 px) keeps
    its colour across the core far better (chromaticity spread of the bright pixels)."""
    h, w, sigma = 90, 100, 0.9
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    spreads = {"lattice": [], "chroma": []}
    for k, centre in enumerate([(40.3, 44.7), (51.8, 38.1), (47.5, 46.25)]):
        image = 200.0 + 2e4 * np.exp(-((x - centre[0]) ** 2 + (y - centre[1]) ** 2) / (2 * sigma**2))
        mosaic = mosaic_of(np.stack([image] * 3).astype(np.float32), "GRBG")
        A = rigid(31.0 + 17 * k, 1.3, -0.6, centre=(50, 45))
        plain = warp_lattice(mosaic, "GRBG", A, (h, w), feather_px=5.0)
        chroma = warp_lattice_chroma(mosaic, "GRBG", A, (h, w), feather_px=5.0)
        assert np.array_equal(plain[0][1], chroma[0][1])
        assert np.array_equal(plain[1], chroma[1]) and np.array_equal(plain[2], chroma[2])
        for name, (rgb, _, _) in (("lattice", plain), ("chroma", chroma)):
            s = rgb.astype(np.float64) - 200.0
            total = s.sum(0)
            bright = total > 0.2 * total.max()
            frac = s[:, bright] / total[bright]
            spreads[name].append(np.sqrt(((frac - 1 / 3) ** 2).sum(0).mean()))
    assert np.median(spreads["chroma"]) < 0.5 * np.median(spreads["lattice"]), spreads


def test_chroma_tiling_and_odd_bands_do_not_change_a_bit(monkeypatch, rigid, tiles):
    """Bands cut with source_window and LATTICE_MARGIN (odd origins) give the full-frame pixels bit for bit, also
    on tiles touching the frame edges (where the green estimates reflect); a band too small raises."""
    rng = np.random.default_rng(16)
    mosaic = rng.integers(0, 65536, (70, 90)).astype(np.uint16)
    for A in (rigid(-8.0, 2.21, 1.63, centre=(45, 35)), rigid(0.0, 0.0, 0.0)):
        full = warp_lattice_chroma(mosaic, "GRBG", A, (66, 96), feather_px=7.0)
        monkeypatch.setattr(warp_module, "CHUNK_PIXELS", 50)
        result = [np.zeros_like(a) for a in full]
        for origin, shape in tiles((66, 96), (23, 29)):
            row0, row1, col0, col1 = source_window(A, shape, origin, (70, 90), LATTICE_MARGIN)
            row0, col0 = max(row0 - 1, 0), max(col0 - 1, 0)
            part = warp_lattice_chroma(mosaic[row0:row1, col0:col1], "GRBG", A, shape, out_origin=origin,
                                       src_origin=(row0, col0), src_size=(70, 90), feather_px=7.0)
            box = (slice(origin[0], origin[0] + shape[0]), slice(origin[1], origin[1] + shape[1]))
            result[0][(slice(None),) + box] = part[0]
            result[1][box], result[2][box] = part[1], part[2]
        monkeypatch.undo()
        for got, expected in zip(result, full):
            assert np.array_equal(got, expected)
        assert full[1].sum() > 0.5 * full[1].size
    # the green kernel reaches further than the red and blue taps' green-estimate neighbours: the smallest band the
    # lattice warp takes gives the chroma warp's full-frame pixels too, one row less raises
    A = rigid(0.0, 0.0, 0.0)
    out_shape, out_origin = (10, 10), (30, 40)
    plain = warp_lattice(mosaic, "GRBG", A, out_shape, out_origin=out_origin)[1]
    assert plain.all()
    lows = []
    for r0 in range(0, 30):
        try:
            warp_lattice(mosaic[r0:], "GRBG", A, out_shape, out_origin=out_origin, src_origin=(r0, 0),
                         src_size=(70, 90))
        except ValueError:
            break
        lows.append(r0)
    kw = dict(out_origin=out_origin, src_size=(70, 90))
    cut = warp_lattice_chroma(mosaic[lows[-1]:], "GRBG", A, out_shape, src_origin=(lows[-1], 0), **kw)
    for a, b in zip(cut, warp_lattice_chroma(mosaic, "GRBG", A, out_shape, out_origin=out_origin)):
        assert np.array_equal(a, b)
    with pytest.raises(ValueError, match="lacks the taps"):
        warp_lattice_chroma(mosaic[lows[-1] + 1:], "GRBG", A, out_shape, src_origin=(lows[-1] + 1, 0), **kw)


def test_chroma_source_window_margin_covers_every_tap(rigid):
    """Fuzz as for the lattice warp: a band cut with LATTICE_MARGIN never lacks a tap or a green neighbour."""
    rng = np.random.default_rng(19)
    size = (61, 75)
    mosaic = rng.integers(0, 65536, size).astype(np.float32)
    for _ in range(150):
        A = rigid(rng.uniform(-180, 180), *rng.uniform(-6, 6, 2), centre=(37, 30))
        A[:, :2] *= rng.uniform(0.97, 1.03)
        shape = tuple(int(v) for v in rng.integers(1, 30, 2))
        origin = tuple(int(v) for v in rng.integers(-5, 50, 2))
        row0, row1, col0, col1 = source_window(A, shape, origin, size, LATTICE_MARGIN)
        if row1 <= row0 or col1 <= col0:
            continue
        part = warp_lattice_chroma(mosaic[row0:row1, col0:col1], "RGGB", A, shape, out_origin=origin,
                                   src_origin=(row0, col0), src_size=size)
        whole = warp_lattice_chroma(mosaic, "RGGB", A, shape, out_origin=origin)
        for a, b in zip(part, whole):
            assert np.array_equal(a, b)


def test_chroma_errors_and_out(rigid):
    mosaic = np.random.default_rng(3).integers(0, 65536, (50, 60)).astype(np.uint16)
    A = rigid(5.0, 1.5, 2.5)
    with pytest.raises(ValueError, match="feather_px"):
        warp_lattice_chroma(mosaic, "RGGB", A, (10, 10), feather_px=-1.0)
    with pytest.raises(ValueError, match="2-D"):
        warp_lattice_chroma(mosaic[None], "RGGB", A, (10, 10))
    fresh = warp_lattice_chroma(mosaic, "BGGR", A, (40, 50), out_origin=(2, 3), feather_px=2.0)
    out = (np.full((3, 40, 50), -1.0, np.float32), np.ones((40, 50), bool), np.full((40, 50), -1.0, np.float32))
    returned = warp_lattice_chroma(mosaic, "BGGR", A, (40, 50), out_origin=(2, 3), feather_px=2.0, out=out)
    for r, o, f in zip(returned, out, fresh):
        assert r is o and np.array_equal(o, f)
    for shape in [(1, 1), (2, 5), (7, 3)]:  # too small for the kernels: nothing valid, no error
        rgb, valid, weight = warp_lattice_chroma(mosaic[: shape[0], : shape[1]], "GRBG", A, (3, 4))
        assert not valid.any() and not rgb.any() and not weight.any()
