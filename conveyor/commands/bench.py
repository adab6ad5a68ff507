"""``conveyor bench spa-preprocess | dag | overhead``: benchmarks (see :mod:`conveyor.bench`, docs/benchmarks.md).

Each prints a table and, with ``--out``, writes the whole report as JSON. Times are measured
as ratios within one run (ours against the reference on the same data with the same
threads), never against fixed thresholds.
"""

from __future__ import annotations

import sys


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _spa_preprocess(args) -> int:
    from ..bench import write_report  # noqa: PLC0415
    from ..bench.spa_preprocess import format_report, run_benchmark  # noqa: PLC0415

    report = run_benchmark(size=args.size, frames=args.frames, threads=args.threads, repeat=args.repeat,
                           relion=not args.no_relion, device=args.device, workdir=args.workdir, keep=args.keep,
                           seed=args.seed, relion_bin=args.relion_bin, steps=args.steps,
                           argv=["conveyor", *sys.argv[1:]], log=_log)
    write_report(report, args.out)
    print(format_report(report))
    return 0


def _dag(args) -> int:
    from ..bench import write_report  # noqa: PLC0415
    from ..bench.dag import format_report, run_benchmark  # noqa: PLC0415

    report = run_benchmark(movies=args.movies, profile=args.profile, snakefile=args.snakefile,
                           include=args.include, targets=args.target, workdir=args.workdir, keep=args.keep,
                           profile_python=args.profile_python, plain=not args.no_plain,
                           argv=["conveyor", *sys.argv[1:]], log=_log)
    write_report(report, args.out)
    print(format_report(report))
    return 0


def _overhead(args) -> int:
    from ..bench import write_report  # noqa: PLC0415
    from ..bench.overhead import format_report, run_benchmark  # noqa: PLC0415

    report = run_benchmark(movies=args.movies, cores=args.cores, size=args.size, frames=args.frames,
                           repeat=args.repeat, distinct=args.distinct, scheduler=args.scheduler,
                           snakefile=args.snakefile, include=args.include, targets=args.target,
                           until=args.until, workdir=args.workdir, keep=args.keep, seed=args.seed,
                           warm_memory_gib=args.warm_memory, argv=["conveyor", *sys.argv[1:]], log=_log)
    write_report(report, args.out)
    print(format_report(report))
    return 0


def _workflow_args(p) -> None:
    p.add_argument("--snakefile", default=None, help="Snakefile (default: the repository's)")
    p.add_argument("--include", action="append", default=[], metavar="RULES.smk",
                   help="also include this rule file (for rules the Snakefile does not include yet); repeatable")
    p.add_argument("--target", action="append", default=[], metavar="RULE_OR_FILE",
                   help="target rule or file (default: the Snakefile's default target); repeatable")


