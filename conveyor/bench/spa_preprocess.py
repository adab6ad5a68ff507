"""SPA preprocessing, native against RELION 3.1, on one simulated movie with known truth.

What runs (every step in its own process, so its peak memory is its own):

====================  ==============================================  ===============================================
step                  ours (``conveyor ...``, the pipeline's command)   RELION 3.1 (the binary itself)
====================  ==============================================  ===============================================
motion                ``spa motion`` (5 x 5 patches, dose weighting,   ``relion_run_motioncorr --use_own`` (same
                      both sums)                                       patches, ``--j`` threads, dose weighting,
                                                                       ``--save_noDW``)
CTF                   ``spa ctf`` on our non-dose-weighted sum         none: RELION 3.1 calls CTFFIND/Gctf
picking               ``spa pick --method log`` on our weighted sum    ``relion_autopick --LoG`` on the same sum
                                                                       (diameters 0.75-1.25 x the particle's)
extraction            ``spa extract --bin 4`` of our picks             ``relion_preprocess --extract --scale``
                                                                       of the same picks with our CTF
====================  ==============================================  ===============================================

Both sides read the same files and write their outputs; neither draws a plot (RELION's
motion correction writes its own EPS/PDF summary). Our steps run through the ``conveyor``
command line in a fresh Python process, so ``wall_s`` includes starting Python and
importing the package (``startup_s``); ``run_s`` is the command itself. RELION's times are
those of the RELION program alone (the adapters' file conversion in
:mod:`conveyor.tools.relion` is not counted). Threads: RELION gets ``--j`` (motion only;
its picking and extraction are single-threaded without MPI); ours runs with
``conveyor --threads`` (``scipy.fft`` workers and BLAS pools) and the BLAS/OpenMP thread
variables set to the same number.

After the steps one by one, the four run again as the workflow runs a movie: one
``conveyor spa preprocess`` process (:mod:`conveyor.commands.spa_preprocess`) with the same
command lines, extraction from its own picks, so Python's start-up and the imports are paid
once (``report["job"]``). Its wall time is compared with the sum of RELION's three programs
(``totals["job_ratio"]``); it does more than they do (the CTF too).

Accuracy against the simulator's truth: whole-frame drift RMSE (px) after removing the
common offset, for both motion corrections; pick F1 (one-to-one matches within 0.2
particle diameters, non-junk particles away from the edges) for both pickers; defocus
error of our CTF (Å and %); the particle count of both extractions and the mean
correlation of our particle images with RELION's.

Run it as ``conveyor bench spa-preprocess`` (see :func:`register` in
:mod:`conveyor.commands.bench`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

#: Movie defaults: (size px, frames) on a GPU and on a CPU.
GPU_DEFAULTS = (4096, 40)
CPU_DEFAULTS = (1024, 20)
PIXEL_SIZE = 1.5  # Å/px, the simulator's default
DOSE_PER_FRAME = 1.2  # e/Å² per frame
DIAMETER = 150.0  # Å
VOLTAGE, CS, AC = 300.0, 2.7, 0.1
PATCHES = (5, 5)
BIN = 4
#: Particles per 1024² of micrograph (the simulator's default density).
PARTICLES_PER_MPX = 40
#: B-factors of each tool's own default: ours in Å² (amplitudes x exp(-B k²/4)), RELION's in px².
OUR_BFACTOR = 150.0
RELION_BFACTOR_PX2 = 150.0
#: Pick matching radius, in particle diameters.
MATCH_RADIUS = 0.2

STEPS = ("motion", "ctf", "pick", "extract")
#: RELION program of each step (none for CTF).
RELION_EXES = {"motion": "relion_run_motioncorr", "pick": "relion_autopick", "extract": "relion_preprocess"}


def parse_steps(text) -> tuple[str, ...]:
    """``"motion,ctf"`` -> ("motion", "ctf"). Each step needs the ones before it (CTF runs on the
    motion-corrected sum, picking on it too, extraction uses the CTF and the picks), so the
    steps must be the first 1-4 of motion, ctf, pick, extract."""
    from ..errors import InputError  # noqa: PLC0415

    if text is None:
        return STEPS
    asked = tuple(t.strip().lower() for t in (text.split(",") if isinstance(text, str) else text) if t.strip())
    if not asked or asked != STEPS[:len(asked)]:
        raise InputError("bench spa-preprocess --steps", f"cannot run the steps {text!r}",
                         "give the first steps in order: motion | motion,ctf | motion,ctf,pick | "
                         "motion,ctf,pick,extract (each needs the ones before it)")
    return asked


# ----------------------------------------------------------------------------- worker


def _worker(argv: list[str]) -> int:
    """``python -m conveyor.bench.spa_preprocess --worker THREADS TIMING.json -- CONVEYOR-ARGS``.

    Runs the ``conveyor`` command line in this process (the runner passes ``--threads
    THREADS``, which limits the ``scipy.fft`` workers and the BLAS pools) and writes how long
    the imports and the command took.
    """
    t0 = time.perf_counter()
    timing = argv[1]
    rest = argv[3:] if len(argv) > 2 and argv[2] == "--" else argv[2:]
    from conveyor.cli import main  # noqa: PLC0415

    t1 = time.perf_counter()
    rc = main(rest)
    t2 = time.perf_counter()
    Path(timing).write_text(json.dumps({"startup_in_process_s": t1 - t0, "run_s": t2 - t1, "returncode": rc}))
    return rc


# ----------------------------------------------------------------------------- helpers


def _box(diameter: float, pixel_size: float) -> int:
    """The pipeline's box (common.smk ``spa_box``): 1.6 x the diameter, rounded up to a multiple of 8."""
    box = int(1.6 * diameter / pixel_size)
    return box + (-box) % 8


