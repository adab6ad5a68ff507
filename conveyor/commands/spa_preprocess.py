"""``conveyor spa preprocess``: a movie's preprocessing steps, one after the other, in one process.

    conveyor spa preprocess ::: LOG conveyor ARGS... ::: LOG conveyor ARGS... ...

Each step, after ``:::``, is the file its output goes to and a ``conveyor`` command line as it
would be typed (``conveyor io validate-movie ...``, ``conveyor --device gpu spa motion ...``,
``conveyor tools relion-autopick ...``). The step runs through the same parser and command
functions as that command line (:func:`conveyor.cli.main`), so it does exactly what the
separate command does; only Python's start-up, the imports and (on a GPU) the device context
are shared. A step's standard output and error, including those of programs it starts, go to
its log, which is emptied first (as ``conveyor ... > LOG 2>&1``).

The steps run in the order given; the first that fails stops the run, and its exit status is
the command's (2 for bad input, with the one-line message in that step's log). This is the
per-movie job of the SPA workflow: validation, motion correction, CTF, picking, extraction.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from pathlib import Path

from ..errors import InputError

SEPARATOR = ":::"


def parse_steps(tokens: list[str]) -> list[tuple[str, list[str]]]:
    """``[':::', LOG, 'conveyor', args..., ':::', ...]`` -> ``[(LOG, [args...]), ...]``."""
    fix = "write each step as '::: LOG conveyor COMMAND ...'"
    if not tokens:
        raise InputError("spa preprocess", "no step given", fix)
    if tokens[0] != SEPARATOR:
        raise InputError("spa preprocess", f"expected '{SEPARATOR}' before the first step, got {tokens[0]!r}", fix)
    steps, current = [], None
    for tok in tokens:
        if tok == SEPARATOR:
            current = []
            steps.append(current)
        else:
            current.append(tok)
    out = []
    for i, step in enumerate(steps, 1):
        if len(step) < 3 or step[1] != "conveyor":
            raise InputError("spa preprocess", f"step {i} is not 'LOG conveyor COMMAND ...': {' '.join(step)!r}", fix)
        out.append((step[0], step[2:]))
    return out


def run_step(argv: list[str], log_path: str) -> int:
    """Run ``conveyor ARGV`` in this process with stdout and stderr (file descriptors 1 and 2) in ``log_path``."""
    from ..cli import main  # noqa: PLC0415

    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    streams = sys.stdout, sys.stderr
    for stream in streams:
        stream.flush()
    saved = os.dup(1), os.dup(2)
    try:
        with open(log_path, "wb", buffering=0) as log:
            # file descriptors for programs the step starts and for C code; the Python
            # streams on them (sys.stdout may be another object, e.g. under a test runner)
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            sys.stdout = open(1, "w", buffering=1, closefd=False, encoding="utf-8", errors="replace")  # noqa: SIM115
            sys.stderr = open(2, "w", buffering=1, closefd=False, encoding="utf-8", errors="replace")  # noqa: SIM115
            # each step configures logging from its own -v, as a process of its own would
            for handler in list(logging.root.handlers):
                logging.root.removeHandler(handler)
            try:
                rc = main(argv)
            except SystemExit as exc:  # argparse on a bad command line
                if exc.code is None or isinstance(exc.code, int):
                    rc = exc.code or 0
                else:
                    print(exc.code, file=sys.stderr)
                    rc = 1
            except Exception:  # noqa: BLE001 -- a crash is reported in the step's log, as by a process of its own
                traceback.print_exc()
                rc = 1
            finally:
                sys.stdout.close()
                sys.stderr.close()
    finally:
        sys.stdout, sys.stderr = streams
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])
        for handler in list(logging.root.handlers):
            logging.root.removeHandler(handler)
    return rc


def _preprocess(args) -> int:
    steps = parse_steps(args.steps)
    for i, (log_path, argv) in enumerate(steps, 1):
        rc = run_step(argv, log_path)
        if rc != 0:
            print(f"conveyor: error: step {i} of {len(steps)} failed with exit status {rc}; its log: {log_path}",
                  file=sys.stderr)
            return rc
    return 0


def register(group) -> None:
    p = group("spa").add_parser(
        "preprocess",
        help="run a movie's preprocessing steps (conveyor command lines, each with its log) in one process",
        description="Run conveyor command lines one after the other in this process, each with its output in its "
        "own log: '::: LOG conveyor COMMAND ... ::: LOG conveyor COMMAND ...'. Each step does what the same "
        "command line does on its own; the Python start-up and imports are paid once. The first failing step "
        "stops the run with its exit status.",
    )
    p.add_argument("steps", nargs="...", metavar="::: LOG conveyor COMMAND ...",
                   help="steps, each introduced by ':::'")
    p.set_defaults(func=_preprocess)
