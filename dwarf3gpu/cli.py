"""The ``dwarf3`` command line: a thin Typer + Rich layer over the Python API.

This is the only module that prints or exits. Library errors (:class:`~dwarf3gpu.errors.Dwarf3Error`) become a
one-paragraph message and an exit code: 0 ok, 1 processing failure, 2 usage error, 3 backend unavailable.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
import sys
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from . import __version__
from .errors import ConfigError, Dwarf3Error, SessionError

# wide tables stay readable when the output goes to a file or a pipe (Rich would assume 80 columns)
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True)

app = typer.Typer(
    name="dwarf3",
    help=(
        "Stack DWARF 3 (and other one-shot-colour smart-telescope) raw FITS sessions.\n\n"
        "Try [bold]dwarf3 demo[/] (simulate a session and stack it). On your data: "
        "[bold]dwarf3 frames SESSION[/] lists the light frames, [bold]dwarf3 frames SESSION --scored[/] explains "
        "the selection, [bold]dwarf3 stack SESSION[/] makes the master."
    ),
    context_settings={"help_option_names": ["-h", "--help"]},
    rich_markup_mode="rich",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


#: Settings and arguments of the Python API -> the flags that set them (library errors name the setting).
FLAGS = {
    "keep": "--keep", "score": "--score", "reference": "--reference", "align_mode": "--align-mode",
    "dark": "--dark", "device": "--device", "maxiters": "--maxiters", "feather_px": "--feather", "scnr": "--scnr",
    "memory_budget": "--memory-budget", "normalisation": "--normalisation", "frame_list": "--frame-list",
    "load_transforms": "--load-transforms", "backend": "--backend", "output_root": "--out", "workers": "--workers",
    "save_transforms": "--save-transforms", "save": "--save",
}

#: Exit status after Ctrl-C (SIGINT), the shells' 128 + 2.
EXIT_INTERRUPTED = 130


def error_text(exc: Dwarf3Error) -> str:
    """The message of a library error for the command line: the flag of its setting, then the problem."""
    if exc.setting:
        return f"{FLAGS.get(exc.setting, exc.setting)}: {exc.detail}"
    return str(exc)


def command(*args, **kwargs):
    """Register a Typer command whose :class:`Dwarf3Error` becomes a message on stderr and its exit code.

    Usage errors stay Click's (exit 2, with the usage line); anything else is a bug and keeps its traceback.
    """

    def register(func):
        @functools.wraps(func)
        def run(*a, **kw):
            try:
                with _warnings_as_lines():
                    return func(*a, **kw)
            except Dwarf3Error as exc:
                err_console.print(f"[bold red]error:[/] {escape(error_text(exc))}")
                raise typer.Exit(exc.exit_code) from None
            except KeyboardInterrupt:
                err_console.print(
                    "[bold red]interrupted[/] (Ctrl-C): stopped; every file already written is complete (no half-written "
                    "outputs) and the finished measurements are cached, so running the same command again resumes."
                )
                raise typer.Exit(EXIT_INTERRUPTED) from None

        return app.command(*args, **kwargs)(run)

    return register


@contextlib.contextmanager
def _warnings_as_lines():
    """Print each :class:`~dwarf3gpu.errors.Dwarf3Warning` raised in the block as one ``warning:`` line on stderr."""
    from .errors import Dwarf3Warning

    with warnings.catch_warnings():
        warnings.simplefilter("always", Dwarf3Warning)
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, Dwarf3Warning):
                err_console.print(f"[yellow]warning:[/] {escape(str(message))}")
            else:
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield


def _no_type_for_flags() -> None:
    """Show no ``<bool>`` beside on/off flags in the help (it invites ``--crop true``, which then reads ``true``
    as a session folder): a flag takes no value."""
    from typer.core import TyperOption

    show = TyperOption.display_type_rich
    if getattr(show, "_dwarf3_flags", False):
        return

    def display_type_rich(self, ctx):
        return None if self.is_flag and self.metavar is None else show(self, ctx)

    display_type_rich._dwarf3_flags = True
    TyperOption.display_type_rich = display_type_rich


_no_type_for_flags()


def _version_callback(value: bool) -> None:
    if value:
        console.print(f"dwarf3gpu {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        Optional[bool],
        typer.Option("--version", callback=_version_callback, is_eager=True, help="Print the version and exit."),
    ] = None,
) -> None:
    """Stack DWARF 3 raw FITS sessions."""


def progress_bar(*, disable: bool = False) -> Progress:
    """A Rich progress bar on stderr (so ``--json`` output on stdout stays clean); ``disable`` hides it."""
    return Progress(
        TextColumn("[bold blue]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
        disable=disable,
    )


def _parse_size(text: str) -> tuple[int, int]:
    """Parse ``WIDTHxHEIGHT`` (e.g. ``3856x2180``)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ConfigError(f"--size must look like 3856x2180 (width x height), got {text!r}") from None
    return w, h


