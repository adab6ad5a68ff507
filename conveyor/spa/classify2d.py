"""Reference-free 2D classification by maximum likelihood (RELION-style expectation-maximisation).

Model
-----
Particle ``i`` (protein white, background sd ≈ 1, as :func:`conveyor.spa.extract.extract_particles`
writes it) is a noisy, CTF-filtered, rotated and shifted copy of one of ``K`` class
averages ``A_k``. In Fourier space, for every frequency ``f`` inside the current resolution
limit::

    X_i(f) = H_i(f) · A_k(Q_ψ f) · exp(-2πi f·t / B) + N_i(f),   E|N_i(f)|² = σ²(|f|)

with ``H_i = -CTF_i`` (:func:`conveyor.spa.ctfmodel.ctf_2d` at the particle's defocus; the minus
sign because extracted images are inverted so that protein is white), ``Q_ψ = Rz(ψ)ᵀ`` the
in-plane rotation of RELION's rlnAnglePsi (the particle is the class average rotated by
``A = Rz(ψ)`` of :func:`conveyor.geometry.euler_to_matrix`, ``image(x) = A_k(Aᵀ x)``), ``t`` the
shift in px (where the particle lies relative to the box centre; RELION's origin is ``-t``)
and ``σ²`` a noise power per resolution shell estimated from the data. The hidden variables
``(k, ψ, t)`` get the posterior ``∝ π_k · p(t) · exp(log L / T)`` with class priors ``π_k``, a
Gaussian prior on ``t`` (width estimated from the data) and a temperature ``T`` that
anneals from ``initial_temperature`` to 1.

Expectation (the hot loop, per batch of particles, a few large array operations on numpy or cupy)

* rotated references: every class average is zero-padded twice, gridding-corrected and
  Fourier transformed once per iteration; its ``R = 360 / psi_step`` rotations are
  bilinear samples of that transform on the frequencies within the resolution limit;
* ``log L`` for all ``K × R`` rotated references and all ``(2s+1)²`` translations at once:
  ``Σ_f Re[X H A* / σ² · e^{+2πi f·t/B}] - ½ Σ_f H² |A|² / σ²``. The first term is the
  cross-correlation map of the particle with the reference, evaluated on the translation
  window only by a separable inverse Fourier transform (two batched matrix products, one
  along x and one along y) — the same numbers an FFT cross-correlation gives there, at
  ``(2s+1)/B`` of its cost; the second is one matrix product ``[n, F] × [F, K R]``.

Maximisation

* class sums are accumulated in the rotated frame of each ``(k, ψ)``: ``S_kψ += H X ·
  W*(f)`` (``W*`` the Fourier transform of the posterior weights over translations, i.e.
  the particle un-shifted by all shifts at once) and ``C_kψ += H² w``, over the
  significant ``(i, k, ψ)`` only (posterior mass ≥ ``significance``), separately for two
  random halves of the particles; then rotated back (Fourier interpolation) and summed;
* the class average is the Wiener estimate ``A = Σ H X / (Σ H² + ⟨Σ H²⟩ / SSNR)``, with the
  spectral signal-to-noise ratio per shell from the Fourier ring correlation of the two
  half-set averages (``SSNR = 2 FRC / (1 - FRC)``); the class's estimated resolution is
  where ``SSNR`` falls below 1 (RELION's rlnEstimatedResolution criterion);
* a soft circular mask at the particle diameter, then (all iterations but the last) the
  average is moved so that the centre of mass of its positive density is at the box
  centre;
* ``σ²`` per shell from the residuals of the best hypothesis of every particle; ``π_k``
  from the posterior class masses; the resolution limit of the next iteration is the best
  class resolution plus a margin (coarse to fine), never finer than ``max_resolution``.

Initial averages are built from a random class and in-plane angle for every particle
(RELION's random initialisation). Classes are renumbered at the end by decreasing
population: class 1 holds the most particles.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time

import numpy as np
import pandas as pd

from .. import backend
from ..errors import InputError
from .ctfmodel import ctf_at

log = logging.getLogger(__name__)

#: Columns of the per-iteration log (:attr:`Class2DResult.log`).
LOG_COLUMNS = ("iteration", "resolution_limit", "best_resolution", "temperature", "log_likelihood",
               "average_pmax", "changed_fraction", "sigma_offset", "significant_per_particle", "reseeded", "seconds")


# --------------------------------------------------------------------------- helpers
def _fft(xp):
    """FFT functions for ``xp``: scipy.fft (workers: ``conveyor --threads``) for numpy, cupy.fft for cupy."""
    if xp is np:
        import scipy.fft as sfft  # noqa: PLC0415

        class _Sfft:
            @staticmethod
            def rfft2(a):
                return sfft.rfft2(a)

            @staticmethod
            def irfft2(a, s):
                return sfft.irfft2(a, s=s)

        return _Sfft
    return xp.fft


def soft_mask(box: int, radius: float, edge: float = 4.0, xp=np):
    """Circular mask ``[box, box]``: 1 within ``radius`` px of the centre ``box // 2``, a raised cosine to 0 over ``edge`` px."""
    c = box // 2
    y, x = xp.meshgrid(xp.arange(box, dtype=xp.float32) - c, xp.arange(box, dtype=xp.float32) - c, indexing="ij")
    r = xp.sqrt(x * x + y * y)
    edge = max(float(edge), 1e-3)
    m = 0.5 + 0.5 * xp.cos(np.pi * xp.clip((r - radius) / edge, 0.0, 1.0))
    return m.astype(xp.float32)


