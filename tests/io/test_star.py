"""RELION 3.1+ STAR: round trips, image names, optics groups, legacy files, bad input."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest

from conveyor.errors import InputError
from conveyor.io import star
from conveyor.io.star import (
    angst_to_px,
    format_image_name,
    join_optics,
    optics_table,
    origins_px,
    parse_image_name,
    parse_image_names,
    px_to_angst,
    read_micrographs,
    read_particles,
    read_star,
    with_origins_px,
    write_star,
)


def _particles(n: int, width: int, groups=(1,)) -> pd.DataFrame:
    rng = np.random.default_rng(3)
    return pd.DataFrame(
        {
            "rlnCoordinateX": rng.uniform(0, 4000, n).round(2),
            "rlnCoordinateY": rng.uniform(0, 4000, n).round(2),
            "rlnImageName": [format_image_name(i + 1, f"Extract/job004/mic{i % 3}.mrcs", width) for i in range(n)],
            "rlnMicrographName": [f"MotionCorr/job002/mic{i % 3}.mrc" for i in range(n)],
            "rlnDefocusU": rng.uniform(8000, 30000, n).round(3),
            "rlnAngleRot": rng.uniform(-180, 180, n).round(4),
            "rlnOriginXAngst": rng.uniform(-5, 5, n).round(4),
            "rlnOriginYAngst": rng.uniform(-5, 5, n).round(4),
            "rlnOpticsGroup": [groups[i % len(groups)] for i in range(n)],
        }
    )


@pytest.mark.parametrize("width", [6, 8])
def test_particles_with_optics_round_trip(tmp_path, width):
    optics = pd.concat(
        [
            optics_table("opticsGroup1", 0.83, 300, 2.7, 0.1, image_size=256, micrograph_pixel_size=0.83),
            optics_table("opticsGroup2", 1.06, 200, 2.7, 0.07, image_size=200, image_pixel_size=1.06,
                         micrograph_pixel_size=1.06, optics_group=2),
        ],
        ignore_index=True,
    )
    parts = _particles(40, width, groups=(1, 2))
    path = tmp_path / "particles.star"
    write_star(path, {"optics": optics, "particles": parts})

    blocks = read_star(path)
    assert list(blocks) == ["optics", "particles"]
    table, opt = read_particles(path)
    assert len(table) == 40
    assert list(table["rlnImageName"]) == list(parts["rlnImageName"])  # zero padding kept
    assert table["rlnImageName"].iloc[0] == ("0" * (width - 1)) + "1@Extract/job004/mic0.mrcs"
    np.testing.assert_allclose(table["rlnDefocusU"], parts["rlnDefocusU"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(table["rlnOriginXAngst"], parts["rlnOriginXAngst"], atol=1e-6)
    assert table["rlnOpticsGroup"].tolist() == parts["rlnOpticsGroup"].tolist()
    assert opt["rlnImageSize"].tolist() == [256, 200]
    assert opt["rlnVoltage"].tolist() == [300, 200]

    joined = join_optics(table, opt, path)
    assert len(joined) == 40 and joined.index.equals(table.index)
    expect_ps = np.where(parts["rlnOpticsGroup"] == 1, 0.83, 1.06)
    np.testing.assert_allclose(joined["rlnImagePixelSize"], expect_ps)
    np.testing.assert_allclose(joined["rlnAmplitudeContrast"], np.where(parts["rlnOpticsGroup"] == 1, 0.1, 0.07))
    assert joined["rlnOpticsGroupName"].iloc[1] == "opticsGroup2"

    idx, stacks = parse_image_names(table["rlnImageName"], path)
    assert idx.tolist() == list(range(1, 41))
    assert stacks[4] == "Extract/job004/mic1.mrcs"


def test_image_names():
    assert parse_image_name("000012@Extract/a.mrcs") == (12, "Extract/a.mrcs")
    assert parse_image_name("00000012@Extract/a.mrcs") == (12, "Extract/a.mrcs")
    assert parse_image_name("7@/abs/path with space/b.mrcs") == (7, "/abs/path with space/b.mrcs")
    assert format_image_name(12, "Extract/a.mrcs") == "000012@Extract/a.mrcs"
    assert format_image_name(12, "Extract/a.mrcs", width=8) == "00000012@Extract/a.mrcs"
    assert format_image_name(1234567, "a.mrcs") == "1234567@a.mrcs"
    for name in range(1, 2000, 137):
        assert parse_image_name(format_image_name(name, "s.mrcs", 8)) == (name, "s.mrcs")
    for bad in ("Extract/a.mrcs", "12@", "@a.mrcs", "x12@a.mrcs", "1.5@a.mrcs", "", None, 12):
        with pytest.raises(InputError, match="malformed image name"):
            parse_image_name(bad, "p.star")
    with pytest.raises(InputError, match=r"p\.star: .*index 0"):
        parse_image_name("000000@a.mrcs", "p.star")
    with pytest.raises(InputError, match=r"p\.star: malformed image name 'oops'"):
        parse_image_names(["1@a.mrcs", "oops"], "p.star")
    with pytest.raises(ValueError):
        format_image_name(0, "a.mrcs")


def test_optics_table_labels_and_checks():
    mic = optics_table("opticsGroup1", 0.5, 300, 2.7, 0.1, micrograph_pixel_size=1.0)
    assert list(mic.columns) == [
        "rlnOpticsGroupName", "rlnOpticsGroup", "rlnMicrographOriginalPixelSize", "rlnVoltage",
        "rlnSphericalAberration", "rlnAmplitudeContrast", "rlnMicrographPixelSize",
    ]
    assert len(mic) == 1 and mic["rlnOpticsGroup"].iloc[0] == 1
    part = optics_table("og", 0.5, 300, 2.7, 0.1, image_size=128, micrograph_pixel_size=1.0)
    assert part["rlnImagePixelSize"].iloc[0] == 1.0  # defaults to the micrograph pixel size
    assert part["rlnImageSize"].iloc[0] == 128 and part["rlnImageDimensionality"].iloc[0] == 2
    movies = optics_table("og", 0.5, 300, 2.7, 0.1)
    assert "rlnMicrographPixelSize" not in movies and "rlnImageSize" not in movies
    with pytest.raises(InputError, match="voltage"):
        optics_table("og", 1.0, 0, 2.7, 0.1)
    with pytest.raises(InputError, match="amplitude contrast"):
        optics_table("og", 1.0, 300, 2.7, 1.5)
    with pytest.raises(InputError, match="pixel size"):
        optics_table("og", -1.0, 300, 2.7, 0.1)
    with pytest.raises(InputError, match="without spaces"):
        optics_table("optics group", 1.0, 300, 2.7, 0.1)


def test_join_optics_errors_and_defaults():
    opt = optics_table("og", 1.0, 300, 2.7, 0.1, image_size=64)
    table = pd.DataFrame({"rlnImageName": ["1@a.mrcs", "2@a.mrcs"], "rlnOpticsGroup": [1, 3]})
    with pytest.raises(InputError, match=r"p\.star: rows refer to optics group\(s\) \[3\]"):
        join_optics(table, opt, "p.star")
    no_group = table.drop(columns="rlnOpticsGroup").assign(rlnVoltage=[200.0, 200.0])
    joined = join_optics(no_group, opt)  # single group: everything is group 1
    assert joined["rlnImageSize"].tolist() == [64, 64]
    assert joined["rlnVoltage"].tolist() == [200.0, 200.0]  # per-row value wins


def test_origin_units():
    table = pd.DataFrame({"rlnOriginXAngst": [2.0, -1.0], "rlnOriginYAngst": [0.5, 4.0],
                          "rlnImagePixelSize": [0.5, 2.0]})
    np.testing.assert_allclose(origins_px(table), [[4.0, 1.0], [-0.5, 2.0]])
    np.testing.assert_allclose(origins_px(table, pixel_size=1.0), [[2.0, 0.5], [-1.0, 4.0]])
    back = with_origins_px(table, origins_px(table), table["rlnImagePixelSize"].to_numpy())
    np.testing.assert_allclose(back[["rlnOriginXAngst", "rlnOriginYAngst"]], table[["rlnOriginXAngst", "rlnOriginYAngst"]])
    assert px_to_angst(3.0, 1.5) == 4.5 and angst_to_px(4.5, 1.5) == 3.0
    with pytest.raises(InputError, match="pixel size"):
        angst_to_px(1.0, 0.0)
    with pytest.raises(InputError, match="rlnImagePixelSize"):
        origins_px(table.drop(columns="rlnImagePixelSize"))


LEGACY = """
data_

