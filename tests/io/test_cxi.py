"""CXI read/write round trips, CXIDB-58 import and the errors for bad files."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from conveyor.cli import main
from conveyor.errors import InputError
from conveyor.io.cxi import (
    CXIDB58_DATASET,
    DATA_PATH,
    DET_MASK,
    DISTANCE_PATH,
    ENERGY_PATH,
    EV_J,
    IMAGE,
    XPIX_PATH,
    cxi_info,
    import_cxidb,
    read_cxi,
    write_cxi,
)

E_1600 = 1600 * EV_J


def _shots(n=6, shape=(24, 20), seed=0):
    rng = np.random.default_rng(seed)
    data = rng.poisson(2.0, (n,) + shape).astype(np.int32)
    mask = np.ones(shape, np.uint8)
    mask[5:7, :] = 0
    mask[10, 3] = 0
    data[:, mask == 0] = 0
    return data, mask


def _write(path, **kw):
    data, mask = _shots()
    args = dict(photon_energy_J=E_1600, detector_distance_m=0.3, pixel_size_m=300e-6, beam_center_px=(10.3, 11.7))
    args.update(kw)
    write_cxi(path, data, mask, **args)
    return data, mask


def test_round_trip(tmp_path):
    path = tmp_path / "a.cxi"
    data, mask = _write(path, extra_frame_datasets={"pulse_energy": np.linspace(1e-3, 2e-3, 6)})
    shots = read_cxi(path)
    assert np.array_equal(shots.data, data) and shots.data.dtype == np.int32
    assert np.array_equal(shots.mask, mask)
    assert shots.energy_J == pytest.approx(E_1600, rel=1e-12)
    assert shots.photon_energy_eV == pytest.approx(1600.0)
    assert shots.wavelength_m == pytest.approx(7.749e-10, rel=1e-3)
    assert shots.distance_m == pytest.approx(0.3)
    assert shots.pixel_size_m == pytest.approx(300e-6) and shots.pixel_size_xy_m == pytest.approx((300e-6, 300e-6))
    assert shots.beam_center_px == pytest.approx((10.3, 11.7))
    assert shots.extra["pulse_energy"] == pytest.approx(np.linspace(1e-3, 2e-3, 6))
    geom = shots.geometry()
    assert geom.shape == (24, 20) and geom.beam_center_px == pytest.approx((10.3, 11.7))
    # the image_1 group spi_processing reads: same frames, CXI mask bits (0 = good), centre
    with h5py.File(path, "a") as f:
        assert np.array_equal(f[IMAGE + "/data"][()], data)
        assert np.array_equal(f[IMAGE + "/mask"][()] == 0, mask.astype(bool))
        assert f[IMAGE + "/image_center"][()] == pytest.approx([10.3, 11.7, 0.0])
        assert f[DATA_PATH].chunks == (1, 24, 20) and f[DATA_PATH].compression == "gzip"
        assert f[DISTANCE_PATH].attrs["units"] == "m" and f[ENERGY_PATH].attrs["units"] == "J"
        del f[IMAGE + "/image_center"]
    # without image_center the centre comes back from corner_position + basis_vectors
    shots = read_cxi(path, frames=[4, 1], lazy=True)
    assert shots.beam_center_source == "corner_position"
    assert shots.beam_center_px == pytest.approx((10.3, 11.7))
    assert np.array_equal(shots.data[:], data[[4, 1]])
    assert np.array_equal(shots.data[1], data[1])
    info = cxi_info(path)
    assert info["n_frames"] == 6 and info["frame_shape"] == [24, 20] and info["good_pixels"] == int(mask.sum())


def test_corner_position_with_cxi_default_basis(tmp_path):
    # CXI default basis vectors point along -y/-x: corner (px (cx+0.5), py (cy+0.5), D)
    path = tmp_path / "c.cxi"
    _write(path, beam_center_px=None, corner_position_m=(300e-6 * 10.8, 300e-6 * 12.2, 0.3))
    with h5py.File(path, "a") as f:
        del f[IMAGE + "/image_center"]
    assert read_cxi(path).beam_center_px == pytest.approx((10.3, 11.7))


def test_units_attribute_is_honoured(tmp_path):
    path = tmp_path / "u.cxi"
    _write(path)
    with h5py.File(path, "a") as f:
        del f[DISTANCE_PATH], f[ENERGY_PATH], f[XPIX_PATH]
        f.create_dataset(DISTANCE_PATH, data=586.0).attrs["units"] = "mm"
        f.create_dataset(ENERGY_PATH, data=1600.0).attrs["units"] = "eV"
        f.create_dataset(XPIX_PATH, data=300.0).attrs["units"] = "um"
    shots = read_cxi(path)
    assert shots.distance_m == pytest.approx(0.586)
    assert shots.energy_J == pytest.approx(E_1600)
    assert shots.pixel_size_m == pytest.approx(300e-6)


def _error(path, **kw) -> str:
    with pytest.raises(InputError) as exc:
        read_cxi(path, **kw)
    msg = str(exc.value)
    assert str(path) in msg
    return msg


def test_missing_data_names_expected_path(tmp_path):
    path = tmp_path / "empty.cxi"
    with h5py.File(path, "w") as f:
        f.create_dataset("entry_1/instrument_1/detector_1/distance", data=0.3)
    assert DATA_PATH in _error(path)


def test_mask_shape_mismatch(tmp_path):
    path = tmp_path / "m.cxi"
    _write(path)
    with h5py.File(path, "a") as f:
        del f[DET_MASK], f[IMAGE + "/mask"], f["entry_1/data_1/mask"]
        f.create_dataset(DET_MASK, data=np.zeros((20, 24), np.uint32))
    msg = _error(path)
    assert DET_MASK in msg and "(20, 24)" in msg and "(24, 20)" in msg


@pytest.mark.parametrize(
    "dset, value, words",
    [
        (DISTANCE_PATH, 586.0, ["586", "mm", "units"]),
        (XPIX_PATH, 75.0, ["75", "µm", "units"]),
        (XPIX_PATH, 0.3, ["0.3", "mm", "units"]),
        (ENERGY_PATH, 1600.0, ["1600", "eV", "units"]),
    ],
)
def test_non_si_geometry_without_units(tmp_path, dset, value, words):
    path = tmp_path / "n.cxi"
    _write(path)
    with h5py.File(path, "a") as f:
        del f[dset]
        f.create_dataset(dset, data=value)
    msg = _error(path)
    assert dset in msg
    for w in words:
        assert w in msg


def test_corrupt_hdf5(tmp_path):
    path = tmp_path / "bad.cxi"
    _write(path)
    raw = path.read_bytes()
    path.write_bytes(raw[:300])  # truncated copy
    assert "HDF5" in _error(path)
    junk = tmp_path / "junk.cxi"
    junk.write_bytes(b"not an hdf5 file at all" * 10)
    _error(junk)


def test_nan_in_frames_and_geometry(tmp_path):
    path = tmp_path / "nan.cxi"
    data = np.ones((3, 8, 8), np.float32)
    data[2, 4, 4] = np.nan
    with h5py.File(path, "w") as f:
        f.create_dataset(DATA_PATH, data=data)
    msg = _error(path)
    assert DATA_PATH in msg and "NaN" in msg and "frame 2" in msg
    ok = read_cxi(path, frames=[0, 1])  # the clean frames read fine
    assert ok.data.shape == (2, 8, 8) and ok.energy_J is None
    with pytest.raises(InputError):
        ok.geometry()  # geometry missing: names the datasets
    path2 = tmp_path / "nan2.cxi"
    _write(path2)
    with h5py.File(path2, "a") as f:
        del f[DISTANCE_PATH]
        f.create_dataset(DISTANCE_PATH, data=np.nan)
    assert DISTANCE_PATH in _error(path2)


def test_writer_rejects_bad_input_and_leaves_nothing(tmp_path):
    data, mask = _shots()
    with pytest.raises(InputError):
        write_cxi(tmp_path / "x.cxi", data, mask[:10], E_1600, 0.3, 300e-6)
    with pytest.raises(InputError):
        write_cxi(tmp_path / "x.cxi", data, mask, 1600.0, 0.3, 300e-6)  # eV instead of J
    with pytest.raises(InputError):
        write_cxi(tmp_path / "x.cxi", data, mask, E_1600, 586.0, 300e-6)  # mm instead of m
    with pytest.raises(InputError):
        write_cxi(tmp_path / "x.cxi", data, mask, E_1600, 0.3, 300e-6, extra_frame_datasets={"a": np.zeros(2)})
    assert list(tmp_path.iterdir()) == []


def _cxidb(path, n=5, shape=(40, 36), extra=True):
    rng = np.random.default_rng(1)
    frames = rng.poisson(0.5, (n,) + shape).astype(np.int16)
    with h5py.File(path, "w") as f:
        f.create_dataset(CXIDB58_DATASET, data=frames)
        f.create_dataset("photonConverter/eventTime", data=np.arange(n, dtype=np.float64))
        if extra:
            f.create_dataset("LCLS/photon_energy_eV", data=np.full(n, 1600.0))
            f.create_dataset("LCLS/detector_distance", data=586.0).attrs["units"] = "mm"
    return frames


def test_import_cxidb_round_trip(tmp_path):
    src = tmp_path / "amo86615_194_PR772_single.h5"
    frames = _cxidb(src)
    out = tmp_path / "run.cxi"
    res = import_cxidb(src, out)
    assert res["photon_energy_eV"] == pytest.approx(1600.0) and res["sources"]["photon_energy"] == "/LCLS/photon_energy_eV"
    assert res["distance_m"] == pytest.approx(0.586)
    assert res["pixel_size_m"] == pytest.approx(300e-6)  # 4x4-binned pnCCD inferred from the 40x36 frames
    shots = read_cxi(out)
    assert np.array_equal(shots.data, frames) and shots.data.dtype == np.int32
    assert shots.mask.all() and shots.distance_m == pytest.approx(0.586)
    assert shots.beam_center_px == pytest.approx((17.5, 19.5))
    # explicit geometry and a mask file (0 = good, Dragonfly style) override the file
    bad = np.zeros((40, 36), np.uint8)
    bad[:, 0] = 2
    np.save(tmp_path / "mask.npy", bad)
    res = import_cxidb(src, out, energy_eV=1700.0, distance_m=0.5, pixel_size_m=75e-6, mask=tmp_path / "mask.npy", mask_zero_is_good=True)
    shots = read_cxi(out)
    assert shots.photon_energy_eV == pytest.approx(1700.0) and shots.distance_m == pytest.approx(0.5)
    assert shots.pixel_size_m == pytest.approx(75e-6)
    assert shots.mask[:, 0].sum() == 0 and shots.mask[:, 1:].all()


def test_import_cxidb_errors(tmp_path):
    src = tmp_path / "plain.h5"
    _cxidb(src, extra=False)
    with pytest.raises(InputError, match="--photon-energy-ev") as exc:
        import_cxidb(src, tmp_path / "o.cxi")
    assert str(src) in str(exc.value)
    with pytest.raises(InputError, match="--distance-m"):
        import_cxidb(src, tmp_path / "o.cxi", energy_eV=1600)
    with pytest.raises(InputError, match="photonConverter/pnccdBack/photonCount"):
        import_cxidb(src, tmp_path / "o.cxi", energy_eV=1600, distance_m=0.586, dataset="nope/photonCount")
    np.save(tmp_path / "small.npy", np.ones((10, 10)))
    with pytest.raises(InputError, match=r"\(10, 10\)"):
        import_cxidb(src, tmp_path / "o.cxi", energy_eV=1600, distance_m=0.586, mask=tmp_path / "small.npy")
    assert not (tmp_path / "o.cxi").exists()


def test_cli_info_and_import(tmp_path, capsys):
    src = tmp_path / "in.h5"
    _cxidb(src, extra=False)
    out = tmp_path / "out.cxi"
    assert main(["io", "import-cxidb", str(src), "--out", str(out), "--photon-energy-ev", "1600", "--distance-m", "0.586"]) == 0
    assert main(["io", "cxi-info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "1600.00 eV" in text and "0.5860 m" in text and "300.00 x 300.00 um" in text
    bad = tmp_path / "bad.cxi"
    with h5py.File(bad, "w") as f:
        f.create_dataset("x", data=1)
    assert main(["io", "cxi-info", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("conveyor: error: ") and DATA_PATH in err and err.count("\n") == 1
