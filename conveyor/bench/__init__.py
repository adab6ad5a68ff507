"""Benchmarks: native steps against peer tools, Snakemake's DAG and its run-time overhead.

* :mod:`conveyor.bench.spa_preprocess` — one simulated movie through the native motion
  correction, CTF estimation, LoG picking and extraction, and through RELION 3.1's
  equivalents, on the same data with the same threads: seconds per movie, their ratio,
  peak memory and accuracy against the simulator's truth.
* :mod:`conveyor.bench.dag` — ``snakemake -n`` over many placeholder movies: time of the
  dry run and the number of SLURM jobs the cluster profile would submit.
* :mod:`conveyor.bench.overhead` — the same per-movie command lines run by Snakemake and
  by a plain process pool with the same parallelism: Snakemake's overhead.

Every measured program runs as its own process, timed by the wall clock around it, with its
CPU time and peak resident memory taken from ``wait4`` (so they belong to that process and
its children only). On a shared machine the wall times of concurrent work vary; the CPU
times do much less, so both are reported. Ratios are always formed within one run, on the
same data and the same number of threads; nothing here compares against fixed seconds.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

#: Environment variables that cap the threads of numeric libraries in a child process.
THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS",
              "VECLIB_MAXIMUM_THREADS")


@dataclass
class Measurement:
    """One process run: wall time (s), CPU time of the process and its children (s), peak RSS (MiB)."""

    cmd: list
    wall_s: float
    cpu_s: float
    maxrss_mib: float
    returncode: int
    stdout: str = ""
    stderr: str = ""
    extra: dict = field(default_factory=dict)

    def check(self, what: str) -> "Measurement":
        if self.returncode != 0:
            tail = "\n".join((self.stderr or self.stdout).strip().splitlines()[-15:])
            raise RuntimeError(f"{what} failed (exit {self.returncode}): {shlex.join(map(str, self.cmd))}\n{tail}")
        return self

    def summary(self) -> dict:
        d = asdict(self)
        for key in ("stdout", "stderr", "cmd"):
            d.pop(key)
        return d


def thread_env(threads: int, base: dict | None = None) -> dict:
    """A copy of the environment with the numeric libraries capped at ``threads`` threads."""
    env = dict(os.environ if base is None else base)
    for key in THREAD_ENV:
        env[key] = str(int(threads))
    return env


#: Runs one command and reports it (``python -S -c LAUNCHER OUT.json CMD...``). It is a small
#: process: a child forked straight from a big one (this benchmark, with numpy loaded) would
#: start with the parent's resident set as its peak, since Linux keeps the high-water mark
#: of the address space it replaces at exec; forked from this one, it starts near 10 MiB.
_LAUNCHER = r"""
import json, os, subprocess, sys, time
out, cmd = sys.argv[1], sys.argv[2:]
t0 = time.perf_counter()
try:
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
except OSError as exc:
    json.dump({"error": str(exc)}, open(out, "w"))
    sys.exit(127)
