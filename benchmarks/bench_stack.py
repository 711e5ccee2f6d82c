"""``stack_session`` end to end on full-size alt-az sessions, per stage, with peak memory; and the sigma clipping
next to ``astropy.stats.sigma_clip`` on one band of the same warped stack.

Run: ``python benchmarks/bench_stack.py [--frames 40 120] [--workers 2] [--band-rows 256] [--repeat 2]
[--size 3856x2180] [--no-reference]``.

One default alt-az session (``SimulationConfig(n_frames=max(--frames), clutter=False)``, ``--size``) is
simulated into a temporary folder; the simulation is timed but is no part of the result. The run for ``N``
frames stacks the first ``N`` lights (a frame list), so the 40-frame run uses the first 40 lights of the
120-frame session (its bad frames are wherever they fall). The frames are in the page cache.

**End to end**: ``stack_session(session, config=StackConfig(debayer="rgb"), use_cache=False, workers=W,
frame_list=...)`` runs in a fresh child process per ``N``. Per-stage times come from the result's
``stats["timings_s"]`` (measure, register, calibrate, stack, finish, total). The stack stage is split further, in
the child, by the progress callback (time of the ``backgrounds`` pass) and by a timing wrapper around the
``clip_into`` of the stage operations (``KernelStageOps``, on the CPU build or CUDA, and ``ReferenceStageOps``, the
CPU backend without a C++ compiler: the clipping of every tile, a kernel or NumPy; on CUDA the wrapper
synchronises the device before and after, so the time is the clip's alone); the rest of a tile is rendering (read,
dark calibration, debayer, warp, normalise, into the tile buffer), and what remains of the stage is the
reference-frame render for the noise gain. Peak memory: the child's own peak RSS
(``getrusage(RUSAGE_SELF).ru_maxrss``, i.e. VmHWM; about 0.5 GB of it is the interpreter and the imported
libraries, ``peak_rss_self_before`` in the JSON) and the peak of the summed RSS of the child and all its
descendants (the analysis process pool, its fork server), polled every 0.1 s from this process.
``RUSAGE_CHILDREN`` is not used: the fork server is reaped only at exit, and a fork-and-exec'd child reports its
parent's RSS at the fork. The child's user and system CPU seconds and minor page faults during the call are
recorded too. The tile plan and the memory budget are read from the run manifest.

**Stacking-stage reference**: in another child process, the run manifest of that stack gives the kept frames,
their applied transforms, their background levels and the reference frame; the dark calibration is prepared
again as the pipeline does (``prepare_calibration``, same setting, same kept lights, no cache), and the pipeline's
frame renderer (``dwarf3gpu.render.FrameRenderer`` on ``get_backend(config.backend)``, the same settings)
renders every kept frame's part of a band of ``--band-rows`` rows at the image centre through ``render_into``: an
(N, 3, rows, 3856) float32 stack, NaN where a frame does not cover a pixel (valid as the tile driver makes it:
the renderer's mask and every channel finite). On that array, with sigma 3, 5 iterations, median centre and
``mad_std`` spread (the pipeline's defaults), without weights:

- ours: ``sigma_clip_mask_aware(stack, valid, ...)`` (the NumPy reference, :mod:`dwarf3gpu.clip`) with 1 thread
  and with ``--workers`` threads (clipping and mean of the kept samples in one call), and the CPU build of
  ``kernels/sigma_clip.cu`` (``KernelStageOps(cpu_build.load()).clip_into`` on the (N, 3, rows x 3856) view, what
  the CPU backend clips with; beyond its ``clip_kernel_max_frames`` it clips with the reference, and the row
  says so) with 1 and ``--workers`` OpenMP threads, plus its agreement with the NumPy reference (rejected
  counts, largest mean difference);
- astropy: ``sigma_clip(stack, axis=0, sigma=3, maxiters=5, cenfunc="median", stdfunc="mad_std",
  return_bounds=True)`` (its fast C path, one thread), then ``.mean(axis=0)`` of the masked result.

Times are the best of ``--repeat`` runs without tracemalloc; the extra memory is the ``tracemalloc`` peak of one
more run of each (NumPy reports its buffers to tracemalloc), the input stack not included. Agreement: our bounds
(``clip_bounds``) against astropy's, the kept masks sample by sample and pixel by pixel (all N samples), the
rejected counts and the means. Nothing is asserted: the numbers are printed and saved to ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import best_of, machine, print_table, save, stage_clip  # noqa: E402

SIGMA, MAXITERS, CENFUNC, STDFUNC = 3.0, 5, "median", "mad_std"
POLL_S = 0.1
GIB = 2**30
MIB = 2**20


def _size(text: str) -> tuple[int, int]:
    """Parse ``WxH`` into ``(width, height)``."""
    width, height = text.lower().split("x")
    return int(width), int(height)


# ------------------------------------------------------------------------------------------ memory polling


def _children_map() -> dict[int, list[int]]:
    """Parent pid -> child pids, from /proc/<pid>/stat."""
    tree: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def _tree_rss(root: int) -> int:
    """Summed RSS (bytes) of ``root`` and all its descendants."""
    tree, total, todo = _children_map(), 0, [root]
    page = os.sysconf("SC_PAGE_SIZE")
    while todo:
        pid = todo.pop()
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * page
        except OSError:
            pass
        todo.extend(tree.get(pid, []))
    return total


def _run_child(mode: str, params: dict, out_json: Path) -> tuple[dict, int, float]:
    """Run this script in ``mode`` in a child process; return its JSON, the peak tree RSS and the wall time."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode, json.dumps(params), str(out_json)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, _tree_rss(proc.pid))
        time.sleep(POLL_S)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"child {mode} failed with exit status {proc.returncode}")
    return json.loads(out_json.read_text()), peak, wall


