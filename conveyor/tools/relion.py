"""RELION 3.1 as a peer tool for SPA preprocessing: motion correction, LoG picking, extraction.

Each function processes one movie or micrograph: it builds a throw-away RELION project
directory (symbolic links to the inputs, a STAR file with ``data_optics``), runs the RELION
program there, reads what RELION wrote and converts it to Conveyor's file contracts (see
:mod:`conveyor.tools._contracts` and docs/tools.md), so downstream rules do not care which
tool ran.

* :func:`run_motion` — ``relion_run_motioncorr --use_own`` (RELION's CPU implementation of
  the MotionCor2 algorithm, with dose weighting and the non-dose-weighted sum).
* :func:`run_autopick` — ``relion_autopick --LoG`` (Laplacian-of-Gaussian picking, diameter
  range from the particle diameter).
* :func:`run_extract` — ``relion_preprocess --extract`` (box, Fourier rescaling for the
  binning, contrast inversion, background-ring normalisation).

Conventions and conversions
---------------------------
* **Shift sign.** RELION's ``rlnMicrographShiftX/Y`` (global, local and the polynomial
  model) are the shifts RELION *applies* to a frame to align it, i.e. minus where the frame
  content lies. Measured with this adapter: a movie whose frame f content is displaced by
  ``(+1.5 f, -0.8 f)`` px gives RELION shifts ``(-1.5 f, +0.8 f)``. Conveyor stores where the
  content lies, so every RELION shift is negated (and referred to frame 1).
* **B-factor.** RELION's ``--bfactor`` is in px² and weights the cross-power spectrum by
  ``exp(-2 B d²)`` with ``d`` in cycles/px along y (``docs/algorithms/motion.md``), i.e.
  ``exp(-B d²)`` per image; Conveyor's is in Å² and weights each image by
  ``exp(-B k²/4)`` with ``k`` in 1/Å. The same filter along y is therefore
  ``B_px = B_Å / (4 pixel_size²)``, which RELION gets. (Along x RELION divides the column
  index by the half-transform width, making its filter 4× stronger there; that is RELION's.)
* **Gain.** The gain reference is read, rotated and flipped by Conveyor
  (:func:`conveyor.io.movie.transform_gain`, the same convention as the native command) and
  handed to RELION as an MRC file, so TIFF gain references work too.
* **Coordinates.** RELION's ``rlnCoordinateX/Y`` are px of the micrograph with the origin at
  the image corner, as Conveyor's; they are copied unchanged.
* **Extraction.** Particles whose box does not fit inside the micrograph are left out before
  RELION runs, as the native extraction does, so both give the same particle set.

The later stages (2D classification, initial model, refinement, post-processing) are in
:mod:`conveyor.tools.relion_refine`.

RELION 3.1.3 (Debian package ``relion``) prints ``gs: not found`` on every job (it makes a
PDF summary with ghostscript); that is harmless and hidden from the logs here.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import starfile

from ..errors import InputError
from ..io.mrc import read_header, read_mrc, write_mrc
from ..io.movie import movie_info, read_gain, transform_gain
from ..io.star import read_star, require_columns
from . import _contracts as C
from ._run import ToolError, require_executable, run_tool

log = logging.getLogger(__name__)

RELION_FIX = ("install RELION 3.1 (Debian/Ubuntu: apt-get install relion), put its binaries on PATH, "
              "or pass --relion-bin DIR")

#: Fraction of the particle diameter for the smallest and largest LoG diameters.
LOG_DIAMETER_RANGE = (0.75, 1.25)
#: RELION's default background radius: 75 % of the box radius, i.e. 0.375 x box.
BG_FRACTION = 0.375


def relion_exe(name: str, relion_bin=None) -> str:
    """Path of RELION program ``name`` (in ``relion_bin`` or on PATH); InputError if missing."""
    return require_executable(name, bin_dir=relion_bin or os.environ.get("CONVEYOR_RELION_BIN") or None,
                              fix=RELION_FIX)


def relion_available(relion_bin=None) -> bool:
    """True when the RELION programs these adapters use are all found."""
    from ._run import which  # noqa: PLC0415

    return all(which(n, relion_bin) for n in ("relion_run_motioncorr", "relion_autopick", "relion_preprocess"))


@contextlib.contextmanager
def _project(work_dir, near, prefix: str):
    """A RELION project directory: ``work_dir`` (kept), or a temporary one beside ``near``.

    The temporary directory is removed on success and kept on failure (the error message
    names the log inside it).
    """
    if work_dir is not None:
        d = Path(work_dir)
        d.mkdir(parents=True, exist_ok=True)
        yield d.resolve()
        return
    parent = Path(near).resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    d = Path(tempfile.mkdtemp(prefix=f".{prefix}-", dir=parent))
    try:
        yield d
    except BaseException:
        log.warning("kept RELION project directory %s for inspection", d)
        raise
    shutil.rmtree(d, ignore_errors=True)


def _link(src, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.is_symlink() or dst.exists():
        dst.unlink()
    dst.symlink_to(Path(src).resolve())


def _positive(value, name: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = math.nan
    if not (math.isfinite(v) and v > 0):
        raise InputError(name, f"must be a positive number, got {value!r}", f"pass {name} with a positive value")
    return v


def _pixel_size(path, given, what: str = "micrograph") -> float:
    if given is not None:
        return _positive(given, "--pixel-size")
    ps = read_header(path)["pixel_size"]
    if not ps or ps <= 0:
        raise InputError(path, f"the {what} header holds no pixel size", "pass --pixel-size (Å/px)")
    return float(ps)


def _optics_loop(pixel_size, voltage, cs=2.7, amplitude_contrast=0.1, micrograph_pixel_size=None) -> pd.DataFrame:
    row = {
        "rlnOpticsGroupName": "opticsGroup1",
        "rlnOpticsGroup": 1,
        "rlnMicrographOriginalPixelSize": float(pixel_size),
        "rlnVoltage": float(voltage),
        "rlnSphericalAberration": float(cs),
        "rlnAmplitudeContrast": float(amplitude_contrast),
    }
    if micrograph_pixel_size is not None:
        row["rlnMicrographPixelSize"] = float(micrograph_pixel_size)
    return pd.DataFrame([row])


def _write_relion_star(path: Path, blocks: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    starfile.write(blocks, path, float_format="%.6f", overwrite=True)


def _read_relion_star(path: Path, source) -> dict:
    try:
        return starfile.read(path, always_dict=True)
    except Exception as exc:  # noqa: BLE001 - starfile raises many kinds
        raise ToolError(source, f"cannot read RELION's output {path} ({exc.__class__.__name__}: {exc})",
                        "check the RELION version (3.1 or later is needed)") from None


# --------------------------------------------------------------------------- motion


def parse_patches(value) -> tuple[int, int]:
    """``"5x5"`` -> (5, 5); ``"5"`` -> (5, 5); ``"0"`` or ``"1x1"`` -> (1, 1) (whole frames only)."""
    s = str(value).lower().replace(" ", "")
    try:
        parts = [int(p) for p in s.split("x")] if "x" in s else [int(s)] * 2
    except ValueError:
        parts = []
    if len(parts) != 2 or min(parts) < 0:
        raise InputError("--patches", f"expected patches as NxM (e.g. 5x5) or 0, got {value!r}",
                         "use 5x5 for patch alignment, 0 for whole-frame alignment only")
    return max(parts[0], 1), max(parts[1], 1)


def relion_to_conveyor_shifts(relion_xy) -> np.ndarray:
    """RELION's (applied) frame shifts ``[n, 2]`` -> Conveyor's (content) shifts, frame 1 at zero."""
    s = np.asarray(relion_xy, dtype=float).reshape(-1, 2)
    return (0.0 - (s - s[:1])) if len(s) else s


def read_relion_motion_star(path, source=None) -> dict:
    """RELION's per-movie motion STAR file -> ``{"general": dict, "global_shift": DataFrame, ...}``."""
    blocks = _read_relion_star(Path(path), source or path)
    if "general" not in blocks or "global_shift" not in blocks:
        raise ToolError(source or path, f"RELION's motion file {path} lacks data_general or data_global_shift",
                        "check the RELION version (3.1 or later is needed)")
    general = blocks["general"]
    if isinstance(general, pd.DataFrame):
        general = general.iloc[0].to_dict()
    blocks["general"] = dict(general)
    return blocks


