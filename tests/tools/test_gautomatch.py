"""Gautomatch adapter: command line, coordinate parsing, and a run through a stand-in runtime."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from conveyor.cli import main
from conveyor.errors import InputError
from conveyor.io.mrc import write_mrc
from conveyor.io.star import read_star
from conveyor.tools import _contracts as C
from conveyor.tools import gautomatch as ga

DATA = Path(__file__).parent / "data" / "gautomatch"
CENTRES = np.array([[512.0, 1024.0], [1536.5, 768.0], [2048.0, 2900.25]])


@pytest.fixture
def micrograph(tmp_path) -> Path:
    path = tmp_path / "motion" / "m1.mrc"
    write_mrc(path, np.random.default_rng(0).normal(size=(300, 300)).astype(np.float32), 1.0)
    return path


HANDLER = """
import shutil, sys
from pathlib import Path
mic = Path(sys.argv[-1])
assert mic.is_symlink(), mic
shutil.copy({data!r} + "/mic_automatch.star", mic.with_name(mic.stem + "_automatch.star"))
shutil.copy({data!r} + "/mic_automatch.box", mic.with_name(mic.stem + "_automatch.box"))
print("Gautomatch stand-in: 3 particles")
"""


@pytest.fixture
def fake_apptainer(tmp_path, install_fake_apptainer):
    install_fake_apptainer(HANDLER.format(data=str(DATA)))
    image = tmp_path / "ctffind.sif"
    image.write_text("stand-in")
    return image


def test_parse_star_and_box_agree():
    star = ga.parse_automatch_star(DATA / "mic_automatch.star")
    assert np.allclose(star[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy(float), CENTRES)
    assert star["rlnAutopickFigureOfMerit"].tolist() == [0.452, 0.398, 0.311]
    box = ga.parse_box(DATA / "mic_automatch.box")
    assert np.allclose(box[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy(float), np.round(CENTRES))  # corner + 64


def test_bad_box_file(tmp_path):
    (tmp_path / "b.box").write_text("10 20 128\n")
    with pytest.raises(InputError, match="x y width height"):
        ga.parse_box(tmp_path / "b.box")


def test_command_line(tmp_path):
    link = tmp_path / "work" / "mic.mrc"
    cmd = ga.build_command(link, image="/img/g.sif", pixel_size=1.06, diameter=150, templates=tmp_path / "t/refs.mrcs",
                           template_pixel_size=2.12, cc_cutoff=0.2, min_dist=120, lowpass=30, gpu="1",
                           binds=[tmp_path / "motion"], extra=["--speed", "3"])
    assert cmd == [
        "apptainer", "exec", "--nv", "--bind", f"{tmp_path / 'work'},{tmp_path / 'motion'},{tmp_path / 't'}",
        "/img/g.sif", "Gautomatch", "--apixM", "1.06", "--diameter", "150", "--T", str(tmp_path / "t/refs.mrcs"),
        "--apixT", "2.12", "--cc_cutoff", "0.2", "--min_dist", "120", "--lp", "30", "--gid", "1", "--speed", "3",
        str(link),
    ]


def test_dry_run_and_missing_runtime(micrograph, tmp_path, capsys, monkeypatch):
    rc = main(["tools", "gautomatch", str(micrograph), "--image", "/img/g.sif", "--particle-diameter", "150",
               "--out-star", str(tmp_path / "pick/m1.star"), "--method", "log", "--threshold", "auto", "--dry-run"])
    assert rc == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("apptainer exec --nv --bind ") and "Gautomatch --apixM 1 --diameter 150 --gid 0" in out
    assert "--cc_cutoff" not in out and out.endswith("mic.mrc")
    monkeypatch.setenv("PATH", str(tmp_path))
    rc = main(["tools", "gautomatch", str(micrograph), "--image", "/img/g.sif", "--particle-diameter", "150",
               "--out-star", str(tmp_path / "pick/m1.star")])
    assert rc == 2 and "Apptainer" in capsys.readouterr().err
    rc = main(["tools", "gautomatch", str(micrograph), "--image", "/img/g.sif", "--particle-diameter", "150",
               "--out-star", str(tmp_path / "pick/m1.star"), "--method", "template", "--dry-run"])
    assert rc == 2 and "templates" in capsys.readouterr().err


def test_run_converts_outputs_to_the_contract(micrograph, tmp_path, fake_apptainer):
    out = tmp_path / "pick"
    rc = main(["tools", "gautomatch", str(micrograph), "--image", str(fake_apptainer), "--particle-diameter", "150",
               "--out-star", str(out / "m1.star"), "--out-png", str(out / "m1.png"), "--threshold", "0.25"])
    assert rc == 0
    t = read_star(out / "m1.star")["particles"]
    assert list(t.columns) == list(C.PICK_LABELS)
    assert np.allclose(t[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy(float), CENTRES)
    assert (t["rlnMicrographName"] == str(micrograph)).all()
    assert (out / "m1.png").stat().st_size > 0
    assert not any(p.name.startswith(".conveyor-gautomatch") for p in out.iterdir())
