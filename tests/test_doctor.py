"""``dwarf3 doctor``: versions, GPU, compilers, kernel builds, self-test and a verdict; exit 0 when the CPU works."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from dwarf3gpu.backends import cuda, doctor, native
from dwarf3gpu.cli import app

runner = CliRunner()


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_doctor_reports_and_passes_on_the_cpu(cache):
    result = runner.invoke(app, ["doctor"], terminal_width=240)
    assert result.exit_code == 0, result.output
    out = result.stdout
    for item in ("python", "dwarf3gpu", "numpy", "cupy", "c++", "nvrtc sm_80", "nvrtc sm_90", "cpu (numpy)", "cuda"):
        assert item in out, item
    assert "VERDICT: OK - CPU path works" in out
    reason = cuda.unavailable_reason()
    if reason:
        assert "GPU path not usable here" in out.replace("\n", "")


def test_doctor_rows_are_consistent(cache):
    rows = doctor.run_checks(cache_root=cache)
    by_item = {(r.section, r.item): r for r in rows}
    assert by_item[("self-test", "cpu (numpy)")].status == doctor.OK
    if native.find_compiler():
        assert by_item[("kernels", "cpu build")].status == doctor.OK
        assert by_item[("self-test", "cpu kernels (g++/OpenMP)")].status == doctor.OK
    for arch in doctor.NVRTC_ARCHS:
        assert by_item[("kernels", f"nvrtc {arch}")].status in (doctor.OK, doctor.SKIP)
    if cuda.unavailable_reason():
        assert by_item[("self-test", "cuda")].status == doctor.SKIP
    ok, line = doctor.verdict(rows)
    assert ok and line.startswith("VERDICT: OK")


def test_doctor_exits_1_when_the_cpu_path_fails(cache, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("broken on purpose")

    monkeypatch.setattr("dwarf3gpu.debayer.debayer_bilinear", broken)
    result = runner.invoke(app, ["doctor"], terminal_width=240)
    assert result.exit_code == 1, result.output
    assert "VERDICT: BROKEN" in result.stdout
