"""``conveyor spi validate-shots`` and ``conveyor spi shots-table``: check CXI shot files and list them.

``validate-shots`` opens a CXI file, checks the frame data, mask and geometry (SI units)
and writes a JSON record (frames, detector shape, photon energy in eV, wavelength in m,
distance in m, pixel size in m, beam centre in px, mean photons per frame);
``shots-table`` merges the records into one CSV, one row per file.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..io.atomic import write_text
from .._lazy import lazy_module

pd = lazy_module("pandas")

_EV = 1.602176634e-19  # J per eV


def shot_record(path, chunk: int = 256) -> dict:
    """Validate one CXI file; return its summary record (raises InputError on bad input).

    Frames are read in blocks of ``chunk`` so files of any size fit in memory.
    """
    from ..io.cxi import iter_frames, read_cxi

    shots = read_cxi(path, lazy=True, load_extra=False)
    shots.require_geometry()
    n, ny, nx = shots.data.shape
    if n == 0:
        raise InputError(f"{path}:/entry_1/data_1/data", "the file holds no frames", "remove it from the shots glob")
    good = np.asarray(shots.mask, bool) if shots.mask is not None else np.ones((ny, nx), bool)
    total = 0.0
    for start, block in iter_frames(path, chunk):
        block = np.asarray(block)
        if not np.isfinite(block).all():
            bad = start + int(np.flatnonzero(~np.isfinite(block).reshape(len(block), -1).all(axis=1))[0])
            raise InputError(f"{path}:/entry_1/data_1/data", f"frame {bad} contains NaN or infinite values",
                             "mask bad pixels (mask 0) instead of writing NaN")
        total += float(block[:, good].sum())
    return {
        "path": str(path),
        "frames": int(n),
        "ny": int(ny),
        "nx": int(nx),
        "photon_energy_ev": float(shots.energy_J / _EV),
        "wavelength_m": float(shots.wavelength_m),
        "distance_m": float(shots.distance_m),
        "pixel_size_m": float(shots.pixel_size_m),
        "beam_center_x": float(shots.beam_center_px[0]),
        "beam_center_y": float(shots.beam_center_px[1]),
        "good_pixels": int(good.sum()),
        "mean_photons_per_frame": total / n,
    }


def _validate(args) -> int:
    rec = shot_record(args.cxi)
    write_text(args.out, json.dumps(rec, indent=2) + "\n")
    print(f"{args.cxi}: {rec['frames']} frames {rec['ny']}x{rec['nx']}, {rec['photon_energy_ev']:.0f} eV, "
          f"{rec['distance_m']:.3f} m, mean {rec['mean_photons_per_frame']:.0f} photons/frame")
    return 0


def _table(args) -> int:
    rows = []
    for p in args.records:
        try:
            rows.append(json.loads(Path(p).read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(p, f"not a readable shot record ({exc})", "re-run the validation step for this file") from None
    if not rows:
        raise InputError("spi.shots", "no shot file was validated", "check the shots glob in the config")
    df = pd.DataFrame(rows)
    geo = df[["nx", "ny", "photon_energy_ev", "distance_m", "pixel_size_m"]]
    if len(geo.drop_duplicates()) > 1:
        print("warning: shot files differ in detector geometry or photon energy; later steps treat them per file")
    from ..io.atomic import atomic_path

    with atomic_path(args.out) as tmp:
        df.to_csv(tmp, index=False)
    print(f"{args.out}: {len(df)} files, {int(df['frames'].sum())} frames")
    return 0


def register(group) -> None:
    p = group("spi").add_parser("validate-shots", help="check one CXI file and write its summary record (JSON)")
    p.add_argument("cxi")
    p.add_argument("--out", required=True, help="output JSON record")
    p.set_defaults(func=_validate)
    p = group("spi").add_parser("shots-table", help="merge shot-file records into one CSV")
    p.add_argument("records", nargs="+")
    p.add_argument("--out", required=True, help="output CSV")
    p.set_defaults(func=_table)
