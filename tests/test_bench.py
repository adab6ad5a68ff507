"""Smoke tests of `conveyor bench`: tiny sizes, the report's structure, finite positive figures.

No timing thresholds: the benchmarks measure ratios within one run; these tests only check
that the machinery runs and reports. Anything that runs snakemake is marked `slow`.
"""

from __future__ import annotations

import json
import math

import pytest

from conveyor.bench import Measurement, ratio, run_measured, table
from conveyor.bench.dag import parse_dry_run, parse_job_stats, slurm_jobs_from_dag, slurm_jobs_from_dry_run
from conveyor.bench.overhead import POOL_TIMES, _copies, _job_seconds, _split, chains_of, parse_jobs
from conveyor.cli import main


def positive_finite(x) -> bool:
    return x is not None and math.isfinite(float(x)) and float(x) > 0


def test_run_measured_reports_the_child_alone(tmp_path):
    """Peak RSS is the command's own (a ~100 MB array), not that of this big test process."""
    m = run_measured(["python3", "-c", "b = bytearray(100 * 2**20); b[::4096] = b'x' * len(b[::4096])"])
    assert isinstance(m, Measurement) and m.returncode == 0
    assert 100 <= m.maxrss_mib < 250 and m.wall_s > 0 and m.cpu_s >= 0
    small = run_measured(["true"])
    assert small.maxrss_mib < 60
    assert run_measured(["false"]).returncode == 1
    assert run_measured([str(tmp_path / "missing")]).returncode == 127


def test_ratio_and_table():
    assert ratio(3.0, 1.5) == 2.0
    assert ratio(1.0, 0.0) is None and ratio(None, 1.0) is None and ratio(float("nan"), 1.0) is None
    text = table([["a", "1.00"], ["bb", "10.00"]], ["step", "s"])
    assert text.splitlines()[0].startswith("step") and "10.00" in text


DRY_RUN = """\
Building DAG of jobs...
Job stats:
job                   count
------------------  -------
spa_validate_movie        3
spa_motion                3
spa_merge                 1
all                       1
total                     8

[Sun Nov 22 01:51:54 2026] Group job spa_micrograph (jobs in lexicogr. order):

    [Sun Nov 22 01:51:54 2026]
    rule spa_validate_movie:
        input: movies/a.mrc
        output: r/a.json
        wildcards: mic=a
Shell command: conveyor io validate-movie movies/a.mrc --out r/a.json

    [Sun Nov 22 01:51:54 2026]
    rule spa_motion:
        input: movies/a.mrc, r/a.json
        output: r/a.mrc
        wildcards: mic=a
Shell command: conveyor spa motion movies/a.mrc --out-sum r/a.mrc

[Sun Nov 22 01:51:54 2026] Group job spa_micrograph (jobs in lexicogr. order):

    [Sun Nov 22 01:51:54 2026]
    rule spa_validate_movie:
        input: movies/b.mrc
        output: r/b.json

[Sun Nov 22 01:51:54 2026]
rule spa_merge:
    input: r/a.mrc, r/b.mrc
    output: r/merged.star
    jobid: 1
Shell command: None

[Sun Nov 22 01:51:54 2026]
rule all:
    input: r/merged.star
    jobid: 0
Shell command: None
This was a dry-run (flag -n). The order of jobs does not reflect the order of execution.
"""


def test_dry_run_parsing_counts_slurm_jobs():
    counts = parse_job_stats(DRY_RUN)
    assert counts == {"spa_validate_movie": 3, "spa_motion": 3, "spa_merge": 1, "all": 1}
    parsed = parse_dry_run(DRY_RUN)
    assert parsed["groups"] == {"spa_micrograph": 2}
    assert parsed["group_sizes"]["spa_micrograph"] == [2, 1]
    got = slurm_jobs_from_dry_run(parsed, local=set())
    assert got["total"] == 3 and got["ungrouped_jobs"] == {"spa_merge": 1} and got["local_jobs"] == {"all": 1}
    groups = {"spa_validate_movie": "spa_micrograph", "spa_motion": "spa_micrograph"}
    comp = slurm_jobs_from_dag(counts, groups, {"spa_micrograph": 2}, {"all"})
    assert comp["group_jobs"] == {"spa_micrograph": 2} and comp["total"] == 3


