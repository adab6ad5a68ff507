"""SPI pre-processing and EMC, native against the peer tools, on one simulated CXI file with known truth.

What runs (every step in its own process, so its peak memory is its own):

* pre-processing (stages 1-3 of the pipeline): ``conveyor spi hits``, ``conveyor spi center``
  and ``conveyor spi size`` in sequence, against ``conveyor tools spi-processing`` (the
  spi_processing package's hit finding, centre refinement and size estimation) on the same
  file. Reported: total wall and CPU time, frames/s, peak memory, and accuracy against
  ``truth/frames.csv``: hit F1 and the median |diameter error| (%) over the true single hits
  found and sized by the tool; the ratio is peer time / ours.
* EMC: the same selected frames (the true single hits of the right size, written as a
  ``file,frame`` CSV) through ``conveyor spi emc`` and ``conveyor tools dragonfly-emc`` with
  the same ``--num-div``, ``--iterations``, start model, seed, threads and pixels (those
  within the largest circle about the beam centre inside the detector, the Dragonfly
  adapter's default, passed to both as ``--max-radius-px``). Reported: seconds per
  iteration (mean of the ``seconds`` column of each ``log.csv``, else wall time /
  iterations) and the ratio Dragonfly / ours.

Native commands run as ``python -m conveyor --threads N ...`` with the BLAS/OpenMP thread
variables also set to ``--threads``; the times include starting Python. Peers are skipped,
with a message, when their programs are not installed (or with ``--no-peers``).

Run it as ``conveyor bench spi`` (see :mod:`conveyor.commands.bench_spi`).
"""

from __future__ import annotations

import csv
import shutil
import sys
import tempfile
from pathlib import Path

from . import Measurement, device_info, fmt, new_report, ratio, run_measured, table, thread_env


def _conveyor(*args) -> list:
    return [sys.executable, "-m", "conveyor", *map(str, args)]


def _step(m: Measurement) -> dict:
    return {"wall_s": m.wall_s, "cpu_s": m.cpu_s, "maxrss_mib": m.maxrss_mib}


def hit_f1(predicted, truth) -> dict:
    """F1, precision and recall of per-frame hit flags against the truth."""
    import numpy as np  # noqa: PLC0415

    p = np.asarray(predicted, bool)
    t = np.asarray(truth, bool)
    tp = int((p & t).sum())
    prec = tp / p.sum() if p.sum() else 0.0
    rec = tp / t.sum() if t.sum() else 0.0
    f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
    return {"f1": float(f1), "precision": float(prec), "recall": float(rec), "hits": int(p.sum()),
            "true_hits": int(t.sum())}


def size_accuracy(table_path, truth) -> dict:
    """Hit F1 and the median |diameter error| (%) of a per-frame table against the truth rows of its file."""
    import numpy as np  # noqa: PLC0415

    from ..spi.frames import read_frames  # noqa: PLC0415

    df = read_frames(table_path).set_index("frame")
    tr = truth.set_index("frame").reindex(df.index)
    acc = hit_f1(df["is_hit"].to_numpy(bool), tr["is_hit"].to_numpy(bool))
    d = df["diameter_nm"].to_numpy(float) if "diameter_nm" in df else np.full(len(df), np.nan)
    single = tr["is_single"].to_numpy(bool) & df["is_hit"].to_numpy(bool) & np.isfinite(d) & (d > 0)
    err = np.abs(d[single] - tr["diameter_nm"].to_numpy(float)[single]) / tr["diameter_nm"].to_numpy(float)[single]
    acc["sized_single_hits"] = int(single.sum())
    acc["median_diameter_error_pct"] = float(np.median(err) * 100) if len(err) else None
    return acc


def inscribed_radius(shots) -> float:
    """Radius (px) of the largest circle about the beam centre inside the detector of a CXI file.

    The pixel set of both EMC runs: the Dragonfly adapter's default (every ring complete),
    given to ``conveyor spi emc`` as ``--max-radius-px``.
    """
    from ..io.cxi import read_cxi  # noqa: PLC0415
    from ..spi.detector import DetectorGeometry  # noqa: PLC0415

    geom = DetectorGeometry.from_shots(read_cxi(shots, lazy=True, load_extra=False))
    (bx, by), (ny, nx) = geom.beam_center_px, geom.shape
    return float(min(bx, by, nx - 1 - bx, ny - 1 - by))


def _log_seconds(path) -> list[float]:
    try:
        with open(path, newline="") as fh:
            return [float(r["seconds"]) for r in csv.DictReader(fh) if r.get("seconds") not in (None, "")]
    except (OSError, KeyError, ValueError):
        return []


