"""spi_processing (PyPI ``spi_processing`` 0.1.3) for SPI stages 1-4, read back into the per-frame table.

What runs (the package's own command-line scripts, in this order, in a work folder)
-------------------------------------------------------------------------------------
1. ``spi_compute_photons.py ALL.cxi``: ``num_photons`` and ``num_litpixels`` per frame
   (sums over the whole frame; the tool ignores the mask here).
2. ``spi_filter.py ALL.cxi -d num_photons -m THRESHOLD -o hits/``: the hits, copied into
   ``hits/ALL.cxi`` (the tool has no automatic threshold: with ``--threshold auto`` the
   threshold is Conveyor's rule, :func:`conveyor.spi.hits.find_hits`, applied to the
   tool's photon counts; a number is passed as is).
3. ``spi_estimate_center.py hits/ALL.cxi``: beam centre from the rotational symmetry of
   the summed hits (iso-intensity rings, rounded to 0.1 px).
4. ``spi_estimate_size.py hits/ALL.cxi -w Å -d m --pix m -m Å -M Å``: sphere form-factor
   fit of every hit's radial profile (``psd/size``: **diameter in Å**, ``psd/size_score``:
   second-best / best local misfit, the same definition as ``conveyor spi size``).
5. ``spi_refine_center.py hits/ALL.cxi ... --max-shift N``: brute-force refinement of the
   centre against a sphere pattern. It reads ``psd/size`` as its start size, so it runs
   after step 4 (before that it fails); when it moves the centre, step 4 runs again.

File conversions
----------------
* The tools read only ``/entry_1/image_N/{data,mask,image_center}`` and refuse groups that
  hold soft links (Conveyor's writer links ``detector_1`` and ``source_1`` there). So the
  user's file is never touched: :func:`prepare_cxi` writes a new file with just
  ``/entry_1/image_1/{data,mask,image_center}`` (frames copied chunk by chunk, the CXI
  mask bits as stored: 0 = good, as the tools expect) plus ``conveyor_frame``, the frame
  index in the user's file, which ``spi_filter.py`` carries along with the selection.
* Results come back from ``hits/ALL.cxi`` (``/entry_1/image_1/...``) by ``conveyor_frame``
  into the per-frame table of :mod:`conveyor.spi.frames` with the columns of
  ``conveyor spi size``: ``frame, photons, lit_pixels, hit_score, is_hit, center_x,
  center_y, diameter_nm`` (Å / 10), ``size_score``, ``fit_rmin_px``, ``fit_rmax_px``;
  plus the tool's own ``psd_fit_diff`` (L1 misfit of the best size) and ``psd_scale``
  (mean radial profile over the fit range). ``size_misfit`` and ``multi_score`` are
  quantities the tool does not compute, so they are absent, and ``conveyor spi filter``
  skips those criteria for this table. ``hit_score`` is ``(photons - background) /
  sigma`` with the misses' level found as in ``conveyor spi hits``.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import numpy as np

from ..errors import InputError
from ._run import run_tool

log = logging.getLogger(__name__)

#: Scripts of the spi_processing package that the adapter runs.
SCRIPTS = ("spi_compute_photons.py", "spi_filter.py", "spi_estimate_center.py", "spi_estimate_size.py",
           "spi_refine_center.py")
INSTALL_HINT = "install it with `bash scripts/install-spi-peers.sh` (pip install spi_processing==0.1.3)"
IMAGE = "/entry_1/image_1"
#: Environment for the tools: no display for their PDF reports.
TOOL_ENV = {"MPLBACKEND": "Agg", "PYTHONWARNINGS": "ignore"}


# ---------------------------------------------------------------------------------------
# finding the tools
# ---------------------------------------------------------------------------------------
def find_script(name: str) -> str | None:
    """Path of a tool's script: on PATH, else beside the running interpreter (its venv's bin)."""
    exe = shutil.which(name)
    if exe:
        return exe
    cand = Path(sys.executable).parent / name
    return str(cand) if cand.is_file() and os.access(cand, os.X_OK) else None


def require_script(name: str, package: str, hint: str) -> str:
    exe = find_script(name)
    if exe is None:
        raise InputError(name, f"script of the {package} package not found on PATH or in {Path(sys.executable).parent}", hint)
    return exe


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def available() -> bool:
    """True when all spi_processing scripts can be found."""
    return all(find_script(s) for s in SCRIPTS)


# ---------------------------------------------------------------------------------------
# file conversion
# ---------------------------------------------------------------------------------------
def prepare_cxi(shots_path, out_path, *, center=None, chunk: int = 256) -> dict:
    """Write the minimal CXI file the spi tools read, from any CXI file Conveyor reads.

    ``/entry_1/image_1/{data, mask (CXI bits, 0 = good), image_center (cx, cy, 0),
    conveyor_frame}`` and ``/cxi_version``; nothing else (no soft links, which the tools
    refuse). ``center`` overrides the file's beam centre. Returns a dict with ``n_frames``,
    ``frame_shape``, ``center`` and the geometry (``wavelength_m``, ``distance_m``,
    ``pixel_size_m``, ``None`` where the file has none).
    """
    import h5py

    from ..io.cxi import _open, read_cxi

    shots = read_cxi(shots_path, lazy=True, load_extra=False)
    n = shots.n_frames
    if n == 0:
        raise InputError(shots_path, "the file holds no frames", "give a CXI file with frames")
    ny, nx = shots.frame_shape
    c = shots.beam_center_px if center is None else (float(center[0]), float(center[1]))
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with _open(shots_path) as src, h5py.File(out_path, "w") as dst:
        dset = src[shots.data_path]
        dst["cxi_version"] = 160
        img = dst.create_group("entry_1").create_group("image_1")
        dtype = dset.dtype if dset.dtype.kind in "iuf" else np.float32
        out = img.create_dataset("data", shape=(n, ny, nx), dtype=dtype, chunks=(1, ny, nx), compression="gzip",
                                 compression_opts=1)
        for start in range(0, n, chunk):
            out[start:start + chunk] = np.asarray(shots.data[start:start + chunk])
        img.create_dataset("mask", data=np.asarray(shots.mask_bits, dtype=np.uint32))
        img.create_dataset("image_center", data=np.array([c[0], c[1], 0.0]))
        img.create_dataset("conveyor_frame", data=np.asarray(shots.frame_indices, dtype=np.int64))
    return {
        "n_frames": int(n),
        "frame_shape": (int(ny), int(nx)),
        "center": (float(c[0]), float(c[1])),
        "wavelength_m": shots.wavelength_m,
        "distance_m": shots.distance_m,
        "pixel_size_m": shots.pixel_size_m,
    }


def read_image_group(path) -> dict:
    """All datasets of ``/entry_1/image_1`` of a tool's CXI file (``psd/...`` keep their path)."""
    import h5py

    out = {}
    with h5py.File(path, "r") as f:
        if IMAGE not in f:
            raise InputError(path, f"no {IMAGE} group in the tool's output", "re-run the adapter")

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset) and name not in ("data",):
                out[name] = obj[()]

        f[IMAGE].visititems(visit)
    return out


