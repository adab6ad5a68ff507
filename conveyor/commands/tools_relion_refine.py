"""``conveyor tools relion-class2d | relion-initial-model | relion-refine3d | relion-postprocess``.

Each takes the options of the native command it stands in for (``conveyor spa class2d``,
``spa initial-model``, ``spa refine3d``, ``spa postprocess``), runs RELION 3.1 and writes
the native command's files into the same place (see :mod:`conveyor.tools.relion_refine`
and docs/tools.md). Options without a RELION meaning are accepted and ignored; their help
says so. Extra options: ``--threads`` (RELION's ``--j``), ``--relion-bin``, ``--work-dir``,
and for refinement ``--mpi`` and ``--mpirun``.
"""

from __future__ import annotations

import argparse

IGNORED = "accepted for the native flags; no RELION 3.1 counterpart, ignored"


def _common(p, threads_help: str = "RELION threads (--j)") -> None:
    # no default here: `conveyor --threads N tools ...` (the workflow's form) must reach RELION
    p.add_argument("--threads", type=int, default=argparse.SUPPRESS,
                   help=f"{threads_help}; default: conveyor --threads, else every core this process may use")
    p.add_argument("--relion-bin", default=None, help="directory of the RELION binaries (default: PATH)")
    p.add_argument("--work-dir", default=None, help="keep RELION's own files in this directory")


def _threads() -> int:
    """``--threads`` (given after the command or as ``conveyor --threads``), else the cores available."""
    from .. import backend  # noqa: PLC0415

    return backend.threads()


def _class2d(args) -> int:
    from ..tools.relion_refine import run_class2d  # noqa: PLC0415

    r = run_class2d(args.particles, args.out_dir, classes=args.classes, particle_diameter=args.particle_diameter,
                    iterations=args.iterations, psi_step=args.psi_step, offset_range=args.offset_range,
                    offset_step=args.offset_step, initial_resolution=args.initial_resolution,
                    max_resolution=args.max_resolution, temperature=args.temperature, center=not args.no_center,
                    seed=args.seed, max_particles=args.max_particles, threads=_threads(),
                    relion_bin=args.relion_bin, work_dir=args.work_dir)
    res = r["result"]
    best = int(res.class_resolution.argmin()) + 1
    rate = r["n"] * args.iterations / max(r["seconds"], 1e-9)
    print(f"{args.out_dir}: {r['n']} particles in {args.classes} classes (RELION 3.1), largest class "
          f"{res.class_counts[0]} particles, best class {best} at {res.class_resolution[best - 1]:.1f} Å; "
          f"{r['seconds']:.1f} s ({rate:.0f} particle-iterations/s); look at {args.out_dir}/gallery.png")
    return 0


def _initial_model(args) -> int:
    from ..tools.relion_refine import run_initial_model  # noqa: PLC0415

    r = run_initial_model(args.particles, args.out, particle_diameter=args.particle_diameter, symmetry=args.symmetry,
                          iterations=args.iterations, em_iterations=args.em_iterations, batch=args.batch,
                          initial_resolution=args.initial_resolution, final_resolution=args.final_resolution,
                          angular_step=args.angular_step, max_shift=args.max_shift, max_particles=args.max_particles,
                          seed=args.seed, threads=_threads(), relion_bin=args.relion_bin, work_dir=args.work_dir)
    print(f"{args.out}: initial model from {r['n']} images ({args.symmetry}) by RELION 3.1's SGD, "
          f"{r['seconds']:.0f} s; the hand is undetermined (the structure or its mirror image)")
    return 0


def _refine3d(args) -> int:
    from ..tools.relion_refine import run_refine3d  # noqa: PLC0415

    r = run_refine3d(args.particles, args.reference, args.out_dir, particle_diameter=args.particle_diameter,
                     symmetry=args.symmetry, iterations=args.iterations, initial_lowpass=args.initial_lowpass,
                     angular_step=args.angular_step, finest_step=args.finest_step, max_shift=args.max_shift,
                     resume=args.resume, auto_continue=args.auto_continue, classes=args.classes,
                     max_particles=args.max_particles, seed=args.seed, threads=_threads(), mpi=args.mpi,
                     mpirun=args.mpirun, relion_bin=args.relion_bin, work_dir=args.work_dir)
    if args.classes > 1:
        print(f"{args.out_dir}: {args.classes} classes of {r['classes'].tolist()} particles after "
              f"{r['iterations']} iterations (RELION 3.1)")
    else:
        state = "converged" if r["converged"] else "stopped at --iterations (raise it and --continue)"
        print(f"{args.out_dir}: {r['n']} particles, {r['iterations']} iterations ({state}), gold-standard "
              f"resolution {r['resolution']:.2f} Å (FSC 0.143, RELION 3.1)")
    return 0