def drift_rmse(estimate, truth) -> float:
    """RMS of the per-frame shift error (px) after removing the common offset."""
    import numpy as np  # noqa: PLC0415

    e = np.asarray(estimate, float).reshape(-1, 2)
    t = np.asarray(truth, float).reshape(-1, 2)
    n = min(len(e), len(t))
    d = e[:n] - t[:n]
    d -= d.mean(axis=0)
    return float(np.sqrt((d**2).sum(axis=1).mean()))


def f1_score(picks_xy, truth_xy, radius: float) -> dict:
    """F1, precision and recall of picks against truth, one-to-one matches within ``radius`` px."""
    import numpy as np  # noqa: PLC0415
    from scipy.optimize import linear_sum_assignment  # noqa: PLC0415

    p = np.asarray(picks_xy, float).reshape(-1, 2)
    t = np.asarray(truth_xy, float).reshape(-1, 2)
    tp = 0
    if len(p) and len(t):
        d = np.hypot(p[:, None, 0] - t[None, :, 0], p[:, None, 1] - t[None, :, 1])
        i, j = linear_sum_assignment(np.where(d <= radius, d, 1e6))
        tp = int((d[i, j] <= radius).sum())
    prec = tp / len(p) if len(p) else 0.0
    rec = tp / len(t) if len(t) else 0.0
    f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
    return {"f1": f1, "precision": prec, "recall": rec, "picks": int(len(p)), "truth": int(len(t)), "matched": tp}


def _inside(xy, shape, edge: float):
    import numpy as np  # noqa: PLC0415

    xy = np.asarray(xy, float).reshape(-1, 2)
    ny, nx = shape
    return (xy[:, 0] >= edge) & (xy[:, 0] <= nx - 1 - edge) & (xy[:, 1] >= edge) & (xy[:, 1] <= ny - 1 - edge)


def _mean_correlation(a, b) -> float | None:
    """Mean Pearson correlation of paired images of two stacks (None when empty or mismatched)."""
    import numpy as np  # noqa: PLC0415

    if a.ndim == 2:
        a = a[None]
    if b.ndim == 2:
        b = b[None]
    if len(a) == 0 or a.shape != b.shape:
        return None
    x = a.reshape(len(a), -1).astype(np.float64)
    y = b.reshape(len(b), -1).astype(np.float64)
    x -= x.mean(axis=1, keepdims=True)
    y -= y.mean(axis=1, keepdims=True)
    den = np.sqrt((x**2).sum(axis=1) * (y**2).sum(axis=1))
    ok = den > 0
    if not ok.any():
        return None
    return float(((x * y).sum(axis=1)[ok] / den[ok]).mean())


def _write_star(path: Path, blocks: dict) -> None:
    import starfile  # noqa: PLC0415

    path.parent.mkdir(parents=True, exist_ok=True)
    starfile.write(blocks, path, float_format="%.6f", overwrite=True)


