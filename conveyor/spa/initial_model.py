"""Ab initio 3D model by stochastic gradient descent (as cryoSPARC and RELION 3.1's ``--sgd``).

Nothing about the orientations is known; the map starts as the reconstruction of a random
subset of particles at random orientations (a featureless blob on the images' scale) and
is improved one mini-batch at a time.

One iteration
-------------
1. A mini-batch of particles (or class averages) is drawn without replacement (epochs).
2. Expectation over a coarse global grid (:func:`conveyor.spa.refine3d.orientation_grid`,
   ``step`` degrees over the asymmetric unit of the point group, randomly rotated every
   iteration) and translations within ``±max_shift`` px, with the Gaussian log-likelihood
   ``log L = Re Σ X*·CTF·R·S / σ² − ½ Σ CTF²|R|² / σ²`` over the coefficients inside the
   current resolution limit, tempered as ``log L / T``: the posterior
   ``p ∝ exp(log L / T)``. ``T`` (RELION's ``sgd_sigma2fudge``) decays from
   ``initial_temperature`` to 1 (default 1: no tempering; the first noise estimate, the
   images' power spectrum, already over-estimates ``σ²`` at low resolution).
3. Back-projection of the batch with those posteriors, summed per orientation: the slice
   of orientation ``o`` receives ``Σ_{p,t} p_pto · CTF_p X_p S_t*`` and the weight
   ``Σ_{p,t} p_pto · CTF_p²`` (two matrix products), inserted with symmetry expansion into a
   :class:`conveyor.spa.reconstruct.Backprojector`.
4. The gradient step: the mini-batch estimate, regularised towards the current map
   ``(D + λ·F[V]) / (W + λ)`` (``λ`` = the mean weight per shell), minus the current map
   is the (preconditioned) gradient; with momentum ``μ``:
   ``Δ ← μ Δ + η (V_batch − V)``, ``V ← V + Δ``.
5. The map is low-passed at the current resolution (which relaxes from
   ``resolution_schedule[0]`` to ``[1]`` over the first 60% of the iterations), masked by a
   soft sphere of the particle diameter and, with ``positivity``, clipped at zero after
   subtracting the solvent level.

Noise ``σ²`` per shell starts from the images' power spectrum and follows the residuals at
the best poses (running average). The map is re-centred on its centre of mass for point
groups that do not fix the centre (C1 and Cn along z).

Hand
----
Projections of a map and of its mirror image are the same up to orientation, so the
hand of an ab initio map is undetermined: the result is the structure or its mirror
(:func:`conveyor.spa.fsc.mirror_volume`). Check the hand against known features (α-helices
turn right-handed) or a reference (``conveyor spa postprocess --reference``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time

import numpy as np

from .. import backend
from ..errors import InputError
from ..geometry import parse_symmetry
from .fsc import centre_of_mass
from .projection import fft_module
from .reconstruct import (
    Backprojector,
    FourierVolume,
    _gridding_kernel,
    _separable,
    lowpass,
    phase_ramp,
    shift_volume,
    soft_sphere_mask,
)
from .refine3d import (
    ParticleData,
    _stack_ri,
    noise_weights,
    orientation_grid,
    random_small_rotation,
    translation_grid,
)

log = logging.getLogger(__name__)

HAND_NOTE = ("the hand of an ab initio map is undetermined: the map may be the mirror image of the structure; "
             "check it against known features or a reference (conveyor spa postprocess --reference)")


@dataclasses.dataclass
class InitialModelResult:
    """``volume`` (``[N, N, N]``, low-passed at ``resolution`` Å) and per-iteration ``history``.

    ``hand`` is always ``"undetermined"`` (see the module docstring).
    """

    volume: object
    resolution: float
    history: list
    hand: str = "undetermined"
    note: str = HAND_NOTE


def _insertion_transform(vol, bp: Backprojector):
    """``F[V]`` on the back-projector's grid: the padded transform of ``V · sinc²`` (what the
    trilinear insertion of V's own slices accumulates, divided by the weights)."""
    xp = bp.xp
    fft = fft_module(xp)
    n, m = bp.n, bp.m
    s = _gridding_kernel(n, m, xp)
    padded = xp.zeros((m, m, m), dtype=xp.float32)
    o = m // 2 - n // 2
    padded[o:o + n, o:o + n, o:o + n] = _separable(xp.asarray(vol, dtype=xp.float32), s, lambda a, b: a * b)
    return fft.rfftn(fft.ifftshift(padded)).astype(xp.complex64).ravel()


