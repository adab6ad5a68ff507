"""TIFF movies: round trips with and without pixel size, orientation, damaged files, atomic writes."""

from __future__ import annotations

import os

import numpy as np
import pytest
import tifffile

from conveyor.errors import InputError
from conveyor.io import tiff
from conveyor.io.tiff import iter_tiff_frames, read_tiff, read_tiff_header, write_tiff


@pytest.fixture
def frames():
    return np.random.default_rng(11).poisson(3.0, size=(5, 24, 36)).astype(np.uint16)


@pytest.mark.parametrize("pixel_size", [None, 0.834, 1.234567])
@pytest.mark.parametrize("compression", [None, "zlib"])
def test_round_trip(tmp_path, frames, pixel_size, compression):
    path = tmp_path / "movie.tif"
    write_tiff(path, frames, pixel_size=pixel_size, compression=compression)
    back, ps = read_tiff(path)
    assert back.dtype == np.uint16 and back.shape == frames.shape
    np.testing.assert_array_equal(back, frames)
    if pixel_size is None:
        assert ps is None
    else:
        assert ps == pytest.approx(pixel_size, rel=1e-9)
    header = read_tiff_header(path)
    assert header["shape"] == frames.shape and header["ndim"] == 3
    assert header["pixel_size"] == ps
    for i, frame in enumerate(iter_tiff_frames(path)):
        np.testing.assert_array_equal(frame, frames[i])
    # one page per frame, as MotionCor2 and RELION expect
    with tifffile.TiffFile(path) as tf:
        assert len(tf.pages) == frames.shape[0]


def test_rows_are_flipped_like_relion(tmp_path, frames):
    path = tmp_path / "movie.tif"
    write_tiff(path, frames)
    np.testing.assert_array_equal(tifffile.imread(path), frames[:, ::-1, :])
    raw, _ = read_tiff(path, flip_y=False)
    np.testing.assert_array_equal(raw, frames[:, ::-1, :])


def test_pixel_size_from_other_writers(tmp_path, frames):
    # resolution tags only (no JSON description), in centimetre units: 1e8 Å / cm
    path = tmp_path / "res.tif"
    tifffile.imwrite(path, frames, photometric="minisblack", resolution=(1e8 / 1.06, 1e8 / 1.06),
                     resolutionunit="CENTIMETER", shaped=False)
    assert read_tiff(path)[1] == pytest.approx(1.06, rel=1e-7)
    # ImageJ: pixels per micron
    ij = tmp_path / "ij.tif"
    tifffile.imwrite(ij, frames.astype(np.float32), imagej=True, resolution=(1 / 1.05e-4, 1 / 1.05e-4),
                     metadata={"unit": "um", "axes": "TYX"})
    assert read_tiff(ij)[1] == pytest.approx(1.05, rel=1e-6)
    # free text in the description
    desc = tmp_path / "desc.tif"
    tifffile.imwrite(desc, frames, photometric="minisblack", description="Pixel size: 0.083 nm", shaped=False)
    assert read_tiff(desc)[1] == pytest.approx(0.83)
    # a 72 dpi default is not a pixel size
    dpi = tmp_path / "dpi.tif"
    tifffile.imwrite(dpi, frames, photometric="minisblack", resolution=(72, 72), resolutionunit="INCH", shaped=False)
    assert read_tiff(dpi)[1] is None


def test_single_page(tmp_path, frames):
    path = tmp_path / "one.tif"
    tifffile.imwrite(path, frames[0])
    back, ps = read_tiff(path)
    assert back.shape == (1, 24, 36) and ps is None
    assert read_tiff_header(path)["ndim"] == 2


@pytest.mark.parametrize("cut", [20, 900, 3000, 9000])
def test_truncated_file(tmp_path, frames, cut):
    path = tmp_path / "cut.tif"
    write_tiff(path, frames, pixel_size=1.0)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - cut])
    for read in (read_tiff, read_tiff_header):
        with pytest.raises(InputError, match=r"cut\.tif: .*(truncated|not a readable)") as err:
            read(path)
        assert err.value.path == str(path)


def test_corrupt_compressed_data(tmp_path, frames):
    path = tmp_path / "bad.tif"
    write_tiff(path, frames, compression="zlib")
    with tifffile.TiffFile(path) as tf:
        offset = tf.pages[2].dataoffsets[0]
    raw = bytearray(path.read_bytes())
    raw[offset: offset + 40] = bytes(40)
    path.write_bytes(bytes(raw))
    with pytest.raises(InputError, match=r"bad\.tif: not a readable TIFF file"):
        read_tiff(path)
    with pytest.raises(InputError, match=r"bad\.tif: frame 3 of 5 cannot be read"):
        list(iter_tiff_frames(path))


def test_not_tiff_missing_and_rgb(tmp_path):
    junk = tmp_path / "junk.tif"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    with pytest.raises(InputError, match=r"junk\.tif: not a readable TIFF file"):
        read_tiff(junk)
    fake = tmp_path / "fake.tif"
    fake.write_bytes(b"II*\x00" + bytes(range(256)) * 4)
    with pytest.raises(InputError, match=r"fake\.tif"):
        read_tiff(fake)
    with pytest.raises(InputError, match=r"nowhere\.tif: file does not exist"):
        read_tiff(tmp_path / "nowhere.tif")
    rgb = tmp_path / "rgb.tif"
    tifffile.imwrite(rgb, np.zeros((8, 8, 3), np.uint8), photometric="rgb")
    with pytest.raises(InputError, match=r"rgb\.tif: .*not a stack of 2D grey frames"):
        read_tiff(rgb)


def test_failed_write_leaves_no_output_and_no_temp(tmp_path, frames, monkeypatch):
    path = tmp_path / "movie.tif"
    real = tifffile.imwrite

    def half_then_fail(file, data, **kwargs):
        real(file, data[:2], **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(tiff.tifffile, "imwrite", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        write_tiff(path, frames, pixel_size=1.0)
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()
    with pytest.raises(InputError, match="compression 'lzw'|jpeg"):
        write_tiff(path, frames, compression="lzw" if not _has_imagecodecs() else "jpeg")
    assert os.listdir(tmp_path) == []


def _has_imagecodecs() -> bool:
    try:
        import imagecodecs  # noqa: F401
    except ImportError:
        return False
    return True