def motion_from_relion(relion_blocks: dict, *, movie_name, pixel_size: float, dose_per_frame: float,
                       pre_exposure: float, voltage: float, binning: float) -> tuple[dict, np.ndarray]:
    """Convert RELION's motion STAR blocks to Conveyor's: ``(blocks, shifts [n, 2])``.

    All shifts (global, local, and the local polynomial model's coefficients, which the model
    is linear in) are negated; the movie name and acquisition values are ours.
    """
    g = relion_blocks["general"]
    gs = relion_blocks["global_shift"]
    require_columns(gs, ["rlnMicrographFrameNumber", "rlnMicrographShiftX", "rlnMicrographShiftY"],
                    "RELION motion STAR", block="global_shift")
    gs = gs.sort_values("rlnMicrographFrameNumber")
    shifts = relion_to_conveyor_shifts(gs[["rlnMicrographShiftX", "rlnMicrographShiftY"]].to_numpy(float))
    general = {
        "rlnImageSizeX": g.get("rlnImageSizeX", 0),
        "rlnImageSizeY": g.get("rlnImageSizeY", 0),
        "rlnImageSizeZ": g.get("rlnImageSizeZ", len(gs)),
        "rlnMicrographMovieName": str(movie_name),
        "rlnMicrographBinning": float(binning),
        "rlnMicrographOriginalPixelSize": float(pixel_size),
        "rlnMicrographDoseRate": float(dose_per_frame),
        "rlnMicrographPreExposure": float(pre_exposure),
        "rlnVoltage": float(voltage),
        "rlnMicrographStartFrame": int(g.get("rlnMicrographStartFrame", 1)),
        "rlnMotionModelVersion": int(g.get("rlnMotionModelVersion", 0)),
    }
    local = relion_blocks.get("local_shift")
    if isinstance(local, pd.DataFrame) and len(local):
        local = local.copy()
        for c in ("rlnMicrographShiftX", "rlnMicrographShiftY"):
            if c in local:
                local[c] = -local[c].astype(float)
    else:
        local = None
    blocks = C.motion_blocks(general, shifts, gs["rlnMicrographFrameNumber"].to_numpy(int), local)
    model = relion_blocks.get("local_motion_model")
    if general["rlnMotionModelVersion"] and isinstance(model, pd.DataFrame) and "rlnMotionModelCoeff" in model:
        model = model.copy()
        model["rlnMotionModelCoeff"] = -model["rlnMotionModelCoeff"].astype(float)
        blocks["local_motion_model"] = model.reset_index(drop=True)
    else:
        blocks["general"]["rlnMotionModelVersion"] = 0
    return blocks, shifts


