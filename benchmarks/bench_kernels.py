"""The CUDA C kernels' CPU build against the NumPy reference, per kernel, on full-size DWARF 3 frames.

Run: ``python benchmarks/bench_kernels.py [--repeat 3] [--frames 40] [--tile-rows 256] [--threads 2]
[--clip-frames 40 120]``.

Per kernel, on a 3856 x 2180 frame, through the stage operations ``KernelStageOps(cpu_build.load())`` against the
NumPy reference functions (:mod:`dwarf3gpu.debayer`, :mod:`dwarf3gpu.warp`, :mod:`dwarf3gpu.calibrate`,
:mod:`dwarf3gpu.clip`): debayer (bilinear, Malvar-He-Cutler, superpixel), the warps (affine RGB bilinear with a
feather and bicubic, Bayer planes, the lattice resampler), the dark calibration of a whole-frame float32 window
(``calibrate_window``: subtract a float32 dark offset, repair 500 hot pixels at random positions; both run in
place on their own working window, so every repeat does the same work on slightly shifted values), and the sigma clip (``clip_into``
on the (``--frames``, 1, ``--tile-rows`` x 3856) view of a tile with a 5 % mask, against
``sigma_clip_mask_aware`` with ``--threads`` workers; beyond the launch target's
``clip_kernel_max_frames`` the stage operations clip with the reference on the host, and the row says so). Each
row: the best wall time of ``--repeat`` runs of the NumPy reference and of the CPU build with ``--threads``
OpenMP threads and with one; the kernel's full frames per second (for the clip, frame-sized inputs per second:
``frames x tile / frame``) and bytes moved per second (the kernel's input plus output bytes over its time).

Then the clip against ``astropy.stats.sigma_clip`` (``axis=0``, ``masked=False``, same options; then ``nanmean``
over the frames; astropy runs on one thread), for each ``--clip-frames`` count on a (frames, tile rows, 3856)
float32 stack with 2 % outliers and no mask: median/mad_std, median/std and mean/std; the NumPy reference
(``sigma_clip_mask_aware``, ``--threads`` workers) and the CPU build (``clip_into``, ``--threads`` and one OpenMP
thread). Each row gives the best wall time (astropy: one run), its speed-up over astropy and over the NumPy
reference, and the peak extra memory from ``tracemalloc`` (a separate run). Between the two, when CUDA can run
(``cuda_unavailable_reason() == ""``): every kernel through ``KernelStageOps(CudaTarget())`` with the inputs
already on the GPU (synchronised best time, frames and bytes per second, and their share of the measured
device-to-device copy bandwidth and of the nominal memory bandwidth: the roofline). The 1-minute load average
before and after is printed and saved: the machines are shared. Nothing is asserted: the numbers are printed and
saved to ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tracemalloc
from pathlib import Path
from typing import Callable

import numpy as np
from astropy.stats import sigma_clip

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import best_of, machine, print_table, save, stage_clip  # noqa: E402

from dwarf3gpu import calibrate, clip, debayer, warp  # noqa: E402
from dwarf3gpu.backends import KernelStageOps, cpu_build, cuda_unavailable_reason  # noqa: E402

HEIGHT, WIDTH = 2180, 3856
HOT_PIXELS = 500
CLIPS = [("median", "mad_std"), ("median", "std"), ("mean", "std")]


def _peak_mib(func: Callable[[], object]) -> float:
    """Peak memory (MiB) that ``func`` allocates above what exists when it starts (tracemalloc)."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    func()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return (peak - base) / 2**20


