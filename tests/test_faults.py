"""Fault cases: damaged inputs, output folders that cannot be written, damaged caches, interrupts and bad
option values. Each must end in one plain line naming the file and the fix (or a warning and a recovery),
never a traceback, and the rest of the session must still be listed and stacked."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from typer.testing import CliRunner

from dwarf3gpu.cli import app
from dwarf3gpu.simulate import SimulationConfig, simulate_session

runner = CliRunner()

# six clean lights of 256 x 192: a stack takes a few seconds
TINY = SimulationConfig(
    n_frames=6, width=256, height=192, n_failed=0, n_cloudy=0, n_trailed=0, n_bad_seeing=0, clutter=False, seed=3,
    stars_per_megapixel=3000.0, rotation_rate_deg_per_hour=100.0,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The TINY session, simulated once for this module (read-only: copy it before damaging it)."""
    return simulate_session(tmp_path_factory.mktemp("tiny"), TINY).session_dir


def _copy(session: Path, where: Path) -> Path:
    target = where / session.name
    shutil.copytree(session, target)
    return target


def _lights(session: Path) -> list[Path]:
    return sorted(session.glob("*.fits"))


def _set_card(path: Path, key: str, value: str) -> None:
    """Overwrite the value of header card ``key`` with raw text (as a damaged or foreign file would have it)."""
    raw = bytearray(path.read_bytes())
    for i in range(0, 2880 * 4, 80):
        if raw[i:i + 8].decode().rstrip() == key:
            raw[i:i + 80] = f"{key:<8}= {value:>20}".ljust(80).encode()
            path.write_bytes(bytes(raw))
            return
    raise AssertionError(f"no {key} card in {path}")


def _stack(session: Path, out: Path, *extra: str):
    return runner.invoke(app, ["stack", str(session), "--out", str(out), "--workers", "1", *extra], terminal_width=200)


def _no_traceback(result) -> None:
    assert "Traceback" not in result.output, result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.exception


# -------------------------------------------------------------------------------- unparsable header cards


@pytest.mark.parametrize("key, value", [("EXPTIME", "abc"), ("NAXIS1", "abc"), ("GAIN", "1.2.3")])
def test_unparsable_card_makes_that_light_unreadable(tiny, tmp_path, key, value):
    session = _copy(tiny, tmp_path)
    bad = _lights(session)[2]
    _set_card(bad, key, value)

    listed = runner.invoke(app, ["frames", str(session), "--json"])
    _no_traceback(listed)
    assert listed.exit_code == 0, listed.output
    data = json.loads(listed.stdout)
    excluded = {Path(e["path"]).name: e for e in data["excluded"]}
    assert excluded[bad.name]["reason"] == "unreadable"
    assert key in excluded[bad.name]["detail"]
    assert len(data["lights"]) == len(_lights(session)) - 1

    stacked = _stack(session, tmp_path / "out", "--no-quicklook")
    _no_traceback(stacked)
    assert stacked.exit_code == 0, stacked.output
    manifest = json.loads((tmp_path / "out" / session.name / "run_manifest.json").read_text())
    assert bad.name not in json.dumps(manifest["analysis"])  # measured: the other lights only
    header = fits.getheader(tmp_path / "out" / session.name / "stacked" / "master_linear.fits")
    assert header["NCOMBINE"] >= len(_lights(session)) - 2  # the others stacked (the selection keeps 92 %)


# -------------------------------------------------------------------------------- output write failures


def _one_error_line(result, *words: str) -> str:
    _no_traceback(result)
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())
    assert "error:" in text, result.output
    for word in words:
        assert word in text, (word, result.output)
    return text


def _no_measuring(monkeypatch):
    """Fail the test when the measuring starts: output problems must be found before."""
    import dwarf3gpu.pipeline

    def refuse(*a, **k):
        raise AssertionError("measuring started before the output folder was checked")

    monkeypatch.setattr(dwarf3gpu.pipeline, "analyze_session", refuse)