def test_job_chains_follow_the_files():
    jobs = parse_jobs(DRY_RUN)
    assert [j["rule"] for j in jobs][:2] == ["spa_validate_movie", "spa_motion"]
    assert jobs[1]["cmd"].startswith("conveyor spa motion") and jobs[-1]["cmd"] is None
    chains = chains_of(jobs[:3])
    assert [[j["rule"] for j in c] for c in chains] == [["spa_validate_movie", "spa_motion"], ["spa_validate_movie"]]


def test_overhead_split_adds_up_to_the_overhead():
    """Snakemake 110 s wall with 210 s of jobs on 2 cores (5 s idle), pool 100 s with 196 s (2 s idle)."""
    runs = {"snakemake": [{"wall_s": 110.0, "jobs_s": 210.0}], "pool": [{"wall_s": 100.0, "jobs_s": 196.0}]}
    s = _split(runs, 2)
    assert s["snakemake_idle_s"] == pytest.approx(5.0) and s["pool_idle_s"] == pytest.approx(2.0)
    assert s["overhead_jobs"] == pytest.approx(0.07) and s["overhead_idle"] == pytest.approx(0.03)
    assert s["overhead_jobs"] + s["overhead_idle"] == pytest.approx(110.0 / 100.0 - 1)
    # without Snakemake's benchmark files there is nothing to split
    runs["snakemake"][0]["jobs_s"] = None
    assert _split(runs, 2)["overhead_jobs"] is None


def test_overhead_job_seconds_from_both_sides(tmp_path):
    jobs = [{"benchmark": [f"benchmarks/m{i}.tsv"]} for i in range(2)]
    (tmp_path / "benchmarks").mkdir()
    for i, sec in enumerate((6.5, 7.25)):
        (tmp_path / f"benchmarks/m{i}.tsv").write_text(f"s\th:m:s\tmax_rss\n{sec}\t0:00:06\t1779.76\n")
    assert _job_seconds(tmp_path, jobs, "snakemake") == pytest.approx(13.75)
    assert _job_seconds(tmp_path, [{"benchmark": []}], "snakemake") is None
    (tmp_path / POOL_TIMES).write_text(json.dumps({"0": 6.0, "1": 7.0}))
    assert _job_seconds(tmp_path, jobs, "pool") == pytest.approx(13.0)


def test_overhead_movie_copies_are_files_of_their_own(tmp_path):
    src = []
    for i in range(2):
        src.append(tmp_path / f"mic_{i + 1:04d}.mrc")
        src[-1].write_bytes(bytes([i]) * 10)
    made = _copies(src, 5)
    assert [p.name for p in made] == ["mic_0003.mrc", "mic_0004.mrc", "mic_0005.mrc"]
    assert [p.read_bytes()[0] for p in made] == [0, 1, 0]
    assert not any(p.is_symlink() for p in made) and made[0].stat().st_ino != src[0].stat().st_ino
    assert _copies(src, 2) == []


