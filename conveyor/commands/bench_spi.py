"""``conveyor bench spi``: SPI pre-processing and EMC, native against spi_processing and Dragonfly.

See :mod:`conveyor.bench.spi` and docs/benchmarks.md.
"""

from __future__ import annotations

import sys


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _spi(args) -> int:
    from ..bench import write_report  # noqa: PLC0415
    from ..bench.spi import format_report, run_benchmark  # noqa: PLC0415

    report = run_benchmark(frames=args.frames, detector=args.detector, threads=args.threads,
                           iterations=args.iterations, num_div=args.num_div, peers=not args.no_peers, seed=args.seed,
                           workdir=args.workdir, keep=args.keep, argv=["conveyor", *sys.argv[1:]], log=_log)
    write_report(report, args.out)
    print(format_report(report))
    return 0


def register(group) -> None:
    p = group("bench").add_parser(
        "spi",
        help="native SPI hits/centre/size and EMC against spi_processing and Dragonfly on one simulated file",
        description="Simulate one CXI file with ground truth; run `conveyor spi hits|center|size` (each in its own "
        "process) and `conveyor tools spi-processing` on it (time, frames/s, peak memory, hit F1, diameter "
        "error), then EMC on the true single hits through `conveyor spi emc` and `conveyor tools dragonfly-emc` "
        "with the same num_div, iterations, threads and pixels (the largest circle inside the detector; seconds "
        "per iteration). Ratios are peer / ours.",
    )
    p.add_argument("--frames", type=int, default=400, help="simulated frames (default %(default)s)")
    p.add_argument("--detector", type=int, default=128, help="detector edge, px (default %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="threads for both sides (default %(default)s)")
    p.add_argument("--iterations", type=int, default=1, help="EMC iterations (default %(default)s)")
    p.add_argument("--num-div", type=int, default=4, help="EMC orientation grid refinement (default %(default)s)")
    p.add_argument("--out", default=None, help="write the report as JSON here")
    p.add_argument("--no-peers", action="store_true", help="run the native steps only")
    p.add_argument("--seed", type=int, default=0, help="simulation seed (default %(default)s)")
    p.add_argument("--workdir", default=None, help="work here (kept) instead of a temporary directory")
    p.add_argument("--keep", action="store_true", help="keep the temporary work directory")
    p.set_defaults(func=_spi)
