"""Beam centre from Friedel symmetry: sub-pixel accuracy with a beamstop and gaps."""

from __future__ import annotations

import numpy as np
import pytest

from conveyor.spi import center as cf
from conveyor.spi.frames import read_frames

from . import NOMINAL_CENTER, detector_mask, make_frames, simulated, sphere_pattern

TRUE_CENTER = (101.3, 98.6)  # off the pixel grid and 1.8 px / 1.4 px away from the beamstop centre


@pytest.fixture(scope="module")
def run():
    """60 hits (55-85 nm, 300-3000 signal photons on the good pixels), centre jittered
    by 0.7 px rms from frame to frame around TRUE_CENTER."""
    rng = np.random.default_rng(30)
    n = 60
    d = rng.uniform(55, 85, n)
    photons = 10 ** rng.uniform(np.log10(300), np.log10(3000), n)
    data, mask, centers = make_frames(rng, d, photons, center=TRUE_CENTER, center_jitter=0.7, in_mask=True)
    return data, mask, centers


def test_friedel_dispersion_is_one_for_a_symmetric_poisson_pattern():
    rng = np.random.default_rng(3)
    mask = detector_mask()
    c = (101.5, 98.5)  # on the half-pixel grid of candidate centres
    lam = 1e5 * sphere_pattern(mask.shape, c, [70]) + 0.05
    img = rng.poisson(lam) * mask
    D = cf.friedel_dispersion(img, mask)[0]
    s = (197, 203)  # 2 * (cy, cx)
    assert D[s] == pytest.approx(1.0, abs=0.05)  # pure Poisson noise between Friedel mates
    assert D[s[0] + 2, s[1]] > 1.5  # 1 px off: the mates no longer agree
    # noise free and off the grid: exactly symmetric at the true centre only
    lam = 1e5 * sphere_pattern(mask.shape, TRUE_CENTER, [70]) + 0.05
    res = cf.friedel_center(lam * mask, mask, guess=NOMINAL_CENTER)
    assert np.hypot(*(res.center[0] - TRUE_CENTER)) < 0.05


def test_run_centre_is_within_half_a_pixel(run):
    data, mask, centers = run
    res = cf.run_center(data, mask, guess=NOMINAL_CENTER, max_shift=15)
    err = np.hypot(*(res.center[0] - TRUE_CENTER))
    assert err <= 0.5, f"run centre off by {err:.2f} px"
    assert err <= 0.25  # typical: ~0.1 px
    # the Friedel search alone already lands within a pixel
    coarse = cf.run_center(data, mask, guess=NOMINAL_CENTER, max_shift=15, refine=False)
    assert np.hypot(*(coarse.center[0] - TRUE_CENTER)) < 1.0


def test_centre_found_from_a_distant_guess(run):
    data, mask, _ = run
    res = cf.run_center(data, mask, guess=(92.0, 108.0), max_shift=20)
    assert np.hypot(*(res.center[0] - TRUE_CENTER)) <= 0.5


def test_per_frame_refinement_tracks_the_jitter(run):
    data, mask, centers = run
    start = cf.run_center(data, mask, guess=NOMINAL_CENTER).center[0]
    res = cf.refine_centers(data, mask, start, max_shift=3.0)
    err = np.hypot(*(res.center - centers).T)
    err_run = np.hypot(*(start[None] - centers).T)
    assert np.sqrt(np.mean(err**2)) < 0.75 * np.sqrt(np.mean(err_run**2))
    assert np.median(err) < 0.6 * np.median(err_run)


def test_centre_of_simulated_run_against_truth(tmp_path_factory, tmp_path):
    from conveyor.cli import main

    paths, truth = simulated(tmp_path_factory)
    shots = paths["shots"][0]
    hits = tmp_path / "hits.h5"
    out = tmp_path / "center.h5"
    assert main(["spi", "hits", str(shots), "--out", str(hits)]) == 0
    # start from the detector middle, not from the centre stored in the file (the truth)
    assert main(["spi", "center", str(shots), "--frames", str(hits), "--out", str(out), "--guess", "63.5", "63.5"]) == 0
    df = read_frames(out)
    cx, cy = truth["center_x"].iloc[0], truth["center_y"].iloc[0]
    assert np.hypot(df.attrs["run_center_x"] - cx, df.attrs["run_center_y"] - cy) <= 0.5
    assert np.allclose(df["center_x"], df.attrs["run_center_x"])
    assert df.attrs["center_per_frame"] is False
