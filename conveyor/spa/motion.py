"""Beam-induced motion correction of cryo-EM movies: whole-frame and patch alignment, dose weighting.

The steps (see ``docs/algorithms/motion.md`` for the full description):

0. **One FFT per frame for the alignments** (:func:`_prepare`). Every frame is
   Fourier-transformed (float32 in, complex64 out); the Fourier crops of the spectra to the
   alignment band, transformed back, are the *binned frames* that both alignments use,
   so the alignment work does not grow with the detector size. The band keeps the
   frequencies where the cross-power B-factor weight ``exp(-B k²/2)`` is at least e^-2
   (:data:`ALIGN_BAND`, :data:`PATCH_BAND`; ``binning`` crops further).
1. **Whole-frame alignment** (:func:`align_frames`). Each frame is cross-correlated with the
   sum of all the *other* frames (so its own shot noise never correlates with itself), in
   Fourier space, with the B-factor low-pass, after mean subtraction and a soft edge taper.
   Coarse iterations, on a grid cropped further to the e^-1 band, on running sums of a few
   frames (robust at low dose), find the integer peak of the cross-correlation map, within
   ``max_shift`` first (single-frame outliers are replaced by their neighbours' median),
   then near the current shifts (the CC evaluated only at the lags within the search
   radius), each refined by a parabola; one more search per frame follows. Then, frame by
   frame, Newton steps on the band-limited (continuous) cross-correlation, whose gradient
   and Hessian at the current shift are weighted sums over the spectrum. Frames are
   re-shifted (Fourier phase ramps) and the references rebuilt after every iteration until
   no shift changes by more than ``tol`` (0.01 px). Optionally (``smooth``) the trajectory
   is smoothed by a Whittaker smoother whose strength can be chosen by generalised
   cross-validation.
2. **Patch alignment** (:func:`local_alignment`). The binned frames are cut into patches
   (5 x 5 by default); every patch stack, pre-shifted by the whole-frame trajectory, is
   aligned by the coarse iterations alone (running sums of a few frames; optionally groups
   of ``group`` frames): Newton refinement of single low-signal patch frames degrades the
   measurements. The residual
   shifts are fitted by MotionCor2's/RELION's smooth deformation model: a polynomial in the
   patch position (1, x, x², y, y², xy) times a polynomial in time (z, z², z³; z = frame
   index, so the model is zero at frame 1), 18 coefficients per axis, with a free offset per
   patch and iterative rejection of outlying measurements and patches. Which spatial terms
   are kept (constant, affine or all), and whether the model is applied at all, is decided
   by cross-validation between the two colours of a checkerboard of patches: the model must
   predict the held-out patches better than no local model.
3. **Summation** (:func:`apply_shifts_and_sum`). Without a local model every frame's
   spectrum is shifted exactly by a Fourier phase ramp and the sums are formed in Fourier
   space (the dose-weighted one by Horner's rule, without forming any filter). With a
   local model the micrograph is covered by square tiles (their size chosen from the model
   so that the shift changes by at most 0.4 px from one tile centre to the next); inside a
   tile the frames are shifted exactly (integer offset + Fourier phase ramp) by the model's
   shift at the tile centre, and neighbouring tiles are blended by linear ramps that form
   a partition of unity. No real-space interpolation kernel is used, so the sums are not
   blurred.
4. **Dose weighting** (:func:`dose_weights`), after Grant & Grigorieff (2015): critical
   exposure ``Ne(k) = 0.245 k^-1.665 + 2.81`` e/Å² (k in 1/Å) at 300 kV, scaled by
   β²(V)/β²(300 kV) for other voltages (0.80 at 200 kV, as RELION and cisTEM use); frame f
   (1-based) is filtered by ``q_f(k) = exp(-N_f / (2 Ne(k)))`` with ``N_f = pre_exposure +
   f * dose_per_frame`` (exposure at the end of the frame), and the filters are normalised
   as ``w_f = q_f sqrt(n / sum_f q_f²)`` — SNR-optimal relative weights (G&G Eq. 9) scaled
   so that ``w_f(0) = 1``: the weighted sum keeps the units and the noise power of the
   plain sum.

Conventions
-----------
* Arrays are ``[n, y, x]`` (frames), images ``[y, x]``; pixel size in Å/px, dose in e/Å²,
  B-factors in Å², voltage in kV.
* **Shifts** ``(dx, dy)`` in px are where the content of a frame lies relative to the
  reference, which is frame 1 (its shift is (0, 0)): ``frame_f(x) = reference(x - shift_f)``.
  The aligned frame is the frame shifted by ``-shift``. This is the convention of
  :mod:`conveyor.simulate.spa`'s ``truth/shifts.star``. (RELION's motion STAR files store
  the opposite sign: the shift it applies to the frame.)
* B-factor low-pass: the usual definition of a B-factor in Å² — each image's Fourier
  amplitudes are weighted by ``exp(-B k²/4)`` (k in 1/Å), so the cross-power spectrum by
  ``exp(-B k²/2)``. (RELION's ``--bfactor`` is in px²: its own implementation weights the
  cross-power spectrum by ``exp(-2 B d²)`` with ``d = ky`` along y (cycles/px) but
  ``x / (nx/2 + 1) ≈ 2 kx`` along x, i.e. ``B_Å = 4 B_px p²`` along y and ``16 B_px p²``
  along x for a pixel of ``p`` Å: its default 150 px² at 1 Å/px is 600 Å² (y) and 2400 Å²
  (x) here. See docs/algorithms/motion.md.)
* All image kernels take the array module from :mod:`conveyor.backend`, so they run on numpy
  or cupy arrays unchanged; shifts, models and small fits are numpy (host) arrays.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np

from .. import backend
from ..errors import InputError

log = logging.getLogger(__name__)

#: Grant & Grigorieff (2015) critical exposure at 300 kV: Ne(k) = A k^B + C (k in 1/Å, Ne in e/Å²).
GG_A, GG_B, GG_C = 0.245, -1.665, 2.81
_ELECTRON_REST_KEV = 510.99895
_TWO_PI = 2.0 * math.pi

# ----------------------------------------------------------------------------------------
# Dose weighting
# ----------------------------------------------------------------------------------------


def _beta2(voltage_kv: float) -> float:
    gamma = 1.0 + voltage_kv / _ELECTRON_REST_KEV
    return 1.0 - 1.0 / (gamma * gamma)


def voltage_factor(voltage: float) -> float:
    """Scale of the critical exposure at ``voltage`` (kV) relative to 300 kV.

    ``β²(V) / β²(300 kV)``: 1.0 at 300 kV and 0.80 at 200 kV (the factor RELION and cisTEM
    apply); other voltages (100, 120 kV: 0.50, 0.57) are an extrapolation by the same law
    (damage per electron ∝ 1/β²), not a measurement.
    """
    if not (voltage and voltage > 0):
        raise InputError("voltage", f"voltage must be positive (kV), got {voltage!r}", "pass the voltage in kV")
    return _beta2(float(voltage)) / _beta2(300.0)


def critical_exposure(k, voltage: float = 300.0):
    """Critical exposure ``Ne(k)`` in e/Å² for spatial frequency ``k`` in 1/Å (array or scalar).

    ``Ne = (0.245 k^-1.665 + 2.81) * voltage_factor(voltage)``; infinite at ``k = 0``.
    Computed in float32 for a float32 ``k``, else in float64.
    """
    xp = backend.array_module(k)
    k = xp.asarray(k)
    k = k if k.dtype == xp.float32 else k.astype(xp.float64)
    with np.errstate(divide="ignore"):
        kk = xp.where(k > 0, k, 1.0)
        ne = (GG_A * kk**GG_B + GG_C) * voltage_factor(voltage)
    return xp.where(k > 0, ne, xp.inf)


def _frequency_radius(shape, pixel_size, xp, rfft=True):
    """|k| in 1/Å on the (r)FFT grid of an image of ``shape`` (ny, nx)."""
    ny, nx = shape
    ky = xp.fft.fftfreq(ny, d=pixel_size)
    kx = xp.fft.rfftfreq(nx, d=pixel_size) if rfft else xp.fft.fftfreq(nx, d=pixel_size)
    return xp.sqrt(ky[:, None] ** 2 + kx[None, :] ** 2).astype(xp.float32)


class _DoseFilter:
    """Per-frame dose filters on one rFFT grid (float32), computed frame by frame (little memory).

    ``q_f = exp(-N_f / (2 Ne))`` with ``N_f = pre + (f + 1) dose`` is ``pre_factor * step^(f+1)``
    (``step = exp(-dose / (2 Ne))``, ``pre_factor = exp(-pre / (2 Ne))``), so the normalisation
    ``sum_f q_f²`` is a geometric series (closed form), and a weighted sum over frames can be
    accumulated by Horner's rule (:attr:`step`, :attr:`post`) without forming any filter.
    """

    def __init__(self, shape, pixel_size, dose_per_frame, n_frames, voltage=300.0, pre_exposure=0.0,
                 normalize=True, xp=None):
        xp = xp or backend.xp()
        if dose_per_frame is None or not (dose_per_frame >= 0):
            raise InputError("dose_per_frame", f"dose per frame must be >= 0 e/Å², got {dose_per_frame!r}",
                             "pass the dose per frame in e/Å²")
        if pre_exposure is None or pre_exposure < 0:
            raise InputError("pre_exposure", f"pre-exposure must be >= 0 e/Å², got {pre_exposure!r}",
                             "pass the pre-exposure in e/Å² (0 if none)")
        k = _frequency_radius(shape, pixel_size, xp)
        ne = critical_exposure(k, voltage)
        self.xp = xp
        self.n = int(n_frames)
        self.dose = float(dose_per_frame)
        self.pre = float(pre_exposure)
        self.half_inv_ne = (0.5 / ne).astype(xp.float32)  # 0 at k = 0
        if normalize:
            # sum_f q_f² = exp(-pre/Ne) sum_{j=1..n} exp(-j x), x = dose/Ne: a geometric series
            x = xp.float32(2.0 * self.dose) * self.half_inv_ne
            xs = xp.where(x > 0, x, xp.float32(1.0))
            series = xp.where(x > 0, -xp.expm1(-self.n * xs) / xp.expm1(xs), xp.float32(self.n))
            sumsq = xp.exp(xp.float32(-2.0 * self.pre) * self.half_inv_ne) * series
            self.norm = xp.sqrt(self.n / sumsq)
        else:
            self.norm = None

    def exposure(self, f: int) -> float:
        """Accumulated exposure (e/Å²) at the end of frame ``f`` (0-based)."""
        return self.pre + (f + 1) * self.dose

    def __call__(self, f: int):
        w = self.xp.exp(self.xp.float32(-self.exposure(f)) * self.half_inv_ne)
        if self.norm is not None:
            w *= self.norm
        return w.astype(self.xp.float32, copy=False)

    @property
    def step(self):
        """``exp(-dose / (2 Ne))`` (float32): the ratio of consecutive frames' filters."""
        return self.xp.exp(self.xp.float32(-self.dose) * self.half_inv_ne)

    @property
    def post(self):
        """``exp(-pre / (2 Ne))`` times the normalisation (float32): ``w_f = post * step^(f+1)``."""
        p = self.xp.exp(self.xp.float32(-self.pre) * self.half_inv_ne)
        if self.norm is not None:
            p *= self.norm
        return p


