"""The per-frame table of the SPI pre-processing steps (one HDF5 file per shot file).

Every step (``conveyor spi hits|center|size|filter``) reads the table of the previous
step, adds its columns and writes a new table. The layout is deliberately flat::

    /frames                 group; attrs: source CXI, run name, thresholds, ...
    /frames/frame           int64   frame index in the source CXI (0-based)
    /frames/photons         float64 photons inside the mask (hit-finding region)
    /frames/lit_pixels      int64   pixels with >= 1 photon in the same region
    /frames/hit_score       float64 (photons - background mode) / background sigma
    /frames/is_hit          bool
    /frames/center_x        float64 beam centre, px (column index, pixel centres at integers)
    /frames/center_y        float64 beam centre, px (row index)
    /frames/diameter_nm     float64 sphere-equivalent diameter, nm (NaN: not sized)
    /frames/size_score      float64 fit confidence (second-best / best local misfit)
    /frames/passed          bool    kept by ``conveyor spi filter``

``conveyor spi size`` also writes ``size_misfit``, ``size_scale``, ``size_background``
and ``multi_score`` (:mod:`conveyor.spi.size`). Any further 1D column is stored the same
way; all columns have one row per frame.
Attributes are scalars, strings or short 1D numeric lists; anything else is stored as
JSON text.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from ..errors import InputError
from ..io.atomic import atomic_path

GROUP = "frames"

#: Known columns and their dtypes, in table order (others follow in given order).
COLUMNS = {
    "frame": np.int64,
    "photons": np.float64,
    "lit_pixels": np.int64,
    "hit_score": np.float64,
    "is_hit": np.bool_,
    "center_x": np.float64,
    "center_y": np.float64,
    "diameter_nm": np.float64,
    "size_score": np.float64,
    "passed": np.bool_,
}


def _attr_value(value):
    """Convert ``value`` into something h5py stores as an attribute."""
    if value is None:
        return "null"
    if isinstance(value, (str, bytes, bool, int, float, np.integer, np.floating, np.bool_)):
        return value
    if isinstance(value, Path):
        return str(value)
    arr = np.asarray(value)
    if arr.ndim == 1 and arr.dtype.kind in "biuf":
        return arr
    return json.dumps(value, default=str)


def _attr_read(value):
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def write_frames(path, df: pd.DataFrame, attrs: dict | None = None) -> Path:
    """Write the per-frame table ``df`` to ``path`` (HDF5, group ``/frames``), atomically.

    Parameters
    ----------
    path : str or Path
        Output ``.h5`` file; replaced only when writing succeeded.
    df : pandas.DataFrame
        One row per frame; must have a ``frame`` column. Every column must be 1D numeric
        or boolean.
    attrs : dict, optional
        Provenance and thresholds stored as attributes of ``/frames`` (merged over
        ``df.attrs``).

    Returns
    -------
    Path
        ``path``.
    """
    path = Path(path)
    if "frame" not in df.columns:
        raise InputError(path, "the per-frame table has no 'frame' column", "add the frame index column")
    merged = dict(getattr(df, "attrs", {}) or {})
    merged.update(attrs or {})
    order = [c for c in COLUMNS if c in df.columns] + [c for c in df.columns if c not in COLUMNS]
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            g = f.create_group(GROUP)
            for col in order:
                values = np.asarray(df[col].to_numpy())
                if col in COLUMNS:
                    values = values.astype(COLUMNS[col])
                elif values.dtype.kind not in "biuf":
                    raise InputError(path, f"column {col!r} is not numeric ({values.dtype})",
                                     "store only numeric or boolean per-frame columns")
                g.create_dataset(col, data=values)
            g.attrs["columns"] = json.dumps(order)
            g.attrs["n_frames"] = len(df)
            for key, value in merged.items():
                g.attrs[str(key)] = _attr_value(value)
    return path


def read_frames(path) -> pd.DataFrame:
    """Read a per-frame table written by :func:`write_frames`.

    Returns
    -------
    pandas.DataFrame
        One row per frame, columns in stored order; ``df.attrs`` holds the attributes of
        ``/frames`` (JSON texts are decoded).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "per-frame table not found", "run the previous 'conveyor spi' step first")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise InputError(path, f"not a readable HDF5 file ({exc})", "re-run the step that wrote it") from None
    with f:
        if GROUP not in f:
            raise InputError(path, "no /frames group", "give a table written by 'conveyor spi hits|center|size|filter'")
        g = f[GROUP]
        attrs = {k: _attr_read(v) for k, v in g.attrs.items()}
        order = json.loads(attrs.pop("columns", "[]")) or list(g.keys())
        order = [c for c in order if c in g] + [c for c in g.keys() if c not in order]
        data = {c: g[c][()] for c in order}
    lengths = {len(v) for v in data.values()}
    if len(lengths) > 1:
        raise InputError(path, "per-frame columns have different lengths", "re-run the step that wrote it")
    df = pd.DataFrame(data)
    for key, value in list(attrs.items()):
        if isinstance(value, str) and value[:1] in "[{" or value == "null":
            try:
                attrs[key] = json.loads(value)
            except (ValueError, TypeError):
                pass
    df.attrs = attrs
    return df
