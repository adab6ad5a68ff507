"""2D projections of 3D maps, real-space rotations of maps, and sub-pixel image shifts.

Conventions
-----------
* Volumes are ``[z, y, x]``, images ``[y, x]``, stacks ``[n, y, x]``; vectors are
  ``(x, y, z)``. The centre of a box of size N is the voxel/pixel ``N // 2`` on every axis
  (RELION's and ``fftshift``'s origin); rotations are about that centre.
* A rotation matrix ``A`` (RELION's Euler matrix, :mod:`conveyor.geometry`) maps map
  coordinates to image coordinates. The projection is the map rotated by ``A`` and summed
  along z (the beam)::

      P(x, y) = Σ_z V(Aᵀ (x, y, z))

  in voxel units (multiply by the voxel size for a line integral). With ``A = I`` this is
  ``volume.sum(axis=0)``.
* :func:`shift_image` with ``(dx, dy)`` moves image content by ``+dx`` along x (columns)
  and ``+dy`` along y (rows): a feature at ``(x, y)`` ends up at ``(x + dx, y + dy)``.

Method
------
:class:`Projector` uses the Fourier-slice theorem like RELION: the map is zero-padded
(``pad`` times, 2 by default), pre-divided by the sinc² apodisation of trilinear
interpolation (gridding correction), Fourier transformed once, and every projection is
a central slice taken with trilinear interpolation, limited to the Nyquist circle, and
inverse transformed. Against exact line integrals of smooth maps (features of 2 px and
wider) the largest error is 3–6% of the peak with ``pad=2`` (RELION's setting) and 1–3%
with ``pad=3``; the correlation is above 0.999 either way. Cost per projection is O(N²),
so batches of thousands of 128-px projections take seconds. :func:`project_real`
(real-space rotation and sum) is the slow reference.

All functions take numpy or cupy arrays and compute with the module that owns the input
(:func:`conveyor.backend.array_module`).
"""

from __future__ import annotations

import numpy as np

from .. import backend


# --------------------------------------------------------------------------- helpers
def fft_module(xp):
    """FFT functions for ``xp``: ``scipy.fft`` for numpy (keeps float32), ``cupy.fft`` for cupy."""
    if xp is np:
        import scipy.fft as sfft  # noqa: PLC0415

        return sfft
    return xp.fft


def _ndimage(xp):
    if xp is np:
        import scipy.ndimage as ndi  # noqa: PLC0415

        return ndi
    import cupyx.scipy.ndimage as ndi  # noqa: PLC0415

    return ndi


def _as_rotations(rotations, xp=np):
    r = np.asarray(backend.to_host(rotations), dtype=np.float64)
    if r.shape[-2:] != (3, 3):
        raise ValueError(f"rotation matrices must have shape (3, 3) or (n, 3, 3), got {r.shape}")
    single = r.ndim == 2
    return r.reshape(-1, 3, 3), single