loop_
_rlnMicrographName #1
_rlnCoordinateX #2
_rlnCoordinateY #3
_rlnImageName #4
_rlnDefocusU #5
_rlnVoltage #6
_rlnSphericalAberration #7
_rlnAmplitudeContrast #8
_rlnMagnification #9
_rlnDetectorPixelSize #10
_rlnOriginX #11
_rlnOriginY #12
mic1.mrc 100.0 200.0 000001@Particles/mic1.mrcs 10000.0 300 2.7 0.1 50000.0 5.0 2.0 -1.0
mic1.mrc 300.0 400.0 000002@Particles/mic1.mrcs 12000.0 300 2.7 0.1 50000.0 5.0 0.0 1.5
mic2.mrc 500.0 600.0 000001@Particles/mic2.mrcs 14000.0 300 2.7 0.1 40000.0 5.0 1.0 1.0
"""


def test_legacy_relion30_particles(tmp_path):
    path = tmp_path / "legacy.star"
    path.write_text(LEGACY)
    table, optics = read_particles(path)
    assert len(table) == 3 and len(optics) == 2  # two magnifications -> two groups
    np.testing.assert_allclose(optics["rlnImagePixelSize"], [1.0, 1.25])  # 5 µm * 1e4 / mag
    assert optics["rlnVoltage"].tolist() == [300.0, 300.0]
    assert table["rlnOpticsGroup"].tolist() == [1, 1, 2]
    np.testing.assert_allclose(table["rlnOriginXAngst"], [2.0, 0.0, 1.25])
    np.testing.assert_allclose(table["rlnOriginYAngst"], [-1.0, 1.5, 1.25])
    assert "rlnOriginX" not in table and "rlnMagnification" not in table and "rlnVoltage" not in table
    joined = join_optics(table, optics, path)
    np.testing.assert_allclose(origins_px(joined), [[2.0, -1.0], [0.0, 1.5], [1.0, 1.0]])

    mics, mic_optics = read_micrographs(path)
    assert "rlnMicrographPixelSize" in mic_optics

    bare = tmp_path / "bare.star"
    bare.write_text("data_\nloop_\n_rlnMicrographName #1\n_rlnDefocusU #2\nmic1.mrc 10000\n")
    with pytest.raises(InputError, match=r"bare\.star: RELION 3\.0-style .*re-run the step with RELION 3\.1"):
        read_micrographs(bare)


def test_relion31_micrographs_and_missing_block(tmp_path):
    path = tmp_path / "micrographs.star"
    mics = pd.DataFrame({"rlnMicrographName": ["a.mrc", "b.mrc"], "rlnOpticsGroup": [1, 1]})
    write_star(path, {"optics": optics_table("opticsGroup1", 0.5, 300, 2.7, 0.1, micrograph_pixel_size=1.0),
                      "micrographs": mics})
    table, optics = read_micrographs(path)
    assert table["rlnMicrographName"].tolist() == ["a.mrc", "b.mrc"]
    assert optics["rlnMicrographPixelSize"].iloc[0] == 1.0
    with pytest.raises(InputError, match=r"micrographs\.star: has data_optics but no data_particles"):
        read_particles(path)


def test_bad_star_files(tmp_path):
    missing = tmp_path / "missing.star"
    with pytest.raises(InputError, match="missing.star: STAR file does not exist"):
        read_star(missing)
    junk = tmp_path / "junk.star"
    junk.write_bytes(np.random.default_rng(2).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    with pytest.raises(InputError, match="junk.star"):
        read_star(junk)
    empty = tmp_path / "empty.star"
    empty.write_text("")
    with pytest.raises(InputError, match="empty.star: no data blocks"):
        read_star(empty)
    # a copy cut in the middle of a row
    good = tmp_path / "good.star"
    write_star(good, {"particles": _particles(5, 6)})
    text = good.read_text().rstrip("\n")
    cut = tmp_path / "cut.star"
    cut.write_text(text[: text.rfind("\t")])
    with pytest.raises(InputError, match=r"cut\.star: line \d+ of block data_particles has 8 values for 9 labels"):
        read_star(cut)
    # a literal nan is a value, not a damaged row
    nan_ok = tmp_path / "nan.star"
    nan_ok.write_text("data_x\nloop_\n_rlnA #1\n_rlnB #2\n1 nan\n2 3\n")
    assert np.isnan(read_star(nan_ok)["x"]["rlnB"].iloc[0])
    extra = tmp_path / "extra.star"
    extra.write_text("data_x\nloop_\n_rlnA #1\n_rlnB #2\n1 2\n3 4 5\n")
    with pytest.raises(InputError, match="extra.star: not a readable STAR file"):
        read_star(extra)


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    path = tmp_path / "out.star"

    def broken(data, filename, **kwargs):
        with open(filename, "w") as fh:
            fh.write("data_particles\nloop_\n_rlnImageName #1\n")
        raise OSError("disk full")

    monkeypatch.setattr(star.starfile, "write", broken)
    with pytest.raises(OSError, match="disk full"):
        write_star(path, {"particles": _particles(3, 6)})
    assert os.listdir(tmp_path) == []
