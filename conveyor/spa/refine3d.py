"""Gold-standard 3D refinement (and 3D classification) by projection matching.

Model
-----
A particle image ``X`` (contrast-inverted, protein white) is the CTF-filtered projection of
the map ``V`` in orientation ``A`` (RELION's Euler matrix), shifted by ``s`` px, plus
Gaussian noise with a power ``σ²`` per resolution shell::

    X(k) = CTF(k) · V̂(Aᵀ k) · exp(-2πi k·s / N) + noise,       E|noise(k)|² = σ²(|k|)

(``CTF = -ctf_2d``, see :mod:`conveyor.spa.reconstruct`). For every particle the search
finds the orientation and shift that maximise the noise-weighted correlation of the image
with the CTF-filtered reference projection,
``CC = Re Σ_k X* · CTF · R · S / σ² / sqrt(Σ_k CTF² |R|² / σ²)``, over the Fourier
coefficients inside the current resolution limit (the least-squares fit of the reference
with a free scale, i.e. the likelihood maximised over the particle's contrast).

Search (coarse to fine)
-----------------------
* Orientations: a global grid of viewing directions on a Fibonacci sphere (about uniform,
  ``4π / step²`` points, as HEALPix at the same step) restricted to an asymmetric unit of
  the point group (a Dirichlet domain of the group acting on directions), times in-plane
  angles at the same step, randomly rotated each iteration against grid artefacts. Local
  searches try the 27 rotations ``Δ · A`` with rotation vectors on a ``{-1, 0, 1}³ · step``
  grid around each particle's current orientation.
* Stages: a global search at ``initial_step`` (15°) with translations within
  ``±max_shift`` px (1-px steps) in its first iteration and ±1 px around the current
  shift in the next ones (at most 4 global iterations), then local searches at 7.5°, 3.75°, ... down to the
  step needed at Nyquist (about ``0.5 · 2 · pixel / radius`` radians) with translations
  ±1 step around the current shift, the translation step halving with the angular one
  (1, 0.5, 0.25 px). A stage ends when the resolution stops improving; the refinement
  ends when it stops improving at the finest stage, or after ``iterations``.
* The correlations of a batch of particles with all grid orientations and all
  translations are two matrix products ([particles × translations, 2K] × [2K,
  orientations] for the numerators, [particles, K] × [K, orientations] for the norms);
  local searches are batched matrix products per particle. Both run on numpy or cupy.

Gold standard
-------------
Particles are split into two random halves (or by ``rlnRandomSubset``); each half is
aligned only against its own reference and reconstructed on its own
(:class:`conveyor.spa.reconstruct.Backprojector`). The FSC of the two half maps (inside a
soft sphere of the particle diameter) gives the resolution at 0.143; the next references
are the half maps weighted per shell by that FSC (the Wiener filter of a half map,
``SNR / (1 + SNR)`` with ``SNR = FSC / (1 − FSC)``), low-passed at the 0.143 resolution
and masked — the same filter for both halves, so they stay independent. The resolution
limit of the search is that resolution plus two shells. ``σ²`` per shell comes from the
residuals at the best poses. The final map is the reconstruction from both halves with
the Wiener regulariser of the combined SNR ``2 FSC / (1 − FSC)``.

State and restart
-----------------
With ``out_dir`` every finished iteration ``i`` writes ``it{i:03d}_half1.mrc``,
``it{i:03d}_half2.mrc`` (unfiltered half maps), ``it{i:03d}_data.npz`` (poses, subsets,
σ², FSC), ``it{i:03d}_particles.star`` and, last, ``it{i:03d}_model.json`` (the
completion marker). ``resume=True`` restarts after the last iteration with a marker and
gives the same result as an uninterrupted run (all randomness is seeded per iteration).

3D classification (``classes > 1``)
-----------------------------------
K references (from random subsets of the particles aligned to the starting reference) are
refined together without half sets: every particle is aligned to every class (global
searches until fewer than 5% of the particles change class, then local ones until fewer
than 1% do), the
class posterior is ``softmax(log L_k)`` with ``log L_k = Re Σ X*·CTF·R_k·S/σ² −
½ Σ CTF²|R_k|²/σ²`` at each class's best pose, and every class map is reconstructed from
all particles weighted by their posterior, low-passed at ``class_resolution``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd

from .. import backend
from ..errors import InputError
from ..geometry import euler_to_matrix, matrix_to_euler, rotation_about_axis, symmetry_matrices
from .fsc import fsc as fsc_curve, resolution_at, ssnr_from_fsc
from .reconstruct import (
    Backprojector,
    Coefficients,
    CtfParams,
    FourierVolume,
    _ctf_at_coeffs,
    fourier_coefficients,
    image_transforms,
    lowpass,
    phase_ramp,
    shell_filter,
    soft_sphere_mask,
)

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- orientation sampling
_GENERIC = np.array([0.1234, 0.3456, 0.9301])
_GENERIC = _GENERIC / np.linalg.norm(_GENERIC)


def fibonacci_directions(step_deg: float) -> np.ndarray:
    """About uniform unit vectors ``[n, 3]`` with ``n = 4π / step²`` (Fibonacci sphere)."""
    step = math.radians(float(step_deg))
    n = max(int(round(4.0 * math.pi / step**2)), 2)
    i = np.arange(n) + 0.5
    z = 1.0 - 2.0 * i / n
    phi = np.pi * (1.0 + 5.0**0.5) * i
    rho = np.sqrt(np.clip(1.0 - z * z, 0.0, None))
    return np.stack([rho * np.cos(phi), rho * np.sin(phi), z], axis=1)


def asymmetric_unit(directions, symmetry: str) -> np.ndarray:
    """Boolean mask of the directions in an asymmetric unit of the point group.

    A view ``A`` of a symmetric map is the view ``A R`` for every operator ``R``; its
    direction (the third row of ``A``) becomes ``Rᵀ d``. A direction is kept when it is the
    one of its orbit closest to a fixed generic direction (a Dirichlet domain), so every
    orbit keeps one member.
    """
    ops = symmetry_matrices(symmetry)
    d = np.asarray(directions, dtype=float)
    if len(ops) == 1:
        return np.ones(len(d), bool)
    imgs = np.einsum("gji,nj->ngi", ops, d)  # Rᵀ d
    score = imgs @ _GENERIC
    return score[:, 0] >= score.max(axis=1) - 1e-9


def orientation_grid(step_deg: float, symmetry: str = "C1"):
    """Rotation matrices ``[O, 3, 3]`` of a global search: asymmetric-unit directions × in-plane angles.

    Returns ``(matrices, (rot, tilt, psi))`` with angles in degrees.
    """
    d = fibonacci_directions(step_deg)
    d = d[asymmetric_unit(d, symmetry)]
    tilt = np.degrees(np.arccos(np.clip(d[:, 2], -1.0, 1.0)))
    rot = np.degrees(np.arctan2(d[:, 1], d[:, 0]))
    npsi = max(int(round(360.0 / step_deg)), 1)
    psi = np.arange(npsi) * 360.0 / npsi
    r, t, p = np.repeat(rot, npsi), np.repeat(tilt, npsi), np.tile(psi, len(d))
    return euler_to_matrix(r, t, p), (r, t, p)


def local_perturbations(step_deg: float) -> np.ndarray:
    """The 27 rotations with rotation vectors on ``{-1, 0, 1}³ · step`` (identity first)."""
    out = [np.eye(3)]
    for a in (-1, 0, 1):
        for b in (-1, 0, 1):
            for c in (-1, 0, 1):
                if a == b == c == 0:
                    continue
                v = np.array([a, b, c], dtype=float) * step_deg
                ang = float(np.linalg.norm(v))
                out.append(rotation_about_axis(v / ang, ang))
    return np.array(out)


def random_small_rotation(rng, max_deg: float) -> np.ndarray:
    """A rotation about a random axis by an angle uniform in ``[0, max_deg]``."""
    axis = rng.standard_normal(3)
    return rotation_about_axis(axis / np.linalg.norm(axis), rng.uniform(0.0, max_deg))


def translation_grid(half_width: int, step: float) -> np.ndarray:
    """Shifts ``[(2w+1)², 2]`` (px) on a square grid ``±half_width · step``."""
    r = np.arange(-int(half_width), int(half_width) + 1) * float(step)
    gx, gy = np.meshgrid(r, r, indexing="xy")
    return np.stack([gx.ravel(), gy.ravel()], axis=1)


def finest_step_for(pixel_size: float, particle_diameter: float) -> float:
    """Angular step (degrees) at which the particle's edge moves by half a Nyquist period."""
    radius = 0.5 * float(particle_diameter)
    return math.degrees(0.5 * 2.0 * float(pixel_size) / max(radius, pixel_size))


