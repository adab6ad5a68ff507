"""RELION 3.1+ STAR files (via the ``starfile`` package) with Conveyor's conventions.

A STAR file is read as a dict ``{block_name: pandas.DataFrame}`` where the block name
has no ``data_`` prefix (``"optics"``, ``"particles"``, ``"micrographs"``, ...) and
columns are label names without the leading underscore (``"rlnDefocusU"``).
Simple (non-loop) blocks come back as one-row DataFrames.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import starfile

from ..errors import InputError
from .atomic import atomic_path


def read_star(path) -> dict[str, pd.DataFrame]:
    """Read every data block of a STAR file into ``{name: DataFrame}``."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "STAR file does not exist", "check the path, or re-run the step that writes it")
    try:
        blocks = starfile.read(path, always_dict=True)
    except Exception as exc:  # starfile raises many kinds on malformed input
        raise InputError(path, f"not a readable STAR file ({exc.__class__.__name__}: {exc})", "check the file is a RELION STAR file") from None
    out = {}
    for name, block in blocks.items():
        if isinstance(block, dict):
            block = pd.DataFrame([block])
        out[name] = block
    return out


def write_star(path, blocks: dict[str, pd.DataFrame], *, float_format: str = "%.6f") -> None:
    """Write ``{name: DataFrame}`` as a STAR file atomically (loops for every block)."""
    path = Path(path)
    clean = {}
    for name, df in blocks.items():
        if not isinstance(df, pd.DataFrame):
            df = pd.DataFrame(df)
        clean[name] = df
    with atomic_path(path) as tmp:
        starfile.write(clean, tmp, float_format=float_format, overwrite=True)