class FrequencyGrid:
    """The half-plane frequencies ``|f| ≤ r`` of a ``B``-px box used in one iteration.

    A rectangle ``ky ∈ [-r, r]`` (rows, FFT order), ``kx ∈ [0, r]`` (columns) in units of
    ``1 / (B · pixel)``; ``inside`` marks the disc ``round(|f|) ≤ r``; ``wcol`` is 1 for
    ``kx = 0`` and 2 otherwise, so that ``Σ_half wcol · g`` is the sum over the full plane
    of a Hermitian ``g``.
    """

    def __init__(self, box: int, radius: int, xp=np):
        self.B = int(box)
        self.r = int(min(max(int(radius), 1), self.B // 2 - 1))
        r = self.r
        ky = np.concatenate([np.arange(0, r + 1), np.arange(-r, 0)])
        kx = np.arange(0, r + 1)
        kyy, kxx = np.meshgrid(ky, kx, indexing="ij")
        self.ny, self.nx = kyy.shape
        self.F = kyy.size
        self.ky_host = kyy.ravel().astype(np.float64)
        self.kx_host = kxx.ravel().astype(np.float64)
        rad = np.hypot(self.kx_host, self.ky_host)
        self.shell_host = np.rint(rad).astype(np.int64)
        inside = self.shell_host <= r
        self.inside_host = inside
        wcol = np.where(self.kx_host == 0, 1.0, 2.0) * inside
        self.xp = xp
        self.kx = xp.asarray(self.kx_host, dtype=xp.float32)
        self.ky = xp.asarray(self.ky_host, dtype=xp.float32)
        self.wcol = xp.asarray(wcol, dtype=xp.float32)
        self.shell = xp.asarray(self.shell_host)
        bh = self.B // 2 + 1
        self.flat_index = xp.asarray((kyy.ravel() % self.B) * bh + kxx.ravel())
        # one-hot shell membership [F, r + 1] (full-plane weights) for per-shell sums
        onehot = np.zeros((self.F, r + 1), dtype=np.float32)
        onehot[np.flatnonzero(inside), self.shell_host[inside]] = wcol[inside]
        self.shell_onehot = xp.asarray(onehot)
        self.shell_count = xp.asarray(onehot.sum(axis=0))

    def crop(self, spec):
        """Values of full ``rfft2`` spectra ``[..., B, B//2+1]`` on this grid: ``[..., F]``."""
        lead = spec.shape[:-2]
        return spec.reshape(lead + (-1,))[..., self.flat_index]

    def embed(self, vals, dtype=None):
        """Grid values ``[..., F]`` into zero-filled full ``rfft2`` spectra ``[..., B, B//2+1]``."""
        xp = self.xp
        lead = vals.shape[:-1]
        bh = self.B // 2 + 1
        out = xp.zeros(lead + (self.B * bh,), dtype=dtype or vals.dtype)
        out[..., self.flat_index] = vals * self.inside_mask(vals.dtype)
        return out.reshape(lead + (self.B, bh))

    def inside_mask(self, dtype):
        return (self.wcol > 0).astype(dtype)

    def shell_mean(self, vals):
        """Full-plane mean per shell of real values ``[..., F]``: ``[..., r + 1]``."""
        return (vals @ self.shell_onehot) / self.xp.maximum(self.shell_count, 1.0)

    def per_shell(self, shell_vals):
        """Expand per-shell values ``[..., r + 1]`` onto the grid ``[..., F]`` (0 outside the disc)."""
        xp = self.xp
        idx = xp.clip(self.shell, 0, self.r)
        return shell_vals[..., idx] * (self.wcol > 0)


def _shell_index_full(box: int):
    """Integer shell index of every ``rfft2`` frequency of a ``box``-px image, ``[box, box//2+1]``."""
    ky = np.fft.fftfreq(box, d=1.0 / box)
    kx = np.arange(box // 2 + 1)
    return np.rint(np.hypot(ky[:, None], kx[None, :])).astype(np.int64)


def _gridding_pad(images, xp):
    """Zero-pad centred images ``[n, B, B]`` to ``2B`` after dividing by the bilinear kernel's transform.

    Returns the ``rfft2`` ``[n, 2B, B+1]`` of the padded images with the centre moved to index 0;
    its value at padded index ``2k`` is the ``B``-grid spectrum at ``k``.
    """
    fft = _fft(xp)
    n, b = images.shape[0], images.shape[-1]
    m = 2 * b
    c = xp.arange(b, dtype=xp.float32) - b // 2
    s = xp.sinc(c / m).astype(xp.float32) ** 2
    corr = s[:, None] * s[None, :]
    padded = xp.zeros((n, m, m), dtype=xp.float32)
    o = m // 2 - b // 2
    padded[:, o:o + b, o:o + b] = images / corr
    padded = xp.fft.ifftshift(padded, axes=(-2, -1))
    return fft.rfft2(padded).astype(xp.complex64)


def _sample_half(spec, which, x, y):
    """Bilinear samples of half-plane spectra at real coordinates, with Friedel symmetry.

    ``spec`` ``[n, Ny, Nxh]`` (``rfft2`` layout of an ``Ny × Ny`` image); ``which`` ``[m]``
    picks the spectrum of each output row; ``x``, ``y`` ``[m, F]`` or ``[F]`` are frequency
    coordinates in index units (any sign). Returns ``[m, F]``.
    """
    xp = backend.array_module(spec)
    n, ny, nxh = spec.shape
    flat = spec.reshape(-1)
    flip = x < 0
    sgn = xp.where(flip, -1.0, 1.0).astype(xp.float32)
    x = x * sgn
    y = y * sgn
    x0 = xp.floor(x)
    y0 = xp.floor(y)
    fx = (x - x0).astype(xp.float32)
    fy = (y - y0).astype(xp.float32)
    x0 = x0.astype(xp.int64)
    y0 = y0.astype(xp.int64)
    base = (which.astype(xp.int64) * (ny * nxh))[:, None]
    out = None
    for dy in (0, 1):
        wy = fy if dy else 1.0 - fy
        row = ((y0 + dy) % ny) * nxh
        for dx in (0, 1):
            wx = fx if dx else 1.0 - fx
            col = xp.minimum(x0 + dx, nxh - 1)
            v = flat[base + row + col] * (wy * wx)
            out = v if out is None else out + v
    if xp.iscomplexobj(out):
        out = xp.where(flip, xp.conj(out), out)
    return out


def _rotation_coords(psi_deg, kx, ky, inverse: bool = False):
    """Coordinates ``Q f`` (or ``Qᵀ f``) with ``Q = Rz(ψ)ᵀ`` for every angle: two ``[R, F]`` arrays."""
    xp = backend.array_module(kx)
    a = np.deg2rad(np.asarray(psi_deg, dtype=np.float64))
    c = xp.asarray(np.cos(a), dtype=xp.float32)[:, None]
    s = xp.asarray(np.sin(a), dtype=xp.float32)[:, None]
    if inverse:  # Qᵀ = Rz(ψ): (c x + s y, -s x + c y)
        return c * kx + s * ky, -s * kx + c * ky
    return c * kx - s * ky, s * kx + c * ky  # Q = Rz(ψ)ᵀ


def _to_real(grid: FrequencyGrid, vals):
    """Grid spectra ``[n, F]`` (centre at index 0) to centred real images ``[n, B, B]``."""
    xp = grid.xp
    fft = _fft(xp)
    img = fft.irfft2(grid.embed(vals, xp.complex64), s=(grid.B, grid.B))
    return xp.fft.fftshift(img, axes=(-2, -1)).astype(xp.float32)


def _to_grid(grid: FrequencyGrid, images):
    """Centred real images ``[n, B, B]`` to grid spectra ``[n, F]`` (centre at index 0)."""
    xp = grid.xp
    fft = _fft(xp)
    spec = fft.rfft2(xp.fft.ifftshift(xp.asarray(images, dtype=xp.float32), axes=(-2, -1)))
    return grid.crop(spec.astype(xp.complex64))


def rotated_references(averages, psi_deg, grid: FrequencyGrid):
    """Spectra of every class average rotated by every ψ, on ``grid``: complex ``[K, R, F]``.

    ``averages`` ``[K, B, B]`` (centre at ``B // 2``); rotation ``ψ`` gives the image
    ``A(Rz(ψ)ᵀ x)``, i.e. the class average seen with RELION's rlnAnglePsi = ψ.
    """
    xp = grid.xp
    spec = _gridding_pad(xp.asarray(averages, dtype=xp.float32), xp)
    qx, qy = _rotation_coords(psi_deg, grid.kx, grid.ky)
    k, r = spec.shape[0], qx.shape[0]
    which = xp.repeat(xp.arange(k), r)
    out = _sample_half(spec, which, xp.tile(2.0 * qx, (k, 1)), xp.tile(2.0 * qy, (k, 1)))
    return (out * grid.inside_mask(xp.float32)).reshape(k, r, grid.F)


def _rotate_back(grid: FrequencyGrid, s_rot, c_rot, psi_deg):
    """Sums accumulated in the frame of each rotation, brought back to the class frame and summed over ψ.

    ``s_rot`` complex ``[H, K, R, F]`` (CTF-weighted un-shifted particle spectra),
    ``c_rot`` real ``[H, K, R, F]`` (CTF² weights). Returns ``[H, K, F]`` each.
    """
    xp = grid.xp
    h, k, r, f = s_rot.shape
    qx, qy = _rotation_coords(psi_deg, grid.kx, grid.ky, inverse=True)
    s_out = xp.zeros((h, k, f), dtype=xp.complex64)
    c_out = xp.zeros((h, k, f), dtype=xp.float32)
    which_r = xp.arange(r)
    for hh in range(h):
        for kk in range(k):
            img = _to_real(grid, s_rot[hh, kk])
            spec = _gridding_pad(img, xp)
            s_out[hh, kk] = _sample_half(spec, which_r, 2.0 * qx, 2.0 * qy).sum(axis=0)
            cfull = grid.embed(c_rot[hh, kk], xp.float32)
            c_out[hh, kk] = _sample_half(cfull, which_r, qx, qy).sum(axis=0)
    return s_out * grid.inside_mask(xp.float32), c_out * grid.inside_mask(xp.float32)


class ShiftKernels:
    """Phase factors ``e^{+2πi f·t / B}`` of a translation window on a grid, split along x and y."""

    def __init__(self, grid: FrequencyGrid, tvals):
        xp = grid.xp
        b = grid.B
        kx_row = grid.kx_host.reshape(grid.ny, grid.nx)[0]
        ky_col = grid.ky_host.reshape(grid.ny, grid.nx)[:, 0]
        t = np.asarray(tvals, dtype=np.float64)
        self.nt = len(t)
        self.x_ft = xp.asarray(np.exp(2j * np.pi * np.outer(kx_row, t) / b), dtype=xp.complex64)  # [nx, T]
        self.y_tf = xp.asarray(np.exp(2j * np.pi * np.outer(t, ky_col) / b), dtype=xp.complex64)  # [T, ny]
        self.x_tf = self.x_ft.T.copy()  # [T, nx]
        self.y_ft = self.y_tf.T.copy()  # [ny, T]
        self.x_tf_ri = xp.ascontiguousarray(xp.concatenate([self.x_tf.real, -self.x_tf.imag], axis=1))  # [T, 2 nx]


class PreparedReferences:
    """Rotated references ``[KR, F]`` laid out for :func:`log_likelihoods` (built once per iteration)."""

    def __init__(self, refs, grid: FrequencyGrid):
        xp = grid.xp
        self.flat = refs.reshape(-1, grid.F)
        self.n = self.flat.shape[0]
        # conj(A) as [nx, KR, ny]: one matrix per frequency column, contiguous for the batched product
        self.conj_cols = xp.ascontiguousarray(xp.conj(self.flat).reshape(self.n, grid.ny, grid.nx).transpose(2, 0, 1))
        self.power = xp.ascontiguousarray((xp.abs(self.flat) ** 2).T)  # [F, KR]


def log_likelihoods(x, h, refs: PreparedReferences, winv, grid: FrequencyGrid, kernels: ShiftKernels):
    """``log L`` of every particle for every reference and translation, up to ``-½ Σ|X|²/σ²``.

    ``x`` ``[m, F]`` particle spectra (centre at index 0), ``h`` ``[m, F]`` transfer, ``winv``
    ``[F]`` full-plane weight / σ² (0 outside the disc). Returns ``[m, KR, T, T]`` (reference,
    ty, tx) of ``Σ_f Re[X H A* e^{+2πi f·t/B}] / σ² - ½ Σ_f H² |A|² / σ²`` over the full
    plane. The first term — the cross-correlation of particle and reference on the
    translation window — is a separable inverse Fourier transform: a batched matrix product
    over ky (one per frequency column) and one real matrix product over kx.
    """
    xp = grid.xp
    m, nr, nt = x.shape[0], refs.n, kernels.nt
    y = (x * h * (0.5 * winv)).reshape(m, grid.ny, grid.nx)  # Σ_full Re(.) = 2 Re Σ_half (wcol / 2)(.)
    z = y.transpose(2, 1, 0)[:, :, :, None] * kernels.y_ft[None, :, None, :]  # [nx, ny, m, ty]
    g = xp.matmul(refs.conj_cols, z.reshape(grid.nx, grid.ny, m * nt))  # [nx, KR, m*ty]: sum over ky
    del z
    g = g.reshape(grid.nx, nr * m * nt)
    gri = xp.concatenate([g.real, g.imag], axis=0)  # [2 nx, KR*m*ty]
    del g
    cc = kernels.x_tf_ri @ gri  # [tx, KR*m*ty] = Re(x_tf @ g): sum over kx
    del gri
    cc = 2.0 * cc.reshape(nt, nr, m, nt).transpose(2, 1, 3, 0)  # [m, KR, ty, tx]
    pw = (h * h * winv) @ refs.power  # [m, KR]
    return cc - 0.5 * pw[:, :, None, None]


def significant_pairs(mass, keep: float = 0.99):
    """Boolean ``[m, KR]``: per particle, the largest masses that together hold ``keep`` of it (at least one)."""
    xp = backend.array_module(mass)
    srt = -xp.sort(-mass, axis=1)  # descending
    before = xp.cumsum(srt, axis=1) - srt  # mass of the larger entries
    n_keep = xp.maximum((before < keep * srt.sum(axis=1, keepdims=True)).sum(axis=1), 1)
    cutoff = xp.take_along_axis(srt, (n_keep - 1)[:, None], axis=1)
    return mass >= cutoff


def unshift_spectra(wmaps, grid: FrequencyGrid, kernels: ShiftKernels):
    """``Σ_t w(t) e^{+2πi f·t/B}`` of weight maps ``[n, T, T]`` (ty, tx): ``[n, F]`` complex.

    Multiplying a particle spectrum by this undoes its shifts, weighted by ``w``.
    """
    xp = grid.xp
    n, nt = wmaps.shape[0], kernels.nt
    wa = wmaps.astype(xp.complex64).reshape(n * nt, nt) @ kernels.x_tf  # [n*T(ty), nx]
    wa = xp.ascontiguousarray(wa.reshape(n, nt, grid.nx).transpose(1, 0, 2)).reshape(nt, n * grid.nx)
    out = (kernels.y_ft @ wa).reshape(grid.ny, n, grid.nx).transpose(1, 0, 2)  # [n, ny, nx]
    return xp.ascontiguousarray(out).reshape(n, grid.F)


def segment_sum(rows, values, n_rows: int):
    """``out[r] = Σ_{j: rows[j] = r} values[j]`` for ``values`` ``[n, F]`` (real or complex): ``[n_rows, F]``.

    A sparse 0/1 matrix product on the CPU, an atomic scatter-add on the GPU.
    """
    xp = backend.array_module(values)
    n = values.shape[0]
    if xp is np:
        import scipy.sparse as sp  # noqa: PLC0415

        mat = sp.csr_matrix((np.ones(n, dtype=values.real.dtype), (np.asarray(rows), np.arange(n))), shape=(n_rows, n))
        return np.asarray(mat @ values)
    import cupyx  # noqa: PLC0415

    out = xp.zeros((n_rows,) + values.shape[1:], dtype=values.dtype)
    v = xp.ascontiguousarray(values)
    if xp.iscomplexobj(v):  # scatter the real and imaginary parts as interleaved floats
        cupyx.scatter_add(out.view(v.real.dtype), xp.asarray(rows), v.view(v.real.dtype))
    else:
        cupyx.scatter_add(out, xp.asarray(rows), v)
    return out


# --------------------------------------------------------------------------- CTF
_CTF_DEFAULTS = {"rlnVoltage": 300.0, "rlnSphericalAberration": 2.7, "rlnAmplitudeContrast": 0.1,
                 "rlnPhaseShift": 0.0, "rlnCtfBfactor": 0.0, "rlnCtfScalefactor": 1.0}


class _CtfSource:
    """Per-particle transfer ``H = -CTF`` on a frequency grid, from parameters or given arrays."""

    def __init__(self, ctf, n: int, box: int, pixel_size: float):
        self.n, self.box, self.ps = n, box, float(pixel_size)
        self.kind = "none"
        if ctf is None:
            return
        if isinstance(ctf, (pd.DataFrame, dict)):
            cols = ctf if isinstance(ctf, dict) else {c: ctf[c].to_numpy() for c in ctf.columns}
            missing = [c for c in ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle") if c not in cols]
            if missing:
                raise InputError("ctf", f"CTF parameters lack {', '.join(missing)}",
                                 "give each particle's defocus (RELION labels), e.g. from conveyor spa extract")
            par = {}
            for key in ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", *_CTF_DEFAULTS):
                v = cols.get(key, _CTF_DEFAULTS.get(key))
                arr = pd.to_numeric(pd.Series(np.ravel(np.asarray(v, dtype=object))), errors="coerce").to_numpy(np.float64)
                if arr.size == 1:
                    arr = np.full(n, arr[0])
                if arr.shape != (n,) or not np.isfinite(arr).all():
                    raise InputError("ctf", f"CTF column {key} must hold {n} finite values",
                                     "check the particle STAR file")
                par[key] = arr
            self.par = par
            self.kind = "params"
            return
        arr = np.asarray(backend.to_host(ctf)) if not hasattr(ctf, "__cuda_array_interface__") else ctf
        if arr.shape != (n, box, box // 2 + 1):
            raise InputError("ctf", f"CTF array of shape {tuple(arr.shape)} does not match {n} particles of {box} px",
                             f"pass [n, {box}, {box // 2 + 1}] values in rfft2 layout (ctf_2d(..., rfft=True))")
        self.arr = arr
        self.kind = "array"

    def batch(self, idx, grid: FrequencyGrid):
        xp = grid.xp
        nb = len(idx)
        if self.kind == "none":
            return xp.ones((nb, grid.F), dtype=xp.float32)
        if self.kind == "array":
            a = xp.asarray(self.arr[idx], dtype=xp.float32)
            return -grid.crop(a)
        p = {k: v[idx] for k, v in self.par.items()}
        kx = grid.kx / (grid.B * self.ps)
        ky = grid.ky / (grid.B * self.ps)
        out = xp.empty((nb, grid.F), dtype=xp.float32)
        combos = np.stack([p["rlnVoltage"], p["rlnSphericalAberration"], p["rlnAmplitudeContrast"]], axis=1)
        uniq, inv = np.unique(combos, axis=0, return_inverse=True)
        inv = np.ravel(inv)
        k2 = kx * kx + ky * ky
        for g, (volt, cs, ac) in enumerate(uniq):
            sel = np.flatnonzero(inv == g)

            def col(name, sel=sel):
                return xp.asarray(p[name][sel], dtype=xp.float32)[:, None]

            c = ctf_at(kx[None, :], ky[None, :], col("rlnDefocusU"), col("rlnDefocusV"), col("rlnDefocusAngle"),
                       float(volt), float(cs), float(ac), col("rlnPhaseShift"), 0.0)
            env = xp.exp(-col("rlnCtfBfactor") * k2[None, :] / 4.0) * col("rlnCtfScalefactor")
            out[xp.asarray(sel)] = (-c * env).astype(xp.float32)
        return out


def robust_shell_power(per_particle, counts):
    """Noise power per shell from per-particle mean powers ``[n, S]``: the median over particles.

    A particle's mean of ``c`` full-plane Gaussian noise powers is ``σ² χ²_c / c``, whose median
    is ``σ² (1 - 2 / (9c))³``; the median is divided by that factor. Unlike the mean, it is not
    pulled up by a minority of strong objects (ice, carbon, aggregates) at low resolution.
    """
    c = np.maximum(np.asarray(counts, dtype=float), 1.0)
    bias = np.clip((1.0 - 2.0 / (9.0 * c)) ** 3, 0.3, 1.0)
    return np.median(np.asarray(per_particle, dtype=float), axis=0) / bias


# --------------------------------------------------------------------------- class update
@dataclasses.dataclass
class ClassUpdate:
    """Result of :func:`wiener_update` for ``K`` classes."""

    averages: object  # [K, B, B] masked real averages (xp)
    spectra: object  # [K, F] Wiener spectra (xp)
    frc: np.ndarray  # [K, r + 1] half-set FRC of the masked half averages
    ssnr: np.ndarray  # [K, r + 1]
    resolution: np.ndarray  # [K] Å (SSNR = 1 crossing)
    resolution_shell: np.ndarray  # [K] shell index (float) of that crossing


def _smooth(a, width: int = 1):
    if width < 1 or a.shape[-1] < 3:
        return a
    k = np.ones(2 * width + 1) / (2 * width + 1)
    pad = np.pad(a, [(0, 0)] * (a.ndim - 1) + [(width, width)], mode="edge")
    return np.apply_along_axis(lambda v: np.convolve(v, k, mode="valid"), -1, pad)


def ssnr_resolution(ssnr, box: int, pixel_size: float, limit_shell: int | None = None):
    """Resolution (Å) and shell where ``ssnr`` ``[K, shells]`` first drops below 1 (interpolated).

    Shell 0 is skipped. A class whose SSNR never drops below 1 up to ``limit_shell`` gets the
    resolution of that shell; one that starts below 1 gets ``box · pixel_size`` (shell 1).
    """
    s = np.atleast_2d(np.asarray(ssnr, dtype=float))
    last = s.shape[1] - 1 if limit_shell is None else min(int(limit_shell), s.shape[1] - 1)
    shells = np.empty(len(s))
    for k, row in enumerate(s):
        sh = float(last)
        for j in range(1, last + 1):
            if row[j] < 1.0:
                if j == 1:
                    sh = 1.0
                else:
                    a, b = row[j - 1], row[j]
                    sh = (j - 1) + (a - 1.0) / max(a - b, 1e-12)
                break
        shells[k] = max(sh, 1.0)
    return box * pixel_size / shells, shells


def wiener_update(grid: FrequencyGrid, s_half, c_half, mask, pixel_size: float, *, min_mass=None, masses=None):
    """Class averages from half-set sums: FRC → SSNR → Wiener filter → mask.

    ``s_half`` complex ``[2, K, F]`` = ``Σ H X`` per half (class frame), ``c_half`` real
    ``[2, K, F]`` = ``Σ H²``. ``mask`` ``[B, B]`` soft circular mask. ``masses`` ``[K]``
    (particles per class) and ``min_mass``: classes below get SSNR 0 beyond shell 1.
    """
    xp = grid.xp
    s_half = xp.asarray(s_half)
    c_half = xp.asarray(c_half, dtype=xp.float32)
    k = s_half.shape[1]
    r = grid.r
    cmean = grid.shell_mean(c_half)  # [2, K, r+1]
    eps = 0.1 * grid.per_shell(cmean) + 1e-6
    half_avg = s_half / (c_half + eps)
    himg = _to_real(grid, half_avg.reshape(2 * k, grid.F)).reshape(2, k, grid.B, grid.B) * mask
    hs = _to_grid(grid, himg.reshape(2 * k, grid.B, grid.B)).reshape(2, k, grid.F)
    num = grid.shell_mean((hs[0] * xp.conj(hs[1])).real)
    den = xp.sqrt(grid.shell_mean(xp.abs(hs[0]) ** 2) * grid.shell_mean(xp.abs(hs[1]) ** 2))
    frc = backend.to_host(num / xp.maximum(den, 1e-30)).astype(float)
    frc[:, 0] = 1.0
    frc_s = _smooth(frc, 1)
    frc_s[:, 0] = 1.0
    f = np.clip(frc_s, 0.0, 0.999)
    ssnr = 2.0 * f / (1.0 - f)
    for kk in range(k):  # no signal beyond the first shell where the FRC is gone
        gone = np.flatnonzero(frc_s[kk, 1:] < 0.05)
        if len(gone):
            ssnr[kk, gone[0] + 1:] = 0.0
        if masses is not None and min_mass is not None and masses[kk] < min_mass:
            ssnr[kk, 2:] = 0.0
    res, shell = ssnr_resolution(ssnr, grid.B, pixel_size, r)
    c_tot = c_half.sum(axis=0)
    s_tot = s_half.sum(axis=0)
    ssnr_dev = xp.asarray(np.maximum(ssnr, 1e-6), dtype=xp.float32)
    reg = grid.per_shell(grid.shell_mean(c_tot) / ssnr_dev) + 1e-6
    spec = s_tot / (c_tot + reg)
    avg = _to_real(grid, spec) * mask
    return ClassUpdate(averages=avg, spectra=spec, frc=frc, ssnr=ssnr, resolution=res, resolution_shell=shell)


def centre_averages(averages, mask, max_shift: float | None = None):
    """Move each average so the centre of mass of its positive density is at ``B // 2``; re-mask.

    Returns ``(centred [K, B, B], shifts [K, 2])`` with the ``(dx, dy)`` px applied.
    """
    from .projection import shift_image  # noqa: PLC0415

    xp = backend.array_module(averages)
    a = xp.asarray(averages, dtype=xp.float32)
    k, b = a.shape[0], a.shape[-1]
    pos = xp.clip(a * mask, 0.0, None)
    tot = pos.sum(axis=(1, 2))
    c = xp.arange(b, dtype=xp.float32) - b // 2
    cx = (pos.sum(axis=1) * c).sum(axis=1) / xp.maximum(tot, 1e-30)
    cy = (pos.sum(axis=2) * c).sum(axis=1) / xp.maximum(tot, 1e-30)
    d = xp.stack([-cx, -cy], axis=1)
    d = xp.where((tot > 0)[:, None], d, 0.0)
    if max_shift is not None:
        d = xp.clip(d, -max_shift, max_shift)
    out = shift_image(a, d[:, 0], d[:, 1]) * mask
    return out.astype(xp.float32), backend.to_host(d)


# --------------------------------------------------------------------------- result
@dataclasses.dataclass
class Class2DResult:
    """Output of :func:`classify_2d`. Classes are numbered 1..K by decreasing population.

    Attributes
    ----------
    averages : ndarray ``[K, B, B]`` float32
        Class averages (CTF-corrected, masked, protein white); ``averages[c - 1]`` is class ``c``.
    assignments : ndarray ``[N]`` int
        Class number 1..K of each particle (rlnClassNumber, the best hypothesis).
    psi : ndarray ``[N]``
        In-plane angle, degrees in (-180, 180] (rlnAnglePsi): the particle is the class
        average rotated by ``Rz(psi)``.
    shifts : ndarray ``[N, 2]``
        ``(dx, dy)`` px where the particle lies relative to the box centre; RELION's
        origin is ``-shifts`` (:attr:`origins_angst`).
    probabilities : ndarray ``[N]``
        Largest posterior probability of any hypothesis (rlnMaxValueProbDistribution).
    log_likelihood : ndarray ``[N]``
        Log marginal likelihood of each particle, up to a constant (rlnLogLikeliContribution).
    class_counts : ndarray ``[K]`` int
        Particles per class (from ``assignments``).
    class_distribution : ndarray ``[K]``
        Posterior mass fraction per class (rlnClassDistribution).
    class_resolution : ndarray ``[K]``
        Estimated resolution in Å (SSNR = 1; rlnEstimatedResolution).
    ssnr, frc : ndarray ``[K, B//2 + 1]``
        Spectral SNR and half-set FRC per shell of the final averages (0 beyond the final limit).
    sigma2 : ndarray ``[B//2 + 1]``
        Noise power per shell (units of ``|rfft2|²`` of the particle images).
    n_significant : ndarray ``[N]`` int
        Significant ``(class, ψ)`` pairs of each particle in the last iteration.
    misfit : ndarray ``[N]``
        How badly the best hypothesis explains the particle: the excess of
        ``Σ |X - H A|² / σ²`` over its expectation for pure noise, in standard deviations.
    log : pandas.DataFrame
        One row per iteration (:data:`LOG_COLUMNS`).
    """

    averages: np.ndarray
    assignments: np.ndarray
    psi: np.ndarray
    shifts: np.ndarray
    probabilities: np.ndarray
    log_likelihood: np.ndarray
    class_counts: np.ndarray
    class_distribution: np.ndarray
    class_resolution: np.ndarray
    ssnr: np.ndarray
    frc: np.ndarray
    sigma2: np.ndarray
    n_significant: np.ndarray
    misfit: np.ndarray
    pixel_size: float
    particle_diameter: float
    resolution_limit: float
    log: pd.DataFrame

    @property
    def n_classes(self) -> int:
        return int(self.averages.shape[0])

    @property
    def origins_angst(self) -> np.ndarray:
        """``[N, 2]`` rlnOriginXAngst/YAngst (= ``-shifts × pixel_size``)."""
        return -np.asarray(self.shifts) * self.pixel_size


# --------------------------------------------------------------------------- main entry
def _check_inputs(images, pixel_size, n_classes, iterations, psi_step, offset_range, offset_step, particle_diameter):
    shape = tuple(images.shape)
    if len(shape) != 3 or shape[1] != shape[2]:
        raise InputError("particles", f"expected a stack of square images [n, B, B], got shape {shape}",
                         "pass particle images extracted with one box size")
    n, b = shape[0], shape[1]
    if b < 16 or b % 2:
        raise InputError("particles", f"box size must be even and at least 16 px, got {b}", "re-extract with an even box")
    if not (pixel_size and np.isfinite(pixel_size) and pixel_size > 0):
        raise InputError("pixel_size", f"pixel size must be positive, got {pixel_size}", "give the particle pixel size in Å")
    if int(n_classes) < 1:
        raise InputError("--classes", f"need at least one class, got {n_classes}", "use e.g. --classes 30")
    if n < 2 * int(n_classes):
        raise InputError("--classes", f"{n} particles are too few for {n_classes} classes",
                         f"use at most {max(1, n // 2)} classes, or more particles")
    if int(iterations) < 1:
        raise InputError("--iterations", f"need at least one iteration, got {iterations}", "use e.g. 25")
    if not (0 < psi_step <= 180):
        raise InputError("--psi-step", f"in-plane step must be in (0, 180] degrees, got {psi_step}", "use e.g. 10")
    if offset_range < 0 or offset_step <= 0:
        raise InputError("--offset-range", f"offset range must be >= 0 and step > 0 px, got {offset_range}/{offset_step}",
                         "use e.g. --offset-range 5")
    if offset_range >= b / 2:
        raise InputError("--offset-range", f"offset range {offset_range} px is too large for a {b}-px box",
                         f"use less than {b // 4} px")
    if particle_diameter is None or not particle_diameter > 0:
        raise InputError("--particle-diameter", "the particle (mask) diameter must be positive", "give it in Å")
    if particle_diameter / pixel_size > b:
        raise InputError("--particle-diameter", f"{particle_diameter} Å ({particle_diameter / pixel_size:.0f} px) "
                         f"is wider than the {b}-px box", "give the particle diameter in Å (not px), or re-extract with a larger box")
    return n, b


def classify_2d(
    images,
    ctf=None,
    pixel_size: float = 1.0,
    n_classes: int = 10,
    iterations: int = 25,
    psi_step: float = 10.0,
    offset_range: float = 5.0,
    particle_diameter: float | None = None,
    seed: int = 0,
    *,
    offset_step: float = 1.0,
    initial_resolution: float = 30.0,
    max_resolution: float | None = None,
    initial_temperature: float = 1.0,
    anneal_iterations: int | None = None,
    center_classes: bool = True,
    mask_edge: float = 3.0,
    significance: float = 0.01,
    resolution_margin: int | None = None,
    init: str = "particles",
    reseed: bool = True,
    reseed_fraction: float = 0.6,
    batch_size: int | None = None,
    memory_mb: float | None = None,
    progress=None,
    on_iteration=None,
) -> Class2DResult:
    """Classify particle images into ``n_classes`` 2D classes (see the module docstring).

    Parameters
    ----------
    images : array ``[N, B, B]`` (numpy or cupy; a numpy stack stays on the host and is moved in batches)
        Particles, protein white, background sd ≈ 1, particle centre near ``B // 2``.
    ctf : None, DataFrame, dict or array
        Per-particle CTF: RELION columns (rlnDefocusU/V, rlnDefocusAngle and, when present,
        rlnVoltage, rlnSphericalAberration, rlnAmplitudeContrast, rlnPhaseShift, rlnCtfBfactor,
        rlnCtfScalefactor, with the optics group's columns joined onto each row), or an array
        ``[N, B, B//2+1]`` of :func:`conveyor.spa.ctfmodel.ctf_2d` values (``rfft=True``) at
        the particle pixel size. None: no CTF.
    pixel_size : float
        Å/px of the particle images.
    n_classes : int
    iterations : int
    psi_step : float
        In-plane angular step, degrees.
    offset_range : float
        Translations searched: ``|dx|, |dy| ≤ offset_range`` px from the box centre, in steps of
        ``offset_step`` px.
    particle_diameter : float
        Å; diameter of the circular mask of the class averages.
    seed : int
        Seeds the initialisation and the half-set split; results are reproducible.
    initial_resolution : float
        Å; resolution limit of the first iteration (coarse to fine from there).
    max_resolution : float, optional
        Å; never use frequencies beyond this (default: up to Nyquist).
    initial_temperature, anneal_iterations : float, int
        The log-likelihood is divided by a temperature falling linearly from
        ``initial_temperature`` to 1 over ``anneal_iterations`` (default: a third of the
        iterations); 1 disables annealing.
    center_classes : bool
        Centre the class averages on their centre of mass every iteration but the last.
    mask_edge : float
        Width (px) of the soft edge of the mask.
    significance : float
        Per particle, the ``(class, ψ)`` pairs outside the most probable ones that hold
        ``1 - significance`` of its posterior are left out of the averages.
    resolution_margin : int, optional
        Shells added to the best class resolution to get the next limit (default ``max(2, B / 12)``).
    init : ``"particles"`` or ``"random"``
        Initial averages: ``K`` different random particles, low-passed to
        ``initial_resolution`` (default), or RELION's averages of random subsets at random ψ.
    reseed, reseed_fraction : bool, float
        Every second iteration during the first ``reseed_fraction`` of the run, the class with
        the least posterior mass, when below 30 % of an even share, restarts from the particle
        whose own structure (power above noise) its class explains least: junk that no class
        explains (carbon edges, aggregates) gets a class of its own instead of diluting a
        particle class.
    batch_size : int, optional
        Particles per batch (default: fit ``memory_mb``, 512 MB on the CPU, 4 GB on the GPU).
    progress : callable, optional
        Called with each iteration's log row (a dict).
    on_iteration : callable, optional
        Called after each iteration with ``(iteration, classes, averages)``: the 0-based
        class of every particle (before the final renumbering) and the averages (host arrays).

    Returns
    -------
    :class:`Class2DResult`
    """
    on_device = backend.array_module(images) is not np
    xp = backend.array_module(images) if on_device else backend.xp()
    if not on_device:
        images = np.asarray(images)
    n, b = _check_inputs(images, pixel_size, n_classes, iterations, psi_step, offset_range, offset_step,
                         particle_diameter)
    if init not in ("particles", "random"):
        raise InputError("init", f"unknown initialisation {init!r}", "use 'particles' or 'random'")
    k = int(n_classes)
    iterations = int(iterations)
    ps = float(pixel_size)
    rng = np.random.default_rng(seed)
    fft = _fft(xp)
    ctf_src = _CtfSource(ctf, n, b, ps)
    nshell_full = b // 2 + 1
    shell_full = _shell_index_full(b)

    psis = np.arange(0.0, 360.0 - 1e-9, float(psi_step))
    nr = len(psis)
    kr_n = k * nr
    ns = int(math.floor(offset_range / offset_step + 1e-9))
    tvals = np.arange(-ns, ns + 1) * float(offset_step)
    nt = len(tvals)
    t2 = tvals[:, None] ** 2 + tvals[None, :] ** 2  # [ty, tx]
    radius_px = 0.5 * particle_diameter / ps
    mask = soft_mask(b, min(radius_px, b / 2 - 1), mask_edge, xp)
    margin = int(resolution_margin) if resolution_margin is not None else max(2, int(round(b / 12)))
    r_max = b // 2 - 1
    if max_resolution:
        r_max = max(2, min(r_max, int(math.floor(b * ps / float(max_resolution)))))
    r_cur = int(np.clip(round(b * ps / float(initial_resolution)), min(4, r_max), r_max))
    n_anneal = int(anneal_iterations) if anneal_iterations is not None else max(1, iterations // 3)
    t0 = float(initial_temperature)
    half = (rng.permutation(n) % 2).astype(np.int64)  # random half sets for the FRC
    if memory_mb is None:
        memory_mb = 4096.0 if xp is not np else 512.0
    if xp is not np and not on_device and images.nbytes < 0.5 * memory_mb * 2**20:
        images = xp.asarray(images, dtype=xp.float32)  # small enough: keep the stack on the device

    def batches(bs):
        for s in range(0, n, bs):
            yield np.arange(s, min(s + bs, n))

    def load(idx):
        return xp.asarray(images[idx[0]:idx[-1] + 1], dtype=xp.float32)

    def spectra(idx, grid):
        return _to_grid(grid, load(idx))

    # initial noise power: the median over particles of each particle's power per shell (robust
    # to strong junk, which would dominate a mean at low resolution)
    full_grid = FrequencyGrid(b, b // 2 - 1, xp)
    shell_pow = np.empty((n, full_grid.r + 1))
    for idx in batches(256):
        x = spectra(idx, full_grid)
        shell_pow[idx] = backend.to_host((xp.abs(x) ** 2) @ full_grid.shell_onehot) / backend.to_host(
            xp.maximum(full_grid.shell_count, 1.0))
    sigma2 = np.empty(nshell_full)
    sigma2[: full_grid.r + 1] = robust_shell_power(shell_pow, backend.to_host(full_grid.shell_count))
    sigma2[full_grid.r + 1:] = sigma2[full_grid.r]
    sigma2 = np.maximum(sigma2, 1e-6 * max(sigma2.max(), 1e-30))
    del shell_pow

    # ---- sums over (half, class, ψ) in the rotated frames, reduced to class averages
    class Sums:
        def __init__(self, grid):
            self.grid = grid
            self.s = xp.zeros((2 * kr_n, grid.F), dtype=xp.complex64)
            self.c = xp.zeros((2 * kr_n, grid.F), dtype=xp.float32)

        def add(self, half_b, hx, h2, ii, kk, wmaps, msel):
            """Pairs ``(ii, kk)`` (batch particle, class·ψ) with translation weights ``wmaps`` and masses ``msel``."""
            if len(ii) == 0:
                return
            grid = self.grid
            rows = half_b[ii] * kr_n + kk
            contrib = hx[ii] * unshift_spectra(wmaps, grid, ShiftKernels(grid, tvals))
            self.s += segment_sum(rows, contrib, 2 * kr_n)
            m = hx.shape[0]
            dense = xp.zeros((m, 2 * kr_n), dtype=xp.float32)
            dense[ii, rows] = msel
            self.c += dense.T @ h2

        def averages(self, masses):
            grid = self.grid
            s_half, c_half = _rotate_back(grid, self.s.reshape(2, k, nr, grid.F), self.c.reshape(2, k, nr, grid.F), psis)
            return wiener_update(grid, s_half, c_half, mask, ps, masses=masses, min_mass=3.0)

    def seed_images(pick, grid):
        """Particles ``pick``, CTF-corrected (Wiener), low-passed to ``grid`` and masked: ``[len, B, B]``."""
        rows = np.asarray(pick) if backend.array_module(images) is np else xp.asarray(pick)
        x = _to_grid(grid, xp.asarray(images[rows], dtype=xp.float32))
        h = ctf_src.batch(np.asarray(pick), grid)
        return _to_real(grid, x * h / (h * h + 0.1)) * mask

    used_seeds: set = set()
    reseed_until = int(round(reseed_fraction * iterations)) if reseed else 0
    grid = FrequencyGrid(b, r_cur, xp)
    if init == "random":  # RELION: every particle in a random class at a random ψ, no shift
        sums = Sums(grid)
        init_class = rng.integers(0, k, n)
        init_psi = rng.integers(0, nr, n)
        delta = np.zeros((nt, nt), dtype=np.float32)
        delta[ns, ns] = 1.0
        for idx in batches(256):
            m = len(idx)
            x = spectra(idx, grid)
            h = ctf_src.batch(idx, grid)
            sums.add(xp.asarray(half[idx]), h * x, h * h, xp.arange(m), xp.asarray(init_class[idx] * nr + init_psi[idx]),
                     xp.asarray(np.broadcast_to(delta, (m, nt, nt))), xp.ones(m, dtype=xp.float32))
        averages = sums.averages(np.bincount(init_class, minlength=k).astype(float)).averages
    else:  # K different particles, CTF-corrected (Wiener) and low-passed to the first limit
        pick = np.sort(rng.choice(n, size=k, replace=False))
        averages = seed_images(pick, grid)
        used_seeds.update(pick.tolist())
    if center_classes:
        averages, _ = centre_averages(averages, mask, max_shift=offset_range)
    prior = np.full(k, 1.0 / k)
    sigma_off = max(float(offset_range) / 2.0, float(offset_step))
    prev_class = None
    prev_averages = averages
    rows_log = []

    # ---- EM iterations
    for it in range(1, iterations + 1):
        t_start = time.perf_counter()
        last = it == iterations
        temp = 1.0 + (t0 - 1.0) * max(0.0, 1.0 - (it - 1) / n_anneal)
        grid = FrequencyGrid(b, r_cur, xp)
        refs = PreparedReferences(rotated_references(averages, psis, grid), grid)
        kern = ShiftKernels(grid, tvals)
        sig_grid = xp.asarray(sigma2[np.clip(grid.shell_host, 0, nshell_full - 1)], dtype=xp.float32)
        winv = grid.wcol / sig_grid  # full-plane weights / σ² (0 outside the disc)
        log_tprior = -0.5 * t2 / sigma_off**2
        log_tprior -= np.log(np.exp(log_tprior).sum())
        log_tprior = xp.asarray(log_tprior, dtype=xp.float32)
        log_cprior = xp.asarray(np.repeat(np.log(np.maximum(prior, 1e-8)) - np.log(nr), nr), dtype=xp.float32)
        # memory per particle: z, g (complex, ny·KR·T) and ~4 float arrays [KR, T, T]
        per = kr_n * nt * (grid.ny * 8 + grid.ny * 8 + nt * 4 * 5) + grid.F * 64
        bs = int(batch_size) if batch_size else int(max(1, min(n, memory_mb * 2**20 / per)))
        sums = Sums(grid)
        class_mass = np.zeros(k)
        off2 = 0.0
        res_pow = np.empty((n, grid.r + 1))
        misfit = np.empty(n)
        structure = np.empty(n)
        unexplained = np.empty(n)
        shell_cnt = backend.to_host(xp.maximum(grid.shell_count, 1.0))
        out_kr = np.empty(n, dtype=np.int64)
        out_t = np.empty((n, 2))
        out_p = np.empty(n)
        out_ll = np.empty(n)
        out_nsig = np.empty(n, dtype=np.int64)
        t2_dev = xp.asarray(t2, dtype=xp.float32)
        for idx in batches(bs):
            m = len(idx)
            x = spectra(idx, grid)  # [m, F]
            h = ctf_src.batch(idx, grid)  # [m, F]
            loglik = log_likelihoods(x, h, refs, winv, grid, kern)  # [m, KR, T, T]
            x2 = ((xp.abs(x) ** 2) * winv).sum(axis=1)  # [m]
            prior_term = log_cprior[None, :, None, None] + log_tprior[None, None]
            lp = (loglik / temp + prior_term).reshape(m, -1) if temp != 1.0 else (loglik + prior_term).reshape(m, -1)
            mx = lp.max(axis=1)
            wts = xp.exp(lp - mx[:, None])
            zsum = wts.sum(axis=1)
            wts /= zsum[:, None]
            best = xp.argmax(lp, axis=1)
            if temp != 1.0:  # the evidence at T = 1 for the report
                l1 = (loglik + prior_term).reshape(m, -1)
                m1 = l1.max(axis=1)
                lse1 = m1 + xp.log(xp.exp(l1 - m1[:, None]).sum(axis=1))
                del l1
            else:
                lse1 = mx + xp.log(zsum)
            del loglik, lp
            wts = wts.reshape(m, kr_n, nt, nt)
            mass = wts.sum(axis=(2, 3))  # [m, KR]
            class_mass += backend.to_host(mass.reshape(m, k, nr).sum(axis=(0, 2)))
            off2 += float(backend.to_host((wts.sum(axis=1) * t2_dev).sum()))
            best_h = backend.to_host(best)
            bkr = best_h // (nt * nt)
            out_kr[idx] = bkr
            out_t[idx, 0] = tvals[best_h % nt]
            out_t[idx, 1] = tvals[(best_h // nt) % nt]
            out_p[idx] = backend.to_host(wts.reshape(m, -1)[xp.arange(m), best])
            out_ll[idx] = backend.to_host(lse1 - 0.5 * x2)
            # significant (particle, class·ψ) pairs -> sums in the rotated frames
            sig = significant_pairs(mass, 1.0 - significance)
            ii, kk = xp.nonzero(sig)
            msel = mass[ii, kk]
            scale = 1.0 / (mass * sig).sum(axis=1)
            out_nsig[idx] = backend.to_host(sig.sum(axis=1))
            sums.add(xp.asarray(half[idx]), h * x, h * h, ii, kk, wts[ii, kk] * scale[ii][:, None, None],
                     msel * scale[ii])
            # noise: residual of the best hypothesis
            a_best = refs.flat[xp.asarray(bkr)]
            tb = xp.asarray(out_t[idx], dtype=xp.float32)
            ph = (-2.0 * np.pi / b) * (grid.kx[None, :] * tb[:, 0:1] + grid.ky[None, :] * tb[:, 1:2])
            resid = xp.abs(x - h * a_best * (xp.cos(ph) + 1j * xp.sin(ph))) ** 2
            res_pow[idx] = backend.to_host(resid @ grid.shell_onehot) / shell_cnt
            dof = float(backend.to_host(grid.wcol.sum()))
            chi2 = backend.to_host(resid @ winv)
            misfit[idx] = (chi2 - dof) / math.sqrt(2.0 * dof)  # χ² excess in sd
            structure[idx] = (backend.to_host(x2) - dof) / math.sqrt(2.0 * dof)  # own power above noise, in sd
            unexplained[idx] = (chi2 - dof) / np.maximum(backend.to_host(x2) - dof, 1e-6)
            del wts, mass, resid
        # ---- M-step
        upd = sums.averages(class_mass)
        averages = upd.averages
        empty = class_mass < 0.5
        if empty.any():  # an empty class keeps its previous average
            averages = xp.where(xp.asarray(empty)[:, None, None], prev_averages, averages)
        if center_classes and not last:
            averages, _ = centre_averages(averages, mask, max_shift=offset_range)
        prior = np.maximum(class_mass / n, 1e-8)
        prior /= prior.sum()
        # a class left with little data restarts from the particle the model explains worst
        reseeded = 0
        if 1 < it <= reseed_until and it % 2 == 0 and not last:
            small = int(np.argmin(class_mass))
            if class_mass[small] < 0.3 * n / k:
                # the particle with clear structure of its own (≥ 5 sd above noise) that its
                # class explains least: junk sitting in a particle class, not yet a class of its own
                score = np.where(structure >= 5.0, unexplained, -np.inf)
                score[(out_kr // nr) == small] = -np.inf
                order_fit = np.argsort(-score)
                order_fit = order_fit[np.isfinite(score[order_fit])]
                cand = next((int(i) for i in order_fit if int(i) not in used_seeds), None)
                if cand is not None:
                    used_seeds.add(cand)
                    new_avg = seed_images(np.array([cand]), grid)
                    if center_classes:
                        new_avg, _ = centre_averages(new_avg, mask, max_shift=offset_range)
                    averages[small] = new_avg[0]
                    prior[small] = 1.0 / k
                    prior /= prior.sum()
                    reseeded = 1
        prev_averages = averages
        counts_shell = backend.to_host(grid.shell_count)
        ok = counts_shell > 0
        new_sig = robust_shell_power(res_pow, counts_shell)
        sigma2[: grid.r + 1][ok] = np.maximum(new_sig[ok], 1e-6 * sigma2.max())
        sigma_off = float(np.clip(math.sqrt(off2 / (2.0 * n)), 0.5 * offset_step, max(offset_range, offset_step)))
        cls = out_kr // nr
        changed = float(np.mean(cls != prev_class)) if prev_class is not None else 1.0
        prev_class = cls
        big = class_mass >= max(3.0, 0.02 * n)
        best_shell = float(np.max(upd.resolution_shell[big] if big.any() else upd.resolution_shell))
        row = {"iteration": it, "resolution_limit": b * ps / grid.r, "best_resolution": b * ps / best_shell,
               "temperature": temp, "log_likelihood": float(out_ll.sum()), "average_pmax": float(out_p.mean()),
               "changed_fraction": changed, "sigma_offset": sigma_off,
               "significant_per_particle": float(out_nsig.mean()), "reseeded": reseeded,
               "seconds": time.perf_counter() - t_start}
        rows_log.append(row)
        log.info("class2d iteration %d/%d: limit %.1f Å, best class %.1f Å, <Pmax> %.3f, changed %.3f, %.1f s",
                 it, iterations, row["resolution_limit"], row["best_resolution"], row["average_pmax"], changed,
                 row["seconds"])
        if progress is not None:
            progress(row)
        if on_iteration is not None:
            on_iteration(it, cls.copy(), backend.to_host(averages))
        final_grid, final_upd = grid, upd
        r_cur = int(np.clip(math.floor(best_shell) + margin, min(4, r_max), r_max))

    # ---- renumber by population and package
    cls = out_kr // nr
    counts = np.bincount(cls, minlength=k)
    order = np.lexsort((np.arange(k), -counts))  # most populous first, ties by index
    new_number = np.empty(k, dtype=np.int64)
    new_number[order] = np.arange(1, k + 1)
    psi = psis[out_kr % nr]
    psi = np.where(psi > 180.0, psi - 360.0, psi)
    ssnr_full = np.zeros((k, nshell_full))
    frc_full = np.zeros((k, nshell_full))
    ssnr_full[:, : final_grid.r + 1] = final_upd.ssnr
    frc_full[:, : final_grid.r + 1] = final_upd.frc
    dist = class_mass / max(class_mass.sum(), 1e-30)
    return Class2DResult(
        averages=backend.to_host(averages)[order].astype(np.float32),
        assignments=new_number[cls],
        psi=psi,
        shifts=out_t,
        probabilities=out_p,
        log_likelihood=out_ll,
        class_counts=counts[order],
        class_distribution=dist[order],
        class_resolution=np.asarray(final_upd.resolution)[order],
        ssnr=ssnr_full[order],
        frc=frc_full[order],
        sigma2=sigma2.copy(),
        n_significant=out_nsig,
        misfit=misfit.copy(),
        pixel_size=ps,
        particle_diameter=float(particle_diameter),
        resolution_limit=float(b * ps / final_grid.r),
        log=pd.DataFrame(rows_log, columns=list(LOG_COLUMNS)),
    )
