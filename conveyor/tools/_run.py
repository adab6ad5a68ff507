"""Run an external tool, keep its output, and turn a failure into one clear error line.

Every peer-tool adapter (RELION, MotionCor2, CTFFIND4, Gautomatch) runs its program through
:func:`run_tool`. The tool's stdout and stderr go, merged, to a log file; when the program
exits with a non-zero status, or exits 0 without writing the files it should have written,
:class:`ToolError` (an :class:`~conveyor.errors.InputError`) is raised naming the input file,
the tool, the exit status and the last lines of the log, so the CLI prints one line such as::

    conveyor: error: movies/m1.tif: relion_run_motioncorr failed (exit status 1); last lines of
    its output: ERROR: ... -- full log: results/.../relion.log; check the input and the parameters

Container tools run as ``apptainer exec [--nv] [--bind DIRS] IMAGE PROGRAM ARGS``
(:func:`apptainer_command`); :func:`require_apptainer` says clearly when Apptainer (or
Singularity) or the image is missing.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from ..errors import InputError

#: Lines of a tool's output that carry no information (RELION's progress bar, the missing
#: ghostscript RELION calls for its PDF summary). Left out of error messages and echoes.
_NOISE = ('~~(,_,">', "gs: not found", "ERROR in executing: gs ", "Will make an empty PDF-file")


class ToolError(InputError):
    """An external tool failed on an input file (printed as one line by the CLI, exit status 2)."""

    def __init__(self, path, problem: str, fix: str | None = None, *, log: str = "", log_path=None):
        super().__init__(path, problem, fix)
        self.log = log
        self.log_path = None if log_path is None else os.fspath(log_path)


def format_command(cmd) -> str:
    """A command list as a shell-quoted line (what ``--dry-run`` prints)."""
    return shlex.join(str(c) for c in cmd)


_BACKTRACE_RE = re.compile(r"^(=== Backtrace\s*===|=+|\S+\(\S*\+0x[0-9a-f]+\) \[0x[0-9a-f]+\])$")


def clean_lines(text: str) -> list[str]:
    """The informative lines of a tool's output (progress bars, ghostscript noise and backtraces removed)."""
    out = []
    for line in text.replace("\r", "\n").splitlines():
        s = line.strip()
        if not s or any(n in s for n in _NOISE) or _BACKTRACE_RE.match(s):
            continue
        out.append(s)
    return out


def log_tail(text: str, n: int = 12) -> str:
    """The last ``n`` informative lines of ``text`` joined by `` | `` (one line)."""
    lines = clean_lines(text)
    return " | ".join(lines[-n:]) if lines else "(no output)"


def which(name: str, bin_dir=None) -> str | None:
    """Path of executable ``name``: in ``bin_dir`` when given, else on ``PATH``."""
    if bin_dir:
        cand = Path(bin_dir) / name
        return str(cand) if cand.is_file() and os.access(cand, os.X_OK) else None
    return shutil.which(name)


def require_executable(name: str, *, bin_dir=None, fix: str) -> str:
    """Path of executable ``name`` or :class:`InputError` saying how to get it."""
    exe = which(name, bin_dir)
    if exe is None:
        where = f"in {bin_dir}" if bin_dir else "on PATH"
        raise InputError(name, f"executable not found {where}", fix)
    return exe


def _option_groups(tokens) -> list[list[str]]:
    groups: list[list[str]] = []
    for tok in tokens:
        if _OPTION_RE.match(tok) or not groups:
            groups.append([tok])
        else:
            groups[-1].append(tok)
    return groups


_OPTION_RE = re.compile(r"^--?[A-Za-z]")


def merge_options(options, extra) -> list[str]:
    """``options`` followed by ``extra``; an option given in both keeps only ``extra``'s values.

    Options are tokens starting with ``-`` or ``--`` and a letter (so ``-1`` is a value);
    each takes the tokens up to the next option as its values. Used for the ``--extra``
    arguments of the container tools, so users can override what the adapter sets.
    """
    options = [str(t) for t in options]
    extra = [str(t) for t in extra]
    if not extra:
        return options
    given = {g[0] for g in _option_groups(extra) if _OPTION_RE.match(g[0])}
    kept = [g for g in _option_groups(options) if g[0] not in given]
    return [t for g in kept for t in g] + extra


# --------------------------------------------------------------------------- containers


def find_apptainer(explicit: str | None = None) -> str | None:
    """The container runtime: ``explicit`` if given (name or path), else apptainer, else singularity."""
    if explicit:
        return shutil.which(explicit) or (explicit if Path(explicit).is_file() else None)
    return shutil.which("apptainer") or shutil.which("singularity")


