"""``conveyor spi emc`` (3D intensity by EMC) and ``conveyor spi correct`` (intensity correction).

``spi emc`` reads the selected frames of CXI shot files, runs
:func:`conveyor.spi.emc.emc` and writes, in ``--out-dir``:

* ``intensity.mrc``: the 3D intensity; the header voxel size is the reciprocal voxel
  ``dq`` in 1/Å (q without 2π), ``q = 0`` at index ``size // 2``, axes ``qz, qy, qx``;
* ``intensity_weight.mrc``: merge weight per voxel (0 = no pixel reached it);
* ``orientations.csv``: per frame ``file, frame, quat_w..quat_z`` (most likely rotation,
  the active rotation of the particle as in the simulator), ``orientation_index,
  max_prob, scale, log_likelihood``;
* ``log.csv``: one row per iteration (``iteration, beta, log_likelihood, mutual_info,
  rms_change, scale_mean, scale_std, num_rot, active_rot, seconds``);
* ``slices.png``: central sections of log10 intensity;
* ``emc_state.h5``: model, scales and log after the last finished iteration, replaced
  atomically every iteration; ``--resume`` continues from it.

``spi correct`` applies :func:`conveyor.spi.correct.correct_intensity`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from pathlib import Path

import numpy as np

from ..errors import InputError

log = logging.getLogger(__name__)

STATE_NAME = "emc_state.h5"


def register(group):
    p = group("spi").add_parser(
        "emc",
        help="3D intensity from selected frames by Expand-Maximise-Compress",
        description=(
            "Reconstruct the 3D diffraction intensity from single-particle frames by EMC (Dragonfly's "
            "algorithm on numpy/cupy). Writes DIR/intensity.mrc (voxel size = dq in 1/A), "
            "DIR/intensity_weight.mrc, DIR/orientations.csv, DIR/log.csv, DIR/slices.png and the restart "
            "file DIR/emc_state.h5 (every iteration; --resume continues from it)."
        ),
    )
    p.add_argument("--shots", nargs="+", required=True, metavar="CXI", help="CXI shot files")
    p.add_argument("--frames-table", nargs="+", default=None, metavar="H5",
                   help="per-file frame tables (same order as --shots) with a boolean column 'passed' in /frames")
    p.add_argument("--selected-frames", default=None, metavar="CSV",
                   help="CSV with columns file,frame (file: CXI name or path; frame: 0-based index) of the frames to use")
    p.add_argument("--out-dir", required=True, metavar="DIR", help="output folder")
    p.add_argument("--num-div", type=int, default=6, help="600-cell refinement of the orientation grid: 10(5n^3+n) rotations (default %(default)s)")
    p.add_argument("--friedel-half", action="store_true",
                   help="keep one of each pair of rotations related by a half-turn about the beam (2x faster; exact only for flat Ewald spheres)")
    p.add_argument("--iterations", type=int, default=30, help="number of iterations (default %(default)s)")
    p.add_argument("--beta-start", default="auto", help="start inverse temperature, or 'auto' from the data (default %(default)s)")
    p.add_argument("--beta-factor", type=float, default=2.0, help="multiply beta by this ... (default %(default)s)")
    p.add_argument("--beta-every", type=int, default=10, help="... every this many iterations (default %(default)s)")
    p.add_argument("--model-size", default="auto", help="odd edge of the 3D grid in voxels, or 'auto' (default %(default)s)")
    p.add_argument("--symmetry", default="none", help="point group imposed on the intensity: none, icosahedral, octahedral, tetrahedral, cN, dN (default %(default)s)")
    p.add_argument("--no-scale", action="store_true", help="do not fit a scale (fluence) per frame")
    p.add_argument("--bin", type=int, default=1, help="sum BIN x BIN pixel blocks before EMC; the voxel grows by BIN (default %(default)s)")
    p.add_argument("--max-radius-px", type=float, default=None, help="use only pixels within this radius of the beam centre (after binning)")
    p.add_argument("--polarization", choices=("x", "y", "none"), default="x", help="beam polarisation (default %(default)s)")
    p.add_argument("--init", choices=("radial", "random"), default="radial", help="start model (default %(default)s)")
    p.add_argument("--sparse", choices=("auto", "yes", "no"), default="auto", help="store frames as sparse CSR (auto: when < 10%% of pixels have photons)")
    p.add_argument("--cache-mb", type=float, default=None, help="memory for interpolation weights kept between iterations (default 1024 CPU / 8192 GPU)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the start model (default %(default)s)")
    p.add_argument("--resume", action="store_true", help=f"continue from DIR/{STATE_NAME} (the last finished iteration)")
    p.set_defaults(func=_run_emc)

    c = group("spi").add_parser(
        "correct",
        help="symmetrise, subtract background and fill the missing centre of a 3D intensity",
        description=(
            "Correct an EMC intensity for phasing: Friedel (and point-group) symmetrisation, constant or "
            "radial background from the outer shells, missing centre (beamstop) and unsampled voxels filled "
            "from a sphere form-factor fit scaled to the first measured shells, negatives set to 0. Writes the "
            "corrected intensity and a mask (1 = measured, 0 = filled)."
        ),
    )
    c.add_argument("intensity", metavar="INTENSITY.mrc", help="3D intensity (voxel size = dq in 1/A), e.g. from spi emc")
    c.add_argument("--out", required=True, metavar="CORRECTED.mrc")
    c.add_argument("--out-mask", required=True, metavar="MASK.mrc", help="1 = measured voxel, 0 = filled or outside")
    c.add_argument("--weight", default=None, metavar="WEIGHT.mrc", help="merge weight (intensity_weight.mrc); 0 marks unsampled voxels")
    c.add_argument("--beamstop-radius-px", type=float, default=None,
                   help="radius (voxels = detector pixels at the EMC voxel) inside which data are missing; default: from the unsampled centre")
    c.add_argument("--diameter-nm", type=float, default=None, help="particle diameter, nm: start (or fixed value with --fix-diameter) of the sphere fit")
    c.add_argument("--fix-diameter", action="store_true", help="use --diameter-nm as is instead of fitting it")
    c.add_argument("--fit-shells", type=float, default=6.0, help="width (voxels) of the measured shells the sphere model is fitted to (default %(default)s)")
    c.add_argument("--background", choices=("none", "constant", "radial"), default="none",
                   help="background to subtract, estimated from the outer shells (default %(default)s)")
    c.add_argument("--background-shells", type=float, default=3.0, help="outer shells (voxels) used for the background (default %(default)s)")
    c.add_argument("--symmetry", default="none", help="point group to impose in addition to Friedel symmetry (default %(default)s)")
    c.add_argument("--low-q-fill-nm", type=float, default=None,
                   help="fill the centre from a sphere of this diameter instead of the fitted one")
    c.set_defaults(func=_run_correct)


# ---------------------------------------------------------------------------------------
# frame selection
# ---------------------------------------------------------------------------------------
def _read_table(path):
    """``(frame indices, passed, center_x, center_y)`` of a /frames table (centres may be None)."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise InputError(path, "frame table does not exist", "check --frames-table (one table per --shots file)")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise InputError(path, f"not a readable HDF5 file ({exc})", "re-run the step that wrote it") from None
    with f:
        if "frames" not in f or not isinstance(f["frames"], h5py.Group):
            raise InputError(path, "no /frames group", "give a table written by 'conveyor spi filter'")
        g = f["frames"]
        if "passed" not in g:
            raise InputError(path, "the frame table has no 'passed' column", "run 'conveyor spi filter' first, or leave out --frames-table")
        passed = np.asarray(g["passed"][()]).astype(bool).ravel()
        frame = np.asarray(g["frame"][()]).astype(np.int64).ravel() if "frame" in g else np.arange(passed.size)
        if frame.size != passed.size:
            raise InputError(path, "columns 'frame' and 'passed' differ in length", "re-run the step that wrote it")
        cx = np.asarray(g["center_x"][()], dtype=np.float64).ravel() if "center_x" in g else None
        cy = np.asarray(g["center_y"][()], dtype=np.float64).ravel() if "center_y" in g else None
    return frame, passed, cx, cy


