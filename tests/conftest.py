"""Shared test fixtures: real data, header dumps, folder hashing, synthetic scenes and a simulated session.

Every helper that more than one test module needs lives here and reaches the tests as a fixture; no test module
imports another (this one included). Fixtures that hand out a helper return the function itself, under the
helper's name, so a test calls it as before: ``def test_x(mosaic_of): mosaic_of(rgb, "RGGB")``. Helpers and
constants are session-scoped, so module-scoped fixtures can use them too.

Parametrisations need their values at collection time, before any fixture exists: a module that parametrises
over, say, the four Bayer patterns keeps its own literal tuple for that.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from dwarf3gpu.geometry import apply_transform, bayer_offsets, invert_transform
from dwarf3gpu.simulate import SimulatedSession, SimulationConfig, simulate_session

REALDATA = Path(__file__).resolve().parents[2] / "shared" / "realdata"

#: Raw (un-white-balanced) colour of a sun-like star relative to green, as in dwarf3gpu.simulate.
RAW_R_OVER_G, RAW_B_OVER_G = 0.62, 0.78
SKY = (320.0, 500.0, 260.0)


# ------------------------------------------------------------------------------------- real data, files, folders


def _realdata(*parts: str) -> Path:
    """Path under ../shared/realdata; skip the calling test cleanly when it is absent."""
    path = REALDATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not available ({path})")
    return path


def _header_from_dump(path: Path) -> fits.Header:
    """Parse a text header dump (``#`` lines are comments) with astropy."""
    text = "\n".join(line for line in path.read_text().splitlines() if not line.startswith("#"))
    return fits.Header.fromstring(text, sep="\n")


def _hash_tree(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` plus the list of folders: any write shows up as a difference."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        out[rel] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "<dir>"
    return out


@pytest.fixture(scope="session")
def realdata_root() -> Path:
    """Folder of the shared real data (``../shared/realdata``).

    Returns
    -------
    pathlib.Path
        The folder; it may be absent (tests that only use real data when it is there check for themselves).
    """
    return REALDATA


@pytest.fixture(scope="session")
def realdata() -> Callable[..., Path]:
    """Path getter for the shared real data that skips the calling test when the path is absent.

    Returns
    -------
    callable
        ``realdata(*parts) -> pathlib.Path``: the path ``../shared/realdata/<parts...>``; calls ``pytest.skip``
        when it does not exist.
    """
    return _realdata


@pytest.fixture(scope="session")
def header_from_dump() -> Callable[[Path], fits.Header]:
    """Parser of a text header dump (``#`` lines are comments).

    Returns
    -------
    callable
        ``header_from_dump(path) -> astropy.io.fits.Header``.
    """
    return _header_from_dump


@pytest.fixture(scope="session")
def hash_tree() -> Callable[[Path], dict[str, str]]:
    """Fingerprint of a folder: any write under it shows up as a difference.

    Returns
    -------
    callable
        ``hash_tree(root) -> dict``: relative path -> sha256 of every file under ``root``, ``"<dir>"`` for folders.
    """
    return _hash_tree


# ------------------------------------------------------------------------------------------- simulated sessions


@pytest.fixture(scope="session")
def big_budget() -> int:
    """Memory budget in bytes (1 GiB) that stacks every simulated test session in a single tile.

    Returns
    -------
    int
    """
    return 1 << 30


@pytest.fixture(scope="session")
def small_session_config() -> SimulationConfig:
    """The ``small`` simulated session: 8 alt-az lights of 512 x 384 with a ``failed_`` frame and device clutter.

    One cloudy and one trailed frame, 600 degrees per hour of field rotation, a dense star field (seed 21).

    Returns
    -------
    dwarf3gpu.simulate.SimulationConfig
    """
    return SimulationConfig(
        n_frames=8, width=512, height=384, mode="altaz", rotation_rate_deg_per_hour=600.0, n_failed=1, n_cloudy=1,
        n_trailed=1, n_bad_seeing=0, clutter=True, seed=21, stars_per_megapixel=1500.0,
    )


@pytest.fixture(scope="session")
def _small_session_and_tree(tmp_path_factory, small_session_config, hash_tree):
    """The small session simulated once per test run, with the fingerprint of its folder taken right away."""
    sim = simulate_session(tmp_path_factory.mktemp("small_session"), small_session_config)
    return sim, hash_tree(sim.session_dir)


@pytest.fixture(scope="session")
def small_session(_small_session_and_tree) -> SimulatedSession:
    """The ``small_session_config`` session, simulated once for the whole test run and shared by every module.

    Tests must treat it as read-only and write their outputs under their own temporary folders;
    ``small_session_tree`` holds the session folder's fingerprint from before any test used it.

    Returns
    -------
    dwarf3gpu.simulate.SimulatedSession
    """
    return _small_session_and_tree[0]


@pytest.fixture(scope="session")
def small_session_tree(_small_session_and_tree) -> dict[str, str]:
    """``hash_tree`` of ``small_session.session_dir`` taken right after the simulation, before any test ran on it.

    Returns
    -------
    dict
        Relative path -> sha256 (``"<dir>"`` for folders).
    """
    return _small_session_and_tree[1]


# ------------------------------------------------------------------------------------------ Bayer mosaics


def _mosaic_of(rgb: np.ndarray, pattern: str, origin: tuple[int, int] = (0, 0)) -> np.ndarray:
    """Sample a (3, H, W) scene through the CFA of a frame, for an array at ``origin`` in it."""
    offsets = bayer_offsets(pattern)
    out = np.zeros(rgb.shape[1:], rgb.dtype)
    for k, colour in enumerate("RGB"):
        for r, c in offsets[colour]:
            r0, c0 = (r - origin[0]) % 2, (c - origin[1]) % 2
            out[r0::2, c0::2] = rgb[k, r0::2, c0::2]
    return out


@pytest.fixture(scope="session")
def bayer_patterns() -> tuple[str, ...]:
    """The four Bayer layouts, in the order the kernels number them.

    Returns
    -------
    tuple of str
        ``("RGGB", "GRBG", "GBRG", "BGGR")``.
    """
    return ("RGGB", "GRBG", "GBRG", "BGGR")


@pytest.fixture(scope="session")
def mosaic_of() -> Callable[..., np.ndarray]:
    """CFA sampler of a colour scene.

    Returns
    -------
    callable
        ``mosaic_of(rgb, pattern, origin=(0, 0)) -> ndarray``: the (H, W) mosaic that a sensor with Bayer layout
        ``pattern`` records of the (3, H, W) scene ``rgb``, for an array whose pixel (0, 0) is pixel ``origin`` of
        the frame. Same dtype as ``rgb``.
    """
    return _mosaic_of


# ------------------------------------------------------------------------------------------ geometry, scenes


def _rigid(theta_deg: float, tx: float, ty: float, centre=(0.0, 0.0)) -> np.ndarray:
    """Rotation by theta about ``centre`` followed by a translation, frame -> reference."""
    t = np.radians(theta_deg)
    rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    c = np.asarray(centre, dtype=np.float64)
    return np.hstack([rot, (c - rot @ c + [tx, ty])[:, None]])


def _waves(x: np.ndarray, y: np.ndarray, phase: float = 0.0) -> np.ndarray:
    """Smooth analytic scene (periods >= 37 px, values 10000-30000)."""
    return (
        20000
        + 6000 * np.sin(2 * np.pi * x / 37 + phase) * np.cos(2 * np.pi * y / 53 + 2 * phase)
        + 4000 * np.sin(2 * np.pi * (x + 0.6 * y) / 41 + 3 * phase)
    )


def _inverse_coords(A: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Source coordinates of every reference pixel of a grid (float64)."""
    Y, X = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float64)
    xy = apply_transform(invert_transform(A), np.stack([X.ravel(), Y.ravel()], axis=1))
    return xy[:, 0].reshape(shape), xy[:, 1].reshape(shape)


def _tiles(shape: tuple[int, int], size: tuple[int, int]) -> Iterator[tuple[tuple[int, int], tuple[int, int]]]:
    """(origin, shape) of the tiles of ``size`` that cover an image of ``shape``, row by row."""
    for r in range(0, shape[0], size[0]):
        for c in range(0, shape[1], size[1]):
            yield (r, c), (min(size[0], shape[0] - r), min(size[1], shape[1] - c))


@pytest.fixture(scope="session")
def rigid() -> Callable[..., np.ndarray]:
    """Builder of rigid transforms.

    Returns
    -------
    callable
        ``rigid(theta_deg, tx, ty, centre=(0, 0)) -> ndarray``: the 2x3 affine (project convention, frame ->
        reference) of a rotation by ``theta_deg`` about ``centre`` followed by a translation ``(tx, ty)``.
    """
    return _rigid


@pytest.fixture(scope="session")
def waves() -> Callable[..., np.ndarray]:
    """Smooth analytic scene.

    Returns
    -------
    callable
        ``waves(x, y, phase=0.0) -> ndarray``: values 10000-30000 at coordinates ``(x, y)`` (periods >= 37 px);
        ``phase`` gives other, independent-looking scenes (e.g. one per colour).
    """
    return _waves


@pytest.fixture(scope="session")
def inverse_coords() -> Callable[..., tuple[np.ndarray, np.ndarray]]:
    """Source coordinates of an output grid under a transform.

    Returns
    -------
    callable
        ``inverse_coords(A, shape) -> (xs, ys)``: float64 arrays of ``shape`` with the source (frame) position of
        every reference pixel, for the frame -> reference transform ``A``.
    """
    return _inverse_coords


@pytest.fixture(scope="session")
def tiles() -> Callable[..., Iterator[tuple[tuple[int, int], tuple[int, int]]]]:
    """Tiling of an image.

    Returns
    -------
    callable
        ``tiles(shape, size)``: generator of ``(origin, tile_shape)`` covering ``shape`` row by row with tiles of
        ``size`` (the last ones in a row or column cut to fit).
    """
    return _tiles


# ------------------------------------------------------------------------------------------ colour images


def _synthetic_sky(
    height: int = 300,
    width: int = 400,
    n_stars: int = 250,
    sky: tuple[float, float, float] = SKY,
    noise: float = 8.0,
    seed: int = 1,
) -> np.ndarray:
    """Linear float32 (3, H, W) image: coloured sky + Gaussian noise + Gaussian stars with a green-heavy raw response.

    Star colours follow the simulator's B-V model: ``R/G = 0.62 x 10^(0.24 (B-V - 0.65))``, ``B/G = 0.78 x
    10^(-0.36 (B-V - 0.65))`` with ``B-V ~ N(0.65, 0.35)``, so the median star has R/G = 0.62 and B/G = 0.78.
    """
    rng = np.random.default_rng(seed)
    img = np.empty((3, height, width), np.float64)
    img[:] = np.asarray(sky)[:, None, None]
    bv = np.clip(rng.normal(0.65, 0.35, n_stars), -0.3, 1.8)
    colours = np.stack(
        [RAW_R_OVER_G * 10 ** (0.24 * (bv - 0.65)), np.ones(n_stars), RAW_B_OVER_G * 10 ** (-0.36 * (bv - 0.65))]
    )
    flux = 10 ** rng.uniform(3.0, 5.3, n_stars)
    xs = rng.uniform(8, width - 8, n_stars)
    ys = rng.uniform(8, height - 8, n_stars)
    sigma = 1.2
    offsets = np.arange(-7, 8)
    for k in range(n_stars):
        x0, y0 = int(xs[k]), int(ys[k])
        dx = (x0 + offsets - xs[k])[None, :]
        dy = (y0 + offsets - ys[k])[:, None]
        psf = np.exp(-(dx**2 + dy**2) / (2 * sigma**2)) / (2 * np.pi * sigma**2)
        img[:, y0 - 7 : y0 + 8, x0 - 7 : x0 + 8] += flux[k] * colours[:, k, None, None] * psf
    img += rng.normal(0.0, noise, img.shape)
    return img.astype(np.float32)


@pytest.fixture(scope="session")
def sky_levels() -> tuple[float, float, float]:
    """(R, G, B) sky level of ``synthetic_sky`` images by default, ADU.

    Returns
    -------
    tuple of float
        ``(320.0, 500.0, 260.0)``: a green-heavy cast, as a raw one-shot-colour stack has.
    """
    return SKY


@pytest.fixture(scope="session")
def raw_star_colour() -> tuple[float, float]:
    """Raw (un-white-balanced) colour of the median ``synthetic_sky`` star, a sun-like one, as in dwarf3gpu.simulate.

    Returns
    -------
    tuple of float
        ``(R/G, B/G) = (0.62, 0.78)``.
    """
    return RAW_R_OVER_G, RAW_B_OVER_G


@pytest.fixture(scope="session")
def synthetic_sky() -> Callable[..., np.ndarray]:
    """Generator of linear colour images of a starry sky.

    Returns
    -------
    callable
        ``synthetic_sky(height=300, width=400, n_stars=250, sky=sky_levels, noise=8.0, seed=1) -> ndarray``:
        float32 (3, H, W) image of a coloured sky level, Gaussian noise of ``noise`` ADU and ``n_stars`` Gaussian
        stars (sigma 1.2 px) whose colours follow the simulator's B-V model around ``raw_star_colour``.
    """
    return _synthetic_sky


# ------------------------------------------------------------------------------------------ collection


@pytest.fixture(scope="session")
def dark_session(tmp_path_factory) -> SimulatedSession:
    """A small EQ session with a dark library: the dark-offset path (float32 windows, hot pixels from the dark).

    Returns
    -------
    SimulatedSession
    """
    config = SimulationConfig(n_frames=5, width=320, height=256, mode="eq", drift_px_per_hour=300.0, n_failed=0,
                              n_cloudy=0, n_trailed=0, n_bad_seeing=0, clutter=False, seed=5, with_darks=True,
                              hot_pixels_per_megapixel=400.0, galaxy=False)
    return simulate_session(tmp_path_factory.mktemp("dark_session"), config)


def pytest_collection_modifyitems(config, items):
    """Skip ``@pytest.mark.gpu`` tests, with the reason, where the CUDA backend cannot run."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    from dwarf3gpu.backends import cuda_unavailable_reason

    reason = cuda_unavailable_reason()
    if reason:
        skip = pytest.mark.skip(reason=f"needs an NVIDIA GPU with CuPy: {reason}")
        for item in gpu_items:
            item.add_marker(skip)


# ------------------------------------------------------------------------------------------ stage operations

_CUDA_PARAM = pytest.param("cuda", marks=pytest.mark.gpu)


@pytest.fixture(scope="session")
def cpu_build_target(tmp_path_factory):
    """The CPU build of the kernels (a launch target), compiled once per test run into a fresh cache folder.

    Skips the calling test when there is no C++ compiler.

    Returns
    -------
    dwarf3gpu.backends.cpu_build.CpuBuildTarget
    """
    from dwarf3gpu.backends import cpu_build

    if cpu_build.find_compiler() is None:
        pytest.skip("no C++ compiler (g++, c++ or $CXX) to build the CPU target of the kernels")
    return cpu_build.load(root=tmp_path_factory.mktemp("cpu-build-cache"))


def _stage_ops(request):
    """The stage operations called ``request.param``: reference, cpu-build or cuda."""
    from dwarf3gpu.backends import KernelStageOps, ReferenceStageOps

    if request.param == "reference":
        return ReferenceStageOps()
    if request.param == "cpu-build":
        return KernelStageOps(request.getfixturevalue("cpu_build_target"))
    from dwarf3gpu.backends.cuda import CudaTarget

    return KernelStageOps(CudaTarget())


@pytest.fixture(scope="session", params=["reference", "cpu-build", _CUDA_PARAM])
def ops(request):
    """Every implementation of the stage operations, one test per implementation.

    ``reference`` (:class:`~dwarf3gpu.backends.ReferenceStageOps`, NumPy), ``cpu-build`` (``KernelStageOps`` on
    ``cpu_build_target``; skipped without a C++ compiler) and ``cuda`` (``KernelStageOps(CudaTarget())``, marked
    ``gpu``: skipped without a usable GPU). Arrays of ``ops.xp`` in and out: use ``ops.upload``/``ops.download``.

    Returns
    -------
    dwarf3gpu.backends.StageOps
    """
    return _stage_ops(request)


@pytest.fixture(scope="session", params=["cpu-build", _CUDA_PARAM])
def kernel_ops(request):
    """The kernel implementations of the stage operations only (``cpu-build`` and ``cuda`` of ``ops``), for tests
    that compare the kernels with the NumPy reference functions.

    Returns
    -------
    dwarf3gpu.backends.KernelStageOps
    """
    return _stage_ops(request)


# ------------------------------------------------------------------------------------------ tile renderers


class _ArrayRenderer:
    """A TileRenderer over a function that returns a tile's arrays: ``render(k, row0, row1, col0, col1) -> (data,
    valid, weight)``, written into the tile buffer's views (a (rows, cols) data array fills a one-channel tile)."""

    def __init__(self, render: Callable[[int, int, int, int, int], tuple]):
        self.render = render

    def render_into(self, k, row0, row1, col0, col1, data, valid, weight) -> None:
        tile_data, tile_valid, tile_weight = self.render(k, row0, row1, col0, col1)
        data[...] = tile_data
        valid[...] = tile_valid
        weight[...] = tile_weight


@pytest.fixture(scope="session")
def array_renderer() -> Callable[[Callable[[int, int, int, int, int], tuple]], _ArrayRenderer]:
    """Adaptor from an array-returning function to a tile renderer (``render_into``) for ``tiles.stack_tiles``.

    Returns
    -------
    callable
        ``array_renderer(render) -> renderer``: ``render(k, row0, row1, col0, col1)`` returns frame ``k``'s
        ``(data (C, rows, cols) or (rows, cols), valid (rows, cols), weight (rows, cols))`` of a tile; the
        renderer's ``render_into`` copies them into the tile buffer (NumPy broadcasting rules: a mismatched shape
        raises ValueError).
    """
    return _ArrayRenderer
