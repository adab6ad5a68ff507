"""The workflow end to end on tiny simulated data, with `snakemake --cores 2`."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from conveyor.io.star import read_star

pytestmark = pytest.mark.slow


def run_snakemake(repo, workdir, configfile, *extra, check=True):
    cmd = [
        "snakemake", "-s", str(repo / "Snakefile"), "--directory", str(workdir),
        "--configfile", str(configfile), "--cores", "2", *extra,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if check and out.returncode != 0:
        raise AssertionError(f"snakemake failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}")
    return out


@pytest.fixture(scope="module")
def tiny_run(repo, tmp_path_factory, snakemake_exe):
    """The tiny config (simulation included) run once end to end."""
    work = tmp_path_factory.mktemp("tiny")
    run_snakemake(repo, work, repo / "tests/configs/tiny.yaml")
    return work


def test_dry_run_lists_jobs(repo, tmp_path, snakemake_exe):
    out = run_snakemake(repo, tmp_path, repo / "tests/configs/tiny.yaml", "-n")
    assert "simulate_spa" in out.stdout and "simulate_spi" in out.stdout


def test_tiny_end_to_end(tiny_run):
    res = tiny_run / "results/tiny"
    blocks = read_star(res / "spa/movies.star")
    assert len(blocks["movies"]) == 2
    assert float(blocks["optics"]["rlnMicrographOriginalPixelSize"][0]) == pytest.approx(3.0)
    for name in blocks["movies"]["rlnMicrographMovieName"]:
        assert (tiny_run / name).exists() or Path(name).exists()
    import pandas as pd

    shots = pd.read_csv(res / "spi/shots.csv")
    assert len(shots) == 2 and (shots["frames"] == 40).all()
    # preprocessing merged: one CTF row per micrograph, particles with CTF and image names
    mics = read_star(res / "spa/micrographs_ctf.star")["micrographs"]
    assert len(mics) == 2 and (mics["rlnDefocusU"] > 5000).all()
    parts = read_star(res / "spa/particles_bin4.star")
    assert float(parts["optics"]["rlnImagePixelSize"][0]) == pytest.approx(12.0)
    assert len(parts["particles"]) > 0 and parts["particles"]["rlnImageName"].str.contains("@").all()
    # SPA 2D classification and automatic selection of round 1
    assert (res / "spa/class2d/round1/gallery.png").exists()
    selected = read_star(res / "spa/select/round1_particles.star")["particles"]
    assert 0 < len(selected) <= len(parts["particles"])
    # round 2: the round-1 selection re-extracted at bin 2 (one job per micrograph), re-centred
    again = read_star(res / "spa/reextract/round1_bin2.star")
    assert float(again["optics"]["rlnImagePixelSize"][0]) == pytest.approx(6.0)
    assert len(again["particles"]) == len(selected)
    assert len(list((res / "spa/reextract/round1_bin2").glob("*.star"))) == 2
    assert (res / "spa/class2d/round2/gallery.png").exists()
    assert len(read_star(res / "spa/select/round2_particles.star")["particles"]) > 0
    assert (res / "spi/frames/summary.json").exists() and (res / "spi/size_histogram.png").exists()
    # SPI to the density: EMC intensity, corrected intensity, phased density with a resolution
    import mrcfile

    with mrcfile.open(res / "spi/phasing/density.mrc") as m:
        assert m.data.ndim == 3 and float(m.voxel_size.x) > 0 and m.data.max() > 0
    assert json.loads((res / "spi/phasing/resolution.json").read_text())["resolution_nm"] > 0
    assert (res / "spi/emc/log.csv").exists() and (res / "spi/intensity/corrected.mrc").exists()
    # every job left its log
    assert list((tiny_run / "logs/tiny/spa_validate_movie").glob("*.log"))


def test_3d_steps_follow_the_last_selection(repo, tiny_run, tmp_path):
    """With spa.reconstruct on, the plan goes on from the round-2 selection: initial model,
    gold-standard refinement (continuing an interrupted run), post-processing against the
    simulator's map. (A dozen particles cannot make a map: a dry run checks the plan.)"""
    cfg = yaml.safe_load((repo / "tests/configs/tiny.yaml").read_text())
    cfg["spa"]["reconstruct"] = True
    cfg["spa"]["refine3d"]["bin"] = 1
    path = tmp_path / "tiny3d.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    out = run_snakemake(repo, tiny_run, path, "-n", "-p", "spa")
    text = out.stdout
    res = "results/tiny/spa"
    for rule in ("spa_initial_model", "spa_reextract", "spa_reextract_merge", "spa_refine3d", "spa_postprocess"):
        assert f"rule {rule}:" in text, rule
    assert "spa_class2d" not in text.split("Job stats:")[1].split("Reasons")[0]  # nothing above is redone
    assert f"spa initial-model --particles {res}/select/round2_particles.star" in text
    assert f"--reextract --ctf {res}/ctf/" in text and "--bin 1" in text
    assert f"spa refine3d --particles {res}/reextract/round2_bin1.star" in text and "--auto-continue" in text
    assert "--symmetry D3" in text
    assert "spa postprocess" in text and "--reference 'data/tiny/spa/truth/map.mrc'" in text