# ------------------------------------------------------------------------------------------ child: stack


def _synchronise(xp):
    """A function that waits for the GPU's queued work when ``xp`` is CuPy (nothing to wait for with NumPy)."""
    if xp is np:
        return lambda: None
    return lambda: xp.cuda.Device().synchronize()


def _child_stack(p: dict) -> dict:
    """Run stack_session once; per-stage times, split of the stack stage, peak RSS, tile plan."""
    from dwarf3gpu.backends import KernelStageOps, ReferenceStageOps
    from dwarf3gpu.config import StackConfig
    from dwarf3gpu.pipeline import stack_session

    clip_s = [0.0]

    def timed(original):
        def timed_clip(self, *args, **kwargs):
            sync = _synchronise(self.xp)
            sync()  # the tile's renders are not the clip's
            t0 = time.perf_counter()
            try:
                return original(self, *args, **kwargs)
            finally:
                sync()
                clip_s[0] += time.perf_counter() - t0
        return timed_clip

    for ops_class in (KernelStageOps, ReferenceStageOps):
        ops_class.clip_into = timed(ops_class.clip_into)
    marks: dict[str, list[float]] = {}

    def progress(stage: str, done: int, total: int) -> None:
        marks.setdefault(stage, []).append(time.perf_counter())

    before = resource.getrusage(resource.RUSAGE_SELF)
    rss_before = before.ru_maxrss * 1024
    t0 = time.perf_counter()
    result = stack_session(p["session"], p["out_root"], config=StackConfig(debayer="rgb"), use_cache=False,
                           workers=p["workers"], frame_list=p["frame_list"], progress=progress)
    wall = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    timings = result.stats["timings_s"]
    bg = marks.get("backgrounds", [])
    tiles = marks.get("stacking", [])
    plan = dict(result.manifest["stack"]["tile_plan"])
    plan.pop("tiles", None)
    return {
        "wall_s": wall,
        "timings_s": timings,
        "backgrounds_s": (bg[-1] - bg[0]) if len(bg) > 1 else 0.0,
        "bands_s": (tiles[-1] - bg[-1]) if tiles and bg else None,
        "clip_s": clip_s[0],
        "lights": result.stats["frames_total"],
        "kept": len(result.kept),
        "kept_names": result.kept,
        "align_mode": result.stats["align_mode"],
        "rotation_range_deg": result.stats["rotation_range_deg"],
        "noise_gain": result.stats.get("noise_gain"),
        "tile_plan": plan,
        "backend": result.manifest["backend"],
        "dwarf3gpu_file": sys.modules["dwarf3gpu"].__file__,
        "peak_rss_self": usage.ru_maxrss * 1024,
        "peak_rss_self_before": rss_before,
        "cpu_user_s": usage.ru_utime - before.ru_utime,
        "cpu_sys_s": usage.ru_stime - before.ru_stime,
        "minor_faults": usage.ru_minflt - before.ru_minflt,
    }


