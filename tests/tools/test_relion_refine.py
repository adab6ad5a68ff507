"""RELION 3.1 adapters for 2D classification, initial model, refinement and post-processing.

Command lines and option mappings are checked without RELION; the real runs (marked
``peer``, skipped with the reason when the RELION binaries are not on PATH) use tiny
simulated data with known truth and check that the native commands' files are written,
parse with the native readers, and are physically sane:

* 2D: 200 particles of 48 px at 4 Å/px (three views of a protein-like model and 20 % junk),
  4 classes, 3 iterations;
* 3D: 100 particles of 32 px at 5 Å/px in random orientations (SNR 0.5), a refinement
  stopped after 1 and continued to 2 iterations, an initial model of 3 SGD iterations;
* post-processing: half maps of a known map blurred by B = 150 Å² with independent noise.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from conveyor.cli import main
from conveyor.errors import InputError
from conveyor.geometry import random_rotations
from conveyor.io.mrc import read_mrc, write_mrc
from conveyor.io.star import format_image_name, optics_table, read_particles, read_star, write_star
from conveyor.simulate.spa import make_model
from conveyor.spa.extract import fourier_crop
from conveyor.spa.fsc import align_to_reference, fsc, mirror_volume, read_fsc_star, resolution_at
from conveyor.spa.postprocess import fit_bfactor
from conveyor.spa.reconstruct import (
    CtfParams,
    apply_bfactor,
    lowpass,
    particle_ctfs,
    resample_volume,
    soft_sphere_mask,
)
from conveyor.spa.selector_training import simulate_particle_stack
from conveyor.tools import relion_refine as R

HAVE_RELION = all(shutil.which(n) for n in ("relion_refine", "relion_refine_mpi", "relion_postprocess"))
HAVE_MPI = shutil.which("mpirun") is not None
needs_relion = pytest.mark.skipif(
    not HAVE_RELION, reason="RELION 3.1 binaries (relion_refine, relion_refine_mpi, relion_postprocess) not on PATH; "
                            "install with `apt-get install relion`")
needs_mpi = pytest.mark.skipif(not HAVE_MPI, reason="mpirun not on PATH (RELION's auto-refinement needs MPI); "
                                                    "install with `apt-get install openmpi-bin`")

PIX2, BOX2, N2 = 4.0, 48, 200
PIX3, BOX3, N3, DIAM3 = 5.0, 32, 100, 110.0


# --------------------------------------------------------------------------- data
def _write_particles(folder, images, ctf: pd.DataFrame, pixel: float, name: str = "particles"):
    folder.mkdir(parents=True, exist_ok=True)
    write_mrc(folder / f"{name}.mrcs", images, pixel, volume=False)
    optics = optics_table("opticsGroup1", pixel, 300.0, 2.7, 0.1, image_size=images.shape[-1], image_pixel_size=pixel)
    parts = pd.DataFrame({"rlnImageName": [format_image_name(i + 1, f"{name}.mrcs") for i in range(len(images))],
                          "rlnMicrographName": [f"mic{i // 20:03d}.mrc" for i in range(len(images))],
                          **{c: ctf[c].to_numpy() for c in ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle")},
                          "rlnOpticsGroup": 1})
    write_star(folder / f"{name}.star", {"optics": optics, "particles": parts})
    return folder / f"{name}.star"


@pytest.fixture(scope="module")
def views2d(tmp_path_factory):
    """200 particles (3 views, 20 % junk), their STAR file (stack path relative to it) and truth labels."""
    images, ctf, truth, _ = simulate_particle_stack(n=N2, box=BOX2, pixel_size=PIX2, particle_diameter=120.0,
                                                    symmetry="C1", n_views=3, junk_fraction=0.2, seed=1)
    star = _write_particles(tmp_path_factory.mktemp("p2d"), images, ctf, PIX2)
    labels = np.where(truth["is_junk"].to_numpy() == 1, -1, truth["view"].to_numpy())
    return star, labels


@pytest.fixture(scope="module")
def particles3d(tmp_path_factory):
    """100 CTF'd projections in random orientations (SNR 0.5) and the true map."""
    rng = np.random.default_rng(0)
    model = make_model(DIAM3, "C1", np.random.default_rng(1000))
    fine_box, fine_px = 2 * BOX3, PIX3 / 2
    truth = resample_volume(model.volume(fine_box, fine_px), fine_px, PIX3, BOX3)
    rots = random_rotations(N3, rng)
    shifts = rng.normal(0.0, 1.0, (N3, 2))
    proj = fourier_crop(np.stack([model.projection(r, fine_box, fine_px, shift=2.0 * s)
                                  for r, s in zip(rots, shifts)]), BOX3)
    dfm, ast = rng.uniform(10000.0, 25000.0, N3), rng.uniform(0.0, 600.0, N3)
    ctf = CtfParams(dfm + ast / 2, dfm - ast / 2, rng.uniform(0.0, 180.0, N3), 300.0, 2.7, 0.1, 0.0, 0.0, 1.0)
    sig = np.fft.irfft2(np.fft.rfft2(proj) * particle_ctfs(BOX3, PIX3, ctf, xp=np), s=(BOX3, BOX3))
    sd = np.sqrt(sig.var() / 0.5)
    images = ((sig + rng.normal(0.0, sd, sig.shape)) / sd).astype(np.float32)
    table = pd.DataFrame({"rlnDefocusU": ctf.defocus_u, "rlnDefocusV": ctf.defocus_v,
                          "rlnDefocusAngle": ctf.defocus_angle})
    folder = tmp_path_factory.mktemp("p3d")
    star = _write_particles(folder, images, table, PIX3)
    write_mrc(folder / "truth.mrc", truth, PIX3)
    return star, truth, folder / "truth.mrc"


