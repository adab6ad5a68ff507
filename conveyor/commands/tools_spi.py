"""``conveyor tools spi-processing|spi-em-class|dragonfly-emc``: the seeds' own SPI tools on our files.

::

    conveyor tools spi-processing SHOTS.cxi --out SIZE.h5 [--dmin-nm 20 --dmax-nm 200] [--work-dir DIR]
    conveyor tools spi-em-class --shots A.cxi B.cxi --frames-table A.h5 B.h5 --out-dir DIR [--classes 10]
    conveyor tools dragonfly-emc --shots A.cxi [--frames-table A.h5 | --selected-frames selected.csv] \\
        --out-dir DIR [--num-div 4 --iterations 10 --beta-start auto --beta-factor 2 --beta-every 5]

Each writes the same files as its native counterpart (``conveyor spi size``,
``conveyor spi class2d`` + ``conveyor spi select``, ``conveyor spi emc``), so a rule can
switch between the native step and the peer tool. See docs/tools_spi.md.
"""

from __future__ import annotations

import numpy as np


def _spi_processing(args) -> int:
    from ..tools import spi_processing as sp

    df = sp.run_spi_processing(
        args.shots, args.out, dmin_nm=args.dmin_nm, dmax_nm=args.dmax_nm, threshold=_threshold(args.threshold),
        k_sigma=args.k_sigma, min_photons=args.min_photons, refine_center=not args.no_refine_center,
        refine_shift_px=args.refine_shift_px, nsize=args.nsize, work_dir=args.work_dir)
    hits = df["is_hit"].to_numpy(bool)
    d = df["diameter_nm"].to_numpy(np.float64)[hits]
    med = float(np.nanmedian(d)) if np.isfinite(d).any() else float("nan")
    a = df.attrs
    print(f"{args.shots}: spi_processing found {int(hits.sum())} hits of {len(df)} frames "
          f"(num_photons > {a['hit_threshold']:.1f}), beam centre x={a['run_center_x']:.2f} y={a['run_center_y']:.2f} px "
          f"({a['center_source']}), median diameter {med:.1f} nm, in {a['runtime_s']:.1f} s -> {args.out}")
    return 0


def _spi_em_class(args) -> int:
    from ..tools import spi_em_class as ec

    res = ec.run_spi_em_class(
        args.shots, args.frames_table, args.out_dir, classes=args.classes, rotations=args.rotations,
        iterations=args.iterations, q_min=args.q_min, q_max=args.q_max, friedel=not args.no_friedel,
        logscale=not args.no_logscale, binning=args.binning,
        symmetry_orders=args.symmetry_order or ec.DEFAULT_ORDERS, symmetry_threshold=args.symmetry_threshold,
        select_classes=args.select_classes, seed=args.seed)
    cs = res["class_scores"]
    pops = ", ".join(f"{int(k)}:{int(n)}" for k, n in zip(cs["class"], cs["population"]))
    chosen = ", ".join(str(int(k)) for k in cs.loc[cs["selected"], "class"]) or "none"
    print(f"spi_em_class: {len(res['assignments'])} frames in {len(cs)} classes ({pops}); selected classes {chosen} "
          f"({len(res['selected'])} frames) in {res['runtime_s']:.1f} s -> {args.out_dir}/"
          "{assignments.csv,selected.csv,class_scores.csv,classes.h5}")
    return 0


def _dragonfly_emc(args) -> int:
    from ..tools import dragonfly as df

    res = df.run_dragonfly_emc(
        args.shots, args.out_dir, tables=args.frames_table, selected_csv=args.selected_frames, num_div=args.num_div,
        iterations=args.iterations, beta_start=args.beta_start, beta_factor=args.beta_factor, beta_every=args.beta_every,
        need_scaling=not args.no_scale, polarization=args.polarization, max_radius_px=args.max_radius_px,
        binning=args.bin, init=args.init, seed=args.seed, threads=args.threads, mpi_procs=args.mpi_procs)
    last = res["log"][-1] if res["log"] else {}
    print(f"Dragonfly {res['version']} EMC: {res['n_frames']} frames, {df.num_rotations(args.num_div)} rotations, "
          f"{len(res['log'])} iterations (last: mutual info {last.get('mutual_info', float('nan')):.3f}, "
          f"rms change {last.get('rms_change', float('nan')):.3g}) in {res['runtime_s']:.1f} s -> {args.out_dir}/"
          f"{{intensity.mrc,intensity_weight.mrc,orientations.csv,log.csv}} ({res['size']}^3, dq "
          f"{res['dq_per_m'] * 1e-10:.4e} 1/A)")
    return 0


