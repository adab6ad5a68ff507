"""MotionCor2 (run from a user-supplied Apptainer image) as a peer tool for motion correction.

MotionCor2 is distributed as a binary that cannot be installed here; users build an
Apptainer image holding it (containers/motioncor2.def) and name it with ``--image``. This
module builds the exact command line, runs it, and converts MotionCor2's outputs to
Conveyor's motion contract (see docs/tools.md):

* ``<out>.mrc`` — aligned sum without dose weighting -> ``--out-sum-nodw``;
* ``<out>_DW.mrc`` — aligned, dose-weighted sum -> ``--out-sum``;
* the full-frame shift log -> ``data_global_shift`` of the shifts STAR file. Its name
  depends on the version: ``<LogFile>0-Full.log`` / ``<LogFile>0-Patch-Full.log`` (1.0–1.3,
  ``-LogFile PREFIX``), ``<LogDir>/<out>-Full.log`` / ``-Patch-Full.log`` (1.4 and later,
  MotionCor3). Format: ``#`` comment lines, then one line per frame: frame number (1-based),
  shift x, shift y (px);
* the patch log ``*-Patch-Patch.log`` (``#`` comments, blank lines, then per patch and frame:
  frame, patch centre x, y, shift x, y, and either fitted shift x, y (MotionCor2) or a
  bad-measurement flag (MotionCor3)) -> ``data_local_shift``.

Shift sign: RELION reads MotionCor2's full-frame shifts into ``rlnMicrographShiftX/Y``
unchanged (``MotioncorrRunner::getShiftsMotioncor2``), and MotionCor3 writes them unchanged
into its own RELION STAR file; they therefore follow RELION's convention, the shift applied
to a frame to align it. Conveyor stores where the frame content lies, so the adapter negates
them and refers them to frame 1 (MotionCor2's default reference is the central frame; the
command asks for ``-FmRef 0`` as RELION does, and the conversion subtracts frame 1's value
whatever the reference was).

Units: ``-PixSize`` Å/px, ``-FmDose``/``-InitDose`` e/Å², ``-kV`` kV; MotionCor2's ``-Bft`` is
in px² while Conveyor's ``--bfactor`` is in Å², so ``-Bft`` gets ``B / pixel_size²``. Gain
rotation and flip map directly: ``--gain-rot k`` -> ``-RotGain k`` (counter-clockwise turns of
90°), ``--gain-flip x`` (upside down) -> ``-FlipGain 1``, ``y`` (left-right) -> ``-FlipGain 2``.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import InputError
from ..io.movie import movie_info
from ..io.mrc import read_mrc
from . import _contracts as C
from ._run import ToolError, apptainer_command, merge_options, require_apptainer, run_tool
from .relion import parse_patches

PROGRAM = "MotionCor2"
_FLIP = {None: 0, "": 0, "none": 0, "x": 1, "y": 2}


def _num(v) -> str:
    return f"{float(v):g}"


def build_command(movie, *, image, out_mrc, log_dir, pixel_size: float, voltage: float, dose_per_frame: float,
                  pre_exposure: float = 0.0, patches=(5, 5), bfactor: float = 150.0, binning: float = 1.0,
                  gain=None, gain_rot: int = 0, gain_flip=None, gpu="0", iterations: int = 10,
                  tolerance: float = 0.5, nv: bool = True, runtime: str = "apptainer", program: str = PROGRAM,
                  extra=()) -> list[str]:
    """The ``apptainer exec [--nv] --bind ... IMAGE MotionCor2 ...`` command for one movie.

    ``out_mrc`` is the non-dose-weighted sum MotionCor2 writes (the dose-weighted one is
    ``<out_mrc stem>_DW.mrc``); ``log_dir`` receives the logs (``-LogDir`` for 1.4+, and
    ``-LogFile <log_dir>/<out stem>`` for 1.0–1.3; each version ignores the other's option).
    Paths are made absolute and their directories bound into the container. ``extra``
    arguments are appended; an option given there replaces the adapter's (e.g.
    ``["-Iter", "7"]``).
    """
    movie = Path(movie).resolve()
    out_mrc = Path(out_mrc).resolve()
    log_dir = Path(log_dir).resolve()
    suffix = movie.suffix.lower()
    in_tag = {".tif": "-InTiff", ".tiff": "-InTiff", ".eer": "-InEer"}.get(suffix, "-InMrc")
    px, py = patches
    flip = str(gain_flip).lower() if gain_flip is not None else None
    if flip not in _FLIP:
        raise InputError("--gain-flip", f"gain flip must be x, y or none, got {gain_flip!r}", "use x, y or none")
    rot = int(gain_rot)
    if rot in (90, 180, 270):
        rot //= 90
    if rot not in (0, 1, 2, 3):
        raise InputError("--gain-rot", f"gain rotation must be 0-3 turns of 90°, got {gain_rot!r}", "use 0, 1, 2 or 3")
    argv = [
        program, in_tag, str(movie), "-OutMrc", str(out_mrc),
        "-Patch", str(int(px)), str(int(py)), "-Iter", str(int(iterations)), "-Tol", _num(tolerance),
        "-Bft", f"{float(bfactor) / float(pixel_size) ** 2:.6g}",
        "-PixSize", _num(pixel_size), "-FmDose", _num(dose_per_frame), "-InitDose", _num(pre_exposure),
        "-kV", _num(voltage), "-FmRef", "0",
    ]
    if float(binning) != 1.0:
        argv += ["-FtBin", _num(binning)]
    binds = [movie.parent, out_mrc.parent, log_dir]
    if gain is not None:
        g = Path(gain).resolve()
        argv += ["-Gain", str(g), "-RotGain", str(rot), "-FlipGain", str(_FLIP[flip])]
        binds.append(g.parent)
    argv += ["-Gpu", *str(gpu).replace(",", " ").split()]
    argv += ["-LogDir", str(log_dir), "-LogFile", str(log_dir / out_mrc.stem)]
    argv = [argv[0]] + merge_options(argv[1:], extra)
    return apptainer_command(image, argv, nv=nv, binds=binds, runtime=runtime)


# --------------------------------------------------------------------------- parsing


def parse_full_log(path) -> tuple[np.ndarray, np.ndarray]:
    """MotionCor2's full-frame log -> ``(frames int [n], shifts [n, 2])`` exactly as written (px)."""
    path = Path(path)
    frames, shifts = [], []
    for lineno, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        parts = s.split()
        try:
            f, sx, sy = int(float(parts[0])), float(parts[1]), float(parts[2])
        except (IndexError, ValueError):
            raise InputError(path, f"line {lineno} is not 'frame shift_x shift_y': {s!r}",
                             "give MotionCor2's *-Full.log file") from None
        frames.append(f)
        shifts.append((sx, sy))
    if not frames:
        raise InputError(path, "holds no frame shifts", "give MotionCor2's *-Full.log file of a finished run")
    return np.asarray(frames, dtype=int), np.asarray(shifts, dtype=float)


