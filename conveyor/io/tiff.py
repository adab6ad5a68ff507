"""TIFF movies (via ``tifffile``): one 2D frame per TIFF page.

Conventions
-----------
* Arrays are ``[frame, y, x]``. As in RELION, IMOD and MotionCor2, the frames are
  flipped along the slow axis (y) when read and written, so that row 0 of the array is
  the last row of the TIFF page. A movie written by :func:`write_tiff` reads back
  identical, and positions in Conveyor's arrays agree with those RELION reports for the
  same file. Pass ``flip_y=False`` for the raw row order.
* Pixel size in Å/px. :func:`write_tiff` stores it twice: in ``XResolution`` /
  ``YResolution`` (pixels per centimetre, ``ResolutionUnit = CENTIMETER``) and as
  ``pixel_size`` in the JSON ``ImageDescription`` tifffile writes. :func:`read_tiff` looks,
  in order, at that JSON, ImageJ metadata (``unit`` with the resolution tags), a
  ``pixel size = <value> [Å|A|nm|um]`` text in ``ImageDescription``, then the resolution
  tags in inch or centimetre units. Values outside 0.01-1000 Å/px (for example a 72 dpi
  default) are ignored. Without any of these the pixel size is ``None``.
"""

from __future__ import annotations

import contextlib
import logging
import re
from pathlib import Path

import numpy as np
import tifffile

from ..errors import InputError
from .atomic import atomic_path


_PLAUSIBLE_APIX = (0.01, 1000.0)
_UNIT_TO_ANGST = {
    "a": 1.0, "å": 1.0, "\u212b": 1.0, "angstrom": 1.0, "angstroms": 1.0, "\\u00c5": 1.0,
    "nm": 10.0, "nanometer": 10.0, "nanometre": 10.0,
    "um": 1e4, "µm": 1e4, "\u03bcm": 1e4, "micron": 1e4, "microns": 1e4, "\\u00b5m": 1e4,
    "mm": 1e7, "cm": 1e8, "m": 1e10,
}
_DESC_RE = re.compile(
    r"pixel[ _-]?(?:size|spacing)\s*[=:]\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([A-Za-z\u00c5\u212b\u00b5\u03bc]+)?",
    re.IGNORECASE,
)


def _corrupt(path, exc) -> InputError:
    return InputError(
        path,
        f"not a readable TIFF file ({exc.__class__.__name__}: {exc})",
        "check the file is complete (re-copy it from the microscope) or remove it from the input glob",
    )


def _plausible(apix) -> float | None:
    try:
        v = float(apix)
    except (TypeError, ValueError):
        return None
    if np.isfinite(v) and _PLAUSIBLE_APIX[0] <= v <= _PLAUSIBLE_APIX[1]:
        return v
    return None


def _pixel_size(tf: tifffile.TiffFile) -> float | None:
    """Pixel size (Å/px) from a TIFF's metadata, or None."""
    page = tf.pages.first
    # 1. JSON description written by tifffile (and by write_tiff)
    try:
        shaped = tf.shaped_metadata
    except Exception:  # noqa: BLE001 - metadata is optional
        shaped = None
    for md in shaped or ():
        if isinstance(md, dict) and "pixel_size" in md:
            v = _plausible(md["pixel_size"])
            if v is not None:
                return v
    xres = None
    try:
        xres = float(page.resolution[0])
    except Exception:  # noqa: BLE001
        xres = None
    # 2. ImageJ: resolution in pixels per <unit>
    try:
        ij = tf.imagej_metadata
    except Exception:  # noqa: BLE001
        ij = None
    if ij and xres and xres > 0:
        unit = str(ij.get("unit", "")).strip().lower()
        if unit in _UNIT_TO_ANGST:
            v = _plausible(_UNIT_TO_ANGST[unit] / xres)
            if v is not None:
                return v
    # 3. free text in ImageDescription
    desc = page.description or ""
    m = _DESC_RE.search(desc)
    if m:
        unit = (m.group(2) or "A").strip().lower()
        factor = _UNIT_TO_ANGST.get(unit, 1.0 if unit in ("px",) else None)
        if factor is not None:
            v = _plausible(float(m.group(1)) * factor)
            if v is not None:
                return v
    # 4. resolution tags in inch / centimetre
    unit = int(page.resolutionunit) if page.resolutionunit is not None else 1
    per_unit = {2: 2.54e8, 3: 1e8}.get(unit)  # Å per inch / centimetre
    if per_unit and xres and xres > 0:
        return _plausible(per_unit / xres)
    return None