def register(group) -> None:
    g = group("bench")

    p = g.add_parser(
        "spa-preprocess",
        help="native motion/CTF/picking/extraction against RELION 3.1 on one simulated movie",
        description="Simulate one movie with ground truth, run the native steps (motion with 5x5 patches, CTF on "
        "the non-dose-weighted sum, LoG picking, extraction at bin 4) and RELION 3.1's equivalents "
        "(relion_run_motioncorr --use_own, relion_autopick --LoG, relion_preprocess --extract) on the same data "
        "with the same threads, each step in its own process. Prints seconds per movie, the ratio "
        "relion/ours, peak memory and accuracy against the truth (drift RMSE, pick F1, defocus error).",
    )
    p.add_argument("--size", type=int, default=None, help="movie size in px (default 4096 on a GPU, 1024 on a CPU)")
    p.add_argument("--frames", type=int, default=None, help="frames (default 40 on a GPU, 20 on a CPU)")
    p.add_argument("--threads", type=int, default=1, help="threads for both sides (default 1)")
    p.add_argument("--repeat", type=int, default=1, help="runs of every step; the median is reported (default 1)")
    p.add_argument("--out", default=None, help="write the report as JSON here")
    p.add_argument("--no-relion", action="store_true", help="run the native steps only")
    p.add_argument("--relion-bin", default=None, help="directory of the RELION programs (default: PATH)")
    p.add_argument("--seed", type=int, default=0, help="simulation seed (default 0)")
    p.add_argument("--workdir", default=None, help="work here (kept) instead of a temporary directory")
    p.add_argument("--keep", action="store_true", help="keep the temporary work directory")
    p.add_argument("--steps", default=None,
                   help="run only the first steps, e.g. 'motion' or 'motion,ctf' (default all four)")
    p.set_defaults(func=_spa_preprocess)

    p = g.add_parser(
        "dag",
        help="time `snakemake -n` over many placeholder movies and count the SLURM jobs of a profile",
        description="Create empty .mrc files (the dry run does not read them) and a config pointing at them, time "
        "`snakemake -n` over the workflow, and count the SLURM jobs the profile would submit with its job "
        "grouping (group jobs from the dry run, checked against the DAG's components).",
    )
    p.add_argument("--movies", type=int, default=10000, help="placeholder movies (default 10000)")
    p.add_argument("--profile", default="mesocentre",
                   help="cluster profile: a name under profiles/ or a path (default mesocentre); 'none' to skip")
    p.add_argument("--profile-python", action="store_true",
                   help="also run the plain dry run under cProfile and list the hottest functions")
    p.add_argument("--no-plain", action="store_true", help="skip the dry run without the cluster profile")
    _workflow_args(p)
    p.add_argument("--out", default=None, help="write the report as JSON here")
    p.add_argument("--workdir", default=None, help="work here (kept) instead of a temporary directory")
    p.add_argument("--keep", action="store_true", help="keep the temporary work directory")
    p.set_defaults(func=_dag)

    p = g.add_parser(
        "overhead",
        help="Snakemake's overhead: the same command lines through Snakemake and through a plain process pool",
        description="Simulate D movies and copy them to N, run the per-movie preprocessing (up to each movie's "
        "extracted particles) through `snakemake --cores C` (config without a simulation section, every job on one thread) "
        "and the very command lines Snakemake printed (`snakemake -n -p`) through a pool of C workers, one movie's "
        "jobs after the other per worker. Prints both wall times and the overhead (snakemake / pool - 1), split "
        "into the jobs' own time and the time the cores had no job.",
    )
    p.add_argument("--movies", type=int, default=32,
                   help="movies (default 32: with the default size, about two minutes per run on two cores, so "
                   "that Snakemake's start-up weighs about what it weighs on a real data set)")
    p.add_argument("--distinct", type=int, default=4,
                   help="simulate only this many movies; the others are copies of them, each its own file "
                   "(default 4)")
    p.add_argument("--scheduler", choices=["greedy", "ilp"], default=None,
                   help="Snakemake's job scheduler (default: the workflow profile's, greedy)")
    p.add_argument("--cores", type=int, default=2, help="parallel jobs for both (default 2)")
    p.add_argument("--size", type=int, default=2048, help="movie size in px (default 2048)")
    p.add_argument("--frames", type=int, default=40, help="frames per movie (default 40)")
    p.add_argument("--repeat", type=int, default=1, help="runs of each (alternating); medians reported (default 1)")
    p.add_argument("--seed", type=int, default=0, help="simulation seed (default 0)")
    p.add_argument("--warm-memory", type=float, default=0.0, metavar="GIB",
                   help="before every measured run, write and free this much memory in another process, so "
                   "that both sides start from the same memory state (default 0: off)")
    _workflow_args(p)
    p.add_argument("--until", action="append", default=[], metavar="RULE",
                   help="run the jobs up to this rule (snakemake --until; ignored with --target; default: "
                   "every movie's extracted particles); every job must be a shell command; repeatable")
    p.add_argument("--out", default=None, help="write the report as JSON here")
    p.add_argument("--workdir", default=None, help="work here (kept) instead of a temporary directory")
    p.add_argument("--keep", action="store_true", help="keep the temporary work directory")
    p.set_defaults(func=_overhead)
