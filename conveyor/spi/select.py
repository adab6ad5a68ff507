"""Selection of 2D classes of SPI patterns: automatic scores or the user's choice.

Classes are numbered from **1** here and in every file (``classes.yaml``, the score table,
the gallery); :class:`conveyor.spi.classify2d.Classify2DResult` indexes them from 0.

Automatic selection
-------------------
Every class model (polar, from :mod:`conveyor.spi.classify2d`) is scored with
interpretable numbers; a class is selected when it passes all of them:

``frames_kept`` >= ``max(min_frames, min_fraction * frames)``
    Tiny classes hold outliers and give noisy scores (defaults :data:`MIN_FRAMES`,
    :data:`MIN_FRACTION`). ``frames_kept`` counts the class's frames that also pass the
    frame-level misfit criterion below (the population when misfits are not known): a
    class of frames that do not resemble it is not a class.
``dmin_nm <= diameter_nm <= dmax_nm``
    Diameter of the homogeneous sphere whose form factor
    ``s [3 (sin x - x cos x) / x^3]^2 + b`` (``x = pi q d``) best fits the class's ring
    profile, by weighted least squares with relative weights over a log-spaced grid from
    ``dmin/2`` to ``2 dmax`` (1 % steps, parabolic refinement); the fringe spacing sets
    it. NaN (fails) when the best fit is on the edge of the grid. The profile is the
    class's members' photons in full rings from the beamstop edge outwards
    (:attr:`Classify2DResult.profiles`), so it holds the low-q fringes the angular grid
    leaves out.
``fringe_visibility >= min_visibility`` (default :data:`MIN_VISIBILITY`)
    Contrast of the fringes of the ring profile: the rms of ``profile / envelope - 1``
    over the rings, where the envelope is a quadratic in ``log r`` fitted to
    ``log profile`` (the smooth fall-off without the fringes). One particle (or several
    of one size) keeps deep minima; patterns of particles of different sizes added
    together fill them. Measured over 123 classes (64- and 128-px detectors, 3 000-50 000
    photons per hit, 10 and 20 classes) of the simulator's 70 nm capsids: 0.61-0.77; its
    50 nm capsids 0.51-1.0; classes of clusters mixing 70 and 50 nm particles 0.38-0.55.
    The value depends somewhat on how many fringes the detector holds and on the ring
    width; check the score table when the geometry is very different.
``symmetry >= min_symmetry`` (default :data:`MIN_SYMMETRY`)
    Rotational self-similarity, the criterion of spi_em_class in correlation form: each
    ring of the class model is divided by its mean, and the class is correlated with
    itself rotated by every angle from 36° to 90° (the rotations of the 10-, 6-, 5- and
    4-fold patterns of an icosahedral particle seen along its axes; Friedel symmetry
    already makes 180° trivial). ``symmetry = max_alpha sum_r w_r sum_j a(r, j)
    a(r, j - alpha) / sum_r w_r sum_j a(r, j)^2`` with ``a`` the ring-normalised model and
    ``w_r`` the photons of ring ``r`` (so the bright inner rings, where one capsid is
    nearly round and a cluster's stripes are strongest, count most). A round pattern
    gives ~1 whatever the rotation; an n-fold one gives 1 at its symmetry angle; the
    interference stripes of particles that scatter coherently together (aggregates,
    particles in one droplet) and irregular shapes correlate poorly with any rotation.
    Measured on the same runs: classes of single 70 nm capsids 0.864-0.973 (5 % below
    0.887), classes of touching clusters of 70 nm particles 0.689-0.874 (median 0.825).
    The two overlap slightly; the frame-level misfit below removes the cluster frames
    that this class-level criterion lets through.
``median_misfit <= max_misfit`` (default :data:`MAX_FRAME_MISFIT`)
    Most frames of the class resemble it (the frame misfit below): a class whose typical
    member does not fit it gathers unrelated patterns, such as clusters of particles
    with different separations. Measured: classes of single capsids -0.05-0.10; classes
    of the simulator's clusters 0.02-0.42 (median 0.20; half of them above 0.2), so this
    catches the most mixed cluster classes, not all. Skipped when frame misfits are not
    known.

Frames of the selected classes
------------------------------
A class holds the frames that its model explains best, but a frame can be there without
resembling it: a cluster of particles whose stripes no class has. Every frame carries its
``misfit`` to its rotated class model (:func:`conveyor.spi.classify2d.frame_misfit`: the
mean squared relative deviation beyond photon noise, independent of the photon count).
Frames of the chosen classes are kept when ``misfit <= max_misfit`` (default
:data:`MAX_FRAME_MISFIT`; NaN passes). Measured on the simulator's data (10 classes,
3 000-10 000 photons per hit): single right-size hits 0.04-0.10 (median per run; 90 %
below 0.19), touching clusters of two or three particles 0.23-0.35 (median; 90 % above
0.08-0.22). The score table reports, per class, the median misfit and the frames kept.

Manual selection
----------------
The user looks at ``gallery.png`` of the classification and writes a YAML file::

    classes: [1, 4, 7]

(1-based class numbers; ``conveyor select spi --class-dir DIR --classes 1 4 7 --out FILE``
writes it after checking the numbers). :func:`read_selection` rejects numbers that are not
classes of the run with an :class:`InputError` listing the valid ones.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .._lazy import lazy_module
from ..errors import InputError
from ..io.atomic import write_text

pd = lazy_module("pandas")

#: Smallest class kept, frames.
MIN_FRAMES = 5
#: Smallest class kept, fraction of the classified frames.
MIN_FRACTION = 0.01
#: Lowest fringe visibility (rms relative fringe contrast of the ring profile) kept.
MIN_VISIBILITY = 0.58
#: Lowest rotational-symmetry score kept.
MIN_SYMMETRY = 0.87
#: Largest misfit of a frame to its class model kept (frame level).
MAX_FRAME_MISFIT = 0.2
#: Smallest and largest rotation (degrees) searched by the symmetry score.
SYMMETRY_ANGLES_DEG = (36.0, 90.0)
#: Relative step of the diameter grid of the class fit.
DIAMETER_STEP = 0.01
#: Rings skipped beyond the inner edge of the grid before the size fit.
FIT_MARGIN_RINGS = 1

SCORE_COLUMNS = [
    "class", "population", "fraction", "diameter_nm", "size_misfit", "fringe_visibility",
    "symmetry", "symmetry_angle_deg", "anisotropy", "median_misfit", "frames_kept", "pass_population",
    "pass_size", "pass_fringes", "pass_symmetry", "pass_fit", "selected", "reason",
]


# ---------------------------------------------------------------------------------------
# scores
# ---------------------------------------------------------------------------------------
def sphere_intensity(q, diameter):
    """``[3 (sin x - x cos x) / x^3]^2``, ``x = pi q d`` (``q`` without 2π; 1 at ``q = 0``)."""
    x = np.pi * np.asarray(q, dtype=np.float64) * diameter
    small = np.abs(x) < 1e-3
    xs = np.where(small, 1.0, x)
    amp = np.where(small, 1.0 - x * x / 10.0, 3.0 * (np.sin(xs) - xs * np.cos(xs)) / xs**3)
    return amp * amp


def ring_q(radii_px, pixel_size_m, distance_m, wavelength_m):
    """Spatial frequency ``2 sin(theta) / lambda`` (1/m) of rings ``radii_px`` px from the beam."""
    two_theta = np.arctan(np.asarray(radii_px, dtype=np.float64) * pixel_size_m / distance_m)
    return 2.0 * np.sin(0.5 * two_theta) / wavelength_m


def fringe_visibility(profile, radii_px):
    """rms of ``profile / envelope - 1``; envelope = exp(quadratic in log r) fitted to log profile."""
    prof = np.asarray(profile, dtype=np.float64)
    r = np.asarray(radii_px, dtype=np.float64)
    ok = np.isfinite(prof) & (prof > 0)
    if ok.sum() < 4:
        return float("nan")
    prof, r = prof[ok], r[ok]
    lr = np.log(r)
    cf = np.polyfit(lr, np.log(prof[ok]), 2)
    env = np.exp(np.polyval(cf, np.log(r)))
    return float(np.sqrt(np.mean((prof / env - 1.0) ** 2)))


def fit_sphere_profile(profile, radii_px, *, pixel_size_m, distance_m, wavelength_m, dmin_nm, dmax_nm,
                       step=DIAMETER_STEP):
    """Fit ``s P(q, d) + b`` to one ring profile (relative least squares over a diameter grid).

    Returns
    -------
    diameter_nm : float (NaN at the grid edge or without signal)
    misfit : float
        ``sum w (prof - fit)^2 / sum w prof^2`` with ``w = 1 / prof^2`` (mean squared
        relative deviation), reported in the score table but not used for selection (the
        capsid is not a sphere: its minima are partly filled).
    """
    prof = np.asarray(profile, dtype=np.float64)
    r = np.asarray(radii_px, dtype=np.float64)
    ok = np.isfinite(prof) & (prof > 0)
    if ok.sum() < 5 or not (0 < dmin_nm < dmax_nm):
        return float("nan"), float("nan")
    prof, r = prof[ok], r[ok]
    q = ring_q(r, pixel_size_m, distance_m, wavelength_m)
    m = int(math.ceil(math.log(dmax_nm / dmin_nm) / math.log1p(step))) + 1
    grid = dmin_nm * np.exp(np.linspace(0.0, math.log(dmax_nm / dmin_nm), m))
    T = sphere_intensity(q[None, :], grid[:, None] * 1e-9)  # [m, rings]
    w = 1.0 / prof**2
    # weighted normal equations for (s, b) at every diameter
    stt = (w * T * T).sum(1)
    st1 = (w * T).sum(1)
    s11 = w.sum()
    sty = (w * T * prof).sum(1)
    s1y = (w * prof).sum()
    det = stt * s11 - st1 * st1
    with np.errstate(divide="ignore", invalid="ignore"):
        s = (sty * s11 - st1 * s1y) / det
        b = (stt * s1y - st1 * sty) / det
        neg = (b < 0) | ~np.isfinite(b)
        s = np.where(neg, sty / stt, s)
        b = np.where(neg, 0.0, b)
        s = np.maximum(s, 0.0)
    fit = s[:, None] * T + b[:, None]
    mis = (w * (prof - fit) ** 2).sum(1) / (w * prof**2).sum()
    j = int(np.argmin(mis))
    if j == 0 or j == m - 1:
        return float("nan"), float(mis[j])
    y0, y1, y2 = mis[j - 1], mis[j], mis[j + 1]
    den = y0 - 2 * y1 + y2
    h = math.log(grid[1] / grid[0])
    shift = float(np.clip(0.5 * h * (y0 - y2) / den, -h, h)) if den > 0 else 0.0
    return float(grid[j] * math.exp(shift)), float(mis[j])


def symmetry_scores(models, grid, angles_deg=SYMMETRY_ANGLES_DEG):
    """Rotational self-similarity of every polar class model (module notes).

    Parameters
    ----------
    models : array [k, rings, angles]
    grid : :class:`conveyor.spi.classify2d.PolarGrid`
    angles_deg : (lo, hi)
        Rotations searched, degrees (rounded to whole angle bins).

    Returns
    -------
    symmetry [k], best_angle_deg [k], anisotropy [k]
        ``anisotropy`` is the weighted mean square of ``a - 1`` (0 for a round pattern).
    """
    mod = np.asarray(models, dtype=np.float64)
    if mod.ndim == 2:
        mod = mod[None]
    k, R, J = mod.shape
    mean = mod.mean(axis=2, keepdims=True)
    a = mod / np.where(mean > 0, mean, 1.0)
    ring_area = 2.0 * np.pi * grid.radii * grid.ring_px
    w = np.maximum(mean[:, :, 0] * ring_area[None, :], 0.0)  # [k, R]: photons of each ring
    # circular autocorrelation along the angle axis for every shift, weighted over rings
    af = np.fft.rfft(a, axis=2)
    ac = np.fft.irfft((af * np.conj(af)) * w[:, :, None], n=J, axis=2).sum(axis=1)  # [k, J]
    ac0 = ac[:, :1]
    rho = ac / np.where(ac0 > 0, ac0, 1.0)
    shifts = np.arange(J) * grid.step_deg
    lo, hi = angles_deg
    use = (shifts >= lo - 0.5 * grid.step_deg) & (shifts <= min(hi, grid.period_deg / 2) + 1e-9)
    if not use.any():
        use = shifts > 0
    rho_u = np.where(use[None, :], rho, -np.inf)
    best = np.argmax(rho_u, axis=1)
    sym = rho_u[np.arange(k), best]
    aniso = ((w[:, :, None] * (a - 1.0) ** 2).sum(axis=(1, 2)) / np.maximum(w.sum(axis=1) * J, 1e-300))
    return sym, shifts[best], aniso


def score_classes(models, grid, populations, *, pixel_size_m=None, distance_m=None, wavelength_m=None,
                  dmin_nm=None, dmax_nm=None, min_frames=MIN_FRAMES, min_fraction=MIN_FRACTION,
                  min_visibility=MIN_VISIBILITY, min_symmetry=MIN_SYMMETRY, profiles=None,
                  profile_radii=None, frames: pd.DataFrame | None = None,
                  max_misfit=MAX_FRAME_MISFIT) -> pd.DataFrame:
    """Score every class and decide which pass (module notes).

    Parameters
    ----------
    models : array [k, rings, angles]
        Polar class models (:attr:`Classify2DResult.models`).
    grid : PolarGrid
    populations : array [k]
        Frames per class.
    pixel_size_m, distance_m, wavelength_m : float
        Geometry for the size fit; without it the size criterion cannot be applied.
    dmin_nm, dmax_nm : float
        Accepted diameter range, nm.
    min_frames, min_fraction, min_visibility, min_symmetry : float
        Thresholds; ``None`` switches a criterion off.
    profiles, profile_radii : arrays [k, rings], [rings], optional
        Class radial profiles from the members' full rings
        (:attr:`Classify2DResult.profiles`), which reach in to the beamstop edge; default the
        angular mean of the polar models (from the grid's ``r_min``).
    frames : DataFrame, optional
        Per-frame ``class`` (1-based) and ``misfit``, for the ``median_misfit`` and
        ``frames_kept`` columns (frames kept by :func:`selected_frames` if the class is chosen).
    max_misfit : float
        Frame-level misfit limit used for ``frames_kept``.

    Returns
    -------
    pandas.DataFrame with :data:`SCORE_COLUMNS` (``class`` 1-based).
    """
    mod = np.asarray(models, dtype=np.float64)
    k = mod.shape[0]
    pops = np.asarray(populations, dtype=np.int64)
    n = int(pops.sum())
    size_on = dmin_nm is not None and dmax_nm is not None
    if size_on:
        if not (0 < float(dmin_nm) < float(dmax_nm)):
            raise InputError("--dmin-nm/--dmax-nm", f"bad diameter range {dmin_nm}..{dmax_nm} nm", "give 0 < dmin < dmax")
        if None in (pixel_size_m, distance_m, wavelength_m) or not all(
                np.isfinite(v) and v > 0 for v in (pixel_size_m, distance_m, wavelength_m)):
            raise InputError("classes.h5", "no detector geometry (pixel size, distance, wavelength) for the size criterion",
                             "classify shots whose CXI files hold the geometry, or select manually")
    sym, ang, aniso = symmetry_scores(mod, grid)
    if profiles is not None and profile_radii is not None:
        profs = np.asarray(profiles, dtype=np.float64)
        radii = np.asarray(profile_radii, dtype=np.float64)
        use = np.ones(radii.size, bool)
    else:
        profs = mod.mean(axis=2)
        radii = grid.radii
        use = np.arange(grid.n_rings) >= FIT_MARGIN_RINGS
    med = np.full(k, np.nan)
    kept = pops.copy()
    if frames is not None and "misfit" in frames.columns:
        cls = frames["class"].to_numpy(np.int64) - 1
        mis_f = frames["misfit"].to_numpy(np.float64)
        ok_f = _misfit_ok(mis_f, max_misfit)
        for c in range(k):
            sel = cls == c
            if sel.any() and np.isfinite(mis_f[sel]).any():
                med[c] = float(np.nanmedian(mis_f[sel]))
            kept[c] = int(np.count_nonzero(sel & ok_f))
    rows = []
    for c in range(k):
        prof = profs[c]
        vis = fringe_visibility(prof[use], radii[use])
        if size_on:
            d, mis = fit_sphere_profile(prof[use], radii[use], pixel_size_m=pixel_size_m, distance_m=distance_m,
                                             wavelength_m=wavelength_m, dmin_nm=0.5 * float(dmin_nm),
                                             dmax_nm=2.0 * float(dmax_nm))
        else:
            d = mis = float("nan")
        frac = pops[c] / max(n, 1)
        p_pop = True
        if min_frames is not None:
            p_pop &= bool(kept[c] >= min_frames)
        if min_fraction is not None:
            p_pop &= bool(kept[c] / max(n, 1) >= min_fraction)
        p_size = bool(size_on and np.isfinite(d) and dmin_nm <= d <= dmax_nm) if size_on else True
        p_fr = True if min_visibility is None else bool(np.isfinite(vis) and vis >= min_visibility)
        p_sym = True if min_symmetry is None else bool(sym[c] >= min_symmetry)
        p_fit = not (max_misfit is not None and np.isfinite(max_misfit) and med[c] > max_misfit)
        reasons = []
        if not p_pop:
            what = f"frames that fit the class {kept[c]}" if kept[c] != pops[c] else f"population {pops[c]}"
            reasons.append(f"{what} < {max(min_frames or 0, math.ceil((min_fraction or 0) * n))}")
        if not p_size:
            reasons.append("size not fitted" if not np.isfinite(d) else f"diameter {d:.1f} nm outside {dmin_nm:g}-{dmax_nm:g}")
        if not p_fr:
            reasons.append(f"fringe visibility {vis:.2f} < {min_visibility:g}")
        if not p_sym:
            reasons.append(f"symmetry {sym[c]:.3f} < {min_symmetry:g}")
        if not p_fit:
            reasons.append(f"median frame misfit {med[c]:.2f} > {max_misfit:g}")
        rows.append({
            "class": c + 1, "population": int(pops[c]), "fraction": float(frac), "diameter_nm": d,
            "size_misfit": mis, "fringe_visibility": vis, "symmetry": float(sym[c]),
            "symmetry_angle_deg": float(ang[c]), "anisotropy": float(aniso[c]), "median_misfit": med[c],
            "frames_kept": int(kept[c]), "pass_population": p_pop,
            "pass_size": p_size, "pass_fringes": p_fr, "pass_symmetry": p_sym, "pass_fit": p_fit,
            "selected": p_pop and p_size and p_fr and p_sym and p_fit, "reason": "; ".join(reasons) or "ok",
        })
    return pd.DataFrame(rows, columns=SCORE_COLUMNS)


def auto_select(scores: pd.DataFrame) -> list[int]:
    """1-based numbers of the classes whose ``selected`` is true."""
    return [int(c) for c in scores.loc[scores["selected"].astype(bool), "class"]]


# ---------------------------------------------------------------------------------------
# manual selection files
# ---------------------------------------------------------------------------------------
EXAMPLE_YAML = "classes: [1, 4, 7]"


def _valid_text(n_classes: int, populations=None) -> str:
    if populations is not None and len(populations) == n_classes:
        listing = ", ".join(f"{i + 1} ({int(p)} frames)" for i, p in enumerate(populations))
        return f"valid classes are 1..{n_classes}: {listing}"
    return f"valid classes are 1..{n_classes}"


def validate_classes(classes, n_classes: int, source="classes", populations=None) -> list[int]:
    """Check 1-based class numbers against ``n_classes``; sorted unique list or :class:`InputError`."""
    vals = []
    for c in classes:
        if isinstance(c, bool) or not isinstance(c, (int, np.integer)) and not (isinstance(c, float) and float(c).is_integer()):
            try:
                c = int(str(c).strip())
            except ValueError:
                raise InputError(source, f"class {c!r} is not a whole number",
                                 f"list 1-based class numbers, e.g. {EXAMPLE_YAML}; {_valid_text(n_classes, populations)}") from None
        vals.append(int(c))
    if not vals:
        raise InputError(source, "no classes selected",
                         f"list at least one class, e.g. {EXAMPLE_YAML}; {_valid_text(n_classes, populations)}")
    bad = sorted({v for v in vals if v < 1 or v > n_classes})
    if bad:
        raise InputError(source, f"class(es) {', '.join(map(str, bad))} do not exist (the classification has {n_classes} classes)",
                         _valid_text(n_classes, populations))
    return sorted(set(vals))


def read_selection(path, n_classes: int, populations=None) -> list[int]:
    """Classes (1-based) of a selection YAML ``classes: [1, 4, 7]``, checked against ``n_classes``."""
    import yaml  # noqa: PLC0415

    path = Path(path)
    if not path.is_file():
        raise InputError(path, "selection file not found", f"write it with the classes to keep, e.g. {EXAMPLE_YAML}")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise InputError(path, f"not valid YAML ({str(exc).splitlines()[0]})", f"write e.g. {EXAMPLE_YAML}") from None
    if isinstance(doc, dict) and "classes" in doc:
        classes = doc["classes"]
    else:
        raise InputError(path, "no 'classes' key", f"write the classes to keep as {EXAMPLE_YAML}")
    if classes is None:
        classes = []
    if isinstance(classes, (int, str)) and not isinstance(classes, bool):
        classes = str(classes).replace(",", " ").split()
    if not isinstance(classes, list):
        raise InputError(path, f"'classes' must be a list, got {type(classes).__name__}", f"write e.g. {EXAMPLE_YAML}")
    return validate_classes(classes, n_classes, path, populations)


def selection_yaml(classes, n_classes: int, *, mode: str, source=None, scores: pd.DataFrame | None = None) -> str:
    """The text of a selection file (the form a user writes, with explanatory comments)."""
    lines = [f"# SPI 2D class selection ({mode}); class numbers are 1-based, as in gallery.png"]
    if source:
        lines.append(f"# classification: {source} ({n_classes} classes)")
    if scores is not None:
        lines.append("# class  frames  diameter_nm  fringes  symmetry  selected  reason")
        for r in scores.itertuples(index=False):
            lines.append(f"#  {r[0]:>4}  {r.population:>6}  {r.diameter_nm:>11.1f}  {r.fringe_visibility:>7.2f}  "
                         f"{r.symmetry:>8.3f}  {'yes' if r.selected else 'no':>8}  {r.reason}")
    lines.append("classes: [" + ", ".join(str(int(c)) for c in classes) + "]")
    return "\n".join(lines) + "\n"


def write_selection(path, classes, n_classes: int, *, mode: str = "manual", source=None, scores=None, populations=None) -> Path:
    """Validate ``classes`` (1-based) and write the selection YAML atomically."""
    classes = validate_classes(classes, n_classes, "--classes", populations)
    write_text(path, selection_yaml(classes, n_classes, mode=mode, source=source, scores=scores))
    return Path(path)


def _misfit_ok(misfit, max_misfit):
    m = np.asarray(misfit, dtype=np.float64)
    if max_misfit is None or not np.isfinite(max_misfit):
        return np.ones(m.shape, bool)
    return ~(m > max_misfit)  # NaN (not computed) passes


def selected_frames(assignments: pd.DataFrame, classes, max_misfit=MAX_FRAME_MISFIT) -> pd.DataFrame:
    """Rows (``file``, ``frame``, ``class``) of the frames in ``classes`` (1-based) whose ``misfit`` to
    their class is at most ``max_misfit`` (None or inf: no frame-level criterion), in input order."""
    keep = np.array(assignments["class"].isin([int(c) for c in classes]).to_numpy(), dtype=bool)
    if "misfit" in assignments.columns:
        keep &= _misfit_ok(assignments["misfit"].to_numpy(np.float64), max_misfit)
    return assignments.loc[keep, ["file", "frame", "class"]].reset_index(drop=True)