def test_spa_preprocess_native_smoke(tmp_path, capsys):
    out = tmp_path / "report.json"
    rc = main(["--device", "cpu", "bench", "spa-preprocess", "--size", "256", "--frames", "4", "--no-relion",
               "--out", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["benchmark"] == "spa-preprocess" and report["device"]["device"] == "cpu"
    assert report["device"]["nproc"] >= 1 and report["device"]["cpu_model"]
    assert report["params"]["size"] == 256 and report["params"]["frames"] == 4
    steps = {s["step"]: s for s in report["steps"]}
    assert list(steps) == ["motion", "ctf", "pick", "extract"]
    for name in ("motion", "ctf", "pick"):
        ours = steps[name]["ours"]
        assert positive_finite(ours["s_per_movie"]) and positive_finite(ours["peak_rss_mib"])
        assert positive_finite(ours["cpu_s"]) and ours["run_s"] <= ours["s_per_movie"]
        assert steps[name]["relion"] is None and steps[name]["ratio"] is None
    assert math.isfinite(steps["motion"]["accuracy"]["ours_drift_rmse_px"])
    assert math.isfinite(steps["ctf"]["accuracy"]["ours_defocus_error_A"])
    assert steps["ctf"]["accuracy"]["relion"].startswith("n/a")
    assert 0.0 <= steps["pick"]["accuracy"]["ours_f1"] <= 1.0
    assert positive_finite(report["totals"]["ours_s_per_movie"])
    # the four steps in one process, as the workflow's job: the same particles as the steps one by one
    job = report["job"]
    assert positive_finite(job["ours"]["s_per_movie"]) and job["ours"]["run_s"] <= job["ours"]["s_per_movie"]
    assert job["accuracy"]["ours_particles"] == steps["extract"]["accuracy"]["ours_particles"]
    assert report["totals"]["job_ratio"] is None
    assert "one process" in capsys.readouterr().out


@pytest.mark.peer
def test_spa_preprocess_with_relion(tmp_path):
    from conveyor.tools.relion import relion_available

    if not relion_available():
        pytest.skip("RELION 3.1 is not installed")
    out = tmp_path / "report.json"
    assert main(["--device", "cpu", "bench", "spa-preprocess", "--size", "512", "--frames", "6", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    steps = {s["step"]: s for s in report["steps"]}
    for name in ("motion", "pick", "extract"):
        assert positive_finite(steps[name]["ratio"]) and positive_finite(steps[name]["cpu_ratio"])
        assert positive_finite(steps[name]["relion"]["peak_rss_mib"])
    assert math.isfinite(steps["motion"]["accuracy"]["relion_drift_rmse_px"])
    assert 0.0 <= steps["pick"]["accuracy"]["relion_f1"] <= 1.0
    assert steps["ctf"]["relion"] is None
    assert positive_finite(report["totals"]["ratio"]) and positive_finite(report["totals"]["job_ratio"])


@pytest.mark.slow
def test_dag_smoke(tmp_path, snakemake_exe):
    out = tmp_path / "dag.json"
    assert main(["bench", "dag", "--movies", "50", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    s = report["summary"]
    assert positive_finite(s["dry_run_s"]) and positive_finite(s["startup_s"]) and math.isfinite(s["ms_per_job"])
    # one job per movie (validation to extraction)
    assert report["jobs"]["per_rule"]["spa_preprocess_movie"] == 50
    assert "spa_motion" not in report["jobs"]["per_rule"] and s["jobs_per_movie"] == 1
    slurm = report["slurm"]
    assert slurm["agree"] and slurm["from_dry_run"]["total"] == s["slurm_jobs"]
    # the per-movie chains are grouped: far fewer SLURM jobs than jobs
    assert 0 < s["slurm_jobs"] < report["jobs"]["total"]


@pytest.mark.slow
def test_overhead_smoke(tmp_path, snakemake_exe):
    out = tmp_path / "overhead.json"
    rc = main(["bench", "overhead", "--movies", "3", "--distinct", "2", "--size", "256", "--frames", "4",
               "--warm-memory", "0.01", "--out", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    s = report["summary"]
    assert report["params"]["warm_memory_gib"] == 0.01
    # by default each movie's preprocessing up to its particles: one job per movie
    assert report["params"]["rules"] == ["spa_preprocess_movie"]
    assert report["params"]["jobs"] == 3 and report["params"]["distinct"] == 2
    assert report["params"]["scheduler"] == "workflow profile"
    assert all(t.startswith("results/overhead/spa/extract/bin4/") for t in report["params"]["targets"])
    assert positive_finite(s["snakemake_s"]) and positive_finite(s["pool_s"]) and positive_finite(s["ratio"])
    assert math.isfinite(s["overhead"]) and math.isfinite(s["snakemake_own_cpu_s"])
    # each side's jobs timed: Snakemake's benchmark files and the pool's record
    assert positive_finite(s["snakemake_jobs_s"]) and positive_finite(s["pool_jobs_s"])
    assert s["overhead_jobs"] + s["overhead_idle"] == pytest.approx(s["overhead"], abs=1e-9)