@contextlib.contextmanager
def _quiet():
    """Silence tifffile's own log warnings about damaged files: the InputError says it all."""
    logger = logging.getLogger("tifffile")
    old = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(old)


def _open(path) -> tifffile.TiffFile:
    path = Path(path)
    if not path.exists():
        raise InputError(path, "file does not exist", "check the path or glob in the config")
    if path.is_dir():
        raise InputError(path, "is a directory, not a TIFF file", "give the path of a .tif/.tiff file")
    try:
        return tifffile.TiffFile(path)
    except Exception as exc:  # TiffFileError, ValueError, struct.error, ...
        raise _corrupt(path, exc) from None


def _series_shape(tf: tifffile.TiffFile, path) -> tuple[int, int, int, np.dtype, int]:
    """(n, ny, nx, dtype, stored ndim) of the first series; InputError unless it is a stack of 2D gray frames."""
    try:
        series = tf.series[0] if tf.series else None
    except Exception as exc:  # noqa: BLE001
        raise _corrupt(path, exc) from None
    if series is None or not len(tf.pages) or series.size == 0:
        raise InputError(path, "TIFF file holds no readable image data (empty, truncated or damaged)",
                         "re-copy the file or remove it from the input glob")
    shape = tuple(int(s) for s in series.shape)
    page = tf.pages.first
    if getattr(page, "samplesperpixel", 1) > 1 or len(shape) not in (2, 3):
        raise InputError(path, f"TIFF data of shape {shape} (axes {series.axes}) is not a stack of 2D grey frames",
                         "movies must be single-channel, one frame per page")
    try:
        shaped = tf.shaped_metadata if tf.is_shaped else None
    except Exception:  # noqa: BLE001
        shaped = None
    if shaped and isinstance(shaped[0], dict) and "shape" in shaped[0]:
        declared = tuple(int(s) for s in shaped[0]["shape"])
        if int(np.prod(declared)) != int(np.prod(shape)):
            raise InputError(path, f"TIFF file is truncated: it declares shape {declared} but holds {shape}",
                             "re-copy the file from the microscope or remove it from the input glob")
    ndim = len(shape)
    if ndim == 2:
        shape = (1, *shape)
    return shape[0], shape[1], shape[2], np.dtype(series.dtype), ndim


def _check_complete(tf: tifffile.TiffFile, path, n_frames: int) -> None:
    """InputError if the file is shorter than its own directory says (a truncated copy).

    Checks every page's directory entry and data strips against the file size, the
    contiguous data block of the series, and, for files written by tifffile (which stores
    the shape), that every frame has its page.
    """
    truncated = "re-copy the file from the microscope or remove it from the input glob"
    size = Path(path).stat().st_size
    fmt = tf.tiff
    try:
        pages = list(tf.pages)
        for i, page in enumerate(pages):
            n_tags = len(getattr(page, "tags", ()) or ())
            ifd_end = page.offset + fmt.tagnosize + n_tags * fmt.tagsize + fmt.offsetsize
            offsets, counts = page.dataoffsets, page.databytecounts
            data_end = max((o + c for o, c in zip(offsets, counts)), default=0)
            if max(ifd_end, data_end) > size:
                raise InputError(path, f"TIFF file is truncated: page {i + 1} extends beyond the end of the file "
                                 f"({size} bytes)", truncated)
        series = tf.series[0]
        if series.dataoffset is not None and series.dataoffset + series.nbytes > size:
            raise InputError(path, f"TIFF file is truncated: its {n_frames} frames need "
                             f"{series.dataoffset + series.nbytes} bytes but the file has {size}", truncated)
        if tf.is_shaped and len(pages) < n_frames:
            raise InputError(path, f"TIFF file is truncated: it declares {n_frames} frames but only "
                             f"{len(pages)} page(s) can be read", truncated)
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - damaged IFD chain
        raise _corrupt(path, exc) from None


def read_tiff_header(path) -> dict:
    """Shape ``(n, ny, nx)``, ndim, dtype, pixel size (Å/px or None) and compression, without reading pixel data.

    ``ndim`` is that of the stored series: 2 for a single plain page, 3 for a stack.

    Raises :class:`InputError` for missing, damaged or truncated files and for TIFFs that
    are not stacks of 2D grey frames.
    """
    with _quiet(), _open(path) as tf:
        try:
            n, ny, nx, dtype, ndim = _series_shape(tf, path)
            _check_complete(tf, path, n)
            compression = tf.pages.first.compression
            return {
                "shape": (n, ny, nx),
                "ndim": ndim,
                "dtype": str(dtype),
                "pixel_size": _pixel_size(tf),
                "compression": getattr(compression, "name", str(compression)).lower(),
            }
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise _corrupt(path, exc) from None


