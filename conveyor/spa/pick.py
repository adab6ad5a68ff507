"""Particle picking: template-free Laplacian-of-Gaussian (LoG) and template matching.

Both pickers work on a binned, low-passed copy of the micrograph (binned by Fourier
cropping so the particle radius is about 10 px), turn it into a score map whose peaks are
particle centres, and then share one post-processing chain:

1. local maxima, greedy non-maximum suppression at ``min_distance`` (default: 0.8 × the
   particle diameter) and exclusion of positions closer than ``edge`` to the border (default: half
   the extraction box, so every pick can be extracted);
2. a threshold on the score (``"auto"``: the lowest score at which at most 10 % of the picks
   are expected to be noise, from the number of local maxima white noise at the
   micrograph's level gives above each score; or a number in units of the score map's
   robust standard deviation, which is also what rlnAutopickFigureOfMerit reports);
3. rejection of ice, carbon and aggregates from local statistics in a particle-sized disk
   compared with the accepted population and the whole micrograph (see :class:`JunkFilter`).

Conventions
-----------
* Input micrographs have protein **dark** (as recorded); ``dark_particles=False`` for
  inverted images.
* Returned coordinates ``x, y`` are in px of the input micrograph, origin at the image
  corner, ``x`` along columns (RELION's rlnCoordinateX/Y; pixel ``[j, i]`` is at ``(i, j)``).
* Arrays are numpy or cupy; filtering is done with FFTs on the array's device, only the
  short candidate list is moved to the host.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .. import backend
from ..errors import InputError
from .extract import default_box_size, fft_module, fourier_crop

TARGET_RADIUS_PX = 10.0
"""Particle radius (px) aimed for in the binned micrograph."""


# --------------------------------------------------------------------------- helpers
def picking_bin_factor(pixel_size: float, particle_diameter: float, target_radius: float = TARGET_RADIUS_PX) -> int:
    """Integer binning that brings the particle radius closest to ``target_radius`` px (≥ 1)."""
    r = 0.5 * particle_diameter / pixel_size
    return max(1, int(round(r / target_radius)))


def _ndimage(xp):
    if xp is np:
        import scipy.ndimage as ndi  # noqa: PLC0415
    else:  # pragma: no cover - GPU only
        import cupyx.scipy.ndimage as ndi  # noqa: PLC0415
    return ndi


def _k2(shape, xp):
    """Squared spatial frequency (cycles/px)² and components on the rfft2 grid of ``shape``."""
    ky = xp.fft.fftfreq(shape[0]).astype(xp.float32)
    kx = xp.fft.rfftfreq(shape[1]).astype(xp.float32)
    ky, kx = xp.meshgrid(ky, kx, indexing="ij")
    return kx, ky, kx * kx + ky * ky


def _disk_kernel_ft(shape, radius: float, xp):
    """rfft2 of a disk of ``radius`` px, normalised to sum 1, centred on pixel [0, 0] (wrapped)."""
    ny, nx = shape
    y = xp.fft.fftfreq(ny, 1.0 / ny).astype(xp.float32)
    x = xp.fft.fftfreq(nx, 1.0 / nx).astype(xp.float32)
    yy, xx = xp.meshgrid(y, x, indexing="ij")
    disk = ((xx * xx + yy * yy) <= radius * radius).astype(xp.float32)
    disk /= disk.sum()
    return fft_module(xp).rfft2(disk)


def _robust(values):
    """(median, 1.4826 × MAD) of a numpy or cupy array; the sigma is never 0."""
    xp = backend.array_module(values)
    v = values.ravel()
    med = xp.median(v)
    sig = 1.4826 * xp.median(xp.abs(v - med))
    med, sig = float(med), float(sig)
    if not sig > 0:
        sig = float(xp.std(v)) or 1.0
    return med, sig


def greedy_nms(xy, score, min_distance: float):
    """Indices of the points kept by greedy non-maximum suppression (best score first).

    A point is dropped when a better-scoring kept point lies closer than ``min_distance``.
    """
    from scipy.spatial import cKDTree  # noqa: PLC0415

    xy = np.asarray(xy, dtype=float).reshape(-1, 2)
    order = np.argsort(-np.asarray(score, dtype=float), kind="stable")
    if len(order) == 0 or min_distance <= 0:
        return order
    tree = cKDTree(xy)
    alive = np.ones(len(xy), dtype=bool)
    keep = []
    for i in order:
        if not alive[i]:
            continue
        keep.append(i)
        alive[tree.query_ball_point(xy[i], min_distance - 1e-9)] = False
    return np.asarray(keep, dtype=np.int64)


# --------------------------------------------------------------------------- data classes
@dataclass
class JunkFilter:
    """Settings of the ice/carbon/aggregate rejection.

    For each candidate the filter measures on the binned micrograph, in a disk of the
    particle radius ``r``: the local mean and standard deviation; the height of a step of the
    local mean across the particle (Gaussian-derivative edge detector at scale ``r``, scaled
    so a straight step of height ``h`` reads ``h``; an isolated particle gives ~0 at its own
    centre); and the fraction of clipped pixels. Micrograph-wide rules always apply; the
    population rules compare a candidate with the accepted candidates (median and robust
    sigma, 1.4826 × MAD) once there are at least ``min_population`` of them.

    Attributes
    ----------
    dark_k, bright_k : float
        Reject a local mean below (``dark``: ice balls, thick ice, carbon, aggregates) or above
        (``bright``: holes, cracks) the particles' median by more than this many spreads; the
        spread is at least ``noise_floor`` × the noise of a disk mean.
    sd_k, sd_tol : float
        Reject a local sd above the particles' median + ``sd_k`` × max(MAD, ``sd_tol`` ×
        median) (``variance``: ice and carbon edges, aggregates).
    step_k : float
        Reject a step higher than the micrograph's median + ``step_k`` robust sigmas of the
        step map (``carbon_edge``).
    noise_floor : float
    score_k, score_tol : float
        Reject a score above the particles' median + ``score_k`` × max(MAD, ``score_tol`` ×
        median) (``too_strong``: aggregates).
    flat_frac : float
        Reject a local sd below this fraction of the micrograph's typical value (``flat``:
        masked, blank or saturated areas).
    saturation_frac : float
        Reject more than this fraction of clipped pixels in the disk (``saturated``; values at
        the micrograph's minimum or maximum count as clipped when many pixels share them).
    min_population : int
        Accepted candidates needed before the population rules apply (with fewer, a single
        strong particle cannot be told from junk by comparison).
    """

    dark_k: float = 5.0
    bright_k: float = 5.0
    sd_k: float = 5.0
    sd_tol: float = 0.15
    step_k: float = 8.0
    noise_floor: float = 2.0
    score_k: float = 4.0
    score_tol: float = 0.2
    flat_frac: float = 0.3
    saturation_frac: float = 0.01
    min_population: int = 8


@dataclass
class PickDetails:
    """What the picker saw, for overlays and diagnostics.

    Attributes
    ----------
    binned : numpy.ndarray
        The binned, lightly low-passed micrograph (host copy for display).
    bin_factor : int
        Binning used (input px per binned px).
    radius_binned : float
        Particle radius in binned px.
    threshold : float
        Score threshold applied (units of the score map's robust sigma).
    noise_sd : float
        Standard deviation of the score for pure white noise at the micrograph's noise level,
        in the same units.
    expected_false : float
        Local maxima that white noise at the micrograph's level is expected to give above the
        threshold in the usable area, i.e. the expected number of noise picks (see
        :func:`auto_threshold`).
    candidates : pandas.DataFrame
        Every candidate after non-maximum suppression, with columns ``x, y`` (input px),
        ``score``, the junk features and ``status`` (``picked``, ``below_threshold`` or the
        junk reason such as ``dark``, ``bright``, ``variance``, ``carbon_edge``, ``flat``,
        ``saturated``).
    """

    binned: np.ndarray
    bin_factor: int
    radius_binned: float
    threshold: float
    noise_sd: float
    candidates: pd.DataFrame = field(default_factory=pd.DataFrame)
    expected_false: float = float("nan")


@dataclass
class ScoreNoise:
    """What white pixel noise does to a score map: the basis of the automatic threshold.

    Attributes
    ----------
    sd : float
        Standard deviation of the score for white noise at the micrograph's noise level
        (units of the score map).
    density : float
        ``λ = var(∂S/∂x) / var(S)`` of that noise score, 1/binned px² (isotropic filters):
        how densely its local maxima are packed.
    fields : int
        Number of score maps whose maximum is taken (1 for the LoG; templates × rotations in
        template matching, counted as independent, which over-estimates their false maxima).
    """

    sd: float
    density: float
    fields: int = 1

    def expected_maxima(self, u, area: float):
        """Expected local maxima of the white-noise score above ``u`` (units of ``sd``) in ``area`` binned px².

        The expected Euler characteristic of the excursion set of a smooth Gaussian random
        field (Adler 1981; Worsley et al. 1996), which at high levels counts its local maxima:
        ``area · λ / (2π)^{3/2} · u · exp(-u²/2)`` per field (``u`` is clamped at 1, below
        which the count is no longer a count of maxima).
        """
        c = max(area, 1.0) * max(self.density, 0.0) * max(self.fields, 1) / (2.0 * math.pi) ** 1.5
        u = np.maximum(np.asarray(u, dtype=float), 1.0)
        return c * u * np.exp(-0.5 * u * u)


# --------------------------------------------------------------------------- shared core
class _Prepared:
    """Binned, padded micrograph and its FFT (shared by the score and the junk features)."""

    def __init__(self, image, pixel_size, particle_diameter, bin_factor=None):
        xp = backend.array_module(image)
        img = xp.asarray(image, dtype=xp.float32)
        if img.ndim != 2:
            raise InputError("micrograph", f"expected a 2D micrograph, got shape {tuple(img.shape)}", "sum the movie frames first")
        if not (pixel_size and pixel_size > 0):
            raise InputError("pixel_size", f"pixel size must be positive, got {pixel_size}", "give --pixel-size in Å/px")
        if not (particle_diameter and particle_diameter > 0):
            raise InputError("particle_diameter", "particle diameter must be positive", "give --particle-diameter in Å")
        self.xp = xp
        self.shape = img.shape
        self.image = img
        b = int(bin_factor) if bin_factor else picking_bin_factor(pixel_size, particle_diameter)
        ny, nx = (img.shape[0] // b) * b, (img.shape[1] // b) * b
        if ny < 16 * b or nx < 16 * b:
            raise InputError("micrograph", f"micrograph {img.shape} too small for binning {b}", "check the pixel size and particle diameter")
        self.b = b
        self.radius = 0.5 * particle_diameter / pixel_size / b  # binned px
        binned = fourier_crop(img[:ny, :nx], (ny // b, nx // b)) if b > 1 else img[:ny, :nx].copy()
        med, sig = _robust(binned[:: max(1, binned.shape[0] // 256), :: max(1, binned.shape[1] // 256)])
        binned = (binned - med) / sig
        self.binned = binned
        from scipy.fft import next_fast_len  # noqa: PLC0415

        self.pad = int(math.ceil(3 * max(2.0 * self.radius, 4.0)))
        fy = next_fast_len(binned.shape[0] + 2 * self.pad, real=True) - binned.shape[0] - self.pad
        fx = next_fast_len(binned.shape[1] + 2 * self.pad, real=True) - binned.shape[1] - self.pad
        self.padded = xp.pad(binned, ((self.pad, fy), (self.pad, fx)), mode="reflect")
        self.ft = fft_module(xp).rfft2(self.padded)
        self.kx, self.ky, self.k2 = _k2(self.padded.shape, xp)
        # white-noise level per binned pixel, from the power between 0.35 and 0.5 cycles/px
        # (where particle signal is negligible at this binning)
        k = xp.sqrt(self.k2)
        band = (k > 0.35) & (k < 0.5)
        npx = self.padded.size
        self.noise_sd = float(xp.sqrt(xp.mean(xp.abs(self.ft[band]) ** 2) / npx))

    def _power(self, transfer):
        """``|transfer|²`` on the rfft2 grid, each column weighted by how often it occurs in the full plane."""
        xp = self.xp
        w = xp.full(self.k2.shape[-1], 2.0, dtype=xp.float32)
        w[0] = 1.0
        if self.padded.shape[-1] % 2 == 0:
            w[-1] = 1.0
        return xp.abs(transfer) ** 2 * w[None, :]

    def noise_response_sd(self, transfer):
        """Standard deviation of white pixel noise after filtering with ``transfer`` (rfft2 layout)."""
        return self.noise_sd * math.sqrt(float(self._power(transfer).sum()) / self.padded.size)

    def noise_stats(self, transfer) -> ScoreNoise:
        """:class:`ScoreNoise` of the score ``filtered(transfer)`` for white pixel noise."""
        h2 = self._power(transfer)
        p0 = float(h2.sum())
        # variance of the derivative along x (= along y for an isotropic filter): (2π)² <k²> / 2
        p2 = float((h2 * self.k2).sum()) * (2.0 * np.pi) ** 2 / 2.0
        return ScoreNoise(self.noise_sd * math.sqrt(p0 / self.padded.size), p2 / p0 if p0 > 0 else 0.0)

    def filtered(self, transfer):
        """Apply an rfft2-layout transfer function to the padded image; return the unpadded result."""
        xp = self.xp
        out = fft_module(xp).irfft2(self.ft * transfer, s=self.padded.shape).astype(xp.float32)
        p = self.pad
        return out[p : p + self.binned.shape[0], p : p + self.binned.shape[1]]

    def gaussian(self, sigma):
        return self.xp.exp(-2.0 * np.pi**2 * sigma * sigma * self.k2)

    def display_image(self):
        return backend.to_host(self.filtered(self.gaussian(max(self.radius / 5.0, 0.7))))

    def valid_mask(self, edge_px: float):
        """Binned pixels whose input-px position is at least ``edge_px`` from every border."""
        xp = self.xp
        ny, nx = self.shape
        y = xp.arange(self.binned.shape[0], dtype=xp.float32) * self.b
        x = xp.arange(self.binned.shape[1], dtype=xp.float32) * self.b
        my = (y >= edge_px) & (y <= ny - 1 - edge_px)
        mx = (x >= edge_px) & (x <= nx - 1 - edge_px)
        return my[:, None] & mx[None, :]


def _local_maxima(score, valid, window: int, xp):
    ndi = _ndimage(xp)
    mx = ndi.maximum_filter(score, size=2 * window + 1, mode="nearest")
    peaks = (score >= mx) & valid & (score > 0)
    iy, ix = xp.nonzero(peaks)
    return backend.to_host(iy).astype(np.int64), backend.to_host(ix).astype(np.int64)


def _subpixel(score_host, iy, ix):
    """Parabolic sub-pixel refinement of peaks at integer positions (clamped to ±0.5 px)."""
    ny, nx = score_host.shape
    y0 = np.clip(iy, 1, ny - 2)
    x0 = np.clip(ix, 1, nx - 2)
    c = score_host[y0, x0]
    dx_den = score_host[y0, x0 - 1] - 2 * c + score_host[y0, x0 + 1]
    dy_den = score_host[y0 - 1, x0] - 2 * c + score_host[y0 + 1, x0]
    with np.errstate(divide="ignore", invalid="ignore"):
        dx = np.where(dx_den < 0, 0.5 * (score_host[y0, x0 - 1] - score_host[y0, x0 + 1]) / dx_den, 0.0)
        dy = np.where(dy_den < 0, 0.5 * (score_host[y0 - 1, x0] - score_host[y0 + 1, x0]) / dy_den, 0.0)
    return x0 + np.clip(dx, -0.5, 0.5), y0 + np.clip(dy, -0.5, 0.5)


def _junk_features(prep: _Prepared, iy, ix):
    """Local mean, sd, step height and clipped fraction at binned positions, plus micrograph references."""
    xp = prep.xp
    r = max(prep.radius, 1.0)
    disk = _disk_kernel_ft(prep.padded.shape, r, xp)
    lp = prep.gaussian(0.5)  # suppress pixel noise before the variance
    mean = prep.filtered(disk * lp)
    low = prep.filtered(lp)
    m2 = fft_module(xp).irfft2(fft_module(xp).rfft2(low * low) * _disk_kernel_ft(low.shape, r, xp), s=low.shape).astype(xp.float32)
    sd = xp.sqrt(xp.maximum(m2 - mean * mean, 0.0))
    # step in the local mean across the particle: Gaussian-derivative at the particle radius,
    # scaled so a straight step of height h reads h. A particle alone gives ~0 at its centre.
    g = prep.gaussian(r)
    gx = prep.filtered(2j * np.pi * prep.kx * g)
    gy = prep.filtered(2j * np.pi * prep.ky * g)
    step = xp.sqrt(gx * gx + gy * gy) * (r * math.sqrt(2 * math.pi))
    # clipped pixels (saturation or masking): the extreme values, when many pixels share them
    img = prep.image
    clip = xp.zeros(img.shape, dtype=bool)
    for v in (img.min(), img.max()):
        hit = img == v
        if int(hit.sum()) > max(50, 5e-4 * img.size):
            clip |= hit
    b = prep.b
    nyb, nxb = prep.binned.shape
    if bool(clip.any()):
        c = clip[: nyb * b, : nxb * b].astype(xp.float32)
        cb = c.reshape(nyb, b, nxb, b).mean(axis=(1, 3)) if b > 1 else c
        clipfrac = fft_module(xp).irfft2(fft_module(xp).rfft2(cb) * _disk_kernel_ft(cb.shape, r, xp), s=cb.shape)
    else:
        clipfrac = xp.zeros_like(mean)
    iy_d = xp.asarray(iy)
    ix_d = xp.asarray(ix)
    feats = pd.DataFrame(
        {
            "local_mean": backend.to_host(mean[iy_d, ix_d]).astype(float),
            "local_sd": backend.to_host(sd[iy_d, ix_d]).astype(float),
            "step": backend.to_host(step[iy_d, ix_d]).astype(float),
            "clipped": backend.to_host(clipfrac[iy_d, ix_d]).astype(float),
        }
    )
    sub = (slice(None, None, max(1, nyb // 256)), slice(None, None, max(1, nxb // 256)))
    refs = {
        "mean": _robust(mean[sub]),
        "sd": _robust(sd[sub]),
        "step": _robust(step[sub]),
        # noise of a disk mean: white noise (low-passed like the image) averaged over the disk
        "mean_noise": prep.noise_response_sd(disk * lp),
    }
    return feats, refs


def _classify_junk(feats: pd.DataFrame, refs: dict, ok: np.ndarray, jf: JunkFilter) -> np.ndarray:
    """Junk reason per candidate ('' = keep), judged against the candidates in ``ok``."""
    n = len(feats)
    reason = np.array([""] * n, dtype=object)
    if n == 0:
        return reason
    sd_all, _ = refs["sd"]
    step_med, step_sig = refs["step"]
    lm = feats["local_mean"].to_numpy()
    ls = feats["local_sd"].to_numpy()
    st = feats["step"].to_numpy()
    rules = [
        ("saturated", feats["clipped"].to_numpy() > jf.saturation_frac),
        ("flat", ls < jf.flat_frac * sd_all),
        ("carbon_edge", st > step_med + jf.step_k * step_sig),
    ]
    if ok.sum() >= jf.min_population:
        # outliers of the accepted population (needs enough particles to define it)
        pool = feats[ok]

        def rob(v):
            v = np.asarray(v, dtype=float)
            med = np.median(v)
            return med, 1.4826 * np.median(np.abs(v - med))

        m_med, m_sig = rob(pool["local_mean"])
        m_scale = max(m_sig, jf.noise_floor * refs["mean_noise"], 1e-6)
        s_med, s_sig = rob(pool["local_sd"])
        s_scale = max(s_sig, jf.sd_tol * s_med, 1e-6)
        sc_med, sc_sig = rob(pool["score"])
        sc_scale = max(sc_sig, jf.score_tol * sc_med, 1e-6)
        rules[2:2] = [
            ("dark", lm < m_med - jf.dark_k * m_scale),
            ("bright", lm > m_med + jf.bright_k * m_scale),
            ("variance", ls > s_med + jf.sd_k * s_scale),
        ]
        rules.append(("too_strong", feats["score"].to_numpy() > sc_med + jf.score_k * sc_scale))
    for name, hit in rules:
        reason[(reason == "") & hit] = name
    return reason


def _free_area(valid, xb, yb, radius: float) -> float:
    """Pixels of the boolean mask ``valid`` (host) farther than ``radius`` from every point ``(xb, yb)``."""
    free = valid.copy()
    r = int(math.ceil(radius))
    dy, dx = np.mgrid[-r : r + 1, -r : r + 1]
    disk = dx * dx + dy * dy < radius * radius
    ny, nx = free.shape
    for x, y in zip(np.rint(xb).astype(int), np.rint(yb).astype(int)):
        y0, y1, x0, x1 = max(y - r, 0), min(y + r + 1, ny), max(x - r, 0), min(x + r + 1, nx)
        if y1 > y0 and x1 > x0:
            free[y0:y1, x0:x1] &= ~disk[y0 - y + r : y1 - y + r, x0 - x + r : x1 - x + r]
    return float(free.sum())


def _finish(prep: _Prepared, score, noise: ScoreNoise, *, min_distance_px, edge_px, threshold, junk, max_picks, extra=None):
    """Peaks, NMS, threshold and junk rejection on a score map (binned grid); returns (picks, details)."""
    xp = prep.xp
    b = prep.b
    valid = prep.valid_mask(edge_px)
    if not bool(valid.any()):
        raise InputError("micrograph", f"no area left after excluding {edge_px:g} px at the edges", "use a smaller edge exclusion or box")
    vals = score[valid]
    med, sig = _robust(vals[:: max(1, int(vals.size) // 200000)])
    z = (score - med) / sig
    md_b = min_distance_px / b
    window = max(1, int(md_b / 4))
    iy, ix = _local_maxima(z, valid, window, xp)
    z_host = backend.to_host(z)
    sc = z_host[iy, ix].astype(float)
    xb, yb = _subpixel(z_host, iy, ix)
    keep = greedy_nms(np.stack([xb, yb], axis=1), sc, md_b)
    iy, ix, xb, yb, sc = iy[keep], ix[keep], xb[keep], yb[keep], sc[keep]
    cand = pd.DataFrame({"x": xb * b, "y": yb * b, "score": sc})
    if extra is not None:
        for name, arr in extra.items():
            cand[name] = backend.to_host(arr[xp.asarray(iy), xp.asarray(ix)])
    noise_z = noise.sd / sig

    def u_of(z_levels):  # score levels in z units -> units of the white-noise sd
        return (np.asarray(z_levels, dtype=float) * sig + med) / noise.sd

    # noise maxima survive non-maximum suppression only away from stronger candidates: the
    # area left to them excludes the suppression disks of the candidates that noise cannot
    # explain (fewer than one noise maximum expected above them in the whole usable area)
    valid_host = backend.to_host(valid)
    sure = noise.expected_maxima(u_of(sc), float(valid_host.sum())) <= 1.0
    area = _free_area(valid_host, xb[sure], yb[sure], md_b)

    def expected_false(z_levels):  # white-noise maxima expected above score levels given in z units
        return noise.expected_maxima(u_of(z_levels), area)

    auto = isinstance(threshold, str)
    if auto and threshold != "auto":
        raise InputError("--threshold", f"unknown threshold {threshold!r}", "use 'auto' or a number (robust sigmas of the score map)")
    thr = auto_threshold(sc, expected_false) if auto else float(threshold)
    reason = np.array([""] * len(cand), dtype=object)
    if junk is not None and len(cand):
        feats, refs = _junk_features(prep, iy, ix)
        cand = pd.concat([cand, feats], axis=1)
        # junk first, judged against everything above the first threshold; then the automatic
        # threshold on what is left (junk is signal too, and would count as discoveries); then
        # junk again against the final population
        reason = _classify_junk(cand, refs, sc >= thr, junk)
        for _ in range(JUNK_ITERATIONS):
            if auto:
                thr = auto_threshold(sc[reason == ""], expected_false)
            new = _classify_junk(cand, refs, (sc >= thr) & (reason == ""), junk)
            if (new == reason).all():
                break
            reason = new
    above = sc >= thr
    status = np.where(above, "picked", "below_threshold").astype(object)
    bad = above & (reason != "")
    status[bad] = reason[bad]
    cand["status"] = status
    picks = cand[cand["status"] == "picked"].drop(columns="status").reset_index(drop=True)
    if max_picks is not None and len(picks) > max_picks:
        picks = picks.nlargest(int(max_picks), "score").reset_index(drop=True)
    details = PickDetails(prep.display_image(), b, prep.radius, thr, noise_z, cand, float(expected_false(thr)))
    return picks, details


FALSE_DISCOVERY_RATE = 0.1
"""Expected fraction of noise among the automatic threshold's picks (see :func:`auto_threshold`)."""
MIN_FLOOR = 1.0
"""The automatic threshold is never below one robust sigma of the score map."""
JUNK_ITERATIONS = 6
"""Rounds of (junk rejection, threshold) until the accepted population stops changing."""


def auto_threshold(scores, expected_false, rate: float = FALSE_DISCOVERY_RATE, floor: float = MIN_FLOOR) -> float:
    """Automatic score threshold: the lowest one whose picks hold at most ``rate`` noise (expected).

    ``expected_false(levels)`` gives the number of local maxima that noise alone is expected
    to put above each score level (for white noise, :meth:`ScoreNoise.expected_maxima`
    over the usable area). With the candidates sorted by decreasing score ``s_1 >= s_2 ...``,
    the threshold is the lowest ``s_i`` with ``expected_false(s_i) <= rate · i``: the
    step-up rule of Benjamini & Hochberg (1995) with the random-field count in place of
    p-values. It needs no model of the particles' scores and adapts to the micrograph's
    area, the filter's scale and the number of particles: a crowded micrograph affords a
    lower threshold than a sparse one. When no candidate qualifies (an empty micrograph
    does so with a chance of about ``rate``), the threshold is the level where noise gives
    ``rate`` maxima, above every candidate. Never below ``floor``.
    """
    s = np.sort(np.asarray(scores, dtype=float))[::-1]
    s = s[np.isfinite(s)]
    if len(s):
        ok = np.asarray(expected_false(s)) <= rate * np.arange(1, len(s) + 1)
        if ok.any():
            return max(float(s[np.flatnonzero(ok).max()]), float(floor))
    # no discovery: the level where noise is expected to give `rate` maxima (bisection, z units)
    lo, hi = float(floor), max(float(floor), float(s[0]) if len(s) else float(floor)) + 1.0
    while float(expected_false(hi)) > rate:
        hi *= 2.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if float(expected_false(mid)) > rate else (lo, mid)
    return hi


MIN_DISTANCE_FACTOR = 0.8
"""Default minimum distance between picks / particle diameter (touching particles are
about one diameter apart, and their peaks can sit a little closer)."""


def _defaults(pixel_size, particle_diameter, min_distance, edge):
    md_px = (MIN_DISTANCE_FACTOR * particle_diameter if min_distance is None else min_distance) / pixel_size
    if edge is None:
        edge = default_box_size(particle_diameter, pixel_size) / 2
    return md_px, float(edge)


# --------------------------------------------------------------------------- pickers
def log_score_map(image, pixel_size: float, particle_diameter: float, *, dark_particles: bool = True, bin_factor: int | None = None):
    """Scale-normalised LoG response at the particle radius on the binned micrograph.

    Returns ``(score, bin_factor)``; ``score`` is on the binned grid, positive at the centre of
    blobs of the particle's size and polarity. The LoG scale is ``sigma = 0.602 r``
    (:data:`LOG_SIGMA_FACTOR`).
    """
    prep = _Prepared(image, pixel_size, particle_diameter, bin_factor)
    return _log_on(prep, dark_particles)[0], prep.b


LOG_SIGMA_FACTOR = 0.602
"""LoG scale / particle radius: the scale at which the scale-normalised LoG
``σ² ∇²G_σ`` responds most, at its centre, to the projection of a uniform sphere of radius
r (``∝ sqrt(r² - ρ²)``; maximising the response over σ gives σ = 0.602 r, between the
r/√5 of a Gaussian with the sphere's second moment and the r/√2 of a flat disk). The
filter's central lobe (radius σ√2 = 0.85 r) then spans the whole particle, so a particle
whose image is not brightest at its centre -- a ring-like complex, or a hollow made by the
CTF's fringes at 1-2.5 µm underfocus -- is found at its centre rather than at its darkest
domain."""


def _log_on(prep: _Prepared, dark_particles: bool, sigma_factor: float = LOG_SIGMA_FACTOR):
    """``(score, ScoreNoise)`` of the scale-normalised LoG at ``sigma_factor`` × the particle radius."""
    sigma = prep.radius * sigma_factor
    # sigma² ∇²(G_sigma * I): transfer -sigma² (2πk)² exp(-2π² sigma² k²); dark blobs give positive values
    transfer = -(sigma**2) * (2 * np.pi) ** 2 * prep.k2 * prep.gaussian(sigma)
    score = prep.filtered(transfer)
    return (score if dark_particles else -score), prep.noise_stats(transfer)


def pick_log(
    image,
    pixel_size: float,
    particle_diameter: float,
    *,
    min_distance: float | None = None,
    threshold="auto",
    edge: float | None = None,
    dark_particles: bool = True,
    junk: JunkFilter | None | bool = True,
    bin_factor: int | None = None,
    max_picks: int | None = None,
    return_details: bool = False,
):
    """Template-free picking with a Laplacian-of-Gaussian at the particle radius.

    Parameters
    ----------
    image : array ``[ny, nx]`` (numpy or cupy)
        Micrograph (motion-corrected sum), protein dark unless ``dark_particles=False``.
    pixel_size : float
        Å/px of ``image``.
    particle_diameter : float
        Å.
    min_distance : float, optional
        Minimum distance between picks in Å (default: 0.8 × ``particle_diameter``).
    threshold : "auto" or float
        Score threshold in robust sigmas of the score map (see :func:`auto_threshold`).
    edge : float, optional
        Exclusion zone at the borders in px of ``image`` (default: half of
        :func:`conveyor.spa.extract.default_box_size`).
    dark_particles : bool
        Protein darker than the background (True for micrographs as recorded).
    junk : JunkFilter, True or None
        Junk rejection settings (True: defaults; None/False: off).
    bin_factor : int, optional
        Override the automatic binning (radius ≈ 10 binned px).
    max_picks : int, optional
        Keep at most this many best-scoring picks.
    return_details : bool
        Also return a :class:`PickDetails`.

    Returns
    -------
    pandas.DataFrame with columns ``x, y`` (px of ``image``), ``score`` (robust sigmas), one row
    per pick, best first; and the details when asked.
    """
    prep = _Prepared(image, pixel_size, particle_diameter, bin_factor)
    score, noise = _log_on(prep, dark_particles)
    md_px, edge_px = _defaults(pixel_size, particle_diameter, min_distance, edge)
    jf = JunkFilter() if junk is True else (junk or None)
    picks, details = _finish(prep, score, noise, min_distance_px=md_px, edge_px=edge_px, threshold=threshold, junk=jf,
                             max_picks=max_picks)
    return (picks, details) if return_details else picks


def _prepare_templates(templates, template_pixel_size, target_pixel_size, xp):
    """Resample templates ``[n, t, t]`` to ``target_pixel_size`` (Fourier crop or zero-pad), even size."""
    t = xp.asarray(templates, dtype=xp.float32)
    if t.ndim == 2:
        t = t[None]
    n0 = t.shape[-1]
    if t.shape[-2] != n0:
        raise InputError("template", f"templates must be square, got {t.shape[-2]}x{n0}", "use square class averages")
    n1 = max(8, 2 * int(round(n0 * template_pixel_size / target_pixel_size / 2)))
    if n1 < n0:
        t = fourier_crop(t, n1)
    elif n1 > n0:
        f = xp.fft.fftshift(fft_module(xp).fft2(t), axes=(-2, -1))
        p = (n1 - n0) // 2
        f = xp.pad(f, ((0, 0), (p, n1 - n0 - p), (p, n1 - n0 - p)))
        t = xp.real(fft_module(xp).ifft2(xp.fft.ifftshift(f, axes=(-2, -1)))).astype(xp.float32) * (n1 * n1) / (n0 * n0)
    return t


def template_score_map(prep: _Prepared, templates, template_pixel_size: float, pixel_size: float, *,
                       angle_step: float = 10.0, templates_protein_white: bool = True, dark_particles: bool = True,
                       batch: int = 8):
    """Normalised cross-correlation of the binned micrograph with in-plane rotations of the templates.

    The correlation is computed for every template and every rotation by ``angle_step``
    degrees within a circular mask of the particle radius (+10 %), normalised by the local
    standard deviation of the micrograph under the mask (so values are Pearson correlations
    in [-1, 1]). Returns ``(ncc_max, best_psi_deg, best_template_index, noise)``: maps on
    the binned grid and the :class:`ScoreNoise` of ``ncc_max`` (white noise; the maximum over
    all templates and rotations counts as that many fields).
    """
    xp = prep.xp
    ndi = _ndimage(xp)
    t = _prepare_templates(templates, template_pixel_size, pixel_size * prep.b, xp)
    sign = -1.0 if (templates_protein_white == dark_particles) else 1.0
    t = sign * t
    n = t.shape[-1]
    rad = min(1.1 * prep.radius, n / 2 - 1)
    yy, xx = xp.meshgrid(xp.arange(n, dtype=xp.float32) - n // 2, xp.arange(n, dtype=xp.float32) - n // 2, indexing="ij")
    mask = ((xx * xx + yy * yy) <= rad * rad).astype(xp.float32)
    npx = float(mask.sum())
    shape = prep.padded.shape

    def embed(a):  # [k, n, n] centred at n//2 -> [k, *shape] centred at [0, 0]
        out = xp.zeros((a.shape[0],) + shape, dtype=xp.float32)
        out[:, :n, :n] = a
        return xp.roll(out, (-(n // 2), -(n // 2)), axis=(-2, -1))

    mft = fft_module(xp).rfft2(embed(mask[None]))[0]
    img = prep.padded
    s1 = fft_module(xp).irfft2(prep.ft * xp.conj(mft), s=shape)
    s2 = fft_module(xp).irfft2(fft_module(xp).rfft2(img * img) * xp.conj(mft), s=shape)
    local_var = xp.maximum(s2 - s1 * s1 / npx, 1e-6 * float(xp.mean(xp.abs(s2))) + 1e-12)
    denom = xp.sqrt(local_var)
    angles = np.arange(0.0, 360.0, float(angle_step))
    rotated, psi, tidx = [], [], []
    for k in range(t.shape[0]):
        for a in angles:
            r = ndi.rotate(t[k], float(a), reshape=False, order=1, mode="constant") * mask
            r = r - (r.sum() / npx) * mask
            nrm = float(xp.sqrt((r * r).sum()))
            if nrm <= 0:
                continue
            rotated.append(r / nrm)
            psi.append(a)
            tidx.append(k)
    if not rotated:
        raise InputError("template", "templates are blank inside the particle mask", "check the template file and the particle diameter")
    best = xp.full(shape, -2.0, dtype=xp.float32)
    best_i = xp.zeros(shape, dtype=xp.int32)
    for s in range(0, len(rotated), batch):
        block = xp.stack(rotated[s : s + batch])
        cc = fft_module(xp).irfft2(prep.ft[None] * xp.conj(fft_module(xp).rfft2(embed(block))), s=shape) / denom[None]
        i = xp.argmax(cc, axis=0)
        m = xp.max(cc, axis=0)
        upd = m > best
        best = xp.where(upd, m, best).astype(xp.float32)
        best_i = xp.where(upd, i + s, best_i)
    p = prep.pad
    crop = (slice(p, p + prep.binned.shape[0]), slice(p, p + prep.binned.shape[1]))
    psi_a = xp.asarray(np.asarray(psi, dtype=np.float32))[best_i[crop]]
    t_a = xp.asarray(np.asarray(tidx, dtype=np.int32))[best_i[crop]]
    # white noise gives one unit-norm template a correlation of sd noise / local sd; the
    # density of its maxima follows from the template's spectrum (the same for every
    # rotation), and the maximum over the K rotated templates counts as K fields
    noise_one = float(xp.median((prep.noise_sd / denom[crop])[:: 4, :: 4]))
    density = prep.noise_stats(fft_module(xp).rfft2(embed(rotated[0][None]))[0]).density
    return best[crop], psi_a, t_a, ScoreNoise(noise_one, density, len(rotated))


def pick_template(
    image,
    pixel_size: float,
    particle_diameter: float,
    templates,
    template_pixel_size: float | None = None,
    *,
    angle_step: float = 10.0,
    templates_protein_white: bool = True,
    min_distance: float | None = None,
    threshold="auto",
    edge: float | None = None,
    dark_particles: bool = True,
    junk: JunkFilter | None | bool = True,
    bin_factor: int | None = None,
    max_picks: int | None = None,
    return_details: bool = False,
):
    """Template matching: normalised cross-correlation over in-plane rotations of the templates.

    Parameters
    ----------
    templates : array ``[n, t, t]`` or ``[t, t]``
        Reference images (e.g. 2D class averages), centred at ``t // 2``.
    template_pixel_size : float, optional
        Å/px of the templates (default: ``pixel_size``); they are resampled to the binned
        micrograph's pixel size.
    angle_step : float
        In-plane rotation step in degrees.
    templates_protein_white : bool
        Templates follow RELION's convention (protein white, as class averages); they are
        inverted to match a micrograph with dark protein.

    Other parameters and the return value are as for :func:`pick_log`; the DataFrame also
    has ``psi`` (degrees, best in-plane rotation) and ``template`` (0-based index).
    The score is the correlation in robust sigmas of the correlation map.
    """
    prep = _Prepared(image, pixel_size, particle_diameter, bin_factor)
    ncc, psi, tidx, noise = template_score_map(
        prep, templates, template_pixel_size or pixel_size, pixel_size,
        angle_step=angle_step, templates_protein_white=templates_protein_white, dark_particles=dark_particles,
    )
    md_px, edge_px = _defaults(pixel_size, particle_diameter, min_distance, edge)
    jf = JunkFilter() if junk is True else (junk or None)
    picks, details = _finish(
        prep, ncc, noise, min_distance_px=md_px, edge_px=edge_px, threshold=threshold, junk=jf, max_picks=max_picks,
        extra={"psi": psi, "template": tidx},
    )
    return (picks, details) if return_details else picks


# --------------------------------------------------------------------------- outputs
def picks_to_star(picks: pd.DataFrame, micrograph_name: str) -> dict[str, pd.DataFrame]:
    """STAR blocks ``{"particles": ...}`` for picks (RELION coordinate file with rlnMicrographName)."""
    df = pd.DataFrame(
        {
            "rlnCoordinateX": np.asarray(picks["x"], dtype=float),
            "rlnCoordinateY": np.asarray(picks["y"], dtype=float),
            "rlnAutopickFigureOfMerit": np.asarray(picks["score"], dtype=float),
        }
    )
    if "psi" in picks:
        df["rlnAnglePsi"] = np.asarray(picks["psi"], dtype=float)
    if "template" in picks:
        df["rlnClassNumber"] = np.asarray(picks["template"], dtype=int) + 1
    df["rlnMicrographName"] = pd.Series([str(micrograph_name)] * len(df), dtype=object)
    return {"particles": df}


def write_overlay_png(path, details: PickDetails, picks: pd.DataFrame, *, title: str | None = None, show_rejected: bool = True) -> None:
    """Write a PNG of the binned micrograph with a circle (particle radius) at every pick.

    Rejected junk candidates are marked with red crosses when ``show_rejected``.
    """
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    from matplotlib.collections import PatchCollection  # noqa: PLC0415
    from matplotlib.patches import Circle  # noqa: PLC0415

    from ..io.atomic import atomic_path  # noqa: PLC0415

    img = details.binned
    med, sig = _robust(img)
    lo, hi = med - 4 * sig, med + 3 * sig
    ny, nx = img.shape
    scale = 8.0 / max(ny, nx)
    fig, ax = plt.subplots(figsize=(max(nx * scale, 2), max(ny * scale, 2)), dpi=max(100, int(max(ny, nx) / 8)))
    ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
    b = details.bin_factor
    circles = [Circle((x / b, y / b), details.radius_binned) for x, y in zip(picks["x"], picks["y"])]
    ax.add_collection(PatchCollection(circles, facecolor="none", edgecolor="lime", linewidth=0.8))
    cand = details.candidates
    if show_rejected and len(cand) and "status" in cand:
        junk = cand[~cand["status"].isin(["picked", "below_threshold"])]
        if len(junk):
            ax.plot(junk["x"] / b, junk["y"] / b, "x", color="red", markersize=4, markeredgewidth=0.8)
    ax.set_axis_off()
    ax.set_title(title or f"{len(picks)} picks (bin {b}, threshold {details.threshold:.2f})", fontsize=8)
    fig.tight_layout(pad=0.2)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
