"""CTF estimation (conveyor.spa.ctf): defocus, astigmatism, phase shift and fit resolution
against micrographs made with a known CTF, and the ``conveyor spa ctf`` command."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from conveyor import backend
from conveyor.cli import main
from conveyor.io.mrc import read_mrc, write_mrc
from conveyor.io.star import read_star
from conveyor.spa.ctf import CTFResult, _Geom, _Optics, ctf_diagnostic_image, estimate_ctf, power_spectrum
from conveyor.spa.ctfmodel import ctf_2d, ctf_at, frequency_grid

STAR_COLUMNS = [
    "rlnMicrographName",
    "rlnDefocusU",
    "rlnDefocusV",
    "rlnDefocusAngle",
    "rlnPhaseShift",
    "rlnCtfFigureOfMerit",
    "rlnCtfMaxResolution",
    "rlnCtfAstigmatism",
    "rlnVoltage",
    "rlnSphericalAberration",
    "rlnAmplitudeContrast",
    "rlnMicrographPixelSize",
]


def synthetic_micrograph(shape, pixel_size, u, v, angle, *, snr=0.05, bfactor=60.0, phase_shift=0.0, seed=0):
    """An amorphous specimen (white noise) imaged with a known CTF, plus detector noise.

    ``snr`` is the variance ratio of the CTF-filtered specimen to the noise. The noise is
    white plus a strong low-frequency component (a sloping background like a real
    spectrum's), and the whole image goes through a sinc detector MTF.
    """
    rng = np.random.default_rng(seed)
    ctf = ctf_2d(shape, pixel_size, u, v, angle, phase_shift=phase_shift, bfactor=bfactor, xp=np)
    signal = np.fft.ifft2(np.fft.fft2(rng.standard_normal(shape)) * ctf).real
    kx, ky = frequency_grid(shape, pixel_size, xp=np)
    k = np.hypot(kx, ky)
    low = np.fft.ifft2(np.fft.fft2(rng.standard_normal(shape)) / (1.0 + (k / 0.05) ** 2)).real
    noise = rng.standard_normal(shape) + 2.0 * low / low.std()
    image = np.sqrt(snr) * signal / signal.std() + noise / noise.std()
    mtf = np.sinc(kx * pixel_size) * np.sinc(ky * pixel_size)
    return np.fft.ifft2(np.fft.fft2(image) * mtf).real.astype(np.float32)


def angle_error(a, b):
    """Difference of two astigmatism angles modulo 180°, in [0, 90]."""
    return abs((a - b + 90.0) % 180.0 - 90.0)


def test_fit_model_is_ctfmodel():
    """The fitting code's fast CTF² and phase are conveyor.spa.ctfmodel's CTF."""
    kx, ky = frequency_grid((128, 128), 1.3, xp=np, rfft=True)
    g = _Geom(kx, ky)
    optics = _Optics(300.0, 2.7, 0.07)
    for u, v, ang, ph in [(15000, 13000, 37.0, 0.0), (8000, 8000, 0.0, 0.0), (20000, 19000, -70.0, 60.0)]:
        ref = ctf_at(kx, ky, u, v, ang, 300.0, 2.7, 0.07, ph)
        np.testing.assert_allclose(optics.ctf2(g, u, v, ang, ph), ref**2, atol=1e-9)
        h = 0.5 * (u - v)
        psi = optics.psi(g, 0.5 * (u + v), h * np.cos(np.radians(2 * ang)), h * np.sin(np.radians(2 * ang)), ph)
        np.testing.assert_allclose(-np.sin(psi), ref, atol=1e-9)


def test_power_spectrum_layout_and_scale():
    """Centred layout: a plane wave appears at its frequency; white noise of variance σ² gives σ²."""
    n, tile = 1024, 256
    y, x = np.mgrid[0:n, 0:n]
    fx, fy = 32 / tile, -16 / tile  # cycles/px
    ps = power_spectrum(np.cos(2 * np.pi * (fx * x + fy * y)).astype(np.float32), tile=tile)
    assert ps.shape == (tile, tile)
    peaks = {tuple(int(i) for i in np.unravel_index(j, ps.shape)) for j in np.argsort(ps.ravel())[-2:]}
    c = tile // 2
    assert peaks == {(c - 16, c + 32), (c + 16, c - 32)}
    noise = 2.0 * np.random.default_rng(3).standard_normal((n, n)).astype(np.float32)
    ps = power_spectrum(noise, tile=tile)
    ring = ps[c - 100 : c + 100, c - 100 : c + 100]
    assert ring.mean() == pytest.approx(4.0, rel=0.03)
    np.testing.assert_allclose(ps[c + 5, c + 9], ps[c - 5, c - 9], rtol=1e-6)  # Friedel symmetry


CASES = [  # (defocus U, V, angle) in Å, Å, degrees
    (8000, 8000, 0),
    (8000, 7000, 30),
    (15000, 15000, 0),
    (15500, 14500, -60),
    (25000, 25000, 0),
    (25500, 24500, 75),
    (9500, 6500, -20),
]


def test_defocus_and_astigmatism_accuracy():
    """Median |defocus error| ≤ 2 % (every fit ≤ 3 %); angle within 10° where |U−V| ≥ 500 Å."""
    errors = []
    for i, (u, v, ang) in enumerate(CASES):
        pixel_size = (1.0, 1.4)[i % 2]
        img = synthetic_micrograph((1024, 1024), pixel_size, u, v, ang, seed=11 + i)
        r = estimate_ctf(img, pixel_size)
        assert r.defocus_u >= r.defocus_v
        assert -90.0 < r.defocus_angle <= 90.0
        err = [abs(r.defocus_u - u) / u, abs(r.defocus_v - v) / v]
        errors += err
        assert max(err) <= 0.03, (pixel_size, u, v, ang, r)
        if u - v >= 500:
            assert angle_error(r.defocus_angle, ang) <= 10.0, (pixel_size, u, v, ang, r)
        assert r.astigmatism == pytest.approx(r.defocus_u - r.defocus_v)
    assert np.median(errors) <= 0.02


def test_fit_resolution_follows_the_envelope():
    """Finite, between Nyquist and the low-resolution limit, and worse for a stronger envelope."""
    pixel_size = 1.2
    res = {}
    for bfactor in (30.0, 400.0):
        img = synthetic_micrograph((1024, 1024), pixel_size, 15000, 14000, 30, snr=0.1, bfactor=bfactor, seed=5)
        r = estimate_ctf(img, pixel_size)
        assert np.isfinite(r.max_resolution)
        assert 2.0 * pixel_size * 0.99 <= r.max_resolution <= 30.0
        assert 0.0 < r.fom <= 1.0
        res[bfactor] = r.max_resolution
    # exp(-B k²/4) with B = 400 Å² halves the ring amplitude at 8.5 Å, B = 30 Å² only at 2.3 Å
    assert res[400.0] > 1.5 * res[30.0]
    assert res[30.0] < 4.0


def test_phase_shift():
    img = synthetic_micrograph((1024, 1024), 1.2, 8000, 7500, 20, snr=0.1, phase_shift=90.0, seed=2)
    r = estimate_ctf(img, 1.2, phase_shift=True, defocus_range=(3000, 20000))
    assert abs(r.defocus_u - 8000) / 8000 <= 0.03 and abs(r.defocus_v - 7500) / 7500 <= 0.03
    assert angle_error(r.phase_shift, 90.0) <= 15.0  # phase is periodic in 180° for CTF²
    assert 0.0 <= r.phase_shift < 180.0


def test_diagnostic_image_halves():
    img = synthetic_micrograph((1024, 1024), 1.2, 12000, 11000, 10, seed=4)
    r = estimate_ctf(img, 1.2)
    assert isinstance(r, CTFResult)
    d = ctf_diagnostic_image(r)
    assert d.shape == (r.tile, r.tile) and np.isfinite(d).all()
    c = r.tile // 2
    assert d[c, c + 40] != 0 and d[c, c - 40] != 0  # fit on the right, data on the left
    assert d[c, c + 2] == 0  # inside the low-resolution limit


@pytest.mark.gpu
def test_cupy_matches_numpy():
    img = synthetic_micrograph((1024, 1024), 1.2, 15500, 14500, -60, seed=1)
    cpu = estimate_ctf(img, 1.2)
    gpu = estimate_ctf(backend.asarray(img), 1.2)
    assert gpu.defocus_u == pytest.approx(cpu.defocus_u, rel=2e-3)
    assert gpu.defocus_v == pytest.approx(cpu.defocus_v, rel=2e-3)
    assert angle_error(gpu.defocus_angle, cpu.defocus_angle) < 1.0


# --------------------------------------------------------------------------------------- CLI


def test_cli_round_trip(tmp_path, capsys):
    img = synthetic_micrograph((1024, 1024), 1.3, 15500, 14500, -60, seed=8)
    mic = tmp_path / "mic.mrc"
    write_mrc(mic, img, 1.3)
    star, png, dmrc = tmp_path / "out" / "mic_ctf.star", tmp_path / "out" / "mic_ctf.png", tmp_path / "out" / "mic_ctf.mrc"
    rc = main(["spa", "ctf", str(mic), "--out-star", str(star), "--out-diag", str(png), "--out-diag-mrc", str(dmrc)])
    assert rc == 0
    row = read_star(star)["micrographs"]
    assert list(row.columns) == STAR_COLUMNS and len(row) == 1
    row = row.iloc[0]
    assert row.rlnMicrographName == str(mic)
    assert row.rlnDefocusU == pytest.approx(15500, rel=0.02) and row.rlnDefocusV == pytest.approx(14500, rel=0.02)
    assert angle_error(row.rlnDefocusAngle, -60) <= 10
    assert row.rlnCtfAstigmatism == pytest.approx(row.rlnDefocusU - row.rlnDefocusV, abs=1e-3)
    assert row.rlnMicrographPixelSize == pytest.approx(1.3, abs=1e-4)  # from the header
    assert (row.rlnVoltage, row.rlnSphericalAberration, row.rlnAmplitudeContrast) == (300.0, 2.7, 0.1)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    diag, _ = read_mrc(dmrc)
    assert diag.shape == (512, 512)
    assert "mic_ctf.star" in capsys.readouterr().out
    assert sorted(p.name for p in star.parent.iterdir()) == ["mic_ctf.mrc", "mic_ctf.png", "mic_ctf.star"]


def _bad_inputs(tmp_path):
    garbage = tmp_path / "garbage.mrc"
    garbage.write_bytes(b"not an MRC file at all" * 100)
    nan = tmp_path / "nan.mrc"
    data = np.ones((256, 256), np.float32)
    data[10, 10] = np.nan
    write_mrc(nan, data, 1.0)
    no_pixel = tmp_path / "no_pixel.mrc"
    import mrcfile

    with mrcfile.new(no_pixel) as m:
        m.set_data(np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32))
    return [(garbage, "not a readable MRC"), (nan, "NaN"), (no_pixel, "pixel size"), (tmp_path / "missing.mrc", "does not exist")]


@pytest.mark.filterwarnings("ignore:Data array contains NaN")
def test_cli_bad_input_exits_2_and_writes_nothing(tmp_path, capsys):
    for path, message in _bad_inputs(tmp_path):
        out = tmp_path / "out"
        rc = main(["spa", "ctf", str(path), "--out-star", str(out / "x.star"), "--out-diag", str(out / "x.png")])
        err = capsys.readouterr().err
        assert rc == 2, path
        assert err.startswith("conveyor: error: ") and message in err and err.count("\n") == 1
        assert not out.exists() or not any(out.iterdir())


# ----------------------------------------------------------------------------- simulator truth


def test_simulated_movies_against_truth(tmp_path):
    """Movies of conveyor.simulate.spa (ice Thon rings, particles, junk, Poisson noise,
    14 e/Å² in all): the frame sum aligned with the true shifts gives defocus within 2 %."""
    sim = pytest.importorskip("conveyor.simulate.spa")
    paths = sim.simulate_spa(
        tmp_path / "sim", micrographs=2, size=1024, frames=8, dose_per_frame=1.8, particles=15, seed=3
    )
    truth = read_star(paths["micrographs"])["micrographs"]
    shifts = read_star(paths["shifts"])["shifts"]
    for _, t in truth.iterrows():
        movie, pixel_size = read_mrc(tmp_path / "sim" / t.rlnMicrographMovieName)
        s = shifts[shifts.rlnMicrographName == t.rlnMicrographName].sort_values("rlnMicrographFrameNumber")
        # drifts reach 20 px, which smears Thon rings beyond ~30 Å: undo the true shifts
        ny, nx = movie.shape[1:]
        ky, kx = np.fft.fftfreq(ny)[:, None], np.fft.rfftfreq(nx)[None, :]
        acc = np.zeros((ny, nx // 2 + 1), complex)
        for frame, (sx, sy) in zip(movie, s[["rlnMicrographShiftX", "rlnMicrographShiftY"]].to_numpy()):
            acc += np.fft.rfft2(frame.astype(np.float32)) * np.exp(2j * np.pi * (kx * sx + ky * sy))
        total = np.fft.irfft2(acc, s=(ny, nx)).astype(np.float32)
        r = estimate_ctf(total, pixel_size, t.rlnVoltage, t.rlnSphericalAberration, t.rlnAmplitudeContrast)
        assert r.defocus_u == pytest.approx(t.rlnDefocusU, rel=0.02), (t.to_dict(), r)
        assert r.defocus_v == pytest.approx(t.rlnDefocusV, rel=0.02), (t.to_dict(), r)
        if t.rlnDefocusU - t.rlnDefocusV >= 500:
            assert angle_error(r.defocus_angle, t.rlnDefocusAngle) <= 10.0
        assert isinstance(pd.Series(r.star_row("x")), pd.Series)
