"""Direct Fourier inversion against ground truth: noise-free accuracy, CTF'd noisy particles with
true poses, symmetry, conventions (shifts, CTF sign), CTF helper and volume resampling.

:func:`simulated_particles` (shared with the refinement and initial-model tests) makes
particles the way the SPA simulator images them, without the micrograph: exact line
integrals of the simulator's protein model at twice the sampling, binned by Fourier
cropping, shifted, multiplied by the CTF of contrast-inverted particles (``-ctf_2d``) and
an envelope, plus white Gaussian noise (background sd 1).
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import numpy as np
import pytest

from conveyor.geometry import random_rotations, symmetry_matrices
from conveyor.simulate.spa import make_model
from conveyor.spa.ctfmodel import ctf_2d
from conveyor.spa.extract import fourier_crop
from conveyor.spa.fsc import fsc, resolution_at
from conveyor.spa.projection import Projector, rotate_volume
from conveyor.spa.reconstruct import (
    Backprojector,
    CtfParams,
    FourierVolume,
    fourier_coefficients,
    particle_ctfs,
    reconstruct,
    resample_volume,
    shell_filter,
)

PIXEL = 5.0
BOX = 32
DIAMETER = 110.0


@functools.lru_cache(maxsize=4)
def simulated_particles(n: int = 1500, box: int = BOX, pixel: float = PIXEL, diameter: float = DIAMETER,
                        symmetry: str = "D3", snr: float = 0.05, seed: int = 0, shift_sd: float = 1.0,
                        envelope_b: float = 50.0, model_seed: int = 1000):
    """Noisy CTF'd particles of a simulated protein with their true poses (see the module docstring).

    ``snr`` is the variance of the CTF'd projections over the box divided by the noise
    variance. Returns a namespace with ``images [n, box, box]``, ``rotations [n, 3, 3]``,
    ``shifts [n, 2]`` (px, where each particle lies), ``ctf`` (:class:`CtfParams`),
    ``truth`` (the map at ``pixel``), ``model``, ``pixel``, ``symmetry``.
    """
    rng = np.random.default_rng(seed)
    model = make_model(diameter, symmetry, np.random.default_rng(model_seed))
    fine_box, fine_px = 2 * box, pixel / 2.0
    truth = resample_volume(model.volume(fine_box, fine_px), fine_px, pixel, box)
    rots = random_rotations(n, rng)
    shifts = rng.normal(0.0, shift_sd, (n, 2))
    proj = np.stack([model.projection(r, fine_box, fine_px, shift=2.0 * s) for r, s in zip(rots, shifts)])
    proj = fourier_crop(proj, box)
    dfm = rng.uniform(10000.0, 25000.0, n)
    ast = rng.uniform(0.0, 600.0, n)
    ctf = CtfParams(dfm + ast / 2, dfm - ast / 2, rng.uniform(0.0, 180.0, n), 300.0, 2.7, 0.1, 0.0, 0.0, 1.0)
    h = particle_ctfs(box, pixel, ctf, xp=np)
    kx = np.fft.rfftfreq(box, pixel)[None, :]
    ky = np.fft.fftfreq(box, pixel)[:, None]
    env = np.exp(-envelope_b * (kx**2 + ky**2) / 4.0)
    sig = np.fft.irfft2(np.fft.rfft2(proj) * h * env, s=(box, box))
    sd = np.sqrt(sig.var() / snr)
    images = ((sig + rng.normal(0.0, sd, sig.shape)) / sd).astype(np.float32)
    for a in (images, rots, shifts, truth):
        a.setflags(write=False)
    return SimpleNamespace(images=images, rotations=rots, shifts=shifts, ctf=ctf, truth=truth, model=model,
                           pixel=pixel, symmetry=symmetry, diameter=diameter)


@pytest.fixture(scope="module")
def data():
    return simulated_particles()


def test_fourier_volume_slices_match_the_projector(data):
    co = fourier_coefficients(BOX)
    rots = data.rotations[:7]
    a = FourierVolume(data.truth).slices(rots, co)
    b = Projector(data.truth).slices(rots).reshape(7, -1)[:, co.flat]
    assert np.abs(a - b).max() < 1e-5 * np.abs(b).max()


def test_noise_free_reconstruction_matches_the_map(data):
    """Projections (no CTF, no noise) back to the map: gridding-corrected, flat in radius."""
    truth = shell_filter(data.truth, np.ones(BOX // 2))  # the inversion keeps |k| <= N/2 - 1
    rots = random_rotations(400, 7)
    proj = Projector(data.truth, pad=4).project(rots)
    vol = reconstruct(proj, rots, pixel_size=PIXEL, wiener=1e-5)
    assert np.abs(vol - truth).max() < 0.06 * truth.max()
    curve = fsc(vol, truth)
    assert curve[1:BOX // 2 - 1].min() > 0.99 and curve[BOX // 2 - 1] > 0.95
    g = np.arange(BOX) - BOX // 2
    r = np.sqrt(g[:, None, None] ** 2 + g[None, :, None] ** 2 + g[None, None, :] ** 2)
    dense = truth > 0.1 * truth.max()
    for lo, hi in ((0, 5), (5, 9), (9, 13)):
        sel = dense & (r >= lo) & (r < hi)
        ratio = (vol[sel] * truth[sel]).sum() / (truth[sel] ** 2).sum()
        assert ratio == pytest.approx(1.0, abs=0.08)


def test_reconstruction_from_noisy_ctf_particles_with_true_poses(data):
    """1500 CTF'd particles at SNR 0.05 with their true angles and shifts, D3 imposed."""
    h = particle_ctfs(BOX, PIXEL, data.ctf, xp=np)
    vol = reconstruct(data.images, data.rotations, data.shifts, h, PIXEL, symmetry="D3", wiener=0.01,
                      mask_diameter=DIAMETER + 20)
    curve = fsc(vol, data.truth)
    res = resolution_at(curve, 0.5, PIXEL)
    assert res < 1.2 * 2 * PIXEL, res  # 0.5 reached within 20% of Nyquist


