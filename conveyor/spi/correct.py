"""Correction of a 3D diffraction intensity before phasing.

An EMC intensity has no data inside the beamstop, none in voxels no pixel reached
(detector gaps, corners), a background merged in with the signal and, from noise and
background subtraction, small negative values. Phasing needs a complete, centrosymmetric,
non-negative intensity and a mask saying which voxels are measured.
:func:`correct_intensity` does, in order:

1. **Measured voxels**: ``weight > 0`` (the EMC merge weight) when given, otherwise
   ``intensity > 0``; only voxels inside the inscribed sphere count.
2. **Symmetrisation**: Friedel ``I(q) = I(−q)`` and optionally a point group
   (:func:`conveyor.spi.quaternions.point_group`), averaging measured voxels only
   (``sym(I·m) / sym(m)``), so a voxel whose Friedel mate was measured becomes measured.
3. **Background** (optional), from the outer shells: each shell's lower envelope (its
   2nd percentile over measured voxels; speckle minima approach the background).
   ``constant``: the median envelope of the outer ``background_shells`` voxels of radius.
   ``radial``: the envelope itself (3-shell running median) on shells whose relative
   spread is at least 0.5 (speckled shells, whose minima reach the background), and a
   power law ``A r^−k`` fitted to those shells further in (near-spherical low-q shells
   have minima far above the background), never above a shell's own envelope. The
   estimate is subtracted from the measured voxels.
4. **Missing centre**: the beamstop radius ``r_bs`` is given or taken as the first
   shell at least half measured. A homogeneous-sphere intensity
   ``s [3 (sin x − x cos x)/x³]²`` (``x = 2π q R``, q without 2π) is fitted to the
   radial profile of the first measured shells ``r_bs .. r_bs + fit_width`` (least
   squares on log intensity; the diameter is fitted on a fine grid around
   ``diameter_nm``, or fixed by ``low_q_fill_nm``) and fills every voxel with
   ``|q| < r_bs``. Other unmeasured voxels get the radial mean of their measured shell
   (the sphere model where a shell has none).
5. Negative values are set to 0.

Units: the grid voxel is ``dq`` in 1/Å (the header voxel size of ``intensity.mrc``);
``q = 0`` at index ``size // 2``; diameters in nm.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import backend
from ..errors import InputError
from .emc import symmetrize


@dataclass
class CorrectResult:
    """Corrected intensity and bookkeeping (host arrays).

    Attributes
    ----------
    intensity : ``[n, n, n]`` float32, non-negative, centrosymmetric
    measured : ``[n, n, n]`` bool, voxels holding (symmetrised) data
    filled : ``[n, n, n]`` bool, voxels filled from the models (inside the sphere)
    fill_radius : float, beamstop radius used (voxels)
    diameter_nm : float, diameter of the sphere model
    scale : float, its scale ``s``
    background_level : float, background subtracted at the outer edge (0: none)
    fit_residual : float, rms of the log-profile misfit in the fit range
    """

    intensity: np.ndarray
    measured: np.ndarray
    filled: np.ndarray
    fill_radius: float
    diameter_nm: float
    scale: float
    background_level: float
    fit_residual: float


def sphere_intensity(q_per_nm, diameter_nm):
    """``[3 (sin x − x cos x) / x³]²`` with ``x = π q d`` (q in 1/nm without 2π, d in nm); 1 at q = 0."""
    x = np.pi * np.asarray(q_per_nm, dtype=np.float64) * float(diameter_nm)
    small = np.abs(x) < 1e-3
    xs = np.where(small, 1.0, x)
    amp = 3.0 * (np.sin(xs) - xs * np.cos(xs)) / xs**3
    amp = np.where(small, 1.0 - x * x / 10.0, amp)
    return amp * amp


def _radii(n):
    c = n // 2
    ax = np.arange(n) - c
    return np.sqrt(ax[:, None, None] ** 2 + ax[None, :, None] ** 2 + ax[None, None, :] ** 2)


def _shell_stats(vol, mask, ri, nshell):
    cnt = np.bincount(ri[mask], minlength=nshell)[:nshell]
    tot = np.bincount(ri[mask], weights=vol[mask], minlength=nshell)[:nshell]
    allc = np.bincount(ri.ravel(), minlength=nshell)[:nshell]
    mean = np.where(cnt > 0, tot / np.maximum(cnt, 1), np.nan)
    return mean, cnt, allc


def _envelope(vol, mask, ri, nshell, pct=2.0):
    env = np.full(nshell, np.nan)
    for k in range(nshell):
        sel = mask & (ri == k)
        if sel.sum() >= 8:
            env[k] = np.percentile(vol[sel], pct)
    return env


def fit_sphere_profile(q_per_nm, profile, diameter_nm=None, fit_diameter: bool = True, n_grid: int = 401):
    """Fit ``s · sphere_intensity(q, d)`` to a radial profile by least squares on log values.

    ``diameter_nm`` is the start (searched ±30 %) or, with ``fit_diameter=False``, the
    fixed value; without it the search spans from the diameter whose first minimum lies
    at the largest q to one with 3 fringes inside the smallest q. Returns
    ``(diameter_nm, scale, rms log residual)``.
    """
    q = np.asarray(q_per_nm, dtype=np.float64)
    p = np.asarray(profile, dtype=np.float64)
    ok = np.isfinite(p) & (p > 0) & (q > 0)
    if ok.sum() < 2:
        raise InputError("intensity", "fewer than 2 measured shells in the fit range", "lower --beamstop-radius-px or widen --fit-shells")
    q, lp = q[ok], np.log(p[ok])
    if diameter_nm is not None and not fit_diameter:
        grid = np.array([float(diameter_nm)])
    elif diameter_nm is not None:
        grid = float(diameter_nm) * np.linspace(0.7, 1.3, n_grid)
    else:
        dmin = 4.493 / (np.pi * q.max()) * 0.5
        dmax = 3 * np.pi / (np.pi * max(q.min(), 1e-12))
        grid = np.geomspace(dmin, max(dmax, 2 * dmin), n_grid)
    floor = 1e-12

    def search(ds, best):
        for d in ds:
            lm = np.log(np.maximum(sphere_intensity(q, d), floor))
            ls = float(np.mean(lp - lm))
            r = float(np.sqrt(np.mean((lp - lm - ls) ** 2)))
            if r < best[0]:
                best = (r, float(d), float(np.exp(ls)))
        return best

    best = search(grid, (np.inf, None, None))
    if len(grid) > 1:  # refine between the neighbours of the best grid point
        i = int(np.argmin(np.abs(grid - best[1])))
        lo, hi = grid[max(0, i - 1)], grid[min(len(grid) - 1, i + 1)]
        best = search(np.linspace(lo, hi, 81), best)
    return best[1], best[2], best[0]


def correct_intensity(
    volume,
    dq_per_A: float,
    weight=None,
    beamstop_radius: float | None = None,
    diameter_nm: float | None = None,
    fit_diameter: bool = True,
    fit_width: float = 6.0,
    background: str = "none",
    background_shells: float = 3.0,
    symmetry=None,
    low_q_fill_nm: float | None = None,
) -> CorrectResult:
    """Symmetrise, subtract background, fill the missing centre and clip negatives.

    Parameters
    ----------
    volume : ``[n, n, n]`` intensity (numpy or cupy), ``q = 0`` at ``n // 2``
    dq_per_A : float
        Voxel size in 1/Å (q without 2π).
    weight : array, optional
        EMC merge weight; ``weight > 0`` marks measured voxels (default ``volume > 0``).
    beamstop_radius : float, optional
        Radius (voxels) of the missing centre; default: the first shell at least half measured.
    diameter_nm : float, optional
        Particle diameter for the sphere fit (start value).
    fit_diameter : bool
        Fit the diameter (default) or keep ``diameter_nm``.
    fit_width : float
        Shells (voxels) beyond the beamstop used for the fit.
    background : "none", "constant" or "radial"
    background_shells : float
        Outer shells (voxels) that define the ``constant`` background.
    symmetry : str, optional
        Point group imposed besides Friedel symmetry.
    low_q_fill_nm : float, optional
        Fill the centre from a sphere of this diameter (scale still fitted).
    """
    vol = np.asarray(backend.to_host(volume), dtype=np.float64)
    if vol.ndim != 3 or len(set(vol.shape)) != 1:
        raise InputError("intensity", f"expected a cubic volume, got shape {vol.shape}", "give a 3D intensity")
    if not np.all(np.isfinite(vol)):
        raise InputError("intensity", "holds NaN or infinite values", "re-run the reconstruction")
    if not (dq_per_A and dq_per_A > 0):
        raise InputError("intensity", f"voxel size must be positive, got {dq_per_A}", "store dq in 1/A in the header")
    if background not in ("none", "constant", "radial"):
        raise InputError("--background", f"unknown background mode {background!r}", "use none, constant or radial")
    n = vol.shape[0]
    c = n // 2
    r = _radii(n)
    inside = r <= c - 1
    m0 = (np.asarray(backend.to_host(weight)) > 0) if weight is not None else (vol > 0)
    m0 = m0 & inside
    if not m0.any():
        raise InputError("intensity", "no measured voxels (all zero or zero weight)", "check the EMC output")

    # 2. symmetrise (measured voxels only)
    num = symmetrize(vol * m0, symmetry)
    den = symmetrize(m0.astype(np.float64), symmetry)
    measured = (den > 1e-6) & inside
    vol = np.where(measured, num / np.where(measured, den, 1.0), 0.0)

    nshell = c + 1
    ri = np.minimum(np.rint(r).astype(np.int64), c)  # corners beyond the sphere share the last bin (unused)
    _, cnt, allc = _shell_stats(vol, measured, ri, nshell)
    cover = np.where(allc > 0, cnt / np.maximum(allc, 1), 0.0)
    measured_shells = np.flatnonzero(cover > 0)
    r_last = int(measured_shells.max())

    # 3. background from the outer shells
    bg_level = 0.0
    if background != "none":
        env = _envelope(vol, measured, ri, nshell)
        outer = (np.arange(nshell) > r_last - float(background_shells)) & np.isfinite(env)
        if not outer.any():
            raise InputError("intensity", "no measured outer shells for the background estimate", "use --background none")
        if background == "constant":
            bg_level = float(np.median(env[outer]))
            vol = np.where(measured, vol - bg_level, 0.0)
        else:
            mean, _, _ = _shell_stats(vol, measured, ri, nshell)
            std = np.full(nshell, np.nan)
            for k in range(nshell):
                sel = measured & (ri == k)
                if sel.sum() >= 8:
                    std[k] = vol[sel].std()
            kk = np.arange(nshell)
            # speckled shells (relative spread >= 0.5) have minima that reach the background
            trusted = np.isfinite(env) & (env > 0) & (kk > 0) & (std >= 0.5 * np.abs(mean))
            if trusted.sum() < 2:
                raise InputError("intensity", "too few speckled shells for a radial background", "use --background constant")
            tk = kk[trusted]
            slope, icpt = np.polyfit(np.log(tk), np.log(env[trusted]), 1)
            model = np.exp(icpt) * np.maximum(kk, 1).astype(np.float64) ** slope
            smooth = env.copy()
            for k in tk:
                win = env[max(0, k - 1) : k + 2]
                smooth[k] = np.nanmedian(win)
            b = np.where(trusted, smooth, model)
            b = np.where(np.isfinite(env), np.minimum(b, env), b)
            b = np.maximum(np.nan_to_num(b), 0.0)
            bg_level = float(b[r_last])
            vol = np.where(measured, vol - b[ri], 0.0)

    # 4. missing centre
    if beamstop_radius is None:
        half_cov = np.flatnonzero(cover >= 0.5)
        if half_cov.size == 0:
            raise InputError("intensity", "no shell is at least half measured", "give --beamstop-radius-px")
        r_bs = float(half_cov.min())
    else:
        r_bs = float(beamstop_radius)
        if r_bs < 0 or r_bs >= r_last:
            raise InputError("--beamstop-radius-px", f"{r_bs} is outside the measured radii (0..{r_last})", "give the beamstop radius in voxels")
    prof, _, _ = _shell_stats(vol, measured, ri, nshell)
    k = np.arange(nshell)
    fit_sel = (k >= r_bs) & (k <= r_bs + float(fit_width)) & np.isfinite(prof) & (prof > 0)
    q_nm = k * dq_per_A * 10.0  # 1/nm
    if low_q_fill_nm is not None:
        d_fit, s_fit, resid = fit_sphere_profile(q_nm[fit_sel], prof[fit_sel], float(low_q_fill_nm), fit_diameter=False)
    else:
        d_fit, s_fit, resid = fit_sphere_profile(q_nm[fit_sel], prof[fit_sel], diameter_nm, fit_diameter=fit_diameter or diameter_nm is None)
    sphere = s_fit * sphere_intensity(r * dq_per_A * 10.0, d_fit)
    centre = inside & (r < r_bs)
    out = vol.copy()
    out[centre] = sphere[centre]
    gaps = inside & ~measured & ~centre
    shell_mean = np.where(np.isfinite(prof), prof, np.nan)
    fill = shell_mean[ri]
    out[gaps] = np.where(np.isfinite(fill[gaps]), fill[gaps], sphere[gaps])
    measured = measured & ~centre
    filled = inside & ~measured

    # 5. non-negative, outside the sphere 0
    out = np.where(inside, np.maximum(out, 0.0), 0.0)
    out = 0.5 * (out + out[::-1, ::-1, ::-1])  # exact Friedel symmetry after the fills
    return CorrectResult(
        intensity=out.astype(np.float32),
        measured=measured,
        filled=filled,
        fill_radius=r_bs,
        diameter_nm=float(d_fit),
        scale=float(s_fit),
        background_level=bg_level,
        fit_residual=float(resid),
    )
