"""Phase retrieval against the simulator's ground truth.

The 3D intensity is the simulator's ``truth/intensity.mrc`` (|F|² of the capsid in
electrons², header voxel = dq in 1/Å) for a small detector, so the phasing grid is 45³
with a real-space voxel 1/(N dq) ≈ 43 Å, different from the 34 Å voxel of
``truth/density.mrc``; the truth is resampled to the phasing voxel before comparing.
The centre (radius 2.5 voxels) is unmeasured and Poisson noise is added (0.1 photon per
voxel in the outermost shell).
"""

from __future__ import annotations

import json

import mrcfile
import numpy as np
import pytest
from scipy import ndimage

from conveyor import backend
from conveyor.cli import main
from conveyor.errors import InputError
from conveyor.io.mrc import read_mrc, write_mrc
from conveyor.simulate.spi import simulate_spi
from conveyor.spi import phasing as ph

DIAMETER_NM = 70.0
MISSING_RADIUS = 2.5  # voxels
EDGE_PHOTONS = 0.1  # mean photons per voxel in the outermost shell


def resample(density, voxel_in, voxel_out, n_out):
    """``density`` (centre at n//2) on an ``n_out³`` grid of ``voxel_out`` (same units), low-passed."""
    c_in = density.shape[0] // 2
    idx = (np.arange(n_out) - n_out // 2) * voxel_out / voxel_in + c_in
    z, y, x = np.meshgrid(idx, idx, idx, indexing="ij")
    smooth = ndimage.gaussian_filter(density.astype(np.float64), 0.5 * voxel_out / voxel_in)
    return ndimage.map_coordinates(smooth, [z, y, x], order=1, mode="constant")


def radius_of_gyration(density, voxel):
    n = density.shape[0]
    c = (np.arange(n) - n // 2) * voxel
    w = np.maximum(np.asarray(density, dtype=np.float64), 0)
    g = np.meshgrid(c, c, c, indexing="ij")
    com = [float((w * gi).sum() / w.sum()) for gi in g]
    return float(np.sqrt(sum((w * (gi - ci) ** 2).sum() for gi, ci in zip(g, com)) / w.sum()))


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim_phasing")
    paths = simulate_spi(out, n_files=1, frames_per_file=1, detector=30, distance_m=0.075,
                         diameter_nm=DIAMETER_NM, beamstop_radius_px=3, gap_px=0, center_offset_px=(0.0, 0.0))
    inten, dq = read_mrc(paths["intensity"])
    truth, truth_voxel = read_mrc(paths["density"])
    n = inten.shape[0]
    r = np.sqrt(ph.shell_radius2(n, np))
    mask = (r > MISSING_RADIUS) & (r <= n // 2)
    edge = float(inten[(r > n // 2 - 1) & mask].mean())
    scale = EDGE_PHOTONS / edge
    noisy = np.random.default_rng(7).poisson(inten * scale).astype(np.float32) / scale
    noisy[~mask] = 0
    clean = inten.copy()
    clean[~mask] = 0
    voxel = 1.0 / (n * dq)
    return dict(paths=paths, intensity=clean, noisy=noisy, mask=mask, dq=dq, n=n, voxel=voxel,
                truth=truth, truth_voxel=truth_voxel, truth_resampled=resample(truth, truth_voxel, voxel, n))


@pytest.fixture(scope="module")
def phased(sim):
    return ph.phase_many(sim["noisy"], n_runs=6, mask=sim["mask"], n_iter=300, seed=0, dq=sim["dq"])


# ---------------------------------------------------------------------------------------
# against the ground truth
# ---------------------------------------------------------------------------------------
def test_grid_is_the_one_the_simulator_wrote(sim):
    assert sim["n"] == 45
    assert 40.0 < sim["voxel"] < 46.0 and abs(sim["truth_voxel"] - sim["voxel"]) > 5.0  # truly resampled
    assert sim["truth_resampled"].sum() * sim["voxel"] ** 3 == pytest.approx(sim["truth"].sum() * sim["truth_voxel"] ** 3, rel=0.02)


def test_phased_density_correlates_with_truth(sim, phased):
    aligned, average, prtf = phased  # unpacks as (aligned runs, average, PRTF)
    truth = sim["truth_resampled"]
    assert len(phased.kept) >= 4, f"kept runs {phased.kept}, errors {[r.final_error for r in phased.runs]}"
    assert aligned.shape == (len(phased.kept), sim["n"], sim["n"], sim["n"])
    for k in range(aligned.shape[0]):
        assert ph.align_densities(truth, aligned[k]).cc >= 0.8
    al = ph.align_densities(truth, average)
    assert al.cc >= 0.9, f"average correlates {al.cc:.3f} with the truth"
    assert float(average.min()) >= 0.0
    assert phased.voxel == pytest.approx(sim["voxel"], rel=1e-9)


def test_density_scale_and_size(sim, phased):
    """Units: e/Å³ on voxels of 1/(N dq) Å: the electron count and the radius of gyration
    (both depend on the voxel size, as voxel³ and voxel) match the truth."""
    avg = phased.average
    electrons = float(avg.sum()) * sim["voxel"] ** 3
    truth_electrons = float(sim["truth"].sum()) * sim["truth_voxel"] ** 3
    assert electrons == pytest.approx(truth_electrons, rel=0.05)
    rg = radius_of_gyration(avg, sim["voxel"])
    assert rg == pytest.approx(radius_of_gyration(sim["truth"], sim["truth_voxel"]), rel=0.03)


def test_prtf_resolution_between_nyquist_and_particle_size(sim, phased):
    pr = phased.prtf
    nyquist_A = 2.0 * sim["voxel"]
    assert np.isfinite(pr.resolution)
    assert nyquist_A * 0.999 <= pr.resolution <= DIAMETER_NM * 10.0
    assert pr.q_cut == pytest.approx(1.0 / pr.resolution)
    low = pr.prtf[np.isfinite(pr.prtf)][:5]
    assert np.all(low > 0.8), low  # the low-resolution phases are reproducible
    assert np.all(np.isnan(pr.prtf[:3]))  # shells 0-2 lie in the missing centre
    assert pr.q[1] == pytest.approx(sim["dq"])


def test_runs_converge(phased):
    for run in phased.runs:
        assert run.errors.size == 301
        assert run.final_error < 0.5 * run.errors[0]
        assert int(run.support.sum()) < 0.2 * run.support.size  # shrinkwrap tightened it


def test_diameter_from_fringes(sim):
    d = ph.estimate_diameter(sim["noisy"], sim["mask"]) * sim["voxel"] / 10.0
    assert d == pytest.approx(DIAMETER_NM, rel=0.05)


# ---------------------------------------------------------------------------------------
# alignment and PRTF on synthetic data
# ---------------------------------------------------------------------------------------
def _blobs(n=32):
    """A particle without a centre of symmetry: three Gaussian blobs of different sizes."""
    c = np.arange(n) - n // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    out = np.zeros((n, n, n))
    for (bz, by, bx), s, a in [((0, 0, 0), 3.0, 1.0), ((4, 1, -2), 1.5, 0.8), ((-1, 5, 3), 2.0, 0.5)]:
        out += a * np.exp(-((z - bz) ** 2 + (y - by) ** 2 + (x - bx) ** 2) / (2 * s * s))
    return out.astype(np.float32)


@pytest.mark.parametrize("flip", [False, True])
def test_alignment_recovers_shift_and_inversion(flip):
    ref = _blobs()
    assert ph.normalised_cc(ref, ph.invert(ref)) < 0.9  # the inversion is distinguishable
    shift = (2.3, -1.6, 3.7)
    mov = ph.fourier_shift(ph.invert(ref) if flip else ref, shift)
    al = ph.align_densities(ref, mov)
    assert al.flipped is flip
    assert np.allclose(al.shift, shift, atol=0.15), al.shift
    assert al.cc > 0.995


def test_invert_is_the_inversion_about_the_centre():
    for n in (8, 9):
        a = np.random.default_rng(0).random((n, n, n))
        b = ph.invert(a)
        c = n // 2
        assert b[c, c, c] == a[c, c, c]
        assert b[c + 1, c - 2, c + 3] == a[c - 1, c + 2, c - 3]
        assert np.array_equal(ph.invert(b), a)


def test_prtf_drops_where_the_phases_stop_agreeing():
    """Runs share their Fourier phases up to shell 8 and have random phases beyond:
    the PRTF is ~1 below and ~sqrt(pi/4/16) ≈ 0.22 above, so it crosses 1/e at shell 8-9."""
    n, kc, runs = 32, 8, 16
    base = np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(_blobs(n))))
    r = np.sqrt(ph.shell_radius2(n, np))
    rng = np.random.default_rng(3)
    dens = []
    for _ in range(runs):
        noise = np.fft.fftshift(np.fft.fftn(rng.standard_normal((n, n, n))))  # Hermitian random phases
        f = np.where(r > kc + 0.5, np.abs(base) * np.exp(1j * np.angle(noise)), base)
        dens.append(np.fft.fftshift(np.fft.ifftn(np.fft.ifftshift(f))).real)
    inten = np.abs(base) ** 2
    dq = 0.01
    pr = ph.prtf(dens, inten, np.ones_like(inten), dq=dq)
    assert np.all(pr.prtf[: kc + 1] > 0.99)
    assert np.all(pr.prtf[kc + 2: n // 2] < 0.33)
    assert kc * dq < pr.q_cut < (kc + 1) * dq
    assert pr.crossed and pr.resolution == pytest.approx(1.0 / pr.q_cut)


def test_resolution_from_prtf_interpolates_and_skips_missing_shells():
    q = np.arange(10) * 0.1
    curve = np.array([np.nan, np.nan, 0.9, 0.95, 0.8, 0.6, 0.2, 0.1, 0.5, 0.05])
    q_cut, res, crossed = ph.resolution_from_prtf(q, curve)
    expected = 0.5 + (0.6 - ph.INV_E) / (0.6 - 0.2) * 0.1
    assert crossed and q_cut == pytest.approx(expected) and res == pytest.approx(1 / expected)
    q_cut, res, crossed = ph.resolution_from_prtf(q, np.full(10, 0.9))
    assert not crossed and q_cut == pytest.approx(0.9)


def test_bad_parameters_raise():
    inten = np.ones((16, 16, 16), np.float32)
    with pytest.raises(InputError, match="cubic"):
        ph.phase(np.ones((16, 16, 8), np.float32))
    with pytest.raises(InputError, match="NaN"):
        bad = inten.copy()
        bad[3, 3, 3] = np.nan
        ph.phase(bad)
    with pytest.raises(InputError, match="algorithm"):
        ph.phase(inten, algorithm="dm")
    with pytest.raises(InputError, match="mask shape"):
        ph.phase(inten, mask=np.ones((8, 8, 8)))


# ---------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------
def _outputs(tmp_path, res_name="res.json"):
    return [
        "--out-density", str(tmp_path / "density.mrc"), "--out-prtf", str(tmp_path / "prtf.csv"),
        "--out-png", str(tmp_path / "slices.png"), "--out-resolution", str(tmp_path / res_name),
    ]


def test_cli_round_trip(sim, tmp_path, capsys):
    inten_path, mask_path = tmp_path / "intensity.mrc", tmp_path / "mask.mrc"
    write_mrc(inten_path, sim["noisy"], sim["dq"])
    write_mrc(mask_path, sim["mask"].astype(np.int8), sim["dq"], dtype=np.int8)
    rc = main(["spi", "phase", str(inten_path), "--mask", str(mask_path), *_outputs(tmp_path),
               "--runs", "2", "--iterations", "80", "--seed", "1"])
    assert rc == 0
    assert "resolution" in capsys.readouterr().out
    dens, voxel = read_mrc(tmp_path / "density.mrc")
    with mrcfile.open(tmp_path / "density.mrc") as m:
        assert m.header.ispg == 1
    n = sim["n"]
    assert dens.shape == (n, n, n) and float(dens.min()) >= 0.0
    assert voxel == pytest.approx(1.0 / (n * sim["dq"]), rel=1e-5)
    assert ph.align_densities(sim["truth_resampled"], dens).cc > 0.8

    import pandas as pd

    tab = pd.read_csv(tmp_path / "prtf.csv")
    assert list(tab.columns) == ["shell", "q_per_nm", "q_per_A", "resolution_nm", "prtf", "n_voxels"]
    assert len(tab) == n // 2 + 1
    assert np.allclose(tab["q_per_nm"], 10.0 * tab["q_per_A"], rtol=1e-5)
    sel = tab["q_per_A"] > 0
    assert np.allclose(tab.loc[sel, "resolution_nm"], 0.1 / tab.loc[sel, "q_per_A"], rtol=1e-4)
    assert tab["prtf"][:3].isna().all() and (tab["n_voxels"][:3] == 0).all()

    res = json.loads((tmp_path / "res.json").read_text())
    nyq_nm = 2.0 * voxel / 10.0
    assert res["voxel_A"] == pytest.approx(voxel, rel=1e-5)
    assert nyq_nm * 0.999 <= res["resolution_nm"] <= DIAMETER_NM
    assert res["resolution_nm"] == pytest.approx(1.0 / res["q_cut_per_nm"])
    assert res["runs"] == 2 and len(res["final_errors"]) == 2
    assert (tmp_path / "slices.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*tmp*"))  # atomic writes leave nothing behind


def test_cli_simulator_file_sphere_start_text_resolution(sim, tmp_path):
    """The simulator's truth/intensity.mrc as it is (no mask: its all-zero corners count as
    unmeasured), a ball start from --diameter-nm, HIO, a 'key value' resolution file."""
    rc = main(["spi", "phase", str(sim["paths"]["intensity"]), *_outputs(tmp_path, "res.txt"), "--runs", "1",
               "--iterations", "60", "--diameter-nm", str(DIAMETER_NM), "--algorithm", "hio"])
    assert rc == 0
    lines = dict(line.split(" ", 1) for line in (tmp_path / "res.txt").read_text().splitlines())
    assert float(lines["resolution_nm"]) > 0 and lines["crossed"] in ("true", "false")
    dens, voxel = read_mrc(tmp_path / "density.mrc")
    assert ph.align_densities(sim["truth_resampled"], dens).cc > 0.8


def _one_line_error(capsys, name):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("conveyor: error: ") and name in err, err
    return err


@pytest.mark.filterwarnings("ignore:Data array contains NaN values:RuntimeWarning")
def test_cli_bad_inputs_exit_2_naming_the_file(tmp_path, capsys):
    out = _outputs(tmp_path)
    cube = np.ones((16, 16, 16), np.float32)

    missing = tmp_path / "nope.mrc"
    assert main(["spi", "phase", str(missing), *out]) == 2
    _one_line_error(capsys, "nope.mrc")

    flat = tmp_path / "flat.mrc"
    write_mrc(flat, np.ones((16, 16, 8), np.float32), 0.01)
    assert main(["spi", "phase", str(flat), *out]) == 2
    assert "cubic" in _one_line_error(capsys, "flat.mrc")

    nan = tmp_path / "nan.mrc"
    bad = cube.copy()
    bad[2, 3, 4] = np.nan
    write_mrc(nan, bad, 0.01)
    assert main(["spi", "phase", str(nan), *out]) == 2
    assert "NaN" in _one_line_error(capsys, "nan.mrc")

    good = tmp_path / "good.mrc"
    write_mrc(good, cube, 0.01)
    small_mask = tmp_path / "small_mask.mrc"
    write_mrc(small_mask, np.ones((8, 8, 8), np.int8), 0.01, dtype=np.int8)
    assert main(["spi", "phase", str(good), "--mask", str(small_mask), *out]) == 2
    _one_line_error(capsys, "small_mask.mrc")

    real_space = tmp_path / "map.mrc"
    write_mrc(real_space, cube, 4.0)  # a real-space voxel in the header, not dq
    assert main(["spi", "phase", str(real_space), *out]) == 2
    _one_line_error(capsys, "map.mrc")
    assert not (tmp_path / "density.mrc").exists()


# ---------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_gpu_phasing_matches_truth(sim):
    cp = pytest.importorskip("cupy")
    res = ph.phase_many(cp.asarray(sim["noisy"]), n_runs=4, mask=cp.asarray(sim["mask"]), n_iter=300, seed=0, dq=sim["dq"])
    assert isinstance(res.average, cp.ndarray)
    avg = backend.to_host(res.average)
    assert ph.align_densities(sim["truth_resampled"], avg).cc >= 0.9
    assert np.isfinite(res.prtf.resolution)


def test_phasing_on_the_fake_device_matches_the_cpu(sim, fake_gpu):
    """The device path (tests/fakecupy.py: arrays that refuse implicit conversion to numpy) gives the CPU's density."""
    kw = dict(n_runs=2, n_iter=50, seed=0, dq=sim["dq"])
    backend.set_device("cpu")
    cpu = ph.phase_many(sim["noisy"], mask=sim["mask"], **kw)
    backend.set_device("gpu")
    dev = ph.phase_many(fake_gpu.asarray(sim["noisy"]), mask=fake_gpu.asarray(sim["mask"]), **kw)
    assert isinstance(dev.average, fake_gpu.ndarray)
    np.testing.assert_allclose(backend.to_host(dev.average), cpu.average, atol=1e-4 * np.abs(cpu.average).max())
