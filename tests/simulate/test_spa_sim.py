"""The cryo-EM SPA simulator and the projector: physics and truth files checked against each other."""

from __future__ import annotations

import numpy as np
import pytest

from conveyor.cli import main
from conveyor.errors import InputError
from conveyor.geometry import euler_to_matrix, random_rotations, rotation_about_axis, symmetry_matrices
from conveyor.io.mrc import read_mrc
from conveyor.io.star import read_star
from conveyor.simulate.spa import (
    critical_exposure,
    drift_trajectory,
    interaction_constant,
    make_model,
    map_box_size,
    place_objects,
    simulate_spa,
)
from conveyor.spa.ctfmodel import ctf_2d
from conveyor.spa.projection import Projector, project, project_real, rotate_volume, shift_image

# --------------------------------------------------------------------------- helpers


def _gaussian_volume(n, pts, amp, sig):
    z, y, x = np.meshgrid(*(np.arange(n) - n // 2,) * 3, indexing="ij")
    v = np.zeros((n, n, n))
    for p, a in zip(pts, amp):
        v += a * np.exp(-((x - p[0]) ** 2 + (y - p[1]) ** 2 + (z - p[2]) ** 2) / (2 * sig**2))
    return v.astype(np.float32)


def _gaussian_projection(n, pts, amp, sig, a):
    """Exact line integral of the Gaussians seen with RELION matrix ``a``: centres move to ``a @ p``."""
    q = pts @ np.asarray(a).T
    yy, xx = np.meshgrid(np.arange(n) - n // 2, np.arange(n) - n // 2, indexing="ij")
    out = np.zeros((n, n))
    for qq, w in zip(q, amp):
        out += w * np.sqrt(2 * np.pi) * sig * np.exp(-((xx - qq[0]) ** 2 + (yy - qq[1]) ** 2) / (2 * sig**2))
    return out


def _measure_shift(a, b, smooth=1.5):
    """Sub-pixel (dx, dy) such that ``a`` is ``b`` moved by (dx, dy) (smoothed cross-correlation)."""
    ny, nx = a.shape
    fa, fb = np.fft.rfft2(a - a.mean()), np.fft.rfft2(b - b.mean())
    ky, kx = np.fft.fftfreq(ny)[:, None], np.fft.rfftfreq(nx)[None, :]
    cc = np.fft.irfft2(fa * np.conj(fb) * np.exp(-2 * np.pi**2 * smooth**2 * (kx**2 + ky**2)), s=a.shape)
    iy, ix = np.unravel_index(np.argmax(cc), cc.shape)

    def vertex(m, c, p):
        return 0.5 * (m - p) / (m - 2 * c + p)

    dy = iy + vertex(cc[iy - 1, ix], cc[iy, ix], cc[(iy + 1) % ny, ix])
    dx = ix + vertex(cc[iy, ix - 1], cc[iy, ix], cc[iy, (ix + 1) % nx])
    return (dx + nx / 2) % nx - nx / 2, (dy + ny / 2) % ny - ny / 2


def _aligned_sum(movie, shifts):
    return shift_image(movie.astype(np.float32), -shifts[:, 0], -shifts[:, 1]).sum(axis=0)


def _frame_shifts(shifts_df, name):
    s = shifts_df[shifts_df.rlnMicrographName == name].sort_values("rlnMicrographFrameNumber")
    return s[["rlnMicrographShiftX", "rlnMicrographShiftY"]].to_numpy()


# --------------------------------------------------------------------------- projection


@pytest.fixture(scope="module")
def blobs():
    rng = np.random.default_rng(11)
    n = 48
    pts = rng.uniform(-n / 4, n / 4, (25, 3))
    amp = rng.uniform(0.5, 1.5, 25)
    return n, pts, amp, 1.8, _gaussian_volume(n, pts, amp, 1.8)


def test_projection_matches_exact_line_integrals(blobs):
    n, pts, amp, sig, vol = blobs
    rots = random_rotations(6, np.random.default_rng(2))
    for pad, tol in ((2, 0.06), (3, 0.03)):
        proj = Projector(vol, pad=pad).project(rots)
        assert proj.shape == (6, n, n) and proj.dtype == np.float32
        for p, a in zip(proj, rots):
            exact = _gaussian_projection(n, pts, amp, sig, a)
            assert np.abs(p - exact).max() < tol * exact.max()
    # one matrix -> one image; identity = sum along z (the beam)
    single = project(vol, np.eye(3), pad=3)
    assert single.shape == (n, n)
    assert np.abs(single - vol.sum(axis=0)).max() < 0.05 * vol.sum(axis=0).max()


def test_projection_of_rotated_map_equals_projection_with_rotated_angles(blobs):
    n, pts, amp, sig, vol = blobs
    a = euler_to_matrix(40.0, 65.0, -30.0)
    r = euler_to_matrix(-110.0, 35.0, 80.0)
    rotated = rotate_volume(vol, r, order=3)  # out(x) = V(R^T x): the map turned by R
    lhs = project(rotated, a, pad=3)
    rhs = project(vol, a @ r, pad=3)
    assert np.abs(lhs - rhs).max() < 0.03 * rhs.max()
    # and the slow real-space reference agrees with the Fourier-slice projector
    ref = project_real(vol, a @ r, order=3)
    assert np.abs(ref - rhs).max() < 0.03 * rhs.max()
    assert np.corrcoef(ref.ravel(), rhs.ravel())[0, 1] > 0.999


def test_projector_shifts_and_slices(blobs):
    n, pts, amp, sig, vol = blobs
    pr = Projector(vol, pad=2)
    a = euler_to_matrix(10.0, 20.0, 30.0)
    moved = pr.project(a[None], shifts=[(2.5, -1.25)])[0]
    np.testing.assert_allclose(moved, shift_image(pr.project(a), 2.5, -1.25), atol=1e-3 * moved.max())
    spec = pr.slices(a)
    assert spec.shape == (n, n // 2 + 1)
    np.testing.assert_allclose(np.fft.fftshift(np.fft.irfft2(spec, s=(n, n))), pr.project(a), atol=1e-4 * moved.max())


def test_shift_image_moves_content_to_plus_x():
    img = np.zeros((32, 40), np.float32)
    img[10, 20] = 1.0
    out = shift_image(img, 3, -2)
    assert np.unravel_index(np.argmax(out), out.shape) == (8, 23)
    stack = np.stack([img, img])
    out2 = shift_image(stack, np.array([1.0, -4.0]), np.array([0.0, 5.0]))
    assert np.unravel_index(np.argmax(out2[0]), img.shape) == (10, 21)
    assert np.unravel_index(np.argmax(out2[1]), img.shape) == (15, 16)
    smooth = np.exp(-((np.arange(40) - 20.0) ** 2) / 18)[None, :] * np.exp(-((np.arange(32) - 15.0) ** 2) / 18)[:, None]
    back = shift_image(shift_image(smooth, 0.37, 1.61), -0.37, -1.61)
    np.testing.assert_allclose(back, smooth, atol=1e-5)
    dx, dy = _measure_shift(shift_image(smooth, 0.37, -1.61), smooth)
    assert dx == pytest.approx(0.37, abs=0.02) and dy == pytest.approx(-1.61, abs=0.02)


# --------------------------------------------------------------------------- specimen


def test_model_map_projection_and_symmetry():
    rng = np.random.default_rng(5)
    model = make_model(100.0, "D3", rng)
    px = 2.0
    box = map_box_size(100.0, px)
    vol = model.volume(box, px)
    # protein-like: ~0.8 Da/Å^3 packing of residues, diameter close to the requested one
    assert 1000 < len(model.positions) < 3000
    r = np.linalg.norm(model.positions, axis=1)
    assert 0.40 * 100 < r.max() < 0.53 * 100
    # symmetric under every operator, and not under an arbitrary rotation
    for g in symmetry_matrices("D3")[1:]:
        assert np.corrcoef(rotate_volume(vol, g).ravel(), vol.ravel())[0, 1] > 0.99
    other = rotate_volume(vol, rotation_about_axis((0, 0, 1), 60.0))
    assert np.corrcoef(other.ravel(), vol.ravel())[0, 1] < 0.9
    # particle images (exact line integrals) agree with the Fourier-slice projection of the map
    rots = random_rotations(4, rng)
    proj = Projector(vol, pad=2).project(rots) * px  # voxel sums -> V·Å
    for p, a in zip(proj, rots):
        exact = model.projection(a, box, px)
        assert np.corrcoef(p.ravel(), exact.ravel())[0, 1] > 0.999
        assert np.abs(p - exact).max() < 0.05 * exact.max()
    # weak phase object: ~0.1 rad through a 100 Å particle at 300 kV
    phase = model.projection(np.eye(3), box, px).max() * interaction_constant(300.0)
    assert 0.03 < phase < 0.3
    assert interaction_constant(300.0) == pytest.approx(6.53e-4, rel=0.01)


def test_drift_trajectory_and_placement():
    rng = np.random.default_rng(0)
    for _ in range(20):
        t = drift_trajectory(20, rng, (3.0, 20.0))
        assert t.shape == (20, 2) and np.all(t[0] == 0)
        steps = np.linalg.norm(np.diff(t, axis=0), axis=1)
        assert 3.0 - 1e-9 <= steps.sum() <= 20.0 + 1e-9
        assert np.linalg.norm(np.diff(t, 2, axis=0), axis=1).max() <= 1.5 * steps.max()  # smooth
    radii = np.full(30, 20.0)
    c = place_objects((400, 400), radii, rng)
    d = np.hypot(*(c[:, None] - c[None]).transpose(2, 0, 1)) + np.eye(30) * 1e3
    assert d.min() >= 40.0 and c.min() >= 20 and c.max() <= 380
    with pytest.raises(InputError, match="could not place"):
        place_objects((200, 200), np.full(30, 20.0), rng)
    assert critical_exposure(np.array([0.1]))[0] == pytest.approx(0.245 * 0.1**-1.665 + 2.81)


# --------------------------------------------------------------------------- data sets

SMALL = dict(micrographs=2, size=384, frames=6, pixel_size=2.0, dose_per_frame=3.0, particles=8,
             particle_diameter=100.0, symmetry="D3", junk_fraction=0.25, seed=1)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim")
    return out, simulate_spa(out, **SMALL)


def test_truth_files_and_labels(dataset):
    out, paths = dataset
    assert [p.name for p in paths["movies"]] == ["mic_0001.mrc", "mic_0002.mrc"]
    for key in ("map", "micrographs", "shifts", "particles", "experiment", "params"):
        assert paths[key].exists(), key
    movie, px = read_mrc(paths["movies"][0])
    assert movie.shape == (6, 384, 384) and movie.dtype == np.int16 and px == pytest.approx(2.0)
    vol, vpx = read_mrc(paths["map"])
    assert vol.shape == (map_box_size(100, 2.0),) * 3 and vpx == pytest.approx(2.0)
    mics = read_star(paths["micrographs"])["micrographs"]
    for label in ("rlnMicrographMovieName", "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnVoltage",
                  "rlnSphericalAberration", "rlnAmplitudeContrast", "rlnMicrographPixelSize"):
        assert label in mics.columns
    assert list(mics.rlnMicrographMovieName) == ["movies/mic_0001.mrc", "movies/mic_0002.mrc"]
    assert ((mics.rlnDefocusU >= mics.rlnDefocusV) & (mics.rlnDefocusU - mics.rlnDefocusV <= 1000)).all()
    assert mics.rlnDefocusU.between(8000, 25500).all() and mics.rlnDefocusV.between(7500, 25000).all()
    assert mics.cvHasCarbon.sum() == 1  # round(2 * 2.5 * 0.25)
    sh = read_star(paths["shifts"])["shifts"]
    assert list(sh.columns) == ["rlnMicrographName", "rlnMicrographFrameNumber", "rlnMicrographShiftX",
                                "rlnMicrographShiftY"]
    assert len(sh) == 12 and sh.rlnMicrographFrameNumber.min() == 1
    assert (sh[sh.rlnMicrographFrameNumber == 1][["rlnMicrographShiftX", "rlnMicrographShiftY"]] == 0).all().all()
    parts = read_star(paths["particles"])["particles"]
    for label in ("rlnMicrographName", "rlnCoordinateX", "rlnCoordinateY", "rlnAngleRot", "rlnAngleTilt",
                  "rlnAnglePsi", "cvIsJunk"):
        assert label in parts.columns
    assert set(parts.cvIsJunk) <= {0, 1} and parts.cvIsJunk.sum() >= 2
    assert set(parts[parts.cvIsJunk == 1].cvJunkType) <= {"aggregate", "ice", "contamination"}


def test_mean_counts_match_the_dose(dataset):
    out, paths = dataset
    expected = SMALL["dose_per_frame"] * SMALL["pixel_size"] ** 2
    for path in paths["movies"]:
        movie, _ = read_mrc(path)
        assert movie.min() >= 0
        assert movie.mean() == pytest.approx(expected, rel=0.03)
        np.testing.assert_allclose(movie.mean(axis=(1, 2)), expected, rtol=0.05)
        # shot noise: variance of a frame difference ~ 2 x mean counts (Poisson)
        diff = movie[-1].astype(float) - movie[-2]
        assert diff.var() == pytest.approx(2 * expected, rel=0.15)


def test_objects_inside_and_not_overlapping(dataset):
    out, paths = dataset
    parts = read_star(paths["particles"])["particles"]
    mics = read_star(paths["micrographs"])["micrographs"]
    n = SMALL["size"]
    r_p = SMALL["particle_diameter"] / SMALL["pixel_size"] / 2
    for _, mic in mics.iterrows():
        p = parts[parts.rlnMicrographName == mic.rlnMicrographName]
        good = p[p.cvIsJunk == 0]
        assert len(good) >= 4 and (good.cvRadius == r_p).all()
        assert good.rlnCoordinateX.between(r_p, n - r_p).all() and good.rlnCoordinateY.between(r_p, n - r_p).all()
        assert p.rlnCoordinateX.between(0, n).all() and p.rlnCoordinateY.between(0, n).all()
        xy = p[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy()
        rad = p.cvRadius.to_numpy()
        d = np.hypot(*(xy[:, None] - xy[None]).transpose(2, 0, 1))
        need = rad[:, None] + rad[None]
        np.fill_diagonal(d, np.inf)
        assert (d >= need - 1e-6).all()
        # per-particle defocus: the micrograph's plus the height in the ice
        dz = good.rlnDefocusU - mic.rlnDefocusU
        np.testing.assert_allclose(good.rlnDefocusV - mic.rlnDefocusV, dz, atol=1e-3)
        assert (dz.abs() <= (250 - 100) / 2 + 1e-6).all()
        if mic.cvHasCarbon:  # nothing sits on the carbon
            a = np.deg2rad(mic.cvCarbonNormalAngle)
            side = (xy[:, 0] - mic.cvCarbonEdgeX) * np.cos(a) + (xy[:, 1] - mic.cvCarbonEdgeY) * np.sin(a)
            assert (side < -rad).all()


def test_truth_map_is_symmetric(dataset):
    out, paths = dataset
    vol, _ = read_mrc(paths["map"])
    for g in symmetry_matrices("D3")[1:]:
        assert np.corrcoef(rotate_volume(vol, g).ravel(), vol.ravel())[0, 1] > 0.99


def test_experiment_yaml_is_a_valid_config(dataset):
    config = pytest.importorskip("conveyor.config")
    out, paths = dataset
    cfg = config.validate_config(config.load_yaml(paths["experiment"]))
    spa = cfg["spa"]
    assert spa["pixel_size"] == 2.0 and spa["dose_per_frame"] == 3.0 and spa["frames"] == 6
    assert spa["symmetry"] == "D3" and spa["particle_diameter"] == 100.0 and spa["voltage"] == 300
    import glob

    assert sorted(glob.glob(spa["movies"])) == sorted(str(p.resolve()) for p in paths["movies"])


def test_same_seed_same_data(tmp_path):
    kw = dict(micrographs=1, size=160, frames=3, pixel_size=2.0, particles=3, particle_diameter=60.0,
              symmetry="C2", junk_fraction=0.4)
    a = simulate_spa(tmp_path / "a", seed=5, **kw)
    b = simulate_spa(tmp_path / "b", seed=5, **kw)
    c = simulate_spa(tmp_path / "c", seed=6, **kw)
    ma, mb, mc = (read_mrc(p["movies"][0])[0] for p in (a, b, c))
    np.testing.assert_array_equal(ma, mb)
    assert not np.array_equal(ma, mc)
    np.testing.assert_array_equal(read_mrc(a["map"])[0], read_mrc(b["map"])[0])
    for key in ("micrographs", "shifts", "particles"):
        ta, tb = (read_star(p[key]) for p in (a, b))
        for block in ta:
            assert ta[block].equals(tb[block])


def test_drift_measured_by_cross_correlation_matches_truth(tmp_path):
    # low noise (40 e/Å² per frame) and no radiation damage, which at that dose would erase
    # everything but the lowest resolutions after the first frame
    paths = simulate_spa(tmp_path, micrographs=1, size=256, frames=6, pixel_size=2.0, dose_per_frame=40.0,
                         particles=4, particle_diameter=60.0, symmetry="C1", junk_fraction=0.0, seed=3,
                         drift_range=(8.0, 15.0), radiation_damage=False)
    movie, _ = read_mrc(paths["movies"][0])
    truth = _frame_shifts(read_star(paths["shifts"])["shifts"], "movies/mic_0001.mrc")
    assert np.linalg.norm(truth[-1]) > 3.0
    first, last = movie[:2].sum(axis=0).astype(float), movie[-2:].sum(axis=0).astype(float)
    dx, dy = _measure_shift(last, first)
    want = truth[-2:].mean(axis=0) - truth[:2].mean(axis=0)
    assert abs(dx - want[0]) < 0.5 and abs(dy - want[1]) < 0.5
    for f in range(1, 6):  # every frame against the first
        dx, dy = _measure_shift(movie[f].astype(float), movie[0].astype(float))
        assert abs(dx - truth[f, 0]) < 0.5 and abs(dy - truth[f, 1]) < 0.5


def test_thon_rings_where_ctf_2d_predicts(tmp_path):
    px, n = 1.5, 512
    paths = simulate_spa(tmp_path, micrographs=1, size=n, frames=4, pixel_size=px, dose_per_frame=10.0,
                         particles=6, particle_diameter=120.0, symmetry="C1", junk_fraction=0.0, seed=2)
    mic = read_star(paths["micrographs"])["micrographs"].iloc[0]
    movie, _ = read_mrc(paths["movies"][0])
    total = _aligned_sum(movie, _frame_shifts(read_star(paths["shifts"])["shifts"], mic.rlnMicrographName))
    tiles = [total[y:y + 256, x:x + 256] for y in (0, 128, 256) for x in (0, 128, 256)]
    ps = np.mean([np.abs(np.fft.fft2((t - t.mean()) * np.hanning(256)[:, None] * np.hanning(256))) ** 2
                  for t in tiles], axis=0)
    fy = np.fft.fftfreq(256, px)
    k = np.hypot(fy[:, None], fy[None, :])
    band = (k > 1 / 25) & (k < 1 / 6)
    kb = np.digitize(k[band], np.linspace(1 / 25, 1 / 6, 30))

    def flat(v):  # divide by and subtract the radial mean: keeps only the ring modulation
        v = v.copy()
        for j in np.unique(kb):
            sel = kb == j
            v[sel] = v[sel] / v[sel].mean() - 1.0
        return v

    ps_flat = flat(ps[band])

    def ctf2(offset):
        c = ctf_2d((256, 256), px, mic.rlnDefocusU + offset, mic.rlnDefocusV + offset, mic.rlnDefocusAngle,
                   mic.rlnVoltage, mic.rlnSphericalAberration, mic.rlnAmplitudeContrast)
        return c[band] ** 2

    c2 = ctf2(0.0)
    # relative to the radial mean, power is low at the predicted zeros and high at the maxima
    assert ps_flat[c2 < 0.1].mean() < ps_flat[c2 > 0.8].mean() - 0.03
    # and the true defocus fits the rings best
    offsets = np.arange(-2000, 2001, 250)
    score = [np.corrcoef(ps_flat, flat(ctf2(o)))[0, 1] for o in offsets]
    assert abs(offsets[int(np.argmax(score))]) <= 250 and max(score) > 0.05


def test_particles_in_movie_match_projections_of_truth_map(tmp_path):
    px, box = 2.0, 96
    paths = simulate_spa(tmp_path, micrographs=1, size=320, frames=2, pixel_size=px, dose_per_frame=25.0,
                         particles=4, particle_diameter=100.0, symmetry="C1", junk_fraction=0.0, seed=4,
                         contrast=3.0, defocus_range=(9000.0, 11000.0), max_astigmatism=0.0)
    movie, _ = read_mrc(paths["movies"][0])
    total = _aligned_sum(movie, _frame_shifts(read_star(paths["shifts"])["shifts"], "movies/mic_0001.mrc"))
    vol, _ = read_mrc(paths["map"])
    pad = (box - vol.shape[0]) // 2
    projector = Projector(np.pad(vol, pad), pad=2)
    parts = read_star(paths["particles"])["particles"]
    fy = np.fft.fftfreq(box, px)
    k = np.hypot(fy[:, None], fy[None, :])
    yy, xx = np.mgrid[0:box, 0:box] - box // 2
    mask = np.hypot(yy, xx) < 40
    lowpass = np.exp(-(k * 8.0) ** 2)
    padded = np.pad(total, box, mode="reflect")
    right, wrong = [], []
    rng = np.random.default_rng(0)
    for _, p in parts.iterrows():
        ix, iy = int(round(p.rlnCoordinateX)), int(round(p.rlnCoordinateY))
        img = padded[box + iy - box // 2: box + iy + box // 2, box + ix - box // 2: box + ix + box // 2]
        img = np.real(np.fft.ifft2(np.fft.fft2(img - img.mean()) * lowpass))
        ctf = ctf_2d((box, box), px, p.rlnDefocusU, p.rlnDefocusV, p.rlnDefocusAngle)
        frac = [(p.rlnCoordinateX - ix, p.rlnCoordinateY - iy)]

        def predicted(a):
            proj = projector.project(a[None], shifts=frac)[0]
            return np.real(np.fft.ifft2(np.fft.fft2(proj) * ctf * lowpass))

        a = euler_to_matrix(p.rlnAngleRot, p.rlnAngleTilt, p.rlnAnglePsi)
        right.append(np.corrcoef(img[mask], predicted(a)[mask])[0, 1])
        wrong.append(np.corrcoef(img[mask], predicted(random_rotations(1, rng)[0])[mask])[0, 1])
    right, wrong = np.array(right), np.array(wrong)
    # positive: 1 + 2 CTF*phase, protein dark at underfocus, like the CTF model predicts
    assert right.min() > 0.3, right
    assert (right > wrong + 0.1).all(), (right, wrong)


# --------------------------------------------------------------------------- CLI


def test_cli_writes_a_dataset_and_reports_bad_input(tmp_path, capsys):
    out = tmp_path / "cli"
    rc = main(["simulate", "spa", "--out", str(out), "--micrographs", "1", "--size", "160", "--frames", "2",
               "--pixel-size", "2", "--particles", "2", "--particle-diameter", "60", "--symmetry", "C3",
               "--junk-fraction", "0", "--format", "tiff", "--seed", "9"])
    assert rc == 0
    assert (out / "movies" / "mic_0001.tif").exists() and (out / "truth" / "particles.star").exists()
    tiff = pytest.importorskip("conveyor.io.tiff")
    if hasattr(tiff, "read_tiff"):
        frames, px = tiff.read_tiff(out / "movies" / "mic_0001.tif")[:2]
        assert frames.shape == (2, 160, 160) and px == pytest.approx(2.0)
        assert frames.mean() == pytest.approx(1.2 * 4, rel=0.05)
    rc = main(["simulate", "spa", "--out", str(tmp_path / "bad"), "--symmetry", "D1"])
    assert rc == 2
    assert "Dn (n >= 2)" in capsys.readouterr().err
    with pytest.raises(InputError, match="junk"):
        simulate_spa(tmp_path / "bad2", junk_fraction=1.5)
