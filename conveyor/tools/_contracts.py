"""Writers for Conveyor's SPA file contracts, shared by the peer-tool adapters.

Whatever tool ran, the adapters hand their results to these functions so that the files
downstream rules read are identical in layout to those of the native commands:

* motion: dose-weighted and non-dose-weighted sums (MRC, pixel size in the header), a
  shifts STAR file (``data_general`` + ``data_global_shift``, optionally
  ``data_local_shift``) and a drift-plot PNG;
* CTF: a one-row ``data_micrographs`` STAR file and a diagnostic PNG;
* picking: a ``data_particles`` coordinate STAR file and an overlay PNG;
* extraction: an ``.mrcs`` stack and a ``data_optics`` + ``data_particles`` STAR file.

Shift convention (Conveyor's, see docs/developing.md): a shift ``(dx, dy)`` in px is where
the content of a frame lies relative to frame 1; the aligned frame is the frame shifted by
``-shift``. The adapters convert the tools' own conventions before calling these writers.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import starfile

from ..errors import InputError
from ..io.atomic import atomic_path
from ..io.mrc import write_mrc
from ..io.star import format_image_name, optics_table, write_star

#: Labels of the ``data_general`` block of a shifts STAR file, in RELION's order.
GENERAL_LABELS = (
    "rlnImageSizeX", "rlnImageSizeY", "rlnImageSizeZ", "rlnMicrographMovieName", "rlnMicrographBinning",
    "rlnMicrographOriginalPixelSize", "rlnMicrographDoseRate", "rlnMicrographPreExposure", "rlnVoltage",
    "rlnMicrographStartFrame", "rlnMotionModelVersion",
)
CTF_LABELS = (
    "rlnMicrographName", "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnPhaseShift", "rlnCtfFigureOfMerit",
    "rlnCtfMaxResolution", "rlnCtfAstigmatism", "rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast",
    "rlnMicrographPixelSize",
)
PICK_LABELS = ("rlnCoordinateX", "rlnCoordinateY", "rlnAutopickFigureOfMerit", "rlnMicrographName")
PARTICLE_LABELS = (
    "rlnImageName", "rlnMicrographName", "rlnCoordinateX", "rlnCoordinateY", "rlnDefocusU", "rlnDefocusV",
    "rlnDefocusAngle", "rlnPhaseShift", "rlnCtfMaxResolution", "rlnCtfFigureOfMerit", "rlnOpticsGroup",
    "rlnAutopickFigureOfMerit",
)


def _plt():
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


def _save(fig, path) -> None:
    plt = _plt()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _display_range(img: np.ndarray) -> tuple[float, float]:
    med = float(np.median(img))
    mad = float(np.median(np.abs(img - med))) * 1.4826 or float(img.std()) or 1.0
    return med - 3.5 * mad, med + 3.5 * mad


def _binned_for_display(img: np.ndarray, max_px: int = 1024) -> tuple[np.ndarray, int]:
    b = max(1, int(math.ceil(max(img.shape) / max_px)))
    if b == 1:
        return img, 1
    ny, nx = (img.shape[0] // b) * b, (img.shape[1] // b) * b
    return img[:ny, :nx].reshape(ny // b, b, nx // b, b).mean(axis=(1, 3)), b


# --------------------------------------------------------------------------- motion


def write_sums(out_sum, out_sum_nodw, dose_weighted, not_weighted, pixel_size: float) -> None:
    """Write the two aligned sums as float32 MRC images with ``pixel_size`` (Å/px) in the header."""
    for path, img in ((out_sum, dose_weighted), (out_sum_nodw, not_weighted)):
        if path is None:
            continue
        arr = np.asarray(img, dtype=np.float32)
        if arr.ndim == 3 and arr.shape[0] == 1:
            arr = arr[0]
        write_mrc(path, arr, pixel_size, volume=False)


def motion_blocks(general: dict, shifts_xy, frames=None, local_shifts: pd.DataFrame | None = None) -> dict:
    """STAR blocks of a shifts file from Conveyor-convention shifts.

    Parameters
    ----------
    general : dict
        Values for :data:`GENERAL_LABELS` (all required).
    shifts_xy : array ``[n, 2]``
        Per-frame ``(dx, dy)`` in px of the movie, Conveyor's sign, frame 1 at (0, 0).
    frames : array of int, optional
        1-based frame numbers (default 1..n).
    local_shifts : DataFrame, optional
        ``rlnMicrographFrameNumber, rlnCoordinateX, rlnCoordinateY, rlnMicrographShiftX,
        rlnMicrographShiftY`` (Conveyor's sign), written as ``data_local_shift``.
    """
    missing = [k for k in GENERAL_LABELS if k not in general]
    if missing:
        raise ValueError(f"general block lacks {missing}")
    s = np.asarray(shifts_xy, dtype=float).reshape(-1, 2)
    frames = np.arange(1, len(s) + 1) if frames is None else np.asarray(frames, dtype=int)
    gen = {k: general[k] for k in GENERAL_LABELS}
    for k in ("rlnImageSizeX", "rlnImageSizeY", "rlnImageSizeZ", "rlnMicrographStartFrame", "rlnMotionModelVersion"):
        gen[k] = int(gen[k])
    for k in ("rlnMicrographBinning", "rlnMicrographOriginalPixelSize", "rlnMicrographDoseRate",
              "rlnMicrographPreExposure", "rlnVoltage"):
        gen[k] = float(gen[k])
    gen["rlnMicrographMovieName"] = str(gen["rlnMicrographMovieName"])
    blocks = {
        "general": gen,
        "global_shift": pd.DataFrame({
            "rlnMicrographFrameNumber": frames,
            "rlnMicrographShiftX": s[:, 0],
            "rlnMicrographShiftY": s[:, 1],
        }),
    }
    if local_shifts is not None and len(local_shifts):
        blocks["local_shift"] = local_shifts.reset_index(drop=True)
    return blocks


def write_motion_star(path, blocks: dict) -> None:
    """Write :func:`motion_blocks` output atomically (``data_general`` as a simple block, as RELION does)."""
    with atomic_path(path) as tmp:
        starfile.write(blocks, tmp, float_format="%.6f", overwrite=True)


def write_drift_plot(path, shifts_xy, *, title: str = "", pixel_size: float | None = None) -> None:
    """PNG of the whole-frame trajectory (Conveyor's shifts, px), frame 1 marked."""
    plt = _plt()
    s = np.asarray(shifts_xy, dtype=float).reshape(-1, 2)
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=100)
    ax.plot(s[:, 0], s[:, 1], "-o", color="tab:blue", markersize=3, linewidth=1)
    if len(s):
        ax.plot(s[0, 0], s[0, 1], "o", color="tab:red", markersize=6, label="frame 1")
        step = max(1, len(s) // 8)
        for i in range(0, len(s), step):
            ax.annotate(str(i + 1), (s[i, 0], s[i, 1]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    total = float(np.hypot(*np.diff(s, axis=0).T).sum()) if len(s) > 1 else 0.0
    unit = f" = {total * pixel_size:.1f} Å" if pixel_size else ""
    ax.set_title(f"{title}\ntotal drift {total:.2f} px{unit}".strip(), fontsize=9)
    ax.set_xlabel("x shift (px)")
    ax.set_ylabel("y shift (px)")
    ax.set_aspect("equal", adjustable="datalim")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    _save(fig, path)


# --------------------------------------------------------------------------- CTF


def normalise_defocus(d1: float, d2: float, angle: float) -> tuple[float, float, float]:
    """``(U, V, angle)`` with ``U >= V`` and the angle of U from +x in (-90, 90] degrees."""
    u, v, a = float(d1), float(d2), float(angle)
    if v > u:
        u, v, a = v, u, a + 90.0
    a = math.fmod(a, 180.0)
    if a <= -90.0:
        a += 180.0
    elif a > 90.0:
        a -= 180.0
    return u, v, a


def ctf_row(micrograph_name, defocus_u, defocus_v, defocus_angle, *, phase_shift=0.0, fom, max_resolution,
            voltage, cs, amplitude_contrast, pixel_size) -> dict:
    """One contract row (:data:`CTF_LABELS`); defocus in Å, angles in degrees."""
    u, v, a = normalise_defocus(defocus_u, defocus_v, defocus_angle)
    return {
        "rlnMicrographName": str(micrograph_name),
        "rlnDefocusU": u,
        "rlnDefocusV": v,
        "rlnDefocusAngle": a,
        "rlnPhaseShift": float(phase_shift),
        "rlnCtfFigureOfMerit": float(fom),
        "rlnCtfMaxResolution": float(max_resolution),
        "rlnCtfAstigmatism": abs(u - v),
        "rlnVoltage": float(voltage),
        "rlnSphericalAberration": float(cs),
        "rlnAmplitudeContrast": float(amplitude_contrast),
        "rlnMicrographPixelSize": float(pixel_size),
    }


def write_ctf_star(path, row: dict) -> None:
    """Write the one-row ``data_micrographs`` CTF file."""
    write_star(path, {"micrographs": pd.DataFrame([{k: row[k] for k in CTF_LABELS}])})


def write_ctf_png(path, row: dict, *, diagnostic=None, profile: dict | None = None, title: str = "") -> None:
    """Diagnostic PNG: the tool's 2D diagnostic image (if any), its 1D profile (if any), the fitted values."""
    plt = _plt()
    panels = int(diagnostic is not None) + int(profile is not None)
    fig, axes = plt.subplots(1, max(panels, 1), figsize=(4.5 * max(panels, 1), 4.5), dpi=100, squeeze=False)
    axes = list(axes[0])
    k = 0
    if diagnostic is not None:
        img = np.asarray(diagnostic, dtype=float)
        if img.ndim == 3:
            img = img[0]
        lo, hi = _display_range(img)
        axes[k].imshow(img, cmap="gray", vmin=lo, vmax=hi, origin="lower")
        axes[k].set_title("diagnostic spectrum / fit", fontsize=9)
        axes[k].set_axis_off()
        k += 1
    if profile is not None:
        ax = axes[k]
        kk = np.asarray(profile["k"], dtype=float)
        for key, style in (("data", "-"), ("fit", "-"), ("cc", "--")):
            if key in profile and profile[key] is not None:
                ax.plot(kk, np.asarray(profile[key], dtype=float), style, linewidth=1, label=key)
        res = row.get("rlnCtfMaxResolution")
        if res and math.isfinite(res) and res > 0:
            ax.axvline(1.0 / res, color="tab:red", linewidth=0.8, label=f"fit to {res:.1f} Å")
        ax.set_xlabel("spatial frequency (1/Å)")
        ax.legend(fontsize=7)
        ax.grid(True, alpha=0.3)
        k += 1
    if panels == 0:
        axes[0].set_axis_off()
    text = (f"U {row['rlnDefocusU']:.0f} Å  V {row['rlnDefocusV']:.0f} Å  angle {row['rlnDefocusAngle']:.1f}°\n"
            f"phase {row['rlnPhaseShift']:.1f}°  FOM {row['rlnCtfFigureOfMerit']:.3f}  "
            f"max res {row['rlnCtfMaxResolution']:.1f} Å")
    fig.suptitle(f"{title}\n{text}".strip(), fontsize=9)
    fig.tight_layout()
    _save(fig, path)


# --------------------------------------------------------------------------- picking


def picks_table(x, y, fom, micrograph_name, extra: dict | None = None) -> pd.DataFrame:
    """``data_particles`` rows of a coordinate file (:data:`PICK_LABELS` plus ``extra`` columns)."""
    x = np.asarray(x, dtype=float).ravel()
    df = pd.DataFrame({
        "rlnCoordinateX": x,
        "rlnCoordinateY": np.asarray(y, dtype=float).ravel(),
        "rlnAutopickFigureOfMerit": np.asarray(fom, dtype=float).ravel(),
    })
    for key, values in (extra or {}).items():
        df[key] = np.asarray(values).ravel()
    df["rlnMicrographName"] = pd.Series([str(micrograph_name)] * len(df), dtype=object)
    return df


def write_picks_star(path, table: pd.DataFrame) -> None:
    write_star(path, {"particles": table})


def write_pick_png(path, image, x, y, radius_px: float, *, title: str = "") -> None:
    """PNG of the micrograph (binned for display) with a circle of ``radius_px`` at each pick."""
    plt = _plt()
    from matplotlib.collections import PatchCollection  # noqa: PLC0415
    from matplotlib.patches import Circle  # noqa: PLC0415

    img, b = _binned_for_display(np.asarray(image, dtype=np.float32))
    lo, hi = _display_range(img)
    ny, nx = img.shape
    scale = 8.0 / max(ny, nx)
    fig, ax = plt.subplots(figsize=(max(nx * scale, 2), max(ny * scale, 2)), dpi=max(100, int(max(ny, nx) / 8)))
    ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
    circles = [Circle((float(px) / b, float(py) / b), radius_px / b) for px, py in zip(np.ravel(x), np.ravel(y))]
    ax.add_collection(PatchCollection(circles, facecolor="none", edgecolor="lime", linewidth=0.8))
    ax.set_title(f"{title} ({len(circles)} picks)".strip(), fontsize=9)
    ax.set_axis_off()
    fig.tight_layout()
    _save(fig, path)


# --------------------------------------------------------------------------- extraction


def boxes_inside(shape, x, y, box: int) -> np.ndarray:
    """Mask of particles whose ``box``-px box (centre pixel ``round(x), round(y)``) lies inside ``shape``."""
    ny, nx = shape[-2:]
    h = int(box) // 2
    xi = np.rint(np.asarray(x, dtype=float)).astype(np.int64)
    yi = np.rint(np.asarray(y, dtype=float)).astype(np.int64)
    return (xi - h >= 0) & (yi - h >= 0) & (xi - h + int(box) <= nx) & (yi - h + int(box) <= ny)


def check_box_bin(box: int, binning: int) -> None:
    """InputError unless ``box`` is even (>= 8) and ``box / binning`` an even integer."""
    if binning < 1:
        raise InputError("--bin", f"binning must be a positive integer, got {binning}", "use 1, 2 or 4")
    if box < 8 or box % 2:
        raise InputError("--box", f"box size must be an even number of px >= 8, got {box}", "use e.g. 256")
    if box % binning or (box // binning) % 2:
        raise InputError("--box", f"box {box} px binned by {binning} does not give an even integer size",
                         f"use a box that is a multiple of {2 * binning}")


def particle_blocks(particles: pd.DataFrame, *, stack_path, micrograph_name, pixel_size: float, binning: int,
                    box: int, voltage: float, cs: float, amplitude_contrast: float,
                    image_name_width: int = 6) -> dict:
    """``{"optics", "particles"}`` blocks for an extracted stack.

    ``particles`` holds, per image in stack order, ``rlnCoordinateX/Y`` (px of the
    micrograph, unbinned), the CTF columns and ``rlnAutopickFigureOfMerit``.
    """
    out_size = int(box) // int(binning)
    optics = optics_table("opticsGroup1", pixel_size, voltage, cs, amplitude_contrast, image_size=out_size,
                          image_pixel_size=pixel_size * binning)
    optics = optics[["rlnOpticsGroupName", "rlnOpticsGroup", "rlnMicrographOriginalPixelSize", "rlnVoltage",
                     "rlnSphericalAberration", "rlnAmplitudeContrast", "rlnImagePixelSize", "rlnImageSize",
                     "rlnImageDimensionality"]]
    n = len(particles)
    stack = str(stack_path)
    table = pd.DataFrame({
        "rlnImageName": pd.Series([format_image_name(i + 1, stack, image_name_width) for i in range(n)], dtype=object),
        "rlnMicrographName": pd.Series([str(micrograph_name)] * n, dtype=object),
    })
    for label in PARTICLE_LABELS[2:]:
        if label == "rlnOpticsGroup":
            table[label] = np.ones(n, dtype=int)
        else:
            table[label] = np.asarray(particles[label], dtype=float) if n else np.zeros(0)
    return {"optics": optics, "particles": table}


def write_particles(stack_out, star_out, stack, blocks: dict, pixel_size_out: float) -> None:
    """Write the stack (``.mrcs``, ``pixel_size_out`` in the header) and its STAR file."""
    arr = np.asarray(stack, dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.shape[0] == 0:
        _write_empty_stack(stack_out, arr.shape[1:], pixel_size_out)
    else:
        write_mrc(stack_out, arr, pixel_size_out, volume=False)
    write_star(star_out, blocks)


def _write_empty_stack(path, shape, pixel_size: float) -> None:
    """A valid stack of zero images (a micrograph where no particle box fits)."""
    import mrcfile  # noqa: PLC0415

    with atomic_path(Path(path)) as tmp:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(np.zeros((0,) + tuple(shape), dtype=np.float32))
            mrc.set_image_stack()
            mrc.voxel_size = float(pixel_size)
