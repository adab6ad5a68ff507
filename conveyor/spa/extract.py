"""Particle extraction: cut boxes, bin by Fourier cropping, invert, normalise the background.

Conventions
-----------
* Coordinates ``(x, y)`` are in pixels of the input micrograph with the origin at the
  image corner: ``x`` runs along columns, ``y`` along rows, and pixel ``[j, i]`` has
  coordinate ``(i, j)`` (RELION's rlnCoordinateX/Y).
* A particle at ``(x, y)`` is cut from the box of ``box`` px whose centre pixel is
  ``(round(x), round(y))``; inside the box that centre lies at index ``box // 2``
  (RELION's and the FFT's convention for even boxes), i.e. the box covers columns
  ``round(x) - box/2 ... round(x) + box/2 - 1``.
* Particles whose box is not entirely inside the micrograph are **skipped** (not padded):
  :func:`box_inside` tells which; the picker excludes such positions already.
* Binning by Fourier cropping keeps the centre pixel exactly: a box of ``N`` px cropped to
  ``M = N / bin`` px has the particle centre at index ``M // 2``. ``box / bin`` must be an
  even integer.
* Output images follow RELION: protein white (``invert=True`` flips the microscope's dark
  protein), background pixels (radius > ``bg_radius`` from the centre, in output px) have
  mean 0 and standard deviation 1 after an optional plane (ramp) fit is removed.
"""

from __future__ import annotations

import math

import numpy as np

from .. import backend
from ..errors import InputError

def fft_module(xp):
    """FFT functions for ``xp``: ``scipy.fft`` for numpy (keeps float32, faster), ``cupy.fft`` for cupy."""
    if xp is np:
        import scipy.fft as sfft  # noqa: PLC0415

        return sfft
    return xp.fft


RELION_BG_FRACTION = 0.375
"""RELION's default background radius: 75 % of the box diameter, i.e. 0.375 × box."""


def _is_smooth(n: int, primes=(2, 3, 5)) -> bool:
    for p in primes:
        while n % p == 0 and n > 1:
            n //= p
    return n == 1


def fft_friendly_size(n: float, multiple: int = 8) -> int:
    """Smallest size ≥ ``n`` that is a multiple of ``multiple`` and has only factors 2, 3, 5.

    With ``multiple=8`` the size stays even after binning by 2 and 4
    (64, 72, 80, 96, 120, 128, 144, 160, 192, 200, 216, 240, 256, 288, 320, 360, 384, ...).
    """
    m = max(int(multiple), 1)
    k = max(int(math.ceil(n / m)), 1)
    while not _is_smooth(k * m):
        k += 1
    return k * m


def default_box_size(particle_diameter: float, pixel_size: float, factor: float = 1.5, multiple: int = 8) -> int:
    """Box size in px for a particle: ``factor`` × diameter, rounded up by :func:`fft_friendly_size`.

    Parameters
    ----------
    particle_diameter : float
        Å (the longest dimension of the particle).
    pixel_size : float
        Å/px of the micrograph the box is cut from.
    factor : float
        Box / diameter; 1.5–2 keeps enough background around the particle for
        normalisation and for the CTF's delocalised signal.
    multiple : int
        The box is a multiple of this (8: binnable by 2 and 4 to even sizes).
    """
    if not (particle_diameter > 0 and pixel_size > 0):
        raise InputError("particle_diameter", "particle diameter and pixel size must be positive", "give both in Å")
    return fft_friendly_size(factor * particle_diameter / pixel_size, multiple)


