"""2D classification (conveyor.spa.classify2d) against simulator ground truth.

One simulated stack (400 particles of 48 px at 4 Å/px: three views of a D3 protein-like
model plus 25 % ice, contamination, aggregates and carbon edges, each with its own CTF) is
classified once into 8 classes; the tests check the class averages against the true
projections, the recovered angles and shifts, where the junk went, and the automatic
selection of the classes.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from conveyor.errors import InputError
from conveyor.geometry import euler_to_matrix, random_rotations
from conveyor.simulate.spa import make_model
from conveyor.spa import classify2d as c2
from conveyor.spa.ctfmodel import ctf_2d
from conveyor.spa.projection import shift_image
from conveyor.spa.select import misfit_outliers, select_classes
from conveyor.spa.selector_training import simulate_particle_stack

PIXEL, BOX, DIAMETER, MASK = 4.0, 48, 120.0, 150.0
VIEWS = [(0.0, 0.0), (0.0, 90.0), (30.0, 50.0)]
JUNK = dict(junk_fraction=0.25, junk_kinds=("ice", "aggregate", "carbon", "contamination"),
            junk_weights=(0.3, 0.3, 0.25, 0.15))


@pytest.fixture(scope="module")
def stack():
    return simulate_particle_stack(n=400, box=BOX, pixel_size=PIXEL, particle_diameter=DIAMETER, symmetry="D3",
                                   views=VIEWS, seed=3, **JUNK)


@pytest.fixture(scope="module")
def result(stack):
    images, ctf, truth, info = stack
    return c2.classify_2d(images, ctf, PIXEL, 8, iterations=12, psi_step=15, offset_range=4,
                          particle_diameter=MASK, seed=0)


# --------------------------------------------------------------------------- kernels
def test_log_likelihoods_equal_the_direct_gaussian_sum():
    rng = np.random.default_rng(0)
    b = 32
    grid = c2.FrequencyGrid(b, 10)
    tvals = np.arange(-3, 4) * 1.0
    kern = c2.ShiftKernels(grid, tvals)
    refs = c2._to_grid(grid, rng.standard_normal((2, b, b)).astype(np.float32)) * grid.inside_mask(np.float32)
    x = c2._to_grid(grid, rng.standard_normal((1, b, b)).astype(np.float32))
    h = -grid.crop(ctf_2d((b, b), 3.0, 15000, 14000, 30, rfft=True, xp=np)[None].astype(np.float32))
    sigma2 = 1.7 * b * b
    winv = grid.wcol / sigma2
    ll = c2.log_likelihoods(x, h, c2.PreparedReferences(refs, grid), winv, grid, kern)
    for k in range(2):
        for ity, ty in enumerate(tvals):
            for itx, tx in enumerate(tvals):
                phase = np.exp(-2j * np.pi * (grid.kx * tx + grid.ky * ty) / b)
                d = x[0] - h[0] * refs[k] * phase
                direct = (-0.5 * np.sum(grid.wcol * np.abs(d) ** 2) + 0.5 * np.sum(grid.wcol * np.abs(x[0]) ** 2)) / sigma2
                assert ll[0, k, ity, itx] == pytest.approx(direct, rel=1e-4, abs=1e-3)


def test_shift_search_and_unshift_recover_a_known_shift():
    rng = np.random.default_rng(1)
    b = 32
    grid = c2.FrequencyGrid(b, 12)
    tvals = np.arange(-3, 4) * 1.0
    kern = c2.ShiftKernels(grid, tvals)
    ref_img = c2._to_real(grid, c2._to_grid(grid, rng.standard_normal((2, b, b)).astype(np.float32)))
    refs = c2._to_grid(grid, ref_img)
    x = c2._to_grid(grid, shift_image(ref_img[1], 2.0, -1.0)[None])  # content moved by (+2, -1)
    ll = c2.log_likelihoods(x, np.ones_like(x.real), c2.PreparedReferences(refs, grid), grid.wcol, grid, kern)
    k, ity, itx = np.unravel_index(np.argmax(ll[0]), ll[0].shape)
    assert (k, tvals[itx], tvals[ity]) == (1, 2.0, -1.0)
    w = np.zeros((1, 7, 7))
    w[0, ity, itx] = 1.0
    back = x[0] * c2.unshift_spectra(w, grid, kern)[0]
    inside = grid.wcol > 0
    assert np.abs(back - refs[1])[inside].max() < 1e-3 * np.abs(refs[1]).max()


def test_rotated_references_follow_relion_psi():
    """The reference rotated by ψ is the projection with rlnAnglePsi = ψ (A = Rz(ψ) Ry Rz)."""
    model = make_model(100.0, "C1", np.random.default_rng(2))
    p0 = model.projection(euler_to_matrix(40.0, 70.0, 0.0), 48, 4.0)
    grid = c2.FrequencyGrid(48, 23)
    rot = c2._to_real(grid, c2.rotated_references(p0[None], [35.0], grid)[0])[0]
    with_psi = model.projection(euler_to_matrix(40.0, 70.0, 35.0), 48, 4.0)
    wrong = model.projection(euler_to_matrix(40.0, 70.0, -35.0), 48, 4.0)
    assert np.corrcoef(rot.ravel(), with_psi.ravel())[0, 1] > 0.99
    assert np.corrcoef(rot.ravel(), wrong.ravel())[0, 1] < 0.9


def test_significant_pairs_segment_sum_and_robust_noise():
    rng = np.random.default_rng(3)
    mass = rng.dirichlet(np.full(20, 0.3), size=40).astype(np.float32)
    keep = c2.significant_pairs(mass, 0.9)
    assert ((mass * keep).sum(1) >= 0.9 - 1e-6).all() and keep.any(axis=1).all()
    assert (keep.sum(1) < 20).any()
    v = (rng.standard_normal((30, 5)) + 1j * rng.standard_normal((30, 5))).astype(np.complex64)
    rows = rng.integers(0, 4, 30)
    ref = np.zeros((4, 5), np.complex64)
    np.add.at(ref, rows, v)
    assert np.allclose(c2.segment_sum(rows, v, 4), ref, atol=1e-5)
    # noise power per shell: 10 % strong junk moves the mean by a factor ~10, not the median estimate
    counts = np.array([4.0, 12.0, 40.0])
    per = rng.chisquare(2 * counts[None].repeat(2000, 0)) / (2 * counts)  # unit noise power
    per[:200] *= 100.0
    est = c2.robust_shell_power(per, 2 * counts)
    assert np.allclose(est, 1.0, rtol=0.15) and (per.mean(0) > 5).all()


# --------------------------------------------------------------------------- against ground truth
def _lowpass(img, pixel, res):
    k = np.hypot(np.fft.fftfreq(img.shape[0])[:, None], np.fft.rfftfreq(img.shape[1])[None, :]) / pixel
    return np.fft.irfft2(np.fft.rfft2(img) * np.exp(-0.5 * (k * res) ** 2), s=img.shape)


def _best_correlation(avg, img, max_shift=4):
    """Largest normalised cross-correlation of ``img`` rotated (5° steps) and shifted (±max_shift px) with ``avg``."""
    from scipy.ndimage import rotate

    a = (avg - avg.mean()) / np.linalg.norm(avg - avg.mean())
    fa = np.conj(np.fft.fft2(a))
    best = -1.0
    for ang in np.arange(0.0, 360.0, 5.0):
        r = rotate(img, ang, reshape=False, order=1)
        r = (r - r.mean()) / np.linalg.norm(r - r.mean())
        cc = np.real(np.fft.ifft2(np.fft.fft2(r) * fa))
        cc = np.roll(np.roll(cc, max_shift, 0), max_shift, 1)[: 2 * max_shift + 1, : 2 * max_shift + 1]
        best = max(best, float(cc.max()))
    return best


def test_class_averages_match_the_true_view_better_than_other_views(stack, result):
    images, ctf, truth, info = stack
    model = info["model"]
    rng_views = random_rotations(12, np.random.default_rng(7))
    checked = 0
    for c in range(1, result.n_classes + 1):
        members = truth[result.assignments == c]
        good = members[members.is_junk == 0]
        if len(good) < 30 or len(good) < 0.8 * len(members):
            continue
        view = good.view.mode().iloc[0]
        if (good.view == view).mean() < 0.9:
            continue
        avg = result.averages[c - 1]
        res = max(result.class_resolution[c - 1], 2 * PIXEL)
        true = _best_correlation(avg, _lowpass(model.projection(euler_to_matrix(*VIEWS[view], 0.0), BOX, PIXEL), PIXEL, res))
        other = [_best_correlation(avg, _lowpass(model.projection(r, BOX, PIXEL), PIXEL, res)) for r in rng_views]
        assert true > 0.8, (c, true)
        assert true > np.percentile(other, 90), (c, true, sorted(other))
        checked += 1
    assert checked >= 3  # every view has a clean class


def test_in_plane_angles_and_shifts_are_recovered(stack, result):
    images, ctf, truth, info = stack
    for c in range(1, result.n_classes + 1):
        sel = (result.assignments == c) & (truth.is_junk.to_numpy() == 0)
        if sel.sum() < 30:
            continue
        dpsi = np.deg2rad(result.psi[sel] - truth.psi.to_numpy()[sel])
        # constant per class, up to the in-plane symmetry of the view (D3: 1-, 2- or 3-fold)
        coherence = max(abs(np.mean(np.exp(1j * nfold * dpsi))) for nfold in (1, 2, 3))
        assert coherence > 0.85, (c, coherence)
        err = np.hypot(result.shifts[sel, 0] - truth.dx.to_numpy()[sel], result.shifts[sel, 1] - truth.dy.to_numpy()[sel])
        assert np.median(err) < 1.0, (c, np.median(err))
    assert np.allclose(result.origins_angst, -result.shifts * PIXEL)


def test_junk_concentrates_in_junk_classes(stack, result):
    images, ctf, truth, info = stack
    tab = pd.crosstab(result.assignments, truth.is_junk).reindex(columns=[0, 1], fill_value=0)
    junk_classes = tab.index[tab[1] > tab[0]]
    in_junk = tab.loc[junk_classes].sum()
    in_good = tab.drop(index=junk_classes).sum()
    assert in_junk[1] / max(in_junk.sum(), 1) > 0.95  # junk classes are pure junk
    assert in_junk[1] / tab[1].sum() > 0.6  # and hold most of it
    assert in_good[1] / in_good.sum() < 0.125  # particle classes: under half the stack's 25 % junk
    # particles are confidently assigned
    good = truth.is_junk.to_numpy() == 0
    assert np.median(result.probabilities[good]) > 0.8


def test_class_bookkeeping(stack, result):
    images, ctf, truth, info = stack
    k = result.n_classes
    assert result.averages.shape == (k, BOX, BOX) and result.averages.dtype == np.float32
    assert np.array_equal(result.class_counts, np.bincount(result.assignments - 1, minlength=k))
    assert (np.diff(result.class_counts) <= 0).all()  # class 1 holds the most particles
    assert result.class_distribution.sum() == pytest.approx(1.0)
    assert np.all((result.psi > -180) & (result.psi <= 180))
    assert np.all((result.probabilities > 0) & (result.probabilities <= 1))
    good = result.class_counts >= 30
    assert np.all((result.class_resolution[good] > 2 * PIXEL) & (result.class_resolution[good] < 25.0))
    assert list(result.log.columns) == list(c2.LOG_COLUMNS) and len(result.log) == 12


def test_auto_selection_keeps_particles_and_removes_junk(stack, result):
    images, ctf, truth, info = stack
    sel = select_classes(result.averages, result.class_counts, result.class_resolution, PIXEL, MASK, mode="auto")
    kept = np.isin(result.assignments, sel.selected) & ~misfit_outliers(result.assignments, result.misfit, 3.5)
    junk = truth.is_junk.to_numpy() == 1
    assert kept[~junk].mean() >= 0.9
    assert 1.0 - kept[junk].mean() >= 0.8


# --------------------------------------------------------------------------- API behaviour
def test_reproducible_and_ctf_sources_agree():
    images, ctf, truth, _ = simulate_particle_stack(n=60, box=32, pixel_size=4.0, particle_diameter=80.0,
                                                     symmetry="C2", n_views=2, junk_fraction=0.0, seed=5)
    kw = dict(iterations=3, psi_step=30, offset_range=2, particle_diameter=100.0, seed=4)
    a = c2.classify_2d(images, ctf, 4.0, 3, **kw)
    b = c2.classify_2d(images, ctf, 4.0, 3, **kw)
    assert np.array_equal(a.assignments, b.assignments) and np.array_equal(a.averages, b.averages)
    arr = np.stack([ctf_2d((32, 32), 4.0, r.rlnDefocusU, r.rlnDefocusV, r.rlnDefocusAngle, rfft=True, xp=np)
                    for r in ctf.itertuples()])
    grid = c2.FrequencyGrid(32, 15)
    h_par = c2._CtfSource(ctf, 60, 32, 4.0).batch(np.arange(60), grid)
    h_arr = c2._CtfSource(arr, 60, 32, 4.0).batch(np.arange(60), grid)
    assert np.allclose(h_par, h_arr, atol=1e-5)


def test_bad_input_is_reported():
    imgs = np.zeros((20, 32, 32), np.float32)
    with pytest.raises(InputError, match="too few"):
        c2.classify_2d(imgs, None, 4.0, 15, particle_diameter=100.0)
    with pytest.raises(InputError, match="even"):
        c2.classify_2d(np.zeros((20, 33, 33), np.float32), None, 4.0, 2, particle_diameter=100.0)
    with pytest.raises(InputError, match="wider than"):
        c2.classify_2d(imgs, None, 4.0, 2, particle_diameter=400.0)
    with pytest.raises(InputError, match="offset range"):
        c2.classify_2d(imgs, None, 4.0, 2, particle_diameter=100.0, offset_range=20)
    with pytest.raises(InputError, match="rlnDefocusV"):
        c2.classify_2d(imgs, pd.DataFrame({"rlnDefocusU": np.ones(20), "rlnDefocusAngle": np.zeros(20)}), 4.0, 2,
                       particle_diameter=100.0)
