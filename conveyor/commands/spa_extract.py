"""``conveyor spa extract``: cut particle images from one micrograph.

Writes an image stack (``.mrcs``; header pixel size = micrograph pixel size × bin) and a
particle STAR file (``data_optics`` with one optics group, ``data_particles`` with
rlnImageName ``NNNNNN@stack``, rlnMicrographName, rlnCoordinateX/Y in unbinned px and the
micrograph's CTF per particle). Particles whose box does not fit inside the micrograph are
skipped. The stack is written first and the STAR file last (the completion marker).
"""

from __future__ import annotations

import logging
import time

import numpy as np

from .. import backend
from ..errors import InputError
from ..io.mrc import write_mrc
from ..io.star import read_star, write_star
from .spa_pick import load_micrograph
from .._lazy import lazy_module

pd = lazy_module("pandas")

log = logging.getLogger(__name__)


def read_coordinates(path, micrograph_name, strict: bool = False) -> pd.DataFrame:
    """Picks for ``micrograph_name`` from a coordinate STAR file (block ``particles`` or the only one).

    ``strict``: the file lists particles of many micrographs; keep only this one's (maybe none).
    """
    from ..spa.extract import select_micrograph_rows  # noqa: PLC0415

    blocks = read_star(path)
    table = blocks.get("particles")
    if table is None:
        loops = [b for b in blocks.values() if "rlnCoordinateX" in b.columns]
        if len(loops) != 1:
            raise InputError(path, "no data_particles block with rlnCoordinateX/Y", "pass the STAR file written by `conveyor spa pick`")
        table = loops[0]
    if len(table) and not {"rlnCoordinateX", "rlnCoordinateY"} <= set(table.columns):
        raise InputError(path, "the coordinate table lacks rlnCoordinateX/Y", "pass the STAR file written by `conveyor spa pick`")
    if len(table) == 0:
        return pd.DataFrame({"rlnCoordinateX": pd.Series([], dtype=float), "rlnCoordinateY": pd.Series([], dtype=float)})
    return select_micrograph_rows(table, micrograph_name, path, what="coordinates", strict=strict).reset_index(drop=True)


def _extract(args) -> int:
    from ..spa.extract import (  # noqa: PLC0415
        box_inside,
        check_box_bin,
        default_box_size,
        extract_particles,
        particle_blocks,
        read_ctf_row,
        recenter_coordinates,
    )

    name = args.micrograph_name or str(args.micrograph)
    ctf = read_ctf_row(args.ctf, name)
    image, ps = load_micrograph(args.micrograph, args.pixel_size or None)
    if args.box:
        box = int(args.box)
    elif args.particle_diameter:
        box = default_box_size(args.particle_diameter, ps, multiple=max(8, 2 * args.bin))
    else:
        raise InputError("--box", "no box size", "pass --box (px) or --particle-diameter (Å)")
    check_box_bin(box, args.bin)
    coords = read_coordinates(args.coords, name, strict=args.reextract)
    if args.reextract:
        coords = recenter_coordinates(coords, ps)
    xy = coords[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy(dtype=float) if len(coords) else np.zeros((0, 2))
    kept = box_inside(image.shape, xy, box)
    t0 = time.perf_counter()
    stack = extract_particles(backend.asarray(image), xy, box, bin=args.bin, invert=not args.no_invert,
                              bg_radius=args.bg_radius, ramp=not args.no_ramp)
    log.info("extracted %d particles in %.2f s on %s", len(stack), time.perf_counter() - t0, backend.describe())
    stack_name = args.stack_name or str(args.out_stack)
    blocks = particle_blocks(coords, kept, stack_name=stack_name, micrograph_name=name, ctf=ctf, box=box, bin=args.bin,
                             pixel_size=ps, width=args.name_width)
    if len(stack) == 0:
        # MRC cannot hold zero images: a micrograph without particles gets a stack with one
        # blank image that no STAR row refers to, and an empty particle table
        log.warning("%s: no particle to extract (none picked, or all too close to the edge)", name)
        stack = np.zeros((1, box // args.bin, box // args.bin), dtype=np.float32)
    write_mrc(args.out_stack, stack, ps * args.bin, volume=False)
    write_star(args.out_star, blocks)
    skipped = int((~kept).sum())
    print(f"{args.out_star}: {int(kept.sum())} particles, box {box} px -> {box // args.bin} px at {ps * args.bin:.4g} Å/px"
          + (f", {skipped} too close to the edge skipped" if skipped else ""))
    return 0


def register(group) -> None:
    p = group("spa").add_parser(
        "extract",
        help="extract particle images (box, bin by Fourier cropping, invert, normalise) with per-particle CTF",
        description="Cut boxes centred on the picks (box centre at index box/2), bin by Fourier cropping, invert "
        "contrast (protein white, RELION) and normalise the background outside --bg-radius to mean 0, sd 1.",
    )
    p.add_argument("micrograph", help="motion-corrected micrograph (MRC)")
    p.add_argument("--coords", required=True, help="coordinate STAR file (conveyor spa pick)")
    p.add_argument("--ctf", required=True, help="CTF STAR file of this micrograph (conveyor spa ctf)")
    p.add_argument("--reextract", action="store_true",
                   help="--coords is a particle STAR file of many micrographs (e.g. the particles of selected 2D "
                   "classes): take this micrograph's particles only and re-centre them by their "
                   "rlnOriginX/YAngst (RELION's re-extraction with re-centring)")
    p.add_argument("--box", type=int, default=None, help="box size in micrograph px (default: from --particle-diameter)")
    p.add_argument("--particle-diameter", type=float, default=None, help="Å; box = 1.5 × diameter rounded to an FFT-friendly size")
    p.add_argument("--bin", type=int, default=1, help="binning by Fourier cropping (1, 2, 4; box/bin must be even)")
    p.add_argument("--out-stack", required=True, help="output particle stack (.mrcs)")
    p.add_argument("--out-star", required=True, help="output particle STAR file")
    p.add_argument("--stack-name", help="stack path written in rlnImageName (default: --out-stack as given)")
    p.add_argument("--micrograph-name", help="rlnMicrographName to match and write (default: the path as given)")
    p.add_argument("--pixel-size", type=float, default=None, help="Å/px of the micrograph (default: MRC header)")
    p.add_argument("--no-invert", action="store_true", help="keep the contrast (default: invert so protein is white)")
    p.add_argument("--bg-radius", type=float, default=None, help="background radius in output px (default 0.375 × output box)")
    p.add_argument("--no-ramp", action="store_true", help="do not subtract a plane fitted to the background")
    p.add_argument("--name-width", type=int, default=6, help="zero padding of the image index (6: RELION 3-4, 8: RELION 5)")
    p.set_defaults(func=_extract)
