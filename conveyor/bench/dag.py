"""The workflow at scale: ``snakemake -n`` over many placeholder movies, and the SLURM jobs of a profile.

The movies are empty ``.mrc`` files (the dry run only globs them; no rule reads them while the
DAG is built) in a temporary directory, with a config whose ``spa.movies`` glob points there
and no ``simulate:`` section. Measured, each as its own process:

* ``snakemake --version`` — the fixed start-up of Snakemake (imports and plug-in discovery);
* ``snakemake -n`` — the dry run as a user types it (every job printed);
* ``snakemake -n --quiet all`` — the same without printing the jobs;
* ``snakemake -n --profile PROFILE`` — the dry run with the cluster profile; its output lists
  every group job (``Group job NAME``) and every ungrouped job, from which the number of
  SLURM submissions is counted: one per group job, one per ungrouped job that is not local
  (local = listed in ``localrules:``, or a rule with nothing to run such as the target rule
  ``all``, which the dry run shows without ``output:``).

The count is checked against the DAG: the jobs of each group's rules form one connected
component per movie (or shot file) -- with the native tools a single ``spa_preprocess_movie``
job, with a peer tool in its own image the chain of five step jobs -- and
``group-components: N`` packs N components into one SLURM job, so a group gives
``ceil(components / N)`` jobs.

``--profile-python`` runs the plain dry run once more under :mod:`cProfile` and lists the
hottest functions, separating those defined in the workflow (Snakefile, ``*.smk``: input
functions, params) from Snakemake's own.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path

TARGET_DRY_RUN_S = 30.0
TARGET_SLURM_JOBS = 500

_TS = r"(?:\[[^\]]+\]\s*)?"
_RE_GROUP = re.compile(rf"^{_TS}Group job (\S+)")
_RE_RULE = re.compile(r"^(\s*)(?:local)?(?:rule|checkpoint) (\S+):\s*$")
_RE_LOCALRULES = re.compile(r"^\s*localrules\s*:\s*(.+)$", re.M)
#: Snakemake functions whose cumulative time is worth naming (they overlap).
HOTSPOTS = {
    "build the DAG (Workflow._build_dag)": ("snakemake/workflow.py", "_build_dag"),
    "print the jobs (Job.log_info)": ("snakemake/jobs.py", "log_info"),
    "expand params (Rule.expand_params)": ("snakemake/rules.py", "expand_params"),
    "expand resources (Rule.expand_resources)": ("snakemake/rules.py", "expand_resources"),
    "call input/param functions (Rule.apply_input_function)": ("snakemake/rules.py", "apply_input_function"),
    "inspect.signature of those functions": ("inspect.py", "signature"),
    "format shell commands (Job.shellcmd)": ("snakemake/jobs.py", "shellcmd"),
    "import plug-ins (executor registry)": ("registry/__init__.py", "collect_plugins"),
}


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def snakemake_exe() -> str:
    from ..errors import InputError  # noqa: PLC0415

    here = Path(sys.executable).parent / "snakemake"
    if here.exists():
        return str(here)
    exe = shutil.which("snakemake")
    if exe is None:
        raise InputError("snakemake", "is not installed", "install the workflow extra: pip install -e '.[workflow]'")
    return exe


def resolve_profile(profile) -> Path | None:
    """A profile directory: a path, or a name under the repository's ``profiles/``; None for 'none'."""
    from ..errors import InputError  # noqa: PLC0415

    if profile in (None, "", "none"):
        return None
    p = Path(profile)
    for cand in (p, repo_root() / "profiles" / str(profile)):
        if (cand / "config.yaml").exists():
            return cand.resolve()
    raise InputError(str(profile), "is not a Snakemake profile (no config.yaml there or under profiles/)",
                     "pass a profile name (mesocentre, gpgpu, local) or a directory with config.yaml")