def read_tiff(path, *, flip_y: bool = True):
    """Read a TIFF movie.

    Returns
    -------
    frames : numpy.ndarray
        ``[n, y, x]`` in the stored dtype (a single page gives ``n = 1``), flipped along y
        unless ``flip_y`` is False (see the module docstring).
    pixel_size : float or None
        Å/px from the metadata, None when the file has none.

    Raises :class:`InputError` naming the file when it is missing, not a TIFF, damaged or
    truncated, or not a stack of 2D grey frames.
    """
    with _quiet(), _open(path) as tf:
        try:
            n, ny, nx, _, _ = _series_shape(tf, path)
            _check_complete(tf, path, n)
            data = tf.series[0].asarray()
            pixel_size = _pixel_size(tf)
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001 - decoding errors, short reads
            raise _corrupt(path, exc) from None
    data = data.reshape(n, ny, nx)
    if flip_y:
        data = data[:, ::-1, :]
    return np.ascontiguousarray(data), pixel_size


def iter_tiff_frames(path, *, flip_y: bool = True):
    """Yield the frames of a TIFF movie one at a time (``[y, x]`` arrays), for low memory use."""
    with _quiet(), _open(path) as tf:
        n, ny, nx, _, _ = _series_shape(tf, path)
        _check_complete(tf, path, n)
        for i in range(n):
            try:
                frame = tf.asarray(key=i)
            except Exception as exc:  # noqa: BLE001
                raise InputError(path, f"frame {i + 1} of {n} cannot be read ({exc.__class__.__name__}: {exc})",
                                 "re-copy the file from the microscope or remove it from the input glob") from None
            frame = frame.reshape(ny, nx)
            yield np.ascontiguousarray(frame[::-1] if flip_y else frame)


def write_tiff(path, frames, pixel_size: float | None = None, compression: str | None = None, *,
               flip_y: bool = True) -> None:
    """Write ``frames`` (``[n, y, x]`` or one ``[y, x]`` frame) as a multi-page TIFF, atomically.

    Parameters
    ----------
    frames : array_like
        numpy or cupy array; the dtype is kept (uint8/uint16/int8/int16/float32 are usual).
    pixel_size : float, optional
        Å/px, stored in the resolution tags and the JSON description.
    compression : str, optional
        None (uncompressed), ``"zlib"``/``"deflate"``, ``"lzma"``, ``"packbits"``, or codecs
        that need ``imagecodecs`` (``"lzw"``, ``"zstd"``).
    flip_y : bool
        Store the rows flipped (see the module docstring); keep the default so that
        :func:`read_tiff` returns ``frames`` unchanged.
    """
    from ..backend import to_host

    path = Path(path)
    arr = np.asarray(to_host(frames))
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or 0 in arr.shape:
        raise InputError(path, f"cannot write frames of shape {arr.shape} as a TIFF movie", "pass [n, y, x] frames")
    if arr.dtype == np.float64:
        arr = arr.astype(np.float32)
    if flip_y:
        arr = arr[:, ::-1, :]
    arr = np.ascontiguousarray(arr)
    kwargs = {}
    metadata = {}
    if pixel_size is not None:
        ps = float(pixel_size)
        if not (np.isfinite(ps) and ps > 0):
            raise InputError(path, f"pixel size must be positive, got {pixel_size}", "pass the pixel size in Å")
        kwargs["resolution"] = (1e8 / ps, 1e8 / ps)
        kwargs["resolutionunit"] = "CENTIMETER"
        metadata["pixel_size"] = ps
        metadata["pixel_size_unit"] = "A"
    comp = None if compression in (None, "none", "None", "") else compression
    with atomic_path(path) as tmp:
        try:
            tifffile.imwrite(tmp, arr, photometric="minisblack", compression=comp, metadata=metadata, **kwargs)
        except (KeyError, ValueError, ImportError) as exc:
            if comp is not None and ("imagecodecs" in str(exc) or "compression" in str(exc).lower()):
                raise InputError(path, f"TIFF compression {compression!r} is not available ({exc})",
                                 "use compression='zlib' (or None), or install the imagecodecs package") from None
            raise