def test_out_under_a_regular_file(tiny, tmp_path, monkeypatch):
    blocker = tmp_path / "afile"
    blocker.write_text("not a folder")
    _no_measuring(monkeypatch)
    text = _one_error_line(_stack(tiny, blocker / "results"), "--out", "afile", "a file is in the way")
    assert "move that file or choose another folder" in text


def test_read_only_output_folder(tiny, tmp_path, monkeypatch):
    import dwarf3gpu.atomic

    out = tmp_path / "ro"
    out.mkdir()

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system", str(out / tiny.name))

    monkeypatch.setattr(dwarf3gpu.atomic.tempfile, "mkstemp", read_only)
    _no_measuring(monkeypatch)
    _one_error_line(_stack(tiny, out), "--out", "cannot write", "read-only", "writable disk")


def test_output_folder_without_permission(tiny, tmp_path, monkeypatch):
    out = tmp_path / "locked"
    out.mkdir()
    out.chmod(0o555)
    try:
        probe = out / "probe"
        try:
            probe.write_text("x")
        except PermissionError:
            pass
        else:
            probe.unlink()
            pytest.skip("running with permission to write anywhere (root)")
        _no_measuring(monkeypatch)
        _one_error_line(_stack(tiny, out), "--out", "cannot write", "no permission")
    finally:
        out.chmod(0o755)


def test_full_disk_while_writing_the_master(tiny, tmp_path, monkeypatch):
    import dwarf3gpu.fitsio

    def full(self, name, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(name))

    monkeypatch.setattr(dwarf3gpu.fitsio.fits.PrimaryHDU, "writeto", full)
    text = _one_error_line(_stack(tiny, tmp_path / "out", "--no-cache"), "cannot write", "disk is full", "free some space")
    assert ".part" in text or "master" in text or "stacked" in text
    assert not list((tmp_path / "out").rglob("*.part")), "a temporary file was left behind"


# -------------------------------------------------------------------------------- damaged caches


@pytest.fixture(scope="module")
def cached_run(tiny, tmp_path_factory):
    """A stacked run with its caches, and the master's pixels."""
    out = tmp_path_factory.mktemp("cached") / "out"
    result = _stack(tiny, out, "--no-quicklook")
    assert result.exit_code == 0, result.output
    master = out / tiny.name / "stacked" / "master_linear.fits"
    return out, fits.getdata(master)


def _damage_mean(cache: Path) -> None:
    mean = next(cache.glob("stack/*/mean.fits"))
    mean.write_bytes(mean.read_bytes()[:5000])


def _damage_meta(cache: Path) -> None:
    next(cache.glob("stack/*/meta.json")).write_text("{not json")


def _damage_scores(cache: Path) -> None:
    (cache / "scores.json").write_text('{"format": 1, "frames": [1, 2')


def _damage_transforms(cache: Path) -> None:
    (cache / "transforms.json").write_bytes(b"\x00\xff" * 10)


@pytest.mark.parametrize("damage", [_damage_mean, _damage_meta, _damage_scores, _damage_transforms],
                         ids=["truncated-mean", "garbage-meta", "damaged-scores", "binary-transforms"])
def test_damaged_cache_entry_is_recomputed(tiny, tmp_path, cached_run, damage):
    out_src, master = cached_run
    out = tmp_path / "out"
    shutil.copytree(out_src, out)
    damage(out / tiny.name / "cache")
    result = _stack(tiny, out, "--no-quicklook")
    _no_traceback(result)
    assert result.exit_code == 0, result.output
    assert "warning:" in result.output and "damaged cache entry" in " ".join(result.output.split())
    again = fits.getdata(out / tiny.name / "stacked" / "master_linear.fits")
    np.testing.assert_array_equal(again, master)
    # the entry was rewritten: the next run uses it without a warning
    third = _stack(tiny, out, "--no-quicklook")
    assert third.exit_code == 0 and "damaged cache entry" not in " ".join(third.output.split())


# -------------------------------------------------------------------------------- interrupts and option values


def test_interrupt_exits_130_with_one_line(tiny, tmp_path, monkeypatch):
    import dwarf3gpu.pipeline

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(dwarf3gpu.pipeline, "stack_session", interrupted)
    result = _stack(tiny, tmp_path / "out")
    assert result.exit_code == 130, result.output
    assert "Traceback" not in result.output
    assert "interrupted" in result.output


