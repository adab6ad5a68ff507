"""RELION 3.1 adapters: conversions on stored RELION outputs, and real runs (marked ``peer``).

The real runs use tiny data with known ground truth: a 512x512x8 movie of a drifting random
texture, a 512x512 micrograph with 12 dark discs. They are skipped, with the reason, when
the RELION binaries are not on PATH (``apt-get install relion`` on Debian/Ubuntu).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conveyor.cli import main
from conveyor.errors import InputError
from conveyor.io.mrc import read_mrc, write_mrc
from conveyor.io.star import read_particles, read_star, write_star
from conveyor.tools import relion
from conveyor.tools import _contracts as C

DATA = Path(__file__).parent / "data"
HAVE_RELION = all(shutil.which(n) for n in ("relion_run_motioncorr", "relion_autopick", "relion_preprocess"))
needs_relion = pytest.mark.skipif(
    not HAVE_RELION, reason="RELION 3.1 binaries (relion_run_motioncorr, relion_autopick, relion_preprocess) not on "
                            "PATH; install with `apt-get install relion`")

DRIFT = np.array([1.5, -0.8])  # px per frame: where the content of frame f lies relative to frame 1, /(f-1)
N_FRAMES = 8
MIC_PIXEL = 3.0
DIAMETER = 90.0


# --------------------------------------------------------------------------- data


def _shifted(f_ref, kx, ky, dx, dy):
    return np.real(np.fft.ifft2(f_ref * np.exp(-2j * np.pi * (kx * dx + ky * dy))))


@pytest.fixture(scope="module")
def movie(tmp_path_factory) -> Path:
    """512x512x8 movie (1 Å/px) whose frame f content lies at (f-1)*DRIFT px from frame 1's."""
    rng = np.random.default_rng(0)
    n = 512
    ky = np.fft.fftfreq(n)[:, None]
    kx = np.fft.fftfreq(n)[None, :]
    f_ref = np.fft.fft2(rng.normal(size=(n, n))) * np.exp(-(kx ** 2 + ky ** 2) / (2 * 0.08 ** 2))
    frames = []
    for f in range(N_FRAMES):
        dx, dy = f * DRIFT
        fr = _shifted(f_ref, kx, ky, dx, dy)
        fr = fr / fr.std() * 2 + 10
        frames.append(rng.poisson(np.clip(fr, 0, None)).astype(np.float32))
    path = tmp_path_factory.mktemp("movie") / "movie_001.mrc"
    write_mrc(path, np.array(frames), 1.0, volume=False)
    return path


@pytest.fixture(scope="module")
def blobs(tmp_path_factory):
    """512x512 micrograph (3 Å/px) with 12 dark discs of 90 Å, and their centres (x, y) px."""
    rng = np.random.default_rng(1)
    n = 512
    r = DIAMETER / MIC_PIXEL / 2
    pos = []
    while len(pos) < 12:
        p = rng.uniform(50, n - 50, 2)
        if all(np.hypot(*(p - q)) > 4 * r for q in pos):
            pos.append(p)
    pos = np.array(pos)
    y, x = np.mgrid[:n, :n].astype(float)
    img = np.zeros((n, n))
    for px, py in pos:
        img -= 1.0 / (1 + np.exp((np.hypot(x - px, y - py) - r) / 1.5))
    img += rng.normal(scale=0.3, size=img.shape)
    path = tmp_path_factory.mktemp("mic") / "mic_001.mrc"
    write_mrc(path, img.astype(np.float32), MIC_PIXEL)
    return path, pos


@pytest.fixture(scope="module")
def ctf_star(tmp_path_factory) -> Path:
    row = C.ctf_row("mic_001.mrc", 15000, 14000, 30, fom=0.2, max_resolution=6.5, voltage=300, cs=2.7,
                    amplitude_contrast=0.1, pixel_size=MIC_PIXEL)
    path = tmp_path_factory.mktemp("ctf") / "mic_001.star"
    C.write_ctf_star(path, row)
    return path


# --------------------------------------------------------------------------- no RELION needed


def test_parse_patches():
    assert relion.parse_patches("5x5") == (5, 5)
    assert relion.parse_patches("7x5") == (7, 5)
    assert relion.parse_patches("3") == (3, 3)
    assert relion.parse_patches("0") == (1, 1)
    with pytest.raises(InputError, match="NxM"):
        relion.parse_patches("five")


