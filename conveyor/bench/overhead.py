"""Snakemake's overhead: the per-movie preprocessing through Snakemake and through a plain pool.

1. ``N`` movies are simulated (``conveyor.simulate.spa``), or ``D`` of them and the others
   copied from those (``--distinct``); the config has their ``spa:`` section and no
   ``simulate:`` section, so the workflow starts from the movies.
2. ``snakemake -n -p TARGETS`` lists every per-movie job with its inputs, outputs and exact
   shell command. The default targets are the movies' extracted particle tables
   (``results/overhead/spa/extract/bin4/{mic}.star``): whatever the rules are called, that
   is all of each movie's preprocessing (validation, motion, CTF, picking, extraction) --
   one job per movie with the native tools (``spa_preprocess_movie``), five with a peer
   tool in its own image. ``--target`` or ``--until`` choose other jobs.
3. ``snakemake --cores C TARGETS`` runs them, with every rule at one thread
   (``--set-threads RULE=1``) so that Snakemake runs up to ``C`` jobs at once.
4. A plain pool of ``C`` workers (:func:`_pool_main`, a separate Python process) runs the
   very same command lines with ``bash -c 'set -euo pipefail; ...'`` as Snakemake does, one
   movie's chain after the other per worker, in a fresh directory (creating the output and
   log folders first, as Snakemake does).

Both start from nothing and do the same work on the same files with the same parallelism,
and the numeric libraries are limited to one thread in both. The overhead is
``snakemake wall / pool wall - 1``; Snakemake's fixed start-up (``snakemake --version``) is
reported too, and the CPU time Snakemake itself used (its process tree's CPU time minus the
pool's). With ``--repeat`` the two alternate and medians are reported.

Each job's own wall time is known on both sides (Snakemake's ``benchmark:`` files, the
pool's record), which splits the overhead in two (:func:`_split`): the jobs themselves
running longer, and the cores left without a job (start-up, scheduling, the run's end).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

TARGET_OVERHEAD = 0.02
#: Overhead of the seed paper's pipeline, for reference.
SEED_OVERHEAD = 0.07

_RE_RULE = re.compile(r"^\s*(?:local)?rule (\S+):\s*$")
#: the plain pool's record of each job's wall time, in its run directory
POOL_TIMES = "pool_job_times.json"


# ----------------------------------------------------------------------------- the pool


def _pool_main(argv: list[str]) -> int:
    """``python -m conveyor.bench.overhead --pool JOBS.json CORES WORKDIR``: run the chains, C at a time."""
    from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415

    jobs_file, cores, work = argv[0], int(argv[1]), Path(argv[2])
    chains = json.loads(Path(jobs_file).read_text())

    times = {}

    def run_chain(chain):
        for job in chain:
            for d in job["dirs"]:
                (work / d).mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            r = subprocess.run(["bash", "-c", f"set -euo pipefail; {job['cmd']}"], cwd=work, check=False)
            times[job["id"]] = time.perf_counter() - t0
            if r.returncode != 0:
                return f"exit {r.returncode}: {job['cmd']}"
        return None

    with ThreadPoolExecutor(max_workers=cores) as pool:
        errors = [e for e in pool.map(run_chain, chains) if e]
    for e in errors:
        print(e, file=sys.stderr)
    # each job's wall time (s), as Snakemake's benchmark files give it for its jobs
    (work / POOL_TIMES).write_text(json.dumps(times))
    return 1 if errors else 0


def _warm_memory(gib: float) -> None:
    """Write and free ``gib`` GiB of memory in a separate process (see :func:`run_benchmark`)."""
    code = f"import numpy as np; a = np.ones({int(gib * (1 << 30)) // 4}, dtype=np.float32); del a"
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------- dry-run parsing


def parse_jobs(text: str) -> list[dict]:
    """Jobs of a ``snakemake -n -p`` output: rule, input, output, log, benchmark, wildcards, shell command."""
    jobs = []
    cur = None
    for line in text.splitlines():
        m = _RE_RULE.match(line)
        if m:
            cur = {"rule": m.group(1), "input": [], "output": [], "log": [], "benchmark": [], "wildcards": {},
                   "cmd": None}
            jobs.append(cur)
            continue
        if cur is None:
            continue
        s = line.strip()
        for key in ("input", "output", "log", "benchmark"):
            if s.startswith(f"{key}:"):
                cur[key] = [f.strip() for f in s[len(key) + 1:].split(",") if f.strip()]
        if s.startswith("wildcards:"):
            for part in s[len("wildcards:"):].split(","):
                if "=" in part:
                    k, v = part.split("=", 1)
                    cur["wildcards"][k.strip()] = v.strip()
        if line.startswith("Shell command:"):
            cmd = line[len("Shell command:"):].strip()
            cur["cmd"] = None if cmd == "None" else cmd
        if line.startswith("Job stats:"):
            cur = None
    return jobs


def chains_of(jobs: list[dict]) -> list[list[dict]]:
    """Jobs grouped into connected chains (shared files), each in dependency order."""
    produced = {}
    for i, j in enumerate(jobs):
        for f in j["output"]:
            produced[f] = i
    parent = list(range(len(jobs)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    deps = defaultdict(set)
    for i, j in enumerate(jobs):
        for f in j["input"]:
            if f in produced:
                deps[i].add(produced[f])
                parent[find(i)] = find(produced[f])
    comps = defaultdict(list)
    for i in range(len(jobs)):
        comps[find(i)].append(i)
    chains = []
    for members in comps.values():
        order, done = [], set()

        def visit(i):
            if i in done:
                return
            done.add(i)
            for d in sorted(deps[i]):
                visit(d)
            order.append(i)

        for i in sorted(members):
            visit(i)
        chains.append([jobs[i] for i in order])
    chains.sort(key=lambda c: c[0]["output"][0] if c[0]["output"] else "")
    return chains


def _dirs(job: dict) -> list[str]:
    return sorted({str(Path(f).parent) for f in job["output"] + job["log"] + job["benchmark"]
                   if str(Path(f).parent) not in ("", ".")})


# ----------------------------------------------------------------------------- the benchmark


def run_benchmark(*, movies: int = 32, cores: int = 2, size: int = 2048, frames: int = 40, repeat: int = 1,
                  distinct: int | None = 4, scheduler: str | None = None,
                  snakefile=None, include=(), targets=(), until=(), workdir=None, keep: bool = False,
                  seed: int = 0, warm_memory_gib: float = 0.0, argv=None, log=print) -> dict:
    """Run the overhead benchmark and return the report (JSON-able); see the module docstring.

    ``warm_memory_gib``: before every measured run, a separate process writes and frees this
    much memory, so that both sides start from the same state of the machine's memory (on
    a virtual machine, memory left unused for a while can cost several times more to
    fault in than memory freed moments ago; see docs/benchmarks.md).

    ``distinct``: simulate only this many movies and make the others byte-for-byte copies
    of them (each its own file, read from disk or page cache as a real movie is), so that a
    run long enough to amortise Snakemake's fixed start-up does not need hours of
    simulation; None: every movie simulated.

    ``scheduler``: Snakemake's job scheduler (``greedy`` or ``ilp``); default: the
    workflow profile's (``profiles/default``, greedy)."""
    import yaml  # noqa: PLC0415

    from ..errors import InputError  # noqa: PLC0415
    from ..simulate.spa import simulate_spa  # noqa: PLC0415
    from . import device_info, median, new_report, ratio, run_measured, slurm_probe, thread_env  # noqa: PLC0415
    from .dag import snakemake_base, snakemake_exe, workflow_snakefile  # noqa: PLC0415

    movies, cores, repeat = int(movies), int(cores), int(repeat)
    distinct = movies if distinct is None else int(distinct)
    if movies < 1 or cores < 1 or repeat < 1 or distinct < 1:
        raise InputError("bench overhead", "--movies, --distinct, --cores and --repeat must be at least 1",
                         "pass 1 or more")
    if scheduler not in (None, "greedy", "ilp"):
        raise InputError("bench overhead", f"unknown scheduler {scheduler!r}", "use greedy or ilp")
    distinct = min(distinct, movies)
    report = new_report("overhead", argv)
    report["device"] = device_info("cpu")
    made = workdir is None
    work = Path(tempfile.mkdtemp(prefix="conveyor-bench-overhead-")) if made else Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    work = work.resolve()
    env = thread_env(1)
    env.pop("SNAKEMAKE_PROFILE", None)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.setdefault("MPLBACKEND", "Agg")
    tgt = [str(t) for t in targets]
    until = [str(u) for u in (until or ())] if not tgt else []
    try:
        t0 = time.perf_counter()
        particles = max(2, int(round(40 * (size / 1024) ** 2)))
        log(f"simulating {distinct} movies of {size}x{size}x{frames} ...")
        paths = simulate_spa(work / "data", micrographs=distinct, size=size, frames=frames, particles=particles,
                             seed=seed)
        paths["movies"] = list(paths["movies"]) + _copies(paths["movies"], movies)
        log(f"simulated in {time.perf_counter() - t0:.1f} s"
            + (f"; {movies - distinct} copies make {movies} movies" if movies > distinct else ""))
        os.sync()  # the movies on disk now, not written back while the first run is measured
        exp = yaml.safe_load(Path(paths["experiment"]).read_text())
        config = work / "config.yaml"
        config.write_text(yaml.safe_dump({"experiment": "overhead", "device": "cpu", "spa": exp["spa"]},
                                         sort_keys=False))
        if not tgt and not until:
            # every movie's preprocessing, up to its extracted particles (default extraction bin)
            bin_ = (exp["spa"].get("extract") or {}).get("bin", 4)
            tgt = [f"results/overhead/spa/extract/bin{bin_}/{Path(m).stem}.star"
                   for m in paths["movies"]]
        sf = workflow_snakefile(work, snakefile, include)
        sel = [*tgt, *(x for u in until for x in ("--until", u))]

        # the jobs and their command lines, from a dry run in a fresh directory
        plan_dir = work / "plan"
        plan_dir.mkdir()
        m = run_measured([*snakemake_base(sf, plan_dir, config), "-n", "-p", *sel], env=env, cwd=plan_dir,
                         stdout_path=work / "plan.txt").check("snakemake -n -p")
        jobs = parse_jobs((work / "plan.txt").read_text(errors="replace"))
        if not jobs:
            raise InputError("bench overhead", "the dry run lists no job", "check --target/--until and the workflow")
        no_shell = sorted({j["rule"] for j in jobs if not j["cmd"]})
        if no_shell:
            raise InputError("bench overhead", f"rules without a shell command cannot be replayed: {', '.join(no_shell)}",
                             "choose targets whose jobs are shell commands (default: every movie's extracted particles)")
        rules = sorted({j["rule"] for j in jobs})
        chains = chains_of(jobs)
        jobs_file = work / "chains.json"
        for i, j in enumerate(jobs):
            j["id"] = i  # the pool records each job's wall time under it
        jobs_file.write_text(json.dumps([[{"id": j["id"], "cmd": j["cmd"], "dirs": _dirs(j)} for j in c]
                                         for c in chains]))
        log(f"{len(jobs)} jobs ({', '.join(rules)}) in {len(chains)} chains")

        # targets before --set-threads (which takes every word after it), after an option
        # with one value (--configfile in front takes several)
        smk_opts = ["--cores", str(cores), *(["--scheduler", scheduler] if scheduler else []), *sel,
                    "--set-threads", *(f"{r}=1" for r in rules)]
        probe = slurm_probe()
        ver = run_measured([snakemake_exe(), "--version"], env=env).check("snakemake --version")
        runs = {"snakemake": [], "pool": []}
        for r in range(repeat):
            order = ("snakemake", "pool") if r % 2 == 0 else ("pool", "snakemake")
            for side in order:
                d = work / f"run_{side}_{r}"
                d.mkdir()
                if warm_memory_gib > 0:
                    _warm_memory(warm_memory_gib)
                if side == "snakemake":
                    m = run_measured([*snakemake_base(sf, d, config), *smk_opts], env=env, cwd=d,
                                     stdout_path=d / "snakemake.out")
                    (d / "snakemake.err").write_text(m.stderr)  # Snakemake logs to stderr
                    m.check("snakemake")
                else:
                    m = run_measured([sys.executable, "-m", "conveyor.bench.overhead", "--pool", str(jobs_file),
                                      str(cores), str(d)], env=env, cwd=d).check("the plain pool")
                run = m.summary()
                run["jobs_s"] = _job_seconds(d, jobs, side)
                runs[side].append(run)
                log(f"{side}: {m.wall_s:.1f} s wall, {m.cpu_s:.1f} s CPU"
                    + (f", its jobs {run['jobs_s']:.1f} s in all" if run["jobs_s"] is not None else ""))
                _check_outputs(d, jobs)
                if r < repeat - 1 or not keep:
                    shutil.rmtree(d / "results", ignore_errors=True)
    finally:
        if made and not keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            report["workdir"] = str(work)

    smk = median(x["wall_s"] for x in runs["snakemake"])
    pool = median(x["wall_s"] for x in runs["pool"])
    smk_cpu = median(x["cpu_s"] for x in runs["snakemake"])
    pool_cpu = median(x["cpu_s"] for x in runs["pool"])
    rt = ratio(smk, pool)
    smk_min = min(x["wall_s"] for x in runs["snakemake"])
    pool_min = min(x["wall_s"] for x in runs["pool"])
    startup = ver.wall_s
    report["params"] = {"movies": movies, "distinct": distinct, "cores": cores, "size": size, "frames": frames,
                        "repeat": repeat, "warm_memory_gib": warm_memory_gib,
                        "scheduler": scheduler or "workflow profile",
                        "snakefile": str(sf), "targets": tgt, "until": until, "rules": rules,
                        "jobs": len(jobs), "snakemake": ver.stdout.strip(),
                        "snakemake_options": smk_opts}
    report["runs"] = runs
    report["slurm_probe"] = probe
    report["summary"] = {
        "snakemake_s": smk, "pool_s": pool, "ratio": rt, "overhead": (rt - 1.0) if rt else None,
        "snakemake_startup_s": startup,
        "overhead_without_startup": ((smk - startup) / pool - 1.0) if pool > 0 else None,
        "snakemake_cpu_s": smk_cpu, "pool_cpu_s": pool_cpu,
        "snakemake_own_cpu_s": smk_cpu - pool_cpu,
        "cpu_overhead": ((smk_cpu / pool_cpu) - 1.0) if pool_cpu > 0 else None,
        # on a shared machine other work slows single runs down; the fastest run of each
        # side, and Snakemake's CPU taken pairwise (run r of both sides, back to back), are
        # the figures least disturbed by it
        "snakemake_min_s": smk_min, "pool_min_s": pool_min,
        "overhead_min": (smk_min / pool_min - 1.0) if pool_min > 0 else None,
        "overhead_min_without_startup": ((smk_min - startup) / pool_min - 1.0) if pool_min > 0 else None,
        "snakemake_own_cpu_paired_s": median(a["cpu_s"] - b["cpu_s"] for a, b in zip(runs["snakemake"], runs["pool"])),
        "target_overhead": TARGET_OVERHEAD, "seed_overhead": SEED_OVERHEAD,
    }
    report["summary"].update(_split(runs, cores))
    return report


