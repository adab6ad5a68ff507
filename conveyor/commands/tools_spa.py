"""``conveyor tools ...``: run a peer tool on one movie/micrograph and write Conveyor's file contracts.

RELION 3.1 (installed, run for real): ``relion-motion``, ``relion-autopick``,
``relion-extract``. Container tools (Apptainer image supplied by the user): ``motioncor2``,
``ctffind``, ``gautomatch`` (``--dry-run`` prints the command instead of running it).
The flags mirror the native ``conveyor spa motion|ctf|pick|extract`` commands, so a rule can
switch tools without changing its options. See docs/tools.md.
"""

from __future__ import annotations

import argparse
import shlex

from .. import backend


def _motion_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("movie", help="raw movie (MRC or TIFF)")
    p.add_argument("--out-sum", required=True, help="aligned dose-weighted sum (MRC)")
    p.add_argument("--out-sum-nodw", required=True, help="aligned sum without dose weighting (MRC)")
    p.add_argument("--out-shifts", required=True, help="per-frame shifts (STAR)")
    p.add_argument("--out-plot", default=None, help="drift plot (PNG)")
    p.add_argument("--pixel-size", type=float, default=None, help="Å/px of the movie (default: header)")
    p.add_argument("--voltage", type=float, default=300.0, help="kV (default 300)")
    p.add_argument("--dose-per-frame", type=float, required=True, help="e/Å² per frame")
    p.add_argument("--pre-exposure", type=float, default=0.0, help="e/Å² before the first frame (default 0)")
    p.add_argument("--patches", default="5x5", help="patch grid NxM, or 0 for whole frames only (default 5x5)")
    p.add_argument("--bfactor", type=float, default=150.0, help="B-factor of the alignment low-pass, Å² (default 150)")
    p.add_argument("--binning", type=float, default=1.0, help="output binning (default 1)")
    p.add_argument("--frames", type=int, default=None, help="expected number of frames (checked)")
    p.add_argument("--gain", default=None, help="gain reference (MRC or TIFF), multiplied into the frames")
    p.add_argument("--gain-rot", type=int, default=0, help="turns of 90° of the gain reference (0-3)")
    p.add_argument("--gain-flip", default=None, help="flip of the gain reference after rotation: x or y")
    p.add_argument("--work-dir", default=None, help="keep the tool's own files in this directory")


def _container_flags(p: argparse.ArgumentParser, gpu: bool) -> None:
    p.add_argument("--image", required=True, help="Apptainer image (.sif) holding the tool")
    p.add_argument("--apptainer", default=None, help="container runtime (default: apptainer, else singularity)")
    p.add_argument("--program", default=None, help="program name inside the image")
    p.add_argument("--dry-run", action="store_true", help="print the command and do nothing")
    if gpu:
        p.add_argument("--gpu", default="0", help="GPU id(s) (default 0)")
        p.add_argument("--no-nv", dest="nv", action="store_false", help="do not pass --nv to apptainer")


def _extra(value) -> list[str]:
    return shlex.split(value) if value else []


