"""3D phase retrieval of a single-particle intensity, alignment of runs and the PRTF.

Method
------
The input is a 3D intensity ``I(q)`` on a cubic grid (``q = 0`` at index ``N // 2``,
axes ``(q_z, q_y, q_x)``) and a mask ``m(q)`` of measured voxels (1) against voxels that
were never measured or were filled by a model (0). Amplitudes ``A = sqrt(max(I, 0))``.
The object is a real, positive density ``ρ`` on an ``N³`` grid whose voxel is
``1 / (N · dq)``; it is stored with its transform in the half-spectrum of a real FFT, so
reality (Friedel symmetry ``F(−q) = F*(q)``) holds at every step.

Projections::

    P_M ρ = F⁻¹[ m · A · F/|F| + (1 − m) · F ],   F = F[ρ]      (unmeasured voxels free)
    P_S ρ = ρ where (S and ρ > 0), else 0                          (support, positivity)

Updates, with ``p = P_M ρ``:

* **ER**:   ``ρ ← P_S p``.
* **HIO**:  ``ρ ← p`` where ``S and p > 0``, else ``ρ − β p`` (β ≈ 0.9).
* **RAAR**: ``ρ ← p`` where ``S and 2p − ρ > 0``, else ``β ρ + (1 − 2β) p`` (β ≈ 0.87);
  this is ``β/2 (R_S R_M + I) ρ + (1 − β) P_M ρ`` with ``P_S`` as above.

Voxels beyond the outermost measured shell (the corners of the grid) are held at
``|F| = 0`` (``band_limit``): nothing was measured there, and leaving them free fills the
density with voxel-scale noise. Unmeasured voxels inside the data (missing centre, gaps)
are free, except during the first ``hold_fill`` iterations, when they hold the given
values if the input was filled upstream, else the amplitudes of a sphere fitted to the
fringes: the low-resolution modes a missing centre leaves free otherwise drive the early
iterations to wrong densities.

The iterations run in cycles of ``cycle − er_per_cycle`` HIO/RAAR iterations followed by
``er_per_cycle`` ER iterations, and end with ``final_er`` ER iterations. The support
starts from the autocorrelation (``|F⁻¹ I|``, blurred, thresholded at a fraction of its
maximum; it is about twice the particle), cut to the ball of ``2.2 D + 2`` voxels with
``D`` the diameter from the fringe spacing (:func:`estimate_diameter`), or from a sphere
of the expected diameter; it is updated by shrinkwrap (Marchesini 2003): the positive
part of the density is blurred by a Gaussian of width ``σ`` and thresholded at a
fraction of its maximum; ``σ`` decreases geometrically from ``sigma_start`` to
``sigma_end``. The error after every iteration is the modulus error over measured
voxels::

    E = sqrt( Σ_m (|F| − A)² / Σ_m A² )

At the end of every ER block the iterate is a clean estimate. When a block ends more than
25 % worse than the previous one (a shrinkwrap update cut into the particle, or the
feedback drove the iterate away from a solution), the run goes back to the previous
estimate and its support; the same check applies to the final iterate.

Several independent runs start from random phases (seeded). Each run is aligned to the
run with the lowest final error (the reference, centred by its centre of mass) by
cross-correlation, trying both ``ρ(r)`` and its centrosymmetric inverse ``ρ(−r)``
(the enantiomorph, which has the same intensity) and keeping the better; the sub-voxel
translation is found by a parabolic fit around the correlation peak and applied as a
Fourier phase ramp. The aligned runs are averaged and clipped at 0.

PRTF (phase retrieval transfer function; Chapman et al. 2006, libspimage's ``prtf``)::

    PRTF(q) = |⟨F_k(q)⟩_k| / sqrt(I(q))

over measured voxels, where ``F_k`` is the transform of aligned run ``k`` after the
modulus projection (so ``|F_k| = sqrt(I)`` there and the PRTF is the length of the mean
phase vector ``|⟨exp(i φ_k)⟩|``, 1 for reproducible phases, ~``1/sqrt(n)`` for random
ones), averaged in shells one voxel thick. The resolution is ``1 / q`` (full period) at
the first crossing of ``1/e`` above the missing centre.

Units
-----
Without ``dq`` everything is in voxel units (voxel 1, ``dq = 1/N``). With ``dq`` (the
reciprocal voxel in 1/Å, the header voxel size of an intensity MRC) the voxel is
``1 / (N dq)`` Å, PRTF ``q`` is in 1/Å and the density is divided by the voxel volume:
it is in e/Å³ when ``I`` is ``|F|²`` in electrons² (the simulator's
``truth/intensity.mrc``), and proportional to the density otherwise.

All kernels take their array module from :mod:`conveyor.backend` (numpy or cupy); random
numbers are drawn on the host so both give the same runs for the same seed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace

import numpy as np

from .. import backend
from ..errors import InputError

log = logging.getLogger(__name__)

ALGORITHMS = ("raar", "hio", "er")
DEFAULT_BETA = {"raar": 0.87, "hio": 0.9, "er": 0.0}
INV_E = float(np.exp(-1.0))


# ---------------------------------------------------------------------------------------
# parameters and results
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shrinkwrap:
    """Shrinkwrap support updates.

    Attributes
    ----------
    every : int
        Update the support every ``every`` iterations (not during the final ER block).
    sigma_start, sigma_end : float
        Width (voxels) of the Gaussian blur at the first and the last update; it decreases
        geometrically in between.
    threshold : float
        Keep voxels where the blurred positive density exceeds ``threshold × max``.
    start : int
        First update after this many iterations (the iterate first settles in the
        initial support).
    min_keep : float
        One update keeps at least this fraction of the previous support (the voxels of
        highest blurred density), so a poor early iterate cannot collapse the support.
    """

    every: int = 20
    sigma_start: float = 2.0
    sigma_end: float = 1.0
    threshold: float = 0.2
    start: int = 40
    min_keep: float = 0.5


@dataclass
class PhasingResult:
    """One phase-retrieval run.

    Attributes
    ----------
    density : array ``[N, N, N]``
        Real, positive density (support and positivity applied), centre of mass at
        index ``N // 2``; units: see the module notes.
    support : array ``[N, N, N]`` bool
        Final support, on the same grid as ``density``.
    errors : numpy.ndarray
        Modulus error over measured voxels of the random start (``errors[0]``) and of the
        iterate after every iteration (``n_iter + 1`` values).
    final_error : float
        Modulus error of ``density`` (the last iterate, or the previous ER-block estimate
        when the last one was more than 25 % worse).
    """

    density: object
    support: object
    errors: np.ndarray
    final_error: float = float("nan")


@dataclass
class PRTF:
    """Shell-averaged phase retrieval transfer function.

    Attributes
    ----------
    q : numpy.ndarray
        Shell centres (``k · dq``), in the units of ``dq``.
    prtf : numpy.ndarray
        Mean PRTF of the measured voxels in each shell (NaN where none is measured).
    counts : numpy.ndarray
        Measured voxels per shell.
    q_cut : float
        First crossing of the threshold (``inf``-free: the last measured shell when the
        PRTF never drops below it).
    resolution : float
        ``1 / q_cut`` (full period), in the units of ``1 / dq``.
    crossed : bool
        False when the PRTF stays above the threshold up to the last measured shell, so the
        resolution is only limited by the data edge.
    threshold : float
    """

    q: np.ndarray
    prtf: np.ndarray
    counts: np.ndarray
    q_cut: float
    resolution: float
    crossed: bool
    threshold: float = INV_E


@dataclass
class Alignment:
    """Result of :func:`align_densities`.

    ``shift`` (z, y, x voxels) is where the content of ``mov`` lies relative to ``ref``
    (for ``flipped``, relative to the inverted ``ref``: ``mov ≈ ref(−(r − shift))``);
    ``aligned`` is ``mov`` moved by ``−shift``, then inverted when ``flipped``.
    ``cc`` is the normalised correlation of ``aligned`` with ``ref``.
    """

    aligned: object
    shift: tuple
    flipped: bool
    cc: float


@dataclass
class PhasingSet:
    """Result of :func:`phase_many`; unpacks as ``(aligned, average, prtf)``.

    Attributes
    ----------
    aligned : array ``[n_runs, N, N, N]``
        Every run aligned to the reference run.
    average : array ``[N, N, N]``
        Mean of the aligned runs, clipped at 0, centre of mass at ``N // 2``.
    prtf : PRTF
    runs : list of PhasingResult
        The runs as phased (before alignment).
    alignments : list of Alignment
        How each kept run was aligned (``aligned`` left out to save memory).
    reference : int
        Index in ``runs`` of the reference run (lowest final error).
    voxel : float
        Real-space voxel, ``1 / (N dq)`` (1 without ``dq``).
    kept : list of int
        Indices in ``runs`` of the runs in ``aligned`` (see ``keep_error_ratio``).
    """

    aligned: object
    average: object
    prtf: PRTF
    runs: list = field(default_factory=list)
    alignments: list = field(default_factory=list)
    reference: int = 0
    voxel: float = 1.0
    kept: list = field(default_factory=list)

    def __iter__(self):
        return iter((self.aligned, self.average, self.prtf))


# ---------------------------------------------------------------------------------------
# grids and small helpers
# ---------------------------------------------------------------------------------------
def check_volume(intensity, name="intensity") -> int:
    """Edge ``N`` of a cubic 3D volume; :class:`InputError` naming ``name`` otherwise."""
    shape = tuple(int(s) for s in intensity.shape)
    if len(shape) != 3 or len(set(shape)) != 1:
        raise InputError(name, f"phasing needs a cubic 3D volume, got shape {shape}",
                         "give the 3D intensity of the merge step (an N x N x N grid)")
    if shape[0] < 8:
        raise InputError(name, f"volume of {shape[0]}^3 voxels is too small to phase", "use a grid of at least 8^3")
    return shape[0]


def _flip_shift(n: int) -> int:
    """Roll that turns ``flip`` (i → N−1−i) into the inversion about ``N // 2`` (i → 2c − i)."""
    return 2 * (n // 2) - (n - 1)


def invert(volume):
    """Centrosymmetric inverse ``ρ(−r)`` about index ``N // 2`` on every axis (periodic)."""
    xp = backend.array_module(volume)
    out = xp.flip(volume, axis=(0, 1, 2))
    s = _flip_shift(volume.shape[0])
    return xp.roll(out, (s, s, s), axis=(0, 1, 2)) if s else out


def friedel_complete(intensity, mask):
    """Fill unmeasured voxels whose Friedel mate ``−q`` is measured; symmetrise the rest.

    Returns ``(intensity, mask)`` with ``I(q) = I(−q)`` (the mean where both are measured)
    and ``m(q) = m(q) or m(−q)``. The plane of index 0 of an even grid has no mate and is
    left as it is.
    """
    xp = backend.array_module(intensity)
    m = mask.astype(bool)
    mi, ii = invert(m), invert(intensity)
    both = m & mi
    out = xp.where(both, 0.5 * (intensity + ii), xp.where(m, intensity, xp.where(mi, ii, intensity)))
    return out.astype(intensity.dtype), m | mi


def _kgrid2(n: int, xp):
    """``|k|²`` in cycles/voxel on the half-spectrum layout of ``rfftn`` for an ``n³`` grid."""
    k = xp.fft.fftfreq(n)
    kr = xp.fft.rfftfreq(n)
    return k[:, None, None] ** 2 + k[None, :, None] ** 2 + kr[None, None, :] ** 2


def _half_weights(n: int, xp):
    """Weights of the half-spectrum columns so sums equal those over the full spectrum."""
    w = xp.full(n // 2 + 1, 2.0, dtype=xp.float32)
    w[0] = 1.0
    if n % 2 == 0:
        w[-1] = 1.0
    return w


def _to_half(volume_centred):
    """A centred reciprocal volume (q = 0 at ``N // 2``) → the ``rfftn`` half-spectrum layout."""
    xp = backend.array_module(volume_centred)
    n = volume_centred.shape[0]
    return xp.fft.ifftshift(volume_centred)[..., : n // 2 + 1]


def gaussian_blur(volume, sigma: float, k2=None):
    """Periodic Gaussian blur of a real volume (``sigma`` in voxels) by FFT."""
    xp = backend.array_module(volume)
    n = volume.shape[0]
    if sigma <= 0:
        return volume
    if k2 is None:
        k2 = _kgrid2(n, xp)
    ft = xp.fft.rfftn(volume)
    ft *= xp.exp(-2.0 * np.pi**2 * float(sigma) ** 2 * k2).astype(ft.real.dtype)
    return xp.fft.irfftn(ft, s=volume.shape, axes=(0, 1, 2))


def sphere_support(n: int, diameter_voxels: float, xp=None):
    """Ball of ``diameter_voxels`` centred at ``N // 2`` (``[N, N, N]`` bool)."""
    xp = backend.xp() if xp is None else xp
    return shell_radius2(n, xp) <= (0.5 * float(diameter_voxels)) ** 2


def autocorrelation_support(intensity, threshold: float = 0.04, sigma: float = 1.0, diameter: float | None = None):
    """Support from the autocorrelation: ``|F⁻¹ I|`` blurred by ``sigma`` and thresholded.

    The autocorrelation of a particle of diameter ``D`` has diameter ``2D``, so this is a
    loose support that shrinkwrap tightens. Filled (unmeasured) voxels are used as given;
    a missing centre left at 0 adds a broad halo to ``|F⁻¹ I|``, so when ``diameter``
    (voxels, e.g. from :func:`estimate_diameter`) is given the support is cut to the ball
    of diameter ``2.2 D + 2`` that holds the autocorrelation.
    Returns a bool ``[N, N, N]`` array centred at ``N // 2``.
    """
    xp = backend.array_module(intensity)
    n = check_volume(intensity)
    inten = xp.maximum(xp.asarray(intensity, dtype=xp.float32), 0)
    ac = xp.abs(xp.fft.fftshift(xp.fft.ifftn(xp.fft.ifftshift(inten))))
    ac = gaussian_blur(ac.astype(xp.float32), sigma)
    sup = ac > float(threshold) * float(ac.max())
    if diameter is not None and np.isfinite(diameter) and diameter > 0:
        sup &= sphere_support(n, 2.2 * float(diameter) + 2.0, xp=xp)
    if not bool(sup.any()):  # pragma: no cover - only for a zero intensity
        sup = sphere_support(n, n / 2, xp=xp)
    return sup


def radial_profile(intensity, mask=None):
    """Mean intensity of the measured voxels in shells one voxel thick.

    Returns ``(k, profile, counts)`` with ``k`` the shell radius in voxels (``|q| / dq``);
    shells without measured voxels are NaN.
    """
    xp = backend.array_module(intensity)
    n = check_volume(intensity)
    m = xp.ones(intensity.shape, dtype=bool) if mask is None else xp.asarray(mask).astype(bool)
    sh = shell_index(n, xp)
    nshell = int(np.ceil(np.sqrt(3) * (n // 2 + 1))) + 1
    cnt = backend.to_host(xp.bincount(sh[m], minlength=nshell))
    tot = backend.to_host(xp.bincount(sh[m], weights=xp.asarray(intensity, dtype=xp.float64)[m], minlength=nshell))
    with np.errstate(invalid="ignore", divide="ignore"):
        prof = np.where(cnt > 0, tot / np.maximum(cnt, 1), np.nan)
    return np.arange(cnt.size, dtype=np.float64), prof, cnt


def estimate_diameter(intensity, mask=None) -> float:
    """Particle diameter (voxels of the real-space grid) from the shell-averaged intensity.

    The homogeneous-sphere amplitude ``|3 (sin x − x cos x) / x³|``, ``x = π k D / N``
    (``k``: shell radius in reciprocal voxels), is compared with ``sqrt(I)`` of the
    measured shells, both multiplied by ``k²`` (which flattens the Porod decay so every
    fringe counts), by their correlation on a grid of ``D`` (0.05 voxel steps). The
    fringe spacing carries the size, so a missing centre does not matter. Used to bound
    the starting support; NaN when fewer than 4 shells hold data.
    """
    n = check_volume(intensity)
    k, prof, _ = radial_profile(intensity, mask)
    ok = np.isfinite(prof) & (prof > 0) & (k > 0) & (k <= n // 2)
    k, prof = k[ok], prof[ok]
    if k.size < 4:
        return float("nan")
    diam = np.arange(2.0, 0.75 * n, 0.05)
    x = np.pi * k[None, :] * diam[:, None] / n
    model = np.abs(3.0 * (np.sin(x) - x * np.cos(x)) / x**3) * k[None, :] ** 2
    data = np.sqrt(prof) * k**2
    data = data - data.mean()
    model = model - model.mean(axis=1, keepdims=True)
    score = (model @ data) / np.sqrt((model * model).sum(axis=1) * (data * data).sum() + 1e-300)
    return float(diam[int(np.argmax(score))])


def fill_amplitudes(intensity, data, diameter):
    """Amplitudes for the unmeasured voxels inside the outermost measured shell.

    Where the input intensity of an unmeasured voxel is positive (filled by a model
    upstream) its square root is used; elsewhere the amplitude of a homogeneous sphere of
    ``diameter`` voxels, scaled to the first five measured shells. Returns centred
    ``(amplitude, region)`` arrays; ``region`` marks the voxels filled.
    """
    xp = backend.array_module(intensity)
    n = data.n
    m = data.measured_c
    r = xp.sqrt(shell_radius2(n, xp))
    edge = float(r[m].max())
    region = (~m) & (r <= edge)
    if not bool(region.any()):
        return xp.zeros(intensity.shape, dtype=xp.float32), region
    given = xp.sqrt(xp.maximum(intensity, 0)).astype(xp.float32)
    model = xp.zeros(intensity.shape, dtype=xp.float32)
    if np.isfinite(diameter) and diameter > 0:
        k, prof, _ = radial_profile(intensity, m)
        ok = np.nonzero(np.isfinite(prof) & (k > 0))[0][:5]
        x = np.pi * k[ok] * diameter / n
        ff = (3.0 * (np.sin(x) - x * np.cos(x)) / x**3) ** 2
        scale = float((prof[ok] * ff).sum() / max((ff * ff).sum(), 1e-300))
        xr = np.pi * r * float(diameter) / n
        xs = xp.where(xr < 1e-3, 1.0, xr)
        amp = xp.where(xr < 1e-3, 1.0, 3.0 * (xp.sin(xs) - xs * xp.cos(xs)) / xs**3)
        model = (np.sqrt(max(scale, 0.0)) * xp.abs(amp)).astype(xp.float32)
    fill = xp.where(given > 0, given, model)
    return xp.where(region, fill, 0).astype(xp.float32), region


def _circular_centre(density):
    """Centre of mass of a periodic volume (voxels, z, y, x), by the circular mean per axis."""
    xp = backend.array_module(density)
    n = density.shape[0]
    w = xp.maximum(density, 0)
    tot = float(w.sum())
    if tot <= 0:
        return (n // 2,) * 3
    theta = 2.0 * np.pi * xp.arange(n) / n
    out = []
    for ax in range(3):
        other = tuple(a for a in range(3) if a != ax)
        prof = w.sum(axis=other)
        ang = np.arctan2(float((prof * xp.sin(theta)).sum()), float((prof * xp.cos(theta)).sum()))
        out.append(float(ang * n / (2 * np.pi)) % n)
    return tuple(out)


def centre_density(density, support=None):
    """Roll ``density`` (and ``support``) by whole voxels so the centre of mass is at ``N // 2``."""
    xp = backend.array_module(density)
    n = density.shape[0]
    com = _circular_centre(density)
    shift = tuple(int(round(n // 2 - c)) for c in com)
    d = xp.roll(density, shift, axis=(0, 1, 2))
    s = None if support is None else xp.roll(support, shift, axis=(0, 1, 2))
    return d, s


def fourier_shift(volume, shift):
    """Move a real periodic volume by ``shift`` (z, y, x voxels, fractional) with a phase ramp."""
    xp = backend.array_module(volume)
    n = volume.shape[0]
    k = xp.fft.fftfreq(n)
    kr = xp.fft.rfftfreq(n)
    sz, sy, sx = (float(s) for s in shift)
    ramp = xp.exp(-2j * np.pi * (sz * k[:, None, None] + sy * k[None, :, None] + sx * kr[None, None, :]))
    ft = xp.fft.rfftn(volume) * ramp.astype(xp.complex64 if volume.dtype == xp.float32 else xp.complex128)
    return xp.fft.irfftn(ft, s=volume.shape, axes=(0, 1, 2)).astype(volume.dtype)


def _rng(rng):
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)


@dataclass
class _Data:
    n: int
    amp: object  # A on the half-spectrum, 0 where not measured
    measured: object  # half-spectrum bool: measured voxels (error metric)
    constrained: object  # half-spectrum bool: measured, or beyond the data edge (|F| = 0)
    weights: object  # half-spectrum column weights
    measured_c: object  # centred full-grid bool: measured voxels (PRTF)
    intensity: object  # centred full grid, Friedel-completed


def _prepare(intensity, mask, band_limit: bool = True) -> _Data:
    """Validate and lay out the data on the device (see :func:`phase` for the masks)."""
    xp = backend.array_module(intensity)
    n = check_volume(intensity)
    inten = xp.asarray(intensity, dtype=xp.float32)
    if not bool(xp.isfinite(inten).all()):
        raise InputError("intensity", "intensity contains NaN or infinite values", "fix or regenerate the 3D intensity")
    if mask is None:
        m = default_mask(inten)
    else:
        if tuple(mask.shape) != tuple(inten.shape):
            raise InputError("mask", f"mask shape {tuple(mask.shape)} differs from the intensity {tuple(inten.shape)}",
                             "give the mask written with this intensity")
        m = xp.asarray(mask) > 0.5
    inten, m = friedel_complete(inten, m)
    if not bool(m.any()):
        raise InputError("mask", "no voxel is marked as measured", "check the mask (1 = measured, 0 = filled/missing)")
    constrained = m
    if band_limit:
        r = xp.sqrt(shell_radius2(n, xp))
        edge = float(r[m].max())
        constrained = m | (r > edge + 1e-3)
    amp = xp.where(m, xp.sqrt(xp.maximum(inten, 0)), 0).astype(xp.float32)
    return _Data(n, _to_half(amp), _to_half(m), _to_half(constrained), _half_weights(n, xp), m, inten)


def shell_radius2(n: int, xp=None):
    """``|q|² / dq²`` of every voxel of a centred ``N³`` reciprocal grid."""
    xp = backend.xp() if xp is None else xp
    c = xp.arange(n, dtype=xp.float32) - n // 2
    return c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2


def default_mask(intensity):
    """Measured voxels when no mask is given: all of them, except the corners beyond the
    inscribed sphere (``|q| > (N//2) dq``) when these are all exactly 0 (never measured,
    as in a merged or simulated intensity)."""
    xp = backend.array_module(intensity)
    n = intensity.shape[0]
    ball = sphere_support(n, 2 * (n // 2), xp=xp)
    outside = ~ball
    if bool(outside.any()) and bool((intensity[outside] == 0).all()):
        return ball
    return xp.ones(intensity.shape, dtype=bool)


# ---------------------------------------------------------------------------------------
# one run
# ---------------------------------------------------------------------------------------
def _shrinkwrap(p, sup, sigma, sw: Shrinkwrap, k2):
    """New support from the blurred positive density inside the old one."""
    xp = backend.array_module(p)
    blurred = gaussian_blur(xp.where(sup, xp.maximum(p, 0), 0).astype(xp.float32), sigma, k2)
    new = blurred > sw.threshold * float(blurred.max())
    n_old, n_min = int(sup.sum()), int(np.ceil(sw.min_keep * float(sup.sum())))
    if int(new.sum()) < n_min and n_min < n_old:
        level = xp.partition(blurred.ravel(), blurred.size - n_min)[blurred.size - n_min]
        new = blurred >= level
    return new if int(new.sum()) >= 8 else sup


def _schedule(n_iter: int, algorithm: str, cycle: int, er_per_cycle: int, final_er: int):
    """Per-iteration algorithm names."""
    out = []
    main_end = max(0, n_iter - final_er)
    for i in range(n_iter):
        if algorithm == "er" or i >= main_end or (cycle > 0 and er_per_cycle > 0 and i % cycle >= cycle - er_per_cycle):
            out.append("er")
        else:
            out.append(algorithm)
    return out


def phase(
    intensity,
    mask=None,
    support=None,
    n_iter: int = 400,
    algorithm: str = "raar",
    beta: float | None = None,
    shrinkwrap: bool | Shrinkwrap | None = True,
    rng=None,
    *,
    positivity: bool = True,
    cycle: int = 100,
    er_per_cycle: int = 20,
    final_er: int = 50,
    support_threshold: float = 0.04,
    band_limit: bool = True,
    hold_fill: int | None = None,
    dq: float | None = None,
):
    """Retrieve the phases of a 3D intensity: one run from random starting phases.

    Parameters
    ----------
    intensity : array ``[N, N, N]``
        ``I(q)``, ``q = 0`` at index ``N // 2`` (numpy or cupy; the run happens there).
    mask : array ``[N, N, N]``, optional
        1 where measured, 0 where missing or filled; the modulus constraint applies only
        where measured. Default: :func:`default_mask`. Friedel mates of measured voxels
        are used (:func:`friedel_complete`).
    support : array ``[N, N, N]`` bool, optional
        Initial support centred at ``N // 2`` (e.g. :func:`sphere_support`). Default:
        :func:`autocorrelation_support` at ``support_threshold``.
    n_iter : int
        Total iterations.
    algorithm : ``"raar"``, ``"hio"`` or ``"er"``
        Main algorithm, alternated with ER (``cycle``, ``er_per_cycle``) and ending with
        ``final_er`` ER iterations.
    beta : float, optional
        Feedback (default 0.87 for RAAR, 0.9 for HIO).
    shrinkwrap : bool or Shrinkwrap
        Support updates (True: :class:`Shrinkwrap` defaults; False/None: fixed support).
    rng : numpy.random.Generator or int, optional
        Source of the random starting phases.
    positivity : bool
        Enforce ``ρ ≥ 0`` inside the support (reality is always enforced).
    hold_fill : int, optional
        For the first ``hold_fill`` iterations (default: ``cycle``, at most a third of
        ``n_iter``) the unmeasured voxels inside the data (missing centre, gaps) hold the
        amplitudes of :func:`fill_amplitudes` (the given values where the input was
        filled, else a sphere fitted to the fringes); afterwards they are free. This
        keeps the unconstrained low-resolution modes from driving early iterations;
        0 disables it.
    band_limit : bool
        Constrain ``|F| = 0`` beyond the outermost measured voxel (the corners of the
        grid outside the data), so the density holds no detail finer than the data;
        unmeasured voxels inside (missing centre, gaps) stay free either way.
    dq : float, optional
        Reciprocal voxel (e.g. 1/Å): the density is then divided by the voxel volume
        ``(1 / (N dq))³``.

    Returns
    -------
    PhasingResult
    """
    algorithm = str(algorithm).lower()
    if algorithm not in ALGORITHMS:
        raise InputError("--algorithm", f"unknown algorithm {algorithm!r}", f"use one of {', '.join(ALGORITHMS)}")
    if n_iter < 1:
        raise InputError("--iterations", f"need at least 1 iteration, got {n_iter}", "e.g. 400")
    beta = DEFAULT_BETA[algorithm] if beta is None else float(beta)
    if algorithm != "er" and not 0.0 < beta < 1.0 + 1e-9:
        raise InputError("--beta", f"beta must be within (0, 1], got {beta}", "use about 0.9 for HIO, 0.87 for RAAR")
    if shrinkwrap is True:
        shrinkwrap = Shrinkwrap()
    elif not shrinkwrap:
        shrinkwrap = None
    xp = backend.array_module(intensity)
    data = _prepare(intensity, mask, band_limit)
    n, amp, m_h, c_h, w_h, inten = data.n, data.amp, data.measured, data.constrained, data.weights, data.intensity
    rng = _rng(rng)

    d_est = estimate_diameter(inten, data.measured_c)
    if support is None:
        sup_c = autocorrelation_support(inten, threshold=support_threshold, diameter=d_est)
        log.debug("diameter from the fringes %.2f voxels; autocorrelation support %d voxels", d_est, int(sup_c.sum()))
    else:
        sup_c = xp.asarray(support).astype(bool)
        if tuple(sup_c.shape) != (n, n, n):
            raise InputError("support", f"support shape {tuple(sup_c.shape)} differs from the intensity {(n, n, n)}", "give an N^3 support")
    sup = xp.fft.ifftshift(sup_c)  # work with the origin at index 0
    k2 = _kgrid2(n, xp)
    denom = float((w_h * amp * amp).sum())
    denom = denom if denom > 0 else 1.0

    # amplitudes of the unmeasured voxels inside the data: the given (filled) values, else a
    # sphere model; they start the run and hold for the first `hold_fill` iterations
    fill_c, region_c = fill_amplitudes(inten, data, d_est)
    fill_h, region_h = _to_half(fill_c), _to_half(region_c)
    hold = int(hold_fill) if hold_fill is not None else min(int(cycle), int(n_iter) // 3)
    amp_early = xp.where(region_h, fill_h, amp)
    con_early = c_h | region_h

    # random starting phases on the measured and filled amplitudes
    half = (n, n, n // 2 + 1)
    phases = xp.asarray(rng.uniform(0.0, 2.0 * np.pi, size=half).astype(np.float32))
    ft = amp_early * xp.exp(1j * phases).astype(xp.complex64)
    rho = xp.fft.irfftn(ft, s=(n, n, n), axes=(0, 1, 2)).astype(xp.float32)
    rho = xp.where(sup & (rho > 0) if positivity else sup, rho, 0)

    sched = _schedule(int(n_iter), algorithm, int(cycle), int(er_per_cycle), int(final_er))
    main_end = max(0, n_iter - final_er)
    sw_its = []
    if shrinkwrap is not None and shrinkwrap.every > 0:
        sw_its = [i for i in range(max(1, shrinkwrap.start), main_end, shrinkwrap.every)]
    n_sw = len(sw_its)
    sw_set = set(sw_its)
    sw_done = 0
    err_dev = xp.zeros(n_iter + 1, dtype=xp.float32)
    best_e, best = np.inf, None
    restore_ratio = 1.25
    n_restored = 0

    def modulus(r):
        f = xp.fft.rfftn(r)
        a = xp.abs(f)
        d = xp.where(m_h, a - amp, 0)
        return f, a, (w_h * d * d).sum()

    for it, alg in enumerate(sched):
        F, absF, e2 = modulus(rho)
        err_dev[it] = e2
        if it > 0 and sched[it - 1] == "er" and alg != "er":
            # end of an ER block: rho is a clean estimate (support and positivity hold). Keep
            # it, or go back to the previous one when this block ended much worse (a
            # shrinkwrap update cut into the particle or the feedback drove the iterate away)
            e = float(np.sqrt(float(e2) / denom))
            if log.isEnabledFor(logging.DEBUG):
                log.debug("iteration %d: ER block ends with error %.4f, support %d voxels", it, e, int(sup.sum()))
            if best is not None and e > restore_ratio * best_e:
                rho, sup = best[0].copy(), best[1].copy()
                F, absF, _ = modulus(rho)
                n_restored += 1
            else:
                best_e, best = e, (rho.copy(), sup.copy())
        a_it, c_it = (amp_early, con_early) if it < hold else (amp, c_h)
        ratio = a_it / xp.maximum(absF, 1e-30)
        F = xp.where(c_it, F * ratio, F)
        # voxels with |F| = 0 get the measured amplitude with zero phase
        F = xp.where(c_it & (absF == 0), a_it, F)
        p = xp.fft.irfftn(F, s=(n, n, n), axes=(0, 1, 2)).astype(xp.float32)
        if alg == "er":
            keep = sup & (p > 0) if positivity else sup
            rho = xp.where(keep, p, 0)
        elif alg == "hio":
            keep = sup & (p > 0) if positivity else sup
            rho = xp.where(keep, p, rho - beta * p)
        else:  # raar
            keep = sup & (2 * p - rho > 0) if positivity else sup
            rho = xp.where(keep, p, beta * rho + (1 - 2 * beta) * p)
        if it + 1 in sw_set:
            frac = sw_done / max(1, n_sw - 1)
            sigma = shrinkwrap.sigma_start * (shrinkwrap.sigma_end / shrinkwrap.sigma_start) ** min(1.0, frac)
            sw_done += 1
            sup = _shrinkwrap(p, sup, sigma, shrinkwrap, k2)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("iteration %d: shrinkwrap sigma %.2f -> support %d voxels", it + 1, sigma, int(sup.sum()))
    rho = xp.where(sup & (rho > 0), rho, 0) if positivity else xp.where(sup, rho, 0)
    err_dev[n_iter] = modulus(rho)[2]
    errors = np.sqrt(backend.to_host(err_dev).astype(np.float64) / denom)
    final = float(errors[-1])
    if best is not None and final > restore_ratio * best_e:
        rho, sup, final = best[0], best[1], best_e
        n_restored += 1
    if n_restored:
        log.debug("went back to an earlier estimate %d time(s)", n_restored)

    density = xp.fft.fftshift(rho)
    sup_c = xp.fft.fftshift(sup)
    density, sup_c = centre_density(density, sup_c)
    if dq is not None:
        density = density / (1.0 / (n * float(dq))) ** 3
    return PhasingResult(density.astype(xp.float32), sup_c, errors, final)


# ---------------------------------------------------------------------------------------
# alignment, PRTF, many runs
# ---------------------------------------------------------------------------------------
def _peak_subvoxel(cc):
    """Fractional index of the maximum of a periodic 3D array (parabolic fit per axis)."""
    xp = backend.array_module(cc)
    n = cc.shape[0]
    idx = int(xp.argmax(cc))
    pk = np.unravel_index(idx, cc.shape)
    out = []
    for ax in range(3):
        lo = list(pk)
        hi = list(pk)
        lo[ax] = (pk[ax] - 1) % n
        hi[ax] = (pk[ax] + 1) % n
        y0, y1, y2 = float(cc[tuple(lo)]), float(cc[pk]), float(cc[tuple(hi)])
        den = y0 - 2 * y1 + y2
        d = 0.5 * (y0 - y2) / den if den < 0 else 0.0
        out.append(pk[ax] + float(np.clip(d, -0.5, 0.5)))
    return tuple(out), float(cc[pk])


def _shift_from_index(idx, n):
    return tuple(((i + n / 2) % n) - n / 2 for i in idx)


def align_densities(ref, mov, *, allow_flip: bool = True) -> Alignment:
    """Align ``mov`` to ``ref``: sub-voxel translation and, optionally, the inversion ``ρ(−r)``.

    Both volumes are ``[N, N, N]`` (periodic). For ``mov`` and its centrosymmetric inverse
    (:func:`invert`) the cross-correlation with ``ref`` is computed by FFT; the peak is
    refined by a parabolic fit on each axis, the translation is applied as a Fourier
    phase ramp and the candidate with the larger normalised correlation is kept.
    """
    xp = backend.array_module(ref)
    if tuple(ref.shape) != tuple(mov.shape):
        raise InputError("align_densities", f"shapes differ: {tuple(ref.shape)} vs {tuple(mov.shape)}", "align volumes on the same grid")
    n = check_volume(ref, "align_densities")
    ref = xp.asarray(ref, dtype=xp.float32)
    mov = xp.asarray(mov, dtype=xp.float32)
    ref0 = ref - ref.mean()
    fr = xp.conj(xp.fft.rfftn(ref0))
    best = None
    for flipped in (False, True) if allow_flip else (False,):
        cand = invert(mov) if flipped else mov
        cc = xp.fft.irfftn(fr * xp.fft.rfftn(cand - cand.mean()), s=ref.shape, axes=(0, 1, 2))
        idx, _ = _peak_subvoxel(cc)
        shift = _shift_from_index(idx, n)
        moved = fourier_shift(cand, tuple(-s for s in shift))
        c = normalised_cc(ref, moved)
        if best is None or c > best.cc:
            # the inverted candidate lies at `shift`, so mov itself lies at -shift
            sign = -1.0 if flipped else 1.0
            best = Alignment(moved, tuple(sign * float(s) for s in shift), flipped, c)
    return best


def normalised_cc(a, b, mask=None) -> float:
    """Pearson correlation of two volumes (over ``mask`` when given)."""
    xp = backend.array_module(a)
    a = xp.asarray(a, dtype=xp.float64)
    b = xp.asarray(b, dtype=xp.float64)
    if mask is not None:
        mk = xp.asarray(mask).astype(bool)
        a, b = a[mk], b[mk]
    a = a - a.mean()
    b = b - b.mean()
    den = float(xp.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum()) / den if den > 0 else 0.0


def shell_index(n: int, xp=None):
    """Integer shell ``round(|q| / dq)`` of every voxel of a centred ``N³`` reciprocal grid."""
    xp = backend.xp() if xp is None else xp
    return xp.rint(xp.sqrt(shell_radius2(n, xp))).astype(xp.int64)


def prtf(densities, intensity, mask=None, dq: float | None = None, threshold: float = INV_E) -> PRTF:
    """Phase retrieval transfer function of aligned runs.

    Parameters
    ----------
    densities : array ``[n_runs, N, N, N]`` or list of arrays
        Aligned densities (same grid and origin).
    intensity, mask
        As for :func:`phase` (the modulus projection and the shells use them).
    dq : float, optional
        Reciprocal voxel (e.g. 1/Å); default ``1/N`` (q in cycles per voxel).
    threshold : float
        PRTF level that defines the resolution (default ``1/e``).

    Returns
    -------
    PRTF
    """
    xp = backend.array_module(intensity)
    data = _prepare(intensity, mask, band_limit=False)
    n, m_c = data.n, data.measured_c
    dq = 1.0 / n if dq is None else float(dq)
    acc = None
    count = 0
    for d in densities:
        F = xp.fft.fftshift(xp.fft.fftn(xp.fft.ifftshift(xp.asarray(d, dtype=xp.float32))))
        absF = xp.abs(F)
        ph = xp.where(absF > 0, F / xp.maximum(absF, 1e-30), 0)
        acc = ph if acc is None else acc + ph
        count += 1
    if count == 0:
        raise InputError("prtf", "no densities given", "pass the aligned runs")
    val = xp.abs(acc) / count
    shells = shell_index(n, xp)
    nshell = n // 2 + 1
    sel = m_c & (shells < nshell)
    cnt = backend.to_host(xp.bincount(shells[sel], minlength=nshell)[:nshell])
    tot = backend.to_host(xp.bincount(shells[sel], weights=val[sel].astype(xp.float64), minlength=nshell)[:nshell])
    with np.errstate(invalid="ignore", divide="ignore"):
        curve = np.where(cnt > 0, tot / np.maximum(cnt, 1), np.nan)
    q = np.arange(nshell) * dq
    q_cut, res, crossed = resolution_from_prtf(q, curve, threshold)
    return PRTF(q, curve, cnt, q_cut, res, crossed, float(threshold))


def resolution_from_prtf(q, prtf_values, threshold: float = INV_E):
    """First crossing of ``threshold`` by a PRTF curve, above the missing centre.

    Shells without data (NaN) are skipped; the search starts at the first shell with data
    whose PRTF is above the threshold, and the crossing is interpolated linearly between
    the last shell above and the first below.

    Returns
    -------
    (q_cut, resolution, crossed)
        ``resolution = 1 / q_cut``; when the curve never drops below the threshold,
        ``q_cut`` is the last shell with data and ``crossed`` is False.
    """
    q = np.asarray(q, dtype=np.float64)
    v = np.asarray(prtf_values, dtype=np.float64)
    ok = np.isfinite(v) & (q > 0)
    qs, vs = q[ok], v[ok]
    if qs.size == 0:
        return float("nan"), float("nan"), False
    above = np.nonzero(vs >= threshold)[0]
    if above.size == 0:
        return float(qs[0]), float(1.0 / qs[0]), True
    start = above[0]
    for i in range(start + 1, qs.size):
        if vs[i] < threshold:
            q0, q1, v0, v1 = qs[i - 1], qs[i], vs[i - 1], vs[i]
            qc = q0 + (v0 - threshold) * (q1 - q0) / (v0 - v1) if v0 != v1 else q1
            return float(qc), float(1.0 / qc), True
    return float(qs[-1]), float(1.0 / qs[-1]), False


def phase_many(
    intensity,
    n_runs: int = 8,
    mask=None,
    support=None,
    *,
    seed: int | None = 0,
    dq: float | None = None,
    threshold: float = INV_E,
    keep_error_ratio: float | None = 1.5,
    **kwargs,
) -> PhasingSet:
    """Independent runs of :func:`phase`, aligned to the best run and averaged, with the PRTF.

    Parameters
    ----------
    intensity, mask, support
        As for :func:`phase`.
    n_runs : int
        Number of independent runs (random starting phases from ``seed``).
    seed : int, optional
        Seed of the runs (run ``k`` uses the ``k``-th child of ``SeedSequence(seed)``).
    dq : float, optional
        Reciprocal voxel (1/Å): PRTF ``q`` in 1/Å, densities per Å³ (see :func:`phase`).
    threshold : float
        PRTF level of the resolution (1/e).
    keep_error_ratio : float, optional
        Runs whose final modulus error exceeds this multiple of the lowest one (stagnated
        runs, e.g. two overlapping copies of the particle in a loose support) are left out
        of the average and the PRTF; None keeps every run.
    **kwargs
        Passed to :func:`phase` (``n_iter``, ``algorithm``, ``beta``, ``shrinkwrap``, ...).

    Returns
    -------
    PhasingSet
        Unpacks as ``(aligned [n_kept, N, N, N], average, prtf)``.
    """
    if int(n_runs) < 1:
        raise InputError("--runs", f"need at least 1 run, got {n_runs}", "e.g. 8")
    xp = backend.array_module(intensity)
    n = check_volume(intensity)
    children = np.random.SeedSequence(seed).spawn(int(n_runs))
    runs = []
    for k, ss in enumerate(children):
        t0 = time.time()
        res = phase(intensity, mask, support, rng=np.random.default_rng(ss), dq=dq, **kwargs)
        runs.append(res)
        log.info("run %d/%d: final modulus error %.4f, support %d voxels, %.1f s",
                 k + 1, n_runs, res.final_error, int(res.support.sum()), time.time() - t0)
    errs = np.array([r.final_error if np.isfinite(r.final_error) else np.inf for r in runs])
    ref_i = int(np.argmin(errs))
    if keep_error_ratio is None or not np.isfinite(errs[ref_i]):
        kept = list(range(len(runs)))
    else:
        kept = [k for k in range(len(runs)) if errs[k] <= float(keep_error_ratio) * errs[ref_i]]
    if len(kept) < len(runs):
        log.warning("left out %d of %d runs with a final error above %.3g x the best (%.4f)",
                    len(runs) - len(kept), len(runs), keep_error_ratio, errs[ref_i])
    ref = runs[ref_i].density
    aligned = xp.empty((len(kept), n, n, n), dtype=xp.float32)
    infos = []
    for j, k in enumerate(kept):
        if k == ref_i:
            aligned[j] = ref
            infos.append(Alignment(None, (0.0, 0.0, 0.0), False, 1.0))
            continue
        al = align_densities(ref, runs[k].density)
        aligned[j] = al.aligned
        infos.append(replace(al, aligned=None))
        log.info("run %d aligned: shift %s, inverted %s, cc %.3f", k + 1,
                 ", ".join(f"{s:.2f}" for s in al.shift), al.flipped, al.cc)
    average = xp.maximum(aligned.mean(axis=0), 0)
    average, _ = centre_density(average)
    pr = prtf(aligned, intensity, mask, dq=dq, threshold=threshold)
    voxel = 1.0 if dq is None else 1.0 / (n * float(dq))
    return PhasingSet(aligned, average.astype(xp.float32), pr, runs, infos, ref_i, voxel, kept)
