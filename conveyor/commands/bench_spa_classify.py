"""``conveyor bench spa-classify``: native 2D classification against RELION 3.1's.

See :mod:`conveyor.bench.spa_classify` and docs/benchmarks.md.
"""

from __future__ import annotations

import sys


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _spa_classify(args) -> int:
    from ..bench import write_report  # noqa: PLC0415
    from ..bench.spa_classify import format_report, run_benchmark  # noqa: PLC0415

    report = run_benchmark(particles=args.particles, box=args.box, classes=args.classes, iterations=args.iterations,
                           views=args.views, junk=args.junk, threads=args.threads, repeat=args.repeat,
                           relion=not args.no_relion, device=args.device, workdir=args.workdir, keep=args.keep,
                           seed=args.seed, relion_bin=args.relion_bin, argv=["conveyor", *sys.argv[1:]], log=_log)
    write_report(report, args.out)
    print(format_report(report))
    return 0


def register(group) -> None:
    p = group("bench").add_parser(
        "spa-classify",
        help="native 2D classification against RELION 3.1's on simulated particles with known views",
        description="Simulate particles of a protein-like model at a few views plus junk, classify them with "
        "`conveyor spa class2d` and with RELION 3.1's relion_refine (the command line of `conveyor tools "
        "relion-class2d`) with the same classes, iterations and threads, each in its own process. Prints wall and "
        "CPU time, particles/s, peak memory, the ratio RELION / ours, and accuracy against the truth (class "
        "purity, normalised mutual information, class resolution).",
    )
    p.add_argument("--particles", type=int, default=400, help="simulated particles (default %(default)s)")
    p.add_argument("--box", type=int, default=64, help="box, px at 3 Å/px (default %(default)s)")
    p.add_argument("--classes", type=int, default=6, help="classes K for both sides (default %(default)s)")
    p.add_argument("--iterations", type=int, default=5, help="iterations for both sides (default %(default)s)")
    p.add_argument("--views", type=int, default=6, help="distinct particle views simulated (default %(default)s)")
    p.add_argument("--junk", type=float, default=0.2, help="fraction of junk images (default %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="threads for both sides (default %(default)s)")
    p.add_argument("--repeat", type=int, default=1, help="runs of each side, alternating; medians (default 1)")
    p.add_argument("--out", default=None, help="write the report as JSON here")
    p.add_argument("--no-relion", action="store_true", help="run the native classification only")
    p.add_argument("--relion-bin", default=None, help="directory of the RELION programs (default: PATH)")
    p.add_argument("--seed", type=int, default=0, help="simulation and classification seed (default 0)")
    p.add_argument("--workdir", default=None, help="work here (kept) instead of a temporary directory")
    p.add_argument("--keep", action="store_true", help="keep the temporary work directory")
    p.set_defaults(func=_spa_classify)