def register(group) -> None:
    tools = group("tools")

    # ------------------------------------------------------------------ RELION
    p = tools.add_parser("relion-motion", help="motion correction with relion_run_motioncorr --use_own",
                         description="Align one movie with RELION 3.1's own motion correction and write "
                                     "Conveyor's motion outputs (shifts in Conveyor's sign).")
    _motion_flags(p)
    p.add_argument("--threads", type=int, default=argparse.SUPPRESS,
                   help="RELION threads (--j); default: conveyor --threads, else every core this process may use")
    p.add_argument("--relion-bin", default=None, help="directory of the RELION binaries (default: PATH)")
    p.set_defaults(func=_relion_motion)

    p = tools.add_parser("relion-autopick", help="Laplacian-of-Gaussian picking with relion_autopick --LoG",
                         description="Pick one micrograph with RELION 3.1's LoG picker and write Conveyor's "
                                     "coordinate STAR and overlay PNG.")
    p.add_argument("micrograph", help="aligned micrograph (MRC, protein dark)")
    p.add_argument("--particle-diameter", type=float, required=True, help="Å")
    p.add_argument("--out-star", required=True)
    p.add_argument("--out-png", default=None)
    p.add_argument("--pixel-size", type=float, default=None, help="Å/px (default: header)")
    p.add_argument("--diameter-range", type=float, nargs=2, metavar=("MIN", "MAX"), default=None,
                   help="LoG diameters, Å (default 0.75x and 1.25x the particle diameter)")
    p.add_argument("--threshold", default="auto",
                   help="auto (RELION's default) or a number for --LoG_adjust_threshold (higher: fewer picks)")
    p.add_argument("--method", default="log", choices=["log"], help="only log (accepted for the native flags)")
    p.add_argument("--lowpass", type=float, default=20.0, help="low-pass before picking, Å (default 20)")
    p.add_argument("--white-particles", action="store_true", help="protein is white (inverted micrographs)")
    p.add_argument("--micrograph-name", default=None, help="rlnMicrographName (default: the path as given)")
    p.add_argument("--relion-bin", default=None)
    p.add_argument("--work-dir", default=None)
    p.set_defaults(func=_relion_autopick)

    p = tools.add_parser("relion-extract", help="particle extraction with relion_preprocess --extract",
                         description="Extract, bin, invert and normalise the particles of one micrograph with "
                                     "RELION 3.1 and write Conveyor's stack and particle STAR.")
    p.add_argument("micrograph", help="aligned micrograph (MRC)")
    p.add_argument("--coords", required=True, help="coordinate STAR (rlnCoordinateX/Y px)")
    p.add_argument("--ctf", required=True, help="CTF STAR of the micrograph")
    p.add_argument("--box", type=int, required=True, help="box in px of the micrograph")
    p.add_argument("--bin", type=int, default=1, help="binning (output box = box / bin)")
    p.add_argument("--out-stack", required=True)
    p.add_argument("--out-star", required=True)
    p.add_argument("--pixel-size", type=float, default=None, help="Å/px of the micrograph (default: header)")
    p.add_argument("--bg-radius", type=float, default=None, help="background radius, px of the output box "
                   "(default 0.375 x output box)")
    p.add_argument("--particle-diameter", type=float, default=None, help="accepted for the native flags (unused)")
    p.add_argument("--voltage", type=float, default=None, help="kV (default: from the CTF STAR)")
    p.add_argument("--cs", type=float, default=None, help="mm (default: from the CTF STAR)")
    p.add_argument("--amplitude-contrast", type=float, default=None, help="(default: from the CTF STAR)")
    p.add_argument("--micrograph-name", default=None)
    p.add_argument("--relion-bin", default=None)
    p.add_argument("--work-dir", default=None)
    p.set_defaults(func=_relion_extract)

    # ------------------------------------------------------------------ containers
    p = tools.add_parser("motioncor2", help="motion correction with MotionCor2 from an Apptainer image",
                         description="Run MotionCor2 on one movie from a user-supplied Apptainer image and "
                                     "write Conveyor's motion outputs.")
    _motion_flags(p)
    _container_flags(p, gpu=True)
    p.add_argument("--extra", default="", help="more MotionCor2 arguments, quoted as one string")
    p.set_defaults(func=_motioncor2)

    p = tools.add_parser("ctffind", help="CTF estimation with CTFFIND4 from an Apptainer image",
                         description="Run CTFFIND 4.1 on one micrograph from a user-supplied Apptainer image and "
                                     "write Conveyor's CTF STAR and diagnostic PNG.")
    p.add_argument("micrograph", help="aligned sum without dose weighting (MRC)")
    p.add_argument("--out-star", required=True)
    p.add_argument("--out-diag", default=None, help="diagnostic PNG")
    p.add_argument("--pixel-size", type=float, default=None, help="Å/px (default: header)")
    p.add_argument("--voltage", type=float, default=300.0)
    p.add_argument("--cs", type=float, default=2.7, help="mm")
    p.add_argument("--amplitude-contrast", type=float, default=0.1)
    p.add_argument("--defocus-min", type=float, default=5000.0, help="Å")
    p.add_argument("--defocus-max", type=float, default=50000.0, help="Å")
    p.add_argument("--defocus-step", type=float, default=500.0, help="Å")
    p.add_argument("--res-min", type=float, default=30.0, help="lowest resolution fitted, Å")
    p.add_argument("--res-max", type=float, default=5.0, help="highest resolution fitted, Å")
    p.add_argument("--phase-shift", action="store_true", help="also fit a phase shift (0-180°, 10° steps)")
    p.add_argument("--spectrum-size", type=int, default=512, help="px (default 512)")
    p.add_argument("--astigmatism", type=float, default=1000.0, help="tolerated astigmatism, Å")
    p.add_argument("--fast-search", action="store_true", help="CTFFIND's faster, less accurate search")
    p.add_argument("--threads", type=int, default=argparse.SUPPRESS,
                   help="CTFFIND threads; default: conveyor --threads, else every core this process may use")
    p.add_argument("--micrograph-name", default=None)
    p.add_argument("--work-dir", default=None)
    _container_flags(p, gpu=False)
    p.set_defaults(func=_ctffind)

    p = tools.add_parser("gautomatch", help="particle picking with Gautomatch from an Apptainer image",
                         description="Run Gautomatch on one micrograph from a user-supplied Apptainer image and "
                                     "write Conveyor's coordinate STAR and overlay PNG.")
    p.add_argument("micrograph", help="aligned micrograph (MRC)")
    p.add_argument("--particle-diameter", type=float, required=True, help="Å")
    p.add_argument("--out-star", required=True)
    p.add_argument("--out-png", default=None)
    p.add_argument("--pixel-size", type=float, default=None, help="Å/px (default: header)")
    p.add_argument("--method", default=None, choices=["log", "template"],
                   help="accepted for the native flags: template needs --template")
    p.add_argument("--template", "--templates", dest="templates", default=None, help="templates (MRCS, protein white)")
    p.add_argument("--template-pixel-size", type=float, default=None)
    p.add_argument("--threshold", default="auto", help="auto (Gautomatch's default) or a --cc_cutoff value")
    p.add_argument("--min-dist", type=float, default=None, help="Å between picks")
    p.add_argument("--lowpass", type=float, default=None, help="Å")
    p.add_argument("--micrograph-name", default=None)
    p.add_argument("--work-dir", default=None)
    p.add_argument("--extra", default="", help="more Gautomatch arguments, quoted as one string")
    _container_flags(p, gpu=True)
    p.set_defaults(func=_gautomatch)