def dose_weights(shape, pixel_size: float, dose_per_frame: float, voltage: float = 300.0,
                 pre_exposure: float = 0.0, *, normalize: bool = True, xp=None):
    """Dose-weighting filters of Grant & Grigorieff (2015) for every frame.

    Parameters
    ----------
    shape : (n, ny, nx)
        Movie shape: frames, rows, columns.
    pixel_size : float
        Å/px.
    dose_per_frame : float
        Exposure per frame (e/Å²).
    voltage : float
        Acceleration voltage (kV); sets :func:`voltage_factor`.
    pre_exposure : float
        Exposure received before frame 1 (e/Å²).
    normalize : bool
        True (default): ``w_f = q_f sqrt(n / sum_f q_f²)``, SNR-optimal relative weights with
        ``w_f(k=0) = 1`` and the plain sum's noise power. False: the raw filters
        ``q_f = exp(-N_f / (2 Ne(k)))`` (monotonically decreasing in k and in f).
    xp : module, optional
        numpy or cupy (default: the selected device).

    Returns
    -------
    array, float32 ``[n, ny, nx // 2 + 1]``
        On the unshifted rFFT grid (``rfft2`` layout).
    """
    n, ny, nx = (int(v) for v in shape)
    filt = _DoseFilter((ny, nx), pixel_size, dose_per_frame, n, voltage, pre_exposure, normalize, xp)
    return filt.xp.stack([filt(f) for f in range(n)])


# ----------------------------------------------------------------------------------------
# Fourier-space helpers
# ----------------------------------------------------------------------------------------


def _fft(xp):
    """FFT module for arrays of ``xp``: scipy.fft for numpy (faster for float32), else xp.fft."""
    if xp is np:
        import scipy.fft  # noqa: PLC0415

        return scipy.fft
    return xp.fft


def _good_size(n: int) -> int:
    """Smallest even size >= n whose prime factors are 2, 3, 5 (fast FFTs)."""
    m = max(2, int(n) + (int(n) % 2))
    while True:
        r = m
        for p in (2, 3, 5):
            while r % p == 0:
                r //= p
        if r == 1:
            return m
        m += 2


#: The whole-frame alignment keeps the spatial frequencies where the cross-power weight
#: ``exp(-B k²/2)`` is at least ``exp(-ALIGN_BAND)``: ``|k| <= sqrt(2 ALIGN_BAND / B)`` (1/Å);
#: its coarse search ``exp(-COARSE_BAND)``; the patch alignment ``exp(-PATCH_BAND)`` (see
#: docs/algorithms/motion.md for the measured accuracy and cost of these choices).
ALIGN_BAND = 2.0
COARSE_BAND = 1.0
PATCH_BAND = 2.0
#: Search radius (coarse CC-map pixels) of the per-frame search that ends the coarse stage.
UNIT_SEARCH = 2.0


def _band_size(n: int, pixel_size: float, bfactor: float, binning: float = 1.0, band: float | None = None) -> int:
    """Even size (samples) of the Fourier-cropped alignment grid along an axis of ``n`` px.

    Keeps ``|k| <= sqrt(2 band / B)`` 1/Å (``band`` default :data:`ALIGN_BAND`; all of it for
    ``B = 0``), at most ``n / binning``; rounded up to a fast FFT size, at least 16 and at
    most ``n``.
    """
    band = ALIGN_BAND if band is None else band
    limit = n / max(float(binning), 1.0)
    if bfactor > 0:
        kc = math.sqrt(2.0 * band / bfactor)  # 1/Å
        limit = min(limit, 2.0 * kc * pixel_size * n)
    m = _good_size(max(int(math.ceil(limit)), 16))
    return int(min(m, n - n % 2))