def make_placeholders(directory: Path, n: int, prefix: str = "mic_") -> list[Path]:
    """``n`` empty ``.mrc`` files named ``{prefix}000001.mrc`` ... in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    width = max(6, len(str(n)))
    paths = []
    for i in range(1, n + 1):
        path = directory / f"{prefix}{i:0{width}d}.mrc"
        path.touch()
        paths.append(path)
    return paths


def write_config(path: Path, movies_glob: str, experiment: str = "dagbench", spa: dict | None = None) -> Path:
    """A minimal SPA config (no simulation, no SPI) for the movies of ``movies_glob``."""
    import yaml  # noqa: PLC0415

    section = {"movies": movies_glob, "frames": 40, "pixel_size": 1.0, "voltage": 300, "cs": 2.7,
               "amplitude_contrast": 0.1, "dose_per_frame": 1.0, "particle_diameter": 150.0, "symmetry": "C1",
               "selection": "auto"}
    section.update(spa or {})
    path.write_text(yaml.safe_dump({"experiment": experiment, "device": "cpu", "spa": section}, sort_keys=False))
    return path


def workflow_snakefile(work: Path, snakefile=None, include=()) -> Path:
    """The Snakefile to run: the repository's (or ``snakefile``), plus extra rule files when given.

    With ``include``, a small Snakefile in ``work`` includes the main one and then each extra
    rule file (for rules written but not yet included by the Snakefile).
    """
    from ..errors import InputError  # noqa: PLC0415

    main = Path(snakefile).resolve() if snakefile else repo_root() / "Snakefile"
    if not main.exists():
        raise InputError(str(main), "does not exist", "pass --snakefile PATH")
    if not include:
        return main
    lines = [f"include: {str(main)!r}"]
    for inc in include:
        p = Path(inc)
        p = p if p.is_absolute() else (repo_root() / p if not p.exists() else p.resolve())
        if not p.exists():
            raise InputError(str(inc), "does not exist", "pass a rule file such as workflow/rules/spa_preprocess.smk")
        lines.append(f"include: {str(p.resolve())!r}")
    wrapper = work / "Snakefile.bench"
    wrapper.write_text("\n".join(lines) + "\n")
    return wrapper


def snakemake_base(snakefile: Path, work: Path, config: Path) -> list[str]:
    """``snakemake -s SNAKEFILE --directory WORK --configfile CONFIG`` with the repository's workflow profile."""
    cmd = [snakemake_exe(), "-s", str(snakefile), "--directory", str(work), "--configfile", str(config)]
    wp = repo_root() / "profiles" / "default"
    if snakefile.parent != repo_root() and wp.exists():
        cmd += ["--workflow-profile", str(wp)]  # found by itself only next to the Snakefile
    return cmd


def _env() -> dict:
    env = dict(os.environ)
    env.pop("SNAKEMAKE_PROFILE", None)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    return env


# ----------------------------------------------------------------------------- parsing


def parse_job_stats(text: str) -> dict[str, int]:
    """The 'Job stats' table of a dry run: {rule: count} (without 'total')."""
    counts: dict[str, int] = {}
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.strip() == "Job stats:":
            for row in lines[i + 3:]:
                parts = row.split()
                if len(parts) != 2 or not parts[1].isdigit():
                    break
                if parts[0] != "total":
                    counts[parts[0]] = int(parts[1])
            break
    return counts


def parse_dry_run(text: str) -> dict:
    """Top-level entries of a dry run: group jobs and ungrouped jobs (with whether they have outputs)."""
    groups: Counter = Counter()
    group_sizes: dict[str, list[int]] = {}
    ungrouped: list[dict] = []
    current = None  # ("group", name) or the ungrouped job dict
    lines = text.splitlines()
    for line in lines:
        m = _RE_GROUP.match(line)
        if m:
            name = m.group(1)
            groups[name] += 1
            group_sizes.setdefault(name, []).append(0)
            current = ("group", name)
            continue
        m = _RE_RULE.match(line)
        if m:
            indent, rule = m.group(1), m.group(2)
            if indent and isinstance(current, tuple):
                group_sizes[current[1]][-1] += 1
            else:
                current = {"rule": rule, "output": False}
                ungrouped.append(current)
            continue
        if isinstance(current, dict) and line.startswith("    output:"):
            current["output"] = True
        if line.startswith("Job stats:") or line.startswith("This was a dry-run"):
            current = None
    return {"groups": dict(groups), "group_sizes": group_sizes, "ungrouped": ungrouped}


def localrules_of(snakefile: Path) -> set[str]:
    """Rule names in ``localrules:`` statements of the Snakefile and the rule files beside it."""
    names: set[str] = set()
    files = {snakefile}
    for base in {snakefile.parent, repo_root()}:
        files.update(base.glob("workflow/rules/*.smk"))
    for f in files:
        try:
            text = f.read_text()
        except OSError:
            continue
        for m in _RE_LOCALRULES.finditer(text):
            names.update(n.strip() for n in m.group(1).split(",") if n.strip())
    return names


