"""Smoke test of `conveyor bench spa-classify`: a tiny run, the report's structure and finite figures.

No timing thresholds (the benchmark measures ratios within one run). RELION's side runs
when ``relion_refine`` is on PATH and is left out otherwise.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from conveyor.bench.spa_classify import accuracy, normalised_mutual_information, purity
from conveyor.cli import main

HAVE_RELION = shutil.which("relion_refine") is not None


def finite(x) -> bool:
    return x is not None and math.isfinite(float(x))


def test_accuracy_figures():
    labels = np.array([0, 0, 0, 1, 1, 1, -1, -1])
    same = np.array([2, 2, 2, 1, 1, 1, 3, 3])
    assert purity(same, labels) == 1.0 and normalised_mutual_information(same, labels) == pytest.approx(1.0)
    one = np.ones(8, dtype=int)
    assert purity(one, labels) == pytest.approx(3 / 8) and normalised_mutual_information(one, labels) == 0.0
    a = accuracy(same, labels, [10.0, 12.0, 999.0], [3, 3, 2])
    assert a["purity_floor"] == pytest.approx(3 / 8) and a["best_class_resolution_A"] == 10.0
    assert a["median_class_resolution_A"] == pytest.approx(11.0) and a["classes_used"] == 3


def _run(tmp_path, relion: bool) -> dict:
    out = tmp_path / "report.json"
    argv = ["--device", "cpu", "bench", "spa-classify", "--particles", "60", "--box", "48", "--classes", "2",
            "--iterations", "1", "--views", "2", "--out", str(out), "--workdir", str(tmp_path / "work")]
    assert main(argv + ([] if relion else ["--no-relion"])) == 0
    report = json.loads(out.read_text())
    assert report["benchmark"] == "spa-classify" and report["finite"] and report["device"]["device"] == "cpu"
    assert report["params"]["mask_diameter"] <= 0.9 * 48 * 3.0
    sides = ["ours", "relion"] if relion else ["ours"]
    assert sorted(report["sides"]) == sorted(sides)
    for name in sides:
        run, acc = report["sides"][name]["run"], report["sides"][name]["accuracy"]
        for key in ("wall_s", "cpu_s", "peak_rss_mib", "particles_per_s", "particle_iterations_per_s"):
            assert finite(run[key]) and run[key] > 0, (name, key)
        assert 0.0 < acc["purity_floor"] <= acc["purity"] <= 1.0 and 0.0 <= acc["nmi"] <= 1.0
        assert acc["classes_used"] >= 1
    return report


def test_bench_spa_classify_native_only(tmp_path, capsys):
    report = _run(tmp_path, relion=False)
    assert report["ratio"]["wall"] is None
    text = capsys.readouterr().out
    assert "particles/s" in text and "purity" in text


@pytest.mark.peer
@pytest.mark.skipif(not HAVE_RELION, reason="relion_refine not on PATH; install with `apt-get install relion`")
def test_bench_spa_classify_with_relion(tmp_path, capsys):
    report = _run(tmp_path, relion=True)
    assert finite(report["ratio"]["wall"]) and finite(report["ratio"]["cpu"])
    assert "relion_refine" in report["sides"]["relion"]["command"]
    assert "ratio RELION / ours" in capsys.readouterr().out