def _aligned_cc(volume, truth, pixel):
    """Correlation with the truth of the map or its mirror image, whichever aligns better."""
    best = -1.0
    for v in (volume, mirror_volume(volume)):
        al, _ = align_to_reference(np.asarray(v, np.float32), truth, pixel)
        best = max(best, float(np.corrcoef(np.asarray(al).ravel(), truth.ravel())[0, 1]))
    return best


# --------------------------------------------------------------------------- no RELION needed
def test_option_mappings():
    assert [R.healpix_order(s) for s in (60, 30, 15, 7.5, 10, 1.8)] == [0, 1, 2, 3, 3, 5]
    assert R.sgd_iterations(300) == (50, 200, 50) and R.sgd_iterations(3) == (1, 1, 1)
    assert sum(R.sgd_iterations(121)) == 121
    assert R.relion_seed(0) == 1  # RELION's 0 switches off the randomisation of the particle order
    assert R.parse_batch("100,300") == (100, 300) and R.parse_batch("64") == (64, 64)
    with pytest.raises(InputError, match="--iterations"):
        R.sgd_iterations(2)
    with pytest.raises(InputError, match="--batch"):
        R.parse_batch("a,b")


@pytest.mark.parametrize("native, relion", [("class2d", "relion-class2d"), ("initial-model", "relion-initial-model"),
                                            ("refine3d", "relion-refine3d"), ("postprocess", "relion-postprocess")])
def test_every_native_option_is_accepted(native, relion):
    """The workflow switches tool by the command name only: each RELION command takes every native option."""
    from conveyor.cli import build_parser

    def options(group, name):
        groups = build_parser()._subparsers._group_actions[0].choices
        sub = groups[group]._subparsers._group_actions[0].choices[name]
        return {(o, a.nargs, a.required) for a in sub._actions for o in a.option_strings}

    assert options("spa", native) <= options("tools", relion)