def profile_groups(profile_dir: Path) -> tuple[dict[str, str], dict[str, int]]:
    import yaml  # noqa: PLC0415

    cfg = yaml.safe_load((profile_dir / "config.yaml").read_text()) or {}
    groups = {str(k): str(v) for k, v in (cfg.get("groups") or {}).items()}
    comps = {str(k): int(v) for k, v in (cfg.get("group-components") or {}).items()}
    return groups, comps


def slurm_jobs_from_dry_run(parsed: dict, local: set[str]) -> dict:
    """SLURM submissions in a profile's dry run: group jobs + ungrouped jobs that are not local."""
    submitted = Counter()
    local_jobs = Counter()
    for job in parsed["ungrouped"]:
        if job["rule"] in local or not job["output"]:
            local_jobs[job["rule"]] += 1
        else:
            submitted[job["rule"]] += 1
    n_groups = sum(parsed["groups"].values())
    return {"total": n_groups + sum(submitted.values()), "group_jobs": parsed["groups"],
            "ungrouped_jobs": dict(submitted), "local_jobs": dict(local_jobs),
            "jobs_per_group_job": {g: (min(s), max(s)) for g, s in parsed["group_sizes"].items() if s}}


def slurm_jobs_from_dag(job_counts: dict[str, int], groups: dict[str, str], components: dict[str, int],
                        local: set[str]) -> dict:
    """The same count computed from the per-rule job counts and the profile's grouping.

    Assumes each group's jobs form one component per movie/shot file holding one job of each
    of the group's rules (the per-movie chains), so a group has ``max(count of its rules)``
    components and gives ``ceil(components / group-components)`` SLURM jobs.
    """
    per_group: dict[str, int] = {}
    for rule, count in job_counts.items():
        g = groups.get(rule)
        if g is not None:
            per_group[g] = max(per_group.get(g, 0), count)
    group_jobs = {g: math.ceil(n / max(components.get(g, 1), 1)) for g, n in per_group.items()}
    ungrouped = {r: c for r, c in job_counts.items() if r not in groups and r not in local}
    return {"total": sum(group_jobs.values()) + sum(ungrouped.values()), "group_jobs": group_jobs,
            "components": per_group, "ungrouped_jobs": ungrouped}


# ----------------------------------------------------------------------------- python profile


def profile_dry_run(cmd: list[str], work: Path, env: dict, top: int = 15) -> dict:
    """Run ``cmd`` (a snakemake command) under cProfile; the hottest functions, workflow ones apart."""
    import pstats  # noqa: PLC0415

    from . import run_measured  # noqa: PLC0415

    out = work / "dry_run.prof"
    m = run_measured([sys.executable, "-m", "cProfile", "-o", str(out), *cmd], env=env,
                     stdout_path=work / "dry_run_profiled.txt")
    m.check("snakemake -n under cProfile")
    st = pstats.Stats(str(out))
    rows = []
    for (fname, line, func), (cc, nc, tt, ct, _callers) in st.stats.items():
        rows.append({"function": f"{Path(fname).name}:{line}({func})", "file": fname, "calls": nc,
                     "tottime_s": tt, "cumtime_s": ct})
    total = max((r["cumtime_s"] for r in rows), default=0.0)

    def is_workflow(f):
        return f.endswith(".smk") or Path(f).name.startswith("Snakefile")

    wf = sorted((r for r in rows if is_workflow(r["file"])), key=lambda r: -r["cumtime_s"])
    # workflow code called per job (input functions, params, resources) that no other
    # workflow function called: their cumulative times do not overlap
    top_level = 0.0
    for (fname, line, func), (_cc, nc, _tt, ct, callers) in st.stats.items():
        if is_workflow(fname) and nc > 1 and not any(is_workflow(c[0]) for c in callers):
            top_level += ct
    hotspots = {}
    for label, (file_end, func) in HOTSPOTS.items():
        hits = [r for r in rows if r["file"].endswith(file_end) and r["function"].endswith(f"({func})")]
        if hits:
            hotspots[label] = max(h["cumtime_s"] for h in hits)
    by_cum = sorted(rows, key=lambda r: -r["cumtime_s"])
    by_tot = sorted(rows, key=lambda r: -r["tottime_s"])
    strip = [{k: v for k, v in r.items() if k != "file"} for r in by_tot[:top]]
    return {
        "profiled_wall_s": m.wall_s,
        "profiled_total_s": total,
        "workflow_functions": [{k: v for k, v in r.items() if k != "file"} for r in wf[:top]],
        "workflow_functions_cumtime_s": top_level,
        "hotspots_cumtime_s": hotspots,
        "top_cumulative": [{k: v for k, v in r.items() if k != "file"} for r in by_cum[:top * 2]],
        "top_self": strip,
    }


