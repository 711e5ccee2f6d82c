"""The dwarf3 command line: help, version, exit codes, JSON output, and that sessions are only read."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from dwarf3gpu import __version__
from dwarf3gpu.cli import app


runner = CliRunner()


def test_version_and_module_entry_point():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output
    proc = subprocess.run([sys.executable, "-m", "dwarf3gpu", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and __version__ in proc.stdout


@pytest.mark.parametrize("command", [[], ["simulate"], ["frames"], ["stack"], ["demo"], ["cache"]])
@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help_everywhere(command, flag):
    result = runner.invoke(app, [*command, flag], terminal_width=200)
    assert result.exit_code == 0
    assert "Usage" in result.output
    if command:
        assert "Examples" in result.output


def test_usage_error_exit_code_2():
    assert runner.invoke(app, ["frames"]).exit_code == 2
    assert runner.invoke(app, ["frames", "x", "--no-such-option"]).exit_code == 2


def test_missing_session_is_a_clear_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "dwarf3gpu", "frames", str(tmp_path / "nope")], capture_output=True, text=True
    )
    assert proc.returncode == 1
    assert "session folder not found" in proc.stderr and "Traceback" not in proc.stderr


def test_frames_json_on_real_frames_and_nothing_written(hash_tree, realdata):
    folder = realdata("seestar_m94_s2")
    before = hash_tree(folder)
    result = runner.invoke(app, ["frames", str(folder), "--json"])
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert len(data["lights"]) == 6
    assert data["metadata"]["bayer_pattern"] == "GRBG"
    table = runner.invoke(app, ["frames", str(folder)], terminal_width=200)
    assert table.exit_code == 0 and "6 light frames" in table.output
    assert hash_tree(folder) == before


def test_frames_on_empty_folder_fails_with_exit_1(tmp_path):
    result = runner.invoke(app, ["frames", str(tmp_path)])
    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit)  # handled, not a crash
    assert "no light frames found" in result.stderr and "IMAGETYP" in result.stderr


def test_demo_simulates_and_stacks(tmp_path):
    """`dwarf3 demo` (small frames here) writes a session, a master, previews and a report, and exits 0."""
    result = runner.invoke(app, ["demo", str(tmp_path / "demo"), "--frames", "6", "--size", "384x256",
                                 "--workers", "1"], terminal_width=200)
    assert result.exit_code == 0, result.output
    masters = list((tmp_path / "demo" / "processedData").glob("*/stacked/master_linear.fits"))
    assert len(masters) == 1
    out = masters[0].parent.parent
    assert (out / "master_quicklook.png").is_file() and (out / "report.md").is_file()
    assert "master_linear" in result.output


@pytest.mark.parametrize("compiler, built, expected", [
    (None, False, "no C++ compiler"),
    ("/usr/bin/g++", False, "Building the CPU kernels"),
    ("/usr/bin/g++", True, None),
])
def test_the_cpu_build_is_announced_once(tmp_path, monkeypatch, compiler, built, expected):
    """Before stacking on the CPU: one line while the kernels are first compiled, a warning with the fix when they
    cannot be, nothing once they are built."""
    from dwarf3gpu.backends import cpu_build

    monkeypatch.setattr(cpu_build, "find_compiler", lambda: compiler)
    monkeypatch.setattr(cpu_build, "is_built", lambda *a, **k: built)
    result = runner.invoke(app, ["stack", str(tmp_path / "no-such-session"), "--backend", "cpu", "--out",
                                 str(tmp_path / "out")], terminal_width=200)
    assert result.exit_code != 0  # the session does not exist: the line comes before any work
    if expected is None:
        assert "no C++ compiler" not in result.output and "Building the CPU kernels" not in result.output
    else:
        assert expected in result.output