def test_command_lines():
    c2 = " ".join(R.class2d_command("relion_refine", classes=50, particle_diameter=150, iterations=25, psi_step=10,
                                    offset_range=5, offset_step=1, initial_resolution=30, max_resolution=8, ctf=True,
                                    threads=4, seed=0))
    for part in ("--i particles.star --o Class2D/run", "--ctf --iter 25 --tau2_fudge 2 --particle_diameter 150 --K 50",
                 "--psi_step 10 --offset_range 5 --offset_step 1", "--j 4 --random_seed 1", "--ini_high 30",
                 "--strict_highres_exp 8"):
        assert part in c2, part
    im = " ".join(R.initial_model_command("relion_refine", iterations=120, particle_diameter=150, symmetry="D3",
                                          initial_resolution=40, final_resolution=20, batch=(100, 300),
                                          angular_step=15, max_shift=2, ctf=True, threads=2, seed=3))
    for part in ("--sgd --denovo_3dref --sgd_ini_iter 20 --sgd_inbetween_iter 80 --sgd_fin_iter 20",
                 "--sgd_write_iter 120",
                 "--sgd_ini_resol 40 --sgd_fin_resol 20 --sgd_ini_subset 100 --sgd_fin_subset 300",
                 "--sym D3", "--healpix_order 2 --offset_range 2", "--j 2 --random_seed 4"):
        assert part in im, part
    rf = R.refine3d_command("relion_refine_mpi", mpi=["mpirun", "-n", "3"], symmetry="C1", particle_diameter=150,
                            iterations=15, initial_lowpass=35, angular_step=7.5, max_shift=4, ctf=True, threads=1,
                            seed=0)
    s = " ".join(rf)
    assert s.startswith("mpirun -n 3 relion_refine_mpi --o Refine3D/run --auto_refine --split_random_halves")
    for part in ("--ref reference.mrc --firstiter_cc --ini_high 35", "--healpix_order 3", "--offset_range 4",
                 "--auto_iter_max 15", "--sym C1"):
        assert part in s, part
    cont = " ".join(R.refine3d_command("x", mpi=["mpirun", "-n", "3"], symmetry="C1", particle_diameter=150,
                                       iterations=20, initial_lowpass=35, angular_step=15, max_shift=4, ctf=True,
                                       threads=2, seed=0, continue_from="Refine3D/run_it005_optimiser.star"))
    assert "--continue Refine3D/run_it005_optimiser.star --o Refine3D/run" in cont and "--auto_iter_max 20" in cont
    c3 = " ".join(R.class3d_command("relion_refine", classes=3, symmetry="C1", particle_diameter=150, iterations=10,
                                    initial_lowpass=40, angular_step=7.5, max_shift=4, ctf=False, threads=2, seed=0))
    assert "--K 3" in c3 and "--iter 10" in c3 and "--ctf" not in c3 and "--auto_refine" not in c3
    pp = " ".join(R.postprocess_command("relion_postprocess", half1="a.mrc", half2="b.mrc", pixel_size=1.2,
                                        mask="mask.mrc", bfactor=-100.0))
    assert pp.endswith("--i a.mrc --i2 b.mrc --o PostProcess/postprocess --angpix 1.2 --mask mask.mrc "
                       "--adhoc_bfac -100")
    pp = " ".join(R.postprocess_command("relion_postprocess", half1="a.mrc", half2="b.mrc", pixel_size=1.2,
                                        mask="mask.mrc", bfactor="auto"))
    assert pp.endswith("--mask mask.mrc --auto_bfac --autob_lowres 10")
    mc = " ".join(R.mask_create_command("relion_mask_create", average="avg.mrc", out="mask.mrc", pixel_size=1.5,
                                        threshold=0.01, threads=2))
    assert mc == ("relion_mask_create --i avg.mrc --o mask.mrc --ini_threshold 0.01 --lowpass 15 --angpix 1.5 "
                  "--extend_inimask 4 --width_soft_edge 6 --j 2")
    env = R.mpi_env()
    assert env["OMPI_MCA_rmaps_base_oversubscribe"] == "1"
    with pytest.raises(InputError, match="at least 3 MPI"):
        R.mpi_prefix(2, "sh")


def test_auto_continue_resumes_only_the_same_run(particles3d, tmp_path):
    """--auto-continue: the native fingerprint decides between RELION's --continue and a fresh start."""
    star, _, truth_path = particles3d
    out, job = tmp_path / "refine", tmp_path / "refine" / "relion" / "Refine3D"
    opts = dict(particles=str(star), reference=str(truth_path), symmetry="C1", particle_diameter=140.0, iterations=2,
                initial_lowpass=30.0, angular_step=15.0, finest_step=None, max_shift=3.0, classes=1,
                max_particles=None, seed=0)
    job.mkdir(parents=True)
    (job / "run_it001_optimiser.star").write_text("data_optimiser_general\n")
    assert R._same_run_or_fresh(out, job, opts, has_previous=True) is False  # no fingerprint yet: afresh
    assert not job.exists() and (out / "inputs.sha256").exists()
    job.mkdir(parents=True)
    (job / "run_it001_optimiser.star").write_text("data_optimiser_general\n")
    assert R._same_run_or_fresh(out, job, opts, has_previous=True) is True  # same inputs: continue
    assert (job / "run_it001_optimiser.star").exists()
    assert R._same_run_or_fresh(out, job, {**opts, "seed": 5}, has_previous=True) is False  # other options
    assert not job.exists()


