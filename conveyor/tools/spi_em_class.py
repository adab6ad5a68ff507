"""spi_em_class (PyPI ``spi_em_class`` 0.1.7) for SPI stages 5-6: 2D EM classification and selection.

What runs (the package's own scripts, in a work folder ``DIR/spi_em_class/``)
------------------------------------------------------------------------------
1. ``spi_em_create.py input.cxi -d em_class_data.h5`` and
   ``spi_em_config.py -d em_class_data.h5 --num_class K --num_rot R [--q_min/--q_max px]
   [--friedel|--no-friedel] [--logscale|--no-logscale] [--binning B]`` (always with
   options: without any, ``spi_em_config.py`` opens an interactive editor);
2. ``spi_em_run.py N -d em_class_data.h5``: N EM iterations;
3. ``spi_em_save_by_symmetry.py ORDER -t THRESHOLD -o selected_orderORDER.cxi -d
   em_class_data.h5``, once per symmetry order (default 10 and 6: an icosahedral particle
   seen along its 5- and 3-fold axes, the axis symmetry doubled by Friedel symmetry): a
   class is selected when its model has at least THRESHOLD of its angular (non-isotropic)
   power in the ORDER-fold harmonic for any of the orders. The tool writes
   ``em_class/classes`` and ``em_class/select`` per image group of a copy of
   ``input.cxi``; the scores it prints are kept in ``class_scores.csv``.
   ``--select-classes`` replaces the symmetry rule by the user's classes. (The package's
   ``spi_em_save.py`` is not used for that: it rejects the last class number,
   ``0 < class < num_class``.)

Quirks handled
--------------
* Steps 2 and 3 run through a wrapper (``python -m conveyor.tools.spi_em_class SCRIPT
  --seed S -- ARGS``, :func:`main`) that seeds numpy's global generator first: the
  classifier starts from ``0.99 + 0.01 rand`` models and the symmetry score from a
  ``differential_evolution`` fit, both unseeded in the package.
* ``spi_em_save_by_symmetry.py`` calls ``scipy.correlate``, which scipy removed (it was
  numpy's ``correlate``, mode ``"valid"``). The wrapper sets ``scipy.correlate`` to
  ``scipy.signal.correlate`` with ``mode="valid"`` as default — numerically identical to
  the old function; ``scipy.signal.correlate``'s own default ``"full"`` would return
  arrays of the wrong length.
* The tools read only ``/entry_1/image_N/{data,mask,image_center}`` with one beam centre
  per group: :func:`build_input_cxi` writes one group per shot file holding only the
  frames to classify (those that passed ``conveyor spi filter``), the CXI mask bits
  (0 = good) and the run's centre (median of the table's ``center_x/center_y``), plus
  ``conveyor_frame`` (frame index in the user's file) to map the results back.

Outputs (the columns of ``conveyor spi class2d`` / ``conveyor spi select``)
---------------------------------------------------------------------------
* ``DIR/assignments.csv``: ``file, frame, class`` (1-based, as the tool numbers them),
  ``rotation_deg`` (most likely in-plane angle), ``scale``, ``probability`` (of the best
  class and angle), ``loglik`` (the tool's, best class and angle), ``center_x, center_y``,
  ``selected``;
* ``DIR/selected.csv``: ``file, frame, class`` of the frames in selected classes (the
  format of ``conveyor spi select --out-frames``, read by ``spi emc --selected-frames``);
* ``DIR/class_scores.csv``: ``class, population, symmetry_orderN`` (the tool's score per
  order, printed with two decimals), ``selected, reason``;
* ``DIR/classes.h5``: ``/classes/models`` (the tool's class models) and the per-frame table.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from pathlib import Path

import numpy as np

from ..errors import InputError
from ._run import run_tool
from .spi_processing import TOOL_ENV, find_script, package_version, require_script

log = logging.getLogger(__name__)

SCRIPTS = ("spi_em_create.py", "spi_em_config.py", "spi_em_run.py", "spi_em_save_by_symmetry.py")
INSTALL_HINT = "install it with `bash scripts/install-spi-peers.sh` (pip install spi_em_class==0.1.7)"
DATA_NAME = "em_class_data.h5"
#: Default symmetry orders: the 10- and 6-fold patterns of an icosahedral particle seen
#: along its 5- and 3-fold axes (the axis symmetry doubled by Friedel symmetry).
DEFAULT_ORDERS = (10, 6)


def available() -> bool:
    """True when all spi_em_class scripts can be found."""
    return all(find_script(s) for s in SCRIPTS)


# ---------------------------------------------------------------------------------------
# wrapper run in the tool's process: shim + seed, then the script itself
# ---------------------------------------------------------------------------------------
def install_shims() -> None:
    """``scipy.correlate`` as it was (numpy's correlate, mode "valid"), via ``scipy.signal.correlate``."""
    import functools

    import scipy
    import scipy.signal

    if not hasattr(scipy, "correlate"):
        scipy.correlate = functools.partial(scipy.signal.correlate, mode="valid")


def main(argv=None) -> int:
    """``python -m conveyor.tools.spi_em_class SCRIPT [--seed S] -- ARGS...``: run SCRIPT seeded, with the shims."""
    import runpy

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(main.__doc__)
        return 0 if argv else 2
    script, rest = argv[0], argv[1:]
    seed = 0
    if rest[:1] == ["--seed"]:
        seed, rest = int(rest[1]), rest[2:]
    if rest[:1] == ["--"]:
        rest = rest[1:]
    install_shims()
    np.random.seed(seed)
    sys.argv = [script, *rest]
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    return 0


# ---------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------
def frames_to_classify(table_path):
    """``(frames, centre or None, how)`` from a per-frame table: ``passed``, else ``is_hit``, else all."""
    from ..spi.frames import read_frames

    df = read_frames(table_path)
    if "passed" in df.columns:
        keep, how = df["passed"].to_numpy(bool), "passed"
    elif "is_hit" in df.columns:
        keep, how = df["is_hit"].to_numpy(bool), "is_hit"
        log.warning("%s has no 'passed' column: classifying all hits (run 'conveyor spi filter' first)", table_path)
    else:
        keep, how = np.ones(len(df), bool), "all"
        log.warning("%s has neither 'passed' nor 'is_hit': classifying all frames", table_path)
    frames = df["frame"].to_numpy(np.int64)[keep]
    centre = None
    if {"center_x", "center_y"} <= set(df.columns) and keep.any():
        c = df[["center_x", "center_y"]].to_numpy(np.float64)[keep]
        ok = np.all(np.isfinite(c), axis=1)
        if ok.any():
            centre = (float(np.median(c[ok, 0])), float(np.median(c[ok, 1])))
    return frames, centre, how


def build_input_cxi(runs, out_path, chunk: int = 256) -> list[dict]:
    """Write the CXI file spi_em_class reads: one ``/entry_1/image_{k}`` per run.

    ``runs``: list of ``(shots_path, frames, centre or None)``. Each group holds ``data``
    (those frames), ``mask`` (CXI bits, 0 = good), ``image_center`` and ``conveyor_frame``;
    runs without frames are left out. Returns one dict per written group (``group``,
    ``file``, ``frames``, ``center``).
    """
    import h5py

    from ..io.cxi import read_cxi

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    groups = []
    shape = None
    with h5py.File(out_path, "w") as dst:
        dst["cxi_version"] = 160
        entry = dst.create_group("entry_1")
        for path, frames, centre in runs:
            frames = np.asarray(frames, dtype=np.int64)
            if frames.size == 0:
                continue
            shots = read_cxi(path, lazy=True, load_extra=False)
            if frames.min() < 0 or frames.max() >= shots.n_frames_total:
                raise InputError(path, f"frame {int(frames.max())} out of range ({shots.n_frames_total} frames)",
                                 "give the per-frame table written for this shot file (same order as --shots)")
            if shape is None:
                shape = shots.frame_shape
            elif shots.frame_shape != shape:
                raise InputError(path, f"frames are {shots.frame_shape}, the first file's are {shape}",
                                 "classify shots of one detector geometry together")
            c = shots.beam_center_px if centre is None else centre
            name = f"image_{len(groups) + 1}"
            img = entry.create_group(name)
            ny, nx = shape
            out = img.create_dataset("data", shape=(frames.size, ny, nx), dtype=shots.data.dtype, chunks=(1, ny, nx),
                                     compression="gzip", compression_opts=1)
            for start in range(0, frames.size, chunk):
                out[start:start + chunk] = np.asarray(shots.data[frames[start:start + chunk]])
            img.create_dataset("mask", data=np.asarray(shots.mask_bits, dtype=np.uint32))
            img.create_dataset("image_center", data=np.array([c[0], c[1], 0.0]))
            img.create_dataset("conveyor_frame", data=frames)
            groups.append({"group": name, "file": str(path), "frames": frames, "center": (float(c[0]), float(c[1]))})
    return groups


_SCORE_RE = re.compile(r"Class\s+(\d+):\s+([-+0-9.eEnNaA]+)\s+(>=|<)")


def parse_symmetry_scores(text: str) -> dict[int, tuple[float, bool]]:
    """``{class: (score, selected)}`` from the output of ``spi_em_save_by_symmetry.py``."""
    out = {}
    for m in _SCORE_RE.finditer(text):
        out[int(m.group(1))] = (float(m.group(2)), m.group(3) == ">=")
    return out


# ---------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------
def run_spi_em_class(shots, tables, out_dir, *, classes: int = 10, rotations: int = 100, iterations: int = 20,
                     q_min: int = 0, q_max: int = 0, friedel: bool = True, logscale: bool = True, binning: int = 1,
                     symmetry_orders=DEFAULT_ORDERS, symmetry_threshold: float = 0.5, select_classes=None,
                     seed: int = 0, timeout: float | None = None) -> dict:
    """Classify the frames that passed the filter with spi_em_class; write the outputs (module notes).

    ``symmetry_orders``: ``spi_em_save_by_symmetry.py`` runs once per order; a class is
    selected when it passes for any of them. ``select_classes`` (1-based) replaces that
    automatic choice by the user's. Returns a dict with ``assignments``, ``selected`` and
    ``class_scores`` (DataFrames), ``scores`` ({order: {class: (score, passed)}}),
    ``work_dir``, ``runtime_s`` and ``mutual_info``.
    """
    import h5py
    import pandas as pd

    from ..io.atomic import write_text

    t0 = time.time()
    shots = [Path(s) for s in shots]
    tables = list(tables)
    if len(tables) != len(shots):
        raise InputError("--frames-table", f"{len(tables)} tables for {len(shots)} shot files",
                         "give one per-frame table per shot file, in the same order")
    for name, v, lo in (("--classes", classes, 1), ("--rotations", rotations, 1), ("--iterations", iterations, 1),
                        ("--binning", binning, 1), ("--q-min", q_min, 0), ("--q-max", q_max, 0)):
        if int(v) < lo:
            raise InputError(name, f"must be >= {lo}, got {v}", "give a larger value")
    orders = [int(o) for o in (symmetry_orders if np.ndim(symmetry_orders) else [symmetry_orders])]
    if not orders or any(not 0 < o < 50 for o in orders):
        raise InputError("--symmetry-order", f"orders must be 1..49, got {orders}", "e.g. 10 6 (the tool accepts 1-49)")
    if select_classes is not None:
        bad = [c for c in select_classes if not 1 <= int(c) <= int(classes)]
        if bad or not len(select_classes):
            raise InputError("--select-classes", f"not classes of this run: {bad or 'none given'}",
                             f"give class numbers 1..{classes}")
    if not 0 < float(symmetry_threshold) < 1:
        raise InputError("--symmetry-threshold", f"must be within (0, 1), got {symmetry_threshold}", "e.g. 0.5")
    scripts = {s: require_script(s, "spi_em_class", INSTALL_HINT) for s in SCRIPTS}
    out_dir = Path(out_dir)
    work = (out_dir / "spi_em_class").resolve()
    work.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    input_cxi, data_file = work / "input.cxi", work / DATA_NAME
    sel_cxi = {o: work / f"selected_order{o}.cxi" for o in orders}
    for p in (input_cxi, data_file, *sel_cxi.values()):
        if p.exists():
            p.unlink()

    runs, hows = [], []
    for sp, tp in zip(shots, tables):
        frames, centre, how = frames_to_classify(tp)
        runs.append((sp, frames, centre))
        hows.append(how)
    groups = build_input_cxi(runs, input_cxi)
    n_total = sum(g["frames"].size for g in groups)
    if n_total == 0:
        raise InputError(tables[0], "no frames passed the filter in any table",
                         "check 'conveyor spi filter' (size window, thresholds) before classifying")
    if n_total < int(classes):
        raise InputError("--classes", f"{classes} classes for {n_total} frames", "use fewer classes than frames")

    def run(script, args, log_name, seeded=False):
        cmd = [scripts[script], *args]
        if seeded:  # numpy seeded and scipy.correlate restored in the tool's process (module notes)
            cmd = [sys.executable, "-m", "conveyor.tools.spi_em_class", cmd[0], "--seed", seed, "--", *cmd[1:]]
        return run_tool([str(c) for c in cmd], tool=script, input_path=shots[0], cwd=work,
                        log_path=logs / f"{log_name}.log", env=TOOL_ENV, timeout=timeout, echo=False,
                        fix="see the tool's log; check the parameters")

    run("spi_em_create.py", [input_cxi, "-d", data_file], "1_create")
    run("spi_em_config.py", ["-d", data_file, "--num_class", int(classes), "--num_rot", int(rotations),
                             "--q_min", int(q_min), "--q_max", int(q_max), "--binning", int(binning),
                             "--friedel" if friedel else "--no-friedel", "--logscale" if logscale else "--no-logscale",
                             "--no-best"], "2_config")
    run("spi_em_run.py", [int(iterations), "-d", data_file], "3_run", seeded=True)
    scores = {}
    for o in orders:
        text = run("spi_em_save_by_symmetry.py", [o, "-t", repr(float(symmetry_threshold)), "-o", sel_cxi[o],
                                                   "-d", data_file], f"4_save_by_symmetry_order{o}", seeded=True)
        scores[o] = parse_symmetry_scores(text)
    if select_classes is not None:
        chosen = sorted({int(c) for c in select_classes})
    else:
        chosen = sorted({c for o in orders for c, (_, ok) in scores[o].items() if ok})

    # -- read back ------------------------------------------------------------------------
    with h5py.File(data_file, "r") as f:
        last = max(int(k[5:]) for k in f.keys() if k.startswith("iter_"))
        it = f[f"iter_{last}"]
        loglh = np.asarray(it["loglh"][()], dtype=np.float64)  # [class, rotation, frame]
        rot_idx = np.asarray(it["rotations"][()], dtype=np.int64)
        scale = np.asarray(it["scale"][()], dtype=np.float64)
        models = np.asarray(it["model"][()], dtype=np.float64)
        mutual_info = float(np.asarray(it["mutual_info"][()]))
        conv = f["converted_data"]
        order = [k for k in conv.keys() if isinstance(conv[k], h5py.Group)]
        counts = [int(conv[k]["values"].shape[0]) for k in order]
    offsets = dict(zip(order, np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int)))
    flat = loglh.reshape(-1, loglh.shape[-1])
    best_ll = flat.max(axis=0)
    prob = np.exp(flat - best_ll).max(axis=0) / np.exp(flat - best_ll).sum(axis=0)
    angles = np.linspace(0.0, 180.0 if friedel else 360.0, int(rotations), endpoint=False)
    rows = []
    with h5py.File(sel_cxi[orders[0]], "r") as f:
        for g in groups:
            img = f["entry_1"][g["group"]]
            cls = np.asarray(img["em_class/classes"][()], dtype=np.int64)
            fr = np.asarray(img["conveyor_frame"][()], dtype=np.int64)
            sel = np.isin(cls, chosen)
            o = offsets[g["group"]]
            k = np.arange(o, o + fr.size)
            rows.append(pd.DataFrame({
                "file": g["file"], "frame": fr, "class": cls, "rotation_deg": angles[rot_idx[k]], "scale": scale[k],
                "probability": prob[k], "loglik": best_ll[k], "center_x": g["center"][0], "center_y": g["center"][1],
                "selected": sel,
            }))
    assign = pd.concat(rows, ignore_index=True)
    selected = assign.loc[assign["selected"], ["file", "frame", "class"]].reset_index(drop=True)
    pops = np.bincount(assign["class"].to_numpy(), minlength=int(classes) + 1)[1:]
    ks = np.arange(1, int(classes) + 1)
    class_scores = pd.DataFrame({"class": ks, "population": pops})
    for o in orders:
        class_scores[f"symmetry_order{o}"] = [scores[o].get(int(c), (np.nan, False))[0] for c in ks]
    class_scores["selected"] = np.isin(ks, chosen)
    class_scores["reason"] = ("chosen by the user" if select_classes is not None else
                              [f"score >= {symmetry_threshold:g} for order " + "/".join(
                                  str(o) for o in orders if scores[o].get(int(c), (0, False))[1]) if c in chosen
                               else f"score < {symmetry_threshold:g} for every order" for c in ks])
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(out_dir / "assignments.csv", assign.to_csv(index=False, float_format="%.6g"))
    write_text(out_dir / "selected.csv", selected.to_csv(index=False))
    write_text(out_dir / "class_scores.csv", class_scores.to_csv(index=False, float_format="%.6g"))
    _write_classes_h5(out_dir / "classes.h5", models, pops, assign, {
        "tool": f"spi_em_class {package_version('spi_em_class') or '?'}", "iterations": int(iterations),
        "num_rot": int(rotations), "num_class": int(classes), "q_min": int(q_min), "q_max": int(q_max),
        "friedel": bool(friedel), "logscale": bool(logscale), "binning": int(binning), "seed": int(seed),
        "symmetry_orders": orders, "symmetry_threshold": float(symmetry_threshold),
        "selection": "manual" if select_classes is not None else "symmetry",
        "mutual_info": mutual_info, "frames_from": hows,
    })
    return {"assignments": assign, "selected": selected, "scores": scores, "class_scores": class_scores,
            "work_dir": work, "runtime_s": time.time() - t0, "mutual_info": mutual_info}


def _write_classes_h5(path, models, populations, table, attrs):
    import h5py

    from ..io.atomic import atomic_path

    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            g = f.create_group("classes")
            g.create_dataset("models", data=models.astype(np.float32))
            g.create_dataset("population", data=np.asarray(populations, dtype=np.int64))
            for k, v in attrs.items():
                g.attrs[k] = v if not isinstance(v, list) else ",".join(map(str, v))
            t = f.create_group("frames")
            for col in table.columns:
                vals = table[col].to_numpy()
                if vals.dtype == object:
                    t.create_dataset(col, data=np.array([str(v) for v in vals], dtype=h5py.string_dtype()))
                else:
                    t.create_dataset(col, data=vals)


if __name__ == "__main__":  # pragma: no cover - the wrapper the adapter runs
    sys.exit(main())