def parse_patch_log(path) -> pd.DataFrame:
    """MotionCor2/MotionCor3 patch log -> DataFrame ``frame, x, y, shift_x, shift_y`` (+ ``fit_x, fit_y`` or ``bad``).

    MotionCor2 writes 7 columns (raw and fitted shifts), MotionCor3 6 (shift and a flag for
    a rejected measurement). Values are as written (MotionCor2's sign, px).
    """
    path = Path(path)
    rows = []
    ncol = None
    for lineno, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        parts = s.split()
        if ncol is None:
            ncol = len(parts)
            if ncol not in (6, 7):
                raise InputError(path, f"line {lineno} has {ncol} columns, expected 6 or 7",
                                 "give MotionCor2's *-Patch-Patch.log file")
        if len(parts) != ncol:
            raise InputError(path, f"line {lineno} has {len(parts)} columns, expected {ncol}",
                             "the file is truncated or damaged")
        rows.append([float(p) for p in parts])
    if not rows:
        return pd.DataFrame(columns=["frame", "x", "y", "shift_x", "shift_y"])
    cols = ["frame", "x", "y", "shift_x", "shift_y"] + (["fit_x", "fit_y"] if ncol == 7 else ["bad"])
    df = pd.DataFrame(rows, columns=cols)
    df["frame"] = df["frame"].astype(int)
    if "bad" in df:
        df["bad"] = df["bad"].astype(int).astype(bool)
    return df


