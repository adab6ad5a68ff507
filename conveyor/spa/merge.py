"""Merge per-micrograph results (CTF, motion, particles) into RELION-compatible project files.

One row per micrograph is judged on its CTF fit resolution, astigmatism and total drift;
accepted micrographs go into ``micrographs_ctf.star`` and their particles into
``particles.star``; every micrograph (accepted, rejected with the reason, or skipped
because its branch failed upstream) is listed in a summary table.

Matching
--------
Files of different steps are matched on the micrograph: by ``rlnMicrographName`` when the
names agree exactly, otherwise by the file stem (``movies/mic_0001.mrc``,
``MotionCorr/mic_0001.mrc`` and ``mic_0001.star`` all mean ``mic_0001``). A motion STAR
file is matched through ``rlnMicrographName`` or ``rlnMicrographMovieName`` of its
``data_general`` block, else through its own file stem.

Units
-----
Drift is the path length of the whole-frame trajectory in px of the movie,
``sum_f |s(f+1) - s(f)|`` over ``data_global_shift`` (rlnMicrographShiftX/Y);
rlnAccumMotionTotal is written in Å (RELION's unit) = drift × movie pixel size. Defocus,
astigmatism (``|U - V|``) and fit resolution in Å.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import InputError
from ..io.star import join_optics, read_star
from .extract import micrograph_key

log = logging.getLogger(__name__)

_MOTION_SUFFIXES = ("_motion", "_shifts", "_ctf", "_particles", "_picks", "_coords", "_extract")

#: Optics labels that define a micrograph optics group (and, with the image ones, a particle group).
_MIC_OPTICS = ("rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast", "rlnMicrographOriginalPixelSize", "rlnMicrographPixelSize")
_PART_OPTICS = _MIC_OPTICS + ("rlnImagePixelSize", "rlnImageSize", "rlnImageDimensionality", "rlnCtfDataAreCtfPremultiplied")

SUMMARY_COLUMNS = (
    "micrograph",
    "status",
    "reason",
    "particles",
    "defocus_u",
    "defocus_v",
    "astigmatism",
    "ctf_resolution",
    "ctf_fom",
    "drift_px",
)


# --------------------------------------------------------------------------- inputs
def expand_inputs(items, option: str = "input") -> list[Path]:
    """Paths from a list of arguments where ``@list.txt`` stands for the paths listed in that file.

    List files hold one path per line; blank lines and ``#`` comments are ignored; relative
    paths are taken relative to the current directory (as the workflow writes them).
    """
    out: list[Path] = []
    for item in items or []:
        s = str(item)
        if s.startswith("@"):
            lst = Path(s[1:])
            if not lst.exists():
                raise InputError(lst, f"list file given to {option} does not exist", "check the path after '@'")
            for line in lst.read_text().splitlines():
                line = line.split("#", 1)[0].strip()
                if line:
                    out.append(Path(line))
        else:
            out.append(Path(s))
    return out


def read_name_list(path) -> list[str]:
    """Names listed in a text file (one per line, ``#`` comments and blank lines ignored)."""
    p = Path(path)
    if not p.exists():
        raise InputError(p, "list file does not exist", "check the path")
    return [ln.split("#", 1)[0].strip() for ln in p.read_text().splitlines() if ln.split("#", 1)[0].strip()]


def _strip_suffixes(stem: str) -> str:
    for suf in _MOTION_SUFFIXES:
        if stem.endswith(suf) and len(stem) > len(suf):
            return stem[: -len(suf)]
    return stem


def read_ctf_tables(paths) -> pd.DataFrame:
    """All CTF rows (one per micrograph) with their optics columns; adds ``_source``."""
    frames = []
    for path in paths:
        blocks = read_star(path)
        table = None
        for name in ("micrographs", "", *blocks):
            if name in blocks and "rlnDefocusU" in blocks[name].columns:
                table = blocks[name]
                break
        if table is None:
            raise InputError(path, "no table with rlnDefocusU in this CTF STAR file", "pass the files written by `conveyor spa ctf`")
        if "rlnMicrographName" not in table.columns:
            raise InputError(path, "the CTF table lacks rlnMicrographName", "re-run CTF estimation (conveyor spa ctf)")
        if "optics" in blocks:
            table = join_optics(table, blocks["optics"], path)
        table = table.copy()
        table["_source"] = str(path)
        frames.append(table)
    if not frames:
        return pd.DataFrame(columns=["rlnMicrographName", "_source"])
    out = pd.concat(frames, ignore_index=True)
    dup = out["rlnMicrographName"].astype(str).duplicated(keep=False)
    if dup.any():
        name = out.loc[dup, "rlnMicrographName"].iloc[0]
        srcs = sorted(set(out.loc[out["rlnMicrographName"] == name, "_source"]))
        raise InputError(srcs[0], f"micrograph {name!r} has CTF rows in several files ({', '.join(srcs)})", "give each micrograph's CTF once")
    return out


def motion_drift(path) -> dict:
    """Drift of one movie from its motion STAR file.

    Returns ``{"keys": [...], "drift_px": float, "pixel_size": float or nan}`` where keys are
    the names this file may be matched on.
    """
    blocks = read_star(path)
    shifts = blocks.get("global_shift")
    if shifts is None or not {"rlnMicrographShiftX", "rlnMicrographShiftY"} <= set(shifts.columns):
        raise InputError(path, "no data_global_shift block with rlnMicrographShiftX/Y", "pass the motion STAR files written by `conveyor spa motion`")
    s = shifts
    if "rlnMicrographFrameNumber" in s.columns:
        s = s.sort_values("rlnMicrographFrameNumber")
    xy = s[["rlnMicrographShiftX", "rlnMicrographShiftY"]].to_numpy(dtype=float)
    drift = float(np.sqrt((np.diff(xy, axis=0) ** 2).sum(axis=1)).sum()) if len(xy) > 1 else 0.0
    keys = []
    general = blocks.get("general")
    ps = math.nan
    if general is not None and len(general):
        g = general.iloc[0]
        for col in ("rlnMicrographName", "rlnMicrographMovieName"):
            if col in general.columns and isinstance(g[col], str):
                keys.append(str(g[col]))
        # shifts are in px of the (unbinned) movie, as RELION writes them
        for col in ("rlnMicrographOriginalPixelSize", "rlnMicrographPixelSize"):
            if col in general.columns:
                ps = float(g[col])
                break
    keys.append(_strip_suffixes(micrograph_key(path)))
    return {"keys": keys, "drift_px": drift, "pixel_size": ps}


# --------------------------------------------------------------------------- matching
class _Matcher:
    """Find the CTF row of a name: exact rlnMicrographName, else a unique file stem."""

    def __init__(self, names):
        self.exact = {str(n): i for i, n in enumerate(names)}
        stems: dict[str, list[int]] = {}
        for i, n in enumerate(names):
            stems.setdefault(micrograph_key(n), []).append(i)
        self.stems = stems

    def find(self, name):
        name = str(name)
        if name in self.exact:
            return self.exact[name]
        hits = self.stems.get(_strip_suffixes(micrograph_key(name)), [])
        return hits[0] if len(hits) == 1 else None


# --------------------------------------------------------------------------- optics
def _group_optics(table: pd.DataFrame, labels) -> tuple[pd.DataFrame, np.ndarray]:
    """Distinct optics among rows of ``table`` (per-row optics columns) -> (optics table, 1-based group per row)."""
    present = [c for c in labels if c in table.columns]
    if not len(table):
        return pd.DataFrame(columns=["rlnOpticsGroupName", "rlnOpticsGroup", *present]), np.zeros(0, dtype=int)
    key = table[present].apply(pd.to_numeric, errors="coerce").round(6)
    combos = key.drop_duplicates().reset_index(drop=True)
    groups = np.zeros(len(table), dtype=int)
    rows = []
    for g, combo in combos.iterrows():
        hit = ((key == combo) | (key.isna() & combo.isna())).all(axis=1).to_numpy()
        groups[hit] = g + 1
        row = {"rlnOpticsGroupName": f"opticsGroup{g + 1}", "rlnOpticsGroup": g + 1}
        for c in present:
            v = combo[c]
            row[c] = int(v) if c in ("rlnImageSize", "rlnImageDimensionality", "rlnCtfDataAreCtfPremultiplied") and not pd.isna(v) else float(v)
        rows.append(row)
    return pd.DataFrame(rows), groups


# --------------------------------------------------------------------------- merge
@dataclass
class Thresholds:
    """Acceptance limits (None: not applied).

    Attributes
    ----------
    max_ctf_resolution : float
        Å; reject micrographs whose CTF fit resolution is worse (larger) than this.
    max_drift : float
        px; reject micrographs whose total drift path is longer.
    max_astigmatism : float
        Å; reject micrographs with ``|defocus U - defocus V|`` larger than this.
    """

    max_ctf_resolution: float | None = None
    max_drift: float | None = None
    max_astigmatism: float | None = None


@dataclass
class MergeResult:
    """``micrographs`` and ``particles``: STAR blocks; ``summary``: one row per micrograph."""

    micrographs: dict = field(default_factory=dict)
    particles: dict = field(default_factory=dict)
    summary: pd.DataFrame = field(default_factory=pd.DataFrame)


def _judge(row, drift, limits: Thresholds) -> str:
    reasons = []
    res = row.get("rlnCtfMaxResolution", math.nan)
    if limits.max_ctf_resolution is not None:
        if not np.isfinite(res):
            reasons.append("no CTF fit resolution")
        elif res > limits.max_ctf_resolution:
            reasons.append(f"CTF fit resolution {res:.2f} Å > {limits.max_ctf_resolution:g} Å")
    if limits.max_astigmatism is not None:
        ast = abs(float(row["rlnDefocusU"]) - float(row["rlnDefocusV"]))
        if ast > limits.max_astigmatism:
            reasons.append(f"astigmatism {ast:.0f} Å > {limits.max_astigmatism:g} Å")
    if limits.max_drift is not None and np.isfinite(drift) and drift > limits.max_drift:
        reasons.append(f"drift {drift:.1f} px > {limits.max_drift:g} px")
    return "; ".join(reasons)


def merge(ctf_paths, motion_paths=(), particle_paths=(), *, skipped=(), limits: Thresholds | None = None) -> MergeResult:
    """Judge micrographs and merge their metadata (see the module docstring).

    Parameters
    ----------
    ctf_paths, motion_paths, particle_paths : sequences of paths
        Per-micrograph (or multi-micrograph) CTF STAR files, motion STAR files and particle
        STAR files (as written by ``conveyor spa extract``).
    skipped : sequence of str
        Micrograph or movie names whose processing failed upstream; they are listed as
        ``skipped`` (matched by name or stem) and contribute nothing.
    limits : Thresholds
    """
    limits = limits or Thresholds()
    ctf = read_ctf_tables(ctf_paths)
    names = ctf["rlnMicrographName"].astype(str).tolist()
    match = _Matcher(names)

    drift = np.full(len(ctf), np.nan)
    motion_ps = np.full(len(ctf), np.nan)
    motion_file = [None] * len(ctf)
    for path in motion_paths:
        info = motion_drift(path)
        idx = next((i for i in (match.find(k) for k in info["keys"]) if i is not None), None)
        if idx is None:
            log.warning("%s: no CTF row for this movie; its motion is ignored", path)
            continue
        drift[idx] = info["drift_px"]
        motion_ps[idx] = info["pixel_size"]
        motion_file[idx] = str(path)

    skipped_keys = {micrograph_key(s) for s in skipped}
    skipped_names = {str(s) for s in skipped}

    # particles, grouped by micrograph
    part_tables = []
    orphans: dict[str, int] = {}
    for path in particle_paths:
        blocks = read_star(path)
        parts = blocks.get("particles")
        if parts is None:
            raise InputError(path, "no data_particles block", "pass the particle STAR files written by `conveyor spa extract`")
        if len(parts) == 0:
            continue
        if "rlnMicrographName" not in parts.columns:
            raise InputError(path, "data_particles lacks rlnMicrographName", "re-run extraction (conveyor spa extract)")
        if "optics" in blocks:
            parts = join_optics(parts, blocks["optics"], path)
        parts = parts.copy()
        idx = parts["rlnMicrographName"].astype(str).map(lambda n: match.find(n))
        for n in parts.loc[idx.isna(), "rlnMicrographName"].astype(str).unique():
            orphans[n] = orphans.get(n, 0) + int((parts["rlnMicrographName"].astype(str) == n).sum())
        parts = parts[idx.notna().to_numpy()]
        parts["_mic"] = idx[idx.notna()].astype(int).to_numpy()
        part_tables.append(parts)
    particles = pd.concat(part_tables, ignore_index=True) if part_tables else pd.DataFrame({"_mic": pd.Series([], dtype=int)})
    counts = np.bincount(particles["_mic"].to_numpy(dtype=int), minlength=len(ctf)) if len(ctf) else np.zeros(0, int)

    rows = []
    accepted = np.zeros(len(ctf), dtype=bool)
    for i, row in ctf.iterrows():
        name = str(row["rlnMicrographName"])
        u, v = float(row["rlnDefocusU"]), float(row["rlnDefocusV"])
        rec = {
            "micrograph": name,
            "particles": int(counts[i]),
            "defocus_u": u,
            "defocus_v": v,
            "astigmatism": abs(u - v),
            "ctf_resolution": float(row.get("rlnCtfMaxResolution", math.nan)),
            "ctf_fom": float(row.get("rlnCtfFigureOfMerit", math.nan)),
            "drift_px": float(drift[i]),
        }
        if name in skipped_names or micrograph_key(name) in skipped_keys:
            rec.update(status="skipped", reason="failed upstream", particles=0)
        else:
            reason = _judge(row, drift[i], limits)
            rec.update(status="rejected" if reason else "accepted", reason=reason)
            accepted[i] = not reason
        rows.append(rec)
    # skipped names without any CTF row, and particles without CTF
    known = {micrograph_key(n) for n in names}
    for s in skipped:
        if micrograph_key(s) not in known and str(s) not in names:
            rows.append({"micrograph": str(s), "status": "skipped", "reason": "failed upstream", "particles": 0})
            known.add(micrograph_key(s))
    for n, k in orphans.items():
        rows.append({"micrograph": n, "status": "rejected", "reason": "no CTF estimate", "particles": k})
    summary = pd.DataFrame(rows)
    for col in SUMMARY_COLUMNS:
        if col not in summary.columns:
            summary[col] = np.nan if col not in ("status", "reason") else ""
    summary = summary[list(SUMMARY_COLUMNS)]
    summary["reason"] = summary["reason"].fillna("")
    summary["particles"] = summary["particles"].fillna(0).astype(int)

    # micrographs_ctf.star
    acc = ctf[accepted].copy()
    acc_drift = drift[accepted]
    acc_ps = motion_ps[accepted]
    acc_motion = [m for m, a in zip(motion_file, accepted) if a]
    if "rlnMicrographOriginalPixelSize" not in acc.columns and "rlnMicrographPixelSize" in acc.columns:
        acc["rlnMicrographOriginalPixelSize"] = np.where(np.isfinite(acc_ps), acc_ps, acc["rlnMicrographPixelSize"].astype(float))
    mic_optics, mic_groups = _group_optics(acc, _MIC_OPTICS)
    mics = acc.drop(columns=[c for c in (*_MIC_OPTICS, "rlnOpticsGroup", "rlnOpticsGroupName", "_source") if c in acc.columns])
    if np.isfinite(acc_drift).any():
        ps_for_motion = np.where(np.isfinite(acc_ps), acc_ps, acc.get("rlnMicrographOriginalPixelSize", pd.Series(np.nan, index=acc.index)).astype(float))
        mics["rlnAccumMotionTotal"] = acc_drift * ps_for_motion
        mics["rlnMicrographMetadata"] = [m if m else "None" for m in acc_motion]
    mics["rlnOpticsGroup"] = mic_groups
    mics = mics.reset_index(drop=True)

    # particles.star
    keep_mics = set(np.flatnonzero(accepted).tolist())
    sel = particles[particles["_mic"].isin(keep_mics)].copy() if len(particles) else particles
    p_optics, p_groups = _group_optics(sel, _PART_OPTICS)
    drop = [c for c in (*_PART_OPTICS, "rlnOpticsGroup", "rlnOpticsGroupName", "_mic") if c in sel.columns]
    out_parts = sel.drop(columns=drop).reset_index(drop=True)
    out_parts["rlnOpticsGroup"] = p_groups
    return MergeResult(
        micrographs={"optics": mic_optics, "micrographs": mics},
        particles={"optics": p_optics, "particles": out_parts},
        summary=summary,
    )


def format_summary(summary: pd.DataFrame, max_rows: int = 60) -> str:
    """Human-readable summary: the table (first/last rows when long) and totals per status and reason."""
    show = summary
    lines = []
    if len(summary) > max_rows:
        half = max_rows // 2
        show = pd.concat([summary.head(half), summary.tail(half)])
        lines.append(f"(showing {max_rows} of {len(summary)} micrographs; all are in the summary file)")
    fmt = show.copy()
    for col in ("defocus_u", "defocus_v", "astigmatism"):
        fmt[col] = fmt[col].map(lambda v: "" if pd.isna(v) else f"{v:.0f}")
    for col in ("ctf_resolution", "ctf_fom", "drift_px"):
        fmt[col] = fmt[col].map(lambda v: "" if pd.isna(v) else f"{v:.2f}")
    lines.insert(0, fmt.to_string(index=False))
    st = summary["status"].value_counts()
    acc = summary[summary["status"] == "accepted"]
    lines.append(
        f"{len(summary)} micrographs: {int(st.get('accepted', 0))} accepted ({int(acc['particles'].sum())} particles), "
        f"{int(st.get('rejected', 0))} rejected, {int(st.get('skipped', 0))} skipped"
    )
    rej = summary[summary["status"] == "rejected"]
    if len(rej):
        kinds = rej["reason"].str.split(";").explode().str.strip().str.replace(r"\s[\d.]+.*$", "", regex=True)
        for reason, n in kinds.value_counts().items():
            lines.append(f"  rejected: {reason}: {n}")
    return "\n".join(lines)
