"""XFEL SPI simulator and detector geometry against physics and the written ground truth."""

from __future__ import annotations

import csv
import json

import mrcfile
import numpy as np
import pytest
from scipy.ndimage import map_coordinates, uniform_filter1d
from scipy.optimize import minimize
from scipy.signal import argrelmin

from conveyor.cli import main
from conveyor.io.cxi import read_cxi
from conveyor.simulate.spi import (
    FRAME_COLUMNS,
    noise_free_pattern,
    quaternion_to_matrix,
    random_quaternions,
    reference_particle,
    simulate_spi,
    sphere_form_factor,
    sphere_minima_q,
)
from conveyor.spi.detector import (
    DetectorGeometry,
    detector_mask,
    pixel_to_q,
    q_to_pixel,
    q_to_radius,
    radius_to_q,
)

SMALL = dict(n_files=2, frames_per_file=6, detector=32, seed=11)


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    """Default PR772-like geometry, 2 files x 20 frames."""
    out = tmp_path_factory.mktemp("spi")
    paths = simulate_spi(out, n_files=2, frames_per_file=20, seed=3)
    rows = list(csv.DictReader(open(paths["frames_csv"])))
    geo = json.loads(paths["geometry"].read_text())
    geom = DetectorGeometry.from_energy(tuple(geo["detector_shape"]), geo["pixel_size_m"], geo["distance_m"], geo["photon_energy_J"], geo["beam_center_px"])
    shots = {p.name: read_cxi(p) for p in paths["shots"]}
    return paths, rows, geo, geom, shots


def _frame(sim, row):
    return sim[4][row["file"]].data[int(row["frame"])]


# -- detector geometry ------------------------------------------------------------------
def test_q_vectors_lie_on_the_ewald_sphere():
    geom = DetectorGeometry.from_energy((40, 50), 300e-6, 0.3, 1600 * 1.602176634e-19, (20.3, 18.9))
    q = geom.q_vectors(xp=np)
    k_in = np.array([0.0, 0.0, 1.0 / geom.wavelength_m])
    assert np.allclose(np.linalg.norm(q + k_in, axis=-1) * geom.wavelength_m, 1.0, atol=1e-12)
    r = geom.radius_px(xp=np)
    assert np.allclose(np.linalg.norm(q, axis=-1), radius_to_q(r, 300e-6, 0.3, geom.wavelength_m), rtol=1e-9)
    assert np.allclose(q_to_radius(radius_to_q(r, 300e-6, 0.3, geom.wavelength_m), 300e-6, 0.3, geom.wavelength_m), r, atol=1e-9)
    x, y = q_to_pixel(q, geom)
    assert np.allclose(x, np.arange(50)[None, :]) and np.allclose(y, np.arange(40)[:, None])
    assert np.allclose(pixel_to_q(np.array([7.25]), np.array([3.5]), geom, xp=np), geom.with_center((20.3 - 7.25, 18.9 - 3.5)).q_vectors(xp=np)[0, 0])
    # curvature: q_z = -|q|² λ / 2 exactly on the sphere (not the small-angle 0)
    assert np.allclose(q[..., 2], -np.sum(q**2, -1) * geom.wavelength_m / 2, rtol=1e-9)
    # solid angle of a pixel at the centre = p²/D², polarisation 1 along y, cos²-like along x
    assert geom.solid_angle(xp=np)[19, 20] == pytest.approx((300e-6 / 0.3) ** 2, rel=1e-5)
    pol = geom.polarization(xp=np)
    assert pol[19, 20] == pytest.approx(1.0, abs=1e-5) and pol[19, 0] < pol[0, 20]


def test_mask_beamstop_and_gap():
    good, bits = detector_mask((64, 64), (33.2, 30.6), beamstop_radius_px=6, gap_px=3, return_bits=True, xp=np)
    assert good[31, 33] == 0 and bits[31, 33] & 0x10
    assert good[31, 40] == 0 and bits[31, 40] & 0x200  # row 31 is inside the 3-row gap around 31.5
    assert good[10, 10] == 1 and bits[10, 10] == 0
    assert np.array_equal(good == 1, bits == 0)


