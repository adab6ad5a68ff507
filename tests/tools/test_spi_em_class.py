"""spi_em_class adapter: conversions and the wrapper always, the real tool (marked ``peer``) on simulated shots.

The real run classifies the hits of 200 simulated frames of a 64² detector (70 nm capsids,
10 % of the single hits 50 nm, 5 % multiple hits) into 4 classes. Skipped, with the reason,
when the spi_em_class scripts are not installed (``bash scripts/install-spi-peers.sh``).
"""

from __future__ import annotations

import subprocess
import sys

import h5py
import numpy as np
import pandas as pd
import pytest

from conveyor.cli import main
from conveyor.simulate.spi import simulate_spi
from conveyor.spi.frames import write_frames
from conveyor.tools import spi_em_class as ec

needs_tool = pytest.mark.skipif(
    not ec.available(),
    reason="spi_em_class 0.1.7 scripts (spi_em_create.py, spi_em_config.py, spi_em_run.py, "
           "spi_em_save_by_symmetry.py) not found; run `bash scripts/install-spi-peers.sh`")

SIM = dict(n_files=1, frames_per_file=200, detector=64, beamstop_radius_px=5, gap_px=2, background_photons=20, seed=3)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Shots and a per-frame table whose ``passed`` frames are the truth's hits, centred on the truth."""
    d = tmp_path_factory.mktemp("spi_em_class")
    paths = simulate_spi(d / "sim", **SIM)
    truth = pd.read_csv(paths["frames_csv"])
    table = d / "run_000.h5"
    df = pd.DataFrame({"frame": truth["frame"], "is_hit": truth["is_hit"].astype(bool),
                       "center_x": truth["center_x"], "center_y": truth["center_y"],
                       "passed": truth["is_hit"].astype(bool)})
    write_frames(table, df, {"source": str(paths["shots"][0]), "run": "run_000"})
    return paths["shots"][0], table, truth, d


def test_correlate_shim_is_the_old_scipy_correlate():
    import scipy

    ec.install_shims()
    a = np.random.default_rng(0).random(37)
    v = np.concatenate([a, a])
    np.testing.assert_allclose(scipy.correlate(a, v), np.correlate(a, v))  # numpy's, mode "valid": length 38
    assert scipy.correlate(a, v).shape == (38,)


def test_wrapper_seeds_numpy_and_runs_the_script(tmp_path):
    script = tmp_path / "tool.py"
    script.write_text("import sys, numpy as np, scipy\nprint(np.random.rand(), hasattr(scipy, 'correlate'), sys.argv[1:])\n")
    runs = [subprocess.run([sys.executable, "-m", "conveyor.tools.spi_em_class", str(script), "--seed", s, "--", "a", "-b"],
                           capture_output=True, text=True, check=True).stdout.split() for s in ("3", "3", "4")]
    assert runs[0] == runs[1] and runs[0][0] != runs[2][0]
    assert runs[0][1] == "True" and runs[0][2:] == ["['a',", "'-b']"]


def test_parse_symmetry_scores():
    text = "Class  1: 0.10 < 0.50\nClass  2: 0.62 >= 0.50\nClass 10: 0.01 < 0.50\nSaved selection of 5/88 frames in 1 classes\n"
    assert ec.parse_symmetry_scores(text) == {1: (0.10, False), 2: (0.62, True), 10: (0.01, False)}


def test_input_file_has_one_group_per_run_with_frame_indices(data, tmp_path):
    shots, table, truth, _ = data
    frames, centre, how = ec.frames_to_classify(table)
    assert how == "passed" and np.array_equal(frames, truth.index[truth["is_hit"].astype(bool)].to_numpy())
    assert centre == pytest.approx((truth.loc[0, "center_x"], truth.loc[0, "center_y"]))
    groups = ec.build_input_cxi([(shots, frames, centre), (shots, frames[:0], None)], tmp_path / "in.cxi")
    assert len(groups) == 1  # runs without frames are left out
    with h5py.File(tmp_path / "in.cxi", "r") as f:
        img = f["entry_1/image_1"]
        assert sorted(img) == ["conveyor_frame", "data", "image_center", "mask"]
        assert img["data"].shape == (frames.size, 64, 64)
        np.testing.assert_array_equal(img["conveyor_frame"][()], frames)
        np.testing.assert_allclose(img["image_center"][()][:2], centre)


def test_bad_options_are_one_line_errors(data, tmp_path, capsys):
    shots, table, _, _ = data
    rc = main(["tools", "spi-em-class", "--shots", str(shots), "--frames-table", str(table), str(table),
               "--out-dir", str(tmp_path)])
    assert rc == 2 and "2 tables for 1 shot files" in capsys.readouterr().err


@pytest.mark.peer
@needs_tool
def test_spi_em_class_assigns_every_frame(data, capsys):
    """Every passed frame gets exactly one class; the selection files are consistent.

    Measured (seed 3, 100 hits, 4 classes, 36 in-plane angles, 6 iterations): the 11 frames
    of 50 nm particles make up one class of 11 exactly (classes 13/11/2/74); no class reaches
    the tool's default symmetry share 0.5 for order 10, so nothing is selected. About 15 s of
    CPU (35-100 s on two busy cores), mostly numba compiling the tool's kernels.
    """
    shots, table, truth, d = data
    out = d / "classes"
    assert main(["tools", "spi-em-class", "--shots", str(shots), "--frames-table", str(table), "--out-dir", str(out),
                 "--classes", "4", "--rotations", "36", "--iterations", "6", "--symmetry-order", "10"]) == 0
    print(capsys.readouterr().out)
    a = pd.read_csv(out / "assignments.csv")
    hits = truth.index[truth["is_hit"].astype(bool)].to_numpy()
    assert sorted(a["frame"]) == sorted(hits) and a["frame"].is_unique
    assert list(a.columns[:3]) == ["file", "frame", "class"] and a["class"].between(1, 4).all()
    assert np.isfinite(a["rotation_deg"]).all() and a["rotation_deg"].between(0, 180).all()
    assert np.allclose(a["scale"].mean(), 1.0, atol=0.05) and a["probability"].between(0, 1).all()
    scores = pd.read_csv(out / "class_scores.csv")
    assert scores["population"].sum() == len(a) and "symmetry_order10" in scores
    sel = pd.read_csv(out / "selected.csv")
    assert list(sel.columns) == ["file", "frame", "class"]
    chosen = set(scores.loc[scores["selected"], "class"])
    assert set(sel["frame"]) == set(a.loc[a["class"].isin(chosen), "frame"])
    # the 50 nm particles (fringes 1.4x wider) get a class of their own
    wrong = truth.set_index("frame").loc[a["frame"], "is_wrong_size"].astype(bool).to_numpy()
    counts = np.bincount(a["class"].to_numpy()[wrong], minlength=5)
    k = int(np.argmax(counts))
    print(f"classes of the {wrong.sum()} 50 nm frames: {counts[1:].tolist()}; populations {scores['population'].tolist()}")
    assert wrong.sum() >= 5 and counts[k] >= 0.8 * wrong.sum() and counts[k] >= 0.8 * (a["class"] == k).sum()
    with h5py.File(out / "classes.h5", "r") as f:
        assert f["classes/models"].shape[0] == 4 and f["classes"].attrs["tool"].startswith("spi_em_class 0.1")