def test_relion_shift_sign_converted_on_stored_output():
    """RELION's stored shifts (-1.46, +0.79 per frame for content moving +1.5, -0.8) become ours."""
    rb = relion.read_relion_motion_star(DATA / "relion" / "motion_5x5.star")
    blocks, shifts = relion.motion_from_relion(rb, movie_name="raw/m1.mrc", pixel_size=1.0, dose_per_frame=1.0,
                                               pre_exposure=0.0, voltage=300.0, binning=1.0)
    truth = np.arange(N_FRAMES)[:, None] * DRIFT
    assert np.abs(shifts - truth).max() < 0.5
    assert shifts[0].tolist() == [0.0, 0.0]
    g = blocks["general"]
    assert list(g) == list(C.GENERAL_LABELS)
    assert g["rlnMicrographMovieName"] == "raw/m1.mrc" and g["rlnMotionModelVersion"] == 1
    # local shifts and model coefficients are negated too
    assert np.allclose(blocks["local_shift"]["rlnMicrographShiftX"], -rb["local_shift"]["rlnMicrographShiftX"])
    assert np.allclose(blocks["local_motion_model"]["rlnMotionModelCoeff"],
                       -rb["local_motion_model"]["rlnMotionModelCoeff"])


def test_motion_command_units():
    cmd = relion.motion_command("relion_run_motioncorr", pixel_size=2.0, voltage=200, dose_per_frame=1.2,
                                pre_exposure=0.5, patches=(5, 5), bfactor=2400, binning=2, gain_mrc="gain.mrc",
                                threads=3)
    s = " ".join(cmd)
    assert "--use_own" in cmd and "--dose_weighting" in cmd and "--save_noDW" in cmd
    assert "--bfactor 150" in s  # 2400 Å² at 2 Å/px = 150 px² (B_px = B_Å / 4p²)
    assert "--patch_x 5 --patch_y 5" in s and "--bin_factor 2" in s and "--j 3" in s
    assert "--gainref gain.mrc --gain_rot 0 --gain_flip 0" in s
    assert "--voltage 200 --dose_per_frame 1.2 --preexposure 0.5" in s


def test_missing_relion_binary_is_a_clear_error(movie, tmp_path):
    with pytest.raises(InputError, match="relion_run_motioncorr.*not found.*apt-get install relion"):
        relion.run_motion(movie, out_sum=tmp_path / "a.mrc", out_sum_nodw=tmp_path / "b.mrc",
                          out_shifts=tmp_path / "a.star", pixel_size=1.0, dose_per_frame=1.0,
                          relion_bin=tmp_path / "nowhere")
    rc = main(["tools", "relion-autopick", str(DATA / "relion" / "autopick_log.star"), "--particle-diameter", "90",
               "--out-star", str(tmp_path / "p.star"), "--relion-bin", str(tmp_path)])
    assert rc == 2


def test_gain_shape_mismatch_is_named(movie, tmp_path):
    gain = tmp_path / "gain.mrc"
    write_mrc(gain, np.ones((512, 256), np.float32), 1.0)
    with pytest.raises(InputError, match="gain reference .* 512x256 .* frames are 512x512"):
        relion.run_motion(movie, out_sum=tmp_path / "a.mrc", out_sum_nodw=tmp_path / "b.mrc",
                          out_shifts=tmp_path / "a.star", pixel_size=1.0, dose_per_frame=1.0, gain=gain,
                          relion_bin=tmp_path / "nowhere")


def test_extract_without_particles_inside_writes_empty_outputs(blobs, ctf_star, tmp_path):
    """No RELION run when no box fits: an empty stack and a STAR with the contract's columns."""
    mic, _ = blobs
    coords = tmp_path / "c.star"
    C.write_picks_star(coords, C.picks_table([5.0], [5.0], [1.0], str(mic)))
    t = relion.run_extract(mic, coords=coords, ctf=ctf_star, box=64, binning=2, out_stack=tmp_path / "e.mrcs",
                           out_star=tmp_path / "e.star", relion_bin=tmp_path / "nowhere")
    assert len(t) == 0
    particles, optics = read_particles(tmp_path / "e.star")
    assert list(particles.columns) == list(C.PARTICLE_LABELS) and len(particles) == 0
    assert int(optics["rlnImageSize"].iloc[0]) == 32