def apptainer_command(image, argv, *, nv: bool = False, binds=(), runtime: str = "apptainer",
                      env: dict | None = None) -> list[str]:
    """``[runtime, "exec", ("--nv"), ("--bind", "d1,d2"), ("--env", "K=V"), image, *argv]``.

    ``binds`` are host directories made visible at the same path inside the container
    (duplicates, sub-directories of others and ``/`` are dropped; order kept).
    """
    cmd = [runtime, "exec"]
    if nv:
        cmd.append("--nv")
    dirs = _bind_dirs(binds)
    if dirs:
        cmd += ["--bind", ",".join(dirs)]
    for key, value in (env or {}).items():
        cmd += ["--env", f"{key}={value}"]
    cmd.append(str(image))
    cmd += [str(a) for a in argv]
    return cmd


def _bind_dirs(binds) -> list[str]:
    dirs: list[str] = []
    for d in binds:
        if d is None:
            continue
        p = os.path.abspath(os.fspath(d))
        if p == os.sep:
            continue
        if any(p == q or p.startswith(q.rstrip(os.sep) + os.sep) for q in dirs):
            continue
        dirs = [q for q in dirs if not q.startswith(p.rstrip(os.sep) + os.sep)]
        dirs.append(p)
    return dirs


def require_apptainer(image, tool: str, input_path, runtime: str | None = None) -> str:
    """Path of the container runtime; :class:`InputError` if it or the image is missing."""
    exe = find_apptainer(runtime)
    img = Path(image)
    if exe is None:
        raise InputError(
            input_path,
            f"running {tool} needs Apptainer (or Singularity) and the image {image}, but "
            + (f"the runtime {runtime} was not found" if runtime else "neither apptainer nor singularity is on PATH"),
            f"run on a machine with Apptainer (module load apptainer), or pass --dry-run to print the {tool} command",
        )
    if not img.is_file():
        raise InputError(
            img,
            f"{tool} container image does not exist",
            f"build it (see containers/{tool.lower()}.def and docs/tools.md) and pass its path with --image",
        )
    return exe


# --------------------------------------------------------------------------- running


def run_tool(cmd, *, tool: str, input_path, cwd=None, log_path=None, stdin_text: str | None = None,
             env: dict | None = None, timeout: float | None = None, expect=(), echo: bool = True,
             fix: str | None = None) -> str:
    """Run ``cmd``; return its merged stdout+stderr; raise :class:`ToolError` on failure.

    Parameters
    ----------
    cmd : list
        Program and arguments (no shell).
    tool : str
        Name used in messages (e.g. ``"relion_run_motioncorr"``).
    input_path
        The user's input file, named first in the error message.
    cwd : path, optional
        Working directory (RELION runs inside its temporary project directory).
    log_path : path, optional
        Where to keep the tool's output (written even when it fails).
    stdin_text : str, optional
        Text fed to the program's standard input (CTFFIND's answers).
    env : dict, optional
        Extra environment variables.
    timeout : float, optional
        Seconds before the program is killed (then a ToolError too).
    expect : iterable of paths
        Files the tool must have written; a missing one after exit status 0 is an error.
    echo : bool
        Copy the informative lines of the output to our stdout (the workflow's rule log).
    fix : str, optional
        What to tell the user on failure (default: check the input and parameters).
    """
    cmd = [str(c) for c in cmd]
    full_env = None
    if env:
        full_env = dict(os.environ)
        full_env.update({k: str(v) for k, v in env.items()})
    if echo:
        print(f"[{tool}] {format_command(cmd)}", flush=True)
    where = f"; full log: {log_path}" if log_path else ""
    hint = fix or "check the input file and the parameters"
    try:
        proc = subprocess.run(
            cmd, cwd=cwd, env=full_env, input=stdin_text, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, errors="replace", timeout=timeout, check=False,
        )
        text, rc = proc.stdout or "", proc.returncode
    except FileNotFoundError as exc:
        raise ToolError(input_path, f"cannot start {tool}: {exc.strerror or exc}",
                        "install the tool or give its location") from None
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout or ""
        text = out.decode(errors="replace") if isinstance(out, bytes) else out
        _write_log(log_path, cmd, text)
        raise ToolError(input_path, f"{tool} did not finish within {timeout:g} s; last lines of its output: "
                        f"{log_tail(text)}", f"{hint}{where}", log=text, log_path=log_path) from None
    _write_log(log_path, cmd, text)
    if echo:
        for line in clean_lines(text):
            print(f"[{tool}] {line}")
        sys.stdout.flush()
    if rc != 0:
        status = f"killed by signal {-rc}" if rc < 0 else f"exit status {rc}"
        raise ToolError(input_path, f"{tool} failed ({status}); last lines of its output: {log_tail(text)}",
                        f"{hint}{where}", log=text, log_path=log_path)
    missing = [os.fspath(p) for p in expect if not Path(p).exists()]
    if missing:
        raise ToolError(input_path, f"{tool} finished but did not write {', '.join(missing)}; last lines of its "
                        f"output: {log_tail(text)}", f"{hint}{where}", log=text, log_path=log_path)
    return text


def _write_log(log_path, cmd, text: str) -> None:
    if not log_path:
        return
    p = Path(log_path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(f"$ {format_command(cmd)}\n{text}")