def test_sphere_form_factor_zeros():
    r = 35e-9
    assert float(sphere_form_factor(np.array([0.0]), r)[0]) == pytest.approx(1.0)
    qz = sphere_minima_q(r, 12)
    assert np.all(sphere_form_factor(qz, r) < 1e-12)
    assert np.all(np.diff(qz) > 0)


# -- the data set -------------------------------------------------------------------------
def test_deterministic_with_seed(tmp_path):
    a = simulate_spi(tmp_path / "a", **SMALL)
    b = simulate_spi(tmp_path / "b", **SMALL)
    c = simulate_spi(tmp_path / "c", **{**SMALL, "seed": 12})
    for pa, pb in zip(a["shots"], b["shots"]):
        assert np.array_equal(read_cxi(pa).data, read_cxi(pb).data)
    assert a["frames_csv"].read_text() == b["frames_csv"].read_text()
    assert a["particles_csv"].read_text() == b["particles_csv"].read_text()
    assert a["frames_csv"].read_text() != c["frames_csv"].read_text()
    assert not np.array_equal(read_cxi(a["shots"][0]).data, read_cxi(c["shots"][0]).data)


def test_counts_match_requested_fractions(sim):
    paths, rows, *_ = sim
    assert list(rows[0]) == FRAME_COLUMNS
    n = len(rows)
    hits = [r for r in rows if r["is_hit"] == "1"]
    multi = [r for r in hits if int(r["n_particles"]) > 1]
    singles = [r for r in hits if r["is_single"] == "1"]
    wrong = [r for r in singles if r["is_wrong_size"] == "1"]
    assert n == 40 and len(hits) == round(0.5 * n)
    assert len(multi) == round(0.05 * len(hits)) and all(int(r["n_particles"]) in (2, 3) for r in multi)
    assert len(singles) + len(multi) == len(hits)
    assert len(wrong) == round(0.1 * len(singles))
    assert all(abs(float(r["diameter_nm"]) - 50) < 3 for r in wrong)
    assert all(r["n_particles"] == "0" and r["quat_w"] == "" for r in rows if r["is_hit"] == "0")
    truth = json.loads(paths["truth"].read_text())
    assert truth["counts"]["hits"] == len(hits) and truth["counts"]["empty"] == n - len(hits)
    particles = list(csv.DictReader(open(paths["particles_csv"])))
    assert len(particles) == sum(int(r["n_particles"]) for r in rows)


def test_photons_are_counts_and_masked_pixels_zero(sim):
    paths, rows, geo, geom, shots = sim
    for s in shots.values():
        assert s.data.dtype.kind == "i" and s.data.min() >= 0
        assert not s.data[:, s.mask == 0].any()
        assert s.beam_center_px == pytest.approx(tuple(geo["beam_center_px"]))
        assert s.distance_m == pytest.approx(0.3) and s.photon_energy_eV == pytest.approx(1600)
    for r in rows:
        assert int(r["photons"]) == int(_frame(sim, r).sum())
    hit = np.array([int(r["photons"]) for r in rows if r["is_hit"] == "1"])
    empty = np.array([int(r["photons"]) for r in rows if r["is_hit"] == "0"])
    assert 1e3 < np.median(hit) < 1e5  # realistic photons per hit
    assert np.median(empty) < 0.05 * np.median(hit)
    # the first fringe minimum of a 70 nm particle falls inside the beamstop (as in PR772)
    first_min_px = q_to_radius(sphere_minima_q(35e-9, 1)[0], geo["pixel_size_m"], geo["distance_m"], geom.wavelength_m)
    assert first_min_px < geo["beamstop_radius_px"]


def test_radial_minima_match_sphere_of_truth_diameter(sim):
    """Local minima of a single hit's radial profile sit at the sphere zeros of its diameter."""
    paths, rows, geo, geom, shots = sim
    q = geom.q_magnitude(xp=np)
    dq = geom.q_per_pixel
    qbin = np.rint(q / dq).astype(int)
    singles = [r for r in rows if r["is_single"] == "1" and r["is_wrong_size"] == "0"]
    checked = 0
    for r in sorted(singles, key=lambda r: -int(r["photons"]))[:4]:
        img = _frame(sim, r).astype(float)
        good = shots[r["file"]].mask.astype(bool)
        cnt = np.bincount(qbin[good], minlength=qbin.max() + 1)
        prof = np.bincount(qbin[good], weights=img[good], minlength=qbin.max() + 1) / np.maximum(cnt, 1)
        prof = uniform_filter1d(prof, 3)
        found = [m for m in argrelmin(prof, order=3)[0] if geo["beamstop_radius_px"] + 2 <= m <= 60]
        pred = sphere_minima_q(float(r["diameter_nm"]) / 2 * 1e-9, 8) / dq
        assert len(found) >= 3
        for m in found:
            nearest = pred[np.argmin(abs(pred - m))]
            assert abs(m - nearest) / nearest < 0.045, (r, found, pred)
        checked += 1
    assert checked == 4