def _inputs(frames: int, tile_rows: int) -> dict:
    """A raw mosaic (float32) and its debayered RGB, a raw window with hot pixels and its dark calibration, and a
    clip stack with outliers and a mask."""
    rng = np.random.default_rng(0)
    raw = rng.normal(3000, 300, (HEIGHT, WIDTH)).clip(0, 65535).astype(np.uint16)
    mosaic = raw.astype(np.float32)
    hot = np.zeros((HEIGHT, WIDTH), bool)
    hot.flat[rng.choice(HEIGHT * WIDTH, HOT_PIXELS, replace=False)] = True
    window = mosaic.copy()
    window[hot] += 5000.0
    dark = calibrate.DarkCalibration(offset=rng.normal(0, 10, (HEIGHT, WIDTH)).astype(np.float32), hot=hot,
                                     identity="benchmark", record={})
    stack_ = rng.normal(1000, 30, (frames, tile_rows, WIDTH)).astype(np.float32)
    stack_[rng.random(stack_.shape) < 0.02] += 3000
    return {
        "mosaic": mosaic,
        "rgb": debayer.debayer_bilinear(mosaic, "RGGB"),
        "window": window,  # calibrated in place by the kernel
        "window_ref": window.copy(),  # calibrated in place by the reference
        "dark": dark,
        "clip": stack_,
        "valid": rng.random(stack_.shape) > 0.05,
    }


def _clip_label(target, frames: int, settings: clip.ClipSettings) -> str:
    """'' when the target's clip kernel takes ``frames`` frames, else a note that the reference clips them."""
    if frames <= target.clip_kernel_max_frames(settings):
        return ""
    return " [NumPy reference: over the kernel's frame limit]"


def _cases(ops: KernelStageOps, d: dict, frames: int, tile_rows: int, threads: int) -> list[tuple]:
    """(name, reference, kernel, frame equivalents, bytes moved) per kernel; ``d`` holds arrays of ``ops.xp``
    (and the dark calibration on the host, put on the target here)."""
    t = np.radians(10.0)
    A = np.array([[np.cos(t), -np.sin(t), 30.0], [np.sin(t), np.cos(t), -20.0]])
    px = HEIGHT * WIDTH
    shape = (HEIGHT, WIDTH)
    per_clip = frames * tile_rows / HEIGHT
    clip_bytes = frames * tile_rows * WIDTH * 5 + tile_rows * WIDTH * 12  # float32 + mask in; mean + 2 counts out
    stack3 = d["clip"].reshape(frames, 1, tile_rows * WIDTH)
    valid3 = d["valid"].reshape(frames, 1, tile_rows * WIDTH)
    dark = ops.on_target(d["dark"])
    cases = [
        ("debayer bilinear", lambda: debayer.debayer_bilinear(d["mosaic"], "RGGB"),
         lambda: ops.debayer_bilinear(d["mosaic"], "RGGB"), 1, px * 16),
        ("debayer MHC", lambda: debayer.debayer_mhc(d["mosaic"], "RGGB"),
         lambda: ops.debayer_mhc(d["mosaic"], "RGGB"), 1, px * 16),
        ("debayer superpixel", lambda: debayer.debayer_superpixel(d["mosaic"], "RGGB"),
         lambda: ops.debayer_superpixel(d["mosaic"], "RGGB"), 1, px * 7),
        (f"dark offset + {HOT_PIXELS} hot pixels (calibrate_window)",
         lambda: calibrate.calibrate_window(d["window_ref"], (0, 0), d["dark"]),
         lambda: ops.calibrate_window(d["window"], (0, 0), dark), 1, px * 12),
        ("warp bilinear RGB + feather", lambda: warp.warp_affine(d["rgb"], A, shape, feather_px=20.0),
         lambda: ops.warp_affine(d["rgb"], A, shape, feather_px=20.0), 1, px * 29),
        ("warp bicubic RGB", lambda: warp.warp_affine(d["rgb"], A, shape, method="bicubic"),
         lambda: ops.warp_affine(d["rgb"], A, shape, method="bicubic"), 1, px * 29),
        ("warp Bayer planes bilinear", lambda: warp.warp_bayer_planes(d["mosaic"], "RGGB", A, shape),
         lambda: ops.warp_bayer_planes(d["mosaic"], "RGGB", A, shape), 1, px * 13),
        ("warp lattice RGB (pipeline default)", lambda: warp.warp_lattice(d["mosaic"], "RGGB", A, shape),
         lambda: ops.warp_lattice(d["mosaic"], "RGGB", A, shape), 1, px * 21),
    ]
    for cen, spread in CLIPS:
        settings = clip.clip_settings(cenfunc=cen, stdfunc=spread)
        cases.append((
            f"sigma clip {frames} fr, {cen}/{spread}{_clip_label(ops.target, frames, settings)}",
            lambda cen=cen, spread=spread: clip.sigma_clip_mask_aware(d["clip"], d["valid"], cenfunc=cen,
                                                                      stdfunc=spread, workers=threads),
            lambda settings=settings: stage_clip(ops, stack3, valid3, settings),
            per_clip, clip_bytes))
    return cases


