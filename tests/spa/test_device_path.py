"""The GPU code paths of SPA (motion correction, CTF estimation, picking, extraction, 2D
classification, reconstruction and refinement), run on a machine without a GPU.

``fake_gpu`` (tests/conftest.py) selects the 'gpu' device backed by tests/fakecupy.py:
numpy underneath, but arrays that, like cupy's, refuse implicit conversion to numpy and
mixing with numpy arrays. These tests check that the device paths keep their arrays on
the device, convert where they must (file writers, plots, small fits on the host) and give
the CPU path's results. The tests marked ``gpu`` (test_motion.py, test_ctf.py) do the same
with cupy on a real GPU.
"""

from __future__ import annotations

import numpy as np
import pytest

from conveyor import backend
from conveyor.cli import main
from conveyor.io.mrc import read_mrc
from conveyor.io.star import read_star
from conveyor.spa.ctf import estimate_ctf
from conveyor.spa.motion import correct_motion

from .test_ctf import synthetic_micrograph
from .test_motion import N, SIZE, TRUE, drift_rmse, make_movie


def test_the_fake_device_is_strict(fake_gpu):
    a = fake_gpu.asarray(np.ones(4, np.float32))
    with pytest.raises(TypeError):
        np.asarray(a)  # no implicit conversion, as in cupy
    with pytest.raises(TypeError):
        a + np.ones(4, np.float32)  # no mixing with host arrays
    assert isinstance(np.sum(a), fake_gpu.ndarray) and float(np.sum(a)) == 4.0
    assert fake_gpu.fft.rfft2(fake_gpu.ones((4, 4), np.float32)).dtype == np.complex64
    assert backend.get_device() == "gpu" and isinstance(backend.to_host(a), np.ndarray)
    # sparse matrices: from device arrays or host scipy matrices, products with device arrays only
    import cupyx.scipy.sparse as cps
    import scipy.sparse as sps

    m = cps.csr_matrix(sps.eye(4, dtype=np.float32, format="csr"))
    assert cps.issparse(m) and isinstance(m @ a, fake_gpu.ndarray) and float((m @ a).sum()) == 4.0
    with pytest.raises(TypeError):
        m @ np.ones(4, np.float32)
    with pytest.raises(TypeError):
        np.asarray(m)


def test_motion_on_the_device_matches_the_cpu(fake_gpu):
    movie = make_movie(SIZE, N, lambda x, y, t: (TRUE[t, 0], TRUE[t, 1]), dose_px=1.5, contrast=0.1, seed=1)
    backend.set_device("cpu")
    cpu = correct_motion(movie, 1.0, dose_per_frame=1.5, patches=(5, 5))
    backend.set_device("gpu")
    dev = correct_motion(fake_gpu.asarray(movie), 1.0, dose_per_frame=1.5, patches=(5, 5))
    assert isinstance(dev.sum, fake_gpu.ndarray) and isinstance(dev.dose_weighted_sum, fake_gpu.ndarray)
    assert isinstance(dev.shifts, np.ndarray)  # small fits stay on the host
    assert drift_rmse(dev.shifts, cpu.shifts) < 0.02
    np.testing.assert_allclose(backend.to_host(dev.dose_weighted_sum), cpu.dose_weighted_sum,
                               atol=1e-3 * float(np.ptp(cpu.dose_weighted_sum)))


def test_ctf_on_the_device_matches_the_cpu(fake_gpu):
    img = synthetic_micrograph((1024, 1024), 1.2, 15500, 14500, -60, seed=1)
    backend.set_device("cpu")
    cpu = estimate_ctf(img, 1.2)
    backend.set_device("gpu")
    dev = estimate_ctf(backend.asarray(img), 1.2)
    assert dev.defocus_u == pytest.approx(cpu.defocus_u, rel=1e-4)
    assert dev.defocus_v == pytest.approx(cpu.defocus_v, rel=1e-4)
    assert abs(dev.defocus_angle - cpu.defocus_angle) < 0.1


def test_picking_and_extraction_on_the_device_match_the_cpu(fake_gpu):
    from conveyor.spa.extract import extract_particles
    from conveyor.spa.pick import pick_log

    from .test_pick import DIAMETER, PIXEL, make_micrograph

    img, truth, _ = make_micrograph(seed=3)
    backend.set_device("cpu")
    cpu_picks = pick_log(img, PIXEL, DIAMETER)
    coords = cpu_picks[["x", "y"]].to_numpy()
    cpu_stack = extract_particles(img, coords, 64, bin=2)
    backend.set_device("gpu")
    dev_picks = pick_log(backend.asarray(img), PIXEL, DIAMETER)
    np.testing.assert_allclose(dev_picks[["x", "y"]].to_numpy(), coords, atol=1e-6)
    dev_stack = extract_particles(backend.asarray(img), coords, 64, bin=2)
    assert isinstance(dev_stack, fake_gpu.ndarray)
    np.testing.assert_allclose(backend.to_host(dev_stack), cpu_stack, atol=1e-4)