def test_shift_and_ctf_conventions(data):
    """The opposite shift sign or CTF sign, or no symmetry, all do worse than the conventions."""
    sub = slice(0, 400)
    im, rot, sh = data.images[sub], data.rotations[sub], data.shifts[sub]
    h = particle_ctfs(BOX, PIXEL, data.ctf.subset(np.arange(400)), xp=np)

    def curve(shifts, ctfs, symmetry="D3"):
        return fsc(reconstruct(im, rot, shifts, ctfs, PIXEL, symmetry=symmetry, wiener=0.01), data.truth)

    good = curve(sh, h)
    assert resolution_at(curve(-sh, h), 0.5, PIXEL) > 1.2 * resolution_at(good, 0.5, PIXEL)
    assert curve(sh, -h)[1:4].max() < 0  # the wrong CTF sign inverts the contrast
    assert good[4:14].mean() > curve(sh, h, "C1")[4:14].mean() + 0.05


def test_symmetric_insertion_gives_a_symmetric_map(data):
    h = particle_ctfs(BOX, PIXEL, data.ctf.subset(np.arange(200)), xp=np)
    vol = reconstruct(data.images[:200], data.rotations[:200], data.shifts[:200], h, PIXEL, symmetry="D3")
    for op in symmetry_matrices("D3")[1:]:
        rotated = rotate_volume(vol, op)
        inner = np.corrcoef(rotated[6:-6, 6:-6, 6:-6].ravel(), vol[6:-6, 6:-6, 6:-6].ravel())[0, 1]
        assert inner > 0.97


def test_grid_symmetrisation_agrees_with_symmetric_insertion(data):
    rots = data.rotations[:300]
    proj = Projector(data.truth, pad=3).project(rots)
    maps = []
    for mode in ("insert", "grid"):
        bp = Backprojector(BOX, symmetry="D3", xp=np, symmetry_mode=mode)
        bp.insert(proj, rots)
        maps.append(bp.reconstruct(1e-4))
    assert fsc(maps[0], maps[1])[1:BOX // 2].min() > 0.98
    assert np.abs(maps[0] - maps[1]).max() < 0.06 * maps[0].max()


def test_particle_ctfs_have_the_sign_of_inverted_particles():
    ctf = CtfParams([15000.0, 20000.0], [14000.0, 20000.0], [30.0, 0.0], 300.0, 2.7, 0.1, 0.0, 0.0, 1.0)
    h = particle_ctfs(BOX, PIXEL, ctf, xp=np)
    assert h.shape == (2, BOX, BOX // 2 + 1)
    assert h[0, 0, 0] == pytest.approx(0.1, abs=1e-6)  # +w at k = 0
    ref = ctf_2d((BOX, BOX), PIXEL, 15000.0, 14000.0, 30.0, 300.0, 2.7, 0.1, rfft=True, xp=np)
    assert np.allclose(h[0], -ref, atol=1e-5)


def test_resample_volume_keeps_the_physical_scale(data):
    fine = data.model.volume(2 * BOX, PIXEL / 2)
    coarse = resample_volume(fine, PIXEL / 2, PIXEL, BOX)
    assert coarse.shape == (BOX,) * 3
    assert np.allclose(coarse, data.truth, atol=1e-4 * data.truth.max())
    assert coarse.sum() * PIXEL**3 == pytest.approx(fine.sum() * (PIXEL / 2) ** 3, rel=1e-3)
    bigger = resample_volume(data.truth, PIXEL, PIXEL, BOX + 8)
    assert np.allclose(bigger[4:-4, 4:-4, 4:-4], data.truth)


@pytest.mark.gpu
def test_gpu_reconstruction_and_refinement_match_the_cpu(data):
    import cupy as cp

    from conveyor.spa.refine3d import refine3d

    n = 300
    h = particle_ctfs(BOX, PIXEL, data.ctf.subset(np.arange(n)), xp=np)
    args = (data.rotations[:n], data.shifts[:n])
    cpu = reconstruct(data.images[:n], *args, h, PIXEL, symmetry="D3")
    gpu = reconstruct(cp.asarray(data.images[:n]), *args, cp.asarray(h), PIXEL, symmetry="D3")
    assert isinstance(gpu, cp.ndarray)
    assert np.abs(cp.asnumpy(gpu) - cpu).max() < 1e-3 * np.abs(cpu).max()
    kw = dict(symmetry="D3", particle_diameter=DIAMETER, iterations=2, seed=0)
    ctf = data.ctf.subset(np.arange(n))
    r_cpu = refine3d(data.images[:n], ctf, PIXEL, data.truth, **kw)
    r_gpu = refine3d(cp.asarray(data.images[:n]), ctf, PIXEL, cp.asarray(data.truth), **kw)
    same = np.isclose(np.einsum("nij,nij->n", r_cpu.rotations, r_gpu.rotations), 3.0, atol=1e-3)
    assert same.mean() > 0.95
    assert abs(r_cpu.resolution - r_gpu.resolution) < 0.05 * r_cpu.resolution
