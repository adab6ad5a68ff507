"""RELION 3.1+ STAR files (via the ``starfile`` package) with Conveyor's conventions.

A STAR file is read as a dict ``{block_name: pandas.DataFrame}`` where the block name
has no ``data_`` prefix (``"optics"``, ``"particles"``, ``"micrographs"``, ...) and
columns are label names without the leading underscore (``"rlnDefocusU"``).
Simple (non-loop) blocks come back as one-row DataFrames. A RELION 3.0 file whose
single block is called just ``data_`` comes back under the name ``""``.

Conventions (those of RELION 3.1 and later)
-------------------------------------------
* Optics groups: per-acquisition parameters live in the ``data_optics`` block, one row
  per group, numbered by the 1-based integer ``rlnOpticsGroup``; every row of the
  ``particles``/``micrographs``/``movies`` block names its group in ``rlnOpticsGroup``.
  :func:`join_optics` copies the group's columns onto each row.
* Units: pixel sizes in Å/px (``rlnMicrographOriginalPixelSize`` of the movies,
  ``rlnMicrographPixelSize`` of the motion-corrected micrographs, ``rlnImagePixelSize``
  of extracted particles), voltage in kV (``rlnVoltage``), spherical aberration in mm
  (``rlnSphericalAberration``), amplitude contrast as a fraction
  (``rlnAmplitudeContrast``), defocus in Å, angles in degrees, particle coordinates
  (``rlnCoordinateX/Y``) in pixels of the micrograph, origins (``rlnOriginXAngst/YAngst``)
  in Å.
* Origins: RELION's origin is the shift that re-centres the particle: the particle
  centre lies at ``rlnCoordinateX - rlnOriginXAngst / pixel_size`` (likewise for y) in the
  micrograph, i.e. at ``-origin`` from the box centre. In Conveyor's shift convention
  (a shift is where the content lies relative to the reference) the particle's shift is
  therefore ``-origin``. :func:`origins_px` and :func:`with_origins_px` convert between
  the Å columns and pixels without changing the sign.
* Image names: ``<index>@<stack>`` with a 1-based index, zero-padded to 6 digits by
  RELION up to 4.0 and to 8 digits by RELION 5 (:func:`parse_image_name`,
  :func:`format_image_name`).
* RELION 3.0 files (no ``data_optics``) are converted on reading by
  :func:`read_particles` / :func:`read_micrographs`, as RELION 3.1 does.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from .._lazy import lazy_module
from ..errors import InputError
from .atomic import atomic_path

pd = lazy_module("pandas")
starfile = lazy_module("starfile")

#: Optics columns that are per row in RELION 3.0 files and per group in 3.1+.
_LEGACY_OPTICS_LABELS = ("rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast")

_IMAGE_NAME_RE = re.compile(r"^\s*(\d+)@(\S(?:.*\S)?)\s*$")
_TOKEN_RE = re.compile(r"""'[^']*'|"[^"]*"|\S+""")


# --------------------------------------------------------------------------- read/write


