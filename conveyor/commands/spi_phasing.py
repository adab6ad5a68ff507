"""``conveyor spi phase``: 3D phase retrieval of a merged intensity, with the PRTF.

::

    conveyor spi phase INTENSITY.mrc [--mask MASK.mrc] --out-density DENSITY.mrc \\
        --out-prtf PRTF.csv --out-png SLICES.png --out-resolution RES.json \\
        [--runs 8] [--iterations 400] [--algorithm raar|hio|er] [--diameter-nm D] [--seed 0]

The intensity MRC holds ``I(q)`` on a cubic grid with ``q = 0`` at index ``N // 2`` and
the reciprocal voxel ``dq`` (1/Å) as its header voxel size; the mask MRC (optional)
marks measured voxels 1 and missing or filled voxels 0. See :mod:`conveyor.spi.phasing`.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from .. import backend
from ..errors import InputError

log = logging.getLogger(__name__)


def register(group):
    p = group("spi").add_parser(
        "phase",
        help="3D phase retrieval of a merged intensity (RAAR/HIO + ER, shrinkwrap), PRTF",
        description=(
            "Retrieve the phases of a 3D intensity (q = 0 at N//2, header voxel size = dq in 1/A): "
            "several runs from random phases with RAAR or HIO alternated with ER, shrinkwrap support "
            "updates and positivity; the runs are aligned (translation and centrosymmetric inversion) "
            "and averaged. Writes the averaged density (voxel 1/(N dq) A), the PRTF, a PNG of central "
            "slices and the PRTF, and the resolution where the PRTF drops below 1/e."
        ),
    )
    p.add_argument("intensity", metavar="INTENSITY.mrc", help="3D intensity; header voxel size = dq in 1/A")
    p.add_argument("--mask", metavar="MASK.mrc", help="measured voxels 1, missing or filled voxels 0 (default: all measured, "
                   "except all-zero corners beyond the inscribed sphere)")
    p.add_argument("--out-density", required=True, metavar="DENSITY.mrc", help="averaged density (voxel size in A)")
    p.add_argument("--out-prtf", required=True, metavar="PRTF.csv", help="PRTF per shell")
    p.add_argument("--out-png", required=True, metavar="SLICES.png", help="central slices of the density and the PRTF curve")
    p.add_argument("--out-resolution", required=True, metavar="RES.json|RES.txt",
                   help="resolution at PRTF = 1/e (JSON if the name ends in .json, else 'key value' lines)")
    p.add_argument("--runs", type=int, default=8, help="independent runs from random phases (default %(default)s)")
    p.add_argument("--iterations", type=int, default=400, help="iterations per run (default %(default)s)")
    p.add_argument("--algorithm", choices=("raar", "hio", "er"), default="raar", help="main algorithm, alternated with ER (default %(default)s)")
    p.add_argument("--beta", type=float, default=None, help="feedback parameter (default 0.87 for RAAR, 0.9 for HIO)")
    p.add_argument("--diameter-nm", type=float, default=None,
                   help="expected particle diameter: start from a ball 20%% wider (default: autocorrelation support)")
    p.add_argument("--shrinkwrap-threshold", type=float, default=0.2, help="shrinkwrap threshold, fraction of the max of the blurred density (default %(default)s)")
    p.add_argument("--no-shrinkwrap", action="store_true", help="keep the initial support fixed")
    p.add_argument("--keep-error-ratio", type=float, default=1.5,
                   help="leave out runs whose final error exceeds this multiple of the best (default %(default)s; 0 keeps all)")
    p.add_argument("--dq", type=float, default=None, help="reciprocal voxel in 1/A (default: the intensity header voxel size)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the runs (default %(default)s)")
    p.set_defaults(func=_run)


# ---------------------------------------------------------------------------------------
def _read_inputs(args):
    from ..io.mrc import read_mrc

    path = Path(args.intensity)
    inten, dq_header = read_mrc(path)  # missing, unreadable, NaN/inf: InputError naming the file
    shape = tuple(int(s) for s in inten.shape)
    if inten.ndim != 3 or len(set(shape)) != 1:
        raise InputError(path, f"phasing needs a cubic 3D intensity, got shape {shape}",
                         "give the N x N x N intensity of the merge step")
    n = shape[0]
    if n < 8:
        raise InputError(path, f"a {n}^3 intensity is too small to phase", "use a grid of at least 8^3")
    if float(np.max(inten)) <= 0:
        raise InputError(path, "intensity holds no positive value", "check the merge step wrote a non-empty volume")
    dq = float(args.dq) if args.dq is not None else float(dq_header)
    if not (np.isfinite(dq) and dq > 0):
        raise InputError(path, "header voxel size (dq in 1/A) is not set",
                         "write dq in 1/A as the voxel size of the intensity MRC or pass --dq")
    voxel = 1.0 / (n * dq)
    if voxel < 0.5:
        raise InputError(path, f"dq = {dq:g} 1/A gives a real-space voxel of {voxel:.3g} A",
                         "the header voxel size must be the reciprocal voxel dq in 1/A (is this a real-space map?); pass --dq")
    mask = None
    if args.mask:
        mpath = Path(args.mask)
        mask, _ = read_mrc(mpath)
        if tuple(mask.shape) != shape:
            raise InputError(mpath, f"mask shape {tuple(mask.shape)} differs from the intensity {shape}",
                             f"give the mask written with {path.name}")
        mask = mask > 0.5
        if not mask.any():
            raise InputError(mpath, "no voxel is marked as measured (1)", "check the mask: 1 = measured, 0 = missing or filled")
    return inten.astype(np.float32), mask, dq, voxel


def _check_args(args):
    if args.runs < 1:
        raise InputError("--runs", f"need at least 1 run, got {args.runs}", "e.g. --runs 8")
    if args.iterations < 1:
        raise InputError("--iterations", f"need at least 1 iteration, got {args.iterations}", "e.g. --iterations 400")
    if args.diameter_nm is not None and not args.diameter_nm > 0:
        raise InputError("--diameter-nm", f"must be positive, got {args.diameter_nm}", "give the particle diameter in nm")
    if not 0 < args.shrinkwrap_threshold < 1:
        raise InputError("--shrinkwrap-threshold", f"must be within (0, 1), got {args.shrinkwrap_threshold}", "e.g. 0.2")


def _schedule_for(n_iter):
    """ER cycles and the final ER block scaled to short runs (defaults for ≥ 250 iterations)."""
    final_er = min(50, max(1, n_iter // 5))
    return dict(cycle=100, er_per_cycle=20, final_er=final_er)


def _run(args) -> int:
    from ..spi import phasing as ph

    t0 = time.time()
    _check_args(args)
    inten, mask, dq, voxel = _read_inputs(args)
    n = inten.shape[0]
    xp_int = backend.asarray(inten)
    xp_mask = None if mask is None else backend.asarray(mask)
    support = None
    if args.diameter_nm is not None:
        d_vox = 1.2 * args.diameter_nm * 10.0 / voxel
        if d_vox > n:
            raise InputError("--diameter-nm", f"{args.diameter_nm} nm is {d_vox / 1.2:.1f} voxels of {voxel:.3g} A, "
                             f"larger than the {n}^3 grid", "check the diameter and the dq of the intensity")
        if d_vox < 3:
            raise InputError("--diameter-nm", f"{args.diameter_nm} nm is under 3 voxels of {voxel:.3g} A", "check the diameter and the dq of the intensity")
        support = ph.sphere_support(n, d_vox, xp=backend.xp())
    shrinkwrap = None if args.no_shrinkwrap else ph.Shrinkwrap(threshold=args.shrinkwrap_threshold)
    log.info("phasing %d^3 on %s: voxel %.3f A, %d runs x %d iterations (%s)", n, backend.describe(), voxel,
             args.runs, args.iterations, args.algorithm)
    res = ph.phase_many(
        xp_int, n_runs=args.runs, mask=xp_mask, support=support, seed=args.seed, dq=dq,
        keep_error_ratio=args.keep_error_ratio if args.keep_error_ratio and args.keep_error_ratio > 0 else None,
        n_iter=args.iterations, algorithm=args.algorithm, beta=args.beta, shrinkwrap=shrinkwrap,
        **_schedule_for(args.iterations),
    )
    density = backend.to_host(res.average)
    pr = res.prtf
    runtime = time.time() - t0

    from ..io.mrc import write_mrc

    write_mrc(args.out_density, density, voxel)
    _write_prtf_csv(args.out_prtf, pr)
    _write_png(args.out_png, density, voxel, pr, args)
    summary = _summary(args, res, pr, n, dq, voxel, runtime)
    _write_resolution(args.out_resolution, summary)
    state = "" if pr.crossed else " (PRTF stays above 1/e up to the data edge)"
    print(f"phased {n}^3 ({voxel:.2f} A voxels): {len(res.kept)}/{args.runs} runs kept, "
          f"best error {summary['best_error']:.4f}, resolution {summary['resolution_nm']:.2f} nm{state}, {runtime:.1f} s")
    return 0


def _summary(args, res, pr, n, dq, voxel, runtime):
    errs = [float(r.final_error) for r in res.runs]
    return {
        "resolution_nm": pr.resolution / 10.0,
        "resolution_A": pr.resolution,
        "resolution_definition": "1/q (full period) where the shell-averaged PRTF first drops below the threshold",
        "q_cut_per_nm": pr.q_cut * 10.0,
        "q_cut_per_A": pr.q_cut,
        "prtf_threshold": pr.threshold,
        "crossed": bool(pr.crossed),
        "nyquist_nm": 2.0 * voxel / 10.0,
        "voxel_A": voxel,
        "grid": n,
        "dq_per_A": dq,
        "runs": int(args.runs),
        "runs_kept": [int(k) for k in res.kept],
        "reference_run": int(res.reference),
        "final_errors": errs,
        "best_error": float(min(errs)),
        "inverted": [bool(a.flipped) for a in res.alignments],
        "algorithm": args.algorithm,
        "iterations": int(args.iterations),
        "seed": int(args.seed),
        "intensity": str(Path(args.intensity).resolve()),
        "mask": str(Path(args.mask).resolve()) if args.mask else None,
        "device": backend.get_device(),
        "runtime_s": round(runtime, 3),
    }


def _write_prtf_csv(path, pr):
    from ..io.atomic import write_text

    lines = ["shell,q_per_nm,q_per_A,resolution_nm,prtf,n_voxels"]
    for k, (q, v, c) in enumerate(zip(pr.q, pr.prtf, pr.counts)):
        res_nm = f"{1.0 / q / 10.0:.6g}" if q > 0 else ""
        val = f"{v:.6g}" if np.isfinite(v) else ""
        lines.append(f"{k},{q * 10.0:.6g},{q:.6g},{res_nm},{val},{int(c)}")
    write_text(path, "\n".join(lines) + "\n")


def _write_resolution(path, summary):
    from ..io.atomic import write_text

    path = Path(path)
    if path.suffix.lower() == ".json":
        write_text(path, json.dumps(summary, indent=2) + "\n")
        return
    keys = ("resolution_nm", "q_cut_per_nm", "crossed", "prtf_threshold", "nyquist_nm", "voxel_A", "grid",
            "best_error", "runtime_s")
    lines = [f"{k} {str(summary[k]).lower() if isinstance(summary[k], bool) else summary[k]}" for k in keys]
    lines.append(f"runs_kept {len(summary['runs_kept'])}/{summary['runs']}")
    write_text(path, "\n".join(lines) + "\n")


def _write_png(path, density, voxel, pr, args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io.atomic import atomic_path

    n = density.shape[0]
    c = n // 2
    ext = np.array([-c, n - c, -c, n - c]) * voxel / 10.0  # nm
    fig, axes = plt.subplots(1, 4, figsize=(16, 4.2))
    vmax = float(density.max()) or 1.0
    for ax, (img, title, lab) in zip(axes[:3], [
        (density[c], "z = 0 (xy plane)", ("x (nm)", "y (nm)")),
        (density[:, c], "y = 0 (xz plane)", ("x (nm)", "z (nm)")),
        (density[:, :, c], "x = 0 (yz plane)", ("y (nm)", "z (nm)")),
    ]):
        ax.imshow(img, origin="lower", extent=ext, cmap="gray", vmin=0, vmax=vmax)
        ax.set_title(title)
        ax.set_xlabel(lab[0])
        ax.set_ylabel(lab[1])
    ax = axes[3]
    ok = np.isfinite(pr.prtf)
    ax.plot(pr.q[ok] * 10.0, pr.prtf[ok], "o-", ms=3, label="PRTF")
    ax.axhline(pr.threshold, color="gray", ls="--", label="1/e")
    if np.isfinite(pr.q_cut):
        lab = f"{pr.resolution / 10.0:.1f} nm" + ("" if pr.crossed else " (data edge)")
        ax.axvline(pr.q_cut * 10.0, color="C3", ls=":", label=lab)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("q (1/nm)")
    ax.set_ylabel("PRTF")
    ax.set_title(f"PRTF, {args.runs} runs")
    ax.legend(loc="lower left", fontsize=8)
    fig.suptitle(f"{Path(args.intensity).name}: density ({voxel / 10.0:.2f} nm voxels)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)
