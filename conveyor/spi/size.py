"""Particle size from the radial profile of a diffraction pattern (sphere form factor).

Model
-----
A homogeneous sphere of radius ``R`` scatters

    I(q) = s * P(q, R) + t * beta(q),     P = [3 (sin x - x cos x) / x^3]^2,  x = 2 pi q R,

with ``q = 2 sin(theta) / lambda`` the spatial frequency in 1/m (no 2 pi; the convention
of :mod:`conveyor.spi.detector`; ``2 theta`` is the scattering angle, ``atan(r p / L)``
for a pixel ``r`` px from the beam centre of a flat detector at distance ``L``).
``P`` has its minima at ``x = 4.493, 7.725, 10.904, ...``. For PR772-like data
(70 nm at 1.6 keV) the first minimum falls inside the beamstop, so the fit uses the
rings outside it: the later fringes carry the size. ``beta`` is the shape of the
background (the mean ring profile of the misses when known, flat otherwise) and ``t``
its amplitude in this frame (background photons change from shot to shot).

Fit
---
Per frame, photons ``C_k`` and good pixels ``N_k`` are accumulated in 1 px rings about
the beam centre (mask-aware). Rings inside ``rmin`` are dropped; by default ``rmin`` is
the first ring at least half covered by good pixels plus :data:`RMIN_MARGIN_PX` (the
beamstop edge). The expected photons are ``mu_k = N_k (s P(q_k, R) + t beta_k)``.

1. *Coarse search*, all frames against a log-spaced diameter grid (``dmin``..``dmax``,
   relative step :data:`GRID_STEP`) at once: weighted least squares with Poisson
   weights ``1 / max(E_k, 1)`` from the envelope of the form factor
   (``E_k = N_k (a q_k^-4 + t beta_k)``, independent of the trial size), so ``s`` and
   ``t`` are closed-form and every sum is a matrix product.
2. *Refinement* of the :data:`N_CANDIDATES` lowest local minima of the coarse misfit:
   ``s, t >= 0`` by Poisson maximum likelihood (Newton steps) on a fine grid
   (+-1 coarse step) and the Poisson deviance

       Dev(R) = 2 sum_k [C_k log(C_k / mu_k) - (C_k - mu_k)],

   which weights every ring by its own photon statistics; a parabola through the three
   lowest points of the best candidate gives the diameter.

Outputs per frame
-----------------
``diameter_nm``
    Diameter of the best fit, nm; NaN when the best fit lies on the edge of the grid
    (size outside ``[dmin, dmax]``) or the frame has no photons in the fit range.
``size_score``
    ``Dev(second-best local minimum) / Dev(best)``: 1 means two sizes fit equally well
    (ambiguous); larger values a unique size. Local minima closer than +-5 % in
    diameter count as one; without a second local minimum the largest coarse misfit
    is used.
``size_misfit``
    ``(Dev(best) - (rings - 2)) / photons``, the deviance in excess of Poisson noise per
    photon in the fit range: ~0 (+-noise) for one sphere, about the mean squared
    relative deviation of the ring profile from the model otherwise, so it does not grow
    with the photon count. Sums of spheres of different sizes (smeared fringes) give
    larger values; non-spherical particles give some (the icosahedral capsids of
    :mod:`conveyor.simulate.spi`: 0.01-0.09).
``size_scale``, ``size_background``
    ``s`` (photons per pixel at ``q = 0``) and ``t`` (background amplitude; photons per
    pixel when no background shape is given).
``multi_score``
    Evidence for a second particle that interferes with the first (see
    :func:`multi_hit_score`); ~2-4 for one particle.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import backend
from ..errors import InputError

#: Relative step of the coarse diameter grid.
GRID_STEP = 0.01
#: Rings skipped beyond the beamstop edge, px.
RMIN_MARGIN_PX = 2.0
#: Fraction of a ring that must be good pixels for it to count as outside the beamstop.
RMIN_COVERAGE = 0.5
#: Local minima of the misfit closer than this (relative diameter) count as one.
LOCAL_MIN_WINDOW = 0.05
#: Rings are fitted up to ``2 pi q R`` of this (7 fringes; see :func:`fit_sizes`).
QR_MAX = 25.0
#: Newton iterations for the scale and background per diameter.
NEWTON_ITERATIONS = 5
#: Local minima of the coarse misfit refined with the Poisson deviance.
N_CANDIDATES = 3
#: Points of the fine grid (over +-1 coarse step) of the refinement.
N_FINE = 5
#: Gaussian smoothing (Patterson pixels) of the residual power for the multiple-hit score.
MULTI_SMOOTH_PX = 1.5
#: The multiple-hit score looks at Patterson lags beyond this many diameters.
MULTI_RMIN_FACTOR = 1.3


def q_from_radius(r_px, pixel_size_m, distance_m, wavelength_m):
    """Spatial frequency ``q = 2 sin(theta) / lambda`` (1/m) at ``r_px`` px from the beam.

    Flat detector perpendicular to the beam: ``2 theta = atan(r * pixel_size / distance)``;
    the same as :func:`conveyor.spi.detector.radius_to_q`, for numpy and cupy arrays.
    """
    xp = backend.array_module(r_px)
    two_theta = xp.arctan(xp.asarray(r_px, dtype=xp.float64) * (pixel_size_m / distance_m))
    return (2.0 / wavelength_m) * xp.sin(0.5 * two_theta)


def sphere_form_factor(q, radius):
    """``P = [3 (sin x - x cos x) / x^3]^2`` with ``x = 2 pi q R``; 1 at ``q = 0``.

    ``q`` spatial frequency (no 2 pi) and ``radius`` in reciprocal and direct units of
    the same length (1/m and m); arrays broadcast (numpy or cupy).
    """
    xp = backend.array_module(q)
    x = (2.0 * np.pi) * xp.asarray(q, dtype=xp.float64) * radius
    small = xp.abs(x) < 1e-3
    xs = xp.where(small, 1.0, x)
    amp = 3.0 * (xp.sin(xs) - xs * xp.cos(xs)) / xs**3
    amp = xp.where(small, 1.0 - x * x / 10.0, amp)
    return amp * amp


@dataclass
class Profiles:
    """Ring profiles of a stack: photons ``counts[n, nb]`` and good pixels ``npix[n, nb]``
    in rings ``[k, k+1)`` px, and the mean radius ``radius[n, nb]`` of those pixels."""

    counts: object
    npix: object
    radius: object


def _sparse(xp):
    """scipy.sparse or cupyx.scipy.sparse, matching ``xp``."""
    if xp is np:
        import scipy.sparse as sparse  # noqa: PLC0415
    else:  # pragma: no cover - GPU only
        import cupyx.scipy.sparse as sparse  # noqa: PLC0415
    return sparse


def max_radius(mask, centers) -> float:
    """Largest distance (px) from any of ``centers`` [n, 2] to a good pixel of ``mask``."""
    good = np.asarray(backend.to_host(mask)).astype(bool)
    yy, xx = np.nonzero(good)
    if xx.size == 0:
        raise InputError("mask", "the mask has no good pixels", "check the detector mask")
    c = np.asarray(backend.to_host(centers), dtype=np.float64).reshape(-1, 2)
    lo = c.min(axis=0)
    hi = c.max(axis=0)
    dx = np.maximum(np.abs(xx.max() - lo[0]), np.abs(xx.min() - hi[0]))
    dy = np.maximum(np.abs(yy.max() - lo[1]), np.abs(yy.min() - hi[1]))
    return float(np.hypot(dx, dy)) + 1.0


def radial_profiles(frames, mask, centers, rmax=None) -> Profiles:
    """Mask-aware photon sums in 1 px rings about the beam centre, batched over frames.

    Parameters
    ----------
    frames : array [n, y, x]
        Photon counts.
    mask : array [y, x], 1 = good
    centers : array [n, 2] or (x, y)
        Beam centres, px. When all frames share one centre the ring map is built once
        and applied as a sparse matrix product; otherwise one bincount per quantity.
    rmax : float, optional
        Largest radius kept, px (default: :func:`max_radius`). Use the same value for
        profiles that are compared or combined (e.g. with a background profile).
    """
    xp = backend.array_module(frames)
    frames = xp.asarray(frames)
    if frames.ndim == 2:
        frames = frames[None]
    n = frames.shape[0]
    good_h = np.asarray(backend.to_host(mask)).astype(bool)
    if good_h.shape != frames.shape[-2:]:
        raise InputError("mask", f"mask shape {good_h.shape} differs from frame shape {frames.shape[-2:]}",
                         "give a mask of the detector's shape")
    c_h = np.array(np.broadcast_to(np.asarray(backend.to_host(centers), dtype=np.float64), (n, 2)))
    if rmax is None:
        rmax = max_radius(good_h, c_h)
    nb = int(np.ceil(rmax)) + 1
    flat = frames.reshape(n, -1)
    pix = np.flatnonzero(good_h.ravel())
    yy, xx = np.divmod(pix, good_h.shape[1])
    if n > 0 and np.all(c_h == c_h[0]):
        r = np.hypot(xx - c_h[0, 0], yy - c_h[0, 1])
        ring = np.minimum(np.floor(r).astype(np.int64), nb - 1)
        sp = _sparse(xp)
        onehot = sp.coo_matrix(
            (xp.ones(pix.size, dtype=xp.float64), (xp.asarray(ring), xp.asarray(pix))),
            shape=(nb, flat.shape[1]),
        ).tocsr()
        counts = xp.ascontiguousarray((onehot @ flat.T.astype(xp.float64)).T)
        npix1 = np.bincount(ring, minlength=nb).astype(np.float64)
        rsum1 = np.bincount(ring, weights=r, minlength=nb)
        npix = xp.asarray(np.broadcast_to(npix1, (n, nb)).copy())
        rsum = xp.asarray(np.broadcast_to(rsum1, (n, nb)).copy())
    else:
        xxd = xp.asarray(xx, dtype=xp.float64)
        yyd = xp.asarray(yy, dtype=xp.float64)
        c = xp.asarray(c_h)
        r = xp.sqrt((xxd[None] - c[:, 0:1]) ** 2 + (yyd[None] - c[:, 1:2]) ** 2)
        ring = xp.minimum(xp.floor(r).astype(xp.int64), nb - 1)
        idx = (ring + (xp.arange(n, dtype=xp.int64) * nb)[:, None]).ravel()
        vals = flat[:, xp.asarray(pix)].astype(xp.float64).ravel()
        size = n * nb
        counts = xp.bincount(idx, weights=vals, minlength=size).reshape(n, nb)
        npix = xp.bincount(idx, minlength=size).reshape(n, nb).astype(xp.float64)
        rsum = xp.bincount(idx, weights=r.ravel(), minlength=size).reshape(n, nb)
    radius = xp.where(npix > 0, rsum / xp.maximum(npix, 1.0), xp.arange(nb, dtype=xp.float64) + 0.5)
    counts[:, nb - 1] = 0.0  # the overflow ring
    npix[:, nb - 1] = 0.0
    return Profiles(counts, npix, radius)


def auto_rmin(npix, coverage=RMIN_COVERAGE, margin=RMIN_MARGIN_PX):
    """First radius (px) whose ring is at least ``coverage`` good pixels, plus ``margin``.

    ``npix`` [nb] or [n, nb] (good pixels per 1 px ring); returns a float or an array [n].
    """
    xp = backend.array_module(npix)
    npix = xp.asarray(npix)
    nb = npix.shape[-1]
    k = xp.arange(nb, dtype=xp.float64)
    full = xp.pi * (2 * k + 1)  # pixels in a complete ring [k, k+1)
    ok = npix >= coverage * full
    first = xp.argmax(ok, axis=-1).astype(xp.float64)
    return first + margin


@dataclass
class SizeResult:
    """Per-frame sizing results (host numpy arrays); see the module notes."""

    diameter_nm: np.ndarray
    size_score: np.ndarray
    size_misfit: np.ndarray
    size_scale: np.ndarray
    size_background: np.ndarray
    rmin_px: np.ndarray
    rmax_px: np.ndarray | None = None
    multi_score: np.ndarray | None = None
    grid_nm: np.ndarray | None = None
    misfit_curve: np.ndarray | None = None


_TINY = 1e-30


def _ml_fit(C, N, T, beta, fit_background, iterations):
    """Poisson ML ``s, t >= 0`` of ``mu = N (s T + t beta)`` for every (frame, diameter).

    C, N, beta: [n, 1, nb]; T: [n, m, nb]. ``t`` is fixed to 1 unless ``fit_background``.
    Returns s, t and the deviance, each [n, m].
    """
    xp = backend.array_module(T)
    NT = N * T
    Nb = N * beta
    sumC = C.sum(-1)
    sumNT = NT.sum(-1)
    sumNb = Nb.sum(-1)
    # start: weighted least squares with weights 1 / max(C, 1)
    w = 1.0 / xp.maximum(C, 1.0)
    if fit_background:
        a11 = (w * NT * NT).sum(-1)
        a12 = (w * NT * Nb).sum(-1)
        a22 = (w * Nb * Nb).sum(-1)
        b1 = (w * NT * C).sum(-1)
        b2 = (w * Nb * C).sum(-1)
        det = a11 * a22 - a12 * a12
        det = xp.where(xp.abs(det) > _TINY, det, _TINY)
        s = xp.maximum((a22 * b1 - a12 * b2) / det, 0.0)
        t = xp.maximum((a11 * b2 - a12 * b1) / det, 0.0)
        # keep the total right
        tot = s * sumNT + t * sumNb
        f = xp.where(tot > 0, sumC / xp.maximum(tot, _TINY), 1.0)
        s, t = s * f, t * f
        t = xp.where((s <= 0) & (t <= 0), sumC / xp.maximum(sumNb, _TINY), t)
    else:
        s = xp.maximum(sumC - sumNb, 0.0) / xp.maximum(sumNT, _TINY)
        t = xp.ones_like(s)
    for _ in range(iterations):
        lam = xp.maximum(s[..., None] * T + t[..., None] * beta, _TINY)
        ratio = C / lam
        r2 = ratio / lam
        gs = (ratio * T).sum(-1) - sumNT
        hss = (r2 * T * T).sum(-1) + _TINY
        if fit_background:
            gt = (ratio * beta).sum(-1) - sumNb
            hst = (r2 * T * beta).sum(-1)
            htt = (r2 * beta * beta).sum(-1) + _TINY
            det = hss * htt - hst * hst
            det = xp.where(det > _TINY, det, _TINY)
            ds = (htt * gs - hst * gt) / det
            dt = (hss * gt - hst * gs) / det
            t_new = t + dt
            t = xp.where(t_new >= 0, t_new, 0.5 * t)
        else:
            ds = gs / hss
        s_new = s + ds
        s = xp.where(s_new >= 0, s_new, 0.5 * s)
    mu = N * (s[..., None] * T + t[..., None] * beta)
    valid = N > 0
    muv = xp.where(valid, xp.maximum(mu, _TINY), 1.0)
    Cv = xp.where(valid, C, 0.0)
    logterm = xp.where(Cv > 0, Cv * xp.log(xp.where(Cv > 0, Cv, 1.0) / muv), 0.0)
    dev = 2.0 * (logterm - (Cv - xp.where(valid, mu, 0.0))).sum(-1)
    return s, t, dev


def _poisson_curves(q, C, N, beta, diam_m, fit_background, iterations=NEWTON_ITERATIONS):
    """Poisson deviance, scale and background [n, m] for diameters ``diam_m`` [n, m]."""
    xp = backend.array_module(C)
    d = xp.asarray(diam_m, dtype=xp.float64)
    T = sphere_form_factor(q[:, None, :], (0.5 * d)[..., None])
    s, t, dev = _ml_fit(C[:, None, :], N[:, None, :], T, beta[:, None, :], fit_background, iterations)
    return dev, s, t


def _coarse_chi2(C, N, beta, T, q, fit_background):
    """Weighted least-squares misfit [n, m] of every frame against every model row of
    ``T`` [m, nb] (shared by all frames), as matrix products (module notes, step 1)."""
    xp = backend.array_module(C)
    qi4 = xp.where(N > 0, 1.0 / xp.maximum(q, _TINY) ** 4, 0.0)
    if fit_background:
        y = C
        # envelope amplitude and background level from the photons (rough, for the weights)
        bsum = (N * beta).sum(-1, keepdims=True)
        t0 = 0.5 * C.sum(-1, keepdims=True) / xp.maximum(bsum, _TINY)
    else:
        y = C - N * beta
        t0 = xp.ones((C.shape[0], 1))
    a = xp.maximum(y.sum(-1, keepdims=True), 1.0) / xp.maximum((N * qi4).sum(-1, keepdims=True), 1e-300)
    E = N * (a * qi4 + t0 * beta)
    w = xp.where(N > 0, 1.0 / xp.maximum(E, 1.0), 0.0)
    A = (w * y * y).sum(-1)[:, None]
    u = w * N * y
    v = w * N * N
    sty = u @ T.T  # sum w N T y
    stt = v @ (T * T).T  # sum w N^2 T^2
    s = xp.maximum(sty, 0.0) / xp.maximum(stt, 1e-300)
    chi2 = A - s * sty
    if fit_background:
        vb = v * beta
        stb = vb @ T.T  # sum w N^2 T beta
        sbb = (vb * beta).sum(-1)[:, None]
        sby = (u * beta).sum(-1)[:, None]
        det = stt * sbb - stb * stb
        ok = det > 1e-12 * xp.maximum(stt * sbb, 1e-300)
        det = xp.where(ok, det, 1.0)
        s2 = (sbb * sty - stb * sby) / det
        t2 = (stt * sby - stb * sty) / det
        good = ok & (s2 >= 0) & (t2 >= 0)
        chi2_2 = A - s2 * sty - t2 * sby
        t_only = xp.maximum(sby, 0.0) / xp.maximum(sbb, 1e-300)
        chi2_t = A - t_only * sby
        chi2 = xp.where(good, chi2_2, xp.minimum(chi2, chi2_t))
    return chi2


def _local_minima(curve, window):
    """Boolean [n, m]: local minima of each row within +-``window`` points."""
    n, m = curve.shape
    pad = np.pad(curve, ((0, 0), (window, window)), mode="constant", constant_values=np.inf)
    is_min = np.ones_like(curve, dtype=bool)
    for o in range(1, window + 1):
        is_min &= curve <= pad[:, window - o: window - o + m]
        is_min &= curve <= pad[:, window + o: window + o + m]
    return is_min & np.isfinite(curve)


def _top_minima(curve, window, k):
    """Indices [n, k] of the ``k`` lowest local minima of each row (window +-``window``),
    padded with the row's maximum when there are fewer."""
    is_min = _local_minima(curve, window)
    vals = np.where(is_min, curve, np.inf)
    order = np.argsort(vals, axis=1)[:, :k]
    got = np.take_along_axis(vals, order, axis=1)
    fill = np.argmax(np.where(np.isfinite(curve), curve, -np.inf), axis=1)[:, None]
    return np.where(np.isfinite(got), order, fill)