def _emc_entry(m: Measurement, out_dir: Path, iterations: int) -> dict:
    secs = _log_seconds(out_dir / "log.csv")
    e = _step(m)
    if secs:
        e["s_per_iteration"] = sum(secs) / len(secs)
        e["s_per_iteration_source"] = "log.csv seconds"
        e["iterations_logged"] = len(secs)
    else:
        e["s_per_iteration"] = m.wall_s / max(iterations, 1)
        e["s_per_iteration_source"] = "wall / iterations"
    return e


def run_benchmark(*, frames: int = 400, detector: int = 128, threads: int = 1, iterations: int = 1, num_div: int = 4,
                  peers: bool = True, seed: int = 0, workdir=None, keep: bool = False, argv=None,
                  log=lambda msg: None) -> dict:
    import pandas as pd  # noqa: PLC0415

    from ..simulate.spi import simulate_spi  # noqa: PLC0415
    from ..tools import dragonfly, spi_processing  # noqa: PLC0415

    report = new_report("spi", argv)
    report["machine"] = device_info("cpu")
    report["parameters"] = {"frames": frames, "detector": detector, "threads": threads, "iterations": iterations,
                            "num_div": num_div, "seed": seed}
    tmp = None
    if workdir is None:
        tmp = tempfile.mkdtemp(prefix="conveyor-bench-spi-")
        work = Path(tmp)
    else:
        work = Path(workdir)
        work.mkdir(parents=True, exist_ok=True)
    env = thread_env(threads)
    try:
        log(f"simulating {frames} frames on a {detector} px detector in {work}")
        sim = simulate_spi(work / "sim", n_files=1, frames_per_file=frames, detector=detector, seed=seed,
                           beamstop_radius_px=min(18.0, 0.14 * detector))
        shots = Path(sim["shots"][0])
        truth_all = pd.read_csv(sim["frames_csv"])
        truth = truth_all[truth_all["file"].astype(str).map(lambda s: Path(s).name) == shots.name]
        if truth.empty:
            truth = truth_all
        n = len(truth)
        report["data"] = {"shots": shots.name, "frames": n, "true_hits": int(truth["is_hit"].sum()),
                          "true_single_hits": int(truth["is_single"].sum())}

        # -- pre-processing ------------------------------------------------------------------
        pre: dict = {}
        d = work / "native"
        d.mkdir(exist_ok=True)
        steps = {}
        for name, cmd in (
            ("hits", _conveyor("--threads", threads, "spi", "hits", shots, "--out", d / "hits.h5")),
            ("center", _conveyor("--threads", threads, "spi", "center", shots, "--frames", d / "hits.h5",
                                 "--out", d / "center.h5")),
            ("size", _conveyor("--threads", threads, "spi", "size", shots, "--frames", d / "center.h5",
                               "--out", d / "size.h5")),
        ):
            log(f"native spi {name}")
            steps[name] = _step(run_measured(cmd, env=env).check(f"conveyor spi {name}"))
        wall = sum(s["wall_s"] for s in steps.values())
        cpu = sum(s["cpu_s"] for s in steps.values())
        pre["native"] = {"steps": steps, "wall_s": wall, "cpu_s": cpu, "frames_per_s": n / wall,
                         "frames_per_cpu_s": n / cpu if cpu > 0 else None,
                         "maxrss_mib": max(s["maxrss_mib"] for s in steps.values()),
                         "accuracy": size_accuracy(d / "size.h5", truth)}
        if not peers:
            pre["peer"] = {"skipped": "--no-peers"}
        elif not spi_processing.available():
            pre["peer"] = {"skipped": "spi_processing scripts not found (install the spi_processing package)"}
        else:
            log("conveyor tools spi-processing")
            p = work / "peer"
            p.mkdir(exist_ok=True)
            m = run_measured(_conveyor("tools", "spi-processing", shots, "--out", p / "size.h5"), env=env)
            m.check("conveyor tools spi-processing")
            pre["peer"] = {"tool": "spi_processing", "version": spi_processing.package_version("spi_processing"),
                           **_step(m), "frames_per_s": n / m.wall_s,
                           "frames_per_cpu_s": n / m.cpu_s if m.cpu_s > 0 else None,
                           "accuracy": size_accuracy(p / "size.h5", truth)}
            pre["ratio_wall"] = ratio(m.wall_s, wall)
            pre["ratio_cpu"] = ratio(m.cpu_s, cpu)
        if pre["peer"].get("skipped"):
            log(f"peer pre-processing skipped: {pre['peer']['skipped']}")
        report["preprocess"] = pre

        # -- EMC -----------------------------------------------------------------------------
        emc: dict = {}
        sel = truth[truth["is_single"].astype(bool) & ~truth["is_wrong_size"].astype(bool)]
        sel_csv = work / "selected.csv"
        with open(sel_csv, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["file", "frame"])
            for fr in sel["frame"]:
                w.writerow([shots.name, int(fr)])
        emc["frames"] = len(sel)
        emc["rotations"] = dragonfly.num_rotations(num_div)
        radius = inscribed_radius(shots)
        emc["max_radius_px"] = radius
        common = ["--shots", shots, "--selected-frames", sel_csv, "--num-div", num_div, "--iterations", iterations,
                  "--init", "radial", "--seed", seed, "--max-radius-px", f"{radius:.6g}"]
        log(f"native spi emc: {len(sel)} frames, num_div {num_div}, {iterations} iteration(s), "
            f"pixels within {radius:.1f} px")
        out = work / "emc_native"
        m = run_measured(_conveyor("--threads", threads, "spi", "emc", *common, "--out-dir", out),
                         env=env).check("conveyor spi emc")
        emc["native"] = _emc_entry(m, out, iterations)
        if not peers:
            emc["peer"] = {"skipped": "--no-peers"}
        elif not dragonfly.available():
            emc["peer"] = {"skipped": "Dragonfly not found (dragonfly.emc and the dragonfly package)"}
        else:
            log("conveyor tools dragonfly-emc")
            out = work / "emc_dragonfly"
            m = run_measured(_conveyor("tools", "dragonfly-emc", *common, "--out-dir", out, "--threads", threads),
                             env=env).check("conveyor tools dragonfly-emc")
            emc["peer"] = {"tool": "Dragonfly", **_emc_entry(m, out, iterations)}
            emc["ratio_s_per_iteration"] = ratio(emc["peer"]["s_per_iteration"], emc["native"]["s_per_iteration"])
            emc["ratio_wall"] = ratio(emc["peer"]["wall_s"], emc["native"]["wall_s"])
        if emc["peer"].get("skipped"):
            log(f"peer EMC skipped: {emc['peer']['skipped']}")
        report["emc"] = emc
    finally:
        if tmp is not None and not keep:
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp is not None:
            report["workdir"] = tmp
    if workdir is not None:
        report["workdir"] = str(workdir)
    return report


