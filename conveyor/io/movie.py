"""Raw cryo-EM movies (MRC ``.mrc``/``.mrcs`` and TIFF ``.tif``/``.tiff``): read, describe, validate.

Conventions
-----------
* Frames are ``[n, y, x]`` float32 after :func:`read_movie`. TIFF frames are flipped along
  y on reading, as RELION, IMOD and MotionCor2 do (see :mod:`conveyor.io.tiff`); MRC
  frames are used as stored.
* Pixel size in Å/px; ``None`` when neither the header nor the caller gives one.
* Gain reference: an image (MRC or TIFF file, or an array) multiplied into every frame
  after transforming it as RELION's ``--gain_rot`` / ``--gain_flip`` and MotionCor2's
  ``-RotGain`` / ``-FlipGain`` do: first ``gain_rot`` turns by 90°, then the flip.

  - ``gain_rot = k`` (0-3; 90, 180, 270 are read as degrees) is ``numpy.rot90(gain, -k)``:
    clockwise with row 0 drawn at the top (as relion_display shows it), i.e.
    counter-clockwise in the MRC convention with row 0 at the bottom (as MotionCor2 and
    the config's ``spa.gain_rot`` describe it).
  - ``gain_flip = "x"`` flips about the x axis (upside down, rows reversed; RELION 1 /
    MotionCor2 ``-FlipGain 1``); ``"y"`` flips about the y axis (left-right, columns
    reversed; RELION 2 / ``-FlipGain 2``).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import mrcfile
import numpy as np

from ..errors import InputError
from .mrc import read_header, read_mrc
from .tiff import iter_tiff_frames, read_tiff, read_tiff_header

log = logging.getLogger(__name__)

MRC_SUFFIXES = (".mrc", ".mrcs")
TIFF_SUFFIXES = (".tif", ".tiff")


def movie_format(path) -> str:
    """``"mrc"`` or ``"tiff"`` from the file extension; :class:`InputError` for anything else."""
    suffix = Path(path).suffix.lower()
    if suffix in MRC_SUFFIXES:
        return "mrc"
    if suffix in TIFF_SUFFIXES:
        return "tiff"
    raise InputError(
        path,
        f"unsupported movie format {suffix or '(no extension)'!r}",
        "movies must be MRC (.mrc/.mrcs) or TIFF (.tif/.tiff); convert them first",
    )


def _check_exists(path: Path, what: str = "movie") -> None:
    if not path.exists():
        raise InputError(path, f"{what} does not exist", "check the path, or the spa.movies glob in the config")
    if path.is_dir():
        raise InputError(path, f"is a directory, not a {what} file", "give the path of a file")


def movie_info(path) -> dict:
    """Describe a movie from its header only (no pixel data is read).

    Returns ``{"n_frames", "ny", "nx", "dtype", "pixel_size", "format", "ndim"}``:
    ``pixel_size`` in Å/px or None when the header has none; ``format`` ``"mrc"`` or
    ``"tiff"``; ``ndim`` 3 for a stack of frames, 2 for a single image (then
    ``n_frames`` is 1). Missing, damaged and truncated files raise :class:`InputError`.
    """
    path = Path(path)
    _check_exists(path)
    fmt = movie_format(path)
    if fmt == "mrc":
        h = read_header(path)
        nz, ny, nx = h["shape"]
        ndim = h["ndim"]
        n = nz if ndim == 3 else 1
        ps = h["pixel_size"] or None
        dtype = h["dtype"]
    else:
        h = read_tiff_header(path)
        n, ny, nx = h["shape"]
        ndim = h["ndim"]
        ps = h["pixel_size"]
        dtype = h["dtype"]
    return {
        "n_frames": int(n),
        "ny": int(ny),
        "nx": int(nx),
        "dtype": str(dtype),
        "pixel_size": None if ps is None else float(ps),
        "format": fmt,
        "ndim": int(ndim),
    }


def _not_a_movie(path, info: dict) -> InputError:
    if info["ndim"] == 2:
        problem = f"holds a single 2D image ({info['ny']}x{info['nx']}), not a movie (3D stack of frames)"
    else:
        problem = f"holds {info['ndim']}D data, not a movie (3D stack of frames)"
    return InputError(path, problem, "give the raw movies (all frames), not summed micrographs")


def _rot_steps(gain_rot) -> int:
    try:
        v = int(gain_rot)
        ok = v == gain_rot
    except (TypeError, ValueError):
        ok = False
    if ok and -3 <= v <= 3:
        return v % 4
    if ok and v % 90 == 0:
        return (v // 90) % 4
    raise InputError("spa.gain_rot", f"gain rotation must be 0, 1, 2 or 3 turns of 90°, got {gain_rot!r}",
                     "set spa.gain_rot to 0, 1, 2 or 3")


def _check_flip(gain_flip):
    if gain_flip in (None, "", "none"):
        return None
    if isinstance(gain_flip, str) and gain_flip.lower() in ("x", "y"):
        return gain_flip.lower()
    raise InputError("spa.gain_flip", f"gain flip must be 'x', 'y' or null, got {gain_flip!r}",
                     "set spa.gain_flip to x (upside down), y (left-right) or null")


def transform_gain(gain, gain_flip=None, gain_rot=0) -> np.ndarray:
    """Rotate ``gain`` by ``gain_rot`` × 90°, then flip it (see the module docstring)."""
    k = _rot_steps(gain_rot)
    flip = _check_flip(gain_flip)
    g = np.rot90(np.asarray(gain), -k)
    if flip == "x":
        g = g[::-1, :]
    elif flip == "y":
        g = g[:, ::-1]
    return np.ascontiguousarray(g)


def read_gain(gain) -> tuple[np.ndarray, str]:
    """``(gain float32 [y, x], name)`` from an MRC/TIFF file or an array; InputError if unusable."""
    if isinstance(gain, (str, os.PathLike)):
        gpath = Path(gain)
        _check_exists(gpath, "gain reference")
        suffix = gpath.suffix.lower()
        if suffix in TIFF_SUFFIXES:
            data, _ = read_tiff(gpath)
        elif suffix in MRC_SUFFIXES or suffix in (".map", ".gain"):
            data, _ = read_mrc(gpath, check_finite=False)
        else:
            raise InputError(gpath, f"unsupported gain reference format {suffix!r}",
                             "convert the gain reference to MRC (.mrc) or TIFF (.tif)")
        name = str(gpath)
    else:
        from ..backend import to_host

        data = to_host(gain)
        name = "gain reference array"
    data = np.asarray(data)
    if data.ndim == 3 and data.shape[0] == 1:
        data = data[0]
    if data.ndim != 2:
        raise InputError(name, f"gain reference must be a single 2D image, got shape {data.shape}",
                         "give the gain reference image, not a stack")
    data = data.astype(np.float32)
    if not np.isfinite(data).all():
        raise InputError(name, "gain reference contains NaN or infinite values", "use an intact gain reference")
    return data, name


def _apply_gain(frames: np.ndarray, path, gain, gain_flip, gain_rot) -> np.ndarray:
    frames *= _gain_for(path, frames.shape[1:], gain, gain_flip, gain_rot)
    return frames


def _gain_for(path, shape, gain, gain_flip, gain_rot) -> np.ndarray:
    """The gain reference, transformed, checked against the frame ``shape`` of movie ``path``."""
    g, gname = read_gain(gain)
    t = transform_gain(g, gain_flip, gain_rot)
    if t.shape != shape:
        hint = ""
        if t.shape == shape[::-1]:
            hint = " (the transposed shape matches: a 90° turn, spa.gain_rot 1 or 3, would fit)"
        raise InputError(
            path,
            f"gain reference {gname} has shape {t.shape[0]}x{t.shape[1]} (y x, after gain_rot={_rot_steps(gain_rot)}, "
            f"gain_flip={_check_flip(gain_flip)}) but the movie frames are {shape[0]}x{shape[1]}{hint}",
            "set spa.gain_rot / spa.gain_flip so the gain matches the movies, or use the gain reference recorded "
            "with these movies",
        )
    return t


class MovieFrames:
    """The gain-corrected float32 frames of an MRC movie, read on demand from a memory map.

    Behaves as a read-only ``[n, y, x]`` float32 array for what motion correction does with
    frames: ``frames[i]``, ``frames[a:b]`` and ``frames[t, rows, cols]`` (integers and
    slices) return new float32 arrays, converted from the stored data type and multiplied
    by the (transformed) gain reference; ``numpy.asarray(frames)`` reads them all. Only the
    frames asked for are converted, so a movie is never held twice in memory (a 4096² × 40
    int16 movie is 1.3 GB on disk and 2.7 GB as float32). Float data are checked for
    NaN/inf as they are read (:class:`InputError` naming the file and the frame).
    """

    ndim = 3
    dtype = np.dtype(np.float32)

    def __init__(self, path, raw, gain=None):
        self.path = Path(path)
        self._raw = raw
        self._gain = gain
        self.shape = tuple(int(v) for v in raw.shape)
        self._check = raw.dtype.kind == "f"

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        if len(key) > 3 or any(not isinstance(k, (int, np.integer, slice)) for k in key):
            raise TypeError("MovieFrames takes integers and slices only")
        out = np.asarray(self._raw[key], dtype=np.float32)
        if self._check and not np.isfinite(out).all():
            first = key[0]
            if isinstance(first, slice):
                start, stop, _ = first.indices(self.shape[0])
                where = f"frames {start + 1}-{stop} contain"
            else:
                where = f"frame {int(first) % self.shape[0] + 1} contains"
            raise InputError(self.path, f"{where} NaN or infinite values",
                             "the file is damaged or was written by a failed job; regenerate or remove it")
        if self._gain is not None:
            out *= self._gain[key[1:]]
        return out

    def __array__(self, dtype=None, copy=None):
        out = np.empty(self.shape, dtype=np.float32)
        for i in range(self.shape[0]):
            out[i] = self[i]
        return out if dtype is None else out.astype(dtype, copy=False)


def open_movie(path, gain=None, gain_flip=None, gain_rot=0, pixel_size=None):
    """Like :func:`read_movie`, but an MRC movie is returned as :class:`MovieFrames` (read on
    demand) instead of an array; TIFF movies are read whole. Same checks and errors."""
    path = Path(path)
    info = movie_info(path)
    if info["ndim"] != 3 or info["format"] != "mrc":
        return read_movie(path, gain=gain, gain_flip=gain_flip, gain_rot=gain_rot, pixel_size=pixel_size)
    raw, header_ps = read_mrc(path, mmap=True, check_finite=False)
    g = None
    if gain is not None:
        g = _gain_for(path, raw.shape[1:], gain, gain_flip, gain_rot)
    frames = MovieFrames(path, raw, g)
    return _finish(frames, path, None, gain_flip, gain_rot, header_ps or None, pixel_size)


def read_movie(path, gain=None, gain_flip=None, gain_rot=0, pixel_size=None):
    """Read a raw movie as float32 frames, gain-corrected when a gain reference is given.

    Parameters
    ----------
    path : str or Path
        ``.mrc``/``.mrcs`` or ``.tif``/``.tiff`` movie.
    gain : str, Path or array, optional
        Gain reference multiplied into every frame (MRC or TIFF file, or ``[y, x]`` array).
    gain_flip : {"x", "y", None}
        Flip of the gain reference, applied after the rotation (see module docstring).
    gain_rot : int
        Turns of 90° of the gain reference (0-3), applied first.
    pixel_size : float, optional
        Å/px to use (the config's ``spa.pixel_size``); default: the header's.

    Returns
    -------
    frames : numpy.ndarray
        float32 ``[n, y, x]``.
    pixel_size : float or None
        ``pixel_size`` if given, else the header's, else None.

    Raises :class:`InputError` naming the file for missing/damaged/truncated files,
    NaN/inf data, data that are not a stack of frames, and a gain reference whose shape
    does not match the frames (naming both files and shapes).
    """
    path = Path(path)
    info = movie_info(path)  # missing, damaged, truncated files
    if info["ndim"] != 3:
        raise _not_a_movie(path, info)
    if info["format"] == "mrc":
        frames, header_ps = _read_mrc_frames(path)
        header_ps = header_ps or None
    else:
        data, header_ps = read_tiff(path)
        if data.dtype.kind == "f" and not np.isfinite(data).all():
            raise InputError(path, "data contain NaN or infinite values",
                             "the file is damaged or was written by a failed job; regenerate or remove it")
        frames = np.require(data.astype(np.float32, copy=False), requirements=["W", "C"])
    return _finish(frames, path, gain, gain_flip, gain_rot, header_ps, pixel_size)


def _read_mrc_frames(path: Path) -> tuple[np.ndarray, float]:
    """float32 frames of an MRC movie, converted one frame at a time from a memory map.

    One pass over the file and one float32 array: no copy of the stored data, where a full
    read, a copy and a conversion touch the movie's memory three times. Float data are
    checked for NaN/inf frame by frame.
    """
    raw, header_ps = read_mrc(path, mmap=True, check_finite=False)
    return np.asarray(MovieFrames(path, raw)), header_ps


def _finish(frames, path, gain, gain_flip, gain_rot, header_ps, pixel_size):
    """Gain correction and pixel size of :func:`read_movie`."""
    if gain is not None:
        frames = _apply_gain(frames, path, gain, gain_flip, gain_rot)
    else:
        _rot_steps(gain_rot)
        _check_flip(gain_flip)
    if pixel_size is not None:
        ps = float(pixel_size)
        if not (math.isfinite(ps) and ps > 0):
            raise InputError("spa.pixel_size", f"pixel size must be positive (Å/px), got {pixel_size!r}",
                             "set spa.pixel_size in the config")
        if header_ps and abs(header_ps - ps) > 0.02 * ps:
            log.warning("%s: header pixel size %.4f Å differs from the given %.4f Å; using %.4f Å",
                        path, header_ps, ps, ps)
        return frames, ps
    return frames, (None if header_ps is None else float(header_ps))


def iter_movie_frames(path):
    """Yield the frames of a movie one at a time (stored dtype), reading little memory."""
    path = Path(path)
    _check_exists(path)
    if movie_format(path) == "tiff":
        yield from iter_tiff_frames(path)
        return
    read_header(path)  # clear InputError for damaged / truncated files
    with mrcfile.mmap(path, mode="r", permissive=False) as mrc:
        data = mrc.data
        if data.ndim == 2:
            yield np.array(data)
            return
        for i in range(data.shape[0]):
            yield np.array(data[i])


def validate_movie(path, expected_frames=None, pixel_size=None, pixel_tolerance=0.02, check_data=True) -> dict:
    """Check that a raw movie is usable and describe it.

    Parameters
    ----------
    path : str or Path
    expected_frames : int, optional
        The config's ``spa.frames``; another frame count is an error.
    pixel_size : float, optional
        The config's ``spa.pixel_size`` (Å/px); a header pixel size differing from it by
        more than ``pixel_tolerance`` (a fraction, 0.02 = 2 %) is an error. Headers without
        a pixel size pass.
    check_data : bool
        Also read every frame (one at a time) and reject NaN/infinite values and all-zero
        frames.

    Returns
    -------
    dict
        ``path, format, n_frames, ny, nx, dtype, header_pixel_size, pixel_size`` (the one to
        use: the config's, else the header's), ``expected_frames, data_checked`` and, when
        the data were read, ``mean, min, max``. JSON-serialisable.

    Raises
    ------
    InputError
        Naming the file, for: a missing file, a damaged or truncated file, data that are not
        a 3D stack of frames, a wrong frame count, a pixel-size mismatch, NaN/inf values,
        all-zero frames. Frames are numbered from 1 in messages.
    """
    path = Path(path)
    _check_exists(path)
    info = movie_info(path)
    if info["ndim"] != 3:
        raise _not_a_movie(path, info)
    n = info["n_frames"]
    if expected_frames is not None and int(expected_frames) != n:
        raise InputError(
            path,
            f"movie has {n} frames but spa.frames expects {int(expected_frames)}",
            f"set spa.frames to {n} in the config if that is right for all movies (or null to accept any), "
            "or remove this movie from the input",
        )
    header_ps = info["pixel_size"]
    if pixel_size is not None:
        ps = float(pixel_size)
        if not (math.isfinite(ps) and ps > 0):
            raise InputError("spa.pixel_size", f"pixel size must be positive (Å/px), got {pixel_size!r}",
                             "set spa.pixel_size in the config")
        if header_ps is not None and abs(header_ps - ps) > float(pixel_tolerance) * ps:
            raise InputError(
                path,
                f"header pixel size {header_ps:.4f} Å/px differs from spa.pixel_size {ps:.4f} Å/px by "
                f"{abs(header_ps - ps) / ps:.1%} (tolerance {float(pixel_tolerance):.1%})",
                f"correct spa.pixel_size in the config if {header_ps:.4f} Å/px is right; otherwise the header is "
                "wrong: fix it (e.g. IMOD alterheader) or raise the pixel-size tolerance",
            )
    report = {
        "path": str(path),
        "format": info["format"],
        "n_frames": n,
        "ny": info["ny"],
        "nx": info["nx"],
        "dtype": info["dtype"],
        "header_pixel_size": header_ps,
        "pixel_size": float(pixel_size) if pixel_size is not None else header_ps,
        "expected_frames": None if expected_frames is None else int(expected_frames),
        "data_checked": bool(check_data),
    }
    if not check_data:
        return report
    bad_values, zero_frames = [], []
    total, lo, hi, count = 0.0, math.inf, -math.inf, 0
    for i, frame in enumerate(iter_movie_frames(path), start=1):
        if frame.dtype.kind == "f" and not np.isfinite(frame).all():
            bad_values.append(i)
            continue
        if not frame.any():
            zero_frames.append(i)
        total += float(frame.sum(dtype=np.float64))
        lo = min(lo, float(frame.min()))
        hi = max(hi, float(frame.max()))
        count += frame.size
    if bad_values:
        raise InputError(path, f"frame(s) {_frame_list(bad_values)} of {n} contain NaN or infinite values",
                         "the file is damaged or was written by a failed job; re-copy or remove it")
    if zero_frames:
        raise InputError(path, f"frame(s) {_frame_list(zero_frames)} of {n} are all zero",
                         "the movie is damaged (incomplete transfer or failed readout); re-copy or remove it")
    report.update(mean=total / max(count, 1), min=lo, max=hi)
    return report


def _frame_list(frames: list[int], limit: int = 10) -> str:
    s = ", ".join(str(f) for f in frames[:limit])
    return s + (f" and {len(frames) - limit} more" if len(frames) > limit else "")