def fit_sizes(
    profiles: Profiles,
    *,
    pixel_size_m: float,
    distance_m: float,
    wavelength_m: float,
    dmin_nm: float = 20.0,
    dmax_nm: float = 200.0,
    grid_step: float = GRID_STEP,
    rmin_px=None,
    rmax_px=None,
    qr_max: float | None = QR_MAX,
    background=None,
    fit_background: bool = True,
    keep_curves: bool = False,
) -> SizeResult:
    """Fit the sphere form factor to ring profiles (module notes).

    Parameters as :func:`_fit_once`, plus ``qr_max``: after a first fit over all rings,
    frames whose rings reach beyond ``2 pi q R = qr_max`` (about ``qr_max / pi - 1``
    fringes) for their first-pass radius are fitted again on the rings inside it (None:
    no limit). Real particles are not spheres, and their high fringes depart from the
    sphere's first.
    """
    kw = dict(pixel_size_m=pixel_size_m, distance_m=distance_m, wavelength_m=wavelength_m, dmin_nm=dmin_nm,
              dmax_nm=dmax_nm, grid_step=grid_step, fit_background=fit_background, keep_curves=keep_curves)
    res = _fit_once(profiles, rmin_px=rmin_px, rmax_px=rmax_px, background=background, **kw)
    if qr_max is None:
        return res
    xp = backend.array_module(profiles.counts)
    n = res.diameter_nm.size
    q_lim = qr_max / (np.pi * res.diameter_nm * 1e-9)  # 2 pi q R = qr_max
    with np.errstate(invalid="ignore"):
        arg = np.clip(q_lim * wavelength_m / 2.0, 0.0, 1.0)
        r_lim = np.tan(np.minimum(2.0 * np.arcsin(arg), 1.5)) * distance_m / pixel_size_m
    r_new = np.minimum(res.rmax_px, r_lim)
    redo = np.isfinite(res.diameter_nm) & (r_new < res.rmax_px - 1.0)
    if not redo.any():
        return res
    sel = np.flatnonzero(redo)
    sel_d = xp.asarray(sel)
    sub = Profiles(profiles.counts[sel_d], profiles.npix[sel_d], profiles.radius[sel_d])
    bg = background
    if bg is not None and xp.asarray(bg).ndim == 2:
        bg = xp.asarray(bg)[sel_d]
    rmin_sub = None if rmin_px is None else np.broadcast_to(np.asarray(rmin_px, dtype=np.float64), (n,))[sel]
    again = _fit_once(sub, rmin_px=rmin_sub, rmax_px=r_new[sel], background=bg, **kw)
    for f in ("diameter_nm", "size_score", "size_misfit", "size_scale", "size_background", "rmin_px"):
        getattr(res, f)[sel] = getattr(again, f)
    res.rmax_px[sel] = r_new[sel]
    if keep_curves and res.misfit_curve is not None:
        res.misfit_curve[sel] = again.misfit_curve
    return res


