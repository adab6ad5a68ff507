"""``conveyor spa motion``: motion-correct one movie (native, numpy or cupy).

Writes the aligned dose-weighted sum, the aligned sum without dose weighting (for CTF
estimation), the per-frame shifts as a RELION-style per-micrograph motion STAR file and a
drift plot. All outputs appear together or not at all: each is written to a temporary
name and renamed only after every one has been written.

Shift sign: ``rlnMicrographShiftX/Y`` are where the content of a frame lies relative to
frame 1, in px (Conveyor's convention, the same as the simulator's truth); RELION's own
motion STAR files store the opposite sign. See ``docs/algorithms/motion.md``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import textwrap
import time
from pathlib import Path

import numpy as np

from .. import backend
from ..errors import InputError
from ..io.atomic import atomic_path
from ..io.mrc import write_mrc
from ..io.star import write_star
from .._lazy import lazy_module

pd = lazy_module("pandas")

log = logging.getLogger(__name__)

#: rlnMotionModelVersion values, as RELION numbers them.
MOTION_MODEL_NULL = 0
MOTION_MODEL_THIRD_ORDER_POLYNOMIAL = 1


def parse_patches(text: str):
    """``"5x5"`` / ``"5"`` -> (5, 5) (patches along x, y); ``"0"``, ``"1"`` or ``"1x1"`` -> None (whole frame)."""
    t = str(text).strip().lower()
    try:
        parts = [int(v) for v in t.split("x")] if "x" in t else [int(t), int(t)]
    except ValueError:
        parts = []
    if len(parts) != 2 or min(parts) < 0:
        raise InputError("--patches", f"cannot read patches {text!r}",
                         "give NxM (e.g. 5x5), N (NxN) or 0 for whole-frame only")
    if min(parts) <= 1:
        return None
    return (parts[0], parts[1])


def _smooth_arg(text):
    t = str(text).strip().lower()
    if t == "auto":
        return "auto"
    try:
        v = float(t)
    except ValueError:
        raise InputError("--smooth", f"cannot read {text!r}",
                         "give 'auto' or a number >= 0 (0: no smoothing)") from None
    if not (v >= 0 and math.isfinite(v)):
        raise InputError("--smooth", f"smoothing must be >= 0, got {text!r}", "give 'auto' or a number >= 0")
    return v


def _read_frames(args):
    """Gain-corrected frames and pixel size; checks the frame count from the header first."""
    from ..io.movie import movie_info, open_movie  # noqa: PLC0415

    movie = Path(args.movie)
    info = movie_info(movie)  # missing / damaged files -> InputError naming the movie
    n = info["n_frames"] if info["ndim"] == 3 else 1
    if args.frames is not None and n != args.frames:
        raise InputError(
            movie,
            f"movie has {n} frames but --frames expects {args.frames}",
            "check the movie is complete, or correct the expected frame count (spa.frames in the config)",
        )
    # MRC frames are converted as the motion correction reads them (never two copies in memory)
    frames, pixel_size = open_movie(movie, gain=args.gain, gain_flip=args.gain_flip, gain_rot=args.gain_rot,
                                    pixel_size=args.pixel_size)
    if frames.shape[0] < 2:
        raise InputError(movie, f"movie has {frames.shape[0]} frame(s); motion correction needs at least 2",
                         "give the raw movie with all its frames")
    if args.frames is not None and frames.shape[0] != args.frames:  # header and data disagree
        raise InputError(movie, f"movie has {frames.shape[0]} frames but --frames expects {args.frames}",
                         "check the movie is complete, or correct the expected frame count")
    if not pixel_size:
        raise InputError(movie, "the movie header has no pixel size", "pass --pixel-size (Å/px)")
    return frames, float(pixel_size)


def star_blocks(result, movie_name: str, shape, gain_name: str | None = None) -> dict:
    """RELION-style per-micrograph motion STAR blocks (``general``, ``global_shift``, local model)."""
    n, ny, nx = (int(v) for v in shape)
    model = result.local_model
    applied = result.local_applied
    general = {
        "rlnImageSizeX": [nx],
        "rlnImageSizeY": [ny],
        "rlnImageSizeZ": [n],
        "rlnMicrographMovieName": [str(movie_name)],
    }
    if gain_name:
        general["rlnMicrographGainName"] = [str(gain_name)]
    general.update({
        "rlnMicrographBinning": [1.0],
        "rlnMicrographOriginalPixelSize": [float(result.pixel_size)],
        "rlnMicrographDoseRate": [float(result.dose_per_frame)],
        "rlnMicrographPreExposure": [float(result.pre_exposure)],
        "rlnVoltage": [float(result.voltage)],
        "rlnMicrographStartFrame": [1],
        "rlnMotionModelVersion": [MOTION_MODEL_THIRD_ORDER_POLYNOMIAL if applied else MOTION_MODEL_NULL],
    })
    blocks = {
        "general": pd.DataFrame(general),
        "global_shift": pd.DataFrame({
            "rlnMicrographFrameNumber": np.arange(1, n + 1),
            "rlnMicrographShiftX": result.shifts[:, 0],
            "rlnMicrographShiftY": result.shifts[:, 1],
        }),
    }
    if applied:
        coeffs = np.concatenate([model.coeffs[0], model.coeffs[1]])
        blocks["local_motion_model"] = pd.DataFrame({
            "rlnMotionModelCoeffsIdx": np.arange(coeffs.size),
            "rlnMotionModelCoeff": coeffs,
        })
    if model is not None:
        nf, npatch, _ = model.patch_shifts.shape
        blocks["local_shift"] = pd.DataFrame({
            "rlnMicrographFrameNumber": np.repeat(np.arange(1, nf + 1), npatch),
            "rlnCoordinateX": np.tile(model.patch_centers[:, 0], nf),
            "rlnCoordinateY": np.tile(model.patch_centers[:, 1], nf),
            "rlnMicrographShiftX": model.patch_shifts[:, :, 0].ravel(),
            "rlnMicrographShiftY": model.patch_shifts[:, :, 1].ravel(),
        })
    return blocks


def drift_figure(result, title: str, shape):
    """A matplotlib Figure (Agg canvas, no pyplot state) of the trajectory and the local model."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415

    model = result.local_model
    ncol = 2 if model is not None else 1
    fig = Figure(figsize=(5.2 * ncol, 4.8), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, ncol, 1)
    s = result.shifts
    ax.plot(s[:, 0], s[:, 1], "-", color="0.6", lw=1)
    sc = ax.scatter(s[:, 0], s[:, 1], c=np.arange(1, len(s) + 1), cmap="viridis", s=18, zorder=3)
    ax.annotate("1", (s[0, 0], s[0, 1]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    fig.colorbar(sc, ax=ax, label="frame")
    ax.set_xlabel("shift x (px)")
    ax.set_ylabel("shift y (px)")
    ax.set_aspect("equal", adjustable="datalim")
    total = float(np.sum(np.linalg.norm(np.diff(s, axis=0), axis=1))) * result.pixel_size
    ax.set_title(f"whole-frame drift: {total:.1f} Å in total", fontsize=10)
    ax.grid(alpha=0.3)
    if model is not None:
        ax2 = fig.add_subplot(1, 2, 2)
        ny, nx = shape[1], shape[2]
        fitted = model.field(model.patch_centers[:, 0], model.patch_centers[:, 1])  # [n, P, 2]
        meas = model.patch_shifts
        span = max(float(np.abs(fitted).max(initial=0.0)), float(np.nanmax(np.abs(meas), initial=0.0)), 1e-3)
        gain = 0.35 * min(nx / model.patch_centers[:, 0].size ** 0.5, ny / model.patch_centers[:, 1].size ** 0.5) / span
        for p, (cx, cy) in enumerate(model.patch_centers):
            ok = model.inliers[:, p]
            ax2.plot(cx + gain * meas[:, p, 0], cy + gain * meas[:, p, 1], ".", ms=2,
                     color="tab:blue" if ok.mean() > 0.5 else "tab:red")
            ax2.plot(cx + gain * fitted[:, p, 0], cy + gain * fitted[:, p, 1], "-", lw=1, color="k")
        ax2.set_xlim(0, nx)
        ax2.set_ylim(ny, 0)
        ax2.set_aspect("equal")
        ax2.set_xlabel("x (px)")
        ax2.set_ylabel("y (px)")
        state = "applied" if result.local_applied else f"not applied: {model.reason}"
        state = textwrap.fill(state, 60)
        ax2.set_title(f"local residual x{gain:.0f} (fit rms {model.rms:.2f} px)\n{state}", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def _run(args) -> int:
    patches = parse_patches(args.patches)
    smooth = _smooth_arg(args.smooth)
    if not (args.dose_per_frame >= 0 and math.isfinite(args.dose_per_frame)):
        raise InputError("--dose-per-frame", f"dose per frame must be >= 0 e/Å², got {args.dose_per_frame}",
                         "give the exposure per frame in e/Å²")
    if args.pre_exposure < 0:
        raise InputError("--pre-exposure", f"pre-exposure must be >= 0 e/Å², got {args.pre_exposure}",
                         "give the exposure before frame 1 in e/Å² (0 if none)")
    if args.bfactor < 0:
        raise InputError("--bfactor", f"B-factor must be >= 0 Å², got {args.bfactor}", "use e.g. 150")
    from ..spa.motion import correct_motion  # noqa: PLC0415

    t0 = time.perf_counter()
    frames, pixel_size = _read_frames(args)
    t_read = time.perf_counter() - t0
    if backend.get_device() == "gpu":
        frames = backend.asarray(frames)
    result = correct_motion(
        frames, pixel_size, args.dose_per_frame, voltage=args.voltage, patches=patches, bfactor=args.bfactor,
        pre_exposure=args.pre_exposure, binning=args.binning, group=args.group, patch_group=args.patch_group,
        smooth=smooth, max_shift=args.max_shift,
    )
    if args.dose_per_frame == 0:
        log.warning("%s: --dose-per-frame 0: the output sum is not dose-weighted", args.movie)
    shape = tuple(frames.shape)
    name = Path(args.movie).name
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(atomic_path(args.out_sum))
        write_mrc(tmp, result.dose_weighted_sum, pixel_size)
        if args.out_sum_nodw:
            tmp = stack.enter_context(atomic_path(args.out_sum_nodw))
            write_mrc(tmp, result.sum, pixel_size)
        if args.out_shifts:
            tmp = stack.enter_context(atomic_path(args.out_shifts))
            write_star(tmp, star_blocks(result, args.movie, shape, args.gain), float_format="%.8g")
        if args.out_plot:
            tmp = stack.enter_context(atomic_path(args.out_plot))
            drift_figure(result, name, shape).savefig(tmp, format="png")
    s = result.shifts
    total = float(np.sum(np.linalg.norm(np.diff(s, axis=0), axis=1)))
    local = "off"
    if result.local_model is not None:
        lm = result.local_model
        local = f"applied (fit rms {lm.rms:.2f} px)" if result.local_applied else f"not applied ({lm.reason})"
    print(f"{args.movie}: {shape[0]} frames {shape[2]}x{shape[1]} px at {pixel_size:.4g} Å/px; "
          f"drift {total:.2f} px ({total * pixel_size:.1f} Å) in total, end-to-end "
          f"({s[-1, 0]:+.2f}, {s[-1, 1]:+.2f}) px; local model {local}; "
          f"read {t_read:.1f} s, aligned and summed in {result.info['time_total']:.1f} s on {backend.describe()}")
    return 0


def register(group) -> None:
    p = group("spa").add_parser(
        "motion",
        help="motion-correct a movie: aligned dose-weighted sum, sum for CTF, shifts STAR, drift plot",
        description=(
            "Whole-frame alignment of every frame to the sum of the others (B-factor-filtered "
            "cross-correlation, sub-pixel), optional patch alignment with a smooth polynomial "
            "deformation model, and dose weighting after Grant & Grigorieff (2015). Shifts are "
            "written in px as the displacement of each frame's content relative to frame 1."
        ),
    )
    p.add_argument("movie", help="raw movie (.mrc/.mrcs/.tif/.tiff)")
    p.add_argument("--out-sum", required=True, help="aligned, dose-weighted sum (MRC)")
    p.add_argument("--out-sum-nodw", help="aligned sum without dose weighting, for CTF estimation (MRC)")
    p.add_argument("--out-shifts", help="per-frame shifts, RELION-style motion STAR")
    p.add_argument("--out-plot", help="drift plot (PNG)")
    p.add_argument("--dose-per-frame", type=float, required=True, help="exposure per frame (e/Å²)")
    p.add_argument("--pixel-size", type=float, default=None, help="Å/px (default: from the movie header)")
    p.add_argument("--voltage", type=float, default=300.0, help="acceleration voltage (kV), default 300")
    p.add_argument("--pre-exposure", type=float, default=0.0, help="exposure before frame 1 (e/Å²), default 0")
    p.add_argument("--gain", default=None, help="gain reference (MRC/TIFF) multiplied into every frame")
    p.add_argument("--gain-flip", choices=["x", "y"], default=None,
                   help="flip the gain reference: x = upside down, y = left-right (after --gain-rot)")
    p.add_argument("--gain-rot", type=int, choices=[0, 1, 2, 3], default=0,
                   help="90° turns of the gain reference, applied before the flip "
                        "(as spa.gain_rot; see conveyor.io.movie)")
    p.add_argument("--patches", default="5x5",
                   help="patches along x and y for local alignment, e.g. 5x5; 0 for whole-frame only (default 5x5)")
    p.add_argument("--bfactor", type=float, default=150.0,
                   help="low-pass of the cross-correlation in Å² (amplitudes x exp(-B k²/4)), default 150")
    p.add_argument("--frames", type=int, default=None, help="expected number of frames (another count is an error)")
    p.add_argument("--binning", type=float, default=1.0,
                   help="extra Fourier-cropping factor for the alignment only (speed on large frames), default 1")
    p.add_argument("--group", type=int, default=1, help="frames per group for whole-frame alignment, default 1")
    p.add_argument("--patch-group", type=int, default=None,
                   help="frames per group for patch alignment (default: from the dose, ~1 e/px per group)")
    p.add_argument("--smooth", default="auto",
                   help="smoothing of the whole-frame trajectory: 'auto' (cross-validated), 0 (none) or a strength")
    p.add_argument("--max-shift", type=float, default=None,
                   help="largest whole-frame shift searched (px), default a quarter of the frame")
    p.set_defaults(func=_run)