def _clip_vs_astropy(ops: KernelStageOps, frames: int, tile_rows: int, threads: int, repeat: int) -> list[dict]:
    """Rows of the astropy comparison for one frame count (see the module docstring)."""
    target = ops.target
    rng = np.random.default_rng(frames)
    stack_ = rng.normal(1000, 30, (frames, tile_rows, WIDTH)).astype(np.float32)
    stack_[rng.random(stack_.shape) < 0.02] += 3000
    stack3 = stack_.reshape(frames, 1, tile_rows * WIDTH)
    rows = []
    for cen, spread in CLIPS:
        settings = clip.clip_settings(cenfunc=cen, stdfunc=spread)
        note = _clip_label(target, frames, settings)

        def astropy_clip(cen=cen, spread=spread):
            clipped = sigma_clip(stack_, sigma=3.0, maxiters=5, cenfunc=cen, stdfunc=spread, axis=0, masked=False)
            return np.nanmean(clipped, axis=0)

        def kernel_clip(n_threads, settings=settings):
            target.set_threads(n_threads)
            try:
                return stage_clip(ops, stack3, None, settings)
            finally:
                target.set_threads(0)

        candidates = {
            "astropy sigma_clip + nanmean (1 thread)": (astropy_clip, 1),
            f"dwarf3gpu NumPy reference ({threads} threads)": (lambda cen=cen, spread=spread: (
                clip.sigma_clip_mask_aware(stack_, cenfunc=cen, stdfunc=spread, workers=threads)), repeat),
            f"dwarf3gpu CPU build ({threads} threads){note}": (lambda: kernel_clip(threads), repeat),
            f"dwarf3gpu CPU build (1 thread){note}": (lambda: kernel_clip(1), repeat),
        }
        times = {}
        for name, (func, runs) in candidates.items():
            times[name] = best_of(func, runs)[0]
        astropy_s, numpy_s = list(times.values())[:2]
        for name, (func, _) in candidates.items():
            rows.append({"frames": frames, "clip": f"{cen}/{spread}", "implementation": name, "s": times[name],
                         "x_vs_astropy": astropy_s / times[name], "x_vs_numpy": numpy_s / times[name],
                         "extra_MiB": _peak_mib(func)})
    return rows