def motion_command(exe: str, *, pixel_size: float, voltage: float, dose_per_frame: float, pre_exposure: float,
                   patches=(5, 5), bfactor: float = 150.0, binning: float = 1.0, gain_mrc=None, threads: int = 1,
                   max_iter: int = 5) -> list[str]:
    """The ``relion_run_motioncorr --use_own`` command (run inside the project directory).

    ``bfactor`` is in Å² (Conveyor's unit) and converted to RELION's px² (``B / (4 p²)``).
    """
    px, py = patches
    cmd = [
        exe, "--i", "movies.star", "--o", "MotionCorr/", "--use_own", "--j", str(int(threads)),
        "--bin_factor", f"{float(binning):g}", "--bfactor", f"{float(bfactor) / (4.0 * pixel_size ** 2):.6g}",
        "--patch_x", str(int(px)), "--patch_y", str(int(py)), "--max_iter", str(int(max_iter)),
        "--dose_weighting", "--save_noDW", "--angpix", f"{pixel_size:g}", "--voltage", f"{voltage:g}",
        "--dose_per_frame", f"{dose_per_frame:g}", "--preexposure", f"{pre_exposure:g}",
        "--first_frame_sum", "1", "--last_frame_sum", "-1",
    ]
    if gain_mrc is not None:
        cmd += ["--gainref", str(gain_mrc), "--gain_rot", "0", "--gain_flip", "0"]
    return cmd


