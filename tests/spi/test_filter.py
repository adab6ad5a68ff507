"""Frame selection, the per-frame table and the whole ``conveyor spi`` chain against truth."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from conveyor.errors import InputError
from conveyor.spi import filter as fl
from conveyor.spi import size as sz
from conveyor.spi.frames import read_frames, write_frames

from . import DISTANCE_M, PIXEL_M, WAVELENGTH_M, detector_mask, f1_score, make_frames, simulated, sphere_pattern

GEOM = dict(pixel_size_m=PIXEL_M, distance_m=DISTANCE_M, wavelength_m=WAVELENGTH_M)
CENTER = (101.3, 98.6)
WINDOW = (63.0, 77.0)  # PR772: 70 nm +-10 %
N = 100


def _offsets(rng, n, lo, hi):
    dist = rng.uniform(lo, hi, n)
    ang = rng.uniform(0, 2 * np.pi, n)
    return dist * np.cos(ang), dist * np.sin(ang)


@pytest.fixture(scope="module")
def populations():
    """Sized frames of four kinds, 300-3000 signal photons per particle on the good pixels."""
    rng = np.random.default_rng(50)
    mask = detector_mask()
    photons = 10 ** rng.uniform(np.log10(300), np.log10(3000), N)
    sets = {}
    sets["single"] = make_frames(rng, rng.normal(70, 2, N), photons, center=CENTER, in_mask=True)[0]
    wrong = np.where(rng.random(N) < 0.5, rng.uniform(35, 55, N), rng.uniform(88, 130, N))
    sets["wrong_size"] = make_frames(rng, wrong, photons, center=CENTER, in_mask=True)[0]
    # two particles of the sample's size, 100-300 nm apart in one coherent beam
    ox, oy = _offsets(rng, N, 100, 300)
    multi = [[(rng.normal(70, 2), ox[i], oy[i])] for i in range(N)]
    sets["coherent_pair"] = make_frames(rng, rng.normal(70, 2, N), 2 * photons, center=CENTER, multi=multi, in_mask=True)[0]
    # two particles of sizes >= 15 % apart, the second giving 30-100 % of the first's photons
    d1 = rng.uniform(40, 100, N)
    d2 = d1 * np.where(rng.random(N) < 0.5, rng.uniform(0.6, 0.85, N), rng.uniform(1 / 0.85, 1 / 0.6, N))
    w = rng.uniform(0.3, 1.0, N)
    data = np.empty((N,) + mask.shape, dtype=np.float32)
    for i in range(N):
        p1 = sphere_pattern(mask.shape, CENTER, [d1[i]])
        p2 = sphere_pattern(mask.shape, CENTER, [d2[i]])
        pat = p1 / (p1 * mask).sum() + w[i] * p2 / (p2 * mask).sum()
        data[i] = rng.poisson(0.002 + 2 * photons[i] * pat / (1 + w[i])) * mask
    sets["incoherent_pair"] = data
    tables = {}
    for name, frames in sets.items():
        res = sz.size_frames(frames, mask, CENTER, background=0.002, **GEOM)
        tables[name] = pd.DataFrame({
            "frame": np.arange(N), "is_hit": True, "diameter_nm": res.diameter_nm, "size_score": res.size_score,
            "size_misfit": res.size_misfit, "multi_score": res.multi_score,
        })
    return tables


def test_right_size_singles_pass(populations):
    res = fl.select_frames(populations["single"], *WINDOW)
    assert res.passed.mean() >= 0.9, res.removed


@pytest.mark.parametrize("kind", ["wrong_size", "coherent_pair", "incoherent_pair"])
def test_wrong_size_and_multiple_hits_are_removed(populations, kind):
    res = fl.select_frames(populations[kind], *WINDOW)
    assert 1 - res.passed.mean() >= 0.9, res.removed


def test_coherent_pairs_fail_on_the_multiple_hit_score(populations):
    # same size as the singles: the window cannot see them, the Patterson lobes can
    res = fl.select_frames(populations["coherent_pair"], *WINDOW, max_multi=None)
    assert res.passed.mean() > 0.5
    assert res.removed["size_window"] < 0.2 * N


def test_selection_counts_and_switches():
    df = pd.DataFrame({
        "frame": np.arange(6),
        "is_hit": [False, True, True, True, True, True],
        "diameter_nm": [np.nan, np.nan, 50.0, 70.0, 70.0, 70.0],
        "size_score": [np.nan, np.nan, 5.0, 1.1, 5.0, 5.0],
        "size_misfit": [np.nan, np.nan, 0.0, 0.0, 0.0, 0.0],
        "multi_score": [np.nan, np.nan, 2.0, 2.0, 20.0, 2.0],
    })
    res = fl.select_frames(df, 60, 80)
    assert res.passed.tolist() == [False, False, False, False, False, True]
    assert res.removed == {"not_hit": 1, "not_sized": 1, "size_window": 1, "size_score": 1, "misfit": 0, "multiple": 1}
    loose = fl.select_frames(df, 60, 80, min_score=None, max_multi=None)
    assert loose.passed.tolist() == [False, False, False, True, True, True]
    with pytest.raises(InputError):
        fl.select_frames(df, 80, 60)
    with pytest.raises(InputError):
        fl.select_frames(df.drop(columns="diameter_nm"), 60, 80)


def test_frames_table_round_trip(tmp_path):
    df = pd.DataFrame({"frame": [0, 1, 2], "photons": [10.0, 2e4, 3.5], "lit_pixels": [9, 1000, 3],
                       "is_hit": [False, True, False], "diameter_nm": [np.nan, 71.2, np.nan], "extra": [1.0, 2.0, 3.0]})
    attrs = {"source": "/data/run_001.cxi", "run": "run_001", "hit_threshold": 123.5, "hit_threshold_auto": True,
             "beam_center_file_px": [64.8, 62.7], "size_rmin_px": None}
    path = write_frames(tmp_path / "t.h5", df, attrs)
    back = read_frames(path)
    pd.testing.assert_frame_equal(back, df, check_dtype=False)
    assert back["is_hit"].dtype == bool and back["frame"].dtype == np.int64
    assert back.attrs["run"] == "run_001" and back.attrs["hit_threshold"] == 123.5
    assert back.attrs["beam_center_file_px"] == [64.8, 62.7] and back.attrs["size_rmin_px"] is None
    assert [p.name for p in tmp_path.iterdir()] == ["t.h5"]  # no temporary file left
    with pytest.raises(InputError):
        read_frames(tmp_path / "missing.h5")
    with pytest.raises(InputError):
        write_frames(tmp_path / "bad.h5", df.drop(columns="frame"))
    assert not (tmp_path / "bad.h5").exists()


def test_histogram_png(tmp_path):
    rng = np.random.default_rng(0)
    d = np.concatenate([rng.normal(70, 2, 50), rng.normal(50, 1, 10), [np.nan]])
    passed = (d > 63) & (d < 77)
    out = fl.plot_size_histogram(tmp_path / "hist.png", d, passed, 63, 77, title="test")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pipeline_on_simulated_shots(tmp_path_factory, tmp_path):
    """hits -> center -> size -> filter on the simulator's capsids: every step against truth."""
    from conveyor.cli import main

    paths, truth = simulated(tmp_path_factory)
    shots = paths["shots"][0]
    t = truth[truth.file == shots.name].sort_values("frame").reset_index(drop=True)
    f = {k: tmp_path / f"{k}.h5" for k in ("hits", "center", "size")}
    assert main(["spi", "hits", str(shots), "--out", str(f["hits"])]) == 0
    assert main(["spi", "center", str(shots), "--frames", str(f["hits"]), "--out", str(f["center"]), "--per-frame"]) == 0
    assert main(["spi", "size", str(shots), "--frames", str(f["center"]), "--out", str(f["size"])]) == 0
    out_dir = tmp_path / "filtered"
    plot = tmp_path / "sizes.png"
    assert main(["spi", "filter", "--frames", str(f["size"]), "--out-dir", str(out_dir), "--dmin-nm", "63",
                 "--dmax-nm", "77", "--out-plot", str(plot)]) == 0
    df = read_frames(out_dir / f"{shots.stem}.h5")
    for col in ("frame", "photons", "lit_pixels", "hit_score", "is_hit", "center_x", "center_y", "diameter_nm",
                "size_score", "passed"):
        assert col in df.columns
    assert df.attrs["source"] == str(shots.resolve()) and df.attrs["filter_dmin_nm"] == 63.0
    assert f1_score(df["is_hit"], t["is_hit"].astype(bool)) >= 0.98
    hit = df["is_hit"].to_numpy()
    cerr = np.hypot(df["center_x"] - t["center_x"], df["center_y"] - t["center_y"])[hit]
    assert np.median(cerr) < 0.5  # per-frame centres
    good = (t["is_single"].astype(bool) & ~t["is_wrong_size"].astype(bool)).to_numpy() & hit
    derr = df["diameter_nm"][good] / t["diameter_nm"][good] - 1
    assert np.max(np.abs(derr)) <= 0.03
    assert df["passed"][good].mean() >= 0.9
    wrong = (t["is_single"].astype(bool) & t["is_wrong_size"].astype(bool)).to_numpy()
    assert wrong.sum() >= 5 and 1 - df["passed"][wrong].mean() >= 0.9
    assert not df["passed"][~t["is_hit"].astype(bool)].any()
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["total"]["passed"] == int(df["passed"].sum())
    assert summary["runs"][shots.stem]["removed"]["size_window"] >= wrong.sum() * 0.9
    assert plot.read_bytes()[:4] == b"\x89PNG"