# ------------------------------------------------------------------------------------------ child: clip


def _render_band(p: dict) -> tuple[np.ndarray, np.ndarray, list[str], tuple[int, int]]:
    """(N, 3, rows, W) float32 band of the kept frames (NaN where invalid) and its (N, rows, W) valid mask, rendered
    as the stack child's run rendered them (from its run manifest)."""
    from dwarf3gpu.analysis import output_dir_for
    from dwarf3gpu.backends import get_backend
    from dwarf3gpu.calibrate import prepare_calibration
    from dwarf3gpu.config import StackConfig
    from dwarf3gpu.normalise import normalisation
    from dwarf3gpu.render import FrameRenderer
    from dwarf3gpu.session import discover

    config = StackConfig(debayer="rgb")
    found = discover(p["session"])
    manifest = json.loads((output_dir_for(found.path, p["out_root"]) / "run_manifest.json").read_text())
    stack = manifest["stack"]
    kept_names = list(stack["applied_transforms"])  # in stacking order
    lights = {f.name: f for f in found.lights}
    kept = [lights[name] for name in kept_names]
    paths = [f.path for f in kept]
    pattern = found.metadata.bayer_pattern or "RGGB"
    height, width = kept[0].height, kept[0].width
    reference = manifest["stats"]["reference"]
    calibration, _ = prepare_calibration(found, config.dark, lights[reference].path, Path(p["out_root"]) / "band",
                                         use_cache=False, lights=paths)
    ref_bg = np.asarray(stack["backgrounds"][reference])
    norms = [normalisation(ref_bg, np.asarray(stack["backgrounds"][name]), config.normalisation)
             for name in kept_names]
    ops = get_backend(config.backend)
    renderer = FrameRenderer(paths, [stack["applied_transforms"][name] for name in kept_names], norms, pattern,
                             config, ops, (height, width), calibration)
    rows = min(p["band_rows"], height)
    row0 = (height // 2 - rows // 2) // 2 * 2
    xp = ops.xp
    data = np.empty((len(kept), 3, rows, width), np.float32)
    valid = np.empty((len(kept), rows, width), bool)
    frame_data = xp.empty((3, rows, width), xp.float32)
    frame_valid = xp.empty((rows, width), xp.bool_)
    frame_weight = xp.empty((rows, width), xp.float32)
    for k in range(len(kept)):
        renderer.render_into(k, row0, row0 + rows, 0, width, frame_data, frame_valid, frame_weight)
        frame_valid &= xp.isfinite(frame_data).all(axis=0)
        data[k] = ops.download(frame_data)
        valid[k] = ops.download(frame_valid)
    data[np.broadcast_to(~valid[:, None], data.shape)] = np.nan
    return data, valid, kept_names, (row0, row0 + rows)


def _settings():
    from dwarf3gpu.clip import clip_settings

    return clip_settings(SIGMA, maxiters=MAXITERS, cenfunc=CENFUNC, stdfunc=STDFUNC)


def _ours(data, valid, workers):
    from dwarf3gpu.clip import sigma_clip_mask_aware

    return sigma_clip_mask_aware(data, valid, sigma=SIGMA, maxiters=MAXITERS, cenfunc=CENFUNC, stdfunc=STDFUNC,
                                 workers=workers)


def _cpu_build_ops():
    """``KernelStageOps`` on the CPU build (what the CPU backend clips with); None when no C++ compiler is
    available."""
    from dwarf3gpu.backends import KernelStageOps, cpu_build
    from dwarf3gpu.errors import BackendUnavailableError

    try:
        return KernelStageOps(cpu_build.load())
    except BackendUnavailableError:
        return None


def _cpu_build(ops, data, valid, threads):
    """The CPU build's ``clip_into`` on the (N, 3, rows x W) view of the band with ``threads`` OpenMP threads:
    (mean, rejected) shaped (3, rows, W)."""
    n, channels, rows, width = data.shape
    ops.target.set_threads(threads)
    try:
        mean, _, rejected = stage_clip(ops, data.reshape(n, channels, rows * width),
                                       valid.reshape(n, 1, rows * width), _settings())
    finally:
        ops.target.set_threads(0)
    return mean.reshape(channels, rows, width), rejected.reshape(channels, rows, width)


def _astropy(data):
    from astropy.stats import sigma_clip

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Input data contains invalid values": the NaN are the uncovered samples
        clipped, lo, hi = sigma_clip(data, axis=0, sigma=SIGMA, maxiters=MAXITERS, cenfunc=CENFUNC, stdfunc=STDFUNC,
                                     return_bounds=True)
        t_clip = time.perf_counter()
        mean = clipped.mean(axis=0)
    return clipped, lo, hi, mean, t_clip


def _traced_peak(func) -> int:
    """tracemalloc peak (bytes) above the memory traced before one call of ``func`` (its result included)."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    result = func()
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    del result
    return peak


def _child_clip(p: dict) -> dict:
    """Render one band of the warped stack; time and trace ours and astropy on it; compare the results."""
    from dwarf3gpu.clip import clip_bounds

    t0 = time.perf_counter()
    data, valid, kept_names, band = _render_band(p)
    render_s = time.perf_counter() - t0
    repeat, workers = p["repeat"], p["workers"]

    ours1 = best_of(lambda: _ours(data, valid, 1), repeat)
    oursw = best_of(lambda: _ours(data, valid, workers), repeat)
    ops = _cpu_build_ops()
    built = ops is not None
    kernel_clips = built and len(data) <= ops.target.clip_kernel_max_frames(_settings())
    kern1 = best_of(lambda: _cpu_build(ops, data, valid, 1), repeat) if built else (None, None)
    kernw = best_of(lambda: _cpu_build(ops, data, valid, workers), repeat) if built else (None, None)
    mem_kern = _traced_peak(lambda: _cpu_build(ops, data, valid, workers)) if built else None
    if built:  # the CPU build decides exactly as the reference: same coverage, rejected counts, means to rounding
        (kern_mean, kern_rejected), ref = _cpu_build(ops, data, valid, workers), _ours(data, valid, workers)
        kernel_same_rejected = float(np.mean(kern_rejected == ref.rejected))
        kernel_mean_max_diff = float(np.nanmax(np.abs(kern_mean.astype(np.float64) - ref.mean)))
    else:
        kernel_same_rejected = kernel_mean_max_diff = None
    astro_clip_times, astro_times = [], []
    for _ in range(repeat):
        t0 = time.perf_counter()
        *_, t_clip = _astropy(data)
        t1 = time.perf_counter()
        astro_clip_times.append(t_clip - t0)
        astro_times.append(t1 - t0)
    mem_ours1 = _traced_peak(lambda: _ours(data, valid, 1))
    mem_oursw = _traced_peak(lambda: _ours(data, valid, workers))
    mem_astro = _traced_peak(lambda: _astropy(data))

    # agreement
    ours = _ours(data, valid, workers)
    lo, hi = clip_bounds(data, valid, sigma=SIGMA, maxiters=MAXITERS, cenfunc=CENFUNC, stdfunc=STDFUNC,
                         workers=workers)
    clipped, alo, ahi, amean, _ = _astropy(data)
    amask = np.ma.getmaskarray(clipped)
    kept_astro = ~amask
    with np.errstate(invalid="ignore"):
        kept_ours = np.broadcast_to(valid[:, None], data.shape) & (data >= lo) & (data <= hi)
    same_sample = kept_ours == kept_astro
    same_pixel = same_sample.all(axis=0)
    rej_astro = (np.broadcast_to(valid[:, None], data.shape) & amask).sum(axis=0)
    amean_f = np.ma.filled(amean.astype(np.float64), np.nan)
    ours_mean = ours.mean.astype(np.float64)
    both = np.isfinite(amean_f) & np.isfinite(ours_mean)
    diff = np.abs(ours_mean[both] - amean_f[both])
    exact_mean = np.stack([  # float64 mean of our kept samples, channel by channel (memory)
        np.ma.filled(np.ma.array(data[:, ch].astype(np.float64), mask=~kept_ours[:, ch]).mean(axis=0), np.nan)
        for ch in range(data.shape[1])])
    diff_exact = np.abs(ours_mean[both] - exact_mean[both])
    astro_diff_exact = np.abs(amean_f[both] - exact_mean[both])
    finite_bounds = np.isfinite(lo) & np.isfinite(np.asarray(alo, float))
    n_valid = int(valid.sum()) * 3
    return {
        "band_rows": list(band),
        "shape": list(data.shape),
        "stack_mib": data.nbytes / MIB,
        "valid_fraction": n_valid / data.size,
        "kept_frames": len(kept_names),
        "kept_names": kept_names,
        "render_s": render_s,
        "ours_w1_best_s": ours1[0], "ours_w1_median_s": ours1[1],
        "ours_w_best_s": oursw[0], "ours_w_median_s": oursw[1],
        "astropy_best_s": min(astro_times), "astropy_median_s": statistics.median(astro_times),
        "astropy_clip_best_s": min(astro_clip_times),
        "mem_ours_w1": mem_ours1, "mem_ours_w": mem_oursw, "mem_astropy": mem_astro,
        "kernel_w1_best_s": kern1[0], "kernel_w1_median_s": kern1[1],
        "kernel_w_best_s": kernw[0], "kernel_w_median_s": kernw[1], "mem_kernel_w": mem_kern,
        "kernel_clips": kernel_clips,
        "kernel_rejected_same_as_numpy_fraction": kernel_same_rejected,
        "kernel_mean_max_abs_diff_vs_numpy": kernel_mean_max_diff,
        "bounds_identical_fraction": float(np.mean((lo == alo)[finite_bounds] & (hi == ahi)[finite_bounds])),
        "bounds_nan_pattern_same": bool(np.array_equal(np.isnan(lo), np.isnan(np.asarray(alo, float)))),
        "kept_same_sample_fraction": float(same_sample.mean()),
        "kept_samples_differing": int((~same_sample).sum()),
        "kept_same_pixel_fraction": float(same_pixel.mean()),
        "rejected_counts_same_fraction": float(np.mean(rej_astro == ours.rejected)),
        "rejected_fraction_ours": float(ours.rejected.sum() / n_valid),
        "mean_nan_pattern_same": bool(np.array_equal(np.isnan(amean_f), np.isnan(ours_mean))),
        "mean_identical_fraction": float(np.mean(diff == 0)),
        "mean_max_abs_diff": float(diff.max()) if diff.size else 0.0,
        "mean_mean_abs_diff": float(diff.mean()) if diff.size else 0.0,
        "mean_level": float(np.median(ours_mean[both])) if diff.size else 0.0,
        "ours_vs_float64_max_abs": float(diff_exact.max()) if diff.size else 0.0,
        "astropy_vs_float64_max_abs": float(astro_diff_exact.max()) if diff.size else 0.0,
    }


# ------------------------------------------------------------------------------------------ parent


def _gb(value: float) -> float:
    return value / GIB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, nargs="+", default=[40, 120], help="lights per run (default 40 120)")
    parser.add_argument("--workers", type=int, default=2, help="stack_session workers and clip threads (default 2)")
    parser.add_argument("--band-rows", type=int, default=256, help="rows of the reference band (default 256)")
    parser.add_argument("--repeat", type=int, default=2, help="timed runs of each clip (default 2)")
    parser.add_argument("--size", type=_size, default=(3856, 2180), help="frame size WxH (default 3856x2180)")
    parser.add_argument("--no-reference", action="store_true", help="skip the astropy comparison")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, params, out = args.child
        result = (_child_stack if mode == "stack" else _child_clip)(json.loads(params))
        Path(out).write_text(json.dumps(result))
        return

    from dwarf3gpu.simulate import SimulationConfig, simulate_session

    width, height = args.size
    frames = sorted(set(args.frames))
    load_before = os.getloadavg()
    runs: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print(f"simulating {max(frames)} frames of {width}x{height} ...", file=sys.stderr)
        t0 = time.perf_counter()
        sim = simulate_session(tmp / "sim", SimulationConfig(n_frames=max(frames), width=width, height=height,
                                                             clutter=False))
        sim_s = time.perf_counter() - t0
        print(f"  {sim_s:.1f} s", file=sys.stderr)
        for n in frames:
            params = {"session": str(sim.session_dir), "out_root": str(tmp / f"out{n}"), "workers": args.workers,
                      "frame_list": [p.name for p in sim.lights[:n]], "band_rows": args.band_rows,
                      "repeat": args.repeat}
            print(f"stack_session, {n} frames ...", file=sys.stderr)
            load = os.getloadavg()[0]
            stack, tree_peak, child_wall = _run_child("stack", params, tmp / f"stack{n}.json")
            stack.update(n_frames=n, tree_peak=tree_peak, child_wall_s=child_wall, load_before=load,
                         load_after=os.getloadavg()[0])
            print(f"  {stack['wall_s']:.1f} s", file=sys.stderr)
            clip = None
            if not args.no_reference:
                print(f"clip reference, {n} frames ...", file=sys.stderr)
                clip, clip_tree_peak, _ = _run_child("clip", params, tmp / f"clip{n}.json")
                clip["tree_peak"] = clip_tree_peak
                clip["same_kept_as_stack"] = clip.pop("kept_names") == stack["kept_names"]
            stack.pop("kept_names")
            runs.append({"stack": stack, "clip": clip})
    load_after = os.getloadavg()

    m = machine()
    e2e_rows, stage_rows, clip_rows, agree_rows = [], [], [], []
    for run in runs:
        s, c = run["stack"], run["clip"]
        t, plan = s["timings_s"], s["tile_plan"]
        n = s["n_frames"]
        e2e_rows.append({
            "frames": n,
            "kept": s["kept"],
            "wall_s": s["wall_s"],
            "s_per_frame": s["wall_s"] / s["lights"],
            "s_per_kept": s["wall_s"] / s["kept"],
            "peak_rss_gib": _gb(s["peak_rss_self"]),
            "peak_tree_gib": _gb(s["tree_peak"]),
            "budget_gib": _gb(plan["budget"]),
            "plan_tile_gib": _gb(plan["bytes_per_tile"]),
            "tile_shape": "x".join(map(str, plan["tile_shape"])),
            "tiles": plan["n_tiles"],
            "cpu_user_s": s["cpu_user_s"],
            "cpu_sys_s": s["cpu_sys_s"],
            "load_1min": f"{s['load_before']:.2f}->{s['load_after']:.2f}",
        })
        stack_s = t["stack"]
        calibrate_s = t.get("calibrate", 0.0)
        bands = s["bands_s"] or 0.0
        parts = [
            ("measure (analysis)", t["measure"]),
            ("register (analysis)", t["register"]),
            ("calibrate (dark, hot pixels)", calibrate_s),
            ("stack", stack_s),
            ("  backgrounds (read every light)", s["backgrounds_s"]),
            ("  bands: render (read, calibrate, debayer, warp)", bands - s["clip_s"]),
            ("  bands: sigma clip + mean", s["clip_s"]),
            ("  reference render (noise gain)", stack_s - s["backgrounds_s"] - bands),
            ("finish (write master, previews)", t["finish"]),
            ("other (discover, frame list, select)",
             t["total"] - t["measure"] - t["register"] - calibrate_s - stack_s - t["finish"]),
            ("after total (image stats, manifest, reports)", s["wall_s"] - t["total"]),
        ]
        for name, sec in parts:
            stage_rows.append({"frames": n, "stage": name, "s": sec, "s_per_frame": sec / s["lights"],
                               "share": f"{100 * sec / s['wall_s']:.1f}%"})
        if c is None:
            continue
        shape = "x".join(map(str, c["shape"]))
        ref = c["astropy_best_s"]
        kernel = "CPU build of sigma_clip.cu" if c["kernel_clips"] else \
            "CPU build's clip_into (over the kernel's frame limit: the NumPy reference)"
        for label, best, med, mem in (
            ("ours sigma_clip_mask_aware, 1 thread", c["ours_w1_best_s"], c["ours_w1_median_s"], c["mem_ours_w1"]),
            (f"ours sigma_clip_mask_aware, {args.workers} threads", c["ours_w_best_s"], c["ours_w_median_s"],
             c["mem_ours_w"]),
            (f"{kernel}, 1 thread", c["kernel_w1_best_s"], c["kernel_w1_median_s"], c["mem_kernel_w"]),
            (f"{kernel}, {args.workers} threads", c["kernel_w_best_s"], c["kernel_w_median_s"], c["mem_kernel_w"]),
            ("astropy sigma_clip + masked mean (1 thread)", ref, c["astropy_median_s"], c["mem_astropy"]),
        ):
            if best is None:
                continue
            clip_rows.append({"frames": n, "stack": shape, "method": label, "best_s": best, "median_s": med,
                              "speedup_vs_astropy": ref / best, "extra_mem_mib": mem / MIB,
                              "mem_vs_astropy": mem / c["mem_astropy"]})
        agree_rows.append({
            "frames": n,
            "valid": f"{100 * c['valid_fraction']:.2f}%",
            "bounds_identical": f"{100 * c['bounds_identical_fraction']:.4f}%",
            "kept_samples_same": f"{100 * c['kept_same_sample_fraction']:.5f}%",
            "samples_differing": c["kept_samples_differing"],
            "pixels_all_same": f"{100 * c['kept_same_pixel_fraction']:.4f}%",
            "rejected_same": f"{100 * c['rejected_counts_same_fraction']:.4f}%",
            "rejected": f"{100 * c['rejected_fraction_ours']:.2f}%",
            "mean_max_abs_diff": c["mean_max_abs_diff"],
            "mean_mean_abs_diff": c["mean_mean_abs_diff"],
            "mean_level": c["mean_level"],
            "ours_vs_f64_max": c["ours_vs_float64_max_abs"],
            "astropy_vs_f64_max": c["astropy_vs_float64_max_abs"],
            "cpu_build_rejected_same_as_numpy": c["kernel_rejected_same_as_numpy_fraction"],
            "cpu_build_mean_max_diff_vs_numpy": c["kernel_mean_max_abs_diff_vs_numpy"],
        })

    title = f"{width}x{height}, alt-az, --debayer rgb, workers={args.workers}, {m['cpu']} ({m['cores']} cores)"
    print_table(f"stack_session end to end, {title}", e2e_rows)
    print()
    print_table("Per stage (stats['timings_s'], stack stage split by progress marks and a clip timer)", stage_rows)
    if clip_rows:
        print()
        print_table(f"Sigma clip (sigma {SIGMA:g}, maxiters {MAXITERS}, {CENFUNC}/{STDFUNC}) on one band of the "
                    f"warped stack", clip_rows)
        print()
        print_table("Agreement with astropy on that band", agree_rows)
    print(f"simulation: {sim_s:.1f} s (not part of the result); load average {load_before} before, "
          f"{load_after} after")
    extra = {
        "size": [width, height], "frames": frames, "workers": args.workers, "band_rows": args.band_rows,
        "repeat": args.repeat, "simulation_s": sim_s, "loadavg_before": load_before, "loadavg_after": load_after,
        "stages": stage_rows, "clip": clip_rows, "agreement": agree_rows, "runs": runs,
    }
    print("saved", save("stack", e2e_rows, extra))


if __name__ == "__main__":
    main()