def _taper(ny: int, nx: int, width: float, xp):
    """Separable window, 1 inside, raised-cosine edges of ``width`` (fraction of the size or px)."""

    def ramp(n):
        e = int(round(width * n)) if width < 1 else int(width)
        e = max(1, min(e, n // 2))
        w = np.ones(n)
        i = np.arange(e)
        r = 0.5 * (1 - np.cos(np.pi * (i + 0.5) / e))
        w[:e] = r
        w[n - e:] = r[::-1]
        return w

    return xp.asarray(np.outer(ramp(ny), ramp(nx)), dtype=xp.float32)


def _signed(m: int):
    """Signed frequency (or lag) index of the ``m`` rows of an FFT grid: 0, 1, ..., -1."""
    i = np.arange(m)
    return np.where(i <= m // 2, i, i - m)


@dataclass
class _Grid:
    """The rFFT grid of an alignment: ``(my, mx)`` samples spanning ``(ly, lx)`` px of the frame.

    Frequencies are in cycles per px of the frame and shifts in px of the frame, whatever
    the sampling; one sample of the grid (a pixel of its CC map) is ``scale`` px.
    """

    my: int
    mx: int
    ly: float
    lx: float
    ky: object  # cycles per px, [my] (device float32)
    kx: object  # [mx // 2 + 1]
    filt: object  # per-image B-factor filter exp(-B k²/4), 0 on the Nyquist row/column, [my, mkx]
    max_shift: float  # px, largest shift searched in the CC map
    moments: tuple  # (hw·[1, kx] [mkx, 2], hw·[kx, kx²] [mkx, 2], [ky, ky²] [my, 2]), complex64

    @property
    def scale(self):
        """px of the frame per sample (CC-map pixel), (y, x)."""
        return (self.ly / self.my, self.lx / self.mx)


def _make_grid(my, mx, ly, lx, pixel_size, bfactor, max_shift, xp) -> _Grid:
    mkx = mx // 2 + 1
    ky = np.where(np.arange(my) < my // 2, np.arange(my), np.arange(my) - my) / float(ly)
    kx = np.arange(mkx) / float(lx)
    k2 = (ky[:, None] ** 2 + kx[None, :] ** 2) / pixel_size**2
    filt = np.exp(-0.25 * bfactor * k2)
    filt[my // 2, :] = 0.0  # Nyquist row/column: no Hermitian partner on the grid
    filt[:, mkx - 1] = 0.0
    hw = np.full(mkx, 2.0)  # Hermitian multiplicity of the rFFT columns
    hw[0] = 1.0
    hw[mkx - 1] = 0.0
    f32, c64 = xp.float32, xp.complex64
    moments = (xp.asarray(np.stack([hw, hw * kx], axis=1), dtype=c64),
               xp.asarray(np.stack([hw * kx, hw * kx * kx], axis=1), dtype=c64),
               xp.asarray(np.stack([ky, ky * ky], axis=1), dtype=c64))
    return _Grid(my, mx, float(ly), float(lx), xp.asarray(ky, dtype=f32), xp.asarray(kx, dtype=f32),
                 xp.asarray(filt, dtype=f32), float(max_shift), moments)


def _crop_spectrum(spec, my, mx, xp):
    """Fourier crop of rFFT spectra ``[..., ny, nkx]`` to ``[..., my, mx // 2 + 1]`` (new array).

    Keeps the lowest ``my`` rows (signed) and ``mx // 2 + 1`` columns; the cropped grid's
    Nyquist row and column (which have no Hermitian partner there) are set to 0.
    """
    ny = spec.shape[-2]
    mkx = mx // 2 + 1
    h = my // 2
    out = xp.empty(spec.shape[:-2] + (my, mkx), dtype=spec.dtype)
    out[..., :h, :] = spec[..., :h, :mkx]
    out[..., h:, :] = spec[..., ny - h:, :mkx]
    out[..., h, :] = 0
    out[..., :, mkx - 1] = 0
    return out


def _binned_frames(spec, shape, size, xp):
    """Frames Fourier-cropped (binned) to ``size`` (my, mx) from their full rFFT spectra: float32.

    The values are local means (the mean level of the frames is kept).
    """
    ny, nx = shape
    my, mx = size
    img = _fft(xp).irfft2(_crop_spectrum(spec, my, mx, xp), s=(my, mx), axes=(-2, -1))
    img *= (my * mx) / float(ny * nx)
    return img.astype(xp.float32, copy=False)


def _chunk(xp, image_px: int) -> int:
    """Images per FFT call: on the CPU about 4 Mpx (one 2k frame, a few small ones), which keeps
    each call's work arrays small (one call over a whole 4k movie is 2-3x slower per frame:
    its temporaries are gigabytes of fresh memory); on a GPU up to 64 Mpx."""
    return max(1, (1 << 22) // image_px) if xp is np else max(1, (1 << 26) // image_px)


def _tapered_spectra(images, taper_width: float, xp, size=None):
    """rFFT of mean-subtracted, edge-tapered images ``[..., h, w]`` -> complex64, cropped to ``size``."""
    h, w = images.shape[-2:]
    win = _taper(h, w, taper_width, xp)
    my, mx = (h, w) if size is None else (int(size[0]), int(size[1]))
    lead = images.shape[:-2]
    flat = images.reshape((-1, h, w))
    out = xp.empty((flat.shape[0], my, mx // 2 + 1), dtype=xp.complex64)
    step = _chunk(xp, h * w)
    for i in range(0, flat.shape[0], step):
        a = xp.asarray(flat[i:i + step], dtype=xp.float32)
        a = a - a.mean(axis=(-2, -1), keepdims=True)
        a *= win
        spec = _fft(xp).rfft2(a, axes=(-2, -1))
        if (my, mx) != (h, w):
            spec = _crop_spectrum(spec, my, mx, xp)
        out[i:i + step] = spec
    return out.reshape(lead + out.shape[-2:])


def _ramp_factors(ky, kx, shifts, xp):
    """Separable factors of exp(+2πi (kx sx + ky sy)) for shifts [..., 2] (dx, dy): [..., my], [..., mkx]."""
    s = xp.asarray(shifts, dtype=xp.float64)
    ey = xp.exp((_TWO_PI * 1j) * (s[..., 1:2] * xp.asarray(ky, dtype=xp.float64)))
    ex = xp.exp((_TWO_PI * 1j) * (s[..., 0:1] * xp.asarray(kx, dtype=xp.float64)))
    return ey.astype(xp.complex64), ex.astype(xp.complex64)


def _shifted(spec, ky, kx, shifts, xp, out=None):
    """``spec`` [..., my, mkx] times the phase ramp that moves the content by ``-shifts`` [..., 2]."""
    ey, ex = _ramp_factors(ky, kx, shifts, xp)
    out = xp.multiply(spec, ey[..., :, None], out=out)
    out *= ex[..., None, :]
    return out


def _cross_mix(mat_u, mat_v, a, xp):
    """Cross spectra ``(U a) conj(V a)`` of frame combinations ``U``, ``V`` [u, n] of ``a`` [..., n, my, mkx].

    Real matrix products on the interleaved (re, im) floats of the contiguous spectra; on
    the CPU in blocks of columns, so that the two products never exist whole (less memory,
    and each block stays in cache).
    """
    sh = a.shape
    flat = xp.ascontiguousarray(a).reshape(sh[:-3] + (sh[-3], sh[-2] * sh[-1])).view(xp.float32)
    mu, mv = xp.asarray(mat_u, dtype=xp.float32), xp.asarray(mat_v, dtype=xp.float32)
    width = flat.shape[-1]
    block = width if xp is not np else max(2, ((1 << 18) // max(1, sh[-3])) * 2)
    out = xp.empty(sh[:-3] + (mu.shape[0], width), dtype=xp.float32)
    for c0 in range(0, width, block):
        part = flat[..., c0:c0 + block]
        p = xp.matmul(mu, part).view(xp.complex64)
        q = xp.matmul(mv, part).view(xp.complex64)
        p *= xp.conj(q)
        out[..., c0:c0 + block] = p.view(xp.float32)
    return out.view(xp.complex64).reshape(sh[:-3] + (mu.shape[0],) + sh[-2:])


def _window_matrices(n: int, group: int):
    """(weighted, support) [n, n]: running sums over ``group`` frames centred on each frame.

    ``weighted`` uses triangular weights (a box of (group+1)//2 frames convolved with itself:
    1-2-1 for 3 frames), whose spectrum is non-negative, so the Jacobi updates of
    overlapping windows converge; ``support`` is the plain sum over the same frames, removed
    from the reference so that no frame is correlated with itself. Truncated at the ends.
    """
    w = (int(group) + 1) // 2
    t = np.arange(n)
    lag = t[None, :] - t[:, None]  # frame - unit
    box = lambda lo, hi: ((lag >= -lo) & (lag <= hi)).astype(float)  # noqa: E731
    weighted = box(0, w - 1) @ box(w - 1, 0)
    return weighted, box(w - 1, w - 1)


def _coarse_peak(cross, grid: _Grid, xp, radius=None):
    """Integer CC peak + parabolic refinement -> shifts [..., 2] px.

    The peak is searched within ``radius`` px (per unit, broadcast to ``cross.shape[:-2]``;
    default and upper limit ``max_shift``). The CC map is the inverse FFT of ``cross``
    (a few units at a time, so that the maps of all units never exist at once), or, when
    the search is local, only its values at the lags within the radius (and one more ring),
    by two matrix products with Fourier factors.
    """
    lead = cross.shape[:-2]
    my, mx = grid.my, grid.mx
    flat = cross.reshape((-1,) + cross.shape[-2:])
    nb = flat.shape[0]
    lim = np.full(lead, grid.max_shift) if radius is None else np.minimum(radius, grid.max_shift)
    lim = np.broadcast_to(lim, lead).reshape(nb)
    scy, scx = grid.scale
    ry, rx = int(math.ceil(float(lim.max()) / scy)), int(math.ceil(float(lim.max()) / scx))
    if (2 * ry + 3) * (2 * rx + 3) * 16 <= my * mx:  # a window of lags around 0
        ay, ax = np.arange(-ry - 1, ry + 2), np.arange(-rx - 1, rx + 2)
        fy = np.where(np.arange(my) < my // 2, np.arange(my), np.arange(my) - my)
        hw = np.full(mx // 2 + 1, 2.0)
        hw[0], hw[-1] = 1.0, 0.0
        ey = xp.asarray(np.exp((_TWO_PI * 1j / my) * np.outer(ay, fy)), dtype=xp.complex64)  # [Ly, my]
        ex = xp.asarray(hw[:, None] * np.exp((_TWO_PI * 1j / mx) * np.outer(np.arange(mx // 2 + 1), ax)),
                        dtype=xp.complex64)  # [mkx, Lx]
        cc = xp.matmul(ey, xp.matmul(flat, ex)).real  # [nb, Ly, Lx]
        dy, dx = np.abs(ay) * scy, np.abs(ax) * scx
        out = _map_peaks(cc, ay, ax, dy, dx, lim, xp)
    else:
        ay, ax = _signed(my), _signed(mx)
        dy, dx = np.abs(ay) * scy, np.abs(ax) * scx
        dy[my // 2] = np.inf  # the CC map's Nyquist row/column are never a peak
        dx[mx // 2] = np.inf
        step = _chunk(xp, my * mx)
        out = xp.concatenate([
            _map_peaks(_fft(xp).irfft2(flat[b:b + step], s=(my, mx), axes=(-2, -1)), ay, ax, dy, dx,
                       lim[b:b + step], xp)
            for b in range(0, nb, step)])
    out = out * xp.asarray([scx, scy], dtype=xp.float32)
    return backend.to_host(out).astype(np.float64).reshape(lead + (2,))


def _map_peaks(cc, ay, ax, dy, dx, lim, xp):
    """Peaks of CC maps ``cc`` [nb, ly, lx] at lags ``ay`` [ly], ``ax`` [lx] (CC-map pixels),
    within ``lim`` [nb] px (``dy``, ``dx``: the lags' distances in px), refined by a parabola
    along each axis -> [nb, 2] (x, y) in CC-map pixels."""
    nb, ly, lx = cc.shape
    limd = xp.asarray(lim.reshape(nb, 1, 1), dtype=xp.float32)
    inside = (xp.asarray(dy, dtype=xp.float32)[None, :, None] <= limd) & \
             (xp.asarray(dx, dtype=xp.float32)[None, None, :] <= limd)
    masked = xp.where(inside, cc, -xp.inf)
    idx = xp.argmax(masked.reshape(nb, -1), axis=1)
    del masked, inside
    py, px = idx // lx, idx % lx
    b = xp.arange(nb)
    c0 = cc[b, py, px]
    ym, yp = cc[b, (py - 1) % ly, px], cc[b, (py + 1) % ly, px]  # wrap: only on the full map
    xm, xpl = cc[b, py, (px - 1) % lx], cc[b, py, (px + 1) % lx]

    def vertex(m, c, p):
        den = m + p - 2.0 * c
        off = xp.where(den < 0, 0.5 * (m - p) / xp.where(den < 0, den, -1.0), 0.0)
        return xp.clip(off, -0.5, 0.5)

    sy = xp.asarray(ay, dtype=xp.float32)[py] + vertex(ym, c0, yp)
    sx = xp.asarray(ax, dtype=xp.float32)[px] + vertex(xm, c0, xpl)
    return xp.stack([sx, sy], axis=-1)


def _cc_derivatives(cross, grid: _Grid, xp):
    """Gradient and Hessian at zero shift of the continuous cross-correlation of each cross spectrum.

    For ``cross`` [..., my, mkx] (one half of a Hermitian spectrum, multiplicities ``hw``):
    ``g = -2π Σ k Im P``, ``H = -4π² Σ k kᵀ Re P``. Returns host float64 [..., 5]:
    (gx, gy, hxx, hyy, hxy).
    """
    sh = cross.shape
    m_cols, m_x, m_y = grid.moments
    if not xp.iscomplexobj(cross):  # a real spectrum: real moments, no complex copy
        m_cols, m_x, m_y = (xp.ascontiguousarray(m.real) for m in grid.moments)
    u = cross.sum(axis=-2)  # [..., mkx]
    vz = xp.matmul(cross.reshape(-1, sh[-1]), m_cols).reshape(sh[:-1] + (2,))  # Σ_x hw P, Σ_x hw kx P
    tx = xp.matmul(u, m_x)  # Σ hw kx P, Σ hw kx² P
    ty = xp.matmul(xp.moveaxis(vz, -1, -2), m_y)  # [..., 2 (hw, hw kx), 2 (ky, ky²)]
    t = xp.stack([tx[..., 0].imag, ty[..., 0, 0].imag, tx[..., 1].real, ty[..., 0, 1].real, ty[..., 1, 0].real],
                 axis=-1)
    t = backend.to_host(t).astype(np.float64)
    return t * np.array([-_TWO_PI, -_TWO_PI, -_TWO_PI**2, -_TWO_PI**2, -_TWO_PI**2])


def _newton_from(d, max_step: float):
    """Newton step [..., 2] px to the CC maximum from (gx, gy, hxx, hyy, hxy) [..., 5].

    No step where the Hessian is not negative definite; steps longer than ``max_step`` are
    shortened to it.
    """
    gx, gy, hxx, hyy, hxy = np.moveaxis(d, -1, 0)
    det = hxx * hyy - hxy * hxy
    ok = (hxx < 0) & (det > 0)
    safe = np.where(ok, det, 1.0)
    dx = np.where(ok, -(hyy * gx - hxy * gy) / safe, 0.0)
    dy = np.where(ok, -(-hxy * gx + hxx * gy) / safe, 0.0)
    step = np.stack([dx, dy], axis=-1)
    norm = np.linalg.norm(step, axis=-1, keepdims=True)
    return np.where(norm > max_step, step * (max_step / np.maximum(norm, 1e-30)), step)


def _despike(d, min_jump: float):
    """Replace single-frame spikes of a trajectory [..., n, 2] by the median of its neighbours.

    The running median over 5 frames (the trajectory extended by point reflection at its
    ends, and the end frames compared with the median of three linear extrapolations from
    their neighbours, so that a steady drift is its own median) keeps steps and steady
    motion; a frame further than
    ``max(min_jump, 5 robust sigma)`` from it is taken for a false peak of a noisy
    cross-correlation (a wide search at low dose) and replaced by the median. Returns the
    trajectory and, per frame, the distance of a replaced estimate (0 if kept).
    """
    first, last = d[..., :1, :], d[..., -1:, :]
    ext = np.concatenate([2 * first - d[..., 2:0:-1, :], d, 2 * last - d[..., -2:-4:-1, :]], axis=-2)
    win = np.lib.stride_tricks.sliding_window_view(ext, 5, axis=-2)  # [..., n, 2, 5]
    med = np.median(win, axis=-1)
    # the end frames: the median of three linear extrapolations from their neighbours
    for end, a, b in ((0, 1, 2), (-1, -2, -3)):
        d1, d2 = d[..., a, :], d[..., b, :]
        med[..., end, :] = np.median(np.stack([d1, 2 * d1 - d2, 3 * d1 - 2 * d2]), axis=0)
    dev = np.linalg.norm(d - med, axis=-1)
    sigma = 1.4826 * np.median(dev, axis=-1, keepdims=True)
    bad = dev > np.maximum(min_jump, 5.0 * sigma)
    return np.where(bad[..., None], med, d), np.where(bad, dev, 0.0)


def _group_bounds(n: int, group: int):
    """Contiguous groups of about ``group`` frames (at least 2 groups): list of (start, stop)."""
    ng = max(2, n // max(1, int(group))) if group > 1 else n
    ng = min(ng, n)
    edges = np.round(np.linspace(0, n, ng + 1)).astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def _align_spectra(spec, grid: _Grid, init, *, group=1, max_iter=20, tol=0.01, coarse_group=None, refine=True,
                   coarse_grid: _Grid | None = None, xp=None):
    """Iterative alignment of frame spectra against the sum of the other frames.

    spec : [..., n, my, mkx] spectra on ``grid`` (a batch of independent stacks in the leading
    axes); used as work space (multiplied in place by the B-factor filter).
    init : [..., n, 2] initial shifts (px); their mean over frames is kept (gauge).

    The coarse iterations work on ``coarse_grid`` (default ``grid``; a Fourier crop of it).
    They (2 to 5, until the shifts change by less than half a CC-map pixel) use running sums
    of ``coarse_group`` frames (default: ~n/4, 1-5) for robustness at low dose; the first
    searches the whole window (``max_shift``) and replaces single-frame outliers by their
    neighbours' median, the next ones search near the current shifts (a few px, more for
    frames still moving). With ``refine=False`` the alignment stops there. Else one more
    search per frame (or group), within :data:`UNIT_SEARCH` CC-map pixels, takes a frame
    that its window could not move (the other frames of the window outweigh it) to its own
    peak; then, frame by frame (or group by group), Newton steps on the continuous CC of
    ``grid``, kept within 1.5 coarse CC-map pixels of the coarse result, until no shift of a
    stack changes by more than ``tol`` (stacks that have converged are left alone). With
    ``group > 1`` the frames are split into contiguous groups of about
    ``group`` frames; each group sum is aligned against the sum of the other groups and
    moves as a whole (on top of ``init``), and at the end the group corrections are
    interpolated linearly between group centres.

    Each unit's cross spectrum is ``(U A) conj(V A)`` with ``A`` the shifted spectra and
    ``U``, ``V`` [units, n] the unit's frames and its reference's; for single frames
    ``A_f conj(T - A_f) = A_f conj(T) - |A_f|²`` with ``T`` the sum of all frames, whose
    second term is real and does not depend on the shifts (its Hessian is computed once).

    Returns shifts [..., n, 2] (content displacement; mean over frames as in ``init``), the
    number of iterations and whether every stack converged (with ``refine=False``: whether
    the coarse iterations did).
    """
    xp = xp or backend.array_module(spec)
    lead = spec.shape[:-3]
    n = spec.shape[-3]
    nb = int(np.prod(lead, dtype=np.int64))
    spec = spec.reshape((nb,) + spec.shape[-3:])
    init = np.array(np.broadcast_to(init, lead + (n, 2)), dtype=np.float64).reshape(nb, n, 2)
    if coarse_group is None:
        coarse_group = min(5, max(1, n // 4))
    coarse_group = max(int(group), int(coarse_group))
    bounds = _group_bounds(n, group)
    ng = len(bounds)
    member = np.zeros((ng, n))
    for j, (a, b) in enumerate(bounds):
        member[j, a:b] = 1.0
    size = member.sum(axis=1)
    c = np.zeros((nb, ng, 2))  # group corrections on top of init
    spec *= grid.filt  # both sides of every cross spectrum carry exp(-B k²/4)
    cgrid = grid if coarse_grid is None or not refine else coarse_grid
    cspec = spec if cgrid is grid else _crop_spectrum(spec, cgrid.my, cgrid.mx, xp)
    scale = max(cgrid.scale)
    max_step = 0.75 * max(grid.scale)
    base = max(3.0 * scale, 4.0)  # smallest search radius of the later coarse iterations
    cap = 1.5 * scale  # largest total Newton refinement of a coarse shift
    t = np.arange(n)
    hw = (coarse_group + 1) // 2 - 1
    window = np.minimum(t + hw, n - 1) - np.maximum(t - hw, 0) + 1  # frames in each coarse window
    ones = np.ones((n, n))
    if ng == n:
        unit_mats = (np.eye(n), ones - np.eye(n)), np.ones(n)
    else:
        unit_mats = (member, 1.0 - member), size
    if coarse_group > 1:
        weighted, support = _window_matrices(n, coarse_group)
        coarse_mats, m_coarse = (weighted, ones - support), window
    else:
        coarse_mats, m_coarse = unit_mats
    self_terms = None
    radius = None  # per frame; None: the whole max_shift
    coarse, n_coarse, c_coarse, windowed_done = True, 0, None, False
    active = np.ones(nb, dtype=bool)  # stacks still being refined
    it = 0
    for it in range(1, max_iter + 1):
        idx = np.flatnonzero(active)
        g = cgrid if coarse else grid
        sub = cspec if coarse else spec
        sub = sub if idx.size == nb else sub[xp.asarray(idx)]
        s = init[idx] + np.einsum("gt,bgk->btk", member, c[idx])
        al = _shifted(sub, g.ky, g.kx, s, xp)
        del sub
        jumped = 0.0
        if coarse:
            cross = _cross_mix(coarse_mats[0], coarse_mats[1], al, xp)
            del al
            m = m_coarse
            d = _coarse_peak(cross, cgrid, xp, radius)
            del cross
            if n_coarse == 0 and n >= 5:
                # far outliers of the wide search: replaced by their neighbours' median
                d, jumped = _despike(d, 3.0 * base)
        else:
            if ng == n:
                if self_terms is None:  # from -|A_f|², the same at every iteration
                    step = _chunk(xp, spec.shape[-2] * spec.shape[-1])
                    parts = []
                    for f0 in range(0, n, step):
                        part = spec[:, f0:f0 + step]
                        power = part.real * part.real
                        power += part.imag * part.imag
                        parts.append(-_cc_derivatives(power, grid, xp))
                    self_terms = np.concatenate(parts, axis=1)
                    del power, part
                al *= xp.conj(al.sum(axis=-3, keepdims=True))
                terms = _cc_derivatives(al, grid, xp) + self_terms[idx]
                m = size
            else:
                cross = _cross_mix(member, 1.0 - member, al, xp)
                terms = _cc_derivatives(cross, grid, xp)
                del cross
                m = size
            del al
            d = _newton_from(terms, max_step)
        # a unit (frame, group or window) of m frames measured against the other n - m frames
        # sees its error times n / (n - m) once the mean is held fixed: undo that overshoot
        # (else e.g. two frames swap sides forever)
        d = d * ((n - m) / n)[:, None]
        frame_step = np.max(np.abs(d), axis=-1)
        if d.shape[-2] != ng:  # per-frame measurements -> mean per group
            d = np.einsum("gt,btk->bgk", member, d) / size[:, None]
        c_prev = c[idx]
        ci = c_prev + d
        ci -= (np.einsum("g,bgk->bk", size, ci) / n)[:, None, :]  # keep the mean over frames
        if not coarse:
            # refinement stays within the coarse peak (a CC-map pixel and a half): at very low
            # signal the continuous CC of single frames has other maxima nearby
            if c_coarse is None:
                c_coarse = c.copy()
            off = ci - c_coarse[idx]
            norm = np.linalg.norm(off, axis=-1, keepdims=True)
            ci = np.where(norm > cap, c_coarse[idx] + off * (cap / np.maximum(norm, 1e-30)), ci)
        c[idx] = ci
        step = np.max(np.abs(ci - c_prev), axis=(-2, -1))  # per stack
        if coarse:
            n_coarse += 1
            # next search: near the current shift, wider for frames still moving (and for a
            # replaced outlier, 3/4 of the way back to it, so a real fast frame is found again)
            radius = np.maximum(base, np.maximum(1.5 * frame_step, 0.75 * jumped))
            if windowed_done:
                coarse = False
                cspec = None
            elif (n_coarse >= 2 and float(step.max()) < 0.5 * scale) or n_coarse >= 5:
                if not refine:
                    active[idx] = step >= 0.5 * scale
                    break
                if coarse_mats is unit_mats[0]:
                    coarse = False
                    cspec = None  # the coarse crop is not used again
                else:
                    # one search per unit before the refinement: a frame that a window could not
                    # move (its neighbours outweigh it) is taken to its own peak
                    coarse_mats, m_coarse = unit_mats
                    radius, windowed_done = UNIT_SEARCH * scale, True
        else:
            active[idx[step < tol]] = False
            if not active.any():
                break
    converged = not active.any()
    if ng == n:
        return (init + c).reshape(lead + (n, 2)), it, converged
    centres = np.array([(a + b - 1) / 2.0 for a, b in bounds])
    t = np.arange(n, dtype=float)
    j = np.clip(np.searchsorted(centres, t) - 1, 0, ng - 2)
    f = ((t - centres[j]) / (centres[j + 1] - centres[j]))[:, None]
    corr = c[..., j, :] * (1 - f) + c[..., j + 1, :] * f  # linear inter-/extrapolation
    corr -= corr.mean(axis=-2, keepdims=True) - (np.einsum("g,...gk->...k", size, c) / n)[..., None, :]
    return (init + corr).reshape(lead + (n, 2)), it, converged
def _whittaker(shifts, lam: float):
    n = shifts.shape[0]
    d2 = np.diff(np.eye(n), 2, axis=0)
    hat = np.linalg.inv(np.eye(n) + lam * d2.T @ d2)
    return hat @ shifts, float(np.trace(hat))


def _smooth_trajectory(shifts, smooth):
    """Whittaker smoother: argmin |s - y|² + lam |D² s|² per axis (D² second differences).

    ``smooth`` is lam (0: none) or ``"auto"``: lam chosen by generalised cross-validation
    over 1e-2 .. 1e4 (both axes together). Returns (smoothed shifts, lam).
    """
    n = shifts.shape[0]
    if n < 4 or smooth is None or (not isinstance(smooth, str) and smooth <= 0):
        return shifts, 0.0
    if isinstance(smooth, str):
        if smooth != "auto":
            raise InputError("smooth", f"smooth must be a number >= 0 or 'auto', got {smooth!r}",
                             "use e.g. smooth=2 or smooth='auto'")
        best = (np.inf, 0.0)
        for lam in np.logspace(-2, 4, 25):
            fit, tr = _whittaker(shifts, lam)
            dof = n - tr
            gcv = n * float(np.sum((shifts - fit) ** 2)) / max(dof, 1e-9) ** 2
            if gcv < best[0]:
                best = (gcv, float(lam))
        lam = best[1]
    else:
        lam = float(smooth)
    return _whittaker(shifts, lam)[0], lam


def _check_frames(frames):
    if frames.ndim != 3:
        raise InputError("frames", f"a movie must be [n, y, x], got shape {tuple(frames.shape)}",
                         "pass a 3D stack of frames")
    if frames.shape[0] < 2:
        raise InputError("frames", f"a movie needs at least 2 frames to align, got {frames.shape[0]}",
                         "check the movie holds all frames")
    if min(frames.shape[1:]) < 32:
        raise InputError("frames", f"frames of {frames.shape[1]}x{frames.shape[2]} px are too small to align",
                         "frames must be at least 32 px on each side")


def _check_pixel_size(pixel_size):
    if pixel_size is None or not (float(pixel_size) > 0 and math.isfinite(float(pixel_size))):
        raise InputError("pixel_size", f"pixel size must be positive (Å/px), got {pixel_size!r}",
                         "pass the pixel size in Å (or set it in the movie header)")
    return float(pixel_size)


# ----------------------------------------------------------------------------------------
# Whole-frame alignment
# ----------------------------------------------------------------------------------------


def align_frames(frames, pixel_size: float, bfactor: float = 150.0, max_iter: int = 20, binning: float = 1,
                 *, tol: float = 0.01, max_shift: float | None = None, group: int = 1, smooth=0.0,
                 taper: float = 0.05, return_info: bool = False):
    """Whole-frame alignment of a movie.

    Parameters
    ----------
    frames : array ``[n, ny, nx]`` (numpy or cupy)
        Gain-corrected frames (counts).
    pixel_size : float
        Å/px.
    bfactor : float
        Low-pass of the cross-correlation (Å²): each spectrum weighted by ``exp(-B k²/4)``.
    max_iter : int
        Maximum iterations (each realigns every frame against the sum of the others).
    binning : float
        Extra Fourier-cropping factor (>= 1) for speed on large frames; the B-factor cut-off
        already crops to the useful band.
    tol : float
        Stop when no shift changes by more than this (px).
    max_shift : float, optional
        Largest shift searched (px); default a quarter of the smaller frame side.
    group : int
        Align groups of about this many consecutive frames as units (>1 for very low dose
        per frame); group shifts are interpolated linearly between group centres.
    smooth : float or "auto"
        Whittaker smoothing strength of the final trajectory (second-difference penalty;
        0: none; ~1-10 for noisy trajectories) or ``"auto"`` (chosen by generalised
        cross-validation, close to 0 when the trajectory is well determined).
    taper : float
        Width of the raised-cosine edge taper, fraction of the frame side.
    return_info : bool
        Also return a dict of diagnostics (iterations, convergence, grid size).

    Returns
    -------
    shifts : numpy.ndarray ``[n, 2]``
        ``(dx, dy)`` in px: the content of frame f is displaced by ``+shifts[f]`` relative
        to frame 1 (``shifts[0] == (0, 0)``); the aligned frame is the frame shifted by
        ``-shifts[f]``.
    """
    _check_frames(frames)
    pixel_size = _check_pixel_size(pixel_size)
    xp = backend.array_module(frames)
    ny, nx = frames.shape[1:]
    size = (_band_size(ny, pixel_size, bfactor, binning), _band_size(nx, pixel_size, bfactor, binning))
    binned = _prepare(frames, size, xp)
    return _align_binned(binned, (ny, nx), pixel_size, bfactor, max_iter=max_iter, binning=binning, tol=tol,
                         max_shift=max_shift, group=group, smooth=smooth, taper=taper, return_info=return_info)


def _prepare(frames, size, xp):
    """The frames binned to ``size``: ``[n, my, mx]`` float32 (Fourier-cropped, see
    :func:`_binned_frames`), which feed both alignments.

    A few frames at a time: each frame's full spectrum exists only while it is cropped (the
    sums transform the frames again rather than keep the spectra: see :func:`correct_motion`).
    """
    n, ny, nx = frames.shape
    my, mx = size
    fft = _fft(xp)
    binned = xp.empty((n, my, mx), dtype=xp.float32)
    step = _chunk(xp, ny * nx)
    for i in range(0, n, step):
        spec = fft.rfft2(xp.asarray(frames[i:i + step], dtype=xp.float32), axes=(-2, -1))
        binned[i:i + step] = _binned_frames(spec, (ny, nx), (my, mx), xp)
    return binned


def _align_binned(binned, shape, pixel_size, bfactor, *, max_iter=20, binning=1, tol=0.01, max_shift=None, group=1,
                  smooth=0.0, taper=0.05, return_info=False):
    """Whole-frame alignment of binned frames ``[n, by, bx]`` of frames of ``shape`` (ny, nx) px."""
    xp = backend.array_module(binned)
    n = binned.shape[0]
    ny, nx = shape
    my = min(binned.shape[1], _band_size(ny, pixel_size, bfactor, binning))
    mx = min(binned.shape[2], _band_size(nx, pixel_size, bfactor, binning))
    if max_shift is None:
        max_shift = 0.25 * min(ny, nx)
    grid = _make_grid(my, mx, ny, nx, pixel_size, bfactor, max_shift, xp)
    cy = min(my, _band_size(ny, pixel_size, bfactor, binning, COARSE_BAND))
    cx = min(mx, _band_size(nx, pixel_size, bfactor, binning, COARSE_BAND))
    cgrid = _make_grid(cy, cx, ny, nx, pixel_size, bfactor, max_shift, xp)
    spec = _tapered_spectra(binned, taper, xp, size=(my, mx))
    s, iters, converged = _align_spectra(spec[None], grid, np.zeros((1, n, 2)), group=group, max_iter=max_iter,
                                         tol=tol, coarse_grid=cgrid, xp=xp)
    s = s[0]
    s, lam = _smooth_trajectory(s, smooth)
    s = s - s[0]
    info = {"iterations": iters, "converged": converged, "grid": (grid.my, grid.mx), "coarse_grid": (cy, cx),
            "scale": grid.scale, "smooth": lam}
    log.info("whole-frame alignment: %d iterations (%s), alignment grid %dx%d, coarse search %dx%d",
             iters, "converged" if converged else "not converged", grid.my, grid.mx, cy, cx)
    return (s, info) if return_info else s


# ----------------------------------------------------------------------------------------
# Local (patch) alignment and the deformation model
# ----------------------------------------------------------------------------------------

N_COEFFS = 18
_SPATIAL = ("1", "x", "x2", "y", "y2", "xy")  # spatial terms of the model, in RELION's order
_CONST, _AFFINE, _FULL = [0], [0, 1, 3], [0, 1, 2, 3, 4, 5]


def _basis(xn, yn, z):
    """RELION's third-order polynomial model basis: [..., 18], index 3*spatial + (power-1).

    Spatial terms (1, x, x², y, y², xy) of normalised positions ``xn, yn``; temporal terms
    (z, z², z³); the three arguments broadcast together.
    """
    xn, yn, z = np.broadcast_arrays(np.asarray(xn, dtype=np.float64), np.asarray(yn, dtype=np.float64),
                                    np.asarray(z, dtype=np.float64))
    sp = np.stack([np.ones_like(xn), xn, xn * xn, yn, yn * yn, xn * yn], axis=-1)  # [..., 6]
    tz = np.stack([z, z * z, z * z * z], axis=-1)  # [..., 3]
    return (sp[..., :, None] * tz[..., None, :]).reshape(xn.shape + (N_COEFFS,))


@dataclass
class LocalModel:
    """Smooth local deformation: residual shift on top of the whole-frame trajectory.

    ``shift(x, y, z) = sum_i c_i * p_i(x_n, y_n) * z^j`` with ``p`` in (1, x, x², y, y², xy),
    ``j`` in (1, 2, 3), ``x_n = x / nx - 0.5``, ``y_n = y / ny - 0.5`` (x, y in px of the
    frame), ``z`` = frame index from 0 — RELION's ``ThirdOrderPolynomialModel`` layout
    (coefficient index ``3 * spatial + j - 1``), but with Conveyor's sign of shifts (content
    displacement). The model is 0 at frame 1.

    Attributes
    ----------
    coeffs : numpy.ndarray [2, 18]
        Coefficients for dx (row 0) and dy (row 1), px.
    shape : (ny, nx)
    n_frames : int
    patch_centers : numpy.ndarray [P, 2]
        Patch centres (x, y) in px.
    patch_shifts : numpy.ndarray [n, P, 2]
        Measured residual shifts per frame and patch (px, each patch's free offset removed
        so that they are comparable with the model).
    inliers : numpy.ndarray [n, P] bool
        Measurements kept by the outlier rejection.
    rms : float
        RMS of the fit residuals over the inliers (px).
    noise : float
        RMS error of the fitted model from measurement noise (px), from the disagreement of
        fits to the two colours of a checkerboard of patches.
    amplitude : float
        RMS of the model over patches and frames (px).
    valid : bool
        Enough patches survived to fit the model.
    significant : bool
        The model predicts the shifts of held-out patches (checkerboard cross-validation)
        at least 10 % better (mean squared error) than no local model, and better in both
        folds: the local motion is real, worth applying.
    terms : tuple of str
        Spatial terms kept by the cross-validation: ``("1",)`` (a common correction of the
        whole-frame trajectory), ``("1", "x", "y")`` (affine) or all six; the others have
        zero coefficients.
    cv_error : dict
        Cross-validated mean squared prediction error (px²) per candidate ("none": no
        local model).
    reason : str
        Why the model is not valid/significant ("" if it is).
    """

    coeffs: np.ndarray
    shape: tuple
    n_frames: int
    patch_centers: np.ndarray
    patch_shifts: np.ndarray
    inliers: np.ndarray
    rms: float = 0.0
    noise: float = 0.0
    amplitude: float = 0.0
    valid: bool = True
    significant: bool = True
    reason: str = ""
    patch_size: tuple = (0, 0)
    group: int = 1
    terms: tuple = ()
    cv_error: dict = field(default_factory=dict)

    @property
    def use(self) -> bool:
        """True when the model should be applied (valid and significant)."""
        return bool(self.valid and self.significant)

    def shift(self, x, y, frame):
        """Residual shift (dx, dy) px at pixel position(s) ``x, y`` and 0-based ``frame`` (broadcast)."""
        ny, nx = self.shape
        b = _basis(np.asarray(x, dtype=float) / nx - 0.5, np.asarray(y, dtype=float) / ny - 0.5, frame)
        return np.stack([b @ self.coeffs[0], b @ self.coeffs[1]], axis=-1)

    def field(self, x, y):
        """Residual shifts for every frame at positions ``x, y`` (1D arrays): [n, len(x), 2]."""
        z = np.arange(self.n_frames, dtype=float)[:, None]
        return self.shift(np.asarray(x, dtype=float)[None, :], np.asarray(y, dtype=float)[None, :], z)

    def max_gradient(self, samples: int = 9) -> float:
        """Largest spatial gradient of the residual shift field over frames (px per px)."""
        ny, nx = self.shape
        gy, gx = np.meshgrid(np.linspace(0, ny - 1, samples), np.linspace(0, nx - 1, samples), indexing="ij")
        f = self.field(gx.ravel(), gy.ravel()).reshape(self.n_frames, samples, samples, 2)
        dx = np.abs(np.diff(f, axis=2)) / ((nx - 1) / (samples - 1))
        dy = np.abs(np.diff(f, axis=1)) / ((ny - 1) / (samples - 1))
        return float(max(dx.max(initial=0.0), dy.max(initial=0.0)))


def _patch_layout(ny, nx, patches):
    """Patch origins [P, 2] (y0, x0), size (ph, pw) and centres [P, 2] (x, y) for (npx, npy) patches."""
    npx, npy = int(patches[0]), int(patches[1])
    ph, pw = ny // npy, nx // npx
    ph -= ph % 2
    pw -= pw % 2
    origins, centres = [], []
    for iy in range(npy):
        for ix in range(npx):
            y0 = iy * (ny // npy) + ((ny // npy) - ph) // 2
            x0 = ix * (nx // npx) + ((nx // npx) - pw) // 2
            origins.append((y0, x0))
            centres.append((x0 + (pw - 1) / 2.0, y0 + (ph - 1) / 2.0))
    return np.array(origins), (ph, pw), np.array(centres)


def _gather_tiles(frames, y0, x0, offsets, size, xp, vectorized=None):
    """Regions of every frame: [T, n, h, w] from origins (y0, x0) [T] + per-(tile, frame) offsets [T, n, 2].

    Indices beyond the frame edges are clamped (edge pixels are repeated). ``vectorized``:
    one fancy-index gather (default on the GPU) instead of slices (default on the CPU).
    """
    n, ny, nx = frames.shape
    h, w = size
    oy = np.asarray(y0)[:, None] + np.asarray(offsets[..., 1], dtype=np.int64)  # [T, n] first row
    ox = np.asarray(x0)[:, None] + np.asarray(offsets[..., 0], dtype=np.int64)
    if vectorized is None:
        vectorized = xp is not np
    if vectorized:  # one gather kernel on the device
        yy = xp.clip(xp.asarray(oy)[..., None] + xp.arange(h), 0, ny - 1)[..., :, None]  # [T, n, h, 1]
        xx = xp.clip(xp.asarray(ox)[..., None] + xp.arange(w), 0, nx - 1)[..., None, :]  # [T, n, 1, w]
        return frames[xp.arange(n)[None, :, None, None], yy, xx]
    out = np.empty((oy.shape[0], n, h, w), dtype=frames.dtype)
    for i in range(oy.shape[0]):  # on the CPU, slices are much faster than a fancy-index gather
        for t in range(n):
            r0, c0 = int(oy[i, t]), int(ox[i, t])
            if r0 >= 0 and c0 >= 0 and r0 + h <= ny and c0 + w <= nx:
                out[i, t] = frames[t, r0:r0 + h, c0:c0 + w]
            else:
                rows = np.clip(np.arange(r0, r0 + h), 0, ny - 1)
                cols = np.clip(np.arange(c0, c0 + w), 0, nx - 1)
                out[i, t] = frames[t][np.ix_(rows, cols)]
    return out


def _fit_model(r, centres, shape, n_frames, outlier_sigma=3.0, min_error=0.05, max_rounds=6, mask=None,
               terms=None):
    """Least-squares fit of the 18-term model (+ a free offset per patch) with outlier rejection.

    r : [n, P, 2] measured residual shifts; ``mask`` [n, P]: fit these measurements only, no
    rejection; ``terms``: spatial terms to use (indices into 1, x, x², y, y², xy; default
    all). Returns (coeffs [2, 18], offsets [P, 2], inliers [n, P]).
    """
    n, p, _ = r.shape
    ny, nx = shape
    xn = centres[:, 0] / nx - 0.5
    yn = centres[:, 1] / ny - 0.5
    z = np.arange(n, dtype=float)
    b = _basis(xn[None, :], yn[None, :], z[:, None]).reshape(n * p, N_COEFFS)  # rows: (frame, patch)
    if terms is not None:
        b = b * np.repeat(np.isin(np.arange(6), terms), 3)[None, :]
    onehot = np.tile(np.eye(p), (n, 1))
    if mask is not None:  # patches without any measurement: no offset column
        onehot = onehot * np.asarray(mask).any(axis=0)[None, :]
    design = np.concatenate([b, onehot], axis=1)
    scale = np.linalg.norm(design, axis=0)
    scale[scale == 0] = 1.0
    design = design / scale
    y = r.reshape(n * p, 2)
    inl = np.isfinite(y).all(axis=1)
    y = np.where(np.isfinite(y), y, 0.0)
    coef = np.zeros((N_COEFFS + p, 2))
    if mask is not None:
        inl = inl & np.asarray(mask).reshape(n * p)
        sol, *_ = np.linalg.lstsq(design[inl], y[inl], rcond=None)
        coef = sol / scale[:, None]
        return coef[:N_COEFFS].T.copy(), coef[N_COEFFS:], inl.reshape(n, p)
    for _ in range(max_rounds):
        if inl.sum() < N_COEFFS + p + 2:
            break
        sol, *_ = np.linalg.lstsq(design[inl], y[inl], rcond=None)
        coef = sol / scale[:, None]
        resid = np.linalg.norm(y - (design @ sol), axis=1)
        sigma = np.median(resid[inl]) / 1.1774  # Rayleigh median -> per-axis sigma
        thr = max(outlier_sigma * sigma, min_error)
        new = resid <= thr
        # whole patches whose typical residual is far above the others'
        per_patch = np.array([np.median(resid.reshape(n, p)[:, j]) for j in range(p)])
        bad_patch = per_patch > max(3.0 * np.median(per_patch), min_error)
        new = new & ~np.tile(bad_patch, n)
        new &= np.isfinite(r.reshape(n * p, 2)).all(axis=1)
        if np.array_equal(new, inl):
            break
        inl = new
    return coef[:N_COEFFS].T.copy(), coef[N_COEFFS:], inl.reshape(n, p)


def _predict(coeffs, centres, shape, n):
    """Model shifts at the patch centres for every frame: [n, P, 2]."""
    ny, nx = shape
    b = _basis(centres[None, :, 0] / nx - 0.5, centres[None, :, 1] / ny - 0.5, np.arange(n)[:, None])
    return b @ coeffs.T


def _cv_error(r, inl, colour, terms, centres, shape):
    """Checkerboard cross-validation of a spatial model (None: no local model).

    Returns (mean squared prediction error on held-out patches, px², after removing each
    held-out patch's free offset; the same per fold [2]; rms noise of the full fit estimated
    from the two halves' disagreement, px).
    """
    n, p, _ = r.shape
    folds, preds = [], []
    for train, test in ((~colour, colour), (colour, ~colour)):
        mask = inl & train[None, :]
        if terms is None:
            pred = np.zeros_like(r)
        else:
            k = 3 * len(terms) + int(train.sum()) + 2
            if int(train.sum()) < len(terms) + 1 or mask.sum() < k:
                return float("inf"), np.full(2, np.inf), float("inf")
            c = _fit_model(r, centres, shape, n, mask=mask, terms=terms)[0]
            pred = _predict(c, centres, shape, n)
        preds.append(pred)
        m = inl & test[None, :]
        d = np.where(m[..., None], r - pred, 0.0)
        cnt = m.sum(axis=0)
        off = d.sum(axis=0) / np.maximum(cnt, 1)[:, None]
        d = np.where(m[..., None], d - off[None], 0.0)
        folds.append((float(np.sum(d**2)), int(m.sum())))
    total = sum(f[0] for f in folds) / max(1, sum(f[1] for f in folds))
    per_fold = np.array([e / max(c, 1) for e, c in folds])
    spread = float(np.sqrt(np.mean(np.sum((preds[0] - preds[1]) ** 2, axis=-1)) / 4.0))
    return total, per_fold, spread


def local_alignment(frames, global_shifts, patches=(5, 5), *, pixel_size: float = 1.0, bfactor: float = 150.0,
                    group: int = 1, max_iter: int = 20, binning: float = 1, max_shift: float | None = None,
                    taper: float = 0.1, outlier_sigma: float = 3.0) -> LocalModel:
    """Patch-based local alignment and fit of the smooth deformation model.

    Parameters
    ----------
    frames : array ``[n, ny, nx]``
    global_shifts : array ``[n, 2]``
        Whole-frame shifts (px, Conveyor's sign) from :func:`align_frames`.
    patches : (npx, npy)
        Patches along x and along y (5, 5 by default).
    pixel_size : float
        Å/px (for the B-factor).
    bfactor : float
        Low-pass of the patch cross-correlations (Å², as in :func:`align_frames`).
    group : int
        Align groups of about this many consecutive frames in each patch as units (noise
        reduction); the group shifts are interpolated linearly between group centres.
    max_iter : int
        Largest number of iterations (the patch stacks are aligned by the coarse iterations
        only, until their shifts change by less than half a CC-map pixel: 2-5 iterations).
    binning, taper
        As in :func:`align_frames` (taper as a fraction of the patch side).
    max_shift : float, optional
        Largest residual shift searched in a patch (px); default 10 Å, at least 4 px.
    outlier_sigma : float
        Measurements further than this many sigma from the model are rejected.

    Returns
    -------
    LocalModel
        Check ``model.use`` before applying it: the model is fitted with outlier rejection
        and its spatial terms (constant, affine or quadratic) are chosen, and its
        significance decided, by checkerboard cross-validation over the patches.
    """
    _check_frames(frames)
    pixel_size = _check_pixel_size(pixel_size)
    xp = backend.array_module(frames)
    ny, nx = frames.shape[1:]
    size = tuple(_band_size(m, pixel_size, bfactor, binning, PATCH_BAND) for m in (ny, nx))
    binned = _prepare(frames, size, xp)
    return _local_binned(binned, (ny, nx), global_shifts, patches, pixel_size=pixel_size, bfactor=bfactor,
                         group=group, max_iter=max_iter, binning=binning, max_shift=max_shift, taper=taper,
                         outlier_sigma=outlier_sigma)


def _local_binned(binned, shape, global_shifts, patches, *, pixel_size, bfactor, group=1, max_iter=20, binning=1,
                  max_shift=None, taper=0.1, outlier_sigma=3.0) -> LocalModel:
    """:func:`local_alignment` on binned frames ``[n, my, mx]`` of frames of ``shape`` (ny, nx) px.

    Patches are cut from the binned frames (sample ``i`` lies at ``i * ny / my`` px of the
    frame); shifts, patch centres and the model are in px of the frame.
    """
    xp = backend.array_module(binned)
    n, my, mx = binned.shape
    ny, nx = shape
    by, bx = ny / my, nx / mx  # px of the frame per binned sample
    g = np.asarray(global_shifts, dtype=np.float64).reshape(n, 2)
    origins, (ph, pw), centres = _patch_layout(my, mx, patches)
    centres = centres * np.array([bx, by])
    npatch = len(origins)
    ly, lx = ph * by, pw * bx  # patch size, px of the frame
    if min(ly, lx) < 32 or min(ph, pw) < 8:
        z = np.zeros((n, npatch, 2))
        why = (f"patches of {lx:.0f}x{ly:.0f} px are too small (32 px minimum)" if min(ly, lx) < 32 else
               f"patches hold only {pw}x{ph} samples of the alignment band (8 minimum)")
        return LocalModel(np.zeros((2, N_COEFFS)), (ny, nx), n, centres, z, np.zeros((n, npatch), bool),
                          valid=False, significant=False, patch_size=(int(round(ly)), int(round(lx))),
                          group=int(group), reason=f"{why}; use fewer patches")
    if max_shift is None:
        max_shift = max(4.0, 10.0 / pixel_size)
    psize = (min(ph, _band_size(int(round(ly)), pixel_size, bfactor, binning, PATCH_BAND)),
             min(pw, _band_size(int(round(lx)), pixel_size, bfactor, binning, PATCH_BAND)))
    grid = _make_grid(psize[0], psize[1], ly, lx, pixel_size, bfactor, max_shift, xp)
    unit = np.array([bx, by])
    off = np.rint(g / unit)  # whole-frame shift in binned samples: integer part applied when cutting patches
    frac = g - off * unit  # the rest (px), the starting point of the patch alignment
    # patches are independent: align them in batches that bound the memory (~8 MB of spectra per array)
    batch = max(1, min(npatch, (1 << 20) // max(1, n * grid.my * (grid.mx // 2 + 1))))
    s = np.empty((npatch, n, 2))
    iters = 0
    for i in range(0, npatch, batch):
        o = origins[i:i + batch]
        offs = np.broadcast_to(off, (len(o), n, 2)).astype(np.int64)
        tiles = _gather_tiles(binned, o[:, 0], o[:, 1], offs, (ph, pw), xp)
        spec = _tapered_spectra(tiles, taper, xp, size=psize)
        del tiles
        init = np.broadcast_to(frac, (len(o), n, 2))
        s[i:i + batch], it, _ = _align_spectra(spec, grid, init, group=group, max_iter=max_iter, refine=False,
                                               xp=xp)
        iters = max(iters, it)
        del spec
    off = off * unit
    total = s + off[None]  # [P, n, 2] content displacement in frame coordinates
    r = np.transpose(total - g[None], (1, 0, 2))  # [n, P, 2] residual on top of the whole-frame shifts
    model = LocalModel(np.zeros((2, N_COEFFS)), (ny, nx), n, centres, r, np.ones((n, npatch), bool),
                       patch_size=(int(round(ly)), int(round(lx))), group=int(group))
    n_obs_min = N_COEFFS + npatch + 2
    if n * npatch < n_obs_min or n < 4:
        model.valid, model.significant = False, False
        model.reason = f"too few measurements ({n} frames x {npatch} patches) for the 18-term model"
        return model
    # robust fit (outlier rejection) with the full model when the patches can carry it
    robust_terms = _FULL if npatch >= 9 else _AFFINE
    coeffs, offsets, inl = _fit_model(r, centres, (ny, nx), n, outlier_sigma, terms=robust_terms)
    # model selection and significance by cross-validation on the two colours of a checkerboard
    # of patches (their measurement errors are independent, whatever the temporal correlations
    # within a patch): each spatial model is fitted to one colour and predicts the other; the
    # local model is used only if the best one predicts the held-out patches better than no
    # local model at all (by 10 %, and in both folds).
    npx = int(patches[0])
    colour = ((np.arange(npatch) % npx + np.arange(npatch) // npx) % 2).astype(bool)
    smaller = int(min(colour.sum(), (~colour).sum()))
    candidates = [_CONST, _AFFINE] + ([_FULL] if smaller >= 8 else [])
    scores, folds, spreads = {}, {}, {}
    for terms in [None] + candidates:
        key = tuple(terms) if terms else ()
        scores[key], folds[key], spreads[key] = _cv_error(r, inl, colour, terms, centres, (ny, nx))
    best = min(scores, key=scores.get)
    chosen = list(best) if best else (candidates[-1])
    coeffs, offsets, _ = _fit_model(r, centres, (ny, nx), n, mask=inl, terms=chosen)
    r_centred = r - offsets[None]
    fit = _predict(coeffs, centres, (ny, nx), n)  # [n, P, 2]
    resid = np.linalg.norm(r_centred - fit, axis=-1)
    rms = float(np.sqrt(np.mean(resid[inl] ** 2))) if inl.any() else float("inf")
    n_inl = int(inl.sum())
    amp = float(np.sqrt(np.mean(np.sum(fit**2, axis=-1))))
    noise = spreads.get(tuple(chosen), float("inf"))
    model.coeffs = coeffs
    model.patch_shifts = r_centred
    model.inliers = inl
    model.rms, model.noise, model.amplitude = rms, noise, amp
    model.terms = tuple(_SPATIAL[i] for i in chosen)
    model.cv_error = {"+".join(_SPATIAL[i] for i in k) if k else "none": float(v) for k, v in scores.items()}
    good_patches = int((inl.mean(axis=0) > 0.5).sum())
    if good_patches < max(4, 0.5 * npatch) or n_inl < n_obs_min:
        model.valid, model.significant = False, False
        model.reason = f"only {good_patches} of {npatch} patches gave consistent shifts"
    elif not best or not scores[best] < 0.9 * scores[()] or not np.all(folds[best] < folds[()]):
        model.significant = False
        model.reason = (f"local motion ({amp:.3f} px rms) is not significant: it does not predict held-out "
                        f"patches better than no local model")
    log.info("local alignment: %dx%d patches of %.0fx%.0f px (%dx%d samples), %d iterations, fit rms %.3f px, "
             "model %.3f px rms, %d/%d measurements kept%s", int(patches[0]), int(patches[1]), lx, ly, grid.mx,
             grid.my, iters, rms, amp, n_inl,
             n * npatch, f" ({model.reason})" if model.reason else "")
    return model


# ----------------------------------------------------------------------------------------
# Summation
# ----------------------------------------------------------------------------------------


@dataclass
class Sums:
    """Aligned sums: ``sum`` (no dose weighting) and ``dose_weighted`` (None if not asked)."""

    sum: object
    dose_weighted: object = None
    tile_spacing: int | None = None


def _sum_global(frames, shifts, dose, xp, want_plain=True):
    """Fourier-shifted sums, plain and dose-weighted (``dose``: a :class:`_DoseFilter` or None).

    Each frame is transformed (rFFT) as it is added. The weighted
    sum ``sum_f w_f S_f`` with ``w_f = post * step^(f+1)`` is accumulated by Horner's rule,
    last frame first: ``acc = (acc + S_f) * step``.
    """
    n, ny, nx = frames.shape
    ky = xp.fft.fftfreq(ny)
    kx = xp.fft.rfftfreq(nx)
    acc = xp.zeros((ny, nx // 2 + 1), dtype=xp.complex64) if want_plain else None
    acc_dw = xp.zeros((ny, nx // 2 + 1), dtype=xp.complex64) if dose is not None else None
    step = dose.step if dose is not None else None
    for f in range(n - 1, -1, -1):
        spec = _fft(xp).rfft2(xp.asarray(frames[f], dtype=xp.float32))
        spec = _shifted(spec, ky, kx, shifts[f], xp, out=spec)
        if acc is not None:
            acc += spec
        if acc_dw is not None:
            acc_dw += spec
            acc_dw *= step
    plain = _fft(xp).irfft2(acc, s=(ny, nx)).astype(xp.float32) if acc is not None else None
    if acc_dw is not None:
        acc_dw *= dose.post
        acc_dw = _fft(xp).irfft2(acc_dw, s=(ny, nx)).astype(xp.float32)
    return plain, acc_dw


def _ramp_weights(length, lo_ramp, hi_ramp, ramp):
    """1D blending window over a tile's support: linear ramps of ``ramp`` px (partition of unity)."""
    x = np.arange(length, dtype=np.float64) + 0.5
    w = np.ones(length)
    if lo_ramp:
        w *= np.clip(x / ramp, 0.0, 1.0)
    if hi_ramp:
        w *= np.clip((length - x) / ramp, 0.0, 1.0)
    return w


def _sum_local(frames, shifts, model: LocalModel, dose_args, xp, spacing=None, want_plain=True,
               max_error=0.4, margin=12):
    """Sum with the local model: exact shifts per tile, tiles blended with linear ramps."""
    n, ny, nx = frames.shape
    if spacing is None:
        grad = model.max_gradient()
        spacing = int(max_error / grad) if grad > 0 else max(ny, nx)
        spacing = int(min(max(spacing, 32), max(ny, nx)))
    s = int(spacing)
    ramp = max(2, min(16, s // 4))
    ramp -= ramp % 2
    size = _good_size(s + ramp + 2 * margin)
    m = (size - s - ramp) // 2
    jy = max(1, math.ceil(ny / s))
    jx = max(1, math.ceil(nx / s))
    by = np.arange(jy) * s
    bx = np.arange(jx) * s
    ky = xp.fft.fftfreq(size)
    kx = xp.fft.rfftfreq(size)
    dose = None
    if dose_args is not None:
        dose = _DoseFilter((size, size), *dose_args, xp=xp)
        dose_stack = xp.stack([dose(f) for f in range(n)])  # [n, size, size//2+1]
    win_taper = _taper(size, size, max(1, m // 2), xp)
    out = xp.zeros((ny, nx), dtype=xp.float32) if want_plain else None
    out_dw = xp.zeros((ny, nx), dtype=xp.float32) if dose is not None else None
    sup = s + ramp  # support of a tile: [b - ramp/2, b + s + ramp/2)
    for iy in range(jy):
        cy = min(by[iy] + (s - 1) / 2.0, ny - 1)  # tile centres (px)
        cxs = np.minimum(bx + (s - 1) / 2.0, nx - 1)
        tot = shifts[None, :, :] + model.shift(cxs[:, None], np.full((jx, 1), cy), np.arange(n)[None, :])
        off = np.rint(tot)  # [jx, n, 2]
        frac = tot - off
        y0 = np.full(jx, by[iy] - ramp // 2 - m)
        x0 = bx - ramp // 2 - m
        reg = _gather_tiles(frames, y0, x0, off.astype(np.int64), (size, size), xp).astype(xp.float32)
        mean = reg.mean(axis=(-2, -1), keepdims=True)
        spec = _fft(xp).rfft2((reg - mean) * win_taper)
        del reg
        spec = _shifted(spec, ky, kx, frac, xp, out=spec)
        dc = mean.sum(axis=1)[:, 0, 0]  # [jx] mean level of the summed frames
        wy = _ramp_weights(sup, iy > 0, iy < jy - 1, ramp)
        ys, ye = by[iy] - ramp // 2, by[iy] - ramp // 2 + sup
        cy0, cy1 = max(ys, 0), min(ye, ny)
        for target, weights in ((out, None), (out_dw, dose_stack if dose is not None else None)):
            if target is None:
                continue
            acc = (spec * weights).sum(axis=1) if weights is not None else spec.sum(axis=1)
            img = _fft(xp).irfft2(acc, s=(size, size))[:, m:m + sup, m:m + sup] + dc[:, None, None]
            for ix in range(jx):
                wx = _ramp_weights(sup, ix > 0, ix < jx - 1, ramp)
                xs, xe = bx[ix] - ramp // 2, bx[ix] - ramp // 2 + sup
                cx0, cx1 = max(xs, 0), min(xe, nx)
                wgt = xp.asarray(np.outer(wy[cy0 - ys:cy1 - ys], wx[cx0 - xs:cx1 - xs]), dtype=xp.float32)
                target[cy0:cy1, cx0:cx1] += img[ix, cy0 - ys:cy1 - ys, cx0 - xs:cx1 - xs] * wgt
        del spec
    return out, out_dw, s


def apply_shifts_and_sum(frames, shifts, local_model: LocalModel | None = None, *, pixel_size: float | None = None,
                         dose_per_frame: float | None = None, voltage: float = 300.0, pre_exposure: float = 0.0,
                         want_plain: bool = True, tile_spacing: int | None = None) -> Sums:
    """Align and sum the frames, with and without dose weighting.

    Parameters
    ----------
    frames : array ``[n, ny, nx]``
    shifts : array ``[n, 2]``
        Whole-frame shifts (dx, dy) px, Conveyor's sign: frame f is shifted by ``-shifts[f]``.
    local_model : LocalModel, optional
        Residual local deformation added to ``shifts`` (applied when given, whatever its
        ``use`` flag says).
    pixel_size, dose_per_frame, voltage, pre_exposure
        For dose weighting; when ``dose_per_frame`` is None no dose-weighted sum is made.
    want_plain : bool
        Also make the sum without dose weighting.
    tile_spacing : int, optional
        Tile size (px) for the local model; default from the model's largest gradient so that
        the shift changes by at most 0.4 px from one tile centre to the next (32 px minimum).

    Returns
    -------
    Sums
        ``sum`` and ``dose_weighted`` float32 images ``[ny, nx]`` (device arrays).

    Notes
    -----
    Whole-frame shifts are applied as Fourier phase ramps (exact, circular: the strip a frame
    moves away from is filled from the opposite edge). With a local model the tiles repeat
    the edge pixels instead.
    """
    return _sums(frames, shifts, local_model, pixel_size=pixel_size, dose_per_frame=dose_per_frame, voltage=voltage,
                 pre_exposure=pre_exposure, want_plain=want_plain, tile_spacing=tile_spacing)


def _sums(frames, shifts, local_model, *, pixel_size, dose_per_frame, voltage, pre_exposure, want_plain,
          tile_spacing) -> Sums:
    """:func:`apply_shifts_and_sum` (with the pixel size checked and the shifts as float64)."""
    xp = backend.array_module(frames)
    n = frames.shape[0]
    shifts = np.asarray(shifts, dtype=np.float64).reshape(n, 2)
    dose_args = None
    if dose_per_frame is not None:
        ps = _check_pixel_size(pixel_size)
        dose_args = (ps, float(dose_per_frame), n, float(voltage), float(pre_exposure))
    if local_model is None:
        dose = _DoseFilter(frames.shape[1:], *dose_args, xp=xp) if dose_args else None
        plain, dw = _sum_global(frames, shifts, dose, xp, want_plain)
        return Sums(plain, dw, None)
    plain, dw, spacing = _sum_local(frames, shifts, local_model, dose_args, xp, tile_spacing, want_plain)
    return Sums(plain, dw, spacing)


# ----------------------------------------------------------------------------------------
# The whole step
# ----------------------------------------------------------------------------------------


@dataclass
class MotionResult:
    """Output of :func:`correct_motion`.

    Attributes
    ----------
    dose_weighted_sum : array [ny, nx] float32
        Aligned, dose-weighted sum (for picking and everything downstream).
    sum : array [ny, nx] float32
        Aligned sum without dose weighting (for CTF estimation).
    shifts : numpy.ndarray [n, 2]
        Whole-frame shifts (dx, dy) px, content displacement relative to frame 1.
    local_model : LocalModel or None
        The patch model (None when patch alignment was off); applied only when
        ``local_model.use``.
    pixel_size, dose_per_frame, voltage, pre_exposure : float
    info : dict
        Diagnostics: iterations, convergence, timings (s), tile spacing, alignment grid.
    """

    dose_weighted_sum: object
    sum: object
    shifts: np.ndarray
    local_model: LocalModel | None
    pixel_size: float
    dose_per_frame: float
    voltage: float
    pre_exposure: float
    info: dict = field(default_factory=dict)

    @property
    def local_applied(self) -> bool:
        return self.local_model is not None and self.local_model.use

    def shifts_at(self, x, y):
        """Total shifts [n, 2] (px) at pixel (x, y): whole-frame + local model (if applied)."""
        if not self.local_applied:
            return self.shifts.copy()
        z = np.arange(len(self.shifts))
        return self.shifts + self.local_model.shift(np.full(len(z), float(x)), np.full(len(z), float(y)), z)


def auto_patch_group(dose_per_frame: float, pixel_size: float, n_frames: int | None = None) -> int:
    """Frames per group for patch alignment: enough for ~1 e/px per group (1-5, at most n/3).

    At the usual 1-1.5 e/Å² per frame and ~1 Å pixels every frame is aligned on its own;
    movies with many low-dose frames are grouped.
    """
    e_per_px = max(float(dose_per_frame or 0.0), 1e-6) * float(pixel_size) ** 2
    g = min(max(int(math.ceil(1.0 / e_per_px - 1e-9)), 1), 5)
    if n_frames is not None:
        g = max(1, min(g, int(n_frames) // 3))
    return g


def correct_motion(frames, pixel_size: float, dose_per_frame: float, voltage: float = 300.0, patches=(5, 5),
                   bfactor: float = 150.0, *, pre_exposure: float = 0.0, binning: float = 1, max_iter: int = 20,
                   tol: float = 0.01, max_shift: float | None = None, group: int = 1, patch_group: int | None = None,
                   patch_bfactor: float | None = None, smooth="auto", dose_weighting: bool = True,
                   tile_spacing: int | None = None) -> MotionResult:
    """Motion-correct one movie: whole-frame alignment, patch model, aligned and dose-weighted sums.

    Parameters
    ----------
    frames : array ``[n, ny, nx]`` (numpy or cupy)
        Gain-corrected frames.
    pixel_size : float
        Å/px.
    dose_per_frame : float
        e/Å² per frame (0 disables dose weighting: both sums are then equal).
    voltage : float
        kV (for dose weighting).
    patches : (npx, npy) or None
        Patch grid for local alignment; None, 0 or anything with fewer than 2 patches along
        an axis for whole-frame alignment only.
    bfactor : float
        Cross-correlation low-pass (Å², ``exp(-B k²/4)`` per image).
    pre_exposure : float
        e/Å² before frame 1.
    binning, max_iter, tol, max_shift, group
        Whole-frame alignment options (see :func:`align_frames`); ``binning`` and
        ``max_iter`` apply to the patch alignment too.
    smooth : float or "auto"
        Smoothing of the whole-frame trajectory (see :func:`align_frames`); default
        ``"auto"``.
    patch_group : int, optional
        Frames per group in patch alignment; default from the dose
        (:func:`auto_patch_group`).
    patch_bfactor : float, optional
        B-factor for the patches (default ``bfactor``).
    dose_weighting : bool
        Make the dose-weighted sum (else ``dose_weighted_sum`` is the plain sum).
    tile_spacing : int, optional
        Tile size for summing with the local model (see :func:`apply_shifts_and_sum`).

    Returns
    -------
    MotionResult
    """
    _check_frames(frames)
    pixel_size = _check_pixel_size(pixel_size)
    if dose_per_frame is None or not (float(dose_per_frame) >= 0 and math.isfinite(float(dose_per_frame))):
        raise InputError("dose_per_frame", f"dose per frame must be >= 0 e/Å², got {dose_per_frame!r}",
                         "pass the exposure per frame in e/Å²")
    xp = backend.array_module(frames)
    n, ny, nx = frames.shape
    use_patches = patches is not None and not isinstance(patches, (int, float)) and len(patches) == 2 \
        and min(int(patches[0]), int(patches[1])) >= 2
    pb = bfactor if patch_bfactor is None else patch_bfactor
    bands = [(bfactor, ALIGN_BAND)] + ([(pb, PATCH_BAND)] if use_patches else [])
    size = tuple(max(_band_size(m, pixel_size, b, binning, band) for b, band in bands) for m in (ny, nx))
    t0 = time.perf_counter()
    # one FFT per frame, whose Fourier crop feeds both alignments; the sums transform the
    # frames again instead of keeping the spectra (2.7 GB for 4096² x 40, 19 GB for a 50-frame
    # super-resolution K3 movie; measured trade-off in docs/algorithms/motion.md §0)
    binned = _prepare(frames, size, xp)
    t1 = time.perf_counter()
    shifts, ginfo = _align_binned(binned, (ny, nx), pixel_size, bfactor, max_iter=max_iter, binning=binning, tol=tol,
                                  max_shift=max_shift, group=group, smooth=smooth, return_info=True)
    t2 = time.perf_counter()
    model = None
    if use_patches:
        pg = patch_group if patch_group is not None else auto_patch_group(dose_per_frame, pixel_size, n)
        model = _local_binned(binned, (ny, nx), shifts, patches, pixel_size=pixel_size, bfactor=pb, group=pg,
                              max_iter=max_iter, binning=binning)
    del binned
    t3 = time.perf_counter()
    do_dw = dose_weighting and dose_per_frame and dose_per_frame > 0
    sums = _sums(frames, shifts, model if (model is not None and model.use) else None, pixel_size=pixel_size,
                 dose_per_frame=dose_per_frame if do_dw else None, voltage=voltage, pre_exposure=pre_exposure,
                 want_plain=True, tile_spacing=tile_spacing)
    t4 = time.perf_counter()
    info = dict(ginfo)
    info.update(time_fft=t1 - t0, time_global=t2 - t1, time_local=t3 - t2, time_sum=t4 - t3, time_total=t4 - t0,
                tile_spacing=sums.tile_spacing)
    dw = sums.dose_weighted if sums.dose_weighted is not None else sums.sum
    return MotionResult(dw, sums.sum, shifts, model, pixel_size, float(dose_per_frame or 0.0), float(voltage),
                        float(pre_exposure), info)