def test_particles_subset_and_paths_match_the_native_command(views2d):
    """--max-particles draws the native commands' subset; RELION gets absolute stack paths and no micrograph names."""
    from conveyor.commands.spa_classify import load_particles

    star, _ = views2d
    ps = R.prepare_particles(star, max_particles=50, seed=7)
    table, *_ = load_particles(star, 50, 7)
    assert list(ps.table["rlnImageName"]) == list(table["rlnImageName"])
    assert ps.box == BOX2 and ps.pixel_size == pytest.approx(PIX2) and ps.has_ctf
    assert all(n.split("@")[1].startswith("/") for n in ps.relion["rlnImageName"])
    assert "rlnMicrographName" not in ps.relion.columns and "rlnMicrographName" in ps.table.columns


def test_missing_relion_binary_is_a_clear_error(views2d, tmp_path, capsys):
    star, _ = views2d
    rc = main(["tools", "relion-class2d", "--particles", str(star), "--out-dir", str(tmp_path / "c"), "--classes", "2",
               "--particle-diameter", "150", "--relion-bin", str(tmp_path)])
    assert rc == 2
    assert "relion_refine: executable not found" in capsys.readouterr().err
    assert not (tmp_path / "c" / "model.star").exists()


# --------------------------------------------------------------------------- real RELION runs
@pytest.mark.peer
@needs_relion
def test_relion_class2d_writes_the_native_files(views2d, tmp_path, capsys):
    from conveyor.commands.spa_classify import read_class_dir

    star, labels = views2d
    out = tmp_path / "class2d"
    rc = main(["tools", "relion-class2d", "--particles", str(star), "--out-dir", str(out), "--classes", "4",
               "--particle-diameter", "150", "--iterations", "3", "--offset-range", "4", "--threads", "2",
               "--temperature", "2", "--no-center"])
    assert rc == 0, capsys.readouterr().err
    for name in ("class_averages.mrcs", "gallery.png", "log.csv", "particles.star", "model.star"):
        assert (out / name).stat().st_size > 0, name
    assert not list(out.glob(".conveyor-relion-*"))  # the project directory is gone
    cd = read_class_dir(out)  # what `spa select` reads
    assert cd["averages"].shape == (4, BOX2, BOX2) and cd["pixel_size"] == pytest.approx(PIX2)
    assert cd["particle_diameter"] == pytest.approx(150.0)
    counts = cd["counts"]
    assert counts.sum() == N2 and (np.diff(counts) <= 0).all()  # class 1 holds the most particles
    model = read_star(out / "model.star")
    assert {"model_general", "model_classes", "model_class_1", "model_optics_group_1"} <= set(model)
    assert list(model["model_classes"]["cvClassParticles"]) == list(counts)
    parts, optics = read_particles(out / "particles.star")
    src, _ = read_particles(star)
    assert list(parts["rlnImageName"]) == list(src["rlnImageName"])  # input rows and columns kept
    assert list(parts["rlnMicrographName"]) == list(src["rlnMicrographName"])
    for col in ("rlnClassNumber", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst", "rlnMaxValueProbDistribution",
                "rlnLogLikeliContribution", "rlnNrOfSignificantSamples"):
        assert col in parts.columns, col
    assert "cvMisfit" not in parts.columns
    assert parts["rlnAnglePsi"].between(-180, 180).all()
    logcsv = pd.read_csv(out / "log.csv")
    assert list(logcsv["iteration"]) == [1, 2, 3] and (logcsv["seconds"] > 0).all()
    # populated classes are protein white: bright centre, background near zero
    r = np.hypot(*(np.mgrid[:BOX2, :BOX2] - BOX2 // 2))
    for c in np.flatnonzero(counts >= 10):
        avg = cd["averages"][c]
        assert avg[r < 6].mean() > 5 * abs(avg[(r > 20) & (r < 23)].mean()) and avg[r < 6].mean() > 0, c
    # the classes follow the simulated views and junk better than chance
    tab = pd.crosstab(parts["rlnClassNumber"].to_numpy(), labels)
    purity = tab.max(axis=1).sum() / N2
    chance = pd.Series(labels).value_counts().max() / N2
    assert purity > chance + 0.08, (purity, chance)
    assert "RELION 3.1" in capsys.readouterr().out


@pytest.mark.peer
@needs_relion
def test_relion_initial_model(particles3d, tmp_path):
    star, truth, _ = particles3d
    out = tmp_path / "initial.mrc"
    rc = main(["tools", "relion-initial-model", "--particles", str(star), "--out", str(out), "--particle-diameter",
               "140", "--iterations", "3", "--batch", "40,60", "--angular-step", "30", "--threads", "2",
               "--em-iterations", "1"])
    assert rc == 0
    vol, ps = read_mrc(out)
    assert vol.shape == (BOX3,) * 3 and ps == pytest.approx(PIX3) and np.isfinite(vol).all() and vol.std() > 0
    # after 3 SGD iterations: a low-resolution model of the structure, closer to it than a featureless ball
    target = lowpass(truth, 30.0, PIX3)
    ball = soft_sphere_mask(BOX3, 0.5 * DIAM3 / PIX3, edge=3.0, xp=np)
    ball_cc = float(np.corrcoef(ball.ravel(), target.ravel())[0, 1])
    cc = _aligned_cc(vol, target, PIX3)
    assert cc > ball_cc + 0.05, (cc, ball_cc)


@pytest.mark.peer
@needs_relion
@needs_mpi
def test_relion_refine3d_stops_continues_and_writes_the_native_files(particles3d, tmp_path, capsys):
    star, truth, truth_path = particles3d
    out = tmp_path / "refine"
    args = ["tools", "relion-refine3d", "--particles", str(star), "--reference", str(truth_path), "--out-dir", str(out),
            "--particle-diameter", "140", "--initial-lowpass", "30", "--max-shift", "3", "--threads", "2"]
    assert main(args + ["--iterations", "1"]) == 0
    assert main(args + ["--iterations", "1"]) == 2  # refuses to overwrite without --continue
    assert "--continue" in capsys.readouterr().err
    assert main(args + ["--iterations", "2", "--continue"]) == 0
    for name in ("half1.mrc", "half2.mrc", "map.mrc", "fsc.star", "fsc.png", "particles.star", "run.json",
                 "refine.log"):
        assert (out / name).stat().st_size > 0, name
    run = json.loads((out / "run.json").read_text())
    assert run["iterations"] == 2 and run["converged"] is False and run["particles"] == N3
    assert [h["iteration"] for h in run["history"]] == [1, 2]
    curve = read_fsc_star(out / "fsc.star")["rlnFourierShellCorrelation"].to_numpy(float)
    assert len(curve) == BOX3 // 2 + 1 and curve[1] > 0.9
    assert 2 * PIX3 <= run["resolution_A"] < 40.0
    parts, _ = read_particles(out / "particles.star")
    src, _ = read_particles(star)
    assert list(parts["rlnImageName"]) == list(src["rlnImageName"])
    assert set(parts["rlnRandomSubset"]) == {1, 2}
    for col in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst"):
        assert np.isfinite(parts[col].to_numpy(float)).all(), col
    h1, ps = read_mrc(out / "half1.mrc")
    full, _ = read_mrc(out / "map.mrc")
    assert h1.shape == (BOX3,) * 3 and ps == pytest.approx(PIX3)
    # the refined map is the particles' structure in the reference's frame, not a blob
    cc = float(np.corrcoef(full.ravel(), truth.ravel())[0, 1])
    blob = float(np.corrcoef(lowpass(truth, 60.0, PIX3).ravel(), truth.ravel())[0, 1])
    assert cc > 0.75 and cc > blob + 0.05, (cc, blob)
    # --auto-continue (the workflow's mode) with other options: RELION's earlier files go, a fresh run
    assert main(args + ["--iterations", "1", "--seed", "5", "--auto-continue"]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["iterations"] == 1 and [h["iteration"] for h in run["history"]] == [1]
    assert not (out / "relion" / "Refine3D" / "run_it002_optimiser.star").exists()


@pytest.mark.peer
@needs_relion
def test_relion_3d_classification(particles3d, tmp_path):
    star, truth, truth_path = particles3d
    out = tmp_path / "class3d"
    assert main(["tools", "relion-refine3d", "--particles", str(star), "--reference", str(truth_path), "--out-dir",
                 str(out), "--particle-diameter", "140", "--classes", "2", "--iterations", "1", "--angular-step", "30",
                 "--finest-step", "3"]) == 0
    run = json.loads((out / "run.json").read_text())
    assert sum(run["classes"]) == N3 and run["iterations"] == 1
    parts, _ = read_particles(out / "particles.star")
    assert set(parts["rlnClassNumber"]) <= {1, 2} and len(parts) == N3 and "rlnRandomSubset" not in parts.columns
    for c in (1, 2):
        vol, ps = read_mrc(out / f"class{c:03d}.mrc")
        assert vol.shape == (BOX3,) * 3 and ps == pytest.approx(PIX3) and np.isfinite(vol).all()
    big = int(np.argmax(run["classes"])) + 1
    vol, _ = read_mrc(out / f"class{big:03d}.mrc")
    assert np.corrcoef(vol.ravel(), truth.ravel())[0, 1] > 0.6


@pytest.mark.peer
@needs_relion
def test_relion_postprocess_of_blurred_noisy_half_maps(tmp_path):
    pixel, box, diameter = 2.0, 64, 90.0
    truth = make_model(diameter, "C1", np.random.default_rng(5)).volume(box, pixel)
    rng = np.random.default_rng(0)
    blurred = apply_bfactor(truth, 150.0, pixel)
    sd = 0.5 * blurred.std()
    for h in (1, 2):
        write_mrc(tmp_path / f"h{h}.mrc", blurred + rng.normal(0, sd, truth.shape).astype(np.float32), pixel)
    write_mrc(tmp_path / "truth.mrc", truth, pixel)
    out = tmp_path / "post"
    assert main(["tools", "relion-postprocess", "--half1", str(tmp_path / "h1.mrc"), "--half2",
                 str(tmp_path / "h2.mrc"),
                 "--out-dir", str(out), "--particle-diameter", str(1.1 * diameter), "--reference",
                 str(tmp_path / "truth.mrc")]) == 0
    for name in ("postprocess.mrc", "postprocess_masked.mrc", "postprocess.star", "fsc.png", "slices.png",
                 "postprocess.json", "mask.mrc"):
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "postprocess.json").read_text())
    assert 2 * pixel <= summary["resolution_A"] < 8.0
    assert summary["bfactor_applied_A2"] < -100 and summary["bfactor_auto"] and summary["hand"]["hand"] == "as is"
    blocks = read_star(out / "postprocess.star")
    assert {"general", "fsc", "guinier"} <= set(blocks)
    assert float(blocks["general"]["rlnFinalResolution"].iloc[0]) == pytest.approx(summary["resolution_A"], abs=1e-3)
    curves = blocks["fsc"]
    assert len(curves) == box // 2 + 1 and curves["rlnFourierShellCorrelationCorrected"].iloc[1] > 0.99
    sharp, ps = read_mrc(out / "postprocess.mrc")
    mask, _ = read_mrc(out / "mask.mrc")
    assert ps == pytest.approx(pixel) and mask.max() == pytest.approx(1.0) and mask.min() == pytest.approx(0.0)
    # RELION's resolution agrees with the FSC of the average against the truth inside the mask
    avg = 0.5 * (read_mrc(tmp_path / "h1.mrc")[0] + read_mrc(tmp_path / "h2.mrc")[0])
    assert summary["resolution_A"] == pytest.approx(resolution_at(fsc(avg, truth, mask), 0.5, pixel), rel=0.2)
    # B-factor: about the map's own plus the blur; the sharpened map is no worse against the truth
    b_truth, _, _, _ = fit_bfactor(truth * mask, pixel, high=summary["resolution_A"])
    assert summary["map_bfactor_A2"] == pytest.approx(-b_truth + 150.0, rel=0.35)
    assert resolution_at(fsc(sharp, truth), 0.5, pixel) <= resolution_at(fsc(avg, truth), 0.5, pixel) + 0.1
    # a given B-factor is applied as given
    assert main(["tools", "relion-postprocess", "--half1", str(tmp_path / "h1.mrc"), "--half2",
                 str(tmp_path / "h2.mrc"),
                 "--out-dir", str(tmp_path / "adhoc"), "--mask", str(out / "mask.mrc"), "--bfactor", "-50"]) == 0
    s2 = json.loads((tmp_path / "adhoc" / "postprocess.json").read_text())
    assert s2["bfactor_applied_A2"] == pytest.approx(-50.0) and s2["mask"] == "given"
    assert not (tmp_path / "adhoc" / "mask.mrc").exists()
    # a thresholded mask made by relion_mask_create covers the particle and not the box
    assert main(["tools", "relion-postprocess", "--half1", str(tmp_path / "h1.mrc"), "--half2",
                 str(tmp_path / "h2.mrc"), "--out-dir", str(tmp_path / "thr"),
                 "--mask-threshold", f"{0.2 * float(avg.max()):.4f}"]) == 0
    m3, _ = read_mrc(tmp_path / "thr" / "mask.mrc")
    strong = truth > 0.2 * truth.max()
    assert float((m3 * strong).sum()) >= 0.99 * strong.sum() and m3.mean() < 0.4
