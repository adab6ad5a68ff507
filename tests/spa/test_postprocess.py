"""Post-processing: B-factor from the Guinier plot of maps blurred by a known B, the mask, the
corrected FSC, the sharpened map, the written files and the hand check."""

from __future__ import annotations

import math

import numpy as np
import pytest

from conveyor.errors import InputError
from conveyor.io.mrc import read_mrc
from conveyor.io.star import read_star
from conveyor.simulate.spa import make_model
from conveyor.spa.fsc import fsc, mirror_volume, resolution_at
from conveyor.spa.postprocess import auto_mask, fit_bfactor, postprocess, write_postprocess
from conveyor.spa.reconstruct import apply_bfactor, soft_sphere_mask

PIXEL = 2.0
BOX = 64
DIAMETER = 90.0
BLUR = 150.0  # Å², the known B-factor added to the map


@pytest.fixture(scope="module")
def model():
    return make_model(DIAMETER, "C1", np.random.default_rng(5))


@pytest.fixture(scope="module")
def truth(model):
    return model.volume(BOX, PIXEL)


@pytest.fixture(scope="module")
def halves(truth):
    """Half maps: the truth blurred by B = 150 Å² plus independent white noise."""
    rng = np.random.default_rng(0)
    blurred = apply_bfactor(truth, BLUR, PIXEL)
    sd = 0.5 * blurred.std()
    return (blurred + rng.normal(0, sd, truth.shape).astype(np.float32),
            blurred + rng.normal(0, sd, truth.shape).astype(np.float32))


def test_guinier_fit_recovers_a_known_blur(truth, model):
    mask = soft_sphere_mask(BOX, DIAMETER / 2 / PIXEL + 2, 4.0, np)
    b0, _, rng0, corr = fit_bfactor(truth * mask, PIXEL, high=6.0)
    assert rng0 == (10.0, 6.0) and corr < -0.95
    # the map's own B-factor is that of its Gaussian residues: 8π²σ² (RELION's sign is negative)
    sigma = max(model.sigma, 0.8 * PIXEL)
    assert -b0 == pytest.approx(8 * math.pi**2 * sigma**2, rel=0.3)
    for blur in (BLUR, 300.0):
        b1, _, _, _ = fit_bfactor(apply_bfactor(truth, blur, PIXEL) * mask, PIXEL, high=6.0)
        assert b0 - b1 == pytest.approx(blur, rel=0.3)
    # a map worse than the low end of the range gets no B-factor (as RELION)
    b, _, rng_none, _ = fit_bfactor(truth * mask, PIXEL, high=12.0)
    assert rng_none is None and b == 0.0


def test_postprocess_of_blurred_noisy_half_maps(truth, halves, tmp_path):
    res = postprocess(*halves, PIXEL, particle_diameter=DIAMETER)
    unmasked = resolution_at(res.curves["rlnFourierShellCorrelationUnmaskedMaps"], 0.143, PIXEL)
    assert 2 * PIXEL <= res.resolution <= unmasked  # the mask removes solvent noise
    # against the truth, inside the mask, the map from both halves agrees with the 0.143 estimate
    truth_res = resolution_at(fsc(res.average, truth, res.mask), 0.5, PIXEL)
    assert res.resolution == pytest.approx(truth_res, rel=0.2)
    # B-factor: sharpening (negative), about the map's own B plus the blur
    b_truth, _, _, _ = fit_bfactor(truth * res.mask, PIXEL, high=res.resolution)
    assert res.bfactor < 0 and res.map_bfactor == -res.bfactor
    assert res.map_bfactor == pytest.approx(-b_truth + BLUR, rel=0.3)
    assert res.fit_range == (10.0, pytest.approx(res.resolution))
    # the sharpened map is flatter than the average and no worse against the truth
    b_sharp, _, _, _ = fit_bfactor(res.sharpened * res.mask, PIXEL, high=res.resolution)
    assert abs(b_sharp) < 0.5 * res.map_bfactor
    assert resolution_at(fsc(res.sharpened, truth), 0.5, PIXEL) <= resolution_at(fsc(res.average, truth), 0.5, PIXEL) + 0.1
    # the mask covers the particle and not the box
    m = res.mask
    assert float((m * (truth > 0.2 * truth.max())).sum()) >= 0.99 * float((truth > 0.2 * truth.max()).sum())
    assert m.mean() < 0.4
    # outputs
    paths = write_postprocess(res, tmp_path, half1_name="h1.mrc", half2_name="h2.mrc")
    blocks = read_star(paths["star"])
    assert {"general", "fsc", "guinier"} <= set(blocks)
    assert blocks["general"]["rlnFinalResolution"].iloc[0] == pytest.approx(res.resolution, rel=1e-4)
    assert blocks["general"]["rlnBfactorUsedForSharpening"].iloc[0] == pytest.approx(res.bfactor, rel=1e-4)
    assert len(blocks["fsc"]) == BOX // 2 + 1
    vol, ps = read_mrc(paths["map"])
    assert ps == pytest.approx(PIXEL) and vol.shape == (BOX,) * 3
    for key in ("fsc_png", "slices_png"):
        assert paths[key].read_bytes()[:4] == b"\x89PNG"


def test_given_bfactor_and_mask(halves, truth):
    mask, thr = auto_mask(halves[0], PIXEL, particle_diameter=DIAMETER)
    assert 0.0 <= float(mask.min()) and float(mask.max()) == 1.0
    res = postprocess(*halves, PIXEL, mask=mask, bfactor=-100.0)
    assert res.bfactor == -100.0 and not res.bfactor_auto and not res.mask_auto
    with pytest.raises(InputError):
        postprocess(*halves, PIXEL, mask=mask[:-1])
    with pytest.raises(InputError):
        postprocess(*halves, PIXEL, bfactor="sharp")


def test_hand_against_a_reference(halves, truth):
    res = postprocess(*(mirror_volume(h) for h in halves), PIXEL, reference=truth, particle_diameter=DIAMETER)
    hand = res.hand
    assert hand["hand"] == "mirror"
    assert hand["resolution_mirror"] < hand["resolution_as_is"] - 1.0