def read_star(path) -> dict[str, pd.DataFrame]:
    """Read every data block of a STAR file into ``{name: DataFrame}``.

    Raises :class:`InputError` (naming the file) when it does not exist, cannot be
    parsed, holds no data block, or has a loop row with fewer values than labels (a
    truncated or hand-edited file).
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "STAR file does not exist", "check the path, or re-run the step that writes it")
    if path.is_dir():
        raise InputError(path, "is a directory, not a STAR file", "give the path of a .star file")
    try:
        blocks = starfile.read(path, always_dict=True)
    except Exception as exc:  # starfile raises many kinds on malformed input
        raise InputError(
            path,
            f"not a readable STAR file ({exc.__class__.__name__}: {exc})",
            "check the file is a RELION STAR file",
        ) from None
    if not blocks:
        raise InputError(
            path,
            "no data blocks found (empty, truncated or not a STAR file)",
            "check the file is a RELION STAR file, or re-run the step that writes it",
        )
    out = {}
    for name, block in blocks.items():
        if isinstance(block, dict):
            block = pd.DataFrame([block])
        out[name] = block
    if any(df.isna().to_numpy().any() for df in out.values() if len(df)):
        _check_loop_rows(path)
    return out


def _check_loop_rows(path: Path) -> None:
    """Raise InputError at the first loop row whose value count differs from the label count.

    Only called when the parsed tables hold NaN: a short row is read as trailing NaNs,
    while a literal ``nan`` value is legitimate.
    """
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        raise InputError(path, f"cannot read STAR file ({exc})", "check permissions") from None
    block = None
    n_labels = 0
    in_loop = False
    for lineno, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("data_"):
            block, n_labels, in_loop = line[5:], 0, False
            continue
        if line.startswith("loop_"):
            in_loop, n_labels = True, 0
            continue
        if line.startswith("_"):
            if in_loop:
                n_labels += 1
            continue
        if in_loop and n_labels:
            n_values = len(_TOKEN_RE.findall(line))
            if n_values != n_labels:
                raise InputError(
                    path,
                    f"line {lineno} of block data_{block} has {n_values} values for {n_labels} labels "
                    "(truncated or damaged file)",
                    "re-run the step that writes it, or repair the line",
                )


def write_star(path, blocks: dict[str, pd.DataFrame], *, float_format: str = "%.6f") -> None:
    """Write ``{name: DataFrame}`` as a STAR file atomically (loops for every block).

    Block names are written as ``data_<name>``; columns are the labels without the
    leading underscore. Floats are written with ``float_format``.
    """
    path = Path(path)
    clean = {}
    for name, df in blocks.items():
        if not isinstance(df, pd.DataFrame):
            df = pd.DataFrame(df)
        if any(not isinstance(c, str) or not c or any(ch.isspace() for ch in c) for c in df.columns):
            raise InputError(
                path,
                f"block {name!r} has invalid column labels {list(df.columns)!r}",
                "labels must be non-empty strings without spaces, e.g. rlnImageName",
            )
        clean[name] = df
    with atomic_path(path) as tmp:
        starfile.write(clean, tmp, float_format=float_format, overwrite=True)


def require_columns(table: pd.DataFrame, labels, source=None, *, block: str = "") -> None:
    """Raise :class:`InputError` naming ``source`` if ``table`` lacks any of ``labels``."""
    missing = [lab for lab in labels if lab not in table.columns]
    if missing:
        where = f"block data_{block} " if block else ""
        raise InputError(
            source,
            f"{where}lacks column(s) {', '.join(missing)}",
            "re-run the step that writes this file, or add the column(s)",
        )


# --------------------------------------------------------------------------- image names


def parse_image_name(name: str, source=None) -> tuple[int, str]:
    """Split a RELION image name into ``(index, stack_path)``.

    ``"000012@Extract/a.mrcs" -> (12, "Extract/a.mrcs")``. The index is 1-based as in
    RELION; any zero padding is accepted (6 digits up to RELION 4, 8 in RELION 5).
    ``source`` (the STAR file) is named in the :class:`InputError` raised for a malformed
    name or an index below 1.
    """
    m = _IMAGE_NAME_RE.match(str(name)) if isinstance(name, str) else None
    if m is None:
        raise InputError(
            source,
            f"malformed image name {name!r}",
            "expected <index>@<stack path> with a 1-based index, e.g. 000001@Extract/job001/mic1.mrcs",
        )
    index = int(m.group(1))
    if index < 1:
        raise InputError(
            source,
            f"image name {name!r} has index 0; RELION image indices start at 1",
            "re-run extraction, or renumber the images from 1",
        )
    return index, m.group(2)


def parse_image_names(names, source=None) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised :func:`parse_image_name`: ``(indices int64 [n], stack paths object [n])``."""
    s = pd.Series(names, dtype=object)
    parts = s.astype(str).str.extract(_IMAGE_NAME_RE)
    bad = parts[0].isna() | s.isna()
    if bad.any():
        parse_image_name(s[bad].iloc[0], source)  # raises with the first bad name
    idx = parts[0].astype(np.int64).to_numpy()
    if (idx < 1).any():
        parse_image_name(s[idx < 1].iloc[0], source)
    return idx, parts[1].to_numpy(dtype=object)