# ---------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------
def _fmt(v: float) -> str:
    return f"{float(v):.6g}"


def run_spi_processing(shots_path, out_path, *, dmin_nm: float = 20.0, dmax_nm: float = 200.0,
                       threshold="auto", k_sigma: float | None = None, min_photons: float = 0.0,
                       refine_center: bool = True, refine_shift_px: int = 2, nsize: int = 300,
                       work_dir=None, timeout: float | None = None):
    """Run spi_processing's scripts on a copy of ``shots_path``; write and return the per-frame table.

    Parameters
    ----------
    shots_path : path
        CXI file of shots (never modified).
    out_path : path
        Per-frame table to write (:func:`conveyor.spi.frames.write_frames`, atomically).
    dmin_nm, dmax_nm : float
        Size range searched (the tool's ``-m/-M`` in Å, integers).
    threshold : "auto" or float
        Hit threshold on the tool's ``num_photons`` (``spi_filter.py -m``).
    k_sigma, min_photons : float
        The automatic threshold's parameters (as ``conveyor spi hits``).
    refine_center : bool
        Run ``spi_refine_center.py`` (±``refine_shift_px``, 0.2 px steps) after sizing.
    nsize : int
        Sizes tested in the range (the tool's ``-n``).
    work_dir : path, optional
        Keep the tool's files (CXI copies, PDF reports, logs) there; default: a temporary
        folder removed afterwards.

    Returns
    -------
    pandas.DataFrame
        The table written (``attrs`` holds its attributes).
    """
    import pandas as pd

    from ..spi import frames as ft
    from ..spi import hits as hf

    t0 = time.time()
    shots_path = Path(shots_path)
    if not (0 < dmin_nm < dmax_nm):
        raise InputError("--dmin-nm/--dmax-nm", f"bad size range {dmin_nm}..{dmax_nm} nm", "give 0 < dmin < dmax")
    if int(refine_shift_px) < 1 and refine_center:
        raise InputError("--refine-shift-px", f"must be >= 1, got {refine_shift_px}", "give a whole number of pixels")
    scripts = {s: require_script(s, "spi_processing", INSTALL_HINT) for s in SCRIPTS}
    version = package_version("spi_processing")
    tmp = None
    if work_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix=".spi_processing-", dir=Path(out_path).resolve().parent)
        work = Path(tmp.name).resolve()
    else:
        work = Path(work_dir).resolve()
        work.mkdir(parents=True, exist_ok=True)
    try:
        name = shots_path.stem + ".cxi"
        all_cxi = work / "all" / name
        hits_dir = work / "hits"
        hits_cxi = hits_dir / name
        logs = work / "logs"
        for p in (all_cxi, hits_cxi):
            if p.exists():
                p.unlink()
        info = prepare_cxi(shots_path, all_cxi)
        if None in (info["wavelength_m"], info["distance_m"], info["pixel_size_m"]):
            raise InputError(shots_path, "photon energy, detector distance or pixel size missing",
                             "add them to the CXI file in SI units (J, m)")

        def run(script, *args, log_name):
            return run_tool([scripts[script], *map(str, args)], tool=script, input_path=shots_path, cwd=work,
                            log_path=logs / f"{log_name}.log", env=TOOL_ENV, timeout=timeout, echo=False,
                            fix="see the tool's log; check the geometry and the size range")

        # 1. photons per frame
        run("spi_compute_photons.py", all_cxi, log_name="1_compute_photons")
        grp = read_image_group(all_cxi)
        photons = np.asarray(grp["num_photons"], dtype=np.float64)
        lit = np.asarray(grp["num_litpixels"], dtype=np.int64)
        frames = np.asarray(grp["conveyor_frame"], dtype=np.int64)
        kw = {} if k_sigma is None else {"k_sigma": float(k_sigma)}
        res = hf.find_hits(None, None, threshold, min_photons=min_photons, counts=(photons, lit), **kw)
        thr = max(float(res.threshold), float(min_photons))
        # 2. hits: spi_filter keeps num_photons >= -m; a hit is photons > threshold (conveyor spi hits)
        cut = np.nextafter(thr, np.inf)
        run("spi_filter.py", all_cxi, "-d", "num_photons", "-m", repr(float(cut)), "-o", hits_dir,
            "-r", work / "filter_report.pdf", log_name="2_filter")
        n = frames.size
        table = {
            "frame": frames,
            "photons": photons,
            "lit_pixels": lit,
            "hit_score": np.asarray(res.score, dtype=np.float64),
            "is_hit": np.zeros(n, dtype=bool),
            "center_x": np.full(n, info["center"][0]),
            "center_y": np.full(n, info["center"][1]),
            "diameter_nm": np.full(n, np.nan),
            "size_score": np.full(n, np.nan),
            "fit_rmin_px": np.full(n, np.nan),
            "fit_rmax_px": np.full(n, np.nan),
            "psd_fit_diff": np.full(n, np.nan),
            "psd_scale": np.full(n, np.nan),
        }
        lam_A = info["wavelength_m"] * 1e10
        geo = ["-w", _fmt(lam_A), "-d", _fmt(info["distance_m"]), "--pix", _fmt(info["pixel_size_m"])]
        size_args = [*geo, "-m", str(int(np.floor(dmin_nm * 10))), "-M", str(int(np.ceil(dmax_nm * 10))), "-n", str(int(nsize))]
        steps = ["compute_photons", "filter"]
        center_est = center_ref = None
        if hits_cxi.exists():  # spi_filter writes nothing when no frame passes
            # 3. centre by rotational symmetry, 4. sizes, 5. refined centre (needs psd/size)
            run("spi_estimate_center.py", hits_cxi, "-r", work / "center_report.pdf", log_name="3_estimate_center")
            center_est = tuple(float(v) for v in read_image_group(hits_cxi)["image_center"][:2])
            run("spi_estimate_size.py", hits_cxi, *size_args, log_name="4_estimate_size")
            steps += ["estimate_center", "estimate_size"]
            if refine_center:
                ny, nx = info["frame_shape"]
                radius = int(np.floor(min(center_est[0], center_est[1], nx - 1 - center_est[0], ny - 1 - center_est[1])))
                run("spi_refine_center.py", hits_cxi, *geo, "--max-shift", str(int(refine_shift_px)), "-R", str(max(radius, 4)),
                    "-r", work / "refine_report.pdf", log_name="5_refine_center")
                center_ref = tuple(float(v) for v in read_image_group(hits_cxi)["image_center"][:2])
                steps.append("refine_center")
                if max(abs(center_ref[0] - center_est[0]), abs(center_ref[1] - center_est[1])) > 0.05:
                    run("spi_estimate_size.py", hits_cxi, *size_args, log_name="6_estimate_size_refined")
                    steps.append("estimate_size")
            out = read_image_group(hits_cxi)
            pos = {int(f): i for i, f in enumerate(frames)}
            rows = np.array([pos[int(f)] for f in np.asarray(out["conveyor_frame"], dtype=np.int64)], dtype=np.int64)
            c = np.asarray(out["image_center"], dtype=np.float64).ravel()
            table["is_hit"][rows] = True
            table["center_x"][:] = c[0]
            table["center_y"][:] = c[1]
            table["diameter_nm"][rows] = np.asarray(out["psd/size"], dtype=np.float64) / 10.0
            table["size_score"][rows] = np.asarray(out["psd/size_score"], dtype=np.float64)
            table["psd_scale"][rows] = np.asarray(out["psd/scale"], dtype=np.float64)
            table["psd_fit_diff"][rows] = np.asarray(out["psd/fit_diff"], dtype=np.float64).min(axis=1)
            psd = np.asarray(out["psd/data"], dtype=np.float64)
            table["fit_rmin_px"][rows] = float(np.argmax(psd.max(axis=0) > 0) + 2)  # the tool's defaults
            table["fit_rmax_px"][rows] = float(psd.shape[1])
        else:
            log.warning("%s: no frame has num_photons >= %.1f; nothing to size", shots_path, thr)
        df = pd.DataFrame(table)
        run_c = (float(table["center_x"][0]), float(table["center_y"][0]))
        attrs = {
            "source": str(shots_path.resolve()),
            "run": shots_path.stem,
            "step": "size",
            "tool": f"spi_processing {version or '?'}",
            "tool_steps": steps,
            "hit_metric": "photons",
            "hit_threshold": thr,
            "hit_threshold_auto": threshold == "auto",
            "hit_background": float(res.background),
            "hit_sigma": float(res.sigma),
            "hit_min_photons": float(min_photons),
            "beam_center_file_px": list(info["center"]),
            "center_source": "spi_refine_center" if center_ref else ("spi_estimate_center" if center_est else "file"),
            "center_estimate_px": list(center_est) if center_est else None,
            "center_per_frame": False,
            "run_center_x": run_c[0],
            "run_center_y": run_c[1],
            "size_dmin_nm": float(dmin_nm),
            "size_dmax_nm": float(dmax_nm),
            "size_nsize": int(nsize),
            "pixel_size_m": float(info["pixel_size_m"]),
            "distance_m": float(info["distance_m"]),
            "wavelength_m": float(info["wavelength_m"]),
            "work_dir": None if tmp is not None else str(work.resolve()),
            "runtime_s": round(time.time() - t0, 2),
        }
        ft.write_frames(out_path, df, attrs)
        df.attrs = attrs
        return df
    finally:
        if tmp is not None:
            tmp.cleanup()