def fourier_crop(images, new_size):
    """Downsample images by cropping their Fourier transform (anti-aliased binning).

    Parameters
    ----------
    images : array, ``[..., ny, nx]`` (numpy or cupy)
    new_size : int or (int, int)
        Output ``(my, mx)`` with ``my <= ny`` and ``mx <= nx``; an int means square.

    Returns
    -------
    array ``[..., my, mx]`` (float32) on the same device. Pixel values keep their scale
    (a constant image stays the same constant), so the result is the *mean* over the
    binned area, not the sum. The sampling origin is kept: output pixel ``u`` sits at input
    position ``u * ny / my``, so for even sizes the centre pixel ``n // 2`` maps exactly
    onto ``m // 2``.
    """
    xp = backend.array_module(images)
    a = xp.asarray(images, dtype=xp.float32)
    ny, nx = a.shape[-2:]
    my, mx = (int(new_size), int(new_size)) if np.isscalar(new_size) else (int(new_size[0]), int(new_size[1]))
    if my > ny or mx > nx or my < 1 or mx < 1:
        raise ValueError(f"fourier_crop: cannot crop {ny}x{nx} to {my}x{mx}")
    if (my, mx) == (ny, nx):
        return a.copy()
    fft = fft_module(xp)
    f = fft.rfft2(a)
    n_pos, n_neg = (my + 1) // 2, my // 2
    rows = f[..., :n_pos, : mx // 2 + 1]
    if n_neg:
        rows = xp.concatenate([rows, f[..., ny - n_neg :, : mx // 2 + 1]], axis=-2)
    out = fft.irfft2(rows, s=(my, mx))
    out *= (my * mx) / (ny * nx)
    return out.astype(xp.float32, copy=False)


def box_inside(shape, coords_xy, box: int):
    """Boolean mask (numpy) of particles whose ``box``-px box lies entirely inside an image of ``shape``.

    ``coords_xy`` is ``[n, 2]`` (x, y) in px, origin at the image corner.
    """
    c = np.asarray(backend.to_host(coords_xy), dtype=float).reshape(-1, 2)
    ny, nx = shape[-2:]
    h = int(box) // 2
    xi = np.rint(c[:, 0]).astype(np.int64)
    yi = np.rint(c[:, 1]).astype(np.int64)
    return (xi - h >= 0) & (yi - h >= 0) & (xi - h + int(box) <= nx) & (yi - h + int(box) <= ny)


def _radius_grid(n: int, xp):
    c = n // 2
    y, x = xp.meshgrid(xp.arange(n, dtype=xp.float32) - c, xp.arange(n, dtype=xp.float32) - c, indexing="ij")
    return x, y, xp.sqrt(x * x + y * y)


def normalise_background(stack, bg_radius: float | None = None, ramp: bool = True):
    """Normalise images so pixels outside a circle have mean 0 and sd 1 (RELION's ``--bg_radius``).

    Parameters
    ----------
    stack : array ``[n, m, m]`` (or one ``[m, m]`` image)
    bg_radius : float, optional
        Radius in px (of these images) beyond which pixels count as background;
        default 0.375 × m (RELION's default: 75 % of the box diameter).
    ramp : bool
        First fit a plane ``a + b x + c y`` to the background pixels and subtract it from the
        whole image (removes density gradients across the box).

    Returns
    -------
    array, float32, same shape.
    """
    xp = backend.array_module(stack)
    a = xp.asarray(stack, dtype=xp.float32)
    single = a.ndim == 2
    if single:
        a = a[None]
    n, m = a.shape[0], a.shape[-1]
    if bg_radius is None:
        bg_radius = RELION_BG_FRACTION * m
    x, y, r = _radius_grid(m, xp)
    bg = r > bg_radius
    nbg = int(bg.sum())
    if nbg < 8:
        raise InputError("bg_radius", f"background radius {bg_radius:g} px leaves only {nbg} background pixels in a {m}-px box", "use a smaller --bg-radius")
    idx = xp.flatnonzero(bg.ravel())
    vals = xp.take(a.reshape(n, -1), idx, axis=1)  # [n, nbg]
    if ramp:
        design = xp.stack([xp.ones(nbg, dtype=xp.float32), xp.take(x.ravel(), idx), xp.take(y.ravel(), idx)], axis=1)
        coef = vals @ xp.linalg.pinv(design).T  # [n, 3]
        a = a - (coef[:, 0, None, None] + coef[:, 1, None, None] * x + coef[:, 2, None, None] * y)
        vals = xp.take(a.reshape(n, -1), idx, axis=1)
    mean = vals.mean(axis=1)
    sd = vals.std(axis=1)
    sd = xp.where(sd > 0, sd, 1.0)
    out = ((a - mean[:, None, None]) / sd[:, None, None]).astype(xp.float32)
    return out[0] if single else out


def extract_particles(
    image,
    coords_xy,
    box: int,
    bin: int = 1,  # noqa: A002  (RELION's word for it)
    invert: bool = True,
    bg_radius: float | None = None,
    *,
    ramp: bool = True,
    normalise: bool = True,
    batch: int = 256,
):
    """Cut, bin, invert and normalise particle images from one micrograph.

    Parameters
    ----------
    image : array ``[ny, nx]`` (numpy or cupy)
        The micrograph, as it comes from motion correction (protein dark).
    coords_xy : array ``[n, 2]``
        Particle centres ``(x, y)`` in px of ``image`` (origin at the corner, x along columns).
    box : int
        Box size in px of ``image`` (even).
    bin : int
        Binning factor (1, 2, 4, ...) applied by Fourier cropping; ``box / bin`` must be even.
    invert : bool
        Multiply by -1 so protein is white (RELION convention).
    bg_radius : float, optional
        Background radius in px of the *output* box; default 0.375 × output box.
    ramp : bool
        Remove a plane fitted to the background before normalising.
    normalise : bool
        Background-ring normalisation (mean 0, sd 1 outside ``bg_radius``).
    batch : int
        Particles processed at a time (memory bound).

    Returns
    -------
    array ``[k, box/bin, box/bin]`` float32 on the device of ``image``, one image per particle
    whose box is fully inside the micrograph (``k = box_inside(...).sum()``; the others are
    skipped, in order).
    """
    xp = backend.array_module(image)
    img = xp.asarray(image, dtype=xp.float32)
    box = int(box)
    bin = int(bin)
    check_box_bin(box, bin)
    out_size = box // bin
    c = np.asarray(backend.to_host(coords_xy), dtype=float).reshape(-1, 2)
    keep = box_inside(img.shape, c, box)
    c = c[keep]
    out = xp.empty((len(c), out_size, out_size), dtype=xp.float32)
    if len(c) == 0:
        return out
    h = box // 2
    offs = xp.arange(box) - h
    for s in range(0, len(c), max(int(batch), 1)):
        cc = c[s : s + batch]
        xi = xp.asarray(np.rint(cc[:, 0]).astype(np.int64))
        yi = xp.asarray(np.rint(cc[:, 1]).astype(np.int64))
        rows = yi[:, None] + offs[None, :]
        cols = xi[:, None] + offs[None, :]
        boxes = img[rows[:, :, None], cols[:, None, :]]
        if invert:
            boxes = -boxes
        if bin > 1:
            boxes = fourier_crop(boxes, out_size)
        if normalise:
            boxes = normalise_background(boxes, bg_radius, ramp=ramp)
        out[s : s + len(cc)] = boxes
    return out


def check_box_bin(box: int, bin: int) -> None:  # noqa: A002
    """Raise :class:`InputError` unless ``box`` is even and ``box / bin`` is an even integer."""
    if bin < 1:
        raise InputError("--bin", f"binning must be a positive integer, got {bin}", "use 1, 2 or 4")
    if box < 8 or box % 2:
        raise InputError("--box", f"box size must be an even number of px ≥ 8, got {box}", "use e.g. 256")
    if box % bin or (box // bin) % 2:
        raise InputError(
            "--box",
            f"box {box} px binned by {bin} does not give an even integer size",
            f"use a box that is a multiple of {2 * bin} (e.g. {fft_friendly_size(box, 2 * bin)})",
        )


# --------------------------------------------------------------------------- metadata
_CTF_COLUMNS = (
    "rlnDefocusU",
    "rlnDefocusV",
    "rlnDefocusAngle",
    "rlnPhaseShift",
    "rlnCtfBfactor",
    "rlnCtfScalefactor",
    "rlnCtfMaxResolution",
    "rlnCtfFigureOfMerit",
)


def micrograph_key(name) -> str:
    """The file stem of a micrograph or movie name (``movies/mic_0001.mrc`` -> ``mic_0001``)."""
    base = str(name).replace("\\", "/").rsplit("/", 1)[-1]
    for ext in (".mrcs", ".mrc", ".tiff", ".tif", ".eer", ".star"):
        if base.lower().endswith(ext):
            return base[: -len(ext)]
    return base.rsplit(".", 1)[0] if "." in base else base


def select_micrograph_rows(table, micrograph_name, source=None, *, what: str = "rows", strict: bool = False):
    """Rows of ``table`` that belong to ``micrograph_name``.

    Matching is on ``rlnMicrographName``: the exact name first, then the file stem (paths
    differ between steps); a table without that column, or whose rows all name a single
    micrograph, is taken as belonging to it. With ``strict`` (a table of many micrographs,
    such as the selected particles of a whole data set), only matching rows are returned,
    possibly none.
    """
    if "rlnMicrographName" not in table.columns or len(table) == 0:
        if strict and len(table):
            raise InputError(source, "has no rlnMicrographName column", "pass a particle STAR file of the data set")
        return table
    names = table["rlnMicrographName"].astype(str)
    hit = names == str(micrograph_name)
    if not hit.any():
        hit = names.map(micrograph_key) == micrograph_key(micrograph_name)
    if strict:
        return table[hit.to_numpy()]
    if not hit.any():
        if names.nunique() == 1:
            return table
        raise InputError(
            source,
            f"no {what} for micrograph {micrograph_name!r} (the file names {names.nunique()} other micrographs)",
            "pass the file written for this micrograph, or --micrograph-name as written in it",
        )
    return table[hit.to_numpy()]


def recenter_coordinates(table, micrograph_pixel_size: float):
    """Particle coordinates moved to the centres found by 2D classification or refinement.

    RELION convention: ``rlnOriginXAngst`` is the shift that centres the particle image, so
    the particle's centre lies at ``rlnCoordinateX - rlnOriginXAngst / pixel size`` (px of
    the micrograph; the same for y), as in RELION's re-extraction with re-centring. Returns
    a copy of ``table`` with the new coordinates and without the origin columns (the
    re-extracted images are centred); tables without origins are returned unchanged.
    """
    out = table.copy()
    ps = float(micrograph_pixel_size)
    for axis in ("X", "Y"):
        col = f"rlnOrigin{axis}Angst"
        if col in out.columns and len(out):
            shift = np.asarray(out[col], dtype=float) / ps
            out[f"rlnCoordinate{axis}"] = np.asarray(out[f"rlnCoordinate{axis}"], dtype=float) - shift
            out = out.drop(columns=[col])
    return out


def read_ctf_row(path, micrograph_name=None) -> dict:
    """CTF parameters and optics of one micrograph from a CTF STAR file.

    Accepts RELION 3.1+ files (``data_optics`` + ``data_micrographs``) and per-row files
    such as ``conveyor spa ctf`` writes (voltage, Cs, amplitude contrast and pixel size on
    the row). Returns a dict of RELION labels (defocus in Å, angles in degrees, voltage in kV,
    Cs in mm), with ``rlnPhaseShift`` 0 when absent.
    """
    from ..io.star import join_optics, read_star  # noqa: PLC0415

    blocks = read_star(path)
    table = None
    for name in ("micrographs", "", *blocks):
        if name in blocks and "rlnDefocusU" in blocks[name].columns:
            table = blocks[name]
            break
    if table is None:
        raise InputError(path, "no table with rlnDefocusU in this STAR file", "pass the CTF STAR file written by `conveyor spa ctf`")
    if "optics" in blocks:
        table = join_optics(table, blocks["optics"], path)
    if micrograph_name is not None:
        table = select_micrograph_rows(table, micrograph_name, path, what="CTF")
    if len(table) != 1:
        raise InputError(path, f"expected the CTF of one micrograph, found {len(table)} rows", "pass the per-micrograph CTF STAR file")
    row = {k: v for k, v in table.iloc[0].to_dict().items()}
    missing = [k for k in ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast") if k not in row]
    if missing:
        raise InputError(path, f"CTF table lacks {', '.join(missing)}", "re-run CTF estimation (conveyor spa ctf)")
    row.setdefault("rlnPhaseShift", 0.0)
    return row


def particle_blocks(
    coords,
    kept,
    *,
    stack_name: str,
    micrograph_name: str,
    ctf: dict,
    box: int,
    bin: int,  # noqa: A002
    pixel_size: float,
    original_pixel_size: float | None = None,
    width: int = 6,
):
    """STAR blocks ``{"optics", "particles"}`` for particles extracted from one micrograph.

    Parameters
    ----------
    coords : pandas.DataFrame
        The picks (rlnCoordinateX/Y in px of the micrograph, optional
        rlnAutopickFigureOfMerit), in the order given to :func:`extract_particles`.
    kept : bool array
        Which picks were extracted (:func:`box_inside`); image ``k`` of the stack is the
        ``k``-th kept pick, named ``format_image_name(k + 1, stack_name)``.
    ctf : dict
        From :func:`read_ctf_row`.
    box, bin : int
        Box in micrograph px and binning; images are ``box // bin`` px of
        ``pixel_size × bin`` Å.
    pixel_size : float
        Å/px of the micrograph.
    original_pixel_size : float, optional
        Å/px of the movies (default: ``ctf["rlnMicrographOriginalPixelSize"]`` or ``pixel_size``).
    """
    import pandas as pd  # noqa: PLC0415

    from ..io.star import format_image_name, optics_table  # noqa: PLC0415

    kept = np.asarray(kept, dtype=bool)
    sel = coords[kept].reset_index(drop=True)
    n = len(sel)
    if original_pixel_size is None:
        original_pixel_size = float(ctf.get("rlnMicrographOriginalPixelSize", pixel_size))
    optics = optics_table(
        "opticsGroup1",
        original_pixel_size,
        float(ctf["rlnVoltage"]),
        float(ctf["rlnSphericalAberration"]),
        float(ctf["rlnAmplitudeContrast"]),
        image_size=int(box) // int(bin),
        image_pixel_size=float(pixel_size) * int(bin),
        micrograph_pixel_size=float(pixel_size),
        extra={"rlnCtfDataAreCtfPremultiplied": 0},
    )
    parts = pd.DataFrame(
        {
            "rlnImageName": [format_image_name(k + 1, stack_name, width) for k in range(n)],
            "rlnMicrographName": [str(micrograph_name)] * n,
            "rlnCoordinateX": sel["rlnCoordinateX"].to_numpy(dtype=float),
            "rlnCoordinateY": sel["rlnCoordinateY"].to_numpy(dtype=float),
        }
    )
    if "rlnAutopickFigureOfMerit" in sel.columns:
        parts["rlnAutopickFigureOfMerit"] = sel["rlnAutopickFigureOfMerit"].to_numpy(dtype=float)
    for col in _CTF_COLUMNS:
        if col in ctf:
            parts[col] = float(ctf[col])
    parts["rlnOpticsGroup"] = 1
    return {"optics": optics, "particles": parts}
