"""Flat-detector geometry for XFEL single-particle imaging.

Conventions (used by every SPI module and by the simulator)
-----------------------------------------------------------
* Frames are ``[y, x]`` arrays; the centre of pixel ``[iy, ix]`` lies at pixel
  coordinates ``(x, y) = (ix, iy)``.
* ``beam_center_px = (cx, cy)`` is where the direct beam (zero scattering angle) meets
  the detector, in those pixel coordinates (the same numbers spi_processing stores as
  ``image_center[0:2]``).
* Lab frame (CXI/McStas): ``z`` along the beam (downstream), the interaction point at the
  origin. A pixel centre sits at ``X = (ix - cx) * px``, ``Y = (iy - cy) * py``,
  ``Z = distance`` (metres): array columns run along ``+x``, rows along ``+y``. (CXI's
  default ``basis_vectors`` point the other way, a 180° rotation about the beam, which
  the CXI writer avoids by storing explicit basis vectors.)
* ``q`` is the scattering vector as spatial frequency, **in 1/m, without 2π**:
  ``q = k_out - k_in`` with ``|k| = 1/λ``, so ``|q| = 2 sin(θ)/λ = 1/d`` where ``2θ`` is
  the scattering angle. Every pixel gets the full 3D vector on the Ewald sphere
  (``q_z = (Z/r - 1)/λ ≤ 0``), no small-angle approximation. Multiply by ``2π`` for the
  momentum-transfer convention; divide by ``1e9`` for 1/nm.
* Masks are ``1``/``True`` for a good pixel (Conveyor's convention); CXI files store the
  inverse as bit flags (see :mod:`conveyor.io.cxi`).

All functions are pure and array-module agnostic: they build arrays with ``xp``
(default :func:`conveyor.backend.xp`), so the same code runs on numpy and cupy.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .. import backend
from ..errors import InputError

#: Planck constant times speed of light, J·m.
HC_JM = 6.62607015e-34 * 299792458.0
#: One electronvolt in joules.
EV_J = 1.602176634e-19
#: Classical electron radius, m.
R_ELECTRON_M = 2.8179403262e-15

# CXI pixel-mask bits (cxi_file_format v1.6) used by :func:`detector_mask`.
CXI_PIXEL_INVALID = 0x1
CXI_PIXEL_IS_SHADOWED = 0x10
CXI_PIXEL_IS_MISSING = 0x200


def wavelength_from_energy(energy_J: float) -> float:
    """Photon wavelength in m for a photon energy in J."""
    return HC_JM / float(energy_J)


def energy_from_wavelength(wavelength_m: float) -> float:
    """Photon energy in J for a wavelength in m."""
    return HC_JM / float(wavelength_m)


def ev_to_joule(ev: float) -> float:
    return float(ev) * EV_J


def joule_to_ev(joule: float) -> float:
    return float(joule) / EV_J


@dataclass(frozen=True)
class DetectorGeometry:
    """A flat pixel detector perpendicular to the beam.

    Attributes
    ----------
    shape : (ny, nx)
        Frame shape in pixels.
    pixel_size_m : (px, py)
        Pixel pitch along x (columns) and y (rows), m.
    distance_m : float
        Interaction point to detector plane, m.
    wavelength_m : float
        Photon wavelength, m.
    beam_center_px : (cx, cy)
        Direct-beam position in pixel coordinates (see module docstring).
    """

    shape: tuple[int, int]
    pixel_size_m: tuple[float, float]
    distance_m: float
    wavelength_m: float
    beam_center_px: tuple[float, float]

    def __post_init__(self):
        ps = self.pixel_size_m
        if np.isscalar(ps):
            ps = (float(ps), float(ps))
        object.__setattr__(self, "pixel_size_m", (float(ps[0]), float(ps[1])))
        object.__setattr__(self, "shape", (int(self.shape[0]), int(self.shape[1])))
        object.__setattr__(self, "beam_center_px", (float(self.beam_center_px[0]), float(self.beam_center_px[1])))
        object.__setattr__(self, "distance_m", float(self.distance_m))
        object.__setattr__(self, "wavelength_m", float(self.wavelength_m))
        for name, val in (("distance_m", self.distance_m), ("wavelength_m", self.wavelength_m)):
            if not (np.isfinite(val) and val > 0):
                raise InputError("detector geometry", f"{name} must be positive, got {val}", "check the geometry values (SI units)")
        if min(self.pixel_size_m) <= 0:
            raise InputError("detector geometry", f"pixel size must be positive, got {self.pixel_size_m}", "give the pixel size in m")

    # -- constructors -------------------------------------------------------------
    @classmethod
    def from_energy(cls, shape, pixel_size_m, distance_m, photon_energy_J, beam_center_px=None):
        """Geometry from a photon energy in J; the beam centre defaults to the detector centre."""
        if beam_center_px is None:
            beam_center_px = ((shape[1] - 1) / 2.0, (shape[0] - 1) / 2.0)
        return cls(tuple(shape), pixel_size_m, distance_m, wavelength_from_energy(photon_energy_J), beam_center_px)

    @classmethod
    def from_shots(cls, shots):
        """Geometry of a :class:`conveyor.io.cxi.CXIShots` (or anything with the same fields)."""
        return cls(
            tuple(shots.frame_shape),
            getattr(shots, "pixel_size_xy_m", None) or shots.pixel_size_m,
            shots.distance_m,
            shots.wavelength_m,
            shots.beam_center_px,
        )

    def with_center(self, beam_center_px):
        """A copy with another beam centre."""
        return replace(self, beam_center_px=tuple(beam_center_px))

    # -- derived scalars ----------------------------------------------------------
    @property
    def photon_energy_J(self) -> float:
        return energy_from_wavelength(self.wavelength_m)

    @property
    def q_per_pixel(self) -> float:
        """|q| (1/m) of a pixel one pixel-pitch (x) from the beam centre: ``2 sin(atan(p/D)/2)/λ``.

        This is the natural reciprocal-voxel size of a 3D intensity grid built from this
        detector (Dragonfly's ``q_sep`` with ``ewald_rad = D/p``).
        """
        return float(radius_to_q(1.0, self.pixel_size_m[0], self.distance_m, self.wavelength_m))

    # -- per-pixel maps (delegating to the pure functions) ------------------------
    def pixel_positions(self, xp=None):
        return pixel_positions(self.shape, self.pixel_size_m, self.distance_m, self.beam_center_px, xp=xp)

    def q_vectors(self, xp=None):
        return q_vectors(self.shape, self.pixel_size_m, self.distance_m, self.wavelength_m, self.beam_center_px, xp=xp)

    def q_magnitude(self, xp=None):
        return q_magnitude(self.shape, self.pixel_size_m, self.distance_m, self.wavelength_m, self.beam_center_px, xp=xp)

    def radius_px(self, xp=None):
        return radius_map(self.shape, self.beam_center_px, xp=xp)

    def solid_angle(self, xp=None):
        return solid_angle(self.shape, self.pixel_size_m, self.distance_m, self.beam_center_px, xp=xp)

    def polarization(self, axis: str = "x", degree: float = 1.0, xp=None):
        return polarization_factor(self.shape, self.pixel_size_m, self.distance_m, self.beam_center_px, axis=axis, degree=degree, xp=xp)

    def max_q(self, mask=None) -> float:
        """Largest |q| (1/m) over the pixels (good pixels only when ``mask`` is given)."""
        q = backend.to_host(self.q_magnitude(xp=np))
        if mask is not None:
            q = q[np.asarray(backend.to_host(mask)).astype(bool)]
        return float(q.max()) if q.size else 0.0


def _xp(xp):
    return backend.xp() if xp is None else xp


def _pair(v):
    if np.isscalar(v):
        return float(v), float(v)
    v = tuple(v)
    return float(v[0]), float(v[1])


def pixel_positions(shape, pixel_size_m, distance_m, beam_center_px, xp=None):
    """Lab coordinates ``(X, Y, Z)`` in m of every pixel centre, each ``[y, x]``.

    ``X = (ix - cx) * px``, ``Y = (iy - cy) * py``, ``Z = distance_m`` (a full array).
    """
    xp = _xp(xp)
    px, py = _pair(pixel_size_m)
    cx, cy = _pair(beam_center_px)
    ny, nx = int(shape[0]), int(shape[1])
    x = (xp.arange(nx, dtype=xp.float64) - cx) * px
    y = (xp.arange(ny, dtype=xp.float64) - cy) * py
    X = xp.broadcast_to(x[None, :], (ny, nx))
    Y = xp.broadcast_to(y[:, None], (ny, nx))
    Z = xp.full((ny, nx), float(distance_m), dtype=xp.float64)
    return X, Y, Z


def q_vectors(shape, pixel_size_m, distance_m, wavelength_m, beam_center_px, xp=None):
    """Scattering vector of every pixel on the Ewald sphere, ``[y, x, 3]`` (qx, qy, qz) in 1/m.

    ``q = (X, Y, Z)/(r λ) - (0, 0, 1/λ)`` with ``r = |(X, Y, Z)|``; ``|q| = 2 sin θ / λ``
    (spatial frequency, no 2π).
    """
    xp = _xp(xp)
    X, Y, Z = pixel_positions(shape, pixel_size_m, distance_m, beam_center_px, xp=xp)
    r = xp.sqrt(X * X + Y * Y + Z * Z)
    inv = 1.0 / (r * float(wavelength_m))
    q = xp.empty(tuple(X.shape) + (3,), dtype=xp.float64)
    q[..., 0] = X * inv
    q[..., 1] = Y * inv
    # Z/r - 1 loses precision at tiny angles; use -(X²+Y²)/(r (r + Z)) instead.
    q[..., 2] = -(X * X + Y * Y) / (r * (r + Z)) / float(wavelength_m)
    return q


def q_magnitude(shape, pixel_size_m, distance_m, wavelength_m, beam_center_px, xp=None):
    """|q| = 2 sin θ / λ of every pixel, ``[y, x]`` in 1/m."""
    xp = _xp(xp)
    X, Y, Z = pixel_positions(shape, pixel_size_m, distance_m, beam_center_px, xp=xp)
    rho = xp.sqrt(X * X + Y * Y)
    two_theta = xp.arctan2(rho, Z)
    return 2.0 * xp.sin(two_theta / 2.0) / float(wavelength_m)


def radius_map(shape, beam_center_px, xp=None):
    """Distance of every pixel centre from the beam centre, in pixels, ``[y, x]``."""
    xp = _xp(xp)
    cx, cy = _pair(beam_center_px)
    ny, nx = int(shape[0]), int(shape[1])
    x = xp.arange(nx, dtype=xp.float64) - cx
    y = xp.arange(ny, dtype=xp.float64) - cy
    return xp.sqrt(x[None, :] ** 2 + y[:, None] ** 2)


def solid_angle(shape, pixel_size_m, distance_m, beam_center_px, xp=None):
    """Solid angle (sr) subtended by every pixel: ``px py D / r³`` (flat detector)."""
    xp = _xp(xp)
    px, py = _pair(pixel_size_m)
    X, Y, Z = pixel_positions(shape, pixel_size_m, distance_m, beam_center_px, xp=xp)
    r2 = X * X + Y * Y + Z * Z
    return px * py * Z / (r2 * xp.sqrt(r2))


def polarization_factor(shape, pixel_size_m, distance_m, beam_center_px, axis: str = "x", degree: float = 1.0, xp=None):
    """Polarisation factor of every pixel, ``[y, x]`` (1 at the beam centre).

    For a beam linearly polarised along ``axis`` with fraction ``degree`` (the rest along
    the other transverse axis): ``degree (1 - (E·k̂)²) + (1 - degree)(1 - (E⊥·k̂)²)``.
    ``axis="none"`` is an unpolarised beam, ``(1 + cos² 2θ)/2``. XFELs (LCLS AMO, the
    amo86615 PR772 data) are horizontally (x) polarised.
    """
    xp = _xp(xp)
    X, Y, Z = pixel_positions(shape, pixel_size_m, distance_m, beam_center_px, xp=xp)
    r2 = X * X + Y * Y + Z * Z
    fx = 1.0 - X * X / r2
    fy = 1.0 - Y * Y / r2
    axis = str(axis).lower()
    if axis == "x":
        d = float(degree)
    elif axis == "y":
        d = 1.0 - float(degree)
    elif axis in ("none", "unpolarized", "unpolarised"):
        d = 0.5
    else:
        raise InputError("polarization", f"unknown polarisation axis {axis!r}", "use x, y or none")
    return d * fx + (1.0 - d) * fy


def pixel_to_q(x, y, geometry: DetectorGeometry, xp=None):
    """3D scattering vectors ``[..., 3]`` (1/m) at fractional pixel coordinates ``(x, y)``."""
    xp = _xp(xp)
    px, py = geometry.pixel_size_m
    cx, cy = geometry.beam_center_px
    X = (xp.asarray(x, dtype=xp.float64) - cx) * px
    Y = (xp.asarray(y, dtype=xp.float64) - cy) * py
    Z = geometry.distance_m
    r = xp.sqrt(X * X + Y * Y + Z * Z)
    lam = geometry.wavelength_m
    return xp.stack([X / (r * lam), Y / (r * lam), -(X * X + Y * Y) / (r * (r + Z)) / lam], -1)


def q_to_pixel(q, geometry: DetectorGeometry, xp=None):
    """Fractional pixel coordinates ``(x, y)`` where the scattered ray of ``q [..., 3]`` (1/m) hits.

    ``q`` should lie on the Ewald sphere (only its direction ``q + k_in`` is used).
    """
    xp = backend.array_module(q) if xp is None else xp
    q = xp.asarray(q, dtype=xp.float64)
    k = 1.0 / geometry.wavelength_m
    kx, ky, kz = q[..., 0], q[..., 1], q[..., 2] + k
    px, py = geometry.pixel_size_m
    cx, cy = geometry.beam_center_px
    return geometry.distance_m * kx / kz / px + cx, geometry.distance_m * ky / kz / py + cy


def radius_to_q(r_px, pixel_size_m, distance_m, wavelength_m):
    """|q| (1/m) at ``r_px`` pixels from the beam centre: ``2 sin(atan(r p / D)/2) / λ``."""
    p = _pair(pixel_size_m)[0]
    r = np.asarray(r_px, dtype=np.float64)
    return 2.0 * np.sin(np.arctan(r * p / float(distance_m)) / 2.0) / float(wavelength_m)


def q_to_radius(q, pixel_size_m, distance_m, wavelength_m):
    """Radius in pixels where |q| (1/m) falls on the detector (inverse of :func:`radius_to_q`)."""
    p = _pair(pixel_size_m)[0]
    q = np.asarray(q, dtype=np.float64)
    two_theta = 2.0 * np.arcsin(np.clip(q * float(wavelength_m) / 2.0, -1.0, 1.0))
    return np.tan(two_theta) * float(distance_m) / p


def resolution_at_radius(r_px, pixel_size_m, distance_m, wavelength_m):
    """Full-period resolution ``d = 1/|q|`` (m) at ``r_px`` pixels; the half-period is ``d/2``."""
    with np.errstate(divide="ignore"):
        return 1.0 / radius_to_q(r_px, pixel_size_m, distance_m, wavelength_m)


def detector_mask(
    shape,
    beam_center_px,
    beamstop_radius_px: float = 0.0,
    gap_px: float = 0.0,
    gap_axis: str = "y",
    gap_center_px: float | None = None,
    edge_px: int = 0,
    return_bits: bool = False,
    xp=None,
):
    """Good-pixel mask (1 = good) with a round beamstop and a straight gap between panels.

    Parameters
    ----------
    shape : (ny, nx)
    beam_center_px : (cx, cy)
        The beamstop is centred on the beam.
    beamstop_radius_px : float
        Pixels whose centre lies within this radius of the beam are shadowed.
    gap_px : float
        Width of the insensitive band between two detector halves (pnCCD-like), pixels.
    gap_axis : "y" or "x"
        ``"y"``: the halves sit above and below each other, the gap is a band of rows
        (as the pnCCD at LCLS AMO); ``"x"``: a band of columns.
    gap_center_px : float, optional
        Row (or column) at the middle of the gap; default the detector's middle.
    edge_px : int
        Also mask this many pixels along every edge.
    return_bits : bool
        Also return the CXI mask bits (``uint32``, 0 = good; shadowed 0x10, missing 0x200,
        invalid 0x1 for edges).

    Returns
    -------
    good : ``[y, x]`` uint8 (1 = good), and ``bits`` when ``return_bits``.
    """
    xp = _xp(xp)
    ny, nx = int(shape[0]), int(shape[1])
    bits = xp.zeros((ny, nx), dtype=xp.uint32)
    if beamstop_radius_px > 0:
        r = radius_map(shape, beam_center_px, xp=xp)
        bits[r <= float(beamstop_radius_px)] |= CXI_PIXEL_IS_SHADOWED
    if gap_px > 0:
        axis = str(gap_axis).lower()
        n_along = ny if axis == "y" else nx
        mid = (n_along - 1) / 2.0 if gap_center_px is None else float(gap_center_px)
        idx = xp.arange(n_along, dtype=xp.float64)
        band = xp.abs(idx - mid) < float(gap_px) / 2.0
        if axis == "y":
            bits[band, :] |= CXI_PIXEL_IS_MISSING
        elif axis == "x":
            bits[:, band] |= CXI_PIXEL_IS_MISSING
        else:
            raise InputError("gap_axis", f"unknown gap axis {gap_axis!r}", "use y (band of rows) or x (band of columns)")
    if edge_px > 0:
        e = int(edge_px)
        bits[:e, :] |= CXI_PIXEL_INVALID
        bits[-e:, :] |= CXI_PIXEL_INVALID
        bits[:, :e] |= CXI_PIXEL_INVALID
        bits[:, -e:] |= CXI_PIXEL_INVALID
    good = (bits == 0).astype(xp.uint8)
    return (good, bits) if return_bits else good


def reciprocal_grid(geometry: DetectorGeometry, mask=None, margin: int = 1):
    """Voxel size and edge length of a 3D intensity grid that holds this detector's data.

    The voxel is :attr:`DetectorGeometry.q_per_pixel` (1/m; one pixel at the beam centre),
    the grid has ``size = 2 * ceil(q_max / dq) + 1 + 2 * margin`` voxels per edge with
    ``q = 0`` at index ``size // 2`` (Dragonfly's layout for ``margin = 1``), where
    ``q_max`` is over the good pixels.

    Returns
    -------
    dq_per_m : float
    size : int
    """
    dq = geometry.q_per_pixel
    qmax = geometry.max_q(mask)
    size = 2 * int(np.ceil(qmax / dq)) + 1 + 2 * int(margin)
    return dq, size


def radial_profile(image, mask, beam_center_px, r_max: int | None = None, xp=None):
    """Mean of ``image`` over good pixels in 1-px rings about the beam centre.

    Returns ``(radii_px, mean, count)``; ring ``k`` holds pixels with ``round(r) == k``.
    """
    xp = backend.array_module(image) if xp is None else xp
    r = radius_map(image.shape[-2:], beam_center_px, xp=xp)
    ri = xp.rint(r).astype(xp.int64)
    good = xp.asarray(mask).astype(bool) if mask is not None else xp.ones(image.shape, dtype=bool)
    n = int(ri.max()) + 1 if r_max is None else int(r_max)
    sel = good & (ri < n)
    cnt = xp.bincount(ri[sel], minlength=n)[:n]
    tot = xp.bincount(ri[sel], weights=xp.asarray(image, dtype=xp.float64)[sel], minlength=n)[:n]
    mean = xp.where(cnt > 0, tot / xp.maximum(cnt, 1), xp.nan)
    return xp.arange(n), mean, cnt
