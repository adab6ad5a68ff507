"""Dragonfly (PyPI ``dragonfly-spi`` 0.1.0) EMC for SPI stage 7, read back on Conveyor's reciprocal grid.

What runs
---------
``dragonfly.emc -c DIR/dragonfly/config.ini N -t THREADS`` (the package's own EMC,
Cython + C with OpenMP; MPI through mpi4py, run as a single process or with
``mpirun -np P`` when ``mpi_procs > 1``), in ``DIR/dragonfly/``, which keeps its inputs
(``config.ini``, detectors, photon files, the start model), its log (``EMC.log``) and its
per-iteration outputs (``data/output_NNN.h5``).

File conversions
----------------
* **Detector** (one per shot file, ``det_K.h5``), written with Dragonfly's own Python API
  (``dragonfly.Detector``: ``cx, cy`` pixel offsets from the beam centre, which may be
  fractional, ``detd`` = distance / pixel size, ``ewald_rad``, then ``calc_from_coords``
  for ``q`` and the solid-angle × polarisation correction). ``ewald_rad = 1 / (λ dq)`` with
  ``dq`` = :attr:`conveyor.spi.detector.DetectorGeometry.q_per_pixel`, so one Dragonfly
  voxel is exactly the voxel of ``conveyor spi emc`` and of the simulator's
  ``truth/intensity.mrc``. Only good pixels within ``max_radius_px`` of the beam centre
  (default: the largest circle inside the detector) are written, all with mask 0 (used for
  orientations and merging); so the model grid is ``2 ceil(q_max) + 3`` voxels.
* **Photons** (``photons_K.h5``): Dragonfly's sparse HDF5 emc format (``place_ones``,
  ``place_multi``, ``count_multi``), written with its ``dragonfly.EMCWriter``; non-integer
  counts are rounded.
* **config.ini**: ``[emc]`` with ``in_photons_list``/``in_detector_list`` (absolute paths:
  Dragonfly joins list entries with the config folder twice), ``num_div``,
  ``need_scaling``, ``beta`` (start, or ``auto``: Dragonfly's per-frame
  ``exp(-6.5 (counts 1e-5)^0.15)``), ``beta_schedule = FACTOR EVERY`` and
  ``start_model_file``: a random start model drawn from ``seed`` (Dragonfly's own random
  start is unseeded or one fixed seed).
* **Back**: ``intens`` of the last ``output_NNN.h5`` is indexed ``[qx, qy, qz]``;
  it is transposed to Conveyor's ``[qz, qy, qx]`` and written as ``DIR/intensity.mrc``
  (``q = 0`` at ``size // 2``, header voxel size = ``dq`` in 1/Å), with
  ``inter_weight`` as ``DIR/intensity_weight.mrc``. Dragonfly's slice of a pixel ``t`` in
  orientation ``q`` samples the model at ``R(q)ᵀ q_t`` (its ``make_rot_quat`` builds
  ``R(q)ᵀ``), the convention of ``conveyor spi emc`` and of the simulator's quaternions,
  so ``DIR/orientations.csv`` holds Dragonfly's most likely quaternion per frame
  unchanged (sign chosen with ``w >= 0``). ``DIR/log.csv`` has the columns of
  ``conveyor spi emc``'s log from ``EMC.log`` (``info_rate`` is the mutual information)
  and the per-frame scales of each iteration; ``active_rot`` is not reported by
  Dragonfly (empty).
"""

from __future__ import annotations

import csv
import logging
import os
import re
import shutil
import time
from pathlib import Path

import h5py
import numpy as np

from ..errors import InputError
from ._run import run_tool
from .spi_processing import find_script, package_version

log = logging.getLogger(__name__)

INSTALL_HINT = ("install it with `bash scripts/install-spi-peers.sh` (Debian libgsl-dev, libhdf5-dev, libopenmpi-dev; "
                "pip install mpi4py==4.1.2 dragonfly-spi==0.1.0)")
LOG_COLUMNS = ["iteration", "beta", "log_likelihood", "mutual_info", "rms_change", "scale_mean", "scale_std",
               "num_rot", "active_rot", "seconds"]