def run_motion(movie, *, out_sum, out_sum_nodw, out_shifts, out_plot=None, pixel_size=None, voltage: float = 300.0,
               dose_per_frame: float, pre_exposure: float = 0.0, patches="5x5", bfactor: float = 150.0,
               binning: float = 1.0, gain=None, gain_rot=0, gain_flip=None, frames=None, threads: int = 1,
               relion_bin=None, work_dir=None, max_iter: int = 5) -> dict:
    """Motion-correct one movie with ``relion_run_motioncorr --use_own``; write Conveyor's motion outputs.

    Parameters mirror ``conveyor spa motion``: pixel size in Å/px (default: the movie
    header's), voltage kV, dose e/Å² per frame, B-factor Å², ``patches`` "NxM" or "0".

    Returns ``{"shifts": [n, 2] (Conveyor's sign, px), "pixel_size": output Å/px,
    "total_drift": px, "n_frames": n}``.
    """
    movie = Path(movie)
    info = movie_info(movie)
    if info["ndim"] != 3:
        raise InputError(movie, "holds a single 2D image, not a movie", "give the raw movie (all frames)")
    if frames is not None and int(frames) != info["n_frames"]:
        raise InputError(movie, f"movie has {info['n_frames']} frames but --frames expects {int(frames)}",
                         "fix --frames (spa.frames in the config) or remove this movie")
    if pixel_size is None:
        pixel_size = info["pixel_size"]
        if not pixel_size:
            raise InputError(movie, "the movie header holds no pixel size", "pass --pixel-size (Å/px)")
    ps = _positive(pixel_size, "--pixel-size")
    voltage = _positive(voltage, "--voltage")
    dose = _positive(dose_per_frame, "--dose-per-frame")
    binning = _positive(binning, "--binning")
    px, py = parse_patches(patches)
    g = None
    if gain is not None:
        g, _ = read_gain(gain)
        g = transform_gain(g, gain_flip, gain_rot)
        if g.shape != (info["ny"], info["nx"]):
            raise InputError(movie, f"gain reference {gain} has shape {g.shape[0]}x{g.shape[1]} after "
                             f"gain_rot={gain_rot}, gain_flip={gain_flip} but the frames are "
                             f"{info['ny']}x{info['nx']}", "set --gain-rot / --gain-flip so the gain matches")
    exe = relion_exe("relion_run_motioncorr", relion_bin)
    suffix = movie.suffix.lower()
    with _project(work_dir, out_sum, "conveyor-relion-motion") as proj:
        link = proj / "Movies" / f"mic{suffix}"
        _link(movie, link)
        gain_mrc = None
        if g is not None:
            gain_mrc = proj / "gain.mrc"
            write_mrc(gain_mrc, g, ps)
        _write_relion_star(proj / "movies.star", {
            "optics": _optics_loop(ps, voltage),
            "movies": pd.DataFrame({"rlnMicrographMovieName": [f"Movies/mic{suffix}"], "rlnOpticsGroup": [1]}),
        })
        cmd = motion_command(exe, pixel_size=ps, voltage=voltage, dose_per_frame=dose, pre_exposure=pre_exposure,
                             patches=(px, py), bfactor=bfactor, binning=binning,
                             gain_mrc="gain.mrc" if gain_mrc else None, threads=threads, max_iter=max_iter)
        out = proj / "MotionCorr" / "Movies"
        run_tool(cmd, tool="relion_run_motioncorr", input_path=movie, cwd=proj, log_path=proj / "relion.log",
                 expect=[out / "mic.mrc", out / "mic_noDW.mrc", out / "mic.star"])
        dw, _ = read_mrc(out / "mic.mrc")
        nodw, _ = read_mrc(out / "mic_noDW.mrc")
        rblocks = read_relion_motion_star(out / "mic.star", movie)
        blocks, shifts = motion_from_relion(rblocks, movie_name=movie, pixel_size=ps, dose_per_frame=dose,
                                            pre_exposure=pre_exposure, voltage=voltage, binning=binning)
        out_ps = ps * binning
        C.write_sums(out_sum, out_sum_nodw, dw, nodw, out_ps)
        C.write_motion_star(out_shifts, blocks)
        if out_plot is not None:
            C.write_drift_plot(out_plot, shifts, title=f"{movie.name} (RELION motioncorr)", pixel_size=ps)
    total = float(np.hypot(*np.diff(shifts, axis=0).T).sum()) if len(shifts) > 1 else 0.0
    return {"shifts": shifts, "pixel_size": out_ps, "total_drift": total, "n_frames": len(shifts)}