# ----------------------------------------------------------------------------- the benchmark


def run_benchmark(*, movies: int = 10000, profile="mesocentre", snakefile=None, include=(), targets=(),
                  workdir=None, keep: bool = False, profile_python: bool = False, plain: bool = True,
                  quiet: bool = True, argv=None, log=print) -> dict:
    """Run the DAG benchmark and return the report (JSON-able); see the module docstring."""
    from ..errors import InputError  # noqa: PLC0415
    from . import device_info, new_report, run_measured, slurm_probe  # noqa: PLC0415

    movies = int(movies)
    if movies < 1:
        raise InputError("bench dag --movies", f"{movies}", "pass at least 1")
    prof_dir = resolve_profile(profile)
    report = new_report("dag", argv)
    report["device"] = device_info("cpu")
    made = workdir is None
    work = Path(tempfile.mkdtemp(prefix="conveyor-bench-dag-")) if made else Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    work = work.resolve()
    env = _env()
    try:
        log(f"creating {movies} placeholder movies in {work / 'movies'} ...")
        make_placeholders(work / "movies", movies)
        config = write_config(work / "config.yaml", str(work / "movies" / "*.mrc"))
        sf = workflow_snakefile(work, snakefile, include)
        base = snakemake_base(sf, work, config)
        tgt = [str(t) for t in targets]
        report["params"] = {"movies": movies, "profile": str(prof_dir) if prof_dir else None,
                            "snakefile": str(sf), "include": [str(i) for i in include], "targets": tgt,
                            "snakemake": None}
        report["slurm_probe"] = slurm_probe()
        ver = run_measured([snakemake_exe(), "--version"], env=env).check("snakemake --version")
        report["params"]["snakemake"] = ver.stdout.strip()
        runs = {"startup": ver.summary()}
        log(f"snakemake --version: {ver.wall_s:.1f} s (start-up)")

        job_counts = {}
        if plain:
            m = run_measured([*base, "-n", *tgt], env=env, stdout_path=work / "dry_run.txt",
                             cwd=work).check("snakemake -n")
            text = (work / "dry_run.txt").read_text(errors="replace")
            job_counts = parse_job_stats(text)
            runs["dry_run"] = m.summary()
            log(f"snakemake -n: {m.wall_s:.1f} s wall, {m.cpu_s:.1f} s CPU, {sum(job_counts.values())} jobs")
        if quiet:
            m = run_measured([*base, "-n", "--quiet", "all", *tgt], env=env, cwd=work).check("snakemake -n -q")
            runs["dry_run_quiet"] = m.summary()
            log(f"snakemake -n --quiet all: {m.wall_s:.1f} s wall, {m.cpu_s:.1f} s CPU")
        slurm = None
        if prof_dir is not None:
            m = run_measured([*base, "-n", "--profile", str(prof_dir), *tgt], env=env,
                             stdout_path=work / "dry_run_profile.txt", cwd=work).check(f"snakemake -n --profile {prof_dir}")
            text = (work / "dry_run_profile.txt").read_text(errors="replace")
            runs["dry_run_profile"] = m.summary()
            counts_p = parse_job_stats(text)
            if not job_counts:
                job_counts = counts_p
            local = localrules_of(Path(snakefile).resolve() if snakefile else repo_root() / "Snakefile")
            parsed = parse_dry_run(text)
            groups, comps = profile_groups(prof_dir)
            slurm = {
                "from_dry_run": slurm_jobs_from_dry_run(parsed, local),
                "from_dag": slurm_jobs_from_dag(counts_p, groups, comps, local | {
                    j["rule"] for j in parsed["ungrouped"] if not j["output"]}),
                "group_components": comps,
            }
            slurm["agree"] = slurm["from_dry_run"]["total"] == slurm["from_dag"]["total"]
            log(f"snakemake -n --profile: {m.wall_s:.1f} s wall; {slurm['from_dry_run']['total']} SLURM jobs")
        report["jobs"] = {"total": sum(job_counts.values()), "per_rule": job_counts}
        report["runs"] = runs
        report["slurm"] = slurm
        if profile_python:
            log("snakemake -n under cProfile ...")
            report["python_profile"] = profile_dry_run([*base, "-n", *tgt], work, env)
    finally:
        if made and not keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            report["workdir"] = str(work)

    startup = runs["startup"]["wall_s"]
    main = runs.get("dry_run") or runs.get("dry_run_quiet") or runs.get("dry_run_profile")
    report["summary"] = {
        "dry_run_s": main["wall_s"],
        "dry_run_cpu_s": main["cpu_s"],
        "startup_s": startup,
        "dag_s": max(main["wall_s"] - startup, 0.0),
        "jobs": report["jobs"]["total"],
        # jobs of the rules that run once per movie, per movie
        "jobs_per_movie": sum(c for c in job_counts.values() if c == movies) / movies,
        "ms_per_job": 1000.0 * max(main["wall_s"] - startup, 0.0) / max(report["jobs"]["total"], 1),
        "cpu_ms_per_job": 1000.0 * max(main["cpu_s"] - runs["startup"]["cpu_s"], 0.0) / max(report["jobs"]["total"], 1),
        "slurm_jobs": slurm["from_dry_run"]["total"] if slurm else None,
        "target_dry_run_s": TARGET_DRY_RUN_S,
        "target_slurm_jobs": TARGET_SLURM_JOBS,
    }
    return report