def _split(runs: dict, cores: int) -> dict:
    """The overhead in two parts, from each job's own wall time (run r of both sides, paired).

    With ``J`` the sum of a run's job wall times and ``W`` its wall time, ``W - J / cores``
    is the time the cores were not running a job (start-up, scheduling, the end of the run
    and the last round's imbalance). ``snakemake / pool - 1`` is then the sum of
    ``(J_smk - J_pool) / cores / W_pool`` (the jobs themselves ran longer) and
    ``(idle_smk - idle_pool) / W_pool`` (Snakemake kept the cores idle longer). Medians over
    the runs; None where Snakemake's benchmark files are missing (a custom Snakefile)."""
    from . import median  # noqa: PLC0415

    pairs = [(a, b) for a, b in zip(runs["snakemake"], runs["pool"])
             if a.get("jobs_s") is not None and b.get("jobs_s") is not None and b["wall_s"] > 0]
    if not pairs:
        return {"snakemake_jobs_s": None, "pool_jobs_s": None, "snakemake_idle_s": None, "pool_idle_s": None,
                "overhead_jobs": None, "overhead_idle": None}
    idle = lambda r: r["wall_s"] - r["jobs_s"] / cores  # noqa: E731
    return {
        "snakemake_jobs_s": median(a["jobs_s"] for a, _ in pairs),
        "pool_jobs_s": median(b["jobs_s"] for _, b in pairs),
        "snakemake_idle_s": median(idle(a) for a, _ in pairs),
        "pool_idle_s": median(idle(b) for _, b in pairs),
        "overhead_jobs": median((a["jobs_s"] - b["jobs_s"]) / cores / b["wall_s"] for a, b in pairs),
        "overhead_idle": median((idle(a) - idle(b)) / b["wall_s"] for a, b in pairs),
    }