def _last_ring(npix):
    """Outer edge (px) of the last ring with good pixels, per frame (host array; 0: none)."""
    used = backend.to_host(npix) > 0
    nb = used.shape[1]
    return np.where(used.any(axis=1), nb - np.argmax(used[:, ::-1], axis=1), 0)


def _fit_once(
    profiles: Profiles,
    *,
    pixel_size_m: float,
    distance_m: float,
    wavelength_m: float,
    dmin_nm: float = 20.0,
    dmax_nm: float = 200.0,
    grid_step: float = GRID_STEP,
    rmin_px=None,
    rmax_px=None,
    background=None,
    fit_background: bool = True,
    keep_curves: bool = False,
) -> SizeResult:
    """One sphere fit of ring profiles over a fixed ring range (module notes).

    Parameters
    ----------
    profiles : Profiles
        From :func:`radial_profiles`.
    pixel_size_m, distance_m, wavelength_m : float
        Detector geometry and photon wavelength (SI).
    dmin_nm, dmax_nm : float
        Diameter search range, nm.
    grid_step : float
        Relative step of the coarse log-spaced diameter grid.
    rmin_px, rmax_px : float or array [n], optional
        Fit range in px; default ``rmin`` from :func:`auto_rmin`, ``rmax`` all rings.
    background : array [nb] or [n, nb], optional
        Background photons per pixel in each ring (e.g. :func:`background_profile` of the
        misses); default flat.
    fit_background : bool
        Fit the background amplitude per frame (default); otherwise ``background`` is
        taken as known (a zero background when none is given).
    keep_curves : bool
        Return the coarse misfit curves (for plots and diagnostics).
    """
    if not (0 < dmin_nm < dmax_nm):
        raise InputError("dmin/dmax", f"bad diameter range {dmin_nm}..{dmax_nm} nm", "give 0 < dmin < dmax")
    xp = backend.array_module(profiles.counts)
    C = xp.asarray(profiles.counts, dtype=xp.float64)
    N = xp.asarray(profiles.npix, dtype=xp.float64)
    rad = xp.asarray(profiles.radius, dtype=xp.float64)
    if background is None:
        beta = xp.full(C.shape, 1.0 if fit_background else 0.0)
    else:
        beta = xp.maximum(xp.broadcast_to(xp.asarray(background, dtype=xp.float64), C.shape), 0.0)
    # drop rings without good pixels beyond the last used one
    used = np.flatnonzero(backend.to_host((N > 0).any(axis=0)))
    last = int(used[-1]) + 1 if used.size else 1
    C, N, rad, beta = C[:, :last], N[:, :last], rad[:, :last], beta[:, :last]
    n, nb = C.shape
    q = q_from_radius(rad, pixel_size_m, distance_m, wavelength_m)
    k = xp.arange(nb, dtype=xp.float64)[None]
    if rmin_px is None:
        rmin = auto_rmin(N)
    else:
        rmin = xp.asarray(np.broadcast_to(np.asarray(rmin_px, dtype=np.float64), (n,)))
    use = k >= rmin[:, None]
    if rmax_px is not None:
        use &= (k + 1) <= xp.asarray(np.broadcast_to(np.asarray(rmax_px, dtype=np.float64), (n,)))[:, None]
    N = xp.where(use, N, 0.0)
    C = xp.where(use, C, 0.0)
    # 1. coarse search on a shared log-spaced grid (matrix products)
    m = int(np.ceil(np.log(dmax_nm / dmin_nm) / np.log1p(grid_step))) + 1
    grid_nm = dmin_nm * np.exp(np.linspace(0.0, np.log(dmax_nm / dmin_nm), m))
    step = np.log(dmax_nm / dmin_nm) / (m - 1)
    q_nominal = q_from_radius(xp.arange(nb, dtype=xp.float64) + 0.5, pixel_size_m, distance_m, wavelength_m)
    T = sphere_form_factor(q_nominal[None, :], xp.asarray(0.5e-9 * grid_nm)[:, None])  # [m, nb]
    chi2 = backend.to_host(_coarse_chi2(C, N, beta, T, q, fit_background))
    window = max(1, int(np.ceil(np.log1p(LOCAL_MIN_WINDOW) / step)))
    cand = _top_minima(chi2, window, N_CANDIDATES)  # [n, K]
    # 2. Poisson refinement of every candidate: +-1 coarse step, exact ring radii
    nf = N_FINE
    offs = np.linspace(-step, step, nf)
    u = np.log(grid_nm[cand])[..., None] + offs  # [n, K, nf]
    dev_f, s_f, t_f = _poisson_curves(q, C, N, beta, xp.asarray(np.exp(u).reshape(n, -1) * 1e-9), fit_background)
    dev_f = backend.to_host(dev_f).reshape(n, N_CANDIDATES, nf)
    s_f = backend.to_host(s_f).reshape(n, N_CANDIDATES, nf)
    t_f = backend.to_host(t_f).reshape(n, N_CANDIDATES, nf)
    dmin_k = dev_f.min(axis=2)  # [n, K]
    rows = np.arange(n)
    kb = np.argmin(dmin_k, axis=1)
    best_dev = dmin_k[rows, kb]
    others = np.where(np.arange(N_CANDIDATES)[None] == kb[:, None], np.inf, dmin_k)
    # a candidate next to the best one is not a second minimum
    same = np.abs(cand - cand[rows, kb][:, None]) <= window
    others = np.where(same, np.inf, others)
    second = others.min(axis=1)
    second = np.where(np.isfinite(second), second, np.nan)
    curve = dev_f[rows, kb]  # [n, nf]
    j = np.argmin(curve, axis=1)
    jc = np.clip(j, 1, nf - 2)
    y0, y1, y2 = curve[rows, jc - 1], curve[rows, jc], curve[rows, jc + 1]
    h = offs[1] - offs[0]
    den = y0 - 2 * y1 + y2
    with np.errstate(divide="ignore", invalid="ignore"):
        shift = np.where(den > 0, 0.5 * h * (y0 - y2) / den, 0.0)
    shift = np.clip(shift, -h, h)
    ub = u[rows, kb]
    diam = np.exp(ub[rows, jc] + shift)
    at_edge = (diam <= dmin_nm * (1 + 0.5 * grid_step)) | (diam >= dmax_nm / (1 + 0.5 * grid_step))
    n_rings = backend.to_host((N > 0).sum(axis=1))
    photons = backend.to_host(C.sum(axis=1))
    ok = (~at_edge) & (photons > 0)
    diam = np.where(ok, diam, np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        score = np.where(ok, second / np.maximum(best_dev, 1e-12), np.nan)
        misfit = np.where(ok & (n_rings > 2), (best_dev - (n_rings - 2)) / np.maximum(photons, 1.0), np.nan)
    r_max = _last_ring(N).astype(np.float64)
    return SizeResult(
        diameter_nm=diam,
        size_score=score,
        size_misfit=misfit,
        size_scale=s_f[rows, kb, j],
        size_background=t_f[rows, kb, j],
        rmin_px=np.asarray(backend.to_host(rmin), dtype=np.float64),
        rmax_px=r_max,
        grid_nm=grid_nm if keep_curves else None,
        misfit_curve=chi2 if keep_curves else None,
    )


def model_images(shape, centers, diameter_nm, scale, bg_amplitude, *, pixel_size_m, distance_m,
                 wavelength_m, background=None, xp=np, dr: float = 0.25):
    """Expected photons per pixel ``[n, y, x]`` of the fitted spheres plus background.

    ``background`` is the background shape per 1 px ring [nb] about each centre (flat
    when None) and ``bg_amplitude`` [n] its fitted amplitude; frames without a size get
    the background only. The sphere term is tabulated every ``dr`` px in radius and
    interpolated linearly.
    """
    ny, nx = shape
    c_h = np.asarray(centers, dtype=np.float64).reshape(-1, 2)
    n = c_h.shape[0]
    yy = xp.arange(ny, dtype=xp.float64)[None, :, None]
    xx = xp.arange(nx, dtype=xp.float64)[None, None, :]
    c = xp.asarray(c_h[:1] if np.all(c_h == c_h[0]) else c_h)
    r = xp.sqrt((xx - c[:, 0, None, None]) ** 2 + (yy - c[:, 1, None, None]) ** 2)  # [1|n, y, x]
    rmax = float(np.hypot(ny, nx)) + 2.0
    rs = xp.arange(0.0, rmax + 2 * dr, dr)
    qs = q_from_radius(rs, pixel_size_m, distance_m, wavelength_m)
    d = np.asarray(diameter_nm, dtype=np.float64)
    sized = np.isfinite(d)
    radius = xp.asarray(np.where(sized, 0.5e-9 * d, 0.0))[:, None]
    s = xp.asarray(np.where(sized, np.nan_to_num(scale), 0.0))[:, None]
    table = s * sphere_form_factor(qs[None, :], radius)  # [n, ns]
    u = r / dr
    i0 = xp.minimum(xp.floor(u).astype(xp.int64), rs.size - 2)
    w = (u - i0)[..., None].reshape(r.shape)
    flat_i0 = xp.broadcast_to(i0, (n, ny, nx)).reshape(n, -1)
    w = xp.broadcast_to(w, (n, ny, nx)).reshape(n, -1)
    t0 = xp.take_along_axis(table, flat_i0, axis=1)
    t1 = xp.take_along_axis(table, flat_i0 + 1, axis=1)
    mu = (t0 + w * (t1 - t0)).reshape(n, ny, nx)
    t = xp.asarray(np.nan_to_num(np.asarray(bg_amplitude, dtype=np.float64)))[:, None, None]
    if background is None:
        return mu + t
    bg = xp.asarray(background, dtype=xp.float64)
    ring = xp.minimum(xp.floor(r).astype(xp.int64), bg.shape[-1] - 1)
    return mu + t * bg[ring]


def multi_hit_score(frames, mask, model, diameter_nm, *, pixel_size_m, distance_m, wavelength_m,
                    smooth_px=MULTI_SMOOTH_PX, rmin_factor=MULTI_RMIN_FACTOR):
    """Evidence for a second, interfering particle: localised Patterson power of the residual.

    Two particles at separation ``d`` in one coherent beam add fringes
    ``2 F1 F2 cos(2 pi q . d)`` that a radially symmetric single-sphere model cannot
    absorb. The Fourier transform of the masked residual ``(I - mu) M`` is a Patterson
    map (real-space lag ``lambda L / (N p)`` per pixel) in which those fringes make two
    lobes at ``+-d``, beyond the autocorrelation of one particle (``|r| < D``), while
    Poisson noise is white. The score is the largest value of the power map, smoothed
    by a Gaussian of ``smooth_px`` px and divided by its noise level (median power /
    ln 2, the mean of white noise), at lags ``|r| > rmin_factor * D``. One particle
    gives ~2-4; frames without a size give NaN. (Particles so far apart that their
    fringes are finer than a pixel add incoherently; only the size fit can see those.)

    Parameters
    ----------
    frames : array [n, y, x]
    mask : array [y, x]
    model : array [n, y, x]
        Expected photons of the single-sphere fit (:func:`model_images`).
    diameter_nm : array [n]
    """
    xp = backend.array_module(frames)
    frames = xp.asarray(frames)
    n, ny, nx = frames.shape
    m = xp.asarray(mask).astype(xp.float32)
    res = (frames.astype(xp.float32) - model.astype(xp.float32)) * m
    f = xp.fft.fft2(res)
    power = f.real * f.real + f.imag * f.imag
    # Gaussian smoothing (periodic) through the Fourier domain
    fy = xp.fft.fftfreq(ny)[:, None]
    fx = xp.fft.rfftfreq(nx)[None, :]
    g = xp.exp(-2.0 * (np.pi * smooth_px) ** 2 * (fx * fx + fy * fy)).astype(xp.float32)
    smooth = xp.fft.irfft2(xp.fft.rfft2(power) * g, s=(ny, nx))
    # lag (nm) of each Patterson pixel
    lam_l = wavelength_m * distance_m * 1e9 / pixel_size_m
    ly = xp.fft.fftfreq(ny)[:, None] * lam_l
    lx = xp.fft.fftfreq(nx)[None, :] * lam_l
    lag = xp.sqrt(ly * ly + lx * lx)
    noise = xp.median(power.reshape(n, -1), axis=1) / np.log(2.0)
    d_h = np.asarray(diameter_nm, dtype=np.float64)
    d = xp.asarray(np.nan_to_num(d_h, nan=np.inf))
    region = lag[None] > rmin_factor * d[:, None, None]
    peak = xp.max(xp.where(region, smooth, -xp.inf).reshape(n, -1), axis=1)
    score = backend.to_host(peak / xp.maximum(noise, 1e-300))
    return np.where(np.isfinite(d_h) & np.isfinite(score), score, np.nan)


def size_frames(frames, mask, centers, *, chunk: int = 128, background=None, rmax=None,
                multi: bool = True, **fit_kw) -> SizeResult:
    """Ring profiles, sphere fits and (``multi``) multiple-hit scores of ``frames`` [n, y, x].

    Works in chunks of ``chunk`` frames. ``centers`` is (x, y) or [n, 2]; ``background``
    the background shape (scalar, or ring profile from :func:`background_profile` with the
    same ``rmax``); ``fit_kw`` go to :func:`fit_sizes` (geometry, range, ...).
    """
    xp = backend.array_module(frames)
    n = frames.shape[0]
    centers = np.broadcast_to(np.asarray(backend.to_host(centers), dtype=np.float64), (n, 2))
    if rmax is None and n:
        rmax = max_radius(mask, centers)
    if background is not None:
        background = np.asarray(backend.to_host(background), dtype=np.float64)
        nb = int(np.ceil(rmax)) + 1
        if background.ndim == 0:
            background = np.full(nb, float(background))
        elif background.shape[-1] != nb:
            raise InputError("background", f"background profile has {background.shape[-1]} rings, expected {nb}",
                             "compute it with background_profile(..., rmax=) using the same rmax")
        background = xp.asarray(background)
    geom = {k: fit_kw[k] for k in ("pixel_size_m", "distance_m", "wavelength_m")}
    fields = ("diameter_nm", "size_score", "size_misfit", "size_scale", "size_background", "rmin_px", "rmax_px",
              "multi_score")
    parts = []
    for i in range(0, n, chunk):
        block = xp.asarray(frames[i:i + chunk])
        prof = radial_profiles(block, mask, centers[i:i + chunk], rmax=rmax)
        res = fit_sizes(prof, background=background, **fit_kw)
        if multi:
            bg_shape = background if background is not None else None
            if bg_shape is None and not fit_kw.get("fit_background", True):
                res.size_background = np.zeros_like(res.size_background)
            mu = model_images(block.shape[-2:], centers[i:i + chunk], res.diameter_nm, res.size_scale,
                              res.size_background, background=bg_shape, xp=xp, **geom)
            res.multi_score = multi_hit_score(block, mask, mu, res.diameter_nm, **geom)
        else:
            res.multi_score = np.full(block.shape[0], np.nan)
        parts.append(res)
    if not parts:
        return SizeResult(**{f: np.zeros(0) for f in fields})
    return SizeResult(**{f: np.concatenate([getattr(p, f) for p in parts]) for f in fields})


def background_profile(frames, mask, center, rmax=None, smooth: int = 2):
    """Mean background photons per pixel in each 1 px ring about ``center``, from misses.

    ``frames`` [n, y, x] should be empty frames; returns an array [nb] (zero in rings
    without good pixels) usable as the ``background`` of :func:`size_frames` with the
    same ``rmax``. The profile is averaged over ``+-smooth`` neighbouring rings.
    """
    prof = radial_profiles(frames, mask, center, rmax=rmax)
    return smooth_ring_profile(prof.counts.sum(axis=0), prof.npix.sum(axis=0), smooth)


def smooth_ring_profile(counts, npix, smooth: int = 2):
    """Photons per pixel of ring sums ``counts``/``npix`` [nb], averaged over ``+-smooth``
    rings (weighted by pixels); 0 in rings without pixels."""
    xp = backend.array_module(counts)
    kern = xp.ones(2 * int(smooth) + 1)
    cs = xp.convolve(xp.asarray(counts, dtype=xp.float64), kern, mode="same")
    ns = xp.convolve(xp.asarray(npix, dtype=xp.float64), kern, mode="same")
    return xp.where(npix > 0, cs / xp.maximum(ns, 1.0), 0.0)