def format_image_name(index: int, path, width: int = 6) -> str:
    """``format_image_name(12, "Extract/a.mrcs") -> "000012@Extract/a.mrcs"`` (1-based index).

    ``width`` is the zero padding (6 as RELION up to 4.0, 8 as RELION 5); larger indices
    simply use more digits.
    """
    index = int(index)
    if index < 1:
        raise ValueError(f"RELION image indices start at 1, got {index}")
    return f"{index:0{int(width)}d}@{Path(path).as_posix() if not isinstance(path, str) else path}"


# --------------------------------------------------------------------------- optics


def _positive(value, what: str, group: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = math.nan
    if not (math.isfinite(v) and v > 0):
        raise InputError(None, f"optics group {group!r}: {what} must be a positive number, got {value!r}",
                         "check the microscope parameters in the config")
    return v


def optics_table(
    group_name: str,
    pixel_size: float,
    voltage: float,
    cs: float,
    amplitude_contrast: float,
    image_size: int | None = None,
    image_pixel_size: float | None = None,
    *,
    micrograph_pixel_size: float | None = None,
    optics_group: int = 1,
    image_dimensionality: int = 2,
    extra: dict | None = None,
) -> pd.DataFrame:
    """One-row ``data_optics`` table with RELION 3.1+ labels.

    Parameters
    ----------
    group_name : str
        ``rlnOpticsGroupName`` (RELION uses ``opticsGroup1``, ...).
    pixel_size : float
        Pixel size of the raw movies, Å/px (``rlnMicrographOriginalPixelSize``).
    voltage : float
        Acceleration voltage, kV (``rlnVoltage``).
    cs : float
        Spherical aberration, mm (``rlnSphericalAberration``; 0 allowed).
    amplitude_contrast : float
        Fraction in [0, 1) (``rlnAmplitudeContrast``).
    image_size : int, optional
        Box size of extracted particles, px. When given, the table is a particle optics
        table with ``rlnImageSize``, ``rlnImagePixelSize`` and ``rlnImageDimensionality``.
    image_pixel_size : float, optional
        Å/px of the extracted particles (``rlnImagePixelSize``); default: the micrograph
        pixel size, else ``pixel_size``.
    micrograph_pixel_size : float, optional
        Å/px of the motion-corrected micrographs (``rlnMicrographPixelSize``); written when
        given (micrograph and particle tables), omitted for movie tables.
    optics_group : int
        The 1-based ``rlnOpticsGroup`` number.
    image_dimensionality : int
        ``rlnImageDimensionality`` (2 for single-particle images).
    extra : dict, optional
        More RELION labels for this group (e.g. ``{"rlnMtfFileName": "mtf.star"}``).

    Several groups: ``pd.concat([optics_table(...), optics_table(..., optics_group=2)])``.
    """
    name = str(group_name)
    if not name or any(ch.isspace() for ch in name):
        raise InputError(None, f"optics group name {group_name!r} must be non-empty without spaces",
                         "use a name like opticsGroup1")
    group = int(optics_group)
    if group < 1:
        raise InputError(None, f"optics group number must be >= 1, got {optics_group}", "number groups from 1")
    row = {
        "rlnOpticsGroupName": name,
        "rlnOpticsGroup": group,
        "rlnMicrographOriginalPixelSize": _positive(pixel_size, "pixel size (Å/px)", name),
        "rlnVoltage": _positive(voltage, "voltage (kV)", name),
    }
    cs_v = float(cs)
    if not (math.isfinite(cs_v) and cs_v >= 0):
        raise InputError(None, f"optics group {name!r}: spherical aberration must be >= 0 mm, got {cs!r}",
                         "check the microscope parameters in the config")
    ac = float(amplitude_contrast)
    if not (math.isfinite(ac) and 0 <= ac < 1):
        raise InputError(None, f"optics group {name!r}: amplitude contrast must be a fraction in [0, 1), got {amplitude_contrast!r}",
                         "use e.g. 0.07-0.1 for cryo samples")
    row["rlnSphericalAberration"] = cs_v
    row["rlnAmplitudeContrast"] = ac
    if micrograph_pixel_size is not None:
        row["rlnMicrographPixelSize"] = _positive(micrograph_pixel_size, "micrograph pixel size (Å/px)", name)
    if image_size is not None:
        size = int(image_size)
        if size < 1 or size != image_size:
            raise InputError(None, f"optics group {name!r}: image size must be a positive integer, got {image_size!r}",
                             "use the particle box size in pixels")
        ips = image_pixel_size if image_pixel_size is not None else row.get(
            "rlnMicrographPixelSize", row["rlnMicrographOriginalPixelSize"])
        row["rlnImagePixelSize"] = _positive(ips, "image pixel size (Å/px)", name)
        row["rlnImageSize"] = size
        row["rlnImageDimensionality"] = int(image_dimensionality)
    elif image_pixel_size is not None:
        row["rlnImagePixelSize"] = _positive(image_pixel_size, "image pixel size (Å/px)", name)
    if extra:
        row.update(extra)
    return pd.DataFrame([row])


def join_optics(table: pd.DataFrame, optics: pd.DataFrame, source=None) -> pd.DataFrame:
    """``table`` with its optics group's columns copied onto every row.

    Rows are matched through the 1-based ``rlnOpticsGroup``; a table without that column
    is taken to be all group 1 when ``optics`` has exactly one row. Columns already in
    ``table`` are kept as they are (a per-row value overrides the group's). Row order and
    index are preserved. An unknown group number raises :class:`InputError` naming
    ``source``.
    """
    if len(optics) == 0:
        raise InputError(source, "the optics table is empty", "add a data_optics block with one row per optics group")
    opt = optics.copy()
    if "rlnOpticsGroup" not in opt.columns:
        if len(opt) != 1:
            raise InputError(source, "data_optics has several rows but no rlnOpticsGroup column",
                             "number the optics groups 1, 2, ... in rlnOpticsGroup")
        opt["rlnOpticsGroup"] = 1
    try:
        opt_groups = opt["rlnOpticsGroup"].astype(np.int64)
    except (TypeError, ValueError):
        raise InputError(source, "data_optics has non-integer rlnOpticsGroup values",
                         "number the optics groups 1, 2, ...") from None
    if opt_groups.duplicated().any():
        dup = int(opt_groups[opt_groups.duplicated()].iloc[0])
        raise InputError(source, f"optics group {dup} appears more than once in data_optics",
                         "give every optics group its own number")
    opt.index = opt_groups.to_numpy()
    out = table.copy()
    if "rlnOpticsGroup" in out.columns:
        try:
            groups = out["rlnOpticsGroup"].astype(np.int64).to_numpy()
        except (TypeError, ValueError):
            raise InputError(source, "rlnOpticsGroup has missing or non-integer values",
                             "every row must name its 1-based optics group") from None
    else:
        if len(opt) != 1:
            raise InputError(source, "the table has no rlnOpticsGroup column but there are several optics groups",
                             "add rlnOpticsGroup to every row")
        groups = np.full(len(out), int(opt.index[0]), dtype=np.int64)
    unknown = sorted(set(np.unique(groups).tolist()) - set(opt.index.tolist()))
    if unknown:
        raise InputError(source, f"rows refer to optics group(s) {unknown} missing from data_optics "
                         f"(it has {sorted(opt.index.tolist())})", "add the group(s) to data_optics or fix rlnOpticsGroup")
    for col in opt.columns:
        if col == "rlnOpticsGroup" or col in out.columns:
            continue
        out[col] = opt[col].reindex(groups).to_numpy()
    return out


def _legacy_optics(table: pd.DataFrame, path: Path, kind: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Convert a RELION 3.0 table (optics per row) into (table, optics) as RELION 3.1 does."""
    if not {"rlnDetectorPixelSize", "rlnMagnification"} <= set(table.columns):
        raise InputError(
            path,
            "RELION 3.0-style STAR file without data_optics, and without rlnDetectorPixelSize/rlnMagnification "
            "to derive the pixel size",
            "re-run the step with RELION 3.1 or later, or add a data_optics block (optics_table)",
        )
    det = pd.to_numeric(table["rlnDetectorPixelSize"], errors="coerce").to_numpy(float)  # µm
    mag = pd.to_numeric(table["rlnMagnification"], errors="coerce").to_numpy(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        apix = det * 1e4 / mag
    if not (np.isfinite(apix).all() and (apix > 0).all()):
        raise InputError(path, "rlnDetectorPixelSize/rlnMagnification give no positive pixel size on every row",
                         "fix those columns, or re-run the step with RELION 3.1 or later")
    apix = np.round(apix, 6)
    keys = pd.DataFrame({"_apix": apix}, index=table.index)
    present = [lab for lab in _LEGACY_OPTICS_LABELS if lab in table.columns]
    for lab in present:
        keys[lab] = pd.to_numeric(table[lab], errors="coerce")
    combos = keys.drop_duplicates().reset_index(drop=True)
    rows = []
    group_of = np.zeros(len(table), dtype=np.int64)
    for g, combo in combos.iterrows():
        mask = (keys == combo).all(axis=1).to_numpy()
        group_of[mask] = g + 1
        row = {"rlnOpticsGroupName": f"opticsGroup{g + 1}", "rlnOpticsGroup": g + 1,
               "rlnMicrographOriginalPixelSize": float(combo["_apix"])}
        for lab in present:
            row[lab] = float(combo[lab])
        if kind == "micrographs":
            row["rlnMicrographPixelSize"] = float(combo["_apix"])
        else:
            row["rlnImagePixelSize"] = float(combo["_apix"])
            row["rlnImageDimensionality"] = 2
        rows.append(row)
    optics = pd.DataFrame(rows)
    out = table.drop(columns=["rlnDetectorPixelSize", "rlnMagnification", *present])
    for axis in ("X", "Y", "Z"):
        old = f"rlnOrigin{axis}"
        if old in out.columns:
            out[f"rlnOrigin{axis}Angst"] = pd.to_numeric(out[old], errors="coerce").to_numpy(float) * apix
            out = out.drop(columns=[old])
    out["rlnOpticsGroup"] = group_of
    return out, optics


def _read_with_optics(path, kind: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    path = Path(path)
    blocks = read_star(path)
    if "optics" in blocks:
        if kind not in blocks:
            raise InputError(path, f"has data_optics but no data_{kind} block (blocks: "
                             f"{', '.join('data_' + b for b in blocks)})",
                             f"give the {kind} STAR file")
        table, optics = blocks[kind], blocks["optics"]
        require_columns(optics, ["rlnOpticsGroup"], path, block="optics")
        if "rlnOpticsGroup" not in table.columns:
            if len(optics) != 1:
                raise InputError(path, f"data_{kind} lacks rlnOpticsGroup and there are several optics groups",
                                 "add rlnOpticsGroup to every row")
            table = table.copy()
            table["rlnOpticsGroup"] = int(optics["rlnOpticsGroup"].iloc[0])
        join_optics(table[["rlnOpticsGroup"]], optics, path)  # raises on unknown groups
        return table, optics
    # RELION 3.0: a single block with optics per row
    if len(blocks) == 1:
        table = next(iter(blocks.values()))
    elif kind in blocks:
        table = blocks[kind]
    else:
        raise InputError(path, f"no data_optics and no data_{kind} block (blocks: "
                         f"{', '.join('data_' + b for b in blocks)})",
                         f"give the {kind} STAR file written by RELION 3.1 or later")
    return _legacy_optics(table, path, kind)


def read_particles(path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read a particles STAR file: ``(particles, optics)``.

    RELION 3.1+ files: the ``data_particles`` and ``data_optics`` blocks, checked to agree
    on ``rlnOpticsGroup``. RELION 3.0 files (one block, optics per row) are converted as
    RELION 3.1 does: the pixel size is ``rlnDetectorPixelSize`` (µm) × 10⁴ /
    ``rlnMagnification``; each distinct (pixel size, voltage, Cs, amplitude contrast)
    becomes an optics group; ``rlnOriginX/Y`` (px) become ``rlnOriginX/YAngst`` (Å).
    ``rlnImageSize`` is not known for such files and is left out of the optics table. A
    3.0 file without those columns raises :class:`InputError`.
    """
    return _read_with_optics(path, "particles")


def read_micrographs(path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read a micrographs STAR file: ``(micrographs, optics)``; see :func:`read_particles`."""
    return _read_with_optics(path, "micrographs")


# --------------------------------------------------------------------------- units


def _check_pixel_size(pixel_size):
    ps = np.asarray(pixel_size, dtype=float)
    if not (np.isfinite(ps).all() and (ps > 0).all()):
        raise InputError(None, f"pixel size must be positive (Å/px), got {pixel_size!r}", "check the pixel size")
    return ps


def px_to_angst(px, pixel_size):
    """Lengths in pixels to Å (``px * pixel_size``); arrays and Series welcome."""
    return px * _check_pixel_size(pixel_size)


def angst_to_px(angst, pixel_size):
    """Lengths in Å to pixels (``angst / pixel_size``); arrays and Series welcome."""
    return angst / _check_pixel_size(pixel_size)


def origins_px(table: pd.DataFrame, pixel_size=None) -> np.ndarray:
    """``rlnOriginXAngst/YAngst`` of every row in pixels: array ``[n, 2]`` of ``(x, y)``.

    ``pixel_size`` (Å/px) defaults to each row's ``rlnImagePixelSize`` (present after
    :func:`join_optics`). Missing origin columns count as zero. The particle's shift in
    Conveyor's convention is the negative of this (see the module docstring).
    """
    if pixel_size is None:
        if "rlnImagePixelSize" not in table.columns:
            raise InputError(None, "no pixel size to convert origins: rlnImagePixelSize is not in the table",
                             "pass pixel_size or join the optics table first (join_optics)")
        pixel_size = table["rlnImagePixelSize"].to_numpy(float)
    out = np.zeros((len(table), 2), dtype=float)
    for k, lab in enumerate(("rlnOriginXAngst", "rlnOriginYAngst")):
        if lab in table.columns:
            out[:, k] = angst_to_px(table[lab].to_numpy(float), pixel_size)
    return out


def with_origins_px(table: pd.DataFrame, origins_xy_px, pixel_size) -> pd.DataFrame:
    """A copy of ``table`` with ``rlnOriginXAngst/YAngst`` set from ``(x, y)`` origins in px."""
    o = np.asarray(origins_xy_px, dtype=float).reshape(-1, 2)
    if len(o) != len(table):
        raise ValueError(f"{len(o)} origins for {len(table)} rows")
    out = table.copy()
    ps = pixel_size if np.ndim(pixel_size) == 0 else np.asarray(pixel_size, dtype=float)
    out["rlnOriginXAngst"] = px_to_angst(o[:, 0], ps)
    out["rlnOriginYAngst"] = px_to_angst(o[:, 1], ps)
    return out