def _copies(movies: list, n: int) -> list:
    """Copies of the simulated movies (round robin) up to ``n`` movies in all, numbered on."""
    src = [Path(m) for m in movies]
    out = []
    for i in range(len(src), n):
        m = src[i % len(src)]
        dst = m.with_name(f"mic_{i + 1:04d}{m.suffix}")
        shutil.copyfile(m, dst)
        out.append(dst)
    return out


def _job_seconds(d: Path, jobs: list[dict], side: str) -> float | None:
    """Sum of the run's job wall times (s): Snakemake's benchmark files, or the pool's record."""
    if side == "pool":
        f = d / POOL_TIMES
        return sum(json.loads(f.read_text()).values()) if f.exists() else None
    total = 0.0
    for j in jobs:
        if not j["benchmark"]:
            return None
        try:
            lines = (d / j["benchmark"][0]).read_text().splitlines()
            total += float(lines[1].split("\t")[lines[0].split("\t").index("s")])
        except (OSError, ValueError, IndexError):
            return None
    return total


def _check_outputs(d: Path, jobs: list[dict]) -> None:
    missing = [f for j in jobs for f in j["output"] if not (d / f).exists()]
    if missing:
        raise RuntimeError(f"{len(missing)} outputs missing in {d}, e.g. {missing[0]}")