def _check_simulated_frames(frames: int) -> None:
    """Usage error for a ``--frames`` below what the simulated session's bad frames need, saying why."""
    import dataclasses

    from .simulate import SimulationConfig

    defaults = {f.name: f.default for f in dataclasses.fields(SimulationConfig)}
    cloudy, trailed, seeing = defaults["n_cloudy"], defaults["n_trailed"], defaults["n_bad_seeing"]
    minimum = cloudy + trailed + seeing + 1
    if frames < minimum:
        raise ConfigError(
            f"--frames must be at least {minimum}, got {frames}: the simulated session holds {cloudy} cloudy, "
            f"{trailed} trailed and {seeing} badly seen light(s) besides a clean first light (the reference)"
        )


@command(
    epilog=(
        "Examples:\n\n"
        "  dwarf3 simulate demo                       # a full-size 24-frame alt-az session\n\n"
        "  dwarf3 simulate demo --frames 10 --size 960x540 --mode eq --seed 7\n\n"
        "  dwarf3 simulate demo --darks --rotation-rate 40"
    )
)
def simulate(
    out: Annotated[Path, typer.Argument(help="Folder to write into: OUT/rawData/<session>/ and OUT/truth/<session>/.")],
    frames: Annotated[int, typer.Option("--frames", "-n", help="Number of light frames (failed_ frames come on top).")] = 24,
    size: Annotated[str, typer.Option(help="Frame size WIDTHxHEIGHT; the DWARF 3 tele camera is 3856x2180.")] = "3856x2180",
    mode: Annotated[str, typer.Option(help="Mount mode: 'altaz' (field rotation) or 'eq' (drift only).")] = "altaz",
    rotation_rate: Annotated[float, typer.Option(help="Alt-az field rotation rate in degrees per hour.")] = 15.0,
    exposure: Annotated[float, typer.Option(help="Exposure per frame in seconds.")] = 15.0,
    gain: Annotated[int, typer.Option(help="Sensor gain written in headers and names.")] = 60,
    target: Annotated[str, typer.Option(help="Target name (kept with its spaces, like the device).")] = "M 31",
    darks: Annotated[bool, typer.Option("--darks", help="Also write a matching DWARF_DARK set and a CALI_FRAME master.")] = False,
    clutter: Annotated[bool, typer.Option(help="Write the device's by-products (stacked-16_, jpg, png, Thumbnail/).")] = True,
    seed: Annotated[int, typer.Option(help="Random seed; the same seed gives the same bytes.")] = 0,
) -> None:
    """Simulate a realistic DWARF 3 session with ground truth (stars, galaxy, rotation, clouds, trails, hot pixels)."""
    from .simulate import SimulationConfig, simulate_session

    width, height = _parse_size(size)
    _check_simulated_frames(frames)
    config = SimulationConfig(
        n_frames=frames, width=width, height=height, mode=mode, rotation_rate_deg_per_hour=rotation_rate,
        exposure_s=exposure, gain=gain, target=target, with_darks=darks, clutter=clutter, seed=seed,
    )
    with progress_bar() as bar:
        task = bar.add_task("simulating frames", total=None)
        result = simulate_session(out, config, progress=lambda done, total: bar.update(task, completed=done, total=total))
    console.print(f"[green]Session written:[/] {result.session_dir}")
    console.print(f"[green]Ground truth:[/]    {result.truth_dir}")
    if result.dark_dir is not None:
        console.print(f"[green]Dark set:[/]        {result.dark_dir}")
    console.print(f"Next: [bold]dwarf3 frames '{result.session_dir}'[/]")