def test_truth_orientation_reproduces_the_frame(sim):
    """The frame's expected signal from the truth quaternion matches the CSV and the data."""
    paths, rows, geo, geom, shots = sim
    truth = json.loads(paths["truth"].read_text())
    ref = reference_particle(geom, truth["parameters"]["diameter_nm"], mask=shots[rows[0]["file"]].mask, max_scale=1.1, xp=np)
    r = max((r for r in rows if r["is_single"] == "1"), key=lambda r: int(r["photons"]))
    good = shots[r["file"]].mask.astype(bool)
    quat = [float(r[k]) for k in ("quat_w", "quat_x", "quat_y", "quat_z")]
    model = noise_free_pattern(ref, geom, quat, scale=float(r["diameter_nm"]) / 70.0, fluence_ph_um2=float(r["fluence_ph_um2"]), xp=np)
    assert model[good].sum() == pytest.approx(float(r["signal_photons_expected"]), rel=0.02)
    img = _frame(sim, r).astype(float)
    rng = np.random.default_rng(0)
    c_true = np.corrcoef(img[good], model[good])[0, 1]
    assert c_true > 0.9
    # the capsid is nearly round, so other orientations correlate well too, but less
    for q in random_quaternions(5, rng):
        other = noise_free_pattern(ref, geom, q, scale=float(r["diameter_nm"]) / 70.0, xp=np)
        assert c_true > np.corrcoef(img[good], other[good])[0, 1]


def test_beam_centre_is_the_friedel_centre(sim):
    """The truth beam centre is where a noise-free pattern is centrosymmetric."""
    paths, rows, geo, geom, shots = sim
    ref = reference_particle(geom, 70.0, xp=np)
    quat = random_quaternions(1, np.random.default_rng(5))[0]
    img = np.log(noise_free_pattern(ref, geom, quat, xp=np) + 1e-3)
    ny, nx = img.shape
    yy, xx = np.mgrid[0:ny, 0:nx].astype(float)
    cx0, cy0 = (nx - 1) / 2.0, (ny - 1) / 2.0
    roi = (np.hypot(xx - cx0, yy - cy0) > 8) & (np.hypot(xx - cx0, yy - cy0) < 45)

    def cost(c):
        inv = map_coordinates(img, [2 * c[1] - yy[roi], 2 * c[0] - xx[roi]], order=3, mode="nearest")
        return float(np.mean((img[roi] - inv) ** 2))

    grid = [(cost((cx0 + dx, cy0 + dy)), (cx0 + dx, cy0 + dy)) for dx in np.arange(-3, 3.01, 0.5) for dy in np.arange(-3, 3.01, 0.5)]
    start = min(grid)[1]
    res = minimize(cost, start, method="Nelder-Mead", options={"xatol": 0.01, "fatol": 1e-9})
    assert res.x == pytest.approx(geo["beam_center_px"], abs=0.15)
    assert np.hypot(*(np.array(geo["beam_center_px"]) - [cx0, cy0])) > 1.0  # the offset is real


