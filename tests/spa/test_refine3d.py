"""Gold-standard refinement against simulator ground truth, restart after an interruption,
orientation sampling, 3D classification and the refine3d/postprocess/fsc commands."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from conveyor.cli import main
from conveyor.geometry import angular_distance, angular_error, random_rotations
from conveyor.io.mrc import read_mrc, write_mrc
from conveyor.io.star import format_image_name, optics_table, read_particles, read_star, write_star
from conveyor.simulate.spa import make_model
from conveyor.spa.fsc import fsc, read_fsc_star, resolution_at
from conveyor.spa.reconstruct import lowpass
from conveyor.spa.refine3d import (
    asymmetric_unit,
    fibonacci_directions,
    local_perturbations,
    orientation_grid,
    refine3d,
)

from .test_reconstruct import BOX, DIAMETER, PIXEL, simulated_particles

NYQUIST = 2 * PIXEL


class Stop(Exception):
    pass


def stop_after(n):
    def cb(it, info):
        if it == n:
            raise Stop(f"interrupted after iteration {it}")

    return cb


def test_orientation_grid_covers_rotations_modulo_symmetry():
    dirs = fibonacci_directions(15.0)
    keep = asymmetric_unit(dirs, "D3")
    assert keep.sum() == pytest.approx(len(dirs) / 6, rel=0.15)
    grid, (rot, tilt, psi) = orientation_grid(15.0, "D3")
    assert len(grid) == keep.sum() * 24
    rots = random_rotations(200, 3)
    err = angular_error(grid[None], rots[:, None], "D3").min(axis=1)  # nearest grid orientation
    assert np.percentile(err, 95) < 11.0 and err.max() < 14.0
    pert = local_perturbations(7.5)
    assert len(pert) == 27 and np.allclose(pert[0], np.eye(3))
    ang = angular_distance(pert, np.eye(3))
    assert ang.max() == pytest.approx(7.5 * np.sqrt(3), rel=1e-6)


@pytest.fixture(scope="module")
def data():
    return simulated_particles()


def test_refinement_recovers_the_map_and_continues_after_an_interruption(tmp_path, data):
    """1000 particles (SNR 0.05, D3, 5 Å/px) from the truth low-passed to 35 Å; the run is
    interrupted after iteration 2 and continued from the saved state."""
    n = 1000
    im, ctf = data.images[:n], data.ctf.subset(np.arange(n))
    kw = dict(symmetry="D3", particle_diameter=DIAMETER, iterations=12, initial_lowpass=35.0, seed=4)
    with pytest.raises(Stop):
        refine3d(im, ctf, PIXEL, data.truth, out_dir=tmp_path, callback=stop_after(2), **kw)
    assert (tmp_path / "it002_model.json").exists() and not (tmp_path / "it003_model.json").exists()
    (tmp_path / "it003_half1.mrc").write_bytes(b"partial file of an interrupted iteration")
    res = refine3d(im, ctf, PIXEL, data.truth, out_dir=tmp_path, resume=True, **kw)
    log = (tmp_path / "refine.log").read_text()
    assert "continuing after iteration 2" in log
    assert [h["iteration"] for h in res.history] == list(range(1, len(res.history) + 1))
    assert res.converged and res.iterations >= 4
    # against the truth
    curve = fsc(res.map, data.truth)
    r05 = resolution_at(curve, 0.5, PIXEL)
    assert r05 <= 2.5 * NYQUIST, r05
    assert abs(res.resolution - r05) <= 0.2 * r05, (res.resolution, r05)
    err = angular_error(res.rotations, data.rotations[:n], "D3")
    assert np.median(err) < 15.0
    shift_err = np.linalg.norm(res.shifts - data.shifts[:n], axis=1)
    assert np.median(shift_err) < 1.0
    # gold standard: the halves are the random split, each about half
    assert set(np.unique(res.subsets)) == {1, 2} and abs((res.subsets == 1).sum() - n / 2) <= 1
    # the last iteration's STAR file holds the final poses (RELION's origins are -shift)
    last = res.history[-1]["iteration"]
    table = read_star(tmp_path / f"it{last:03d}_particles.star")["particles"]
    assert np.allclose(table["rlnOriginXAngst"], -res.shifts[:, 0] * PIXEL, atol=1e-3)
    assert set(table["rlnRandomSubset"]) == {1, 2}


def test_continued_refinement_equals_an_uninterrupted_one(tmp_path, data):
    n = 300
    im, ctf = data.images[:n], data.ctf.subset(np.arange(n))
    kw = dict(symmetry="D3", particle_diameter=DIAMETER, iterations=3, initial_lowpass=35.0, seed=1)
    a = refine3d(im, ctf, PIXEL, data.truth, out_dir=tmp_path / "a", **kw)
    with pytest.raises(Stop):
        refine3d(im, ctf, PIXEL, data.truth, out_dir=tmp_path / "b", callback=stop_after(2), **kw)
    b = refine3d(im, ctf, PIXEL, data.truth, out_dir=tmp_path / "b", resume=True, **kw)
    assert a.iterations == b.iterations == 3
    assert np.allclose(a.rotations, b.rotations) and np.allclose(a.shifts, b.shifts)
    assert np.allclose(a.half1, b.half1, atol=1e-6 * float(np.abs(a.half1).max()))
    assert np.allclose(a.fsc, b.fsc)


@pytest.mark.slow
def test_3d_classification_separates_two_structures():
    """Two different D3 proteins mixed 50/50: the classes follow the structures."""
    a = simulated_particles(n=600, snr=0.1, seed=11, model_seed=1000)
    b = simulated_particles(n=600, snr=0.1, seed=12, model_seed=2000)
    images = np.concatenate([a.images, b.images])
    from conveyor.spa.reconstruct import CtfParams

    ctf = CtfParams(*(np.concatenate([getattr(a.ctf, f), getattr(b.ctf, f)]) for f in (
        "defocus_u", "defocus_v", "defocus_angle", "voltage", "cs", "amplitude_contrast", "phase_shift", "bfactor",
        "scale")))
    ref = 0.5 * (a.truth / a.truth.std() + b.truth / b.truth.std())
    res = refine3d(images, ctf, PIXEL, ref, symmetry="D3", particle_diameter=DIAMETER, classes=2, iterations=12,
                   initial_lowpass=30.0, class_resolution=15.0, seed=0)
    truth = np.r_[np.zeros(600, int), np.ones(600, int)]
    got = res.classes - 1
    accuracy = max(np.mean(got == truth), np.mean(got != truth))
    assert accuracy > 0.95, accuracy


# --------------------------------------------------------------------------- commands
def write_particles(folder, d, n, with_subsets=False):
    """A particle stack and a RELION 3.1 STAR file (no origins) for the first ``n`` particles."""
    write_mrc(folder / "particles.mrcs", d.images[:n], PIXEL)
    optics = optics_table("opticsGroup1", PIXEL, 300.0, 2.7, 0.1, image_size=BOX, image_pixel_size=PIXEL)
    parts = pd.DataFrame({
        "rlnImageName": [format_image_name(i + 1, "particles.mrcs") for i in range(n)],
        "rlnDefocusU": d.ctf.defocus_u[:n], "rlnDefocusV": d.ctf.defocus_v[:n],
        "rlnDefocusAngle": d.ctf.defocus_angle[:n], "rlnOpticsGroup": 1,
    })
    if with_subsets:
        parts["rlnRandomSubset"] = 1 + (np.arange(n) % 2)
    write_star(folder / "particles.star", {"optics": optics, "particles": parts})
    return folder / "particles.star"


def test_commands_refine_continue_postprocess_and_fsc(tmp_path, data, capsys):
    star = write_particles(tmp_path, data, 400, with_subsets=True)
    # the reference at another pixel size and box: resampled by the command
    fine = make_model(DIAMETER, "D3", np.random.default_rng(1000)).volume(2 * BOX + 8, PIXEL / 2)
    write_mrc(tmp_path / "ref.mrc", fine, PIXEL / 2)
    write_mrc(tmp_path / "truth.mrc", data.truth, PIXEL)
    out = tmp_path / "refine"
    args = ["spa", "refine3d", "--particles", str(star), "--reference", str(tmp_path / "ref.mrc"), "--out-dir", str(out),
            "--symmetry", "D3", "--particle-diameter", str(DIAMETER)]
    assert main(args + ["--iterations", "2"]) == 0
    assert main(args + ["--iterations", "2"]) == 2  # refuses to overwrite without --continue
    assert "--continue" in capsys.readouterr().err
    assert main(args + ["--iterations", "3", "--continue"]) == 0
    assert "continuing after iteration 2" in (out / "refine.log").read_text()
    for name in ("half1.mrc", "half2.mrc", "map.mrc", "fsc.star", "fsc.png", "particles.star", "run.json"):
        assert (out / name).exists(), name
    table, optics = read_particles(out / "particles.star")
    assert {"rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst"} <= set(table.columns)
    assert list(table["rlnRandomSubset"]) == list(1 + (np.arange(400) % 2))  # kept from the input
    run = json.loads((out / "run.json").read_text())
    assert run["iterations"] == 3
    fsc_table = read_fsc_star(out / "fsc.star")
    assert len(fsc_table) == BOX // 2 + 1
    # --auto-continue (the workflow's mode): a run of the same inputs continues from its
    # last finished iteration; other options start afresh, removing the old iterations
    auto = tmp_path / "auto"
    a_args = ["spa", "refine3d", "--particles", str(star), "--reference", str(tmp_path / "ref.mrc"), "--out-dir",
              str(auto), "--symmetry", "D3", "--particle-diameter", str(DIAMETER), "--iterations", "2", "--auto-continue"]
    assert main(a_args) == 0
    assert (auto / "inputs.sha256").exists() and (auto / "it002_model.json").exists()
    (auto / "it002_model.json").unlink()  # as if killed during iteration 2
    assert main(a_args) == 0
    assert "continuing after iteration 1" in (auto / "refine.log").read_text()
    assert main(a_args[:-3] + ["--iterations", "1", "--seed", "5", "--auto-continue"]) == 0
    assert "continuing" not in (auto / "refine.log").read_text()
    assert not (auto / "it002_model.json").exists() and (auto / "it001_model.json").exists()
    # postprocess with the truth as reference (validation only)
    pp = tmp_path / "post"
    assert main(["spa", "postprocess", "--half1", str(out / "half1.mrc"), "--half2", str(out / "half2.mrc"),
                 "--out-dir", str(pp), "--reference", str(tmp_path / "truth.mrc")]) == 0
    msg = capsys.readouterr().out
    assert "hand: as is" in msg
    summary = json.loads((pp / "postprocess.json").read_text())
    assert summary["hand"]["hand"] == "as is"
    assert 2 * PIXEL <= summary["resolution_A"] < 40
    for name in ("postprocess.mrc", "postprocess_masked.mrc", "mask.mrc", "postprocess.star", "fsc.png", "slices.png"):
        assert (pp / name).exists(), name
    # FSC of the map against the truth
    assert main(["spa", "fsc", str(out / "map.mrc"), str(tmp_path / "truth.mrc"), "--out", str(tmp_path / "t.star"),
                 "--plot", str(tmp_path / "t.png")]) == 0
    t = read_fsc_star(tmp_path / "t.star")
    vol, _ = read_mrc(out / "map.mrc")
    assert np.allclose(t["rlnFourierShellCorrelation"], fsc(vol, data.truth), atol=1e-4)
    assert "FSC 0.5 at" in capsys.readouterr().out


def test_initial_model_command_and_input_errors(tmp_path, data, capsys):
    star = write_particles(tmp_path, data, 300)
    out = tmp_path / "ini.mrc"
    assert main(["spa", "initial-model", "--particles", str(star), "--out", str(out), "--symmetry", "D3",
                 "--particle-diameter", str(DIAMETER), "--iterations", "4", "--em-iterations", "1",
                 "--batch", "50"]) == 0
    vol, ps = read_mrc(out)
    assert vol.shape == (BOX,) * 3 and ps == pytest.approx(PIXEL)
    assert "hand" in capsys.readouterr().out
    # errors: unknown symmetry, missing stack, bad reference
    assert main(["spa", "initial-model", "--particles", str(star), "--out", str(out), "--symmetry", "Q7",
                 "--particle-diameter", "100"]) == 2
    assert "not a supported point group" in capsys.readouterr().err
    (tmp_path / "particles.mrcs").unlink()
    assert main(["spa", "refine3d", "--particles", str(star), "--reference", str(out), "--out-dir",
                 str(tmp_path / "r"), "--particle-diameter", "100"]) == 2
    assert "does not exist" in capsys.readouterr().err
    lp = lowpass(data.truth, 30.0, PIXEL)
    assert lp.shape == (BOX,) * 3