@command(
    epilog=(
        "Examples:\n\n"
        "  dwarf3 frames 'Astronomy/DWARF_RAW_TELE_M 31_EXP_15_GAIN_60_2025-10-18-04-51-22-420'\n\n"
        "  dwarf3 frames SESSION --scored                 # measure, score, register; why each frame is dropped\n\n"
        "  dwarf3 frames SESSION --scored --keep 0.8 --max-fwhm 6 --save keep.txt\n\n"
        "  dwarf3 frames SESSION --scored --json > frames.json\n\n"
        "  dwarf3 frames ~/seestar/M94            # a plain folder of Seestar .fit lights works too"
    )
)
def frames(
    session: Annotated[Path, typer.Argument(help="Session folder (DWARF_RAW_...) or a folder of one-shot-colour FITS lights.")],
    scored: Annotated[bool, typer.Option("--scored", help="Measure every frame (stars, FWHM, background, noise), register it on the reference, score it and show the selection.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout (for scripts).")] = False,
    include_failed: Annotated[bool, typer.Option("--include-failed", help="Treat the device's failed_ frames as lights.")] = False,
    keep: Annotated[float, typer.Option(help="Fraction of the frames to keep, best scores first.")] = 0.92,
    score: Annotated[str, typer.Option(help="Score: 'weighted' (SNR-based, uses FWHM and transparency) or 'classic'.")] = "weighted",
    reference: Annotated[str, typer.Option(help="Reference frame: 'best' (highest score) or 'first'.")] = "best",
    align_mode: Annotated[str, typer.Option(help="'auto' (even-pixel shifts when field rotation < 0.1 deg, else affine), 'integer' or 'rgb_affine'.")] = "auto",
    max_fwhm: Annotated[Optional[float], typer.Option(help="Reject frames whose median star FWHM (px) is above this.")] = None,
    min_stars: Annotated[int, typer.Option(help="Reject frames with fewer detected stars.")] = 8,
    max_eccentricity: Annotated[Optional[float], typer.Option(help="Reject frames whose stars are more elongated (0 = round, 1 = line).")] = None,
    min_transparency: Annotated[Optional[float], typer.Option(help="Reject frames whose star flux relative to the reference is below this (clouds).")] = None,
    max_background: Annotated[Optional[float], typer.Option(help="Reject frames whose sky is brighter than this many times the session median.")] = None,
    workers: Annotated[Optional[int], typer.Option(min=1, help="Worker processes (default: all cores); results do not depend on it.")] = None,
    out: Annotated[Path, typer.Option(help="Output root; caches go to OUT/<session>/cache/.")] = Path("processedData"),
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Neither read nor write the cache.")] = False,
    cache_refresh: Annotated[bool, typer.Option("--cache-refresh", help="Recompute everything and overwrite the cache.")] = False,
    save: Annotated[Optional[Path], typer.Option(help="With --scored: write the kept frame names, one per line (input of --frame-list).")] = None,
) -> None:
    """List the light frames of a session and every excluded file with its reason; with --scored, also
    measure, score, register and select them.

    The session folder is only read; --scored writes its caches under OUT/<session>/cache/.
    """
    from .session import discover

    result = discover(session, include_failed=include_failed)
    if not result.lights:
        if not as_json:
            _print_session(result)
        raise SessionError(f"no light frames found in {session}: {_no_lights_hint(result)}")
    if not scored:
        if save is not None:
            raise ConfigError("--save needs --scored (the kept frames are only known after scoring)")
        if as_json:
            sys.stdout.write(json.dumps(result.to_json(), indent=2) + "\n")
        else:
            _print_session(result)
        return

    from .analysis import AnalysisConfig, analyze_session, output_dir_for
    from .quality import SelectionLimits

    config = AnalysisConfig(
        keep=keep, score=score, reference=reference, align_mode=align_mode,
        limits=SelectionLimits(max_fwhm, min_stars, max_eccentricity, min_transparency, max_background),
    )
    out_dir = output_dir_for(session, out)
    with progress_bar() as bar:
        tasks: dict[str, int] = {}

        def report(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done)

        analysis = analyze_session(
            result, config, out_dir=out_dir, workers=workers, use_cache=not no_cache,
            refresh_cache=cache_refresh, progress=report,
        )
    if save is not None:
        from .atomic import write_text_atomic

        from .atomic import output_errors

        with output_errors(save, setting="save"):
            write_text_atomic(save, "".join(r.frame.name + "\n" for r in analysis.kept))
    if as_json:
        sys.stdout.write(json.dumps({"session": result.to_json(), "analysis": analysis.to_json()}, indent=2) + "\n")
    else:
        _print_session(result, lights_table=False)
        _print_analysis(analysis)
        if save is not None:
            console.print(f"Kept frame names written to {save}")