def _fixes_centre(symmetry: str) -> bool:
    kind, n = parse_symmetry(symmetry)
    return not (kind == "C")


def initial_model(images, ctfs, pixel_size: float, symmetry: str = "C1", *, particle_diameter: float | None = None,
                  n_iter: int = 120, batch: int | tuple = (100, 300), resolution_schedule=(40.0, 20.0),
                  seed: int = 0, step: float = 15.0, max_shift: float = 2.0, step_size: float = 0.5,
                  momentum: float = 0.5, initial_temperature: float = 1.0, positivity: bool = True, pad: int = 2,
                  em_iterations: int = 3, callback=None) -> InitialModelResult:
    """Ab initio map from particle images (or class averages) of unknown orientation.

    Parameters
    ----------
    images : array ``[n, N, N]``
        Particles or class averages, protein white (numpy or cupy).
    ctfs : :class:`conveyor.spa.reconstruct.CtfParams`, array ``[n, N, N // 2 + 1]`` or None
        CTFs of the images (None for CTF-corrected class averages).
    pixel_size : float
        Å/px.
    symmetry : str
        Point group imposed (asymmetric-unit search, symmetric insertion).
    particle_diameter : float, optional
        Å; soft spherical mask (default 0.75 of the box).
    n_iter : int
        Number of mini-batch iterations.
    batch : int or (int, int)
        Mini-batch size, or its first and last value (grows linearly, as RELION's SGD subsets).
    resolution_schedule : (float, float)
        Å; the low-pass relaxes from the first to the second over the first 60% of the
        iterations (the second is kept above Nyquist).
    seed : int
        Random seed (batches, start, grid rotations).
    step : float
        Angular step (degrees) of the orientation grid.
    max_shift : float
        Translation search range ± px (1-px steps).
    step_size, momentum : float
        Gradient step ``η`` and momentum ``μ``.
    initial_temperature : float
        Posterior temperature at the start (decays to 1 by 60% of the iterations).
    positivity : bool
        Clip density below the solvent level after every step.
    callback : callable, optional
        ``callback(iteration, volume, info)``.

    Returns
    -------
    :class:`InitialModelResult`
    """
    xp = backend.array_module(images)
    t0 = time.time()
    data = ParticleData(images, ctfs, pixel_size, xp=xp)
    n, nparts = data.n, data.count
    if nparts < 10:
        raise InputError(None, f"only {nparts} images", "an initial model needs at least tens of class averages or hundreds of particles")
    co = data.coeffs
    rng = np.random.default_rng(seed)
    diameter = float(particle_diameter) if particle_diameter else 0.75 * n * pixel_size
    mask_r = min(0.5 * diameter / pixel_size, n / 2.0 - 3.0)
    mask = soft_sphere_mask(n, mask_r, 3.0, xp)
    r_hi, r_lo = (float(resolution_schedule[0]), float(resolution_schedule[1]))
    r_lo = max(r_lo, 2.0 * pixel_size / 0.95)
    r_hi = max(r_hi, r_lo)
    b0, b1 = (batch, batch) if np.isscalar(batch) else (int(batch[0]), int(batch[1]))
    b0, b1 = max(1, min(b0, nparts)), max(1, min(b1, nparts))
    trans = translation_grid(int(math.ceil(max_shift)), 1.0)
    n_t = trans.shape[0]
    e_t = xp.conj(phase_ramp(co, xp.asarray(trans, dtype=xp.float32)))  # [T, Kall]
    base_grid, _ = orientation_grid(step, symmetry)
    n_o = base_grid.shape[0]
    sigma2 = data.image_power.copy()
    ns = n // 2 + 1
    recentre = not _fixes_centre(symmetry)

    # start: random orientations of a random subset
    start_idx = rng.choice(nparts, size=min(nparts, max(2 * b0, 200)), replace=False)
    from .refine3d import backproject  # noqa: PLC0415
    from ..geometry import random_rotations  # noqa: PLC0415

    bp = Backprojector(n, pad=pad, symmetry=symmetry, xp=xp)
    backproject(data, bp, start_idx, random_rotations(len(start_idx), rng), np.zeros((len(start_idx), 2)))
    vol = lowpass(bp.reconstruct(0.1), r_hi, pixel_size) * mask
    delta = xp.zeros_like(vol)
    order = rng.permutation(nparts)
    pos = 0
    history = []
    relax = max(int(0.6 * n_iter), 1)
    for it in range(1, n_iter + 1):
        frac = min((it - 1) / relax, 1.0)
        res = 1.0 / ((1.0 - frac) / r_hi + frac / r_lo)
        temp = initial_temperature ** (1.0 - frac)
        bsize = int(round(b0 + (b1 - b0) * (it - 1) / max(n_iter - 1, 1)))
        if pos + bsize > nparts:
            order = rng.permutation(nparts)
            pos = 0
        sel = order[pos:pos + bsize]
        pos += bsize
        grid = np.einsum("ij,ajk->aik", random_small_rotation(rng, step / 2.0), base_grid)
        nb, post_max = _expectation_backprojection(data, vol, sel, grid, sigma2, res, temp, trans, e_t, symmetry, pad)
        nb.symmetrise_grid(data.r_limit(res, margin=3.0))
        # regularise towards the current map and take the step
        mw = nb.shell_mean_weight()
        lam = np.maximum(mw, 1e-6 * max(mw.max(), 1e-30))
        shells_pad = xp.minimum(xp.rint(_pad_radius(nb) / pad).astype(xp.int64), ns - 1).ravel()
        lam_full = xp.asarray(lam.astype(np.float32))[shells_pad]
        fv = _insertion_transform(vol, nb)
        nb.data_re += lam_full * xp.real(fv)
        nb.data_im += lam_full * xp.imag(fv)
        nb.weight += lam_full
        est = nb.reconstruct(1e-6, r_max=data.r_limit(res, margin=1.0))
        delta = momentum * delta + step_size * (est - vol)
        vol = vol + delta
        vol = lowpass(vol, res, pixel_size) * mask
        if positivity:
            solvent = float(vol[mask < 0.01].mean()) if bool((mask < 0.01).any()) else 0.0
            vol = xp.maximum(vol - solvent, 0.0) * mask
        if recentre and it % 10 == 0:
            vol = shift_volume(vol, -centre_of_mass(vol))
        info = {"iteration": it, "resolution": res, "temperature": temp, "batch": len(sel), "max_posterior": post_max}
        history.append(info)
        if it % 10 == 0 or it == n_iter:
            log.info("initial model iteration %d: %.1f Å, T %.2f, batch %d, mean max posterior %.2f", it, res, temp,
                     len(sel), post_max)
        if callback is not None:
            callback(it, vol, info)
    # expectation-maximisation over all images at the final resolution
    res = r_lo
    for it in range(n_iter + 1, n_iter + em_iterations + 1):
        grid = np.einsum("ij,ajk->aik", random_small_rotation(rng, step / 2.0), base_grid)
        nb = Backprojector(n, pad=pad, symmetry=symmetry, xp=xp, symmetry_mode="grid")
        maxes = []
        for s0 in range(0, nparts, b1):
            sel = np.arange(s0, min(s0 + b1, nparts))
            part, pm = _expectation_backprojection(data, vol, sel, grid, sigma2, res, 1.0, trans, e_t, symmetry, pad)
            nb.add(part)
            maxes.append(pm * len(sel))
        vol = nb.reconstruct(0.01, r_max=data.r_limit(res, margin=1.0))
        vol = lowpass(vol, res, pixel_size) * mask
        if positivity:
            solvent = float(vol[mask < 0.01].mean()) if bool((mask < 0.01).any()) else 0.0
            vol = xp.maximum(vol - solvent, 0.0) * mask
        if recentre:
            vol = shift_volume(vol, -centre_of_mass(vol))
        info = {"iteration": it, "resolution": res, "temperature": 1.0, "batch": nparts,
                "max_posterior": float(sum(maxes) / nparts), "em": True}
        history.append(info)
        log.info("initial model EM iteration %d: %.1f Å, mean max posterior %.2f", it, res, info["max_posterior"])
        if callback is not None:
            callback(it, vol, info)
    log.info("initial model: %d SGD + %d EM iterations in %.1f s; %s", n_iter, em_iterations, time.time() - t0, HAND_NOTE)
    return InitialModelResult(volume=vol, resolution=float(res), history=history)


