"""The one switch between numpy (CPU) and cupy (GPU).

Every numeric kernel in Conveyor takes its array module from here::

    from conveyor import backend
    xp = backend.xp()                 # module for the selected device
    a = backend.asarray(host_array)   # move to the selected device
    xp = backend.array_module(a)      # module that owns an existing array
    host = backend.to_host(a)         # always a numpy.ndarray

The device is chosen, in order of precedence, by :func:`set_device` (the CLI's
``--device`` option, fed from the config key ``device``), then the environment
variable ``CONVEYOR_DEVICE``, then ``auto``. ``auto`` uses cupy only when it imports
and sees at least one CUDA device; ``gpu`` fails with a clear message when it cannot.
"""

from __future__ import annotations

import os
from functools import lru_cache

import numpy as np

from .errors import InputError

DEVICES = ("auto", "cpu", "gpu")
_requested: str | None = None


@lru_cache(maxsize=1)
def _cupy():
    """Return the cupy module if it imports and sees a CUDA device, else None."""
    try:
        import cupy  # noqa: PLC0415

        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None
        return cupy
    except Exception:  # ImportError, CUDA driver errors, ...
        return None


def gpu_available() -> bool:
    """True when cupy imports and at least one CUDA device is visible."""
    return _cupy() is not None


def set_device(device: str | None) -> None:
    """Select ``auto``, ``cpu`` or ``gpu`` for this process (None: back to the default)."""
    global _requested
    if device is not None and device not in DEVICES:
        raise InputError("device", f"unknown device {device!r}", f"use one of {', '.join(DEVICES)}")
    _requested = device


def requested_device() -> str:
    """The device asked for (``auto``, ``cpu`` or ``gpu``), before resolution."""
    dev = _requested or os.environ.get("CONVEYOR_DEVICE", "auto") or "auto"
    dev = dev.strip().lower()
    if dev not in DEVICES:
        raise InputError(
            "CONVEYOR_DEVICE", f"unknown device {dev!r}", f"set it to one of {', '.join(DEVICES)}"
        )
    return dev


def get_device() -> str:
    """The resolved device: ``cpu`` or ``gpu``."""
    dev = requested_device()
    if dev == "cpu":
        return "cpu"
    if gpu_available():
        return "gpu"
    if dev == "gpu":
        raise InputError(
            "device",
            "device 'gpu' was requested but cupy is not installed or sees no CUDA device",
            "install the GPU extra (pip install -e .[gpu]) on a GPU node, or set device: auto|cpu",
        )
    return "cpu"


def xp():
    """The array module (numpy or cupy) of the selected device."""
    return _cupy() if get_device() == "gpu" else np


def array_module(a):
    """The array module that owns ``a`` (cupy for cupy arrays, numpy otherwise)."""
    cp = _cupy()
    if cp is not None and isinstance(a, cp.ndarray):
        return cp
    return np


def asarray(a, dtype=None):
    """``a`` as an array on the selected device."""
    return xp().asarray(a, dtype=dtype)


def to_host(a):
    """``a`` as a numpy array (copies from the GPU when needed)."""
    cp = _cupy()
    if cp is not None and isinstance(a, cp.ndarray):
        return cp.asnumpy(a)
    return np.asarray(a)


def describe() -> str:
    """One line naming the resolved device, for logs."""
    if get_device() == "gpu":
        cp = _cupy()
        props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
        name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        return f"gpu ({name}, cupy {cp.__version__})"
    return f"cpu (numpy {np.__version__})"


# --------------------------------------------------------------------------- CPU threads
_threads: int | None = None


def set_threads(n: int | None) -> None:
    """Limit the CPU threads of this process to ``n`` (BLAS/OpenMP pools and the default
    ``scipy.fft`` workers); ``None`` keeps every core this process may run on.

    A scheduler gives a job a number of cores (SLURM ``--cpus-per-task``, Snakemake
    ``threads``); the workflow passes it as ``conveyor --threads N``.
    """
    global _threads
    if n is not None and int(n) < 1:
        raise InputError("--threads", f"must be at least 1, got {n}", "pass the number of CPU cores of the job")
    _threads = None if n is None else int(n)
    if _threads is not None:
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(_threads)  # for child processes (peer tools)
        try:
            from threadpoolctl import threadpool_limits  # noqa: PLC0415

            threadpool_limits(_threads)
        except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
            pass


def threads() -> int:
    """CPU threads this process should use: ``set_threads``, else the cores it may run on."""
    if _threads is not None:
        return _threads
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


# --------------------------------------------------------------------------- CPU memory
#: glibc ``mallopt`` parameters.
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def keep_freed_memory() -> bool:
    """Let this process reuse the memory of its freed large arrays (Linux with glibc).

    By default glibc serves every allocation above 32 MiB with a fresh ``mmap`` and returns
    it to the kernel on ``free``, so each large temporary (a stack of frame spectra, a
    work array of the alignment) is faulted in again page by page, and the kernel zeroes
    every page first. With ``M_MMAP_MAX = 0`` large blocks come from the heap instead, and
    with a 2 GiB ``M_TRIM_THRESHOLD`` freed blocks stay there for the next array: in the
    motion correction of a 4096² × 40 movie, the whole-frame alignment of a second call in
    the same process took 4.5 s instead of 11.4 s (see docs/benchmarks.md). The peak
    memory stays about the same (+2 % there); memory freed during a command is kept by
    the process until it ends.

    The command line calls it once at start; returns whether the setting took effect
    (False on other C libraries and systems, where nothing changes).
    """
    import ctypes  # noqa: PLC0415

    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the interpreter runs on
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