def test_truth_volumes(sim):
    paths, rows, geo, geom, shots = sim
    truth = json.loads(paths["truth"].read_text())
    with mrcfile.open(paths["density"]) as m:
        dens, vox = np.array(m.data), float(m.voxel_size.x)
    assert vox == pytest.approx(truth["object"]["density_voxel_A"], rel=1e-5)
    electrons = dens.sum() * vox**3
    assert electrons == pytest.approx(truth["object"]["electrons"], rel=1e-4)
    # ~0.43 e/Å³ over the volume-equivalent sphere
    vol_A3 = 4 / 3 * np.pi * (truth["object"]["volume_equivalent_diameter_nm"] * 5) ** 3
    assert 0.38 < electrons / vol_A3 < 0.48
    # density symmetry: icosahedral 5-fold axis through a vertex maps the map onto itself
    with mrcfile.open(paths["intensity"]) as m:
        inten, dq = np.array(m.data), float(m.voxel_size.x)
    info = truth["intensity"]
    assert dq == pytest.approx(info["voxel_q_per_A"], rel=1e-5)
    assert info["voxel_q_per_m"] == pytest.approx(geom.q_per_pixel)
    c = info["center_index"]
    assert inten.shape == (info["grid"],) * 3
    assert inten[c, c, c] == pytest.approx(electrons**2, rel=0.02)  # |F(0)|² = N_e²
    k = 20
    assert inten[c + k, c, c] == pytest.approx(inten[c - k, c, c], rel=0.02)  # Friedel
    # the truth volume's spherical shell average has the sphere zeros of the diameter
    zz, yy, xx = np.indices(inten.shape) - c
    rr = np.rint(np.sqrt(xx**2 + yy**2 + zz**2)).astype(int)
    prof = np.bincount(rr.ravel(), inten.ravel()) / np.bincount(rr.ravel())
    mins = [m for m in argrelmin(prof[: c - 1], order=3)[0] if m > 5]
    pred = sphere_minima_q(35e-9, 5) / info["voxel_q_per_m"]
    assert np.allclose(mins[:5], pred, rtol=0.04)


def test_symmetry_of_the_capsid(sim):
    """The non-spherical part of the density has the icosahedral 2-, 3- and 5-fold axes."""
    paths, *_ = sim
    with mrcfile.open(paths["density"]) as m:
        dens = np.array(m.data, dtype=float)
    c = dens.shape[0] // 2
    zz, yy, xx = np.indices(dens.shape) - c
    pts = np.stack([xx, yy, zz], -1).reshape(-1, 3).astype(float)
    rr = np.rint(np.sqrt((pts**2).sum(1))).astype(int)
    res = dens - (np.bincount(rr, dens.ravel()) / np.bincount(rr))[rr].reshape(dens.shape)
    inside = (rr < c - 3).reshape(dens.shape)

    def corr(axis, angle):
        a = np.asarray(axis, float) / np.linalg.norm(axis)
        src = pts @ quaternion_to_matrix(np.r_[np.cos(angle / 2), np.sin(angle / 2) * a])  # R^T p
        moved = map_coordinates(res, [src[:, 2] + c, src[:, 1] + c, src[:, 0] + c], order=1).reshape(res.shape)
        return np.corrcoef(moved[inside], res[inside])[0, 1]

    phi = (1 + 5**0.5) / 2
    assert corr((1, 1, 1), 2 * np.pi / 3) > 0.999  # 3-fold (maps the grid onto itself)
    assert corr((0, 0, 1), np.pi) > 0.999  # 2-fold
    assert corr((1, 1, 0), np.pi) < 0.6  # not a symmetry axis
    five = corr((0, 1, phi), 2 * np.pi / 5)  # 5-fold through a vertex (interpolated)
    assert five > corr((0, 1, phi), 0.6) + 0.15


def test_cli_and_experiment_config(tmp_path, capsys):
    import yaml

    out = tmp_path / "cli"
    assert main(["simulate", "spi", "--out", str(out), "--files", "1", "--frames-per-file", "4", "--detector", "32",
                 "--photons-per-hit", "3000", "--center-offset-px", "0.7", "--seed", "2"]) == 0
    assert "wrote 1 CXI files" in capsys.readouterr().out
    cfg = yaml.safe_load((out / "experiment.yaml").read_text())
    assert cfg["spi"]["photon_energy_ev"] == 1600 and cfg["spi"]["detector_distance_m"] == 0.3
    assert cfg["spi"]["pixel_size_m"] == pytest.approx(300e-6)
    assert cfg["spi"]["shots"].endswith("shots/*.cxi")
    geo = json.loads((out / "truth" / "geometry.json").read_text())
    assert geo["beam_center_px"] == pytest.approx([15.5 + 0.7, 15.5 - 0.35])
    truth = json.loads((out / "truth" / "truth.json").read_text())
    assert truth["fluence"]["peak_ph_per_um2"] > 0
    assert main(["simulate", "spi", "--out", str(tmp_path / "x"), "--hit-fraction", "1.5"]) == 2