def _expectation_backprojection(data: ParticleData, vol, sel, grid, sigma2, res, temp, trans, e_t, symmetry, pad):
    """Posterior over (translation, orientation) of images ``sel`` against ``vol`` and their
    back-projection summed per orientation. Updates ``sigma2`` in place (running average of
    the residual power at the best poses). Returns ``(backprojector, mean max posterior)``."""
    xp = data.xp
    co = data.coeffs
    n = data.n
    ns = n // 2 + 1
    n_t = trans.shape[0]
    n_o = grid.shape[0]


    k = co.count(data.r_limit(res, margin=1.0))
    # expectation over the grid
    fvol = FourierVolume(vol, pad=pad)
    refs = fvol.slices(grid, co, k)  # [O, K]
    w = noise_weights(sigma2, co, k, xp)
    x = data.ft[xp.asarray(sel), :k]
    c = data.ctf_values(sel, k)
    z = ((w * c) * x)[:, None, :] * e_t[None, :, :k]  # [B, T, K]
    b = len(sel)
    num = (_stack_ri(z, xp).reshape(b * n_t, 2 * k) @ _stack_ri(refs, xp).T).reshape(b, n_t, n_o)
    den = (w * c * c) @ (xp.abs(refs) ** 2).astype(xp.float32).T  # [B, O]
    ll = (num - 0.5 * den[:, None, :]) / temp
    ll = ll - ll.reshape(b, -1).max(axis=1)[:, None, None]
    post = xp.exp(ll)
    post[post < 1e-4] = 0.0
    post /= post.reshape(b, -1).sum(axis=1)[:, None, None]
    # best poses: noise update
    flat = post.reshape(b, -1)
    best = xp.argmax(flat, axis=1)
    bt, bo = best // n_o, best % n_o
    r_best = refs[bo]
    m_best = c * r_best * phase_ramp(co, xp.asarray(trans, dtype=xp.float32)[bt], k)
    a = float(xp.real(xp.conj(x) * m_best).sum() / xp.maximum((xp.abs(m_best) ** 2).sum(), 1e-30))
    resid = xp.abs(x - a * m_best) ** 2
    shells = co.shell[:k]
    tot = backend.to_host(xp.bincount(xp.broadcast_to(shells, resid.shape).ravel(),
                                      weights=resid.ravel().astype(xp.float64), minlength=ns)[:ns])
    cnt = backend.to_host(xp.bincount(shells, minlength=ns)[:ns]) * b
    upd = cnt > 0
    upd[0] = False
    sigma2[upd] = 0.7 * sigma2[upd] + 0.3 * tot[upd] / cnt[upd]
    # back-projection summed per orientation
    kall = co.count(data.r_limit(res, margin=3.0))
    xa = data.ft[xp.asarray(sel), :kall]
    ca = data.ctf_values(sel, kall)
    za = (ca * xa)[:, None, :] * e_t[None, :, :kall]  # [B, T, Kall]
    pw = post.transpose(2, 0, 1).reshape(n_o, b * n_t)  # [O, B·T]
    dsl = pw @ _stack_ri(za, xp).reshape(b * n_t, 2 * kall)
    dsl = (dsl[:, :kall] + 1j * dsl[:, kall:]).astype(xp.complex64)
    wsl = post.sum(axis=1).T @ (ca * ca)  # [O, Kall]
    keep = backend.to_host(post.sum(axis=(0, 1)) > 1e-3)
    nb = Backprojector(n, pad=pad, symmetry=symmetry, xp=xp, symmetry_mode="grid")
    if keep.any():
        ki = np.flatnonzero(keep)
        nb.insert_slices(dsl[xp.asarray(ki)], wsl[xp.asarray(ki)], grid[ki], co, k=kall)
    post_max = float(backend.to_host(flat.max(axis=1)).mean())
    return nb, post_max


def _pad_radius(bp: Backprojector):
    from .fsc import radius_3d  # noqa: PLC0415

    return radius_3d(bp.m, bp.xp)
