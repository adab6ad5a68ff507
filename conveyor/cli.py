"""The ``conveyor`` command-line interface.

``conveyor <group> <command> [options]``, for example ``conveyor simulate spa --out DIR``,
``conveyor spa motion MOVIE ...``, ``conveyor spi hits SHOTS.cxi ...``.

Commands live in :mod:`conveyor.commands`: every module there defines
``register(group)``, where ``group(name)`` returns the sub-parser collection of a
command group (created on first use). Bad input raises
:class:`conveyor.errors.InputError`, which is printed as one line
(``conveyor: error: <file>: <problem> -- <fix>``) with exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys

from . import __version__, backend
from .errors import InputError

GROUP_HELP = {
    "simulate": "make data sets with known ground truth",
    "io": "inspect, validate and convert files (MRC, TIFF, STAR, CXI)",
    "spa": "cryo-EM single-particle analysis steps",
    "spi": "XFEL single-particle imaging steps",
    "select": "write class-selection files for the checkpoints",
    "bench": "benchmarks: native steps against peer tools on the same data",
    "config": "validate and document experiment configs",
    "tools": "run peer tools (RELION, MotionCor2, CTFFIND4, Gautomatch, spi_processing, spi_em_class, Dragonfly) with our file contracts",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="conveyor",
        description="Single-particle cryo-EM and XFEL processing, from raw data to 3D.",
    )
    parser.add_argument("--version", action="version", version=f"conveyor {__version__}")
    parser.add_argument(
        "--device",
        choices=backend.DEVICES,
        default=None,
        help="numpy (cpu) or cupy (gpu); default: $CONVEYOR_DEVICE or auto",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads of this process (BLAS, FFT workers, peer tools); default: every core it may run on",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="print progress details")
    top = parser.add_subparsers(dest="group", metavar="GROUP", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}

    def group(name: str):
        if name not in groups:
            gp = top.add_parser(name, help=GROUP_HELP.get(name, name), description=GROUP_HELP.get(name))
            groups[name] = gp.add_subparsers(dest="command", metavar="COMMAND", required=True)
        return groups[name]

    for name in sorted(GROUP_HELP):
        group(name)
    from . import commands

    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        if hasattr(module, "register"):
            module.register(group)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        backend.set_device(args.device)
        backend.set_threads(args.threads)
        backend.keep_freed_memory()
        func = getattr(args, "func", None)
        if func is None:
            parser.error("no command given")
        import scipy.fft  # noqa: PLC0415

        with scipy.fft.set_workers(backend.threads()):
            result = func(args)
    except InputError as exc:
        print(f"conveyor: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("conveyor: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