#: Dragonfly's point groups: none, icosahedral (rotations reduced 60-fold, model symmetrised), octahedral.
POINT_GROUPS = ("1", "A5", "S4")
ORIENTATION_COLUMNS = ["file", "frame", "quat_w", "quat_x", "quat_y", "quat_z", "orientation_index", "max_prob",
                       "scale", "log_likelihood", "mutual_info"]


def available() -> bool:
    """True when ``dragonfly.emc`` is found and the ``dragonfly`` package imports."""
    if find_script("dragonfly.emc") is None:
        return False
    try:
        import dragonfly  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken build is as good as none
        return False
    return True


def num_rotations(num_div: int) -> int:
    """Rotations of Dragonfly's 600-cell grid: ``10 (5 n³ + n)``."""
    n = int(num_div)
    return 10 * (5 * n**3 + n)


# ---------------------------------------------------------------------------------------
# frame selection (the options of conveyor spi emc)
# ---------------------------------------------------------------------------------------
def _read_passed(path):
    from ..spi.frames import read_frames

    df = read_frames(path)
    if "passed" not in df.columns:
        raise InputError(path, "the frame table has no 'passed' column", "run 'conveyor spi filter' first, or leave out --frames-table")
    frame = df["frame"].to_numpy(np.int64)
    passed = df["passed"].to_numpy(bool)
    centre = None
    if {"center_x", "center_y"} <= set(df.columns) and passed.any():
        c = df[["center_x", "center_y"]].to_numpy(np.float64)[passed]
        ok = np.all(np.isfinite(c), axis=1)
        if ok.any():
            centre = (float(np.median(c[ok, 0])), float(np.median(c[ok, 1])))
    return frame[passed], centre


def _read_selected_csv(path, shots):
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "selected-frames file does not exist", "check --selected-frames")
    names: dict[str, set] = {}
    for i, s in enumerate(shots):
        for key in (Path(s).name, str(Path(s)), str(Path(s).resolve())):
            names.setdefault(key, set()).add(i)
    out: dict[int, set] = {}
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or not {"file", "frame"} <= set(reader.fieldnames):
            raise InputError(path, "needs the columns 'file' and 'frame'", "write a CSV header 'file,frame'")
        for ln, row in enumerate(reader, start=2):
            key = (row["file"] or "").strip()
            hit = names.get(key) or names.get(Path(key).name)
            if not hit:
                raise InputError(path, f"line {ln}: file {key!r} is not among --shots", "list only files given with --shots")
            if len(hit) > 1:
                raise InputError(path, f"line {ln}: file name {key!r} matches several --shots files", "write the full path")
            try:
                fr = int(row["frame"])
            except (TypeError, ValueError):
                raise InputError(path, f"line {ln}: frame {row['frame']!r} is not an integer", "write 0-based frame indices") from None
            out.setdefault(next(iter(hit)), set()).add(fr)
    return {k: np.array(sorted(v), dtype=np.int64) for k, v in out.items()}


def select_frames(shots, tables=None, selected_csv=None):
    """Per shot file ``(path, frames, centre or None)``: the ``passed`` frames of ``tables``
    (one per file; centre = median of their ``center_x/center_y``) and/or the frames of a
    ``file,frame`` CSV (both given: the intersection); all frames when neither is given."""
    from ..io.cxi import read_cxi

    shots = [Path(s) for s in shots]
    if tables is not None and len(tables) != len(shots):
        raise InputError("--frames-table", f"{len(tables)} frame tables for {len(shots)} shot files",
                         "give one table per --shots file, in the same order")
    sel = _read_selected_csv(selected_csv, shots) if selected_csv else None
    out = []
    for i, path in enumerate(shots):
        info = read_cxi(path, lazy=True, load_extra=False)
        n_total = info.n_frames_total
        idx = np.arange(n_total, dtype=np.int64)
        centre = None
        if tables is not None:
            idx, centre = _read_passed(tables[i])
            if idx.size and (idx.min() < 0 or idx.max() >= n_total):
                raise InputError(tables[i], f"frame index {int(idx.max())} out of range for {path} ({n_total} frames)",
                                 "use the table written for this shot file")
        if sel is not None:
            want = sel.get(i, np.zeros(0, dtype=np.int64))
            if want.size and (want.min() < 0 or want.max() >= n_total):
                raise InputError(selected_csv, f"frame {int(want.max())} out of range for {path.name} ({n_total} frames)",
                                 "use 0-based frame indices of that file")
            idx = np.intersect1d(idx, want)
        out.append((path, np.unique(idx), centre))
    if sum(len(x[1]) for x in out) == 0:
        where = selected_csv or (tables[0] if tables else shots[0])
        raise InputError(where, "no frames selected for EMC", "check the selection (passed frames, file,frame list)")
    return out


