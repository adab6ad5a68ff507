"""Particle picking against ground truth: synthetic micrographs with particles, ice, aggregates and carbon."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.ndimage as ndi
import starfile
from scipy.optimize import linear_sum_assignment

from conveyor import backend
from conveyor.cli import main
from conveyor.io.mrc import read_mrc, write_mrc
from conveyor.spa.ctfmodel import ctf_2d
from conveyor.spa.extract import default_box_size
from conveyor.spa.pick import ScoreNoise, _log_on, _Prepared, auto_threshold, greedy_nms, pick_log, pick_template

PIXEL = 2.0  # Å/px
DIAMETER = 100.0  # Å -> 50 px, radius 25 px
MATCH = 0.2 * DIAMETER / PIXEL  # 10 px


def make_micrograph(seed=0, n=1024, contrast=0.05, dose=160.0, n_particles=70, n_ice=5, n_aggregates=2):
    """A 1024² micrograph (protein dark) with truth.

    Particles: 4 Gaussian blobs each (centre of mass at the particle centre), filtered by a
    weak CTF (1.5 µm underfocus, amplitude contrast 0.1, B 50 Å²), peak darkening
    ``contrast``. Junk: dark ice balls (amplitude, 25-45 % darker, 1.5-3 radii), aggregates
    (6 overlapping particles at 1.5× density) and a carbon film (12 % darker half plane).
    Poisson noise at ``dose`` counts/px. Returns ``(image, truth_xy, junk)``.
    """
    rng = np.random.default_rng(seed)
    r = DIAMETER / 2 / PIXEL
    edge = default_box_size(DIAMETER, PIXEL) / 2
    yy, xx = np.mgrid[:n, :n].astype(np.float32)
    theta = rng.uniform(0.2, 0.5) * np.pi
    nvec = np.array([np.cos(theta), np.sin(theta)])
    c0 = 0.585 * n * (abs(nvec[0]) + abs(nvec[1]))

    def side(x, y):  # signed distance to the carbon edge, > 0 on the carbon
        return x * nvec[0] + y * nvec[1] - c0

    ice, aggs = [], []
    for _ in range(n_ice):
        for _try in range(100):
            cx, cy = rng.uniform(edge + 30, n - edge - 30, 2)
            rad = rng.uniform(1.5, 3.0) * r
            if side(cx, cy) < -rad - 2 * r and all(np.hypot(cx - a, cy - b) > ra + rad + 2 * r for a, b, ra in ice):
                ice.append((cx, cy, rad))
                break
    for _ in range(n_aggregates):
        for _try in range(100):
            cx, cy = rng.uniform(edge + 30, n - edge - 30, 2)
            if side(cx, cy) < -4 * r and all(np.hypot(cx - a, cy - b) > ra + 4 * r for a, b, ra in ice + aggs):
                aggs.append((cx, cy, 1.2 * r))
                break
    parts = []
    for _try in range(20000):
        if len(parts) >= n_particles:
            break
        cx, cy = np.round(rng.uniform(edge + 2, n - edge - 3, 2))
        if side(cx, cy) > -1.5 * r:
            continue
        if any(np.hypot(cx - a, cy - b) < ra + 2.5 * r for a, b, ra in ice + aggs):
            continue
        if any(np.hypot(cx - a, cy - b) < 2.5 * r for a, b in parts):
            continue
        parts.append((float(cx), float(cy)))

    def density(centres, amp):
        d = np.zeros((n, n), np.float32)
        for cx, cy in centres:
            offs = rng.normal(0, 0.25 * r, (4, 2))
            w = rng.uniform(0.6, 1.0, 4) * amp
            sig = rng.uniform(0.35, 0.5, 4) * r
            mass = w * sig**2
            offs -= (mass[:, None] * offs).sum(0) / mass.sum()
            for (ox, oy), wi, s in zip(offs, w, sig):
                x0, y0 = cx + ox, cy + oy
                sl = (slice(max(int(y0 - 4 * s), 0), min(int(y0 + 4 * s) + 1, n)),
                      slice(max(int(x0 - 4 * s), 0), min(int(x0 + 4 * s) + 1, n)))
                d[sl] += wi * np.exp(-((xx[sl] - x0) ** 2 + (yy[sl] - y0) ** 2) / (2 * s * s))
        return d

    ctf = ctf_2d((n, n), PIXEL, 15000.0, 14250.0, 30.0, amplitude_contrast=0.1, bfactor=50.0, xp=np)

    def image_of(d):
        return np.real(np.fft.ifft2(np.fft.fft2(d) * ctf))

    dp = density(parts, 1.0)
    scale = abs(np.percentile(image_of(dp), 0.1))
    agg_centres = [(cx + dx, cy + dy) for cx, cy, _ in aggs for dx, dy in rng.normal(0, 0.5 * r, (6, 2))]
    img = 1.0 + contrast * image_of(dp + density(agg_centres, 1.5)) / scale
    for cx, cy, rad in ice:
        img *= 1.0 - rng.uniform(0.25, 0.45) / (1 + np.exp((np.hypot(xx - cx, yy - cy) - rad) / 3.0))
    img *= 1.0 - 0.12 / (1 + np.exp(-side(xx, yy) / 2.0))
    img = rng.poisson(np.maximum(img, 0) * dose).astype(np.float32)
    return img, np.array(parts), {"ice": ice, "aggregates": aggs, "carbon": side, "r": r}


def f1_score(picks_xy, truth_xy, radius):
    """(F1, precision, recall) with a one-to-one assignment within ``radius`` px."""
    picks_xy = np.asarray(picks_xy, float).reshape(-1, 2)
    truth_xy = np.asarray(truth_xy, float).reshape(-1, 2)
    tp = 0
    if len(picks_xy) and len(truth_xy):
        d = np.hypot(picks_xy[:, None, 0] - truth_xy[None, :, 0], picks_xy[:, None, 1] - truth_xy[None, :, 1])
        i, j = linear_sum_assignment(np.where(d <= radius, d, 1e6))
        tp = int((d[i, j] <= radius).sum())
    p = tp / max(len(picks_xy), 1)
    r = tp / max(len(truth_xy), 1)
    return (2 * p * r / (p + r) if p + r else 0.0), p, r


def junk_picked(picks_xy, junk):
    """Which junk objects got a pick: each ice ball, each aggregate, and the carbon edge (one object)."""
    xy = np.asarray(picks_xy, float).reshape(-1, 2)
    r = junk["r"]
    hits = []
    for cx, cy, rad in junk["ice"]:
        hits.append(bool(len(xy)) and np.hypot(xy[:, 0] - cx, xy[:, 1] - cy).min() < rad + 0.5 * r)
    for cx, cy, _ in junk["aggregates"]:
        hits.append(bool(len(xy)) and np.hypot(xy[:, 0] - cx, xy[:, 1] - cy).min() < 1.5 * r)
    hits.append(bool(len(xy)) and bool((junk["carbon"](xy[:, 0], xy[:, 1]) > -r).any()))
    return np.array(hits)


@pytest.fixture(scope="module")
def micrograph():
    return make_micrograph(seed=3)


def test_log_picks_particles_and_rejects_junk(micrograph):
    img, truth, junk = micrograph
    picks, details = pick_log(img, PIXEL, DIAMETER, return_details=True)
    xy = picks[["x", "y"]].to_numpy()
    f1, p, r = f1_score(xy, truth, MATCH)
    assert f1 >= 0.85, f"F1 {f1:.3f} (precision {p:.2f}, recall {r:.2f}, {len(xy)} picks, {len(truth)} particles)"
    hits = junk_picked(xy, junk)
    assert (~hits).mean() >= 0.8, f"junk picked: {hits.tolist()}"
    # the rejected candidates include the junk, with reasons
    reasons = set(details.candidates["status"]) - {"picked", "below_threshold"}
    assert reasons, "no candidate was rejected as junk"
    # picks respect the minimum distance and the edge exclusion
    d = np.hypot(*(xy[:, None, :] - xy[None, :, :]).transpose(2, 0, 1))
    np.fill_diagonal(d, np.inf)
    assert d.min() >= 0.8 * DIAMETER / PIXEL - 1e-6
    edge = default_box_size(DIAMETER, PIXEL) / 2
    assert xy.min() >= edge and xy.max() <= img.shape[0] - 1 - edge


def test_junk_filter_matters(micrograph):
    """Without the junk filter, ice balls, aggregates or the carbon edge are picked."""
    img, truth, junk = micrograph
    picks = pick_log(img, PIXEL, DIAMETER, junk=None)
    assert junk_picked(picks[["x", "y"]].to_numpy(), junk).sum() >= 3


def test_template_matching(micrograph):
    img, truth, junk = micrograph
    n = 64
    yy, xx = np.mgrid[:n, :n] - n // 2
    templates = np.stack([
        np.exp(-(xx**2 + yy**2) / (2 * 12.0**2)),
        np.exp(-((xx / 1.3) ** 2 + (yy * 1.2) ** 2) / (2 * 11.0**2)),
    ]).astype(np.float32)  # protein white, as class averages
    picks = pick_template(img, PIXEL, DIAMETER, templates, PIXEL, angle_step=30)
    xy = picks[["x", "y"]].to_numpy()
    f1, p, r = f1_score(xy, truth, MATCH)
    assert f1 >= 0.85, f"F1 {f1:.3f} (precision {p:.2f}, recall {r:.2f})"
    assert (~junk_picked(xy, junk)).mean() >= 0.8
    assert {"psi", "template"} <= set(picks.columns)


def test_coordinates_follow_relion_convention():
    """One dark blob in a non-square image: x is the column, y the row, origin at the corner."""
    rng = np.random.default_rng(1)
    ny, nx = 700, 1000
    yy, xx = np.mgrid[:ny, :nx]
    img = 160 * (1 - 0.2 * np.exp(-((xx - 612.0) ** 2 + (yy - 233.0) ** 2) / (2 * 12.0**2)))
    picks = pick_log(rng.poisson(img).astype(np.float32), PIXEL, DIAMETER)
    assert len(picks) == 1
    assert abs(picks.x[0] - 612.0) < 1.0 and abs(picks.y[0] - 233.0) < 1.0
    # the same blob bright, with dark_particles=False
    picks = pick_log(rng.poisson(320 - img).astype(np.float32), PIXEL, DIAMETER, dark_particles=False)
    assert len(picks) == 1 and abs(picks.x[0] - 612.0) < 1.0


def test_empty_micrograph_gives_almost_nothing():
    rng = np.random.default_rng(2)
    picks = pick_log(rng.poisson(160, (1024, 1024)).astype(np.float32), PIXEL, DIAMETER)
    assert len(picks) <= 5


def test_threshold_helpers():
    # candidates: 60 particles at 4-6 noise sd among the maxima of white noise over an area
    # where 50 noise maxima are expected above 1 sd (and ~0.1 above 4 sd)
    noise = ScoreNoise(sd=1.0, density=0.01, fields=1)
    area = 50 / float(noise.expected_maxima(1.0, 1.0))
    rng = np.random.default_rng(0)
    u = np.linspace(1.0, 6.0, 2001)
    n_above = noise.expected_maxima(u, area)
    noise_scores = np.interp(rng.uniform(0, n_above[0], 50), n_above[::-1], u[::-1])  # inverse of the tail count
    particles = rng.uniform(4.0, 6.0, 60)

    def expected(levels):
        return noise.expected_maxima(levels, area)

    t = auto_threshold(np.r_[noise_scores, particles], expected, rate=0.1)
    assert 2.5 < t <= 4.0, t
    picked = np.r_[noise_scores, particles] >= t
    assert picked[50:].all() and picked[:50].sum() <= 0.2 * picked.sum()  # ~10 % noise among the picks
    # noise alone: nothing qualifies, and the threshold sits above every candidate
    t0 = auto_threshold(noise_scores, expected, rate=0.1)
    assert t0 > noise_scores.max() and expected(t0) <= 0.1 + 1e-6
    # a single strong blob among noise maxima is a discovery on its own (with at most the
    # strongest noise maximum, here at ~4 sd where 0.14 are expected)
    assert np.sort(noise_scores)[-2] < auto_threshold(np.r_[noise_scores, 40.0], expected) <= 40.0
    keep = greedy_nms(np.array([[0, 0], [5, 0], [20, 0]]), np.array([1.0, 2.0, 0.5]), 10.0)
    assert keep.tolist() == [1, 2]


def test_noise_maxima_follow_random_field_count():
    """LoG maxima of white (Poisson) noise above u noise-sd: as many as the Euler-characteristic count."""
    rng = np.random.default_rng(0)
    img = rng.poisson(40.0, (2048, 2048)).astype(np.float32)
    prep = _Prepared(img, PIXEL, DIAMETER)
    score, noise = _log_on(prep, True)
    valid = np.asarray(prep.valid_mask(40.0))
    assert abs(score[valid].std() / noise.sd - 1.0) < 0.03  # the noise model's sd of the score
    peaks = (score >= ndi.maximum_filter(score, size=3, mode="nearest")) & valid
    u = score[peaks] / noise.sd
    for level, tol in ((2.5, 0.2), (3.0, 0.3)):
        expected = float(noise.expected_maxima(level, float(valid.sum())))
        observed = int((u >= level).sum())
        assert abs(observed / expected - 1.0) < tol, (level, observed, expected)


def test_cli_pick_writes_star_and_png(tmp_path, micrograph):
    img, truth, _ = micrograph
    mic = tmp_path / "mic.mrc"
    write_mrc(mic, img, PIXEL)
    star, png = tmp_path / "picks.star", tmp_path / "picks.png"
    assert main(["spa", "pick", str(mic), "--particle-diameter", str(DIAMETER), "--out-star", str(star), "--out-png", str(png)]) == 0
    df = starfile.read(star)
    assert list(df.columns[:4]) == ["rlnCoordinateX", "rlnCoordinateY", "rlnAutopickFigureOfMerit", "rlnMicrographName"]
    assert (df.rlnMicrographName == str(mic)).all()
    assert f1_score(df[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy(), truth, MATCH)[0] >= 0.85
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a threshold above everything: a valid, empty coordinate file
    assert main(["spa", "pick", str(mic), "--particle-diameter", str(DIAMETER), "--out-star", str(star), "--threshold", "1e9"]) == 0
    assert len(starfile.read(star)) == 0
    assert main(["spa", "pick", str(mic), "--particle-diameter", str(DIAMETER), "--out-star", str(star), "--threshold", "x"]) == 2
    assert main(["spa", "pick", str(mic), "--particle-diameter", str(DIAMETER), "--out-star", str(star), "--method", "template"]) == 2


def against_truth(picks, truth, shape, diameter, pixel_size):
    """(F1, precision, recall, fraction of junk objects picked) of picks against a simulator's truth table.

    Particles count when at least half an extraction box from the borders (the picker's
    edge exclusion); a junk object counts as picked when a pick lies within its radius.
    """
    edge = default_box_size(diameter, pixel_size) / 2
    x, y = truth.rlnCoordinateX, truth.rlnCoordinateY
    inside = (x >= edge) & (x <= shape[1] - 1 - edge) & (y >= edge) & (y <= shape[0] - 1 - edge)
    is_junk = truth.cvIsJunk.astype(int) == 1
    good = truth[~is_junk & inside][["rlnCoordinateX", "rlnCoordinateY"]].to_numpy(float)
    xy = picks[["x", "y"]].to_numpy(float)
    f1, p, r = f1_score(xy, good, 0.2 * diameter / pixel_size)
    junk = truth[is_junk][["rlnCoordinateX", "rlnCoordinateY", "cvRadius"]].to_numpy(float)
    hit = [bool(len(xy)) and np.hypot(xy[:, 0] - jx, xy[:, 1] - jy).min() < jr for jx, jy, jr in junk]
    return f1, p, r, (float(np.mean(hit)) if hit else 0.0)


def test_simulated_micrograph(tmp_path):
    """Sum of a simulated movie at twice the physical contrast: F1 >= 0.85 against the non-junk truth."""
    sim = pytest.importorskip("conveyor.simulate.spa")
    paths = sim.simulate_spa(
        tmp_path / "sim", micrographs=1, size=1024, frames=10, dose_per_frame=2.4, particles=40, seed=7,
        junk_fraction=0.2, drift_range=(0.5, 1.0), contrast=2.0, defocus_range=(12000.0, 20000.0),
    )
    movie, ps = read_mrc(paths["movies"][0])
    img = movie.astype(np.float32).sum(axis=0)
    picks = pick_log(img, ps, 150.0)
    f1, p, r, junk = against_truth(picks, starfile.read(paths["particles"]), img.shape, 150.0, ps)
    assert f1 >= 0.85, f"F1 {f1:.3f} (precision {p:.2f}, recall {r:.2f})"
    assert junk <= 0.2


@pytest.mark.parametrize("defocus", [9000.0, 15000.0, 22000.0])
def test_physical_contrast_at_several_defoci(tmp_path, defocus):
    """The simulator's physical defaults (contrast 1, 20 frames x 1.2 e/A^2, 1.5 A/px, 150 A D3
    particles, 10 % junk) at 0.9, 1.5 and 2.2 um underfocus: the dose-weighted sum aligned with
    the true frame shifts. The particles score only 3-7 noise sd here (F1 0.57 at 2.4 um with
    the former sigma = r/sqrt(5) and fixed 4-sd floor)."""
    from conveyor.simulate.spa import simulate_spa  # noqa: PLC0415
    from conveyor.spa.motion import apply_shifts_and_sum  # noqa: PLC0415

    paths = simulate_spa(tmp_path / "sim", micrographs=1, seed=0, defocus_range=(defocus, defocus + 500.0))
    movie, ps = read_mrc(paths["movies"][0])
    shifts = starfile.read(paths["shifts"]).sort_values("rlnMicrographFrameNumber")
    shifts = shifts[["rlnMicrographShiftX", "rlnMicrographShiftY"]].to_numpy(float)
    sums = apply_shifts_and_sum(movie.astype(np.float32), shifts, pixel_size=ps, dose_per_frame=1.2, want_plain=False)
    img = backend.to_host(sums.dose_weighted)
    picks = pick_log(img, ps, 150.0)
    f1, p, r, junk = against_truth(picks, starfile.read(paths["particles"]), img.shape, 150.0, ps)
    assert f1 >= 0.85, f"F1 {f1:.3f} (precision {p:.2f}, recall {r:.2f}, {len(picks)} picks)"
    assert junk <= 0.25, f"{junk:.0%} of the junk objects picked"


def test_physical_contrast_motion_corrected(tmp_path):
    """The SPA benchmark's movie (simulator defaults, seed 0: 2.4 um underfocus, 17 px of drift)
    through ``conveyor spa motion`` and ``conveyor spa pick``: F1 >= 0.85 on the dose-weighted sum."""
    from conveyor.simulate.spa import simulate_spa  # noqa: PLC0415

    paths = simulate_spa(tmp_path / "sim", micrographs=1, seed=0)
    mic, star = tmp_path / "mic.mrc", tmp_path / "picks.star"
    assert main(["spa", "motion", str(paths["movies"][0]), "--pixel-size", "1.5", "--dose-per-frame", "1.2",
                 "--out-sum", str(mic), "--out-shifts", str(tmp_path / "shifts.star")]) == 0
    assert main(["spa", "pick", str(mic), "--particle-diameter", "150", "--out-star", str(star)]) == 0
    df = starfile.read(star)
    picks = pd.DataFrame({"x": df.rlnCoordinateX, "y": df.rlnCoordinateY})
    img, ps = read_mrc(mic)
    f1, p, r, junk = against_truth(picks, starfile.read(paths["particles"]), img.shape, 150.0, ps)
    assert f1 >= 0.85, f"F1 {f1:.3f} (precision {p:.2f}, recall {r:.2f}, {len(picks)} picks)"
    assert junk <= 0.25, f"{junk:.0%} of the junk objects picked"


@pytest.mark.gpu
def test_log_on_gpu_matches_cpu(micrograph):
    img, truth, _ = micrograph
    cpu = pick_log(img, PIXEL, DIAMETER)
    gpu = pick_log(backend.asarray(img), PIXEL, DIAMETER)
    assert isinstance(gpu, pd.DataFrame)
    assert f1_score(gpu[["x", "y"]].to_numpy(), cpu[["x", "y"]].to_numpy(), 1.0)[0] > 0.97
