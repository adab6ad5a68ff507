"""Intensity correction against the simulator's |F|²: missing centre, symmetry, background."""

from __future__ import annotations

import mrcfile
import numpy as np
import pytest

from conveyor.cli import main
from conveyor.simulate.spi import simulate_spi
from conveyor.spi.correct import correct_intensity, fit_sphere_profile, sphere_intensity

BEAMSTOP = 6  # voxels


@pytest.fixture(scope="module")
def truth(tmp_path_factory):
    """|F|² of the 70 nm capsid on the 64² detector's reciprocal grid (95³, voxel dq in 1/Å)."""
    out = tmp_path_factory.mktemp("correct")
    paths = simulate_spi(out, n_files=1, frames_per_file=1, detector=64, seed=2)
    with mrcfile.open(paths["intensity"]) as m:
        vol, dq = m.data.astype(np.float64), float(m.voxel_size.x)
    n = vol.shape[0]
    ax = np.arange(n) - n // 2
    r = np.sqrt(ax[:, None, None] ** 2 + ax[None, :, None] ** 2 + ax[None, None, :] ** 2)
    return vol, dq, r, paths


def _observed(vol, r, rng, noise=0.05, rmax=40):
    """Truth with multiplicative noise, nothing inside the beamstop or beyond rmax."""
    obs = vol * (1 + noise * rng.normal(size=vol.shape))
    measured = (r >= BEAMSTOP) & (r <= rmax)
    return np.where(measured, obs, 0.0), measured.astype(np.float32)


def test_sphere_model():
    assert sphere_intensity(0.0, 70.0) == pytest.approx(1.0)
    assert sphere_intensity(4.493409 / (np.pi * 70.0), 70.0) == pytest.approx(0.0, abs=1e-10)  # first minimum
    q = np.linspace(0.002, 0.04, 60)
    d, s, res = fit_sphere_profile(q, 5.0 * sphere_intensity(q, 66.0), diameter_nm=60.0)
    assert d == pytest.approx(66.0, rel=1e-3) and s == pytest.approx(5.0, rel=1e-2) and res < 1e-2


def test_filled_centre_matches_the_true_low_q_intensity(truth):
    vol, dq, r, _ = truth
    obs, weight = _observed(vol, r, np.random.default_rng(0))
    res = correct_intensity(obs, dq, weight=weight)  # diameter fitted from scratch
    assert res.fill_radius == BEAMSTOP  # first shell at least half measured
    assert res.diameter_nm == pytest.approx(70.0, rel=0.03)  # the simulator's fringe diameter
    centre = r < BEAMSTOP
    ratio = res.intensity[centre] / vol[centre]
    # the capsid is not a perfect sphere: its forward scattering is within ~5 % of the fit
    assert np.median(ratio) == pytest.approx(1.0, abs=0.08) and ratio.min() > 0.85 and ratio.max() < 1.15
    assert not res.measured[centre].any() and res.filled[centre].all()
    # measured voxels keep their (symmetrised) data
    shell = (r > 10) & (r < 30)
    assert np.corrcoef(res.intensity[shell], vol[shell])[0, 1] > 0.99
    given = correct_intensity(obs, dq, weight=weight, low_q_fill_nm=72.0)
    assert given.diameter_nm == 72.0


def test_friedel_symmetry_no_negatives_and_mask(truth):
    vol, dq, r, _ = truth
    rng = np.random.default_rng(1)
    obs, weight = _observed(vol, r, rng)
    n = vol.shape[0]
    c = n // 2
    # an unmeasured patch whose Friedel mates are measured, and noise making negatives
    weight[c + 12 : c + 16, c + 3 : c + 8, c - 2 : c + 2] = 0
    obs = np.where(weight > 0, obs - 0.02 * np.median(obs[weight > 0]) * rng.random(obs.shape), 0.0)
    assert (obs < 0).any()
    res = correct_intensity(obs, dq, weight=weight, diameter_nm=70.0)
    assert np.array_equal(res.intensity, res.intensity[::-1, ::-1, ::-1])
    assert res.intensity.min() >= 0
    patch = (slice(c + 12, c + 16), slice(c + 3, c + 8), slice(c - 2, c + 2))
    assert res.measured[patch].all()  # restored from the Friedel mates
    mate = vol[::-1, ::-1, ::-1][patch]
    assert np.allclose(res.intensity[patch], mate, rtol=0.1, atol=0.05 * mate.max())
    assert not res.measured[r > n // 2 - 1].any() and not res.filled[r > n // 2 - 1].any()
    assert np.array_equal(res.measured | res.filled, r <= n // 2 - 1)


@pytest.mark.parametrize("mode", ["constant", "radial"])
def test_background_from_the_outer_shells(truth, mode):
    vol, dq, r, _ = truth
    obs, weight = _observed(vol, r, np.random.default_rng(2), noise=0.0)
    level = 0.5 * vol[(r > 36) & (r < 40)].mean()
    bg = level * ((40.0 / np.maximum(r, 1)) ** 2 if mode == "radial" else np.ones_like(r))
    res = correct_intensity(np.where(weight > 0, obs + bg, 0.0), dq, weight=weight, diameter_nm=70.0, background=mode)
    assert res.background_level == pytest.approx(level, rel=0.1)
    outer = (r > 20) & (r < 40)
    assert np.mean(np.abs(res.intensity[outer] - vol[outer])) < 0.05 * vol[outer].mean()
    assert res.diameter_nm == pytest.approx(70.0, rel=0.03)


def test_cli_correct(truth, tmp_path, capsys):
    vol, dq, r, paths = truth
    obs, weight = _observed(vol, r, np.random.default_rng(3))
    src, wfile = tmp_path / "intensity.mrc", tmp_path / "weight.mrc"
    for path, data in ((src, obs), (wfile, weight)):
        with mrcfile.new(path) as m:
            m.set_data(data.astype(np.float32))
            m.voxel_size = dq
    out, mask = tmp_path / "corrected.mrc", tmp_path / "mask.mrc"
    assert main(["spi", "correct", str(src), "--out", str(out), "--out-mask", str(mask), "--weight", str(wfile), "--diameter-nm", "70"]) == 0
    with mrcfile.open(out) as m:
        cor, vs = m.data, float(m.voxel_size.x)
    assert vs == pytest.approx(dq, rel=1e-5) and cor.min() >= 0
    mk = mrcfile.read(mask)
    assert mk[r < BEAMSTOP].max() == 0 and mk[(r > 8) & (r < 38)].min() == 1
    assert main(["spi", "correct", str(tmp_path / "nope.mrc"), "--out", str(out), "--out-mask", str(mask)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope.mrc" in err[0]