def _optics(pixel_size, micrograph_pixel_size=None):
    import pandas as pd  # noqa: PLC0415

    row = {"rlnOpticsGroupName": "opticsGroup1", "rlnOpticsGroup": 1, "rlnMicrographOriginalPixelSize": pixel_size,
           "rlnVoltage": VOLTAGE, "rlnSphericalAberration": CS, "rlnAmplitudeContrast": AC}
    if micrograph_pixel_size is not None:
        row["rlnMicrographPixelSize"] = micrograph_pixel_size
    return pd.DataFrame([row])


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.is_symlink() or dst.exists():
        dst.unlink()
    dst.symlink_to(Path(src).resolve())


class _Runner:
    """Runs and measures the steps of one side; keeps every repeat's measurement."""

    def __init__(self, work: Path, threads: int, device: str):
        self.work = work
        self.threads = int(threads)
        self.device = device
        self.env = _bench_env(threads)

    def ours(self, argv: list[str], tag: str):
        from . import run_measured  # noqa: PLC0415

        timing = self.work / f".timing_{tag}.json"
        cmd = [sys.executable, "-m", "conveyor.bench.spa_preprocess", "--worker", str(self.threads), str(timing),
               "--", "--device", self.device, "--threads", str(self.threads), *argv]
        m = run_measured(cmd, cwd=self.work, env=self.env).check(f"conveyor {argv[0]} {argv[1]}")
        t = json.loads(timing.read_text())
        timing.unlink()
        m.extra["run_s"] = t["run_s"]
        m.extra["startup_s"] = max(m.wall_s - t["run_s"], 0.0)
        return m

    def relion(self, cmd: list[str], cwd: Path, what: str):
        from . import run_measured  # noqa: PLC0415

        return run_measured(cmd, cwd=cwd, env=self.env).check(what)


def _bench_env(threads: int) -> dict:
    from . import thread_env  # noqa: PLC0415

    env = thread_env(threads)
    env.setdefault("MPLBACKEND", "Agg")
    return env


def _side_summary(measurements) -> dict | None:
    from . import median  # noqa: PLC0415

    if not measurements:
        return None
    out = {
        "s_per_movie": median(m.wall_s for m in measurements),
        "cpu_s": median(m.cpu_s for m in measurements),
        "peak_rss_mib": max(m.maxrss_mib for m in measurements),
        "wall_s_all": [round(m.wall_s, 4) for m in measurements],
    }
    last = (measurements[0].stdout or "").strip().splitlines()
    if last:
        out["stdout_tail"] = last[-1][-400:]
    if "run_s" in measurements[0].extra:
        out["run_s"] = median(m.extra["run_s"] for m in measurements)
        out["startup_s"] = median(m.extra["startup_s"] for m in measurements)
    return out


# ----------------------------------------------------------------------------- the benchmark


