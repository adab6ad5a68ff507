"""``conveyor spi class2d``, ``conveyor spi select`` and ``conveyor select spi``.

::

    conveyor spi class2d --shots A.cxi B.cxi --frames-table A.h5 B.h5 --out-dir DIR [--classes 10]
    conveyor spi select --class-dir DIR --mode auto --out-frames selected.csv --out-scores scores.csv \\
        [--dmin-nm 60 --dmax-nm 80] [--out-yaml classes.yaml]
    conveyor spi select --class-dir DIR --mode manual [--selection classes.yaml] --out-frames ... --out-scores ...
    conveyor select spi --class-dir DIR --classes 1 4 7 [--out results/<exp>/spi/select/classes.yaml]

``class2d`` classifies the frames that passed ``conveyor spi filter`` (the ``passed``
column of each per-frame table; ``is_hit`` or all frames for tables without it) about
each frame's beam centre (``center_x``/``center_y`` of the table, else the file's) and
writes ``DIR/classes.h5``, ``DIR/gallery.png``, ``DIR/assignments.csv`` and
``DIR/log.csv``. Classes are numbered from 1 in every file.

``spi select --mode manual`` without a selection file exits with status
:data:`EXIT_NEEDS_SELECTION` (3) and prints which gallery to look at and which file to
write.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import numpy as np

from .. import backend
from ..errors import InputError

log = logging.getLogger(__name__)

#: Exit status of ``conveyor spi select --mode manual`` while the user's selection is missing.
EXIT_NEEDS_SELECTION = 3
CHUNK = 256


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------
def _read_table(path):
    """Per-frame table of ``conveyor spi hits|center|size|filter`` as a DataFrame."""
    try:
        from ..spi.frames import read_frames  # noqa: PLC0415
    except ImportError:  # pragma: no cover - the frames module ships with the package
        read_frames = None
    if read_frames is not None:
        return read_frames(path)
    import h5py  # noqa: PLC0415
    import pandas as pd  # noqa: PLC0415

    path = Path(path)
    if not path.is_file():
        raise InputError(path, "per-frame table not found", "run 'conveyor spi filter' first")
    with h5py.File(path, "r") as f:
        if "frames" not in f:
            raise InputError(path, "no /frames group", "give a table written by 'conveyor spi hits|center|size|filter'")
        g = f["frames"]
        df = pd.DataFrame({k: g[k][()] for k in g.keys()})
        df.attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in g.attrs.items()}
    return df


def _frames_to_classify(df, table_path):
    if "frame" not in df.columns:
        raise InputError(table_path, "the per-frame table has no 'frame' column", "give a table written by 'conveyor spi filter'")
    if "passed" in df.columns:
        keep, how = df["passed"].to_numpy(bool), "passed"
    elif "is_hit" in df.columns:
        keep, how = df["is_hit"].to_numpy(bool), "is_hit"
        log.warning("%s has no 'passed' column: classifying all hits (run 'conveyor spi filter' first)", table_path)
    else:
        keep, how = np.ones(len(df), bool), "all"
        log.warning("%s has neither 'passed' nor 'is_hit': classifying all frames", table_path)
    return np.flatnonzero(keep), how


def _same(a, b, rel=1e-4):
    return a is None or b is None or abs(a - b) <= rel * max(abs(a), abs(b))


def _default_selection_path(class_dir) -> Path:
    """``results/<exp>/spi/select/classes.yaml`` for ``results/<exp>/spi/class2d``."""
    return Path(class_dir).parent / "select" / "classes.yaml"


# ---------------------------------------------------------------------------------------
# conveyor spi class2d
# ---------------------------------------------------------------------------------------
def _class2d(args) -> int:
    import pandas as pd  # noqa: PLC0415

    from ..io.atomic import write_text  # noqa: PLC0415
    from ..io.cxi import read_cxi  # noqa: PLC0415
    from ..spi import classify2d as c2  # noqa: PLC0415

    t0 = time.time()
    shots_paths = list(args.shots)
    tables = list(args.frames_table)
    if len(shots_paths) != len(tables):
        raise InputError("--frames-table", f"{len(tables)} tables for {len(shots_paths)} shot files",
                         "give one per-frame table per shot file, in the same order")
    out_dir = Path(args.out_dir)
    runs = []  # (shots, rows frames, centres)
    geometry = {"pixel_size_m": None, "distance_m": None, "wavelength_m": None}
    shape = None
    mask_all = None
    dwin = {"filter_dmin_nm": None, "filter_dmax_nm": None}
    for sp, tp in zip(shots_paths, tables):
        shots = read_cxi(sp, lazy=True, load_extra=False)
        df = _read_table(tp)
        src = df.attrs.get("source")
        if src and Path(str(src)).name != Path(sp).name:
            log.warning("%s was written for %s, not %s", tp, src, sp)
        rows, how = _frames_to_classify(df, tp)
        frames = df["frame"].to_numpy(np.int64)[rows]
        if frames.size and (frames.min() < 0 or frames.max() >= shots.n_frames_total):
            raise InputError(tp, f"frame indices go beyond the {shots.n_frames_total} frames of {sp}",
                             "give the per-frame table written for this shot file (same order as --shots)")
        if shape is None:
            shape = shots.frame_shape
            mask_all = shots.mask.astype(bool).copy()
        elif shots.frame_shape != shape:
            raise InputError(sp, f"frames are {shots.frame_shape}, the first file's are {shape}",
                             "classify shots of one detector geometry together")
        else:
            mask_all &= shots.mask.astype(bool)
        centers = np.tile(np.asarray(shots.beam_center_px, dtype=np.float64), (frames.size, 1))
        if {"center_x", "center_y"} <= set(df.columns):
            c = df[["center_x", "center_y"]].to_numpy(np.float64)[rows]
            ok = np.all(np.isfinite(c), axis=1)
            centers[ok] = c[ok]
        if shots.pixel_size_m and shots.distance_m and shots.wavelength_m:
            for k, v in (("pixel_size_m", shots.pixel_size_m), ("distance_m", shots.distance_m),
                         ("wavelength_m", shots.wavelength_m)):
                if not _same(geometry[k], float(v)):
                    raise InputError(sp, f"{k} = {v:g} differs from the first file's {geometry[k]:g}",
                                     "classify shots of one detector geometry together")
                geometry[k] = float(v)
        for k in dwin:
            v = df.attrs.get(k)
            if v is not None and dwin[k] is None:
                try:
                    dwin[k] = float(v)
                except (TypeError, ValueError):
                    pass
        runs.append((shots, Path(sp), frames, centers, how))
        log.info("%s: %d frames to classify (%s)", sp, frames.size, how)
    n_total = sum(r[2].size for r in runs)
    if n_total == 0:
        raise InputError(tables[0], "no frames passed the filter in any table",
                         "check 'conveyor spi filter' (size window, thresholds) before classifying")
    # optional random subset over all files
    pick = None
    if args.max_frames is not None and n_total > args.max_frames:
        if args.max_frames < 1:
            raise InputError("--max-frames", f"must be positive, got {args.max_frames}", "give a number of frames")
        rng = np.random.default_rng(int(args.seed))
        pick = np.sort(rng.choice(n_total, size=int(args.max_frames), replace=False))
    all_c = np.concatenate([r[3] for r in runs])
    if pick is not None:
        all_c = all_c[pick]
    grid = c2.make_grid(shape, mask_all, all_c, args.rotations, friedel=not args.no_friedel, r_min=args.r_min,
                        r_max=args.r_max, ring_px=args.ring_px)
    # polar binning, file by file and block by block, kept on the device
    xp = backend.xp()
    pgrid = c2.profile_grid(shape, mask_all, all_c, grid)
    K_parts, N_parts, N2_parts, PK_parts, PN_parts = [], [], [], [], []
    files, frames_out, centers_out = [], [], []
    offset = 0
    for shots, sp, frames, centers, _ in runs:
        sel = np.arange(frames.size)
        if pick is not None:
            sel = pick[(pick >= offset) & (pick < offset + frames.size)] - offset
        offset += frames.size
        if sel.size == 0:
            continue
        positions = frames[sel]  # lazy=True with all frames: position == frame index
        mask = backend.asarray(shots.mask)
        for start in range(0, sel.size, CHUNK):
            part = sel[start:start + CHUNK]
            block = backend.asarray(np.asarray(shots.data[positions[start:start + CHUNK]]))
            K, N, N2 = c2.polar_bin(block, mask, centers[part], grid, return_n2=True)
            K_parts.append(K.astype(xp.float32))
            N_parts.append(N.astype(xp.float32))
            N2_parts.append(N2.astype(xp.float32))
            PK, PN = c2.polar_bin(block, mask, centers[part], pgrid)
            PK_parts.append(PK[..., 0])
            PN_parts.append(PN[..., 0])
        files += [str(sp)] * sel.size
        frames_out.append(frames[sel])
        centers_out.append(centers[sel])
    K = xp.concatenate(K_parts)
    N = xp.concatenate(N_parts)
    N2 = xp.concatenate(N2_parts)
    frames_out = np.concatenate(frames_out)
    centers_out = np.concatenate(centers_out)
    t_bin = time.time() - t0
    res = c2.classify_polar(K, N, grid, n_classes=args.classes, iterations=args.iterations, seed=args.seed,
                            init=args.init, profile_counts=xp.concatenate(PK_parts),
                            profile_npix=xp.concatenate(PN_parts), profile_rings=pgrid, npix2=N2)
    table = c2.assignment_table(res, files, frames_out, centers_out)
    attrs = dict(geometry)
    attrs.update(dwin)
    attrs.update(n_frames=int(res.assignments.size), n_rot=int(args.rotations), iterations=int(args.iterations),
                 seed=int(args.seed), init=args.init, device=backend.describe(),
                 shots=[str(p) for p in shots_paths], frames_tables=[str(p) for p in tables],
                 max_frames=args.max_frames)
    out_dir.mkdir(parents=True, exist_ok=True)
    c2.write_class_file(out_dir / "classes.h5", res, table, attrs)
    write_text(out_dir / "assignments.csv", table.to_csv(index=False, float_format="%.6g"))
    write_text(out_dir / "log.csv", pd.DataFrame(res.log).to_csv(index=False, float_format="%.6g"))
    c2.plot_gallery(out_dir / "gallery.png", res.class_images, res.populations,
                    title=f"{res.n_classes} classes of {res.assignments.size} frames from {len(runs)} file(s); "
                          "label = class: frames (share)")
    dt = time.time() - t0
    pops = ", ".join(f"{i + 1}:{p}" for i, p in enumerate(res.populations))
    print(f"classified {res.assignments.size} frames into {res.n_classes} classes ({pops}) with {args.rotations} "
          f"rotations, {args.iterations} iterations in {dt:.1f} s (binning {t_bin:.1f} s) -> {out_dir}/"
          "{classes.h5,gallery.png,assignments.csv,log.csv}")
    return 0


# ---------------------------------------------------------------------------------------
# conveyor spi select
# ---------------------------------------------------------------------------------------
def _scores(cf, args, *, require_size: bool):
    from ..spi import select as sl  # noqa: PLC0415

    dmin = args.dmin_nm if args.dmin_nm is not None else cf.attrs.get("filter_dmin_nm")
    dmax = args.dmax_nm if args.dmax_nm is not None else cf.attrs.get("filter_dmax_nm")
    if (dmin is None) != (dmax is None) or (require_size and dmin is None):
        raise InputError("--dmin-nm/--dmax-nm", "no particle diameter range for the size criterion",
                         "give --dmin-nm and --dmax-nm (the classification's frame tables did not record the filter window)")
    px, dist, lam = cf.geometry()
    if dmin is not None and None in (px, dist, lam):
        if require_size:
            raise InputError(cf.path, "no detector geometry (pixel size, distance, wavelength) for the size criterion",
                             "classify CXI files that hold the geometry, or select manually")
        dmin = dmax = None
    return sl.score_classes(cf.models, cf.grid, cf.populations, pixel_size_m=px, distance_m=dist, wavelength_m=lam,
                            dmin_nm=dmin, dmax_nm=dmax, min_frames=args.min_frames, min_fraction=args.min_fraction,
                            min_visibility=args.min_fringes, min_symmetry=args.min_symmetry, profiles=cf.profiles,
                            profile_radii=cf.profile_radii, frames=cf.frames, max_misfit=args.max_frame_misfit)


def _needs_selection_message(class_dir: Path, selection: Path, cf, suggestion=None) -> str:
    n = cf.n_classes
    pops = ", ".join(f"{i + 1}:{int(p)}" for i, p in enumerate(cf.populations))
    lines = [
        "conveyor: manual class selection needed (selection: manual).",
        f"  1. Look at {class_dir / 'gallery.png'}: {n} classes numbered 1-{n}, each with its frame count",
        f"     (class:frames {pops}; per-frame classes in {class_dir / 'assignments.csv'}).",
        "     Keep the classes that look like one particle of the right size: round or 2n-fold",
        "     symmetric rings with sharp fringes; drop classes with stripes, smeared fringes or the wrong ring spacing.",
        f"  2. Write {selection} with the classes to keep, for example:",
        "         classes: [1, 4, 7]",
        "     or let conveyor check the numbers and write it:",
        f"         conveyor select spi --class-dir {class_dir} --classes 1 4 7 --out {selection}",
    ]
    if suggestion:
        lines.append(f"     (the automatic scores would keep: classes: [{', '.join(map(str, suggestion))}];"
                     f" see 'conveyor spi select --mode auto')")
    lines.append("  3. Run the same command (or the workflow) again; finished steps are not recomputed.")
    return "\n".join(lines)


def _select(args) -> int:
    from ..io.atomic import write_text  # noqa: PLC0415
    from ..spi import classify2d as c2  # noqa: PLC0415
    from ..spi import select as sl  # noqa: PLC0415

    class_dir = Path(args.class_dir)
    cf = c2.read_class_file(class_dir / "classes.h5")
    if args.mode == "auto":
        scores = _scores(cf, args, require_size=True)
        write_text(args.out_scores, scores.to_csv(index=False, float_format="%.6g"))
        chosen = sl.auto_select(scores)
        if not chosen:
            raise InputError(class_dir / "classes.h5", "the automatic selection kept no class "
                             f"(reasons in {args.out_scores})",
                             "look at the gallery and select manually (--mode manual), or relax --min-fringes/"
                             "--min-symmetry/--dmin-nm/--dmax-nm")
        if args.out_yaml:
            sl.write_selection(args.out_yaml, chosen, cf.n_classes, mode="auto", source=class_dir / "classes.h5",
                               scores=scores, populations=cf.populations)
    else:
        selection = Path(args.selection) if args.selection else _default_selection_path(class_dir)
        if not selection.is_file():
            suggestion = None
            try:
                suggestion = sl.auto_select(_scores(cf, args, require_size=True)) or None
            except InputError:
                pass
            print(_needs_selection_message(class_dir, selection, cf, suggestion), file=sys.stderr)
            return EXIT_NEEDS_SELECTION
        chosen = sl.read_selection(selection, cf.n_classes, cf.populations)
        scores = _scores(cf, args, require_size=False)
        scores["selected"] = scores["class"].isin(chosen)
        scores["reason"] = np.where(scores["selected"], f"chosen in {selection}", f"not chosen in {selection}")
        write_text(args.out_scores, scores.to_csv(index=False, float_format="%.6g"))
    frames = sl.selected_frames(cf.frames, chosen, args.max_frame_misfit)
    write_text(args.out_frames, frames.to_csv(index=False))
    n = len(cf.frames)
    in_classes = int(cf.frames["class"].isin(chosen).sum())
    print(f"selected classes {', '.join(map(str, chosen))} ({args.mode}): {len(frames)} of {n} frames "
          f"({in_classes - len(frames)} of their {in_classes} frames misfit their class) "
          f"-> {args.out_frames}, scores {args.out_scores}" + (f", {args.out_yaml}" if args.mode == "auto" and args.out_yaml else ""))
    return 0


# ---------------------------------------------------------------------------------------
# conveyor select spi
# ---------------------------------------------------------------------------------------
def _select_write(args) -> int:
    from ..spi import classify2d as c2  # noqa: PLC0415
    from ..spi import select as sl  # noqa: PLC0415

    class_dir = Path(args.class_dir)
    cf = c2.read_class_file(class_dir / "classes.h5")
    out = Path(args.out) if args.out else _default_selection_path(class_dir)
    items = [c for arg in args.classes for c in str(arg).replace(",", " ").split()]
    chosen = sl.validate_classes(items, cf.n_classes, "--classes", cf.populations)
    sl.write_selection(out, chosen, cf.n_classes, mode="manual", source=class_dir / "classes.h5",
                       populations=cf.populations)
    n = int(cf.frames["class"].isin(chosen).sum())
    print(f"wrote {out}: classes [{', '.join(map(str, chosen))}] ({n} of {len(cf.frames)} frames)")
    return 0


# ---------------------------------------------------------------------------------------
# registration
# ---------------------------------------------------------------------------------------
def register(group):
    from ..spi import select as sl  # noqa: PLC0415

    p = group("spi").add_parser(
        "class2d", help="2D classification of the passed frames (EM with in-plane rotations)",
        description="Classify the diffraction patterns that passed 'conveyor spi filter' into 2D classes: polar "
        "binning about each frame's beam centre, EM with in-plane rotations (FFTs along the angle), Poisson "
        "likelihood with a per-frame scale and an annealed likelihood. Writes DIR/classes.h5, DIR/gallery.png, "
        "DIR/assignments.csv and DIR/log.csv (classes numbered from 1).")
    p.add_argument("--shots", required=True, nargs="+", metavar="SHOTS.cxi", help="CXI files of shots")
    p.add_argument("--frames-table", required=True, nargs="+", metavar="TABLE.h5",
                   help="per-frame tables from 'conveyor spi filter', one per shot file in the same order")
    p.add_argument("--out-dir", required=True, metavar="DIR", help="output folder")
    p.add_argument("--classes", type=int, default=10, help="number of classes (default %(default)s)")
    p.add_argument("--rotations", type=int, default=36,
                   help="in-plane rotations = angle bins over 180 deg (Friedel) (default %(default)s: 5 deg steps)")
    p.add_argument("--iterations", type=int, default=20, help="EM iterations (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the initialisation and --max-frames (default %(default)s)")
    p.add_argument("--max-frames", type=int, default=None, metavar="N",
                   help="classify a random subset of at most N passed frames (default: all)")
    p.add_argument("--init", choices=("kmeans++", "random"), default="kmeans++", help="initialisation (default %(default)s)")
    p.add_argument("--r-min", type=float, default=None, help="inner radius, px (default: edge of the beamstop)")
    p.add_argument("--r-max", type=float, default=None, help="outer radius, px (default: largest circle inside the detector)")
    p.add_argument("--ring-px", type=float, default=None, help="ring width, px (default 1, wider beyond 96 rings)")
    p.add_argument("--no-friedel", action="store_true", help="do not fold the patterns onto 180 deg (rotations over 360 deg)")
    p.set_defaults(func=_class2d)

    p = group("spi").add_parser(
        "select", help="select 2D classes: automatic scores or the user's classes.yaml",
        description="Choose the 2D classes whose frames go on to EMC. auto: keep classes of at least --min-frames "
        "frames whose ring profile fits a sphere in [dmin, dmax] with sharp fringes and whose image is round or "
        "n-fold symmetric; manual: read the user's YAML (classes: [1, 4, 7]); without it, exit 3 after printing "
        "which gallery to look at and which file to write. Writes the selected frames (CSV: file, frame, class; "
        "frames of the chosen classes that misfit their class model are left out, see --max-frame-misfit) "
        "and a per-class score table.")
    p.add_argument("--class-dir", required=True, metavar="DIR", help="output folder of 'conveyor spi class2d'")
    p.add_argument("--mode", choices=("auto", "manual"), required=True, help="automatic or manual selection")
    p.add_argument("--selection", default=None, metavar="classes.yaml",
                   help="manual: the user's selection (default: DIR/../select/classes.yaml)")
    p.add_argument("--dmin-nm", type=float, default=None, help="smallest particle diameter kept, nm (default: the filter's)")
    p.add_argument("--dmax-nm", type=float, default=None, help="largest particle diameter kept, nm (default: the filter's)")
    p.add_argument("--min-frames", type=int, default=sl.MIN_FRAMES, help="smallest class kept, frames (default %(default)s)")
    p.add_argument("--min-fraction", type=float, default=sl.MIN_FRACTION,
                   help="smallest class kept, fraction of the frames (default %(default)s)")
    p.add_argument("--min-fringes", type=float, default=sl.MIN_VISIBILITY,
                   help="lowest fringe visibility kept (default %(default)s)")
    p.add_argument("--min-symmetry", type=float, default=sl.MIN_SYMMETRY,
                   help="lowest rotational-symmetry score kept (default %(default)s)")
    p.add_argument("--max-frame-misfit", type=float, default=sl.MAX_FRAME_MISFIT,
                   help="keep only frames of the chosen classes whose misfit to their class is at most this "
                   "(default %(default)s; inf keeps all)")
    p.add_argument("--out-frames", required=True, metavar="selected.csv", help="selected frames (file, frame, class)")
    p.add_argument("--out-scores", required=True, metavar="scores.csv", help="per-class scores and decisions")
    p.add_argument("--out-yaml", default=None, metavar="classes.yaml",
                   help="auto: also write the chosen classes in the YAML form a user writes")
    p.set_defaults(func=_select)

    p = group("select").add_parser(
        "spi", help="write the SPI 2D class selection (classes.yaml) after checking the class numbers",
        description="Write the selection file read by 'conveyor spi select --mode manual' "
        "(classes: [1, 4, 7], 1-based as in gallery.png), after checking the numbers against the classification.")
    p.add_argument("--class-dir", required=True, metavar="DIR", help="output folder of 'conveyor spi class2d'")
    p.add_argument("--classes", required=True, nargs="+", metavar="N", help="classes to keep (1-based)")
    p.add_argument("--out", default=None, metavar="classes.yaml", help="file to write (default: DIR/../select/classes.yaml)")
    p.set_defaults(func=_select_write)