@pytest.mark.parametrize("command", ["stack", "frames", "demo"])
@pytest.mark.parametrize("value", ["-1", "0"])
def test_workers_below_one_is_a_usage_error(tiny, tmp_path, command, value):
    args = [command] + ([] if command == "demo" else [str(tiny)]) + ["--workers", value]
    if command == "demo":
        args.insert(1, str(tmp_path / "demo"))
    result = runner.invoke(app, args, terminal_width=200)
    assert result.exit_code == 2, result.output
    assert "--workers" in result.output
    assert not (tmp_path / "demo").exists()


def test_tiny_memory_budget_names_the_needed_size_before_measuring(tiny, tmp_path, monkeypatch):
    _no_measuring(monkeypatch)
    result = _stack(tiny, tmp_path / "out", "--memory-budget", "1K")
    _no_traceback(result)
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "--memory-budget" in text and "1 KiB" in text and "too small" in text
    assert " 0 MiB" not in text
    assert "needs" in text and "MiB" in text.split("needs", 1)[1]


def test_no_cache_writes_no_cache(tiny, tmp_path):
    out = tmp_path / "out"
    result = _stack(tiny, out, "--no-cache", "--no-quicklook")
    assert result.exit_code == 0, result.output
    assert not (out / tiny.name / "cache" / "colour_calibration.json").exists()
    assert not (out / tiny.name / "cache").exists()


@pytest.mark.parametrize("command", ["simulate", "demo"])
def test_too_few_simulated_frames_is_a_usage_error(tmp_path, command):
    result = runner.invoke(app, [command, str(tmp_path / "sim"), "--frames", "3", "--size", "256x192"],
                           terminal_width=200)
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "--frames must be at least 6" in text and "cloudy" in text
    assert not (tmp_path / "sim" / "rawData").exists()


# -------------------------------------------------------------------------------- tables and help


def test_scored_table_keeps_whole_file_names(tiny, tmp_path):
    """Seestar names differ only near their end; the table must not cut them."""
    folder = tmp_path / "M94"
    folder.mkdir()
    names = []
    for i, light in enumerate(_lights(tiny)):
        name = f"Light_M 94_10.0s_IRCUT_20250312-2035{10 + i:02d}_{i:04d}.fits"
        shutil.copy(light, folder / name)
        with fits.open(folder / name, mode="update") as hdul:
            hdul[0].header["IMAGETYP"] = "Light"
        names.append(name)
    result = runner.invoke(app, ["frames", str(folder), "--scored", "--workers", "1", "--out", str(tmp_path / "o")],
                           terminal_width=200)
    assert result.exit_code == 0, result.output
    for name in names:
        assert name in result.output, (name, result.output)
    assert "…" not in result.output


@pytest.mark.parametrize("command", ["stack", "frames", "simulate", "demo", "cache"])
def test_help_shows_flags_without_a_value(command):
    result = runner.invoke(app, [command, "--help"], terminal_width=200)
    assert result.exit_code == 0
    assert "<bool>" not in result.output


def test_crop_is_an_on_off_flag_and_color_matrix_lists_presets():
    from dwarf3gpu.color import COLOR_MATRIX_PRESETS

    text = " ".join(runner.invoke(app, ["stack", "--help"], terminal_width=200).output.split())
    assert "--no-crop" in text
    after = text.split("--color-matrix", 1)[1][:400]
    for preset in COLOR_MATRIX_PRESETS:
        assert f"'{preset}'" in after, preset


def test_an_input_read_error_is_not_called_an_output_error(tmp_path):
    """Only errors about writing under the output folder become OutputError; a failed read of an input passes."""
    from dwarf3gpu.atomic import output_errors
    from dwarf3gpu.errors import OutputError

    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError):
        with output_errors(out):
            open(tmp_path / "session" / "missing.fits", "rb")
    with pytest.raises(OutputError, match="cannot write"):
        with output_errors(out):
            open(out / "missing-folder" / "master.fits", "wb")
