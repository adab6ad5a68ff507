"""3D intensity from single-particle diffraction patterns by Expand-Maximise-Compress (EMC).

Method (Loh & Elser 2009; Ayyer et al. 2016, Dragonfly), as implemented here
----------------------------------------------------------------------------
Frames ``d`` hold photon counts ``K_dt`` on good pixels ``t`` whose scattering vectors
``q_t`` (voxel units of the model grid, on the Ewald sphere) and relative efficiency
``c_t`` (solid angle × polarisation, mean 1) are known. Orientations ``r`` are rotations
``R_r`` with prior weights ``w_r`` (:func:`conveyor.spi.quaternions.quaternion_grid`).
The model ``W`` is a 3D intensity on a cubic grid (``q = 0`` at index ``size // 2``).
Every iteration:

1. **Expand**: tomograms ``S_rt = c_t W(R_rᵀ q_t)`` by trilinear interpolation, for a
   block of orientations at a time (``[pixels, orientations]`` arrays).
2. **Maximise**: Poisson log-likelihood of frame ``d`` in orientation ``r`` with scale
   (fluence) ``φ``, terms constant in ``r`` dropped::

       L_dr = Σ_t K_dt log(φ S_rt) − φ Σ_t S_rt

   (a ``[frames, pixels] × [pixels, orientations]`` matrix product, dense or sparse
   CSR), then ``P_dr ∝ w_r exp(β L_dr)``, normalised per frame by log-sum-exp. With
   per-frame scaling (default) ``φ`` is profiled out per orientation, ``φ̂_dr = K_d / u_r``
   with ``u_r = Σ_t S_rt``, which leaves ``L_dr = Σ_t K_dt log S_rt − K_d log u_r`` (the
   multinomial likelihood of where the photons fell). Dragonfly instead uses the scale
   of the previous iteration, which at the start (all scales 1) biases every frame
   towards orientations that predict its total photon count: on simulated data with a
   4x fluence spread, one iteration started from the true model gave a median
   orientation error of 18° that way and 7° with the profiled scale (grid spacing 14°). The per-frame scale
   used in the merge is Dragonfly's update ``φ_d = K_d / Σ_r P_dr u_r``, renormalised to
   mean 1 (the model carries the overall level).
3. **Compress**: every orientation's tomogram is merged back with trilinear weights
   ``f``, weighted by the probability mass it received::

       W(v) = Σ_rt f_rt,v (Σ_d P_dr K_dt) / Σ_rt f_rt,v (Σ_d P_dr φ_d) c_t

   (the exact M-step for nearest-neighbour sampling; Dragonfly instead divides each
   tomogram by its own occupancy and weights all orientations equally). Numerator and
   denominator are symmetrised before the division: Friedel ``W(q) = W(−q)`` always,
   and optionally a point group. Orientations whose total probability is below
   ``1e-6`` frames are skipped. Voxels no pixel reached are 0 (see ``weight``).

The inverse temperature ``β`` follows ``β_i = β_0 · factor^⌊(i−1)/every⌋`` (clipped at 1),
Dragonfly's ``beta_schedule``. With ``β_0 = "auto"`` (:func:`estimate_beta`), ``β_0`` is
set so that ``β_0 · D = 10`` for the median frame, where ``D`` is the expected
log-likelihood gap between a frame's true orientation and an unrelated one, estimated
from the data: ``D_d = Σ_t K_dt c²(|q_t|)`` with ``c²`` the squared speckle contrast per
shell (counts about the mean pattern beyond Poisson noise). On the simulated capsid this
``D`` is 13-26 % above the gap measured with the true model. A photon count alone does
not predict it: photons in the nearly isotropic centre of a near-spherical particle's
pattern carry no orientation information (with 3000 photons per frame, orientation
structure only appeared at ``β ≈ 0.5-1``, two orders of magnitude above ``10/K``).

Units and conventions
---------------------
* ``qvox`` are ``(q_x, q_y, q_z)`` in voxels: ``q / dq`` with ``q`` the lab scattering
  vector in 1/m (no 2π, :mod:`conveyor.spi.detector`) and ``dq`` the voxel (1/m); by
  default ``dq`` is :attr:`DetectorGeometry.q_per_pixel`, the grid of the simulator's
  ``truth/intensity.mrc``.
* Volumes are ``[q_z, q_y, q_x]`` with ``q = 0`` at ``size // 2``; ``size`` is odd.
* Quaternions ``(w, x, y, z)`` are the active rotation of the particle in the lab (the
  simulator's ``truth/frames.csv`` convention): pixel ``t`` samples ``W(Rᵀ q_t)``.
* The model is in photons per unit efficiency at mean scale: a frame with scale ``φ``
  expects ``φ c_t W(Rᵀ q_t)`` photons in pixel ``t``.

Implementation
--------------
The 600-cell grid is a union of right cosets ``{R_j G : G ∈ T}`` of the 12 rotations
``T`` that permute the axes of the cubic model grid
(:func:`conveyor.spi.quaternions.coset_decomposition`). A pixel in orientation ``R_j G``
samples ``W(Gᵀ R_jᵀ q)``: the model with permuted axes, which is exact, at the position
``R_jᵀ q`` shared by the whole coset. So trilinear corners are computed once per coset (a
twelfth of the rotations) and kept as a CSR matrix ``M`` ``[pixels × cosets, voxels]``
(8 entries per row, rows pixel-major); with the ``[voxels, 12]`` stack of permuted models
``M @ stack`` gives every tomogram as ``[pixels, rotations]``, ready for the BLAS product
with the frames (taken in pixel chunks that stay in cache, as ``Σ_t K_dt (log S_rt −
ref_t) + Σ_t K_dt ref_t`` with ``ref_t`` the log of the model's radial mean and the
per-frame terms kept in float64, so float32 carries only differences between rotations:
within 0.2 nat of float64 with ~2e5 photons per frame, against ~3 nat summing directly).
The merge is ``Mᵀ @ (Kᵀ P)`` (in the same pixel chunks, added into one kept array) for the
numerator and a per-coset coverage matrix times ``Σ_d P_dr φ_d`` for the denominator;
the 12 stacked results are folded back (flips summed plane by plane, one transposed add
per axis permutation). Rotations outside complete cosets (e.g. some of a Friedel-half
grid) form cosets of one. Blocks of cosets run in threads (the sparse products, BLAS and
numpy's loops release the GIL).

Every kernel takes its array module from :mod:`conveyor.backend`, so the same code runs
on numpy and cupy; frames, model and probabilities stay on the device.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np

from .. import backend
from ..errors import InputError
from .quaternions import point_group, quaternion_grid, quaternion_to_matrix

log = logging.getLogger(__name__)

#: Orientations with less total probability (in frames) are left out of the merge.
MERGE_MIN_OCCUPANCY = 1e-6
#: Log-probability (relative to a frame's most likely rotation) below which P is 0: the
#: smallest normal float32 is e^-87.3.
PROB_LOG_MIN = -87.0
#: Tomogram floor relative to the model's mean, so a photon on a dark voxel is finite.
LOG_FLOOR = 1e-6
#: Cache cost per coset-pixel pair (bytes): trilinear corners (8 × int32 + float32) plus
#: the coverage matrix, and the coverage alone (about a third of the corners' entries).
CACHE_BYTES_PER_PAIR = 88
COVERAGE_BYTES_PER_PAIR = 24
#: Size of the pieces (bytes) that expand, likelihood and the merge denominator work on:
#: in cache and reused memory on a CPU (fresh pages cost more than the arithmetic).
CHUNK_BYTES = {"cpu": 4 << 20, "gpu": 256 << 20}
#: Target size (orientations × pixels) of one block of tomograms, CPU and GPU.
BLOCK_ELEMENTS = {"cpu": 64_000_000, "gpu": 256_000_000}
#: Log-likelihood spread (nats) between a typical frame's best and an unrelated
#: orientation that the automatic start ``β_0`` aims at.
BETA_SPREAD = 10.0

LOG_COLUMNS = [
    "iteration", "beta", "log_likelihood", "mutual_info", "rms_change", "scale_mean", "scale_std",
    "num_rot", "active_rot", "seconds",
]


# ---------------------------------------------------------------------------------------
# detector pixels in voxel units
# ---------------------------------------------------------------------------------------
def detector_pixels(geometry, mask, dq_per_m: float | None = None, polarization: str = "x", max_radius_px: float | None = None):
    """Pixels of a detector for EMC: q-vectors in voxels, efficiencies, and their indices.

    Parameters
    ----------
    geometry : conveyor.spi.detector.DetectorGeometry
    mask : array ``[y, x]``, 1 = good pixel
    dq_per_m : float, optional
        Voxel size (1/m); default ``geometry.q_per_pixel`` (as ``reciprocal_grid``).
    polarization : "x", "y" or "none"
    max_radius_px : float, optional
        Use only pixels within this radius of the beam centre (e.g. the inscribed circle).

    Returns
    -------
    qvox : ``[npix, 3]`` float64 ``(q_x, q_y, q_z)`` in voxels
    corr : ``[npix]`` float64, solid angle × polarisation normalised to mean 1
    pixels : ``[npix]`` int64 flat indices into ``[y, x]`` frames
    dq_per_m : float
    """
    good = np.asarray(backend.to_host(mask)).astype(bool)
    if max_radius_px is not None:
        good &= backend.to_host(geometry.radius_px(xp=np)) <= float(max_radius_px)
    pixels = np.flatnonzero(good.ravel())
    if pixels.size == 0:
        raise InputError("mask", "no good pixels left for EMC", "check the mask, beamstop and --max-radius-px")
    dq = float(geometry.q_per_pixel if dq_per_m is None else dq_per_m)
    q = backend.to_host(geometry.q_vectors(xp=np)).reshape(-1, 3)[pixels] / dq
    corr = backend.to_host(geometry.solid_angle(xp=np) * geometry.polarization(axis=polarization, xp=np)).ravel()[pixels]
    corr = corr / corr.mean()
    return q, corr, pixels, dq


def bin_detector(frames, mask, geometry, factor: int):
    """Sum ``factor × factor`` pixel blocks: fewer, larger pixels (EMC cost scales with pixels).

    A binned pixel is good only when all its pixels are good. The geometry gets the
    larger pixel and the beam centre in binned pixel coordinates
    (``c' = (c + ½)/factor − ½``), so :func:`detector_pixels` gives the q-vector of the
    block centre and the block's solid angle; the natural voxel grows by ``factor``.
    Frames ``[n, y, x]`` (numpy or cupy) are cropped to a multiple of ``factor``.

    Returns ``(frames [n, y', x'], mask [y', x'], geometry)``.
    """
    from dataclasses import replace

    b = int(factor)
    if b < 1:
        raise InputError("--bin", f"binning must be >= 1, got {factor}", "use 1, 2, 4, ...")
    if b == 1:
        return frames, mask, geometry
    xp = backend.array_module(frames)
    ny, nx = (int(geometry.shape[0]) // b) * b, (int(geometry.shape[1]) // b) * b
    if ny == 0 or nx == 0:
        raise InputError("--bin", f"binning {b} is larger than the detector {geometry.shape}", "use a smaller factor")
    f = xp.asarray(frames)[:, :ny, :nx]
    fb = f.reshape(f.shape[0], ny // b, b, nx // b, b).sum(axis=(2, 4))
    m = xp.asarray(mask)[:ny, :nx].astype(bool)
    mb = m.reshape(ny // b, b, nx // b, b).all(axis=(1, 3)).astype(xp.uint8)
    cx, cy = geometry.beam_center_px
    px, py = geometry.pixel_size_m
    geom = replace(geometry, shape=(ny // b, nx // b), pixel_size_m=(px * b, py * b),
                   beam_center_px=((cx + 0.5) / b - 0.5, (cy + 0.5) / b - 0.5))
    return fb, mb, geom


def auto_model_size(qvox) -> int:
    """Smallest odd grid edge holding every pixel with room for interpolation: ``2 ceil(q_max) + 3``."""
    qs = qvox if isinstance(qvox, (list, tuple)) else [qvox]
    qmax = max(float(np.max(np.linalg.norm(backend.to_host(q), axis=-1))) for q in qs)
    return 2 * int(math.ceil(qmax)) + 3


def beta_at(iteration: int, beta_schedule) -> float:
    """``β`` of a 1-based iteration: ``start · factor^⌊(iteration − 1)/every⌋``, at most 1."""
    start, factor, every = beta_schedule
    return float(min(1.0, float(start) * float(factor) ** ((int(iteration) - 1) // max(1, int(every)))))


# ---------------------------------------------------------------------------------------
# trilinear kernels (array-module agnostic)
# ---------------------------------------------------------------------------------------
def _rotations(quats, xp):
    return xp.asarray(quaternion_to_matrix(np.asarray(backend.to_host(quats), dtype=np.float64)), dtype=xp.float32)


def _coords(qvox, rots, size: int, xp, pixel_major: bool = False):
    """Trilinear corners of ``Rᵀ q`` for every rotation: flat voxel indices and weights.

    ``[b, npix, 8]``, or ``[npix, b, 8]`` with ``pixel_major``; indices are int32 when the
    grid allows (int64 otherwise).
    """
    if pixel_major:  # q·R for all rotations at once: [npix, 3] @ [3, b·3]
        b = rots.shape[0]
        c = (qvox @ xp.transpose(rots, (1, 0, 2)).reshape(3, 3 * b)).reshape(-1, b, 3)
    else:
        c = xp.matmul(qvox[None, :, :], rots)  # row vectors: q·R = (Rᵀ q)ᵀ, [b, npix, 3]
    c += float(size // 2)
    base = xp.floor(c)
    f = c - base
    itype = xp.int32 if size**3 < 2**31 else xp.int64
    ib = base.astype(itype)
    idx = (ib[..., 2] * size + ib[..., 1]) * size + ib[..., 0]
    del c, base, ib
    fx, fy, fz = f[..., 0], f[..., 1], f[..., 2]
    gx, gy, gz = 1 - fx, 1 - fy, 1 - fz
    zy = (gz * gy, gz * fy, fz * gy, fz * fy)
    w8 = xp.stack([zy[0] * gx, zy[0] * fx, zy[1] * gx, zy[1] * fx, zy[2] * gx, zy[2] * fx, zy[3] * gx, zy[3] * fx], -1)
    s2 = size * size
    offs = xp.asarray([0, 1, size, size + 1, s2, s2 + 1, s2 + size, s2 + size + 1], dtype=itype)
    return idx[..., None] + offs, w8


def _gather(flat, i8, w8):
    """``Σ_corners flat[i] w`` → ``[b, npix]``."""
    xp = backend.array_module(w8)
    return xp.einsum("...k,...k->...", xp.take(flat, i8), w8)


def _scatter(acc, i8, w8, values, xp):
    """``acc[i] += w · values`` over the 8 corners (``values`` ``[b, npix]``)."""
    acc += xp.bincount(i8.ravel(), weights=(w8 * values[..., None]).ravel(), minlength=acc.size)


def _check_size(qvox_list, size):
    if size % 2 == 0 or size < 5:
        raise InputError("model_size", f"model size must be odd and >= 5, got {size}", "use an odd size or 'auto'")
    need = auto_model_size(qvox_list)
    if size < need:
        raise InputError("model_size", f"model size {size} is too small for the detector (needs {need})", "use --model-size auto or a larger odd size")


def expand(model, qvox, quats, corr=None):
    """Tomograms ``[n_rot, npix]``: ``corr_t · W(R_rᵀ q_t)`` for every rotation (trilinear).

    ``model`` ``[size]*3`` (numpy or cupy, ``q = 0`` at ``size // 2``), ``qvox`` ``[npix, 3]``
    voxels, ``quats`` ``[n_rot, 4]``, ``corr`` ``[npix]`` (default 1).
    """
    xp = backend.array_module(model)
    size = int(model.shape[0])
    q = xp.asarray(qvox, dtype=xp.float32)
    _check_size([backend.to_host(q)], size)
    i8, w8 = _coords(q, _rotations(quats, xp), size, xp)
    s = _gather(xp.asarray(model, dtype=xp.float32).ravel(), i8, w8)
    if corr is not None:
        s = s * xp.asarray(corr, dtype=xp.float32)[None, :]
    return s


def maximize(frames, tomograms, weights, beta: float, scales=None):
    """Orientation probabilities of frames given tomograms.

    Parameters
    ----------
    frames : ``[n_frames, npix]`` photon counts (dense array or scipy/cupyx sparse)
    tomograms : ``[n_rot, npix]`` expected photons at unit scale (from :func:`expand`)
    weights : ``[n_rot]`` prior weights of the rotations
    beta : float
    scales : ``[n_frames]``, optional
        Per-frame scales ``φ``; without them the scale is profiled out per orientation
        (as :func:`emc` does with ``scale=True``).

    Returns
    -------
    dict with ``prob`` ``[n_frames, n_rot]``, ``loglik`` ``[n_frames, n_rot]`` (``L_dr``,
    terms constant in r dropped), ``best`` ``[n_frames]`` (index of the most likely
    rotation), ``mutual_info`` ``[n_frames]`` and ``scales`` (Dragonfly's update,
    renormalised to mean 1).
    """
    xp = backend.array_module(tomograms)
    k, sparse = _as_frames(frames, xp)
    s = xp.asarray(tomograms, dtype=xp.float32)
    floor = LOG_FLOOR * float(s.mean())
    a = _matmul(k, xp.log(xp.maximum(s, floor)).T, sparse, xp)
    u = s.sum(axis=1)
    counts = _row_sums(k, sparse, xp)
    if scales is None:
        L = a - counts[:, None] * xp.log(xp.maximum(u, 1e-30))[None, :]
    else:
        phi = xp.asarray(scales, dtype=xp.float32)
        L = a - phi[:, None] * u[None, :]
    logw = xp.log(xp.asarray(weights, dtype=xp.float64) / float(xp.asarray(weights).sum())).astype(xp.float32)
    p, mi = _softmax(L, logw, float(beta), xp)
    new_phi = counts / xp.maximum(p @ u, 1e-30)
    new_phi = new_phi / new_phi.mean()
    return {"prob": p, "loglik": L, "best": xp.argmax(p, axis=1), "mutual_info": mi, "scales": new_phi}


def compress(tomograms, qvox, quats, size: int, occupancy=None, corr=None, symmetry=None, friedel: bool = True):
    """Merge tomograms into a 3D intensity with trilinear weights; returns ``(model, weight)``.

    ``tomograms`` ``[n_rot, npix]`` are intensities in model units (already divided by
    ``corr``) at rotations ``quats``; each is weighted by ``occupancy[r]`` (default 1)
    times ``corr`` in the merge. ``weight`` is the summed merge weight per voxel (0 where
    no pixel reached). Friedel symmetry (and ``symmetry``, a point-group name) is applied
    to numerator and denominator before dividing.
    """
    xp = backend.array_module(tomograms)
    t = xp.asarray(tomograms, dtype=xp.float32)
    q = xp.asarray(qvox, dtype=xp.float32)
    _check_size([backend.to_host(q)], int(size))
    occ = xp.ones(t.shape[0], dtype=xp.float32) if occupancy is None else xp.asarray(occupancy, dtype=xp.float32)
    c = xp.ones(t.shape[1], dtype=xp.float32) if corr is None else xp.asarray(corr, dtype=xp.float32)
    den = occ[:, None] * c[None, :]
    num = t * den
    acc_num = xp.zeros(int(size) ** 3, dtype=xp.float64)
    acc_den = xp.zeros(int(size) ** 3, dtype=xp.float64)
    i8, w8 = _coords(q, _rotations(quats, xp), int(size), xp)
    _scatter(acc_num, i8, w8, num, xp)
    _scatter(acc_den, i8, w8, den, xp)
    return _finish(acc_num, acc_den, int(size), symmetry, friedel, xp)


def symmetrize(volume, symmetry=None, friedel: bool = True):
    """``volume`` averaged over Friedel pairs and a point group (trilinear resampling)."""
    xp = backend.array_module(volume)
    v = xp.asarray(volume, dtype=xp.float64)
    if friedel:
        v = 0.5 * (v + v[::-1, ::-1, ::-1])
    group = point_group(symmetry)
    if len(group) > 1:
        v = _group_sum(v, group, xp) / len(group)
    return v


def _group_sum(vol, group, xp):
    """Σ_g vol(g q) on the grid of ``vol`` (trilinear; outside the grid counts 0)."""
    size = vol.shape[0]
    c = size // 2
    ax = xp.arange(size, dtype=xp.float32) - c
    z, y, x = xp.meshgrid(ax, ax, ax, indexing="ij")
    q = xp.stack([x.ravel(), y.ravel(), z.ravel()], -1)
    inside = xp.sqrt((q * q).sum(1)) <= c - 1
    qi = q[inside]
    flat = vol.astype(xp.float32).ravel()
    out = xp.zeros(size**3, dtype=xp.float64)
    for g in group:
        # sample vol at g q: row vectors q·gᵀ
        i8, w8 = _coords(qi, xp.asarray(g.T[None], dtype=xp.float32), size, xp)
        out[xp.flatnonzero(inside)] += _gather(flat, i8[0], w8[0])
    return out.reshape(vol.shape)


def _finish(acc_num, acc_den, size, symmetry, friedel, xp):
    num = acc_num.reshape((size,) * 3)
    den = acc_den.reshape((size,) * 3)
    num = symmetrize(num, symmetry, friedel)
    den = symmetrize(den, symmetry, friedel)
    thresh = 1e-9 * float(den.max()) if float(den.max()) > 0 else 0.0
    sampled = den > thresh
    model = xp.where(sampled, num / xp.where(sampled, den, 1.0), 0.0)
    return model.astype(xp.float32), den.astype(xp.float32)


# ---------------------------------------------------------------------------------------
# frames: dense or sparse
# ---------------------------------------------------------------------------------------
def _is_sparse(a) -> bool:
    import scipy.sparse as sps

    if sps.issparse(a):
        return True
    try:
        import cupyx.scipy.sparse as cps  # noqa: PLC0415

        return bool(cps.issparse(a))
    except Exception:
        return False


def _as_frames(frames, xp):
    """Frames on the device of ``xp``: ``(array, is_sparse)``; sparse ones as float32 CSR."""
    if _is_sparse(frames):
        import scipy.sparse as sps

        if xp is np:
            m = frames.get() if not sps.issparse(frames) else frames
            return sps.csr_matrix(m, dtype=np.float32), True
        import cupyx.scipy.sparse as cps  # noqa: PLC0415

        if sps.issparse(frames):
            return cps.csr_matrix(sps.csr_matrix(frames, dtype=np.float32)), True
        return frames.tocsr().astype(xp.float32), True
    if xp is np:
        return np.asarray(backend.to_host(frames), dtype=np.float32), False
    return xp.asarray(frames, dtype=xp.float32), False


def to_sparse(frames):
    """Frames ``[n, npix]`` as a float32 CSR matrix on the selected device (low photon counts)."""
    xp = backend.xp()
    arr = np.asarray(backend.to_host(frames), dtype=np.float32)
    import scipy.sparse as sps

    m = sps.csr_matrix(arr)
    if xp is np:
        return m
    import cupyx.scipy.sparse as cps  # noqa: PLC0415

    return cps.csr_matrix(m)


def _matmul(k, dense, sparse, xp):
    out = k @ dense
    return xp.asarray(out, dtype=xp.float32)


def _row_sums(k, sparse, xp):
    if sparse:
        return xp.asarray(k.sum(axis=1), dtype=xp.float32).ravel()
    return k.sum(axis=1, dtype=xp.float32)


def _log_factorial_sums(k, sparse, xp):
    if xp is np:
        from scipy.special import gammaln
    else:  # pragma: no cover - GPU only
        from cupyx.scipy.special import gammaln
    if sparse:
        m = k.copy()
        m.data = gammaln(m.data.astype(xp.float64) + 1.0).astype(xp.float32)
        return xp.asarray(m.sum(axis=1), dtype=xp.float64).ravel()
    return gammaln(k.astype(xp.float64) + 1.0).sum(axis=1)


def _softmax(L, logw, beta, xp):
    """``P ∝ w exp(β L)`` per row, and the mutual information ``Σ P log(P / w)`` per row.

    Probabilities below ``e^-87`` of a row's largest (float32 denormals, which slow every
    later product by orders of magnitude) are set to 0.
    """
    lp = beta * L + logw[None, :]
    lp -= lp.max(axis=1, keepdims=True)
    p = xp.exp(lp)
    p[lp < PROB_LOG_MIN] = 0.0
    z = p.sum(axis=1, keepdims=True)
    p /= z
    mi = (p * (lp - xp.log(z) - logw[None, :])).sum(axis=1)
    return p, mi


# ---------------------------------------------------------------------------------------
# the EMC loop
# ---------------------------------------------------------------------------------------
@dataclass
class _Group:
    """Frames recorded with one detector geometry."""

    k: object  # [n, npix] dense float32 or CSR
    kt: object  # transpose (CSR) for sparse merges, or None
    sparse: bool
    q: object  # [npix, 3] float32 voxels
    c: object  # [npix] float32
    counts: object  # [n] photons per frame
    lgk: object  # [n] Σ log K!
    offset: int  # first frame in the concatenated frame list


@dataclass
class EMCState:
    """What :func:`emc` hands to ``callback`` after every iteration (arrays on the device)."""

    iteration: int
    model: object
    weight: object
    scales: object
    best: object
    max_prob: object
    loglik: object
    beta: float
    log_row: dict


@dataclass
class EMCResult:
    """Result of :func:`emc` (host arrays).

    Attributes
    ----------
    intensity : ``[size]*3`` float32, model units (see module docstring); 0 where unsampled
    weight : ``[size]*3`` float32, merge weight per voxel (0 = no pixel reached it)
    orientations : ``[n_frames, 4]`` most likely rotation per frame (quaternion)
    orientation_index : ``[n_frames]`` index into the rotation grid
    max_prob : ``[n_frames]`` probability of that rotation
    scales : ``[n_frames]`` per-frame scale ``φ`` (mean 1)
    loglik : ``[n_frames]`` expected Poisson log-likelihood ``Σ_r P_dr log p(K_d | r)``
    log : list of dict, one per iteration (columns :data:`LOG_COLUMNS`)
    beta_start : float
    """

    intensity: np.ndarray
    weight: np.ndarray
    orientations: np.ndarray
    orientation_index: np.ndarray
    max_prob: np.ndarray
    scales: np.ndarray
    loglik: np.ndarray
    log: list = field(default_factory=list)
    beta_start: float = 1.0


def _block_bases(npix: int, k: int, n_bases: int, block_size) -> int:
    """Cosets per block: ``block_size`` rotations, or about :data:`BLOCK_ELEMENTS` tomogram pixels."""
    if block_size:
        return int(max(1, min(n_bases, int(block_size) // k)))
    budget = BLOCK_ELEMENTS["gpu" if backend.get_device() == "gpu" else "cpu"]
    return int(max(1, min(n_bases, budget // max(npix * k, 1))))


def _as_list(x):
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _sparse_module(xp):
    if xp is np:
        import scipy.sparse as sps

        return sps
    import cupyx.scipy.sparse as cps  # noqa: PLC0415

    return cps


def permuted_volume(vol, perm):
    """``B(v) = vol(P v)`` for a signed permutation matrix ``P`` (exact: no interpolation).

    ``vol`` is ``[z, y, x]`` with ``q = 0`` at ``size // 2`` (odd edge), ``P`` acts on
    column vectors ``(x, y, z)`` about that centre. Returns a view (flips and a transpose).
    """
    xp = backend.array_module(vol)
    p = np.rint(np.asarray(perm)).astype(int)
    out, axes = vol, [0, 0, 0]
    for a in range(3):  # array axis a holds vector component 2 - a
        src = int(np.flatnonzero(p[2 - a])[0])  # (P v)_{2-a} = ±v_src
        if p[2 - a, src] < 0:
            out = xp.flip(out, axis=a)
        axes[2 - src] = a
    return xp.transpose(out, axes)


@dataclass
class _CosetSet:
    """Rotations ``R_j G_g``: ``m`` base rotations times ``k`` signed permutations ``G_g``."""

    rots: object  # [m, 3, 3] float32 base rotations R_j (device)
    perms: np.ndarray  # [k, 3, 3] int signed permutation matrices G_g (identity first)
    members: np.ndarray  # [m, k] index into the rotation grid of R_j G_g
    offset: int  # first column of the set in coset order


class _Cosets:
    """The rotation grid in coset order (:func:`conveyor.spi.quaternions.coset_decomposition`).

    Column ``offset + j k + g`` of the likelihood and probability arrays is rotation
    ``R_j G_g``. A pixel in that orientation samples ``W(G_gᵀ R_jᵀ q)``, i.e. the model
    with permuted axes ``W_g = W ∘ G_gᵀ`` (exact) at the position ``R_jᵀ q`` shared by the
    ``k`` rotations of the coset: trilinear weights are computed once per coset, and one
    sparse × dense product with the ``[voxels, k]`` stack of permuted models gives all
    ``k`` tomograms. Rotations outside complete cosets form a set with ``k = 1``.
    """

    def __init__(self, quats, xp):
        from .quaternions import coset_decomposition, cubic_group_quaternions

        members, rest = coset_decomposition(quats)
        self.sets = []
        off = 0
        if len(members):
            perms = np.rint(quaternion_to_matrix(cubic_group_quaternions())).astype(int)
            self.sets.append(_CosetSet(_rotations(quats[members[:, 0]], xp), perms, members, off))
            off += members.size
        if len(rest):
            self.sets.append(_CosetSet(_rotations(quats[rest], xp), np.eye(3, dtype=int)[None], rest[:, None], off))
        self.order = np.concatenate([s.members.ravel() for s in self.sets])  # column -> grid index
        self._buffers = {}

    def stacks(self, model, xp):
        """Per set, the permuted models ``[voxels, k]`` float32 (column g: ``W ∘ G_gᵀ``).

        The arrays are reused from one call to the next (fresh pages cost more than the copy).
        """
        size = int(model.shape[0])
        out = []
        for si, s in enumerate(self.sets):
            k = s.perms.shape[0]
            if k == 1:
                out.append(model.reshape(-1, 1))
                continue
            st = self._buffers.get(si)
            if st is None or st.shape != (size,) * 3 + (k,):
                st = self._buffers[si] = xp.empty((size,) * 3 + (k,), dtype=xp.float32)
            # W ∘ P = flip_D(W ∘ Π) with Π = |P| and D = Πᵀ P diagonal: one transposed copy
            # per axis permutation, then slab by slab (in cache) flips into the stack
            zc = _slab_planes(size, k, xp)
            for perm, members in _classes([p.T for p in s.perms]):
                src = xp.ascontiguousarray(permuted_volume(model, perm))
                for z0 in range(0, size, zc):
                    z1 = min(size, z0 + zc)
                    for g, d in members:
                        st[z0:z1, :, :, g] = _slab(src, z0, z1, d)
            out.append(st.reshape(-1, k))
        return out

    def unstack(self, accs, si, values, xp):
        """``acc [size]³ += Σ_g (column g of value) ∘ G_g`` for every ``(acc, value)`` pair.

        ``values`` are stacked merges ``[voxels, k]`` (e.g. numerator and denominator).
        ``V ∘ G = (flip_D V) ∘ Π`` with ``Π = |G|`` and ``D = G Πᵀ``: the flips are summed
        plane by plane (in cache), then one transposed add per axis permutation.
        """
        size = accs[0].shape[0]
        vs = [v.reshape((size,) * 3 + (v.shape[1],)) for v in values]
        zc = _slab_planes(size, vs[0].shape[3], xp)
        for perm, members in _classes(self.sets[si].perms, right=True):
            tmp = xp.zeros((len(accs),) + (size,) * 3, dtype=xp.float32)
            for z0 in range(0, size, zc):
                z1 = min(size, z0 + zc)
                for c, v in enumerate(vs):
                    for g, d in members:
                        tmp[c, z0:z1] += _slab(v, z0, z1, d)[..., g]
            for c, acc in enumerate(accs):
                acc += permuted_volume(tmp[c], perm)


def _classes(perms, right: bool = False):
    """Group signed permutations ``P`` by ``Π = |P|``: ``[(Π, [(index, sign vector d (x, y, z))])]``.

    ``d`` is the diagonal of ``Πᵀ P`` (``P = Π D``), or of ``P Πᵀ`` with ``right`` (``P = D Π``).
    """
    out = {}
    for g, p in enumerate(perms):
        p = np.rint(np.asarray(p)).astype(int)
        pi = np.abs(p)
        d = np.diag(p @ pi.T) if right else np.diag(pi.T @ p)
        out.setdefault(pi.tobytes(), (pi, []))[1].append((g, d))
    return list(out.values())


def _slab(v, z0, z1, d):
    """Planes ``z0 … z1 − 1`` of ``v`` ``[z, y, x, ...]`` flipped about the centre along the axes
    where the sign vector ``d`` ``(x, y, z)`` is negative (a view)."""
    size = v.shape[0]
    src = v[size - z1 : size - z0][::-1] if d[2] < 0 else v[z0:z1]
    return src[:, :: int(d[1]), :: int(d[0])]


def _slab_planes(size, k, xp) -> int:
    """Planes per slab of a ``[size³, k]`` float32 array: about 1 MB on a CPU (in cache), all on a GPU."""
    return size if xp is not np else max(1, (1 << 20) // (4 * k * size * size))


def _chunk_bytes(xp) -> int:
    return CHUNK_BYTES["cpu" if xp is np else "gpu"]


def _radial_mean(model, xp):
    """Mean of the model in 0.5-voxel shells: ``[shells]`` float64 (shell ``rint(2 |q|)``)."""
    size = int(model.shape[0])
    ax = xp.arange(size, dtype=xp.float32) - size // 2
    r2 = ax[:, None, None] ** 2 + ax[None, :, None] ** 2 + ax[None, None, :] ** 2
    b = xp.rint(2.0 * xp.sqrt(r2)).astype(xp.int32).ravel()
    tot = xp.bincount(b, weights=model.ravel().astype(xp.float64))
    return tot / xp.maximum(xp.bincount(b), 1)


def _log_reference(model, radial, g, floor, xp):
    """``log max(c_t ⟨W⟩(|q_t|), floor)`` per pixel, float32: the model's radial mean."""
    shell = xp.rint(2.0 * xp.sqrt((g.q.astype(xp.float64) ** 2).sum(axis=1))).astype(xp.int32)
    shell = xp.minimum(shell, radial.shape[0] - 1)
    return xp.log(xp.maximum(g.c * radial[shell], float(floor))).astype(xp.float32)


class _Pool:
    """``map`` over blocks in ``threads`` threads (results in order), BLAS at one thread each.

    The sparse products (scipy), BLAS and numpy's loops release the GIL, so blocks run in
    parallel; with one thread (or on a GPU) it is a plain loop. The worker threads live as
    long as the pool.
    """

    def __init__(self, threads: int):
        self.threads = max(1, int(threads))
        self._ex = None

    def __call__(self, fn, items):
        items = list(items)
        if self.threads == 1 or len(items) < 2:
            yield from map(fn, items)
            return
        from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415
        from contextlib import nullcontext  # noqa: PLC0415

        try:
            from threadpoolctl import threadpool_limits  # noqa: PLC0415

            one_blas = threadpool_limits(1)
        except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
            one_blas = nullcontext()
        if self._ex is None:
            self._ex = ThreadPoolExecutor(self.threads)
        with one_blas:
            yield from self._ex.map(fn, items)

    def close(self):
        if self._ex is not None:
            self._ex.shutdown()
            self._ex = None


class _Slicer:
    """Trilinear expand and merge of one detector's pixels over blocks of cosets.

    A block holds ``nb`` cosets of one set. Its trilinear weights form a sparse CSR
    matrix ``M`` ``[pixels × nb, voxels]`` with 8 entries per row (the corners of
    ``R_jᵀ q_t``), rows ordered pixel-major (``t nb + j``): expand is ``M @ stack`` taken
    in pixel chunks (row ranges of ``M``), which gives the tomograms as
    ``[pixels, nb k]``, the layout the likelihood product ``K @ log S`` takes, and merge
    is ``Mᵀ @ (Kᵀ P)`` with ``Kᵀ P`` ``[pixels, nb k]`` from matrix products in the same
    chunks, so nothing is transposed. The denominator of the merge uses the coverage matrix
    ``[voxels, nb]`` (:meth:`coverage`), about a third the size of ``M``. The rotated
    pixel positions never change between iterations: when every block fits in
    ``cache_bytes`` (88 bytes per coset-pixel pair) ``M`` and the coverage are kept,
    with 24 bytes the coverage alone, otherwise everything is rebuilt every iteration.
    """

    def __init__(self, q, c, cosets, size, xp, block_size, cache_bytes, threads=1):
        self.q, self.c, self.size, self.xp, self.cosets = q, c, int(size), xp, cosets
        self.npix = npix = int(q.shape[0])
        self.blocks = []  # (set index, first coset, last coset + 1, first column, last column + 1)
        n_pairs = 0
        for si, s in enumerate(cosets.sets):
            m, k = s.members.shape
            nb = _block_bases(npix, k, m, block_size)
            if threads > 1 and not block_size:  # at least one block per thread
                nb = min(nb, -(-m // threads))
            for j0 in range(0, m, nb):
                j1 = min(m, j0 + nb)
                self.blocks.append((si, j0, j1, s.offset + j0 * k, s.offset + j1 * k))
            n_pairs += m * npix
        # corners: 8 × (int32 + float32) per coset-pixel pair; coverage about a third of that
        full, cov = CACHE_BYTES_PER_PAIR * n_pairs, COVERAGE_BYTES_PER_PAIR * n_pairs
        self.cache = {} if full <= cache_bytes else None
        self.cov = {} if cov <= cache_bytes else None
        self.cache_bytes = full if self.cache is not None else (cov if self.cov is not None else 0)
        nb_max = max(j1 - j0 for _, j0, j1, _, _ in self.blocks)
        itype = xp.int32 if 8 * nb_max * npix < 2**31 else xp.int64
        self._indptr = xp.arange(0, 8 * nb_max * npix + 1, 8, dtype=itype)
        self._work = {}

    def _corners(self, bi):
        """Voxel indices (int32) and trilinear weights of block ``bi``, ``[pixels, nb, 8]``."""
        m = self.cache.get(bi) if self.cache is not None else None
        if m is None:
            xp = self.xp
            si, j0, j1, _, _ = self.blocks[bi]
            rots = self.cosets.sets[si].rots
            step = max(1, (1 << 23) // (8 * (j1 - j0)))  # pixels per chunk: bound the temporaries
            if step >= self.npix:
                m = _coords(self.q, rots[j0:j1], self.size, xp, pixel_major=True)
            else:
                i8 = xp.empty((self.npix, j1 - j0, 8), dtype=xp.int32 if self.size**3 < 2**31 else xp.int64)
                w8 = xp.empty((self.npix, j1 - j0, 8), dtype=xp.float32)
                for a in range(0, self.npix, step):
                    i8[a : a + step], w8[a : a + step] = _coords(self.q[a : a + step], rots[j0:j1], self.size, xp,
                                                                 pixel_major=True)
                m = (i8, w8)
            if self.cache is not None:
                self.cache[bi] = m
        return m

    def prepare(self):
        """Compute and keep the corners and coverage of every block (what fits in the cache)."""
        if self.cov is not None:
            for bi in range(len(self.blocks)):
                self.coverage(bi)

    def matrix(self, bi, bases=None):
        """CSR ``[pixels × nb, voxels]`` of block ``bi`` (or of its cosets ``bases`` only)."""
        i8, w8 = self._corners(bi)
        if bases is not None:
            i8, w8 = i8[:, bases], w8[:, bases]
        return self._csr(i8, w8)

    def _csr(self, i8, w8):
        """CSR ``[pixels × nb, voxels]`` of trilinear corners ``i8``/weights ``w8`` ``[pixels, nb, 8]``."""
        rows = i8.shape[0] * i8.shape[1]
        return _sparse_module(self.xp).csr_matrix((w8.ravel(), i8.ravel(), self._indptr[: rows + 1]),
                                                  shape=(rows, self.size**3))

    def expand(self, stack, bi):
        """Model at the pixels of every rotation of block ``bi``, in pixel chunks.

        Yields ``(t0, t1, S)`` with ``S`` ``[t1 - t0, nb k]`` (column ``j k + g``), about
        :data:`CHUNK_BYTES` each, so the likelihood works on it in cache.
        """
        xp = self.xp
        i8, w8 = self._corners(bi)
        nb, k = i8.shape[1], stack.shape[1]
        step = max(1, _chunk_bytes(xp) // (4 * nb * k))
        for t0 in range(0, self.npix, step):
            t1 = min(self.npix, t0 + step)
            m = self._csr(i8[t0:t1], w8[t0:t1])
            yield t0, t1, xp.asarray(m @ stack).reshape(t1 - t0, nb * k)

    def buffer(self, key, n):
        """A float32 work array of ``n`` values kept from one iteration to the next."""
        b = self._work.get(key)
        if b is None or b.size < n:
            b = self._work[key] = self.xp.empty(n, dtype=self.xp.float32)
        return b[:n]

    def reserve(self):
        """Allocate (and touch) the work arrays of an iteration in the set-up (one thread).

        The summed merge and the merge denominator per set, so that the first iteration
        costs what the others do.
        """
        nvox = self.size**3
        for si, j0, j1, c0, c1 in self.blocks:
            k = self.cosets.sets[si].perms.shape[0]
            self.buffer(("sum", si), nvox * (k if self.cov is not None else 2 * k)).fill(0.0)
            if self.cov is not None:
                self.buffer(("den", si), nvox * k).fill(0.0)

    def coverage(self, bi):
        """CSR ``[voxels, nb]``: ``Σ_t c_t f_jt,v``, the efficiency-weighted trilinear weight
        that the pixels of coset ``j`` put on voxel ``v`` (``(S M)ᵀ`` with ``S`` summing the
        rows of a coset, weighted by ``c_t``), as row chunks ``[(v0, v1, CSR)]``."""
        cov = self.cov.get(bi) if self.cov is not None else None
        if cov is None:
            xp, sp = self.xp, _sparse_module(self.xp)
            _, j0, j1, _, _ = self.blocks[bi]
            nb = j1 - j0
            cols = (xp.arange(self.npix, dtype=xp.int32)[None, :] * nb + xp.arange(nb, dtype=xp.int32)[:, None]).ravel()
            s = sp.csr_matrix((xp.tile(self.c, nb), cols, xp.arange(nb + 1, dtype=xp.int32) * self.npix),
                              shape=(nb, nb * self.npix))
            full = (s @ self.matrix(bi)).T.tocsr()  # [voxels, nb]: the merge gathers rows
            step = max(1, _chunk_bytes(xp) // (4 * nb))
            ptr = backend.to_host(full.indptr)
            cov = []
            for v0 in range(0, full.shape[0], step):
                v1 = min(full.shape[0], v0 + step)
                p0, p1 = int(ptr[v0]), int(ptr[v1])
                cov.append((v0, v1, sp.csr_matrix((full.data[p0:p1], full.indices[p0:p1], full.indptr[v0 : v1 + 1] - p0),
                                                  shape=(v1 - v0, nb))))
            if self.cov is not None:
                self.cov[bi] = cov
        return cov

    def denominator(self, si, pphis):
        """``Σ_jt f c_t pphi_jg`` of set ``si`` from the coverage matrices, ``[voxels, k]``.

        ``pphis`` maps the set's blocks to ``[nb, k]`` arrays of ``Σ_d P_dr φ_d`` (0 for
        rotations left out of the merge); the result is written in voxel chunks into a kept
        array.
        """
        xp = self.xp
        k = self.cosets.sets[si].perms.shape[0]
        out = self.buffer(("den", si), self.size**3 * k).reshape(-1, k)
        first = True
        for bi, pp in pphis.items():
            for v0, v1, c in self.coverage(bi):
                if first:
                    out[v0:v1] = c @ pp
                else:
                    out[v0:v1] += c @ pp
            first = False
        return out

    def merge(self, bi, frames, prob, pphi, into, bases=None):
        """Add the stacked merge of block ``bi`` to ``into`` ``[voxels, c]``, in pixel chunks.

        ``frames`` are the group's photon counts: ``K`` ``[n, pixels]`` (dense) or ``Kᵀ``
        CSR ``[pixels, n]`` (sparse, ``frames.sparse``); ``prob`` ``[n, nb' k]`` the
        probabilities of the rotations of the cosets ``bases`` (all when None), so a chunk's
        photons are ``Σ_d P_dr K_dt`` = ``Kᵀ P`` rows; ``pphi`` ``[nb, k]`` is the
        probability mass times scale ``Σ_d P_dr φ_d`` of every rotation of the block. With
        kept coverage matrices ``c = k`` (the denominator is left to :meth:`denominator`);
        otherwise the denominator rides along as ``k`` more columns (``c = 2k``).
        """
        xp = self.xp
        i8, w8 = self._corners(bi)
        if bases is not None:
            i8, w8 = i8[:, bases], w8[:, bases]
        nb, k = i8.shape[1], pphi.shape[1]
        pp = pphi if bases is None else pphi[xp.asarray(bases)]
        step = max(1, _chunk_bytes(xp) // (8 * nb * k))
        for t0 in range(0, self.npix, step):
            t1 = min(self.npix, t0 + step)
            m = self._csr(i8[t0:t1], w8[t0:t1])
            if frames.sparse:
                num = xp.asarray(frames.kt[t0:t1] @ prob, dtype=xp.float32)
            else:
                num = frames.k[:, t0:t1].T @ prob  # [t1 - t0, nb k]
            if self.cov is not None:
                x = num.reshape(-1, k)
            else:
                x = xp.empty((t1 - t0, nb, 2 * k), dtype=xp.float32)
                x[:, :, :k] = num.reshape(t1 - t0, nb, k)
                xp.multiply(self.c[t0:t1, None, None], pp[None, :, :], out=x[:, :, k:])
                x = x.reshape(-1, 2 * k)
            _add_transposed_product(into, m, x, xp)


def _add_transposed_product(out, m, x, xp):
    """``out += mᵀ @ x`` for a CSR matrix ``m`` and dense ``x``, ``out`` ``[m.shape[1], c]``.

    On a CPU scipy's own kernel (the one ``m.T @ x`` calls) adds into ``out`` directly:
    no new ``[voxels, c]`` array, whose fresh pages cost more than the product.
    """
    if xp is np and out.flags.c_contiguous and x.flags.c_contiguous and out.dtype == x.dtype == m.dtype:
        try:
            from scipy.sparse import _sparsetools  # noqa: PLC0415
        except ImportError:  # pragma: no cover - scipy without the module
            _sparsetools = None
        if _sparsetools is not None and hasattr(_sparsetools, "csc_matvecs"):
            _sparsetools.csc_matvecs(m.shape[1], m.shape[0], x.shape[1], m.indptr, m.indices, m.data, x.ravel(), out.ravel())
            return
    out += m.T @ x


def estimate_beta(frames, qvox, corr=None, spread: float = BETA_SPREAD) -> float:
    """``β_0`` that makes the expected log-likelihood spread of a typical frame ``spread``.

    The spread between a frame's true orientation and an unrelated one is about
    ``D_d = Σ_t K_dt c²(|q_t|)``, where ``c²`` is the squared relative contrast of the
    intensity over a shell (KL divergence per photon between two independent patterns
    with that contrast). ``c²`` is measured from the frames themselves: the variance of
    the counts about the mean pattern (the orientational average, pixel by pixel, which
    absorbs the radial fall-off, pixel efficiencies and background) beyond Poisson
    noise, after removing the per-frame scale, pooled in 0.5-voxel shells. Returns ``min(1, spread / median_d D_d)``.
    Photons that land where the pattern is isotropic (the central speckle of a
    near-spherical particle) carry no orientation information and do not count, which
    a photon-count-only rule (Dragonfly's ``exp(-6.5 (K 1e-5)^0.15)``) cannot see.
    """
    xp = backend.xp()
    d_all = []
    for f, q in zip(_as_list(frames), _as_list(qvox)):
        k, sparse = _as_frames(f, xp)
        qh = np.asarray(backend.to_host(q), dtype=np.float64)
        shell = np.rint(2.0 * np.linalg.norm(qh, axis=1)).astype(np.int64)
        ns = int(shell.max()) + 1
        counts = backend.to_host(_row_sums(k, sparse, xp)).astype(np.float64)
        if counts.sum() <= 0:
            continue
        phi = counts / counts.mean()
        if sparse:
            k2 = backend.to_host(xp.asarray(k.multiply(k).sum(axis=0))).ravel()
            ksum = backend.to_host(xp.asarray(k.sum(axis=0))).ravel()
            phik = backend.to_host(k.T @ xp.asarray(phi, dtype=xp.float32)).ravel()
        else:
            k2 = backend.to_host((k.astype(xp.float64) ** 2).sum(axis=0))
            ksum = backend.to_host(k.sum(axis=0, dtype=xp.float64))
            phik = backend.to_host(xp.asarray(phi, dtype=xp.float32) @ k)
        # reference: the mean pattern at unit scale, pixel by pixel (the orientational
        # average, which also absorbs the radial fall-off, efficiencies and background)
        m_t = ksum / phi.sum()
        a = np.bincount(shell, k2 - ksum, ns)
        b = np.bincount(shell, phik * m_t, ns)
        cc = float(np.sum(phi**2)) * np.bincount(shell, m_t**2, ns)
        c2 = np.where(cc > 0, (a - 2 * b + cc) / np.maximum(cc, 1e-30), 0.0)
        c2 = np.clip(c2, 0.0, 1.0)
        d_all.append(backend.to_host(k @ xp.asarray(c2[shell], dtype=xp.float32)).ravel())
    if not d_all:
        return 1.0
    med = float(np.median(np.concatenate(d_all)))
    return float(min(1.0, spread / med)) if med > 0 else 1.0


def _initial_model(groups, size, init, rng, xp, noise):
    """Start model: mean radial profile times seeded noise ("radial"), or uniform noise ("random")."""
    if isinstance(init, str) and init not in ("radial", "random"):
        raise InputError("init", f"unknown start model {init!r}", "use 'radial', 'random' or an array")
    c = size // 2
    nbins = c + 2
    tot = np.zeros(nbins)
    cnt = np.zeros(nbins)
    n_frames = 0
    for g in groups:
        mean = backend.to_host(_row_sums(g.kt, True, xp) if g.sparse else g.k.sum(axis=0)).astype(np.float64)
        n_frames += g.k.shape[0]
        r = np.rint(np.linalg.norm(backend.to_host(g.q), axis=1)).astype(np.int64)
        tot += np.bincount(r, weights=mean / backend.to_host(g.c), minlength=nbins)[:nbins]
        cnt += np.bincount(r, minlength=nbins)[:nbins] * 1.0
    prof = np.where(cnt > 0, tot / np.maximum(cnt, 1) / max(n_frames, 1), np.nan)
    good = np.isfinite(prof)
    prof = np.interp(np.arange(nbins), np.flatnonzero(good), prof[good])
    ax = np.arange(size) - c
    rr = np.sqrt(ax[:, None, None] ** 2 + ax[None, :, None] ** 2 + ax[None, None, :] ** 2)
    if init == "random":
        model = float(np.mean(prof)) * rng.random((size,) * 3)
    else:
        model = np.interp(rr, np.arange(nbins), prof, right=prof[-1])
        model *= np.maximum(0.0, 1.0 + float(noise) * (rng.random((size,) * 3) - 0.5))
    model = np.where(rr <= c, model, 0.0)
    return xp.asarray(symmetrize(model), dtype=xp.float32)


def _rescale(model, groups, quats, xp, rng):
    """Scale the model so predicted photons per frame match the data on average."""
    pick = rng.choice(len(quats), size=min(len(quats), 64), replace=False)
    pred, meas = 0.0, 0.0
    for g in groups:
        s = expand(model, g.q, quats[pick], g.c)
        pred += float(s.sum(axis=1).mean()) * g.k.shape[0]
        meas += float(g.counts.sum())
    if pred <= 0:
        raise InputError("init", "the start model predicts no photons on the detector", "give a positive start model")
    return model * xp.float32(meas / pred)


def emc(
    frames,
    qvox,
    model_size,
    quats,
    weights,
    iterations: int = 30,
    beta_schedule=("auto", 2.0, 10),
    scale: bool = True,
    symmetry=None,
    init=None,
    rng=None,
    callback=None,
    *,
    corr=None,
    scales=None,
    start_iteration: int = 0,
    friedel: bool = True,
    block_size: int | None = None,
    init_noise: float = 1.0,
    cache_mb: float | None = None,
    threads: int | None = None,
) -> EMCResult:
    """Reconstruct a 3D intensity from diffraction patterns by EMC.

    Parameters
    ----------
    frames : ``[n, npix]`` array (numpy/cupy) or scipy/cupyx sparse matrix, or a list of
        them, one per detector geometry
        Photon counts of the good pixels.
    qvox : ``[npix, 3]`` (or list, one per geometry)
        ``(q_x, q_y, q_z)`` of every pixel in voxels (:func:`detector_pixels`).
    model_size : int or "auto"
        Odd grid edge; "auto": :func:`auto_model_size`.
    quats, weights : ``[n_rot, 4]``, ``[n_rot]``
        Rotation grid (:func:`conveyor.spi.quaternions.quaternion_grid`).
    iterations : int
        Last iteration to run (1-based); iterations ``start_iteration + 1 .. iterations`` run.
    beta_schedule : (start, factor, every)
        ``start`` may be "auto" (:func:`estimate_beta`).
    scale : bool
        Fit a scale per frame (fluence); otherwise all scales stay 1.
    symmetry : str, optional
        Point group imposed on the model (:func:`conveyor.spi.quaternions.point_group`).
    init : "radial" (default), "random" or an array ``[size]*3``
        Start model; "radial" is the mean radial profile times ``1 + init_noise (u - ½)``
        with ``u`` uniform from ``rng``; "random" is uniform noise at the mean level. An
        array is used as is when resuming (``start_iteration > 0``) and rescaled to the
        data otherwise.
    rng : numpy Generator or seed
    callback : callable, optional
        ``callback(state: EMCState)`` after every iteration (e.g. to save a restart file).
    corr : ``[npix]`` (or list)
        Pixel efficiencies (solid angle × polarisation, mean 1); default 1.
    scales : ``[n]``, optional
        Start scales (resuming).
    start_iteration : int
        Iterations already done (resuming from a saved model and scales).
    friedel : bool
        Enforce ``W(q) = W(−q)`` (default; the intensity of a real object is centrosymmetric).
    block_size : int, optional
        Rotations per block, rounded to whole cosets (default: about 6.4e7 tomogram pixels
        on CPU, 2.6e8 on GPU, and at least one block per thread).
    cache_mb : float, optional
        Memory for the interpolation weights kept between iterations (default 1024 MB on
        CPU, 8192 MB on GPU): 88 bytes per pixel per coset of 12 rotations (about 7 per
        rotation-pixel pair) keep everything, 24 the merge's coverage matrices only; 0
        recomputes them every iteration.
    threads : int, optional
        CPU threads over blocks of cosets (default :func:`conveyor.backend.threads`).
    """
    t_all = time.time()
    xp = backend.xp()
    n_threads = max(1, int(backend.threads() if threads is None else threads))
    rng = np.random.default_rng(rng)
    frames_l, q_l = _as_list(frames), _as_list(qvox)
    corr_l = _as_list(corr) if corr is not None else [None] * len(frames_l)
    if not (len(frames_l) == len(q_l) == len(corr_l)):
        raise InputError("emc", "frames, qvox and corr must list the same number of detector geometries", "pass one entry per geometry")
    groups, offset = [], 0
    for f, q, c in zip(frames_l, q_l, corr_l):
        k, sparse = _as_frames(f, xp)
        qh = np.asarray(backend.to_host(q), dtype=np.float64)
        if qh.ndim != 2 or qh.shape[1] != 3 or k.shape[1] != qh.shape[0]:
            raise InputError("emc", f"frames have {k.shape[1]} pixels but qvox has shape {qh.shape}", "give one q-vector per pixel column")
        ch = np.ones(qh.shape[0]) if c is None else np.asarray(backend.to_host(c), dtype=np.float64)
        if ch.shape != (qh.shape[0],) or np.any(ch <= 0):
            raise InputError("emc", "corr must hold one positive value per pixel", "pass solid angle x polarisation")
        kt = k.T.tocsr() if sparse else None
        groups.append(_Group(k, kt, sparse, xp.asarray(qh, dtype=xp.float32), xp.asarray(ch, dtype=xp.float32),
                             _row_sums(k, sparse, xp), _log_factorial_sums(k, sparse, xp), offset))
        offset += k.shape[0]
    n_frames = offset
    if n_frames == 0:
        raise InputError("emc", "no frames to reconstruct from", "select at least one frame")
    size = auto_model_size(q_l) if model_size in (None, "auto") else int(model_size)
    _check_size([backend.to_host(q) for q in q_l], size)
    quats = np.asarray(backend.to_host(quats), dtype=np.float64)
    w = np.asarray(backend.to_host(weights), dtype=np.float64)
    if quats.ndim != 2 or quats.shape[1] != 4 or w.shape != (quats.shape[0],) or np.any(w <= 0):
        raise InputError("emc", "quats must be [n, 4] with one positive weight each", "use quaternion_grid(num_div)")
    n_rot = quats.shape[0]
    logw = xp.asarray(np.log(w / w.sum()), dtype=xp.float32)
    start, factor, every = beta_schedule
    if start in (None, "auto"):
        beta0 = estimate_beta([g.k for g in groups], [g.q for g in groups], [g.c for g in groups])
    else:
        beta0 = float(start)
    if not (0 < beta0 <= 1e6) or float(factor) <= 0 or int(every) < 1:
        raise InputError("beta_schedule", f"bad schedule ({beta0}, {factor}, {every})", "use a positive start and factor and every >= 1")
    sched = (beta0, float(factor), int(every))
    point_group(symmetry)  # validate early

    if init is None or isinstance(init, str):
        model = _initial_model(groups, size, init or "radial", rng, xp, init_noise)
        model = _rescale(model, groups, quats, xp, rng)
    else:
        model = xp.asarray(init, dtype=xp.float32)
        if model.shape != (size,) * 3:
            raise InputError("init", f"start model has shape {tuple(model.shape)}, expected {(size,) * 3}", "use the model of a run with the same detector and model size")
        if start_iteration == 0:
            model = _rescale(model, groups, quats, xp, rng)
    phi = xp.ones(n_frames, dtype=xp.float32) if scales is None else xp.asarray(scales, dtype=xp.float32)
    if phi.shape != (n_frames,):
        raise InputError("scales", f"{phi.shape[0]} scales for {n_frames} frames", "resume with the same frame selection")
    weight = None
    log_rows = []
    best = xp.zeros(n_frames, dtype=xp.int64)
    maxp = xp.zeros(n_frames, dtype=xp.float32)
    ll_frame = xp.zeros(n_frames, dtype=xp.float64)
    dev = "gpu" if backend.get_device() == "gpu" else "cpu"
    budget = (1024.0 if dev == "cpu" else 8192.0) if cache_mb is None else float(cache_mb)
    budget_left = budget * 2**20
    cosets = _Cosets(quats, xp)
    order = xp.asarray(cosets.order)  # column (coset order) -> grid index
    logw_c = logw[order]
    slicers = []
    for g in groups:
        sl_ = _Slicer(g.q, g.c, cosets, size, xp, block_size, budget_left, n_threads if xp is np else 1)
        sl_.prepare()
        budget_left -= sl_.cache_bytes
        slicers.append(sl_)
    pool = _Pool(n_threads if xp is np else 1)
    cosets.stacks(model, xp)  # allocates the stacked models
    if pool.threads == 1:
        for slc in slicers:
            slc.reserve()
    log.info("EMC: %d rotations in %d cosets, %d blocks, %d threads; set-up %.1f s", n_rot,
             sum(s.members.shape[0] for s in cosets.sets), sum(len(s.blocks) for s in slicers), pool.threads, time.time() - t_all)

    for it in range(int(start_iteration) + 1, int(iterations) + 1):
        t0 = time.time()
        beta = beta_at(it, sched)
        floor = xp.float32(LOG_FLOOR * float(model.mean()) + 1e-30)
        stacks = cosets.stacks(model, xp)
        radial = _radial_mean(model, xp)
        # -- expand + likelihood (columns in coset order) ------------------------------
        probs = []
        for g, slc in zip(groups, slicers):
            npix = slc.npix
            a = xp.empty((g.k.shape[0], n_rot), dtype=xp.float32)
            u = xp.empty(n_rot, dtype=xp.float64)

            # Σ_t K_dt log S_rt is summed as Σ_t K_dt (log S_rt − ref_t) + Σ_t K_dt ref_t with
            # ref_t the log of the model's radial mean at the pixel: float32 products of
            # small numbers, the second (per-frame) term in float64
            ref = _log_reference(model, radial, g, floor, xp)
            kref = xp.asarray(g.k @ ref.astype(xp.float64), dtype=xp.float64).ravel()

            def likelihood(bi, g=g, slc=slc, a=a, u=u, ref=ref):
                si, _, _, c0, c1 = slc.blocks[bi]
                acc = xp.zeros((a.shape[0], c1 - c0), dtype=xp.float64)  # Σ over pixel chunks
                uacc = xp.zeros(c1 - c0, dtype=xp.float64)
                for t0, t1, s in slc.expand(stacks[si], bi):  # [pixels, nb k] in chunks
                    s *= g.c[t0:t1, None]
                    uacc += s.sum(axis=0)
                    xp.maximum(s, floor, out=s)
                    xp.log(s, out=s)
                    s -= ref[t0:t1, None]
                    kc = g.kt[t0:t1].T if g.sparse else g.k[:, t0:t1]
                    acc += _matmul(kc, s, g.sparse, xp)
                a[:, c0:c1] = acc  # Σ_t K_dt (log S_rt − ref_t): + kref is Σ_t K_dt log S_rt
                u[c0:c1] = uacc

            for _ in pool(likelihood, range(len(slc.blocks))):
                pass
            sl = slice(g.offset, g.offset + g.k.shape[0])
            ph = phi[sl].astype(xp.float64)
            counts = g.counts.astype(xp.float64)
            # a holds L_dr − off_d: the per-frame offset (which P does not see) is kept in
            # float64, so float32 carries only the differences between rotations
            ubar = float(xp.exp(ref.astype(xp.float64)).sum())  # Σ_t c_t ⟨W⟩(|q_t|) ≈ u_r
            if scale:
                # scale profiled out per orientation: φ̂_dr = K_d / u_r (multinomial likelihood)
                a -= (counts[:, None] * (xp.log(xp.maximum(u, 1e-30)) - math.log(max(ubar, 1e-30)))[None, :]).astype(xp.float32)
                off = kref - counts * math.log(max(ubar, 1e-30))
                const = counts * (xp.log(xp.maximum(counts, 1e-30)) - 1.0) - g.lgk
            else:
                a -= (ph[:, None] * (u - ubar)[None, :]).astype(xp.float32)  # a + off is L_dr
                off = kref - ph * ubar
                const = counts * xp.log(xp.maximum(ph, 1e-30)) - g.lgk
            top = a.max(axis=1)  # most likely rotations near 0: float32 keeps their differences
            a -= top[:, None]
            off = off + top
            p, mi = _softmax(a, logw_c, beta, xp)
            ll_frame[sl] = (p * a).sum(axis=1, dtype=xp.float64) + off + const
            best[sl] = order[xp.argmax(p, axis=1)]
            maxp[sl] = p.max(axis=1)
            del a
            probs.append((g, slc, p, u, mi))
        del stacks
        # -- scales ----------------------------------------------------------------------
        if scale:
            new_phi = xp.empty_like(phi)
            for g, _, p, u, _ in probs:
                sl = slice(g.offset, g.offset + g.k.shape[0])
                new_phi[sl] = g.counts / xp.maximum(p @ u, 1e-30)
            phi = new_phi / new_phi.mean()
        # -- merge -----------------------------------------------------------------------
        acc_num = xp.zeros((size,) * 3, dtype=xp.float64)
        acc_den = xp.zeros((size,) * 3, dtype=xp.float64)
        active_any = np.zeros(n_rot, dtype=bool)
        for g, slc, p, u, _ in probs:
            sl = slice(g.offset, g.offset + g.k.shape[0])
            act_g = backend.to_host(p.sum(axis=0)) > MERGE_MIN_OCCUPANCY
            active_any |= act_g
            pphi = p.T @ phi[sl]  # [n_rot]

            def merge(bi, g=g, slc=slc, p=p, pphi=pphi, act_g=act_g):
                si, j0, j1, c0, c1 = slc.blocks[bi]
                k = cosets.sets[si].perms.shape[0]
                act = np.flatnonzero(act_g[c0:c1].reshape(j1 - j0, k).any(axis=1))
                if act.size == 0:
                    return si, None
                bases = None if act.size == j1 - j0 else act
                cols = slice(c0, c1) if bases is None else xp.asarray((c0 + bases[:, None] * k + np.arange(k)).ravel())
                pb, pp = xp.ascontiguousarray(p[:, cols]), pphi[c0:c1]
                off = ~act_g[c0:c1]
                if off.any():  # inactive rotations of active cosets stay out of the merge
                    keep = xp.asarray(~off, dtype=xp.float32)
                    pb, pp = pb * (keep if bases is None else keep.reshape(-1, k)[xp.asarray(bases)].ravel()), pp * keep
                pp = pp.reshape(j1 - j0, k)
                pphis[bi] = pp
                c = k if slc.cov is not None else 2 * k
                if pool.threads > 1:  # each block its own sum, added in block order below
                    into = xp.zeros((size**3, c), dtype=xp.float32)
                    slc.merge(bi, g, pb, pp, into, bases)
                    return si, into
                into = sums.get(si)
                if into is None:
                    into = sums[si] = slc.buffer(("sum", si), size**3 * c).reshape(-1, c)
                    into[...] = 0.0
                slc.merge(bi, g, pb, pp, into, bases)
                return si, None

            pphis, sums = {}, {}
            for si, m in pool(merge, range(len(slc.blocks))):  # in block order: deterministic sums
                if m is None:
                    continue
                if si in sums:
                    sums[si] += m
                else:
                    sums[si] = m
                del m
            for si, m in sums.items():
                k = cosets.sets[si].perms.shape[0]
                if slc.cov is not None:
                    den = slc.denominator(si, {bi: pp for bi, pp in pphis.items() if slc.blocks[bi][0] == si})
                    cosets.unstack((acc_num, acc_den), si, (m, den), xp)
                else:
                    cosets.unstack((acc_num, acc_den), si, (m[:, :k], m[:, k:]), xp)
            del sums
        n_active = int(active_any.sum())
        acc_num, acc_den = acc_num.ravel(), acc_den.ravel()
        new_model, weight = _finish(acc_num, acc_den, size, symmetry, friedel, xp)
        del acc_num, acc_den
        sampled = weight > 0
        ref = float(xp.sqrt((new_model[sampled].astype(xp.float64) ** 2).mean())) if bool(sampled.any()) else 0.0
        rms = float(xp.sqrt(((new_model - model)[sampled].astype(xp.float64) ** 2).mean())) / ref if ref > 0 else 0.0
        model = new_model
        mi_all = float(sum(float(mi.sum()) for *_, mi in probs)) / n_frames
        del probs
        phi_h = backend.to_host(phi)
        row = {
            "iteration": it,
            "beta": beta,
            "log_likelihood": float(ll_frame.mean()),
            "mutual_info": mi_all,
            "rms_change": rms,
            "scale_mean": float(phi_h.mean()),
            "scale_std": float(phi_h.std()),
            "num_rot": n_rot,
            "active_rot": n_active,
            "seconds": time.time() - t0,
        }
        log_rows.append(row)
        log.info("EMC iteration %d: beta %.4g, loglik %.6g, MI %.3f, rms change %.3g, %d/%d rotations active, %.1f s",
                 it, beta, row["log_likelihood"], mi_all, rms, n_active, n_rot, row["seconds"])
        if callback is not None:
            callback(EMCState(it, model, weight, phi, best, maxp, ll_frame, beta, row))
    pool.close()
    if weight is None:  # nothing ran (resumed at the last iteration): report the given model
        weight = (model > 0).astype(xp.float32)
    best_h = backend.to_host(best)
    log.info("EMC: %d iterations in %.1f s", len(log_rows), time.time() - t_all)
    return EMCResult(
        intensity=backend.to_host(model).astype(np.float32),
        weight=backend.to_host(weight).astype(np.float32),
        orientations=quats[best_h],
        orientation_index=best_h,
        max_prob=backend.to_host(maxp),
        scales=backend.to_host(phi),
        loglik=backend.to_host(ll_frame),
        log=log_rows,
        beta_start=beta0,
    )


# ---------------------------------------------------------------------------------------
# comparison with a reference intensity (validation)
# ---------------------------------------------------------------------------------------
def rotate_volume(volume, quat):
    """``out(q) = volume(Rᵀ q)`` on the same grid (trilinear; 0 outside), host arrays."""
    vol = np.asarray(backend.to_host(volume), dtype=np.float32)
    size = vol.shape[0]
    c = size // 2
    ax = np.arange(size, dtype=np.float32) - c
    z, y, x = np.meshgrid(ax, ax, ax, indexing="ij")
    q = np.stack([x.ravel(), y.ravel(), z.ravel()], -1)
    return _sample(vol, q, quaternion_to_matrix(quat)).reshape(vol.shape)


def _sample(vol, q, rot):
    """``vol(Rᵀ q)`` at points ``q [m, 3]`` (voxels), 0 where the 8 corners leave the grid."""
    size = vol.shape[0]
    c = q @ rot.astype(np.float32) + size // 2
    inside = np.all((c >= 0) & (c < size - 1), axis=1)
    c = np.where(inside[:, None], c, 0)
    i8, w8 = _coords((c - size // 2).astype(np.float32), np.eye(3, dtype=np.float32)[None], size, np)
    out = _gather(vol.ravel(), i8[0], w8[0])
    return np.where(inside, out, 0.0)


def _shell_points(size, rmin, rmax):
    c = size // 2
    ax = np.arange(size) - c
    z, y, x = np.meshgrid(ax, ax, ax, indexing="ij")
    r = np.sqrt(x * x + y * y + z * z)
    sel = (r >= rmin) & (r <= rmax)
    return np.stack([x[sel], y[sel], z[sel]], -1).astype(np.float32), r[sel], np.flatnonzero(sel.ravel())


def _pearson(a, b):
    a = a - a.mean()
    b = b - b.mean()
    d = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / d) if d > 0 else 0.0


def _logi(v, floor):
    return np.log(np.maximum(v, floor))


def align_to_reference(model, reference, rmin: float, rmax: float, num_div: int = 4, n_points: int = 6000, refine_rounds: int = 4, rng=0):
    """Rotation that best superimposes ``model`` on ``reference`` (same grid, q = 0 at the centre).

    Searches the ``num_div`` rotation grid for the maximum Pearson correlation of the
    log intensities on ``n_points`` voxels with ``rmin <= |q| <= rmax``, then refines with
    shrinking random perturbations. Returns ``(quat, correlation)`` with
    ``rotate_volume(model, quat)`` aligned to ``reference``.
    """
    rng = np.random.default_rng(rng)
    mod = np.asarray(backend.to_host(model), dtype=np.float32)
    ref = np.asarray(backend.to_host(reference), dtype=np.float32)
    if mod.shape != ref.shape:
        raise InputError("align", f"model {mod.shape} and reference {ref.shape} differ in shape", "put both on the same grid")
    pts, _, flat_idx = _shell_points(ref.shape[0], rmin, rmax)
    if len(pts) == 0:
        raise InputError("align", f"no voxels between radii {rmin} and {rmax}", "check the shell radii")
    pick = rng.choice(len(pts), size=min(n_points, len(pts)), replace=False)
    pts, flat_idx = pts[pick], flat_idx[pick]
    fr = max(float(np.median(ref.ravel()[flat_idx])) * 1e-4, 1e-30)
    fm = max(float(np.median(mod[mod > 0])) * 1e-4 if np.any(mod > 0) else 1e-30, 1e-30)
    target = _logi(ref.ravel()[flat_idx], fr)
    quats, _ = quaternion_grid(num_div)
    rots = quaternion_to_matrix(quats)

    def score(rot):
        return _pearson(_logi(_sample(mod, pts, rot), fm), target)

    scores = np.array([score(r) for r in rots])
    best_q = quats[int(np.argmax(scores))]
    best_s = float(scores.max())
    step = 0.5 * 0.4 * np.pi / num_div
    from .quaternions import canonical, multiply

    for _ in range(int(refine_rounds)):
        axes = rng.normal(size=(48, 3))
        axes /= np.linalg.norm(axes, axis=1, keepdims=True)
        ang = step * rng.random(48)
        dq = np.concatenate([np.cos(ang / 2)[:, None], np.sin(ang / 2)[:, None] * axes], 1)
        cand = canonical(multiply(dq, best_q[None, :]))
        s = np.array([score(r) for r in quaternion_to_matrix(cand)])
        if s.max() > best_s:
            best_s, best_q = float(s.max()), cand[int(np.argmax(s))]
        step *= 0.5
    return best_q, best_s


def shell_correlation(model, reference, rmin: float, rmax: float, mask=None, log_scale: bool = True):
    """Correlations of two intensities on the same grid between radii ``rmin`` and ``rmax`` (voxels).

    Only voxels where ``mask`` is true count (e.g. ``weight > 0``: voxels the data
    reached). Returns a dict:

    ``overall``
        Pearson over all voxels in the range, of log intensities when ``log_scale``
        (dominated by the radial fall-off: a spherically averaged model scores high).
    ``linear``
        Pearson of the intensities (dominated by the brightest shells).
    ``anisotropic``
        Pearson of ``I / <I>(|q|)`` for both volumes, each divided by its own radial
        mean (0.25-voxel bins): only the orientation-dependent structure counts, so a
        spherical model scores ~0. The demanding measure.
    ``shells``, ``shell_mean``
        ``anisotropic`` per 1-voxel shell (radius → Pearson) and their mean.
    """
    mod = np.asarray(backend.to_host(model), dtype=np.float64)
    ref = np.asarray(backend.to_host(reference), dtype=np.float64)
    if mod.shape != ref.shape:
        raise InputError("compare", f"volumes differ in shape: {mod.shape} and {ref.shape}", "put both on the same grid")
    _, r, flat_idx = _shell_points(mod.shape[0], rmin, rmax)
    if mask is not None:
        keep = np.asarray(backend.to_host(mask)).ravel()[flat_idx].astype(bool)
        r, flat_idx = r[keep], flat_idx[keep]
    a, b = mod.ravel()[flat_idx], ref.ravel()[flat_idx]
    fa = max(float(np.median(a[a > 0])) * 1e-4, 1e-30) if np.any(a > 0) else 1e-30
    fb = max(float(np.median(b[b > 0])) * 1e-4, 1e-30) if np.any(b > 0) else 1e-30
    la, lb = (_logi(a, fa), _logi(b, fb)) if log_scale else (a, b)
    rb = np.rint(4.0 * r).astype(np.int64)

    def radial_norm(v):
        cnt = np.bincount(rb)
        mean = np.bincount(rb, v) / np.maximum(cnt, 1)
        return v / np.where(mean[rb] > 0, mean[rb], 1.0)

    na, nb = radial_norm(a), radial_norm(b)
    shells = {}
    ri = np.rint(r).astype(int)
    for k in range(int(np.ceil(rmin)), int(np.floor(rmax)) + 1):
        sel = ri == k
        if sel.sum() > 10:
            shells[k] = _pearson(na[sel], nb[sel])
    return {
        "overall": _pearson(la, lb),
        "linear": _pearson(a, b),
        "anisotropic": _pearson(na, nb),
        "shells": shells,
        "shell_mean": float(np.mean(list(shells.values()))) if shells else float("nan"),
        "voxels": int(a.size),
    }