def _threshold(value: str):
    from ..errors import InputError

    if value == "auto":
        return "auto"
    try:
        return float(value)
    except ValueError:
        raise InputError("--threshold", f"not a number or 'auto': {value!r}", "give --threshold auto or a photon count") from None


def register(group) -> None:
    tools = group("tools")

    p = tools.add_parser(
        "spi-processing", help="hits, beam centre and sizes with spi_processing's scripts (SPI stages 1-4)",
        description="Run spi_processing 0.1.3 (spi_compute_photons, spi_filter, spi_estimate_center, "
        "spi_estimate_size, spi_refine_center) on a copy of SHOTS.cxi and write the per-frame table of "
        "'conveyor spi size' (frame, photons, lit_pixels, hit_score, is_hit, center_x, center_y, diameter_nm, "
        "size_score, ...), which 'conveyor spi filter' reads.")
    p.add_argument("shots", metavar="SHOTS.cxi", help="CXI file of shots (not modified)")
    p.add_argument("--out", required=True, metavar="SIZE.h5", help="per-frame table to write")
    p.add_argument("--dmin-nm", type=float, default=20.0, help="smallest diameter searched, nm (default %(default)s)")
    p.add_argument("--dmax-nm", type=float, default=200.0, help="largest diameter searched, nm (default %(default)s)")
    p.add_argument("--threshold", default="auto",
                   help="hit threshold on the tool's num_photons, or 'auto' (Conveyor's rule on the tool's counts; default)")
    p.add_argument("--k-sigma", type=float, default=None, help="auto threshold: background sigmas above the mode (default 5)")
    p.add_argument("--min-photons", type=float, default=0.0, help="hits must also have at least this many photons")
    p.add_argument("--no-refine-center", action="store_true", help="skip spi_refine_center.py")
    p.add_argument("--refine-shift-px", type=int, default=2,
                   help="spi_refine_center.py --max-shift: search +-N px in 0.2 px steps (default %(default)s)")
    p.add_argument("--nsize", type=int, default=300, help="sizes tested in the range (spi_estimate_size.py -n; default %(default)s)")
    p.add_argument("--work-dir", default=None, help="keep the tool's files (CXI copies, reports, logs) in this folder")
    p.set_defaults(func=_spi_processing)

    p = tools.add_parser(
        "spi-em-class", help="2D EM classification and symmetry selection with spi_em_class (SPI stages 5-6)",
        description="Run spi_em_class 0.1.7 (spi_em_create, spi_em_config, spi_em_run, spi_em_save_by_symmetry) on "
        "the frames that passed 'conveyor spi filter' and write DIR/assignments.csv (file, frame, class, ...), "
        "DIR/selected.csv (file, frame, class), DIR/class_scores.csv and DIR/classes.h5; the tool's own files are "
        "kept in DIR/spi_em_class/.")
    p.add_argument("--shots", required=True, nargs="+", metavar="SHOTS.cxi", help="CXI files of shots")
    p.add_argument("--frames-table", required=True, nargs="+", metavar="TABLE.h5",
                   help="per-frame tables of 'conveyor spi filter' (or tools spi-processing), one per shot file")
    p.add_argument("--out-dir", required=True, metavar="DIR", help="output folder")
    p.add_argument("--classes", type=int, default=10, help="number of classes (default %(default)s)")
    p.add_argument("--rotations", type=int, default=100, help="in-plane angles (the tool's num_rot; default %(default)s)")
    p.add_argument("--iterations", type=int, default=20, help="EM iterations (default %(default)s)")
    p.add_argument("--q-min", type=int, default=0, help="inner radius used, px (0: all; default %(default)s)")
    p.add_argument("--q-max", type=int, default=0, help="outer radius used, px (0: all; default %(default)s)")
    p.add_argument("--binning", type=int, default=1, help="sum BIN x BIN pixel blocks (default %(default)s)")
    p.add_argument("--no-friedel", action="store_true", help="angles over 360 deg instead of 180 deg")
    p.add_argument("--no-logscale", action="store_true", help="classify photon counts instead of log(1 + counts)")
    p.add_argument("--symmetry-order", type=int, nargs="+", default=None, metavar="N",
                   help="orders for spi_em_save_by_symmetry.py; a class passing any is selected "
                        "(default 10 6: an icosahedral particle along its 5- and 3-fold axes)")
    p.add_argument("--symmetry-threshold", type=float, default=0.5,
                   help="least share of the angular power in the order's harmonic (the tool's -t; default %(default)s)")
    p.add_argument("--select-classes", type=int, nargs="+", default=None, metavar="K",
                   help="select these classes (1-based) instead of the symmetry rule")
    p.add_argument("--seed", type=int, default=0, help="numpy seed of the tool's random start (default %(default)s)")
    p.set_defaults(func=_spi_em_class)

    p = tools.add_parser(
        "dragonfly-emc", help="3D intensity by EMC with Dragonfly (SPI stage 7)",
        description="Write Dragonfly 0.1.0 detector, photon and config files for the selected frames, run its EMC "
        "(dragonfly.emc) and write DIR/intensity.mrc (voxel size = dq in 1/A, q = 0 at size//2, axes qz,qy,qx), "
        "DIR/intensity_weight.mrc, DIR/orientations.csv and DIR/log.csv like 'conveyor spi emc'; Dragonfly's own "
        "files are kept in DIR/dragonfly/.")
    p.add_argument("--shots", required=True, nargs="+", metavar="CXI", help="CXI shot files")
    p.add_argument("--frames-table", nargs="+", default=None, metavar="H5",
                   help="per-file frame tables (same order as --shots) with a boolean column 'passed'")
    p.add_argument("--selected-frames", default=None, metavar="CSV",
                   help="CSV with columns file,frame of the frames to use (e.g. selected.csv of spi select)")
    p.add_argument("--out-dir", required=True, metavar="DIR", help="output folder")
    p.add_argument("--num-div", type=int, default=4,
                   help="Dragonfly's num_div: 10(5n^3+n) rotations (default %(default)s)")
    p.add_argument("--iterations", type=int, default=10, help="number of iterations (default %(default)s)")
    p.add_argument("--beta-start", default="auto",
                   help="start inverse temperature, or 'auto' (Dragonfly's per-frame rule; default %(default)s)")
    p.add_argument("--beta-factor", type=float, default=2.0, help="multiply beta by this ... (default %(default)s)")
    p.add_argument("--beta-every", type=int, default=5, help="... every this many iterations (default %(default)s)")
    p.add_argument("--no-scale", action="store_true", help="do not fit a scale (fluence) per frame")
    p.add_argument("--bin", type=int, default=1, help="sum BIN x BIN pixel blocks first; the voxel grows by BIN (default %(default)s)")
    p.add_argument("--max-radius-px", type=float, default=None,
                   help="use pixels within this radius of the beam centre, after binning (default: the largest full circle)")
    p.add_argument("--polarization", choices=("x", "y", "none"), default="x", help="beam polarisation (default %(default)s)")
    p.add_argument("--init", choices=("radial", "random"), default="random",
                   help="start model: random (as Dragonfly's own) or the frames' radial average with 10%% noise (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the start model (default %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="OpenMP threads per process (default: all cores)")
    p.add_argument("--mpi-procs", type=int, default=1, help="MPI processes (mpirun -np; default %(default)s)")
    p.set_defaults(func=_dragonfly_emc)
