"""``conveyor spa class2d``, ``conveyor spa select``, ``conveyor select spa`` and ``conveyor spa train-selector``.

::

    conveyor spa class2d --particles particles.star --out-dir DIR --classes 30 --particle-diameter Å
        [--iterations 25] [--psi-step 10] [--offset-range 5] [--seed 0] [--max-particles N]
    conveyor spa select --class-dir DIR --mode auto|manual [--selection roundN.yaml]
        --out-particles selected.star [--out-yaml roundN.yaml] [--out-scores scores.csv]
    conveyor select spa --class-dir DIR --classes 1 4 7 [--out results/<exp>/spa/select/round1.yaml]
    conveyor spa train-selector --out resources/class_selector.json [--seed 0] [--n 2000]

``class2d`` writes ``DIR/class_averages.mrcs`` (class ``c`` is image ``c``; pixel size in the
header), ``DIR/gallery.png`` (classes numbered 1..K, most particles first, with counts and
resolution), ``DIR/log.csv`` (one row per iteration), ``DIR/particles.star`` (every input
column and ``data_optics`` kept; rlnClassNumber, rlnAnglePsi, rlnOriginXAngst/YAngst,
rlnMaxValueProbDistribution, rlnLogLikeliContribution, rlnNrOfSignificantSamples and cvMisfit
(χ² excess of the best hypothesis over pure noise, in sd) added) and
``DIR/model.star`` last (RELION's ``_model.star`` layout: ``data_model_general``,
``data_model_classes`` with rlnReferenceImage, rlnClassDistribution, rlnEstimatedResolution,
``data_model_class_N`` with the SSNR per shell, ``data_model_optics_group_1`` with the noise).

``spa select --mode manual`` without a selection file exits with status 3 after printing
which gallery to look at and which file to write.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from pathlib import Path

import numpy as np

from .. import backend
from ..errors import InputError
from .._lazy import lazy_module

pd = lazy_module("pandas")

log = logging.getLogger(__name__)

AVERAGES = "class_averages.mrcs"
MODEL = "model.star"
PARTICLES = "particles.star"
GALLERY = "gallery.png"
LOG = "log.csv"
EXIT_NEEDS_SELECTION = 3


# --------------------------------------------------------------------------- inputs
def _resolve_stack(name: str, star_dir: Path) -> Path:
    """A stack path from rlnImageName: as written (relative to the working directory), else beside the STAR file."""
    p = Path(name)
    if p.is_absolute() or p.exists():
        return p
    alt = star_dir / p
    return alt if alt.exists() else p


def load_particles(star, max_particles: int | None = None, seed: int = 0):
    """Particles for classification: ``(table, optics, images [n, B, B], pixel_size, joined)``.

    ``table`` holds the rows used (all, or ``max_particles`` drawn at random with ``seed``,
    in file order); ``joined`` is the same with the optics columns copied on. Stacks named in
    rlnImageName are looked up as written, then beside the STAR file.
    """
    from ..io.mrc import read_stack_images  # noqa: PLC0415
    from ..io.star import join_optics, parse_image_names, read_particles, require_columns  # noqa: PLC0415

    star = Path(star)
    table, optics = read_particles(star)
    if len(table) == 0:
        raise InputError(star, "holds no particles", "check the extraction/selection that wrote it")
    require_columns(table, ["rlnImageName"], star, block="particles")
    if max_particles is not None and 0 < int(max_particles) < len(table):
        keep = np.sort(np.random.default_rng(seed).choice(len(table), size=int(max_particles), replace=False))
        table = table.iloc[keep].reset_index(drop=True)
    else:
        table = table.reset_index(drop=True)
    joined = join_optics(table, optics, star)
    if "rlnCtfDataAreCtfPremultiplied" in joined.columns and (pd.to_numeric(
            joined["rlnCtfDataAreCtfPremultiplied"], errors="coerce").fillna(0) != 0).any():
        raise InputError(star, "particles are CTF-premultiplied (rlnCtfDataAreCtfPremultiplied 1)",
                         "re-extract without premultiplication (conveyor spa extract does not premultiply)")
    if "rlnImagePixelSize" not in joined.columns:
        raise InputError(star, "no rlnImagePixelSize in data_optics", "pass the particle STAR file written by extraction")
    ps_all = pd.to_numeric(joined["rlnImagePixelSize"], errors="coerce").to_numpy(float)
    if not np.isfinite(ps_all).all() or (ps_all <= 0).any():
        raise InputError(star, "rlnImagePixelSize must be a positive number", "fix data_optics")
    if np.ptp(ps_all) > 1e-3 * ps_all.max():
        raise InputError(star, f"particles have different pixel sizes ({sorted(set(np.round(ps_all, 4)))} Å)",
                         "classify each pixel size separately, or re-extract to one pixel size")
    idx, stacks = parse_image_names(table["rlnImageName"], star)
    images = None
    for name in pd.unique(stacks):
        rows = np.flatnonzero(stacks == name)
        path = _resolve_stack(str(name), star.parent)
        if not path.exists():
            raise InputError(star, f"particle stack {name} (from rlnImageName) does not exist",
                             "run from the directory the paths are relative to, or re-extract")
        imgs, _ = read_stack_images(path, idx[rows] - 1)
        if images is None:
            images = np.empty((len(table),) + imgs.shape[1:], dtype=np.float32)
        elif imgs.shape[1:] != images.shape[1:]:
            raise InputError(path, f"images are {imgs.shape[1]}×{imgs.shape[2]} px, others {images.shape[1]}×{images.shape[2]}",
                             "classify one box size at a time")
        images[rows] = imgs
    if not np.isfinite(images).all():
        raise InputError(star, "particle images contain NaN or infinite values", "re-extract the particles")
    return table, optics, images, float(ps_all[0]), joined


def _default_selection_path(class_dir) -> Path:
    """``results/<exp>/spa/select/roundN.yaml`` for ``results/<exp>/spa/class2d/roundN`` (else ``…/select/round1.yaml``)."""
    d = Path(class_dir)
    name = d.name if re.fullmatch(r"round\d+", d.name) else "round1"
    base = d.parent.parent if re.fullmatch(r"round\d+", d.name) else d.parent
    return base / "select" / f"{name}.yaml"


# --------------------------------------------------------------------------- outputs
def write_gallery(path, averages, counts, resolution, pixel_size: float, particle_diameter: float | None = None,
                  scores=None, selected=None, title: str | None = None) -> None:
    """PNG of the class averages in class order (1..K) with particles, share and resolution.

    ``scores``/``selected`` (optional) add the selector's score and frame the selected classes.
    """
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    from ..io.atomic import atomic_path  # noqa: PLC0415

    avg = np.asarray(averages, dtype=float)
    k, b = avg.shape[0], avg.shape[-1]
    ncol = int(min(k, 8 if k <= 32 else 10))
    nrow = int(np.ceil(k / ncol))
    total = max(float(np.sum(counts)), 1.0)
    yy, xx = np.mgrid[0:b, 0:b] - b // 2
    inside = np.hypot(xx, yy) <= (0.5 * particle_diameter / pixel_size if particle_diameter else b / 2)
    fig, axes = plt.subplots(nrow, ncol, figsize=(1.9 * ncol, 2.25 * nrow + (0.4 if title else 0.0)), squeeze=False)
    sel = set(int(c) for c in (selected or []))
    for i, ax in enumerate(axes.ravel()):
        ax.set_xticks([])
        ax.set_yticks([])
        if i >= k:
            ax.axis("off")
            continue
        img = avg[i]
        vals = img[inside] if inside.any() else img.ravel()
        lo, hi = np.percentile(vals, [1.0, 99.5])
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, interpolation="nearest")
        res = float(resolution[i])
        line2 = f"{int(counts[i])} ({100 * counts[i] / total:.1f}%) {res:.1f} Å" if np.isfinite(res) else f"{int(counts[i])}"
        label = f"{i + 1}" + (f"  score {scores[i]:.2f}" if scores is not None and np.isfinite(scores[i]) else "")
        ax.set_title(f"{label}\n{line2}", fontsize=8)
        if sel:
            color = "tab:green" if (i + 1) in sel else "tab:red"
            for side in ax.spines.values():
                side.set_edgecolor(color)
                side.set_linewidth(3 if (i + 1) in sel else 1)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)


def model_blocks(result, averages_name: str) -> dict:
    """``model.star`` blocks (RELION ``_model.star`` layout) of a :class:`~conveyor.spa.classify2d.Class2DResult`."""
    from ..io.star import format_image_name  # noqa: PLC0415

    k = result.n_classes
    b = result.averages.shape[-1]
    ps = result.pixel_size
    nshell = b // 2 + 1
    shells = np.arange(nshell)
    freq = shells / (b * ps)
    with np.errstate(divide="ignore"):
        ang = np.where(shells > 0, 1.0 / np.maximum(freq, 1e-30), 999.0)
    last = result.log.iloc[-1]
    general = pd.DataFrame([{
        "rlnReferenceDimensionality": 2, "rlnDataDimensionality": 2, "rlnOriginalImageSize": b,
        "rlnCurrentResolution": result.resolution_limit, "rlnNrClasses": k, "rlnPixelSize": ps,
        "rlnParticleDiameter": result.particle_diameter, "rlnLogLikelihood": float(last["log_likelihood"]),
        "rlnAveragePmax": float(last["average_pmax"]), "rlnNrIterations": int(last["iteration"]),
        "cvNrParticles": int(len(result.assignments)),
    }])
    classes = pd.DataFrame({
        "rlnReferenceImage": [format_image_name(c + 1, averages_name) for c in range(k)],
        "rlnClassDistribution": result.class_distribution,
        "rlnEstimatedResolution": result.class_resolution,
        "cvClassParticles": result.class_counts.astype(int),
    })
    blocks = {"model_general": general, "model_classes": classes}
    for c in range(k):
        blocks[f"model_class_{c + 1}"] = pd.DataFrame({
            "rlnSpectralIndex": shells, "rlnResolution": freq, "rlnAngstromResolution": ang,
            "rlnSsnrMap": result.ssnr[c], "cvHalfSetFrc": result.frc[c]})
    blocks["model_optics_group_1"] = pd.DataFrame({"rlnSpectralIndex": shells, "rlnResolution": freq,
                                                   "rlnSigma2Noise": result.sigma2[:nshell]})
    return blocks


def particle_table(table: pd.DataFrame, result) -> pd.DataFrame:
    """``table`` with the classification columns added (or replaced)."""
    out = table.copy()
    out["rlnClassNumber"] = result.assignments.astype(int)
    out["rlnAnglePsi"] = result.psi
    o = result.origins_angst
    out["rlnOriginXAngst"] = o[:, 0]
    out["rlnOriginYAngst"] = o[:, 1]
    out["rlnMaxValueProbDistribution"] = result.probabilities
    out["rlnLogLikeliContribution"] = result.log_likelihood
    out["rlnNrOfSignificantSamples"] = result.n_significant.astype(int)
    out["cvMisfit"] = result.misfit
    return out


def read_class_dir(class_dir, particle_diameter: float | None = None):
    """What ``spa select`` needs from a ``spa class2d`` directory.

    Returns a dict with ``averages`` ``[K, B, B]``, ``counts`` (from the particles'
    rlnClassNumber), ``resolution`` (Å), ``pixel_size``, ``particle_diameter``, ``particles``,
    ``optics``, ``n_classes``.
    """
    from ..io.mrc import read_mrc  # noqa: PLC0415
    from ..io.star import read_particles, read_star, require_columns  # noqa: PLC0415

    d = Path(class_dir)
    if not d.is_dir():
        raise InputError(d, "class directory does not exist", "pass the --out-dir of conveyor spa class2d")
    model = read_star(d / MODEL)
    if "model_classes" not in model:
        raise InputError(d / MODEL, "no data_model_classes block", "pass a directory written by conveyor spa class2d")
    mc = model["model_classes"]
    require_columns(mc, ["rlnEstimatedResolution"], d / MODEL, block="model_classes")
    k = len(mc)
    avg, ps_hdr = read_mrc(d / AVERAGES)
    if avg.ndim == 2:
        avg = avg[None]
    if avg.shape[0] != k:
        raise InputError(d / AVERAGES, f"holds {avg.shape[0]} images but model.star lists {k} classes",
                         "re-run conveyor spa class2d")
    gen = model.get("model_general")
    ps = float(gen["rlnPixelSize"].iloc[0]) if gen is not None and "rlnPixelSize" in gen.columns else ps_hdr
    if particle_diameter is None:
        if gen is not None and "rlnParticleDiameter" in gen.columns:
            particle_diameter = float(gen["rlnParticleDiameter"].iloc[0])
        else:
            raise InputError(d / MODEL, "no rlnParticleDiameter in data_model_general", "pass --particle-diameter (Å)")
    parts, optics = read_particles(d / PARTICLES)
    require_columns(parts, ["rlnClassNumber"], d / PARTICLES, block="particles")
    cls = pd.to_numeric(parts["rlnClassNumber"], errors="coerce").to_numpy()
    if not np.isfinite(cls).all() or (cls < 1).any() or (cls > k).any():
        raise InputError(d / PARTICLES, f"rlnClassNumber outside 1..{k}", "re-run conveyor spa class2d")
    counts = np.bincount(cls.astype(int) - 1, minlength=k)
    return {"averages": avg.astype(np.float32), "counts": counts,
            "resolution": mc["rlnEstimatedResolution"].to_numpy(float), "pixel_size": ps,
            "particle_diameter": float(particle_diameter), "particles": parts, "optics": optics, "n_classes": k}


# --------------------------------------------------------------------------- commands
def _class2d(args) -> int:
    from ..io.mrc import write_mrc  # noqa: PLC0415
    from ..io.star import write_star  # noqa: PLC0415
    from ..spa.classify2d import classify_2d  # noqa: PLC0415

    out = Path(args.out_dir)
    table, optics, images, ps, joined = load_particles(args.particles, args.max_particles, args.seed)
    n = len(table)
    log.info("classifying %d particles of %d px at %.3f Å/px into %d classes on %s", n, images.shape[-1], ps,
             args.classes, backend.describe())
    ctf_cols = [c for c in ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnVoltage", "rlnSphericalAberration",
                            "rlnAmplitudeContrast", "rlnPhaseShift", "rlnCtfBfactor", "rlnCtfScalefactor")
                if c in joined.columns]
    ctf = joined[ctf_cols] if "rlnDefocusU" in ctf_cols else None
    if ctf is None:
        log.warning("%s has no rlnDefocusU: classifying without CTF correction", args.particles)

    def progress(row):
        log.info("iteration %d: limit %.1f Å, best class %.1f Å, <Pmax> %.3f, %.1f s", row["iteration"],
                 row["resolution_limit"], row["best_resolution"], row["average_pmax"], row["seconds"])

    t0 = time.perf_counter()
    res = classify_2d(images, ctf, ps, args.classes, iterations=args.iterations, psi_step=args.psi_step,
                      offset_range=args.offset_range, particle_diameter=args.particle_diameter, seed=args.seed,
                      offset_step=args.offset_step, initial_resolution=args.initial_resolution,
                      max_resolution=args.max_resolution, initial_temperature=args.temperature,
                      center_classes=not args.no_center, progress=progress)
    seconds = time.perf_counter() - t0
    averages_path = out / AVERAGES
    write_mrc(averages_path, res.averages, ps, volume=False)
    write_gallery(out / GALLERY, res.averages, res.class_counts, res.class_resolution, ps, args.particle_diameter,
                  title=f"{n} particles, {args.classes} classes, {args.iterations} iterations")
    from ..io.atomic import write_text  # noqa: PLC0415

    write_text(out / LOG, res.log.to_csv(index=False, float_format="%.6g"))
    write_star(out / PARTICLES, {"optics": optics, "particles": particle_table(table, res)})
    write_star(out / MODEL, model_blocks(res, str(averages_path)))
    rate = n * args.iterations / max(seconds, 1e-9)
    best = int(np.argmin(res.class_resolution)) + 1
    print(f"{out}: {n} particles in {args.classes} classes, largest class {res.class_counts[0]} particles, "
          f"best class {best} at {res.class_resolution[best - 1]:.1f} Å; {seconds:.1f} s "
          f"({rate:.0f} particle-iterations/s on {backend.get_device()}); look at {out / GALLERY}")
    return 0


def _needs_selection(class_dir: Path, target: Path, n_classes: int) -> str:
    return (
        f"conveyor: manual class selection needed for {class_dir}\n"
        f"  1. Look at the class averages in {class_dir / GALLERY}\n"
        f"     (classes numbered 1..{n_classes}, the class with most particles first; counts and resolution under each).\n"
        f"  2. Write the numbers of the good classes to {target}, for example:\n"
        f"         classes: [1, 4, 7]\n"
        f"     or let Conveyor check the numbers and write that file for you:\n"
        f"         conveyor select spa --class-dir {class_dir} --classes 1 4 7 --out {target}\n"
        f"  3. Run again with --selection {target}\n"
    )


def _select(args) -> int:
    from ..io.atomic import write_text  # noqa: PLC0415
    from ..io.star import write_star  # noqa: PLC0415
    from ..spa.select import misfit_outliers, read_selection, select_classes, selection_yaml  # noqa: PLC0415

    class_dir = Path(args.class_dir)
    cd = read_class_dir(class_dir, args.particle_diameter)
    k = cd["n_classes"]
    manual = None
    if args.mode == "manual":
        if not args.selection:
            target = Path(args.out_yaml) if args.out_yaml else _default_selection_path(class_dir)
            print(_needs_selection(class_dir, target, k), file=sys.stderr, end="")
            return EXIT_NEEDS_SELECTION
        manual = read_selection(args.selection, k)
    sel = select_classes(cd["averages"], cd["counts"], cd["resolution"], cd["pixel_size"], cd["particle_diameter"],
                         mode=args.mode, manual_classes=manual, threshold=args.threshold, model=args.model,
                         min_particles=args.min_particles)
    if args.out_scores:
        write_text(args.out_scores, sel.scores.to_csv(index=False, float_format="%.6g"))
    if args.out_gallery:
        write_gallery(args.out_gallery, cd["averages"], cd["counts"], cd["resolution"], cd["pixel_size"],
                      cd["particle_diameter"], scores=sel.scores["score"].to_numpy(), selected=sel.selected,
                      title=f"{args.mode} selection: classes {sel.selected}")
    if not sel.selected:
        print(f"conveyor: no class of {class_dir} scored ≥ {args.threshold} -- look at {class_dir / GALLERY} "
              f"(scores in {args.out_scores or 'the --out-scores table'}) and select manually with --mode manual",
              file=sys.stderr)
        return 1
    parts = cd["particles"]
    cls = pd.to_numeric(parts["rlnClassNumber"], errors="coerce").to_numpy()
    keep = np.isin(cls, sel.selected)
    sigma = args.outlier_sigma if args.outlier_sigma is not None else (3.5 if args.mode == "auto" else 0.0)
    n_out = 0
    if sigma > 0:
        if "cvMisfit" in parts.columns:
            out = misfit_outliers(cls, pd.to_numeric(parts["cvMisfit"], errors="coerce").to_numpy(float), sigma)
            n_out = int((out & keep).sum())
            keep &= ~out
        else:
            log.warning("%s has no cvMisfit column: no particle outliers removed", class_dir / PARTICLES)
    write_star(args.out_particles, {"optics": cd["optics"], "particles": parts[keep].reset_index(drop=True)})
    if args.out_yaml:
        src = f"manual selection {args.selection}" if args.mode == "manual" else \
            f"automatic selection (score >= {args.threshold}, scores in {args.out_scores or 'not written'})"
        write_text(args.out_yaml, selection_yaml(sel.selected, comment=f"2D classes of {class_dir}: {src}"))
    print(f"{args.out_particles}: {int(keep.sum())} of {len(parts)} particles from classes {sel.selected} "
          f"({args.mode}" + (f"; {n_out} outliers with misfit > {sigma:g} sd of their class removed" if sigma > 0 else "")
          + ")")
    return 0


def _select_write(args) -> int:
    from ..io.atomic import write_text  # noqa: PLC0415
    from ..io.star import read_star  # noqa: PLC0415
    from ..spa.select import check_class_numbers, selection_yaml  # noqa: PLC0415

    class_dir = Path(args.class_dir)
    model = read_star(class_dir / MODEL)
    if "model_classes" not in model:
        raise InputError(class_dir / MODEL, "no data_model_classes block", "pass a directory written by conveyor spa class2d")
    k = len(model["model_classes"])
    chosen = check_class_numbers(args.classes, k, "--classes")
    out = Path(args.out) if args.out else _default_selection_path(class_dir)
    write_text(out, selection_yaml(chosen, comment=f"2D classes of {class_dir} chosen by hand (1-based, as in {GALLERY})"))
    print(f"{out}: classes {chosen} of {k}")
    return 0


def _train(args) -> int:
    from ..spa.selector_training import train_selector, write_selector  # noqa: PLC0415

    def progress(i, n):
        log.info("simulated %d/%d classes", i, n)

    if args.n < 20:
        raise InputError("--n", f"need at least 20 simulated classes, got {args.n}", "use e.g. --n 4000")
    model = train_selector(n=args.n, seed=args.seed, n_models=args.models, progress=progress)
    model["training"]["command"] = (f"conveyor spa train-selector --out {args.out} --seed {args.seed} --n {args.n}"
                                    + (f" --models {args.models}" if args.models != 16 else ""))
    write_selector(args.out, model)
    tr = model["training"]
    print(f"{args.out}: {len(model['trees'])} trees on {len(model['features'])} features; held-out accuracy "
          f"{tr['held_out_accuracy']:.3f} on {int(round(tr['held_out_fraction'] * args.n))} simulated classes "
          f"({tr['seconds']:.0f} s)")
    return 0


def register(group) -> None:
    p = group("spa").add_parser(
        "class2d", help="2D classification (maximum likelihood, CTF-corrected) with class averages and a gallery",
        description="Reference-free 2D classification by expectation-maximisation over classes, in-plane angles "
        "and shifts, with per-particle CTF and a per-shell noise model. Writes DIR/class_averages.mrcs, "
        "DIR/gallery.png, DIR/log.csv, DIR/particles.star and DIR/model.star (last). Classes are numbered "
        "1..K by decreasing population.")
    p.add_argument("--particles", required=True, help="particle STAR file (conveyor spa extract/merge)")
    p.add_argument("--out-dir", required=True, help="output directory")
    p.add_argument("--classes", type=int, required=True, help="number of classes K")
    p.add_argument("--particle-diameter", type=float, required=True, help="mask diameter, Å")
    p.add_argument("--iterations", type=int, default=25, help="EM iterations (default 25)")
    p.add_argument("--psi-step", type=float, default=10.0, help="in-plane angular step, degrees (default 10)")
    p.add_argument("--offset-range", type=float, default=5.0, help="translations searched, ± px (default 5)")
    p.add_argument("--offset-step", type=float, default=1.0, help="translation step, px (default 1)")
    p.add_argument("--initial-resolution", type=float, default=30.0, help="resolution limit of the first iteration, Å")
    p.add_argument("--max-resolution", type=float, default=None, help="never use data beyond this resolution, Å")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="initial temperature of the posterior, annealed to 1 over the first third (default 1: off)")
    p.add_argument("--no-center", action="store_true", help="do not centre the class averages each iteration")
    p.add_argument("--seed", type=int, default=0, help="random seed (initialisation, half sets, --max-particles)")
    p.add_argument("--max-particles", type=int, default=None, help="classify a random subset of this many particles")
    p.set_defaults(func=_class2d)

    p = group("spa").add_parser(
        "select", help="select good 2D classes: automatic scores or the user's roundN.yaml",
        description="auto: score every class with the trained selector (scale-free features: resolution relative to the "
        "others and to Nyquist, density relative to the other classes, centring, radial profile, roundness, "
        "edges, symmetry, detail) and keep those at or above --threshold; manual: read "
        "the user's YAML (classes: [1, 4, 7]); without it, exit 3 after printing which gallery to look at "
        "and which file to write. Writes the particles of the chosen classes.")
    p.add_argument("--class-dir", required=True, help="output directory of conveyor spa class2d")
    p.add_argument("--mode", choices=("auto", "manual"), required=True)
    p.add_argument("--selection", default=None, metavar="roundN.yaml", help="manual: the user's class selection")
    p.add_argument("--out-particles", required=True, help="STAR file of the particles in the chosen classes")
    p.add_argument("--out-yaml", default=None, metavar="roundN.yaml",
                   help="write the chosen classes (classes: [...]); in manual mode also the file the message asks for")
    p.add_argument("--out-scores", default=None, help="CSV of every class's features, score and choice")
    p.add_argument("--out-gallery", default=None, help="PNG of the classes with scores, chosen ones framed green")
    p.add_argument("--threshold", type=float, default=0.5, help="auto: minimum score (probability of a good class)")
    p.add_argument("--min-particles", type=int, default=1, help="auto: never choose classes with fewer particles")
    p.add_argument("--outlier-sigma", type=float, default=None,
                   help="drop particles whose misfit is this many robust sd above their class median "
                   "(default 3.5 in auto mode, off in manual mode; 0: off)")
    p.add_argument("--model", default=None, help="selector model JSON (default resources/class_selector.json)")
    p.add_argument("--particle-diameter", type=float, default=None,
                   help="Å (default: rlnParticleDiameter of DIR/model.star)")
    p.set_defaults(func=_select)

    p = group("select").add_parser(
        "spa", help="write the SPA 2D class selection (roundN.yaml) after checking the class numbers",
        description="Check that the class numbers exist in DIR/model.star (1-based, as in DIR/gallery.png) and "
        "write them as `classes: [1, 4, 7]` for conveyor spa select --mode manual --selection FILE.")
    p.add_argument("--class-dir", required=True, help="output directory of conveyor spa class2d")
    p.add_argument("--classes", nargs="+", required=True, help="good class numbers, e.g. 1 4 7")
    p.add_argument("--out", default=None, metavar="roundN.yaml",
                   help="file to write (default: results/<exp>/spa/select/roundN.yaml beside the class2d directory)")
    p.set_defaults(func=_select_write)

    p = group("spa").add_parser(
        "train-selector", help="train the automatic 2D class selector on simulated good and junk classes",
        description="Simulate class averages of protein-like particles and of junk (ice, contamination, carbon "
        "edges, aggregates, empty, off-centre; mixed-view classes count as good, they hold true particles) in "
        "simulated classifications spanning 16-80 px boxes at 1-16 Å/px with ground truth, fit gradient-boosted trees on "
        "the selector's features and write them as JSON. Seeded and reproducible.")
    p.add_argument("--out", required=True, help="model JSON, e.g. resources/class_selector.json")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--n", type=int, default=4000, help="simulated classes (default 4000, as the stored model; a fifth held out)")
    p.add_argument("--models", type=int, default=16, help="protein-like specimens to draw particles from (default 16)")
    p.set_defaults(func=_train)
