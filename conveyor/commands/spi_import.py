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
import pandas as pd

from ..errors import InputError
from ..io.atomic import write_text

_EV = 1.602176634e-19  # J per eV


def shot_record(path) -> dict:
    """Validate one CXI file; return its summary record (raises InputError on bad input)."""
    from ..io.cxi import read_cxi

    shots = read_cxi(path)
    data = np.asarray(shots.data)
    if data.ndim != 3 or data.shape[0] == 0:
        raise InputError(f"{path}:/entry_1/data_1/data", f"expected frames [n, y, x], found shape {data.shape}", "write one 2D frame per shot")
    if not np.isfinite(data).all():
        raise InputError(f"{path}:/entry_1/data_1/data", "frames contain NaN or infinite values", "mask bad pixels with 0 in the mask instead")
    mask = np.asarray(shots.mask) if shots.mask is not None else np.ones(data.shape[1:], bool)
    good = mask.astype(bool)
    return {
        "path": str(path),
        "frames": int(data.shape[0]),
        "ny": int(data.shape[1]),
        "nx": int(data.shape[2]),
        "photon_energy_ev": float(shots.energy_J / _EV),
        "wavelength_m": float(shots.wavelength_m),
        "distance_m": float(shots.distance_m),
        "pixel_size_m": float(shots.pixel_size_m),
        "beam_center_x": float(shots.beam_center_px[0]),
        "beam_center_y": float(shots.beam_center_px[1]),
        "good_pixels": int(good.sum()),
        "mean_photons_per_frame": float(data[:, good].sum(axis=1).mean()),
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
