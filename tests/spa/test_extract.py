"""Particle extraction: centring at every binning, background normalisation, contrast, STAR/stack outputs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import starfile

from conveyor import backend
from conveyor.cli import main
from conveyor.errors import InputError
from conveyor.io.mrc import read_header, read_stack_images, write_mrc
from conveyor.io.star import parse_image_name, read_particles
from conveyor.spa.extract import (
    box_inside,
    check_box_bin,
    default_box_size,
    extract_particles,
    fourier_crop,
    normalise_background,
)

PIXEL = 1.5


def particle(shape, cx, cy):
    """An asymmetric particle (three Gaussian blobs, centre of mass at (cx, cy)), density >= 0."""
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(float)
    blobs = [(-6.0, -3.0, 5.0, 1.0), (7.0, -2.0, 4.0, 0.8), (-1.0, 8.0, 3.5, 0.9)]
    mass = np.array([w * s * s for _, _, s, w in blobs])
    off = np.array([[dx, dy] for dx, dy, _, _ in blobs])
    off -= (mass[:, None] * off).sum(0) / mass.sum()
    d = np.zeros(shape)
    for (dx, dy), (_, _, s, w) in zip(off, blobs):
        d += w * np.exp(-((xx - cx - dx) ** 2 + (yy - cy - dy) ** 2) / (2 * s * s))
    return d


def shift_by_xcorr(img, ref):
    """Sub-pixel (dx, dy) of ``img`` relative to ``ref`` from the cross-correlation peak."""
    cc = np.real(np.fft.ifft2(np.fft.fft2(img) * np.conj(np.fft.fft2(ref))))
    cc = np.fft.fftshift(cc)
    n = cc.shape[0]
    iy, ix = np.unravel_index(np.argmax(cc), cc.shape)

    def parab(a, b, c):
        den = a - 2 * b + c
        return 0.5 * (a - c) / den if den < 0 else 0.0

    dx = ix - n // 2 + parab(cc[iy, ix - 1], cc[iy, ix], cc[iy, ix + 1])
    dy = iy - n // 2 + parab(cc[iy - 1, ix], cc[iy, ix], cc[iy + 1, ix])
    return dx, dy


def centre_of_mass(img):
    w = np.clip(img, 0, None)
    yy, xx = np.mgrid[: img.shape[0], : img.shape[1]]
    return (w * xx).sum() / w.sum(), (w * yy).sum() / w.sum()


def test_default_box_size():
    box = default_box_size(100.0, 2.0)  # 50 px particle
    assert box % 8 == 0 and 1.5 * 50 <= box <= 2 * 50
    assert default_box_size(150.0, 1.0) == 240
    for d in (80.0, 120.0, 200.0, 330.0):
        b = default_box_size(d, 1.1)
        assert b % 8 == 0 and b >= 1.5 * d / 1.1 and (b // 4) % 2 == 0


def test_fourier_crop_keeps_mean_and_centre():
    a = np.full((2, 64, 64), 3.0, np.float32)
    assert np.allclose(fourier_crop(a, 16), 3.0, atol=1e-5)
    d = np.zeros((64, 64), np.float32)
    d[32, 32] = 1.0
    for m in (32, 16):
        c = fourier_crop(d, m)
        assert np.unravel_index(np.argmax(c), c.shape) == (m // 2, m // 2)
    assert fourier_crop(np.zeros((10, 12)), (5, 6)).shape == (5, 6)


@pytest.mark.parametrize("bin_", [1, 2, 4])
def test_particle_is_centred_at_every_binning(bin_):
    """Noise-free: the extracted particle matches the reference centred at box/2 (< 0.05 px);
    with shot noise, the centre of mass of the average of 12 particles is within 1 px (bin 1)."""
    shape, box = (600, 700), 96
    coords = np.array([[150, 120], [351, 140], [520, 300], [260, 420], [600, 480], [420, 250]], float)
    dens = sum(particle(shape, x, y) for x, y in coords)
    img = 100.0 * (1.0 - 0.3 * dens)  # protein dark
    ref = fourier_crop(particle((box, box), box // 2, box // 2), box // bin_)
    stack = extract_particles(img, coords, box, bin=bin_, bg_radius=0.45 * box / bin_)
    assert stack.shape == (len(coords), box // bin_, box // bin_)
    for im in stack:
        dx, dy = shift_by_xcorr(im, ref)
        assert abs(dx) < 0.05 and abs(dy) < 0.05
        assert im[box // bin_ // 2, box // bin_ // 2] > 3  # protein white after inversion
    if bin_ == 1:
        rng = np.random.default_rng(0)
        many = np.array([[x, y] for x in range(100, 620, 104) for y in (100, 250, 400, 520)], float)[:12]
        noisy = rng.poisson(100.0 * (1.0 - 0.3 * sum(particle(shape, x, y) for x, y in many))).astype(np.float32)
        avg = extract_particles(noisy, many, box).mean(axis=0)
        cx, cy = centre_of_mass(np.where(avg > 0.5 * avg.max(), avg, 0))
        assert abs(cx - box // 2) < 1.0 and abs(cy - box // 2) < 1.0


def test_background_ring_is_normalised_and_ramp_removed():
    rng = np.random.default_rng(1)
    ny, nx = 400, 500
    yy, xx = np.mgrid[:ny, :nx]
    img = 200 + 0.5 * xx - 0.3 * yy + rng.normal(0, 7.0, (ny, nx))
    coords = rng.uniform(60, 340, (20, 2))
    box = 64
    stack = extract_particles(img, coords, box, bin=2)
    m = box // 2
    y, x = np.mgrid[:m, :m] - m // 2
    bg = np.hypot(x, y) > 0.375 * m
    vals = stack[:, bg]
    assert np.allclose(vals.mean(axis=1), 0, atol=1e-4)
    assert np.allclose(vals.std(axis=1), 1, atol=1e-3)
    # the gradient (several sd across the box) is gone
    slope = np.array([np.polyfit(x[bg], v, 1)[0] for v in vals])
    assert np.abs(slope).max() < 0.01
    # without ramp removal it is still there
    raw = extract_particles(img, coords, box, bin=2, ramp=False)
    assert np.abs([np.polyfit(x[bg], v, 1)[0] for v in raw[:, bg]]).mean() > 0.05


def test_edges_are_skipped_and_contrast_kept_on_request():
    img = np.ones((200, 300), np.float32)
    img[100, 150] = 0.0  # a dark pixel
    coords = np.array([[150, 100], [20, 100], [150, 190], [268, 100], [269, 100]], float)
    keep = box_inside(img.shape, coords, 64)
    assert keep.tolist() == [True, False, False, True, False]
    st = extract_particles(img, coords, 64, normalise=False)
    assert len(st) == 2 and st[0, 32, 32] == 0.0 and st[0, 0, 0] == -1.0
    st = extract_particles(img, coords, 64, invert=False, normalise=False)
    assert st[0, 32, 32] == 0.0 and st[0, 0, 0] == 1.0


def test_box_and_bin_are_checked():
    check_box_bin(96, 4)
    for box, b in ((100, 4), (90, 2), (7, 1)):
        with pytest.raises(InputError):
            check_box_bin(box, b)
    with pytest.raises(InputError):
        normalise_background(np.zeros((1, 16, 16)), bg_radius=20)


def _ctf_star(path, name):
    row = {"rlnMicrographName": name, "rlnDefocusU": 15000.0, "rlnDefocusV": 14200.0, "rlnDefocusAngle": 33.0,
           "rlnPhaseShift": 0.0, "rlnCtfFigureOfMerit": 0.21, "rlnCtfMaxResolution": 4.2, "rlnCtfAstigmatism": 800.0,
           "rlnVoltage": 300.0, "rlnSphericalAberration": 2.7, "rlnAmplitudeContrast": 0.1, "rlnMicrographPixelSize": PIXEL}
    starfile.write({"micrographs": pd.DataFrame([row])}, path, overwrite=True)


def test_cli_extract_writes_relion_stack_and_star(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shape = (512, 640)
    coords = np.array([[100, 100], [300.4, 250.6], [500, 400], [20, 256]], float)  # the last one is too close to the edge
    img = 100.0 * (1.0 - 0.3 * sum(particle(shape, round(x), round(y)) for x, y in coords))
    write_mrc("mic_0001.mrc", img, PIXEL)
    _ctf_star("mic_0001_ctf.star", "mic_0001.mrc")
    picks = pd.DataFrame({"rlnCoordinateX": coords[:, 0], "rlnCoordinateY": coords[:, 1],
                          "rlnAutopickFigureOfMerit": [5.0, 4.0, 3.0, 2.0], "rlnMicrographName": ["mic_0001.mrc"] * 4})
    starfile.write({"particles": picks}, "picks.star", overwrite=True)
    args = ["spa", "extract", "mic_0001.mrc", "--coords", "picks.star", "--ctf", "mic_0001_ctf.star", "--box", "96",
            "--bin", "2", "--out-stack", "Extract/mic_0001.mrcs", "--out-star", "Extract/mic_0001.star"]
    assert main(args) == 0
    hdr = read_header("Extract/mic_0001.mrcs")
    assert hdr["shape"] == (3, 48, 48) and hdr["pixel_size"] == pytest.approx(2 * PIXEL)
    blocks = starfile.read("Extract/mic_0001.star", always_dict=True)
    opt, parts = blocks["optics"].iloc[0], blocks["particles"]
    assert opt.rlnImagePixelSize == pytest.approx(3.0) and opt.rlnImageSize == 48 and opt.rlnImageDimensionality == 2
    assert opt.rlnMicrographOriginalPixelSize == pytest.approx(PIXEL) and opt.rlnVoltage == 300 and opt.rlnOpticsGroup == 1
    assert len(parts) == 3 and (parts.rlnOpticsGroup == 1).all()
    assert np.allclose(parts.rlnCoordinateX, coords[:3, 0]) and np.allclose(parts.rlnCoordinateY, coords[:3, 1])
    assert (parts.rlnDefocusU == 15000.0).all() and (parts.rlnCtfMaxResolution == 4.2).all()
    assert list(parts.rlnAutopickFigureOfMerit) == [5.0, 4.0, 3.0]
    read_particles("Extract/mic_0001.star")  # consistent optics for the STAR layer
    for k, name in enumerate(parts.rlnImageName):
        idx, stack = parse_image_name(name)
        assert idx == k + 1 and stack == "Extract/mic_0001.mrcs" and name.startswith(f"{k + 1:06d}@")
        im, _ = read_stack_images(stack, [idx - 1])
        dx, dy = shift_by_xcorr(im[0], fourier_crop(particle((96, 96), 48, 48), 48))
        assert abs(dx) < 0.05 and abs(dy) < 0.05
    # box from the particle diameter; a wrong box/bin pair exits with status 2
    assert main(args[:7] + ["--particle-diameter", "50", "--bin", "4", "--out-stack", "b.mrcs", "--out-star", "b.star"]) == 0
    assert starfile.read("b.star", always_dict=True)["optics"].rlnImageSize.iloc[0] == 64 // 4
    assert main(args[:7] + ["--box", "100", "--bin", "4", "--out-stack", "c.mrcs", "--out-star", "c.star"]) == 2
    assert not (tmp_path / "c.star").exists()


@pytest.mark.gpu
def test_extract_on_gpu_matches_cpu():
    rng = np.random.default_rng(3)
    img = rng.normal(100, 10, (400, 400)).astype(np.float32)
    coords = rng.uniform(60, 340, (30, 2))
    cpu = extract_particles(img, coords, 64, bin=2)
    gpu = backend.to_host(extract_particles(backend.asarray(img), coords, 64, bin=2))
    assert np.allclose(cpu, gpu, atol=1e-4)


def test_micrograph_without_particles_gives_an_empty_table(tmp_path):
    """No particle inside the micrograph: the job succeeds with an empty particle table."""
    import pandas as pd

    from conveyor.cli import main
    from conveyor.io.mrc import write_mrc
    from conveyor.io.star import read_star, write_star

    mic = tmp_path / "m.mrc"
    write_mrc(mic, np.random.default_rng(0).random((256, 256)).astype("float32"), 2.0)
    write_star(tmp_path / "p.star", {"particles": pd.DataFrame(
        {"rlnCoordinateX": [2.0], "rlnCoordinateY": [3.0], "rlnMicrographName": [str(mic)]})})
    write_star(tmp_path / "c.star", {"micrographs": pd.DataFrame({
        "rlnMicrographName": [str(mic)], "rlnDefocusU": [15000.0], "rlnDefocusV": [15000.0],
        "rlnDefocusAngle": [0.0], "rlnPhaseShift": [0.0], "rlnCtfFigureOfMerit": [0.1],
        "rlnCtfMaxResolution": [5.0], "rlnCtfAstigmatism": [0.0], "rlnVoltage": [300.0],
        "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1], "rlnMicrographPixelSize": [2.0]})})
    rc = main(["spa", "extract", str(mic), "--coords", str(tmp_path / "p.star"), "--ctf", str(tmp_path / "c.star"),
               "--box", "64", "--bin", "2", "--out-stack", str(tmp_path / "s.mrcs"), "--out-star", str(tmp_path / "s.star")])
    assert rc == 0
    blocks = read_star(tmp_path / "s.star")
    assert len(blocks.get("particles", [])) == 0


def test_reextraction_recentres_by_the_origins_and_keeps_one_micrograph(tmp_path, monkeypatch):
    """Particles picked off-centre, with the origins a 2D classification reports for them
    (RELION convention: the shift that centres the image, in Å), are re-extracted centred;
    rows of other micrographs in the same file are ignored, and a micrograph with none of
    the selected particles gets an empty table (not another micrograph's particles)."""
    monkeypatch.chdir(tmp_path)
    shape = (512, 512)
    true = np.array([[120.0, 140.0], [300.0, 260.0], [400.0, 380.0]])
    img = 100.0 * (1.0 - 0.3 * sum(particle(shape, x, y) for x, y in true))
    write_mrc("mic_a.mrc", img, PIXEL)
    write_mrc("mic_b.mrc", img, PIXEL)
    _ctf_star("a_ctf.star", "mic_a.mrc")
    _ctf_star("b_ctf.star", "mic_b.mrc")
    off = np.array([[4.0, -3.0], [-5.0, 2.0], [3.0, 5.0]])  # picks = truth + off (px)
    picked = true + off
    # in a box centred on the pick the particle sits at -off from the centre; RELION's
    # origin is the shift that centres it: +off (px), and the centre is coordinate - origin
    sel = pd.DataFrame({"rlnMicrographName": ["mic_a.mrc"] * 3 + ["mic_c.mrc"],
                        "rlnCoordinateX": list(picked[:, 0]) + [50.0], "rlnCoordinateY": list(picked[:, 1]) + [60.0],
                        "rlnOriginXAngst": list(off[:, 0] * PIXEL) + [0.0],
                        "rlnOriginYAngst": list(off[:, 1] * PIXEL) + [0.0],
                        "rlnClassNumber": [1, 1, 2, 1]})
    starfile.write({"particles": sel}, "selected.star", overwrite=True)
    base = ["spa", "extract", "--coords", "selected.star", "--reextract", "--box", "64", "--bin", "1"]
    assert main(base[:2] + ["mic_a.mrc"] + base[2:] + ["--ctf", "a_ctf.star", "--out-stack", "a.mrcs",
                                                        "--out-star", "a.star"]) == 0
    parts = starfile.read("a.star", always_dict=True)["particles"]
    assert len(parts) == 3
    got = parts[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy(float)
    assert np.abs(got - true).max() < 1e-6
    assert "rlnOriginXAngst" not in parts.columns
    ref = particle((64, 64), 32, 32)
    for k in range(3):
        im, _ = read_stack_images("a.mrcs", [k])
        dx, dy = shift_by_xcorr(im[0], ref)
        assert abs(dx) < 0.5 and abs(dy) < 0.5, (k, dx, dy)
    # mic_b has no selected particle: an empty table, not mic_a's or mic_c's rows
    assert main(base[:2] + ["mic_b.mrc"] + base[2:] + ["--ctf", "b_ctf.star", "--out-stack", "b.mrcs",
                                                        "--out-star", "b.star"]) == 0
    assert len(starfile.read("b.star", always_dict=True).get("particles", [])) == 0
