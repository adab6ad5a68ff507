"""2D classification of SPI diffraction patterns: EM with in-plane rotations.

Every pattern is binned on a polar grid about its own beam centre, so that an in-plane
rotation of the pattern is a cyclic shift along the angle axis. Classes are 2D intensity
models on the same grid; the likelihood of every (frame, class, rotation) comes from
FFT correlations along the angle axis, batched over frames (numpy or cupy through
:mod:`conveyor.backend`).

Polar grid
----------
Ring ``i`` holds pixels with ``r_min + i * ring_px <= r < r_min + (i + 1) * ring_px``
(``r`` in px from the frame's beam centre); angle bin ``j`` holds angles
``j * step <= theta < (j + 1) * step`` with ``theta = atan2(y - cy, x - cx)`` in pixel
coordinates (x = column, y = row; on an image drawn with row 0 at the top, ``theta``
grows clockwise). With ``friedel=True`` (default) the pattern is folded onto
``[0°, 180°)``: diffraction intensities are centrosymmetric (Friedel's law) up to the
Ewald-sphere curvature, so a pixel and its mirror through the beam centre count in the
same bin and the mirror fills the other's gaps and beamstop shadow. The step is then
``180° / n_rot``, otherwise ``360° / n_rot``; the number of angle bins is ``n_rot``.
Each pixel is split into ``oversample²`` sub-pixels that are binned separately; a bin
holds the photons ``K`` and the number of good pixels ``n`` that fell in it (masked
pixels are excluded from both).

The innermost rings matter: there a bin holds one pixel or less, and the steep fall of
the intensity within a pixel leaves a pattern of the pixel grid in the binned data, the
same in every frame. Near the beamstop these rings also hold the most photons, so the
likelihood prefers rotations that align that detector pattern, not the particle (on a
64-px detector with a 5-px beamstop, frames piled up on a few rotations and rotated
copies kept their rotation). The automatic ``r_min`` therefore starts the grid where
a bin holds at least :data:`MIN_BIN_PIXELS` pixels (``r >= 1.5 n_rot / 2 pi``: 8.6 px
for 36 rotations) and one pixel beyond the beamstop edge.

Likelihood
----------
Class ``k`` is an intensity per pixel ``W_k[r, j]``. A frame ``d`` rotated by ``s`` bins
relative to class ``k`` expects ``phi * n_d[r, j] * W_k[r, j - s]`` photons in bin
``(r, j)``. With the per-frame scale fitted analytically for every (class, rotation),
``phi_dks = K_d / U_dks`` (``K_d`` = the frame's photons, ``U_dks = sum n_d W_k``
shifted), the Poisson log-likelihood is::

    L_dks = sum_rj K_d[r, j] log W_k[r, j - s] + K_d log phi_dks - K_d

(the ``-sum log K!`` term, the same for all classes, is dropped). Both sums are circular
correlations along the angle axis: one real FFT of the data and of the models, a
complex matrix product over rings per frequency (as four real batched products), one
inverse FFT give all ``n_rot`` rotations of all classes at once.

EM
--
Probabilities ``P_dks ∝ exp(beta_d (L_dks - max L_d))`` over classes and rotations
(uniform priors). The M-step is the Poisson maximum-likelihood update::

    W_k[r, i] = sum_ds P_dks K_d[r, i + s] / sum_ds P_dks phi_dks n_d[r, i + s]

again a correlation computed with FFTs, shrunk weakly (:data:`PRIOR_WEIGHT`, 2 % of a
bin's typical exposure) towards the ring mean of the class so that bins which almost no
frame covered (the detector gap when all members share a rotation) stay finite.
``beta`` anneals: by default each frame starts at
Dragonfly's ``beta0_d = exp(-6.5 (K_d 1e-5)^0.15)`` (frames with more photons start
softer) and rises geometrically to 1, reached at 70 % of the iterations; the last
iterations run at ``beta = 1``. A class that collects less than half a frame's worth of
probability during the annealing is re-seeded from the frame the models explain worst
(per photon).

Initialisation: ``"kmeans++"`` (default) picks seed frames by k-means++ sampling on
rotation-invariant features (log ring profile and angular power spectrum of each
ring band); each class starts as its seed frame blended 1:1 with the mean radial profile.
``"random"`` assigns every frame to a random class and rotation.

Outputs (:class:`Classify2DResult`): polar class models, class images on a Cartesian
grid centred on the beam (for display), and per frame the most likely class
(**0-based** in the API; files written by ``conveyor spi class2d`` number classes from
1), rotation (degrees; the frame is the class image rotated by this angle, in the
``theta`` sense above; modulo 180° with ``friedel``), scale ``phi``, the probability
of that class (summed over rotations), the log-likelihood margin to the next class and
the misfit to the rotated class model (:func:`frame_misfit`). With ring profiles
(:func:`profile_grid`, as :func:`classify_patterns` and ``conveyor spi class2d`` do)
also the class radial profiles from the members' full rings, reaching in to the
beamstop edge, for sizing the classes (:mod:`conveyor.spi.select`).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from .. import backend
from ..errors import InputError

log = logging.getLogger(__name__)

#: Default angular sub-sampling of each pixel (``oversample²`` sub-pixels).
OVERSAMPLE = 2
#: Good-pixel fraction a ring needs (on the common mask) for the automatic ``r_min``.
RMIN_COVERAGE = 0.5
#: Rings skipped beyond the beamstop edge by the automatic ``r_min``, px.
RMIN_MARGIN_PX = 1.0
#: Pixels a polar bin of the first ring must hold on average (automatic ``r_min``).
MIN_BIN_PIXELS = 1.5
#: Fraction of the iterations over which beta rises to 1 (default schedule).
ANNEAL_FRACTION = 0.7
#: Largest number of rings of the automatic grid (wider rings beyond this).
MAX_RINGS = 96
#: Weight of the mean radial profile in a seed class model (1 = half seed, half mean).
SEED_BLEND = 1.0
#: Beam centres are rounded to this many decimals (px) to share binning matrices.
CENTER_DECIMALS = 2
#: Weight of the ring mean in the M-step, relative to the ring's mean exposure (see :func:`_update_models`).
PRIOR_WEIGHT = 0.02
#: Frames per batch of the E/M steps.
BATCH = 2048
_FLOOR = 1e-6  # relative floor of the class models (keeps log W finite)


# ---------------------------------------------------------------------------------------
# polar grid and binning
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PolarGrid:
    """Rings and angle bins of the classification (see the module notes).

    Attributes
    ----------
    r_min, ring_px : float
        Inner radius of the first ring and ring width, px.
    n_rings : int
    n_angles : int
        Angle bins = in-plane rotations.
    friedel : bool
        Angles folded onto [0°, 180°).
    """

    r_min: float
    ring_px: float
    n_rings: int
    n_angles: int
    friedel: bool = True

    @property
    def r_max(self) -> float:
        return self.r_min + self.ring_px * self.n_rings

    @property
    def period_deg(self) -> float:
        return 180.0 if self.friedel else 360.0

    @property
    def step_deg(self) -> float:
        return self.period_deg / self.n_angles

    @property
    def radii(self) -> np.ndarray:
        """Ring centres, px."""
        return self.r_min + self.ring_px * (np.arange(self.n_rings) + 0.5)

    @property
    def angles_deg(self) -> np.ndarray:
        """Angle-bin centres, degrees."""
        return self.step_deg * (np.arange(self.n_angles) + 0.5)

    def as_dict(self) -> dict:
        return dict(r_min=self.r_min, ring_px=self.ring_px, n_rings=self.n_rings, n_angles=self.n_angles,
                    friedel=bool(self.friedel))


def make_grid(shape, mask, centers, n_rot: int = 36, *, friedel: bool = True, r_min=None, r_max=None,
              ring_px=None) -> PolarGrid:
    """The polar grid for frames of ``shape`` with beam ``centers``.

    Parameters
    ----------
    shape : (ny, nx)
    mask : array [y, x] or [n, y, x], 1 = good pixel
    centers : array [n, 2] or (cx, cy), px
    n_rot : int
        Angle bins (= in-plane rotations); at least 4.
    friedel : bool
        Fold angles onto [0°, 180°).
    r_min : float, optional
        Inner radius, px; default the first 1-px ring of the common mask (about the
        median centre) that is at least :data:`RMIN_COVERAGE` good pixels, plus
        :data:`RMIN_MARGIN_PX`, and at least ``MIN_BIN_PIXELS * n_rot / (2 pi ring_px)``
        so every bin of the first ring holds :data:`MIN_BIN_PIXELS` pixels on average
        (see the module notes).
    r_max : float, optional
        Outer radius, px; default the largest circle inside the detector for every centre.
    ring_px : float, optional
        Ring width, px; default 1, or wider so there are at most :data:`MAX_RINGS` rings.
    """
    if int(n_rot) < 4:
        raise InputError("--rotations", f"need at least 4 in-plane rotations, got {n_rot}", "use 36-72")
    ny, nx = int(shape[0]), int(shape[1])
    c = np.atleast_2d(np.asarray(backend.to_host(centers), dtype=np.float64))
    if r_max is None:
        r_max = float(np.min([c[:, 0] + 0.5, nx - 0.5 - c[:, 0], c[:, 1] + 0.5, ny - 0.5 - c[:, 1]]))
    r_max = float(r_max)
    m = np.asarray(backend.to_host(mask))
    if m.shape[-2:] != (ny, nx) or m.ndim not in (2, 3):
        raise InputError("mask", f"mask shape {m.shape} does not match frames {(ny, nx)}", "give a [y, x] mask or one per frame")
    if r_min is None:
        r_min = coverage_edge(shape, m, c) + RMIN_MARGIN_PX
        width = 1.0 if ring_px is None else float(ring_px)
        r_min = max(r_min, MIN_BIN_PIXELS * int(n_rot) / (2.0 * np.pi * width))
    r_min = max(0.0, float(r_min))
    if not r_max > r_min + 2:
        raise InputError("polar grid", f"no usable rings between r_min={r_min:g} and r_max={r_max:g} px",
                         "check the beam centre, the mask (beamstop) and --r-min/--r-max")
    if ring_px is None:
        ring_px = max(1.0, (r_max - r_min) / MAX_RINGS)
    n_rings = int(math.floor((r_max - r_min) / float(ring_px)))
    return PolarGrid(r_min, float(ring_px), n_rings, int(n_rot), bool(friedel))


def coverage_edge(shape, mask, centers) -> float:
    """Inner edge (px) of the first 1-px ring of the common mask (about the median centre) that is
    at least :data:`RMIN_COVERAGE` good pixels: the edge of the beamstop shadow."""
    ny, nx = int(shape[0]), int(shape[1])
    c = np.atleast_2d(np.asarray(backend.to_host(centers), dtype=np.float64))
    m = np.asarray(backend.to_host(mask))
    m = m.astype(bool) if m.ndim == 2 else m.astype(bool).all(axis=0)
    cm = np.median(c, axis=0)
    yy, xx = np.mgrid[0:ny, 0:nx]
    ri = np.floor(np.hypot(xx - cm[0], yy - cm[1])).astype(np.int64).ravel()
    nb = int(ri.max()) + 1
    tot = np.bincount(ri, minlength=nb)
    good = np.bincount(ri, weights=m.ravel().astype(np.float64), minlength=nb)
    ok = np.flatnonzero((tot > 0) & (good >= RMIN_COVERAGE * np.maximum(tot, 1)))
    return float(ok[0]) if ok.size else 0.0


def profile_grid(shape, mask, centers, grid: PolarGrid) -> PolarGrid:
    """Rings for the class radial profiles: from the beamstop edge (+ :data:`RMIN_MARGIN_PX`) to
    ``grid.r_max`` in rings of ``grid.ring_px``, one angle bin (full rings, so the innermost rings
    are usable here although they are too pixelated for the angular likelihood)."""
    r0 = min(coverage_edge(shape, mask, centers) + RMIN_MARGIN_PX, grid.r_min)
    n = int(math.floor((grid.r_max - r0) / grid.ring_px + 1e-9))
    return PolarGrid(r0, grid.ring_px, max(n, 1), 1, grid.friedel)


def class_profiles(assignments, scales, prof_counts, prof_npix, n_classes: int):
    """Radial profile of every class from its members' ring photons: ``sum K / sum phi n`` [k, rings] (host).

    ``prof_counts, prof_npix``: ``[n, rings]`` (or ``[n, rings, 1]``) from :func:`polar_bin` on a
    :func:`profile_grid`; ``scales``: the frames' ``phi``. In the units of the class models.
    """
    K = np.asarray(backend.to_host(prof_counts), dtype=np.float64).reshape(len(assignments), -1)
    N = np.asarray(backend.to_host(prof_npix), dtype=np.float64).reshape(len(assignments), -1)
    num = np.zeros((n_classes, K.shape[1]))
    den = np.zeros((n_classes, K.shape[1]))
    np.add.at(num, assignments, K)
    np.add.at(den, assignments, N * np.asarray(scales, dtype=np.float64)[:, None])
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / den, np.nan)


def _sparse(xp):
    if xp is np:
        import scipy.sparse as sp  # noqa: PLC0415
    else:  # pragma: no cover - GPU
        import cupyx.scipy.sparse as sp  # noqa: PLC0415
    return sp


def _binning_matrix(shape, center, grid: PolarGrid, oversample: int, xp):
    """Sparse ``[n_rings * n_angles, ny * nx]`` matrix: pixel -> polar bin weights (sum 1 per pixel inside)."""
    ny, nx = shape
    o = int(oversample)
    sub = (np.arange(o) + 0.5) / o - 0.5
    y = xp.arange(ny, dtype=xp.float64)[:, None, None, None] + xp.asarray(sub)[None, None, :, None]
    x = xp.arange(nx, dtype=xp.float64)[None, :, None, None] + xp.asarray(sub)[None, None, None, :]
    dx = x - center[0]
    dy = y - center[1]
    r = xp.sqrt(dx * dx + dy * dy)
    th = xp.degrees(xp.arctan2(dy, dx)) % grid.period_deg
    ring = xp.floor((r - grid.r_min) / grid.ring_px).astype(xp.int64)
    ang = xp.minimum(xp.floor(th / grid.step_deg).astype(xp.int64), grid.n_angles - 1)
    ok = (ring >= 0) & (ring < grid.n_rings)
    ok = xp.broadcast_to(ok, (ny, nx, o, o))
    pix = xp.broadcast_to(xp.arange(ny * nx, dtype=xp.int64).reshape(ny, nx, 1, 1), (ny, nx, o, o))
    b = xp.broadcast_to(ring * grid.n_angles + ang, (ny, nx, o, o))
    rows, cols = b[ok], pix[ok]
    vals = xp.full(rows.shape, 1.0 / (o * o))
    sp = _sparse(xp)
    B = sp.coo_matrix((vals, (rows.astype(xp.int32), cols.astype(xp.int32))),
                      shape=(grid.n_rings * grid.n_angles, ny * nx)).tocsr()
    B.sum_duplicates()  # one entry per (bin, pixel): the pixel's share of that bin
    return B


def polar_bin(patterns, mask, centers, grid: PolarGrid, *, oversample: int = OVERSAMPLE, return_n2: bool = False):
    """Photons and good pixels of every frame in the polar bins of ``grid``.

    Parameters
    ----------
    patterns : array [n, y, x]
        Photon counts (numpy or cupy; moved to the selected device).
    mask : array [y, x] or [n, y, x]
        1 = good pixel.
    centers : array [n, 2] or (cx, cy)
        Beam centre of every frame, px (rounded to :data:`CENTER_DECIMALS` decimals so
        frames with the same centre share one binning matrix).
    grid : PolarGrid
    oversample : int
        Each pixel is split into ``oversample²`` sub-pixels.
    return_n2 : bool
        Also return ``npix2``, the sum of the squared sub-pixel weights of the good pixels
        in each bin: the variance of a bin's photons is ``npix2 / npix`` times its mean
        (a pixel's photons are shared between bins), used by the frame misfit.

    Returns
    -------
    counts, npix[, npix2] : device arrays [n, n_rings, n_angles] float64
    """
    data = backend.asarray(patterns) if backend.array_module(patterns) is np else patterns
    xp = backend.array_module(data)
    data = xp.asarray(data, dtype=xp.float64)
    if data.ndim == 2:
        data = data[None]
    n, ny, nx = data.shape
    m = xp.asarray(mask).astype(xp.float64)
    if m.shape[-2:] != (ny, nx) or m.ndim not in (2, 3) or (m.ndim == 3 and m.shape[0] != n):
        raise InputError("mask", f"mask shape {tuple(m.shape)} does not match frames {(n, ny, nx)}",
                         "give a [y, x] mask or one per frame")
    c = np.asarray(backend.to_host(centers), dtype=np.float64)
    c = np.broadcast_to(np.atleast_2d(c), (n, 2)).round(CENTER_DECIMALS)
    if not np.all(np.isfinite(c)):
        raise InputError("centers", "beam centres contain NaN", "run 'conveyor spi center' or give the file's centre")
    nb = grid.n_rings * grid.n_angles
    counts = xp.zeros((n, nb), dtype=xp.float64)
    npix = xp.zeros((n, nb), dtype=xp.float64)
    npix2 = xp.zeros((n, nb), dtype=xp.float64) if return_n2 else None
    uniq, inverse = np.unique(c, axis=0, return_inverse=True)
    inverse = np.asarray(inverse).ravel()
    flat = data.reshape(n, -1)
    mflat = m.reshape(1 if m.ndim == 2 else n, -1)
    for u in range(uniq.shape[0]):
        rows = np.flatnonzero(inverse == u)
        B = _binning_matrix((ny, nx), uniq[u], grid, oversample, xp)
        B2 = None
        if return_n2:  # squared shares: a pixel's photons go to its bins together (fully correlated)
            B2 = B.copy()
            B2.data = B2.data ** 2
        every = uniq.shape[0] == 1
        ridx = slice(None) if every else xp.asarray(rows)
        frames_u = flat if every else flat[ridx]
        if m.ndim == 2:
            good = mflat[0]
            Bm = B @ _sparse(xp).diags(good)  # masked pixels contribute nothing
            counts[ridx] = (Bm @ frames_u.T).T
            npix[ridx] = (B @ good)[None]
            if return_n2:
                npix2[ridx] = (B2 @ good)[None]
        else:
            mm = mflat if every else mflat[ridx]
            counts[ridx] = (B @ (frames_u * mm).T).T
            npix[ridx] = (B @ mm.T).T
            if return_n2:
                npix2[ridx] = (B2 @ mm.T).T
    shape3 = (n, grid.n_rings, grid.n_angles)
    if return_n2:
        return counts.reshape(shape3), npix.reshape(shape3), npix2.reshape(shape3)
    return counts.reshape(shape3), npix.reshape(shape3)


def polar_to_cartesian(models, grid: PolarGrid, size: int | None = None):
    """Class models ``[k, rings, angles]`` as images ``[k, size, size]`` centred on the beam.

    Pixel ``[iy, ix]`` of an image is at ``(x, y) = (ix - c, iy - c)``, ``c = size // 2``,
    from the beam; values are interpolated linearly in radius and (cyclically) in angle.
    Pixels outside ``[r_min, r_max)`` are NaN. Host numpy.
    """
    mod = np.asarray(backend.to_host(models), dtype=np.float64)
    if mod.ndim == 2:
        mod = mod[None]
    if size is None:
        size = 2 * int(math.ceil(grid.r_max)) + 1
    c = size // 2
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    dx, dy = xx - c, yy - c
    r = np.hypot(dx, dy)
    th = np.degrees(np.arctan2(dy, dx)) % grid.period_deg
    fr = (r - grid.r_min) / grid.ring_px - 0.5
    fa = th / grid.step_deg - 0.5
    r0 = np.clip(np.floor(fr).astype(int), 0, grid.n_rings - 1)
    r1 = np.clip(r0 + 1, 0, grid.n_rings - 1)
    wr = np.clip(fr - np.floor(fr), 0.0, 1.0)
    wr = np.where(fr < 0, 0.0, np.where(fr > grid.n_rings - 1, 0.0, wr))
    a0f = np.floor(fa)
    wa = fa - a0f
    a0 = a0f.astype(int) % grid.n_angles
    a1 = (a0 + 1) % grid.n_angles
    v = ((1 - wr) * ((1 - wa) * mod[:, r0, a0] + wa * mod[:, r0, a1])
         + wr * ((1 - wa) * mod[:, r1, a0] + wa * mod[:, r1, a1]))
    inside = (r >= grid.r_min) & (r < grid.r_max)
    return np.where(inside[None], v, np.nan)


# ---------------------------------------------------------------------------------------
# EM kernels
# ---------------------------------------------------------------------------------------
def default_beta(photons, iterations: int, anneal_fraction: float = ANNEAL_FRACTION):
    """Default schedule: ``[iterations, n]`` beta per iteration and frame (module notes)."""
    k = np.maximum(np.asarray(photons, dtype=np.float64), 0.0)
    b0 = np.exp(-6.5 * (k * 1e-5) ** 0.15)
    t_end = max(1, int(math.ceil(anneal_fraction * iterations)))
    t = np.arange(iterations, dtype=np.float64)[:, None]
    frac = np.clip(t / t_end, 0.0, 1.0)
    return b0[None, :] ** (1.0 - frac)


def _beta_table(beta_schedule, photons, iterations):
    n = np.asarray(photons).size
    if beta_schedule is None or (isinstance(beta_schedule, str) and beta_schedule == "auto"):
        return default_beta(photons, iterations)
    if callable(beta_schedule):
        vals = np.array([float(beta_schedule(t)) for t in range(iterations)])
    elif np.isscalar(beta_schedule):
        vals = np.full(iterations, float(beta_schedule))
    else:
        vals = np.asarray(beta_schedule, dtype=np.float64).ravel()
        if vals.size != iterations:
            raise InputError("beta_schedule", f"{vals.size} values for {iterations} iterations",
                             "give one beta per iteration, a constant, a callable or 'auto'")
    if not np.all((vals > 0) & (vals <= 1)):
        raise InputError("beta_schedule", "beta must lie in (0, 1]", "give values in (0, 1]")
    return np.broadcast_to(vals[:, None], (iterations, n))


def _rfft_split(x, xp):
    """Real FFT along the last (angle) axis of ``x [a, b, J]`` as contiguous ``(re, im)``, each ``[f, a, b]``."""
    f = xp.moveaxis(xp.fft.rfft(x, axis=-1), -1, 0)
    return xp.ascontiguousarray(f.real), xp.ascontiguousarray(f.imag)


def _irfft_join(re, im, n_angles, xp):
    """Inverse of :func:`_rfft_split`: ``[f, a, b]`` parts -> real ``[a, b, J]``."""
    return xp.fft.irfft(xp.moveaxis(re + 1j * im, 0, -1), n=n_angles, axis=-1)


def _corr_all(data_f, model_f, n_angles, xp):
    """``out[d, k, s] = sum_rj data[d, r, j] model[k, r, j - s]`` from split rffts ``[f, d, r]``, ``[f, k, r]``.

    Per frequency ``data_f @ conj(model_f)^T``, as four real batched matrix products
    (numpy's complex batched matmul is slow).
    """
    dr, di = data_f
    mr, mi = (xp.ascontiguousarray(xp.swapaxes(m, 1, 2)) for m in model_f)  # numpy matmul needs these contiguous
    re = xp.matmul(dr, mr) + xp.matmul(di, mi)
    im = xp.matmul(di, mr) - xp.matmul(dr, mi)
    return _irfft_join(re, im, n_angles, xp)


def _back_all(prob_f, data_f, n_angles, xp):
    """``out[k, r, i] = sum_ds P[d, k, s] data[d, r, i + s]`` from split rffts ``[f, d, k]``, ``[f, d, r]``."""
    pr, pi = (xp.ascontiguousarray(xp.swapaxes(p, 1, 2)) for p in prob_f)
    dr, di = data_f
    re = xp.matmul(pr, dr) + xp.matmul(pi, di)
    im = xp.matmul(pr, di) - xp.matmul(pi, dr)
    return _irfft_join(re, im, n_angles, xp)


def _loglik(K, N, models, xp):
    """``L [d, k, s]``, ``phi [d, k, s]`` and the split rffts of ``K``, ``N`` for a batch of frames."""
    J = K.shape[-1]
    K = xp.asarray(K, dtype=xp.float64)
    N = xp.asarray(N, dtype=xp.float64)
    Kf = _rfft_split(K, xp)
    Nf = _rfft_split(N, xp)
    A = _corr_all(Kf, _rfft_split(xp.log(models), xp), J, xp)
    U = _corr_all(Nf, _rfft_split(models, xp), J, xp)
    tot = K.sum(axis=(1, 2))[:, None, None]
    U = xp.maximum(U, 1e-300)
    phi = tot / U
    L = A + xp.where(tot > 0, tot * xp.log(xp.maximum(phi, 1e-300)), 0.0) - tot
    return L, phi, Kf, Nf


def _posterior(L, beta, xp):
    """``P [d, k, s]`` from ``L`` at per-frame ``beta [d]``."""
    d = L.shape[0]
    flat = L.reshape(d, -1)
    mx = flat.max(axis=1, keepdims=True)
    e = xp.exp(beta[:, None] * (flat - mx))
    e /= e.sum(axis=1, keepdims=True)
    return e.reshape(L.shape)


def _update_models(num, den, g, xp, prior=PRIOR_WEIGHT):
    """M-step ``W = (num + a m_r d_r) / (den + a d_r)``: the Poisson ML update shrunk weakly to the ring mean.

    ``d_r`` is the mean exposure (``den``) of the class's ring ``r`` over angles and ``m_r``
    the ring's mean intensity; bins that (almost) no frame covered -- e.g. the detector gap
    of frames that all share one rotation -- take the ring mean instead of a value from a
    handful of sub-pixels (which could be ~0 and forbid any photon there for ever). A class
    without any exposure in a ring takes the mean profile ``g``.
    """
    d_r = den.mean(axis=2, keepdims=True)
    m_r = num.sum(axis=2, keepdims=True) / xp.maximum(den.sum(axis=2, keepdims=True), 1e-300)
    m_r = xp.where(d_r > 0, m_r, g[None, :, None])
    w = prior * d_r
    out = xp.where(d_r > 0, (num + w * m_r) / xp.maximum(den + w, 1e-300), g[None, :, None] * xp.ones_like(num))
    return _floor_models(out, xp)


def _floor_models(models, xp):
    mean = float(models.mean()) if models.size else 1.0
    return xp.maximum(models, _FLOOR * max(mean, 1e-300))


def _mean_profile(K, N, xp):
    """Mean intensity per pixel of every ring over all frames after scaling each to its photons [r]."""
    ring_k = K.sum(axis=2, dtype=xp.float64)
    ring_n = N.sum(axis=2, dtype=xp.float64)
    # first pass: unweighted per-pixel ring intensity
    g = ring_k.sum(axis=0) / xp.maximum(ring_n.sum(axis=0), 1e-12)
    g = xp.maximum(g, 1e-12 * max(float(g.max()), 1e-300))
    phi = ring_k.sum(axis=1) / xp.maximum((ring_n * g[None]).sum(axis=1), 1e-300)
    g = ring_k.sum(axis=0) / xp.maximum((phi[:, None] * ring_n).sum(axis=0), 1e-300)
    return xp.maximum(g, 1e-12 * max(float(g.max()), 1e-300)), phi


def _features(K, N, xp, batch=BATCH):
    """Rotation-invariant features per frame (host) for k-means++ seeding.

    The log of the normalised ring profile and the angular power spectrum of the relative
    modulation averaged over 4 bands of rings; every feature standardised over frames.
    """
    out = []
    for start in range(0, K.shape[0], batch):
        k = xp.asarray(K[start:start + batch], dtype=xp.float64)
        n = xp.asarray(N[start:start + batch], dtype=xp.float64)
        ring_k = k.sum(axis=2)
        ring_n = n.sum(axis=2)
        prof = xp.where(ring_n > 0, ring_k / xp.maximum(ring_n, 1e-12), 0.0)
        prof = prof / xp.maximum(prof.mean(axis=1, keepdims=True), 1e-300)
        inten = xp.where(n > 0, k / xp.maximum(n, 1e-12), 0.0)
        rel = inten / xp.maximum(inten.mean(axis=2, keepdims=True), 1e-300) - 1.0
        rel = xp.where(n > 0, rel, 0.0)
        pw = xp.abs(xp.fft.rfft(rel, axis=-1))[:, :, 1:] ** 2  # [d, r, f > 0]
        bands = xp.array_split(pw, min(4, k.shape[1]), axis=1)
        f2 = xp.concatenate([bd.mean(axis=1) for bd in bands], axis=1)
        out.append((backend.to_host(xp.log1p(prof)), backend.to_host(f2)))
    f1 = np.concatenate([o[0] for o in out])
    f2 = np.concatenate([o[1] for o in out])
    f2 = np.log1p(f2 / max(float(f2.mean()), 1e-300))
    feats = np.concatenate([f1, f2], axis=1)
    sd = feats.std(axis=0)
    return (feats - feats.mean(axis=0)) / np.where(sd > 0, sd, 1.0)


def _kmeanspp(feats, n_classes, rng):
    """Indices of ``n_classes`` seed frames by k-means++ D² sampling."""
    n = feats.shape[0]
    seeds = [int(rng.integers(n))]
    d2 = np.sum((feats - feats[seeds[0]]) ** 2, axis=1)
    while len(seeds) < n_classes:
        tot = d2.sum()
        if not tot > 0:
            rest = np.setdiff1d(np.arange(n), seeds)
            seeds.append(int(rng.choice(rest)))
        else:
            seeds.append(int(rng.choice(n, p=d2 / tot)))
        d2 = np.minimum(d2, np.sum((feats - feats[seeds[-1]]) ** 2, axis=1))
    return np.asarray(seeds)


def _seed_model(Ks, Ns, g, xp, blend=SEED_BLEND):
    """A class model from one frame, blended with the mean radial profile ``g [r]``."""
    Ks = xp.asarray(Ks, dtype=xp.float64)
    Ns = xp.asarray(Ns, dtype=xp.float64)
    expected = Ns * g[:, None]
    phi = float(Ks.sum()) / max(float(expected.sum()), 1e-300)
    num = Ks + blend * phi * expected
    den = (1.0 + blend) * phi * Ns
    return xp.where(Ns > 0, num / xp.maximum(den, 1e-300), g[:, None] * xp.ones_like(Ns))


# ---------------------------------------------------------------------------------------
# results and the main loop
# ---------------------------------------------------------------------------------------
@dataclass
class Classify2DResult:
    """Result of :func:`classify_polar` / :func:`classify_patterns` (host numpy arrays).

    Attributes
    ----------
    class_images : ndarray [k, s, s]
        Class models on a Cartesian grid centred on the beam (index ``s // 2``),
        intensity per pixel at unit scale; NaN outside the rings used.
    assignments : ndarray [n] int
        Most likely class, **0-based** (index into ``class_images``).
    rotations : ndarray [n]
        In-plane rotation of the frame relative to its class, degrees in
        ``[0, period)`` (bin centres ``s * step``); see the module notes.
    scales : ndarray [n]
        Scale ``phi`` (photons per unit model intensity) at the best class and rotation.
    probabilities : ndarray [n]
        Posterior probability of the assigned class (summed over rotations) at the
        final beta.
    log : list of dict
        One row per iteration: ``iteration``, ``beta_median``, ``loglik_per_photon``,
        ``changed`` (fraction of frames whose class changed), ``reseeded``,
        ``model_change`` (relative rms), ``seconds`` and ``pop_<k>`` (hard populations).
    models : ndarray [k, rings, angles]
        Polar class models.
    grid : PolarGrid
    loglik : ndarray [n]
        Best log-likelihood per frame (without ``-sum log K!``).
    photons : ndarray [n]
        Photons of every frame inside the grid.
    rotation_bins : ndarray [n] int
        ``rotations`` in angle bins.
    margins : ndarray [n]
        Best log-likelihood minus that of the best other class (both maximised over
        rotations): how decisively the frame chose its class when the probabilities
        saturate at 1 (inf with one class).
    profiles : ndarray [k, rings] or None
        Radial profile of every class from its members' full rings (:func:`class_profiles`),
        from the beamstop edge outwards, when ring profiles were given.
    profile_radii : ndarray [rings] or None
        Ring centres of ``profiles``, px.
    misfit : ndarray [n] or None
        :func:`frame_misfit` of every frame to its rotated class model (NaN when
        ``npix2`` was not given): ~0 for a frame that is its class plus noise.
    """

    class_images: np.ndarray
    assignments: np.ndarray
    rotations: np.ndarray
    scales: np.ndarray
    probabilities: np.ndarray
    log: list
    models: np.ndarray
    grid: PolarGrid
    loglik: np.ndarray = field(default_factory=lambda: np.zeros(0))
    photons: np.ndarray = field(default_factory=lambda: np.zeros(0))
    rotation_bins: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    margins: np.ndarray = field(default_factory=lambda: np.zeros(0))
    profiles: np.ndarray | None = None
    profile_radii: np.ndarray | None = None
    misfit: np.ndarray | None = None

    @property
    def n_classes(self) -> int:
        return int(self.models.shape[0])

    @property
    def populations(self) -> np.ndarray:
        """Frames assigned to each class (hard)."""
        return np.bincount(self.assignments, minlength=self.n_classes)

    def log_table(self):
        import pandas as pd  # noqa: PLC0415

        return pd.DataFrame(self.log)


def _estep_batches(K, N, models, beta, xp, batch):
    """Yield ``(slice, P, phi, L, Kf, Nf)`` per batch of frames."""
    n = K.shape[0]
    for start in range(0, n, batch):
        sl = slice(start, min(n, start + batch))
        L, phi, Kf, Nf = _loglik(K[sl], N[sl], models, xp)
        P = _posterior(L, beta[sl], xp)
        yield sl, P, phi, L, Kf, Nf


def classify_polar(counts, npix, grid: PolarGrid, *, n_classes: int = 10, iterations: int = 20,
                   beta_schedule="auto", init: str = "kmeans++", seed: int = 0, batch: int = BATCH,
                   image_size: int | None = None, profile_counts=None, profile_npix=None,
                   profile_rings: PolarGrid | None = None, npix2=None) -> Classify2DResult:
    """EM classification of polar-binned frames (module notes).

    Parameters
    ----------
    counts, npix : arrays [n, rings, angles]
        From :func:`polar_bin`.
    grid : PolarGrid
    n_classes : int
    iterations : int
        EM iterations (fixed number).
    beta_schedule : "auto", float, sequence of ``iterations`` floats or callable(iteration)
        Annealing of the likelihood; "auto" is the per-frame schedule of the module notes.
    init : "kmeans++" or "random"
    seed : int
        Seed of the initialisation (results are deterministic for a seed).
    batch : int
        Frames per E/M batch (memory: ``batch * n_classes * rotations`` floats).
    image_size : int, optional
        Edge of the Cartesian class images (default ``2 ceil(r_max) + 1``).
    profile_counts, profile_npix : arrays [n, rings(, 1)], optional
        Ring photons and pixels of every frame on ``profile_rings`` (:func:`profile_grid`),
        for the class radial profiles.
    profile_rings : PolarGrid, optional
    npix2 : array [n, rings, angles], optional
        From :func:`polar_bin` (``return_n2``), for the frame misfits.
    """
    xp = backend.array_module(counts)
    K = xp.asarray(counts)
    N = xp.asarray(npix)
    if K.dtype.kind != "f":
        K = K.astype(xp.float64)
    if N.dtype.kind != "f":
        N = N.astype(xp.float64)
    if K.ndim != 3 or K.shape != N.shape:
        raise InputError("classify", f"counts {K.shape} and npix {N.shape} must be [n, rings, angles]", None)
    n, R, J = K.shape
    n_classes = int(n_classes)
    iterations = int(iterations)
    if n_classes < 1:
        raise InputError("--classes", f"need at least one class, got {n_classes}", "use e.g. 10")
    if iterations < 1:
        raise InputError("--iterations", f"need at least one iteration, got {iterations}", "use e.g. 20")
    if n < n_classes:
        raise InputError("classify", f"{n} frames for {n_classes} classes", "classify more frames or ask for fewer classes")
    if init not in ("kmeans++", "random"):
        raise InputError("init", f"unknown initialisation {init!r}", "use kmeans++ or random")
    rng = np.random.default_rng(int(seed))
    photons = backend.to_host(K.sum(axis=(1, 2), dtype=xp.float64))
    betas = _beta_table(beta_schedule, photons, iterations)
    g, _ = _mean_profile(K, N, xp)

    # -- initial models -----------------------------------------------------------------
    if init == "kmeans++":
        seeds = _kmeanspp(_features(K, N, xp, batch), n_classes, rng)
        models = xp.stack([_seed_model(K[s], N[s], g, xp) for s in seeds])
    else:
        cls = rng.integers(n_classes, size=n)
        rot = rng.integers(J, size=n)
        num = xp.zeros((n_classes, R, J))
        den = xp.zeros((n_classes, R, J))
        for start in range(0, n, batch):
            sl = slice(start, min(n, start + batch))
            Pb = np.zeros((sl.stop - sl.start, n_classes, J))
            Pb[np.arange(Pb.shape[0]), cls[sl], rot[sl]] = 1.0
            Pb = xp.asarray(Pb)
            Kf = _rfft_split(xp.asarray(K[sl], dtype=xp.float64), xp)
            Nb = xp.asarray(N[sl], dtype=xp.float64)
            Nf = _rfft_split(Nb, xp)
            phi0 = xp.asarray(photons[sl]) / xp.maximum((Nb.sum(axis=2) * g[None]).sum(axis=1), 1e-300)
            num += _back_all(_rfft_split(Pb, xp), Kf, J, xp)
            den += _back_all(_rfft_split(Pb * phi0[:, None, None], xp), Nf, J, xp)
        models = _update_models(num, den, g, xp)
    models = _floor_models(models, xp)

    # -- EM ---------------------------------------------------------------------------------
    log_rows = []
    prev_cls = None
    anneal_end = max(1, int(math.ceil(ANNEAL_FRACTION * iterations)))
    best_cls = np.zeros(n, dtype=np.int64)
    for it in range(iterations):
        t0 = time.time()
        beta = xp.asarray(betas[it])
        num = xp.zeros((n_classes, R, J))
        den = xp.zeros((n_classes, R, J))
        occ = xp.zeros(n_classes)
        best_ll = np.empty(n)
        ll_sum = 0.0
        for sl, P, phi, L, Kf, Nf in _estep_batches(K, N, models, beta, xp, batch):
            num += _back_all(_rfft_split(P, xp), Kf, J, xp)
            den += _back_all(_rfft_split(P * phi, xp), Nf, J, xp)
            occ += P.sum(axis=(0, 2))
            flat = L.reshape(L.shape[0], -1)
            best = xp.argmax(flat, axis=1)
            best_cls[sl] = backend.to_host(best // J)
            best_ll[sl] = backend.to_host(flat.max(axis=1))
            ll_sum += float((P * L).sum())
        changed = float(np.mean(best_cls != prev_cls)) if prev_cls is not None else 1.0
        prev_cls = best_cls.copy()
        new = _update_models(num, den, g, xp)
        # re-seed empty classes from the worst-explained frames while annealing
        reseeded = 0
        if it + 1 < anneal_end:
            empty = np.flatnonzero(backend.to_host(occ) < 0.5)
            if empty.size:
                per_photon = best_ll / np.maximum(photons, 1.0)
                order = np.argsort(per_photon)
                for k, d in zip(empty, order[: empty.size]):
                    new[int(k)] = _floor_models(_seed_model(K[int(d)], N[int(d)], g, xp), xp)
                    reseeded += 1
        change = float(xp.sqrt(((new - models) ** 2).sum() / max(float((models ** 2).sum()), 1e-300)))
        models = new
        pops = np.bincount(best_cls, minlength=n_classes)
        row = dict(iteration=it + 1, beta_median=float(np.median(betas[it])),
                   loglik_per_photon=ll_sum / max(float(photons.sum()), 1.0), changed=changed,
                   reseeded=reseeded, model_change=change, seconds=round(time.time() - t0, 4))
        row.update({f"pop_{k + 1}": int(pops[k]) for k in range(n_classes)})
        log_rows.append(row)
        log.info("class2d iteration %d/%d: beta %.3g, logL/photon %.5f, changed %.3f, reseeded %d",
                 it + 1, iterations, row["beta_median"], row["loglik_per_photon"], changed, reseeded)

    # -- final assignment with the last models (beta of the last iteration) -----------------------
    ass, rots, scales, probs, lls, margins, misfit = _assign(K, N, models, xp.asarray(betas[-1]), xp, batch,
                                                             None if npix2 is None else xp.asarray(npix2))
    models_h = backend.to_host(models)
    profiles = radii = None
    if profile_counts is not None and profile_rings is not None:
        profiles = class_profiles(ass, scales, profile_counts, profile_npix, n_classes)
        radii = profile_rings.radii
    return Classify2DResult(
        class_images=polar_to_cartesian(models_h, grid, image_size),
        assignments=ass,
        rotations=rots * grid.step_deg,
        scales=scales,
        probabilities=probs,
        log=log_rows,
        models=models_h,
        grid=grid,
        loglik=lls,
        photons=photons,
        rotation_bins=rots,
        margins=margins,
        profiles=profiles,
        profile_radii=radii,
        misfit=misfit,
    )


def frame_misfit(K, N, N2, W, phi, xp=None):
    """Misfit of frames to their (rotated) class models, beyond photon noise.

    ``mu = phi N W`` and ``var = phi N2 W`` (the variance of shared sub-pixel counts) per bin;
    ``misfit = (chi2 - bins) / sum(mu^2 / var)`` with ``chi2 = sum (K - mu)^2 / var``: ~0 (+-
    noise) when the frame is its class model plus Poisson noise, and otherwise about the mean
    squared relative deviation of the frame from the model, whatever its photon count.

    Parameters
    ----------
    K, N, N2 : arrays [d, rings, angles]
    W : array [d, rings, angles]
        Class model of each frame, rotated to the frame.
    phi : array [d]
    """
    xp = backend.array_module(K) if xp is None else xp
    K = xp.asarray(K, dtype=xp.float64)
    N = xp.asarray(N, dtype=xp.float64)
    N2 = xp.asarray(N2, dtype=xp.float64)
    ph = xp.asarray(phi, dtype=xp.float64)[:, None, None]
    ok = N2 > 0
    mu = ph * N * W
    var = xp.where(ok, ph * N2 * W, 1.0)
    chi2 = xp.where(ok, (K - mu) ** 2 / var, 0.0).sum(axis=(1, 2))
    info = xp.where(ok, mu * mu / var, 0.0).sum(axis=(1, 2))
    nb = ok.sum(axis=(1, 2))
    return backend.to_host((chi2 - nb) / xp.maximum(info, 1e-300))


def _assign(K, N, models, beta, xp, batch, N2=None):
    n = K.shape[0]
    J = K.shape[-1]
    misfit = np.full(n, np.nan)
    ass = np.empty(n, dtype=np.int64)
    rots = np.empty(n, dtype=np.int64)
    scales = np.empty(n)
    probs = np.empty(n)
    lls = np.empty(n)
    margins = np.full(n, np.inf)
    for sl, P, phi, L, _, _ in _estep_batches(K, N, models, beta, xp, batch):
        if L.shape[1] > 1:
            top2 = xp.sort(L.max(axis=2), axis=1)[:, -2:]
            margins[sl] = backend.to_host(top2[:, 1] - top2[:, 0])
        flat = L.reshape(L.shape[0], -1)
        best = xp.argmax(flat, axis=1)
        k = best // J
        s = best % J
        rows = xp.arange(flat.shape[0])
        ass[sl] = backend.to_host(k)
        rots[sl] = backend.to_host(s)
        scales[sl] = backend.to_host(phi.reshape(phi.shape[0], -1)[rows, best])
        lls[sl] = backend.to_host(flat[rows, best])
        probs[sl] = np.clip(backend.to_host(P.sum(axis=2)[rows, k]), 0.0, 1.0)
        if N2 is not None:
            idx = (xp.arange(J)[None, None, :] - s[:, None, None]) % J
            Wd = xp.take_along_axis(models[k], xp.broadcast_to(idx, (k.shape[0], models.shape[1], J)), axis=2)
            misfit[sl] = frame_misfit(K[sl], N[sl], N2[sl], Wd, phi.reshape(phi.shape[0], -1)[rows, best], xp)
    return ass, rots, scales, probs, lls, margins, misfit


def classify_patterns(patterns, mask, centers, n_classes: int = 10, n_rot: int = 36, iterations: int = 20,
                      beta_schedule="auto", seed: int = 0, *, init: str = "kmeans++", friedel: bool = True,
                      r_min=None, r_max=None, ring_px=None, oversample: int = OVERSAMPLE,
                      grid: PolarGrid | None = None, batch: int = BATCH) -> Classify2DResult:
    """2D classification of diffraction patterns with in-plane rotations (module notes).

    Parameters
    ----------
    patterns : array [n, y, x]
        Photon counts of the frames to classify (e.g. the frames that passed the filter).
    mask : array [y, x] or [n, y, x]
        1 = good pixel; masked pixels are excluded.
    centers : array [n, 2] or (cx, cy)
        Beam centre of every frame, px.
    n_classes : int
    n_rot : int
        In-plane rotations = angle bins over 180° (``friedel``) or 360°.
    iterations : int
    beta_schedule : "auto", float, sequence or callable
        See :func:`classify_polar`.
    seed : int
    init : "kmeans++" or "random"
    friedel : bool
        Fold the patterns onto [0°, 180°) (Friedel symmetry).
    r_min, r_max, ring_px : float, optional
        Polar grid (see :func:`make_grid`); ignored when ``grid`` is given.
    oversample : int
        Sub-pixels per pixel edge for the polar binning.
    grid : PolarGrid, optional
    batch : int

    Returns
    -------
    Classify2DResult
    """
    patterns = backend.asarray(patterns) if backend.array_module(patterns) is np else patterns
    shape = tuple(patterns.shape[-2:])
    if grid is None:
        grid = make_grid(shape, mask, centers, n_rot, friedel=friedel, r_min=r_min, r_max=r_max, ring_px=ring_px)
    counts, npix, npix2 = polar_bin(patterns, mask, centers, grid, oversample=oversample, return_n2=True)
    pgrid = profile_grid(shape, mask, centers, grid)
    pc, pn = polar_bin(patterns, mask, centers, pgrid, oversample=oversample)
    return classify_polar(counts, npix, grid, n_classes=n_classes, iterations=iterations,
                          beta_schedule=beta_schedule, init=init, seed=seed, batch=batch,
                          profile_counts=pc, profile_npix=pn, profile_rings=pgrid, npix2=npix2)


class Assignment(NamedTuple):
    """Assignment of frames to fixed class models (host arrays [n]; classes 0-based)."""

    classes: np.ndarray
    rotations: np.ndarray
    scales: np.ndarray
    probabilities: np.ndarray
    margins: np.ndarray
    misfits: np.ndarray


def assign_polar(result: Classify2DResult, counts, npix, npix2=None, *, batch: int = BATCH) -> Assignment:
    """Class, rotation (deg), scale, probability (beta = 1), margin and misfit (NaN without ``npix2``)
    of new polar-binned frames under ``result``'s models (one E-step, models unchanged)."""
    xp = backend.array_module(counts)
    models = xp.asarray(result.models)
    K = xp.asarray(counts, dtype=xp.float64)
    N = xp.asarray(npix, dtype=xp.float64)
    N2 = None if npix2 is None else xp.asarray(npix2, dtype=xp.float64)
    ass, rots, scales, probs, _, margins, mis = _assign(K, N, models, xp.ones(K.shape[0]), xp, batch, N2)
    return Assignment(ass, rots * result.grid.step_deg, scales, probs, margins, mis)


def assign_patterns(result: Classify2DResult, patterns, mask, centers, *, oversample: int = OVERSAMPLE) -> Assignment:
    """:func:`assign_polar` for patterns ``[n, y, x]`` binned on ``result.grid``."""
    patterns = backend.asarray(patterns) if backend.array_module(patterns) is np else patterns
    counts, npix, npix2 = polar_bin(patterns, mask, centers, result.grid, oversample=oversample, return_n2=True)
    return assign_polar(result, counts, npix, npix2)


# ---------------------------------------------------------------------------------------
# files: DIR/classes.h5 and the gallery
# ---------------------------------------------------------------------------------------
#: Layout version of ``classes.h5``.
CLASS_FILE_VERSION = 1


@dataclass
class ClassFile:
    """Contents of a ``classes.h5`` written by :func:`write_class_file`.

    ``images[i]`` and ``models[i]`` belong to class ``i + 1``; ``frames`` has the
    columns ``file, frame, class`` (1-based), ``rotation_deg, scale, probability,
    photons, loglik, margin, misfit, center_x, center_y``.
    """

    path: object
    images: np.ndarray
    models: np.ndarray
    populations: np.ndarray
    grid: PolarGrid
    frames: object
    attrs: dict
    profiles: np.ndarray | None = None
    profile_radii: np.ndarray | None = None

    @property
    def n_classes(self) -> int:
        return int(self.models.shape[0])

    def geometry(self):
        """``(pixel_size_m, distance_m, wavelength_m)``; None for values not stored."""
        return tuple(self.attrs.get(k) for k in ("pixel_size_m", "distance_m", "wavelength_m"))


def assignment_table(result: Classify2DResult, files, frames, centers=None):
    """Per-frame table (pandas) of a classification: ``file, frame, class`` (1-based), ``rotation_deg,
    scale, probability, photons, loglik, margin, misfit, center_x, center_y``."""
    import pandas as pd  # noqa: PLC0415

    n = result.assignments.size
    c = np.full((n, 2), np.nan) if centers is None else np.broadcast_to(np.asarray(centers, dtype=np.float64), (n, 2))
    return pd.DataFrame({
        "file": [str(f) for f in files],
        "frame": np.asarray(frames, dtype=np.int64),
        "class": result.assignments + 1,
        "rotation_deg": result.rotations,
        "scale": result.scales,
        "probability": result.probabilities,
        "photons": result.photons,
        "loglik": result.loglik,
        "margin": result.margins,
        "misfit": result.misfit if result.misfit is not None else np.full(n, np.nan),
        "center_x": c[:, 0],
        "center_y": c[:, 1],
    })


def write_class_file(path, result: Classify2DResult, table, attrs: dict | None = None):
    """Write ``classes.h5`` (atomically): class images and models, populations, per-frame table, log.

    Layout::

        /classes/images      [k, s, s] float32  Cartesian class images (intensity per pixel, NaN outside)
        /classes/models      [k, rings, angles] polar models
        /classes/population  [k] frames per class
        /classes/profiles    [k, rings] class radial profiles (members' full rings), optional
        /classes/profile_radii [rings] their ring centres, px
        /classes  attrs      grid (r_min, ring_px, n_rings, n_angles, friedel), class_numbering,
                             geometry (pixel_size_m, distance_m, wavelength_m), run parameters
        /frames/<column>     file (str), frame, class (1-based), rotation_deg, scale, probability,
                             photons, loglik, margin, misfit, center_x, center_y
        /log                 attrs: json = the per-iteration log
    """
    import json  # noqa: PLC0415

    import h5py  # noqa: PLC0415

    from ..io.atomic import atomic_path  # noqa: PLC0415

    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs["conveyor_classes_version"] = CLASS_FILE_VERSION
            g = f.create_group("classes")
            g.create_dataset("images", data=np.asarray(result.class_images, dtype=np.float32), compression="gzip")
            g.create_dataset("models", data=np.asarray(result.models, dtype=np.float64))
            g.create_dataset("population", data=result.populations.astype(np.int64))
            if result.profiles is not None:
                g.create_dataset("profiles", data=np.asarray(result.profiles, dtype=np.float64))
                g.create_dataset("profile_radii", data=np.asarray(result.profile_radii, dtype=np.float64))
            for k, v in result.grid.as_dict().items():
                g.attrs[f"grid_{k}"] = v
            g.attrs["n_classes"] = result.n_classes
            g.attrs["class_numbering"] = "classes are numbered from 1; images[i] is class i + 1"
            g.attrs["image_center_index"] = int(result.class_images.shape[-1] // 2)
            for k, v in (attrs or {}).items():
                if v is None:
                    continue
                g.attrs[k] = json.dumps(v) if isinstance(v, (dict, list, tuple)) else v
            fr = f.create_group("frames")
            for col in table.columns:
                vals = table[col].to_numpy()
                if vals.dtype.kind == "O":
                    fr.create_dataset(col, data=np.asarray([str(v) for v in vals], dtype=object),
                                      dtype=h5py.string_dtype())
                else:
                    fr.create_dataset(col, data=vals)
            f.create_group("log").attrs["json"] = json.dumps(result.log)
    return path


def read_class_file(path) -> ClassFile:
    """Read ``classes.h5`` written by :func:`write_class_file` (:class:`InputError` if it is not one)."""
    import json  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    import h5py  # noqa: PLC0415
    import pandas as pd  # noqa: PLC0415

    path = Path(path)
    if not path.is_file():
        raise InputError(path, "class file not found", "run 'conveyor spi class2d' first")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise InputError(path, f"not a readable HDF5 file ({exc})", "re-run 'conveyor spi class2d'") from None
    with f:
        if "classes" not in f or "frames" not in f:
            raise InputError(path, "no /classes or /frames group", "give the classes.h5 written by 'conveyor spi class2d'")
        g = f["classes"]
        attrs = {}
        for k, v in g.attrs.items():
            if isinstance(v, bytes):
                v = v.decode()
            if isinstance(v, np.generic):
                v = v.item()
            attrs[k] = v
        grid = PolarGrid(float(attrs["grid_r_min"]), float(attrs["grid_ring_px"]), int(attrs["grid_n_rings"]),
                         int(attrs["grid_n_angles"]), bool(attrs["grid_friedel"]))
        cols = {}
        for col, ds in f["frames"].items():
            vals = ds[()]
            if ds.dtype.kind == "O":
                vals = np.asarray([v.decode() if isinstance(v, bytes) else str(v) for v in vals], dtype=object)
            cols[col] = vals
        order = ["file", "frame", "class"] + [c for c in cols if c not in ("file", "frame", "class")]
        table = pd.DataFrame({c: cols[c] for c in order if c in cols})
        log_rows = json.loads(f["log"].attrs["json"]) if "log" in f else []
        attrs["log"] = log_rows
        prof = np.asarray(g["profiles"][()]) if "profiles" in g else None
        prad = np.asarray(g["profile_radii"][()]) if "profile_radii" in g else None
        return ClassFile(path, np.asarray(g["images"][()]), np.asarray(g["models"][()]),
                         np.asarray(g["population"][()]), grid, table, attrs, prof, prad)


def plot_gallery(path, images, populations, *, title=None, selected=None, ncols=None):
    """PNG of the class images (log scale; grey outside the rings used), each labelled with its 1-based
    number, population and share of the frames.

    ``selected`` (1-based numbers), when given, draws those classes with a green frame.
    """
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    from ..io.atomic import atomic_path  # noqa: PLC0415

    imgs = np.asarray(images, dtype=np.float64)
    k = imgs.shape[0]
    pops = np.asarray(populations, dtype=np.int64)
    total = max(int(pops.sum()), 1)
    ncols = ncols or min(k, 5 if k <= 10 else 8)
    nrows = int(math.ceil(k / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.1 * ncols, 2.3 * nrows + (0.4 if title else 0)), dpi=100,
                             squeeze=False)
    sel = set(int(s) for s in (selected or []))
    cmap = matplotlib.colormaps["magma"].with_extremes(bad="0.75")  # grey outside the rings used
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if i >= k:
            ax.axis("off")
            continue
        im = imgs[i]
        good = np.isfinite(im) & (im > 0)
        if good.any():
            lo, hi = np.percentile(im[good], 1), im[good].max()
            shown = np.log10(np.clip(np.where(good, im, np.nan), max(lo, 1e-300), None))
            ax.imshow(shown, cmap=cmap, vmin=np.log10(max(lo, 1e-300)), vmax=np.log10(max(hi, lo * 1.0001)),
                      interpolation="nearest")
        ax.set_title(f"{i + 1}: {int(pops[i])} ({100.0 * pops[i] / total:.0f}%)", fontsize=9)
        if i + 1 in sel:
            for sp in ax.spines.values():
                sp.set_edgecolor("tab:green")
                sp.set_linewidth(3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