def test_rerun_is_a_no_op(repo, tiny_run):
    out = run_snakemake(repo, tiny_run, repo / "tests/configs/tiny.yaml", "-n")
    assert "Nothing to be done" in out.stdout + out.stderr


@pytest.fixture()
def plain_config(tiny_run, tmp_path):
    """A copy of the tiny data with a config that has no simulation section."""
    work = tmp_path / "w"
    shutil.copytree(tiny_run / "data", work / "data")
    cfg = yaml.safe_load((Path(__file__).parents[1] / "configs/tiny.yaml").read_text())
    cfg.pop("simulate")
    cfg.pop("spi")
    path = work / "plain.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return work, path


def test_new_movies_only(repo, plain_config):
    work, cfg = plain_config
    run_snakemake(repo, work, cfg)
    movies = sorted((work / "data/tiny/spa/movies").glob("*.mrc"))
    shutil.copy(movies[0], movies[0].with_name("mic_new.mrc"))
    out = run_snakemake(repo, work, cfg, "-n", "--quiet", "rules")
    text = out.stdout + out.stderr
    assert "spa_preprocess_movie" in text
    # exactly one per-movie job (validation to extraction): the new movie
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("spa_preprocess_movie"))
    assert line.split()[-1] == "1"


def test_corrupt_movie_fails_its_branch_only(repo, plain_config):
    work, cfg = plain_config
    movies = sorted((work / "data/tiny/spa/movies").glob("*.mrc"))
    bad = movies[0]
    bad.write_bytes(bad.read_bytes()[: 2000])  # truncated copy
    out = run_snakemake(repo, work, cfg, "--keep-going", check=False)
    assert out.returncode != 0
    log = (work / f"logs/tiny/spa_validate_movie/{bad.stem}.log").read_text()
    assert str(bad.name) in log and "conveyor: error:" in log
    assert "Traceback" not in log
    assert not (work / f"results/tiny/spa/movies/{bad.stem}.json").exists()
    assert (work / f"results/tiny/spa/movies/{movies[1].stem}.json").exists()
    # no temporary files left behind
    assert not list((work / "results").rglob(".*.tmp-*"))


def test_wrong_pixel_size_is_reported(repo, plain_config):
    work, cfg = plain_config
    c = yaml.safe_load(cfg.read_text())
    c["spa"]["pixel_size"] = 1.0
    cfg.write_text(yaml.safe_dump(c))
    out = run_snakemake(repo, work, cfg, "--keep-going", check=False)
    assert out.returncode != 0
    logs = " ".join(p.read_text() for p in (work / "logs/tiny/spa_validate_movie").glob("*.log"))
    assert "spa.pixel_size" in logs


def test_bad_config_stops_before_any_job(repo, tmp_path, snakemake_exe):
    cfg = yaml.safe_load((repo / "tests/configs/tiny.yaml").read_text())
    cfg["spa"]["symmetry"] = "Q7"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = run_snakemake(repo, tmp_path, path, "-n", check=False)
    assert out.returncode != 0
    assert "spa.symmetry" in out.stdout + out.stderr
    assert not (tmp_path / "results").exists()


def test_empty_glob_is_reported(repo, tmp_path, snakemake_exe):
    cfg = {"experiment": "e", "spa": {"movies": "nowhere/*.mrc", "pixel_size": 1, "dose_per_frame": 1, "particle_diameter": 100}}
    path = tmp_path / "e.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = run_snakemake(repo, tmp_path, path, "-n", check=False)
    assert out.returncode != 0
    assert "spa.movies" in out.stdout + out.stderr and "matches no" in out.stdout + out.stderr


