"""Post-processing of two half maps: solvent mask, corrected FSC, B-factor, sharpened map, hand.

Method (RELION's ``relion_postprocess``)
----------------------------------------
* **Mask** (unless one is given): the average of the half maps low-passed to
  ``mask_lowpass`` Å, thresholded (default: the solvent level plus a quarter of the way to
  the 99th percentile of the density inside the particle sphere), the largest connected
  region kept, extended by ``mask_extend`` Å and given a raised-cosine edge of
  ``mask_soft_edge`` Å.
* **FSC**: unmasked and masked FSC of the half maps; both half maps are phase-randomised
  beyond the shell where the unmasked FSC first falls below 0.8 (``randomize_at``), masked
  and correlated (``FSC_n``); the corrected curve is
  ``FSC_true = (FSC_t − FSC_n) / (1 − FSC_n)`` beyond that shell + 2 (Chen et al. 2013).
  The resolution is where ``FSC_true`` falls below 0.143.
* **B-factor** (``bfactor="auto"``): a straight line fitted to the Guinier plot
  ``ln ⟨|F|⟩_shell`` against ``s² = 1/d²`` of the masked average map between
  ``autob_lowres`` (10 Å) and the resolution (a map whose range holds fewer than 3 shells
  gets no B-factor: 0, reported as not fitted; give ``bfactor`` then). RELION's sign:
  ``bfactor = 4 · slope`` is
  negative for a blurred map and is applied as ``exp(-bfactor · s² / 4)``, i.e. it
  sharpens. ``map_bfactor = -bfactor`` is the map's own (positive) B-factor.
* **Sharpened map**: the average map's transform times ``exp(-bfactor s²/4)``, times the
  figure of merit ``sqrt(2 FSC_true / (1 + FSC_true))``, low-passed at the resolution
  (raised-cosine edge of 2 shells); written unmasked and masked.
* **Hand** (with a reference, for validation): the average map and its mirror image
  are each aligned to the reference (:func:`conveyor.spa.fsc.align_to_reference`) and
  compared by FSC; the better one tells whether the map has the reference's hand
  (``"as is"``) or the opposite one (``"mirror"``).
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pandas as pd

from .. import backend
from ..errors import InputError
from . import fsc as F
from .reconstruct import apply_bfactor, lowpass, shell_filter

DEFAULT_RANDOMIZE_AT = 0.8


@dataclasses.dataclass
class PostprocessResult:
    """Everything :func:`postprocess` computes (maps on the halves' device)."""

    sharpened: object
    sharpened_masked: object
    average: object
    mask: object
    mask_auto: bool
    resolution: float
    bfactor: float  # applied, RELION's sign (negative sharpens)
    map_bfactor: float  # the map's own B-factor (= -bfactor for an automatic fit)
    bfactor_auto: bool
    fit_range: tuple  # (low, high) Å of the Guinier fit
    fit_intercept: float
    fit_correlation: float
    randomize_shell: int
    curves: dict  # label -> array over shells
    guinier: pd.DataFrame
    pixel_size: float
    hand: dict | None = None

    def summary(self) -> dict:
        d = {
            "resolution_A": round(self.resolution, 3),
            "bfactor_applied_A2": round(self.bfactor, 2),
            "map_bfactor_A2": round(self.map_bfactor, 2),
            "bfactor_auto": self.bfactor_auto,
            "guinier_fit_range_A": [round(v, 2) for v in self.fit_range] if self.fit_range else None,
            "guinier_fit_correlation": round(self.fit_correlation, 4) if math.isfinite(self.fit_correlation) else None,
            "randomise_from_shell": int(self.randomize_shell),
            "randomise_from_A": round(self.box * self.pixel_size / max(self.randomize_shell, 1), 2),
            "mask": "auto" if self.mask_auto else "given",
            "resolution_unmasked_A": round(F.resolution_at(self.curves["rlnFourierShellCorrelationUnmaskedMaps"],
                                                           0.143, self.pixel_size, self.box), 3),
        }
        if self.bfactor_auto and not self.fit_range:
            d["bfactor_note"] = (f"not fitted: fewer than 3 shells between the Guinier range's low end and "
                                 f"{self.resolution:.1f} Å; pass --bfactor")
        if self.hand:
            d["hand"] = self.hand
        return d

    @property
    def box(self) -> int:
        return int(self.average.shape[0])


# --------------------------------------------------------------------------- mask
def auto_mask(volume, pixel_size: float, *, threshold: float | None = None, lowpass_resolution: float = 15.0,
              extend: float = 6.0, soft_edge: float = 9.0, particle_diameter: float | None = None):
    """Soft solvent mask of a map (see the module docstring); ``extend``/``soft_edge`` in Å.

    Returns ``(mask, threshold_used)``; the mask is float32 in [0, 1] on the map's device.
    """
    from scipy import ndimage  # noqa: PLC0415

    xp = backend.array_module(volume)
    v = backend.to_host(xp.asarray(volume, dtype=xp.float32))
    n = v.shape[0]
    lp = max(float(lowpass_resolution), 2.5 * pixel_size)
    vl = backend.to_host(lowpass(xp.asarray(v), lp, pixel_size, edge_shells=2.0))
    g = np.arange(n) - n // 2
    r = np.sqrt(g[:, None, None] ** 2 + g[None, :, None] ** 2 + g[None, None, :] ** 2)
    radius = 0.5 * particle_diameter / pixel_size if particle_diameter else 0.4 * n
    inside = r <= radius
    outside = r > min(radius + 2.0, 0.48 * n)
    solvent = float(np.median(vl[outside])) if outside.any() else 0.0
    if threshold is None:
        top = float(np.percentile(vl[inside], 99.0))
        threshold = solvent + 0.25 * (top - solvent)
    binary = vl > threshold
    if not binary.any():
        raise InputError("--mask-threshold", f"no voxel of the map is above the threshold {threshold:.4g}",
                         "lower --mask-threshold or give --mask")
    lab, nlab = ndimage.label(binary)
    if nlab > 1:
        sizes = ndimage.sum(binary, lab, index=np.arange(1, nlab + 1))
        binary = lab == (int(np.argmax(sizes)) + 1)
    ext = max(extend / pixel_size, 0.0)
    soft = max(soft_edge / pixel_size, 1.0)
    dist = ndimage.distance_transform_edt(~binary)
    t = np.clip((dist - ext) / soft, 0.0, 1.0)
    mask = 0.5 * (1.0 + np.cos(np.pi * t))
    mask[dist <= ext] = 1.0
    return xp.asarray(mask.astype(np.float32)), float(threshold)


# --------------------------------------------------------------------------- Guinier / B-factor
def guinier_curve(volume, pixel_size: float) -> pd.DataFrame:
    """Per shell: ``s²`` (1/Å²) and ``ln ⟨|F|⟩`` of the map (shells 1 .. N // 2)."""
    xp = backend.array_module(volume)
    from .projection import fft_module  # noqa: PLC0415

    fft = fft_module(xp)
    v = xp.asarray(volume, dtype=xp.float32)
    n = v.shape[0]
    amp = xp.abs(fft.rfftn(v))
    shells = F.shell_index_3d(n, xp)
    w = F.hermitian_weights_3d(n, xp)
    ns = F.n_shells(n)
    tot = F.shell_sums(amp, shells, w, ns)
    cnt = F.shell_sums(xp.ones_like(amp), shells, w, ns)
    mean = tot / np.maximum(cnt, 1)
    s = F.shell_frequencies(n, pixel_size)
    with np.errstate(divide="ignore"):
        ln = np.where(mean > 0, np.log(np.where(mean > 0, mean, 1.0)), -np.inf)
    return pd.DataFrame({"rlnSpectralIndex": np.arange(ns), "rlnResolutionSquared": s * s, "rlnLogAmplitudes": ln}).iloc[1:]


def fit_bfactor(volume, pixel_size: float, high: float, low: float = 10.0):
    """Guinier fit of a map between ``low`` and ``high`` Å.

    Returns ``(bfactor, intercept, (low, high), correlation)`` with RELION's sign
    (``4 × slope``, negative for a blurred map). When the range holds fewer than 3 shells
    (a map worse than about ``low``, where the Guinier plot shows the particle's shape
    rather than a B-factor) nothing is fitted: ``(0.0, nan, None, nan)``, as RELION.
    """
    g = guinier_curve(volume, pixel_size)
    s2 = g["rlnResolutionSquared"].to_numpy()
    ln = g["rlnLogAmplitudes"].to_numpy()
    sel = (s2 >= 1.0 / low**2 - 1e-12) & (s2 <= 1.0 / high**2 + 1e-12) & np.isfinite(ln)
    if high >= low or sel.sum() < 3:
        return 0.0, math.nan, None, math.nan
    slope, intercept = np.polyfit(s2[sel], ln[sel], 1)
    corr = float(np.corrcoef(s2[sel], ln[sel])[0, 1])
    return 4.0 * float(slope), float(intercept), (float(low), float(high)), corr


# --------------------------------------------------------------------------- main
def postprocess(half1, half2, pixel_size: float, *, mask=None, bfactor="auto", reference=None,
                randomize_at: float = DEFAULT_RANDOMIZE_AT, autob_lowres: float = 10.0,
                mask_threshold: float | None = None, mask_lowpass: float = 15.0, mask_extend: float = 6.0,
                mask_soft_edge: float = 9.0, particle_diameter: float | None = None, seed: int = 0,
                align_reference: bool = True) -> PostprocessResult:
    """Post-process two unfiltered half maps (see the module docstring).

    Parameters
    ----------
    half1, half2 : array ``[N, N, N]``
        Unfiltered half maps of a gold-standard refinement.
    pixel_size : float
        Å/px.
    mask : array, optional
        Solvent mask in [0, 1]; default: :func:`auto_mask` of the average map.
    bfactor : "auto" or float
        ``"auto"``: Guinier fit; a number: the B-factor to apply (RELION's
        ``--adhoc_bfac``, negative sharpens).
    reference : array, optional
        A known map on the same grid, for validation only: reports the FSC of the map and of
        its mirror against it (``hand``).
    randomize_at : float
        Phase randomisation starts where the unmasked FSC falls below this value.
    """
    xp = backend.array_module(half1)
    h1 = xp.asarray(half1, dtype=xp.float32)
    h2 = xp.asarray(half2, dtype=xp.float32)
    if h1.shape != h2.shape or h1.ndim != 3 or len(set(h1.shape)) != 1:
        raise InputError("--half2", f"half maps must be cubes of the same size, got {tuple(h1.shape)} and {tuple(h2.shape)}",
                         "pass the two half maps of one refinement")
    n = h1.shape[0]
    avg = 0.5 * (h1 + h2)
    mask_auto = mask is None
    if mask_auto:
        mask, _ = auto_mask(avg, pixel_size, threshold=mask_threshold, lowpass_resolution=mask_lowpass,
                            extend=mask_extend, soft_edge=mask_soft_edge, particle_diameter=particle_diameter)
    else:
        mask = xp.asarray(mask, dtype=xp.float32)
        if mask.shape != h1.shape:
            raise InputError("--mask", f"mask has shape {tuple(mask.shape)}, the maps {tuple(h1.shape)}",
                             "give a mask on the half maps' grid")
        if float(mask.min()) < -1e-3 or float(mask.max()) > 1.0 + 1e-3 or float(mask.max()) <= 0:
            raise InputError("--mask", "mask values must lie in [0, 1] and not all be 0", "give a soft mask from 0 to 1")
    fsc_un = F.fsc(h1, h2)
    fsc_m = F.fsc(h1, h2, mask)
    rshell = F.first_shell_below(fsc_un, randomize_at)
    rshell = min(max(rshell, 1), F.n_shells(n) - 1)
    rng = np.random.default_rng(seed)
    r1 = F.phase_randomize(h1, rshell, rng)
    r2 = F.phase_randomize(h2, rshell, rng)
    fsc_n = F.fsc(r1, r2, mask)
    fsc_true = F.corrected_fsc(fsc_m, fsc_n, rshell)
    resolution = F.resolution_at(fsc_true, 0.143, pixel_size, n)
    masked_avg = avg * mask
    if isinstance(bfactor, str):
        if bfactor != "auto":
            raise InputError("--bfactor", f"unknown value {bfactor!r}", "use auto or a number in Å² (negative sharpens)")
        b, intercept, rng_fit, corr = fit_bfactor(masked_avg, pixel_size, resolution, autob_lowres)
        auto = True
    else:
        b, intercept, rng_fit, corr, auto = float(bfactor), math.nan, None, math.nan, False
    b_fitted = b if auto else fit_bfactor(masked_avg, pixel_size, resolution, autob_lowres)[0]
    b_map = -b_fitted if b_fitted else 0.0  # the map's own B-factor (0: not fitted)
    weight = F.fsc_weighting(fsc_true)
    weight[0] = 1.0
    sharp = shell_filter(avg, weight)
    sharp = apply_bfactor(sharp, b, pixel_size)
    sharp = lowpass(sharp, resolution, pixel_size, edge_shells=2.0)
    g_orig = guinier_curve(masked_avg, pixel_size)
    g_weighted = guinier_curve(shell_filter(masked_avg, weight), pixel_size)
    g_sharp = guinier_curve(sharp * mask, pixel_size)
    guinier = pd.DataFrame({
        "rlnResolutionSquared": g_orig["rlnResolutionSquared"].to_numpy(),
        "rlnLogAmplitudesOriginal": g_orig["rlnLogAmplitudes"].to_numpy(),
        "rlnLogAmplitudesWeighted": g_weighted["rlnLogAmplitudes"].to_numpy(),
        "rlnLogAmplitudesSharpened": g_sharp["rlnLogAmplitudes"].to_numpy(),
    })
    guinier = guinier.replace([np.inf, -np.inf], -99.0)
    curves = {
        "rlnFourierShellCorrelationCorrected": fsc_true,
        "rlnFourierShellCorrelationUnmaskedMaps": fsc_un,
        "rlnFourierShellCorrelationMaskedMaps": fsc_m,
        "rlnCorrectedFourierShellCorrelationPhaseRandomizedMaskedMaps": fsc_n,
    }
    hand = None
    if reference is not None:
        hand = hand_check(avg, reference, pixel_size, align=align_reference)
        curves["cvFourierShellCorrelationReference"] = hand["fsc_as_is"]
        curves["cvFourierShellCorrelationReferenceMirror"] = hand["fsc_mirror"]
        hand = {k: v for k, v in hand.items() if not k.startswith("fsc_")}
    return PostprocessResult(
        sharpened=sharp, sharpened_masked=sharp * mask, average=avg, mask=mask, mask_auto=mask_auto,
        resolution=resolution, bfactor=b, map_bfactor=b_map, bfactor_auto=auto, fit_range=rng_fit,
        fit_intercept=intercept, fit_correlation=corr, randomize_shell=int(rshell), curves=curves, guinier=guinier,
        pixel_size=float(pixel_size), hand=hand)


def hand_check(volume, reference, pixel_size: float, *, align: bool = True, resolution: float | None = None) -> dict:
    """FSC against a reference of the map as it is and of its mirror image (each aligned first).

    Returns ``{"hand": "as is" | "mirror", "resolution_as_is", "resolution_mirror"`` (FSC 0.5, Å),
    ``"cc_as_is", "cc_mirror", "fsc_as_is", "fsc_mirror"}``.
    """
    xp = backend.array_module(volume)
    ref = xp.asarray(reference, dtype=xp.float32)
    if tuple(ref.shape) != tuple(volume.shape):
        raise InputError("--reference", f"reference has shape {tuple(ref.shape)}, the maps {tuple(volume.shape)}",
                         "resample the reference to the maps' box and pixel size")
    out = {}
    for name, v in (("as_is", volume), ("mirror", F.mirror_volume(volume))):
        if align:
            v, info = F.align_to_reference(v, ref, pixel_size, resolution=resolution)
            cc = info["cc"]
        else:
            cc = float("nan")
        curve = F.fsc(v, ref)
        out[f"fsc_{name}"] = curve
        out[f"resolution_{name}"] = round(F.resolution_at(curve, 0.5, pixel_size, v.shape[0]), 3)
        out[f"cc_{name}"] = round(float(cc), 4) if math.isfinite(cc) else None
    a = np.mean(np.clip(out["fsc_as_is"][1:], 0, 1))
    m = np.mean(np.clip(out["fsc_mirror"][1:], 0, 1))
    out["hand"] = "as is" if a >= m else "mirror"
    return out


# --------------------------------------------------------------------------- outputs
def central_slices_png(path, volumes: dict, pixel_size: float, mask=None) -> None:
    """Central slices (xy, xz, yz) of each map in a grid of images, with the mask outline."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    from ..io.atomic import atomic_path  # noqa: PLC0415

    rows = len(volumes)
    fig, axes = plt.subplots(rows, 3, figsize=(7.5, 2.6 * rows), dpi=100, squeeze=False)
    m = None if mask is None else backend.to_host(mask)
    for i, (name, vol) in enumerate(volumes.items()):
        v = backend.to_host(vol)
        n = v.shape[0]
        c = n // 2
        for j, (label, sl, msl) in enumerate((
            ("xy (z = centre)", v[c], None if m is None else m[c]),
            ("xz (y = centre)", v[:, c, :], None if m is None else m[:, c, :]),
            ("yz (x = centre)", v[:, :, c], None if m is None else m[:, :, c]),
        )):
            ax = axes[i, j]
            ax.imshow(sl, cmap="gray", origin="lower")
            if msl is not None:
                ax.contour(msl, levels=[0.5], colors="orange", linewidths=0.7)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{name}: {label}", fontsize=8)
    fig.suptitle(f"central slices ({pixel_size:.3g} Å/px)", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def write_postprocess(result: PostprocessResult, out_dir, *, half1_name: str = "", half2_name: str = "",
                      mask_name: str | None = None) -> dict:
    """Write the maps, ``postprocess.star`` (general, fsc, guinier), ``fsc.png``, ``slices.png``
    and ``postprocess.json`` into ``out_dir``; returns the paths."""
    from pathlib import Path  # noqa: PLC0415

    from ..io.atomic import write_text  # noqa: PLC0415
    from ..io.mrc import write_mrc  # noqa: PLC0415

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ps = result.pixel_size
    paths = {"map": out / "postprocess.mrc", "masked": out / "postprocess_masked.mrc", "star": out / "postprocess.star",
             "fsc_png": out / "fsc.png", "slices_png": out / "slices.png", "json": out / "postprocess.json"}
    write_mrc(paths["map"], result.sharpened, ps)
    write_mrc(paths["masked"], result.sharpened_masked, ps)
    if result.mask_auto:
        paths["mask"] = out / "mask.mrc"
        write_mrc(paths["mask"], result.mask, ps)
        mask_name = str(paths["mask"])
    general = {
        "rlnFinalResolution": result.resolution,
        "rlnBfactorUsedForSharpening": result.bfactor,
        "rlnUnfilteredMapHalf1": half1_name or "half1",
        "rlnUnfilteredMapHalf2": half2_name or "half2",
        "rlnMaskName": mask_name or "none",
        "rlnRandomiseFrom": result.box * ps / max(result.randomize_shell, 1),
    }
    if result.bfactor_auto and result.fit_range:
        general["rlnFittedSlopeGuinierPlot"] = result.bfactor / 4.0
        general["rlnFittedInterceptGuinierPlot"] = result.fit_intercept
        general["rlnCorrelationFitGuinierPlot"] = result.fit_correlation
    curves = dict(result.curves)
    main = {"rlnFourierShellCorrelation": curves["rlnFourierShellCorrelationCorrected"]}
    main.update(curves)
    F.write_fsc_star(paths["star"], main, result.box, ps, general=general, extra_blocks={"guinier": result.guinier})
    plot = {"corrected (masked)": curves["rlnFourierShellCorrelationCorrected"],
            "unmasked": curves["rlnFourierShellCorrelationUnmaskedMaps"],
            "masked": curves["rlnFourierShellCorrelationMaskedMaps"],
            "phase-randomised (masked)": curves["rlnCorrectedFourierShellCorrelationPhaseRandomizedMaskedMaps"]}
    if "cvFourierShellCorrelationReference" in curves:
        plot["vs reference"] = curves["cvFourierShellCorrelationReference"]
        plot["mirror vs reference"] = curves["cvFourierShellCorrelationReferenceMirror"]
    F.plot_fsc(paths["fsc_png"], plot, result.box, ps,
               title=f"resolution {result.resolution:.2f} Å (FSC 0.143), B {result.bfactor:.0f} Å²")
    central_slices_png(paths["slices_png"], {"average": result.average, "sharpened": result.sharpened}, ps,
                       mask=result.mask)
    write_text(paths["json"], json.dumps(result.summary(), indent=1, ensure_ascii=False) + "\n")
    return paths
