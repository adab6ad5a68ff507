"""3D reconstruction by direct Fourier inversion, and the Fourier-space tools around it.

Conventions
-----------
* Volumes ``[N, N, N]`` (``[z, y, x]``), images ``[N, N]``, centre at ``N // 2`` (as
  :mod:`conveyor.spa.projection`). Vectors are ``(x, y, z)``.
* Orientations are RELION's Euler matrices ``A`` (:func:`conveyor.geometry.euler_to_matrix`):
  the image is the projection of the map rotated by ``A``, so by the Fourier-slice theorem
  its 2D transform at ``(kx, ky)`` is the 3D transform of the map at ``Aᵀ (kx, ky, 0)``.
* Image transforms are ``rfft2(ifftshift(image))`` (box centre at index 0), the layout
  :meth:`conveyor.spa.projection.Projector.slices` returns; Fourier coefficients are
  addressed by integer ``(kx, ky)`` in units of ``1 / (N · pixel_size)``.
* Shifts ``(dx, dy)`` in px are where the particle lies relative to the box centre
  (Conveyor's convention; RELION's ``rlnOriginX/YAngst`` is ``-shift · pixel_size``).
  A shifted particle's transform is the centred one times ``exp(-2πi k·s / N)``; the
  reconstruction multiplies by the conjugate ramp to bring it back.
* CTF: the ``ctfs`` passed here are those of the particle images as they are, i.e. for
  contrast-inverted particles (protein white) ``-ctf_2d(...)`` of
  :mod:`conveyor.spa.ctfmodel`, positive at low frequency (:class:`CtfParams` and
  :func:`particle_ctfs` compute it from RELION's columns). The image model is
  ``X = CTF · P + noise`` with ``P`` the map's projection.

Method (RELION's BackProjector)
-------------------------------
For every image the CTF-weighted transform ``CTF · X`` and the weight ``CTF²`` are added to
a 3D Fourier grid padded ``pad`` times (``M = pad · N``) at the rotated slice positions
``pad · Aᵀ k``, spread over the 8 nearest voxels with trilinear weights, for every
operator ``R`` of the point group (the slice of ``A R`` — the same view of a symmetric
map). Only the half-space ``kx ≥ 0`` is stored (a sample with ``x < 0`` is stored as its
Friedel mate), and the ``kx = 0`` plane is made Hermitian before inversion. The estimate
per voxel is the Wiener-style ratio ``Σ CTF·X / (Σ CTF² + ⟨Σ CTF²⟩_shell / SNR_shell)``
(``wiener`` is ``1/SNR``, a constant or one value per shell). The padded map is inverse
transformed, windowed to ``N³`` and divided by the Fourier transform of the trilinear
kernel (``sinc²(x / M)`` per axis; gridding correction), then optionally masked with a
soft sphere.

Every kernel works on numpy or cupy arrays alike (the module that owns the images).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .. import backend
from ..errors import InputError
from ..geometry import symmetry_matrices
from .fsc import radius_3d
from .projection import fft_module

# --------------------------------------------------------------------------- Fourier coefficients


@dataclasses.dataclass
class Coefficients:
    """Integer 2D Fourier coefficients ``(kx, ky)`` of an ``N × N`` image, sorted by radius.

    ``flat`` indexes the flattened ``rfft2`` layout ``[N, N // 2 + 1]``; ``shell`` is
    ``round(|k|)``; ``herm`` is 2 for ``kx > 0`` and 1 for ``kx = 0`` (sums over the half
    plane times ``herm`` equal sums over the full plane). Because they are sorted by
    radius, the coefficients within a smaller radius are a prefix: :meth:`count`.
    """

    n: int
    flat: object
    kx: object
    ky: object
    shell: object
    herm: object
    radius: np.ndarray  # host copy, for prefix lengths

    def count(self, r_max: float) -> int:
        """Number of leading coefficients with ``|k| <= r_max``."""
        return int(np.searchsorted(self.radius, float(r_max) + 1e-6, side="right"))


def fourier_coefficients(n: int, r_max: float | None = None, xp=None) -> Coefficients:
    """The coefficients of an ``n``-px image inside radius ``r_max`` (default: below Nyquist).

    Shell 0 (the mean) is included. ``r_max`` is capped at ``n / 2 - 1`` so every
    trilinear neighbour on a twice-padded grid stays inside the stored half-space.
    """
    xp = xp or backend.xp()
    cap = n / 2.0 - 1.0
    r_max = cap if r_max is None else min(float(r_max), cap)
    ky = np.fft.fftfreq(n, d=1.0 / n)
    kx = np.arange(n // 2 + 1, dtype=float)
    kyy, kxx = np.meshgrid(ky, kx, indexing="ij")
    r = np.sqrt(kxx**2 + kyy**2).ravel()
    flat = np.flatnonzero(r <= r_max + 1e-6)
    order = np.argsort(r[flat], kind="stable")
    flat = flat[order]
    kxf, kyf = kxx.ravel()[flat], kyy.ravel()[flat]
    rr = r[flat]
    return Coefficients(
        n=int(n),
        flat=xp.asarray(flat),
        kx=xp.asarray(kxf, dtype=xp.float32),
        ky=xp.asarray(kyf, dtype=xp.float32),
        shell=xp.asarray(np.rint(rr).astype(np.int64)),
        herm=xp.asarray(np.where(kxf > 0, 2.0, 1.0), dtype=xp.float32),
        radius=rr,
    )


def image_transforms(images, coeffs: Coefficients, batch: int = 1024):
    """``rfft2(ifftshift(image))`` of every image at ``coeffs``: complex64 ``[n, K]``."""
    xp = backend.array_module(images)
    fft = fft_module(xp)
    imgs = images if images.ndim == 3 else images[None]
    out = xp.empty((imgs.shape[0], len(coeffs.radius)), dtype=xp.complex64)
    for s in range(0, imgs.shape[0], batch):
        a = xp.asarray(imgs[s:s + batch], dtype=xp.float32)
        f = fft.rfft2(fft.ifftshift(a, axes=(-2, -1)), axes=(-2, -1))
        out[s:s + batch] = f.reshape(f.shape[0], -1)[:, coeffs.flat]
    return out


def phase_ramp(coeffs: Coefficients, shifts, k: int | None = None):
    """``exp(-2πi k·s / N)`` for shifts ``[..., 2]`` (px): complex64 ``[..., K]``.

    Multiplying a centred transform by it moves the content by ``+s``.
    """
    xp = backend.array_module(coeffs.kx)
    s = xp.asarray(shifts, dtype=xp.float32)
    kx = coeffs.kx if k is None else coeffs.kx[:k]
    ky = coeffs.ky if k is None else coeffs.ky[:k]
    ph = (-2.0 * np.pi / coeffs.n) * (s[..., 0:1] * kx + s[..., 1:2] * ky)
    return (xp.cos(ph) + 1j * xp.sin(ph)).astype(xp.complex64)


# --------------------------------------------------------------------------- CTF
@dataclasses.dataclass
class CtfParams:
    """Per-particle CTF parameters (RELION's units: Å, degrees, kV, mm, Å²).

    :meth:`values` gives the CTF of contrast-inverted particle images (``-ctf_2d``,
    positive at low frequency) times ``scale`` (rlnCtfScalefactor), with the envelope
    ``exp(-B k² / 4)`` of rlnCtfBfactor.
    """

    defocus_u: np.ndarray
    defocus_v: np.ndarray
    defocus_angle: np.ndarray
    voltage: np.ndarray
    cs: np.ndarray
    amplitude_contrast: np.ndarray
    phase_shift: np.ndarray
    bfactor: np.ndarray
    scale: np.ndarray

    def __post_init__(self):
        n = len(np.atleast_1d(self.defocus_u))
        for f in dataclasses.fields(self):
            v = np.broadcast_to(np.asarray(getattr(self, f.name), dtype=np.float64).reshape(-1), (n,))
            setattr(self, f.name, np.array(v))

    def __len__(self) -> int:
        return len(self.defocus_u)

    def subset(self, idx) -> "CtfParams":
        return CtfParams(**{f.name: getattr(self, f.name)[idx] for f in dataclasses.fields(self)})

    @classmethod
    def from_table(cls, table, source=None) -> "CtfParams":
        """From a particle table joined with its optics (:func:`conveyor.io.star.join_optics`)."""
        need = ["rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnVoltage", "rlnSphericalAberration",
                "rlnAmplitudeContrast"]
        missing = [c for c in need if c not in table.columns]
        if missing:
            raise InputError(source, f"particles lack CTF column(s) {', '.join(missing)}",
                             "run CTF estimation and extraction first (the CTF travels with each particle)")

        def col(name, default):
            return table[name].to_numpy(float) if name in table.columns else np.full(len(table), default)

        return cls(col("rlnDefocusU", 0), col("rlnDefocusV", 0), col("rlnDefocusAngle", 0), col("rlnVoltage", 300),
                   col("rlnSphericalAberration", 2.7), col("rlnAmplitudeContrast", 0.1), col("rlnPhaseShift", 0.0),
                   col("rlnCtfBfactor", 0.0), col("rlnCtfScalefactor", 1.0))

    def values(self, coeffs: Coefficients, pixel_size: float, idx=None, k: int | None = None):
        """CTF of the particles ``idx`` (all by default) at the first ``k`` coefficients: float32 ``[n, K]``."""
        from .ctfmodel import ctf_at  # noqa: PLC0415

        xp = backend.array_module(coeffs.kx)
        sel = slice(None) if idx is None else np.asarray(backend.to_host(idx))
        kx = (coeffs.kx if k is None else coeffs.kx[:k]) / (coeffs.n * pixel_size)
        ky = (coeffs.ky if k is None else coeffs.ky[:k]) / (coeffs.n * pixel_size)

        def col(a):
            return xp.asarray(a[sel], dtype=xp.float32)[:, None]

        c = -ctf_at(kx[None, :], ky[None, :], col(self.defocus_u), col(self.defocus_v), col(self.defocus_angle),
                    col(self.voltage), col(self.cs), col(self.amplitude_contrast), col(self.phase_shift), 0.0)
        b = self.bfactor[sel]
        if np.any(b != 0):
            c = c * xp.exp(-col(self.bfactor) * (kx * kx + ky * ky)[None, :] / 4.0)
        return (c * col(self.scale)).astype(xp.float32)


def particle_ctfs(n: int, pixel_size: float, params: CtfParams, xp=None):
    """The CTFs of contrast-inverted particles on the ``rfft2`` grid: float32 ``[p, N, N // 2 + 1]``."""
    xp = xp or backend.xp()
    ky = np.fft.fftfreq(n, d=1.0 / n)
    kx = np.arange(n // 2 + 1, dtype=float)
    kyy, kxx = np.meshgrid(ky, kx, indexing="ij")
    r = np.sqrt(kxx**2 + kyy**2).ravel()
    full = Coefficients(n=n, flat=xp.arange(kxx.size), kx=xp.asarray(kxx.ravel(), dtype=xp.float32),
                        ky=xp.asarray(kyy.ravel(), dtype=xp.float32), shell=xp.asarray(np.rint(r).astype(np.int64)),
                        herm=xp.asarray(np.where(kxx.ravel() > 0, 2.0, 1.0), dtype=xp.float32), radius=r)
    return params.values(full, pixel_size).reshape(len(params), n, n // 2 + 1)


def _ctf_at_coeffs(ctfs, coeffs: Coefficients, idx=None, k: int | None = None):
    """Gather ``[n, N, N//2+1]`` CTF arrays (or None) at the coefficients."""
    if ctfs is None:
        return None
    xp = backend.array_module(coeffs.kx)
    c = ctfs if idx is None else ctfs[idx]
    c = xp.asarray(c, dtype=xp.float32).reshape(c.shape[0], -1)
    flat = coeffs.flat if k is None else coeffs.flat[:k]
    return c[:, flat]


# --------------------------------------------------------------------------- gridding
def _gridding_kernel(n: int, m: int, xp):
    """``sinc²(i / m)`` per axis for the ``n`` central voxels of an ``m``-px padded box."""
    r = xp.arange(n, dtype=xp.float32) - n // 2
    return (xp.sinc(r / m) ** 2).astype(xp.float32)


def _separable(vol, s, op):
    return op(op(op(vol, s[:, None, None]), s[None, :, None]), s[None, None, :])


def trilinear(grid, m: int, p, hermitian: bool = True):
    """Trilinear samples of a flattened half-space grid ``[m, m, m // 2 + 1]`` at points ``p [n, 3]``.

    ``p`` is ``(x, y, z)`` in grid units; points with ``x < 0`` read their Friedel mate
    (conjugated when ``hermitian`` and the grid is complex).
    """
    xp = backend.array_module(grid)
    mh = m // 2 + 1
    flip = p[:, 0] < 0
    p = xp.where(flip[:, None], -p, p)
    f0 = xp.floor(p)
    fr = p - f0
    i0 = f0.astype(xp.int32)
    x0 = i0[:, 0]
    x1 = xp.minimum(x0 + 1, mh - 1)
    y0 = (i0[:, 1] % m) * mh
    y1 = ((i0[:, 1] + 1) % m) * mh
    z0 = (i0[:, 2] % m) * (m * mh)
    z1 = ((i0[:, 2] + 1) % m) * (m * mh)
    fx, fy, fz = fr[:, 0], fr[:, 1], fr[:, 2]
    gx, gy, gz = 1.0 - fx, 1.0 - fy, 1.0 - fz
    acc = None
    for zz, wz in ((z0, gz), (z1, fz)):
        for yy, wy in ((y0, gy), (y1, fy)):
            base = zz + yy
            wzy = wz * wy
            v = grid[base + x0] * (wzy * gx) + grid[base + x1] * (wzy * fx)
            acc = v if acc is None else acc + v
    if hermitian and xp.iscomplexobj(acc):
        acc = xp.where(flip, xp.conj(acc), acc)
    return acc


# --------------------------------------------------------------------------- projection side
class FourierVolume:
    """The padded, gridding-corrected 3D transform of a map, sampled at arbitrary frequencies.

    Same method as :class:`conveyor.spa.projection.Projector` (pre-division by ``sinc²``,
    ``pad``-times zero padding, trilinear interpolation), but sampling only the requested
    coefficients, for batches of rotations: :meth:`slices` gives the central slices
    (``rfft2`` of the projections) at ``(kx, ky)``, :meth:`sample` any 3D points.
    """

    def __init__(self, volume, pad: int = 2):
        xp = backend.array_module(volume)
        vol = xp.asarray(volume, dtype=xp.float32)
        if vol.ndim != 3 or len(set(vol.shape)) != 1:
            raise ValueError(f"the map must be a cube [N, N, N], got shape {tuple(vol.shape)}")
        n = int(vol.shape[0])
        m = int(pad) * n
        self.xp, self.n, self.pad, self.m, self.mh = xp, n, int(pad), m, m // 2 + 1
        fft = fft_module(xp)
        s = _gridding_kernel(n, m, xp)
        padded = xp.zeros((m, m, m), dtype=xp.float32)
        o = m // 2 - n // 2
        padded[o:o + n, o:o + n, o:o + n] = _separable(vol, s, lambda a, b: a / b)
        self.spec = fft.rfftn(fft.ifftshift(padded)).astype(xp.complex64).ravel()

    def sample(self, points, chunk: int = 1 << 18):
        """Trilinear samples at ``points [..., 3]`` (x, y, z) in Fourier pixels of the ``N`` box.

        Points must lie within ``|k| < N / 2``. Computed in chunks of ``chunk`` points.
        """
        xp = self.xp
        p = xp.asarray(points, dtype=xp.float32)
        shape = p.shape[:-1]
        p = p.reshape(-1, 3)
        out = xp.empty(p.shape[0], dtype=xp.complex64)
        for s in range(0, p.shape[0], chunk):
            out[s:s + chunk] = self._sample_flat(p[s:s + chunk])
        return out.reshape(shape)

    def _sample_flat(self, p):
        return trilinear(self.spec, self.m, p * float(self.pad), hermitian=True)

    def slices(self, rotations, coeffs: Coefficients, k: int | None = None, chunk: int = 1 << 18):
        """Central slices at the first ``k`` coefficients for rotations ``[..., 3, 3]``: ``[..., K]``."""
        xp = self.xp
        a = xp.asarray(rotations, dtype=xp.float32)
        lead = a.shape[:-2]
        a = a.reshape(-1, 3, 3)
        kx = coeffs.kx if k is None else coeffs.kx[:k]
        ky = coeffs.ky if k is None else coeffs.ky[:k]
        nk = int(kx.shape[0])
        out = xp.empty((a.shape[0], nk), dtype=xp.complex64)
        step = max(1, chunk // max(nk, 1))
        for s in range(0, a.shape[0], step):
            b = a[s:s + step]
            pts = kx[None, :, None] * b[:, None, 0, :] + ky[None, :, None] * b[:, None, 1, :]
            out[s:s + step] = self._sample_flat(pts.reshape(-1, 3)).reshape(b.shape[0], nk)
        return out.reshape(lead + (nk,))


# --------------------------------------------------------------------------- back-projection
def _scatter_add(target, idx, vals):
    xp = backend.array_module(target)
    if xp is np:
        np.add.at(target, idx, vals)
    else:  # pragma: no cover - exercised on GPU nodes only
        import cupyx  # noqa: PLC0415

        cupyx.scatter_add(target, idx, vals)


class Backprojector:
    """Accumulates ``Σ CTF·X`` and ``Σ CTF²`` on a padded 3D Fourier grid (see the module docstring).

    Parameters
    ----------
    n : int
        Box size of the images and the map.
    pad : int
        Padding factor of the 3D grid (2, as RELION).
    symmetry : str
        Point group; every slice is inserted once per operator.
    xp : module, optional
        numpy or cupy (default: the selected device).
    """

    def __init__(self, n: int, pad: int = 2, symmetry: str = "C1", xp=None, symmetry_mode: str = "insert"):
        xp = xp or backend.xp()
        self.xp, self.n, self.pad = xp, int(n), int(pad)
        self.m = self.pad * self.n
        self.mh = self.m // 2 + 1
        self.symmetry = str(symmetry)
        if symmetry_mode not in ("insert", "grid"):
            raise ValueError("symmetry_mode must be 'insert' or 'grid'")
        self.symmetry_mode = symmetry_mode
        self.ops = symmetry_matrices(symmetry)
        self._pending_symmetry = symmetry_mode == "grid" and len(self.ops) > 1
        size = self.m * self.m * self.mh
        self.data_re = xp.zeros(size, dtype=xp.float32)
        self.data_im = xp.zeros(size, dtype=xp.float32)
        self.weight = xp.zeros(size, dtype=xp.float32)
        self.count = 0

    def add(self, other: "Backprojector") -> "Backprojector":
        """Add another back-projector's sums (same box, padding and symmetry) into this one."""
        if (other.n, other.pad) != (self.n, self.pad):
            raise ValueError("back-projectors differ in box or padding")
        self.data_re += other.data_re
        self.data_im += other.data_im
        self.weight += other.weight
        self.count += other.count
        return self

    def insert_slices(self, values, weights, rotations, coeffs: Coefficients, k: int | None = None, batch: int = 256):
        """Insert slices: ``values [B, K]`` (complex, ``CTF·X``) and ``weights [B, K]`` (``CTF²``)
        at the first ``K`` coefficients, rotations ``[B, 3, 3]``; once per symmetry operator."""
        xp = self.xp
        k = values.shape[-1] if k is None else k
        kx, ky = coeffs.kx[:k], coeffs.ky[:k]
        rots = np.asarray(backend.to_host(rotations), dtype=np.float64).reshape(-1, 3, 3)
        vals = xp.asarray(values, dtype=xp.complex64).reshape(-1, k)
        wts = xp.asarray(weights, dtype=xp.float32).reshape(-1, k)
        if wts.shape[0] == 1 and vals.shape[0] > 1:
            wts = xp.broadcast_to(wts, vals.shape)
        ops = self.ops if self.symmetry_mode == "insert" else self.ops[:1]
        for s in range(0, rots.shape[0], batch):
            v = vals[s:s + batch]
            w = wts[s:s + batch]
            for op in ops:
                a = xp.asarray(np.einsum("bij,jk->bik", rots[s:s + batch], op), dtype=xp.float32)
                pts = kx[:, None] * a[:, None, 0, :] + ky[:, None] * a[:, None, 1, :]
                self._scatter(pts * float(self.pad), v, w)
        self.count += rots.shape[0]

    def _scatter(self, p, vals, wts):
        xp, m, mh = self.xp, self.m, self.mh
        cx, cy, cz = p[..., 0], p[..., 1], p[..., 2]
        flip = cx < 0
        sgn = xp.where(flip, -1.0, 1.0).astype(xp.float32)
        cx, cy, cz = cx * sgn, cy * sgn, cz * sgn
        vals = xp.broadcast_to(vals, cx.shape)
        vre = xp.real(vals)
        vim = xp.imag(vals) * sgn  # the Friedel mate of a sample with x < 0 is its conjugate
        w = xp.broadcast_to(wts, cx.shape)
        x0, y0, z0 = xp.floor(cx), xp.floor(cy), xp.floor(cz)
        fx, fy, fz = cx - x0, cy - y0, cz - z0
        itype = xp.int32 if m * m * mh < 2**31 else xp.int64
        x0 = x0.astype(itype)
        y0 = y0.astype(itype)
        z0 = z0.astype(itype)
        # the 8 neighbours by broadcasting over trailing (2, 2, 2) axes
        ix = xp.stack([x0, xp.minimum(x0 + 1, mh - 1)], axis=-1)
        iy = xp.stack([y0 % m, (y0 + 1) % m], axis=-1) * mh
        iz = xp.stack([z0 % m, (z0 + 1) % m], axis=-1) * (m * mh)
        idx = (iz[..., :, None, None] + iy[..., None, :, None] + ix[..., None, None, :]).ravel()
        wx = xp.stack([1.0 - fx, fx], axis=-1)
        wy = xp.stack([1.0 - fy, fy], axis=-1)
        wz = xp.stack([1.0 - fz, fz], axis=-1)
        tri = wz[..., :, None, None] * wy[..., None, :, None] * wx[..., None, None, :]
        _scatter_add(self.data_re, idx, (tri * vre[..., None, None, None]).ravel())
        _scatter_add(self.data_im, idx, (tri * vim[..., None, None, None]).ravel())
        _scatter_add(self.weight, idx, (tri * w[..., None, None, None]).ravel())

    def insert(self, images, rotations, shifts=None, ctfs=None, weights=None, *, r_max: float | None = None,
               batch: int = 256):
        """Insert particle images ``[n, N, N]`` with rotations ``[n, 3, 3]`` and shifts ``[n, 2]``.

        ``ctfs``: ``[n, N, N // 2 + 1]`` (``rfft2`` layout, the particles' sign, see the module
        docstring; :func:`particle_ctfs` makes it from :class:`CtfParams`), or None (no CTF).
        ``weights [n]`` scale each image's contribution (posterior probabilities). ``r_max``
        limits the radius in Fourier px.
        """
        xp = self.xp
        imgs = xp.asarray(images, dtype=xp.float32)
        if imgs.ndim == 2:
            imgs = imgs[None]
        nimg = imgs.shape[0]
        co = fourier_coefficients(self.n, r_max, xp=xp)
        rots = np.asarray(backend.to_host(rotations), dtype=np.float64).reshape(-1, 3, 3)
        if rots.shape[0] != nimg:
            raise ValueError(f"{rots.shape[0]} rotations for {nimg} images")
        for s in range(0, nimg, batch):
            e = min(s + batch, nimg)
            x = image_transforms(imgs[s:e], co)
            if shifts is not None:
                x = x * xp.conj(phase_ramp(co, xp.asarray(np.asarray(backend.to_host(shifts))[s:e])))
            c = _ctf_at_coeffs(ctfs, co, slice(s, e)) if ctfs is not None else None
            if c is None:
                val, wt = x, xp.ones((1, x.shape[1]), dtype=xp.float32)
            else:
                val, wt = c * x, c * c
            if weights is not None:
                w = xp.asarray(np.asarray(backend.to_host(weights), dtype=np.float32)[s:e])[:, None]
                val, wt = val * w, xp.broadcast_to(wt, val.shape) * w
            self.insert_slices(val, wt, rots[s:e], co)

    # -- inversion
    def symmetrise_grid(self, r_max: float | None = None):
        """Impose the point group on the accumulated sums (``symmetry_mode="grid"``, RELION's way).

        ``D_sym(q) = Σ_R D(R q)`` (likewise ``W``) by trilinear interpolation of the sums
        accumulated with the identity only, within radius ``r_max`` (Fourier px of the box;
        default: all). Cheaper than inserting every slice ``G`` times, at the cost of one more
        interpolation for the copies. Called by :meth:`reconstruct` when pending.
        """
        if not self._pending_symmetry:
            return
        xp, m, mh, pad = self.xp, self.m, self.mh, self.pad
        d, w = self._hermitian_plane()
        d = d.ravel()
        w = w.ravel()
        r_lim = (self.n / 2.0) if r_max is None else min(float(r_max) + 1.0, self.n / 2.0)
        kz = xp.fft.fftfreq(m, d=1.0 / m).astype(xp.float32)
        kx = xp.arange(mh, dtype=xp.float32)
        r2 = kz[:, None, None] ** 2 + kz[None, :, None] ** 2 + kx[None, None, :] ** 2
        sel = xp.flatnonzero((r2 <= (pad * r_lim) ** 2).ravel())
        iz, rem = sel // (m * mh), sel % (m * mh)
        iy, ix = rem // mh, rem % mh
        q = xp.stack([kx[ix], kz[iy], kz[iz]], axis=1)
        dsum = d[sel].copy()
        wsum = w[sel].copy()
        for op in self.ops[1:]:
            p = q @ xp.asarray(op.T, dtype=xp.float32)  # R q
            dsum += trilinear(d, m, p, hermitian=True)
            wsum += trilinear(w, m, p, hermitian=False)
        half = xp.where(ix == 0, 0.5, 1.0).astype(xp.float32)  # reconstruct() re-adds the x = 0 mates
        self.data_re[:] = 0.0
        self.data_im[:] = 0.0
        self.weight[:] = 0.0
        self.data_re[sel] = xp.real(dsum) * half
        self.data_im[sel] = xp.imag(dsum) * half
        self.weight[sel] = wsum * half
        self._pending_symmetry = False

    def _hermitian_plane(self):
        """``D``, ``W`` as ``[M, M, M//2+1]`` with the ``kx = 0`` plane made Hermitian."""
        xp, m, mh = self.xp, self.m, self.mh
        d = (self.data_re + 1j * self.data_im).astype(xp.complex64).reshape(m, m, mh)
        w = self.weight.reshape(m, m, mh).copy()
        neg = (-xp.arange(m)) % m
        p0 = d[:, :, 0]
        w0 = w[:, :, 0]
        d[:, :, 0] = p0 + xp.conj(p0[neg][:, neg])
        w[:, :, 0] = w0 + w0[neg][:, neg]
        return d, w

    def shell_mean_weight(self):
        """Mean ``Σ CTF²`` per shell of the map's box (shells ``0 .. N // 2``), host array."""
        xp = self.xp
        self.symmetrise_grid()
        _, w = self._hermitian_plane()
        shells = xp.rint(radius_3d(self.m, xp) / self.pad).astype(xp.int64)
        ns = self.n // 2 + 1
        sel = shells < ns
        tot = xp.bincount(shells[sel], weights=w[sel].astype(xp.float64), minlength=ns)[:ns]
        cnt = xp.bincount(shells[sel], minlength=ns)[:ns]
        return backend.to_host(tot / xp.maximum(cnt, 1))

    def reconstruct(self, wiener=1e-3, *, r_max: float | None = None, mask_radius: float | None = None,
                    mask_edge: float = 3.0, gridding: bool = True):
        """The map ``[N, N, N]`` (float32) from the accumulated sums.

        Parameters
        ----------
        wiener : float or array
            ``1/SNR``: a constant, or one value per shell ``0 .. N // 2`` (e.g.
            ``1 / ssnr_from_fsc(fsc)``); the regulariser of shell ``s`` is
            ``wiener[s] · ⟨Σ CTF²⟩_s``. Values beyond the array repeat its last one.
        r_max : float, optional
            Highest radius in Fourier px of the box kept (default ``N / 2 - 1``).
        mask_radius : float, optional
            Soft spherical mask radius in px (cosine edge of ``mask_edge`` px).
        gridding : bool
            Divide by the trilinear kernel's transform (``sinc²``).
        """
        xp, m, n, pad = self.xp, self.m, self.n, self.pad
        fft = fft_module(xp)
        self.symmetrise_grid(r_max)
        d, w = self._hermitian_plane()
        r_pad = radius_3d(m, xp)
        shells = xp.rint(r_pad / pad).astype(xp.int64)
        ns = n // 2 + 1
        sel = shells < ns
        tot = xp.bincount(shells[sel], weights=w[sel].astype(xp.float64), minlength=ns)[:ns]
        cnt = xp.bincount(shells[sel], minlength=ns)[:ns]
        mean_w = backend.to_host(tot / xp.maximum(cnt, 1)).astype(np.float64)
        inv = np.asarray(wiener, dtype=np.float64).reshape(-1)
        if inv.size < ns:
            inv = np.concatenate([inv, np.full(ns - inv.size, inv[-1])])
        reg = inv[:ns] * mean_w
        floor = 1e-6 * max(float(mean_w.max()), 1e-30)
        reg = np.maximum(reg, floor)
        reg_full = xp.asarray(np.concatenate([reg, [reg[-1]]]).astype(np.float32))[xp.minimum(shells, ns)]
        r_lim = (n / 2.0 - 1.0) if r_max is None else min(float(r_max), n / 2.0 - 1.0)
        f = xp.where(r_pad <= pad * r_lim + 0.5 * pad, d / (w + reg_full), 0.0).astype(xp.complex64)
        vol = fft.fftshift(fft.irfftn(f, s=(m, m, m)))
        o = m // 2 - n // 2
        vol = vol[o:o + n, o:o + n, o:o + n].astype(xp.float32)
        if gridding:
            vol = _separable(vol, _gridding_kernel(n, m, xp), lambda a, b: a / b)
        if mask_radius is not None:
            vol = vol * soft_sphere_mask(n, mask_radius, mask_edge, xp)
        return vol.astype(xp.float32)


def reconstruct(images, rotations, shifts_px=None, ctfs=None, pixel_size: float = 1.0, symmetry: str = "C1",
                pad: int = 2, wiener=1e-3, *, weights=None, max_resolution: float | None = None,
                mask_diameter: float | None = None, batch: int = 256):
    """Direct Fourier inversion of particle images (see the module docstring).

    Parameters
    ----------
    images : array ``[n, N, N]`` (numpy or cupy)
        Particle images, protein white (contrast-inverted as extracted).
    rotations : array ``[n, 3, 3]``
        RELION Euler matrices (:func:`conveyor.geometry.euler_to_matrix` of rlnAngleRot/Tilt/Psi).
    shifts_px : array ``[n, 2]``, optional
        ``(dx, dy)`` px where each particle lies relative to the box centre
        (``-rlnOriginX/YAngst / pixel_size``).
    ctfs : array ``[n, N, N // 2 + 1]`` or :class:`CtfParams`, optional
        CTF of each particle image (``-ctf_2d``, ``rfft`` layout), or its parameters.
    pixel_size : float
        Å/px (for ``max_resolution``, ``mask_diameter`` and :class:`CtfParams`).
    symmetry : str
        Point group imposed by inserting every slice once per operator.
    pad : int
        Padding of the 3D Fourier grid.
    wiener : float or array
        ``1/SNR`` regulariser (constant or per shell), see :meth:`Backprojector.reconstruct`.
    weights : array ``[n]``, optional
        Per-image weights.
    max_resolution : float, optional
        Å; frequencies beyond are left out.
    mask_diameter : float, optional
        Å; soft spherical mask applied to the result.

    Returns
    -------
    array ``[N, N, N]`` float32 on the images' device.
    """
    xp = backend.array_module(images)
    imgs = xp.asarray(images, dtype=xp.float32)
    if imgs.ndim != 3 or imgs.shape[1] != imgs.shape[2]:
        raise ValueError(f"images must be a stack [n, N, N], got {tuple(imgs.shape)}")
    n = imgs.shape[-1]
    r_max = None if max_resolution is None else n * pixel_size / max_resolution
    if isinstance(ctfs, CtfParams):
        ctfs = particle_ctfs(n, pixel_size, ctfs, xp=xp)
    bp = Backprojector(n, pad=pad, symmetry=symmetry, xp=xp)
    bp.insert(imgs, rotations, shifts_px, ctfs, weights, r_max=r_max, batch=batch)
    mask_r = None if mask_diameter is None else 0.5 * mask_diameter / pixel_size
    return bp.reconstruct(wiener, r_max=r_max, mask_radius=mask_r)


# --------------------------------------------------------------------------- volume helpers
def soft_sphere_mask(n: int, radius: float, edge: float = 3.0, xp=None):
    """``[n, n, n]`` mask: 1 inside ``radius`` px of the centre, a raised-cosine edge of ``edge`` px."""
    xp = xp or backend.xp()
    g = xp.arange(n, dtype=xp.float32) - n // 2
    r = xp.sqrt(g[:, None, None] ** 2 + g[None, :, None] ** 2 + g[None, None, :] ** 2)
    if edge <= 0:
        return (r <= radius).astype(xp.float32)
    t = xp.clip((r - radius) / edge, 0.0, 1.0)
    return (0.5 * (1.0 + xp.cos(np.pi * t))).astype(xp.float32)


def fourier_filter(volume, gain):
    """Multiply the map's transform by ``gain(s)`` where ``s`` is the frequency in 1/px (radial)."""
    xp = backend.array_module(volume)
    fft = fft_module(xp)
    v = xp.asarray(volume, dtype=xp.float32)
    n = v.shape[0]
    s = radius_3d(n, xp) / n
    return fft.irfftn(fft.rfftn(v) * gain(s), s=v.shape).astype(xp.float32)


def lowpass(volume, resolution: float, pixel_size: float, edge_shells: float = 2.0):
    """Low-pass filter at ``resolution`` Å with a raised-cosine edge ``edge_shells`` wide (centred there)."""
    xp = backend.array_module(volume)
    n = volume.shape[0]
    c = n * pixel_size / float(resolution)
    w = max(float(edge_shells), 1e-3)

    def gain(s):
        t = xp.clip((s * n - (c - w / 2.0)) / w, 0.0, 1.0)
        return 0.5 * (1.0 + xp.cos(np.pi * t))

    return fourier_filter(volume, gain)


def apply_bfactor(volume, bfactor: float, pixel_size: float):
    """Multiply the transform by ``exp(-B s² / 4)`` (``s`` in 1/Å): positive B blurs, negative sharpens."""
    xp = backend.array_module(volume)

    def gain(s):
        sa = s / pixel_size
        return xp.exp(-float(bfactor) * sa * sa / 4.0).astype(xp.float32)

    return fourier_filter(volume, gain)


def shell_filter(volume, values):
    """Multiply each Fourier shell ``round(|k|)`` by ``values[shell]`` (shells beyond the array: 0)."""
    xp = backend.array_module(volume)
    fft = fft_module(xp)
    v = xp.asarray(volume, dtype=xp.float32)
    n = v.shape[0]
    vals = np.asarray(values, dtype=np.float32).reshape(-1)
    table = xp.asarray(np.concatenate([vals, [0.0]]).astype(np.float32))
    sh = xp.minimum(xp.rint(radius_3d(n, xp)).astype(xp.int64), len(vals))
    return fft.irfftn(fft.rfftn(v) * table[sh], s=v.shape).astype(xp.float32)


def shift_volume(volume, shift_xyz):
    """Fourier shift of a map by ``(dx, dy, dz)`` px (content moves by ``+shift``, periodic)."""
    xp = backend.array_module(volume)
    fft = fft_module(xp)
    v = xp.asarray(volume, dtype=xp.float32)
    n = v.shape[0]
    dx, dy, dz = (float(a) for a in np.asarray(shift_xyz, dtype=float).reshape(3))
    if dx == dy == dz == 0.0:
        return v.copy()
    k = xp.fft.fftfreq(n).astype(xp.float32)
    kx = xp.fft.rfftfreq(n).astype(xp.float32)
    ph = -2.0 * np.pi * (k[:, None, None] * dz + k[None, :, None] * dy + kx[None, None, :] * dx)
    return fft.irfftn(fft.rfftn(v) * (xp.cos(ph) + 1j * xp.sin(ph)), s=v.shape).astype(xp.float32)


def resample_volume(volume, pixel_size_in: float, pixel_size_out: float, box_out: int):
    """A map at another pixel size and box: Fourier crop/pad to the new sampling, then window/pad.

    The centre ``N // 2`` is kept; the physical scale is preserved (values are densities,
    not sums).
    """
    xp = backend.array_module(volume)
    fft = fft_module(xp)
    v = xp.asarray(volume, dtype=xp.float32)
    n = v.shape[0]
    box_out = int(box_out)
    if abs(pixel_size_in - pixel_size_out) > 1e-4 * pixel_size_out:
        m = int(round(n * pixel_size_in / pixel_size_out))
        m += m % 2
        if m < 2:
            raise InputError(None, f"cannot resample a {n}-px map from {pixel_size_in} to {pixel_size_out} Å/px",
                             "give a map with a finer pixel size or a larger box")
        f = fft.fftshift(fft.fftn(fft.ifftshift(v)))
        g = xp.zeros((m, m, m), dtype=xp.complex64)
        c_in, c_out = n // 2, m // 2
        h = min(n, m) // 2
        sl_in = slice(c_in - h, c_in + h)
        sl_out = slice(c_out - h, c_out + h)
        g[sl_out, sl_out, sl_out] = f[sl_in, sl_in, sl_in]
        v = xp.real(fft.fftshift(fft.ifftn(fft.ifftshift(g)))).astype(xp.float32) * (m / n) ** 3
        n = m
    if n == box_out:
        return v
    out = xp.zeros((box_out,) * 3, dtype=xp.float32)
    c_in, c_out = n // 2, box_out // 2
    h_lo = min(c_in, c_out)
    h_hi = min(n - c_in, box_out - c_out)
    si = slice(c_in - h_lo, c_in + h_hi)
    so = slice(c_out - h_lo, c_out + h_hi)
    out[so, so, so] = v[si, si, si]
    return out


def symmetrize(volume, symmetry: str, order: int = 3):
    """Average of the map over its point group (real-space rotations about the centre)."""
    from .projection import rotate_volume  # noqa: PLC0415

    xp = backend.array_module(volume)
    ops = symmetry_matrices(symmetry)
    if len(ops) == 1:
        return xp.asarray(volume, dtype=xp.float32).copy()
    acc = xp.zeros(volume.shape, dtype=xp.float32)
    for r in ops:
        acc += rotate_volume(volume, r, order=order)
    return acc / len(ops)