def test_movie_records(tiny_run):
    rec = json.loads(next((tiny_run / "results/tiny/spa/movies").glob("*.json")).read_text())
    assert rec["n_frames"] == 6


def test_manual_selection_pauses_then_resumes(repo, tiny_run, tmp_path):
    """selection: manual stops cleanly after 2D classification and continues once the file exists."""
    work = tmp_path / "m"
    shutil.copytree(tiny_run / "data/tiny/spi", work / "data/tiny/spi")
    cfg = yaml.safe_load((repo / "tests/configs/tiny.yaml").read_text())
    cfg.pop("simulate")
    cfg.pop("spa")
    cfg["experiment"] = "man"
    cfg["spi"]["selection"] = "manual"
    path = work / "man.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = run_snakemake(repo, work, path)
    text = out.stdout + out.stderr
    sel = work / "results/man/spi/select/classes.yaml"
    assert "class selection needed" in text and str(sel.relative_to(work)) in text
    assert (work / "results/man/spi/class2d/gallery.png").exists()
    assert not (work / "results/man/spi/select/frames.csv").exists()
    # a class that does not exist is refused with the valid list
    from conveyor.cli import main

    classdir = str(work / "results/man/spi/class2d")
    assert main(["select", "spi", "--class-dir", classdir, "--classes", "99", "--out", str(sel)]) == 2
    assert not sel.exists()
    assert main(["select", "spi", "--class-dir", classdir, "--classes", "1", "2", "--out", str(sel)]) == 0
    classes_h5 = work / "results/man/spi/class2d/classes.h5"
    before = classes_h5.stat().st_mtime_ns
    run_snakemake(repo, work, path)
    assert classes_h5.stat().st_mtime_ns == before, "the classification was recomputed"
    assert (work / "results/man/spi/select/frames.csv").exists()


@pytest.mark.peer
def test_relion_as_the_tool_of_three_stages(repo, tiny_run, tmp_path):
    """spa.<stage>.tool: relion runs RELION 3.1 and the merge reads its converted outputs."""
    if shutil.which("relion_run_motioncorr") is None:
        pytest.skip("RELION 3.1 is not installed (apt-get install relion; `make test` does it as root)")
    work = tmp_path / "r"
    shutil.copytree(tiny_run / "data/tiny/spa", work / "data/tiny/spa")
    cfg = yaml.safe_load((repo / "tests/configs/tiny.yaml").read_text())
    cfg.pop("simulate")
    cfg.pop("spi")
    cfg["experiment"] = "rel"
    for stage in ("motion", "pick", "extract"):
        cfg["spa"][stage] = {"tool": "relion"}
    path = work / "rel.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run_snakemake(repo, work, path, "results/rel/spa/particles_bin4.star")
    mics = read_star(work / "results/rel/spa/micrographs_ctf.star")["micrographs"]
    assert len(mics) == 2
    parts = read_star(work / "results/rel/spa/particles_bin4.star")["particles"]
    assert len(parts) > 0


def test_cxidb_input_is_imported_by_a_rule(repo, tiny_run, tmp_path):
    """spi.cxidb: plain CXIDB-58-style HDF5 files are converted to CXI, then processed."""
    import h5py

    from conveyor.io.cxi import read_cxi

    work = tmp_path / "c"
    (work / "raw").mkdir(parents=True)
    for i, cxi in enumerate(sorted((tiny_run / "data/tiny/spi/shots").glob("*.cxi"))):
        with h5py.File(work / f"raw/r{i:04d}.h5", "w") as h5:
            h5["photonConverter/pnccdBack/photonCount"] = read_cxi(cxi).data
    cfg = {"experiment": "cx", "spi": {"cxidb": "raw/*.h5", "shots": None, "photon_energy_ev": 1600,
                                       "detector_distance_m": 0.3, "pixel_size_m": 3.0e-4, "selection": "auto"}}
    path = work / "cx.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run_snakemake(repo, work, path, "results/cx/spi/shots.csv", "results/cx/spi/frames")
    import pandas as pd

    shots = pd.read_csv(work / "results/cx/spi/shots.csv")
    assert len(shots) == 2 and (shots["photon_energy_ev"] == 1600).all()
    assert (shots["pixel_size_m"] == 3.0e-4).all()
    assert (work / "results/cx/spi/cxi/r0000.cxi").exists()
    assert json.loads((work / "results/cx/spi/frames/summary.json").read_text())["runs"]
