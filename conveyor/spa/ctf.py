"""CTF estimation from the Thon rings of a micrograph (native, numpy or cupy).

The method follows CTFFIND4 (Rohou & Grigorieff, JSB 192:216, 2015); details and measured
accuracy in ``docs/algorithms/ctf.md``.

1. **Spectrum.** The micrograph is cut into overlapping square tiles (``tile`` px, 50 %
   overlap); each tile has its mean removed and a narrow cosine edge taper applied (this
   suppresses the cross that tile edges otherwise leave in the spectrum); the power spectra
   of all tiles are averaged and the amplitude spectrum ``sqrt(PS)`` is fitted.
2. **Band and first background.** Only frequencies between ``1/res_range[0]`` and
   ``1/res_range[1]`` (clipped to Nyquist) are fitted. A cubic polynomial fitted to the
   log rotational average is the first background; ``amp/background - 1`` is the relative
   ring modulation.
3. **Search.** An exhaustive 1D search over the mean defocus (and the phase shift with
   ``phase_shift=True``) correlates the radial profile with the bin-averaged CTF². Starting
   points for the 2D fit come from grids over astigmatism magnitude and angle around the 1D
   candidates (scored by the normalised cross-correlation, NCC, with CTF² on the band's
   low-resolution part and on the whole band) and from 1D searches in eight angular
   sectors; each is refined by Nelder-Mead on (mean defocus, two astigmatism components
   [, phase shift]) and the best NCC wins.
4. **Least squares.** The final refinement fits ``amp ≈ b(k) + e(k)·CTF²`` with smooth
   background ``b`` and envelope ``e`` solved by linear least squares for every CTF tried,
   which is unbiased when only a few wide rings are in the band (low defocus, phase plates).
5. **Figure of merit and fit resolution.** The figure of merit is the NCC of
   ``amp/b - 1`` with CTF². For the fit resolution every pixel gets its phase ψ under the
   fitted CTF (CTF = -sin ψ); the background is the spectrum averaged over one period of ψ
   (Thon rings cancel for any defocus and astigmatism); the 1D equiphase average
   (astigmatism-aware) is correlated with the fit in a sliding window of two periods and
   the fit ends where that correlation falls below 0.5 after having been above 0.66
   (CTFFIND4's thresholds). It is searched up to Nyquist, the aliasing limit (rings closer
   than 3 spectrum pixels) or the Cs phase turnover, so it can be finer than the fitting
   band's high-resolution limit.

The CTF is :mod:`conveyor.spa.ctfmodel`'s; the fit evaluates it through the phase ψ with
the pixel geometry precomputed (one sine per pixel and evaluation), checked against
:func:`conveyor.spa.ctfmodel.ctf_at` in the tests.

Conventions
-----------
* Defocus in Å, positive = underfocus; ``defocus_u >= defocus_v`` always.
* ``defocus_angle`` in degrees, in ``(-90, 90]``: direction of the U axis from +x (array
  axis 1) towards +y (array axis 0), RELION's convention as in :mod:`conveyor.spa.ctfmodel`.
* ``phase_shift`` in degrees in ``[0, 180)`` (CTF² is periodic in it with 180°).
* :func:`power_spectrum` returns the centred spectrum (zero frequency at ``[n//2, n//2]``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
from scipy import optimize

from .. import backend
from ..errors import InputError
from .ctfmodel import ctf_at, electron_wavelength, frequency_grid

log = logging.getLogger(__name__)

#: Sub-bins per CTF period (π in phase) for the equiphase average.
_NSUB = 12
#: Upper frequency (1/Å) of the sub-band used for the astigmatism grid search.
_GRID_K = 0.1
#: Rings closer than this many spectrum pixels are considered aliased.
_ALIAS_PX = 3.0
#: CTFFIND4's thresholds for the fit resolution.
_FRC_LOW, _FRC_SIGNIFICANT, _FRC_HIGH = 0.1, 0.5, 0.66


@dataclass
class CTFResult:
    """A fitted CTF.

    Attributes
    ----------
    defocus_u, defocus_v : float
        Å, positive = underfocus, ``defocus_u >= defocus_v``.
    defocus_angle : float
        Degrees in (-90, 90], angle of the U axis from +x.
    phase_shift : float
        Degrees in [0, 180) (0 unless fitted with ``phase_shift=True``).
    fom : float
        Figure of merit: normalised cross-correlation between the background-subtracted
        spectrum and CTF² in the fitting band (RELION's rlnCtfFigureOfMerit).
    max_resolution : float
        Å, the fit resolution (RELION's rlnCtfMaxResolution).
    pixel_size, voltage, cs, amplitude_contrast :
        Å/px, kV, mm and fraction used for the fit.
    tile : int
        Tile size (px) of the spectrum.
    res_range : tuple of float
        Fitting band (low, high) in Å actually used.
    spectrum_data, spectrum_fit : numpy.ndarray
        Centred ``tile × tile`` background-subtracted spectrum and the fitted CTF² on the
        same scale (for diagnostics).
    profile : dict of numpy.ndarray
        1D equiphase average: ``k`` (1/Å, equivalent frequency at the mean defocus),
        ``data``, ``fit`` and ``cc`` (sliding-window correlation).
    """

    defocus_u: float
    defocus_v: float
    defocus_angle: float
    phase_shift: float
    fom: float
    max_resolution: float
    pixel_size: float
    voltage: float
    cs: float
    amplitude_contrast: float
    tile: int
    res_range: tuple
    spectrum_data: np.ndarray | None = field(default=None, repr=False)
    spectrum_fit: np.ndarray | None = field(default=None, repr=False)
    profile: dict | None = field(default=None, repr=False)

    @property
    def astigmatism(self) -> float:
        """``|defocus_u - defocus_v|`` in Å."""
        return abs(self.defocus_u - self.defocus_v)

    @property
    def defocus_mean(self) -> float:
        """``(defocus_u + defocus_v) / 2`` in Å."""
        return 0.5 * (self.defocus_u + self.defocus_v)

    def star_row(self, micrograph_name: str) -> dict:
        """One row of a RELION ``data_micrographs`` block."""
        return {
            "rlnMicrographName": str(micrograph_name),
            "rlnDefocusU": float(self.defocus_u),
            "rlnDefocusV": float(self.defocus_v),
            "rlnDefocusAngle": float(self.defocus_angle),
            "rlnPhaseShift": float(self.phase_shift),
            "rlnCtfFigureOfMerit": float(self.fom),
            "rlnCtfMaxResolution": float(self.max_resolution),
            "rlnCtfAstigmatism": float(self.astigmatism),
            "rlnVoltage": float(self.voltage),
            "rlnSphericalAberration": float(self.cs),
            "rlnAmplitudeContrast": float(self.amplitude_contrast),
            "rlnMicrographPixelSize": float(self.pixel_size),
        }


# --------------------------------------------------------------------------------------
# Power spectrum
# --------------------------------------------------------------------------------------


def _fft_module(xp):
    """scipy.fft for numpy (several times faster for float32), the array module's fft otherwise."""
    if xp is np:
        import scipy.fft  # noqa: PLC0415

        return scipy.fft
    return xp.fft


def _tile_starts(n: int, tile: int, step: int) -> list[int]:
    count = (n - tile) // step + 1
    offset = (n - tile - (count - 1) * step) // 2
    return [offset + i * step for i in range(count)]


def _taper(tile: int, xp, fraction: float = 0.1):
    """Separable window: 1 inside, raised-cosine edges over ``fraction/2`` of the tile each side."""
    w = np.ones(tile, dtype=np.float32)
    m = max(1, int(round(fraction * tile / 2)))
    ramp = 0.5 - 0.5 * np.cos(np.pi * (np.arange(m) + 0.5) / m)
    w[:m] = ramp
    w[-m:] = ramp[::-1]
    return xp.asarray(np.outer(w, w))


def _check_tile(tile, shape) -> int:
    tile = int(tile)
    if tile < 64:
        raise InputError("tile", f"tile size must be at least 64 px, got {tile}", "use --tile 256 or 512")
    limit = min(shape)
    if tile > limit:
        new = limit - limit % 2
        if new < 64:
            raise InputError(
                "micrograph", f"image of {shape[1]}x{shape[0]} px is too small for CTF estimation", "use a full micrograph"
            )
        log.warning("tile of %d px is larger than the image %s; using %d px", tile, shape, new)
        tile = new
    return tile - tile % 2


def _power_spectrum_rfft(image, tile: int, overlap: float, batch: int = 16):
    """Average tile power spectrum in rfft layout ``(tile, tile//2 + 1)``, float64."""
    xp = backend.array_module(image)
    img = xp.asarray(image, dtype=xp.float32)
    ny, nx = img.shape
    if not 0.0 <= overlap < 1.0:
        raise InputError("overlap", f"tile overlap must be in [0, 1), got {overlap}", "use 0.5")
    step = max(1, int(round(tile * (1.0 - overlap))))
    corners = [(y, x) for y in _tile_starts(ny, tile, step) for x in _tile_starts(nx, tile, step)]
    win = _taper(tile, xp)
    wnorm = float((win * win).sum())
    fft = _fft_module(xp)
    acc = xp.zeros((tile, 2 * (tile // 2 + 1)), dtype=xp.float64)
    for i in range(0, len(corners), batch):
        stack = xp.stack([img[y : y + tile, x : x + tile] for y, x in corners[i : i + batch]])
        stack -= stack.mean(axis=(1, 2), keepdims=True)
        stack *= win
        f = fft.rfft2(stack).view(xp.float32)  # (re, im) pairs
        acc += (f * f).sum(axis=0, dtype=xp.float64)
    acc = acc[:, 0::2] + acc[:, 1::2]
    return acc / (len(corners) * wnorm)


def _full_centred(half, n: int):
    """Full ``n × n`` centred array from an rfft-layout array (Friedel symmetric)."""
    xp = backend.array_module(half)
    full = xp.empty((n, n), dtype=half.dtype)
    full[:, : n // 2 + 1] = half
    iy = xp.asarray((-np.arange(n)) % n)
    ix = xp.asarray(n - np.arange(n // 2 + 1, n))
    full[:, n // 2 + 1 :] = half[iy][:, ix]
    return xp.fft.fftshift(full)


def power_spectrum(image, tile: int = 512, overlap: float = 0.5):
    """Average power spectrum of overlapping tiles of a micrograph.

    Parameters
    ----------
    image : array_like, 2D ``[y, x]``
        Micrograph (numpy or cupy); use the non-dose-weighted sum for CTF estimation.
    tile : int
        Tile size in px (even; reduced to the image size when larger).
    overlap : float
        Fraction of overlap between neighbouring tiles.

    Returns
    -------
    ndarray ``(tile, tile)``
        **Centred** power spectrum (zero frequency at ``[tile//2, tile//2]``), the mean of
        ``|FFT|²`` of the mean-subtracted, edge-tapered tiles divided by the window energy
        (so white noise of variance σ² gives σ²). No background subtraction. Same array
        module as ``image``.
    """
    xp = backend.array_module(image)
    img = xp.asarray(image)
    if img.ndim != 2:
        raise InputError("micrograph", f"expected a 2D image, got shape {tuple(img.shape)}", "pass one micrograph")
    tile = _check_tile(tile, img.shape)
    return _full_centred(_power_spectrum_rfft(img, tile, overlap), tile)


# --------------------------------------------------------------------------------------
# Model helpers
# --------------------------------------------------------------------------------------


class _Geom:
    """Frequency geometry of a set of spectrum pixels: k², k⁴, cos 2θ, sin 2θ (θ from +x)."""

    def __init__(self, kx, ky):
        xp = backend.array_module(kx)
        self.xp = xp
        self.kx, self.ky = kx, ky
        self.k2 = kx * kx + ky * ky
        self.k4 = self.k2 * self.k2
        safe = xp.where(self.k2 > 0, self.k2, 1.0)
        self.c2 = (kx * kx - ky * ky) / safe
        self.s2 = 2.0 * kx * ky / safe
        self.size = int(self.k2.size)

    def subset(self, mask) -> "_Geom":
        return _Geom(self.kx[mask], self.ky[mask])


class _Optics:
    def __init__(self, voltage, cs, amplitude_contrast):
        self.voltage = float(voltage)
        self.cs = float(cs)
        self.w = float(amplitude_contrast)
        self.lam = float(electron_wavelength(self.voltage))
        self.cs_a = self.cs * 1e7
        # -(sqrt(1-w²) sin χ + w cos χ) = -sin(χ + alpha)
        self.alpha = math.atan2(self.w, math.sqrt(1.0 - self.w * self.w))

    def ctf2(self, g: "_Geom", u, v, angle, phase):
        """CTF² at the pixels ``g`` for scalars or broadcastable arrays of parameters.

        Same model as :func:`conveyor.spa.ctfmodel.ctf_at` (CTF = -sin ψ), written with the
        pixel geometry precomputed (k², cos 2θ, sin 2θ) so that the many evaluations of a
        fit need one sine per pixel; ``tests/spa/test_ctf.py`` checks the two agree.
        """
        xp = g.xp
        if np.isscalar(angle):
            cos2, sin2 = math.cos(2.0 * math.radians(angle)), math.sin(2.0 * math.radians(angle))
        else:
            a2 = 2.0 * xp.deg2rad(angle)
            cos2, sin2 = xp.cos(a2), xp.sin(a2)
        ph = math.radians(phase) if np.isscalar(phase) else xp.deg2rad(phase)
        dm = 0.5 * (u + v)
        h = 0.5 * (u - v)
        dz = dm + h * (cos2 * g.c2 + sin2 * g.s2)
        psi = (math.pi * self.lam) * dz * g.k2 - (0.5 * math.pi * self.cs_a * self.lam**3) * g.k4 + ph + self.alpha
        sp = xp.sin(psi)
        return sp * sp

    def psi(self, g: "_Geom", dm, ac, as_, phase):
        """Total phase ψ = χ + atan(w/√(1-w²)), so that CTF = -sin ψ (χ as in ctfmodel)."""
        dz = dm + ac * g.c2 + as_ * g.s2
        return (
            math.pi * self.lam * dz * g.k2
            - 0.5 * math.pi * self.cs_a * self.lam**3 * g.k4
            + math.radians(phase)
            + self.alpha
        )

    def psi_radial(self, k, dz, phase):
        """Phase ψ at frequency ``k`` (1/Å) for defocus ``dz`` without astigmatism."""
        k2 = k * k
        return math.pi * self.lam * dz * k2 - 0.5 * math.pi * self.cs_a * self.lam**3 * k2 * k2 + math.radians(phase) + self.alpha

    def s_of_psi(self, psi, dz, phase):
        """Squared frequency (1/Å²) at which the CTF of defocus ``dz`` reaches phase ``psi``."""
        c = psi - math.radians(phase) - self.alpha
        a = math.pi * self.lam * dz
        b = 0.5 * math.pi * self.cs_a * self.lam**3
        if b <= 0:
            return c / a
        disc = np.maximum(a * a - 4.0 * b * c, 0.0)
        return 2.0 * c / (a + np.sqrt(disc))

    def k_alias(self, dz, tile, pixel_size, kmax):
        """Lowest frequency (≤ kmax) where rings of defocus ``dz`` are closer than _ALIAS_PX pixels."""
        k = np.linspace(1e-4, kmax, 4000)
        slope = 2 * math.pi * self.lam * dz * k - 2 * math.pi * self.cs_a * self.lam**3 * k**3
        period_px = math.pi / np.maximum(np.abs(slope), 1e-12) * tile * pixel_size
        bad = np.nonzero(period_px < _ALIAS_PX)[0]
        return float(k[bad[0]]) if bad.size else float(kmax)

    def k_turnover(self, dz):
        """Frequency where the phase stops increasing (Cs turnover) for defocus ``dz``."""
        if self.cs_a <= 0:
            return math.inf
        return math.sqrt(max(dz, 1.0) / (self.cs_a * self.lam**2))


def _params_to_uv(dm, ac, as_):
    h = math.hypot(ac, as_)
    angle = 0.5 * math.degrees(math.atan2(as_, ac))
    if angle <= -90.0:
        angle += 180.0
    return dm + h, dm - h, angle


def _uv_to_params(u, v, angle):
    h = 0.5 * (u - v)
    return 0.5 * (u + v), h * math.cos(2 * math.radians(angle)), h * math.sin(2 * math.radians(angle))


class _Fit2D:
    """Normalised cross-correlation of a fixed set of spectrum pixels with CTF²."""

    def __init__(self, optics: _Optics, g: _Geom, data):
        xp = backend.array_module(data)
        self.xp = xp
        self.optics = optics
        self.g = g
        d = data - data.mean()
        self.d = d / xp.sqrt((d * d).sum())

    def ncc_batch(self, u, v, angle, phase, chunk_elems: int = 4_000_000):
        """NCC for arrays of parameters (host numpy, length M); returns host numpy (M,).

        Evaluated in float32 (phase errors < 1e-5 rad): this is the grid search."""
        xp = self.xp
        n = self.g.size
        m_total = len(u)
        out = np.empty(m_total)
        step = max(1, chunk_elems // max(n, 1))
        row = _Geom.__new__(_Geom)
        row.xp = xp
        row.k2, row.k4, row.c2, row.s2 = (a.astype(xp.float32)[None, :] for a in (self.g.k2, self.g.k4, self.g.c2, self.g.s2))
        d32 = self.d.astype(xp.float32)
        for i in range(0, m_total, step):
            sl = slice(i, i + step)
            col = lambda a: xp.asarray(np.asarray(a[sl], dtype=np.float32))[:, None]  # noqa: E731
            m = self.optics.ctf2(row, col(u), col(v), col(angle), col(phase))
            # d has zero mean: m need not be centred. einsum, not BLAS: small products
            # are much slower through a multithreaded BLAS on a busy machine.
            num = xp.einsum("ij,j->i", m, d32).astype(xp.float64)
            s1 = m.sum(axis=1).astype(xp.float64)
            s2 = xp.einsum("ij,ij->i", m, m).astype(xp.float64)
            var = s2 - s1 * s1 / n
            out[sl] = backend.to_host(num / xp.sqrt(xp.where(var > 0, var, xp.inf)))
        return out

    def ncc(self, u, v, angle, phase) -> float:
        m = self.optics.ctf2(self.g, u, v, angle, phase)
        s1 = float(m.sum())
        var = float((m * m).sum()) - s1 * s1 / self.g.size
        return float((m * self.d).sum()) / math.sqrt(var) if var > 0 else 0.0


class _FitLS:
    """Weighted least-squares fit of ``amp ≈ b(k) + e(k)·CTF²`` with smooth radial background
    b and envelope e (polynomials in k) profiled out for every CTF: the residual is a
    function of the CTF parameters only. Unlike a correlation after a fixed background
    subtraction, this is unbiased when only a few wide rings are in the band (low defocus,
    phase plates)."""

    def __init__(self, optics: _Optics, g: _Geom, amp, weight, k_lo, k_top, dk, deg_b=4, deg_e=2):
        xp = backend.array_module(amp)
        self.xp, self.optics, self.g = xp, optics, g
        self.amp, self.w = amp, weight
        self.k_lo, self.k_top = k_lo, k_top
        kk = xp.sqrt(g.k2)
        self.kk = kk
        nb = max(deg_b + deg_e + 4, int(math.ceil(2.0 * (k_top - k_lo) / dk)))
        width = (k_top - k_lo) / nb
        self.idx = xp.clip(((kk - k_lo) / width).astype(xp.int64), 0, nb - 1)
        self.nb = nb
        self.wsum = self._bin(weight)
        ok = self.wsum > 0
        kb = self._bin(weight * kk) / np.where(ok, self.wsum, 1.0)
        xb = 2.0 * (kb - k_lo) / (k_top - k_lo) - 1.0
        self.P = np.vander(xb, deg_b + 1)
        self.Q = np.vander(xb, deg_e + 1)
        self.deg_b = deg_b
        self.s_a = self._bin(weight * amp)
        self.s_aa = float(self._bin(weight * amp * amp).sum())
        self.bpp = (self.P * self.wsum[:, None]).T @ self.P
        self.ya = self.P.T @ self.s_a

    def _bin(self, values):
        return backend.to_host(self.xp.bincount(self.idx, weights=values, minlength=self.nb))

    def _solve(self, u, v, angle, phase):
        m = self.optics.ctf2(self.g, u, v, angle, phase)
        s_m = self._bin(self.w * m)
        s_mm = self._bin(self.w * m * m)
        s_ma = self._bin(self.w * m * self.amp)
        bpq = (self.P * s_m[:, None]).T @ self.Q
        bqq = (self.Q * s_mm[:, None]).T @ self.Q
        lhs = np.block([[self.bpp, bpq], [bpq.T, bqq]])
        rhs = np.concatenate([self.ya, self.Q.T @ s_ma])
        try:
            theta = np.linalg.solve(lhs, rhs)
        except np.linalg.LinAlgError:
            theta = np.linalg.lstsq(lhs, rhs, rcond=None)[0]
        return theta, rhs, m

    def rss(self, u, v, angle, phase) -> float:
        """Weighted residual sum of squares, relative to the total (0: perfect fit)."""
        theta, rhs, _ = self._solve(u, v, angle, phase)
        return (self.s_aa - float(theta @ rhs)) / self.s_aa

    def background(self, u, v, angle, phase, kk=None):
        """The fitted background b(k) at the fit pixels (or at frequencies ``kk``), or None if not positive."""
        theta, _, _ = self._solve(u, v, angle, phase)
        coef = theta[: self.deg_b + 1]
        kk = self.kk if kk is None else kk
        bg = _polyval(coef, 2.0 * (kk - self.k_lo) / (self.k_top - self.k_lo) - 1.0)
        if float(bg.min()) <= 0:
            return None
        return bg


# --------------------------------------------------------------------------------------
# Estimation
# --------------------------------------------------------------------------------------


def _validate(pixel_size, voltage, cs, amplitude_contrast, defocus_range, res_range):
    if not (pixel_size and pixel_size > 0 and math.isfinite(pixel_size)):
        raise InputError("pixel_size", f"pixel size must be positive, got {pixel_size}", "pass the pixel size in Å/px")
    if not voltage > 0:
        raise InputError("voltage", f"voltage must be positive (kV), got {voltage}", "e.g. 300")
    if not cs >= 0:
        raise InputError("cs", f"spherical aberration must be >= 0 (mm), got {cs}", "e.g. 2.7")
    if not 0 <= amplitude_contrast < 1:
        raise InputError("amplitude_contrast", f"amplitude contrast must be in [0, 1), got {amplitude_contrast}", "e.g. 0.1")
    dmin, dmax = (float(x) for x in defocus_range)
    if not 0 < dmin < dmax:
        raise InputError("defocus_range", f"need 0 < defocus min < defocus max (Å), got {dmin}, {dmax}", "e.g. 5000 50000")
    rlo, rhi = (float(x) for x in res_range)
    if not rlo > rhi > 0:
        raise InputError("res_range", f"need low-resolution limit > high-resolution limit > 0 (Å), got {rlo}, {rhi}", "e.g. 30 5")
    nyq = 2.0 * pixel_size
    if rlo <= nyq * 1.5:
        raise InputError(
            "res_range", f"low-resolution limit {rlo} Å is too close to Nyquist ({nyq:.2f} Å)", "use a lower resolution limit, e.g. 30 Å"
        )
    if rhi < nyq * 1.02:
        log.info("high-resolution limit %.2f Å is beyond Nyquist; using %.2f Å", rhi, nyq * 1.02)
        rhi = nyq * 1.02
    return (dmin, dmax), (rlo, rhi)


def _pearson_rows(r, m, w):
    """Weighted Pearson correlation of vector r with each row of m (weights w)."""
    w = w / w.sum()
    rc = r - (w * r).sum()
    mc = m - (m * w).sum(axis=1, keepdims=True)
    num = (mc * (w * rc)).sum(axis=1)
    den = np.sqrt((w * rc * rc).sum() * (mc * mc * w).sum(axis=1))
    return num / np.where(den > 0, den, 1.0)


def _binned_ctf2(optics, e_lo, e_hi, dgrid, phase):
    """CTF² of each defocus in ``dgrid`` averaged over the radial bins ``[e_lo, e_hi)``,
    shape ``(len(dgrid), n_bins)``, without astigmatism.

    Pixels are spread uniformly in k² and hence (Cs aside) in the phase ψ, so the average
    of sin²ψ over a bin is ``1/2 - (sin 2ψ_hi - sin 2ψ_lo) / (4 (ψ_hi - ψ_lo))``: exact,
    and flat (1/2) where the rings are denser than the bins, as the data are.
    """
    dz = np.asarray(dgrid, dtype=np.float64)[:, None]
    p_lo = optics.psi_radial(e_lo[None, :], dz, phase)
    p_hi = optics.psi_radial(e_hi[None, :], dz, phase)
    dp = p_hi - p_lo
    small = np.abs(dp) < 1e-6
    avg = 0.5 - (np.sin(2.0 * p_hi) - np.sin(2.0 * p_lo)) / (4.0 * np.where(small, 1.0, dp))
    return np.where(small, np.sin(0.5 * (p_lo + p_hi)) ** 2, avg)


def _search_1d(optics, e_lo, e_hi, counts, r, dgrid, pgrid):
    """Scores ``[n_phase, n_defocus]``: weighted correlation of the relative radial profile
    ``r`` (bins ``[e_lo, e_hi)``, pixel counts ``counts``) with the bin-averaged CTF²."""
    scores = np.empty((len(pgrid), len(dgrid)))
    for ip, ph in enumerate(pgrid):
        scores[ip] = _pearson_rows(r, _binned_ctf2(optics, e_lo, e_hi, dgrid, ph), counts)
    return scores


def _sector_start(optics, theta, idx, amp_rel, edges, dgrid, phase, n_sectors=8):
    """Astigmatism from 1D searches in angular sectors: the best defocus of each sector,
    then a robust fit of Δz(θ) = dm + ac·cos 2θ + as·sin 2θ. Returns ``(dm, ac, as)`` or None."""
    xp = backend.array_module(amp_rel)
    nb = len(edges) - 1
    sec = xp.clip((theta / (math.pi / n_sectors)).astype(xp.int64), 0, n_sectors - 1)
    key = idx + nb * sec
    cnt = backend.to_host(xp.bincount(key, minlength=nb * n_sectors)).astype(np.float64).reshape(n_sectors, nb)
    tot = backend.to_host(xp.bincount(key, weights=amp_rel, minlength=nb * n_sectors)).reshape(n_sectors, nb)
    best = np.empty(n_sectors)
    for s_ in range(n_sectors):
        ok = cnt[s_] > 0
        if ok.sum() < 8:
            return None
        sc = _search_1d(optics, edges[:-1][ok], edges[1:][ok], cnt[s_][ok], tot[s_][ok] / cnt[s_][ok], dgrid, [phase])[0]
        best[s_] = dgrid[int(np.argmax(sc))]
    ang = (np.arange(n_sectors) + 0.5) * (math.pi / n_sectors)
    design = np.stack([np.ones(n_sectors), np.cos(2 * ang), np.sin(2 * ang)], axis=1)
    keep = np.ones(n_sectors, dtype=bool)
    for _ in range(2):  # drop up to two outlying sectors
        coef = np.linalg.lstsq(design[keep], best[keep], rcond=None)[0]
        res = np.abs(best - design @ coef)
        res[~keep] = -1.0
        worst = int(np.argmax(res))
        if res[worst] <= max(3.0 * np.median(res[keep]), 300.0) or keep.sum() <= 5:
            break
        keep[worst] = False
    coef = np.linalg.lstsq(design[keep], best[keep], rcond=None)[0]
    return float(coef[0]), float(coef[1]), float(coef[2])


def _polyval(coef, x):
    """Horner evaluation that works for numpy and cupy arrays."""
    out = 0.0 * x + float(coef[0])
    for c in coef[1:]:
        out = out * x + float(c)
    return out


def _refine(fit, x0, bounds):
    """Nelder-Mead on (mean defocus, astigmatism cos/sin components [, phase shift]).

    ``fit`` is a :class:`_Fit2D` (maximise the correlation) or a :class:`_FitLS` (minimise
    the relative residual)."""
    dmin, dmax, hmax, with_phase = bounds
    x0 = np.asarray(x0, dtype=float)

    def cost(p):
        dm, ac, as_ = p[:3]
        ph = p[3] if with_phase else x0[3]
        h = math.hypot(ac, as_)
        if not dmin <= dm <= dmax or h > hmax or dm - h <= 0:
            return 2.0
        u, v, ang = _params_to_uv(dm, ac, as_)
        if isinstance(fit, _FitLS):
            return fit.rss(u, v, ang, ph)
        return -fit.ncc(u, v, ang, ph)

    n = 4 if with_phase else 3
    steps = np.array([150.0, 100.0, 100.0, 15.0])[:n]
    simplex = np.vstack([x0[:n]] + [x0[:n] + np.eye(n)[i] * steps[i] for i in range(n)])
    res = optimize.minimize(
        cost, x0[:n], method="Nelder-Mead", options={"initial_simplex": simplex, "xatol": 1.0, "fatol": 1e-6, "maxiter": 600}
    )
    x = np.array(x0)
    x[:n] = res.x
    return x


def _local_maxima(scores_1d, n):
    s = scores_1d
    idx = [i for i in range(len(s)) if (i == 0 or s[i] >= s[i - 1]) and (i == len(s) - 1 or s[i] >= s[i + 1])]
    idx.sort(key=lambda i: -s[i])
    return idx[:n]


def _grid_rows(cands, step, astig, tolerance):
    """Grid ``(mean defocus, |U-V|, angle, phase)`` around the 1D candidates.

    The angle step shrinks with the astigmatism so that the defocus error it causes,
    ``|U-V|/2 · sin(2·Δθ/2)``, stays below ``tolerance`` (Å; a quarter ring at the band's
    highest frequency), between 3° and 15°.
    """
    rows = []
    for _, dm0, ph in cands:
        for a in astig:
            # the rotational average of an astigmatic spectrum peaks near U or V as well as
            # near the mean: try the candidate as each of them
            offsets = {-step, 0.0, step} if a == 0 else {-0.5 * a, -step, 0.0, step, 0.5 * a}
            if a == 0:
                angles = [0.0]
            else:
                half_step = 0.5 * math.degrees(math.asin(min(1.0, tolerance / (0.5 * a))))
                n_ang = int(math.ceil(180.0 / float(np.clip(2.0 * half_step, 3.0, 15.0))))
                angles = np.arange(n_ang) * (180.0 / n_ang)
            for off in sorted(offsets):
                dm = dm0 + off
                if dm - 0.5 * a <= 0:
                    continue
                rows.extend((dm, a, ang, ph) for ang in angles)
    return np.array(rows)


def _equiphase_background(psi, amp, nsub=_NSUB):
    """Background of ``amp`` as a function of the phase ψ: its mean over one period (π).

    Pixels are binned in ψ (bins of π/nsub); the mean over each run of ``nsub`` bins is a
    sample of the background at the run's centre (Thon rings cancel whatever the defocus
    and astigmatism); half a period beyond the first and last samples the background is
    extrapolated linearly in log. Returns ``(psi_samples, background)`` (host numpy), or
    None when the phase range is shorter than 1.5 periods.
    """
    xp = backend.array_module(psi)
    width = math.pi / nsub
    p0 = float(psi.min())
    nb = int(math.floor((float(psi.max()) - p0) / width)) + 1
    if nb < nsub + nsub // 2 + 2:
        return None
    idx = xp.clip(((psi - p0) / width).astype(xp.int64), 0, nb - 1)
    sums = backend.to_host(xp.bincount(idx, weights=amp, minlength=nb))
    cnt = backend.to_host(xp.bincount(idx, minlength=nb)).astype(np.float64)
    cs = np.concatenate([[0.0], np.cumsum(sums)])
    cc = np.concatenate([[0.0], np.cumsum(cnt)])
    lo = np.arange(nb - nsub + 1)
    n = cc[lo + nsub] - cc[lo]
    bg = (cs[lo + nsub] - cs[lo]) / np.where(n > 0, n, 1.0)
    pos = p0 + (lo + 0.5 * nsub) * width
    if not (bg > 0).all():
        return None
    h = nsub // 2
    lb = np.log(bg)
    head = lb[0] - (lb[h] - lb[0]) / h * h
    tail = lb[-1] + (lb[-1] - lb[-1 - h]) / h * h
    pos = np.concatenate([[pos[0] - h * width], pos, [pos[-1] + h * width]])
    bg = np.exp(np.concatenate([[head], lb, [tail]]))
    return pos, bg


def _windowed_cc(d, m, half):
    """Correlation of d and m in windows of ``2*half+1`` bins (shifted inside the range at
    the ends), and the regression slope of d on m in the same windows (local envelope)."""
    n = len(d)
    half = min(half, (n - 1) // 2)
    c = lambda a: np.concatenate([[0.0], np.cumsum(a)])  # noqa: E731
    sd, sm, sdd, smm, sdm = c(d), c(m), c(d * d), c(m * m), c(d * m)
    lo = np.clip(np.arange(n) - half, 0, n - 2 * half - 1)
    hi = lo + 2 * half + 1
    cnt = hi - lo
    md = (sd[hi] - sd[lo]) / cnt
    mm = (sm[hi] - sm[lo]) / cnt
    cov = (sdm[hi] - sdm[lo]) / cnt - md * mm
    vd = (sdd[hi] - sdd[lo]) / cnt - md * md
    vm = (smm[hi] - smm[lo]) / cnt - mm * mm
    den = np.sqrt(np.maximum(vd * vm, 0.0))
    cc = np.where(den > 0, cov / np.where(den > 0, den, 1.0), 0.0)
    slope = np.where(vm > 0, cov / np.where(vm > 0, vm, 1.0), 0.0)
    return cc, slope, md, mm


def _fit_resolution_index(cc, start):
    """Index of the last bin with a good fit, searching from ``start`` (None: no good fit).

    CTFFIND4's thresholds: once more than 3 bins had a correlation above 0.66, the fit ends
    at the first bin below 0.5. Unlike CTFFIND4, the 0.1 rule (more than 3 bins above 0.1,
    then one below 0.1) only applies when the correlation never reaches 0.66, so that weak
    low-frequency rings (strong low-frequency background) do not end the search early.
    """
    cc = np.asarray(cc)
    n_high = 0
    for i in range(start, len(cc)):
        if n_high > 3 and cc[i] < _FRC_SIGNIFICANT:
            return max(i - 1, start)
        n_high += cc[i] > _FRC_HIGH
    if n_high > 3:
        return len(cc) - 1
    n_low = 0
    for i in range(start, len(cc)):
        if n_low > 3 and cc[i] < _FRC_LOW:
            return max(i - 1, start) if (cc[start:i] > _FRC_SIGNIFICANT).any() else None
        n_low += cc[i] > _FRC_LOW
    return len(cc) - 1 if (cc[start:] > _FRC_SIGNIFICANT).any() else None


def estimate_ctf(
    image,
    pixel_size: float,
    voltage: float = 300.0,
    cs: float = 2.7,
    amplitude_contrast: float = 0.1,
    defocus_range=(5000.0, 50000.0),
    res_range=(30.0, 5.0),
    tile: int = 512,
    phase_shift: bool = False,
    *,
    overlap: float = 0.5,
    defocus_step: float | None = None,
    max_astigmatism: float = 3000.0,
) -> CTFResult:
    """Estimate defocus, astigmatism (and phase shift) of a micrograph from its Thon rings.

    Parameters
    ----------
    image : array_like, 2D ``[y, x]``
        Micrograph (numpy or cupy), preferably the non-dose-weighted frame sum.
    pixel_size : float
        Å/px.
    voltage : float
        kV.
    cs : float
        Spherical aberration, mm.
    amplitude_contrast : float
        Fraction (0..1).
    defocus_range : (float, float)
        Searched mean defocus (Å, positive = underfocus).
    res_range : (float, float)
        Fitting band (low, high) in Å; the high limit is clipped to Nyquist.
    tile : int
        Tile size (px) of the averaged spectrum.
    phase_shift : bool
        Also fit a phase shift (phase plate) in [0, 180)°.
    overlap : float
        Tile overlap fraction.
    defocus_step : float, optional
        Step (Å) of the 1D defocus search; default a quarter of the defocus change that
        moves the outermost fitted ring by one period, at most 500 Å.
    max_astigmatism : float
        Largest ``|U - V|`` (Å) of the astigmatism grid search (refinement may go 50 % beyond).

    Returns
    -------
    CTFResult
    """
    xp = backend.array_module(image)
    img = xp.asarray(image)
    if img.ndim != 2:
        raise InputError("micrograph", f"expected a 2D image, got shape {tuple(img.shape)}", "pass one micrograph")
    if not bool(xp.isfinite(img).all()):
        raise InputError("micrograph", "data contain NaN or infinite values", "regenerate or remove the micrograph")
    (dmin, dmax), (rlo, rhi) = _validate(pixel_size, voltage, cs, amplitude_contrast, defocus_range, res_range)
    pixel_size = float(pixel_size)
    tile = _check_tile(tile, img.shape)
    optics = _Optics(voltage, cs, amplitude_contrast)

    ps = _power_spectrum_rfft(img, tile, overlap)
    amp = xp.sqrt(ps)
    kx, ky = frequency_grid((tile, tile), pixel_size, xp=xp, rfft=True)
    k = xp.sqrt(kx * kx + ky * ky)
    dk = 1.0 / (tile * pixel_size)
    k_lo, k_hi, k_nyq = 1.0 / rlo, 1.0 / rhi, 0.5 / pixel_size
    not_cross = (xp.abs(kx) > 1.5 * dk) & (xp.abs(ky) > 1.5 * dk)

    # ---- pass 1: smooth radial background, 1D search -----------------------------------
    sel = not_cross & (k >= k_lo) & (k <= k_hi)
    kf, kxf, kyf, af = k[sel], kx[sel], ky[sel], amp[sel]
    nb = max(4, int(math.ceil((k_hi - k_lo) / dk)))
    idx = xp.clip(((kf - k_lo) / dk).astype(xp.int64), 0, nb - 1)
    counts = backend.to_host(xp.bincount(idx, minlength=nb)).astype(np.float64)
    prof = backend.to_host(xp.bincount(idx, weights=af, minlength=nb))
    ksum = backend.to_host(xp.bincount(idx, weights=kf, minlength=nb))
    good = counts > 0
    if good.sum() < 8:
        raise InputError("res_range", "too few spectrum pixels in the fitting band", "widen the resolution band or use a larger tile")
    prof = np.where(good, prof / np.maximum(counts, 1), 0.0)
    kc = np.where(good, ksum / np.maximum(counts, 1), 0.0)
    if not (prof[good] > 0).all():
        raise InputError("micrograph", "the image has no signal in the fitting band (constant image?)", "check the micrograph")
    span = k_hi - k_lo
    xpoly = lambda kk: 2.0 * (kk - k_lo) / span - 1.0  # noqa: E731
    coef = np.polyfit(xpoly(kc[good]), np.log(prof[good]), 3, w=np.sqrt(counts[good]))
    r1d = prof[good] / np.exp(np.polyval(coef, xpoly(kc[good]))) - 1.0
    edges = k_lo + dk * np.arange(nb + 1)
    edges[-1] = max(edges[-1], k_hi)
    e_lo, e_hi = edges[:-1][good], edges[1:][good]

    step_auto = 0.25 / (optics.lam * k_hi * k_hi)
    step = float(defocus_step) if defocus_step else min(500.0, step_auto)
    dgrid = np.arange(dmin, dmax + 0.5 * step, step)
    pgrid = np.arange(0.0, 180.0, 10.0) if phase_shift else np.array([0.0])
    scores = _search_1d(optics, e_lo, e_hi, counts[good], r1d, dgrid, pgrid)
    cands = []
    for ip in range(len(pgrid)):
        for i in _local_maxima(scores[ip], 3):
            cands.append((scores[ip, i], dgrid[i], pgrid[ip]))
    cands.sort(key=lambda c: -c[0])
    best_score = cands[0][0]
    cands = [c for c in cands[:4] if c[0] >= 0.5 * best_score] or cands[:1]
    log.info("1D search: best mean defocus %.0f Å (score %.3f)", cands[0][1], best_score)
    log.debug("1D candidates: %s", cands)

    # ---- pass 1: 2D grid over astigmatism on a low-resolution sub-band, refinement -----
    # Below ~10 Å a grid error of a few hundred Å is a small fraction of a ring, so a coarse
    # astigmatism grid cannot miss the optimum; the full band is only used for refinement.
    dn = af / xp.exp(_polyval(coef, xpoly(kf))) - 1.0
    k_mid = min(k_hi, max(_GRID_K, 2.0 * k_lo))
    low = kf <= k_mid
    gf = _Geom(kxf, kyf)
    fit_low = _Fit2D(optics, gf.subset(low), dn[low])
    fit = _Fit2D(optics, gf, dn)
    astig = np.unique(np.concatenate([[0.0, 250.0], np.arange(500.0, max_astigmatism + 1.0, 500.0), [max_astigmatism]]))
    bounds = (dmin, dmax, 0.75 * max_astigmatism, phase_shift)
    starts = []
    for grid_fit, k_top, first in ((fit_low, k_mid, fit_low), (fit, k_hi, None)):
        rows = _grid_rows(cands, step, astig, 0.25 / (optics.lam * k_top * k_top))
        u = rows[:, 0] + 0.5 * rows[:, 1]
        v = rows[:, 0] - 0.5 * rows[:, 1]
        ncc = grid_fit.ncc_batch(u, v, rows[:, 2], rows[:, 3])
        for b in np.argsort(ncc)[::-1][:2]:
            starts.append(((*_uv_to_params(u[b], v[b], rows[b, 2]), rows[b, 3]), first))
    sector = _sector_start(optics, xp.arctan2(kyf, kxf) % math.pi, idx, dn, edges, dgrid, cands[0][2])
    if sector is not None:
        log.debug("sector start: %s", sector)
        starts.append(((*sector, cands[0][2]), None))
    best = None
    for x0, first in starts:
        xs = _refine(first, x0, bounds) if first is not None else np.asarray(x0, dtype=float)
        xs = _refine(fit, xs, bounds)
        score = fit.ncc(*_params_to_uv(*xs[:3]), xs[3])
        if best is None or score > best[0]:
            best = (score, xs)
    x = best[1]
    ls = None

    # ---- pass 2: least squares with profiled background and envelope ------------------
    for _ in range(2):
        u_, v_, _a = _params_to_uv(*x[:3])
        k_top = min(k_hi, optics.k_alias(u_, tile, pixel_size, k_nyq), 0.95 * optics.k_turnover(v_))
        if k_top <= k_lo * 1.5:
            break
        sel2 = not_cross & (k >= k_lo) & (k <= k_top)
        kx2, ky2, a2, k2 = kx[sel2], ky[sel2], amp[sel2], k[sel2]
        p1 = xp.exp(_polyval(coef, xpoly(k2)))
        g2 = _Geom(kx2, ky2)
        ls = _FitLS(optics, g2, a2, 1.0 / (p1 * p1), k_lo, k_top, dk)
        x_new = _refine(ls, x, bounds)
        moved = abs(x_new[0] - x[0])
        x = x_new
        if moved < 0.002 * x[0]:
            break
    u_, v_, angle = _params_to_uv(*x[:3])
    k_alias = optics.k_alias(u_, tile, pixel_size, k_nyq)
    if k_alias < k_hi:
        log.warning(
            "Thon rings of %.0f Å defocus are closer than %.0f spectrum pixels beyond %.1f Å: fitted to %.1f Å only "
            "(use a larger --tile)", u_, _ALIAS_PX, 1.0 / k_alias, 1.0 / k_alias,
        )
    if ls is not None:
        bg = ls.background(u_, v_, angle, x[3])
        if bg is not None:
            fit = _Fit2D(optics, g2, a2 / bg - 1.0)
    fom = fit.ncc(u_, v_, angle, x[3])

    # ---- fit resolution, diagnostics ----------------------------------------------------
    k_eval = min(k_nyq, optics.k_alias(u_, tile, pixel_size, k_nyq), 0.95 * optics.k_turnover(v_))
    sel3 = not_cross & (k >= k_lo) & (k <= k_eval)
    psi3 = optics.psi(_Geom(kx[sel3], ky[sel3]), x[0], x[1], x[2], x[3])
    a3 = amp[sel3]
    profile, max_res = None, rlo
    bgr = _equiphase_background(psi3, a3)
    if bgr is not None:
        psi_all = optics.psi(_Geom(kx, ky), x[0], x[1], x[2], x[3])
        bg_all = xp.interp(psi_all, xp.asarray(bgr[0]), xp.asarray(bgr[1]))
        norm_all = amp / bg_all - 1.0
        width = math.pi / _NSUB
        p0 = float(psi3.min())
        nb3 = int(math.floor((float(psi3.max()) - p0) / width)) + 1
        idx3 = xp.clip(((psi3 - p0) / width).astype(xp.int64), 0, nb3 - 1)
        cnt3 = backend.to_host(xp.bincount(idx3, minlength=nb3)).astype(np.float64)
        dsum = backend.to_host(xp.bincount(idx3, weights=norm_all[sel3], minlength=nb3))
        msum = backend.to_host(xp.bincount(idx3, weights=xp.sin(psi3) ** 2, minlength=nb3))
        ok = cnt3 > 0
        d1 = dsum[ok] / cnt3[ok]
        m1 = msum[ok] / cnt3[ok]
        psi_c = p0 + (np.arange(nb3)[ok] + 0.5) * width
        cc, slope, mean_d, mean_m = _windowed_cc(d1, m1, _NSUB)
        s_eq = optics.s_of_psi(psi_c, x[0], x[3])
        k_eq = np.sqrt(np.maximum(s_eq, 0.0))
        # the first period has a one-sided background window: start judging one period in
        start = int(np.searchsorted(k_eq, k_lo)) + _NSUB
        last = _fit_resolution_index(cc, start) if start < len(cc) else None
        if last is not None and k_eq[last] > 0:
            max_res = float(1.0 / k_eq[last])
        scale = np.std(d1) / max(np.std(m1), 1e-12)
        fit1 = mean_d + np.maximum(slope, 0.0) * (m1 - mean_m)
        profile = {"k": k_eq, "data": d1, "fit": fit1, "cc": cc}
        fitimg = (xp.sin(psi_all) ** 2 - float(m1.mean())) * scale
        norm_all = xp.where((k >= k_lo) & (k <= k_nyq), norm_all, 0.0)
        fitimg = xp.where((k >= k_lo) & (k <= k_eval), fitimg, 0.0)
        spec_data = backend.to_host(_full_centred(norm_all, tile)).astype(np.float32)
        spec_fit = backend.to_host(_full_centred(fitimg, tile)).astype(np.float32)
    else:
        spec_data = spec_fit = None
    max_res = float(min(max(max_res, 1.0 / k_eval if k_eval > 0 else max_res), rlo))

    return CTFResult(
        defocus_u=float(u_),
        defocus_v=float(v_),
        defocus_angle=float(angle),
        phase_shift=float(x[3] % 180.0) if phase_shift else 0.0,
        fom=float(fom),
        max_resolution=max_res,
        pixel_size=pixel_size,
        voltage=float(voltage),
        cs=float(cs),
        amplitude_contrast=float(amplitude_contrast),
        tile=int(tile),
        res_range=(rlo, rhi),
        spectrum_data=spec_data,
        spectrum_fit=spec_fit,
        profile=profile,
    )


# --------------------------------------------------------------------------------------
# Diagnostics
# --------------------------------------------------------------------------------------


def ctf_diagnostic_image(result: CTFResult, clip: float = 2.5, smooth: int = 3) -> np.ndarray:
    """CTFFIND-style diagnostic: the centred ``tile × tile`` spectrum, left half the
    background-subtracted data, right half (kx >= 0) the fitted CTF² on the same scale.

    Frequencies below the low-resolution limit are 0; the fit is drawn up to the limit
    where the fit resolution was searched (Nyquist, aliasing or Cs turnover). The data are
    smoothed with a ``smooth × smooth`` box (1: none) and clipped to ``±clip`` standard
    deviations; the fit is scaled to the same standard deviation.
    """
    if result.spectrum_data is None:  # too few rings to normalise the spectrum
        return np.zeros((result.tile, result.tile), dtype=np.float32)
    from scipy import ndimage  # noqa: PLC0415

    raw = np.asarray(result.spectrum_data, dtype=np.float32)
    fit = np.asarray(result.spectrum_fit, dtype=np.float32)
    n = raw.shape[1]
    data = np.where(raw != 0, ndimage.uniform_filter(raw, smooth), 0.0) if smooth > 1 else raw
    nz = data[raw != 0]
    sd = float(nz.std()) if nz.size else 1.0
    sd = sd if sd > 0 else 1.0
    fsd = float(fit[fit != 0].std()) if (fit != 0).any() else 1.0
    img = data.astype(np.float32)
    img[:, n // 2 :] = fit[:, n // 2 :] * (sd / fsd if fsd > 0 else 1.0)
    return np.clip(img, -clip * sd, clip * sd)


def write_ctf_diagnostic(result: CTFResult, png_path, mrc_path=None, title: str | None = None) -> None:
    """Write the diagnostic PNG (2D half data / half fit, and the 1D equiphase average with
    the fit and the fit-resolution correlation) and optionally the 2D image as MRC; both atomic."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415

    from ..io.atomic import atomic_path  # noqa: PLC0415
    from ..io.mrc import write_mrc  # noqa: PLC0415

    img = ctf_diagnostic_image(result)
    fig = Figure(figsize=(12, 5.2), dpi=100)
    FigureCanvasAgg(fig)
    ax0 = fig.add_axes([0.02, 0.08, 0.36, 0.82])
    ax0.imshow(img, cmap="gray", origin="lower", interpolation="nearest")
    ax0.set_xticks([])
    ax0.set_yticks([])
    ax0.set_title("spectrum (left) | fit (right)", fontsize=10)
    ax1 = fig.add_axes([0.45, 0.12, 0.52, 0.76])
    prof = result.profile or {}
    if prof:
        kk = prof["k"]
        ax1.plot(kk, prof["data"], lw=0.8, color="0.3", label="data (equiphase average)")
        ax1.plot(kk, prof["fit"], lw=0.8, color="tab:red", label="fit CTF²")
        ax2 = ax1.twinx()
        ax2.plot(kk, prof["cc"], lw=1.0, color="tab:blue", label="fit correlation")
        ax2.axhline(_FRC_SIGNIFICANT, color="tab:blue", ls=":", lw=0.8)
        ax2.set_ylim(-0.2, 1.05)
        ax2.set_ylabel("correlation", color="tab:blue")
    ax1.axvline(1.0 / result.max_resolution, color="tab:green", ls="--", lw=1.0, label=f"fit resolution {result.max_resolution:.2f} Å")
    for r in result.res_range:
        ax1.axvline(1.0 / r, color="0.6", ls=":", lw=0.8)
    ax1.set_xlabel("spatial frequency (1/Å)")
    ax1.set_ylabel("relative amplitude")
    ax1.legend(loc="upper right", fontsize=8)
    head = (
        f"U {result.defocus_u:.0f} Å  V {result.defocus_v:.0f} Å  angle {result.defocus_angle:.1f}°  "
        f"phase {result.phase_shift:.1f}°  FOM {result.fom:.3f}  fit res {result.max_resolution:.2f} Å"
    )
    fig.suptitle(f"{title}\n{head}" if title else head, fontsize=10)
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png")
    if mrc_path is not None:
        write_mrc(mrc_path, img, result.pixel_size)