def _print_analysis(analysis) -> None:
    """Per-frame metrics, score and decision, then a one-line summary."""
    table = Table(title="frames, scored", title_justify="left")
    columns = ("#", "file", "stars", "FWHM", "ecc", "bkg", "noise", "sat%", "transp", "rot deg", "rms px", "score", "decision")
    for col in columns:
        if col == "file":
            table.add_column(col, overflow="fold")  # never cut: names differ only at the end
        else:
            table.add_column(col, justify="left" if col == "decision" else "right")
    for i, r in enumerate(analysis.records):
        m, reg = r.metrics, r.registration
        ref = " (ref)" if i == analysis.reference_index else ""
        decision = "[green]kept[/]" + ref if r.decision.kept else f"[red]{r.decision.reason}[/] {escape(r.decision.detail)}"
        table.add_row(
            str(i), escape(r.frame.name),
            str(m.n_stars) if m else "-", _fmt(m.fwhm, ".2f") if m else "-", _fmt(m.eccentricity, ".2f") if m else "-",
            _fmt(m.background, ".0f") if m else "-", _fmt(m.noise, ".1f") if m else "-",
            _fmt(100 * m.saturated_fraction, ".3f") if m else "-", _fmt(m.transparency, ".2f") if m else "-",
            _fmt(reg.rotation_deg, ".2f") if reg and reg.ok else "-", _fmt(reg.rms_px, ".3f") if reg and reg.ok else "-",
            _fmt(r.score, ".3g"), decision,
        )
    console.print(table)
    reasons: dict[str, int] = {}
    for r in analysis.rejected:
        reasons[r.decision.reason] = reasons.get(r.decision.reason, 0) + 1
    why = ", ".join(f"{n} {k}" for k, n in sorted(reasons.items())) or "none"
    console.print(
        f"kept [bold]{len(analysis.kept)}[/] of {len(analysis.records)} (rejected: {why}); "
        f"reference {analysis.reference.frame.name}; field rotation {analysis.rotation_range_deg:.2f} deg "
        f"-> align mode [bold]{analysis.align_mode}[/]"
    )


def _no_lights_hint(result) -> str:
    """What to do when a folder has no usable lights, from what discovery saw."""
    reasons = {e.reason for e in result.excluded}
    hints = [w for w in result.metadata.warnings if "holds session folders" in w]
    if "device_failed" in reasons:
        hints.append("only failed_ frames are here; add --include-failed to use them")
    if "header_mismatch" in reasons or "unreadable" in reasons:
        hints.append("every FITS file was excluded; the table above says why")
    return "; ".join(hints) or (
        "expected DWARF lights named '<target>_<exp>s<gain>_<filter>_<time>_<temp>C.fits' "
        "or FITS files with IMAGETYP='Light'"
    )


def _fmt(value: float | None, spec: str = "g") -> str:
    """Number for tables; '?' when unknown or not finite."""
    if value is None or value != value:
        return "?"
    return format(value, spec)


def _print_session(result, *, lights_table: bool = True) -> None:
    """Print the metadata, lights (optional), excluded and calibration tables of a discovery result."""
    meta = result.metadata
    temps = (
        f"{_fmt(meta.temperature_min_c)}..{_fmt(meta.temperature_max_c)} C"
    )
    size = f"{meta.width}x{meta.height}" if meta.width else "?"
    console.print(
        f"[bold]{meta.target or meta.folder}[/]  {meta.device} {meta.camera or ''}  "
        f"exp {_fmt(meta.exposure_s)} s  gain {_fmt(meta.gain)}  "
        f"filter {meta.filter or '?'}  Bayer {meta.bayer_pattern or '?'}  {size}  sensor {temps}"
    )
    lights = Table(title=f"{len(result.lights)} light frames", title_justify="left")
    for col in ("#", "mid-exposure (UTC)", "exp s", "temp C", "size", "file"):
        lights.add_column(col, justify="right" if col in ("#", "exp s", "temp C") else "left")
    for i, f in enumerate(result.lights):
        mid = f.mid_time.isoformat(sep=" ", timespec="seconds") if f.mid_time else "?"
        lights.add_row(str(i), mid, _fmt(f.exposure_s), _fmt(f.temperature_c), f"{f.width}x{f.height}", escape(f.name))
    if result.lights and lights_table:
        console.print(lights)
    if result.excluded:
        table = Table(title=f"{len(result.excluded)} excluded", title_justify="left")
        for col in ("file", "reason", "detail"):
            table.add_column(col)
        for e in result.excluded:
            table.add_row(escape(e.path.name), e.reason, escape(e.detail))
        console.print(table)
    if result.calibration:
        table = Table(title="calibration found next to the session", title_justify="left")
        for col in ("kind", "path", "match", "why not"):
            table.add_column(col)
        for c in result.calibration:
            table.add_row(c.kind, str(c.path), "yes" if c.matches else "no", "; ".join(c.mismatches))
        console.print(table)
    for w in meta.warnings:
        console.print(f"[yellow]warning:[/] {escape(w)}")


