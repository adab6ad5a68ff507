"""SPA 2D classification, native against RELION 3.1, on simulated particles with known views.

The particles are :func:`conveyor.spa.selector_training.simulate_particle_stack`'s: projections
of one protein-like model at a few views (each jittered by a few degrees, random in-plane
angle and shift up to 2 px, per-particle CTF, amorphous ice and shot noise) plus a share of
junk (ice, contamination, carbon edges, aggregates). Both sides classify the same stack, with
the same number of classes, iterations and threads, each in its own process:

* ours: ``conveyor spa class2d`` (the pipeline's command, in a fresh Python process with
  ``scipy.fft`` workers and the BLAS/OpenMP thread variables set to ``threads``);
* RELION: ``relion_refine`` with the command line of ``conveyor tools relion-class2d``
  (:func:`conveyor.tools.relion_refine.class2d_command`: the same in-plane step, offset
  range and step, first-iteration limit and mask diameter, ``--j threads``), timed alone:
  the conversion of its outputs to our files is not counted.

Reported per side: wall time, CPU time (``wait4``, children included), peak resident
memory, particles per second (particles / wall time) and particle-iterations per second;
the ratios RELION / ours of wall and CPU time (above 1: ours is faster). Accuracy against
the truth: class *purity* (the share of particles whose class's most common true label --
one of the views, or junk -- is their own; the share of the most common label is the floor
a single class would reach), the normalised mutual information of classes and true labels
(0: unrelated, 1: the same partition), and the best and median resolution of the classes
holding at least 2 % of the particles (each tool's own estimate: SSNR = 1).

Run it as ``conveyor bench spa-classify`` (:mod:`conveyor.commands.bench_spa_classify`).
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from pathlib import Path

#: Simulation defaults: particle diameter (Å), pixel size (Å/px), box (px), mask diameter (Å; at most 0.9 × box).
DIAMETER = 120.0
PIXEL_SIZE = 3.0
BOX = 64
MASK_DIAMETER = 150.0
SYMMETRY = "D3"
#: Search settings given to both sides.
PSI_STEP = 10.0
OFFSET_RANGE = 5.0
OFFSET_STEP = 1.0
INITIAL_RESOLUTION = 30.0


# ----------------------------------------------------------------------------- accuracy
def purity(classes, labels) -> float:
    """Share of items whose class's most common label is their own."""
    import numpy as np  # noqa: PLC0415
    import pandas as pd  # noqa: PLC0415

    classes, labels = np.asarray(classes), np.asarray(labels)
    if len(classes) == 0:
        return math.nan
    tab = pd.crosstab(classes, labels)
    return float(tab.max(axis=1).sum() / len(classes))


def normalised_mutual_information(classes, labels) -> float:
    """``I(C; L) / sqrt(H(C) H(L))`` in [0, 1] (1 when one partition determines the other; 0 if either is constant)."""
    import numpy as np  # noqa: PLC0415
    import pandas as pd  # noqa: PLC0415

    tab = pd.crosstab(np.asarray(classes), np.asarray(labels)).to_numpy(float)
    n = tab.sum()
    if n == 0:
        return math.nan
    p = tab / n
    pc, pl = p.sum(axis=1), p.sum(axis=0)
    nz = p > 0
    mi = float((p[nz] * np.log(p[nz] / np.outer(pc, pl)[nz])).sum())
    hc = float(-(pc[pc > 0] * np.log(pc[pc > 0])).sum())
    hl = float(-(pl[pl > 0] * np.log(pl[pl > 0])).sum())
    return mi / math.sqrt(hc * hl) if hc > 0 and hl > 0 else 0.0


