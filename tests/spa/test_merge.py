"""Merging per-micrograph CTF, motion and particle files: thresholds, optics groups, readable outputs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import starfile

from conveyor.cli import main
from conveyor.io.mrc import read_stack_images, write_mrc
from conveyor.io.star import parse_image_names, read_particles, write_star
from conveyor.spa.extract import particle_blocks
from conveyor.spa.merge import Thresholds, expand_inputs, merge, motion_drift

#: name, pixel size, defocus U, V, fit resolution (Å), drift steps (px per frame), particles
MICS = [
    ("mic_0001", 1.0, 15000.0, 14500.0, 4.0, (1.0, 0.5), 5),  # good
    ("mic_0002", 1.0, 18000.0, 17800.0, 9.5, (1.0, 0.5), 4),  # CTF fit resolution worse than 8 Å
    ("mic_0003", 1.0, 21000.0, 18000.0, 5.0, (1.0, 0.5), 3),  # astigmatism 3000 Å
    ("mic_0004", 1.0, 12000.0, 11900.0, 3.8, (3.0, 4.0), 6),  # drift 20 × 5 = 100 px
    ("mic_0005", 1.0, 16000.0, 15900.0, 4.5, (1.0, 0.5), 2),  # failed upstream (skipped list)
    ("mic_0006", 1.25, 14000.0, 13900.0, 4.1, (0.6, 0.8), 4),  # good, other pixel size -> 2nd optics group
]


def _write_inputs(root):
    ctf_files, motion_files, part_files = [], [], []
    for name, ps, u, v, res, (sx, sy), n in MICS:
        mic = f"MotionCorr/{name}.mrc"
        row = {"rlnMicrographName": mic, "rlnDefocusU": u, "rlnDefocusV": v, "rlnDefocusAngle": 12.0, "rlnPhaseShift": 0.0,
               "rlnCtfFigureOfMerit": 0.2, "rlnCtfMaxResolution": res, "rlnCtfAstigmatism": u - v, "rlnVoltage": 300.0,
               "rlnSphericalAberration": 2.7, "rlnAmplitudeContrast": 0.1, "rlnMicrographPixelSize": ps}
        ctf = root / f"CtfFind/{name}.star"
        write_star(ctf, {"micrographs": pd.DataFrame([row])})
        ctf_files.append(ctf)
        frames = np.arange(1, 21)
        shifts = pd.DataFrame({"rlnMicrographFrameNumber": frames, "rlnMicrographShiftX": sx * (frames - 1),
                               "rlnMicrographShiftY": sy * (frames - 1)})
        general = pd.DataFrame({"rlnImageSizeX": [256], "rlnImageSizeY": [256], "rlnImageSizeZ": [20],
                                "rlnMicrographMovieName": [f"movies/{name}.tif"], "rlnMicrographOriginalPixelSize": [ps]})
        mot = root / f"MotionCorr/{name}.star"
        write_star(mot, {"general": general, "global_shift": shifts})
        motion_files.append(mot)
        if name == "mic_0005":
            continue  # its branch failed: no particles
        stack = f"Extract/{name}.mrcs"
        write_mrc(root / stack, np.random.default_rng(0).normal(size=(n, 32, 32)), 2 * ps, volume=False)
        coords = pd.DataFrame({"rlnCoordinateX": np.linspace(50, 200, n), "rlnCoordinateY": np.linspace(60, 190, n),
                               "rlnAutopickFigureOfMerit": np.linspace(5, 3, n)})
        blocks = particle_blocks(coords, np.ones(n, bool), stack_name=stack, micrograph_name=mic, ctf=row, box=64, bin=2,
                                 pixel_size=ps)
        part = root / f"Extract/{name}.star"
        write_star(part, blocks)
        part_files.append(part)
    return ctf_files, motion_files, part_files


def test_motion_drift_is_the_path_length(tmp_path):
    _, motion, _ = _write_inputs(tmp_path)
    info = motion_drift(motion[3])
    assert info["drift_px"] == pytest.approx(19 * 5.0)
    assert "movies/mic_0004.tif" in info["keys"] and info["pixel_size"] == 1.0


def test_merge_applies_thresholds_and_groups_optics(tmp_path):
    ctf, motion, parts = _write_inputs(tmp_path)
    res = merge(ctf, motion, parts, skipped=["movies/mic_0005.tif"],
                limits=Thresholds(max_ctf_resolution=8.0, max_drift=50.0, max_astigmatism=1000.0))
    s = res.summary.set_index("micrograph")
    status = {k.split("/")[-1][:8]: v for k, v in s["status"].items()}
    assert status == {"mic_0001": "accepted", "mic_0002": "rejected", "mic_0003": "rejected", "mic_0004": "rejected",
                      "mic_0005": "skipped", "mic_0006": "accepted"}
    reasons = s["reason"].tolist()
    assert "CTF fit resolution 9.50 Å > 8 Å" in reasons
    assert any(r.startswith("astigmatism 3000 Å") for r in reasons) and any(r.startswith("drift 95.0 px") for r in reasons)
    assert s.loc["MotionCorr/mic_0004.mrc", "drift_px"] == pytest.approx(95.0)
    mics = res.micrographs["micrographs"]
    assert len(mics) == 2 and len(res.micrographs["optics"]) == 2
    assert mics["rlnAccumMotionTotal"].tolist() == pytest.approx([19 * np.hypot(1, 0.5) * 1.0, 19 * 1.0 * 1.25])
    p = res.particles["particles"]
    assert len(p) == 5 + 4
    assert sorted(p.rlnOpticsGroup.unique()) == [1, 2] and len(res.particles["optics"]) == 2
    # thresholds off: everything but the skipped one is accepted
    res = merge(ctf, motion, parts, skipped=["mic_0005"])
    assert (res.summary.status == "accepted").sum() == 5 and len(res.particles["particles"]) == 5 + 4 + 3 + 6 + 4


def test_cli_merge_outputs_are_relion_readable(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    ctf, motion, parts = _write_inputs(tmp_path)
    (tmp_path / "ctf.txt").write_text("# CTF files\n" + "\n".join(str(c.relative_to(tmp_path)) for c in ctf) + "\n")
    (tmp_path / "skipped.txt").write_text("movies/mic_0005.tif\n")
    assert expand_inputs(["@ctf.txt"])[0].as_posix() == "CtfFind/mic_0001.star"
    (tmp_path / "parts.txt").write_text("\n".join(str(q) for q in parts[2:]) + "\n")
    args = ["spa", "merge", "--ctf", "@ctf.txt", "--motion", *map(str, motion), "--particles", *map(str, parts[:2]), "@parts.txt",
            "--skipped", "skipped.txt", "--out-micrographs", "micrographs_ctf.star", "--out-particles", "particles.star",
            "--out-summary", "summary.tsv", "--max-ctf-resolution", "8", "--max-drift", "50", "--max-astigmatism", "1000"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "6 micrographs: 2 accepted (9 particles), 3 rejected, 1 skipped" in out
    mics = starfile.read("micrographs_ctf.star", always_dict=True)
    assert set(mics) == {"optics", "micrographs"}
    assert {"rlnMicrographName", "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnCtfMaxResolution",
            "rlnCtfFigureOfMerit", "rlnAccumMotionTotal", "rlnOpticsGroup"} <= set(mics["micrographs"].columns)
    assert {"rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast", "rlnMicrographPixelSize"} <= set(mics["optics"].columns)
    particles, optics = read_particles("particles.star")
    assert len(particles) == 9 and len(optics) == 2
    idx, stacks = parse_image_names(particles.rlnImageName)
    for i, st in zip(idx, stacks):
        assert st.startswith("Extract/")  # image paths kept as given
        read_stack_images(st, [i - 1])  # resolvable
    summary = pd.read_csv("summary.tsv", sep="\t")
    assert list(summary.columns[:4]) == ["micrograph", "status", "reason", "particles"]
    assert summary.set_index("micrograph").loc["MotionCorr/mic_0001.mrc", "particles"] == 5
