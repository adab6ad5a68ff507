"""Frame selection after sizing: hits of the right size whose fit is a single sphere.

A frame passes when all of these hold (columns of the per-frame table):

* ``is_hit``;
* ``dmin_nm <= diameter_nm <= dmax_nm`` (frames that could not be sized have NaN and fail);
* ``size_score >= min_score`` -- the best sphere size is clearly better than the next
  local minimum of the misfit (ambiguous, noisy fits fail);
* ``size_misfit <= max_misfit`` -- the ring profile looks like one sphere (sums of
  spheres of different sizes smear the fringes and fail);
* ``multi_score <= max_multi`` -- no Patterson lobes of a second particle (coherent
  multiple hits fail even when both particles have the same size).

Columns missing from a table (e.g. tables from other tools) skip their criterion; a
``None`` threshold switches a criterion off.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .._lazy import lazy_module
from ..errors import InputError
from ..io.atomic import atomic_path

pd = lazy_module("pandas")

#: Default lowest size score (second-best / best local misfit).
MIN_SCORE = 1.5
#: Default largest excess deviance per photon of the sphere fit (loose: non-spherical particles pass).
MAX_MISFIT = 0.25
#: Default largest multiple-hit (Patterson lobe) score.
MAX_MULTI = 8.0


@dataclass
class FilterResult:
    """``passed`` [n] and how many frames each criterion removed (in order of the checks)."""

    passed: np.ndarray
    removed: dict = field(default_factory=dict)

    def summary(self) -> dict:
        return {"n_frames": int(self.passed.size), "n_passed": int(self.passed.sum()), "removed": dict(self.removed)}


def select_frames(
    df: pd.DataFrame,
    dmin_nm: float,
    dmax_nm: float,
    *,
    min_score: float | None = MIN_SCORE,
    max_misfit: float | None = MAX_MISFIT,
    max_multi: float | None = MAX_MULTI,
) -> FilterResult:
    """Apply the selection of the module notes to a per-frame table.

    Returns
    -------
    FilterResult
        ``passed`` and, for each criterion, the number of frames it removed among those
        that survived the previous criteria (``not_hit``, ``not_sized``, ``size_window``,
        ``size_score``, ``misfit``, ``multiple``).
    """
    if not (dmin_nm < dmax_nm):
        raise InputError("dmin/dmax", f"empty size window {dmin_nm}..{dmax_nm} nm", "give dmin < dmax")
    if "diameter_nm" not in df.columns:
        raise InputError(None, "the per-frame table has no diameter_nm column",
                         "run 'conveyor spi size' before 'conveyor spi filter'")
    n = len(df)
    keep = np.ones(n, dtype=bool)
    removed = {}

    def apply(name, ok):
        nonlocal keep
        ok = np.asarray(ok, dtype=bool)
        removed[name] = int(np.count_nonzero(keep & ~ok))
        keep &= ok

    if "is_hit" in df.columns:
        apply("not_hit", df["is_hit"].to_numpy(bool))
    d = df["diameter_nm"].to_numpy(np.float64)
    apply("not_sized", np.isfinite(d))
    with np.errstate(invalid="ignore"):
        apply("size_window", (d >= dmin_nm) & (d <= dmax_nm))
        if min_score is not None and "size_score" in df.columns:
            apply("size_score", df["size_score"].to_numpy(np.float64) >= min_score)
        if max_misfit is not None and "size_misfit" in df.columns:
            apply("misfit", df["size_misfit"].to_numpy(np.float64) <= max_misfit)
        if max_multi is not None and "multi_score" in df.columns:
            ms = df["multi_score"].to_numpy(np.float64)
            apply("multiple", ~(ms > max_multi))  # NaN (not computed) does not reject
    return FilterResult(passed=keep, removed=removed)


def plot_size_histogram(path, diameters_nm, passed, dmin_nm, dmax_nm, *, title=None, bins=None):
    """Histogram (PNG) of the sizes of all sized hits, the passed frames and the window.

    Parameters
    ----------
    path : output PNG, written atomically
    diameters_nm : array of the hits' diameters (NaN ignored)
    passed : bool array (same length) of the frames kept
    dmin_nm, dmax_nm : the size window, drawn as a shaded band
    """
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    d = np.asarray(diameters_nm, dtype=np.float64)
    passed = np.asarray(passed, dtype=bool)
    ok = np.isfinite(d)
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    if ok.any():
        lo = min(np.nanmin(d[ok]), dmin_nm)
        hi = max(np.nanmax(d[ok]), dmax_nm)
        if bins is None:
            bins = np.linspace(lo - 0.02 * (hi - lo), hi + 0.02 * (hi - lo), 81)
        ax.hist(d[ok], bins=bins, color="0.6", label=f"sized hits ({int(ok.sum())})")
        ax.hist(d[ok & passed], bins=bins, color="tab:blue", label=f"passed ({int((ok & passed).sum())})")
    ax.axvspan(dmin_nm, dmax_nm, color="tab:green", alpha=0.15, label=f"window {dmin_nm:g}-{dmax_nm:g} nm")
    ax.axvline(dmin_nm, color="tab:green", lw=1)
    ax.axvline(dmax_nm, color="tab:green", lw=1)
    ax.set_xlabel("sphere-equivalent diameter (nm)")
    ax.set_ylabel("frames")
    if title:
        ax.set_title(title)
    ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