# ---------------------------------------------------------------------------------------
# detector and photons
# ---------------------------------------------------------------------------------------
def detector_pixels(shape, good, beam_center_px, max_radius_px=None):
    """Flat indices (row-major ``[y, x]``) of the pixels written, and their offsets ``cx, cy`` (px).

    Good pixels within ``max_radius_px`` of the beam centre; default the largest circle
    inside the detector (every ring complete).
    """
    ny, nx = int(shape[0]), int(shape[1])
    bx, by = float(beam_center_px[0]), float(beam_center_px[1])
    if max_radius_px is None:
        max_radius_px = min(bx, by, nx - 1 - bx, ny - 1 - by)
    if max_radius_px <= 1:
        raise InputError("--max-radius-px", f"radius {max_radius_px:.1f} px leaves no pixels", "check the beam centre")
    iy, ix = np.mgrid[0:ny, 0:nx]
    cx, cy = (ix - bx).ravel().astype(np.float64), (iy - by).ravel().astype(np.float64)
    keep = np.asarray(good, dtype=bool).ravel() & (np.hypot(cx, cy) <= float(max_radius_px))
    pix = np.flatnonzero(keep)
    if pix.size == 0:
        raise InputError("detector", "no good pixels within the radius", "check the mask and --max-radius-px")
    return pix, cx[pix], cy[pix]


def write_detector(path, geometry, good, dq_per_m: float, polarization: str = "x", max_radius_px=None):
    """Dragonfly HDF5 detector for ``geometry`` (sub-pixel beam centre); returns the pixel indices written."""
    import dragonfly

    pix, cx, cy = detector_pixels(geometry.shape, good, geometry.beam_center_px, max_radius_px)
    det = dragonfly.Detector()
    det.cx = cx
    det.cy = cy
    det.detd = geometry.distance_m / geometry.pixel_size_m[0]
    det.ewald_rad = 1.0 / (geometry.wavelength_m * float(dq_per_m))
    det.calc_from_coords(pol={"x": "x", "y": "y"}.get(polarization, "none"))
    det.raw_mask = np.zeros(pix.size, dtype="u1")
    _quiet(det.write, str(path))
    return pix


def _quiet(func, *args, **kwargs):
    """Call ``func`` with its stdout (Dragonfly's progress prints) sent to the log."""
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        out = func(*args, **kwargs)
    for line in buf.getvalue().splitlines():
        log.info("dragonfly: %s", line)
    return out