def find_logs(log_dir) -> tuple[Path | None, Path | None]:
    """``(full-frame log, patch log)`` in ``log_dir`` (either may be None).

    Patch-alignment runs write ``*-Patch-Full.log``, whole-frame runs ``*-Full.log``; older
    versions put a ``0`` before the dash.
    """
    d = Path(log_dir)
    patch_full = sorted(d.glob("*-Patch-Full.log"))
    full = patch_full or sorted(p for p in d.glob("*-Full.log") if not p.name.endswith("-Patch-Full.log"))
    patch = sorted(d.glob("*-Patch-Patch.log"))
    return (full[0] if full else None), (patch[0] if patch else None)


def motioncor2_to_conveyor(shifts) -> np.ndarray:
    """MotionCor2's full-frame shifts ``[n, 2]`` (RELION's sign) -> Conveyor's, frame 1 at zero."""
    s = np.asarray(shifts, dtype=float).reshape(-1, 2)
    return (0.0 - (s - s[:1])) if len(s) else s


def local_shifts_table(patch: pd.DataFrame) -> pd.DataFrame:
    """``data_local_shift`` rows (Conveyor's sign) from :func:`parse_patch_log` output."""
    return pd.DataFrame({
        "rlnMicrographFrameNumber": patch["frame"].to_numpy(int),
        "rlnCoordinateX": patch["x"].to_numpy(float),
        "rlnCoordinateY": patch["y"].to_numpy(float),
        "rlnMicrographShiftX": 0.0 - patch["shift_x"].to_numpy(float),
        "rlnMicrographShiftY": 0.0 - patch["shift_y"].to_numpy(float),
    })


def convert_outputs(movie, *, out_mrc, log_dir, out_sum, out_sum_nodw, out_shifts, out_plot=None,
                    pixel_size: float, voltage: float, dose_per_frame: float, pre_exposure: float = 0.0,
                    binning: float = 1.0, shape=None) -> np.ndarray:
    """Turn one finished MotionCor2 run into Conveyor's motion outputs; return the shifts ``[n, 2]``."""
    movie = Path(movie)
    out_mrc = Path(out_mrc)
    dw_path = out_mrc.with_name(out_mrc.stem + "_DW.mrc")
    for p in (out_mrc, dw_path):
        if not p.exists():
            raise ToolError(movie, f"MotionCor2 did not write {p}", "check its log; dose weighting needs -PixSize and -FmDose")
    full, patch = find_logs(log_dir)
    if full is None:
        raise ToolError(movie, f"MotionCor2 wrote no *-Full.log in {log_dir}", "check its log and the MotionCor2 version")
    frames, raw = parse_full_log(full)
    shifts = motioncor2_to_conveyor(raw)
    if shape is None:
        info = movie_info(movie)
        shape = (info["n_frames"], info["ny"], info["nx"])
    local = local_shifts_table(parse_patch_log(patch)) if patch is not None else None
    general = {
        "rlnImageSizeX": shape[2], "rlnImageSizeY": shape[1], "rlnImageSizeZ": shape[0],
        "rlnMicrographMovieName": str(movie), "rlnMicrographBinning": float(binning),
        "rlnMicrographOriginalPixelSize": float(pixel_size), "rlnMicrographDoseRate": float(dose_per_frame),
        "rlnMicrographPreExposure": float(pre_exposure), "rlnVoltage": float(voltage),
        "rlnMicrographStartFrame": int(frames[0]), "rlnMotionModelVersion": 0,
    }
    nodw, _ = read_mrc(out_mrc)
    dw, _ = read_mrc(dw_path)
    C.write_sums(out_sum, out_sum_nodw, dw, nodw, float(pixel_size) * float(binning))
    C.write_motion_star(out_shifts, C.motion_blocks(general, shifts, frames, local))
    if out_plot is not None:
        C.write_drift_plot(out_plot, shifts, title=f"{movie.name} (MotionCor2)", pixel_size=pixel_size)
    return shifts