# --------------------------------------------------------------------------- real RELION runs


@pytest.mark.peer
@needs_relion
def test_relion_motion_recovers_drift(movie, tmp_path, capsys):
    out = tmp_path / "motion"
    rc = main([
        "tools", "relion-motion", str(movie), "--out-sum", str(out / "m.mrc"), "--out-sum-nodw",
        str(out / "m_noDW.mrc"), "--out-shifts", str(out / "m.star"), "--out-plot", str(out / "m.png"),
        "--pixel-size", "1.0", "--voltage", "300", "--dose-per-frame", "1.0", "--patches", "0",
        "--bfactor", "150", "--frames", str(N_FRAMES), "--threads", "2",
    ])
    assert rc == 0, capsys.readouterr().err
    for name in ("m.mrc", "m_noDW.mrc", "m.star", "m.png"):
        assert (out / name).stat().st_size > 0
    dw, ps = read_mrc(out / "m.mrc")
    nodw, ps2 = read_mrc(out / "m_noDW.mrc")
    assert dw.shape == nodw.shape == (512, 512) and ps == ps2 == pytest.approx(1.0)
    blocks = read_star(out / "m.star")
    assert set(C.GENERAL_LABELS) <= set(blocks["general"].columns)
    gs = blocks["global_shift"]
    shifts = gs[["rlnMicrographShiftX", "rlnMicrographShiftY"]].to_numpy(float)
    truth = np.arange(N_FRAMES)[:, None] * DRIFT
    assert np.abs(shifts - truth).max() < 1.0  # Conveyor's sign: where the content lies
    # the aligned sum is sharp: it matches frame 1 better than the plain sum does
    frames, _ = read_mrc(movie)
    plain = frames.sum(0)
    ref = frames[0]
    def cc(a, b):
        return np.corrcoef(a[64:-64, 64:-64].ravel(), b[64:-64, 64:-64].ravel())[0, 1]
    assert cc(nodw, ref) > cc(plain, ref) + 0.05


@pytest.mark.peer
@needs_relion
def test_relion_motion_applies_the_gain(movie, tmp_path):
    """A gain of 2 (given rotated: 1 turn, flipped) doubles the sums; the drift is unchanged."""
    gain = np.full((512, 512), 2.0, np.float32)
    write_mrc(tmp_path / "gain.mrc", gain, 1.0)
    r = relion.run_motion(movie, out_sum=tmp_path / "g.mrc", out_sum_nodw=tmp_path / "g_noDW.mrc",
                          out_shifts=tmp_path / "g.star", pixel_size=1.0, dose_per_frame=1.0, patches="0",
                          gain=tmp_path / "gain.mrc", gain_rot=1, gain_flip="x", threads=2)
    frames, _ = read_mrc(movie)
    nodw, _ = read_mrc(tmp_path / "g_noDW.mrc")
    assert nodw.mean() / frames.sum(0).mean() == pytest.approx(2.0, rel=0.01)
    assert np.abs(r["shifts"] - np.arange(N_FRAMES)[:, None] * DRIFT).max() < 1.0


@pytest.mark.peer
@needs_relion
def test_relion_failure_names_the_movie_and_the_log(movie, tmp_path):
    """RELION's own dose weighting only knows 100, 200 and 300 kV: its error reaches the user in one line."""
    with pytest.raises(InputError) as err:
        relion.run_motion(movie, out_sum=tmp_path / "a.mrc", out_sum_nodw=tmp_path / "b.mrc",
                          out_shifts=tmp_path / "a.star", pixel_size=1.0, voltage=120, dose_per_frame=1.0,
                          patches="0", work_dir=tmp_path / "work")
    msg = str(err.value)
    assert msg.startswith(str(movie)) and "relion_run_motioncorr" in msg and "dose weighting is supported only for" in msg
    assert "Backtrace" not in msg and "0x" not in msg
    assert (tmp_path / "work" / "relion.log").exists()
    assert not (tmp_path / "a.mrc").exists()