def announce_cpu_build(backend: str) -> None:
    """One line before the first use of the CPU build: it is being compiled (once per machine and version), or,
    without a C++ compiler, that stacking falls back to NumPy and how to fix it."""
    if backend == "cuda":
        return
    from .backends import cuda_unavailable_reason
    from .backends.cpu_build import find_compiler, is_built

    if backend == "auto" and not cuda_unavailable_reason():
        return
    if find_compiler() is None:
        err_console.print("[yellow]warning:[/] no C++ compiler, so the CPU kernels cannot be built: stacking runs on "
                          "NumPy, about 5x slower. Install g++ (e.g. apt install g++) or set CXX.")
    elif not is_built():
        err_console.print("Building the CPU kernels (once per machine and version, about 10-20 s) ...")


def main() -> None:
    """Console-script entry point (``dwarf3``)."""
    app()


def _expand_sessions(paths: list[Path]) -> list[Path]:
    """Expand glob patterns the shell left alone (e.g. quoted, or on Windows); keep plain paths as given."""
    import glob

    out: list[Path] = []
    for p in paths:
        text = str(p)
        if not p.exists() and any(ch in text for ch in "*?["):
            matches = sorted(Path(m) for m in glob.glob(text) if Path(m).is_dir())
            if not matches:
                raise ConfigError(f"no session folder matches {text!r}")
            out.extend(matches)
        else:
            out.append(p)
    return out


