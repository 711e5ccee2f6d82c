"""Session discovery on sessions built from the real DWARF 3 header dumps and on real Seestar frames."""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timedelta

import numpy as np
import pytest
from astropy.io import fits

from dwarf3gpu.errors import SessionError
from dwarf3gpu.fitsio import write_raw_uint16
from dwarf3gpu.session import discover, list_lights, parse_light_name, parse_session_folder_name


SESSION_NAME = "DWARF_RAW_TELE_IC 434_EXP_60_GAIN_60_2025-10-18-04-51-22-420"


def tiny(header: fits.Header, shape=(8, 12), value=1000) -> tuple[np.ndarray, fits.Header]:
    """Data and a copy of a real header resized to a tiny frame."""
    h = header.copy()
    data = np.full(shape, value, np.uint16) if len(shape) == 2 else np.full(shape, value, np.uint16)
    return data, h


def light_name(end: datetime, temp: int = 16, target: str = "IC 434") -> str:
    """DWARF 3 light name; the name's time is DATE-OBS (end of exposure)."""
    return f"{target}_60s60_Astro_{end:%Y%m%d-%H%M%S}{end.microsecond // 1000:03d}_{temp}C.fits"


def write_light(folder, header, end, temp=16, shape=(8, 12), prefix="", **changes):
    """Write a tiny DWARF 3 light from the real header with DATE-OBS = ``end``."""
    h = header.copy()
    h["DATE-OBS"] = end.isoformat(timespec="milliseconds")
    h["DET-TEMP"] = temp
    for key, value in changes.items():
        h[key.replace("_", "-")] = value
    path = folder / (prefix + light_name(end, temp))
    write_raw_uint16(np.full(shape, 1000, np.uint16), path, h)
    return path


@pytest.fixture
def dumps(header_from_dump, realdata):
    root = realdata("dwarf3_reference_text")
    return {
        "light": header_from_dump(root / "typ-light_IC434.txt"),
        "dark": header_from_dump(root / "typ-raw-dark_DWARF_DARK.txt"),
        "cali": header_from_dump(root / "typ-CALI_FRAME.txt"),
        "stack": header_from_dump(root / "typ-stacked-16.txt"),
        "shots": root / "shotsInfo_IC434.json",
    }


