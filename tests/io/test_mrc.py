"""MRC/MRCS: round trips with pixel size, and clear errors for unusable files."""

from __future__ import annotations

import os

import mrcfile
import numpy as np
import pytest

from conveyor.errors import InputError
from conveyor.io.mrc import read_header, read_mrc, read_stack_images, write_mrc


@pytest.fixture
def rng():
    return np.random.default_rng(7)


@pytest.mark.parametrize(
    ("name", "shape", "volume", "ispg"),
    [
        ("image.mrc", (24, 32), None, 0),
        ("stack.mrcs", (5, 16, 20), None, 0),
        ("volume.mrc", (12, 14, 16), None, 1),
        ("stack_as_mrc.mrc", (3, 8, 8), False, 0),
    ],
)
def test_round_trip_keeps_data_shape_pixel_size(tmp_path, rng, name, shape, volume, ispg):
    data = rng.normal(size=shape).astype(np.float32)
    path = tmp_path / name
    write_mrc(path, data, 1.37, volume=volume)
    back, pixel_size = read_mrc(path)
    assert back.shape == shape
    np.testing.assert_array_equal(back, data)
    assert pixel_size == pytest.approx(1.37, abs=1e-4)  # header stores float32 cell / n
    header = read_header(path)
    assert header["shape"][-2:] == shape[-2:]
    assert header["ndim"] == len(shape)
    assert header["ispg"] == ispg
    assert header["dtype"] == "float32"
    mm, ps_mm = read_mrc(path, mmap=True)
    np.testing.assert_array_equal(mm, data)
    assert ps_mm == pytest.approx(1.37, abs=1e-4)


def test_integer_storage_and_stack_indexing(tmp_path, rng):
    data = rng.integers(0, 1000, size=(6, 10, 12)).astype(np.uint16)
    path = tmp_path / "counts.mrcs"
    write_mrc(path, data, 0.83, dtype=np.uint16)
    assert read_header(path)["dtype"] == "uint16"
    images, ps = read_stack_images(path, [4, 0])
    np.testing.assert_array_equal(images, data[[4, 0]])
    assert ps == pytest.approx(0.83, abs=1e-4)
    with pytest.raises(InputError, match="counts.mrcs.*out of range"):
        read_stack_images(path, [6])


def test_truncated_file_names_the_file(tmp_path, rng):
    path = tmp_path / "cut.mrcs"
    write_mrc(path, rng.normal(size=(4, 16, 16)), 1.0)
    raw = path.read_bytes()
    path.write_bytes(raw[:-300])
    for read in (read_mrc, lambda p: read_mrc(p, mmap=True), read_header):
        with pytest.raises(InputError, match="cut.mrcs: not a readable MRC file") as err:
            read(path)
        assert err.value.path == str(path)
    path.write_bytes(raw[:600])  # shorter than the header
    with pytest.raises(InputError, match="cut.mrcs"):
        read_header(path)


def test_random_bytes_and_missing_file(tmp_path):
    junk = tmp_path / "junk.mrc"
    junk.write_bytes(np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(InputError, match="junk.mrc: not a readable MRC file"):
        read_mrc(junk)
    with pytest.raises(InputError, match="absent.mrc: file does not exist"):
        read_mrc(tmp_path / "absent.mrc")
    with pytest.raises(InputError, match="absent.mrc: file does not exist"):
        read_header(tmp_path / "absent.mrc")


@pytest.mark.filterwarnings("ignore:Data array contains NaN")
def test_nan_data_rejected_unless_asked(tmp_path):
    data = np.ones((8, 8), np.float32)
    data[3, 4] = np.nan
    path = tmp_path / "nan.mrc"
    write_mrc(path, data, 1.0)
    with pytest.raises(InputError, match="nan.mrc: data contain NaN"):
        read_mrc(path)
    back, _ = read_mrc(path, check_finite=False)
    assert np.isnan(back[3, 4])


def test_bad_write_arguments(tmp_path):
    with pytest.raises(InputError, match="pixel size must be positive"):
        write_mrc(tmp_path / "a.mrc", np.zeros((4, 4)), 0.0)
    with pytest.raises(InputError, match="cannot store float64"):
        write_mrc(tmp_path / "a.mrc", np.zeros((4, 4)), 1.0, dtype=np.float64)
    with pytest.raises(InputError, match="shape"):
        write_mrc(tmp_path / "a.mrc", np.zeros((2, 2, 2, 2)), 1.0)
    assert os.listdir(tmp_path) == []


def test_failed_write_leaves_no_output_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "out.mrc"

    def broken(self):  # data already written to the temporary file when this fails
        raise OSError("disk full")

    monkeypatch.setattr(mrcfile.mrcobject.MrcObject, "update_header_stats", broken)
    with pytest.raises(OSError, match="disk full"):
        write_mrc(path, np.ones((8, 8), np.float32), 1.0)
    assert os.listdir(tmp_path) == []

    monkeypatch.undo()
    write_mrc(path, np.ones((8, 8), np.float32), 1.0)
    monkeypatch.setattr(mrcfile.mrcobject.MrcObject, "update_header_stats", broken)
    with pytest.raises(OSError):
        write_mrc(path, np.zeros((8, 8), np.float32), 2.0)
    assert os.listdir(tmp_path) == ["out.mrc"]  # the earlier output is untouched
    back, ps = read_mrc(path)
    assert back.min() == 1.0 and ps == pytest.approx(1.0)
