"""XFEL single-particle imaging simulator with ground truth (PR772-like by default).

Physics
-------
* Object: an icosahedral virus-like particle (:func:`make_capsid`): a faceted protein
  shell (20 flat facets, rounded at the 5-fold vertices) with 12 vertex protrusions, an
  inner membrane and a packed core, as electron density (e/Å³) on a cubic grid. Its
  ``diameter_nm`` is the diameter of the homogeneous sphere whose form-factor minima it
  reproduces (orientation-averaged; the volume-equivalent sphere is 1.8 % smaller).
* Scattering: ``F(q) = Σ ρ(r) exp(-2πi q·r) ΔV`` (electrons), computed once by an
  oversampled 3D FFT (:func:`fourier_volume`) and evaluated at the exact 3D ``q`` of
  every pixel on the Ewald sphere by trilinear interpolation of the complex ``F``
  (:func:`intensity_slice`). A particle with rotation ``R`` and size factor ``s`` gives
  ``|F(s Rᵀ q)|² s⁶``.
* Photons per pixel: ``Φ r_e² |F|² ΔΩ P``, with the incident fluence ``Φ``
  (photons/m²) set by the particle's position in a Gaussian focus and a pulse-energy
  jitter, the pixel solid angle ``ΔΩ`` and the polarisation factor ``P`` (beam polarised
  along x); plus a smooth background (gas/beamline scatter); then Poisson noise.
* Empty frames: background only. Multiple hits: clusters of 2–3 touching particles
  (aggregates, the common kind of multiple hit in aerosol injection) scattering
  **coherently**: amplitudes ``F_j(q) exp(-2πi q·r_j)`` are summed before squaring, so
  the pattern shows the cluster's interference stripes. Wrong-size particles: the same object scaled to another
  diameter. The beamstop and the gap between the two detector halves read 0 and are
  masked.

Conventions: ``q`` in 1/m without 2π, lab/pixel frame of :mod:`conveyor.spi.detector`.
Quaternions ``(w, x, y, z)`` are the *active* rotation ``R`` that turns the reference
particle (``truth/density.mrc``, axes ``[z, y, x]``) into its orientation in the lab for
that shot; a pixel with lab vector ``q`` samples the reference transform at ``Rᵀ q``
(Dragonfly's quaternion for the shot is the conjugate).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import backend
from ..errors import InputError
from ..io.atomic import atomic_path, write_text
from ..io.cxi import CXIWriter
from ..spi.detector import (
    EV_J,
    R_ELECTRON_M,
    DetectorGeometry,
    detector_mask,
    polarization_factor,
    reciprocal_grid,
    solid_angle,
)

log = logging.getLogger(__name__)

PHI = (1.0 + 5.0**0.5) / 2.0
#: Roots of tan x = x: minima of the sphere form factor at x = 2π q R.
_SPHERE_ROOTS = (4.493409457909064, 7.725251836937707, 10.904121659428899, 14.066193912831473,
                 17.220755271930768, 20.371302959287561, 23.519452498689006, 26.666054258812675,
                 29.811598790892958, 32.956389039822476)


# ---------------------------------------------------------------------------------------
# geometry of the icosahedron, rotations
# ---------------------------------------------------------------------------------------
def icosahedron_vertices() -> np.ndarray:
    """The 12 unit vectors to the vertices (5-fold axes), ``[12, 3]`` as (x, y, z)."""
    v = []
    for a in (-1.0, 1.0):
        for b in (-PHI, PHI):
            v += [(0.0, a, b), (a, b, 0.0), (b, 0.0, a)]
    v = np.array(v)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def icosahedron_face_normals() -> np.ndarray:
    """The 20 unit face normals (3-fold axes), ``[20, 3]`` as (x, y, z)."""
    n = [(a, b, c) for a in (-1.0, 1.0) for b in (-1.0, 1.0) for c in (-1.0, 1.0)]
    for a in (-1.0, 1.0):
        for b in (-1.0, 1.0):
            n += [(0.0, a / PHI, b * PHI), (a / PHI, b * PHI, 0.0), (b * PHI, 0.0, a / PHI)]
    n = np.array(n)
    return n / np.linalg.norm(n, axis=1, keepdims=True)


from ..geometry import quaternion_to_matrix  # noqa: E402  (one implementation, shared)


def random_quaternions(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` uniformly distributed unit quaternions ``(w, x, y, z)`` with ``w ≥ 0`` (Shoemake)."""
    u1, u2, u3 = rng.random((3, n))
    a, b = np.sqrt(1 - u1), np.sqrt(u1)
    q = np.stack([b * np.cos(2 * np.pi * u3), a * np.sin(2 * np.pi * u2), a * np.cos(2 * np.pi * u2), b * np.sin(2 * np.pi * u3)], -1)
    q[q[:, 0] < 0] *= -1
    return q


# ---------------------------------------------------------------------------------------
# object and its transform
# ---------------------------------------------------------------------------------------
#: Electron densities (e/Å³) of the capsid layers: protein shell, lipid membrane, core.
CAPSID_DENSITY = {"shell": 0.43, "membrane": 0.36, "core": 0.46}
# Outer-envelope factors: facets at inradius a, rounded by a sphere of radius 1.08 a.
_FACET_ROUND = 1.08
# Volume-equivalent diameter / fringe-equivalent sphere diameter of the capsid: with the
# default layers the orientation-averaged form-factor minima 2-5 match a homogeneous
# sphere 1.8 % larger than the volume-equivalent one (measured at 3.2 and 2.0 nm voxels).
_VOLUME_PER_FRINGE_DIAMETER = 0.982


