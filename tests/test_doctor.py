"""``dwarf3 doctor``: versions, GPU, compilers, kernel builds, self-test and a verdict; exit 0 when the CPU works."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from dwarf3gpu.backends import cpu_build, cuda, doctor, kernel_source
from dwarf3gpu.cli import app

runner = CliRunner()

SELF_TESTS = ("cpu: numpy reference", "cpu: kernels (g++/OpenMP build)", "cuda")


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_doctor_reports_and_passes_on_the_cpu(cache):
    result = runner.invoke(app, ["doctor"], terminal_width=240)
    assert result.exit_code == 0, result.output
    out = result.stdout
    for item in ("python", "dwarf3gpu", "numpy", "cupy", "c++", "nvrtc sm_80", "nvrtc sm_90", *SELF_TESTS):
        assert item in out, item
    assert "VERDICT: OK - CPU path works" in out
    reason = cuda.unavailable_reason()
    if reason:
        assert "GPU path not usable here" in out.replace("\n", "")


def test_doctor_rows_are_consistent(cache):
    assert (doctor.REFERENCE, doctor.CPU_BUILD) == SELF_TESTS[:2]
    rows = doctor.run_checks(cache_root=cache)
    by_item = {(r.section, r.item): r for r in rows}
    assert [r.item for r in rows if r.section == "self-test"] == list(SELF_TESTS)
    assert by_item[("self-test", doctor.REFERENCE)].status == doctor.OK
    n_files = len(kernel_source.kernel_files())
    assert by_item[("kernels", "sources")].detail.startswith(f"{n_files} files")
    if cpu_build.find_compiler():
        assert by_item[("kernels", "cpu build")].status == doctor.OK
        assert by_item[("self-test", doctor.CPU_BUILD)].status == doctor.OK
    else:
        assert by_item[("self-test", doctor.CPU_BUILD)].status == doctor.SKIP
    for arch in doctor.NVRTC_ARCHS:
        nvrtc = by_item[("kernels", f"nvrtc {arch}")]
        assert nvrtc.status in (doctor.OK, doctor.SKIP)
        if nvrtc.status == doctor.OK:  # every kernel file, the dark calibration's included
            assert nvrtc.detail == f"{n_files} files compiled"
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


def test_doctor_self_test_catches_a_wrong_kernel(cache, monkeypatch):
    """A CPU build whose results differ from the reference fails its self-test row and the CPU verdict."""
    if not cpu_build.find_compiler():
        pytest.skip("no C++ compiler (g++, c++ or $CXX)")
    real = cpu_build.CpuBuildTarget.launch

    def off_by_one(self, name, grid, block, *args):
        real(self, name, grid, block, *args)
        if name == "d3_debayer_mhc":
            args[-1][0, 0, 0] += 1.0

    monkeypatch.setattr(cpu_build.CpuBuildTarget, "launch", off_by_one)
    rows = doctor.run_checks(cache_root=cache)
    row = {(r.section, r.item): r for r in rows}[("self-test", doctor.CPU_BUILD)]
    assert row.status == doctor.FAIL and "mhc debayer differs" in row.detail
    ok, line = doctor.verdict(rows)
    assert not ok and line.startswith("VERDICT: BROKEN")
