"""CTFFIND4 adapter: stdin answers, results parsing, conversion, and a run through a stand-in runtime."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

from conveyor.cli import main
from conveyor.errors import InputError
from conveyor.io.mrc import write_mrc
from conveyor.io.star import read_star
from conveyor.tools import _contracts as C
from conveyor.tools import ctffind

DATA = Path(__file__).parent / "data" / "ctffind"


@pytest.fixture
def micrograph(tmp_path) -> Path:
    path = tmp_path / "motion" / "m1_noDW.mrc"
    write_mrc(path, np.random.default_rng(0).normal(size=(128, 128)).astype(np.float32), 1.06)
    return path


HANDLER = """
import shutil, sys
from pathlib import Path
import numpy as np
sys.path.insert(0, {repo!r})
from conveyor.io.mrc import write_mrc
answers = sys.stdin.read().splitlines()
Path({record!r}).write_text("\\n".join(answers) + "\\n")
print(" **   Welcome to Ctffind   **")
diag = Path(answers[1])
write_mrc(diag, np.zeros((32, 32), np.float32), 1.06)
shutil.copy({data!r} + "/diagnostic_output.txt", diag.with_suffix(".txt"))
shutil.copy({data!r} + "/diagnostic_output_avrot.txt", diag.with_name(diag.stem + "_avrot.txt"))
print("Summary of results                          : " + str(diag.with_suffix(".txt")))
"""


@pytest.fixture
def fake_apptainer(tmp_path, install_fake_apptainer):
    record = tmp_path / "stdin.txt"
    install_fake_apptainer(HANDLER.format(repo=str(Path(__file__).resolve().parents[2]), record=str(record),
                                          data=str(DATA)))
    image = tmp_path / "ctffind.sif"
    image.write_text("stand-in")
    return image, record


# --------------------------------------------------------------------------- answers and command


def test_stdin_answers_follow_ctffind_41_question_order():
    text = ctffind.stdin_answers("/d/m.mrc", "/w/diag.mrc", pixel_size=1.06, voltage=300, cs=2.7,
                                 amplitude_contrast=0.1, spectrum_size=512, res_min=30, res_max=5, defocus_min=5000,
                                 defocus_max=50000, defocus_step=500, astigmatism=1000)
    lines = text.splitlines()
    assert len(lines) == len(ctffind.QUESTIONS)
    assert lines == ["/d/m.mrc", "/w/diag.mrc", "1.06", "300", "2.7", "0.1", "512", "30", "5", "5000", "50000",
                     "500", "no", "yes", "yes", "1000", "no", "no"]
    pp = ctffind.stdin_answers("/d/m.mrc", "/w/diag.mrc", pixel_size=1, voltage=300, cs=2.7, amplitude_contrast=0.1,
                               fast_search=True, phase_shift=True, phase_min=0, phase_max=180, phase_step=10)
    pl = pp.splitlines()
    assert pl[13] == "no"  # fast search
    assert pl[16:21] == ["yes", "0", f"{math.pi:.6g}", f"{math.radians(10):.6g}", "no"]  # radians


def test_bad_ranges_are_input_errors():
    with pytest.raises(InputError, match="res_min > res_max"):
        ctffind.stdin_answers("m", "d", pixel_size=1, voltage=300, cs=2.7, amplitude_contrast=0.1, res_min=4, res_max=5)
    with pytest.raises(InputError, match="defocus"):
        ctffind.stdin_answers("m", "d", pixel_size=1, voltage=300, cs=2.7, amplitude_contrast=0.1,
                              defocus_min=9000, defocus_max=8000)


def test_dry_run_prints_command_and_answers(micrograph, tmp_path, capsys):
    rc = main(["tools", "ctffind", str(micrograph), "--image", "/img/ctffind.sif", "--out-star",
               str(tmp_path / "ctf/m1.star"), "--threads", "4", "--dry-run"])
    assert rc == 0
    out = capsys.readouterr().out
    first = out.splitlines()[0]
    assert first.startswith("apptainer exec --bind ") and "--env OMP_NUM_THREADS=4" in first
    assert first.endswith("/img/ctffind.sif ctffind <<'EOF'") and "--nv" not in first
    assert f"\n{micrograph.resolve()}\n" in out and out.rstrip().endswith("EOF")
    assert not (tmp_path / "ctf").exists()


def test_without_apptainer_a_clear_error(micrograph, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))
    rc = main(["tools", "ctffind", str(micrograph), "--image", "x.sif", "--out-star", str(tmp_path / "c.star")])
    assert rc == 2
    err = capsys.readouterr().err
    assert str(micrograph) in err and "Apptainer" in err and "x.sif" in err


# --------------------------------------------------------------------------- parsing


def test_parse_results_file():
    r = ctffind.parse_diagnostic_txt(DATA / "diagnostic_output.txt")
    assert r["defocus_1"] == pytest.approx(15234.567383) and r["defocus_2"] == pytest.approx(14876.123047)
    assert r["azimuth"] == pytest.approx(123.456787) and r["cross_correlation"] == pytest.approx(0.134567)
    assert r["fit_resolution"] == pytest.approx(4.123456)
    assert (r["pixel_size"], r["voltage"], r["cs"], r["amplitude_contrast"]) == (1.06, 300.0, 2.7, 0.1)
    assert r["version"] == "4.1.14"
    row = ctffind.ctf_row_from_ctffind(r, "m1.mrc")
    assert list(row) == list(C.CTF_LABELS)
    assert row["rlnDefocusU"] == pytest.approx(15234.567383) and row["rlnDefocusV"] == pytest.approx(14876.123047)
    assert row["rlnDefocusAngle"] == pytest.approx(123.456787 - 180)  # same axis, in (-90, 90]
    assert row["rlnCtfAstigmatism"] == pytest.approx(358.444336)
    assert row["rlnPhaseShift"] == 0 and row["rlnMicrographPixelSize"] == 1.06


def test_phase_plate_results_swap_and_inf():
    r = ctffind.parse_diagnostic_txt(DATA / "phaseplate_output.txt")
    assert math.isinf(r["fit_resolution"])
    row = ctffind.ctf_row_from_ctffind(r, "m7.mrc")
    assert row["rlnDefocusU"] == pytest.approx(5400.75) and row["rlnDefocusV"] == pytest.approx(5012.25)
    assert row["rlnDefocusAngle"] == pytest.approx(80.0)  # -10 + 90
    assert row["rlnPhaseShift"] == pytest.approx(90.0)  # pi/2 rad
    assert row["rlnCtfMaxResolution"] == 999.0
    assert (row["rlnVoltage"], row["rlnAmplitudeContrast"]) == (200.0, 0.07)


def test_avrot_profile():
    prof = ctffind.parse_avrot(DATA / "diagnostic_output_avrot.txt")
    assert set(prof) == {"k", "data", "fit", "cc"} and len(prof["k"]) == 24
    assert prof["k"][0] == 0 and np.all(np.diff(prof["k"]) > 0)
    assert ctffind.parse_avrot(DATA / "missing_avrot.txt") is None


def test_truncated_results_file(tmp_path):
    bad = tmp_path / "d.txt"
    bad.write_text("# Output from CTFFind version 4.1.14\n1.000000 15000.0 14000.0\n")
    with pytest.raises(InputError, match="3 columns, expected 7"):
        ctffind.parse_diagnostic_txt(bad)


# --------------------------------------------------------------------------- full run (stand-in runtime)


def test_run_converts_outputs_to_the_contract(micrograph, tmp_path, fake_apptainer):
    image, record = fake_apptainer
    out = tmp_path / "ctf"
    rc = main(["tools", "ctffind", str(micrograph), "--image", str(image), "--out-star", str(out / "m1.star"),
               "--out-diag", str(out / "m1_diag.png"), "--voltage", "300", "--cs", "2.7",
               "--amplitude-contrast", "0.1", "--res-max", "5", "--micrograph-name", "motion/m1.mrc"])
    assert rc == 0
    answers = record.read_text().splitlines()
    assert answers[0] == str(micrograph.resolve()) and answers[2] == "1.06" and len(answers) == 18
    t = read_star(out / "m1.star")["micrographs"]
    assert list(t.columns) == list(C.CTF_LABELS) and len(t) == 1
    assert t["rlnMicrographName"].iloc[0] == "motion/m1.mrc"
    assert t["rlnDefocusU"].iloc[0] == pytest.approx(15234.567, abs=1e-3)
    assert t["rlnCtfMaxResolution"].iloc[0] == pytest.approx(4.123456, abs=1e-5)
    assert (out / "m1_diag.png").stat().st_size > 0
    assert not any(p.name.startswith(".conveyor-ctffind") for p in out.iterdir())
