"""MRC/MRCS images, stacks, movies and volumes (via ``mrcfile``).

Conventions
-----------
* Arrays are indexed ``[z, y, x]`` (``[frame, y, x]`` for movies and stacks), as mrcfile does.
* The pixel (voxel) size is stored in the header ``voxel_size`` in Å/px and is returned
  by :func:`read_mrc`; writers always set it.
* Stacks (``.mrcs``) and movies are written with ``ispg = 0`` (image stack); volumes
  with ``ispg = 1``.
"""

from __future__ import annotations

from pathlib import Path

import mrcfile
import numpy as np

from ..errors import InputError
from .atomic import atomic_path

_STORABLE = (np.float32, np.float16, np.int8, np.int16, np.uint8, np.uint16, np.complex64)


def _check_exists(path: Path) -> None:
    if not path.exists():
        raise InputError(path, "file does not exist", "check the path or glob in the config")
    if path.is_dir():
        raise InputError(path, "is a directory, not an MRC file", "give the path of a .mrc/.mrcs file")


def _open_error(path, exc) -> InputError:
    return InputError(
        path,
        f"not a readable MRC file ({exc.__class__.__name__}: {exc})",
        "check the file is complete (re-copy it from the microscope) or remove it from the input glob",
    )


def read_mrc(path, *, mmap: bool = False, check_finite: bool = True):
    """Read an MRC/MRCS file.

    Parameters
    ----------
    path : str or Path
    mmap : bool
        Memory-map instead of reading (large movies); the array is then read-only.
    check_finite : bool
        Raise :class:`InputError` if the data holds NaN or infinity.

    Returns
    -------
    data : numpy.ndarray
        ``[y, x]``, ``[n, y, x]`` or ``[z, y, x]``.
    pixel_size : float
        Å/px from the header (0.0 if the header has none).
    """
    path = Path(path)
    _check_exists(path)
    try:
        if mmap:
            mrc = mrcfile.mmap(path, mode="r", permissive=False)
        else:
            mrc = mrcfile.open(path, mode="r", permissive=False)
        with mrc:
            data = mrc.data if mmap else np.array(mrc.data)
            pixel_size = float(mrc.voxel_size.x)
            if mmap:
                data = np.asarray(data)
    except (ValueError, OSError, EOFError) as exc:
        raise _open_error(path, exc) from None
    if data is None or data.size == 0:
        raise InputError(path, "MRC file holds no data", "re-copy or remove the file")
    if check_finite and data.dtype.kind == "f" and not np.isfinite(data).all():
        raise InputError(
            path,
            "data contain NaN or infinite values",
            "the file is damaged or was written by a failed job; regenerate or remove it",
        )
    return data, pixel_size


def read_header(path) -> dict:
    """Header of an MRC file, without reading the data.

    Returns ``{"shape": (nz, ny, nx), "dtype", "pixel_size" (Å/px, 0.0 if unset), "ispg",
    "ndim"}`` where ``ndim`` is that of the array :func:`read_mrc` returns (2 for a single
    image). A file shorter than its header declares (truncated) raises :class:`InputError`.
    """
    path = Path(path)
    _check_exists(path)
    try:
        with mrcfile.mmap(path, mode="r", permissive=False) as mrc:
            h = mrc.header
            if mrc.data is None:
                raise ValueError("no data block")
            return {
                "shape": tuple(int(v) for v in (h.nz, h.ny, h.nx)),
                "dtype": str(mrc.data.dtype),
                "pixel_size": float(mrc.voxel_size.x),
                "ispg": int(h.ispg),
                "ndim": int(mrc.data.ndim),
            }
    except (ValueError, OSError, EOFError) as exc:
        raise _open_error(path, exc) from None


def write_mrc(path, data, pixel_size: float, *, volume: bool | None = None, dtype=np.float32) -> None:
    """Write ``data`` to ``path`` atomically with ``pixel_size`` (Å/px) in the header.

    Parameters
    ----------
    data : array_like
        2D image, 3D stack/movie or 3D volume (numpy or cupy).
    pixel_size : float
        Å/px; must be positive.
    volume : bool, optional
        Mark a 3D array as a volume (``ispg = 1``). Default: True for ``.mrc`` files,
        False for ``.mrcs``.
    dtype
        Storage type (float32 by default; float16/int8/uint8/int16 allowed).
    """
    from ..backend import to_host

    path = Path(path)
    if not (pixel_size and np.isfinite(pixel_size) and pixel_size > 0):
        raise InputError(path, f"pixel size must be positive, got {pixel_size}", "pass the pixel size in Å")
    if np.dtype(dtype) not in [np.dtype(t) for t in _STORABLE]:
        raise InputError(path, f"MRC files cannot store {np.dtype(dtype)}",
                         "use float32, float16, int8, int16, uint8 or uint16")
    arr = np.ascontiguousarray(to_host(data), dtype=dtype)
    if arr.ndim not in (2, 3) or arr.size == 0:
        raise InputError(path, f"cannot write an array of shape {arr.shape} as MRC", "pass a 2D image or a 3D stack/volume")
    if volume is None:
        volume = path.suffix.lower() != ".mrcs"
    with atomic_path(path) as tmp:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(arr)
            if arr.ndim == 3:
                if volume:
                    mrc.set_volume()
                else:
                    mrc.set_image_stack()
            mrc.voxel_size = float(pixel_size)
            mrc.update_header_stats()


def read_stack_images(path, indices=None):
    """Read images from an ``.mrcs`` stack by 0-based index (all when ``indices`` is None).

    Returns ``(images [n, y, x], pixel_size)``; uses memory mapping so only the asked
    images are read.
    """
    data, pixel_size = read_mrc(path, mmap=True, check_finite=False)
    if data.ndim == 2:
        data = data[None]
    if indices is None:
        out = np.array(data)
    else:
        idx = np.asarray(indices, dtype=int)
        if idx.size and (idx.min() < 0 or idx.max() >= data.shape[0]):
            raise InputError(
                path,
                f"image index {int(idx.max()) + 1} out of range (stack holds {data.shape[0]} images)",
                "the STAR file and the stack disagree; re-run extraction",
            )
        out = np.array(data[idx])
    return out, pixel_size
