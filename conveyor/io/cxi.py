"""CXI (HDF5) files of XFEL shots, and import of CXIDB-58-style plain HDF5 files.

Layout written by :func:`write_cxi` (CXI 1.6, SI units: m, J)::

    /cxi_version                                    int 160
    /entry_1/instrument_1/source_1/energy           photon energy, J        (units="J")
    /entry_1/instrument_1/detector_1/data           [n, y, x] photons, one gzip chunk per frame
    /entry_1/instrument_1/detector_1/distance       m                       (units="m")
    /entry_1/instrument_1/detector_1/x_pixel_size   m                       (units="m")
    /entry_1/instrument_1/detector_1/y_pixel_size   m                       (units="m")
    /entry_1/instrument_1/detector_1/corner_position  (x, y, z) m of the outer corner of pixel [0, 0]
    /entry_1/instrument_1/detector_1/basis_vectors  [[0, py, 0], [px, 0, 0]] m (rows along +y, columns along +x)
    /entry_1/instrument_1/detector_1/mask           [y, x] uint32 CXI pixel-mask bits, 0 = good
    /entry_1/data_1/data  -> soft link to detector_1/data      (the CXI "main data")
    /entry_1/data_1/mask  -> soft link to detector_1/mask
    /entry_1/image_1/data          hard link to detector_1/data  } the group that
    /entry_1/image_1/mask          hard link to detector_1/mask  } spi_processing and
    /entry_1/image_1/image_center  (cx, cy, 0) pixels            } spi_em_class read
    /entry_1/image_1/{data_type="intensity", data_space="diffraction", is_fft_shifted=0,
                      detector_1 -> soft link, source_1 -> soft link}
    /entry_1/image_1/<name>        optional per-frame datasets (``extra_frame_datasets``)

Masks
-----
In memory (arguments and :class:`CXIShots`) a mask is ``1`` for a good pixel. In the file
it follows CXI: a 32-bit flag word per pixel where **0 means good** and set bits say why a
pixel is bad (0x1 invalid, 0x10 shadowed e.g. by the beamstop, 0x200 missing e.g. a panel
gap, ...). spi_processing also treats ``mask == 0`` as good.

Beam centre
-----------
``beam_center_px = (cx, cy)`` in pixel coordinates where the centre of pixel ``[iy, ix]``
is at ``(ix, iy)`` (see :mod:`conveyor.spi.detector`). It is stored twice, consistently:
as ``image_1/image_center`` and through ``corner_position`` + ``basis_vectors``
(``corner = (-(cx + 0.5) px, -(cy + 0.5) py, distance)``). When reading, ``image_center``
wins (it is what SPI tools refine), then ``corner_position`` (with the file's
``basis_vectors`` or CXI's default ``[[0, -py, 0], [-px, 0, 0]]``), then the detector middle.

Units
-----
Geometry datasets without a ``units`` attribute must be SI. Values that look like mm, µm
or eV (distance > 10, pixel size > 1e-2, photon energy > 1e-12 J) are rejected with an
:class:`InputError` that says how to fix the file; datasets with a ``units`` attribute in
mm, µm, nm, eV or keV are converted.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from .. import backend
from ..errors import InputError
from .atomic import atomic_path

log = logging.getLogger(__name__)

CXI_VERSION = 160
ENTRY = "/entry_1"
DATA_PATH = "/entry_1/data_1/data"
DETECTOR = "/entry_1/instrument_1/detector_1"
SOURCE = "/entry_1/instrument_1/source_1"
IMAGE = "/entry_1/image_1"
DET_DATA = DETECTOR + "/data"
DET_MASK = DETECTOR + "/mask"
ENERGY_PATH = SOURCE + "/energy"
DISTANCE_PATH = DETECTOR + "/distance"
XPIX_PATH = DETECTOR + "/x_pixel_size"
YPIX_PATH = DETECTOR + "/y_pixel_size"
CORNER_PATH = DETECTOR + "/corner_position"
BASIS_PATH = DETECTOR + "/basis_vectors"
IMAGE_CENTER_PATH = IMAGE + "/image_center"

#: Where frames are looked for, in order (the first is the CXI standard location).
DATA_CANDIDATES = (DATA_PATH, DET_DATA, IMAGE + "/data")
#: Where the pixel mask is looked for, in order.
MASK_CANDIDATES = (DET_MASK, "/entry_1/data_1/mask", IMAGE + "/mask")
#: Default CXIDB-58 (amo86615 PR772) dataset of photon-converted pnCCD frames.
CXIDB58_DATASET = "photonConverter/pnccdBack/photonCount"
#: Unbinned pnCCD pixel pitch, m.
PNCCD_PIXEL_M = 75e-6

EV_J = 1.602176634e-19
HC_JM = 6.62607015e-34 * 299792458.0
MASK_BAD_DEFAULT = 0x1  # CXI "invalid" bit for pixels flagged bad by a 0/1 mask
_RESERVED_IMAGE_NAMES = {"data", "mask", "image_center", "data_type", "data_space", "is_fft_shifted", "detector_1", "source_1"}

_LENGTH_UNITS = {
    "m": 1.0, "meter": 1.0, "meters": 1.0, "metre": 1.0, "metres": 1.0,
    "cm": 1e-2, "mm": 1e-3, "millimeter": 1e-3, "millimetre": 1e-3,
    "um": 1e-6, "µm": 1e-6, "μm": 1e-6, "micron": 1e-6, "microns": 1e-6, "micrometer": 1e-6,
    "nm": 1e-9, "a": 1e-10, "å": 1e-10, "angstrom": 1e-10, "angstroms": 1e-10,
}
_ENERGY_UNITS = {"j": 1.0, "joule": 1.0, "joules": 1.0, "ev": EV_J, "kev": 1e3 * EV_J}


# ---------------------------------------------------------------------------------------
# data classes
# ---------------------------------------------------------------------------------------
class LazyFrames:
    """Frames of a CXI file read on demand (``len``, ``shape``, ``dtype``, indexing, ``chunks``).

    Indexing with an int, slice or index array reads only those frames; the file is
    opened for each read, so the object can be passed between processes.
    """

    def __init__(self, path, dataset: str, indices: np.ndarray, frame_shape, dtype):
        self.path = Path(path)
        self.dataset = dataset
        self.indices = np.asarray(indices, dtype=np.int64)
        self.frame_shape = tuple(frame_shape)
        self.dtype = np.dtype(dtype)

    def __len__(self):
        return int(self.indices.size)

    @property
    def shape(self):
        return (len(self),) + self.frame_shape

    @property
    def ndim(self):
        return 3

    def __getitem__(self, key):
        sel = self.indices[key]
        scalar = np.ndim(sel) == 0
        with _open(self.path) as f:
            out = _read_frames(self.path, f[self.dataset], self.dataset, np.atleast_1d(sel))
        return out[0] if scalar else out

    def __array__(self, dtype=None, copy=None):
        arr = self[:]
        return arr if dtype is None else arr.astype(dtype)

    def chunks(self, size: int = 256):
        """Yield ``(start, frames)`` blocks of at most ``size`` frames."""
        for start in range(0, len(self), int(size)):
            yield start, self[start : start + int(size)]


@dataclass
class CXIShots:
    """Frames and geometry of one CXI file (SI units; mask 1 = good pixel).

    Attributes
    ----------
    path : Path
    data : numpy.ndarray or LazyFrames
        ``[n, y, x]`` photons (``LazyFrames`` when read with ``lazy=True``).
    mask : numpy.ndarray
        ``[y, x]`` uint8, 1 = good pixel.
    mask_bits : numpy.ndarray
        ``[y, x]`` uint32 CXI flags as stored (0 = good).
    energy_J, wavelength_m, distance_m : float or None
    pixel_size_m : float or None
        Pixel pitch along x (columns), m.
    pixel_size_xy_m : (px, py) or None
        Pitch along x and y (they differ only for non-square pixels).
    beam_center_px : (cx, cy)
    beam_center_source : str
        ``"image_center"``, ``"corner_position"`` or ``"default"`` (detector middle).
    frame_indices : numpy.ndarray
        Indices in the file of the frames in ``data``.
    n_frames_total : int
        Frames in the file.
    data_path : str
        HDF5 path the frames came from.
    extra : dict
        Per-frame datasets found in ``/entry_1/image_1`` (subset to ``frame_indices``).
    """

    path: Path
    data: object
    mask: np.ndarray
    mask_bits: np.ndarray
    energy_J: float | None
    wavelength_m: float | None
    distance_m: float | None
    pixel_size_m: float | None
    beam_center_px: tuple[float, float]
    beam_center_source: str
    frame_indices: np.ndarray
    n_frames_total: int
    data_path: str = DATA_PATH
    extra: dict = field(default_factory=dict)
    pixel_size_xy_m: tuple[float, float] | None = None

    def __post_init__(self):
        if self.pixel_size_xy_m is None and self.pixel_size_m is not None:
            self.pixel_size_xy_m = (float(self.pixel_size_m), float(self.pixel_size_m))

    @property
    def frame_shape(self) -> tuple[int, int]:
        return tuple(self.mask.shape)

    @property
    def n_frames(self) -> int:
        return len(self.data)

    @property
    def photon_energy_eV(self) -> float | None:
        return None if self.energy_J is None else self.energy_J / EV_J

    def require_geometry(self) -> None:
        """Raise :class:`InputError` naming the missing geometry datasets."""
        missing = []
        if self.energy_J is None:
            missing.append(ENERGY_PATH)
        if self.distance_m is None:
            missing.append(DISTANCE_PATH)
        if self.pixel_size_m is None:
            missing.append(XPIX_PATH)
        if missing:
            raise InputError(
                self.path,
                f"geometry dataset(s) {', '.join(missing)} missing",
                "add them in SI units (J, m), or set photon energy, distance and pixel size in the spi: config",
            )

    def geometry(self):
        """The :class:`conveyor.spi.detector.DetectorGeometry` of these shots."""
        from ..spi.detector import DetectorGeometry

        self.require_geometry()
        return DetectorGeometry(self.frame_shape, self.pixel_size_xy_m, self.distance_m, self.wavelength_m, self.beam_center_px)


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def _open(path, mode="r"):
    path = Path(path)
    if mode == "r" and not path.exists():
        raise InputError(path, "file does not exist", "check the path or the shots glob in the config")
    try:
        f = h5py.File(path, mode)
    except OSError as exc:
        raise InputError(
            path,
            f"not a readable HDF5/CXI file ({exc})",
            "the file is truncated or corrupt: re-copy it, or remove it from the shots glob",
        ) from None
    try:
        yield f
    finally:
        f.close()


def _units(dset) -> str | None:
    u = dset.attrs.get("units")
    if u is None:
        return None
    if isinstance(u, bytes):
        u = u.decode(errors="replace")
    if isinstance(u, np.ndarray):
        u = u.ravel()[0]
        u = u.decode(errors="replace") if isinstance(u, bytes) else str(u)
    return str(u).strip()


def _read_value(path, f, dpath):
    try:
        val = np.asarray(f[dpath][()], dtype=np.float64)
    except (OSError, TypeError, ValueError) as exc:
        raise InputError(path, f"dataset {dpath} cannot be read as numbers ({exc})", "rewrite it as a float dataset") from None
    if not np.all(np.isfinite(val)):
        raise InputError(path, f"dataset {dpath} holds NaN or infinite values", "write the real value (SI units)")
    return val


def _length(path, f, dpath, *, kind: str):
    """Read a length dataset in m, honouring ``units`` and rejecting unit-less non-SI values."""
    if dpath not in f:
        return None
    dset = f[dpath]
    val = _read_value(path, f, dpath)
    units = _units(dset)
    if units is not None:
        factor = _LENGTH_UNITS.get(units.lower())
        if factor is None:
            raise InputError(path, f"dataset {dpath} has units={units!r}, which is not a length unit Conveyor knows", "use m, mm, um or nm")
        return val * factor
    if kind == "distance":
        big = float(np.max(np.abs(val[..., 2] if val.ndim and val.shape[-1] == 3 and dpath.endswith("corner_position") else val)))
        if big > 10.0:
            raise InputError(
                path,
                f"dataset {dpath} = {big:g} has no 'units' attribute and looks like mm (CXI lengths are metres)",
                f"store {big * 1e-3:g} (m), or add the attribute units='mm' to the dataset",
            )
    elif kind == "pixel":
        big = float(np.max(np.abs(val)))
        if big > 1e-2:
            guess, factor = ("µm", 1e-6) if big >= 1.0 else ("mm", 1e-3)
            raise InputError(
                path,
                f"dataset {dpath} = {big:g} has no 'units' attribute and looks like {guess} (CXI lengths are metres)",
                f"store {big * factor:g} (m), or add the attribute units='{'um' if guess == 'µm' else 'mm'}' to the dataset",
            )
    return val


def _energy(path, f):
    if ENERGY_PATH not in f:
        return None
    dset = f[ENERGY_PATH]
    val = _read_value(path, f, ENERGY_PATH)
    units = _units(dset)
    if units is not None:
        factor = _ENERGY_UNITS.get(units.lower())
        if factor is None:
            raise InputError(path, f"dataset {ENERGY_PATH} has units={units!r}, not an energy unit Conveyor knows", "use J, eV or keV")
        val = val * factor
    else:
        big = float(np.max(np.abs(val)))
        if big > 1e-12:
            raise InputError(
                path,
                f"dataset {ENERGY_PATH} = {big:g} has no 'units' attribute and looks like eV (CXI photon energy is in J)",
                f"store {big * EV_J:.6g} (J), or add the attribute units='eV' to the dataset",
            )
    val = np.ravel(val)
    if val.size == 0 or not np.all(val > 0):
        raise InputError(path, f"dataset {ENERGY_PATH} must be positive", "store the photon energy in J")
    return float(np.median(val))


def _scalar(path, dpath, val):
    if val is None:
        return None
    v = np.ravel(val)
    if v.size == 0:
        raise InputError(path, f"dataset {dpath} is empty", "store one value (SI units)")
    if v.size > 1 and np.ptp(v) > 1e-6 * abs(np.median(v)):
        log.warning("%s: %s varies between frames (%g..%g); using the median", path, dpath, v.min(), v.max())
    out = float(np.median(v))
    if not out > 0:
        raise InputError(path, f"dataset {dpath} = {out:g} must be positive", "store the value in SI units")
    return out


def _find_data(path, f):
    for cand in DATA_CANDIDATES:
        if cand in f:
            obj = f[cand]
            if isinstance(obj, h5py.Dataset):
                return cand, obj
    raise InputError(
        path,
        f"no frames: dataset {DATA_PATH} is missing (also looked at {', '.join(DATA_CANDIDATES[1:])})",
        f"write the frames [n, y, x] to {DATA_PATH}, or convert plain HDF5 with `conveyor io import-cxidb`",
    )


def _frame_shape(path, dpath, dset):
    if dset.ndim == 2:
        return tuple(dset.shape)
    if dset.ndim != 3:
        raise InputError(path, f"dataset {dpath} has shape {dset.shape}; expected [n, y, x] frames", "store frames as a 3D array")
    return tuple(dset.shape[1:])


def _read_mask(path, f, frame_shape):
    for cand in MASK_CANDIDATES:
        if cand in f and isinstance(f[cand], h5py.Dataset):
            m = f[cand]
            if m.ndim == 3 and m.shape[0] == 1:
                arr = np.asarray(m[0])
            else:
                arr = np.asarray(m[()])
            if arr.shape != tuple(frame_shape):
                raise InputError(
                    path,
                    f"mask {cand} has shape {arr.shape} but the frames are {tuple(frame_shape)}",
                    "write a [y, x] mask with the frame shape (CXI: 0 = good pixel)",
                )
            if arr.dtype.kind == "f":
                if not np.all(np.isfinite(arr)):
                    raise InputError(path, f"mask {cand} holds NaN", "write an integer mask (CXI: 0 = good pixel)")
                arr = arr.astype(np.int64)
            bits = arr.astype(np.uint32)
            return bits, cand
    return np.zeros(frame_shape, dtype=np.uint32), None


def _read_frames(path, dset, dpath, indices):
    idx = np.asarray(indices, dtype=np.int64)
    try:
        if dset.ndim == 2:
            if idx.size and (idx.min() < 0 or idx.max() > 0):
                raise IndexError
            out = np.repeat(np.asarray(dset[()])[None], idx.size, axis=0)
        elif idx.size == 0:
            out = np.empty((0,) + dset.shape[1:], dtype=dset.dtype)
        else:
            if idx.min() < 0 or idx.max() >= dset.shape[0]:
                raise IndexError
            uniq, inverse = np.unique(idx, return_inverse=True)
            if uniq.size == uniq[-1] - uniq[0] + 1:
                block = dset[int(uniq[0]) : int(uniq[-1]) + 1]
            else:
                block = dset[uniq]
            out = block[inverse]
    except IndexError:
        n = dset.shape[0] if dset.ndim == 3 else 1
        raise InputError(path, f"frame index out of range for {dpath} ({n} frames)", "ask for frames 0..n-1") from None
    except OSError as exc:
        raise InputError(path, f"dataset {dpath} cannot be read ({exc})", "the file is corrupt or truncated: re-copy it") from None
    if out.dtype.kind == "f":
        bad = ~np.isfinite(out)
        if bad.any():
            first = int(idx[np.argmax(bad.reshape(bad.shape[0], -1).any(axis=1))])
            raise InputError(
                path,
                f"dataset {dpath} holds NaN or infinite values (first in frame {first})",
                "write 0 photons and flag those pixels in the mask, or drop the frame",
            )
    return out


def _frame_indices(path, frames, n_total):
    if frames is None:
        return np.arange(n_total, dtype=np.int64)
    if isinstance(frames, slice):
        return np.arange(n_total, dtype=np.int64)[frames]
    idx = np.atleast_1d(np.asarray(frames, dtype=np.int64))
    idx = np.where(idx < 0, idx + n_total, idx)
    if idx.size and (idx.min() < 0 or idx.max() >= n_total):
        raise InputError(path, f"frame index out of range (file holds {n_total} frames)", "ask for frames 0..n-1")
    return idx


def _beam_center(path, f, frame_shape, pixel_size):
    if IMAGE_CENTER_PATH in f:
        c = _read_value(path, f, IMAGE_CENTER_PATH).ravel()
        if c.size < 2:
            raise InputError(path, f"dataset {IMAGE_CENTER_PATH} must hold (x, y[, z]) in pixels", "rewrite it")
        return (float(c[0]), float(c[1])), "image_center"
    if CORNER_PATH in f and pixel_size is not None:
        corner = _length(path, f, CORNER_PATH, kind="distance").reshape(-1, 3)[0]
        px, py = pixel_size
        if BASIS_PATH in f:
            basis = _length(path, f, BASIS_PATH, kind="pixel").reshape(-1, 2, 3)[0]
        else:
            basis = np.array([[0.0, -py, 0.0], [-px, 0.0, 0.0]])
        a = np.array([[basis[0, 0], basis[1, 0]], [basis[0, 1], basis[1, 1]]])
        try:
            iy, ix = np.linalg.solve(a, -corner[:2])
        except np.linalg.LinAlgError:
            raise InputError(path, f"dataset {BASIS_PATH} is singular in x/y", "write the detector basis vectors (m)") from None
        return (float(ix - 0.5), float(iy - 0.5)), "corner_position"
    ny, nx = frame_shape
    return ((nx - 1) / 2.0, (ny - 1) / 2.0), "default"


# ---------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------
def read_cxi(path, frames=None, *, lazy: bool = False, load_extra: bool = True) -> CXIShots:
    """Read frames, mask and geometry of a CXI file.

    Parameters
    ----------
    path : str or Path
    frames : None, int, slice or sequence of int
        Frames to read (all by default).
    lazy : bool
        Return ``data`` as :class:`LazyFrames` (read on access) instead of an array.
    load_extra : bool
        Also read per-frame datasets of ``/entry_1/image_1``.

    Raises
    ------
    InputError
        For a missing file, a corrupt HDF5 file, missing frames (``/entry_1/data_1/data``),
        a mask whose shape differs from the frames, geometry in non-SI units without a
        ``units`` attribute, or NaN values.
    """
    path = Path(path)
    with _open(path) as f:
        dpath, dset = _find_data(path, f)
        frame_shape = _frame_shape(path, dpath, dset)
        n_total = int(dset.shape[0]) if dset.ndim == 3 else 1
        idx = _frame_indices(path, frames, n_total)
        bits, _ = _read_mask(path, f, frame_shape)
        energy = _energy(path, f)
        distance = _scalar(path, DISTANCE_PATH, _length(path, f, DISTANCE_PATH, kind="distance"))
        xps = _scalar(path, XPIX_PATH, _length(path, f, XPIX_PATH, kind="pixel"))
        yps = _scalar(path, YPIX_PATH, _length(path, f, YPIX_PATH, kind="pixel"))
        if xps is None and yps is not None:
            xps = yps
        if yps is None and xps is not None:
            yps = xps
        pixel = None if xps is None else (xps, yps)
        center, center_src = _beam_center(path, f, frame_shape, pixel)
        if lazy:
            data = LazyFrames(path, dpath, idx, frame_shape, dset.dtype)
        else:
            data = _read_frames(path, dset, dpath, idx)
        extra = {}
        if load_extra and IMAGE in f and isinstance(f[IMAGE], h5py.Group):
            for name, obj in f[IMAGE].items():
                if name in _RESERVED_IMAGE_NAMES or not isinstance(obj, h5py.Dataset):
                    continue
                if obj.ndim >= 1 and obj.shape[0] == n_total and obj.ndim <= 2:
                    extra[name] = np.asarray(obj[()])[idx]
    wavelength = None if energy is None else HC_JM / energy
    return CXIShots(
        path=path,
        data=data,
        mask=(bits == 0).astype(np.uint8),
        mask_bits=bits,
        energy_J=energy,
        wavelength_m=wavelength,
        distance_m=distance,
        pixel_size_m=None if pixel is None else pixel[0],
        beam_center_px=center,
        beam_center_source=center_src,
        frame_indices=idx,
        n_frames_total=n_total,
        data_path=dpath,
        extra=extra,
        pixel_size_xy_m=pixel,
    )


def cxi_info(path) -> dict:
    """Summary of a CXI file without reading the frames (geometry, counts, mask)."""
    shots = read_cxi(path, lazy=True, load_extra=False)
    path = Path(path)
    with _open(path) as f:
        dset = f[shots.data_path]
        version = int(np.asarray(f["cxi_version"][()]).ravel()[0]) if "cxi_version" in f else None
        compression = dset.compression
        has_image = IMAGE + "/data" in f
    info = {
        "path": str(path),
        "cxi_version": version,
        "data_path": shots.data_path,
        "n_frames": shots.n_frames_total,
        "frame_shape": list(shots.frame_shape),
        "dtype": str(shots.data.dtype),
        "compression": compression,
        "photon_energy_J": shots.energy_J,
        "photon_energy_eV": shots.photon_energy_eV,
        "wavelength_m": shots.wavelength_m,
        "distance_m": shots.distance_m,
        "pixel_size_m": shots.pixel_size_m,
        "pixel_size_xy_m": None if shots.pixel_size_xy_m is None else list(shots.pixel_size_xy_m),
        "beam_center_px": list(shots.beam_center_px),
        "beam_center_source": shots.beam_center_source,
        "good_pixels": int(shots.mask.sum()),
        "total_pixels": int(shots.mask.size),
        "has_image_group": bool(has_image),
    }
    if shots.energy_J and shots.distance_m and shots.pixel_size_m:
        geom = shots.geometry()
        qmax = geom.max_q(shots.mask)
        info["q_max_per_m"] = qmax
        info["resolution_full_period_m"] = 1.0 / qmax if qmax > 0 else None
    return info


def iter_frames(path, chunk: int = 256):
    """Yield ``(start, frames [k, y, x])`` blocks of a CXI file without loading it all."""
    shots = read_cxi(path, lazy=True, load_extra=False)
    yield from shots.data.chunks(chunk)


# ---------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------
def _mask_bits_from_good(mask, frame_shape, where="mask"):
    if mask is None:
        return np.zeros(frame_shape, dtype=np.uint32)
    m = np.asarray(backend.to_host(mask))
    if m.shape != tuple(frame_shape):
        raise InputError(where, f"mask has shape {m.shape} but the frames are {tuple(frame_shape)}", "pass a [y, x] mask with the frame shape")
    return np.where(m.astype(bool), 0, MASK_BAD_DEFAULT).astype(np.uint32)


def _geometry_args(path, frame_shape, pixel_size_m, corner_position_m, beam_center_px, basis_vectors_m):
    px, py = (float(pixel_size_m), float(pixel_size_m)) if np.isscalar(pixel_size_m) else tuple(map(float, pixel_size_m))
    if corner_position_m is not None and beam_center_px is not None:
        raise InputError(path, "give either corner_position_m or beam_center_px, not both", "pass one of them")
    if corner_position_m is not None:
        corner = np.asarray(corner_position_m, dtype=np.float64).reshape(3)
        basis = (
            np.array([[0.0, -py, 0.0], [-px, 0.0, 0.0]])
            if basis_vectors_m is None
            else np.asarray(basis_vectors_m, dtype=np.float64).reshape(2, 3)
        )
        a = np.array([[basis[0, 0], basis[1, 0]], [basis[0, 1], basis[1, 1]]])
        iy, ix = np.linalg.solve(a, -corner[:2])
        center = (float(ix - 0.5), float(iy - 0.5))
    else:
        if beam_center_px is None:
            beam_center_px = ((frame_shape[1] - 1) / 2.0, (frame_shape[0] - 1) / 2.0)
        cx, cy = map(float, beam_center_px)
        center = (cx, cy)
        basis = np.array([[0.0, py, 0.0], [px, 0.0, 0.0]])
        corner = None  # filled in by the caller with the distance
    return px, py, center, corner, basis


class CXIWriter:
    """Write a CXI file frame block by frame block, atomically.

    Use as a context manager; :meth:`append` adds ``[k, y, x]`` frames. The file appears
    at ``path`` only when the block exits without error. See :func:`write_cxi` for the
    parameters and the module docstring for the layout.
    """

    def __init__(
        self,
        path,
        frame_shape,
        dtype,
        mask=None,
        photon_energy_J=None,
        detector_distance_m=None,
        pixel_size_m=None,
        corner_position_m=None,
        beam_center_px=None,
        *,
        basis_vectors_m=None,
        mask_bits=None,
        compression_level: int = 4,
    ):
        self.path = Path(path)
        self.frame_shape = (int(frame_shape[0]), int(frame_shape[1]))
        self.dtype = np.dtype(np.uint8 if np.dtype(dtype) == np.bool_ else dtype)
        for name, val in (("photon_energy_J", photon_energy_J), ("detector_distance_m", detector_distance_m), ("pixel_size_m", pixel_size_m)):
            if val is None:
                raise InputError(self.path, f"{name} is required to write a CXI file", "pass it in SI units")
        if not (0 < float(photon_energy_J) < 1e-12):
            raise InputError(self.path, f"photon_energy_J = {photon_energy_J:g} is not a photon energy in J", "convert eV to J (x 1.602176634e-19)")
        if not (0 < float(detector_distance_m) <= 10):
            raise InputError(self.path, f"detector_distance_m = {detector_distance_m:g} is not a distance in m", "give the distance in metres")
        ps = np.atleast_1d(np.asarray(pixel_size_m, dtype=np.float64))
        if not np.all((ps > 0) & (ps <= 1e-2)):
            raise InputError(self.path, f"pixel_size_m = {pixel_size_m} is not a pixel size in m", "give the pixel size in metres (e.g. 75e-6)")
        self.energy = float(photon_energy_J)
        self.distance = float(detector_distance_m)
        self.px, self.py, self.center, corner, self.basis = _geometry_args(
            self.path, self.frame_shape, pixel_size_m, corner_position_m, beam_center_px, basis_vectors_m
        )
        if corner is None:
            corner = np.array([-(self.center[0] + 0.5) * self.px, -(self.center[1] + 0.5) * self.py, self.distance])
        self.corner = corner
        if mask_bits is not None:
            bits = np.asarray(backend.to_host(mask_bits)).astype(np.uint32)
            if bits.shape != self.frame_shape:
                raise InputError(self.path, f"mask_bits has shape {bits.shape} but the frames are {self.frame_shape}", "pass a [y, x] array")
            self.bits = bits
        else:
            self.bits = _mask_bits_from_good(mask, self.frame_shape, where=self.path)
        self.level = int(compression_level)
        self.n = 0
        self._extra = {}
        self._ctx = None
        self._f = None

    # context management -----------------------------------------------------------
    def __enter__(self):
        self._ctx = atomic_path(self.path)
        tmp = self._ctx.__enter__()
        try:
            self._f = h5py.File(tmp, "w")
            self._write_static()
        except BaseException as exc:
            if self._f is not None:
                self._f.close()
            self._ctx.__exit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    def __exit__(self, et, ev, tb):
        err = ev
        try:
            if et is None:
                self._finish()
        except BaseException as exc:  # a failed finish must not leave a file behind
            err = exc
        finally:
            if self._f is not None:
                self._f.close()
                self._f = None
        if err is None:
            self._ctx.__exit__(None, None, None)
            return False
        self._ctx.__exit__(type(err), err, err.__traceback__)
        if err is not ev:
            raise err
        return False

    def _write_static(self):
        f = self._f
        f.create_dataset("cxi_version", data=np.int32(CXI_VERSION))
        src = f.require_group(SOURCE)
        d = src.create_dataset("energy", data=self.energy)
        d.attrs["units"] = "J"
        d.attrs["description"] = f"photon energy ({self.energy / EV_J:.3f} eV)"
        det = f.require_group(DETECTOR)
        ny, nx = self.frame_shape
        data = det.create_dataset(
            "data",
            shape=(0, ny, nx),
            maxshape=(None, ny, nx),
            dtype=self.dtype,
            chunks=(1, ny, nx),
            compression="gzip",
            compression_opts=self.level,
            shuffle=True,
        )
        data.attrs["axes"] = "experiment_identifier:y:x"
        data.attrs["units"] = "photons"
        for name, val, units in (
            ("distance", self.distance, "m"),
            ("x_pixel_size", self.px, "m"),
            ("y_pixel_size", self.py, "m"),
            ("corner_position", self.corner, "m"),
            ("basis_vectors", self.basis, "m"),
        ):
            d = det.create_dataset(name, data=np.asarray(val, dtype=np.float64))
            d.attrs["units"] = units
        det["corner_position"].attrs["description"] = "x, y, z of the outer corner of pixel [0, 0] relative to the interaction point"
        det["basis_vectors"].attrs["description"] = "row 0: step between rows (+y); row 1: step between columns (+x)"
        m = det.create_dataset("mask", data=self.bits, dtype=np.uint32)
        m.attrs["description"] = "CXI pixel mask bits: 0 = good; 0x1 invalid, 0x10 shadowed (beamstop), 0x200 missing (gap)"
        data1 = f.require_group("/entry_1/data_1")
        data1["data"] = h5py.SoftLink(DET_DATA)
        data1["mask"] = h5py.SoftLink(DET_MASK)
        img = f.require_group(IMAGE)
        img["data"] = det["data"]  # hard links: spi_processing reads image_1/{data,mask}
        img["mask"] = det["mask"]
        c = img.create_dataset("image_center", data=np.array([self.center[0], self.center[1], 0.0]))
        c.attrs["description"] = "beam centre (x, y, z) in pixels; pixel [iy, ix] is centred at (ix, iy)"
        img.create_dataset("data_type", data="intensity")
        img.create_dataset("data_space", data="diffraction")
        img.create_dataset("is_fft_shifted", data=np.int32(0))
        img["detector_1"] = h5py.SoftLink(DETECTOR)
        img["source_1"] = h5py.SoftLink(SOURCE)

    def append(self, frames):
        """Add ``[k, y, x]`` (or one ``[y, x]``) frames."""
        arr = np.asarray(backend.to_host(frames))
        if arr.ndim == 2:
            arr = arr[None]
        if arr.shape[1:] != self.frame_shape:
            raise InputError(self.path, f"frames have shape {arr.shape[1:]} but the file holds {self.frame_shape}", "write frames of one shape per file")
        if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
            raise InputError(self.path, "frames hold NaN or infinite values", "write 0 and flag the pixels in the mask")
        dset = self._f[DET_DATA]
        k = arr.shape[0]
        dset.resize(self.n + k, axis=0)
        dset[self.n : self.n + k] = arr.astype(self.dtype, copy=False)
        self.n += k

    def add_frame_dataset(self, name: str, values):
        """Store a per-frame array (first axis = frames) as ``/entry_1/image_1/<name>``."""
        if name in _RESERVED_IMAGE_NAMES or "/" in name:
            raise InputError(self.path, f"per-frame dataset name {name!r} is reserved or not a plain name", "choose another name")
        self._extra[name] = np.asarray(backend.to_host(values))

    def _finish(self):
        if self.n == 0:
            raise InputError(self.path, "no frames were written", "pass at least one frame")
        img = self._f[IMAGE]
        for name, val in self._extra.items():
            if val.shape[:1] != (self.n,):
                raise InputError(self.path, f"per-frame dataset {name!r} has {val.shape[:1]} entries for {self.n} frames", "give one value per frame")
            img.create_dataset(name, data=val)


def write_cxi(
    path,
    data,
    mask=None,
    photon_energy_J=None,
    detector_distance_m=None,
    pixel_size_m=None,
    corner_position_m=None,
    beam_center_px=None,
    extra_frame_datasets=None,
    *,
    basis_vectors_m=None,
    mask_bits=None,
    compression_level: int = 4,
) -> Path:
    """Write XFEL shots to a CXI file atomically (layout in the module docstring).

    Parameters
    ----------
    path : str or Path
    data : array_like
        ``[n, y, x]`` photons per pixel (integers for photon-converted data); numpy or cupy.
    mask : array_like, optional
        ``[y, x]``, 1 (or True) = good pixel. Stored as CXI bits (bad pixels get 0x1).
    photon_energy_J : float
        Photon energy in J (eV × 1.602176634e-19).
    detector_distance_m : float
        Interaction point to detector, m.
    pixel_size_m : float or (px, py)
        Pixel pitch, m.
    corner_position_m : (x, y, z), optional
        CXI corner of pixel [0, 0] in m, with ``basis_vectors_m`` (default CXI's
        ``[[0, -py, 0], [-px, 0, 0]]``). Alternative to ``beam_center_px``.
    beam_center_px : (cx, cy), optional
        Direct-beam position in pixels (default: the detector middle).
    extra_frame_datasets : dict, optional
        ``{name: array with one entry per frame}`` written to ``/entry_1/image_1/<name>``.
    mask_bits : array_like, optional
        ``[y, x]`` CXI flag words (0 = good) stored as given instead of ``mask``.
    compression_level : int
        gzip level (frames are chunked one per chunk).

    Returns
    -------
    Path of the written file.
    """
    arr = np.asarray(backend.to_host(data))
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise InputError(path, f"data has shape {arr.shape}; expected [n, y, x]", "pass a stack of frames")
    with CXIWriter(
        path,
        arr.shape[1:],
        arr.dtype,
        mask,
        photon_energy_J,
        detector_distance_m,
        pixel_size_m,
        corner_position_m,
        beam_center_px,
        basis_vectors_m=basis_vectors_m,
        mask_bits=mask_bits,
        compression_level=compression_level,
    ) as w:
        w.append(arr)
        for name, val in (extra_frame_datasets or {}).items():
            w.add_frame_dataset(name, val)
    return Path(path)


# ---------------------------------------------------------------------------------------
# CXIDB-58-style import
# ---------------------------------------------------------------------------------------
def _walk_datasets(f):
    found = []
    f.visititems(lambda name, obj: found.append((name, obj)) if isinstance(obj, h5py.Dataset) else None)
    return found


def _suffix_units(name: str):
    n = name.lower()
    for suf, unit in (("_kev", "keV"), ("_ev", "eV"), ("_j", "J"), ("_mm", "mm"), ("_um", "um"), ("_nm", "nm"), ("_angstrom", "A"), ("_a", "A"), ("_m", "m")):
        if n.endswith(suf):
            return unit
    return None


def _find_photon_energy_J(path, f):
    """Photon energy (J) from datasets named like photon_energy / wavelength, or None."""
    for name, obj in _walk_datasets(f):
        base = name.rsplit("/", 1)[-1].lower()
        if not (("photon" in base and "energy" in base) or "wavelength" in base):
            continue
        try:
            val = np.asarray(obj[()], dtype=np.float64).ravel()
        except (TypeError, ValueError, OSError):
            continue
        val = val[np.isfinite(val) & (val > 0)]
        if val.size == 0:
            continue
        v = float(np.median(val))
        unit = _units(obj) or _suffix_units(base)
        if "wavelength" in base:
            if unit is None:
                unit = "m" if v < 1e-6 else ("A" if v < 100 else None)
            factor = _LENGTH_UNITS.get(unit.lower()) if unit else None
            if factor is None:
                continue
            return HC_JM / (v * factor), f"/{name}"
        if unit is None:
            unit = "J" if v < 1e-12 else ("eV" if 10 < v < 1e6 else None)
        factor = _ENERGY_UNITS.get(unit.lower()) if unit else None
        if factor is None:
            continue
        return v * factor, f"/{name}"
    return None, None


def _find_distance_m(path, f):
    for name, obj in _walk_datasets(f):
        base = name.rsplit("/", 1)[-1].lower()
        if not ("distance" in base or base in ("detd", "clen", "detector_z")):
            continue
        try:
            val = np.asarray(obj[()], dtype=np.float64).ravel()
        except (TypeError, ValueError, OSError):
            continue
        val = val[np.isfinite(val) & (val > 0)]
        if val.size == 0:
            continue
        v = float(np.median(val))
        unit = _units(obj) or _suffix_units(base)
        if unit is None:
            unit = "m" if v <= 10 else "mm"
        factor = _LENGTH_UNITS.get(unit.lower())
        if factor is None:
            continue
        return v * factor, f"/{name}"
    return None, None


def _load_mask_file(mask_path, frame_shape, zero_is_good):
    mask_path = Path(mask_path)
    if not mask_path.exists():
        raise InputError(mask_path, "mask file does not exist", "check the --mask path")
    if mask_path.suffix.lower() == ".npy":
        try:
            m = np.load(mask_path, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise InputError(mask_path, f"not a readable .npy mask ({exc})", "save it with numpy.save") from None
        where = "array"
    else:
        with _open(mask_path) as f:
            cands = [(n, o) for n, o in _walk_datasets(f) if o.ndim == 2]
            named = [c for c in cands if c[0].rsplit("/", 1)[-1].lower() == "mask"]
            pick = named or cands
            if len(pick) != 1:
                names = ", ".join("/" + n for n, _ in cands) or "none"
                raise InputError(mask_path, f"cannot tell which 2D dataset is the mask (2D datasets: {names})", "keep one 2D dataset named 'mask' in the file")
            where, obj = "/" + pick[0][0], pick[0][1]
            m = np.asarray(obj[()])
    if m.shape != tuple(frame_shape):
        raise InputError(mask_path, f"mask {where} has shape {m.shape} but the frames are {tuple(frame_shape)}", "use a mask made for this detector (same binning)")
    if m.dtype.kind == "f" and not np.all(np.isfinite(m)):
        raise InputError(mask_path, f"mask {where} holds NaN", "write 0/1 values")
    good = (m == 0) if zero_is_good else (m != 0)
    return good.astype(np.uint8)


def infer_pnccd_binning(frame_shape) -> int:
    """pnCCD binning guessed from the frame size: 1024 → 1, 512 → 2, ≤ 300 → 4 (CXIDB 58 is 4×4 binned)."""
    n = max(frame_shape)
    if n > 700:
        return 1
    if n > 300:
        return 2
    return 4


def import_cxidb(
    path,
    out_cxi,
    energy_eV: float | None = None,
    distance_m: float | None = None,
    pixel_size_m: float | None = None,
    mask=None,
    *,
    dataset: str = CXIDB58_DATASET,
    beam_center_px=None,
    mask_zero_is_good: bool = False,
    chunk_frames: int = 256,
) -> dict:
    """Convert a CXIDB-58-style plain HDF5 file (PR772, amo86615) to CXI.

    Parameters
    ----------
    path : str or Path
        HDF5 file holding ``photonConverter/pnccdBack/photonCount`` ``[n, y, x]`` photons.
    out_cxi : str or Path
        CXI file to write (atomically).
    energy_eV, distance_m : float, optional
        Photon energy (eV) and detector distance (m). When not given they are looked
        for in the file (datasets named like ``photon_energy_eV``, ``photon_wavelength_A``,
        ``detector_distance``; ``units`` attributes or name suffixes say the units). If
        still unknown, :class:`InputError` asks for them (amo86615: about 1.6 keV and
        0.586 m per Dragonfly's sample config).
    pixel_size_m : float, optional
        Pixel pitch in m; default 75 µm pnCCD pixels times the binning inferred from
        the frame size (:func:`infer_pnccd_binning`: 300 µm for the 4×4-binned CXIDB 58).
    mask : array, str or Path, optional
        ``[y, x]`` good-pixel mask (1 = good), or a ``.npy``/HDF5 file holding one.
    dataset : str
        HDF5 path of the frames.
    beam_center_px : (cx, cy), optional
        Default: the detector middle (estimate it with the SPI centre step).
    mask_zero_is_good : bool
        Read ``mask`` with 0 = good (CXI/Dragonfly style) instead of 1 = good.

    Returns
    -------
    dict with the values used and where they came from.
    """
    path = Path(path)
    out_cxi = Path(out_cxi)
    with _open(path) as f:
        key = dataset.strip("/")
        if key not in f or not isinstance(f[key], h5py.Dataset):
            three = ", ".join("/" + n for n, o in _walk_datasets(f) if o.ndim == 3) or "none"
            raise InputError(
                path,
                f"dataset /{key} is missing (3D datasets in the file: {three})",
                "pass --dataset with the path of the [n, y, x] photon counts",
            )
        dset = f[key]
        if dset.ndim != 3:
            raise InputError(path, f"dataset /{key} has shape {dset.shape}; expected [n, y, x] frames", "pass --dataset with the frames")
        n, ny, nx = (int(s) for s in dset.shape)
        frame_shape = (ny, nx)
        sources = {}
        if energy_eV is None:
            e_J, where = _find_photon_energy_J(path, f)
            if e_J is None:
                raise InputError(
                    path,
                    "no photon energy given and none found in the file",
                    "pass --photon-energy-ev (amo86615 PR772: ~1600 eV, Dragonfly's config uses 7.75 Å)",
                )
            sources["photon_energy"] = where
        else:
            if not (10 < float(energy_eV) < 1e6):
                raise InputError("--photon-energy-ev", f"{energy_eV} is not a photon energy in eV", "give it in eV, e.g. 1600")
            e_J = float(energy_eV) * EV_J
            sources["photon_energy"] = "argument"
        if distance_m is None:
            distance_m, where = _find_distance_m(path, f)
            if distance_m is None:
                raise InputError(
                    path,
                    "no detector distance given and none found in the file",
                    "pass --distance-m (amo86615 PR772 back pnCCD: 0.586 m per Dragonfly's config)",
                )
            sources["distance"] = where
        else:
            sources["distance"] = "argument"
        if not (0 < float(distance_m) <= 10):
            raise InputError("--distance-m", f"{distance_m} is not a distance in m", "give the detector distance in metres, e.g. 0.586")
        if pixel_size_m is None:
            binning = infer_pnccd_binning(frame_shape)
            pixel_size_m = PNCCD_PIXEL_M * binning
            sources["pixel_size"] = f"pnCCD 75 µm x {binning} (binning inferred from {ny}x{nx} frames)"
        else:
            if not (0 < float(pixel_size_m) <= 1e-2):
                raise InputError("--pixel-size-m", f"{pixel_size_m} is not a pixel size in m", "give it in metres, e.g. 300e-6")
            sources["pixel_size"] = "argument"
        if mask is None:
            good = np.ones(frame_shape, dtype=np.uint8)
            sources["mask"] = "none (all pixels good)"
        elif isinstance(mask, (str, Path)):
            good = _load_mask_file(mask, frame_shape, mask_zero_is_good)
            sources["mask"] = str(mask)
        else:
            m = np.asarray(backend.to_host(mask))
            if m.shape != frame_shape:
                raise InputError("mask", f"mask has shape {m.shape} but the frames in {path}:/{key} are {frame_shape}", "use a mask for this detector")
            good = ((m == 0) if mask_zero_is_good else (m != 0)).astype(np.uint8)
            sources["mask"] = "array"
        dtype = np.int32 if dset.dtype.kind in "iub" else np.float32
        negatives = 0
        with CXIWriter(
            out_cxi, frame_shape, dtype, good, e_J, float(distance_m), float(pixel_size_m), None, beam_center_px
        ) as w:
            for start in range(0, n, int(chunk_frames)):
                block = _read_frames(path, dset, "/" + key, np.arange(start, min(n, start + int(chunk_frames))))
                negatives += int(np.count_nonzero(block < 0))
                w.append(block)
            center = w.center
    if negatives:
        log.warning("%s: %d negative photon values copied unchanged", path, negatives)
    return {
        "input": str(path),
        "output": str(out_cxi),
        "dataset": "/" + key,
        "n_frames": n,
        "frame_shape": list(frame_shape),
        "photon_energy_eV": e_J / EV_J,
        "distance_m": float(distance_m),
        "pixel_size_m": float(pixel_size_m),
        "beam_center_px": list(center),
        "negative_values": negatives,
        "sources": sources,
    }