def _postprocess(args) -> int:
    from ..tools.relion_refine import run_postprocess  # noqa: PLC0415
    from .spa_refine import postprocess_message  # noqa: PLC0415

    res = run_postprocess(args.half1, args.half2, args.out_dir, mask=args.mask, reference=args.reference,
                          bfactor=args.bfactor, autob_lowres=args.autob_lowres, mask_threshold=args.mask_threshold,
                          particle_diameter=args.particle_diameter, pixel_size=args.pixel_size,
                          threads=_threads(), relion_bin=args.relion_bin, work_dir=args.work_dir)
    print(postprocess_message(res, args.out_dir, "RELION 3.1"))
    return 0


def register(group) -> None:
    tools = group("tools")

    p = tools.add_parser(
        "relion-class2d", help="2D classification with RELION 3.1's relion_refine (as spa class2d)",
        description="Run RELION 3.1's 2D classification on the particles with the options of `conveyor spa class2d` "
        "and write its files: DIR/class_averages.mrcs, DIR/gallery.png, DIR/log.csv, DIR/particles.star and "
        "DIR/model.star (last), classes numbered 1..K by decreasing population. particles.star has no cvMisfit "
        "column (RELION has no such figure): `spa select` then removes no outliers.")
    p.add_argument("--particles", required=True, help="particle STAR file (conveyor spa extract/merge)")
    p.add_argument("--out-dir", required=True, help="output directory")
    p.add_argument("--classes", type=int, required=True, help="number of classes K (--K)")
    p.add_argument("--particle-diameter", type=float, required=True, help="mask diameter, Å (--particle_diameter)")
    p.add_argument("--iterations", type=int, default=25, help="iterations (--iter; default 25)")
    p.add_argument("--psi-step", type=float, default=10.0,
                   help="in-plane step, degrees (--psi_step, RELION's coarse step; default 10)")
    p.add_argument("--offset-range", type=float, default=5.0, help="translations searched, ± px (--offset_range)")
    p.add_argument("--offset-step", type=float, default=1.0, help="translation step, px (--offset_step)")
    p.add_argument("--initial-resolution", type=float, default=30.0, help="Å, first iteration's limit (--ini_high)")
    p.add_argument("--max-resolution", type=float, default=None, help="Å, never beyond (--strict_highres_exp)")
    p.add_argument("--temperature", type=float, default=1.0, help=IGNORED)
    p.add_argument("--no-center", action="store_true", help=f"{IGNORED} (RELION 3.1 does not re-centre classes)")
    p.add_argument("--seed", type=int, default=0, help="random seed (--random_seed SEED+1; --max-particles subset)")
    p.add_argument("--max-particles", type=int, default=None,
                   help="classify a random subset of this many particles (the native command's subset)")
    _common(p)
    p.set_defaults(func=_class2d)

    p = tools.add_parser(
        "relion-initial-model", help="ab initio map with RELION 3.1's SGD (as spa initial-model)",
        description="Run relion_refine --sgd --denovo_3dref (RELION 3.1) with the options of `conveyor spa "
        "initial-model` and write the map to --out. The hand is undetermined.")
    p.add_argument("--particles", required=True, help="particle STAR file (RELION 3.1+)")
    p.add_argument("--out", required=True, help="output map (.mrc)")
    p.add_argument("--symmetry", default="C1", help="point group (--sym; default C1)")
    p.add_argument("--particle-diameter", type=float, required=True, help="Å (--particle_diameter)")
    p.add_argument("--iterations", type=int, default=120,
                   help="SGD iterations, split 1:4:1 into --sgd_ini_iter/--sgd_inbetween_iter/--sgd_fin_iter")
    p.add_argument("--em-iterations", type=int, default=3, help=IGNORED)
    p.add_argument("--batch", default="100,300",
                   help="mini-batch size, or first,last (--sgd_ini_subset/--sgd_fin_subset)")
    p.add_argument("--initial-resolution", type=float, default=None,
                   help="Å, --sgd_ini_resol (default max(40, 2 × final))")
    p.add_argument("--final-resolution", type=float, default=None,
                   help="Å, --sgd_fin_resol (default max(20, 4 × pixel))")
    p.add_argument("--angular-step", type=float, default=15.0, help="degrees, nearest --healpix_order (default 15: 2)")
    p.add_argument("--max-shift", type=float, default=2.0, help="px, --offset_range (default 2)")
    p.add_argument("--max-particles", type=int, default=None, help="use a random subset of this many particles")
    p.add_argument("--seed", type=int, default=0, help="random seed (--random_seed SEED+1)")
    _common(p)
    p.set_defaults(func=_initial_model)

    p = tools.add_parser(
        "relion-refine3d", help="gold-standard refinement with RELION 3.1's auto-refine (as spa refine3d)",
        description="Run mpirun -n 3 relion_refine_mpi --auto_refine --split_random_halves (RELION 3.1; "
        "--classes K > 1: relion_refine --K K, 3D classification) with the options of `conveyor spa refine3d` "
        "and write its files: half1.mrc, half2.mrc, map.mrc, fsc.star, fsc.png, particles.star, run.json and "
        "refine.log (classes: classNNN.mrc, particles.star, run.json). RELION's own files stay in "
        "OUT/relion (or --work-dir) so that --continue resumes them.")
    p.add_argument("--particles", required=True, help="particle STAR file (RELION 3.1+)")
    p.add_argument("--reference", required=True, help="starting map (.mrc); resampled to the particles' grid")
    p.add_argument("--out-dir", required=True, help="output folder")
    p.add_argument("--symmetry", default="C1", help="point group (--sym; default C1)")
    p.add_argument("--particle-diameter", type=float, required=True, help="Å (--particle_diameter)")
    p.add_argument("--iterations", type=int, default=15,
                   help="largest number of iterations (--auto_iter_max; classification: --iter; default 15)")
    p.add_argument("--initial-lowpass", type=float, default=35.0, help="Å, low-pass of the starting map (--ini_high)")
    p.add_argument("--angular-step", type=float, default=15.0, help="degrees, nearest --healpix_order (default 15: 2)")
    p.add_argument("--finest-step", type=float, default=None, help=f"{IGNORED} (auto-refine chooses its own)")
    p.add_argument("--max-shift", type=float, default=4.0, help="px, --offset_range (default 4)")
    p.add_argument("--continue", dest="resume", action="store_true",
                   help="resume after the last finished iteration (--continue run_itNNN_optimiser.star)")
    p.add_argument("--auto-continue", action="store_true",
                   help="resume when OUT/relion holds an interrupted run of the same particles, reference and options "
                   "(recorded in OUT/inputs.sha256); otherwise remove RELION's earlier files and start afresh (the "
                   "workflow's mode)")
    p.add_argument("--classes", type=int, default=1, help="number of 3D classes (1: refinement; K > 1: --K K)")
    p.add_argument("--max-particles", type=int, default=None, help="use a random subset of this many particles")
    p.add_argument("--seed", type=int, default=0, help="random seed (--random_seed SEED+1)")
    _common(p, "threads in all (refinement: --j N/2 for each of the two followers; classification: --j N)")
    p.add_argument("--mpi", type=int, default=3, help="MPI processes of the refinement (at least 3; default 3)")
    p.add_argument("--mpirun", default=None, help="MPI launcher with its options (default: mpirun)")
    p.set_defaults(func=_refine3d)

    p = tools.add_parser(
        "relion-postprocess", help="mask, FSC, B-factor and sharpening with relion_postprocess (as spa postprocess)",
        description="Run relion_postprocess (RELION 3.1) on two half maps with the options of `conveyor spa "
        "postprocess` and write its files: postprocess.mrc, postprocess_masked.mrc, postprocess.star, fsc.png, "
        "slices.png, postprocess.json and, when the mask is made here, mask.mrc. Mask: --mask; else with "
        "--mask-threshold relion_mask_create at that density of the mean half map (low-pass 15 Å, extended "
        "6 Å, soft edge 9 Å, as the native automatic mask); else a soft sphere of --particle-diameter (0.75 × "
        "the box without it).")
    p.add_argument("--half1", required=True, help="unfiltered half map 1 (.mrc)")
    p.add_argument("--half2", required=True, help="unfiltered half map 2 (.mrc)")
    p.add_argument("--out-dir", required=True, help="output folder")
    p.add_argument("--mask", default=None, help="solvent mask (.mrc, values 0..1; --mask)")
    p.add_argument("--reference", default=None, help="known map for validation (hand check, computed here)")
    p.add_argument("--bfactor", default="auto", help="auto (--auto_bfac) or a value in Å² (--adhoc_bfac)")
    p.add_argument("--autob-lowres", type=float, default=10.0, help="Å, --autob_lowres (default 10)")
    p.add_argument("--mask-threshold", type=float, default=None,
                   help="density threshold of the mask made with relion_mask_create (--ini_threshold)")
    p.add_argument("--particle-diameter", type=float, default=None, help="Å, diameter of the spherical mask")
    p.add_argument("--pixel-size", type=float, default=None, help="Å/px (--angpix; default: the half maps' header)")
    _common(p, "threads of relion_mask_create (--j); relion_postprocess is single-threaded")
    p.set_defaults(func=_postprocess)