def test_the_preprocess_command_on_the_device(fake_gpu, tmp_path):
    """`conveyor --device gpu spa motion` and `spa ctf` write the CPU's files (movie read to the device,
    sums, shifts, drift plot and CTF diagnostic written from it)."""
    from conveyor.simulate.spa import simulate_spa

    paths = simulate_spa(tmp_path / "data", micrographs=1, size=512, frames=8, particles=8, seed=3)
    movie = str(paths["movies"][0])
    out = {}
    for dev in ("cpu", "gpu"):
        d = tmp_path / dev
        files = {k: d / f"mic{s}" for k, s in (("dw", ".mrc"), ("nodw", "_noDW.mrc"), ("shifts", ".star"),
                                             ("plot", "_drift.png"), ("ctf", "_ctf.star"), ("diag", "_ctf.png"))}
        assert main(["--device", dev, "spa", "motion", movie, "--pixel-size", "1.5", "--dose-per-frame", "1.2",
                     "--patches", "5x5", "--out-sum", str(files["dw"]), "--out-sum-nodw", str(files["nodw"]),
                     "--out-shifts", str(files["shifts"]), "--out-plot", str(files["plot"])]) == 0
        assert main(["--device", dev, "spa", "ctf", str(files["nodw"]), "--pixel-size", "1.5",
                     "--out-star", str(files["ctf"]), "--out-diag", str(files["diag"])]) == 0
        assert all(f.exists() for f in files.values()), dev
        out[dev] = files
    assert backend.requested_device() == "gpu"  # the CLI's --device went through the fake's backend
    np.testing.assert_allclose(read_mrc(out["gpu"]["dw"])[0], read_mrc(out["cpu"]["dw"])[0], rtol=0, atol=1e-3)
    shifts = [read_star(out[d]["shifts"]) for d in ("cpu", "gpu")]
    assert list(shifts[0]) == list(shifts[1])
    ctf = [next(iter(read_star(out[d]["ctf"]).values())) for d in ("cpu", "gpu")]
    assert float(ctf[1]["rlnDefocusU"].iloc[0]) == pytest.approx(float(ctf[0]["rlnDefocusU"].iloc[0]), rel=1e-4)


def test_2d_classification_on_the_device_matches_the_cpu(fake_gpu):
    from conveyor.spa import classify2d as c2

    from .test_classify2d import BOX, DIAMETER, JUNK, MASK, PIXEL, VIEWS, simulate_particle_stack

    images, ctf, _, _ = simulate_particle_stack(n=400, box=BOX, pixel_size=PIXEL, particle_diameter=DIAMETER,
                                                symmetry="D3", views=VIEWS, seed=3, **JUNK)
    kw = dict(iterations=3, psi_step=15, offset_range=4, particle_diameter=MASK, seed=0)
    backend.set_device("cpu")
    cpu = c2.classify_2d(images, ctf, PIXEL, 8, **kw)
    backend.set_device("gpu")
    dev = c2.classify_2d(fake_gpu.asarray(images), ctf, PIXEL, 8, **kw)
    np.testing.assert_array_equal(backend.to_host(dev.assignments), cpu.assignments)
    np.testing.assert_allclose(backend.to_host(dev.averages), cpu.averages, atol=1e-4 * np.abs(cpu.averages).max())


def test_reconstruction_and_refinement_on_the_device_match_the_cpu(fake_gpu):
    from conveyor.spa.reconstruct import particle_ctfs, reconstruct
    from conveyor.spa.refine3d import refine3d

    from .test_reconstruct import BOX, DIAMETER, PIXEL, simulated_particles

    data = simulated_particles()
    n = 300
    h = particle_ctfs(BOX, PIXEL, data.ctf.subset(np.arange(n)), xp=np)
    args = (data.rotations[:n], data.shifts[:n])
    backend.set_device("cpu")
    cpu = reconstruct(data.images[:n], *args, h, PIXEL, symmetry="D3")
    kw = dict(symmetry="D3", particle_diameter=DIAMETER, iterations=2, seed=0)
    ctf = data.ctf.subset(np.arange(n))
    r_cpu = refine3d(data.images[:n], ctf, PIXEL, data.truth, **kw)
    backend.set_device("gpu")
    dev = reconstruct(fake_gpu.asarray(data.images[:n]), *args, fake_gpu.asarray(h), PIXEL, symmetry="D3")
    assert isinstance(dev, fake_gpu.ndarray)
    assert np.abs(backend.to_host(dev) - cpu).max() < 1e-4 * np.abs(cpu).max()
    r_dev = refine3d(fake_gpu.asarray(data.images[:n]), ctf, PIXEL, fake_gpu.asarray(data.truth), **kw)
    np.testing.assert_allclose(r_dev.rotations, r_cpu.rotations, atol=1e-6)
    assert r_dev.resolution == pytest.approx(r_cpu.resolution, rel=1e-3)