def _cuda_rows(d: dict, frames: int, tile_rows: int, threads: int, repeat: int) -> list[dict]:
    """The same kernels through ``KernelStageOps(CudaTarget())``, inputs already on the GPU: the best kernel time
    (synchronised), frames per second, bytes per second and their share of the GPU's memory bandwidth (from the
    device's memory clock and bus width when the runtime reports them, and the measured device-to-device copy
    bandwidth). Empty when CUDA cannot run here (the reason is printed)."""
    reason = cuda_unavailable_reason()
    if reason:
        print(f"CUDA: not measured ({reason})")
        return []
    from dwarf3gpu.backends.cuda import CudaTarget

    target = CudaTarget()
    ops = KernelStageOps(target)
    cp = ops.xp
    # the dark calibration stays on the host (the cases put it on the GPU); the reference's window is not needed
    on_device = {key: cp.asarray(value) if isinstance(value, np.ndarray) else value for key, value in d.items()
                 if key != "window_ref"}

    def synced(func: Callable) -> Callable:
        def run():
            result = func()
            cp.cuda.Device(target.device).synchronize()
            return result
        return run

    copy_src = cp.empty(1 << 28, cp.uint8)  # 256 MiB read + 256 MiB written per copy
    copy_dst = cp.empty_like(copy_src)
    copy_s = best_of(synced(lambda: cp.copyto(copy_dst, copy_src)), repeat)[0]
    copy_gbps = 2 * copy_src.nbytes / copy_s / 1e9
    try:  # cudaDevAttrMemoryClockRate (kHz) and cudaDevAttrGlobalMemoryBusWidth (bits)
        clock_khz = cp.cuda.runtime.deviceGetAttribute(36, target.device)
        bus_bits = cp.cuda.runtime.deviceGetAttribute(37, target.device)
        peak_gbps = 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9 or None
    except Exception:  # attribute unknown to this runtime
        peak_gbps = None
    rows = []
    for name, _, kernel, n_frames, nbytes in _cases(ops, on_device, frames, tile_rows, threads):
        run = synced(kernel)
        run()  # compile (NVRTC) and warm up
        best = best_of(run, repeat)[0]
        gbps = nbytes / best / 1e9
        rows.append({"kernel": name, "cuda_s": best, "frames_per_s": n_frames / best, "GB_per_s": gbps,
                     "pct_of_copy_bw": 100 * gbps / copy_gbps,
                     "pct_of_peak_bw": 100 * gbps / peak_gbps if peak_gbps else None})
    describe = ops.describe()
    print_table(f"Kernels on {describe.get('device')} (CUDA, inputs on the GPU); device-to-device copy "
                f"{copy_gbps:.0f} GB/s, nominal peak {peak_gbps or float('nan'):.0f} GB/s", rows)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--frames", type=int, default=40)
    parser.add_argument("--tile-rows", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2, help="OpenMP threads of the CPU build, workers of NumPy")
    parser.add_argument("--clip-frames", type=int, nargs="*", default=[40, 120],
                        help="frame counts of the comparison with astropy")
    args = parser.parse_args()
    target = cpu_build.load()
    ops = KernelStageOps(target)
    load_before = os.getloadavg()[0]
    d = _inputs(args.frames, args.tile_rows)
    rows = []
    for name, reference, kernel, frames, nbytes in _cases(ops, d, args.frames, args.tile_rows, args.threads):
        ref_s = best_of(reference, args.repeat)[0]
        target.set_threads(1)
        one_s = best_of(kernel, args.repeat)[0]
        target.set_threads(args.threads)
        all_s = best_of(kernel, args.repeat)[0]
        target.set_threads(0)
        rows.append({"kernel": name, "numpy_s": ref_s, "cpu_build_s": all_s, "cpu_build_1thr_s": one_s,
                     "speedup": ref_s / all_s, "frames_per_s": frames / all_s, "GB_per_s": nbytes / all_s / 1e9})
    m = machine()
    print_table(f"Kernels, CPU build ({args.threads} threads) vs NumPy, {WIDTH}x{HEIGHT}, {m['cpu']} "
                f"({m['cores']} cores), load average {load_before:.2f}", rows)

    cuda_rows = _cuda_rows(d, args.frames, args.tile_rows, args.threads, args.repeat)

    clip_rows = []
    for frames in args.clip_frames:
        clip_rows += _clip_vs_astropy(ops, frames, args.tile_rows, args.threads, args.repeat)
    load_after = os.getloadavg()[0]
    print_table(f"Sigma clip of (frames) x {args.tile_rows} x {WIDTH} float32, no mask, against astropy "
                f"(load average {load_before:.2f} before, {load_after:.2f} after)", clip_rows)
    print("saved", save("kernels", rows, {"clip_vs_astropy": clip_rows, "cuda": cuda_rows, "args": vars(args),
                                          "load_average": [load_before, load_after]}))


if __name__ == "__main__":
    main()