def _stage_progress(bar: Progress):
    """A ``progress(stage, done, total)`` callback drawing one bar per stage."""
    tasks: dict[str, int] = {}

    def report(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = bar.add_task(stage, total=total)
        bar.update(tasks[stage], completed=done, total=total)

    return report


@command(
    epilog=(
        "Examples:\n\n"
        "  dwarf3 stack 'Astronomy/DWARF_RAW_TELE_M 31_EXP_15_GAIN_60_2025-10-18-04-51-22-420'\n\n"
        "  dwarf3 stack Astronomy/DWARF_RAW_TELE_* --out results      # several sessions\n\n"
        "  dwarf3 stack SESSION --debayer bayer-first --sigma 2.5 --keep 0.8\n\n"
        "  dwarf3 stack SESSION --dry-run                 # score, select and report only\n\n"
        "  dwarf3 frames SESSION --scored --save keep.txt && dwarf3 stack SESSION --frame-list keep.txt\n\n"
        "Outputs: OUT/<session>/stacked/master_linear.fits (float32, linear), coverage.fits, rejected.fits, "
        "master_quicklook.png/.tif, run_manifest.json, report.json, report.md. Exit code 0 when every "
        "session produced a master (or --dry-run succeeded), 1 otherwise, 2 for usage errors, 3 when "
        "--backend cuda cannot run, 130 when interrupted (Ctrl-C)."
    )
)
def stack(
    sessions: Annotated[list[Path], typer.Argument(help="One or more session folders (or a glob).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output root: results go to OUT/<session>/.")] = Path("processedData"),
    keep: Annotated[float, typer.Option(help="Fraction of the frames to keep, best scores first.")] = 0.92,
    score: Annotated[str, typer.Option(help="Frame score: 'weighted' (SNR-based) or 'classic'.")] = "weighted",
    sigma: Annotated[float, typer.Option(help="Sigma-clipping threshold (both sides).")] = 3.0,
    sigma_lower: Annotated[Optional[float], typer.Option(help="Lower threshold (default: --sigma).")] = None,
    sigma_upper: Annotated[Optional[float], typer.Option(help="Upper threshold (default: --sigma).")] = None,
    maxiters: Annotated[int, typer.Option(help="Maximum clipping iterations.")] = 5,
    cenfunc: Annotated[str, typer.Option(help="Clipping centre: 'median' or 'mean'.")] = "median",
    stdfunc: Annotated[str, typer.Option(help="Clipping spread: 'mad_std' (robust: rejects outliers even among few frames) or 'std'.")] = "mad_std",
    reference: Annotated[str, typer.Option(help="Reference frame: 'best' or 'first'.")] = "best",
    debayer: Annotated[str, typer.Option(help="'rgb' (debayer each frame, then warp: strong rotation), 'bayer-first', 'superpixel' (half size) or 'none' (CFA master).")] = "rgb",
    align_mode: Annotated[str, typer.Option(help="'auto', 'integer' (even-pixel shifts) or 'rgb_affine'.")] = "auto",
    interpolation: Annotated[str, typer.Option(help="Warp kernel: 'bilinear' or 'bicubic' (sharper).")] = "bilinear",
    demosaic: Annotated[str, typer.Option(help="RGB of --debayer rgb: 'lattice' (each colour resampled from its own CFA lattice, Lanczos: sharpest), 'chroma' (the same with red and blue resampled as colour differences from green: as sharp, no coloured rings around stars), or demosaic then warp with --interpolation: 'bilinear' or 'mhc' (Malvar-He-Cutler).")] = "lattice",
    normalisation: Annotated[str, typer.Option(help="Frame normalisation before rejection: 'additive', 'multiplicative' or 'none'.")] = "additive",
    weights: Annotated[str, typer.Option(help="Frame weights: 'none' or 'noise' (inverse variance).")] = "none",
    feather: Annotated[float, typer.Option(help="Feather frame edges over this many pixels (0: off).")] = 0.0,
    crop: Annotated[bool, typer.Option("--crop/--no-crop", help="Crop the master to the area every kept frame covers.")] = False,
    memory_budget: Annotated[Optional[str], typer.Option(help="Memory for the stacking tiles, e.g. 4G or 800M (default: half the available RAM, at most 1G; more memory only means fewer, larger tiles).")] = None,
    max_fwhm: Annotated[Optional[float], typer.Option(help="Reject frames whose median FWHM (px) is above this.")] = None,
    min_stars: Annotated[int, typer.Option(help="Reject frames with fewer detected stars.")] = 8,
    max_eccentricity: Annotated[Optional[float], typer.Option(help="Reject frames with more elongated stars.")] = None,
    min_transparency: Annotated[Optional[float], typer.Option(help="Reject frames whose star flux relative to the reference is below this.")] = None,
    max_background: Annotated[Optional[float], typer.Option(help="Reject frames whose sky exceeds this multiple of the median.")] = None,
    include_failed: Annotated[bool, typer.Option("--include-failed", help="Also use the device's failed_ frames.")] = False,
    workers: Annotated[Optional[int], typer.Option(min=1, help="Parallel workers (default: all cores); the result does not depend on it.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Measure, select, register and write the report; no stacking.")] = False,
    no_quicklook: Annotated[bool, typer.Option("--no-quicklook", help="Do not write the PNG/TIFF previews.")] = False,
    stretch: Annotated[str, typer.Option(help="Preview stretch: 'two_stage' or 'asinh'.")] = "two_stage",
    scnr: Annotated[float, typer.Option(help="Preview SCNR green removal, 0..1 (0: off).")] = 0.0,
    color_matrix: Annotated[str, typer.Option(help="Preview colour-matrix preset: 'identity' (the calibrated colours as they are), 'dwarf3' or 'seestar' (a mild saturation boost that keeps greys grey).")] = "identity",
    use_gpu: Annotated[bool, typer.Option("--use-gpu", help="Use the NVIDIA GPU (falls back to the CPU with a reason when it cannot).")] = False,
    backend: Annotated[str, typer.Option(help="Compute backend: 'auto', 'cpu' or 'cuda'.")] = "auto",
    device: Annotated[int, typer.Option(help="CUDA device number (with --backend cuda/auto or --use-gpu).")] = 0,
    dark: Annotated[str, typer.Option(help="Dark calibration: 'auto' (the DWARF_DARK set or CALI_FRAME master matched by exposure, gain and temperature, if any; without one, hot pixels are found in the lights themselves and repaired), 'none' (nothing applied), or the path of a FITS master dark. The dark is subtracted and its hot pixels repaired, unless a check on the reference light shows it adds outliers or noise (recorded in run_manifest.json).")] = "auto",
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Neither read nor write caches.")] = False,
    cache_refresh: Annotated[bool, typer.Option("--cache-refresh", help="Recompute everything and overwrite the caches.")] = False,
    frame_list: Annotated[Optional[Path], typer.Option(help="Stack only the frames named in this file (one per line; see frames --save).")] = None,
    save_transforms: Annotated[Optional[Path], typer.Option(help="Write the frame transforms to this JSON file.")] = None,
    load_transforms: Annotated[Optional[Path], typer.Option(help="Use the transforms in this JSON file instead of matching stars.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Print the per-frame table.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only errors and the output paths.")] = False,
) -> None:
    """Stack one or more sessions into a linear master, previews, a manifest and a report."""
    from .config import StackConfig
    from .pipeline import stack_session

    if use_gpu:
        from .backends import cuda_unavailable_reason

        backend = "cuda" if backend == "auto" else backend
        reason = cuda_unavailable_reason()
        if reason:
            err_console.print(f"[yellow]--use-gpu:[/] {escape(reason)}; processing on the CPU.")
            backend = "cpu"
    config = StackConfig(
        keep=keep, score=score, reference=reference, align_mode=align_mode, max_fwhm=max_fwhm, min_stars=min_stars,
        max_eccentricity=max_eccentricity, min_transparency=min_transparency, max_background=max_background,
        debayer=debayer, interpolation=interpolation, demosaic=demosaic, sigma=sigma, sigma_lower=sigma_lower, sigma_upper=sigma_upper,
        maxiters=maxiters, cenfunc=cenfunc, stdfunc=stdfunc, normalisation=normalisation, weights=weights,
        feather_px=feather, crop=crop, memory_budget=parse_memory(memory_budget) if memory_budget else None,
        include_failed=include_failed, quicklook=not no_quicklook, stretch=stretch, scnr=scnr,
        color_matrix=color_matrix, backend=backend, device=device, dark=dark,
    )
    if not dry_run and not quiet:
        announce_cpu_build(config.backend)
    names = None
    if frame_list is not None:
        try:
            names = frame_list.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ConfigError(f"cannot read --frame-list {frame_list}: {exc.strerror}") from None
    results, failures = [], []
    for path in _expand_sessions(sessions):
        try:
            with progress_bar(disable=quiet) as bar:
                result = stack_session(
                    path, out, config, workers=workers, use_cache=not no_cache, refresh_cache=cache_refresh,
                    frame_list=names, load_transforms=load_transforms, save_transforms=save_transforms,
                    dry_run=dry_run, progress=None if quiet else _stage_progress(bar),
                )
        except Dwarf3Error as exc:
            if len(sessions) == 1 and not any(ch in str(sessions[0]) for ch in "*?["):
                raise
            err_console.print(f"[bold red]error:[/] {escape(path.name)}: {escape(error_text(exc))}")
            failures.append(path)
            continue
        results.append((path, result))
        if verbose:
            _print_analysis(result.analysis)
    if results and not quiet:
        _print_stack_summary(results, dry_run)
    for path, result in results:
        target = result.outputs.get("master_linear") or result.outputs.get("report_md")
        console.print(f"{'report' if dry_run else 'master'}: {target}")
    if failures or not results:
        raise typer.Exit(1)


def _print_stack_summary(results, dry_run: bool) -> None:
    """One row per session: frames, rotation, FWHM, SNR proxy, time, where the outputs are."""
    table = Table(title="dry run (no stacking)" if dry_run else "stacked", title_justify="left")
    for col in ("session", "kept", "rotation deg", "FWHM px", "snr_proxy", "seconds", "output folder"):
        table.add_column(col, justify="left" if col in ("session", "output folder") else "right")
    for path, r in results:
        s = r.stats
        table.add_row(
            path.name, f"{s['frames_kept']}/{s['frames_total']}", _fmt(s["rotation_range_deg"], ".2f"),
            _fmt(s["fwhm_median_px"], ".2f"), _fmt(s.get("snr_proxy"), ".1f"), f"{s['timings_s']['total']:.1f}",
            str(r.outputs["report_md"].parent),
        )
    console.print(table)


@command(
    epilog=(
        "Examples:\n\n"
        "  dwarf3 demo                 # 16 full-size frames into ./dwarf3-demo (~40 s on 2 cores, 1.1 GB)\n\n"
        "  dwarf3 demo /tmp/demo --frames 10 --size 1928x1090   # a quicker look"
    )
)
def demo(
    folder: Annotated[Path, typer.Argument(help="Where to put the simulated session and the results.")] = Path("dwarf3-demo"),
    frames_count: Annotated[int, typer.Option("--frames", "-n", help="Light frames to simulate.")] = 16,
    size: Annotated[str, typer.Option(help="Frame size WIDTHxHEIGHT (the DWARF 3 tele camera's; smaller is faster).")] = "3856x2180",
    workers: Annotated[Optional[int], typer.Option(min=1, help="Parallel workers (default: all cores).")] = None,
) -> None:
    """Simulate a DWARF 3 alt-az session (with clouds, trails, hot pixels) and stack it: the whole job in about 40 s."""
    import shutil

    from .config import StackConfig
    from .pipeline import stack_session
    from .simulate import SimulationConfig, simulate_session

    width, height = _parse_size(size)
    _check_simulated_frames(frames_count)
    for sub in ("rawData", "truth", "processedData"):
        if (folder / sub).exists():
            shutil.rmtree(folder / sub)
    announce_cpu_build("auto")
    with progress_bar() as bar:
        task = bar.add_task("simulating", total=None)
        sim = simulate_session(
            folder, SimulationConfig(n_frames=frames_count, width=width, height=height, rotation_rate_deg_per_hour=60.0),
            progress=lambda done, total: bar.update(task, completed=done, total=total),
        )
        result = stack_session(sim.session_dir, folder / "processedData", StackConfig(), workers=workers,
                               progress=_stage_progress(bar))
    _print_stack_summary([(sim.session_dir, result)], False)
    console.print(f"[green]Simulated session:[/] {sim.session_dir}")
    for key in ("master_linear", "quicklook_png", "report_md", "manifest"):
        if key in result.outputs:
            console.print(f"[green]{key}:[/] {result.outputs[key]}")


@command(
    epilog=(
        "Examples:\n\n"
        "  dwarf3 cache SESSION                    # what is cached\n\n"
        "  dwarf3 cache SESSION --clear-transforms # re-match stars next time\n\n"
        "  dwarf3 cache SESSION --clear            # remove every cache of the session"
    )
)
def cache(
    session: Annotated[Path, typer.Argument(help="Session folder (its cache lives in OUT/<session>/cache/).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output root used when stacking.")] = Path("processedData"),
    clear: Annotated[bool, typer.Option("--clear", help="Remove every cache of the session.")] = False,
    clear_transforms: Annotated[bool, typer.Option("--clear-transforms", help="Remove the cached transforms.")] = False,
    clear_stack: Annotated[bool, typer.Option("--clear-stack", help="Remove the cached stacked intermediates.")] = False,
) -> None:
    """Show or clear the caches of a session (scores, transforms, master darks, stacked intermediates, colour
    calibration)."""
    import shutil

    from .analysis import output_dir_for
    from .cache import CACHE_ENTRIES, cache_dir, cache_path

    out_dir = output_dir_for(session, out)
    folder = cache_dir(out_dir)
    targets = []
    if clear:
        targets = [folder]
    else:
        if clear_transforms:
            targets.append(cache_path(out_dir, "transforms.json"))
        if clear_stack:
            targets.append(cache_path(out_dir, "stack"))
    for target in targets:
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        console.print(f"removed {target}")
    if targets:
        return
    if not folder.is_dir():
        console.print(f"no cache for {session.name} under {folder.parent}")
        return
    table = Table(title=f"cache of {session.name}", title_justify="left")
    for col in ("entry", "what", "frames", "size"):
        table.add_column(col, justify="right" if col in ("frames", "size") else "left")
    for path in sorted(folder.iterdir()):
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size
        frames = "-"
        if path.name in ("scores.json", "transforms.json"):  # the per-frame caches
            try:
                frames = str(len(json.loads(path.read_text()).get("frames", {})))
            except (ValueError, AttributeError):
                frames = "?"
        what = CACHE_ENTRIES.get(path.name, "not a cache of this version")
        if path.name == "stack":
            frames = f"{len(list(path.iterdir()))} stack(s)"
        table.add_row(path.name, what, frames, f"{size / 1e6:.1f} MB")
    console.print(table)


@command(
    epilog=(
        "Examples:\n\n"
        "  dwarf3 doctor            # versions, GPU, compilers, kernel builds, self-test, verdict\n\n"
        "Exit code 0 when the CPU path works (the GPU is optional), 1 otherwise."
    )
)
def doctor() -> None:
    """Check this machine: versions, CuPy/CUDA/driver, GPU, compilers, kernel builds for every target, a self-test."""
    from .backends.doctor import run_checks, verdict

    rows = run_checks()
    colours = {"ok": "green", "info": "cyan", "warn": "yellow", "FAIL": "bold red", "skip": "dim"}
    table = Table(title="dwarf3 doctor", title_justify="left")
    for col in ("section", "check", "status", "detail"):
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(row.section, row.item, f"[{colours.get(row.status, 'white')}]{row.status}[/]", escape(row.detail))
    console.print(table)
    ok, line = verdict(rows)
    console.print(line, markup=False)
    if not ok:
        raise typer.Exit(1)


_MEMORY_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(?:([kmgt])(?:i?b)?|b)?\s*$", re.IGNORECASE)


def parse_memory(text: str) -> int:
    """Bytes from a ``--memory-budget`` value: a number with an optional binary unit.

    ``K``, ``M``, ``G``, ``T`` (also ``KB``/``KiB`` ...; case-insensitive) are powers of 1024; a bare number is
    bytes. Examples: ``4G`` = 4294967296, ``512M``, ``1.5g``, ``800MiB``.

    Raises
    ------
    ConfigError
        If the text cannot be read or the amount is not positive.
    """
    match = _MEMORY_RE.match(str(text))
    if not match:
        raise ConfigError(f"--memory-budget {text!r} is not a memory size; use e.g. 4G or 512M")
    number, unit = float(match.group(1)), (match.group(2) or "").lower()
    value = number * 1024 ** ("kmgt".index(unit) + 1) if unit else number
    if not value >= 1:
        raise ConfigError(f"--memory-budget {text!r} must be at least one byte; use e.g. 4G or 512M")
    return int(value)
