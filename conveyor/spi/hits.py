"""Hit finding: photon and lit-pixel counts per frame and an automatic threshold.

All kernels are batched over frames and take their array module from
:mod:`conveyor.backend`, so numpy and cupy stacks both work. The threshold itself is
computed on the host from the per-frame counts (one number per frame).

Automatic threshold
-------------------
Raw runs are dominated by empty frames (misses), whose counts form a narrow peak (the
background) at the low end of the distribution; hits spread over a wide range above it.
The threshold is ``background + k * sigma`` where

* the misses are located first by the half-sample mode (Bickel & Fruehwirth 2006) of
  the per-frame metric -- the centre of the densest half, then of its densest half, ...
  -- which ignores any number of hits as long as the misses form the densest cluster,
  with a first spread from the lower side of that mode only (which the hits cannot
  inflate): ``1.4826 * median(mode - x)`` over ``x <= mode``;
* the misses' *core* is then refined by iterative clipping: the values within
  ``+-3 sigma`` (:data:`CLIP_SIGMA`) of the current centre give the new centre (their
  median, ``background``) and spread (``sigma = 1.4826 * MAD``), until it converges.
  This takes in the upper tail of the misses (pulse-energy and gas-pressure jitter make
  the background skewed to the right) but not the hits, which lie far above;
* ``sigma`` is never taken below the Poisson value ``sqrt(background)`` (and 1);
* ``k`` defaults to 5 (:data:`K_SIGMA`).

The hit score of a frame is ``(metric - background) / sigma``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from .. import backend
from ..errors import InputError

log = logging.getLogger(__name__)

#: Default number of background standard deviations between the background and the threshold.
K_SIGMA = 5.0
#: Normal-consistent factor for the median absolute deviation.
MAD_TO_SIGMA = 1.4826
#: Half-width (in sigmas) of the window that defines the misses' core.
CLIP_SIGMA = 3.0


@dataclass
class HitResult:
    """Per-frame hit-finding results (host numpy arrays) and the threshold used.

    Attributes
    ----------
    photons : ndarray [n]
        Photons inside the mask (and annulus), per frame.
    lit_pixels : ndarray [n]
        Pixels with at least ``lit_level`` photons inside the same region, per frame.
    score : ndarray [n]
        ``(metric - background) / sigma`` (see the module notes).
    is_hit : ndarray [n] of bool
    threshold : float
        Threshold on ``metric`` (photons or lit pixels) that defined ``is_hit``.
    metric : str
        ``"photons"`` or ``"lit_pixels"``.
    background : float
        Background (miss) level of ``metric`` (median of the misses' core).
    sigma : float
        Spread of the misses (robust, Poisson floor).
    auto : bool
        True when the threshold was estimated from the data.
    """

    photons: np.ndarray
    lit_pixels: np.ndarray
    score: np.ndarray
    is_hit: np.ndarray
    threshold: float
    metric: str = "photons"
    background: float = 0.0
    sigma: float = 1.0
    auto: bool = True

    def attrs(self) -> dict:
        """Thresholds as a dict of attributes for the per-frame table."""
        return {
            "hit_metric": self.metric,
            "hit_threshold": float(self.threshold),
            "hit_threshold_auto": bool(self.auto),
            "hit_background": float(self.background),
            "hit_sigma": float(self.sigma),
            "n_hits": int(np.count_nonzero(self.is_hit)),
        }


def annulus_mask(shape, center, rmin=None, rmax=None, xp=np):
    """Boolean ``[y, x]`` array of pixels with ``rmin <= r <= rmax`` px from ``center=(cx, cy)``."""
    ny, nx = shape
    y = xp.arange(ny, dtype=xp.float64)[:, None]
    x = xp.arange(nx, dtype=xp.float64)[None, :]
    r = xp.sqrt((x - float(center[0])) ** 2 + (y - float(center[1])) ** 2)
    sel = xp.ones(shape, dtype=bool)
    if rmin is not None:
        sel &= r >= float(rmin)
    if rmax is not None:
        sel &= r <= float(rmax)
    return sel


def count_photons(data, mask, lit_level: float = 0.5):
    """Photons and lit pixels per frame inside ``mask``.

    Parameters
    ----------
    data : array [n, y, x]
        Photon counts (numpy or cupy).
    mask : array [y, x]
        1/True = good pixel (same module as ``data``).
    lit_level : float
        A pixel is lit when it holds at least this many photons (0.5: one photon).

    Returns
    -------
    photons, lit_pixels : arrays [n] in the module of ``data``
    """
    xp = backend.array_module(data)
    data = xp.asarray(data)
    if data.ndim == 2:
        data = data[None]
    good = xp.asarray(mask).astype(bool)
    if good.shape != data.shape[-2:]:
        raise InputError("mask", f"mask shape {good.shape} differs from frame shape {data.shape[-2:]}",
                         "give a mask of the detector's shape")
    n = data.shape[0]
    flat = data.reshape(n, -1)
    g = good.ravel()
    # float32 sums of photon counts are exact below 2**24 photons per frame
    dtype = xp.float64 if data.dtype == xp.float64 else xp.float32
    photons = (flat.astype(dtype, copy=False) @ g.astype(dtype)).astype(xp.float64)
    lit = xp.count_nonzero((flat >= lit_level) & g[None], axis=1).astype(xp.int64)
    return photons, lit


def half_sample_mode(values) -> float:
    """Half-sample mode of 1D ``values`` (Bickel & Fruehwirth 2006), robust to outliers."""
    y = np.sort(np.asarray(backend.to_host(values), dtype=np.float64).ravel())
    y = y[np.isfinite(y)]
    if y.size == 0:
        raise ValueError("no finite values")
    while y.size > 3:
        h = (y.size + 1) // 2
        widths = y[h - 1:] - y[: y.size - h + 1]
        # several equally narrow windows (ties in integer counts): take the middle one
        best = np.flatnonzero(widths == widths.min())
        i = int(best[len(best) // 2])
        y = y[i: i + h]
    if y.size == 3:
        if y[1] - y[0] < y[2] - y[1]:
            return float(0.5 * (y[0] + y[1]))
        if y[1] - y[0] > y[2] - y[1]:
            return float(0.5 * (y[1] + y[2]))
        return float(y[1])
    return float(np.mean(y))


def background_level(values, poisson: bool = True, clip: float = CLIP_SIGMA, iterations: int = 10) -> tuple[float, float]:
    """Centre and spread of the misses in a per-frame count distribution (module notes).

    Returns
    -------
    background : float
        Median of the misses' core (starting from the half-sample mode).
    sigma : float
        ``1.4826 * MAD`` of that core; at least ``sqrt(background)`` when ``poisson``
        (counts) and at least 1.
    """
    v = np.asarray(backend.to_host(values), dtype=np.float64)
    v = v[np.isfinite(v)]
    mode = half_sample_mode(v)
    lower = mode - v[v <= mode]
    sigma = MAD_TO_SIGMA * float(np.median(lower)) if lower.size >= 3 else 0.0

    def floor(c, s):
        if poisson:
            s = max(s, float(np.sqrt(max(c, 0.0))))
        return max(s, 1.0)

    centre, sigma = mode, floor(mode, sigma)
    for _ in range(iterations):
        core = v[np.abs(v - centre) <= clip * sigma]
        if core.size < 3:
            break
        c_new = float(np.median(core))
        s_new = floor(c_new, MAD_TO_SIGMA * float(np.median(np.abs(core - c_new))))
        if abs(c_new - centre) < 1e-6 * max(1.0, abs(centre)) and abs(s_new - sigma) < 1e-6 * sigma:
            centre, sigma = c_new, s_new
            break
        centre, sigma = c_new, s_new
    return centre, sigma


def find_hits(
    data,
    mask,
    threshold="auto",
    *,
    metric: str = "photons",
    k_sigma: float = K_SIGMA,
    min_photons: float = 0.0,
    center=None,
    rmin: float | None = None,
    rmax: float | None = None,
    lit_level: float = 0.5,
    counts=None,
) -> HitResult:
    """Classify frames into hits and misses.

    Parameters
    ----------
    data : array [n, y, x]
        Photon counts. May be None when ``counts`` is given.
    mask : array [y, x]
        1 = good pixel.
    threshold : "auto" or float
        Threshold on ``metric``; ``"auto"`` estimates it (module notes).
    metric : {"photons", "lit_pixels"}
        Per-frame quantity compared with the threshold.
    k_sigma : float
        Background standard deviations above the background mode (auto threshold).
    min_photons : float
        Hits must also have at least this many photons in the region.
    center, rmin, rmax :
        Optional annulus (px, about ``center=(cx, cy)``) restricting the counted pixels,
        e.g. to skip the beamstop edge.
    lit_level : float
        Photons for a pixel to count as lit.
    counts : (photons, lit_pixels), optional
        Precomputed per-frame counts (e.g. accumulated chunk by chunk); ``data`` is then
        not used.
    """
    if metric not in ("photons", "lit_pixels"):
        raise InputError("metric", f"unknown hit metric {metric!r}", "use 'photons' or 'lit_pixels'")
    if counts is None:
        xp = backend.array_module(data)
        region = xp.asarray(mask).astype(bool)
        if rmin is not None or rmax is not None:
            if center is None:
                raise InputError("center", "an annulus needs the beam centre", "give center=(cx, cy)")
            region = region & annulus_mask(region.shape, center, rmin, rmax, xp=xp)
        photons, lit = count_photons(data, region, lit_level)
    else:
        photons, lit = counts
    photons = np.asarray(backend.to_host(photons), dtype=np.float64)
    lit = np.asarray(backend.to_host(lit), dtype=np.int64)
    values = photons if metric == "photons" else lit.astype(np.float64)
    if values.size == 0:
        raise InputError("data", "no frames to classify", "check the frame selection")
    background, sigma = background_level(values, poisson=True)
    auto = isinstance(threshold, str)
    if auto:
        if threshold != "auto":
            raise InputError("threshold", f"unknown threshold {threshold!r}", "use 'auto' or a number")
        thr = background + k_sigma * sigma
    else:
        thr = float(threshold)
    score = (values - background) / sigma
    is_hit = (values > thr) & (photons >= min_photons)
    frac = float(is_hit.mean())
    if auto and frac > 0.5:
        log.warning(
            "%.0f%% of the frames are hits: the automatic threshold assumes that the misses form the "
            "densest cluster of counts; check the counts or give --threshold N (e.g. for pre-selected hits)",
            100 * frac,
        )
    return HitResult(photons, lit, score, is_hit, float(thr), metric, float(background), float(sigma), auto)
