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


#: Global options that take a value (skipped when looking for the group and command in argv).
_VALUE_OPTIONS = ("--device", "--threads")


def _requested(argv) -> tuple[str | None, str | None]:
    """(group, command) named on the command line ``argv`` (None where absent)."""
    words, skip = [], False
    for tok in argv:
        if skip:
            skip = False
        elif tok in _VALUE_OPTIONS:
            skip = True
        elif not tok.startswith("-"):
            words.append(tok)
            if len(words) == 2:
                break
    words += [None, None]
    return words[0], words[1]


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser of ``conveyor``; with ``argv``, only what parsing that command line needs.

    Every module of :mod:`conveyor.commands` registers its commands. Importing them all costs
    ~0.1 s, more than some commands take, so for a command line naming a group
    (``conveyor spa motion ...``) the modules named after the group (``spa``, ``spa_*``) are
    imported first, and the others only when the command is not among theirs (or for help).
    """
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

    names = sorted(info.name for info in pkgutil.iter_modules(commands.__path__))
    wanted, command = _requested(argv) if argv is not None else (None, None)
    wanted = wanted if wanted in groups else None
    first = [n for n in names if wanted and (n == wanted or n.startswith(wanted + "_"))]
    for name in first:
        _register(f"{commands.__name__}.{name}", group)
    if not first or command is None or command not in groups[wanted].choices:
        for name in names:
            if name not in first:
                _register(f"{commands.__name__}.{name}", group)
    return parser


def _register(module_name: str, group) -> None:
    module = importlib.import_module(module_name)
    if hasattr(module, "register"):
        module.register(group)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
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
