"""``conveyor spa initial-model | refine3d | postprocess | fsc``: from particles to a validated 3D map.

* ``initial-model``: ab initio map by stochastic gradient descent (hand undetermined).
* ``refine3d``: gold-standard refinement (or 3D classification with ``--classes K``);
  writes ``half1.mrc``, ``half2.mrc``, ``map.mrc``, ``fsc.star``, ``fsc.png``,
  ``particles.star`` and ``refine.log`` in ``--out-dir``; ``--continue`` restarts after the
  last finished iteration.
* ``postprocess``: mask, corrected FSC, B-factor, sharpened map (``--reference`` reports
  the FSC of the map and of its mirror against a known map).
* ``fsc``: FSC of two maps (e.g. against the simulator's truth), as a STAR file.

Particles are read from a RELION 3.1+ STAR file (``data_optics`` + ``data_particles``,
``rlnImageName`` ``index@stack``, stack paths as written or relative to the STAR file's
folder) with the CTF per particle; particle shifts come from ``rlnOriginX/YAngst``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np

from .. import backend
from ..errors import InputError

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- inputs
def resolve_stack(name: str, star_path: Path) -> Path:
    """A stack path from rlnImageName: as written (relative to the working folder), else beside the STAR file."""
    p = Path(name)
    if p.is_absolute() or p.exists():
        return p
    alt = star_path.parent / p
    return alt if alt.exists() else p


def load_particles(path, max_particles: int | None = None, seed: int = 0):
    """Read particles: ``(table, optics, images [n, N, N] float32 numpy, pixel_size, CtfParams, shifts [n, 2])``.

    ``max_particles`` keeps a random subset (in file order). Shifts are in px, where each
    particle lies (``-rlnOriginX/YAngst / pixel_size``).
    """
    from ..io.mrc import read_stack_images  # noqa: PLC0415
    from ..io.star import join_optics, origins_px, parse_image_names, read_particles, require_columns  # noqa: PLC0415
    from ..spa.reconstruct import CtfParams  # noqa: PLC0415

    path = Path(path)
    table, optics = read_particles(path)
    if len(table) == 0:
        raise InputError(path, "holds no particles", "run extraction (and selection) first")
    require_columns(table, ["rlnImageName"], path, block="particles")
    joined = join_optics(table, optics, path)
    if "rlnImagePixelSize" not in joined.columns:
        raise InputError(path, "data_optics lacks rlnImagePixelSize", "write the particle pixel size in data_optics")
    ps_all = joined["rlnImagePixelSize"].to_numpy(float)
    if np.ptp(ps_all) > 1e-4 * ps_all.max():
        raise InputError(path, f"optics groups have different pixel sizes ({sorted(set(ps_all.round(4)))})",
                         "re-extract all particles at one pixel size")
    pixel_size = float(ps_all[0])
    if "rlnCtfDataAreCtfPremultiplied" in joined.columns and (joined["rlnCtfDataAreCtfPremultiplied"].astype(float) > 0).any():
        raise InputError(path, "particles are CTF-premultiplied (rlnCtfDataAreCtfPremultiplied = 1)",
                         "re-extract without premultiplication")
    keep = np.arange(len(joined))
    if max_particles and len(joined) > max_particles:
        rng = np.random.default_rng(seed)
        keep = np.sort(rng.choice(len(joined), size=int(max_particles), replace=False))
    table = table.iloc[keep].reset_index(drop=True)
    joined = joined.iloc[keep].reset_index(drop=True)
    idx, stacks = parse_image_names(joined["rlnImageName"], path)
    images = None
    for stack in dict.fromkeys(stacks):
        rows = np.flatnonzero(stacks == stack)
        spath = resolve_stack(stack, path)
        if not spath.exists():
            raise InputError(path, f"particle stack {stack} does not exist (looked in the working folder and beside the STAR file)",
                             "run from the project folder or fix rlnImageName")
        data, _ = read_stack_images(spath, idx[rows] - 1)
        if images is None:
            images = np.empty((len(joined),) + data.shape[1:], dtype=np.float32)
        if data.shape[1:] != images.shape[1:]:
            raise InputError(spath, f"images are {data.shape[1:]} px, others {images.shape[1:]}", "re-extract with one box size")
        images[rows] = data
    if images.shape[1] != images.shape[2] or images.shape[1] % 2:
        raise InputError(path, f"particle boxes must be square and even, got {images.shape[1:]}", "re-extract the particles")
    if "rlnImageSize" in joined.columns and int(joined["rlnImageSize"].iloc[0]) != images.shape[1]:
        raise InputError(path, f"rlnImageSize {int(joined['rlnImageSize'].iloc[0])} does not match the stacks "
                         f"({images.shape[1]} px)", "fix data_optics or re-extract")
    if not np.isfinite(images).all():
        raise InputError(path, "particle images hold NaN or infinite values", "re-extract the particles")
    ctf = CtfParams.from_table(joined, path)
    shifts = -origins_px(joined, pixel_size)
    return table, optics, images, pixel_size, ctf, shifts


def load_map(path, pixel_size: float | None, box: int | None, what: str):
    """Read a map, resampled to ``pixel_size`` and ``box`` when given (header pixel size; 0 means "same")."""
    from ..io.mrc import read_mrc  # noqa: PLC0415
    from ..spa.reconstruct import resample_volume  # noqa: PLC0415

    vol, ps = read_mrc(path)
    if vol.ndim != 3 or len(set(vol.shape)) != 1:
        raise InputError(path, f"{what} must be a cubic 3D map, got shape {vol.shape}", "give a cubic map")
    if pixel_size is None:
        if not ps > 0:
            raise InputError(path, "the map header has no pixel size", "pass --pixel-size")
        return vol.astype(np.float32), ps
    if not ps > 0:
        ps = pixel_size
    if abs(ps - pixel_size) > 1e-3 * pixel_size or (box is not None and vol.shape[0] != box):
        vol = backend.to_host(resample_volume(vol.astype(np.float32), ps, pixel_size, box or vol.shape[0]))
        log.info("%s: resampled %s from %.4g to %.4g Å/px, box %d", what, path, ps, pixel_size, vol.shape[0])
    return vol.astype(np.float32), pixel_size


def _positive(value, flag):
    if value is not None and not value > 0:
        raise InputError(flag, f"must be positive, got {value}", "pass a positive number")


# --------------------------------------------------------------------------- initial-model
def _initial_model(args) -> int:
    from ..geometry import parse_symmetry  # noqa: PLC0415
    from ..io.mrc import write_mrc  # noqa: PLC0415
    from ..spa.initial_model import HAND_NOTE, initial_model  # noqa: PLC0415

    parse_symmetry(args.symmetry)
    _positive(args.particle_diameter, "--particle-diameter")
    table, _, images, ps, ctf, _ = load_particles(args.particles, args.max_particles, args.seed)
    final = args.final_resolution or max(20.0, 4.0 * ps)
    start = args.initial_resolution or max(40.0, 2.0 * final)
    b = [int(v) for v in str(args.batch).split(",")]
    t0 = time.time()
    res = initial_model(backend.asarray(images), ctf, ps, args.symmetry, particle_diameter=args.particle_diameter,
                        n_iter=args.iterations, batch=tuple(b) if len(b) == 2 else b[0],
                        resolution_schedule=(start, final), seed=args.seed, step=args.angular_step,
                        max_shift=args.max_shift, em_iterations=args.em_iterations)
    write_mrc(args.out, res.volume, ps)
    print(f"{args.out}: initial model from {len(images)} images ({args.symmetry}), low-passed at {res.resolution:.1f} Å, "
          f"{time.time() - t0:.0f} s; {HAND_NOTE}")
    return 0


# --------------------------------------------------------------------------- refine3d
_RUN_KEYS = ("particles", "reference", "symmetry", "particle_diameter", "iterations", "initial_lowpass", "angular_step",
             "finest_step", "max_shift", "classes", "max_particles", "seed")
FINGERPRINT = "inputs.sha256"


def run_fingerprint(args) -> str:
    """SHA-256 of the particle STAR file, the reference map and the options that shape a run."""
    h = hashlib.sha256()
    for key in ("particles", "reference"):
        with open(getattr(args, key), "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    h.update(json.dumps({k: getattr(args, k, None) for k in _RUN_KEYS}, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _same_run_or_fresh(out: Path, args) -> bool:
    """``--auto-continue``: True (resume) when ``out`` holds an interrupted run of the same
    inputs and options; otherwise remove its iteration files so the run starts afresh."""
    stamp = out / FINGERPRINT
    digest = run_fingerprint(args)
    saved = stamp.read_text().strip() if stamp.exists() else None
    iterations = sorted(out.glob("it[0-9][0-9][0-9]_*")) if out.exists() else []
    if iterations and saved == digest:
        log.info("%s: continuing the interrupted refinement of the same inputs", out)
        return True
    for p in iterations + [out / "refine.log"]:
        p.unlink(missing_ok=True)
    if iterations:
        log.info("%s: previous iteration files were for other inputs or options: removed, starting afresh", out)
    out.mkdir(parents=True, exist_ok=True)
    stamp.write_text(digest + "\n")
    return False


def _refine3d(args) -> int:
    from ..geometry import parse_symmetry  # noqa: PLC0415
    from ..io.mrc import write_mrc  # noqa: PLC0415
    from ..io.star import write_star  # noqa: PLC0415
    from ..spa.fsc import plot_fsc, resolution_at, write_fsc_star  # noqa: PLC0415
    from ..spa.refine3d import particles_table, refine3d  # noqa: PLC0415

    parse_symmetry(args.symmetry)
    _positive(args.particle_diameter, "--particle-diameter")
    if args.classes < 1:
        raise InputError("--classes", f"must be at least 1, got {args.classes}", "use 1 for refinement, K > 1 to classify")
    out = Path(args.out_dir)
    if args.auto_continue:
        args.resume = _same_run_or_fresh(out, args)
    if not args.resume and out.exists() and any(out.glob("it[0-9][0-9][0-9]_model.json")):
        raise InputError(out, "holds a previous refinement", "pass --continue to resume it, or choose a new --out-dir")
    table, optics, images, ps, ctf, shifts = load_particles(args.particles, args.max_particles, args.seed)
    n = images.shape[1]
    ref, _ = load_map(args.reference, ps, n, "reference")
    subsets = None
    if "rlnRandomSubset" in table.columns and args.classes == 1:
        subsets = table["rlnRandomSubset"].to_numpy(int)
        if not set(np.unique(subsets)) <= {1, 2} or len(np.unique(subsets)) < 2:
            subsets = None
    t0 = time.time()
    res = refine3d(backend.asarray(images), ctf, ps, backend.asarray(ref), symmetry=args.symmetry,
                   particle_diameter=args.particle_diameter, iterations=args.iterations,
                   initial_lowpass=args.initial_lowpass, max_shift=args.max_shift, shifts=shifts, subsets=subsets,
                   seed=args.seed, out_dir=out, resume=args.resume, table=table, classes=args.classes,
                   initial_step=args.angular_step, finest_step=args.finest_step)
    blocks = {"optics": optics,
              "particles": particles_table(table, res.rotations, res.shifts, ps,
                                           None if args.classes > 1 else res.subsets, res.classes)}
    if args.classes > 1:
        for c, m in enumerate(res.class_maps, start=1):
            write_mrc(out / f"class{c:03d}.mrc", m, ps)
        write_star(out / "particles.star", blocks)
        sizes = np.bincount(res.classes, minlength=args.classes + 1)[1:]
        (out / "run.json").write_text(json.dumps({"classes": sizes.tolist(), "iterations": res.iterations,
                                                  "converged": res.converged, "seconds": round(time.time() - t0, 1)},
                                                 indent=1) + "\n")
        print(f"{out}: {args.classes} classes of {sizes.tolist()} particles after {res.iterations} iterations")
        return 0
    write_mrc(out / "half1.mrc", res.half1, ps)
    write_mrc(out / "half2.mrc", res.half2, ps)
    write_mrc(out / "map.mrc", res.map, ps)
    curves = {"rlnFourierShellCorrelation": res.fsc}
    general = {"rlnFinalResolution": res.resolution, "rlnCurrentIteration": res.iterations}
    write_fsc_star(out / "fsc.star", curves, n, ps, general=general)
    plot_fsc(out / "fsc.png", {"half maps": res.fsc}, n, ps, title=f"gold-standard FSC: {res.resolution:.2f} Å at 0.143")
    summary = {"resolution_A": round(res.resolution, 3),
               "resolution_fsc05_A": round(resolution_at(res.fsc, 0.5, ps, n), 3),
               "iterations": res.iterations, "converged": res.converged, "particles": len(images),
               "symmetry": args.symmetry, "seconds": round(time.time() - t0, 1), "history": res.history}
    (out / "run.json").write_text(json.dumps(summary, indent=1) + "\n")
    write_star(out / "particles.star", blocks)  # written last: the completion marker
    print(f"{out}: {len(images)} particles, {res.iterations} iterations, gold-standard resolution "
          f"{res.resolution:.2f} Å (FSC 0.143){'' if res.converged else ' (not converged: raise --iterations and --continue)'}")
    return 0


# --------------------------------------------------------------------------- postprocess
def _postprocess(args) -> int:
    from ..io.mrc import read_mrc  # noqa: PLC0415
    from ..spa.postprocess import postprocess, write_postprocess  # noqa: PLC0415

    h1, ps1 = load_map(args.half1, None, None, "half map 1") if not args.pixel_size else load_map(
        args.half1, args.pixel_size, None, "half map 1")
    ps = args.pixel_size or ps1
    h2, _ = load_map(args.half2, ps, h1.shape[0], "half map 2")
    mask = None
    if args.mask:
        mask, _ = read_mrc(args.mask)
        if mask.shape != h1.shape:
            raise InputError(args.mask, f"mask has shape {mask.shape}, the half maps {h1.shape}", "give a mask on the same grid")
    ref = None
    if args.reference:
        ref, _ = load_map(args.reference, ps, h1.shape[0], "reference")
    if args.bfactor == "auto":
        bfac = "auto"
    else:
        try:
            bfac = float(args.bfactor)
        except ValueError:
            raise InputError("--bfactor", f"not a number: {args.bfactor!r}", "use auto or a value in Å² (negative sharpens)") from None
    res = postprocess(backend.asarray(h1), backend.asarray(h2), ps, mask=None if mask is None else backend.asarray(mask),
                      bfactor=bfac, reference=None if ref is None else backend.asarray(ref),
                      mask_threshold=args.mask_threshold, particle_diameter=args.particle_diameter,
                      autob_lowres=args.autob_lowres)
    write_postprocess(res, args.out_dir, half1_name=str(args.half1), half2_name=str(args.half2),
                      mask_name=str(args.mask) if args.mask else None)
    print(postprocess_message(res, args.out_dir))
    return 0


def postprocess_message(res, out_dir, tool: str = "") -> str:
    """The one-line summary of a post-processing (native or a peer's, named by ``tool``)."""
    msg = (f"{out_dir}: resolution {res.resolution:.2f} Å (corrected masked FSC 0.143{', ' + tool if tool else ''}), "
           f"B-factor applied {res.bfactor:.0f} Å²")
    if res.hand:
        msg += (f"; vs reference: FSC 0.5 at {res.hand['resolution_as_is']:.1f} Å as is, "
                f"{res.hand['resolution_mirror']:.1f} Å mirrored -> hand: {res.hand['hand']}")
    return msg


# --------------------------------------------------------------------------- fsc
def _fsc(args) -> int:
    from ..io.mrc import read_mrc  # noqa: PLC0415
    from ..spa.fsc import align_to_reference, fsc, mirror_volume, plot_fsc, resolution_at, write_fsc_star  # noqa: PLC0415

    v1, ps = load_map(args.map1, args.pixel_size, None, "map 1") if args.pixel_size else load_map(args.map1, None, None, "map 1")
    v2, _ = load_map(args.map2, ps, v1.shape[0], "map 2")
    mask = None
    if args.mask:
        mask, _ = read_mrc(args.mask)
        if mask.shape != v1.shape:
            raise InputError(args.mask, f"mask has shape {mask.shape}, the maps {v1.shape}", "give a mask on the same grid")
    curves = {}
    note = ""
    a, b = backend.asarray(v1), backend.asarray(v2)
    if args.align:
        best = None
        for name, m in (("as is", a), ("mirror", mirror_volume(a))):
            al, info = align_to_reference(m, b, ps)
            c = fsc(al, b, mask)
            if best is None or np.mean(np.clip(c[1:], 0, 1)) > np.mean(np.clip(best[1][1:], 0, 1)):
                best = (name, c)
        note = f" (map 1 aligned to map 2, hand: {best[0]})"
        curve = best[1]
    else:
        curve = fsc(a, b, mask)
    curves["rlnFourierShellCorrelation"] = curve
    r143 = resolution_at(curve, 0.143, ps, v1.shape[0])
    r05 = resolution_at(curve, 0.5, ps, v1.shape[0])
    write_fsc_star(args.out, curves, v1.shape[0], ps,
                   general={"rlnFinalResolution": r143, "cvResolutionFsc05": r05, "cvMap1": str(args.map1),
                            "cvMap2": str(args.map2)})
    if args.plot:
        plot_fsc(args.plot, {"FSC": curve}, v1.shape[0], ps, title=f"{Path(args.map1).name} vs {Path(args.map2).name}")
    print(f"{args.out}: FSC 0.5 at {r05:.2f} Å, 0.143 at {r143:.2f} Å{note}")
    return 0


# --------------------------------------------------------------------------- registration
def register(group) -> None:
    sub = group("spa")
    p = sub.add_parser("initial-model", help="ab initio 3D map by stochastic gradient descent (hand undetermined)",
                       description="Ab initio map from particles of unknown orientation: mini-batch stochastic gradient "
                       "descent with a global orientation search and a relaxing low-pass, then a few EM iterations. "
                       "The hand of the result is undetermined (the structure or its mirror image).")
    p.add_argument("--particles", required=True, help="particle STAR file (RELION 3.1+)")
    p.add_argument("--out", required=True, help="output map (.mrc)")
    p.add_argument("--symmetry", default="C1", help="point group (C1, Cn, Dn, T, O, I); default C1")
    p.add_argument("--particle-diameter", type=float, required=True, help="Å, for the soft spherical mask")
    p.add_argument("--iterations", type=int, default=120, help="mini-batch iterations (default 120)")
    p.add_argument("--em-iterations", type=int, default=3, help="full EM iterations at the end (default 3)")
    p.add_argument("--batch", default="100,300", help="mini-batch size, or first,last (default 100,300)")
    p.add_argument("--initial-resolution", type=float, default=None, help="Å, starting low-pass (default max(40, 2 × final))")
    p.add_argument("--final-resolution", type=float, default=None, help="Å, final low-pass (default max(20, 4 × pixel))")
    p.add_argument("--angular-step", type=float, default=15.0, help="degrees, orientation grid (default 15)")
    p.add_argument("--max-shift", type=float, default=2.0, help="px, translation search ± (default 2)")
    p.add_argument("--max-particles", type=int, default=None, help="use a random subset of this many particles")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.set_defaults(func=_initial_model)

    p = sub.add_parser("refine3d", help="gold-standard 3D refinement (or --classes K: 3D classification)",
                       description="Projection matching with coarse-to-fine orientation search, independent half sets, "
                       "FSC-weighted references and reconstruction by direct Fourier inversion. Writes half1.mrc, "
                       "half2.mrc, map.mrc, fsc.star, fsc.png, particles.star, run.json and refine.log; every finished "
                       "iteration is saved so --continue resumes after an interruption.")
    p.add_argument("--particles", required=True, help="particle STAR file (RELION 3.1+)")
    p.add_argument("--reference", required=True, help="starting map (.mrc); resampled to the particles' grid")
    p.add_argument("--out-dir", required=True, help="output folder")
    p.add_argument("--symmetry", default="C1", help="point group (default C1)")
    p.add_argument("--particle-diameter", type=float, required=True, help="Å, for the soft spherical mask")
    p.add_argument("--iterations", type=int, default=15, help="largest number of iterations (default 15)")
    p.add_argument("--initial-lowpass", type=float, default=35.0, help="Å, low-pass of the starting map (default 35)")
    p.add_argument("--angular-step", type=float, default=15.0, help="degrees, global search step (default 15)")
    p.add_argument("--finest-step", type=float, default=None, help="degrees, last local step (default from radius and Nyquist)")
    p.add_argument("--max-shift", type=float, default=4.0, help="px, translation range of the global search (default 4)")
    p.add_argument("--continue", dest="resume", action="store_true", help="resume after the last finished iteration in --out-dir")
    p.add_argument("--auto-continue", action="store_true",
                   help="resume when --out-dir holds an interrupted run of the same particles, reference and options "
                   "(recorded in inputs.sha256); otherwise remove its iteration files and start afresh (the workflow's mode)")
    p.add_argument("--classes", type=int, default=1, help="number of 3D classes (1: refinement)")
    p.add_argument("--max-particles", type=int, default=None, help="use a random subset of this many particles")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.set_defaults(func=_refine3d)

    p = sub.add_parser("postprocess", help="mask, corrected FSC, B-factor and sharpening of two half maps",
                       description="RELION-style post-processing: automatic soft mask (or --mask), masked FSC corrected "
                       "by phase randomisation beyond the FSC-0.8 shell, B-factor from a Guinier fit, FSC-weighted "
                       "sharpened map. --reference (validation only) reports the FSC of the map and of its mirror.")
    p.add_argument("--half1", required=True, help="unfiltered half map 1 (.mrc)")
    p.add_argument("--half2", required=True, help="unfiltered half map 2 (.mrc)")
    p.add_argument("--out-dir", required=True, help="output folder")
    p.add_argument("--mask", default=None, help="solvent mask (.mrc, values 0..1); default: automatic")
    p.add_argument("--reference", default=None, help="known map for validation (e.g. the simulator's truth/map.mrc)")
    p.add_argument("--bfactor", default="auto", help="auto (Guinier fit) or a value in Å² to apply (negative sharpens)")
    p.add_argument("--autob-lowres", type=float, default=10.0, help="Å, low-resolution end of the Guinier fit (default 10)")
    p.add_argument("--mask-threshold", type=float, default=None, help="density threshold of the automatic mask")
    p.add_argument("--particle-diameter", type=float, default=None, help="Å, limits the automatic mask threshold statistics")
    p.add_argument("--pixel-size", type=float, default=None, help="Å/px (default: the half maps' header)")
    p.set_defaults(func=_postprocess)

    p = sub.add_parser("fsc", help="FSC of two maps (e.g. against the simulator's truth) as a STAR file",
                       description="Fourier shell correlation of MAP1 against MAP2 (resampled to MAP1's grid), "
                       "resolution at 0.5 and 0.143; --align first rotates and shifts MAP1 onto MAP2, trying both hands.")
    p.add_argument("map1", help="map (.mrc)")
    p.add_argument("map2", help="map to compare with (.mrc), e.g. truth/map.mrc")
    p.add_argument("--out", required=True, help="output FSC STAR file")
    p.add_argument("--mask", default=None, help="mask applied to both maps")
    p.add_argument("--align", action="store_true", help="align MAP1 to MAP2 (both hands) before the FSC")
    p.add_argument("--plot", default=None, help="also plot the curve into this PNG")
    p.add_argument("--pixel-size", type=float, default=None, help="Å/px (default: MAP1's header)")
    p.set_defaults(func=_fsc)