def bin_frames(frames, b: int):
    """Sum ``b × b`` pixel blocks of ``[n, y, x]`` frames (cropped to a multiple of ``b``)."""
    b = int(b)
    if b == 1:
        return frames
    n, ny, nx = frames.shape
    ny, nx = ny // b * b, nx // b * b
    return frames[:, :ny, :nx].reshape(n, ny // b, b, nx // b, b).sum(axis=(2, 4))


def bin_geometry(geometry, good, b: int):
    """Geometry and good-pixel mask of ``b × b`` binned frames.

    A binned pixel is good only when all its pixels are; the beam centre moves to
    ``(c + ½)/b − ½`` and the pixel grows by ``b``, so the natural voxel grows by ``b``.
    """
    from dataclasses import replace

    b = int(b)
    if b < 1:
        raise InputError("--bin", f"binning must be >= 1, got {b}", "use 1, 2, 4, ...")
    if b == 1:
        return geometry, np.asarray(good, dtype=bool)
    ny, nx = geometry.shape[0] // b, geometry.shape[1] // b
    if ny < 4 or nx < 4:
        raise InputError("--bin", f"binning {b} leaves a {ny}x{nx} detector", "use a smaller factor")
    g = np.asarray(good, dtype=bool)[: ny * b, : nx * b].reshape(ny, b, nx, b).all(axis=(1, 3))
    cx, cy = geometry.beam_center_px
    px, py = geometry.pixel_size_m
    return replace(geometry, shape=(ny, nx), pixel_size_m=(px * b, py * b),
                   beam_center_px=((cx + 0.5) / b - 0.5, (cy + 0.5) / b - 0.5)), g


def write_photons(path, shots_path, frames, pix, binning: int = 1, chunk: int = 256) -> dict:
    """Dragonfly sparse HDF5 photon file of ``frames`` of a CXI file (binned ``binning``²),
    pixels ``pix`` (flat indices of the binned frame); returns counts."""
    import dragonfly

    from ..io.cxi import read_cxi

    shots = read_cxi(shots_path, lazy=True, load_extra=False)
    frames = np.asarray(frames, dtype=np.int64)
    rounded = 0
    total = 0.0

    def body():
        nonlocal rounded, total
        with dragonfly.EMCWriter(str(path), int(pix.size), hdf5=True) as w:
            for start in range(0, frames.size, chunk):
                block = bin_frames(np.asarray(shots.data[frames[start:start + chunk]]), binning)
                block = block.reshape(block.shape[0], -1)[:, pix]
                if block.dtype.kind == "f":
                    r = np.rint(block)
                    rounded += int(np.count_nonzero(r != block))
                    block = r
                block = np.clip(block, 0, None).astype(np.int32)
                total += float(block.sum())
                for fr in block:
                    w.write_frame(fr)

    _quiet(body)
    if rounded:
        log.warning("%s: %d non-integer pixel values rounded to photons", shots_path, rounded)
    return {"frames": int(frames.size), "photons": total, "rounded": rounded}


def _read_detector(path):
    with h5py.File(path, "r") as f:
        q = np.stack([f["qx"][()], f["qy"][()], f["qz"][()]], -1)
        corr = np.asarray(f["corr"][()], dtype=np.float64)
        mask = np.asarray(f["mask"][()])
    return q, corr / corr.mean(), mask


def _read_photon_sums(path, num_pix):
    """Photons per pixel summed over the frames of a sparse HDF5 emc file, and the frame count."""
    tot = np.zeros(num_pix)
    with h5py.File(path, "r") as f:
        po, pm, cm = f["place_ones"], f["place_multi"], f["count_multi"]
        n = po.shape[0]
        for d in range(n):
            np.add.at(tot, np.asarray(po[d], dtype=np.int64), 1.0)
            np.add.at(tot, np.asarray(pm[d], dtype=np.int64), np.asarray(cm[d], dtype=np.float64))
    return tot, n


def start_model(det_files, ph_files, init: str = "radial", seed: int = 0):
    """Start model ``[qx, qy, qz]`` for Dragonfly and its edge ``2 ceil(q_max) + 3`` (Dragonfly's rule).

    ``"random"``: uniform noise times twice the mean photons per good pixel and frame (what
    Dragonfly draws itself, here from ``seed``). ``"radial"``: the frames' mean photons per
    unit correction in 1-voxel shells of ``|q|``, times ``1 + 0.1 u`` with ``u`` uniform
    noise from ``seed``: a spherically symmetric start whose small anisotropic noise the
    iterations grow (from a random start the model of small data sets often settles on the
    spherical average, the fixed point where every orientation is equally likely).
    """
    rng = np.random.default_rng(int(seed))
    qmax, sums, npix, ntot, nframes = 0.0, None, 0, 0.0, 0
    shells = []
    for dp, pp in zip(det_files, ph_files):
        q, corr, mask = _read_detector(dp)
        r = np.sqrt((q * q).sum(axis=1))
        qmax = max(qmax, float(r.max()))
        tot, n = _read_photon_sums(pp, r.size)
        good = mask == 0
        npix = max(npix, int(good.sum()))
        ntot += float(tot.sum())
        nframes += n
        shells.append((np.rint(r[good]).astype(np.int64), tot[good] / corr[good], n))
    size = int(2 * np.ceil(qmax) + 3)
    mean = ntot / max(nframes, 1) / max(npix, 1)
    if init == "random":
        return rng.random((size, size, size)) * (2.0 * mean), size
    if init != "radial":
        raise InputError("--init", f"unknown start model {init!r}", "use radial or random")
    nb = size
    num, cnt = np.zeros(nb), np.zeros(nb)
    for ri, val, n in shells:
        num += np.bincount(ri, val, minlength=nb)[:nb]
        cnt += np.bincount(ri, minlength=nb)[:nb].astype(np.float64) * n
    prof = np.where(cnt > 0, num / np.maximum(cnt, 1), np.nan)
    ok = np.flatnonzero(np.isfinite(prof) & (prof > 0))
    prof = np.interp(np.arange(nb), ok, prof[ok]) if ok.size else np.full(nb, mean)  # fill the beamstop and beyond
    c = size // 2
    ax = np.arange(size) - c
    rr = np.sqrt(ax[:, None, None] ** 2 + ax[None, :, None] ** 2 + ax[None, None, :] ** 2)
    vol = np.interp(rr, np.arange(nb), prof)
    return vol * (1.0 + 0.1 * rng.random(vol.shape)), size


# ---------------------------------------------------------------------------------------
# reading Dragonfly's outputs back
# ---------------------------------------------------------------------------------------
def to_conveyor_grid(intens):
    """Dragonfly's ``[qx, qy, qz]`` volume (or ``[modes, ...]``, first mode) as ``[qz, qy, qx]`` float32."""
    v = np.asarray(intens)
    if v.ndim == 4:
        v = v[0]
    if v.ndim != 3 or len(set(v.shape)) != 1:
        raise InputError("intens", f"expected a cubic 3D volume, got shape {v.shape}", "check the Dragonfly output")
    return np.ascontiguousarray(np.transpose(v, (2, 1, 0)), dtype=np.float32)


_LOG_ROW = re.compile(r"^\s*(\d+)\s+([-+0-9.eE]+)\s+([-+0-9.eEnaif]+)\s+([-+0-9.eEnaif]+)\s+([-+0-9.eEnaif]+)\s+(\d+)\s+([-+0-9.eE]+)\s*$")


def parse_emc_log(text: str) -> list[dict]:
    """Rows of Dragonfly's ``EMC.log`` (``Iter time rms_change info_rate log-likelihood num_rot beta``)."""
    rows = []
    for line in text.splitlines():
        m = _LOG_ROW.match(line)
        if m:
            it, sec, rms, info, ll, nrot, beta = m.groups()
            rows.append({"iteration": int(it), "seconds": float(sec), "rms_change": float(rms), "mutual_info": float(info),
                         "log_likelihood": float(ll), "num_rot": int(nrot), "beta": float(beta)})
    return rows


def write_intensity_mrc(path, volume, dq_per_m: float, labels=()):
    """A reciprocal-space volume with the voxel ``dq`` in 1/Å in the header (``q = 0`` at ``size // 2``)."""
    import mrcfile

    from ..io.atomic import atomic_path

    dq_A = float(dq_per_m) * 1e-10
    size = int(np.asarray(volume).shape[0])
    base = [f"RECIPROCAL grid: voxel = dq = {dq_A:.6e} 1/A (header voxel size is dq in 1/A)",
            f"q = 0 at index {size // 2} (size//2); axes qz,qy,qx; q without 2pi"]
    with atomic_path(path) as tmp:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(np.ascontiguousarray(volume, dtype=np.float32))
            mrc.set_volume()
            mrc.voxel_size = dq_A
            for lab in (list(labels) + base)[:10]:
                mrc.add_label(str(lab)[:80])
            mrc.update_header_stats()


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, (float, np.floating)):
        return "" if not np.isfinite(v) else f"{float(v):.8g}"
    return str(v)