# --------------------------------------------------------------------------- handlers


def _relion_motion(args) -> int:
    from ..tools import relion  # noqa: PLC0415

    r = relion.run_motion(
        args.movie, out_sum=args.out_sum, out_sum_nodw=args.out_sum_nodw, out_shifts=args.out_shifts,
        out_plot=args.out_plot, pixel_size=args.pixel_size, voltage=args.voltage, dose_per_frame=args.dose_per_frame,
        pre_exposure=args.pre_exposure, patches=args.patches, bfactor=args.bfactor, binning=args.binning,
        gain=args.gain, gain_rot=args.gain_rot, gain_flip=args.gain_flip, frames=args.frames, threads=backend.threads(),
        relion_bin=args.relion_bin, work_dir=args.work_dir,
    )
    print(f"{args.movie}: {r['n_frames']} frames, total drift {r['total_drift']:.2f} px; "
          f"sums at {r['pixel_size']:g} Å/px")
    return 0


def _threshold(value) -> float:
    from ..errors import InputError  # noqa: PLC0415

    if value in (None, "auto"):
        return 0.0
    try:
        return float(value)
    except ValueError:
        raise InputError("--threshold", f"expected auto or a number, got {value!r}", "e.g. --threshold 0.5") from None


def _relion_autopick(args) -> int:
    from ..tools import relion  # noqa: PLC0415

    t = relion.run_autopick(
        args.micrograph, particle_diameter=args.particle_diameter, out_star=args.out_star, out_png=args.out_png,
        pixel_size=args.pixel_size, diameter_range=args.diameter_range, lowpass=args.lowpass,
        adjust_threshold=_threshold(args.threshold), white_particles=args.white_particles,
        micrograph_name=args.micrograph_name, relion_bin=args.relion_bin, work_dir=args.work_dir,
    )
    print(f"{args.micrograph}: {len(t)} particles picked")
    return 0