def _read_selection(path, shots):
    """``{shot index: sorted frame indices}`` from a CSV with columns file,frame."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "selected-frames file does not exist", "check --selected-frames")
    names = {}
    for i, s in enumerate(shots):
        names.setdefault(Path(s).name, []).append(i)
        names.setdefault(str(Path(s)), []).append(i)
        names.setdefault(str(Path(s).resolve()), []).append(i)
    out: dict[int, set] = {}
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or "file" not in reader.fieldnames or "frame" not in reader.fieldnames:
            raise InputError(path, "needs the columns 'file' and 'frame'", "write a CSV header 'file,frame'")
        for ln, row in enumerate(reader, start=2):
            key = row["file"].strip()
            hits = names.get(key) or names.get(Path(key).name)
            if not hits:
                raise InputError(path, f"line {ln}: file {key!r} is not among --shots", "list only files given with --shots")
            if len(set(hits)) > 1:
                raise InputError(path, f"line {ln}: file name {key!r} matches several --shots files", "write the full path")
            try:
                fr = int(row["frame"])
            except (TypeError, ValueError):
                raise InputError(path, f"line {ln}: frame {row['frame']!r} is not an integer", "write 0-based frame indices") from None
            out.setdefault(hits[0], set()).add(fr)
    return {k: np.array(sorted(v), dtype=np.int64) for k, v in out.items()}


def _select(args):
    """Per shot file: ``(frame indices, centre override or None)``; raises on an empty selection."""
    shots = [Path(s) for s in args.shots]
    tables = args.frames_table
    if tables is not None and len(tables) != len(shots):
        raise InputError(tables[0] if tables else "--frames-table", f"{len(tables)} frame tables for {len(shots)} shot files",
                         "give one table per --shots file, in the same order")
    sel = _read_selection(args.selected_frames, shots) if args.selected_frames else None
    out = []
    for i, path in enumerate(shots):
        from ..io.cxi import read_cxi

        info = read_cxi(path, lazy=True, load_extra=False)
        info.require_geometry()
        n_total = info.n_frames_total
        idx = np.arange(n_total, dtype=np.int64)
        center = None
        if tables is not None:
            frame, passed, cx, cy = _read_table(tables[i])
            if frame.size and (frame.min() < 0 or frame.max() >= n_total):
                raise InputError(tables[i], f"frame index {int(frame.max())} out of range for {path} ({n_total} frames)",
                                 "use the table written for this shot file")
            idx = frame[passed]
            if cx is not None and cy is not None and passed.any():
                ok = passed & np.isfinite(cx) & np.isfinite(cy)
                if ok.any():
                    center = (float(np.median(cx[ok])), float(np.median(cy[ok])))
        if sel is not None:
            want = sel.get(i, np.zeros(0, dtype=np.int64))
            if want.size and want.max() >= n_total:
                raise InputError(args.selected_frames, f"frame {int(want.max())} out of range for {path.name} ({n_total} frames)",
                                 "use 0-based frame indices of that file")
            idx = np.intersect1d(idx, want)
        out.append((path, np.unique(idx), center))
    if sum(len(x[1]) for x in out) == 0:
        where = args.selected_frames or (tables[0] if tables else shots[0])
        raise InputError(where, "no frames selected for EMC", "check the selection (passed frames, file,frame list)")
    return out


def _load_frames(selection, args):
    """Frames grouped by detector geometry: list of dicts with frames, qvox, corr, ids, dq."""
    import scipy.sparse as sps

    from .. import backend
    from ..io.cxi import read_cxi
    from ..spi import emc as E
    from ..spi.detector import DetectorGeometry

    groups: dict[str, dict] = {}
    dq_ref = None
    for path, idx, center in selection:
        if idx.size == 0:
            continue
        shots = read_cxi(path, frames=idx, lazy=True, load_extra=False)
        geom = DetectorGeometry.from_shots(shots)
        if center is not None:
            geom = geom.with_center(center)
        dummy = np.zeros((1,) + tuple(geom.shape), dtype=np.float32)
        _, mask_b, geom_b = E.bin_detector(dummy, shots.mask, geom, args.bin)
        if dq_ref is None:
            dq_ref = geom_b.q_per_pixel
        q, corr, pix, dq = E.detector_pixels(geom_b, mask_b, dq_per_m=dq_ref, polarization=args.polarization, max_radius_px=args.max_radius_px)
        key = hashlib.sha1(np.ascontiguousarray(q, dtype=np.float32).tobytes()).hexdigest()
        g = groups.setdefault(key, {"qvox": q, "corr": corr, "blocks": [], "ids": [], "sparse": None})
        for start, block in shots.data.chunks(256):
            fb, _, _ = E.bin_detector(np.asarray(block, dtype=np.float32), shots.mask, geom, args.bin)
            k = fb.reshape(fb.shape[0], -1)[:, pix].astype(np.float32)
            if np.any(k < 0):
                raise InputError(path, "negative photon counts in the selected frames", "convert ADU to photons (>= 0) before EMC")
            if g["sparse"] is None:
                g["sparse"] = args.sparse == "yes" or (args.sparse == "auto" and np.count_nonzero(k) < 0.1 * k.size)
            g["blocks"].append(sps.csr_matrix(k) if g["sparse"] else k)
            g["ids"] += [(path.name, int(f)) for f in idx[start : start + len(k)]]
    out = []
    for g in groups.values():
        k = sps.vstack(g["blocks"]).tocsr() if g["sparse"] else np.concatenate(g["blocks"])
        photons = np.asarray(k.sum(axis=1)).ravel()
        keep = photons > 0
        if not keep.all():
            log.warning("dropping %d frames without photons on the good pixels", int((~keep).sum()))
            k = k[keep]
            g["ids"] = [x for x, ok in zip(g["ids"], keep) if ok]
        if k.shape[0] == 0:
            continue
        if not g["sparse"]:
            k = backend.asarray(k)
        out.append({"frames": k, "qvox": g["qvox"], "corr": g["corr"], "ids": g["ids"], "dq_per_m": dq_ref})
    if not out:
        raise InputError(selection[0][0], "no selected frame has photons on the good pixels", "check the mask and the selection")
    return out


# ---------------------------------------------------------------------------------------
# state and outputs
# ---------------------------------------------------------------------------------------
def _fingerprint(args, groups, n_rot, size) -> str:
    ids = [x for g in groups for x in g["ids"]]
    d = {
        "frames": hashlib.sha1(json.dumps(ids).encode()).hexdigest(),
        "pixels": [int(g["qvox"].shape[0]) for g in groups],
        "num_div": args.num_div, "friedel_half": bool(args.friedel_half), "n_rot": n_rot, "size": size,
        "bin": args.bin, "max_radius_px": args.max_radius_px, "symmetry": str(args.symmetry).lower(),
        "scale": not args.no_scale, "polarization": args.polarization,
        "beta": [str(args.beta_start), float(args.beta_factor), int(args.beta_every)],
    }
    return json.dumps(d, sort_keys=True)


def _save_state(path, state, fingerprint, beta0, log_rows):
    import h5py

    from .. import backend
    from ..io.atomic import atomic_path

    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("model", data=backend.to_host(state.model).astype(np.float32), compression="lzf")
            f.create_dataset("weight", data=backend.to_host(state.weight).astype(np.float32), compression="lzf")
            f.create_dataset("scales", data=backend.to_host(state.scales).astype(np.float32))
            f.create_dataset("best", data=backend.to_host(state.best).astype(np.int64))
            f.create_dataset("max_prob", data=backend.to_host(state.max_prob).astype(np.float32))
            f.create_dataset("loglik", data=backend.to_host(state.loglik).astype(np.float64))
            f.attrs["iteration"] = int(state.iteration)
            f.attrs["beta_start"] = float(beta0)
            f.attrs["fingerprint"] = fingerprint
            f.attrs["log"] = json.dumps(log_rows)


def _load_state(path, fingerprint):
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise InputError(path, f"restart file is not readable ({exc})", "delete it to start again") from None
    with f:
        if f.attrs.get("fingerprint") != fingerprint:
            raise InputError(path, "restart file was written for other frames or parameters",
                             "resume with the same inputs and options, or delete it to start again")
        return {
            "iteration": int(f.attrs["iteration"]),
            "beta_start": float(f.attrs["beta_start"]),
            "log": json.loads(f.attrs["log"]),
            "model": f["model"][()],
            "weight": f["weight"][()],
            "scales": f["scales"][()],
            "best": f["best"][()],
            "max_prob": f["max_prob"][()],
            "loglik": f["loglik"][()],
        }


def _write_log(path, rows):
    from ..io.atomic import write_text
    from ..spi.emc import LOG_COLUMNS

    def fmt(v):
        return f"{v:.8g}" if isinstance(v, float) else str(v)

    lines = [",".join(LOG_COLUMNS)] + [",".join(fmt(r[c]) for c in LOG_COLUMNS) for r in rows]
    write_text(path, "\n".join(lines) + "\n")


def write_intensity_mrc(path, volume, dq_per_m: float, labels=()):
    """Write a reciprocal-space volume with the voxel size ``dq`` in 1/Å in the header."""
    import mrcfile

    from .. import backend
    from ..io.atomic import atomic_path

    dq_A = float(dq_per_m) * 1e-10
    size = int(np.asarray(volume).shape[0])
    base = [
        f"RECIPROCAL grid: voxel = dq = {dq_A:.6e} 1/A (header voxel size is dq in 1/A)",
        f"q = 0 at index {size // 2} (size//2); axes qz,qy,qx; q without 2pi",
    ]
    with atomic_path(path) as tmp:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(np.ascontiguousarray(backend.to_host(volume), dtype=np.float32))
            mrc.set_volume()
            mrc.voxel_size = dq_A
            for lab in (list(labels) + base)[:10]:
                mrc.add_label(str(lab)[:80])
            mrc.update_header_stats()


def _write_slices_png(path, volume, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io.atomic import atomic_path

    v = np.asarray(volume, dtype=np.float64)
    c = v.shape[0] // 2
    pos = v[v > 0]
    floor = float(np.percentile(pos, 1)) if pos.size else 1.0
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.8))
    for ax, img, name in zip(axes, (v[c], v[:, c], v[:, :, c]), ("q_z = 0 (q_y up, q_x across)", "q_y = 0 (q_z up, q_x across)", "q_x = 0 (q_z up, q_y across)")):
        im = ax.imshow(np.log10(np.maximum(img, floor)), origin="lower", cmap="magma")
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02, label="log10 intensity")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)


def _write_orientations(path, ids, quats, best, max_prob, scales, loglik):
    from ..io.atomic import write_text

    cols = ["file", "frame", "quat_w", "quat_x", "quat_y", "quat_z", "orientation_index", "max_prob", "scale", "log_likelihood"]
    lines = [",".join(cols)]
    for (name, fr), b, mp, s, ll in zip(ids, best, max_prob, scales, loglik):
        qq = quats[int(b)]
        lines.append(f"{name},{fr},{qq[0]:.8f},{qq[1]:.8f},{qq[2]:.8f},{qq[3]:.8f},{int(b)},{mp:.6g},{s:.6g},{ll:.8g}")
    write_text(path, "\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------------------
def _parse_model_size(v):
    if str(v).strip().lower() == "auto":
        return "auto"
    try:
        n = int(v)
    except ValueError:
        raise InputError("--model-size", f"{v!r} is not an integer or 'auto'", "give an odd number of voxels, e.g. 125") from None
    return n


def _run_emc(args) -> int:
    from .. import backend
    from ..spi import emc as E
    from ..spi.quaternions import point_group, quaternion_grid

    if args.iterations < 1:
        raise InputError("--iterations", f"must be >= 1, got {args.iterations}", "e.g. 30")
    if args.num_div < 1:
        raise InputError("--num-div", f"must be >= 1, got {args.num_div}", "e.g. 6")
    beta_start = args.beta_start
    if str(beta_start).lower() != "auto":
        try:
            beta_start = float(beta_start)
        except ValueError:
            raise InputError("--beta-start", f"{args.beta_start!r} is not a number or 'auto'", "e.g. 0.001 or auto") from None
    else:
        beta_start = "auto"
    symmetry = None if str(args.symmetry).lower() in ("none", "", "c1") else args.symmetry
    point_group(symmetry)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    selection = _select(args)
    groups = _load_frames(selection, args)
    quats, weights = quaternion_grid(args.num_div, friedel=args.friedel_half)
    qv = [g["qvox"] for g in groups]
    size = E.auto_model_size(qv) if _parse_model_size(args.model_size) == "auto" else _parse_model_size(args.model_size)
    fingerprint = _fingerprint(args, groups, len(quats), size)
    dq = groups[0]["dq_per_m"]
    ids = [x for g in groups for x in g["ids"]]
    state_path = out / STATE_NAME
    init, scales, start_it, log_rows, beta0 = args.init, None, 0, [], beta_start
    saved = None
    if args.resume and state_path.exists():
        saved = _load_state(state_path, fingerprint)
        init, scales, start_it, log_rows, beta0 = saved["model"], saved["scales"], saved["iteration"], saved["log"], saved["beta_start"]
        print(f"resuming from iteration {start_it} ({state_path})")
    elif args.resume:
        print(f"no {state_path} yet: starting from iteration 0")
    n_frames = len(ids)
    print(f"EMC: {n_frames} frames in {len(groups)} geometr{'y' if len(groups) == 1 else 'ies'}, "
          f"{sum(int(g['qvox'].shape[0]) for g in groups)} pixels, {len(quats)} rotations (num_div {args.num_div}), "
          f"{size}^3 voxels of {dq * 1e-10:.4e} 1/A, device {backend.describe()}")

    def callback(state):
        log_rows.append(state.log_row)
        _save_state(state_path, state, fingerprint, result_beta[0], log_rows)
        _write_log(out / "log.csv", log_rows)
        r = state.log_row
        print(f"iteration {r['iteration']}: beta {r['beta']:.4g}, log-likelihood {r['log_likelihood']:.6g}, "
              f"mutual info {r['mutual_info']:.3f}, rms change {r['rms_change']:.3g}, {r['seconds']:.1f} s", flush=True)

    if beta0 == "auto":
        beta0 = E.estimate_beta([g["frames"] for g in groups], qv, [g["corr"] for g in groups])
    result_beta = [beta0]
    if start_it < args.iterations:
        res = E.emc(
            [g["frames"] for g in groups], qv, size, quats, weights,
            iterations=args.iterations, beta_schedule=(beta0, args.beta_factor, args.beta_every),
            scale=not args.no_scale, symmetry=symmetry, init=init, rng=args.seed, callback=callback,
            corr=[g["corr"] for g in groups], scales=scales, start_iteration=start_it, cache_mb=args.cache_mb,
        )
        model, weight, best, max_prob, sc, ll = res.intensity, res.weight, res.orientation_index, res.max_prob, res.scales, res.loglik
    else:
        model, weight, best, max_prob, sc, ll = (saved["model"], saved["weight"], saved["best"], saved["max_prob"], saved["scales"], saved["loglik"])
    done = log_rows[-1]["iteration"] if log_rows else 0
    labels = [f"conveyor spi emc: 3D intensity, {done} iterations, {n_frames} frames",
              f"num_div {args.num_div} ({len(quats)} rotations), symmetry {symmetry or 'friedel'}"]
    write_intensity_mrc(out / "intensity.mrc", model, dq, labels)
    write_intensity_mrc(out / "intensity_weight.mrc", weight, dq, ["conveyor spi emc: merge weight (0 = unsampled voxel)"])
    _write_orientations(out / "orientations.csv", ids, quats, best, max_prob, sc, ll)
    _write_log(out / "log.csv", log_rows)
    _write_slices_png(out / "slices.png", model, f"EMC intensity after {done} iterations ({n_frames} frames)")
    print(f"wrote {out / 'intensity.mrc'} ({size}^3, dq {dq * 1e-10:.4e} 1/A), orientations.csv, log.csv, slices.png")
    return 0


def _run_correct(args) -> int:
    from ..io.mrc import read_mrc
    from ..spi.correct import correct_intensity

    vol, dq_A = read_mrc(args.intensity)
    if vol.ndim != 3 or len(set(vol.shape)) != 1:
        raise InputError(args.intensity, f"expected a cubic 3D intensity, got shape {vol.shape}", "give the intensity.mrc of spi emc")
    if not dq_A > 0:
        raise InputError(args.intensity, "header voxel size (dq in 1/A) is 0", "write the reciprocal voxel size in the header")
    weight = None
    if args.weight:
        weight, _ = read_mrc(args.weight)
        if weight.shape != vol.shape:
            raise InputError(args.weight, f"weight shape {weight.shape} differs from the intensity {vol.shape}", "use the weight written with this intensity")
    symmetry = None if str(args.symmetry).lower() in ("none", "", "c1") else args.symmetry
    res = correct_intensity(
        vol, dq_per_A=dq_A, weight=weight, beamstop_radius=args.beamstop_radius_px, diameter_nm=args.diameter_nm,
        fit_diameter=not args.fix_diameter, fit_width=args.fit_shells, background=args.background,
        background_shells=args.background_shells, symmetry=symmetry, low_q_fill_nm=args.low_q_fill_nm,
    )
    labels = [f"conveyor spi correct of {Path(args.intensity).name}",
              f"background {args.background}; centre filled inside r = {res.fill_radius:.2f} voxels",
              f"sphere fill diameter {res.diameter_nm:.2f} nm"]
    write_intensity_mrc(args.out, res.intensity, dq_A * 1e10, labels)
    write_intensity_mrc(args.out_mask, res.measured.astype(np.float32), dq_A * 1e10, ["conveyor spi correct: 1 = measured voxel, 0 = filled"])
    print(f"wrote {args.out} and {args.out_mask}: {int(res.measured.sum())} measured, {int(res.filled.sum())} filled voxels; "
          f"sphere diameter {res.diameter_nm:.2f} nm, background {res.background_level:.4g}")
    return 0
