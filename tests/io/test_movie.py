"""Raw movies: reading with gain/flip/rotation, header info, validation and the io CLI."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from conveyor.cli import main
from conveyor.errors import InputError
from conveyor.io.movie import movie_info, read_movie, transform_gain, validate_movie
from conveyor.io.mrc import write_mrc
from conveyor.io.star import optics_table, write_star
from conveyor.io.tiff import write_tiff

NY, NX, N = 20, 28, 6


@pytest.fixture
def counts():
    return np.random.default_rng(5).poisson(4.0, size=(N, NY, NX)).astype(np.uint16)


@pytest.fixture(params=["mrcs", "tif"])
def movie(request, tmp_path, counts):
    path = tmp_path / f"movie.{request.param}"
    if request.param == "mrcs":
        write_mrc(path, counts, 1.2, dtype=np.uint16)
    else:
        write_tiff(path, counts, pixel_size=1.2, compression="zlib")
    return path


def test_read_and_info(movie, counts):
    frames, ps = read_movie(movie)
    assert frames.dtype == np.float32 and frames.shape == (N, NY, NX)
    np.testing.assert_array_equal(frames, counts)
    assert ps == pytest.approx(1.2, abs=1e-4)
    info = movie_info(movie)
    assert info["n_frames"] == N and (info["ny"], info["nx"]) == (NY, NX)
    assert info["dtype"] == "uint16" and info["pixel_size"] == pytest.approx(1.2, abs=1e-4)
    assert info["format"] == ("mrc" if movie.suffix == ".mrcs" else "tiff")
    # the configured pixel size is what callers get
    assert read_movie(movie, pixel_size=1.21)[1] == 1.21


def test_gain_rotation_then_flip(tmp_path, movie, counts):
    # a gain stored transposed relative to the movie: a 90° turn is needed
    rng = np.random.default_rng(9)
    gain = rng.uniform(0.5, 1.5, size=(NX, NY)).astype(np.float32)
    gain_path = tmp_path / "gain.mrc"
    write_mrc(gain_path, gain, 1.2)
    for rot in (1, 3):
        for flip in (None, "x", "y"):
            expect = np.rot90(gain, -rot)  # clockwise with row 0 at the top
            if flip == "x":
                expect = expect[::-1, :]
            elif flip == "y":
                expect = expect[:, ::-1]
            frames, _ = read_movie(movie, gain=gain_path, gain_rot=rot, gain_flip=flip)
            np.testing.assert_allclose(frames, counts * expect[None], rtol=1e-6)
    # rotation comes before the flip, so rot+flip is not flip+rot
    a = np.arange(12.0).reshape(3, 4)
    np.testing.assert_array_equal(transform_gain(a, "x", 1), np.rot90(a, -1)[::-1])
    assert not np.array_equal(transform_gain(a, "x", 1), np.rot90(a[::-1], -1))
    np.testing.assert_array_equal(transform_gain(a, None, 90), transform_gain(a, None, 1))
    np.testing.assert_array_equal(transform_gain(a, None, 2), a[::-1, ::-1])

    with pytest.raises(InputError) as err:
        read_movie(movie, gain=gain_path)
    msg = str(err.value)
    assert str(movie) in msg and str(gain_path) in msg
    assert f"{NX}x{NY}" in msg and f"{NY}x{NX}" in msg and "gain_rot" in msg and "gain_flip" in msg
    with pytest.raises(InputError, match="spa.gain_flip"):
        read_movie(movie, gain=gain_path, gain_rot=1, gain_flip="z")
    with pytest.raises(InputError, match="spa.gain_rot"):
        read_movie(movie, gain=gain_path, gain_rot=45)
    with pytest.raises(InputError, match=r"nogain\.mrc: gain reference does not exist"):
        read_movie(movie, gain=tmp_path / "nogain.mrc")


def test_validate_good_movie(movie, counts):
    report = validate_movie(movie, expected_frames=N, pixel_size=1.21)  # 0.8 % off: within 2 %
    assert report["n_frames"] == N and report["pixel_size"] == 1.21
    assert report["header_pixel_size"] == pytest.approx(1.2, abs=1e-4)
    assert report["mean"] == pytest.approx(counts.mean())
    assert report["min"] == counts.min() and report["max"] == counts.max()
    json.dumps(report)
    assert validate_movie(movie, check_data=False)["data_checked"] is False


def test_validate_wrong_frames_and_pixel_size(movie):
    with pytest.raises(InputError) as err:
        validate_movie(movie, expected_frames=N + 2)
    assert err.value.path == str(movie)
    assert f"has {N} frames" in str(err.value) and f"expects {N + 2}" in str(err.value)
    assert "spa.frames" in str(err.value)
    with pytest.raises(InputError) as err:
        validate_movie(movie, pixel_size=1.5)
    msg = str(err.value)
    assert err.value.path == str(movie)
    assert "1.2000" in msg and "1.5000" in msg and "spa.pixel_size" in msg and "header is wrong" in msg
    validate_movie(movie, pixel_size=1.5, pixel_tolerance=0.3)


def test_validate_damaged_movies(tmp_path, counts):
    mrc = tmp_path / "cut.mrcs"
    write_mrc(mrc, counts, 1.0, dtype=np.uint16)
    mrc.write_bytes(mrc.read_bytes()[:-500])
    tif = tmp_path / "cut.tif"
    write_tiff(tif, counts, 1.0)
    tif.write_bytes(tif.read_bytes()[:-1500])
    junk = tmp_path / "junk.mrc"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    for path in (mrc, tif, junk):
        for check in (validate_movie, read_movie, movie_info):
            with pytest.raises(InputError, match=rf"{path.name}: .*(truncated|not a readable)") as err:
                check(path)
            assert err.value.path == str(path)
    with pytest.raises(InputError, match=r"gone\.tif: movie does not exist"):
        validate_movie(tmp_path / "gone.tif")
    with pytest.raises(InputError, match=r"movie\.eer: unsupported movie format"):
        (tmp_path / "movie.eer").write_bytes(b"x")
        validate_movie(tmp_path / "movie.eer")


@pytest.mark.filterwarnings("ignore:Data array contains NaN")
@pytest.mark.parametrize("fmt", ["mrcs", "tif"])
def test_validate_nan_zero_and_2d(tmp_path, counts, fmt):
    write = (lambda p, a: write_mrc(p, a, 1.0)) if fmt == "mrcs" else (lambda p, a: write_tiff(p, a, 1.0))
    bad = counts.astype(np.float32)
    bad[3, 5, 5] = np.nan
    nan_path = tmp_path / f"nan.{fmt}"
    write(nan_path, bad)
    with pytest.raises(InputError, match=rf"nan\.{fmt}: frame\(s\) 4 of {N} contain NaN"):
        validate_movie(nan_path)
    with pytest.raises(InputError, match=rf"nan\.{fmt}: .*NaN"):
        read_movie(nan_path)
    zero = counts.astype(np.float32)
    zero[[1, 4]] = 0
    zero_path = tmp_path / f"zero.{fmt}"
    write(zero_path, zero)
    with pytest.raises(InputError, match=rf"zero\.{fmt}: frame\(s\) 2, 5 of {N} are all zero"):
        validate_movie(zero_path)
    flat = tmp_path / "single.mrc"
    write_mrc(flat, counts[0].astype(np.float32), 1.0)
    with pytest.raises(InputError, match=r"single\.mrc: holds a single 2D image .*not a movie"):
        validate_movie(flat)
    with pytest.raises(InputError, match=r"single\.mrc: holds a single 2D image"):
        read_movie(flat)


def test_cli_validate_movie(tmp_path, movie, capsys):
    out = tmp_path / "reports" / "movie.json"
    assert main(["io", "validate-movie", str(movie), "--frames", str(N), "--pixel-size", "1.2", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["n_frames"] == N and report["path"] == str(movie)
    capsys.readouterr()

    code = main(["io", "validate-movie", str(movie), "--frames", str(N + 1), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("conveyor: error: ") and str(movie) in lines[0]
    assert not out.exists()  # the stale report is gone too
    assert os.listdir(out.parent) == []


def test_cli_bad_movie_leaves_no_output(tmp_path, capsys):
    bad = tmp_path / "bad.mrcs"
    write_mrc(bad, np.ones((3, 8, 8), np.float32), 1.0)
    bad.write_bytes(bad.read_bytes()[:-100])
    out = tmp_path / "bad.json"
    assert main(["io", "validate-movie", str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.mrcs" in err[0]
    assert not out.exists()
    assert sorted(os.listdir(tmp_path)) == ["bad.mrcs"]


def test_cli_info(tmp_path, movie, capsys):
    star = tmp_path / "particles.star"
    write_star(star, {"optics": optics_table("opticsGroup1", 1.2, 300, 2.7, 0.1, image_size=64),
                      "particles": {"rlnImageName": ["000001@a.mrcs", "000002@a.mrcs"], "rlnOpticsGroup": [1, 1]}})
    vol = tmp_path / "map.mrc"
    write_mrc(vol, np.zeros((8, 8, 8), np.float32), 2.5)
    assert main(["io", "info", str(movie), str(star), str(vol)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 3
    assert f"shape {N} x {NY} x {NX}" in out[0] and "uint16" in out[0] and "1.2000 Å/px" in out[0]
    assert "data_optics (1 rows)" in out[1] and "data_particles (2 rows)" in out[1]
    assert "8 x 8 x 8" in out[2] and "2.5000 Å/px" in out[2]
    assert main(["io", "info", "--json", str(vol)]) == 0
    assert json.loads(capsys.readouterr().out)["pixel_size"] == pytest.approx(2.5)

    code = main(["io", "info", str(vol), str(tmp_path / "missing.mrc")])
    captured = capsys.readouterr()
    assert code == 2 and "map.mrc" in captured.out
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "missing.mrc: file does not exist" in err[0]


def test_open_movie_reads_frames_on_demand_like_read_movie(tmp_path, counts):
    """An MRC movie opened lazily gives the same gain-corrected float32 data as read_movie."""
    from conveyor.io.movie import MovieFrames, open_movie

    path = tmp_path / "movie.mrcs"
    write_mrc(path, counts, 1.2, dtype=np.uint16)
    gain = np.random.default_rng(1).uniform(0.8, 1.2, (NX, NY)).astype(np.float32)  # turned by gain_rot 1
    gpath = tmp_path / "gain.mrc"
    write_mrc(gpath, gain, 1.2)
    full, ps = read_movie(path, gain=gpath, gain_rot=1, gain_flip="y")
    lazy, ps2 = open_movie(path, gain=gpath, gain_rot=1, gain_flip="y")
    assert isinstance(lazy, MovieFrames) and ps == ps2 == pytest.approx(1.2)
    assert lazy.shape == full.shape and lazy.dtype == np.float32 and len(lazy) == N
    np.testing.assert_array_equal(np.asarray(lazy), full)
    np.testing.assert_array_equal(lazy[2], full[2])
    np.testing.assert_array_equal(lazy[1:4], full[1:4])
    np.testing.assert_array_equal(lazy[3, 2:9, 5:11], full[3, 2:9, 5:11])
    with pytest.raises(TypeError):
        lazy[[0, 1]]
    # a TIFF movie is read whole, as read_movie does
    tif = tmp_path / "movie.tif"
    write_tiff(tif, counts, 1.2)
    assert isinstance(open_movie(tif)[0], np.ndarray)


@pytest.mark.filterwarnings("ignore:Data array contains NaN")
def test_open_movie_names_the_file_of_a_nan_frame(tmp_path, counts):
    from conveyor.io.movie import open_movie

    data = counts.astype(np.float32)
    data[4, 3, 3] = np.nan
    path = tmp_path / "bad.mrcs"
    write_mrc(path, data, 1.0)
    frames, _ = open_movie(path)
    frames[0]  # a clean frame reads
    with pytest.raises(InputError, match="bad.mrcs.*frame 5 contains NaN"):
        frames[4]
    with pytest.raises(InputError, match="bad.mrcs.*frames 3-6 contain NaN"):
        frames[2:6]
    with pytest.raises(InputError, match="bad.mrcs.*frame 5"):
        read_movie(path)