# --------------------------------------------------------------------------- run


def run_motioncor2(movie, *, image, out_sum, out_sum_nodw, out_shifts, out_plot=None, pixel_size=None,
                   voltage: float = 300.0, dose_per_frame: float, pre_exposure: float = 0.0, patches="5x5",
                   bfactor: float = 150.0, binning: float = 1.0, gain=None, gain_rot=0, gain_flip=None,
                   frames=None, gpu="0", nv: bool = True, runtime=None, program: str = PROGRAM, extra=(),
                   work_dir=None, dry_run: bool = False):
    """Run MotionCor2 on one movie from ``image`` and write Conveyor's motion outputs.

    With ``dry_run`` nothing runs: the command (a list) is returned. Otherwise returns the
    Conveyor-convention shifts ``[n, 2]``. Apptainer (or Singularity) and the image are
    needed; without them an :class:`InputError` says so.
    """
    movie = Path(movie)
    info = movie_info(movie)
    if info["ndim"] != 3:
        raise InputError(movie, "holds a single 2D image, not a movie", "give the raw movie (all frames)")
    if frames is not None and int(frames) != info["n_frames"]:
        raise InputError(movie, f"movie has {info['n_frames']} frames but --frames expects {int(frames)}",
                         "fix --frames (spa.frames in the config) or remove this movie")
    ps = pixel_size if pixel_size is not None else info["pixel_size"]
    if not ps or not math.isfinite(float(ps)) or float(ps) <= 0:
        raise InputError(movie, "no pixel size: the header holds none and --pixel-size was not given",
                         "pass --pixel-size (Å/px)")
    ps = float(ps)
    patches_xy = parse_patches(patches)
    keep = work_dir is not None
    work = Path(work_dir).resolve() if keep else default_work_dir(out_sum)

    def command(rt):
        return build_command(movie, image=image, out_mrc=work / "mic.mrc", log_dir=work, pixel_size=ps,
                             voltage=voltage, dose_per_frame=dose_per_frame, pre_exposure=pre_exposure,
                             patches=patches_xy, bfactor=bfactor, binning=binning, gain=gain, gain_rot=gain_rot,
                             gain_flip=gain_flip, gpu=gpu, nv=nv, runtime=rt, program=program, extra=extra)

    if dry_run:
        return command(runtime or "apptainer")
    exe = require_apptainer(image, "MotionCor2", movie, runtime)
    if not keep and work.exists():
        shutil.rmtree(work)  # left by an earlier failed run
    work.mkdir(parents=True, exist_ok=True)
    cmd = command(exe)
    run_tool(cmd, tool="MotionCor2", input_path=movie, log_path=work / "motioncor2.out",
             expect=[work / "mic.mrc", work / "mic_DW.mrc"])
    shifts = convert_outputs(movie, out_mrc=work / "mic.mrc", log_dir=work, out_sum=out_sum,
                             out_sum_nodw=out_sum_nodw, out_shifts=out_shifts, out_plot=out_plot, pixel_size=ps,
                             voltage=voltage, dose_per_frame=dose_per_frame, pre_exposure=pre_exposure,
                             binning=binning, shape=(info["n_frames"], info["ny"], info["nx"]))
    if not keep:
        shutil.rmtree(work, ignore_errors=True)
    return shifts


def default_work_dir(out_sum) -> Path:
    """Where MotionCor2 writes (removed after a successful conversion): beside ``out_sum``."""
    out = Path(out_sum).resolve()
    return out.parent / f".conveyor-motioncor2-{out.stem}"


__all__ = [
    "build_command", "parse_full_log", "parse_patch_log", "find_logs", "motioncor2_to_conveyor",
    "local_shifts_table", "convert_outputs", "run_motioncor2",
]
