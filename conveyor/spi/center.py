"""Beam centre from the Friedel (centro-)symmetry of diffraction patterns.

For a weakly scattering object the diffracted intensity is centrosymmetric about the
beam centre ``c``: ``I(c + d) = I(c - d)``. Pixel ``x`` and its Friedel mate ``x' = 2c - x``
therefore hold the same expected photon count, and the pair differences are pure noise
only at the true centre.

Statistic
---------
For photon counts ``a = I(x)``, ``b = I(x')`` drawn from the same Poisson mean ``mu``,
``E[(a - b)^2] = 2 mu = E[a + b]``. The *Friedel dispersion*::

    D(c) = sum_pairs (a - b)^2 / sum_pairs (a + b)

is therefore ~1 at the true centre whatever the pixels in the pair set are (their
number and brightness change with ``c`` because of the beamstop, gaps and detector edges),
and grows as ``(mu_a - mu_b)^2 / (mu_a + mu_b)`` when ``c`` is off. A Pearson correlation
between the image and its 180-degree rotated copy does *not* have this property: its
noise floor depends on the signal-to-noise ratio of the pixels in the pair set, which
pulls the peak towards centres where the bright pixels at the beamstop edge pair up.

Summing over all valid pairs ``(x, s - x)`` is a convolution. With ``A = I * M`` (``M``
the good-pixel mask)::

    N(s)  = sum_x A(x) A(s - x)      = (A * A)(s)
    S1(s) = sum_x A(x) M(s - x)      = (A * M)(s)
    S2(s) = sum_x A(x)^2 M(s - x)    = (A^2 * M)(s)
    W(s)  = sum_x M(x) M(s - x)      = (M * M)(s)     number of valid pairs

and ``D(s) = (S2 - N) / S1`` at centre ``c = s / 2`` (a pixel paired with itself, at
even ``s``, is removed from ``S1`` and ``W``). All terms come from FFTs of zero-padded
images, for every candidate centre on a half-pixel grid at once, batched over frames.
The minimum of ``D`` inside a search radius around a guess is refined to sub-pixel
precision by a least-squares quadratic surface through its 5x5 neighbourhood.

Sub-pixel refinement
--------------------
The Friedel statistic compares two noisy pixels, so its minimum is only as sharp as the
photon count allows. For (near-)spherical particles the pattern is also rotationally
symmetric, and :class:`RingModel` uses that: for a candidate centre the model of every
pixel is the image's own mask-aware ring average about that centre (1 px rings, tent
weights so the likelihood is continuous in ``c``), and the Poisson log-likelihood of
the image under it is maximised over a sub-pixel grid (quadratic surface through the
5x5 neighbourhood of the best point). The reference of each pixel averages hundreds of
pixels instead of one mate.

Run and frames
--------------
The run centre (:func:`run_center`) comes from the sum of all hits of a file (a sum of
Poisson frames is Poisson): Friedel search within ``max_shift`` px of a guess, then ring
refinement within +-1 px. Per-frame centres (:func:`refine_centers`, optional) are the
ring-likelihood maxima of every hit on one candidate grid about the run centre, shared
by all frames so the ring weights are computed once and only pixels with photons are
visited per frame.

Coordinates: ``(x, y)`` px with the centre of pixel ``[iy, ix]`` at ``(ix, iy)``
(:mod:`conveyor.spi.detector`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import backend
from ..errors import InputError

#: Pixel pairs needed for a candidate centre to count (fraction of the valid pixels).
MIN_PAIR_FRACTION = 0.25


@dataclass
class CenterResult:
    """Beam centres ``[n, 2]`` as ``(x, y)`` px and the Friedel dispersion ``[n]`` at them.

    ``score`` is ``D`` at the minimum: ~1 for a pattern that is centrosymmetric up to
    Poisson noise, larger for asymmetric frames (NaN: no valid centre in the search disc).
    """

    center: np.ndarray
    score: np.ndarray

    @property
    def x(self):
        return self.center[:, 0]

    @property
    def y(self):
        return self.center[:, 1]


def _quadfit_min(patch):
    """Sub-pixel offset (dy, dx) of the minimum of a quadratic fitted to square patches [n, k, k]."""
    k = patch.shape[-1] // 2
    yy, xx = np.mgrid[-k:k + 1, -k:k + 1].astype(np.float64)
    A = np.stack([np.ones_like(xx), xx, yy, xx * xx, yy * yy, xx * yy], axis=-1).reshape(-1, 6)
    coef, *_ = np.linalg.lstsq(A, patch.reshape(patch.shape[0], -1).T, rcond=None)
    _, bx, by, cxx, cyy, cxy = coef
    det = 4 * cxx * cyy - cxy**2
    ok = (det > 0) & (cxx > 0) & (cyy > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        dx = np.where(ok, (-2 * cyy * bx + cxy * by) / det, 0.0)
        dy = np.where(ok, (-2 * cxx * by + cxy * bx) / det, 0.0)
    return np.clip(dy, -1.0, 1.0), np.clip(dx, -1.0, 1.0)


def friedel_dispersion(images, mask):
    """Friedel dispersion ``D(s)`` for every pair-sum ``s = 2c`` (see module notes).

    Parameters
    ----------
    images : array [n, y, x] or [y, x]
        Photon counts.
    mask : array [y, x] or [n, y, x], 1 = good

    Returns
    -------
    D : array [n, 2*ny, 2*nx]
        Dispersion for the centre ``(s_x / 2, s_y / 2)`` px; NaN where fewer than
        :data:`MIN_PAIR_FRACTION` of the valid pixels pair up or no photons fall on them.
    """
    xp = backend.array_module(images)
    images = xp.asarray(images)
    if images.ndim == 2:
        images = images[None]
    n, ny, nx = images.shape
    m = xp.asarray(mask).astype(xp.float64)
    if m.ndim == 2:
        m = m[None]
    if m.shape[-2:] != (ny, nx):
        raise InputError("mask", f"mask shape {m.shape[-2:]} differs from frame shape {(ny, nx)}",
                         "give a mask of the detector's shape")
    a = xp.maximum(images.astype(xp.float64), 0.0) * m
    fft = xp.fft
    shape = (2 * ny, 2 * nx)
    fa = fft.rfft2(a, s=shape)
    fm = fft.rfft2(m, s=shape)
    W = fft.irfft2(fm * fm, s=shape)
    N = fft.irfft2(fa * fa, s=shape)
    S1 = fft.irfft2(fa * fm, s=shape)
    S2 = fft.irfft2(fft.rfft2(a * a, s=shape) * fm, s=shape)
    # a pixel paired with itself (centre on a pixel) carries no information
    S1[:, 0::2, 0::2][:, :ny, :nx] -= a
    W[:, 0::2, 0::2][:, :ny, :nx] -= m
    wmin = MIN_PAIR_FRACTION * m.sum(axis=(1, 2), keepdims=True)
    ok = (W > xp.maximum(wmin, 10.0)) & (S1 > 0.5)
    return xp.where(ok, (S2 - N) / xp.where(ok, S1, 1.0), xp.nan)


def friedel_center(images, mask, guess=None, max_shift=20.0) -> CenterResult:
    """Beam centre of each image in ``images`` from Friedel symmetry alone.

    Parameters
    ----------
    images : array [n, y, x] or [y, x]
        Photon counts (single frames or sums of frames); numpy or cupy.
    mask : array [y, x] or [n, y, x]
        1 = good pixel.
    guess : (x, y) or array [n, 2], optional
        Starting centre, px; default: the middle of the detector.
    max_shift : float
        Search radius about ``guess``, px.

    Returns
    -------
    CenterResult
        ``center[n, 2]`` as (x, y) px in array-index coordinates (pixel centres at
        integers), ``score[n]`` the Friedel dispersion at the minimum.
    """
    xp = backend.array_module(images)
    images = xp.asarray(images)
    if images.ndim == 2:
        images = images[None]
    n, ny, nx = images.shape
    if guess is None:
        guess = ((nx - 1) / 2.0, (ny - 1) / 2.0)
    g = np.array(np.broadcast_to(np.asarray(guess, dtype=np.float64), (n, 2)))
    D = friedel_dispersion(images, mask)
    # candidate pair-sums s = 2c inside the search disc of each image
    sy = xp.arange(2 * ny, dtype=xp.float64)[None, :, None]
    sx = xp.arange(2 * nx, dtype=xp.float64)[None, None, :]
    gx = xp.asarray(g[:, 0])[:, None, None]
    gy = xp.asarray(g[:, 1])[:, None, None]
    inside = (sx / 2 - gx) ** 2 + (sy / 2 - gy) ** 2 <= float(max_shift) ** 2
    Ds = xp.where(inside & xp.isfinite(D), D, xp.inf)
    flat = Ds.reshape(n, -1)
    idx = backend.to_host(xp.argmin(flat, axis=1))
    best = backend.to_host(flat[xp.arange(n), xp.asarray(idx)])
    iy, ix = np.unravel_index(idx, (2 * ny, 2 * nx))
    # 5x5 neighbourhood of the minimum (invalid entries -> patch maximum) for the quadratic fit
    k = 2
    oy, ox = np.mgrid[-k:k + 1, -k:k + 1]
    py = np.clip(iy[:, None, None] + oy[None], 0, 2 * ny - 1)
    px = np.clip(ix[:, None, None] + ox[None], 0, 2 * nx - 1)
    patch = backend.to_host(D[xp.asarray(np.arange(n)[:, None, None]), xp.asarray(py), xp.asarray(px)])
    finite = np.isfinite(patch)
    fill = np.max(np.where(finite, patch, -np.inf), axis=(1, 2), keepdims=True)
    patch = np.where(finite, patch, np.where(np.isfinite(fill), fill, 0.0))
    dy, dx = _quadfit_min(patch)
    center = np.stack([0.5 * (ix + dx), 0.5 * (iy + dy)], axis=1)
    bad = ~np.isfinite(best)
    center[bad] = g[bad]
    return CenterResult(center=center, score=np.where(bad, np.nan, best))




class RingModel:
    """Rotational-symmetry likelihood for a fixed mask and a fixed set of candidate centres.

    For a candidate centre ``c`` the model of an image is ``mu(x) = p(|x - c|)``, with
    ``p`` the mask-aware radial profile of the same image about ``c``, binned in 1 px
    rings with linear (tent) weights so that the likelihood is continuous in ``c``. Since
    ``sum_x mu(x) = sum_x I(x)`` for every ``c``, ``-2 L`` with
    ``L = sum_x I(x) log mu(x)`` is the Poisson deviance up to a constant.

    The ring weights depend only on the mask and the candidates and are computed once;
    :meth:`loglik` then visits only the pixels with photons, so sparse frames are cheap.

    Parameters
    ----------
    mask : array [y, x], 1 = good
    candidates : array [k, 2]
        Candidate centres (x, y) px, shared by all images.
    rmax : float, optional
        Outer radius, px (default: the whole detector).
    """

    def __init__(self, mask, candidates, rmax=None, xp=np):
        self.xp = xp
        good = xp.asarray(mask).astype(bool)
        self.good = good
        yy, xx = xp.nonzero(good)
        self.xx = xx.astype(xp.float64)
        self.yy = yy.astype(xp.float64)
        self.c = xp.asarray(candidates, dtype=xp.float64).reshape(-1, 2)
        self.k = self.c.shape[0]
        if rmax is None:
            rmax = float(np.hypot(*good.shape))
        self.nb = int(np.ceil(rmax)) + 2
        self.base = (xp.arange(self.k, dtype=xp.int64) * self.nb)[:, None]
        i0, w = self._tent(self.xx, self.yy)
        j0 = (self.base + i0).ravel()
        w1 = w.ravel()
        size = self.k * self.nb
        self.wt = xp.bincount(j0, weights=1.0 - w1, minlength=size) + xp.bincount(j0 + 1, weights=w1, minlength=size)

    def _tent(self, x, y):
        xp = self.xp
        r = xp.sqrt((x[None] - self.c[:, 0:1]) ** 2 + (y[None] - self.c[:, 1:2]) ** 2)  # [k, m]
        r = xp.minimum(r, self.nb - 2.0)
        i0 = xp.floor(r).astype(xp.int64)
        return i0, r - i0

    def loglik(self, images):
        """``L[n, k] = sum_x I(x) log mu(x)`` of ``images`` [n, y, x] for every candidate."""
        xp = self.xp
        images = xp.asarray(images)
        if images.ndim == 2:
            images = images[None]
        n, k, nb = images.shape[0], self.k, self.nb
        vals = images[:, self.good]  # [n, p]
        fi, pi = xp.nonzero(vals > 0)
        cnt = vals[fi, pi].astype(xp.float64)
        i0, w = self._tent(self.xx[pi], self.yy[pi])  # [k, m]
        ring = (self.base + i0).ravel()
        slot = fi[None, :] * k + xp.arange(k, dtype=xp.int64)[:, None]  # [k, m]: (image, candidate)
        j0 = (slot * nb + i0).ravel()
        w1 = w.ravel()
        w0 = 1.0 - w1
        cw = xp.broadcast_to(cnt[None, :], w.shape).ravel()
        size = n * k * nb
        P = xp.bincount(j0, weights=w0 * cw, minlength=size) + xp.bincount(j0 + 1, weights=w1 * cw, minlength=size)
        mu = w0 * P[j0] / xp.maximum(self.wt[ring], 1e-12) + w1 * P[j0 + 1] / xp.maximum(self.wt[ring + 1], 1e-12)
        terms = cw * xp.log(xp.maximum(mu, 1e-300))
        return xp.bincount(slot.ravel(), weights=terms, minlength=n * k).reshape(n, k)


def _grid(start, span, step):
    half = max(2, int(round(span / step)))
    off = np.arange(-half, half + 1) * step
    oy, ox = np.meshgrid(off, off, indexing="ij")
    grid = np.asarray(start, dtype=np.float64).reshape(1, 2) + np.stack([ox.ravel(), oy.ravel()], axis=1)
    return off, grid


def _grid_peak(L, off, step, start):
    """Sub-pixel maximum of ``L[n, m, m]`` on the grid ``start + off`` (quadratic 5x5 fit)."""
    n, m, _ = L.shape
    half = m // 2
    j = np.argmax(L.reshape(n, -1), axis=1)
    jy, jx = np.unravel_index(j, (m, m))
    cy = np.clip(jy, 2, m - 3)
    cx = np.clip(jx, 2, m - 3)
    rows = np.arange(n)[:, None, None]
    d = np.arange(-2, 3)
    patch = -L[rows, cy[:, None, None] + d[None, :, None], cx[:, None, None] + d[None, None, :]]
    dy, dx = _quadfit_min(patch)
    inner = (jy == cy) & (jx == cx)
    dx = np.where(inner, dx, 0.0)
    dy = np.where(inner, dy, 0.0)
    center = np.asarray(start, dtype=np.float64).reshape(1, 2) + np.stack(
        [off[jx] + step * dx, off[jy] + step * dy], axis=1)
    return center, L.max(axis=(1, 2)) - L[:, half, half]


def refine_radial(images, mask, start, span=1.0, step=0.25, rmax=None) -> CenterResult:
    """Sub-pixel centres maximising the :class:`RingModel` likelihood about ``start``.

    The grid covers ``start +- span`` px (``start`` = (x, y), shared by all images) in
    steps of ``step``; a quadratic surface through the 5x5 neighbourhood of the best grid
    point gives the sub-pixel centre. ``score`` is the log-likelihood gain over ``start``.
    """
    xp = backend.array_module(images)
    images = xp.asarray(images)
    if images.ndim == 2:
        images = images[None]
    n = images.shape[0]
    off, grid = _grid(start, span, step)
    model = RingModel(mask, grid, rmax, xp=xp)
    m = len(off)
    L = backend.to_host(model.loglik(images)).reshape(n, m, m)
    center, score = _grid_peak(L, off, step, start)
    return CenterResult(center=center, score=score)


def find_center(images, mask, guess=None, max_shift=20.0, refine=True) -> CenterResult:
    """Beam centre of each image: Friedel search (:func:`friedel_center`) within
    ``max_shift`` px of ``guess``, then (``refine``) sub-pixel refinement by rotational
    symmetry (:func:`refine_radial`, +-1 px about the Friedel centre). ``score`` is the
    Friedel dispersion at the coarse centre (~1: symmetric up to Poisson noise).
    """
    coarse = friedel_center(images, mask, guess=guess, max_shift=max_shift)
    if not refine:
        return coarse
    xp = backend.array_module(images)
    images = xp.asarray(images)
    if images.ndim == 2:
        images = images[None]
    center = coarse.center.copy()
    for i in range(images.shape[0]):
        if np.isfinite(coarse.score[i]):
            center[i] = refine_radial(images[i:i + 1], mask, coarse.center[i]).center[0]
    return CenterResult(center=center, score=coarse.score)


def run_center(frames, mask, guess=None, max_shift=20.0, refine=True) -> CenterResult:
    """Centre of a run: :func:`find_center` on the sum of ``frames`` [n, y, x]."""
    xp = backend.array_module(frames)
    total = xp.asarray(frames).sum(axis=0, dtype=xp.float64)
    return find_center(total, mask, guess=guess, max_shift=max_shift, refine=refine)


def refine_centers(frames, mask, start, max_shift=3.0, step=1.0, chunk=64) -> CenterResult:
    """Per-frame centres within ``max_shift`` px of the run centre ``start`` (x, y).

    Single frames are sparse, so each is fitted by rotational symmetry (:class:`RingModel`)
    on one grid of candidate centres (``step`` px) shared by all frames: the ring weights
    are computed once and only pixels with photons are visited per frame. ``score`` is
    the log-likelihood gain over ``start``.
    """
    xp = backend.array_module(frames)
    n = frames.shape[0]
    off, grid = _grid(start, max_shift, step)
    model = RingModel(mask, grid, xp=xp)
    m = len(off)
    centers = np.empty((n, 2))
    scores = np.empty(n)
    for i in range(0, n, chunk):
        block = xp.asarray(frames[i:i + chunk])
        L = backend.to_host(model.loglik(block)).reshape(block.shape[0], m, m)
        centers[i:i + chunk], scores[i:i + chunk] = _grid_peak(L, off, step, start)
    return CenterResult(centers, scores)
