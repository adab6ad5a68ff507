"""Smoke test of ``conveyor bench spi`` at tiny size (native steps only; no timing thresholds)."""

from __future__ import annotations

import json
import math

from conveyor.cli import main


def _pos(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_bench_spi_smoke(tmp_path, capsys):
    out = tmp_path / "report.json"
    rc = main(["bench", "spi", "--frames", "60", "--detector", "64", "--num-div", "2", "--iterations", "1",
               "--no-peers", "--out", str(out)])
    assert rc == 0
    r = json.loads(out.read_text())
    assert r["benchmark"] == "spi"
    assert r["data"]["frames"] == 60
    pre = r["preprocess"]
    assert set(pre["native"]["steps"]) == {"hits", "center", "size"}
    for key in ("wall_s", "cpu_s", "frames_per_s", "maxrss_mib"):
        assert _pos(pre["native"][key]), key
    acc = pre["native"]["accuracy"]
    assert 0.0 <= acc["f1"] <= 1.0
    assert acc["median_diameter_error_pct"] is None or math.isfinite(acc["median_diameter_error_pct"])
    assert pre["peer"]["skipped"] == "--no-peers"
    emc = r["emc"]
    assert emc["frames"] > 0 and emc["rotations"] > 0
    for key in ("s_per_iteration", "wall_s", "cpu_s", "maxrss_mib"):
        assert _pos(emc["native"][key]), key
    assert emc["peer"]["skipped"] == "--no-peers"
    text = capsys.readouterr().out
    assert "SPI pre-processing" in text and "EMC" in text
