"""One job per movie: `conveyor spa preprocess` and the workflow rule spa_preprocess_movie.

The in-process runner must give the same files as the same command lines run as separate
processes (and those files must be right against the simulator's truth); the workflow makes
one job per movie with the native tools and one job per step when a peer tool brings its own
container image, with the same command lines either way.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import yaml

from conveyor.bench.overhead import parse_jobs
from conveyor.cli import main
from conveyor.io.star import read_star
from conveyor.simulate.spa import simulate_spa

STEPS = ("validate_movie", "motion", "ctf", "pick", "extract")


def step_commands(movie: Path, out: Path) -> list[tuple[str, str]]:
    """(log, conveyor command line) of the five steps of one movie, as the workflow writes them."""
    r, lg = out / "results", out / "logs"
    name = movie.stem
    dw, nodw = r / f"motion/{name}.mrc", r / f"motion/{name}_noDW.mrc"
    q = shlex.quote
    cmds = [
        f"conveyor io validate-movie {q(str(movie))} --frames 6 --pixel-size 3.0 --out {r}/movies/{name}.json",
        f"conveyor --device cpu spa motion {q(str(movie))} --pixel-size 3.0 --voltage 300 --dose-per-frame 1.2"
        f" --bfactor 150 --patches 0 --frames 6 --out-sum {dw} --out-sum-nodw {nodw}"
        f" --out-shifts {r}/motion/{name}.star --out-plot {r}/motion/{name}_drift.png",
        f"conveyor --device cpu spa ctf {nodw} --pixel-size 3.0 --voltage 300 --cs 2.7 --amplitude-contrast 0.1"
        f" --defocus-min 5000 --defocus-max 50000 --res-min 30 --res-max 8 --micrograph-name {dw}"
        f" --out-star {r}/ctf/{name}.star --out-diag {r}/ctf/{name}_diag.png",
        f"conveyor --device cpu spa pick {dw} --particle-diameter 150 --method log --threshold auto"
        f" --out-star {r}/pick/{name}.star --out-png {r}/pick/{name}.png",
        f"conveyor --device cpu spa extract {dw} --coords {r}/pick/{name}.star --ctf {r}/ctf/{name}.star --bin 4"
        f" --box 80 --particle-diameter 150 --out-stack {r}/extract/{name}.mrcs --out-star {r}/extract/{name}.star",
    ]
    return [(str(lg / f"{step}.log"), cmd) for step, cmd in zip(STEPS, cmds)]


def runner_argv(steps) -> list[str]:
    argv = ["spa", "preprocess"]
    for log, cmd in steps:
        argv += [":::", log, *shlex.split(cmd)]
    return argv


@pytest.fixture(scope="module")
def movie(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim")
    simulate_spa(out, micrographs=1, size=256, frames=6, particles=6, pixel_size=3.0, seed=1)
    return next((out / "movies").glob("*.mrc")), out


def test_in_process_run_equals_separate_processes(movie, tmp_path):
    path, sim = movie
    one = step_commands(path, tmp_path / "one")
    assert main(runner_argv(one)) == 0
    sep = step_commands(path, tmp_path / "sep")
    for log, cmd in sep:
        Path(log).parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as fh:
            assert subprocess.run(shlex.split(cmd), stdout=fh, stderr=subprocess.STDOUT).returncode == 0, cmd
    a, b = tmp_path / "one/results", tmp_path / "sep/results"
    name = path.stem
    # every step left its own log, holding that step's output only, as the separate process did
    # (up to the work folder, times and numbers)
    def shape(text, work):
        return re.sub(r"[-+]?\d[\d.,:]*", "#", text.replace(str(work), "W"))

    for (log, _), (log_sep, _) in zip(one, sep):
        text, text_sep = Path(log).read_text(), Path(log_sep).read_text()
        assert shape(text, tmp_path / "one") == shape(text_sep, tmp_path / "sep"), (text, text_sep)
    logs = {step: Path(log).read_text() for (log, _), step in zip(one, STEPS)}
    assert "aligned and summed" in logs["motion"] and "fit resolution" not in logs["motion"]
    assert "fit resolution" in logs["ctf"] and "particles (threshold" in logs["pick"]
    assert "particles, box 80 px" in logs["extract"]
    with mrcfile.open(a / f"motion/{name}.mrc") as ma, mrcfile.open(b / f"motion/{name}.mrc") as mb:
        np.testing.assert_allclose(ma.data, mb.data, rtol=1e-5, atol=1e-5)
    ctf_a = read_star(a / f"ctf/{name}.star")["micrographs"]
    ctf_b = read_star(b / f"ctf/{name}.star")["micrographs"]
    assert float(ctf_a["rlnDefocusU"][0]) == pytest.approx(float(ctf_b["rlnDefocusU"][0]), rel=1e-6)
    # and right: the simulated defocus
    truth = read_star(sim / "truth/micrographs.star")["micrographs"]
    mean_truth = 0.5 * (float(truth["rlnDefocusU"][0]) + float(truth["rlnDefocusV"][0]))
    mean_est = 0.5 * (float(ctf_a["rlnDefocusU"][0]) + float(ctf_a["rlnDefocusV"][0]))
    assert abs(mean_est - mean_truth) < 0.05 * mean_truth, (mean_est, mean_truth)
    picks_a = read_star(a / f"pick/{name}.star")["particles"]
    picks_b = read_star(b / f"pick/{name}.star")["particles"]
    np.testing.assert_allclose(picks_a[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy(float),
                               picks_b[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy(float))
    assert len(picks_a) > 0
    with mrcfile.open(a / f"extract/{name}.mrcs") as sa, mrcfile.open(b / f"extract/{name}.mrcs") as sb:
        assert sa.data.shape == sb.data.shape and sa.data.shape[0] == len(picks_a)
        np.testing.assert_allclose(sa.data, sb.data, rtol=1e-5, atol=1e-5)


def test_a_failing_step_stops_the_job_with_its_status(movie, tmp_path):
    path, _ = movie
    steps = step_commands(path, tmp_path)
    log, cmd = steps[0]
    steps[0] = (log, cmd.replace("--frames 6", "--frames 9"))  # wrong frame count: bad input
    assert main(runner_argv(steps)) == 2
    text = Path(steps[0][0]).read_text()
    assert "conveyor: error:" in text and "9" in text and "Traceback" not in text
    # nothing after the failed step ran
    assert not any(Path(lg).exists() for lg, _ in steps[1:])
    assert not (tmp_path / "results/motion").exists()


def test_runner_refuses_a_malformed_step_list(tmp_path, capsys):
    assert main(["spa", "preprocess"]) == 2
    assert main(["spa", "preprocess", str(tmp_path / "a.log"), "conveyor", "io", "info"]) == 2
    assert main(["spa", "preprocess", ":::", str(tmp_path / "a.log"), "io", "info"]) == 2
    assert "::: LOG conveyor" in capsys.readouterr().err
    assert not (tmp_path / "a.log").exists()


# ---- the workflow ------------------------------------------------------------------


def dry_run(repo, work, spa_extra=None, movies=("a", "b", "c")):
    (work / "raw").mkdir(parents=True, exist_ok=True)
    for m in movies:
        (work / "raw" / f"{m}.mrc").touch()
    spa = {"movies": "raw/*.mrc", "frames": 4, "pixel_size": 3.0, "dose_per_frame": 1.2,
           "particle_diameter": 150, "symmetry": "D3", "selection": "auto"}
    spa.update(spa_extra or {})
    cfg = work / "c.yaml"
    cfg.write_text(yaml.safe_dump({"experiment": "e", "device": "cpu", "spa": spa}))
    out = subprocess.run(["snakemake", "-s", str(repo / "Snakefile"), "--directory", str(work),
                          "--configfile", str(cfg), "-n", "-p", "results/e/spa/particles_bin4.star"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    return parse_jobs(out.stdout)


def inner_steps(cmd: str) -> list[str]:
    """The `conveyor ...` command lines inside a `conveyor spa preprocess` command."""
    parts = cmd.split(" ::: ")
    assert parts[0] == "conveyor spa preprocess"
    return [p.split(" ", 1)[1] for p in parts[1:]]


@pytest.mark.slow
def test_one_job_per_movie_with_the_native_tools(repo, tmp_path, snakemake_exe):
    jobs = dry_run(repo, tmp_path)
    per_rule = {}
    for j in jobs:
        per_rule[j["rule"]] = per_rule.get(j["rule"], 0) + 1
    assert per_rule == {"spa_preprocess_movie": 3, "spa_merge": 1}
    job = next(j for j in jobs if j["rule"] == "spa_preprocess_movie" and j["wildcards"]["mic"] == "a")
    # the raw movie as a plain path, every file of the five steps an output
    assert job["input"] == ["raw/a.mrc"]
    assert len(job["output"]) == 11 and len(job["log"]) == 5
    assert "results/e/spa/extract/bin4/a.star" in job["output"]
    steps = inner_steps(job["cmd"])
    assert len(steps) == 5 and all(s.startswith("conveyor ") for s in steps)
    assert steps[0].startswith("conveyor io validate-movie raw/a.mrc ")
    for step, command in zip(steps[1:], ("spa motion raw/a.mrc", "spa ctf", "spa pick", "spa extract")):
        assert f" {command} " in step, step
    # each step's log is the one of the rule of the same name
    assert [lg.split("/")[2] for lg in job["log"]] == [
        "spa_validate_movie", "spa_motion", "spa_ctf", "spa_pick", "spa_extract"]
    assert [p.split(" ", 1)[0] for p in job["cmd"].split(" ::: ")[1:]] == job["log"]


@pytest.mark.slow
def test_a_peer_tool_with_its_own_image_splits_the_steps(repo, tmp_path, snakemake_exe):
    """relion for motion (its own image): one job per step, the same command lines."""
    native = {j["wildcards"].get("mic"): j for j in dry_run(repo, tmp_path / "n")
              if j["rule"] == "spa_preprocess_movie"}
    jobs = dry_run(repo, tmp_path / "r", {"motion": {"tool": "relion"}})
    per_rule = {}
    for j in jobs:
        per_rule[j["rule"]] = per_rule.get(j["rule"], 0) + 1
    assert per_rule == {"spa_validate_movie": 3, "spa_motion": 3, "spa_ctf": 3, "spa_pick": 3,
                        "spa_extract": 3, "spa_merge": 1}
    steps = inner_steps(native["b"]["cmd"])
    split = {j["rule"]: j for j in jobs if j["wildcards"].get("mic") == "b"}
    for rule, inner in zip(("spa_validate_movie", "spa_motion", "spa_ctf", "spa_pick", "spa_extract"), steps):
        cmd, log = split[rule]["cmd"].rsplit(" > ", 1)
        assert log.endswith("2>&1")
        if rule == "spa_motion":
            assert "tools relion-motion" in cmd
            assert cmd.replace("tools relion-motion", "spa motion") == inner
        else:
            assert cmd == inner, rule
    # the same logs
    assert sorted(lg for j in split.values() for lg in j["log"]) == sorted(native["b"]["log"])


@pytest.mark.slow
def test_movies_in_several_folders_are_found_by_name(repo, tmp_path, snakemake_exe):
    (tmp_path / "raw2").mkdir(parents=True)
    (tmp_path / "raw2" / "z.mrc").touch()
    jobs = dry_run(repo, tmp_path, {"movies": "raw*/*.mrc"})
    inputs = {j["wildcards"]["mic"]: j["input"] for j in jobs if j["rule"] == "spa_preprocess_movie"}
    assert inputs == {"a": ["raw/a.mrc"], "b": ["raw/b.mrc"], "c": ["raw/c.mrc"], "z": ["raw2/z.mrc"]}