def format_report(report: dict) -> str:
    from . import fmt, table  # noqa: PLC0415

    p, s = report["params"], report["summary"]
    copies = p["movies"] - p.get("distinct", p["movies"])
    head = (f"{p['jobs']} jobs ({', '.join(p['rules'])}) of {p['movies']} movies "
            f"({p['size']}x{p['size']}x{p['frames']}{f'; {copies} copies of the simulated ones' if copies else ''}; "
            f"scheduler: {p.get('scheduler', 'workflow profile')}) on {p['cores']} "
            f"cores, median of {p['repeat']} run(s); {report['device']['cpu_model']}, {report['device']['nproc']} cores")
    if p.get("warm_memory_gib"):
        head += f"; {p['warm_memory_gib']:g} GiB of memory written and freed before every run"
    rows = [
        ["snakemake --cores", fmt(s["snakemake_s"]), fmt(s["snakemake_cpu_s"])],
        ["plain pool", fmt(s["pool_s"]), fmt(s["pool_cpu_s"])],
        ["snakemake --version", fmt(s["snakemake_startup_s"]), ""],
    ]
    ov = s["overhead"]
    lines = [head, "", table(rows, ["run", "wall s", "CPU s"]), "",
             f"overhead {fmt(None if ov is None else 100 * ov, '.1f')}% (target <= {100 * s['target_overhead']:.0f}%, "
             f"seed pipeline {100 * s['seed_overhead']:.0f}%); without Snakemake's start-up "
             f"{fmt(None if s['overhead_without_startup'] is None else 100 * s['overhead_without_startup'], '.1f')}%; "
             f"CPU used by Snakemake itself {fmt(s['snakemake_own_cpu_s'], '.1f')} s "
             f"({fmt(None if s['cpu_overhead'] is None else 100 * s['cpu_overhead'], '.1f')}% of the jobs' CPU)"]
    pct = lambda x: fmt(None if x is None else 100 * x, ".1f")  # noqa: E731
    if s.get("overhead_jobs") is not None:
        lines.append(
            f"of which: the jobs' own wall times, {fmt(s['snakemake_jobs_s'])} s in all under Snakemake against "
            f"{fmt(s['pool_jobs_s'])} s in the pool ({pct(s['overhead_jobs'])}%); cores left without a job "
            f"(start-up, scheduling, end), {fmt(s['snakemake_idle_s'])} s against {fmt(s['pool_idle_s'])} s "
            f"({pct(s['overhead_idle'])}%)")
    if p["repeat"] > 1:
        lines.append(f"fastest runs: snakemake {fmt(s['snakemake_min_s'])} s, pool {fmt(s['pool_min_s'])} s: "
                     f"overhead {pct(s['overhead_min'])}%, without start-up {pct(s['overhead_min_without_startup'])}%; "
                     f"Snakemake's own CPU, run by run: {fmt(s['snakemake_own_cpu_paired_s'], '.1f')} s (median)")
    probe = report.get("slurm_probe")
    if probe and probe["wall_s"] > 1.0:
        lines.append(f"note: `scontrol show config` took {probe['wall_s']:.1f} s here (no SLURM controller answering); "
                     "Snakemake's SLURM plug-in runs it at every start-up")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--pool":
        sys.exit(_pool_main(sys.argv[2:]))
    sys.exit("usage: python -m conveyor.bench.overhead --pool JOBS.json CORES WORKDIR")