def _envelope_radius(u: np.ndarray, inradius: float) -> np.ndarray:
    """Outer envelope radius along unit directions ``u [..., 3]``: facets rounded by a sphere."""
    normals = icosahedron_face_normals()
    cosmax = np.max(u @ normals.T, axis=-1)
    return np.minimum(inradius / np.maximum(cosmax, 1e-6), _FACET_ROUND * inradius)


def _envelope_volume_factor(n_dir: int = 20000) -> float:
    """Volume of the envelope for inradius 1, divided by 4π/3 (Monte-Carlo free: Fibonacci sphere)."""
    k = np.arange(n_dir) + 0.5
    phi = np.arccos(1 - 2 * k / n_dir)
    theta = np.pi * (1 + 5**0.5) * k
    u = np.stack([np.cos(theta) * np.sin(phi), np.sin(theta) * np.sin(phi), np.cos(phi)], -1)
    r = _envelope_radius(u, 1.0)
    return float(np.mean(r**3))


def _smoothstep(d, width):
    return 0.5 * (1.0 + np.tanh(d / width))


def make_capsid(
    n: int,
    voxel_nm: float,
    diameter_nm: float = 70.0,
    *,
    shell_nm: float | None = None,
    membrane_nm: float | None = None,
    spikes: bool = True,
    densities: dict | None = None,
    edge_voxels: float = 0.5,
):
    """Electron density (e/Å³) of an icosahedral virus-like particle on an ``n³`` grid.

    Parameters
    ----------
    n : int
        Grid edge (voxels); the particle centre is at index ``n // 2`` on every axis.
    voxel_nm : float
        Voxel size in nm.
    diameter_nm : float
        Diameter (nm) of the homogeneous sphere whose form-factor minima the particle
        reproduces (2nd–5th minima, averaged over orientations); the volume-equivalent
        sphere of the outer envelope is 1.8 % smaller.
    shell_nm, membrane_nm : float, optional
        Thickness of the protein shell (default 9 % of the diameter) and of the inner
        membrane (default 6 %).
    spikes : bool
        Add 12 protrusions at the 5-fold vertices.
    densities : dict, optional
        ``{"shell", "membrane", "core"}`` electron densities in e/Å³
        (default :data:`CAPSID_DENSITY`).
    edge_voxels : float
        Width of the tanh edges (voxels); keeps the grid free of aliasing steps.

    Returns
    -------
    numpy.ndarray ``[z, y, x]`` float32, e/Å³. Axes: index ``[k, j, i]`` is the point
    ``((i, j, k) - n//2) * voxel`` in (x, y, z).
    """
    if n < 8 or voxel_nm <= 0 or diameter_nm <= 0:
        raise InputError("make_capsid", f"bad grid (n={n}, voxel={voxel_nm} nm, diameter={diameter_nm} nm)", "use n >= 8 and positive sizes")
    rho = dict(CAPSID_DENSITY)
    rho.update(densities or {})
    radius = _VOLUME_PER_FRINGE_DIAMETER * diameter_nm / 2.0
    inradius = radius / _envelope_volume_factor() ** (1.0 / 3.0)
    shell = 0.09 * diameter_nm if shell_nm is None else float(shell_nm)
    membrane = 0.06 * diameter_nm if membrane_nm is None else float(membrane_nm)
    if inradius * _FACET_ROUND * 1.12 > (n // 2 - 1) * voxel_nm:
        raise InputError("make_capsid", f"a {diameter_nm} nm particle does not fit a {n}³ grid of {voxel_nm} nm voxels", "use a larger n")
    c = np.arange(n, dtype=np.float64) - n // 2
    z, y, x = np.meshgrid(c * voxel_nm, c * voxel_nm, c * voxel_nm, indexing="ij")
    r = np.sqrt(x * x + y * y + z * z)
    u = np.stack([x, y, z], -1) / np.maximum(r, 1e-9)[..., None]
    r_out = _envelope_radius(u, inradius)
    w = edge_voxels * voxel_nm
    outer = _smoothstep(r_out - r, w)
    inner_shell = _smoothstep(r_out - shell - r, w)
    inner_membrane = _smoothstep(r_out - shell - membrane - r, w)
    dens = rho["shell"] * (outer - inner_shell) + rho["membrane"] * (inner_shell - inner_membrane) + rho["core"] * inner_membrane
    if spikes:
        verts = icosahedron_vertices() * (_FACET_ROUND * inradius)
        blob = 0.07 * diameter_nm
        pts = np.stack([x, y, z], -1)
        spike = np.zeros_like(r)
        for v in verts:
            d = np.linalg.norm(pts - v, axis=-1)
            spike = np.maximum(spike, _smoothstep(blob - d, w))
        dens = np.maximum(dens, rho["shell"] * spike)
    return dens.astype(np.float32)


@dataclass
class FourierVolume:
    """Complex transform ``F`` of a density on a cubic reciprocal grid.

    Attributes
    ----------
    data : array ``[N, N, N]`` complex64, axes ``(q_z, q_y, q_x)``, ``q = 0`` at index ``N // 2``.
    dq_per_m : float
        Reciprocal voxel size, 1/m (spatial frequency, no 2π).
    """

    data: object
    dq_per_m: float

    @property
    def size(self) -> int:
        return int(self.data.shape[0])

    @property
    def q_max_per_m(self) -> float:
        """Largest |q| (1/m) at which every direction can be interpolated."""
        return (self.size // 2 - 1) * self.dq_per_m

    def sample(self, q):
        """``F`` at ``q [..., 3]`` (qx, qy, qz in 1/m) by trilinear interpolation; 0 outside."""
        xp = backend.array_module(self.data)
        q = xp.asarray(q)
        c = self.size // 2
        coords = xp.stack([q[..., 2], q[..., 1], q[..., 0]], -1) / self.dq_per_m + c
        return trilinear(self.data, coords)


def trilinear(volume, coords):
    """Trilinear interpolation of ``volume [z, y, x]`` at fractional indices ``coords [..., 3]`` (z, y, x).

    Points outside ``[0, N-1)`` on any axis give 0. Array-module agnostic.
    """
    xp = backend.array_module(volume)
    coords = xp.asarray(coords, dtype=xp.float64)
    shape = volume.shape
    flat = volume.reshape(-1)
    base = xp.floor(coords)
    f = coords - base
    i0 = base.astype(xp.int64)
    inside = xp.ones(coords.shape[:-1], dtype=bool)
    for ax in range(3):
        inside &= (i0[..., ax] >= 0) & (i0[..., ax] < shape[ax] - 1)
    i0 = xp.where(inside[..., None], i0, 0)
    f = xp.where(inside[..., None], f, 0.0)
    sz, sy = shape[1] * shape[2], shape[2]
    idx = i0[..., 0] * sz + i0[..., 1] * sy + i0[..., 2]
    fz, fy, fx = f[..., 0], f[..., 1], f[..., 2]
    out = (
        flat[idx] * ((1 - fz) * (1 - fy) * (1 - fx))
        + flat[idx + 1] * ((1 - fz) * (1 - fy) * fx)
        + flat[idx + sy] * ((1 - fz) * fy * (1 - fx))
        + flat[idx + sy + 1] * ((1 - fz) * fy * fx)
        + flat[idx + sz] * (fz * (1 - fy) * (1 - fx))
        + flat[idx + sz + 1] * (fz * (1 - fy) * fx)
        + flat[idx + sz + sy] * (fz * fy * (1 - fx))
        + flat[idx + sz + sy + 1] * (fz * fy * fx)
    )
    return xp.where(inside, out, 0)


def fourier_volume(density, voxel_m: float, size: int, xp=None) -> FourierVolume:
    """Oversampled transform of ``density`` (e per Å³ on voxels of ``voxel_m``) → electrons.

    The density (centred at ``n // 2``) is zero-padded to ``size³`` so the reciprocal
    voxel is ``1 / (size · voxel_m)``; ``F(0)`` is the number of electrons.
    """
    xp = backend.xp() if xp is None else xp
    n = density.shape[0]
    if size < n:
        raise InputError("fourier_volume", f"pad size {size} is smaller than the object grid {n}", "use a larger size")
    pad = xp.zeros((size, size, size), dtype=xp.complex64)
    o = size // 2 - n // 2
    pad[o : o + n, o : o + n, o : o + n] = xp.asarray(density, dtype=xp.float32)
    voxel_A3 = (voxel_m * 1e10) ** 3
    ft = xp.fft.fftshift(xp.fft.fftn(xp.fft.ifftshift(pad)))
    ft *= voxel_A3
    return FourierVolume(ft.astype(xp.complex64), 1.0 / (size * voxel_m))


def intensity_slice(volume_ft: FourierVolume, rotation, qvecs, scale: float = 1.0):
    """``|F|²`` (electrons²) seen by pixels with lab scattering vectors ``qvecs [..., 3]`` (1/m).

    Parameters
    ----------
    volume_ft : FourierVolume
        Transform of the reference particle.
    rotation : array ``[3, 3]`` or quaternion ``(w, x, y, z)``
        Active rotation of the particle in the lab.
    qvecs : array ``[..., 3]``
        Lab scattering vectors (1/m), e.g. :func:`conveyor.spi.detector.q_vectors`.
    scale : float
        Size factor of the particle relative to the reference (same density):
        ``|F(s Rᵀ q)|² s⁶``.
    """
    xp = backend.array_module(volume_ft.data)
    rot = np.asarray(backend.to_host(rotation), dtype=np.float64)
    if rot.shape == (4,):
        rot = quaternion_to_matrix(rot)
    q = xp.asarray(qvecs, dtype=xp.float64)
    qm = (q @ xp.asarray(rot)) * float(scale)  # row vectors: q·R = (Rᵀ q)ᵀ
    f = volume_ft.sample(qm)
    return (f.real * f.real + f.imag * f.imag) * float(scale) ** 6


def amplitude_slice(volume_ft: FourierVolume, rotation, qvecs, scale: float = 1.0, position_m=None):
    """Complex amplitude ``F(s Rᵀ q) s³ exp(-2πi q·r)`` (electrons) of a particle at ``position_m``.

    Same conventions as :func:`intensity_slice`; ``position_m`` (3-vector, m) is the
    particle's centre in the lab frame (None: at the origin).
    """
    xp = backend.array_module(volume_ft.data)
    rot = np.asarray(backend.to_host(rotation), dtype=np.float64)
    if rot.shape == (4,):
        rot = quaternion_to_matrix(rot)
    q = xp.asarray(qvecs, dtype=xp.float64)
    f = volume_ft.sample((q @ xp.asarray(rot)) * float(scale)) * float(scale) ** 3
    if position_m is not None:
        f = f * xp.exp(-2j * np.pi * (q @ xp.asarray(np.asarray(position_m, dtype=np.float64))))
    return f


def sphere_form_factor(q, radius):
    """Normalised sphere intensity ``[3 (sin x − x cos x) / x³]²``, ``x = 2π q R`` (1 at q = 0).

    ``q`` is the spatial frequency (no 2π) and ``radius`` the radius, in reciprocal and
    direct units of the same length (1/m and m, or 1/nm and nm). Array-module agnostic.
    """
    xp = backend.array_module(q)
    x = 2.0 * np.pi * xp.asarray(q, dtype=xp.float64) * float(radius)
    small = xp.abs(x) < 1e-3
    xs = xp.where(small, 1.0, x)
    amp = 3.0 * (xp.sin(xs) - xs * xp.cos(xs)) / xs**3
    amp = xp.where(small, 1.0 - x * x / 10.0, amp)
    return amp * amp


def sphere_minima_q(radius, count: int = 5) -> np.ndarray:
    """Spatial frequencies of the first ``count`` zeros of the sphere form factor: ``x_k / (2π R)``."""
    roots = list(_SPHERE_ROOTS)
    while len(roots) < count:  # x_k ≈ (k + 1/2) π - 1/((k + 1/2) π) for large k
        k = len(roots) + 1
        b = (k + 0.5) * np.pi
        roots.append(b - 1.0 / b - 2.0 / (3.0 * b**3))
    return np.asarray(roots[:count]) / (2.0 * np.pi * float(radius))


@dataclass
class ReferenceParticle:
    """The reference object of a simulation and its transform."""

    density: np.ndarray  # [z, y, x] e/Å³
    voxel_nm: float
    volume_ft: FourierVolume

    @property
    def electrons(self) -> float:
        return float(self.density.sum()) * (self.voxel_nm * 10.0) ** 3


def reference_particle(geometry: DetectorGeometry, diameter_nm: float = 70.0, *, mask=None, max_scale: float = 1.0, oversampling: float = 7.0, xp=None) -> ReferenceParticle:
    """Capsid density and its oversampled transform, sampled finely enough for ``geometry``.

    The voxel is chosen so the transform reaches 1.25 × the largest ``|q|`` needed (the
    detector corner or the :func:`~conveyor.spi.detector.reciprocal_grid` edge, times
    ``max_scale`` for particles larger than the reference); the FFT grid is
    ``oversampling`` × the diameter (reciprocal samples per fringe ≈ ``oversampling``/2).
    """
    dq_grid, n_grid = reciprocal_grid(geometry, mask)
    q_need = max(geometry.max_q(), (n_grid // 2) * dq_grid) * float(max_scale)
    voxel_m = 1.0 / (2.5 * q_need)
    voxel_nm = voxel_m * 1e9
    n_obj = int(np.ceil(1.25 * float(diameter_nm) / voxel_nm)) + 4
    n_obj += n_obj % 2
    density = make_capsid(n_obj, voxel_nm, float(diameter_nm))
    pad = _even_fast_len(max(n_obj + 2, float(oversampling) * float(diameter_nm) / voxel_nm))
    return ReferenceParticle(density, voxel_nm, fourier_volume(density, voxel_m, pad, xp=xp))


def noise_free_pattern(reference: ReferenceParticle, geometry: DetectorGeometry, quaternion, *, scale: float = 1.0, fluence_ph_um2: float = 1e11, polarization: str = "x", xp=None):
    """Expected photons per pixel ``[y, x]`` of one particle (no background, no noise, no mask)."""
    xp = backend.xp() if xp is None else xp
    pix = (R_ELECTRON_M**2) * geometry.solid_angle(xp=xp) * geometry.polarization(axis=polarization, xp=xp)
    return float(fluence_ph_um2) * 1e12 * pix * intensity_slice(reference.volume_ft, quaternion, geometry.q_vectors(xp=xp), scale=scale)


# ---------------------------------------------------------------------------------------
# the data set
# ---------------------------------------------------------------------------------------
#: Defaults of :func:`simulate_spi` (PR772-like at 1.6 keV on a 4×4-binned pnCCD-like detector).
DEFAULTS = dict(
    n_files=3,
    frames_per_file=200,
    detector=128,
    pixel_size_m=300e-6,
    distance_m=0.3,
    photon_energy_ev=1600.0,
    diameter_nm=70.0,
    diameter_sd_nm=0.5,
    wrong_size_fraction=0.1,
    wrong_size_diameter_nm=50.0,
    hit_fraction=0.5,
    multiple_hit_fraction=0.05,
    fluence_ph_um2=1.0e11,
    photons_per_hit=None,
    min_fluence_fraction=0.25,
    pulse_jitter=0.1,
    background_photons=100.0,
    center_offset_px=(1.3, -0.8),
    beamstop_radius_px=18.0,
    gap_px=4.0,
    polarization="x",
    seed=0,
)

FRAME_COLUMNS = [
    "file", "frame", "is_hit", "is_single", "n_particles", "diameter_nm", "center_x", "center_y",
    "quat_w", "quat_x", "quat_y", "quat_z", "photons",
    "is_wrong_size", "fluence_ph_um2", "signal_photons_expected", "background_photons_expected",
]
PARTICLE_COLUMNS = ["file", "frame", "particle", "diameter_nm", "scale", "quat_w", "quat_x", "quat_y", "quat_z", "fluence_ph_um2", "is_wrong_size"]


def _even_fast_len(n: int) -> int:
    m = max(8, int(np.ceil(n)))
    while True:
        k = m
        for p in (2, 3, 5):
            while k % p == 0:
                k //= p
        if k == 1 and m % 2 == 0:
            return m
        m += 1


def _write_mrc_labeled(path, data, voxel_size, labels):
    import mrcfile

    with atomic_path(path) as tmp:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(np.ascontiguousarray(backend.to_host(data), dtype=np.float32))
            mrc.set_volume()
            mrc.voxel_size = float(voxel_size)
            for lab in labels[:10]:
                mrc.add_label(lab[:80])
            mrc.update_header_stats()


def _csv(path, columns, rows):
    def fmt(v):
        if v is None:
            return ""
        if isinstance(v, (bool, np.bool_)):
            return str(int(v))
        if isinstance(v, (float, np.floating)):
            return "" if not np.isfinite(v) else f"{float(v):.8g}"
        return str(v)

    lines = [",".join(columns)] + [",".join(fmt(r.get(c)) for c in columns) for r in rows]
    write_text(path, "\n".join(lines) + "\n")


def truth_intensity(volume_ft: FourierVolume, dq_per_m: float, size: int):
    """``|F|²`` (electrons²) of the reference particle on a ``size³`` grid of voxel ``dq_per_m``.

    ``q = 0`` at index ``size // 2``; axes ``(q_z, q_y, q_x)``; values beyond
    ``|q| > (size // 2) · dq`` are 0.
    """
    xp = backend.array_module(volume_ft.data)
    c = size // 2
    ax_host = (np.arange(size, dtype=np.float64) - c) * dq_per_m
    ax = xp.asarray(ax_host)
    qy, qx = xp.meshgrid(ax, ax, indexing="ij")
    out = xp.zeros((size, size, size), dtype=xp.float32)
    qlim = c * dq_per_m
    for k in range(size):
        qz = float(ax_host[k])
        q = xp.stack([qx, qy, xp.full(qx.shape, qz)], -1)
        f = volume_ft.sample(q)
        val = (f.real * f.real + f.imag * f.imag).astype(xp.float32)
        val[xp.sqrt(qx * qx + qy * qy + qz * qz) > qlim] = 0
        out[k] = val
    return out


def _experiment_yaml(out_dir: Path, p: dict, geom: DetectorGeometry, shots_glob: str) -> str:
    d = p["diameter_nm"]
    cx, cy = geom.beam_center_px
    return f"""# Experiment config written by `conveyor simulate spi` (ground truth in truth/).
#   snakemake --configfile {out_dir / 'experiment.yaml'} -n
experiment: sim_spi_seed{p['seed']}
spi:
  shots: "{shots_glob}"
  photon_energy_ev: {p['photon_energy_ev']:g}
  detector_distance_m: {p['distance_m']:g}
  pixel_size_m: {p['pixel_size_m']:g}
  selection: auto
# Known to the simulator, for checking the pipeline (not config keys):
#   expected particle diameter {d:g} nm (range {0.9 * d:.1f}-{1.1 * d:.1f} nm); wrong-size particles {p['wrong_size_diameter_nm']:g} nm
#   beam centre x={cx:.3f} y={cy:.3f} px; beamstop radius {p['beamstop_radius_px']:g} px; detector {geom.shape[1]}x{geom.shape[0]} px
#   symmetry: icosahedral; polarisation: {p['polarization']}
"""


def simulate_spi(out_dir, **params) -> dict:
    """Simulate an SPI data set (CXI shots + ground truth) in ``out_dir``.

    Keyword parameters (defaults in :data:`DEFAULTS`)
    -------------------------------------------------
    n_files, frames_per_file : int
        Shots are split over ``n_files`` CXI files ``shots/run_000.cxi`` ....
    detector : int
        Detector edge (pixels, square).
    pixel_size_m, distance_m, photon_energy_ev : float
        Geometry (SI, eV).
    diameter_nm, diameter_sd_nm : float
        Particle diameter and its Gaussian spread between particles.
    wrong_size_fraction, wrong_size_diameter_nm : float
        Fraction of single hits with a particle of the wrong size (the same object scaled);
        particles in multiple hits are wrong-size with the same probability.
    hit_fraction : float
        Fraction of frames with ≥ 1 particle (exact count ``round(f · N)``).
    multiple_hit_fraction : float
        Fraction of hits with 2–3 particles (exact count ``round(f · hits)``).
    fluence_ph_um2 : float
        Peak fluence in the focus, photons/µm².
    photons_per_hit : float, optional
        If given, the peak fluence is set so a single nominal particle gives this mean
        photon count on the good pixels (overrides ``fluence_ph_um2``).
    min_fluence_fraction : float
        Particles hit the focus where the fluence is between this fraction and 1 of
        the peak (log-uniform, as for a particle stream much wider than the focus).
    pulse_jitter : float
        Relative rms of the pulse energy (log-normal).
    background_photons : float
        Mean background photons per frame on the good pixels (smooth, peaked at low q).
    center_offset_px : float or (dx, dy)
        Beam centre minus detector middle ``((n-1)/2, (n-1)/2)``, pixels; one value
        ``v`` means ``(v, -v/2)``.
    beamstop_radius_px, gap_px : float
        Round beamstop on the beam; band of ``gap_px`` rows between the detector halves.
    polarization : "x", "y" or "none"
    seed : int

    Returns
    -------
    dict of paths: ``shots`` (list), ``frames_csv``, ``particles_csv``, ``density``,
    ``intensity``, ``geometry``, ``truth``, ``experiment``.
    """
    t_start = time.time()
    unknown = set(params) - set(DEFAULTS)
    if unknown:
        raise InputError("simulate_spi", f"unknown parameter(s) {', '.join(sorted(unknown))}", f"use {', '.join(DEFAULTS)}")
    p = dict(DEFAULTS)
    p.update({k: v for k, v in params.items() if v is not None or k == "photons_per_hit"})
    out_dir = Path(out_dir)
    for k in ("hit_fraction", "multiple_hit_fraction", "wrong_size_fraction"):
        if not 0.0 <= float(p[k]) <= 1.0:
            raise InputError(f"--{k.replace('_', '-')}", f"must be within 0..1, got {p[k]}", "give a fraction")
    if int(p["n_files"]) < 1 or int(p["frames_per_file"]) < 1 or int(p["detector"]) < 16:
        raise InputError("simulate_spi", "need at least 1 file, 1 frame per file and a 16-px detector", "raise --files/--frames-per-file/--detector")
    if not 0 < float(p["min_fluence_fraction"]) <= 1:
        raise InputError("--min-fluence-fraction", f"must be within (0, 1], got {p['min_fluence_fraction']}", "e.g. 0.25")
    off = p["center_offset_px"]
    off = (float(off), -float(off) / 2.0) if np.isscalar(off) else (float(off[0]), float(off[1]) if len(off) > 1 else -float(off[0]) / 2.0)
    p["center_offset_px"] = off
    xp = backend.xp()
    rng = np.random.default_rng(int(p["seed"]))

    # -- geometry, mask, per-pixel factors ------------------------------------------------
    nd = int(p["detector"])
    shape = (nd, nd)
    center = ((nd - 1) / 2.0 + off[0], (nd - 1) / 2.0 + off[1])
    energy_J = float(p["photon_energy_ev"]) * EV_J
    geom = DetectorGeometry.from_energy(shape, float(p["pixel_size_m"]), float(p["distance_m"]), energy_J, center)
    good, bits = detector_mask(shape, center, float(p["beamstop_radius_px"]), float(p["gap_px"]), gap_axis="y", return_bits=True, xp=xp)
    good_b = good.astype(bool)
    if int(good_b.sum()) == 0:
        raise InputError("--beamstop-radius-px", "the beamstop and gap cover the whole detector", "make them smaller")
    qvec = geom.q_vectors(xp=xp)
    pix = (R_ELECTRON_M**2) * solid_angle(shape, geom.pixel_size_m, geom.distance_m, center, xp=xp)
    pix = pix * polarization_factor(shape, geom.pixel_size_m, geom.distance_m, center, axis=p["polarization"], xp=xp)
    pix = xp.where(good_b, pix, 0.0)
    rpx = geom.radius_px(xp=xp)
    bg_shape = 0.3 + 1.0 / (1.0 + (rpx / (0.15 * nd)) ** 2)
    bg_shape = xp.where(good_b, bg_shape, 0.0)
    bg_shape = bg_shape / bg_shape.sum()

    # -- object and its transform ----------------------------------------------------------
    d_nom = float(p["diameter_nm"])
    d_wrong = float(p["wrong_size_diameter_nm"])
    sd = float(p["diameter_sd_nm"])
    max_scale = max(1.0, (d_wrong + 4 * sd * d_wrong / d_nom) / d_nom) + 4 * sd / d_nom
    dq_grid, n_grid = reciprocal_grid(geom, good)
    ref = reference_particle(geom, d_nom, mask=good, max_scale=max_scale, xp=xp)
    density, voxel_nm, vol = ref.density, ref.voxel_nm, ref.volume_ft
    n_obj, pad = density.shape[0], vol.size
    n_electrons = ref.electrons

    # -- frame-level truth -----------------------------------------------------------------
    n_total = int(p["n_files"]) * int(p["frames_per_file"])
    n_hits = int(round(float(p["hit_fraction"]) * n_total))
    order = rng.permutation(n_total)
    hit_idx = np.sort(order[:n_hits])
    n_multi = int(round(float(p["multiple_hit_fraction"]) * n_hits))
    multi_idx = set(rng.choice(hit_idx, size=n_multi, replace=False).tolist()) if n_multi else set()
    singles = np.array([i for i in hit_idx if i not in multi_idx], dtype=np.int64)
    n_wrong = int(round(float(p["wrong_size_fraction"]) * singles.size))
    wrong_single = set(rng.choice(singles, size=n_wrong, replace=False).tolist()) if n_wrong else set()
    f_min = float(p["min_fluence_fraction"])
    particles = {}
    for i in hit_idx:
        i = int(i)
        k = 1 if i not in multi_idx else int(rng.choice([2, 3], p=[0.7, 0.3]))
        plist = []
        for j in range(k):
            wrong = (i in wrong_single) if k == 1 else bool(rng.random() < float(p["wrong_size_fraction"]))
            mean_d = d_wrong if wrong else d_nom
            diam = float(mean_d + rng.normal() * sd * mean_d / d_nom)
            quat = random_quaternions(1, rng)[0]
            pos_factor = float(np.exp(rng.uniform(np.log(f_min), 0.0))) if f_min < 1 else 1.0
            jitter = float(np.exp(rng.normal() * float(p["pulse_jitter"]) - 0.5 * float(p["pulse_jitter"]) ** 2))
            plist.append(dict(diameter_nm=diam, scale=diam / d_nom, quat=quat, fluence_factor=pos_factor * jitter, wrong=wrong,
                              position_m=np.zeros(3)))
        for j in range(1, k):  # a touching cluster: each new particle next to an earlier one
            anchor = plist[int(rng.integers(j))]
            direction = rng.normal(size=3)
            direction /= np.linalg.norm(direction)
            gap = 0.5e-9 * (anchor["diameter_nm"] + plist[j]["diameter_nm"]) * rng.uniform(1.0, 1.2)
            plist[j]["position_m"] = anchor["position_m"] + gap * direction
            plist[j]["fluence_factor"] = plist[0]["fluence_factor"]  # same place in the focus
        particles[i] = plist
    bg_jitter = np.exp(rng.normal(size=n_total) * 0.2 - 0.02)

    # -- fluence calibration ---------------------------------------------------------------
    cal_rng = np.random.default_rng([int(p["seed"]), 1])
    cal_q = random_quaternions(16, cal_rng)
    unit_photons = float(np.mean([float(xp.sum(intensity_slice(vol, q, qvec) * pix)) for q in cal_q]))  # at 1 photon/m²
    if p["photons_per_hit"] is not None:
        mean_pos = (1.0 - f_min) / np.log(1.0 / f_min) if f_min < 1 else 1.0
        fluence_m2 = float(p["photons_per_hit"]) / (unit_photons * mean_pos)
        p["fluence_ph_um2"] = fluence_m2 * 1e-12
    fluence_m2 = float(p["fluence_ph_um2"]) * 1e12

    # -- frames ----------------------------------------------------------------------------
    shots_dir = out_dir / "shots"
    truth_dir = out_dir / "truth"
    shots_dir.mkdir(parents=True, exist_ok=True)
    truth_dir.mkdir(parents=True, exist_ok=True)
    frame_rows, particle_rows, shot_paths = [], [], []
    bg_mean = float(p["background_photons"])
    gi = 0
    for fi in range(int(p["n_files"])):
        name = f"run_{fi:03d}.cxi"
        path = shots_dir / name
        with CXIWriter(path, shape, np.int32, None, energy_J, geom.distance_m, geom.pixel_size_m[0], None, center, mask_bits=backend.to_host(bits)) as w:
            block = []
            for k in range(int(p["frames_per_file"])):
                plist = particles.get(gi, [])
                expected = bg_shape * (bg_mean * float(bg_jitter[gi]))
                bg_expected = float(bg_mean * bg_jitter[gi])
                sig = xp.zeros(shape, dtype=xp.float64)
                if len(plist) == 1:
                    sig = fluence_m2 * plist[0]["fluence_factor"] * pix * intensity_slice(vol, plist[0]["quat"], qvec, scale=plist[0]["scale"])
                elif plist:
                    amp = sum(amplitude_slice(vol, part["quat"], qvec, part["scale"], part["position_m"]) for part in plist)
                    sig = fluence_m2 * plist[0]["fluence_factor"] * pix * (amp.real * amp.real + amp.imag * amp.imag)
                for j, part in enumerate(plist):
                    phi = fluence_m2 * part["fluence_factor"]
                    particle_rows.append(
                        dict(file=name, frame=k, particle=j, diameter_nm=part["diameter_nm"], scale=part["scale"],
                             quat_w=part["quat"][0], quat_x=part["quat"][1], quat_y=part["quat"][2], quat_z=part["quat"][3],
                             fluence_ph_um2=phi * 1e-12, is_wrong_size=part["wrong"])
                    )
                lam = backend.to_host(expected + sig)
                counts = rng.poisson(lam).astype(np.int32)
                counts[~backend.to_host(good_b)] = 0
                block.append(counts)
                first = plist[0] if plist else None
                frame_rows.append(
                    dict(file=name, frame=k, is_hit=bool(plist), is_single=len(plist) == 1, n_particles=len(plist),
                         diameter_nm=first["diameter_nm"] if first else 0.0, center_x=center[0], center_y=center[1],
                         quat_w=first["quat"][0] if first else None, quat_x=first["quat"][1] if first else None,
                         quat_y=first["quat"][2] if first else None, quat_z=first["quat"][3] if first else None,
                         photons=int(counts.sum()), is_wrong_size=any(q["wrong"] for q in plist),
                         fluence_ph_um2=(fluence_m2 * first["fluence_factor"] * 1e-12) if first else 0.0,
                         signal_photons_expected=float(xp.sum(sig)), background_photons_expected=bg_expected)
                )
                gi += 1
                if len(block) == 50:
                    w.append(np.stack(block))
                    block = []
            if block:
                w.append(np.stack(block))
        shot_paths.append(path)

    # -- truth files -----------------------------------------------------------------------
    paths = {"shots": shot_paths}
    paths["frames_csv"] = truth_dir / "frames.csv"
    _csv(paths["frames_csv"], FRAME_COLUMNS, frame_rows)
    paths["particles_csv"] = truth_dir / "particles.csv"
    _csv(paths["particles_csv"], PARTICLE_COLUMNS, particle_rows)
    paths["density"] = truth_dir / "density.mrc"
    _write_mrc_labeled(
        paths["density"], density, voxel_nm * 10.0,
        ["conveyor simulate spi: reference particle electron density, e/A^3",
         f"diameter {d_nom:g} nm, voxel {voxel_nm * 10:.4f} A, centre at index n//2, axes z,y,x"],
    )
    inten = truth_intensity(vol, dq_grid, n_grid)
    dq_A = dq_grid * 1e-10
    paths["intensity"] = truth_dir / "intensity.mrc"
    _write_mrc_labeled(
        paths["intensity"], inten, dq_A,
        ["conveyor simulate spi: |F(q)|^2 of the reference particle, electrons^2",
         f"RECIPROCAL grid: voxel = dq = {dq_A:.6e} 1/A (header voxel size is dq in 1/A)",
         f"q = 0 at index {n_grid // 2} (size//2); axes qz,qy,qx; q without 2pi",
         "photons/pixel = fluence * r_e^2 * solid_angle * polarisation * |F|^2"],
    )
    geometry = {
        "photon_energy_eV": float(p["photon_energy_ev"]),
        "photon_energy_J": energy_J,
        "wavelength_m": geom.wavelength_m,
        "distance_m": geom.distance_m,
        "pixel_size_m": geom.pixel_size_m[0],
        "beam_center_px": [center[0], center[1]],
        "detector_shape": [nd, nd],
        "beamstop_radius_px": float(p["beamstop_radius_px"]),
        "gap_px": float(p["gap_px"]),
        "gap_rows_center_px": (nd - 1) / 2.0,
        "polarization": p["polarization"],
        "good_pixels": int(backend.to_host(good).sum()),
        "q_per_pixel_per_m": geom.q_per_pixel,
        "q_max_per_m": geom.max_q(good),
        "conventions": "pixel [iy, ix] centred at (x, y) = (ix, iy); lab X = (ix - cx) p, Y = (iy - cy) p, Z = distance; q = k_out - k_in, |k| = 1/lambda (no 2pi)",
    }
    paths["geometry"] = truth_dir / "geometry.json"
    write_text(paths["geometry"], json.dumps(geometry, indent=2) + "\n")
    n_single = int(sum(1 for r in frame_rows if r["is_single"]))
    truth = {
        "parameters": {k: (list(v) if isinstance(v, tuple) else v) for k, v in p.items()},
        "counts": {
            "frames": n_total, "hits": n_hits, "empty": n_total - n_hits, "single_hits": n_single,
            "multiple_hits": n_multi, "wrong_size_single_hits": n_wrong,
            "good_single_hits": n_single - n_wrong,
        },
        "object": {
            "kind": "icosahedral capsid: faceted protein shell + 12 vertex protrusions + membrane + core",
            "diameter_nm": d_nom, "diameter_definition": "homogeneous sphere with the same form-factor minima (orientation-averaged)",
            "volume_equivalent_diameter_nm": d_nom * _VOLUME_PER_FRINGE_DIAMETER, "electrons": n_electrons, "densities_e_per_A3": CAPSID_DENSITY,
            "density_voxel_A": voxel_nm * 10.0, "density_grid": n_obj, "fft_grid": pad,
            "symmetry": "icosahedral; 5-fold axes along (0, +-1, +-phi) and cyclic permutations (x, y, z)",
        },
        "intensity": {
            "file": "truth/intensity.mrc", "units": "electrons^2 (|F|^2)", "grid": n_grid, "center_index": n_grid // 2,
            "voxel_q_per_m": dq_grid, "voxel_q_per_A": dq_A, "voxel_q_per_nm": dq_grid * 1e-9,
            "axes": "qz, qy, qx", "q_convention": "spatial frequency, no 2pi",
            "photons_per_pixel": "fluence (ph/m^2) * r_e^2 * solid_angle * polarisation * |F|^2",
        },
        "fluence": {
            "peak_ph_per_um2": float(p["fluence_ph_um2"]), "min_fraction": f_min, "pulse_jitter": float(p["pulse_jitter"]),
            "mean_signal_photons_single_nominal_at_peak": unit_photons * fluence_m2,
        },
        "quaternions": "active rotation (w, x, y, z) of the reference particle into the lab; pixel q samples the reference at R^T q",
        "multiple_hits": "coherent sum of 2-3 touching particles (cluster)",
        "files": [str(pth.relative_to(out_dir)) for pth in shot_paths],
        "runtime_s": None,
    }
    paths["truth"] = truth_dir / "truth.json"
    paths["experiment"] = out_dir / "experiment.yaml"
    write_text(paths["experiment"], _experiment_yaml(out_dir, p, geom, str((shots_dir / "*.cxi").resolve())))
    truth["runtime_s"] = round(time.time() - t_start, 3)
    write_text(paths["truth"], json.dumps(truth, indent=2, default=float) + "\n")
    log.info("simulated %d frames (%d hits) in %.1f s", n_total, n_hits, truth["runtime_s"])
    return paths