def run_benchmark(*, size: int | None = None, frames: int | None = None, threads: int = 1, repeat: int = 1,
                  relion: bool = True, device: str | None = None, workdir=None, keep: bool = False,
                  seed: int = 0, relion_bin=None, steps=None, argv=None, log=print) -> dict:
    """Run the benchmark and return the report (a JSON-able dict); see the module docstring.

    ``steps``: the steps to run, the first 1-4 of :data:`STEPS` (default all; see
    :func:`parse_steps`)."""
    import numpy as np  # noqa: PLC0415

    from .. import backend  # noqa: PLC0415
    from ..errors import InputError  # noqa: PLC0415
    from . import device_info, new_report, ratio  # noqa: PLC0415

    if device is None or device == "auto":
        device = "gpu" if backend.gpu_available() else "cpu"
    defaults = GPU_DEFAULTS if device == "gpu" else CPU_DEFAULTS
    size = int(size or defaults[0])
    frames = int(frames or defaults[1])
    threads, repeat = int(threads), int(repeat)
    if threads < 1 or repeat < 1:
        raise InputError("bench spa-preprocess", "--threads and --repeat must be at least 1", "pass 1 or more")
    if frames < 2:
        raise InputError("bench spa-preprocess --frames", f"{frames} frame(s)", "pass at least 2 frames")
    steps = parse_steps(steps)
    exes = {}
    if relion:
        from ..tools.relion import relion_exe  # noqa: PLC0415

        for name in (RELION_EXES[s] for s in steps if s in RELION_EXES):
            exes[name] = relion_exe(name, relion_bin)

    report = new_report("spa-preprocess", argv)
    report["device"] = device_info(device)
    params = {
        "size": size, "frames": frames, "threads": threads, "repeat": repeat, "pixel_size": PIXEL_SIZE,
        "dose_per_frame": DOSE_PER_FRAME, "particle_diameter": DIAMETER, "patches": f"{PATCHES[0]}x{PATCHES[1]}",
        "bin": BIN, "box": _box(DIAMETER, PIXEL_SIZE), "seed": seed, "relion": bool(relion),
        "bfactor_ours_A2": OUR_BFACTOR, "bfactor_relion_px2": RELION_BFACTOR_PX2,
        "particles": max(2, int(round(PARTICLES_PER_MPX * (size / 1024) ** 2))),
        "steps": list(steps),
    }
    report["params"] = params

    made = workdir is None
    work = Path(tempfile.mkdtemp(prefix="conveyor-bench-spa-")) if made else Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    work = work.resolve()
    try:
        report["steps"] = _run_steps(work, params, device, exes, log)
    finally:
        if made and not keep:
            shutil.rmtree(work, ignore_errors=True)
        elif keep or not made:
            report["workdir"] = str(work)

    job = [s for s in report["steps"] if s["step"] == "job"]
    report["steps"] = [s for s in report["steps"] if s["step"] != "job"]
    report["job"] = job[0] if job else None
    steps = [s for s in report["steps"] if s["ours"]]
    total_ours = sum(s["ours"]["s_per_movie"] for s in steps)
    total_run = sum(s["ours"].get("run_s", math.nan) for s in steps)
    paired = [s for s in steps if s.get("relion")]
    report["totals"] = {
        "ours_s_per_movie": total_ours,
        "ours_run_s_per_movie": total_run,
        "ours_steps_with_relion_s": sum(s["ours"]["s_per_movie"] for s in paired) if paired else None,
        "relion_s_per_movie": sum(s["relion"]["s_per_movie"] for s in paired) if paired else None,
    }
    t = report["totals"]
    t["steps"] = [s["step"] for s in steps]
    t["ratio"] = ratio(t["relion_s_per_movie"], t["ours_steps_with_relion_s"]) if paired else None
    # the workflow's job (all four steps in one process) against RELION's three programs
    j = report["job"]
    t["job_s_per_movie"] = j["ours"]["s_per_movie"] if j else None
    t["job_ratio"] = ratio(t["relion_s_per_movie"], t["job_s_per_movie"]) if j and len(paired) == 3 else None
    report["finite"] = bool(np.isfinite(total_ours) and total_ours > 0)
    return report