def _write_csv(path, columns, rows):
    from ..io.atomic import write_text

    lines = [",".join(columns)] + [",".join(_fmt(r.get(c)) for c in columns) for r in rows]
    write_text(path, "\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------
def run_dragonfly_emc(shots, out_dir, *, tables=None, selected_csv=None, num_div: int = 4, iterations: int = 10,
                      beta_start="auto", beta_factor: float = 2.0, beta_every: int = 5, need_scaling: bool = True,
                      polarization: str = "x", max_radius_px=None, binning: int = 1, point_group: str = "1",
                      init: str = "random", seed: int = 0,
                      threads: int | None = None,
                      mpi_procs: int = 1, timeout: float | None = None) -> dict:
    """Run Dragonfly's EMC on the selected frames; write DIR/intensity.mrc, intensity_weight.mrc,
    orientations.csv and log.csv (module notes). Returns a dict of results and paths."""
    from ..io.cxi import read_cxi
    from ..spi.detector import DetectorGeometry

    t0 = time.time()
    if int(num_div) < 1 or int(iterations) < 1 or int(beta_every) < 1:
        raise InputError("--num-div/--iterations/--beta-every", "must be >= 1", "give positive integers")
    if not float(beta_factor) >= 1.0:
        raise InputError("--beta-factor", f"must be >= 1, got {beta_factor}", "e.g. 2")
    if beta_start != "auto":
        try:
            beta_start = float(beta_start)
        except (TypeError, ValueError):
            raise InputError("--beta-start", f"not a number or 'auto': {beta_start!r}", "e.g. auto or 0.001") from None
        if not 0 < beta_start <= 1:
            raise InputError("--beta-start", f"must be within (0, 1], got {beta_start}", "e.g. auto or 0.001")
    if point_group not in POINT_GROUPS:
        raise InputError("--point-group", f"unknown point group {point_group!r}", "use 1 (none), A5 (icosahedral) or S4 (octahedral)")
    exe = find_script("dragonfly.emc")
    if exe is None or not available():
        raise InputError("dragonfly.emc", "Dragonfly (dragonfly-spi) is not installed or does not import", INSTALL_HINT)
    selection = select_frames(shots, tables, selected_csv)
    out_dir = Path(out_dir)
    work = (out_dir / "dragonfly").resolve()
    if work.exists():
        shutil.rmtree(work / "data", ignore_errors=True)
        for p in work.glob("*"):
            if p.is_file():
                p.unlink()
    work.mkdir(parents=True, exist_ok=True)

    # -- detectors and photon files, one pair per shot file --------------------------------
    dq = None
    det_files, ph_files, ids, counts = [], [], [], []
    for k, (path, frames, centre) in enumerate(selection):
        if frames.size == 0:
            continue
        shots = read_cxi(path, lazy=True, load_extra=False)
        shots.require_geometry()
        geom = DetectorGeometry.from_shots(shots)
        if centre is not None:
            geom = geom.with_center(centre)
        geom, good = bin_geometry(geom, shots.mask, binning)
        if dq is None:
            dq = geom.q_per_pixel  # one voxel for all files: the first file's pixel at the beam centre
        det_path, ph_path = work / f"det_{k}.h5", work / f"photons_{k}.h5"
        pix = write_detector(det_path, geom, good, dq, polarization, max_radius_px)
        c = write_photons(ph_path, path, frames, pix, binning)
        det_files.append(det_path)
        ph_files.append(ph_path)
        ids += [(str(path), int(f)) for f in frames]
        counts.append(c)
        log.info("%s: %d frames, %d pixels, beam centre (%.2f, %.2f)", path, frames.size, pix.size, *geom.beam_center_px)
    (work / "detectors.txt").write_text("".join(f"{p}\n" for p in det_files))
    (work / "photons.txt").write_text("".join(f"{p}\n" for p in ph_files))

    n_frames = len(ids)
    # -- start model from the seed --------------------------------------------------------
    start, size = start_model(det_files, ph_files, init, seed)
    with h5py.File(work / "start_model.h5", "w") as f:
        f["intens"] = start[None]
    beta_line = "auto" if beta_start == "auto" else repr(float(beta_start))
    config = "\n".join([
        "# written by conveyor tools dragonfly-emc",
        "[emc]",
        f"in_photons_list = {work / 'photons.txt'}",
        f"in_detector_list = {work / 'detectors.txt'}",
        f"num_div = {int(num_div)}",
        f"output_folder = {work / 'data'}",
        f"log_file = {work / 'EMC.log'}",
        f"need_scaling = {1 if need_scaling else 0}",
        f"beta = {beta_line}",
        f"beta_schedule = {float(beta_factor)!r} {int(beta_every)}",
        f"start_model_file = {work / 'start_model.h5'}",
        f"point_group = {point_group}",
        "",
    ])
    cfg = work / "config.ini"
    cfg.write_text(config)

    # -- run ----------------------------------------------------------------------------------
    cmd = [exe, "-c", str(cfg), str(int(iterations))]
    if threads:
        cmd += ["-t", str(int(threads))]
    env = {"OMPI_MCA_rmaps_base_oversubscribe": "yes", "PYTHONUNBUFFERED": "1"}
    if int(mpi_procs) > 1:
        mpirun = shutil.which("mpirun")
        if mpirun is None:
            raise InputError("--mpi-procs", "mpirun not found", "install openmpi-bin or run with --mpi-procs 1")
        extra = ["--allow-run-as-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []
        cmd = [mpirun, "-np", str(int(mpi_procs)), *extra, *cmd]
    last = work / "data" / f"output_{int(iterations):03d}.h5"
    run_tool(cmd, tool="dragonfly.emc", input_path=selection[0][0], cwd=work, log_path=work / "dragonfly_emc.log",
             env=env, timeout=timeout, echo=False, expect=[last],
             fix="see the log; check the frames and the parameters")

    # -- read back ----------------------------------------------------------------------------
    rows = parse_emc_log((work / "EMC.log").read_text())
    for r in rows:
        with h5py.File(work / "data" / f"output_{r['iteration']:03d}.h5", "r") as f:
            s = np.asarray(f["scale"][()], dtype=np.float64) if "scale" in f else np.ones(n_frames)
        r.update(scale_mean=float(s.mean()), scale_std=float(s.std()), active_rot=None)
    with h5py.File(last, "r") as f:
        intens = to_conveyor_grid(f["intens"][()])
        weight = to_conveyor_grid(f["inter_weight"][()])
        best = np.asarray(f["orientations"][()], dtype=np.int64)
        quats = np.asarray(f["quaternions"][()], dtype=np.float64)[:, :4]
        scale = np.asarray(f["scale"][()], dtype=np.float64) if "scale" in f else np.ones(n_frames)
        lik = np.asarray(f["likelihood"][()], dtype=np.float64)
        info = np.asarray(f["mutual_info"][()], dtype=np.float64)
    q = quats[best]
    q = np.where(q[:, :1] < 0, -q, q)
    version = package_version("dragonfly-spi") or "?"
    labels = [f"Dragonfly {version} EMC (conveyor tools dragonfly-emc): {n_frames} frames, "
              f"{num_rotations(num_div)} rotations, {len(rows)} iterations"]
    out_dir.mkdir(parents=True, exist_ok=True)
    write_intensity_mrc(out_dir / "intensity.mrc", intens, dq, labels)
    write_intensity_mrc(out_dir / "intensity_weight.mrc", weight, dq, ["Dragonfly inter_weight: merge weight (0 = unsampled voxel)"])
    orient = [{"file": fn, "frame": fr, "quat_w": qq[0], "quat_x": qq[1], "quat_y": qq[2], "quat_z": qq[3],
               "orientation_index": int(b), "max_prob": None, "scale": float(s), "log_likelihood": float(ll),
               "mutual_info": float(mi)}
              for (fn, fr), qq, b, s, ll, mi in zip(ids, q, best, scale, lik, info)]
    _write_csv(out_dir / "orientations.csv", ORIENTATION_COLUMNS, orient)
    _write_csv(out_dir / "log.csv", LOG_COLUMNS, rows)
    return {"intensity": intens, "weight": weight, "dq_per_m": dq, "log": rows, "orientations": orient,
            "quaternions": q, "work_dir": work, "n_frames": n_frames, "size": size,
            "runtime_s": time.time() - t0, "version": version}

