"""``conveyor spi hits|center|size|filter``: SPI pre-processing, one shot file at a time.

Each step reads the CXI shots and the per-frame table of the previous step
(:mod:`conveyor.spi.frames`) and writes a new table with its columns added::

    conveyor spi hits   SHOTS.cxi --out HITS.h5
    conveyor spi center SHOTS.cxi --frames HITS.h5 --out CENTER.h5 [--per-frame]
    conveyor spi size   SHOTS.cxi --frames CENTER.h5 --out SIZE.h5 --dmin-nm 20 --dmax-nm 200
    conveyor spi filter --frames SIZE1.h5 [SIZE2.h5 ...] --out-dir DIR --dmin-nm 60 --dmax-nm 80 --out-plot HIST.png

Frames are streamed in blocks (``--chunk``) and moved to the selected device
(``--device``), so numpy and cupy run the same kernels.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from .. import backend
from ..errors import InputError
from .._lazy import lazy_module

pd = lazy_module("pandas")

log = logging.getLogger(__name__)

DEFAULT_CHUNK = 256


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------
def _read_shots(path):
    """CXI shots with frames read on demand."""
    from ..io.cxi import read_cxi

    return read_cxi(path, lazy=True, load_extra=False)


def _blocks(data, indices, chunk):
    """Yield ``(positions, device array)`` for the frames ``indices`` of ``data``, ``chunk`` at a time."""
    indices = np.asarray(indices, dtype=np.int64)
    for start in range(0, indices.size, chunk):
        sel = indices[start:start + chunk]
        yield np.arange(start, start + sel.size), backend.asarray(np.asarray(data[sel]))


def _run_name(df, path) -> str:
    run = df.attrs.get("run")
    return str(run) if run else Path(path).stem


def _check_table(df, shots, table_path):
    n = shots.n_frames
    frames = df["frame"].to_numpy(np.int64)
    if frames.size and (frames.min() < 0 or frames.max() >= n):
        raise InputError(table_path, f"frame indices go beyond the {n} frames of {shots.path}",
                         "give the per-frame table written for this shot file")
    src = df.attrs.get("source")
    if src and Path(src).name != Path(shots.path).name:
        log.warning("%s was written for %s, not %s", table_path, src, shots.path)


def _positions(frames, shots):
    """Positions in ``shots.data`` of the file frame indices ``frames``."""
    lookup = {int(f): i for i, f in enumerate(shots.frame_indices)}
    return np.array([lookup[int(f)] for f in frames], dtype=np.int64)


def _threshold_arg(value: str):
    if value == "auto":
        return "auto"
    try:
        return float(value)
    except ValueError:
        raise InputError("--threshold", f"not a number or 'auto': {value!r}", "give --threshold auto or a photon count") from None


# ---------------------------------------------------------------------------------------
# hits
# ---------------------------------------------------------------------------------------
def _hits(args) -> int:
    from ..spi import frames as ft
    from ..spi import hits as hf

    t0 = time.time()
    shots = _read_shots(args.shots)
    n = shots.n_frames
    xp = backend.xp()
    region = xp.asarray(shots.mask).astype(bool)
    if args.rmin_px is not None or args.rmax_px is not None:
        region &= hf.annulus_mask(region.shape, shots.beam_center_px, args.rmin_px, args.rmax_px, xp=xp)
    photons = np.zeros(n)
    lit = np.zeros(n, dtype=np.int64)
    for pos, block in _blocks(shots.data, np.arange(n), args.chunk):
        p, lp = hf.count_photons(block, region, args.lit_level)
        photons[pos] = backend.to_host(p)
        lit[pos] = backend.to_host(lp)
    res = hf.find_hits(None, None, _threshold_arg(args.threshold), metric=args.metric, k_sigma=args.k_sigma,
                       min_photons=args.min_photons, counts=(photons, lit))
    df = pd.DataFrame({
        "frame": shots.frame_indices,
        "photons": res.photons,
        "lit_pixels": res.lit_pixels,
        "hit_score": res.score,
        "is_hit": res.is_hit,
    })
    attrs = {
        "source": str(Path(args.shots).resolve()),
        "run": Path(args.shots).stem,
        "step": "hits",
        "hit_k_sigma": args.k_sigma,
        "hit_min_photons": args.min_photons,
        "hit_rmin_px": args.rmin_px,
        "hit_rmax_px": args.rmax_px,
        "beam_center_file_px": list(shots.beam_center_px),
        **res.attrs(),
    }
    ft.write_frames(args.out, df, attrs)
    dt = time.time() - t0
    print(f"{args.shots}: {int(res.is_hit.sum())} hits of {n} frames "
          f"({res.metric} > {res.threshold:.1f}; background {res.background:.1f} +- {res.sigma:.1f}) "
          f"in {dt:.1f} s ({n / max(dt, 1e-9):.0f} frames/s) -> {args.out}")
    return 0


# ---------------------------------------------------------------------------------------
# center
# ---------------------------------------------------------------------------------------
def _center(args) -> int:
    from ..spi import center as cf
    from ..spi import frames as ft

    t0 = time.time()
    shots = _read_shots(args.shots)
    df = ft.read_frames(args.frames)
    _check_table(df, shots, args.frames)
    hits = df["is_hit"].to_numpy(bool) if "is_hit" in df.columns else np.ones(len(df), bool)
    pos = _positions(df["frame"].to_numpy(np.int64)[hits], shots)
    mask = backend.asarray(shots.mask)
    guess = tuple(args.guess) if args.guess else shots.beam_center_px
    total = None
    for _, block in _blocks(shots.data, pos, args.chunk):
        s = block.sum(axis=0, dtype=backend.array_module(block).float64)
        total = s if total is None else total + s
    attrs = dict(df.attrs)
    attrs.update(step="center", center_max_shift_px=args.max_shift, center_guess_px=list(guess))
    if total is None:
        log.warning("%s: no hits; keeping the beam centre of the file", args.shots)
        cx, cy = guess
        attrs.update(center_source="file", center_dispersion=float("nan"))
    else:
        res = cf.find_center(total, mask, guess=guess, max_shift=args.max_shift)
        cx, cy = (float(v) for v in res.center[0])
        attrs.update(center_source="friedel+radial", center_dispersion=float(res.score[0]))
    n = len(df)
    center = np.tile([cx, cy], (n, 1)).astype(np.float64)
    if args.per_frame and pos.size:
        out = np.empty((pos.size, 2))
        for p, block in _blocks(shots.data, pos, args.chunk):
            out[p] = cf.refine_centers(block, mask, (cx, cy), max_shift=args.per_frame_shift).center
        center[hits] = out
        attrs["center_per_frame"] = True
        attrs["center_per_frame_shift_px"] = args.per_frame_shift
    else:
        attrs["center_per_frame"] = False
    df = df.copy()
    df["center_x"] = center[:, 0]
    df["center_y"] = center[:, 1]
    attrs.update(run_center_x=cx, run_center_y=cy)
    ft.write_frames(args.out, df, attrs)
    print(f"{args.shots}: beam centre x={cx:.2f} y={cy:.2f} px from {int(hits.sum())} hits "
          f"(file: x={shots.beam_center_px[0]:.2f} y={shots.beam_center_px[1]:.2f})"
          f"{'; refined per frame' if attrs['center_per_frame'] else ''} in {time.time() - t0:.1f} s -> {args.out}")
    return 0


# ---------------------------------------------------------------------------------------
# size
# ---------------------------------------------------------------------------------------
def _size(args) -> int:
    from ..spi import frames as ft
    from ..spi import size as sz

    t0 = time.time()
    shots = _read_shots(args.shots)
    shots.require_geometry()
    df = ft.read_frames(args.frames)
    _check_table(df, shots, args.frames)
    if "center_x" not in df.columns:
        raise InputError(args.frames, "the per-frame table has no center_x/center_y", "run 'conveyor spi center' first")
    hits = df["is_hit"].to_numpy(bool) if "is_hit" in df.columns else np.ones(len(df), bool)
    frames_idx = df["frame"].to_numpy(np.int64)
    centers = df[["center_x", "center_y"]].to_numpy(np.float64)
    mask = backend.asarray(shots.mask)
    geom = dict(pixel_size_m=float(shots.pixel_size_m), distance_m=float(shots.distance_m),
                wavelength_m=float(shots.wavelength_m))
    rmax = sz.max_radius(shots.mask, centers[hits] if hits.any() else centers)
    # background shape from the misses (about the run centre)
    background = None
    miss = np.flatnonzero(~hits)[: args.background_frames]
    if miss.size >= 3 and not args.flat_background:
        run_c = (float(df.attrs.get("run_center_x", centers[0, 0])), float(df.attrs.get("run_center_y", centers[0, 1])))
        acc_c = acc_n = None
        for _, block in _blocks(shots.data, _positions(frames_idx[miss], shots), args.chunk):
            prof = sz.radial_profiles(block, mask, run_c, rmax=rmax)
            c, npx = prof.counts.sum(axis=0), prof.npix.sum(axis=0)
            acc_c = c if acc_c is None else acc_c + c
            acc_n = npx if acc_n is None else acc_n + npx
        background = sz.smooth_ring_profile(acc_c, acc_n)
    n = len(df)
    cols = {"diameter_nm": "diameter_nm", "size_score": "size_score", "size_misfit": "size_misfit",
            "size_scale": "size_scale", "size_background": "size_background", "multi_score": "multi_score",
            "fit_rmin_px": "rmin_px", "fit_rmax_px": "rmax_px"}
    out = {k: np.full(n, np.nan) for k in cols}
    hit_rows = np.flatnonzero(hits)
    pos = _positions(frames_idx[hit_rows], shots)
    for p, block in _blocks(shots.data, pos, args.chunk):
        res = sz.size_frames(block, mask, centers[hit_rows[p]], background=background, rmax=rmax,
                             multi=not args.no_multi, dmin_nm=args.dmin_nm, dmax_nm=args.dmax_nm,
                             rmin_px=args.rmin_px, rmax_px=args.rmax_px, chunk=args.chunk,
                             qr_max=None if args.qr_max <= 0 else args.qr_max, **geom)
        for k, attr in cols.items():
            out[k][hit_rows[p]] = getattr(res, attr)
    df = df.copy()
    for k, v in out.items():
        df[k] = v
    attrs = dict(df.attrs)
    attrs.update(step="size", size_dmin_nm=args.dmin_nm, size_dmax_nm=args.dmax_nm, size_rmin_px=args.rmin_px,
                 size_rmax_px=args.rmax_px, size_qr_max=args.qr_max,
                 size_background=("misses" if background is not None else "flat"),
                 size_background_frames=int(miss.size if background is not None else 0),
                 pixel_size_m=geom["pixel_size_m"], distance_m=geom["distance_m"], wavelength_m=geom["wavelength_m"])
    ft.write_frames(args.out, df, attrs)
    d = out["diameter_nm"][hits]
    dt = time.time() - t0
    med = np.nanmedian(d) if np.isfinite(d).any() else float("nan")
    print(f"{args.shots}: sized {int(np.isfinite(d).sum())} of {hit_rows.size} hits, median diameter {med:.1f} nm, "
          f"in {dt:.1f} s ({hit_rows.size / max(dt, 1e-9):.0f} hits/s) -> {args.out}")
    return 0


# ---------------------------------------------------------------------------------------
# filter
# ---------------------------------------------------------------------------------------
def _filter(args) -> int:
    from ..io.atomic import write_text
    from ..spi import filter as fl
    from ..spi import frames as ft

    out_dir = Path(args.out_dir)
    tables = [(p, ft.read_frames(p)) for p in args.frames]
    names = [_run_name(df, p) for p, df in tables]
    if len(set(names)) != len(names):
        raise InputError(args.frames[0], "two tables belong to the same run", "give each run's table once")
    summary = {"dmin_nm": args.dmin_nm, "dmax_nm": args.dmax_nm, "min_score": args.min_score,
               "max_misfit": args.max_misfit, "max_multi": args.max_multi, "runs": {}}
    all_d, all_pass = [], []
    tot = {"frames": 0, "hits": 0, "passed": 0}
    for (path, df), run in zip(tables, names):
        res = fl.select_frames(df, args.dmin_nm, args.dmax_nm, min_score=args.min_score,
                               max_misfit=args.max_misfit, max_multi=args.max_multi)
        df = df.copy()
        df["passed"] = res.passed
        attrs = dict(df.attrs)
        attrs.update(step="filter", filter_dmin_nm=args.dmin_nm, filter_dmax_nm=args.dmax_nm,
                     filter_min_score=args.min_score, filter_max_misfit=args.max_misfit,
                     filter_max_multi=args.max_multi, n_passed=int(res.passed.sum()))
        ft.write_frames(out_dir / f"{run}.h5", df, attrs)
        hits = df["is_hit"].to_numpy(bool) if "is_hit" in df.columns else np.ones(len(df), bool)
        d = df["diameter_nm"].to_numpy(np.float64)
        all_d.append(d[hits])
        all_pass.append(res.passed[hits])
        s = res.summary()
        s.update(n_hits=int(hits.sum()), table=str(path), source=df.attrs.get("source"),
                 median_diameter_nm=float(np.nanmedian(d[res.passed])) if res.passed.any() else None)
        summary["runs"][run] = s
        tot["frames"] += len(df)
        tot["hits"] += int(hits.sum())
        tot["passed"] += int(res.passed.sum())
    summary["total"] = tot
    write_text(out_dir / "summary.json", json.dumps(summary, indent=2, default=float) + "\n")
    if args.out_plot:
        fl.plot_size_histogram(args.out_plot, np.concatenate(all_d), np.concatenate(all_pass), args.dmin_nm,
                               args.dmax_nm, title=f"{len(tables)} run(s): {tot['passed']} of {tot['hits']} hits passed")
    print(f"passed {tot['passed']} of {tot['hits']} hits ({tot['frames']} frames) in {len(tables)} run(s) "
          f"-> {out_dir}/{{run}}.h5, {out_dir / 'summary.json'}" + (f", {args.out_plot}" if args.out_plot else ""))
    return 0


# ---------------------------------------------------------------------------------------
# registration
# ---------------------------------------------------------------------------------------
def register(group):
    from ..spi import filter as fl
    from ..spi import hits as hf
    from ..spi import size as sz

    spi = group("spi")
    p = spi.add_parser("hits", help="find hits: photons and lit pixels per frame, automatic threshold",
                       description="Count photons and lit pixels of every frame inside the mask and mark hits "
                       "above a threshold (auto: background mode + k * sigma of the misses).")
    p.add_argument("shots", metavar="SHOTS.cxi", help="CXI file of shots")
    p.add_argument("--out", required=True, metavar="HITS.h5", help="per-frame table to write")
    p.add_argument("--threshold", default="auto", help="'auto' or a threshold on the metric (default auto)")
    p.add_argument("--metric", choices=("photons", "lit_pixels"), default="photons", help="per-frame quantity thresholded (default photons)")
    p.add_argument("--k-sigma", type=float, default=hf.K_SIGMA, help="auto threshold: background sigmas above the mode (default %(default)s)")
    p.add_argument("--min-photons", type=float, default=0.0, help="hits must also have at least this many photons (default 0)")
    p.add_argument("--rmin-px", type=float, default=None, help="count only pixels at least this far from the beam centre (px)")
    p.add_argument("--rmax-px", type=float, default=None, help="count only pixels at most this far from the beam centre (px)")
    p.add_argument("--lit-level", type=float, default=0.5, help="photons for a pixel to count as lit (default 0.5)")
    p.add_argument("--chunk", type=int, default=DEFAULT_CHUNK, help="frames per block (default %(default)s)")
    p.set_defaults(func=_hits)

    p = spi.add_parser("center", help="beam centre from the Friedel symmetry of the hits",
                       description="Beam centre of a run from the sum of its hits (Friedel symmetry, then sub-pixel "
                       "refinement by rotational symmetry); optionally refined per frame.")
    p.add_argument("shots", metavar="SHOTS.cxi", help="CXI file of shots")
    p.add_argument("--frames", required=True, metavar="HITS.h5", help="per-frame table from 'conveyor spi hits'")
    p.add_argument("--out", required=True, metavar="CENTER.h5", help="per-frame table to write")
    p.add_argument("--per-frame", action="store_true", help="also refine the centre of every hit")
    p.add_argument("--max-shift", type=float, default=20.0, help="search radius about the file's centre, px (default %(default)s)")
    p.add_argument("--per-frame-shift", type=float, default=3.0, help="per-frame search radius about the run centre, px (default %(default)s)")
    p.add_argument("--guess", type=float, nargs=2, default=None, metavar=("X", "Y"), help="start centre, px (default: the file's)")
    p.add_argument("--chunk", type=int, default=64, help="frames per block (default %(default)s)")
    p.set_defaults(func=_center)

    p = spi.add_parser("size", help="particle diameter of every hit from the sphere form factor",
                       description="Fit I(q) = s P(qR) + background to the ring profile of every hit; writes the "
                       "diameter (nm), the fit confidence (size_score), reduced deviance (size_misfit) and a "
                       "multiple-hit score.")
    p.add_argument("shots", metavar="SHOTS.cxi", help="CXI file of shots")
    p.add_argument("--frames", required=True, metavar="CENTER.h5", help="per-frame table from 'conveyor spi center'")
    p.add_argument("--out", required=True, metavar="SIZE.h5", help="per-frame table to write")
    p.add_argument("--dmin-nm", type=float, default=20.0, help="smallest diameter searched, nm (default %(default)s)")
    p.add_argument("--dmax-nm", type=float, default=200.0, help="largest diameter searched, nm (default %(default)s)")
    p.add_argument("--rmin-px", type=float, default=None, help="inner fit radius, px (default: beamstop edge + 2)")
    p.add_argument("--rmax-px", type=float, default=None, help="outer fit radius, px (default: all rings)")
    p.add_argument("--qr-max", type=float, default=sz.QR_MAX,
                   help="fit rings up to 2 pi q R = this for the first-pass size (about 7 fringes; 0: all rings; default %(default)s)")
    p.add_argument("--background-frames", type=int, default=1000, help="misses used for the background shape (default %(default)s)")
    p.add_argument("--flat-background", action="store_true", help="fit a flat background instead of the misses' profile")
    p.add_argument("--no-multi", action="store_true", help="skip the multiple-hit (Patterson) score")
    p.add_argument("--chunk", type=int, default=128, help="frames per block (default %(default)s)")
    p.set_defaults(func=_size)

    p = spi.add_parser("filter", help="keep hits of the right size that fit one sphere; size histogram",
                       description="Mark frames that are hits with dmin <= diameter <= dmax, size_score >= min, "
                       "size_misfit <= max and multi_score <= max; writes DIR/{run}.h5 with a 'passed' column, "
                       "DIR/summary.json and a histogram.")
    p.add_argument("--frames", required=True, nargs="+", metavar="SIZE.h5", help="per-frame tables from 'conveyor spi size'")
    p.add_argument("--out-dir", required=True, metavar="DIR", help="directory for {run}.h5 and summary.json")
    p.add_argument("--dmin-nm", type=float, required=True, help="smallest diameter kept, nm")
    p.add_argument("--dmax-nm", type=float, required=True, help="largest diameter kept, nm")
    p.add_argument("--min-score", type=float, default=fl.MIN_SCORE, help="lowest size_score kept (default %(default)s)")
    p.add_argument("--max-misfit", type=float, default=fl.MAX_MISFIT, help="largest size_misfit kept (default %(default)s)")
    p.add_argument("--max-multi", type=float, default=fl.MAX_MULTI, help="largest multi_score kept (default %(default)s)")
    p.add_argument("--out-plot", default=None, metavar="HIST.png", help="size histogram to write (PNG)")
    p.set_defaults(func=_filter)