_, status, ru = os.wait4(proc.pid, 0)
wall = time.perf_counter() - t0
proc.returncode = rc = os.waitstatus_to_exitcode(status)
json.dump({"wall_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime, "maxrss_kib": ru.ru_maxrss, "rc": rc}, open(out, "w"))
sys.exit(0)
"""


def run_measured(cmd, *, cwd=None, env=None, stdout_path=None, timeout: float | None = None) -> Measurement:
    """Run ``cmd`` and measure it: wall clock around the process, ``wait4`` for CPU time and peak RSS.

    ``ru_maxrss`` from ``wait4`` is the largest resident set of the process or of any one of
    its descendants that it waited for (Linux reports it in KiB). The command is started by a
    small launcher process (see ``_LAUNCHER``) so that the peak is the command's own. stdout
    and stderr go to files (``stdout_path`` keeps stdout), so a chatty program cannot block
    on a full pipe.
    """
    import tempfile  # noqa: PLC0415

    cmd = [str(c) for c in cmd]
    fd, stats = tempfile.mkstemp(prefix="conveyor-bench-", suffix=".json")
    os.close(fd)
    try:
        with tempfile.TemporaryFile("w+b") as err, (open(stdout_path, "w+b") if stdout_path else
                                                    tempfile.TemporaryFile("w+b")) as out:
            t0 = time.perf_counter()
            proc = subprocess.Popen([sys.executable, "-S", "-c", _LAUNCHER, stats, *cmd], cwd=cwd, env=env,
                                    stdout=out, stderr=err, stdin=subprocess.DEVNULL, start_new_session=True)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the launcher's session: it and the command
                proc.wait()
            outer = time.perf_counter() - t0
            out.seek(0)
            err.seek(0)
            text_out = out.read().decode(errors="replace")
            text_err = err.read().decode(errors="replace")
        try:
            r = json.loads(Path(stats).read_text())
        except (OSError, ValueError):
            r = {"error": f"the launcher exited with {proc.returncode}"
                          + (f" (killed after {timeout:g} s)" if timeout and outer >= timeout else "")}
    finally:
        Path(stats).unlink(missing_ok=True)
    if "error" in r:
        return Measurement(cmd, outer, math.nan, math.nan, 127, text_out, f"{text_err}\n{r['error']}")
    return Measurement(cmd, r["wall_s"], r["cpu_s"], r["maxrss_kib"] / 1024.0, r["rc"], text_out, text_err)


def slurm_probe() -> dict | None:
    """How long ``scontrol show config`` takes (None without scontrol).

    Snakemake's SLURM executor plug-in runs it when it is imported, which happens on every
    ``snakemake`` start (plug-ins are discovered eagerly), with a 10 s time-out: on a machine
    with SLURM's client tools but no reachable controller, every Snakemake start-up pays it.
    """
    import shutil  # noqa: PLC0415

    exe = shutil.which("scontrol")
    if exe is None:
        return None
    m = run_measured([exe, "show", "config"], timeout=15)
    return {"wall_s": m.wall_s, "ok": m.returncode == 0}


def median(values) -> float:
    v = sorted(float(x) for x in values)
    if not v:
        return math.nan
    m = len(v) // 2
    return v[m] if len(v) % 2 else 0.5 * (v[m - 1] + v[m])


def ratio(num, den):
    """``num / den`` when both are positive and finite, else None."""
    try:
        num, den = float(num), float(den)
    except (TypeError, ValueError):
        return None
    if not (math.isfinite(num) and math.isfinite(den)) or num <= 0 or den <= 0:
        return None
    return num / den


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(device: str | None = None) -> dict:
    """The machine: CPU model, core counts, memory, and the GPU when the native steps use one."""
    info = {
        "hostname": platform.node(),
        "cpu_model": cpu_model(),
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    try:
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["mem_total_gib"] = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    from .. import backend  # noqa: PLC0415

    if device is None:
        device = "gpu" if backend.gpu_available() else "cpu"
    info["device"] = device
    if device == "gpu":
        backend.set_device("gpu")
        try:
            info["gpu"] = backend.describe()
        finally:
            backend.set_device(None)
    return info


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds")


def new_report(name: str, argv=None) -> dict:
    """The common head of every report: benchmark name, date, command line."""
    argv = sys.argv if argv is None else argv
    return {"benchmark": name, "date": now_iso(), "command": shlex.join(map(str, argv))}


def write_report(report: dict, path) -> None:
    if path is None:
        return
    from ..io.atomic import write_text  # noqa: PLC0415

    write_text(Path(path), json.dumps(report, indent=2, default=_json_default) + "\n")


def _json_default(o):
    try:
        import numpy as np  # noqa: PLC0415

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:
        pass
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def fmt(value, spec: str = ".2f", none: str = "-") -> str:
    if value is None:
        return none
    if isinstance(value, str):
        return value
    try:
        if not math.isfinite(float(value)):
            return none
    except (TypeError, ValueError):
        return str(value)
    return format(value, spec)


def table(rows, headers) -> str:
    """A plain-text table (columns padded, first column left-aligned, the rest right-aligned)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for k, r in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