# --------------------------------------------------------------------------- Fourier-slice projector
class Projector:
    """Fourier-slice projector of one cubic map (transform once, project many times).

    Parameters
    ----------
    volume : array ``[N, N, N]`` (numpy or cupy)
    pad : int
        Zero-padding factor of the 3D transform (2: errors up to ~5% of the peak; 3: ~2%).
    batch : int
        Projections computed at once (memory ~ batch × N² × 100 bytes).
    """

    def __init__(self, volume, pad: int = 2, batch: int = 256):
        xp = backend.array_module(volume)
        vol = xp.asarray(volume, dtype=xp.float32)
        if vol.ndim != 3 or len(set(vol.shape)) != 1:
            raise ValueError(f"the map must be a cube [N, N, N], got shape {tuple(vol.shape)}")
        n = int(vol.shape[0])
        pad = int(pad)
        if pad < 1:
            raise ValueError("pad must be >= 1")
        m = pad * n
        self.xp, self.n, self.pad, self.m, self.batch = xp, n, pad, m, int(batch)
        fft = fft_module(xp)
        # gridding correction for trilinear interpolation on the padded grid: sinc²(r / m)
        r = xp.arange(n, dtype=xp.float32) - n // 2
        s = xp.sinc(r / m).astype(xp.float32) ** 2
        corr = s[:, None, None] * s[None, :, None] * s[None, None, :]
        padded = xp.zeros((m, m, m), dtype=xp.float32)
        o = m // 2 - n // 2
        padded[o:o + n, o:o + n, o:o + n] = vol / corr
        spec = fft.rfftn(fft.ifftshift(padded), axes=(0, 1, 2))
        self._spec = spec.astype(xp.complex64).ravel()
        self._mh = m // 2 + 1
        # 2D sample grid (rfft layout of an N x N image), inside the Nyquist circle
        ky = xp.fft.fftfreq(n, d=1.0 / n).astype(xp.float32)
        kx = xp.arange(n // 2 + 1, dtype=xp.float32)
        kyy, kxx = xp.meshgrid(ky, kx, indexing="ij")
        inside = (kxx * kxx + kyy * kyy) < (n / 2.0) ** 2
        self._flat = xp.nonzero(inside.ravel())[0]
        self._kx = kxx.ravel()[self._flat]
        self._ky = kyy.ravel()[self._flat]

    # -- Fourier side
    def slices(self, rotations, shifts=None):
        """Central slices: the ``rfft2`` of the projections with the box centre at index 0.

        Returns complex ``[n, N, N//2+1]`` (or ``[N, N//2+1]`` for one matrix), i.e.
        ``rfft2(ifftshift(projection))``; ``shifts`` ``(n, 2)`` of ``(dx, dy)`` px move each
        projection's content by ``+dx, +dy``.
        """
        xp = self.xp
        rots, single = _as_rotations(rotations)
        nrot = rots.shape[0]
        sh = None
        if shifts is not None:
            sh = np.broadcast_to(np.asarray(backend.to_host(shifts), dtype=np.float64).reshape(-1, 2), (nrot, 2))
        n, half = self.n, self.n // 2 + 1
        out = xp.zeros((nrot, n * half), dtype=xp.complex64)
        for start in range(0, nrot, self.batch):
            stop = min(start + self.batch, nrot)
            a = xp.asarray(rots[start:stop], dtype=xp.float32)
            vals = self._sample(a)
            if sh is not None:
                d = xp.asarray(sh[start:stop], dtype=xp.float32)
                ph = (-2.0 * np.pi / n) * (self._kx[None, :] * d[:, 0:1] + self._ky[None, :] * d[:, 1:2])
                vals = vals * (xp.cos(ph) + 1j * xp.sin(ph)).astype(xp.complex64)
            out[start:stop, self._flat] = vals
        out = out.reshape(nrot, n, half)
        return out[0] if single else out

    def _sample(self, a):
        """Trilinear samples of the padded 3D transform at ``pad · Aᵀ (kx, ky, 0)``."""
        xp, m, mh = self.xp, self.m, self._mh
        p = float(self.pad)
        # 3D frequency coordinates (x, y, z) = kx * A[0, :] + ky * A[1, :], in padded-grid units
        cx = p * (self._kx[None, :] * a[:, 0, 0:1] + self._ky[None, :] * a[:, 1, 0:1])
        cy = p * (self._kx[None, :] * a[:, 0, 1:2] + self._ky[None, :] * a[:, 1, 1:2])
        cz = p * (self._kx[None, :] * a[:, 0, 2:3] + self._ky[None, :] * a[:, 1, 2:3])
        flip = cx < 0  # Friedel mate: F(-k) = conj F(k), the rfft holds kx >= 0 only
        sgn = xp.where(flip, -1.0, 1.0).astype(xp.float32)
        cx, cy, cz = cx * sgn, cy * sgn, cz * sgn
        x0, y0, z0 = xp.floor(cx), xp.floor(cy), xp.floor(cz)
        fx, fy, fz = cx - x0, cy - y0, cz - z0
        x0 = x0.astype(xp.int64)
        y0 = y0.astype(xp.int64)
        z0 = z0.astype(xp.int64)
        spec = self._spec
        acc = None
        for dz in (0, 1):
            wz = fz if dz else 1.0 - fz
            iz = (z0 + dz) % m
            for dy in (0, 1):
                wy = fy if dy else 1.0 - fy
                izy = (iz * m + (y0 + dy) % m) * mh
                for dx in (0, 1):
                    wx = fx if dx else 1.0 - fx
                    v = spec[izy + x0 + dx] * (wz * wy * wx)
                    acc = v if acc is None else acc + v
        return xp.where(flip, xp.conj(acc), acc)

    # -- real side
    def project(self, rotations, shifts=None):
        """Projections ``[n, N, N]`` (``[N, N]`` for one matrix), float32, centre at ``N // 2``.

        ``shifts`` ``(n, 2)``: ``(dx, dy)`` px applied to each projection (Fourier shift).
        """
        xp = self.xp
        fft = fft_module(xp)
        spec = self.slices(rotations, shifts)
        img = fft.irfft2(spec, s=(self.n, self.n), axes=(-2, -1))
        return fft.fftshift(img, axes=(-2, -1)).astype(xp.float32)


def project(volume, rotations, shifts=None, pad: int = 2):
    """Projections of ``volume`` ``[N, N, N]`` for rotation matrix/matrices ``(3, 3)`` or ``(n, 3, 3)``.

    ``P(x, y) = Σ_z V(Aᵀ (x, y, z))`` (see the module docstring), by Fourier slicing with
    trilinear interpolation of a ``pad``-times padded 3D transform. For many calls on the
    same map build a :class:`Projector` once.
    """
    return Projector(volume, pad=pad).project(rotations, shifts)


# --------------------------------------------------------------------------- real-space reference
def rotate_volume(volume, rotation, order: int = 3):
    """The map rotated about its centre: ``out(r) = V(Rᵀ r)`` (spline interpolation, zero outside)."""
    xp = backend.array_module(volume)
    ndi = _ndimage(xp)
    vol = xp.asarray(volume, dtype=xp.float32)
    rot = np.asarray(backend.to_host(rotation), dtype=np.float64)
    nz, ny, nx = vol.shape
    c = np.array([nx // 2, ny // 2, nz // 2], dtype=np.float64)  # (x, y, z)
    # out[z, y, x] = V at Rᵀ (r - c) + c ; affine_transform works on (z, y, x) indices
    rt = rot.T
    perm = [2, 1, 0]
    mat = rt[np.ix_(perm, perm)]
    cz = c[perm]
    offset = cz - mat @ cz
    return ndi.affine_transform(vol, xp.asarray(mat), offset=tuple(float(o) for o in offset), order=order,
                                mode="constant", cval=0.0)


def project_real(volume, rotations, order: int = 1):
    """Reference projections by real-space rotation (:func:`rotate_volume`) and sum along z. Slow."""
    xp = backend.array_module(volume)
    rots, single = _as_rotations(rotations)
    out = xp.stack([rotate_volume(volume, r, order=order).sum(axis=0) for r in rots])
    return out[0] if single else out


# --------------------------------------------------------------------------- shifts
def shift_image(img, dx, dy):
    """Sub-pixel Fourier shift of images ``[..., y, x]`` by ``(dx, dy)`` px (periodic).

    Positive ``dx`` moves content to +x (higher column index), positive ``dy`` to +y.
    ``dx``/``dy`` may be arrays broadcasting against the leading dimensions (one shift
    per image of a stack).
    """
    xp = backend.array_module(img)
    fft = fft_module(xp)
    a = xp.asarray(img)
    real_dtype = a.dtype if a.dtype in (np.float32, np.float64) else np.float32
    a = a.astype(real_dtype, copy=False)
    ny, nx = a.shape[-2:]
    f = fft.rfft2(a, axes=(-2, -1))
    dxa = xp.asarray(dx, dtype=real_dtype).reshape(np.shape(dx) + (1, 1)) if np.ndim(dx) else dx
    dya = xp.asarray(dy, dtype=real_dtype).reshape(np.shape(dy) + (1, 1)) if np.ndim(dy) else dy
    kx = xp.fft.rfftfreq(nx).astype(real_dtype)
    ky = xp.fft.fftfreq(ny).astype(real_dtype)
    ph = -2.0 * np.pi * (kx[None, :] * dxa + ky[:, None] * dya)
    f = f * (xp.cos(ph) + 1j * xp.sin(ph))
    return fft.irfft2(f, s=(ny, nx), axes=(-2, -1)).astype(real_dtype)
