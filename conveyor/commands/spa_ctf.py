"""``conveyor spa ctf``: estimate the CTF of one micrograph (native, CTFFIND4-like).

Writes a RELION STAR file with a ``data_micrographs`` block of one row (rlnMicrographName,
rlnDefocusU/V in Å, rlnDefocusAngle in degrees, rlnPhaseShift, rlnCtfFigureOfMerit,
rlnCtfMaxResolution in Å, rlnCtfAstigmatism, rlnVoltage, rlnSphericalAberration,
rlnAmplitudeContrast, rlnMicrographPixelSize) and a diagnostic PNG (optionally MRC).
All outputs are written atomically; bad input exits with status 2 and writes nothing.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from .. import backend
from ..errors import InputError
from ..io.mrc import read_mrc
from ..io.star import write_star
from .._lazy import lazy_module

pd = lazy_module("pandas")

log = logging.getLogger(__name__)


def _load_micrograph(path):
    data, header_pixel_size = read_mrc(path)
    if data.ndim == 3:
        if data.shape[0] == 1:
            data = data[0]
        else:
            log.info("%s holds %d frames; estimating the CTF of their sum", path, data.shape[0])
            data = data.sum(axis=0, dtype=np.float32)
    if data.ndim != 2:
        raise InputError(path, f"expected a 2D micrograph, got shape {data.shape}", "pass a micrograph (MRC)")
    return data, header_pixel_size


def _ctf(args) -> int:
    from ..spa.ctf import estimate_ctf, write_ctf_diagnostic  # noqa: PLC0415

    path = Path(args.micrograph)
    data, header_pixel_size = _load_micrograph(path)
    pixel_size = args.pixel_size if args.pixel_size else header_pixel_size
    if not pixel_size or pixel_size <= 0:
        raise InputError(path, "the MRC header has no pixel size", "pass --pixel-size in Å/px")
    t0 = time.perf_counter()
    result = estimate_ctf(
        backend.asarray(data),
        pixel_size,
        voltage=args.voltage,
        cs=args.cs,
        amplitude_contrast=args.amplitude_contrast,
        defocus_range=(args.defocus_min, args.defocus_max),
        res_range=(args.res_min, args.res_max),
        tile=args.tile,
        phase_shift=args.phase_shift,
        defocus_step=args.defocus_step,
        max_astigmatism=args.max_astigmatism,
    )
    log.info("CTF of %s in %.2f s on %s", path, time.perf_counter() - t0, backend.describe())
    name = args.micrograph_name or str(args.micrograph)
    # Diagnostics first, STAR last: the STAR file is the step's completion marker.
    if args.out_diag:
        write_ctf_diagnostic(result, args.out_diag, mrc_path=args.out_diag_mrc, title=path.name)
    elif args.out_diag_mrc:
        from ..io.mrc import write_mrc  # noqa: PLC0415
        from ..spa.ctf import ctf_diagnostic_image  # noqa: PLC0415

        write_mrc(args.out_diag_mrc, ctf_diagnostic_image(result), result.pixel_size)
    write_star(args.out_star, {"micrographs": pd.DataFrame([result.star_row(name)])})
    print(
        f"{args.out_star}: U {result.defocus_u:.0f} Å, V {result.defocus_v:.0f} Å, angle {result.defocus_angle:.1f}°, "
        f"phase {result.phase_shift:.1f}°, FOM {result.fom:.3f}, fit resolution {result.max_resolution:.2f} Å"
    )
    return 0


def register(group) -> None:
    p = group("spa").add_parser(
        "ctf",
        help="estimate defocus, astigmatism (and phase shift) of a micrograph",
        description="CTF estimation from the averaged tile power spectrum (CTFFIND4-like): exhaustive "
        "defocus/astigmatism search then local refinement. Defocus in Å (positive = underfocus), "
        "U >= V, angle in degrees in (-90, 90] from +x (RELION convention).",
    )
    p.add_argument("micrograph", help="micrograph MRC (non-dose-weighted sum; a frame stack is summed)")
    p.add_argument("--out-star", required=True, help="output STAR file (data_micrographs, one row)")
    p.add_argument("--out-diag", help="diagnostic PNG (spectrum half data / half fit, 1D profile)")
    p.add_argument("--out-diag-mrc", help="diagnostic 2D image as MRC")
    p.add_argument("--micrograph-name", help="rlnMicrographName to write (default: the path as given)")
    p.add_argument("--pixel-size", type=float, default=None, help="Å/px (default: from the MRC header)")
    p.add_argument("--voltage", type=float, default=300.0, help="kV (default 300)")
    p.add_argument("--cs", type=float, default=2.7, help="spherical aberration, mm (default 2.7)")
    p.add_argument("--amplitude-contrast", type=float, default=0.1, help="fraction (default 0.1)")
    p.add_argument("--defocus-min", type=float, default=5000.0, help="Å (default 5000)")
    p.add_argument("--defocus-max", type=float, default=50000.0, help="Å (default 50000)")
    p.add_argument("--defocus-step", type=float, default=None, help="Å, step of the 1D search (default: automatic, <= 500)")
    p.add_argument("--max-astigmatism", type=float, default=3000.0, help="largest |U-V| of the grid search, Å (default 3000)")
    p.add_argument("--res-min", type=float, default=30.0, help="low-resolution limit of the fit, Å (default 30)")
    p.add_argument("--res-max", type=float, default=5.0, help="high-resolution limit of the fit, Å (default 5; clipped to Nyquist)")
    p.add_argument("--tile", type=int, default=512, help="tile size of the power spectrum, px (default 512)")
    p.add_argument("--phase-shift", action="store_true", help="also fit a phase shift (phase plate)")
    p.set_defaults(func=_ctf)
