"""The Snakemake profiles in profiles/: syntax, options, and what they promise.

Checked against the installed snakemake and SLURM executor plugin: every key is one of
their long options, every profile dry-runs a small workflow, and the workflow profile
and the site profiles do not step on each other's keys (a workflow profile replaces a
site profile's key of the same name; the command line replaces both).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PROFILES = REPO / "profiles"
SITE_PROFILES = ["local", "mesocentre", "gpgpu"]
ALL_PROFILES = ["default"] + SITE_PROFILES
TINY_SNAKEFILE = REPO / "tests" / "slurm" / "Snakefile"

# rules of the Conveyor workflows and the ones that may use a GPU
RULES = [
    "spa_preprocess_movie", "spa_validate_movie", "spa_movies_star", "spa_motion", "spa_ctf", "spa_pick",
    "spa_extract", "spa_merge", "spa_class2d", "spa_select", "spa_reextract",
    "spa_reextract_merge", "spa_initial_model", "spa_refine3d", "spa_postprocess",
    "spi_import_cxidb", "spi_validate_shots", "spi_shots_table", "spi_hits",
    "spi_center", "spi_size", "spi_filter", "spi_merge", "spi_class2d", "spi_select",
    "spi_emc", "spi_correct", "spi_phasing",
    "simulate_spa", "simulate_spi",
]
GPU_RULES = {"spa_preprocess_movie", "spa_motion", "spa_ctf", "spa_class2d", "spa_initial_model", "spa_refine3d",
             "spi_class2d", "spi_emc", "spi_phasing"}
PER_MOVIE_RULES = {"spa_preprocess_movie", "spa_validate_movie", "spa_motion", "spa_ctf", "spa_pick", "spa_extract"}
# keys only the workflow profile may set, and keys it must leave to the site profiles
WORKFLOW_PROFILE_KEYS = {"set-threads", "set-resources", "scheduler"}
OUTPUT_ENTRIES = {".git", ".snakemake", ".venv", "results", "logs", "benchmarks",
                  ".pytest_cache", "dag.svg", "report.zip"}


def load(name: str) -> dict:
    return yaml.safe_load((PROFILES / name / "config.yaml").read_text())


def snakemake_cmd() -> list[str]:
    pytest.importorskip("snakemake")
    return [sys.executable, "-m", "snakemake"]


@pytest.fixture(scope="module")
def long_options() -> set[str]:
    pytest.importorskip("snakemake")
    pytest.importorskip("snakemake_executor_plugin_slurm")
    from snakemake.cli import get_argument_parser

    parser = get_argument_parser()
    return {s[2:] for a in parser._actions for s in a.option_strings if s.startswith("--")}


def clean_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("SNAKEMAKE_PROFILE", None)
    env.update(extra)
    return env


def dry_run(args: list[str], cwd: Path, env: dict | None = None) -> str:
    proc = subprocess.run(snakemake_cmd() + args + ["--dry-run"], cwd=cwd,
                          capture_output=True, text=True, timeout=300,
                          env=env or clean_env())
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


def job_resources(dry_run_output: str) -> dict[str, str]:
    """{rule: 'resources: ...' line} of the first job of each rule in a dry run."""
    found: dict[str, str] = {}
    rule = None
    for line in dry_run_output.splitlines():
        m = re.match(r"\s*(?:local)?rule (\w+):", line)
        if m:
            rule = m.group(1)
        elif rule and line.strip().startswith("resources:"):
            found.setdefault(rule, line.strip())
            rule = None
    return found


# ---- syntax and options -------------------------------------------------------------

@pytest.mark.parametrize("name", ALL_PROFILES)
def test_profile_is_a_yaml_mapping_in_one_file(name):
    files = sorted(p.name for p in (PROFILES / name).iterdir()
                   if re.fullmatch(r"(profile|config)(\.v\d+\+)?\.yaml", p.name))
    # with two candidate files Snakemake's pick depends on directory order
    assert files == ["config.yaml"], files
    assert isinstance(load(name), dict)


@pytest.mark.parametrize("name", ALL_PROFILES)
def test_profile_keys_are_snakemake_options(name, long_options):
    unknown = sorted(set(load(name)) - long_options)
    assert not unknown, f"profiles/{name}: not options of this snakemake: {unknown}"


def test_workflow_profile_sets_only_per_rule_keys_and_the_scheduler():
    # any other key would replace the site profile's (partition, account, grouping ...)
    assert set(load("default")) == WORKFLOW_PROFILE_KEYS
    # the ILP scheduler starts a solver process at every scheduling round (docs/benchmarks.md)
    assert load("default")["scheduler"] == "greedy"


@pytest.mark.parametrize("name", SITE_PROFILES)
def test_site_profiles_leave_per_rule_keys_to_the_workflow_profile(name):
    # they would be ignored: the workflow profile's keys of the same name win
    assert not WORKFLOW_PROFILE_KEYS & set(load(name))


# ---- per-rule sizes -------------------------------------------------------------------

def evaluate(expr, attempt: int) -> int:
    if isinstance(expr, int):
        return expr
    return int(eval(str(expr), {"__builtins__": {}}, {"attempt": attempt}))


def test_every_rule_has_threads_memory_and_runtime():
    profile = load("default")
    threads, resources = profile["set-threads"], profile["set-resources"]
    for rule in RULES:
        assert isinstance(threads.get(rule), int) and threads[rule] >= 1, rule
        res = resources.get(rule)
        assert res, f"{rule} has no set-resources entry"
        for key in ("mem_mb", "runtime"):
            # grows with the attempt number, so retries get more
            first, second = evaluate(res[key], 1), evaluate(res[key], 2)
            assert 0 < first < second, (rule, key, res[key])
        assert not set(res) & {"mem_mb_per_cpu", "mem", "slurm_partition", "slurm_account"}, rule
    assert set(threads) == set(resources) == set(RULES)


def test_gpu_marks():
    resources = load("default")["set-resources"]
    for rule in RULES:
        if rule in GPU_RULES:
            # no value here: the gpgpu profile's default gives them a GPU
            assert "gpu" not in resources[rule], rule
        else:
            assert resources[rule].get("gpu") == 0, f"{rule} must be marked gpu: 0"


# ---- site profiles -------------------------------------------------------------------

def test_local_profile():
    p = load("local")
    assert p["cores"] == "all"
    assert p["rerun-incomplete"] is True and p["printshellcmds"] is True
    assert p["keep-going"] is False
    assert p["latency-wait"] > 0
    assert "executor" not in p


@pytest.mark.parametrize("name", ["mesocentre", "gpgpu"])
def test_cluster_profiles(name):
    p = load(name)
    assert p["executor"] == "slurm"
    site = p["default-resources"]
    assert site["slurm_partition"] and "slurm_account" in site
    assert p["slurm-status-command"] == "squeue"
    assert p["retries"] >= 1 and isinstance(p["jobs"], int)
    assert isinstance(p["cores"], int) and p["resources"]["mem_mb"] > 0
    # group jobs run their jobs one at a time: one slot per group, one per job, counted
    # per SLURM job (a global count would submit one job at a time)
    assert p["resources"]["group_slot"] == 1 and site["group_slot"] == 1
    assert p["set-resource-scopes"]["group_slot"] == "local"
    groups, components = p["groups"], p["group-components"]
    assert PER_MOVIE_RULES <= set(groups)
    assert len({groups[r] for r in PER_MOVIE_RULES}) == 1
    assert set(groups.values()) == set(components)
    assert all(isinstance(n, int) and n > 1 for n in components.values())
    assert set(groups) <= set(RULES)
    # the site block is the first key of the file
    text = (PROFILES / name / "config.yaml").read_text()
    assert text.index("site edits here") < text.index("default-resources:")
    assert next(iter(p)) == "default-resources"


def test_gpgpu_profile_asks_for_gpus():
    p = load("gpgpu")
    assert p["default-resources"]["gpu"] >= 1
    assert "--nv" in p["apptainer-args"].split()
    assert p["default-resources"]["slurm_partition"] != load("mesocentre")["default-resources"]["slurm_partition"]


# ---- the profiles in use -------------------------------------------------------------

@pytest.mark.parametrize("name", SITE_PROFILES)
def test_dry_run_with_profile(name, tmp_path):
    """Each site profile with the workflow profile, on the tiny three-rule workflow
    (whose rule names are real ones, plus rules named in the profiles it lacks)."""
    out = dry_run(["--snakefile", str(TINY_SNAKEFILE),
                   "--workflow-profile", str(PROFILES / "default"),
                   "--profile", str(PROFILES / name)], cwd=tmp_path)
    assert "workflow specific profile" in out
    res = job_resources(out)
    assert "mem_mb=16000" in res["spa_motion"], res["spa_motion"]
    assert "runtime=20" in res["spa_motion"], res["spa_motion"]
    if name == "gpgpu":
        assert "gpu=1" in res["spa_motion"] and "slurm_partition=gpu" in res["spa_motion"]
        assert "gpu=0" in res["spa_validate_movie"] and "gpu=0" in res["spa_merge"]
        assert "Group job spa_micrograph" in out
    elif name == "mesocentre":
        assert "gpu=" not in res["spa_motion"]
        assert "slurm_partition=cpu" in res["spa_motion"]
        assert "Group job spa_micrograph" in out
    else:
        assert "slurm_partition" not in res["spa_motion"]


def test_install_script_makes_profiles_findable_by_name(tmp_path):
    """profiles/install.sh puts the site profiles where `--profile NAME` finds them."""
    user_dir = tmp_path / "xdg"
    env = clean_env(XDG_CONFIG_HOME=str(user_dir))
    proc = subprocess.run(["bash", str(PROFILES / "install.sh")], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in SITE_PROFILES:
        installed = user_dir / "snakemake" / name / "config.yaml"
        assert installed.exists(), name
        assert installed.read_text() == (PROFILES / name / "config.yaml").read_text()
    assert not (user_dir / "snakemake" / "default").exists()
    # idempotent
    again = subprocess.run(["bash", str(PROFILES / "install.sh")], env=env,
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 0, again.stdout + again.stderr

    workdir = tmp_path / "work"
    workdir.mkdir()
    out = dry_run(["--snakefile", str(TINY_SNAKEFILE), "--profile", "mesocentre"],
                  cwd=workdir, env=env)
    assert "Using profile mesocentre" in out
    assert "slurm_partition=cpu" in out

    # the site-wide alternative, into the first of XDG_CONFIG_DIRS
    site_dir = tmp_path / "etc-xdg"
    proc = subprocess.run(["bash", str(PROFILES / "install.sh"), "--system"],
                          env=clean_env(XDG_CONFIG_DIRS=f"{site_dir}:/nonexistent"),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in SITE_PROFILES:
        copied = site_dir / "snakemake" / name / "config.yaml"
        assert copied.is_file() and not copied.parent.is_symlink(), name


# ---- the repository's workflow, when it is there ---------------------------------------

def real_workflow() -> tuple[Path, Path]:
    snakefile = REPO / "Snakefile"
    configfile = REPO / "tests" / "configs" / "tiny.yaml"
    if not snakefile.exists() or not configfile.exists():
        pytest.skip("workflow not present")
    return snakefile, configfile


def linked_workdir(tmp_path: Path) -> Path:
    workdir = tmp_path / "work"
    workdir.mkdir()
    for entry in REPO.iterdir():
        if entry.name not in OUTPUT_ENTRIES:
            (workdir / entry.name).symlink_to(entry)
    return workdir


def test_workflow_rules_are_sized_in_the_workflow_profile(tmp_path):
    """A rule missing from profiles/default would get the site default sizes and, under
    gpgpu, a GPU: every job rule of the workflow must be listed."""
    snakefile, configfile = real_workflow()
    proc = subprocess.run(snakemake_cmd() + ["--snakefile", str(snakefile),
                                             "--configfile", str(configfile), "--list-rules"],
                          cwd=linked_workdir(tmp_path), capture_output=True, text=True,
                          timeout=300, env=clean_env())
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    rules = {line.split()[0] for line in proc.stdout.splitlines()
             if line.strip() and not line.startswith((" ", "\t"))}
    job_rules = {r for r in rules if r.startswith(("spa_", "spi_", "simulate_"))}
    missing = sorted(job_rules - set(load("default")["set-resources"]))
    assert not missing, f"add these rules to profiles/default/config.yaml: {missing}"


@pytest.mark.parametrize("name", SITE_PROFILES)
def test_workflow_dry_runs_with_profile(name, tmp_path):
    """The real workflow, tiny config, each site profile: the DAG (and the job groups:
    a grouped rule must not wait for a job that waits for the group) builds."""
    snakefile, configfile = real_workflow()
    out = dry_run(["--snakefile", str(snakefile), "--configfile", str(configfile),
                   "--profile", str(PROFILES / name)], cwd=linked_workdir(tmp_path))
    assert "workflow specific profile" in out