# --------------------------------------------------------------------------- autopick


def autopick_command(exe: str, *, diameter_min: float, diameter_max: float, lowpass: float = 20.0,
                     adjust_threshold: float = 0.0, upper_threshold: float = 999.0,
                     white_particles: bool = False) -> list[str]:
    """The ``relion_autopick --LoG`` command (run inside the project directory)."""
    cmd = [
        exe, "--i", "micrographs.star", "--odir", "AutoPick/", "--pickname", "autopick", "--LoG",
        "--LoG_diam_min", f"{diameter_min:g}", "--LoG_diam_max", f"{diameter_max:g}", "--shrink", "0",
        "--lowpass", f"{lowpass:g}", "--LoG_adjust_threshold", f"{adjust_threshold:g}",
        "--LoG_upper_threshold", f"{upper_threshold:g}",
    ]
    if white_particles:
        cmd.append("--Log_invert")
    return cmd


def run_autopick(micrograph, *, particle_diameter: float, out_star, out_png=None, pixel_size=None,
                 diameter_range=None, lowpass: float = 20.0, adjust_threshold: float = 0.0,
                 upper_threshold: float = 999.0, white_particles: bool = False, micrograph_name=None,
                 relion_bin=None, work_dir=None) -> pd.DataFrame:
    """Pick one micrograph with RELION's Laplacian-of-Gaussian picker; write Conveyor's pick outputs.

    ``diameter_range`` (Å, min and max) defaults to :data:`LOG_DIAMETER_RANGE` times
    ``particle_diameter``. Micrographs have protein dark (``white_particles`` for inverted
    ones). ``micrograph_name`` (default: the path as given) goes into rlnMicrographName.
    Returns the picks table written to ``out_star``.
    """
    mic = Path(micrograph)
    ps = _pixel_size(mic, pixel_size)
    d = _positive(particle_diameter, "--particle-diameter")
    dmin, dmax = diameter_range or (LOG_DIAMETER_RANGE[0] * d, LOG_DIAMETER_RANGE[1] * d)
    if not (0 < dmin < dmax):
        raise InputError("--diameter-range", f"need 0 < min < max, got {dmin:g} {dmax:g}", "e.g. 150 250 (Å)")
    exe = relion_exe("relion_autopick", relion_bin)
    name = str(micrograph) if micrograph_name is None else str(micrograph_name)
    with _project(work_dir, out_star, "conveyor-relion-autopick") as proj:
        _link(mic, proj / "Micrographs" / "mic.mrc")
        _write_relion_star(proj / "micrographs.star", {
            "optics": _optics_loop(ps, 300.0, micrograph_pixel_size=ps),
            "micrographs": pd.DataFrame({"rlnMicrographName": ["Micrographs/mic.mrc"], "rlnOpticsGroup": [1]}),
        })
        cmd = autopick_command(exe, diameter_min=dmin, diameter_max=dmax, lowpass=lowpass,
                               adjust_threshold=adjust_threshold, upper_threshold=upper_threshold,
                               white_particles=white_particles)
        coords = proj / "AutoPick" / "Micrographs" / "mic_autopick.star"
        run_tool(cmd, tool="relion_autopick", input_path=mic, cwd=proj, log_path=proj / "relion.log",
                 expect=[coords])
        picks = _relion_coordinates(coords, mic)
    table = C.picks_table(picks["rlnCoordinateX"], picks["rlnCoordinateY"], picks["rlnAutopickFigureOfMerit"], name)
    C.write_picks_star(out_star, table)
    if out_png is not None:
        img, _ = read_mrc(mic)
        C.write_pick_png(out_png, img, table["rlnCoordinateX"], table["rlnCoordinateY"], 0.5 * d / ps,
                         title=f"{mic.name} (RELION LoG)")
    return table