def format_report(r: dict) -> str:
    pre, emc = r["preprocess"], r["emc"]
    nat, peer = pre["native"], pre["peer"]
    acc = nat["accuracy"]
    rows = [["ours (spi hits+center+size)", fmt(nat["wall_s"]), fmt(nat["cpu_s"]), fmt(nat["frames_per_s"], ".1f"),
             fmt(nat["maxrss_mib"], ".0f"), fmt(acc["f1"], ".3f"), fmt(acc["median_diameter_error_pct"], ".2f"), ""]]
    if "skipped" in peer:
        rows.append([f"spi_processing: skipped ({peer['skipped']})", "", "", "", "", "", "", ""])
    else:
        pa = peer["accuracy"]
        rows.append(["spi_processing", fmt(peer["wall_s"]), fmt(peer["cpu_s"]), fmt(peer["frames_per_s"], ".1f"),
                     fmt(peer["maxrss_mib"], ".0f"), fmt(pa["f1"], ".3f"), fmt(pa["median_diameter_error_pct"], ".2f"),
                     fmt(pre.get("ratio_wall"))])
    p = r["parameters"]
    out = [f"SPI pre-processing: {r['data']['frames']} frames, {p['detector']} px, {p['threads']} thread(s)",
           table(rows, ["", "wall s", "CPU s", "frames/s", "peak MiB", "hit F1", "|dD| %", "peer/ours"]), ""]
    rows = []
    for label, e in (("ours (spi emc)", emc["native"]), ("Dragonfly", emc["peer"])):
        if "skipped" in e:
            rows.append([f"{label}: skipped ({e['skipped']})", "", "", "", "", ""])
            continue
        rows.append([label, fmt(e["s_per_iteration"], ".3f"), fmt(e["wall_s"]), fmt(e["cpu_s"]),
                     fmt(e["maxrss_mib"], ".0f"), fmt(emc.get("ratio_s_per_iteration")) if label == "Dragonfly" else ""])
    out += [f"EMC: {emc['frames']} frames, num_div {p['num_div']} ({emc['rotations']} rotations), "
            f"{p['iterations']} iteration(s), pixels within {emc['max_radius_px']:.1f} px of the beam",
            table(rows, ["", "s/iteration", "wall s", "CPU s", "peak MiB", "peer/ours"])]
    return "\n".join(out)

