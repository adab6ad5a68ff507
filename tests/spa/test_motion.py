"""Motion correction: drift and local deformation against known truth, dose weights, sums, CLI."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from conveyor import backend
from conveyor.cli import main
from conveyor.errors import InputError
from conveyor.io.mrc import read_mrc, write_mrc
from conveyor.io.star import read_star
from conveyor.spa import motion as M

N, SIZE = 16, 512


# ---------------------------------------------------------------------------------------
# synthetic movies with known motion
# ---------------------------------------------------------------------------------------


def drift(n, scale=1.0):
    """Smooth, sub-pixel whole-frame trajectory (px): fast at first, then slower (beam-induced)."""
    t = np.arange(n, dtype=float)
    dx = 6.0 * (1 - np.exp(-t / 4.0)) + 0.3 * t + 0.2 * np.sin(t / 2.0)
    dy = -4.0 * (1 - np.exp(-t / 5.0)) + 0.15 * t
    return scale * np.stack([dx, dy], axis=1)


def make_movie(size, n, shift_of, dose_px=1.5, contrast=0.15, seed=0, noise=True):
    """Poisson frames of a smooth random specimen whose content at (x, y) in frame t is displaced
    by ``shift_of(x, y, t)`` px (Conveyor's sign: frame_t(x) = specimen(x - shift))."""
    pad = 64
    rng = np.random.default_rng(seed)
    spec = ndimage.gaussian_filter(rng.standard_normal((size + 2 * pad, size + 2 * pad)), 2.0)
    coef = ndimage.spline_filter(spec / spec.std(), order=3)
    yy, xx = np.mgrid[0:size, 0:size].astype(float)
    frames = np.empty((n, size, size), np.float32)
    for t in range(n):
        dx, dy = shift_of(xx, yy, t)
        v = ndimage.map_coordinates(coef, [yy - dy + pad, xx - dx + pad], order=3, prefilter=False)
        lam = np.clip(dose_px * (1 + contrast * v), 0, None)
        frames[t] = rng.poisson(lam) if noise else lam
    return frames


def drift_rmse(est, true):
    """RMS distance (px) between two trajectories after removing their common offset."""
    e = np.asarray(est) - np.asarray(true)
    e = e - e.mean(axis=0)
    return float(np.sqrt(np.mean(np.sum(e**2, axis=-1))))


def band_power(img, lo=0.08, hi=0.25, noise=0.0):
    """Mean power |FFT|² of ``img`` between lo and hi cycles/px, minus ``noise``.

    For a sum of Poisson frames (dose-weighted or not: the weights keep the noise power) the
    shot-noise power is the total number of counts, whatever the alignment; subtracting it
    leaves the signal power.
    """
    img = backend.to_host(img)
    p = np.abs(np.fft.rfft2(img - img.mean())) ** 2
    k = np.sqrt(np.fft.fftfreq(img.shape[0])[:, None] ** 2 + np.fft.rfftfreq(img.shape[1])[None, :] ** 2)
    return float(p[(k >= lo) & (k < hi)].mean()) - float(noise)


TRUE = drift(N)


@pytest.fixture(scope="module")
def rigid():
    """512² x 16 frames, 1.5 e/px per frame, 10 % contrast, whole-frame drift only."""
    return make_movie(SIZE, N, lambda x, y, t: (TRUE[t, 0], TRUE[t, 1]), dose_px=1.5, contrast=0.1, seed=1)


AMP = 4.0


def deformed_shift(x, y, t):
    """Whole-frame drift plus a smooth local deformation growing linearly in time (up to ~5 px)."""
    xn, yn, tau = x / SIZE - 0.5, y / SIZE - 0.5, t / (N - 1)
    return (TRUE[t, 0] + AMP * tau * (2 * xn + 1.5 * yn * yn - 0.5 * xn * yn),
            TRUE[t, 1] + AMP * tau * (2 * yn - 1.0 * xn * xn))


@pytest.fixture(scope="module")
def deformed():
    return make_movie(SIZE, N, deformed_shift, dose_px=1.5, contrast=0.15, seed=2)


# ---------------------------------------------------------------------------------------
# (1) whole-frame drift
# ---------------------------------------------------------------------------------------


def test_whole_frame_drift_recovered(rigid):
    shifts, info = M.align_frames(rigid, pixel_size=1.0, return_info=True)
    assert shifts.shape == (N, 2)
    np.testing.assert_allclose(shifts[0], 0.0, atol=1e-12)  # frame 1 is the reference
    rmse = drift_rmse(shifts, TRUE)
    assert info["converged"]
    # the spec's bound is 0.5 px; at this dose and contrast ~0.1 px is reached
    assert rmse <= 0.25, rmse
    # the sign convention: content displacement, same as the truth (a sign flip gives ~10 px)
    assert np.corrcoef(shifts[:, 0], TRUE[:, 0])[0, 1] > 0.99


def test_smoothing_and_binning_keep_accuracy(rigid):
    smooth, info = M.align_frames(rigid, 1.0, smooth="auto", return_info=True)
    assert drift_rmse(smooth, TRUE) <= 0.25 and info["smooth"] >= 0
    binned = M.align_frames(rigid, 1.0, binning=4)  # alignment on a 4x smaller Fourier grid
    assert drift_rmse(binned, TRUE) <= 0.35


def test_grouped_alignment_converges(rigid):
    shifts, info = M.align_frames(rigid[:, :256, :256], 1.0, group=3, return_info=True)
    assert info["converged"] and drift_rmse(shifts, TRUE) <= 0.5


def test_large_drift_low_signal_does_not_run_away():
    true = drift(N, 3.0)  # ~35 px in total
    fr = make_movie(256, N, lambda x, y, t: (true[t, 0], true[t, 1]), dose_px=1.0, contrast=0.1, seed=3)
    assert drift_rmse(M.align_frames(fr, 1.0, smooth="auto"), true) <= 0.5


# ---------------------------------------------------------------------------------------
# (2) local deformation
# ---------------------------------------------------------------------------------------


def test_patch_model_reduces_error(deformed):
    res = M.correct_motion(deformed, 1.0, dose_per_frame=1.5, patches=(5, 5))
    model = res.local_model
    assert model is not None and model.use, model.reason
    gy, gx = np.mgrid[32:SIZE - 32:64, 32:SIZE - 32:64]
    gx, gy = gx.ravel().astype(float), gy.ravel().astype(float)
    true = np.stack([np.stack(deformed_shift(gx, gy, t), axis=-1) for t in range(N)])  # [n, G, 2]
    whole = np.broadcast_to(res.shifts[:, None], true.shape)
    local = whole + model.field(gx, gy)
    err_whole, err_local = drift_rmse(whole, true), drift_rmse(local, true)
    assert err_local <= 0.35 and err_local < 0.5 * err_whole, (err_local, err_whole)
    # the local sum is sharper than the whole-frame-only sum (signal power at 4-12 px periods)
    whole_sum = M.apply_shifts_and_sum(deformed, res.shifts).sum
    counts = float(deformed.sum())
    assert band_power(res.sum, noise=counts) > 1.1 * band_power(whole_sum, noise=counts)
    assert res.info["tile_spacing"] is not None


def test_no_local_model_without_local_motion(rigid):
    shifts = M.align_frames(rigid, 1.0)
    model = M.local_alignment(rigid, shifts, (5, 5), pixel_size=1.0)
    assert model.valid and not model.significant and not model.use
    assert "not significant" in model.reason


def test_tiled_sum_is_exact_for_rigid_motion():
    """The tile machinery of the local sum reproduces the exact Fourier-shifted sum (noise-free frames)."""
    fr = make_movie(256, 8, lambda x, y, t: (TRUE[t, 0], TRUE[t, 1]), seed=4, noise=False)
    shifts = TRUE[:8]
    zero = M.LocalModel(np.zeros((2, 18)), (256, 256), 8, np.zeros((1, 2)), np.zeros((8, 1, 2)),
                        np.ones((8, 1), bool))
    ref = M.apply_shifts_and_sum(fr, shifts, pixel_size=1.0, dose_per_frame=1.5)
    tiled = M.apply_shifts_and_sum(fr, shifts, zero, pixel_size=1.0, dose_per_frame=1.5, tile_spacing=48)
    inner = (slice(24, -24), slice(24, -24))  # the Fourier shift wraps at the edges, tiles repeat them
    for a, b in ((tiled.sum, ref.sum), (tiled.dose_weighted, ref.dose_weighted)):
        err = np.abs(a - b)[inner]
        assert err.max() < 0.01 * np.ptp(b), (err.max(), np.ptp(b))


def test_dose_weighted_sum_by_horner_equals_explicit_filters():
    """The Fourier-space sums (phase ramps, Horner's rule for the dose weights) equal the
    explicit sum of each frame's spectrum times its ramp and its Grant & Grigorieff filter."""
    rng = np.random.default_rng(6)
    n, ny, nx = 6, 48, 64
    fr = rng.poisson(3.0, (n, ny, nx)).astype(np.float32)
    shifts = rng.uniform(-3, 3, (n, 2))
    got = M.apply_shifts_and_sum(fr, shifts, pixel_size=1.2, dose_per_frame=2.0, pre_exposure=1.0, voltage=200)
    w = M.dose_weights((n, ny, nx), 1.2, 2.0, 200, pre_exposure=1.0).astype(np.float64)
    ky, kx = np.fft.fftfreq(ny)[:, None], np.fft.rfftfreq(nx)[None, :]
    spec = np.fft.rfft2(fr.astype(np.float64))
    ramp = np.exp(2j * np.pi * (kx[None] * shifts[:, 0, None, None] + ky[None] * shifts[:, 1, None, None]))
    want_plain = np.fft.irfft2((spec * ramp).sum(axis=0), s=(ny, nx))
    want_dw = np.fft.irfft2((spec * ramp * w).sum(axis=0), s=(ny, nx))
    np.testing.assert_allclose(got.sum, want_plain, atol=1e-3 * np.ptp(want_plain))
    np.testing.assert_allclose(got.dose_weighted, want_dw, atol=1e-3 * np.ptp(want_dw))


def test_local_cc_window_finds_the_same_peaks_as_the_full_map():
    """The coarse search evaluates the CC only at the lags within its radius; same peak as
    the inverse FFT of the whole map, and the true shift within the parabola's error."""
    grid = M._make_grid(100, 100, 204.0, 204.0, 1.5, 150.0, 6.7, np)  # local search: lag window
    wide = M._make_grid(100, 100, 204.0, 204.0, 1.5, 150.0, 100.0, np)  # whole map
    rng = np.random.default_rng(8)
    true = rng.uniform(-5, 5, (30, 2))
    ky, kx = np.asarray(grid.ky, float), np.asarray(grid.kx, float)
    phase = true[:, 1, None, None] * ky[None, :, None] + true[:, 0, None, None] * kx[None, None, :]
    cross = (np.exp(-2j * np.pi * phase) * np.asarray(grid.filt) ** 2).astype(np.complex64)
    local, full = M._coarse_peak(cross, grid, np), M._coarse_peak(cross, wide, np)
    np.testing.assert_allclose(local, full, atol=1e-4)
    assert np.abs(local - true).max() < 0.25 * max(grid.scale), np.abs(local - true).max()


def test_region_gather_clamps_edges_same_on_both_paths():
    fr = np.arange(3 * 20 * 30, dtype=np.float32).reshape(3, 20, 30)
    offsets = np.array([[[-3, 2], [0, 0], [5, -4]], [[1, 1], [-7, 9], [0, 0]]])  # [T, n, (dx, dy)]
    a = M._gather_tiles(fr, np.array([0, 12]), np.array([25, 0]), offsets, (10, 8), np, vectorized=False)
    b = M._gather_tiles(fr, np.array([0, 12]), np.array([25, 0]), offsets, (10, 8), np, vectorized=True)
    np.testing.assert_array_equal(a, b)
    # tile 0, frame 0 starts at row 0 + 2, column 25 - 3; columns beyond 29 repeat column 29
    np.testing.assert_array_equal(a[0, 0, 0], fr[0, 2, np.clip(np.arange(22, 30), 0, 29)])
    np.testing.assert_array_equal(a[1, 1, -1], fr[1, 19, np.arange(-7, 1).clip(0)])


# ---------------------------------------------------------------------------------------
# (3) dose weights
# ---------------------------------------------------------------------------------------


def test_critical_exposure_values():
    assert M.critical_exposure(0.25) == pytest.approx(0.245 * 4**1.665 + 2.81, rel=1e-9)
    assert M.voltage_factor(300) == pytest.approx(1.0)
    assert M.voltage_factor(200) == pytest.approx(0.80, abs=0.005)  # RELION / cisTEM factor
    assert np.isinf(M.critical_exposure(np.array([0.0]))[0])


def test_dose_weights_shape_and_monotonic():
    n, ny, nx = 10, 64, 96
    w = M.dose_weights((n, ny, nx), 1.0, 1.5, 300)
    q = M.dose_weights((n, ny, nx), 1.0, 1.5, 300, normalize=False)
    assert w.shape == q.shape == (n, ny, nx // 2 + 1) and w.dtype == np.float32
    np.testing.assert_allclose(w[:, 0, 0], 1.0, rtol=1e-6)  # k = 0: every frame counts fully
    line = q[:, 0, :]  # along kx, increasing frequency
    assert np.all(np.diff(line, axis=1) < 0) and np.all(np.diff(line, axis=0)[:, 1:] < 0)
    assert np.all(np.diff(w[:, 0, 1:], axis=0) < 0)  # later frames weigh less at every k > 0
    total = w[:, 0, :].sum(axis=0)  # the sum's signal transfer falls with frequency
    assert np.all(np.diff(total) < 0)
    np.testing.assert_allclose((w**2).sum(axis=0), n, rtol=1e-4)  # noise power of the plain sum kept
    assert M.dose_weights((n, ny, nx), 1.0, 1.5, 200, normalize=False)[-1, 0, 10] < line[-1, 10]
    assert M.dose_weights((n, ny, nx), 1.0, 1.5, 300, pre_exposure=5, normalize=False)[0, 0, 10] < line[0, 10]


def test_grant_grigorieff_filter_value():
    # frame 4 at 1.5 e/Å² per frame ends at 6 e/Å²; at 1/4 Å^-1 (pixel 1 Å, nx=64: index 16)
    q = M.dose_weights((4, 64, 64), 1.0, 1.5, 300, normalize=False)
    ne = 0.245 * 0.25**-1.665 + 2.81
    assert q[3, 0, 16] == pytest.approx(np.exp(-6.0 / (2 * ne)), rel=1e-5)


# ---------------------------------------------------------------------------------------
# (4) sums
# ---------------------------------------------------------------------------------------


def test_aligned_sum_sharper_than_unaligned(rigid):
    res = M.correct_motion(rigid, 1.0, dose_per_frame=1.5, patches=None)
    raw = rigid.sum(axis=0)
    counts = float(raw.sum())
    assert band_power(res.sum, noise=counts) > 1.5 * band_power(raw, noise=counts)
    # dose weighting keeps the mean and the shot-noise power (no signal left at 0.35-0.5 /px)
    # and, this specimen having no radiation damage, passes less signal than the plain sum
    dw = res.dose_weighted_sum
    assert float(dw.mean()) == pytest.approx(float(raw.mean()), rel=1e-4)
    assert band_power(dw, 0.35, 0.5) == pytest.approx(band_power(res.sum, 0.35, 0.5), rel=0.03)
    assert band_power(dw, noise=counts) < band_power(res.sum, noise=counts)
    assert res.sum.shape == res.dose_weighted_sum.shape == rigid.shape[1:]


def test_bad_inputs():
    with pytest.raises(InputError):
        M.align_frames(np.zeros((64, 64), np.float32), 1.0)
    with pytest.raises(InputError):
        M.align_frames(np.zeros((4, 64, 64), np.float32), 0.0)
    with pytest.raises(InputError):
        M.dose_weights((4, 32, 32), 1.0, -1.0)


# ---------------------------------------------------------------------------------------
# (5) CLI
# ---------------------------------------------------------------------------------------


@pytest.fixture
def tiny_movie(tmp_path):
    true = drift(8)
    fr = make_movie(192, 8, lambda x, y, t: (true[t, 0], true[t, 1]), dose_px=1.5 * 1.2**2, contrast=0.2, seed=5)
    path = tmp_path / "mov_001.mrcs"
    write_mrc(path, fr, 1.2, volume=False)
    return path, true


def test_cli_round_trip(tiny_movie, tmp_path, capsys):
    movie, true = tiny_movie
    out = tmp_path / "out"
    argv = ["spa", "motion", str(movie), "--out-sum", str(out / "m.mrc"), "--out-sum-nodw", str(out / "m_noDW.mrc"),
            "--out-shifts", str(out / "m.star"), "--out-plot", str(out / "m.png"), "--dose-per-frame", "1.5",
            "--patches", "3x3", "--frames", "8"]
    assert main(argv) == 0
    dw, ps = read_mrc(out / "m.mrc")
    nodw, _ = read_mrc(out / "m_noDW.mrc")
    assert dw.shape == nodw.shape == (192, 192) and ps == pytest.approx(1.2, abs=1e-4)
    star = read_star(out / "m.star")
    gen, glob = star["general"], star["global_shift"]
    assert int(gen["rlnImageSizeZ"].iloc[0]) == 8 and int(gen["rlnImageSizeX"].iloc[0]) == 192
    assert float(gen["rlnMicrographOriginalPixelSize"].iloc[0]) == pytest.approx(1.2)
    assert float(gen["rlnMicrographDoseRate"].iloc[0]) == pytest.approx(1.5)
    assert int(gen["rlnMotionModelVersion"].iloc[0]) in (0, 1)
    assert list(glob["rlnMicrographFrameNumber"]) == list(range(1, 9))
    est = glob[["rlnMicrographShiftX", "rlnMicrographShiftY"]].to_numpy()
    assert drift_rmse(est, true) <= 0.5
    assert "local_shift" in star and len(star["local_shift"]) == 8 * 9
    assert (out / "m.png").stat().st_size > 1000
    assert "drift" in capsys.readouterr().out
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_cli_wrong_frame_count(tiny_movie, tmp_path, capsys):
    movie, _ = tiny_movie
    out = tmp_path / "bad"
    argv = ["spa", "motion", str(movie), "--out-sum", str(out / "m.mrc"), "--out-sum-nodw", str(out / "n.mrc"),
            "--out-shifts", str(out / "m.star"), "--out-plot", str(out / "m.png"), "--dose-per-frame", "1.5",
            "--frames", "40"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("conveyor: error: ") and str(movie) in err and "40" in err and err.count("\n") == 1
    assert not out.exists() or not any(out.iterdir())


def test_cli_whole_frame_only(tiny_movie, tmp_path):
    movie, _ = tiny_movie
    out = tmp_path / "wf"
    assert main(["spa", "motion", str(movie), "--out-sum", str(out / "m.mrc"), "--out-shifts", str(out / "m.star"),
                 "--dose-per-frame", "1.5", "--patches", "0", "--pixel-size", "1.2"]) == 0
    star = read_star(out / "m.star")
    assert "local_shift" not in star and int(star["general"]["rlnMotionModelVersion"].iloc[0]) == 0


# ---------------------------------------------------------------------------------------
# (6) simulated movie with the simulator's truth
# ---------------------------------------------------------------------------------------


def _simulate(tmp_path, **params):
    sim = pytest.importorskip("conveyor.simulate.spa", reason="conveyor.simulate.spa is not available")
    out = tmp_path / "sim"
    paths = sim.simulate_spa(out, micrographs=1, frames=16, size=512, particles=10, junk_fraction=0.0, seed=7,
                             **params)
    movie = sorted((out / "movies").glob("mic_*.mrc"))[0]
    frames, ps = read_mrc(movie)
    truth = read_star(paths["shifts"])["shifts"]
    rows = truth[truth["rlnMicrographName"].astype(str).str.contains(movie.stem)]
    true = rows.sort_values("rlnMicrographFrameNumber")[["rlnMicrographShiftX", "rlnMicrographShiftY"]]
    mics = read_star(paths["micrographs"])["micrographs"]
    dose = float(mics["rlnMicrographDoseRate"].iloc[0])
    return sim, paths, frames.astype(np.float32), ps, dose, true.to_numpy(dtype=float)


def test_simulated_movie_drift(tmp_path):
    """512² x 16 frames of the SPA simulator (1.5 Å/px, 1.2 e/Å² per frame, protein in ice, CTF)."""
    _, _, frames, ps, dose, true = _simulate(tmp_path)
    res = M.correct_motion(frames, ps, dose_per_frame=dose, patches=None)
    assert drift_rmse(res.shifts, true) <= 0.5


def test_simulated_local_motion(tmp_path):
    """The simulator's local deformation (4 px at the last frame) is found with 3x3 patches."""
    sim, paths, frames, ps, dose, true = _simulate(tmp_path, local_motion=4.0)
    res = M.correct_motion(frames, ps, dose_per_frame=dose, patches=(3, 3))
    model = res.local_model
    assert model.use, model.reason
    coeffs = read_star(paths["local_motion"])["local_motion"].iloc[0]
    c = np.array([[coeffs[f"cvLocal{a}_{b}"] for b in ("u", "v", "uu", "uv", "vv")] for a in "XY"])
    n, size = frames.shape[0], frames.shape[1]
    pts = np.arange(48, size - 48, 64)
    gy, gx = (g.ravel() for g in np.meshgrid(pts, pts, indexing="ij"))
    field = np.stack([np.stack([d[gy, gx] for d in sim.local_deformation(c, (size, size), f / (n - 1))], -1)
                      for f in range(n)])  # [n, G, 2]
    truth = true[:, None, :] + field
    whole = np.broadcast_to(res.shifts[:, None], truth.shape)
    err_whole, err_local = drift_rmse(whole, truth), drift_rmse(whole + model.field(gx, gy), truth)
    assert err_local < 0.7 * err_whole and err_local <= 0.5, (err_local, err_whole)


# ---------------------------------------------------------------------------------------
# GPU: the same kernels on cupy arrays
# ---------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_gpu_matches_cpu(rigid):
    cp = pytest.importorskip("cupy")
    cpu = M.correct_motion(rigid, 1.0, dose_per_frame=1.5, patches=(5, 5))
    gpu = M.correct_motion(cp.asarray(rigid), 1.0, dose_per_frame=1.5, patches=(5, 5))
    assert isinstance(gpu.sum, cp.ndarray)
    assert drift_rmse(gpu.shifts, cpu.shifts) < 0.02
    np.testing.assert_allclose(cp.asnumpy(gpu.dose_weighted_sum), backend.to_host(cpu.dose_weighted_sum),
                               atol=1e-2 * float(np.ptp(cpu.dose_weighted_sum)))


def test_frames_read_on_demand_give_the_same_correction(deformed, tmp_path):
    """The motion correction of a movie opened lazily (MovieFrames: frames converted as they
    are read, the local sum's tiles included) equals that of the movie read whole."""
    from conveyor.io.movie import MovieFrames, open_movie
    from conveyor.io.mrc import write_mrc

    path = tmp_path / "deformed.mrcs"
    write_mrc(path, deformed, 1.0)
    lazy, _ = open_movie(path)
    assert isinstance(lazy, MovieFrames)
    whole = M.correct_motion(deformed, 1.0, dose_per_frame=1.5, patches=(5, 5))
    ondemand = M.correct_motion(lazy, 1.0, dose_per_frame=1.5, patches=(5, 5))
    assert whole.local_applied and ondemand.local_applied
    np.testing.assert_array_equal(ondemand.shifts, whole.shifts)
    np.testing.assert_array_equal(ondemand.sum, whole.sum)
    np.testing.assert_array_equal(ondemand.dose_weighted_sum, whole.dose_weighted_sum)