def _relion_extract(args) -> int:
    from ..tools import relion  # noqa: PLC0415

    t = relion.run_extract(
        args.micrograph, coords=args.coords, ctf=args.ctf, box=args.box, binning=args.bin, out_stack=args.out_stack,
        out_star=args.out_star, pixel_size=args.pixel_size, bg_radius=args.bg_radius, voltage=args.voltage,
        cs=args.cs, amplitude_contrast=args.amplitude_contrast, micrograph_name=args.micrograph_name,
        relion_bin=args.relion_bin, work_dir=args.work_dir,
    )
    print(f"{args.micrograph}: {len(t)} particles extracted")
    return 0


def _motioncor2(args) -> int:
    from ..tools import motioncor2  # noqa: PLC0415
    from ..tools._run import format_command  # noqa: PLC0415

    out = motioncor2.run_motioncor2(
        args.movie, image=args.image, out_sum=args.out_sum, out_sum_nodw=args.out_sum_nodw,
        out_shifts=args.out_shifts, out_plot=args.out_plot, pixel_size=args.pixel_size, voltage=args.voltage,
        dose_per_frame=args.dose_per_frame, pre_exposure=args.pre_exposure, patches=args.patches,
        bfactor=args.bfactor, binning=args.binning, gain=args.gain, gain_rot=args.gain_rot,
        gain_flip=args.gain_flip, frames=args.frames, gpu=args.gpu, nv=args.nv, runtime=args.apptainer,
        program=args.program or motioncor2.PROGRAM, extra=_extra(args.extra), work_dir=args.work_dir,
        dry_run=args.dry_run,
    )
    if args.dry_run:
        print(format_command(out))
    else:
        print(f"{args.movie}: {len(out)} frames aligned with MotionCor2")
    return 0


def _ctffind(args) -> int:
    from ..tools import ctffind  # noqa: PLC0415
    from ..tools._run import format_command  # noqa: PLC0415

    out = ctffind.run_ctffind(
        args.micrograph, image=args.image, out_star=args.out_star, out_diag=args.out_diag,
        pixel_size=args.pixel_size, voltage=args.voltage, cs=args.cs, amplitude_contrast=args.amplitude_contrast,
        defocus_min=args.defocus_min, defocus_max=args.defocus_max, defocus_step=args.defocus_step,
        res_min=args.res_min, res_max=args.res_max, spectrum_size=args.spectrum_size,
        astigmatism=args.astigmatism, fast_search=args.fast_search, phase_shift=args.phase_shift,
        threads=backend.threads(), runtime=args.apptainer, program=args.program or ctffind.PROGRAM,
        micrograph_name=args.micrograph_name, work_dir=args.work_dir, dry_run=args.dry_run,
    )
    if args.dry_run:
        cmd, answers = out
        print(f"{format_command(cmd)} <<'EOF'\n{answers}EOF")
    else:
        print(f"{args.micrograph}: defocus U {out['rlnDefocusU']:.0f} Å, V {out['rlnDefocusV']:.0f} Å, "
              f"fit to {out['rlnCtfMaxResolution']:.1f} Å (CTFFIND4)")
    return 0


def _gautomatch(args) -> int:
    from ..errors import InputError  # noqa: PLC0415
    from ..tools import gautomatch  # noqa: PLC0415
    from ..tools._run import format_command  # noqa: PLC0415

    if args.method == "template" and not args.templates:
        raise InputError("--template", "template picking needs templates", "pass --template TEMPLATES.mrcs")
    threshold = None if args.threshold in (None, "auto") else _threshold(args.threshold)
    out = gautomatch.run_gautomatch(
        args.micrograph, image=args.image, particle_diameter=args.particle_diameter, out_star=args.out_star,
        out_png=args.out_png, pixel_size=args.pixel_size, templates=args.templates,
        template_pixel_size=args.template_pixel_size, threshold=threshold, min_dist=args.min_dist,
        lowpass=args.lowpass, gpu=args.gpu, nv=args.nv, runtime=args.apptainer,
        program=args.program or gautomatch.PROGRAM, extra=_extra(args.extra), micrograph_name=args.micrograph_name,
        work_dir=args.work_dir, dry_run=args.dry_run,
    )
    if args.dry_run:
        print(format_command(out))
    else:
        print(f"{args.micrograph}: {len(out)} particles picked with Gautomatch")
    return 0