def accuracy(classes, labels, resolution, class_counts) -> dict:
    """Purity, NMI and class resolutions (Å) of one classification against the true labels."""
    import numpy as np  # noqa: PLC0415

    labels = np.asarray(labels)
    counts = np.asarray(class_counts, dtype=float)
    res = np.asarray(resolution, dtype=float)
    big = (counts >= max(3.0, 0.02 * counts.sum())) & np.isfinite(res) & (res < 900)
    vals, freq = np.unique(labels, return_counts=True)
    return {
        "purity": purity(classes, labels),
        "purity_floor": float(freq.max() / len(labels)) if len(labels) else math.nan,
        "nmi": normalised_mutual_information(classes, labels),
        "best_class_resolution_A": float(res[big].min()) if big.any() else math.nan,
        "median_class_resolution_A": float(np.median(res[big])) if big.any() else math.nan,
        "classes_used": int((counts > 0).sum()),
    }


# ----------------------------------------------------------------------------- the benchmark
def simulate(folder: Path, *, particles: int, box: int, views: int, junk: float, seed: int):
    """Write the simulated stack and its STAR file into ``folder``; return ``(star, labels)``.

    Labels are the true view index of each particle, -1 for junk.
    """
    import numpy as np  # noqa: PLC0415
    import pandas as pd  # noqa: PLC0415

    from ..io.mrc import write_mrc  # noqa: PLC0415
    from ..io.star import format_image_name, optics_table, write_star  # noqa: PLC0415
    from ..spa.selector_training import simulate_particle_stack  # noqa: PLC0415

    images, ctf, truth, info = simulate_particle_stack(
        n=particles, box=box, pixel_size=PIXEL_SIZE, particle_diameter=DIAMETER, symmetry=SYMMETRY, n_views=views,
        junk_fraction=junk, junk_kinds=("ice", "aggregate", "carbon", "contamination"), seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    write_mrc(folder / "particles.mrcs", images, PIXEL_SIZE, volume=False)
    o = info["optics"]
    optics = optics_table("opticsGroup1", PIXEL_SIZE, o.voltage, o.cs, o.amplitude_contrast, image_size=box,
                          image_pixel_size=PIXEL_SIZE)
    table = pd.DataFrame({"rlnImageName": [format_image_name(i + 1, "particles.mrcs") for i in range(particles)],
                          **{c: ctf[c].to_numpy() for c in ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle")},
                          "rlnOpticsGroup": 1})
    write_star(folder / "particles.star", {"optics": optics, "particles": table})
    labels = np.where(truth["is_junk"].to_numpy() == 1, -1, truth["view"].to_numpy())
    return folder / "particles.star", labels


def run_benchmark(*, particles: int = 400, box: int = BOX, classes: int = 6, iterations: int = 5,
                  views: int = 6, junk: float = 0.2, threads: int = 1, repeat: int = 1, relion: bool = True,
                  device: str | None = None, workdir=None, keep: bool = False, seed: int = 0, relion_bin=None,
                  argv=None, log=print) -> dict:
    """Run the benchmark and return the report (a JSON-able dict); see the module docstring."""
    from .. import backend  # noqa: PLC0415
    from ..errors import InputError  # noqa: PLC0415
    from . import device_info, new_report  # noqa: PLC0415

    if device is None or device == "auto":
        device = "gpu" if backend.gpu_available() else "cpu"
    for value, flag in ((particles, "--particles"), (classes, "--classes"), (iterations, "--iterations"),
                        (threads, "--threads"), (repeat, "--repeat"), (views, "--views")):
        if int(value) < 1:
            raise InputError(f"bench spa-classify {flag}", f"must be at least 1, got {value}", "pass 1 or more")
    if box < 48 or box % 2:
        raise InputError("bench spa-classify --box", f"box must be even and at least 48 px (the particle is 40 px), "
                         f"got {box}", "use e.g. 64")
    if not 0.0 <= junk < 1.0:
        raise InputError("bench spa-classify --junk", f"junk fraction must lie in [0, 1), got {junk}", "use e.g. 0.2")
    exe = None
    if relion:
        from ..tools.relion import relion_exe  # noqa: PLC0415

        exe = relion_exe("relion_refine", relion_bin)
    report = new_report("spa-classify", argv)
    report["device"] = device_info(device)
    params = {"particles": int(particles), "box": int(box), "pixel_size": PIXEL_SIZE, "particle_diameter": DIAMETER,
              "mask_diameter": min(MASK_DIAMETER, 0.9 * box * PIXEL_SIZE), "symmetry": SYMMETRY,
              "views": int(views), "junk_fraction": float(junk), "classes": int(classes),
              "iterations": int(iterations), "threads": int(threads), "repeat": int(repeat), "psi_step": PSI_STEP,
              "offset_range": OFFSET_RANGE, "offset_step": OFFSET_STEP, "initial_resolution": INITIAL_RESOLUTION,
              "seed": int(seed), "relion": bool(relion)}
    report["params"] = params
    made = workdir is None
    work = Path(tempfile.mkdtemp(prefix="conveyor-bench-class2d-")) if made else Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    work = work.resolve()
    try:
        report["sides"] = _run(work, params, device, exe, log)
    finally:
        if made and not keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            report["workdir"] = str(work)
    _ratios(report)
    return report


def _run(work: Path, p: dict, device: str, exe, log) -> dict:
    from ..commands.spa_classify import read_class_dir  # noqa: PLC0415
    from ..tools.relion_refine import (  # noqa: PLC0415
        _write_input, class2d_command, class2d_from_relion, prepare_particles)
    from .spa_preprocess import _Runner, _side_summary  # noqa: PLC0415

    t0 = time.perf_counter()
    log(f"simulating {p['particles']} particles of {p['box']} px ({p['views']} views, "
        f"{p['junk_fraction']:.0%} junk) ...")
    star, labels = simulate(work / "sim", particles=p["particles"], box=p["box"], views=p["views"],
                            junk=p["junk_fraction"], seed=p["seed"])
    log(f"simulated in {time.perf_counter() - t0:.1f} s")
    runner = _Runner(work, p["threads"], device)
    ours_argv = ["spa", "class2d", "--particles", str(star), "--out-dir", "ours", "--classes", str(p["classes"]),
                 "--particle-diameter", f"{p['mask_diameter']:g}", "--iterations", str(p["iterations"]),
                 "--psi-step", str(PSI_STEP), "--offset-range", str(OFFSET_RANGE), "--offset-step", str(OFFSET_STEP),
                 "--initial-resolution", str(INITIAL_RESOLUTION), "--seed", str(p["seed"])]
    proj = work / "relion"
    rcmd = None
    ps = None
    if exe:
        ps = prepare_particles(star, seed=p["seed"])
        rcmd = class2d_command(exe, classes=p["classes"], particle_diameter=p["mask_diameter"],
                               iterations=p["iterations"],
                               psi_step=PSI_STEP, offset_range=OFFSET_RANGE, offset_step=OFFSET_STEP,
                               initial_resolution=INITIAL_RESOLUTION, max_resolution=None, ctf=ps.has_ctf,
                               threads=p["threads"], seed=p["seed"])

    def relion_once():
        if proj.exists():
            shutil.rmtree(proj)
        (proj / "Class2D").mkdir(parents=True)
        _write_input(proj / "particles.star", ps)
        return runner.relion(rcmd, proj, "relion_refine (2D classification)")

    mo, mr = [], []
    for r in range(p["repeat"]):
        for side in (("ours", "relion") if r % 2 == 0 else ("relion", "ours")):
            if side == "ours":
                log(f"ours: conveyor spa class2d, run {r + 1}/{p['repeat']} ...")
                mo.append(runner.ours(ours_argv, f"class2d{r}"))
            elif rcmd is not None:
                log(f"RELION: relion_refine, run {r + 1}/{p['repeat']} ...")
                mr.append(relion_once())
    sides = {}
    cd = read_class_dir(work / "ours")
    parts = cd["particles"]
    sides["ours"] = {"run": _side_summary(mo), "command": "conveyor " + " ".join(ours_argv),
                     "accuracy": accuracy(parts["rlnClassNumber"].to_numpy(int), labels, cd["resolution"],
                                          cd["counts"])}
    if mr:
        res = class2d_from_relion(proj / "Class2D", p["iterations"], ps.relion, pixel_size=ps.pixel_size,
                                  particle_diameter=p["mask_diameter"], source=star)
        sides["relion"] = {"run": _side_summary(mr), "command": " ".join(str(c) for c in rcmd),
                           "accuracy": accuracy(res.assignments, labels, res.class_resolution, res.class_counts)}
    for side in sides.values():
        run = side["run"]
        wall = run["s_per_movie"]
        run["wall_s"] = run.pop("s_per_movie")
        run["particles_per_s"] = p["particles"] / wall if wall > 0 else None
        run["particle_iterations_per_s"] = p["particles"] * p["iterations"] / wall if wall > 0 else None
    return sides


def _ratios(report: dict) -> None:
    from . import ratio  # noqa: PLC0415

    s = report["sides"]
    o, r = s.get("ours"), s.get("relion")
    both = o is not None and r is not None
    report["ratio"] = {
        "wall": ratio(r["run"]["wall_s"], o["run"]["wall_s"]) if both else None,
        "cpu": ratio(r["run"]["cpu_s"], o["run"]["cpu_s"]) if both else None,
        "wall_without_startup": ratio(r["run"]["wall_s"], o["run"].get("run_s")) if both else None,
    }
    report["finite"] = bool(o and math.isfinite(o["run"]["wall_s"]) and o["run"]["wall_s"] > 0)


# ----------------------------------------------------------------------------- output
def format_report(report: dict) -> str:
    from . import fmt, table  # noqa: PLC0415

    p = report["params"]
    dev = report["device"]
    where = dev.get("gpu") or f"cpu: {dev['cpu_model']}, {dev['nproc']} cores"
    head = (f"SPA 2D classification of {p['particles']} particles of {p['box']} px ({p['views']} views, "
            f"{p['junk_fraction']:.0%} junk) into {p['classes']} classes, {p['iterations']} iterations, "
            f"{p['threads']} thread(s), median of {p['repeat']} run(s); ours on {dev['device']} ({where})")
    rows = []
    for name in ("ours", "relion"):
        s = report["sides"].get(name)
        if s is None:
            continue
        run, a = s["run"], s["accuracy"]
        rows.append([name, fmt(run["wall_s"]), fmt(run.get("run_s")), fmt(run["cpu_s"]),
                     fmt(run["particles_per_s"], ".1f"), fmt(run["particle_iterations_per_s"], ".1f"),
                     fmt(run["peak_rss_mib"], ".0f"),
                     f"{fmt(a['purity'], '.3f')} (floor {fmt(a['purity_floor'], '.3f')})",
                     fmt(a["nmi"], ".3f"), fmt(a["best_class_resolution_A"], ".1f"),
                     fmt(a["median_class_resolution_A"], ".1f")])
    headers = ["side", "wall s", "run s", "CPU s", "particles/s", "particle-it/s", "peak MiB", "purity", "NMI",
               "best Å", "median Å"]
    r = report["ratio"]
    lines = [head, "", table(rows, headers), ""]
    if r["wall"] is not None:
        lines.append(f"ratio RELION / ours: wall {fmt(r['wall'])}, CPU {fmt(r['cpu'])}, wall without our start-up "
                     f"{fmt(r['wall_without_startup'])} (above 1: ours is faster)")
    lines.append("particles/s = particles / wall time of the whole run; 'run s' excludes Python start-up and imports; "
                 "purity floor = share of the most common true label; resolutions: classes with >= 2 % of the "
                 "particles, each tool's own SSNR = 1 estimate.")
    return "\n".join(lines)
