"""``conveyor spa merge``: judge micrographs and merge CTF, motion and particle metadata.

Writes ``micrographs_ctf.star`` (data_optics + data_micrographs of the accepted
micrographs, with rlnAccumMotionTotal in Å when motion files are given),
``particles.star`` (data_optics + data_particles of the accepted micrographs; one optics
group per distinct set of optics) and a tab-separated summary (one row per micrograph:
particles, defocus, fit resolution, drift, accepted/rejected/skipped and why), which is
also printed. Inputs can be listed in a text file given as ``@list.txt``.
"""

from __future__ import annotations

from ..errors import InputError
from ..io.atomic import write_text
from ..io.star import write_star


def _merge(args) -> int:
    from ..spa.merge import Thresholds, expand_inputs, format_summary, merge, read_name_list  # noqa: PLC0415

    ctf = expand_inputs(args.ctf, "--ctf")
    if not ctf:
        raise InputError("--ctf", "no CTF STAR files given", "pass the per-micrograph CTF files (or @list.txt)")
    motion = expand_inputs(args.motion, "--motion")
    particles = expand_inputs(args.particles, "--particles")
    skipped = []
    for s in args.skipped or []:
        skipped += read_name_list(s)
    limits = Thresholds(args.max_ctf_resolution, args.max_drift, args.max_astigmatism)
    result = merge(ctf, motion, particles, skipped=skipped, limits=limits)
    write_text(args.out_summary, result.summary.to_csv(sep="\t", index=False, float_format="%.4g"))
    if args.out_particles:
        write_star(args.out_particles, result.particles)
    write_star(args.out_micrographs, result.micrographs)
    print(format_summary(result.summary))
    return 0


def register(group) -> None:
    p = group("spa").add_parser(
        "merge",
        help="accept/reject micrographs (CTF resolution, drift, astigmatism) and merge their STAR files",
        description="Merge per-micrograph CTF, motion and particle STAR files into RELION-compatible "
        "micrographs_ctf.star and particles.star for the accepted micrographs, with a summary table. "
        "Any input list may be given as @list.txt (one path per line).",
    )
    p.add_argument("--ctf", nargs="+", required=True, help="CTF STAR files (conveyor spa ctf), or @list.txt")
    p.add_argument("--motion", nargs="*", default=[], help="motion STAR files (conveyor spa motion), or @list.txt")
    p.add_argument("--particles", nargs="*", default=[], help="particle STAR files (conveyor spa extract), or @list.txt")
    p.add_argument("--skipped", action="append", help="text file naming micrographs/movies whose processing failed (repeatable)")
    p.add_argument("--out-micrographs", required=True, help="output micrographs_ctf.star")
    p.add_argument("--out-particles", help="output particles.star")
    p.add_argument("--out-summary", required=True, help="output summary table (TSV)")
    p.add_argument("--max-ctf-resolution", type=float, default=None, help="reject micrographs with a worse CTF fit resolution, Å (e.g. 8)")
    p.add_argument("--max-drift", type=float, default=None, help="reject micrographs with a longer total drift path, px (e.g. 50)")
    p.add_argument("--max-astigmatism", type=float, default=None, help="reject micrographs with |U - V| larger than this, Å")
    p.set_defaults(func=_merge)