def format_report(report: dict) -> str:
    from . import fmt, table  # noqa: PLC0415

    p, s = report["params"], report["summary"]
    lines = [f"Dry run over {p['movies']} placeholder movies ({report['jobs']['total']} jobs, "
             f"{s.get('jobs_per_movie', 0):g} per movie; "
             f"{p['snakemake'] and 'snakemake ' + p['snakemake']}; {report['device']['cpu_model']}, "
             f"{report['device']['nproc']} cores)", ""]
    rows = []
    names = {"startup": "snakemake --version (start-up)", "dry_run": "snakemake -n",
             "dry_run_quiet": "snakemake -n --quiet all", "dry_run_profile": "snakemake -n --profile"}
    for key, label in names.items():
        r = report["runs"].get(key)
        if r:
            rows.append([label, fmt(r["wall_s"], ".1f"), fmt(r["cpu_s"], ".1f"), fmt(r["maxrss_mib"], ".0f")])
    lines.append(table(rows, ["run", "wall s", "CPU s", "peak MiB"]))
    lines.append("")
    lines.append(f"dry run {s['dry_run_s']:.1f} s (target <= {s['target_dry_run_s']:.0f} s), of which start-up "
                 f"{s['startup_s']:.1f} s; beyond start-up {s['ms_per_job']:.2f} ms wall, "
                 f"{s['cpu_ms_per_job']:.2f} ms CPU per job")
    probe = report.get("slurm_probe")
    if probe and probe["wall_s"] > 1.0:
        lines.append(f"note: `scontrol show config` took {probe['wall_s']:.1f} s here (no SLURM controller answering); "
                     "Snakemake's SLURM plug-in runs it at every start-up")
    sl = report.get("slurm")
    if sl:
        d, c = sl["from_dry_run"], sl["from_dag"]
        parts = ", ".join(f"{n} x {g}" for g, n in d["group_jobs"].items())
        ung = ", ".join(f"{n} x {r}" for r, n in d["ungrouped_jobs"].items())
        lines.append(f"SLURM jobs with {Path(p['profile']).name}: {d['total']} (target <= {s['target_slurm_jobs']}): "
                     f"group jobs {parts or 'none'}; ungrouped {ung or 'none'}; "
                     f"computed from the DAG: {c['total']} ({'agrees' if sl['agree'] else 'DIFFERS'})")
    prof = report.get("python_profile")
    if prof:
        total = prof["profiled_total_s"] or 1.0
        lines.append("")
        lines.append(f"cProfile of the plain dry run ({total:.1f} s under the profiler); cumulative times, "
                     "overlapping:")
        rows = [[label, fmt(v, ".1f"), fmt(100 * v / total, ".0f")] for label, v in prof["hotspots_cumtime_s"].items()]
        rows.append(["the workflow's own functions (per-job input/params functions)",
                     fmt(prof["workflow_functions_cumtime_s"], ".1f"),
                     fmt(100 * prof["workflow_functions_cumtime_s"] / total, ".0f")])
        lines.append(table(rows, ["where", "s", "%"]))
        rows = [[r["function"], r["calls"], fmt(r["cumtime_s"]), fmt(r["tottime_s"])]
                for r in prof["workflow_functions"][:8]]
        if rows:
            lines.append("")
            lines.append(table(rows, ["workflow function", "calls", "cum s", "self s"]))
    return "\n".join(lines)