@pytest.mark.peer
@needs_relion
def test_relion_autopick_finds_the_discs(blobs, tmp_path):
    mic, pos = blobs
    t = relion.run_autopick(mic, particle_diameter=DIAMETER, out_star=tmp_path / "p.star", out_png=tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0
    table = read_star(tmp_path / "p.star")["particles"]
    assert list(table.columns) == list(C.PICK_LABELS)
    assert (table["rlnMicrographName"] == str(mic)).all()
    xy = table[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy(float)
    d = np.hypot(*(xy[:, None, :] - pos[None, :, :]).transpose(2, 0, 1))
    tol = 0.25 * DIAMETER / MIC_PIXEL  # 7.5 px
    found = (d.min(axis=0) < tol).sum()
    false = (d.min(axis=1) >= tol).sum()
    assert found >= 11 and false <= 1, (found, false)
    assert len(t) == len(table)


@pytest.mark.peer
@needs_relion
def test_relion_extract_meets_the_contract(blobs, ctf_star, tmp_path):
    mic, pos = blobs
    coords = tmp_path / "c.star"
    xy = np.vstack([pos, [[10.0, 10.0]]])  # the last one is too close to the edge for a 64-px box
    C.write_picks_star(coords, C.picks_table(xy[:, 0], xy[:, 1], np.arange(len(xy), dtype=float), str(mic)))
    rc = main(["tools", "relion-extract", str(mic), "--coords", str(coords), "--ctf", str(ctf_star), "--box", "64",
               "--bin", "2", "--out-stack", str(tmp_path / "e.mrcs"), "--out-star", str(tmp_path / "e.star"),
               "--particle-diameter", str(DIAMETER)])
    assert rc == 0
    stack, ps = read_mrc(tmp_path / "e.mrcs")
    assert stack.shape == (len(pos), 32, 32) and ps == pytest.approx(2 * MIC_PIXEL)
    particles, optics = read_particles(tmp_path / "e.star")
    assert list(particles.columns) == list(C.PARTICLE_LABELS)
    assert list(optics.columns) == ["rlnOpticsGroupName", "rlnOpticsGroup", "rlnMicrographOriginalPixelSize",
                                    "rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast",
                                    "rlnImagePixelSize", "rlnImageSize", "rlnImageDimensionality"]
    assert float(optics["rlnImagePixelSize"].iloc[0]) == pytest.approx(6.0) and int(optics["rlnImageSize"].iloc[0]) == 32
    assert particles["rlnImageName"].iloc[0] == f"000001@{tmp_path / 'e.mrcs'}"
    assert np.allclose(particles[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy(float), pos)  # unbinned px
    assert np.allclose(particles["rlnAutopickFigureOfMerit"], np.arange(len(pos)))
    assert (particles["rlnDefocusU"] == 15000).all() and (particles["rlnOpticsGroup"] == 1).all()
    # protein white, background ring normalised, particle centred in the box
    r = np.hypot(*(np.mgrid[:32, :32] - 16))
    bg = stack[:, r > 12]
    assert abs(bg.mean()) < 0.05 and bg.std() == pytest.approx(1.0, abs=0.05)
    assert stack[:, r < 4].mean() > 3
    w = np.clip(stack.mean(0), 0, None)
    yy, xx = np.mgrid[:32, :32]
    assert abs((w * xx).sum() / w.sum() - 16) < 1 and abs((w * yy).sum() / w.sum() - 16) < 1


def test_contract_writers_round_trip(tmp_path):
    """What the adapters write reads back through conveyor.io.star with the contract labels."""
    row = C.ctf_row("m.mrc", 14000, 15000, 100, fom=0.3, max_resolution=4, voltage=300, cs=2.7,
                    amplitude_contrast=0.1, pixel_size=1.0)
    assert row["rlnDefocusU"] == 15000 and row["rlnDefocusAngle"] == pytest.approx(10.0)  # swapped, +90-180
    C.write_ctf_star(tmp_path / "c.star", row)
    t = read_star(tmp_path / "c.star")["micrographs"]
    assert list(t.columns) == list(C.CTF_LABELS) and len(t) == 1
    blocks = C.motion_blocks({k: 1 for k in C.GENERAL_LABELS}, np.zeros((3, 2)))
    C.write_motion_star(tmp_path / "m.star", blocks)
    back = read_star(tmp_path / "m.star")
    assert set(back) == {"general", "global_shift"} and len(back["global_shift"]) == 3
    write_star(tmp_path / "x.star", {"particles": pd.DataFrame({"rlnCoordinateX": [1.0]})})
