"""The site profiles driving a real SLURM cluster (single node, started by conftest.py).

(a) tests/slurm/Snakefile (per-movie rules, a GPU-capable rule and a merge, with the
    real rule names) through the repository's mesocentre and gpgpu profiles, with the
    repository's workflow profile (profiles/default) for the per-rule sizes;
(b) the repository's real workflow on its tiny test configuration through the
    mesocentre profile.
The profiles are used as a site would: copied, with their "site edits here" block
set to this cluster (partition names match already; node cores and memory are set).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
WORKFLOW_PROFILE = REPO / "profiles" / "default"

# things a run may leave in the repository's root that must not be shared with a
# test working directory
OUTPUT_ENTRIES = {".git", ".snakemake", ".venv", "results", "logs", "benchmarks",
                  ".pytest_cache", "dag.svg", "report.zip"}


def snakemake_cmd() -> list[str]:
    pytest.importorskip("snakemake")
    pytest.importorskip("snakemake_executor_plugin_slurm")
    return [sys.executable, "-m", "snakemake"]


def site_profile(name: str, dest: Path, *, cores: int, mem_mb: int) -> Path:
    """Copy profiles/<name> to dest/<name>, with the site block set for this cluster."""
    profile = yaml.safe_load((REPO / "profiles" / name / "config.yaml").read_text())
    # the partition names of the repository's profiles (cpu, gpu) are this cluster's
    assert profile["default-resources"]["slurm_partition"] in ("cpu", "gpu")
    profile["cores"] = cores
    profile["resources"]["mem_mb"] = mem_mb
    out = dest / name
    out.mkdir(parents=True)
    (out / "config.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))
    return out


def env_for_run() -> dict[str, str]:
    env = dict(os.environ)
    # the executor's own environment, not an enclosing SLURM job's
    for key in list(env):
        if key.startswith(("SLURM_", "SBATCH_", "SRUN_")):
            del env[key]
    env.pop("SNAKEMAKE_PROFILE", None)
    # jobs find `conveyor` and `snakemake` of the environment the tests run in
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def read_record(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().split() if "=" in line)


def failure_report(workdir: Path, log: str) -> str:
    parts = ["---- snakemake output (end) ----", "\n".join(log.splitlines()[-60:])]
    for slurm_log in sorted((workdir / "logs" / "slurm").rglob("*.log"))[-5:]:
        parts += [f"---- {slurm_log} ----", slurm_log.read_text()[-3000:]]
    return "\n".join(parts)


def real_workflow_inputs() -> tuple[Path, Path] | None:
    snakefile = REPO / "Snakefile"
    configfile = REPO / "tests" / "configs" / "tiny.yaml"
    if not snakefile.exists() or not configfile.exists():
        return None
    return snakefile, configfile


def linked_workdir(workdir: Path) -> Path:
    """A working directory that sees the repository's inputs (config, resources, tests)
    through links but keeps its own results/, logs/ and .snakemake/."""
    workdir.mkdir()
    for entry in REPO.iterdir():
        if entry.name not in OUTPUT_ENTRIES:
            (workdir / entry.name).symlink_to(entry)
    return workdir


@pytest.fixture(scope="module")
def slurm_runs(slurm_cluster, tmp_path_factory):
    """All runs of this module at once (most of their time is spent waiting for SLURM
    status checks): the tiny workflow through mesocentre and gpgpu, and the real
    workflow on its tiny configuration through mesocentre when it exists. Each run's
    site block gets a share of the node (cores and memory)."""
    cmd = snakemake_cmd()
    real = real_workflow_inputs()
    shares = 3 if real else 2
    cores = max(1, slurm_cluster.cpus // shares)
    mem_mb = slurm_cluster.real_memory_mb // shares - 256
    common = ["--slurm-init-seconds-before-status-checks", "1"]
    plans = {}
    for name in ("mesocentre", "gpgpu"):
        base = tmp_path_factory.mktemp(f"slurm_{name}")
        profile = site_profile(name, base / "profiles", cores=cores, mem_mb=mem_mb)
        workdir = base / "work"
        workdir.mkdir()
        plans[name] = (base, workdir, 300, cmd + [
            "--snakefile", str(HERE / "Snakefile"),
            "--workflow-profile", str(WORKFLOW_PROFILE),
            "--profile", str(profile),
            *common,
            "--verbose",
            "--config", "movies=['m1','m2']", "sleep=0",
            # mesocentre also checks that a job killed for memory comes back with more
            f"retry_check={name == 'mesocentre'}",
            "--retries", "1" if name == "mesocentre" else "0",
        ])
    if real:
        snakefile, configfile = real
        base = tmp_path_factory.mktemp("slurm_real")
        profile = site_profile("mesocentre", base / "profiles", cores=cores, mem_mb=mem_mb)
        workdir = linked_workdir(base / "work")
        plans["real"] = (base, workdir, 1200, cmd + [
            "--snakefile", str(snakefile),
            "--configfile", str(configfile),
            "--profile", str(profile),
            *common,
            "--retries", "0",
            # the per-micrograph and per-shot-file branches and their merges; the
            # reconstructions downstream are covered by tests/workflow with --cores
            "results/tiny/spa/particles_bin4.star", "results/tiny/spi/frames",
        ])

    started = {}
    for name, (base, workdir, timeout, args) in plans.items():
        log = open(base / "snakemake.log", "w")
        proc = subprocess.Popen(args, cwd=workdir, stdout=log, stderr=subprocess.STDOUT,
                                env=env_for_run(), text=True)
        started[name] = (proc, log, time.monotonic())
    results = {}
    for name, (proc, log, t0) in started.items():
        base, workdir, timeout, _ = plans[name]
        try:
            rc = proc.wait(timeout=max(1.0, timeout - (time.monotonic() - t0)))
        except subprocess.TimeoutExpired:
            proc.terminate()
            rc = proc.wait(timeout=60)
        log.close()
        results[name] = {
            "rc": rc,
            "workdir": workdir,
            "log": (base / "snakemake.log").read_text(),
            "seconds": time.monotonic() - t0,
            "mem_cap": mem_mb,
        }
    return results


def sbatch_calls(log: str) -> list[str]:
    return [line.split("--wrap", 1)[0] for line in log.splitlines() if "sbatch call:" in line]


@pytest.mark.parametrize("profile", ["mesocentre", "gpgpu"])
def test_tiny_workflow_runs_through_slurm(slurm_runs, profile):
    run = slurm_runs[profile]
    workdir = run["workdir"]
    assert run["rc"] == 0, failure_report(workdir, run["log"])

    records = {}
    for rel in ["validate/m1", "validate/m2", "motion/m1", "motion/m2", "merged"]:
        path = workdir / "out" / f"{rel}.txt"
        assert path.exists(), failure_report(workdir, run["log"])
        records[rel] = read_record(path)

    # every job ran inside a SLURM job, in the profile's partition
    partition = "cpu" if profile == "mesocentre" else "gpu"
    for rel, rec in records.items():
        assert rec["slurm_job_id"] != "none", f"{rel} did not run in a SLURM job"
        assert rec["slurm_partition"] == partition, (rel, rec)

    # the per-movie rules of both movies were one group job; the merge its own job
    per_movie = {records[r]["slurm_job_id"] for r in records if r != "merged"}
    assert len(per_movie) == 1, f"per-movie jobs were not grouped: {per_movie}"
    assert records["merged"]["slurm_job_id"] not in per_movie

    calls = sbatch_calls(run["log"])
    assert len(calls) == (4 if profile == "mesocentre" else 2), calls
    group_call = next(c for c in calls if "group_spa_micrograph" in c)
    merge_call = next(c for c in calls if "rule_spa_merge" in c)
    # the group asks for its largest job (spa_motion's memory, capped by the site's
    # node memory) and for the sum of its jobs' run times (2 x (2 + 20) minutes)
    assert f"--mem {min(16000, run['mem_cap'])}" in group_call, group_call
    assert re.search(r"-t '?44'?\b", group_call), group_call

    if profile == "mesocentre":
        for rel, rec in records.items():
            assert rec["device"] == "cpu", (rel, rec)
        assert "--gpus" not in group_call and "--gpus" not in merge_call
    else:
        # the GPU-capable rule got a GPU and was told to use it; the others not
        assert "--gpus=1" in group_call, group_call
        assert "--gpus" not in merge_call, merge_call
        for movie in ("m1", "m2"):
            assert records[f"motion/{movie}"]["device"] == "gpu"
            assert records[f"motion/{movie}"]["cuda_visible_devices"] != "none"
            assert records[f"validate/{movie}"]["device"] == "cpu"
        assert records["merged"]["device"] == "cpu"
        assert records["merged"]["cuda_visible_devices"] == "none"


def test_real_workflow_through_mesocentre(slurm_runs):
    """The repository's Snakefile (preprocessing targets), tests/configs/tiny.yaml, through the
    mesocentre profile (and the repository's workflow profile, found next to it)."""
    if real_workflow_inputs() is None:
        pytest.skip("workflow not present")
    run = slurm_runs["real"]
    workdir, log = run["workdir"], run["log"]
    assert run["rc"] == 0, failure_report(workdir, log)
    submitted = re.findall(r"submitted with SLURM jobid (\d+)", log)
    assert submitted, "no job was submitted to SLURM:\n" + failure_report(workdir, log)
    assert "workflow specific profile" in log, log[:2000]
    assert (workdir / "results").is_dir(), failure_report(workdir, log)
    assert (workdir / "results/tiny/spa/particles_bin4.star").exists(), failure_report(workdir, log)
    assert (workdir / "results/tiny/spi/frames/summary.json").exists(), failure_report(workdir, log)


def test_out_of_memory_exit_is_retried_with_more_memory(slurm_runs):
    """spa_select exits 137 below 5000 MB; profiles/default gives it 4000 MB x attempt
    (never more than the site's memory per job)."""
    run = slurm_runs["mesocentre"]
    workdir = run["workdir"]
    assert run["rc"] == 0, failure_report(workdir, run["log"])
    # inside the job the rule sees the attempt's value (2 x 4000); SLURM was asked for
    # that, capped at the site's memory per job (the cap is not passed into the job)
    record = read_record(workdir / "out" / "select.txt")
    assert record["mem_mb"] == "8000" and record["slurm_job_id"] != "none", record
    select_calls = [c for c in sbatch_calls(run["log"]) if "rule_spa_select" in c]
    requested = [re.search(r"--mem (\d+)", c).group(1) for c in select_calls]
    assert requested == ["4000", str(min(8000, run["mem_cap"]))], requested


def test_independent_jobs_are_submitted_side_by_side(slurm_runs):
    """spa_select does not wait for the group job: the profiles' group_slot resource
    limits each SLURM job, not the whole run."""
    log = slurm_runs["mesocentre"]["log"]
    lines = log.splitlines()
    first_select = next(i for i, ln in enumerate(lines)
                        if "sbatch call:" in ln and "rule_spa_select" in ln)
    first_finished = next(i for i, ln in enumerate(lines) if ln.startswith("Finished jobid"))
    assert first_select < first_finished, "spa_select was held back until a job finished"