@pytest.fixture
def dwarf_card(tmp_path, dumps):
    """A card-like tree: Astronomy/<session> with lights, failed, stack, clutter; DWARF_DARK; CALI_FRAME."""
    astro = tmp_path / "Astronomy"
    session = astro / SESSION_NAME
    session.mkdir(parents=True)
    shutil.copy(dumps["shots"], session / "shotsInfo.json")
    t0 = datetime(2025, 10, 18, 4, 52, 22, 420000)
    lights = []
    # written out of order on purpose: discovery must sort by time
    for i in (3, 0, 2, 1, 4, 5):
        lights.append(write_light(session, dumps["light"], t0 + timedelta(seconds=61 * i), temp=13 + i // 2))
    write_light(session, dumps["light"], t0 + timedelta(seconds=61 * 6), prefix="failed_")
    write_light(session, dumps["light"], t0 + timedelta(seconds=61 * 7), shape=(10, 12))  # size mismatch
    write_light(session, dumps["light"], t0 + timedelta(seconds=61 * 8), EXPTIME=30.0)  # exposure mismatch
    write_light(session, dumps["light"], t0 + timedelta(seconds=61 * 9), BAYERPAT="GRBG")  # pattern mismatch
    write_light(session, dumps["light"], t0 + timedelta(seconds=61 * 10), OBJECT="M 42")  # another target
    stack = dumps["stack"].copy()
    write_raw_uint16(np.zeros((3, 8, 12), np.uint16), session / "stacked-16_IC 434_60s60_Astro_20251018-045127226.fits", stack)
    write_raw_uint16(np.zeros((8, 12), np.uint16), session / "0a1b2c3d4e5f60718293a4b5c6d7e8f9.fits")  # hash-named
    for name in ("stacked.jpg", "stacked_thumbnail.jpg", "img_reference.png", "img_stacked_all.tif",
                 "img_stacked_counter.png", "stacked-16_IC 434_60s60_Astro_20251018-045127226.png"):
        (session / name).write_bytes(b"\x89PNG not really")
    (session / "Thumbnail").mkdir()
    (session / "Thumbnail" / "a.jpg").write_bytes(b"jpg")
    (session / (light_name(t0 + timedelta(seconds=61 * 11)))).write_bytes(b"SIMPLE  =  T")  # truncated light
    # calibration next to the session
    dark_set = astro / "DWARF_DARK" / "tele_exp_60_gain_60_bin_1_2025-10-20-03-20-10-952"
    dark_set.mkdir(parents=True)
    for i in range(3):
        h = dumps["dark"].copy()
        write_raw_uint16(np.zeros((8, 12), np.uint16), dark_set / f"raw_60s_60_000{i}_20251020-03231018{i}_15C.fits", h)
    hot = astro / "DWARF_DARK" / "tele_exp_60_gain_60_bin_1_2025-07-01-03-20-10-952"
    hot.mkdir()
    write_raw_uint16(np.zeros((8, 12), np.uint16), hot / "raw_60s_60_0000_20250701-032310186_35C.fits", dumps["dark"])
    other = astro / "DWARF_DARK" / "tele_exp_15_gain_60_bin_1_2025-10-20-03-20-10-952"
    other.mkdir()
    write_raw_uint16(np.zeros((8, 12), np.uint16), other / "raw_15s_60_0000_20251020-032310186_15C.fits", dumps["dark"])
    for kind, name in (("dark", "dark_exp_60.000000_gain_60_bin_1_15C_stack_8.fits"),
                       ("bias", "bias_gain_2_bin_1.fits"), ("flat", "flat_gain_2_bin_1_ir_1.fits"),
                       ("flat", "flat_gain_2_bin_1_ir_0.fits")):
        folder = astro / "CALI_FRAME" / kind / "cam_0"
        folder.mkdir(parents=True, exist_ok=True)
        write_raw_uint16(np.zeros((8, 12), np.uint16), folder / name, dumps["cali"])
    return session, sorted(lights)


def test_lights_strict_and_in_observation_order(dwarf_card):
    session, lights = dwarf_card
    result = discover(session)
    assert [f.path for f in result.lights] == sorted(lights)  # names sort in time order here
    times = [f.mid_time for f in result.lights]
    assert times == sorted(times)
    assert list_lights(session) == [f.path for f in result.lights]


def test_every_other_entry_excluded_with_its_reason(dwarf_card):
    session, _ = dwarf_card
    reasons = {e.path.name: e.reason for e in discover(session).excluded}
    by_reason = {}
    for name, reason in reasons.items():
        by_reason.setdefault(reason, []).append(name)
    assert len(by_reason["header_mismatch"]) == 3
    assert by_reason["device_failed"][0].startswith("failed_")
    assert by_reason["device_stack"] == ["stacked-16_IC 434_60s60_Astro_20251018-045127226.fits"]
    assert "0a1b2c3d4e5f60718293a4b5c6d7e8f9.fits" in by_reason["not_a_light"]
    assert "Thumbnail" in by_reason["device_by_product"] and "stacked.jpg" in by_reason["device_by_product"]
    assert by_reason["metadata"] == ["shotsInfo.json"]
    assert len(by_reason["foreign_target"]) == 1 and len(by_reason["unreadable"]) == 1
    details = {e.path.name: e.detail for e in discover(session).excluded if e.reason == "header_mismatch"}
    assert any("exposure_s 30.0 vs 60.0" in d for d in details.values())
    assert any("height 10 vs 8" in d for d in details.values())
    assert any("bayer_pattern 'GRBG' vs 'RGGB'" in d for d in details.values())


def test_include_failed_uses_failed_frames(dwarf_card):
    session, lights = dwarf_card
    result = discover(session, include_failed=True)
    assert len(result.lights) == len(lights) + 1
    assert any(f.name.startswith("failed_") for f in result.lights)


def test_metadata_from_folder_headers_and_shotsinfo(dwarf_card):
    session, _ = dwarf_card
    result = discover(session)
    meta = result.metadata
    assert (meta.device, meta.date_obs_marks, meta.target, meta.camera) == ("DWARF 3", "end", "IC 434", "TELE")
    assert (meta.exposure_s, meta.gain, meta.filter, meta.bayer_pattern) == (60.0, 60.0, "Astro", "RGGB")
    assert (meta.width, meta.height) == (12, 8)
    assert (meta.temperature_min_c, meta.temperature_max_c) == (13.0, 15.0)
    # header RA is degrees; shotsInfo RA is hours (5.685828466666666 h = 85.28743 deg): they agree, no warning
    assert meta.ra_deg == pytest.approx(85.28743) and meta.dec_deg == pytest.approx(-2.492014)
    assert not any("RA" in w for w in meta.warnings)
    assert meta.shots_info["shotsTaken"] == 54
    first = result.lights[0]
    # DATE-OBS marks the END of exposure on DWARF 3: mid = DATE-OBS - 30 s
    assert first.mid_time == first.date_obs - timedelta(seconds=30)
    assert first.date_obs == parse_light_name(first.name)["time"]
    json.dumps(result.to_json())  # everything is JSON-ready


def test_calibration_found_and_matched(dwarf_card):
    session, _ = dwarf_card
    result = discover(session)
    by_path = {c.path.name: c for c in result.calibration}
    good = by_path["tele_exp_60_gain_60_bin_1_2025-10-20-03-20-10-952"]
    assert good.kind == "raw_dark_set" and good.matches and good.n_frames == 3 and good.temperature_c == 15
    assert not by_path["tele_exp_60_gain_60_bin_1_2025-07-01-03-20-10-952"].matches  # 35 C
    assert "temperature" in by_path["tele_exp_60_gain_60_bin_1_2025-07-01-03-20-10-952"].mismatches[0]
    assert "exposure 15 s vs 60 s" in by_path["tele_exp_15_gain_60_bin_1_2025-10-20-03-20-10-952"].mismatches
    master = by_path["dark_exp_60.000000_gain_60_bin_1_15C_stack_8.fits"]
    assert master.kind == "master_dark" and master.n_frames == 8 and master.matches
    assert by_path["flat_gain_2_bin_1_ir_1.fits"].matches and by_path["flat_gain_2_bin_1_ir_1.fits"].filter == "Astro"
    assert not by_path["flat_gain_2_bin_1_ir_0.fits"].matches  # VIS flat, Astro lights
    assert result.best_dark.path.name == "tele_exp_60_gain_60_bin_1_2025-10-20-03-20-10-952"


def test_discovery_writes_nothing(dwarf_card, hash_tree):
    session, _ = dwarf_card
    before = hash_tree(session.parent)
    discover(session)
    discover(session, include_failed=True)
    assert hash_tree(session.parent) == before


def test_lenient_metadata_parsing(dwarf_card):
    session, _ = dwarf_card
    shots = json.loads((session / "shotsInfo.json").read_text())
    shots.update({"RA": "not a number", "exp": 60, "gain": "sixty", "target": 434})
    broken = session.parent / "broken"
    shutil.copytree(session, broken)
    (broken / "shotsInfo.json").write_text(json.dumps(shots))
    meta = discover(broken).metadata
    assert any("RA = 'not a number' is not a number" in w for w in meta.warnings)
    assert meta.ra_deg == pytest.approx(85.28743)  # header value still used
    (broken / "shotsInfo.json").write_text("{ not json")
    assert any("cannot be read" in w for w in discover(broken).metadata.warnings)


def test_header_with_wrong_types_is_a_warning_not_a_crash(tmp_path, dumps):
    session = tmp_path / SESSION_NAME
    session.mkdir()
    t0 = datetime(2025, 10, 18, 4, 52, 22, 420000)
    write_light(session, dumps["light"], t0, **{"DET_TEMP": "warm", "GAIN": "high"})
    h = dumps["light"].copy()
    del h["DATE-OBS"]
    write_raw_uint16(np.zeros((8, 12), np.uint16), session / light_name(t0 + timedelta(seconds=61)), h)
    result = discover(session)
    assert len(result.lights) == 2
    warnings = " ".join(result.metadata.warnings)
    assert "GAIN = 'high' is not a number" in warnings and "no DATE-OBS" in warnings
    no_date = [f for f in result.lights if f.name.endswith(light_name(t0 + timedelta(seconds=61)))][0]
    assert no_date.date_obs == t0 + timedelta(seconds=61)  # from the file name
    assert result.lights[0].temperature_c == 16  # file name's _16C


def test_empty_and_missing_sessions(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = discover(empty)
    assert result.lights == [] and result.excluded == []
    with pytest.raises(SessionError, match="not found"):
        discover(tmp_path / "missing")
    (tmp_path / "file.fits").write_bytes(b"")
    with pytest.raises(SessionError, match="is a file"):
        discover(tmp_path / "file.fits")


def test_folder_of_sessions_gets_a_hint(dwarf_card):
    session, _ = dwarf_card
    warnings = discover(session.parent).metadata.warnings
    assert any(SESSION_NAME in w for w in warnings)


@pytest.mark.parametrize(
    "name, expected",
    [
        (SESSION_NAME, {"camera": "TELE", "target": "IC 434", "exposure_s": 60.0, "gain": 60.0}),
        ("DWARF_RAW_TELE_M 31_EXP_15_GAIN_60_2025-10-18-04-51-22-420", {"target": "M 31", "exposure_s": 15.0}),
        ("DWARF_RAW_WIDE_EXP_10_GAIN_0_2025-10-18-04-51-22-420", {"camera": "WIDE", "target": None}),
        ("DWARF_RAW_TELE_Sun_EXP_0.004_GAIN_0_2025-10-18-04-51-22-420", {"exposure_s": 0.004, "target": "Sun"}),
        ("DWARF_RAW_TELE_MOSAIC_M 42_EXP_30_GAIN_80_2025-10-18-04-51-22-420", {"target": "M 42", "mosaic": True}),
        ("holiday photos", {}),
    ],
)
def test_session_folder_names(name, expected):
    parsed = parse_session_folder_name(name)
    for key, value in expected.items():
        assert parsed[key] == value
    if not expected:
        assert parsed == {}


def test_tiny_frames_from_every_real_header_dump(tmp_path, dumps):
    """Each real header becomes a tiny file; discovery treats each as the real device file would be treated."""
    session = tmp_path / SESSION_NAME
    session.mkdir()
    write_raw_uint16(np.zeros((8, 12), np.uint16), session / "IC 434_60s60_Astro_20251018-045926401_16C.fits", dumps["light"])
    write_raw_uint16(np.zeros((8, 12), np.uint16), session / "raw_60s_60_0002_20251020-032310186_20C.fits", dumps["dark"])
    write_raw_uint16(np.zeros((8, 12), np.uint16), session / "dark_exp_60.000000_gain_60_bin_1_20C_stack_8.fits", dumps["cali"])
    write_raw_uint16(np.zeros((3, 8, 12), np.uint16), session / "stacked-16_IC 434_60s60_Astro_20251018-045127226.fits", dumps["stack"])
    result = discover(session)
    assert [f.name for f in result.lights] == ["IC 434_60s60_Astro_20251018-045926401_16C.fits"]
    light = result.lights[0]
    assert light.date_obs == datetime(2025, 10, 18, 4, 59, 26, 401000)
    assert light.mid_time == datetime(2025, 10, 18, 4, 58, 56, 401000)
    assert (light.exposure_s, light.gain, light.temperature_c, light.camera) == (60.0, 60.0, 16.0, "TELE")
    assert (light.bayer_pattern, light.filter, light.ra_deg) == ("RGGB", "Astro", 85.28743)
    reasons = {e.path.name: e.reason for e in result.excluded}
    assert reasons["raw_60s_60_0002_20251020-032310186_20C.fits"] == "not_a_light"
    assert reasons["dark_exp_60.000000_gain_60_bin_1_20C_stack_8.fits"] == "not_a_light"
    assert reasons["stacked-16_IC 434_60s60_Astro_20251018-045127226.fits"] == "device_stack"


def test_real_seestar_session(hash_tree, realdata):
    folder = realdata("seestar_m94_s2")
    before = hash_tree(folder)
    result = discover(folder)
    assert len(result.lights) == 6 and result.excluded == []
    meta = result.metadata
    assert (meta.device, meta.bayer_pattern, meta.date_obs_marks) == ("Seestar", "GRBG", "start")
    assert (meta.width, meta.height, meta.exposure_s) == (1080, 1920, 10.0)
    # Seestar writes DATE-OBS at the start: mid = DATE-OBS + 5 s
    first = result.lights[0]
    assert first.mid_time - first.date_obs == timedelta(seconds=5)
    assert first.date_obs == datetime(2025, 3, 27, 5, 45, 0, 734589)
    assert [f.mid_time for f in result.lights] == sorted(f.mid_time for f in result.lights)
    assert hash_tree(folder) == before


def test_real_seestar_eq_session(realdata):
    result = discover(realdata("seestar_ngc7023_2025"))
    assert len(result.lights) == 2 and result.metadata.target == "NGC 7023"


def test_discovery_of_a_simulated_session_with_clutter_and_mismatched_frames(tmp_path, hash_tree):
    """A simulated session (device layout, by-products, failed_ frames) plus foreign and mismatched frames."""
    from dwarf3gpu.fitsio import read_fits, read_header
    from dwarf3gpu.simulate import SimulationConfig, simulate_session

    sim = simulate_session(tmp_path / "card", SimulationConfig(n_frames=6, width=128, height=96, n_failed=2, seed=5,
                                                                with_darks=True))
    session = sim.session_dir
    # a frame of another size and one of another exposure, named like lights of this session (1 ms later)
    data, _ = read_fits(sim.lights[1])
    header = read_header(sim.lights[1])

    def twin(light):
        info = parse_light_name(light.name)
        t = info["time"] + timedelta(milliseconds=1)
        return session / light.name.replace(f"{info['time']:%Y%m%d-%H%M%S}{info['time'].microsecond // 1000:03d}",
                                            f"{t:%Y%m%d-%H%M%S}{t.microsecond // 1000:03d}")

    write_raw_uint16(data[:64, :96].astype(np.uint16), twin(sim.lights[1]), header)
    long_exp = header.copy()
    long_exp["EXPTIME"] = 2 * float(header["EXPTIME"])
    write_raw_uint16(data.astype(np.uint16), twin(sim.lights[2]), long_exp)
    before = hash_tree(session.parent)
    result = discover(session)
    assert [f.path for f in result.lights] == sim.lights  # observation order, the simulator's own list
    reasons = {}
    for e in result.excluded:
        reasons.setdefault(e.reason, []).append(e.path.name)
    assert sorted(reasons["device_failed"]) == sorted(p.name for p in sim.failed)
    assert len(reasons["header_mismatch"]) == 2
    assert "device_stack" in reasons and "device_by_product" in reasons and "not_a_light" in reasons
    assert result.best_dark is not None and result.best_dark.kind == "raw_dark_set"
    assert hash_tree(session.parent) == before