def _relion_coordinates(path: Path, source) -> pd.DataFrame:
    blocks = _read_relion_star(path, source)
    table = next(iter(blocks.values())) if blocks else pd.DataFrame()
    if isinstance(table, dict):
        table = pd.DataFrame([table])
    if len(table) == 0:
        return pd.DataFrame(columns=["rlnCoordinateX", "rlnCoordinateY", "rlnAutopickFigureOfMerit"])
    require_columns(table, ["rlnCoordinateX", "rlnCoordinateY"], path)
    if "rlnAutopickFigureOfMerit" not in table:
        table = table.assign(rlnAutopickFigureOfMerit=0.0)
    return table


# --------------------------------------------------------------------------- extraction


def _read_table(path, labels) -> pd.DataFrame:
    blocks = read_star(path)
    for key in ("particles", "micrographs", ""):
        if key in blocks:
            table = blocks[key]
            break
    else:
        table = next(b for b in blocks.values())
    require_columns(table, labels, path)
    return table


def extract_command(exe: str, *, box: int, binning: int, bg_radius: int, invert: bool = True,
                    normalise: bool = True) -> list[str]:
    """The ``relion_preprocess --extract`` command (run inside the project directory)."""
    cmd = [
        exe, "--i", "micrographs_ctf.star", "--coord_dir", "Coords/", "--coord_suffix", "_pick.star",
        "--part_dir", "Extract/", "--part_star", "Extract/particles.star", "--extract",
        "--extract_size", str(int(box)),
    ]
    if binning > 1:
        cmd += ["--scale", str(int(box) // int(binning))]
    if normalise:
        cmd += ["--norm", "--bg_radius", str(int(bg_radius)), "--white_dust", "-1", "--black_dust", "-1"]
    if invert:
        cmd.append("--invert_contrast")
    return cmd


def run_extract(micrograph, *, coords, ctf, box: int, binning: int = 1, out_stack, out_star, pixel_size=None,
                bg_radius=None, invert: bool = True, normalise: bool = True, voltage=None, cs=None,
                amplitude_contrast=None, micrograph_name=None, relion_bin=None, work_dir=None) -> pd.DataFrame:
    """Extract particles of one micrograph with ``relion_preprocess``; write Conveyor's extraction outputs.

    Parameters
    ----------
    coords : path
        Coordinate STAR (``rlnCoordinateX/Y`` px, optional ``rlnAutopickFigureOfMerit``).
    ctf : path
        Per-micrograph CTF STAR (``rlnDefocusU/V/Angle``, ``rlnVoltage``,
        ``rlnSphericalAberration``, ``rlnAmplitudeContrast``; ``voltage``/``cs``/
        ``amplitude_contrast`` override or supply them).
    box, binning : int
        Box in px of the micrograph; the output box is ``box / binning`` (even).
    bg_radius : float, optional
        Background radius in px of the output box (default 0.375 x output box).

    Returns the particles table written to ``out_star`` (one row per image of ``out_stack``).
    """
    mic = Path(micrograph)
    box, binning = int(box), int(binning)
    C.check_box_bin(box, binning)
    out_size = box // binning
    hdr = read_header(mic)
    ps = _pixel_size(mic, pixel_size)
    picks = _read_table(coords, ["rlnCoordinateX", "rlnCoordinateY"])
    ctf_table = _read_table(ctf, ["rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"])
    if len(ctf_table) == 0:
        raise InputError(ctf, "holds no CTF row", "re-run CTF estimation for this micrograph")
    ctf_row = ctf_table.iloc[0]
    opt = {}
    for key, given, label in (("voltage", voltage, "rlnVoltage"), ("cs", cs, "rlnSphericalAberration"),
                              ("ac", amplitude_contrast, "rlnAmplitudeContrast")):
        if given is not None:
            opt[key] = float(given)
        elif label in ctf_row.index:
            opt[key] = float(ctf_row[label])
        else:
            flag = {"voltage": "--voltage", "cs": "--cs", "ac": "--amplitude-contrast"}[key]
            raise InputError(ctf, f"lacks {label}", f"pass {flag} or re-run CTF estimation")
    if bg_radius is None:
        bg_radius = BG_FRACTION * out_size
    bg = int(round(float(bg_radius)))
    if not (0 < bg < out_size // 2):
        raise InputError("--bg-radius", f"background radius {bg_radius} px must lie in (0, {out_size // 2}) for a "
                         f"{out_size}-px box", "use about 0.375 x the output box")
    x = picks["rlnCoordinateX"].to_numpy(float)
    y = picks["rlnCoordinateY"].to_numpy(float)
    fom = (picks["rlnAutopickFigureOfMerit"].to_numpy(float) if "rlnAutopickFigureOfMerit" in picks
           else np.zeros(len(picks)))
    keep = C.boxes_inside(hdr["shape"], x, y, box)
    if (~keep).any():
        log.info("%s: %d of %d particles lie too close to the edge for a %d-px box; skipped",
                 mic, int((~keep).sum()), len(keep), box)
    x, y, fom = x[keep], y[keep], fom[keep]
    ctf_cols = {
        "rlnDefocusU": float(ctf_row["rlnDefocusU"]),
        "rlnDefocusV": float(ctf_row["rlnDefocusV"]),
        "rlnDefocusAngle": float(ctf_row["rlnDefocusAngle"]),
        "rlnPhaseShift": float(ctf_row.get("rlnPhaseShift", 0.0)),
        "rlnCtfMaxResolution": float(ctf_row.get("rlnCtfMaxResolution", 999.0)),
        "rlnCtfFigureOfMerit": float(ctf_row.get("rlnCtfFigureOfMerit", 0.0)),
    }
    name = str(micrograph) if micrograph_name is None else str(micrograph_name)
    particles = pd.DataFrame({"rlnCoordinateX": x, "rlnCoordinateY": y, "rlnAutopickFigureOfMerit": fom,
                              **{k: np.full(len(x), v) for k, v in ctf_cols.items()}})
    blocks = C.particle_blocks(particles, stack_path=out_stack, micrograph_name=name, pixel_size=ps,
                               binning=binning, box=box, voltage=opt["voltage"], cs=opt["cs"],
                               amplitude_contrast=opt["ac"])
    if len(x) == 0:
        C.write_particles(out_stack, out_star, np.zeros((0, out_size, out_size), np.float32), blocks, ps * binning)
        return blocks["particles"]
    exe = relion_exe("relion_preprocess", relion_bin)
    with _project(work_dir, out_stack, "conveyor-relion-extract") as proj:
        _link(mic, proj / "Micrographs" / "mic.mrc")
        row = {"rlnMicrographName": "Micrographs/mic.mrc", "rlnOpticsGroup": 1, **ctf_cols,
               "rlnCtfAstigmatism": abs(ctf_cols["rlnDefocusU"] - ctf_cols["rlnDefocusV"])}
        _write_relion_star(proj / "micrographs_ctf.star", {
            "optics": _optics_loop(ps, opt["voltage"], opt["cs"], opt["ac"], micrograph_pixel_size=ps),
            "micrographs": pd.DataFrame([row]),
        })
        _write_relion_star(proj / "Coords" / "Micrographs" / "mic_pick.star", {
            "": pd.DataFrame({"rlnCoordinateX": x, "rlnCoordinateY": y, "rlnAutopickFigureOfMerit": fom}),
        })
        (proj / "Extract").mkdir(exist_ok=True)
        cmd = extract_command(exe, box=box, binning=binning, bg_radius=bg, invert=invert, normalise=normalise)
        stack_path = proj / "Extract" / "Micrographs" / "mic.mrcs"
        run_tool(cmd, tool="relion_preprocess", input_path=mic, cwd=proj, log_path=proj / "relion.log",
                 expect=[stack_path, proj / "Extract" / "particles.star"])
        stack, _ = read_mrc(stack_path)
        if stack.ndim == 2:
            stack = stack[None]
        if stack.shape[0] != len(x) or stack.shape[-1] != out_size:
            raise ToolError(mic, f"relion_preprocess wrote {stack.shape[0]} images of {stack.shape[-1]} px for "
                            f"{len(x)} particles of {out_size} px", "check the RELION version and the inputs",
                            log_path=proj / "relion.log")
        C.write_particles(out_stack, out_star, stack, blocks, ps * binning)
    return blocks["particles"]