def _run_steps(work: Path, p: dict, device: str, exes: dict, log) -> list[dict]:
    import numpy as np  # noqa: PLC0415
    import starfile  # noqa: PLC0415

    from ..io.mrc import read_mrc  # noqa: PLC0415
    from ..io.star import read_star  # noqa: PLC0415
    from ..simulate.spa import simulate_spa  # noqa: PLC0415
    from ..spa.extract import box_inside  # noqa: PLC0415

    t0 = time.perf_counter()
    log(f"simulating one {p['size']}x{p['size']}x{p['frames']} movie ({p['particles']} particles) ...")
    paths = simulate_spa(work / "sim", micrographs=1, size=p["size"], frames=p["frames"], pixel_size=PIXEL_SIZE,
                         dose_per_frame=DOSE_PER_FRAME, particles=p["particles"], particle_diameter=DIAMETER,
                         symmetry="D3", seed=p["seed"])
    log(f"simulated in {time.perf_counter() - t0:.1f} s")
    os.sync()  # the movie on disk now, not written back while the first step is measured
    movie = Path(paths["movies"][0])
    truth_shifts = read_star(paths["shifts"])["shifts"].sort_values("rlnMicrographFrameNumber")
    truth_shifts = truth_shifts[["rlnMicrographShiftX", "rlnMicrographShiftY"]].to_numpy(float)
    truth_mic = read_star(paths["micrographs"])["micrographs"].iloc[0]
    truth_parts = read_star(paths["particles"])["particles"]

    runner = _Runner(work, p["threads"], device)
    ours_dir = work / "ours"
    ours_dir.mkdir(exist_ok=True)
    mov = str(movie.relative_to(work))
    dw, nodw, shifts_star = "ours/mic.mrc", "ours/mic_noDW.mrc", "ours/mic.star"
    ctf_star, pick_star = "ours/ctf.star", "ours/pick.star"
    stack, parts_star = "ours/particles.mrcs", "ours/particles.star"
    box = p["box"]
    relion = bool(exes)
    steps = []

    def both(name, ours_argv, relion_fn):
        """Run ours and RELION's step ``repeat`` times, alternating which goes first."""
        mo, mr = [], []
        for r in range(p["repeat"]):
            order = ("ours", "relion") if r % 2 == 0 else ("relion", "ours")
            for side in order:
                if side == "ours":
                    mo.append(runner.ours(ours_argv, f"{name}{r}"))
                elif relion_fn is not None:
                    mr.append(relion_fn(r))
        return mo, mr

    # ---- motion
    motion_ours = ["spa", "motion", mov, "--pixel-size", str(PIXEL_SIZE), "--voltage", str(VOLTAGE),
                   "--dose-per-frame", str(DOSE_PER_FRAME), "--bfactor", str(OUR_BFACTOR),
                   "--patches", p["patches"], "--frames", str(p["frames"]),
                   "--out-sum", dw, "--out-sum-nodw", nodw, "--out-shifts", shifts_star]
    rel_motion = work / "relion" / "motion"

    def relion_motion(r):
        from ..tools.relion import motion_command  # noqa: PLC0415

        if rel_motion.exists():
            shutil.rmtree(rel_motion)
        _link(movie, rel_motion / "Movies" / "mic.mrc")
        import pandas as pd  # noqa: PLC0415

        _write_star(rel_motion / "movies.star", {
            "optics": _optics(PIXEL_SIZE),
            "movies": pd.DataFrame({"rlnMicrographMovieName": ["Movies/mic.mrc"], "rlnOpticsGroup": [1]}),
        })
        cmd = motion_command(exes["relion_run_motioncorr"], pixel_size=PIXEL_SIZE, voltage=VOLTAGE,
                             dose_per_frame=DOSE_PER_FRAME, pre_exposure=0.0, patches=PATCHES,
                             bfactor=RELION_BFACTOR_PX2 * 4 * PIXEL_SIZE**2, threads=p["threads"])
        return runner.relion(cmd, rel_motion, "relion_run_motioncorr")

    log("motion ...")
    mo, mr = both("motion", motion_ours, relion_motion if relion else None)
    ours_shifts = read_star(work / shifts_star)["global_shift"].sort_values("rlnMicrographFrameNumber")
    ours_shifts = ours_shifts[["rlnMicrographShiftX", "rlnMicrographShiftY"]].to_numpy(float)
    acc = {"truth_drift_px": float(np.hypot(*np.diff(truth_shifts, axis=0).T).sum()),
           "ours_drift_rmse_px": drift_rmse(ours_shifts, truth_shifts)}
    if relion:
        from ..tools.relion import read_relion_motion_star, relion_to_conveyor_shifts  # noqa: PLC0415

        rb = read_relion_motion_star(rel_motion / "MotionCorr" / "Movies" / "mic.star")
        gs = rb["global_shift"].sort_values("rlnMicrographFrameNumber")
        rs = relion_to_conveyor_shifts(gs[["rlnMicrographShiftX", "rlnMicrographShiftY"]].to_numpy(float))
        acc["relion_drift_rmse_px"] = drift_rmse(rs, truth_shifts)
    steps.append(_step("motion", mo, mr, acc))
    if "ctf" not in p["steps"]:
        return _ratios(steps)

    # ---- CTF (ours only)
    ctf_ours = ["spa", "ctf", nodw, "--pixel-size", str(PIXEL_SIZE), "--voltage", str(VOLTAGE), "--cs", str(CS),
                "--amplitude-contrast", str(AC), "--defocus-min", "5000", "--defocus-max", "50000",
                "--micrograph-name", dw, "--out-star", ctf_star]
    log("ctf ...")
    mo, _ = both("ctf", ctf_ours, None)
    row = read_star(work / ctf_star)["micrographs"].iloc[0]
    du, dv = float(row["rlnDefocusU"]), float(row["rlnDefocusV"])
    tu, tv = float(truth_mic["rlnDefocusU"]), float(truth_mic["rlnDefocusV"])
    err = max(abs(du - tu), abs(dv - tv))
    acc = {"truth_defocus_u_A": tu, "truth_defocus_v_A": tv, "ours_defocus_u_A": du, "ours_defocus_v_A": dv,
           "ours_defocus_error_A": err, "ours_defocus_error_pct": 100.0 * err / (0.5 * (tu + tv)),
           "relion": "n/a: RELION 3.1 has no CTF estimator of its own (it runs CTFFIND or Gctf)"}
    steps.append(_step("ctf", mo, [], acc))
    if "pick" not in p["steps"]:
        return _ratios(steps)

    # ---- picking
    pick_ours = ["spa", "pick", dw, "--particle-diameter", str(DIAMETER), "--method", "log",
                 "--threshold", "auto", "--out-star", pick_star]
    rel_pick = work / "relion" / "pick"

    def relion_pick(r):
        from ..tools.relion import LOG_DIAMETER_RANGE, autopick_command  # noqa: PLC0415

        if rel_pick.exists():
            shutil.rmtree(rel_pick)
        _link(work / dw, rel_pick / "Micrographs" / "mic.mrc")
        import pandas as pd  # noqa: PLC0415

        _write_star(rel_pick / "micrographs.star", {
            "optics": _optics(PIXEL_SIZE, PIXEL_SIZE),
            "micrographs": pd.DataFrame({"rlnMicrographName": ["Micrographs/mic.mrc"], "rlnOpticsGroup": [1]}),
        })
        cmd = autopick_command(exes["relion_autopick"], diameter_min=LOG_DIAMETER_RANGE[0] * DIAMETER,
                               diameter_max=LOG_DIAMETER_RANGE[1] * DIAMETER)
        return runner.relion(cmd, rel_pick, "relion_autopick")

    log("pick ...")
    mo, mr = both("pick", pick_ours, relion_pick if relion else None)
    image, _ = read_mrc(work / dw)
    shape = image.shape
    edge = box / 2.0
    truth_xy = truth_parts[truth_parts["cvIsJunk"].astype(int) == 0][["rlnCoordinateX", "rlnCoordinateY"]]
    truth_xy = truth_xy.to_numpy(float)
    truth_xy = truth_xy[_inside(truth_xy, shape, edge)]
    radius = MATCH_RADIUS * DIAMETER / PIXEL_SIZE
    picks = read_star(work / pick_star)
    picks = picks.get("particles", next(iter(picks.values())))
    ours_xy = picks[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy(float) if len(picks) else np.zeros((0, 2))
    acc = {"match_radius_px": radius, "edge_px": edge,
           "ours": f1_score(ours_xy[_inside(ours_xy, shape, edge)], truth_xy, radius)}
    acc["ours_f1"] = acc["ours"]["f1"]
    if relion:
        rtab = starfile.read(rel_pick / "AutoPick" / "Micrographs" / "mic_autopick.star", always_dict=True)
        rtab = next(iter(rtab.values())) if rtab else None
        rxy = (rtab[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy(float)
               if rtab is not None and len(rtab) else np.zeros((0, 2)))
        acc["relion"] = f1_score(rxy[_inside(rxy, shape, edge)], truth_xy, radius)
        acc["relion_f1"] = acc["relion"]["f1"]
    steps.append(_step("pick", mo, mr, acc))
    if "extract" not in p["steps"]:
        return _ratios(steps)

    # ---- extraction (bin 4): the same coordinates and CTF for both sides -- our picks, or the
    # true particle positions when none of the picks leaves room for a whole box
    import pandas as pd  # noqa: PLC0415

    from ..io.star import write_star  # noqa: PLC0415

    coords_star = "ours/coords.star"
    ours_in = ours_xy[box_inside(shape, ours_xy, box)] if len(ours_xy) else np.zeros((0, 2))
    coords_from = "our picks"
    if not len(ours_in):
        t_all = truth_parts[truth_parts["cvIsJunk"].astype(int) == 0][["rlnCoordinateX", "rlnCoordinateY"]]
        t_all = t_all.to_numpy(float)
        ours_in = t_all[box_inside(shape, t_all, box)] if len(t_all) else np.zeros((0, 2))
        coords_from = "true particle positions (no pick leaves room for a box)"
    write_star(work / coords_star, {"particles": pd.DataFrame({
        "rlnCoordinateX": ours_in[:, 0], "rlnCoordinateY": ours_in[:, 1],
        "rlnAutopickFigureOfMerit": np.zeros(len(ours_in)), "rlnMicrographName": [dw] * len(ours_in)})})
    extract_ours = ["spa", "extract", dw, "--coords", coords_star, "--ctf", ctf_star, "--bin", str(BIN),
                    "--box", str(box), "--particle-diameter", str(DIAMETER),
                    "--out-stack", stack, "--out-star", parts_star]
    rel_ext = work / "relion" / "extract"

    def relion_extract(r):
        import pandas as pd  # noqa: PLC0415

        from ..tools.relion import BG_FRACTION, extract_command  # noqa: PLC0415

        if rel_ext.exists():
            shutil.rmtree(rel_ext)
        _link(work / dw, rel_ext / "Micrographs" / "mic.mrc")
        ctf_cols = {k: float(row[k]) for k in ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle")}
        ctf_cols.update(rlnPhaseShift=0.0, rlnCtfAstigmatism=abs(du - dv), rlnCtfMaxResolution=999.0,
                        rlnCtfFigureOfMerit=0.0)
        _write_star(rel_ext / "micrographs_ctf.star", {
            "optics": _optics(PIXEL_SIZE, PIXEL_SIZE),
            "micrographs": pd.DataFrame([{"rlnMicrographName": "Micrographs/mic.mrc", "rlnOpticsGroup": 1,
                                          **ctf_cols}]),
        })
        xy = ours_in
        _write_star(rel_ext / "Coords" / "Micrographs" / "mic_pick.star", {
            "": pd.DataFrame({"rlnCoordinateX": xy[:, 0], "rlnCoordinateY": xy[:, 1],
                              "rlnAutopickFigureOfMerit": np.zeros(len(xy))}),
        })
        (rel_ext / "Extract").mkdir(exist_ok=True)
        out = box // BIN
        cmd = extract_command(exes["relion_preprocess"], box=box, binning=BIN,
                              bg_radius=int(round(BG_FRACTION * out)))
        return runner.relion(cmd, rel_ext, "relion_preprocess --extract")

    if not len(ours_in):
        log("extract: skipped, no particle of this micrograph leaves room for a box")
        steps.append({"step": "extract", "ours": None, "relion": None,
                      "accuracy": {"skipped": f"no particle leaves room for a {box}-px box"}})
        return _ratios(steps)
    log(f"extract {len(ours_in)} particles ...")
    mo, mr = both("extract", extract_ours, relion_extract if relion else None)
    ours_stack, _ = read_mrc(work / stack)
    ours_stack = ours_stack if ours_stack.ndim == 3 else ours_stack[None]
    acc = {"coordinates": coords_from, "ours_particles": int(len(ours_stack))}
    if mr:
        rstack, _ = read_mrc(rel_ext / "Extract" / "Micrographs" / "mic.mrcs")
        rstack = rstack if rstack.ndim == 3 else rstack[None]
        acc["relion_particles"] = int(len(rstack))
        acc["mean_correlation_with_relion"] = _mean_correlation(ours_stack, rstack)
    steps.append(_step("extract", mo, mr, acc))

    # ---- the four steps as the workflow runs them: one `conveyor spa preprocess` process per
    # movie (start-up and imports paid once), its outputs in a directory of their own
    job = "job"
    (work / job).mkdir(exist_ok=True)
    job_argv = ["spa", "preprocess"]
    for name, argv in (("motion", motion_ours), ("ctf", ctf_ours), ("pick", pick_ours), ("extract", extract_ours)):
        argv = [a.replace(coords_star, pick_star).replace("ours/", f"{job}/") for a in argv]
        job_argv += [":::", f"{job}/{name}.log", "conveyor", "--device", device, "--threads", str(p["threads"]), *argv]
    log("the four steps in one process (the workflow's job) ...")
    mj = [runner.ours(job_argv, f"job{r}") for r in range(p["repeat"])]
    job_stack, _ = read_mrc(work / stack.replace("ours/", f"{job}/"))
    steps.append({"step": "job", "ours": _side_summary(mj), "relion": None,
                  "accuracy": {"ours_particles": int(len(job_stack if job_stack.ndim == 3 else job_stack[None]))}})
    return _ratios(steps)


def _ratios(steps: list[dict]) -> list[dict]:
    from . import ratio  # noqa: PLC0415

    for s in steps:
        both = s["relion"] and s["ours"]
        s["ratio"] = ratio(s["relion"]["s_per_movie"], s["ours"]["s_per_movie"]) if both else None
        s["cpu_ratio"] = ratio(s["relion"]["cpu_s"], s["ours"]["cpu_s"]) if both else None
    return steps


def _step(name, mo, mr, accuracy) -> dict:
    return {"step": name, "ours": _side_summary(mo), "relion": _side_summary(mr), "accuracy": accuracy}


# ----------------------------------------------------------------------------- output


def format_report(report: dict) -> str:
    from . import fmt, table  # noqa: PLC0415

    p = report["params"]
    dev = report["device"]
    where = dev.get("gpu") or f"cpu: {dev['cpu_model']}, {dev['nproc']} cores"
    head = (f"SPA preprocessing of one {p['size']}x{p['size']}x{p['frames']} movie, {p['threads']} thread(s), "
            f"median of {p['repeat']} run(s); ours on {dev['device']} ({where})")
    rows = []
    for s in report["steps"]:
        o, r, a = s["ours"], s["relion"], s["accuracy"]
        if o is None:
            rows.append([s["step"], "-", "-", "-", "-", "-", "-", "-", f"skipped: {a.get('skipped', '')}", ""])
            continue
        if s["step"] == "motion":
            acc_o, acc_r = f"drift RMSE {a['ours_drift_rmse_px']:.3f} px", a.get("relion_drift_rmse_px")
            acc_r = f"drift RMSE {acc_r:.3f} px" if acc_r is not None else "-"
        elif s["step"] == "ctf":
            acc_o = f"defocus err {a['ours_defocus_error_A']:.0f} Å ({a['ours_defocus_error_pct']:.2f}%)"
            acc_r = "n/a (no CTF estimator)"
        elif s["step"] == "pick":
            acc_o = f"F1 {a['ours_f1']:.2f}"
            acc_r = f"F1 {a['relion_f1']:.2f}" if "relion_f1" in a else "-"
        else:
            acc_o = f"{a['ours_particles']} particles"
            acc_r = f"{a['relion_particles']} particles" if "relion_particles" in a else "-"
            if a.get("mean_correlation_with_relion") is not None:
                acc_r += f", r={a['mean_correlation_with_relion']:.3f}"
        relion_s = fmt(r["s_per_movie"]) if r else ("n/a" if s["step"] == "ctf" else "-")
        rows.append([s["step"], fmt(o["s_per_movie"]), fmt(o.get("run_s")), relion_s, fmt(s["ratio"]),
                     fmt(s["cpu_ratio"]), fmt(o["peak_rss_mib"], ".0f"), fmt(r["peak_rss_mib"], ".0f") if r else "-",
                     acc_o, acc_r])
    t = report["totals"]
    rows.append(["total", fmt(t["ours_s_per_movie"]), fmt(t["ours_run_s_per_movie"]),
                 fmt(t["relion_s_per_movie"]), fmt(t["ratio"]), "", "", "", "", ""])
    j = report.get("job")
    if j:
        o = j["ours"]
        rows.append(["one process", fmt(o["s_per_movie"]), fmt(o.get("run_s")), fmt(t["relion_s_per_movie"]),
                     fmt(t.get("job_ratio")), "", fmt(o["peak_rss_mib"], ".0f"), "",
                     f"{j['accuracy']['ours_particles']} particles", ""])
    headers = ["step", "ours s/movie", "ours run s", "relion s/movie", "ratio", "cpu ratio", "ours MiB",
               "relion MiB", "accuracy ours", "accuracy relion"]
    notes = ("ratio = relion / ours (wall); cpu ratio = same with CPU time; 'ours run s' excludes Python start-up "
             "and imports;\nMiB = peak resident memory of the step's process; total ratio over the steps RELION has "
             "(motion, pick, extract);\n'one process' = the four steps in one 'conveyor spa preprocess' process, as the workflow "
             "runs a movie, against RELION's three programs.")
    return f"{head}\n\n{table(rows, headers)}\n\n{notes}"


if __name__ == "__main__":  # the per-step worker
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        sys.exit(_worker(sys.argv[2:]))
    sys.exit("usage: python -m conveyor.bench.spa_preprocess --worker THREADS TIMING.json -- CONVEYOR-ARGS")
