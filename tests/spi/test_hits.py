"""Hit finding: per-frame counts, automatic threshold, F1 against ground truth."""

from __future__ import annotations

import numpy as np
import pytest

from conveyor.errors import InputError
from conveyor.spi import hits as hf
from conveyor.spi.frames import read_frames

from . import detector_mask, f1_score, make_frames, simulated


@pytest.fixture(scope="module")
def mixture():
    """300 frames: 70 % empty (background ~110 photons, +-15 % shot-to-shot), 30 % hits of
    40-100 nm spheres with 150-3000 signal photons on the good pixels (the weakest hits
    are ~7 sigma above the misses)."""
    rng = np.random.default_rng(20)
    n = 300
    is_hit = rng.random(n) < 0.3
    d = np.where(is_hit, rng.uniform(40, 100, n), np.nan)
    photons = np.where(is_hit, 10 ** rng.uniform(np.log10(150), np.log10(3000), n), 0.0)
    mask = detector_mask()
    bg = 0.003 * np.exp(0.15 * rng.standard_normal(n))
    data = np.empty((n,) + mask.shape, dtype=np.float32)
    for i in range(n):  # one frame at a time: each has its own background level
        data[i] = make_frames(rng, d[i:i + 1], photons[i:i + 1], background=bg[i], mask=mask, in_mask=True)[0][0]
    return data, mask, is_hit


def test_counts_are_photons_and_lit_pixels_inside_the_mask():
    data = np.zeros((2, 4, 5), dtype=np.float32)
    data[0, 1, 1] = 3
    data[0, 2, 3] = 1
    data[1, 0, 0] = 2  # masked
    mask = np.ones((4, 5), dtype=bool)
    mask[0, 0] = False
    photons, lit = hf.count_photons(data, mask)
    assert photons.tolist() == [4.0, 0.0]
    assert lit.tolist() == [2, 0]


def test_half_sample_mode_finds_the_misses_under_many_hits():
    rng = np.random.default_rng(1)
    misses = rng.poisson(100, 400)
    hits = rng.uniform(150, 5000, 600)  # 60 % hits, spread wide
    mode = hf.half_sample_mode(np.concatenate([misses, hits]))
    assert abs(mode - 100) < 5
    bg, sigma = hf.background_level(np.concatenate([misses, hits]))
    assert abs(bg - 100) < 3
    assert 8 < sigma < 13  # Poisson: 10


def test_auto_threshold_f1_on_synthetic_mixture(mixture):
    data, mask, truth = mixture
    res = hf.find_hits(data, mask)
    assert res.auto and res.metric == "photons"
    f1 = f1_score(res.is_hit, truth)
    assert f1 >= 0.98, f"F1 {f1:.3f}"
    # the threshold sits k sigma above the misses' photons
    miss = res.photons[~truth]
    assert res.threshold == pytest.approx(res.background + hf.K_SIGMA * res.sigma)
    assert abs(res.background - np.median(miss)) < 0.1 * np.median(miss)
    assert res.sigma == pytest.approx(np.std(miss), rel=0.35)
    assert np.all(res.score[res.is_hit] > hf.K_SIGMA)


def test_lit_pixels_metric_and_fixed_threshold(mixture):
    data, mask, truth = mixture
    lit = hf.find_hits(data, mask, metric="lit_pixels")
    assert f1_score(lit.is_hit, truth) >= 0.97
    fixed = hf.find_hits(data, mask, threshold=200.0)
    assert fixed.threshold == 200.0 and not fixed.auto
    assert np.array_equal(fixed.is_hit, fixed.photons > 200.0)
    strict = hf.find_hits(data, mask, min_photons=1000.0)
    assert np.all(strict.photons[strict.is_hit] >= 1000.0)
    assert strict.is_hit.sum() < fixed.is_hit.sum()


def test_annulus_excludes_the_beamstop_edge(mixture):
    data, mask, _ = mixture
    full = hf.find_hits(data[:20], mask)
    ring = hf.find_hits(data[:20], mask, center=(101.3, 98.6), rmin=40, rmax=90)
    assert np.all(ring.photons <= full.photons)
    with pytest.raises(InputError):
        hf.find_hits(data[:2], mask, rmin=40)


def test_hits_on_simulated_shots_against_truth(tmp_path_factory, tmp_path):
    from conveyor.cli import main

    paths, truth = simulated(tmp_path_factory)
    shots = paths["shots"][0]
    out = tmp_path / "hits.h5"
    assert main(["spi", "hits", str(shots), "--out", str(out)]) == 0
    df = read_frames(out)
    assert list(df.columns[:5]) == ["frame", "photons", "lit_pixels", "hit_score", "is_hit"]
    assert df.attrs["run"] == shots.stem and df.attrs["hit_threshold_auto"] is True
    t = truth[truth.file == shots.name].sort_values("frame")
    assert np.array_equal(df["frame"].to_numpy(), t["frame"].to_numpy())
    assert np.array_equal(df["photons"].to_numpy(), t["photons"].to_numpy())  # no pixel is lost or counted twice
    f1 = f1_score(df["is_hit"], t["is_hit"].astype(bool))
    assert f1 >= 0.98, f"F1 {f1:.3f}"


def test_cli_rejects_a_bad_threshold(tmp_path_factory, tmp_path, capsys):
    from conveyor.cli import main

    paths, _ = simulated(tmp_path_factory)
    assert main(["spi", "hits", str(paths["shots"][0]), "--out", str(tmp_path / "h.h5"), "--threshold", "lots"]) == 2
    assert "--threshold" in capsys.readouterr().err
