"""MotionCor2 adapter: command line, log parsing, sign conversion, and a run through a stand-in runtime.

MotionCor2 cannot be installed here. Its logs in tests/tools/data/motioncor2 are written from
its documented format; the end-to-end test replaces ``apptainer`` by a small script that
writes MotionCor2's outputs, so the whole run-and-convert path is exercised.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from conveyor.cli import main
from conveyor.errors import InputError
from conveyor.io.mrc import read_mrc, write_mrc
from conveyor.io.star import read_star
from conveyor.tools import _contracts as C
from conveyor.tools import motioncor2 as mc

DATA = Path(__file__).parent / "data" / "motioncor2"
DRIFT = np.array([1.5, -0.8])  # content displacement per frame in the sample logs (Conveyor's sign)
TRUTH = np.arange(8)[:, None] * DRIFT


@pytest.fixture
def movie(tmp_path) -> Path:
    path = tmp_path / "raw" / "m1.mrc"
    write_mrc(path, np.ones((8, 64, 64), np.float32), 0.8, volume=False)
    return path


HANDLER = """
import shutil, sys
from pathlib import Path
import numpy as np
sys.path.insert(0, {repo!r})
from conveyor.io.mrc import write_mrc
argv = sys.argv[2:]
opt = {{argv[k]: argv[k + 1] for k in range(len(argv) - 1) if argv[k].startswith("-")}}
out = Path(opt["-OutMrc"])
ps = float(opt["-PixSize"])
write_mrc(out, np.full((64, 64), 8.0, np.float32), ps)
write_mrc(out.with_name(out.stem + "_DW.mrc"), np.full((64, 64), 5.0, np.float32), ps)
log_dir = Path(opt["-LogDir"])
src = Path({data!r})
shutil.copy(src / "mic-Patch-Full.log", log_dir / (out.stem + "-Patch-Full.log"))
shutil.copy(src / "mic-Patch-Patch.log", log_dir / (out.stem + "-Patch-Patch.log"))
print("MotionCor2 stand-in: done")
"""


@pytest.fixture
def fake_apptainer(tmp_path, install_fake_apptainer):
    repo = str(Path(__file__).resolve().parents[2])
    record = install_fake_apptainer(HANDLER.format(repo=repo, data=str(DATA / "v1.4_patch")))
    image = tmp_path / "motioncor2.sif"
    image.write_text("not a real image")
    return image, record


# --------------------------------------------------------------------------- parsing


def test_full_log_old_style_converted_to_conveyor_sign():
    full, patch = mc.find_logs(DATA / "v1.3_full")
    assert full.name == "mic0-Full.log" and patch is None
    frames, raw = mc.parse_full_log(full)
    assert frames.tolist() == list(range(1, 9))
    assert raw[0].tolist() == [4.5, -2.4]  # reference was the central frame
    assert np.allclose(mc.motioncor2_to_conveyor(raw), TRUTH)


def test_patch_logs_both_versions():
    full, patch = mc.find_logs(DATA / "v1.4_patch")
    assert full.name == "mic-Patch-Full.log" and patch.name == "mic-Patch-Patch.log"
    p7 = mc.parse_patch_log(patch)
    assert len(p7) == 32 and list(p7.columns) == ["frame", "x", "y", "shift_x", "shift_y", "fit_x", "fit_y"]
    p6 = mc.parse_patch_log(DATA / "mc3_patch" / "mic-Patch-Patch.log")
    assert len(p6) == 32 and p6["bad"].sum() == 1
    local = mc.local_shifts_table(p7)
    last = local.iloc[-1]  # patch 4 (p = 3), frame 8: MotionCor2 shift (1.05, -0.63)
    assert last["rlnMicrographFrameNumber"] == 8 and last["rlnCoordinateX"] == 3072.0
    assert last["rlnMicrographShiftX"] == pytest.approx(-1.05) and last["rlnMicrographShiftY"] == pytest.approx(0.63)


def test_bad_log_is_an_input_error(tmp_path):
    bad = tmp_path / "x-Full.log"
    bad.write_text("# full frame alignment\n   1  oops\n")
    with pytest.raises(InputError, match="line 2"):
        mc.parse_full_log(bad)
    (tmp_path / "empty-Full.log").write_text("# full frame alignment\n")
    with pytest.raises(InputError, match="no frame shifts"):
        mc.parse_full_log(tmp_path / "empty-Full.log")


# --------------------------------------------------------------------------- command line


def test_command_line_is_exact(tmp_path):
    movie = tmp_path / "raw" / "m1.tif"
    gain = tmp_path / "gain" / "g.mrc"
    work = tmp_path / "work"
    cmd = mc.build_command(movie, image="/img/mc2.sif", out_mrc=work / "mic.mrc", log_dir=work, pixel_size=0.8,
                           voltage=300, dose_per_frame=1.2, pre_exposure=0.5, patches=(5, 5), bfactor=96,
                           binning=2, gain=gain, gain_rot=1, gain_flip="y", gpu="0 1")
    assert cmd == [
        "apptainer", "exec", "--nv", "--bind", f"{tmp_path / 'raw'},{work},{tmp_path / 'gain'}", "/img/mc2.sif",
        "MotionCor2", "-InTiff", str(movie), "-OutMrc", str(work / "mic.mrc"), "-Patch", "5", "5",
        "-Iter", "10", "-Tol", "0.5", "-Bft", "150", "-PixSize", "0.8", "-FmDose", "1.2", "-InitDose", "0.5",
        "-kV", "300", "-FmRef", "0", "-FtBin", "2", "-Gain", str(gain), "-RotGain", "1", "-FlipGain", "2",
        "-Gpu", "0", "1", "-LogDir", str(work), "-LogFile", str(work / "mic"),
    ]


def test_extra_arguments_override(tmp_path):
    cmd = mc.build_command(tmp_path / "m.mrc", image="i.sif", out_mrc=tmp_path / "o.mrc", log_dir=tmp_path,
                           pixel_size=1, voltage=200, dose_per_frame=1, extra=["-Bft", "500", "150", "-Iter", "7"],
                           nv=False)
    assert "--nv" not in cmd and "-InMrc" in cmd
    assert cmd.count("-Bft") == 1 and cmd[-5:] == ["-Bft", "500", "150", "-Iter", "7"] and cmd.count("-Iter") == 1


def test_dry_run_prints_the_command(movie, tmp_path, capsys):
    rc = main(["tools", "motioncor2", str(movie), "--image", "/img/mc2.sif", "--out-sum", str(tmp_path / "o/a.mrc"),
               "--out-sum-nodw", str(tmp_path / "o/a_noDW.mrc"), "--out-shifts", str(tmp_path / "o/a.star"),
               "--dose-per-frame", "1.2", "--patches", "5x5", "--dry-run"])
    assert rc == 0
    out = capsys.readouterr().out
    assert out.startswith("apptainer exec --nv ") and "/img/mc2.sif MotionCor2 -InMrc" in out
    assert "-Patch 5 5" in out and "-PixSize 0.8" in out and "-kV 300" in out and "-Gpu 0" in out
    assert not (tmp_path / "o").exists()


def test_without_apptainer_a_clear_error(movie, tmp_path, monkeypatch, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    rc = main(["tools", "motioncor2", str(movie), "--image", str(tmp_path / "mc2.sif"), "--out-sum",
               str(tmp_path / "a.mrc"), "--out-sum-nodw", str(tmp_path / "b.mrc"), "--out-shifts",
               str(tmp_path / "a.star"), "--dose-per-frame", "1"])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith(f"conveyor: error: {movie}: ") and "Apptainer" in err and "mc2.sif" in err
    assert "--dry-run" in err


def test_missing_image_is_named(movie, tmp_path, fake_apptainer):
    with pytest.raises(InputError, match="container image does not exist"):
        mc.run_motioncor2(movie, image=tmp_path / "nope.sif", out_sum=tmp_path / "a.mrc",
                          out_sum_nodw=tmp_path / "b.mrc", out_shifts=tmp_path / "a.star", dose_per_frame=1.0)


# --------------------------------------------------------------------------- full run (stand-in runtime)


def test_run_converts_outputs_to_the_contract(movie, tmp_path, fake_apptainer):
    image, record = fake_apptainer
    out = tmp_path / "motion"
    rc = main(["tools", "motioncor2", str(movie), "--image", str(image), "--out-sum", str(out / "m1.mrc"),
               "--out-sum-nodw", str(out / "m1_noDW.mrc"), "--out-shifts", str(out / "m1.star"),
               "--out-plot", str(out / "m1.png"), "--dose-per-frame", "1.0", "--voltage", "300", "--binning", "2"])
    assert rc == 0
    call = json.loads(record.read_text().splitlines()[0])
    assert call[:2] == ["exec", "--nv"] and str(image) in call
    dw, ps = read_mrc(out / "m1.mrc")
    nodw, ps2 = read_mrc(out / "m1_noDW.mrc")
    assert dw.mean() == pytest.approx(5.0) and nodw.mean() == pytest.approx(8.0)  # _DW.mrc is the weighted one
    assert ps == ps2 == pytest.approx(1.6)  # 0.8 Å/px binned by 2
    blocks = read_star(out / "m1.star")
    g = blocks["general"].iloc[0]
    assert set(C.GENERAL_LABELS) <= set(g.index)
    assert g["rlnMicrographMovieName"] == str(movie) and g["rlnImageSizeZ"] == 8 and g["rlnMicrographBinning"] == 2
    shifts = blocks["global_shift"][["rlnMicrographShiftX", "rlnMicrographShiftY"]].to_numpy(float)
    assert np.allclose(shifts, TRUTH)
    assert len(blocks["local_shift"]) == 32
    assert (out / "m1.png").stat().st_size > 0
    assert not any(p.name.startswith(".conveyor-motioncor2") for p in out.iterdir())  # work dir removed


def test_tool_failure_reports_log_tail(movie, tmp_path, fake_apptainer, monkeypatch):
    image, _ = fake_apptainer
    failing = tmp_path / "fail.py"
    failing.write_text("import sys\nprint('ERROR: GPU 0 out of memory')\nsys.exit(3)\n")
    monkeypatch.setenv("FAKE_HANDLER", str(failing))
    with pytest.raises(InputError) as err:
        mc.run_motioncor2(movie, image=image, out_sum=tmp_path / "a.mrc", out_sum_nodw=tmp_path / "b.mrc",
                          out_shifts=tmp_path / "a.star", dose_per_frame=1.0)
    msg = str(err.value)
    assert msg.startswith(str(movie)) and "MotionCor2 failed (exit status 3)" in msg and "out of memory" in msg
    assert not (tmp_path / "a.mrc").exists()


def test_shutil_which_sees_the_stand_in(fake_apptainer):
    assert shutil.which("apptainer").endswith("fakebin/apptainer")
