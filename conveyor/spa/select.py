"""Selection of good 2D classes: automatic (interpretable features + a trained model) or manual.

Features (one row per class)
----------------------------
``R`` is the mask radius in px (half the particle diameter given to the classifier).

No feature depends on the image scale (pixel size, box, mask radius in px), on the
absolute signal-to-noise ratio (dose, detector, ice thickness, defocus) or on the class
populations (which follow the number of classes asked for rather than the quality of a
class): the one density feature, ``contrast_rel``, is relative to the other classes of the
same classification.

* ``resolution_rel`` — log of the class's estimated resolution (SSNR = 1, Å) over the
  particle diameter: good classes resolve features much finer than the particle;
* ``resolution_nyquist`` — ``2 × pixel / resolution`` (1 at Nyquist);
* ``contrast_rel`` — log of the class's core density (mean of the average over ``r < 0.5 R``)
  over the particle-weighted median core density of all classes of the classification.
  All classes of one classification share the specimen, pixel size, dose, ice, CTFs and
  normalisation, so the ratio cancels them (the absolute density in units of the images'
  noise changes several-fold between a bin-4 and a full-size box): protein classes lie near
  0 as long as most particles are in particle classes, ice, contamination and aggregates
  are several times denser, empty classes and carbon edges fainter;
* ``com_offset`` — distance of the centre of mass of the positive density from the box
  centre, over ``R`` (off-centre particles);
* ``gyration`` — radius of gyration of the positive density over ``R`` (small blobs,
  aggregates that fill the mask);
* ``extent`` — radius enclosing 90 % of the positive density, over ``R``;
* ``edge_fraction`` — share of the image energy in the outer ring ``0.8 R … R`` (density
  running into the mask edge: aggregates, carbon, neighbours);
* ``ring_ratio`` — mean density of the outer ring over that of the core (objects larger
  than the mask);
* ``core_contrast`` — mean of the core (``r < 0.5 R``) minus mean of the outer ring, over the
  standard deviation inside the mask (empty, noise classes);
* ``peak_ratio`` — maximum over mean of the positive density inside the mask (flat
  plateaus of amplitude objects versus peaked protein density);
* ``roundness`` — correlation of the image with its rotational average (ice balls,
  mixed-view blurs);
* ``symmetry`` — best correlation with itself rotated by 360°/n, n = 2…6;
* ``anisotropy`` — share of the variance explained by the best one-dimensional profile
  (straight edges: carbon);
* ``detail`` — share of the power at spatial frequencies above ``min(3 / R, 1/4)`` cycles/px
  among those above 1 / (2R) (internal structure: domains in a coarse first-round box,
  secondary structure in a fine one);
* ``negative_fraction`` — share of the absolute density that is negative (protein is
  white; amplitude objects through the Wiener filter are not).

Model
-----
A gradient-boosted ensemble of shallow decision trees (scikit-learn's
``GradientBoostingClassifier``, trained by :mod:`conveyor.spa.selector_training` on
simulated good and junk classes) stored as plain JSON (:class:`SelectorModel`): prediction
needs only numpy. The score of a class is the model's probability that it holds particles.

Particle outliers
-----------------
Within the chosen classes, :func:`misfit_outliers` flags particles whose misfit (χ² excess
over the noise model, ``cvMisfit``) is far above that of their class mates — junk that
landed in a particle class (``conveyor spa select --outlier-sigma``).

Manual selection
----------------
A YAML file ``classes: [1, 4, 7]`` (1-based class numbers as in the gallery and
rlnClassNumber), read by :func:`read_selection`; numbers that are not classes raise
:class:`~conveyor.errors.InputError` listing the valid ones.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from ..errors import InputError

FEATURES = ("resolution_rel", "resolution_nyquist", "contrast_rel", "com_offset", "gyration", "extent",
            "edge_fraction", "ring_ratio", "core_contrast", "peak_ratio", "roundness", "symmetry", "anisotropy", "detail",
            "negative_fraction")

DEFAULT_MODEL = Path(__file__).resolve().parent.parent.parent / "resources" / "class_selector.json"
"""The selector trained by ``conveyor spa train-selector --out resources/class_selector.json``."""


# --------------------------------------------------------------------------- features
def _rotate(img, angle_deg):
    from scipy.ndimage import rotate  # noqa: PLC0415

    return rotate(img, angle_deg, reshape=False, order=1, mode="constant")


def _corr(a, b, w):
    a = (a - (a * w).sum() / w.sum()) * w
    b = (b - (b * w).sum() / w.sum()) * w
    den = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / den) if den > 0 else 0.0


def image_features(image, radius_px: float) -> dict:
    """Shape features of one class average ``[B, B]`` (centre ``B // 2``) with mask radius ``radius_px``.

    Also ``core_density``: the mean of the (unscaled) average over ``r < 0.5 R``, from which
    :func:`class_features` forms ``contrast_rel``.
    """
    a = np.asarray(image, dtype=np.float64)
    b = a.shape[-1]
    c = b // 2
    yy, xx = np.mgrid[0:b, 0:b].astype(np.float64) - c
    r = np.hypot(xx, yy)
    rad = float(min(max(radius_px, 3.0), b / 2 - 1))
    inside = r <= rad
    w = inside.astype(float)
    sd = a[inside].std()
    if not np.isfinite(sd) or sd <= 0:
        return {"core_density": 0.0, "com_offset": 1.0, "gyration": 1.0, "extent": 1.0, "edge_fraction": 0.0,
                "ring_ratio": 0.0, "core_contrast": 0.0, "peak_ratio": 1.0, "roundness": 0.0, "symmetry": 0.0, "anisotropy": 0.0,
                "detail": 0.0, "negative_fraction": 0.5}
    a = a / sd
    ring = inside & (r > 0.8 * rad)
    core = r < 0.5 * rad
    pos = np.clip(a, 0.0, None) * w
    tot = pos.sum()
    if tot > 0:
        cx, cy = (pos * xx).sum() / tot, (pos * yy).sum() / tot
        com = float(np.hypot(cx, cy) / rad)
        gyr = float(np.sqrt((pos * ((xx - cx) ** 2 + (yy - cy) ** 2)).sum() / tot) / rad)
    else:
        com, gyr = 1.0, 1.0
    if tot > 0:
        order = np.argsort(r[inside])
        cum = np.cumsum(pos[inside][order]) / tot
        extent = float(r[inside][order][min(np.searchsorted(cum, 0.9), order.size - 1)] / rad)
        peak = float(pos.max() / (tot / max(inside.sum(), 1)))
    else:
        extent, peak = 1.0, 1.0
    energy = (a * a * w).sum()
    edge = float((a[ring] ** 2).sum() / energy) if energy > 0 else 0.0
    contrast = float(a[core].mean() - a[ring].mean()) if core.any() and ring.any() else 0.0
    # rotational average
    ri = np.rint(r).astype(int)
    prof = np.bincount(ri.ravel(), weights=a.ravel()) / np.maximum(np.bincount(ri.ravel()), 1)
    roundness = _corr(a, prof[ri], w)
    sym = max(_corr(a, _rotate(a, 360.0 / nfold), w) for nfold in (2, 3, 4, 5, 6))
    # best 1D profile: projection along a direction, explained variance
    am = (a - (a * w).sum() / w.sum()) * w
    var = (am * am).sum()
    best = 0.0
    for ang in np.arange(0.0, 180.0, 11.25):
        t = np.deg2rad(ang)
        u = np.rint((xx * np.cos(t) + yy * np.sin(t)) + c).astype(int)
        u = np.clip(u, 0, 2 * c + 1)
        s = np.bincount(u[inside], weights=am[inside], minlength=2 * c + 2)
        cnt = np.bincount(u[inside], minlength=2 * c + 2)
        fit = np.where(cnt > 0, s / np.maximum(cnt, 1), 0.0)
        explained = (fit[u[inside]] ** 2).sum()
        best = max(best, explained / var if var > 0 else 0.0)
    # power above min(3 / R, 1/4) cycles/px among the power above 1 / (2R)
    pw = np.abs(np.fft.rfft2(a * w)) ** 2
    fy = np.fft.fftfreq(b)[:, None]
    fx = np.fft.rfftfreq(b)[None, :]
    k = np.hypot(fy, fx)
    lo = k > 1.0 / (2 * rad)
    hi = k > min(3.0 / rad, 0.25)
    detail = float(pw[hi].sum() / pw[lo].sum()) if pw[lo].sum() > 0 else 0.0
    absd = np.abs(a[inside]).sum()
    neg = float(-a[inside][a[inside] < 0].sum() / absd) if absd > 0 else 0.5
    raw = np.asarray(image, dtype=np.float64)
    core_mean = float(raw[core].mean()) if core.any() else 0.0
    ring_mean = float(raw[ring].mean()) if ring.any() else 0.0
    ring_ratio = float(np.clip(ring_mean / core_mean, -2.0, 2.0)) if core_mean > 0 else 2.0
    return {"core_density": core_mean, "com_offset": com, "gyration": gyr, "extent": extent,
            "edge_fraction": edge, "ring_ratio": ring_ratio, "core_contrast": contrast, "peak_ratio": peak,
            "roundness": roundness, "symmetry": sym, "anisotropy": float(best), "detail": detail,
            "negative_fraction": neg}


def class_features(averages, counts, resolution, pixel_size: float, particle_diameter: float) -> pd.DataFrame:
    """Feature table (:data:`FEATURES`, one row per class, index = class number 1..K).

    ``averages`` ``[K, B, B]``; ``counts`` particles per class (checked for length only: no
    feature depends on the class populations, which follow the number of classes asked for
    rather than the quality of a class); ``resolution`` Å per class; ``particle_diameter`` Å
    (the mask diameter of the classification).
    """
    avg = np.asarray(averages, dtype=np.float64)
    if avg.ndim == 2:
        avg = avg[None]
    k = avg.shape[0]
    counts = np.asarray(counts, dtype=float).reshape(-1)
    res = np.asarray(resolution, dtype=float).reshape(-1)
    if len(counts) != k or len(res) != k:
        raise InputError("classes", f"{k} class averages but {len(counts)} counts and {len(res)} resolutions",
                         "pass one count and one resolution per class")
    if not (pixel_size > 0 and particle_diameter > 0):
        raise InputError("classes", "pixel size and particle diameter must be positive", "give both in Å")
    radius_px = 0.5 * particle_diameter / pixel_size
    rows = []
    for i in range(k):
        rr = res[i] if np.isfinite(res[i]) and res[i] > 0 else avg.shape[-1] * pixel_size
        f = {"resolution_rel": float(np.log(rr / particle_diameter)),
             "resolution_nyquist": float(min(2.0 * pixel_size / rr, 1.0))}
        f.update(image_features(avg[i], radius_px))
        rows.append(f)
    table = pd.DataFrame(rows, index=pd.RangeIndex(1, k + 1, name="class"))
    table["contrast_rel"] = relative_contrast(table["core_density"].to_numpy(), counts)
    return table[list(FEATURES)]


def weighted_median(values, weights) -> float:
    """The value below and above which half of the total weight lies (lower one on a tie)."""
    v = np.asarray(values, dtype=float)
    w = np.asarray(weights, dtype=float)
    order = np.argsort(v)
    cum = np.cumsum(w[order])
    return float(v[order][min(np.searchsorted(cum, 0.5 * cum[-1]), len(v) - 1)])


def relative_contrast(core_density, counts) -> np.ndarray:
    """``contrast_rel``: log of each class's core density over the particle-weighted median of all of them.

    Classes without particles do not count towards the median (all count equally when no
    class has particles). Densities are floored at 1/1000 of the largest magnitude, so
    empty and negative cores give a large negative value instead of a missing one; the
    result is clipped to ±8.
    """
    core = np.asarray(core_density, dtype=float)
    w = np.clip(np.asarray(counts, dtype=float), 0.0, None)
    if not (w > 0).any():
        w = np.ones_like(core)
    floor = max(1e-3 * float(np.abs(core).max()), 1e-12)
    ref = max(weighted_median(core, w), floor)
    return np.clip(np.log(np.maximum(core, floor) / ref), -8.0, 8.0)


# --------------------------------------------------------------------------- model
@dataclasses.dataclass
class SelectorModel:
    """Gradient-boosted trees as arrays: ``score = sigmoid(init + rate · Σ_trees leaf value)``."""

    features: tuple
    init: float
    learning_rate: float
    trees: list  # each: dict of lists feature, threshold, left, right, value
    meta: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def from_sklearn(cls, clf, features) -> "SelectorModel":
        """From a fitted binary ``GradientBoostingClassifier`` (log-loss, prior init)."""
        prior = float(clf.init_.class_prior_[1])
        trees = []
        for est in clf.estimators_[:, 0]:
            t = est.tree_
            trees.append({"feature": t.feature.tolist(), "threshold": [float(v) for v in t.threshold],
                          "left": t.children_left.tolist(), "right": t.children_right.tolist(),
                          "value": [float(v) for v in t.value[:, 0, 0]]})
        return cls(tuple(features), float(np.log(prior / (1.0 - prior))), float(clf.learning_rate), trees)

    def raw(self, x) -> np.ndarray:
        x = np.atleast_2d(np.asarray(x, dtype=np.float64))
        out = np.full(len(x), self.init)
        for t in self.trees:
            feat, thr = np.asarray(t["feature"]), np.asarray(t["threshold"])
            left, right, val = np.asarray(t["left"]), np.asarray(t["right"]), np.asarray(t["value"])
            node = np.zeros(len(x), dtype=int)
            for _ in range(64):
                leaf = left[node] < 0
                if leaf.all():
                    break
                f = np.where(leaf, 0, feat[node])
                go_left = x[np.arange(len(x)), f] <= thr[node]
                node = np.where(leaf, node, np.where(go_left, left[node], right[node]))
            out += self.learning_rate * val[node]
        return out

    def predict_proba(self, x) -> np.ndarray:
        """Probability that each row (features in :attr:`features` order) is a good class."""
        return 1.0 / (1.0 + np.exp(-self.raw(x)))

    def to_dict(self) -> dict:
        return {"format": "conveyor-class-selector", "version": 1, "kind": "gradient_boosted_trees",
                "features": list(self.features), "init": self.init, "learning_rate": self.learning_rate,
                "trees": self.trees, **({"meta": self.meta} if self.meta else {})}

    @classmethod
    def from_dict(cls, d: dict, source=None) -> "SelectorModel":
        if d.get("format") != "conveyor-class-selector" or d.get("kind") != "gradient_boosted_trees":
            raise InputError(source, "not a Conveyor class-selector model",
                             "train one with `conveyor spa train-selector --out FILE`")
        feats = tuple(d["features"])
        unknown = [f for f in feats if f not in FEATURES]
        if unknown:
            raise InputError(source, f"the model uses unknown features {unknown}",
                             "retrain it with this version: conveyor spa train-selector")
        return cls(feats, float(d["init"]), float(d["learning_rate"]), list(d["trees"]),
                   {k: v for k, v in d.items() if k == "training"})


def load_model(path=None) -> SelectorModel:
    """The selector stored at ``path`` (default :data:`DEFAULT_MODEL`)."""
    p = Path(path) if path is not None else DEFAULT_MODEL
    if not p.exists():
        raise InputError(p, "class-selector model not found",
                         "train it: conveyor spa train-selector --out resources/class_selector.json")
    try:
        d = json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(p, f"cannot read the selector model ({exc})", "retrain it with conveyor spa train-selector") from None
    return SelectorModel.from_dict(d, p)


# --------------------------------------------------------------------------- selection
@dataclasses.dataclass
class Selection:
    """Result of :func:`select_classes`."""

    selected: list  # class numbers (1-based), ascending
    scores: pd.DataFrame  # per class: count, resolution, score, selected, features
    mode: str
    threshold: float


def check_class_numbers(classes, n_classes: int, source=None) -> list[int]:
    """1-based class numbers as sorted unique ints; :class:`InputError` listing the valid ones otherwise."""
    valid = f"valid class numbers are 1..{n_classes}"
    out = []
    for c in classes:
        try:
            v = int(c)
            if v != float(c):
                raise ValueError
        except (TypeError, ValueError):
            raise InputError(source, f"class {c!r} is not a whole number", f"{valid} (as numbered in the gallery)") from None
        out.append(v)
    bad = sorted({v for v in out if not 1 <= v <= n_classes})
    if bad:
        raise InputError(source, f"class(es) {', '.join(map(str, bad))} do not exist ({n_classes} classes)",
                         f"{valid} (as numbered in the gallery, 1 = most particles)")
    if not out:
        raise InputError(source, "no classes selected", f"list at least one class; {valid}")
    return sorted(set(out))


def read_selection(path, n_classes: int) -> list[int]:
    """Class numbers from a selection YAML (``classes: [1, 4, 7]``), checked against ``n_classes``."""
    p = Path(path)
    if not p.exists():
        raise InputError(p, "selection file does not exist",
                         "write it with the good classes, e.g. `classes: [1, 4, 7]`, or use conveyor select spa")
    try:
        doc = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise InputError(p, f"not valid YAML ({str(exc).splitlines()[0]})", "write e.g. `classes: [1, 4, 7]`") from None
    if not isinstance(doc, dict) or "classes" not in doc:
        raise InputError(p, "no `classes:` list", "write e.g. `classes: [1, 4, 7]` (1-based, as in the gallery)")
    classes = doc["classes"]
    if isinstance(classes, (int, str)):
        classes = [classes]
    if not isinstance(classes, list):
        raise InputError(p, "`classes:` must be a list of class numbers", "write e.g. `classes: [1, 4, 7]`")
    return check_class_numbers(classes, n_classes, p)


def selection_yaml(classes, *, comment: str = "") -> str:
    """The selection file text: optional ``#`` comment lines, then ``classes: [1, 4, 7]``."""
    head = "".join(f"# {ln}\n" for ln in comment.splitlines()) if comment else ""
    return head + "classes: [" + ", ".join(str(int(c)) for c in classes) + "]\n"


def misfit_outliers(classes, misfit, sigma: float = 3.5, min_members: int = 5):
    """Particles that their own class explains much worse than its other members.

    ``misfit`` is :attr:`conveyor.spa.classify2d.Class2DResult.misfit` (cvMisfit in the STAR
    file): the χ² excess of the best hypothesis over pure noise. Within each class the robust
    z-score ``(misfit - median) / (1.4826 · MAD)`` is computed; particles above ``sigma`` are
    outliers (aggregates, carbon edges, ice sitting in a particle class). Classes with fewer
    than ``min_members`` particles are left alone. Returns a boolean array.
    """
    cls = np.asarray(classes)
    mis = np.asarray(misfit, dtype=float)
    out = np.zeros(len(cls), dtype=bool)
    if sigma is None or sigma <= 0:
        return out
    for c in np.unique(cls):
        sel = cls == c
        if sel.sum() < min_members:
            continue
        med = np.median(mis[sel])
        mad = 1.4826 * np.median(np.abs(mis[sel] - med))
        if mad <= 0:
            continue
        out[sel] = (mis[sel] - med) / mad > sigma
    return out


def select_classes(averages, counts, resolution, pixel_size: float, particle_diameter: float, mode: str = "auto",
                   manual_classes=None, *, threshold: float = 0.5, model=None, min_particles: int = 1) -> Selection:
    """Choose the good classes.

    Parameters
    ----------
    averages : ``[K, B, B]`` class averages (class ``c`` is ``averages[c - 1]``).
    counts : particles per class.  resolution : Å per class (rlnEstimatedResolution).
    pixel_size : Å/px.  particle_diameter : Å, the mask diameter used for classification.
    mode : ``"auto"`` (score ≥ ``threshold``) or ``"manual"`` (``manual_classes``, 1-based).
    model : :class:`SelectorModel`, a path, or None for :data:`DEFAULT_MODEL` (auto only).
    min_particles : classes with fewer particles are never selected automatically.

    Returns a :class:`Selection`; in both modes every class gets its features and score (NaN
    in manual mode when the model cannot be loaded).
    """
    avg = np.asarray(averages)
    k = avg.shape[0] if avg.ndim == 3 else 1
    if mode not in ("auto", "manual"):
        raise InputError("--mode", f"unknown selection mode {mode!r}", "use auto or manual")
    feats = class_features(avg, counts, resolution, pixel_size, particle_diameter)
    try:
        if model is None or isinstance(model, (str, Path)):
            model = load_model(model)
        missing = [f for f in model.features if f not in feats.columns]
        if missing:
            raise InputError("model", f"features {missing} are not computed", "retrain the selector")
        score = model.predict_proba(feats[list(model.features)].to_numpy(float))
    except InputError:
        if mode == "auto":
            raise
        score = np.full(k, np.nan)  # manual choice: the scores are only informative
    counts_a = np.asarray(counts, dtype=float).reshape(-1)
    if mode == "manual":
        if manual_classes is None:
            raise InputError("--selection", "manual selection needs the class numbers", "give e.g. classes: [1, 4, 7]")
        chosen = check_class_numbers(manual_classes, k)
    else:
        ok = (score >= threshold) & (counts_a >= min_particles)
        chosen = [int(i + 1) for i in np.flatnonzero(ok)]
    table = pd.DataFrame({"class": np.arange(1, k + 1), "particles": counts_a.astype(int),
                          "resolution": np.asarray(resolution, dtype=float).reshape(-1), "score": score,
                          "selected": np.isin(np.arange(1, k + 1), chosen)})
    table = pd.concat([table, feats.reset_index(drop=True)], axis=1)
    return Selection(selected=chosen, scores=table, mode=mode, threshold=float(threshold))