# --------------------------------------------------------------------------- particle data
class ParticleData:
    """Particle transforms and CTFs prepared for the search and the reconstruction.

    ``ctf`` is a :class:`CtfParams`, an array ``[n, N, N // 2 + 1]`` (``rfft`` layout, the
    particles' sign) or None.
    """

    def __init__(self, images, ctf, pixel_size: float, xp=None):
        xp = xp or backend.array_module(images)
        imgs = xp.asarray(images, dtype=xp.float32)
        if imgs.ndim != 3 or imgs.shape[1] != imgs.shape[2]:
            raise InputError(None, f"particle images must be a stack [n, N, N], got {tuple(imgs.shape)}",
                             "re-extract the particles")
        self.xp = xp
        self.n = int(imgs.shape[-1])
        self.count = int(imgs.shape[0])
        self.pixel_size = float(pixel_size)
        self.coeffs: Coefficients = fourier_coefficients(self.n, xp=xp)
        self.ft = image_transforms(imgs, self.coeffs)
        if ctf is not None and not isinstance(ctf, CtfParams):
            ctf = xp.asarray(ctf, dtype=xp.float32)
            if ctf.shape != (self.count, self.n, self.n // 2 + 1):
                raise ValueError(f"ctfs must be [n, N, N//2+1] = {(self.count, self.n, self.n // 2 + 1)}, got {ctf.shape}")
        if isinstance(ctf, CtfParams) and len(ctf) != self.count:
            raise ValueError(f"{len(ctf)} CTFs for {self.count} images")
        self.ctf = ctf
        # per-shell power of the images: the first noise estimate
        self.image_power = self.shell_power(self.ft)

    def ctf_values(self, idx, k: int):
        xp = self.xp
        if self.ctf is None:
            return xp.ones((len(idx), k), dtype=xp.float32)
        if isinstance(self.ctf, CtfParams):
            return self.ctf.values(self.coeffs, self.pixel_size, idx=idx, k=k)
        return _ctf_at_coeffs(self.ctf, self.coeffs, xp.asarray(idx), k)

    def shell_power(self, values) -> np.ndarray:
        """Mean ``|values|²`` per shell (shells ``0 .. N // 2``) over rows: host array."""
        xp = self.xp
        ns = self.n // 2 + 1
        k = values.shape[-1]
        sh = self.coeffs.shell[:k]
        p = (xp.abs(values) ** 2).mean(axis=0)
        tot = xp.bincount(sh, weights=p.astype(xp.float64), minlength=ns)[:ns]
        cnt = xp.bincount(sh, minlength=ns)[:ns]
        out = backend.to_host(tot / xp.maximum(cnt, 1))
        return out

    def r_limit(self, resolution: float, margin: float = 2.0) -> float:
        """Radius in Fourier px of the search at ``resolution`` Å plus ``margin`` shells."""
        r = self.n * self.pixel_size / max(float(resolution), 2.0 * self.pixel_size) + margin
        return min(r, self.n / 2.0 - 1.0)


def noise_weights(sigma2, coeffs: Coefficients, k: int, xp):
    """``herm / σ²(shell)`` for the first ``k`` coefficients (float32)."""
    s2 = np.maximum(np.asarray(sigma2, dtype=np.float64), 1e-30)
    s2 = xp.asarray(s2.astype(np.float32))
    return coeffs.herm[:k] / s2[xp.minimum(coeffs.shell[:k], len(s2) - 1)]


@dataclasses.dataclass
class SearchResult:
    """Best pose per particle of one search."""

    rotations: np.ndarray  # [P, 3, 3]
    shifts: np.ndarray  # [P, 2]
    scores: np.ndarray  # [P] normalised correlation
    loglik: np.ndarray  # [P] Re<X, CTF R S>_w - ½ |CTF R|²_w at the best pose
    sxx: np.ndarray  # per-shell residual bookkeeping (sums over particles)
    sxm: np.ndarray
    smm: np.ndarray
    count: np.ndarray


def _stack_ri(z, xp):
    return xp.concatenate([xp.real(z), xp.imag(z)], axis=-1).astype(xp.float32)


def _shell_sums_rows(values, shells, ns, xp):
    return backend.to_host(xp.bincount(shells, weights=values.astype(xp.float64), minlength=ns)[:ns])


def search(data: ParticleData, fvol: FourierVolume, idx, sigma2, k: int, *, rotations=None, grid=None,
           base_shifts=None, trans=None, batch: int | None = None, soft: bool = False) -> SearchResult:
    """Find the best orientation and shift of particles ``idx`` against one reference.

    Either ``grid`` (global search: ``[O, 3, 3]`` shared by all particles) or
    ``rotations`` (local search: ``[P, L, 3, 3]`` candidates per particle) is given.
    ``base_shifts [P, 2]`` are the current shifts and ``trans [T, 2]`` the offsets tried
    around them (px). ``k``: number of Fourier coefficients (resolution limit).
    """
    xp = data.xp
    co = data.coeffs
    idx = np.asarray(idx)
    p_all = len(idx)
    trans = np.zeros((1, 2)) if trans is None else np.asarray(trans, dtype=float)
    base_shifts = np.zeros((p_all, 2)) if base_shifts is None else np.asarray(base_shifts, dtype=float)
    w = noise_weights(sigma2, co, k, xp)
    e_t = xp.conj(phase_ramp(co, xp.asarray(trans, dtype=xp.float32), k))  # [T, K]
    n_t = trans.shape[0]
    ns = data.n // 2 + 1
    shells = co.shell[:k]
    if grid is not None:
        grid = np.asarray(grid, dtype=np.float64)
        refs = xp.concatenate([fvol.slices(grid[s:s + 2048], co, k) for s in range(0, len(grid), 2048)])
        refs_ri = _stack_ri(refs, xp)  # [O, 2K]
        refs_p = (xp.abs(refs) ** 2).astype(xp.float32)  # [O, K]
        n_o = grid.shape[0]
        per = max(n_t * n_o, 1)
    else:
        rots_all = np.asarray(rotations, dtype=np.float64)
        n_o = rots_all.shape[1]
        per = max(n_t * n_o * 4, 1)
    if batch is None:
        batch = int(max(4, min(512, 1.5e7 // per)))
    out_rot = np.zeros((p_all, 3, 3))
    out_shift = np.zeros((p_all, 2))
    out_score = np.zeros(p_all)
    out_ll = np.zeros(p_all)
    sxx = np.zeros(ns)
    sxm = np.zeros(ns)
    smm = np.zeros(ns)
    cnt = np.zeros(ns)
    for s in range(0, p_all, batch):
        sel = idx[s:s + batch]
        b = len(sel)
        x = data.ft[xp.asarray(sel), :k]
        c = data.ctf_values(sel, k)
        bs = xp.asarray(base_shifts[s:s + batch], dtype=xp.float32)
        y = (w * c) * x * xp.conj(phase_ramp(co, bs, k))  # [B, K]
        z = y[:, None, :] * e_t[None]  # [B, T, K]
        wc2 = w * c * c
        if grid is not None:
            num = (_stack_ri(z, xp).reshape(b * n_t, 2 * k) @ refs_ri.T).reshape(b, n_t, n_o)
            den = wc2 @ refs_p.T  # [B, O]
        else:
            cand = rots_all[s:s + batch]
            r = fvol.slices(cand, co, k)  # [B, L, K]
            num = xp.matmul(_stack_ri(z, xp), xp.swapaxes(_stack_ri(r, xp), 1, 2))  # [B, T, L]
            den = xp.einsum("bk,blk->bl", wc2, (xp.abs(r) ** 2).astype(xp.float32))
        cc = num / xp.sqrt(xp.maximum(den, 1e-30))[:, None, :]
        flat = cc.reshape(b, -1)
        best = xp.argmax(flat, axis=1)
        best_h = backend.to_host(best)
        bt, bo = best_h // n_o, best_h % n_o
        ar = xp.arange(b)
        out_score[s:s + b] = backend.to_host(flat[ar, best])
        num_b = num.reshape(b, -1)[ar, best]
        den_b = den[ar, xp.asarray(bo)]
        out_ll[s:s + b] = backend.to_host(num_b - 0.5 * den_b)
        if grid is not None:
            out_rot[s:s + b] = grid[bo]
            r_best = refs[xp.asarray(bo)]
        else:
            out_rot[s:s + b] = cand[np.arange(b), bo]
            r_best = r[ar, xp.asarray(bo)]
        out_shift[s:s + b] = base_shifts[s:s + b] + trans[bt]
        # residual bookkeeping for σ²: model M = CTF · R · S
        m = c * r_best * phase_ramp(co, xp.asarray(out_shift[s:s + b], dtype=xp.float32), k)
        sh = xp.broadcast_to(shells, (b, k)).ravel()
        sxx += _shell_sums_rows((xp.abs(x) ** 2).ravel(), sh, ns, xp)
        sxm += _shell_sums_rows(xp.real(xp.conj(x) * m).ravel(), sh, ns, xp)
        smm += _shell_sums_rows((xp.abs(m) ** 2).ravel(), sh, ns, xp)
        cnt += _shell_sums_rows(xp.ones(b * k, dtype=xp.float32), sh, ns, xp)
    return SearchResult(out_rot, out_shift, out_score, out_ll, sxx, sxm, smm, cnt)


def update_sigma2(prev, results, k_shells: int) -> np.ndarray:
    """Noise power per shell from the residuals of the best poses (shells below ``k_shells``).

    One scale ``a`` (least squares over all shells searched) fits the reference to the
    data; ``σ² = (Σ|X|² − 2a Σ Re X*M + a² Σ|M|²) / count``. Shells not searched keep
    their previous value.
    """
    sxx = sum(r.sxx for r in results)
    sxm = sum(r.sxm for r in results)
    smm = sum(r.smm for r in results)
    cnt = sum(r.count for r in results)
    a = sxm[1:].sum() / max(smm[1:].sum(), 1e-30)
    out = np.array(prev, dtype=float)
    for s in range(1, min(k_shells, len(out))):
        if cnt[s] > 0:
            v = (sxx[s] - 2.0 * a * sxm[s] + a * a * smm[s]) / cnt[s]
            if v > 0:
                out[s] = v
    out[0] = out[1] if len(out) > 1 else out[0]
    return out


def backproject(data: ParticleData, bp: Backprojector, idx, rotations, shifts, weights=None, batch: int = 256):
    """Insert particles ``idx`` with their poses into ``bp`` (all coefficients below Nyquist)."""
    xp = data.xp
    co = data.coeffs
    k = len(co.radius)
    idx = np.asarray(idx)
    for s in range(0, len(idx), batch):
        sel = idx[s:s + batch]
        x = data.ft[xp.asarray(sel)]
        c = data.ctf_values(sel, k)
        x = x * xp.conj(phase_ramp(co, xp.asarray(np.asarray(shifts)[s:s + batch], dtype=xp.float32)))
        val, wt = c * x, c * c
        if weights is not None:
            ww = xp.asarray(np.asarray(weights, dtype=np.float32)[s:s + batch])[:, None]
            val, wt = val * ww, wt * ww
        bp.insert_slices(val, wt, np.asarray(rotations)[s:s + batch], co)


# --------------------------------------------------------------------------- schedule
@dataclasses.dataclass
class Stage:
    step: float  # degrees
    mode: str  # "global" or "local"
    trans_step: float  # px
    trans_half_width: int


def make_stages(initial_step: float, finest_step: float, max_shift: float) -> list[Stage]:
    """Global search at ``initial_step`` then local searches halving the step down to ``finest_step``."""
    stages = [Stage(float(initial_step), "global", 1.0, max(int(math.ceil(max_shift)), 0))]
    step = initial_step / 2.0
    tstep = 1.0
    while True:
        stages.append(Stage(step, "local", tstep, 1))
        if step <= finest_step * 1.0001:
            break
        step /= 2.0
        tstep = max(tstep / 2.0, 0.25)
    return stages


# --------------------------------------------------------------------------- results and state
@dataclasses.dataclass
class RefineResult:
    """Outcome of :func:`refine3d`.

    ``map`` is the Wiener-filtered reconstruction from both halves; ``half1``/``half2``
    the unfiltered half maps; ``fsc`` the half-map FSC (soft sphere of the particle
    diameter) and ``resolution`` its 0.143 crossing (Å). Poses: ``rotations [n, 3, 3]``,
    ``shifts [n, 2]`` px (where each particle lies; RELION's origin is ``-shift``),
    ``subsets [n]`` (1 or 2). For classification ``classes [n]`` (1-based),
    ``class_maps`` and ``class_probabilities [n, K]``.
    """

    map: np.ndarray
    half1: np.ndarray
    half2: np.ndarray
    fsc: np.ndarray
    resolution: float
    rotations: np.ndarray
    shifts: np.ndarray
    subsets: np.ndarray
    history: list
    converged: bool
    iterations: int
    classes: np.ndarray | None = None
    class_maps: list | None = None
    class_probabilities: np.ndarray | None = None
    pixel_size: float = 1.0
    symmetry: str = "C1"

    def angles(self):
        """``(rot, tilt, psi)`` in degrees (RELION's convention)."""
        return matrix_to_euler(self.rotations)


def particles_table(table: pd.DataFrame | None, rotations, shifts, pixel_size: float, subsets=None,
                    classes=None, scores=None) -> pd.DataFrame:
    """Particle table with refined ``rlnAngleRot/Tilt/Psi``, ``rlnOriginX/YAngst`` (``-shift · pixel``),
    ``rlnRandomSubset`` and ``rlnClassNumber`` (other columns of ``table`` kept)."""
    n = len(rotations)
    out = pd.DataFrame(index=range(n)) if table is None else table.reset_index(drop=True).copy()
    rot, tilt, psi = matrix_to_euler(np.asarray(rotations))
    out["rlnAngleRot"] = np.asarray(rot, dtype=float)
    out["rlnAngleTilt"] = np.asarray(tilt, dtype=float)
    out["rlnAnglePsi"] = np.asarray(psi, dtype=float)
    sh = np.asarray(shifts, dtype=float)
    out["rlnOriginXAngst"] = -sh[:, 0] * pixel_size
    out["rlnOriginYAngst"] = -sh[:, 1] * pixel_size
    if subsets is not None:
        out["rlnRandomSubset"] = np.asarray(subsets, dtype=int)
    if classes is not None:
        out["rlnClassNumber"] = np.asarray(classes, dtype=int)
    if scores is not None:
        out["cvAlignmentScore"] = np.asarray(scores, dtype=float)
    return out


def _last_iteration(out_dir: Path) -> int | None:
    best = None
    for p in out_dir.glob("it[0-9][0-9][0-9]_model.json"):
        m = re.match(r"it(\d{3})_model\.json$", p.name)
        if m:
            best = max(best or 0, int(m.group(1)))
    return best


def _write_log(out_dir: Path | None, line: str) -> None:
    log.info(line)
    if out_dir is not None:
        with open(out_dir / "refine.log", "a") as fh:
            fh.write(line + "\n")


# --------------------------------------------------------------------------- refinement
def _check_reference(reference, n: int, xp):
    ref = xp.asarray(reference, dtype=xp.float32)
    if ref.shape != (n, n, n):
        raise InputError("--reference", f"reference map has shape {tuple(ref.shape)}, the particles need ({n}, {n}, {n})",
                         "resample the reference to the particles' box and pixel size (done by the CLI)")
    if not bool(xp.isfinite(ref).all()) or float(xp.abs(ref).max()) == 0.0:
        raise InputError("--reference", "reference map is empty or not finite", "give a real map")
    return ref


def _make_reference(half, curve, resolution, pixel_size, mask):
    """FSC-weighted (Wiener) half map, low-passed at the resolution, masked."""
    gain = np.clip(np.asarray(curve, dtype=float), 0.0, 1.0)
    gain[0] = 1.0
    ref = shell_filter(half, gain)
    ref = lowpass(ref, resolution, pixel_size, edge_shells=2.0)
    return ref * mask


def refine3d(images, ctf, pixel_size: float, reference, *, symmetry: str = "C1", particle_diameter: float | None = None,
             iterations: int = 15, initial_lowpass: float = 35.0, initial_step: float = 15.0,
             finest_step: float | None = None, max_shift: float = 4.0, shifts=None, subsets=None, seed: int = 0,
             out_dir=None, resume: bool = False, table: pd.DataFrame | None = None, pad: int = 2,
             classes: int = 1, class_resolution: float | None = None, callback=None) -> RefineResult:
    """Gold-standard refinement of particle orientations and a 3D map (see the module docstring).

    Parameters
    ----------
    images : array ``[n, N, N]``
        Particles, protein white, background sd ≈ 1.
    ctf : :class:`CtfParams`, array ``[n, N, N // 2 + 1]`` or None
        CTFs of the particle images (sign of contrast-inverted images).
    pixel_size : float
        Å/px.
    reference : array ``[N, N, N]``
        Starting map on the particles' grid (low-passed here to ``initial_lowpass``).
    symmetry : str
        Point group imposed in the reconstructions; searches cover its asymmetric unit.
    particle_diameter : float, optional
        Å; mask diameter (default 0.75 of the box).
    iterations : int
        Largest number of iterations.
    initial_lowpass : float
        Å, low-pass of the starting reference.
    initial_step, finest_step : float
        Angular steps (degrees) of the global search and of the last local one (default
        from the particle radius and Nyquist, at most 3.75°).
    max_shift : float
        Px, translation range of the global search (±, around ``shifts``).
    shifts : array ``[n, 2]``, optional
        Starting shifts (px; ``-rlnOriginX/YAngst / pixel_size``).
    subsets : array ``[n]``, optional
        1/2 half-set labels (``rlnRandomSubset``); default: random halves.
    seed : int
        Seeds the half split and the per-iteration grid perturbations.
    out_dir : path, optional
        Where the per-iteration state goes (needed for ``resume``).
    resume : bool
        Continue after the last finished iteration in ``out_dir``.
    table : DataFrame, optional
        Particle table whose rows match ``images`` (written back with the new poses).
    classes : int
        ``> 1`` runs 3D classification (see the module docstring).
    class_resolution : float, optional
        Å, low-pass of the class references (default ``max(2.5 × Nyquist, initial_lowpass / 2)``).
    callback : callable, optional
        ``callback(iteration, info)`` after every finished iteration (may raise to stop).
    """
    xp = backend.array_module(images)
    t_start = time.time()
    data = ParticleData(images, ctf, pixel_size, xp=xp)
    n, nparts = data.n, data.count
    if nparts < 4:
        raise InputError(None, f"only {nparts} particles", "refinement needs at least a few hundred particles")
    ref0 = _check_reference(reference, n, xp)
    diameter = float(particle_diameter) if particle_diameter else 0.75 * n * pixel_size
    mask_r = min(0.5 * diameter / pixel_size + 1.0, n / 2.0 - 3.0)
    mask = soft_sphere_mask(n, mask_r, 3.0, xp)
    finest = finest_step if finest_step else min(3.75, max(finest_step_for(pixel_size, diameter), 0.5))
    stages = make_stages(initial_step, finest, max_shift)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    if classes > 1:
        return _classify3d(data, ref0, pixel_size, symmetry=symmetry, mask=mask, diameter=diameter,
                           iterations=iterations, initial_lowpass=initial_lowpass, stages=stages,
                           shifts=shifts, seed=seed, out=out, resume=resume, table=table, pad=pad,
                           n_classes=int(classes), class_resolution=class_resolution, callback=callback)

    rng = np.random.default_rng(seed)
    if subsets is None:
        subsets = np.ones(nparts, dtype=int)
        subsets[rng.permutation(nparts)[: nparts // 2]] = 2
    subsets = np.asarray(subsets, dtype=int)
    if not set(np.unique(subsets)) <= {1, 2} or (subsets == 1).sum() < 2 or (subsets == 2).sum() < 2:
        raise InputError("rlnRandomSubset", "half sets must be labelled 1 and 2 and both hold particles",
                         "drop the column to split at random")
    cur_shifts = np.zeros((nparts, 2)) if shifts is None else np.asarray(shifts, dtype=float).copy()
    cur_rots = np.tile(np.eye(3), (nparts, 1, 1))
    sigma2 = data.image_power.copy()
    history: list[dict] = []
    start_it = 1
    si = 0  # stage index
    stage_best = math.inf
    stalls = 0
    refs = None
    curve = None
    resolution = float(initial_lowpass)
    converged = False
    halves = None

    if resume and out is not None:
        last = _last_iteration(out)
        if last is not None:
            meta = json.loads((out / f"it{last:03d}_model.json").read_text())
            if meta.get("n_particles") != nparts or meta.get("box") != n:
                raise InputError(out, f"saved state is for {meta.get('n_particles')} particles of box {meta.get('box')}, "
                                 f"not {nparts} of box {n}", "use a new --out-dir or the same particles")
            z = np.load(out / f"it{last:03d}_data.npz")
            cur_rots, cur_shifts, subsets = z["rotations"], z["shifts"], z["subsets"]
            sigma2, curve = z["sigma2"], z["fsc"]
            from ..io.mrc import read_mrc  # noqa: PLC0415

            halves = [xp.asarray(read_mrc(out / f"it{last:03d}_half{h}.mrc")[0]) for h in (1, 2)]
            history = meta["history"]
            si, stage_best, stalls = meta["stage"], meta["stage_best"], meta["stalls"]
            resolution = meta["resolution"]
            converged = meta["converged"]
            start_it = last + 1
            refs = [_make_reference(halves[h], curve, resolution, pixel_size, mask) for h in range(2)]
            _write_log(out, f"continuing after iteration {last} (resolution {resolution:.2f} Å)")
    if refs is None:
        r0 = lowpass(ref0, initial_lowpass, pixel_size, edge_shells=2.0) * mask
        refs = [r0, r0]
        if out is not None:
            _write_log(out, f"refine3d: {nparts} particles, box {n} px at {pixel_size:.4g} Å/px, symmetry {symmetry}, "
                       f"stages {', '.join(f'{s.step:g}° {s.mode}' for s in stages)}, device {backend.describe()}")

    last_done = start_it - 1
    for it in range(start_it, iterations + 1):
        if converged:
            break
        t0 = time.time()
        stage = stages[si]
        it_rng = np.random.default_rng([seed, it])
        search_res = resolution if it > 1 else initial_lowpass
        k = data.coeffs.count(data.r_limit(search_res))
        first_global = stage.mode == "global" and not any(h["mode"] == "global" for h in history)
        trans = translation_grid(stage.trans_half_width if first_global else 1, stage.trans_step)
        results = []
        bps = []
        for h in (1, 2):
            sel = np.flatnonzero(subsets == h)
            fvol = FourierVolume(refs[h - 1], pad=pad)
            if stage.mode == "global":
                grid, _ = orientation_grid(stage.step, symmetry)
                grid = np.einsum("ij,ajk->aik", random_small_rotation(it_rng, stage.step / 2.0), grid)
                res = search(data, fvol, sel, sigma2, k, grid=grid, base_shifts=cur_shifts[sel], trans=trans)
            else:
                pert = local_perturbations(stage.step)
                cand = np.einsum("lij,pjk->plik", pert, cur_rots[sel])
                res = search(data, fvol, sel, sigma2, k, rotations=cand, base_shifts=cur_shifts[sel], trans=trans)
            cur_rots[sel] = res.rotations
            cur_shifts[sel] = res.shifts
            results.append(res)
            bp = Backprojector(n, pad=pad, symmetry=symmetry, xp=xp)
            backproject(data, bp, sel, res.rotations, res.shifts)
            bps.append(bp)
        k_shells = int(math.floor(data.coeffs.radius[k - 1])) + 1
        sigma2 = update_sigma2(sigma2, results, k_shells)
        halves = [bp.reconstruct(1e-3, mask_radius=None) for bp in bps]
        curve = fsc_curve(halves[0] * mask, halves[1] * mask)
        resolution = resolution_at(curve, 0.143, pixel_size, n)
        # schedule
        improved = resolution < stage_best * 0.99
        stage_best = min(stage_best, resolution)
        stalls = 0 if improved else stalls + 1
        entry = {"iteration": it, "step": stage.step, "mode": stage.mode, "trans_step": stage.trans_step,
                 "resolution": resolution, "search_resolution": search_res, "coefficients": int(k),
                 "score": float(np.mean(np.concatenate([r.scores for r in results]))),
                 "fsc05": resolution_at(curve, 0.5, pixel_size, n), "seconds": round(time.time() - t0, 2)}
        history.append(entry)
        if stalls >= 1 or (stage.mode == "global" and sum(h["mode"] == "global" for h in history) >= 4):
            if si + 1 < len(stages):
                si += 1
                stage_best = resolution
                stalls = 0
            elif stalls >= 1:
                converged = True
        _write_log(out, f"iteration {it:3d}: {stage.mode} {stage.step:g}° / {stage.trans_step:g} px, search to "
                   f"{n * pixel_size / max(data.coeffs.radius[k - 1], 1e-9):.1f} Å ({k} coefficients), "
                   f"resolution {resolution:.2f} Å (FSC 0.143), {entry['seconds']:.1f} s"
                   + (" -- converged" if converged else ""))
        if out is not None:
            _save_iteration(out, it, halves, cur_rots, cur_shifts, subsets, sigma2, curve, pixel_size, table,
                            {"n_particles": nparts, "box": n, "history": history, "stage": si, "stage_best": stage_best,
                             "stalls": stalls, "resolution": resolution, "converged": converged})
        refs = [_make_reference(halves[h], curve, resolution, pixel_size, mask) for h in range(2)]
        last_done = it
        if callback is not None:
            callback(it, entry)

    if halves is None:
        raise InputError(None, "no iteration was run", "raise --iterations")
    # final map from both halves, Wiener-filtered with the combined SNR
    final_bp = Backprojector(n, pad=pad, symmetry=symmetry, xp=xp)
    for h in (1, 2):
        sel = np.flatnonzero(subsets == h)
        backproject(data, final_bp, sel, cur_rots[sel], cur_shifts[sel])
    inv = 1.0 / np.maximum(ssnr_from_fsc(curve, combined=True), 1e-3)
    full = final_bp.reconstruct(inv) * mask
    if out is not None:
        _write_log(out, f"finished after iteration {last_done}: resolution {resolution:.2f} Å, "
                   f"{time.time() - t_start:.1f} s")
    return RefineResult(map=full, half1=halves[0], half2=halves[1], fsc=curve, resolution=resolution,
                        rotations=cur_rots, shifts=cur_shifts, subsets=subsets, history=history,
                        converged=converged, iterations=len(history), pixel_size=pixel_size, symmetry=symmetry)


def _save_iteration(out: Path, it: int, halves, rots, shifts, subsets, sigma2, curve, pixel_size, table, meta,
                    classes=None, probs=None, star_rots=None):
    from ..io.atomic import atomic_path, write_text  # noqa: PLC0415
    from ..io.mrc import write_mrc  # noqa: PLC0415
    from ..io.star import write_star  # noqa: PLC0415

    for h, vol in enumerate(halves, start=1):
        name = f"it{it:03d}_half{h}.mrc" if classes is None else f"it{it:03d}_class{h:03d}.mrc"
        write_mrc(out / name, vol, pixel_size)
    with atomic_path(out / f"it{it:03d}_data.npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, rotations=rots, shifts=shifts, subsets=subsets, sigma2=sigma2, fsc=curve,
                     classes=np.zeros(0) if classes is None else classes,
                     probs=np.zeros(0) if probs is None else probs)
    write_star(out / f"it{it:03d}_particles.star",
               {"particles": particles_table(table, rots if star_rots is None else star_rots, shifts, pixel_size,
                                             subsets if classes is None else None, classes)})
    write_text(out / f"it{it:03d}_model.json", json.dumps(meta, indent=1))


# --------------------------------------------------------------------------- 3D classification
def _classify3d(data: ParticleData, ref0, pixel_size, *, symmetry, mask, diameter, iterations, initial_lowpass,
                stages, shifts, seed, out, resume, table, pad, n_classes, class_resolution, callback):
    xp = data.xp
    n, nparts = data.n, data.count
    res_c = float(class_resolution) if class_resolution else max(2.5 * 2.0 * pixel_size, initial_lowpass / 2.0)
    k = data.coeffs.count(data.r_limit(res_c, margin=0.0))
    cur_shifts = np.zeros((nparts, 2)) if shifts is None else np.asarray(shifts, dtype=float).copy()
    sigma2 = data.image_power.copy()
    history: list[dict] = []
    start_it = 1
    si = 0
    converged = False
    all_idx = np.arange(nparts)
    class_rots = None
    probs = None
    maps = None
    from ..io.mrc import read_mrc  # noqa: PLC0415

    if resume and out is not None and _last_iteration(out) is not None:
        last = _last_iteration(out)
        meta = json.loads((out / f"it{last:03d}_model.json").read_text())
        if meta.get("n_particles") != nparts or meta.get("box") != n or meta.get("classes") != n_classes:
            raise InputError(out, "saved state does not match these particles/classes", "use a new --out-dir")
        z = np.load(out / f"it{last:03d}_data.npz")
        class_rots = z["rotations"]
        cur_shifts, sigma2, probs = z["shifts"], z["sigma2"], z["probs"]
        maps = [xp.asarray(read_mrc(out / f"it{last:03d}_class{c + 1:03d}.mrc")[0]) for c in range(n_classes)]
        history, si, converged = meta["history"], meta["stage"], meta["converged"]
        start_it = last + 1
        _write_log(out, f"continuing classification after iteration {last}")
    if maps is None:
        # poses against the starting reference, then classes from random subsets
        rng = np.random.default_rng(seed)
        r0 = lowpass(ref0, initial_lowpass, pixel_size, edge_shells=2.0) * mask
        fvol = FourierVolume(r0, pad=pad)
        k0 = data.coeffs.count(data.r_limit(initial_lowpass))
        grid, _ = orientation_grid(stages[0].step, symmetry)
        trans = translation_grid(stages[0].trans_half_width, stages[0].trans_step)
        res = search(data, fvol, all_idx, sigma2, k0, grid=grid, base_shifts=cur_shifts, trans=trans)
        sigma2 = update_sigma2(sigma2, [res], int(data.coeffs.radius[k0 - 1]) + 1)
        cur_shifts = res.shifts
        class_rots = np.repeat(res.rotations[:, None], n_classes, axis=1)
        labels = rng.integers(0, n_classes, nparts)
        probs = np.eye(n_classes)[labels]
        maps = []
        for c in range(n_classes):
            bp = Backprojector(n, pad=pad, symmetry=symmetry, xp=xp)
            sel = np.flatnonzero(labels == c)
            backproject(data, bp, sel, res.rotations[sel], cur_shifts[sel])
            maps.append(lowpass(bp.reconstruct(0.05), res_c, pixel_size) * mask)
        if out is not None:
            _write_log(out, f"classify3d: {nparts} particles, {n_classes} classes, box {n} px, symmetry {symmetry}, "
                       f"class resolution {res_c:.1f} Å")

    it = start_it - 1
    for it in range(start_it, iterations + 1):
        if converged:
            break
        t0 = time.time()
        stage = stages[min(si, len(stages) - 1)]
        it_rng = np.random.default_rng([seed, it])
        trans = translation_grid(1, stage.trans_step)  # shifts were searched against the starting map
        ll = np.zeros((nparts, n_classes))
        new_rots = np.zeros_like(class_rots)
        new_shifts = np.zeros((n_classes, nparts, 2))
        results = []
        for c in range(n_classes):
            fvol = FourierVolume(maps[c], pad=pad)
            if stage.mode == "global":
                grid, _ = orientation_grid(stage.step, symmetry)
                grid = np.einsum("ij,ajk->aik", random_small_rotation(it_rng, stage.step / 2.0), grid)
                res = search(data, fvol, all_idx, sigma2, k, grid=grid, base_shifts=cur_shifts, trans=trans)
            else:
                cand = np.einsum("lij,pjk->plik", local_perturbations(stage.step), class_rots[:, c])
                res = search(data, fvol, all_idx, sigma2, k, rotations=cand, base_shifts=cur_shifts, trans=trans)
            ll[:, c] = res.loglik
            new_rots[:, c] = res.rotations
            new_shifts[c] = res.shifts
            results.append(res)
        z = ll - ll.max(axis=1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=1, keepdims=True)
        best = np.argmax(p, axis=1)
        changed = float(np.mean(best != np.argmax(probs, axis=1)))
        probs = p
        class_rots = new_rots
        cur_shifts = new_shifts[best, all_idx]
        sigma2 = update_sigma2(sigma2, [results[int(c)] for c in range(n_classes)], int(data.coeffs.radius[k - 1]) + 1)
        maps = []
        for c in range(n_classes):
            bp = Backprojector(n, pad=pad, symmetry=symmetry, xp=xp)
            w = probs[:, c]
            sel = np.flatnonzero(w > 1e-3)
            if len(sel):
                backproject(data, bp, sel, class_rots[sel, c], new_shifts[c][sel], weights=w[sel])
            maps.append(lowpass(bp.reconstruct(0.05), res_c, pixel_size) * mask)
        sizes = np.bincount(best, minlength=n_classes)
        entry = {"iteration": it, "step": stage.step, "mode": stage.mode, "changed": changed,
                 "class_sizes": sizes.tolist(), "seconds": round(time.time() - t0, 2)}
        history.append(entry)
        if stage.mode == "global":
            if changed < 0.05 and it > 1:  # assignments settled: local searches from here
                si = min(si + 1, len(stages) - 1)
        else:
            if changed < 0.01:
                converged = True
            si = min(si + 1, len(stages) - 1)
        _write_log(out, f"iteration {it:3d}: {stage.mode} {stage.step:g}°, class sizes {sizes.tolist()}, "
                   f"{100 * changed:.1f}% changed class, {entry['seconds']:.1f} s" + (" -- converged" if converged else ""))
        if out is not None:
            _save_iteration(out, it, maps, class_rots, cur_shifts, np.zeros(nparts, int), sigma2, np.zeros(n // 2 + 1),
                            pixel_size, table,
                            {"n_particles": nparts, "box": n, "classes": n_classes, "history": history, "stage": si,
                             "converged": converged}, classes=best + 1, probs=probs,
                            star_rots=class_rots[all_idx, best])
        if callback is not None:
            callback(it, entry)
    best = np.argmax(probs, axis=1)
    rots = class_rots[np.arange(nparts), best]
    zero = np.zeros(n // 2 + 1)
    return RefineResult(map=maps[int(np.bincount(best, minlength=n_classes).argmax())], half1=None, half2=None,
                        fsc=zero, resolution=res_c, rotations=rots, shifts=cur_shifts, subsets=np.zeros(nparts, int),
                        history=history, converged=converged, iterations=len(history), classes=best + 1,
                        class_maps=maps, class_probabilities=probs, pixel_size=pixel_size, symmetry=symmetry)
