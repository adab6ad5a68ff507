"""FSC, resolution crossings, phase randomisation, mask correction, STAR/PNG output and map alignment."""

from __future__ import annotations

import numpy as np
import pytest

from conveyor.geometry import angular_distance, euler_to_matrix
from conveyor.simulate.spa import make_model
from conveyor.spa.fsc import (
    align_to_reference,
    corrected_fsc,
    first_shell_below,
    fsc,
    mirror_volume,
    phase_randomize,
    plot_fsc,
    read_fsc_star,
    resolution_at,
    shell_index_3d,
    write_fsc_star,
)
from conveyor.spa.projection import rotate_volume
from conveyor.spa.reconstruct import shell_filter, shift_volume, soft_sphere_mask

PIXEL = 5.0
BOX = 32


@pytest.fixture(scope="module")
def truth():
    return make_model(110.0, "C1", np.random.default_rng(3)).volume(BOX, PIXEL)


def shell_counts(n):
    sh = shell_index_3d(n, np)
    w = np.where(np.arange(n // 2 + 1) == 0, 1, 2)[None, None, :] * np.ones(sh.shape)
    w[..., -1] = 1
    return np.bincount(sh.ravel(), weights=w.ravel(), minlength=n // 2 + 1)[: n // 2 + 1]


def test_identical_maps_correlate_fully(truth):
    c = fsc(truth, truth)
    assert c.shape == (BOX // 2 + 1,)
    assert np.allclose(c, 1.0, atol=1e-5)
    assert resolution_at(c, 0.143, PIXEL) == pytest.approx(2 * PIXEL)  # never below: Nyquist


def test_independent_noise_does_not_correlate():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, BOX, BOX, BOX)).astype(np.float32)
    c = fsc(a, b)
    counts = shell_counts(BOX)
    # the spread of the FSC of independent noise is 1/sqrt(voxels in the shell)
    z = c[2:] * np.sqrt(counts[2:])
    assert np.abs(z).max() < 4.5
    assert abs(c[2:].mean()) < 0.03


def test_scale_invariance_and_partial_noise(truth):
    rng = np.random.default_rng(1)
    noise = rng.standard_normal(truth.shape).astype(np.float32) * truth.std() * 0.5
    c1 = fsc(truth + noise, truth)
    c2 = fsc(3.0 * (truth + noise), 0.2 * truth)
    assert np.allclose(c1, c2, atol=1e-5)
    assert c1[1] > 0.99 and c1[-1] < c1[1]


def test_resolution_crossing_is_interpolated():
    curve = np.clip(1.0 - np.arange(17) / 10.0, -1, 1)  # 1, 0.9, ... crosses 0.5 at shell 5, 0.143 at 8.57
    assert resolution_at(curve, 0.5, 2.0, box=32) == pytest.approx(32 * 2.0 / 5.0, rel=1e-6)
    # below-threshold shell 9 (0.1), previous 8 (0.2): 8 + (0.2-0.143)/0.1 = 8.57
    assert resolution_at(curve, 0.143, 2.0, box=32) == pytest.approx(64.0 / 8.57, rel=1e-6)
    assert first_shell_below(curve, 0.8) == 3


def test_phase_randomisation_beyond_a_shell(truth):
    shell = 6
    r = phase_randomize(truth, shell, rng=0)
    c = fsc(r, truth)
    assert np.all(c[:shell] > 0.999)
    assert np.abs(c[shell + 1:]).max() < 0.35
    assert abs(c[shell + 1:].mean()) < 0.1
    # amplitudes per shell unchanged
    fa, fb = np.abs(np.fft.rfftn(truth)), np.abs(np.fft.rfftn(r))
    sh = shell_index_3d(BOX, np)
    pa = np.bincount(sh.ravel(), weights=(fa**2).ravel())
    pb = np.bincount(sh.ravel(), weights=(fb**2).ravel())
    assert np.allclose(pa[: BOX // 2], pb[: BOX // 2], rtol=1e-3)


def test_mask_correction_removes_mask_induced_correlation(truth):
    """Half maps share signal only up to shell 6; a sharp mask spreads that correlation to high
    resolution (masked FSC > 0 there) and the phase-randomisation correction takes it out again."""
    rng = np.random.default_rng(2)
    mask = soft_sphere_mask(BOX, 7.0, 0.0, np)  # hard-edged mask
    cut = 6
    sig = shell_filter(truth, np.ones(cut + 1))
    sig = sig / sig.std()
    h1 = sig + 0.5 * rng.standard_normal(truth.shape).astype(np.float32)
    h2 = sig + 0.5 * rng.standard_normal(truth.shape).astype(np.float32)
    un = fsc(h1, h2)
    m = fsc(h1, h2, mask)
    shell = first_shell_below(un, 0.8)
    assert shell == cut + 1
    n = fsc(phase_randomize(h1, shell, 5) * mask, phase_randomize(h2, shell, 6) * mask)
    corr = corrected_fsc(m, n, shell)
    hi = slice(shell + 3, BOX // 2 + 1)
    assert abs(un[hi]).max() < 0.1  # no shared signal there
    assert m[hi].mean() > 0.6  # ... but the mask makes the maps correlate
    assert abs(corr[hi].mean()) < 0.12
    assert np.allclose(corr[: shell + 3], m[: shell + 3])


def test_fsc_star_round_trip_and_plot(tmp_path, truth):
    c = fsc(truth, truth + np.random.default_rng(0).standard_normal(truth.shape).astype(np.float32) * truth.std())
    path = tmp_path / "fsc.star"
    write_fsc_star(path, {"rlnFourierShellCorrelation": c, "rlnFourierShellCorrelationCorrected": c * 0.9}, BOX, PIXEL,
                   general={"rlnFinalResolution": 12.3})
    t = read_fsc_star(path)
    assert list(t["rlnSpectralIndex"]) == list(range(BOX // 2 + 1))
    assert np.allclose(t["rlnFourierShellCorrelation"], c, atol=1e-5)
    assert t["rlnAngstromResolution"].iloc[0] == pytest.approx(999.0)
    assert np.allclose(t["rlnAngstromResolution"].iloc[1:], 1.0 / t["rlnResolution"].iloc[1:], rtol=1e-4)
    assert t["rlnResolution"].iloc[-1] == pytest.approx(1.0 / (2 * PIXEL))
    png = tmp_path / "fsc.png"
    plot_fsc(png, {"a": c}, BOX, PIXEL, title="t")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_alignment_recovers_rotation_shift_and_hand(truth):
    rot = euler_to_matrix(40.0, 70.0, -120.0)
    moved = shift_volume(rotate_volume(truth, rot.T), (1.5, -2.0, 1.0))  # truth rotated by Rᵀ then shifted
    aligned, info = align_to_reference(moved, truth, PIXEL, resolution=15.0)
    assert angular_distance(info["rotation"], rot) < 3.0
    assert fsc(aligned, truth)[1:8].min() > 0.9
    # the mirror image of an asymmetric map fits at low resolution only
    m_aligned, m_info = align_to_reference(mirror_volume(moved), truth, PIXEL, resolution=15.0)
    assert m_info["cc"] < info["cc"]
    assert resolution_at(fsc(m_aligned, truth), 0.5, PIXEL) > 1.5 * resolution_at(fsc(aligned, truth), 0.5, PIXEL)
    assert np.array_equal(mirror_volume(mirror_volume(truth)), truth)
