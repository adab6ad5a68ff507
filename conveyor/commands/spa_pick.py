"""``conveyor spa pick``: pick particles in one micrograph (LoG, or template matching).

Writes a RELION coordinate STAR file (``data_particles``: rlnCoordinateX/Y in px of the
micrograph with the origin at the image corner, rlnAutopickFigureOfMerit,
rlnMicrographName; template picks add rlnAnglePsi and rlnClassNumber) and an overlay PNG
(circles at the picks on the binned micrograph, red crosses at rejected junk). The PNG is
written first and the STAR file last, so the STAR file marks a finished step.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from .. import backend
from ..errors import InputError
from ..io.mrc import read_mrc
from ..io.star import write_star

log = logging.getLogger(__name__)


def load_micrograph(path, pixel_size=None):
    """Read a micrograph MRC (a frame stack is summed); return ``(image float32, pixel size Å/px)``."""
    data, header_ps = read_mrc(path)
    if data.ndim == 3:
        data = data[0] if data.shape[0] == 1 else data.sum(axis=0, dtype=np.float32)
    if data.ndim != 2:
        raise InputError(path, f"expected a 2D micrograph, got shape {data.shape}", "pass a motion-corrected micrograph (MRC)")
    ps = pixel_size if pixel_size else header_ps
    if not ps or ps <= 0:
        raise InputError(path, "the MRC header has no pixel size", "pass --pixel-size in Å/px")
    return data.astype(np.float32, copy=False), float(ps)


def parse_threshold(value):
    """``auto`` or a number (robust sigmas of the score map)."""
    if value is None or str(value).strip().lower() == "auto":
        return "auto"
    try:
        return float(value)
    except ValueError:
        raise InputError("--threshold", f"not a number: {value!r}", "use 'auto' or a number such as 2.5") from None


def _pick(args) -> int:
    from ..spa.pick import JunkFilter, pick_log, pick_template, picks_to_star, write_overlay_png  # noqa: PLC0415

    path = Path(args.micrograph)
    image, ps = load_micrograph(path, args.pixel_size)
    threshold = parse_threshold(args.threshold)
    common = dict(
        min_distance=args.min_distance,
        threshold=threshold,
        edge=args.edge,
        dark_particles=not args.inverted,
        junk=None if args.no_junk_filter else JunkFilter(),
        max_picks=args.max_picks,
        return_details=True,
    )
    t0 = time.perf_counter()
    img = backend.asarray(image)
    if args.method == "template":
        if not args.template:
            raise InputError("--template", "template matching needs --template", "pass a template image or stack (MRC/MRCS)")
        tmpl, tps = read_mrc(args.template)
        tps = args.template_pixel_size or tps or ps
        picks, details = pick_template(img, ps, args.particle_diameter, tmpl, tps, angle_step=args.angle_step,
                                       templates_protein_white=not args.template_dark, **common)
    else:
        picks, details = pick_log(img, ps, args.particle_diameter, **common)
    log.info("picked %s in %.2f s on %s", path, time.perf_counter() - t0, backend.describe())
    name = args.micrograph_name or str(args.micrograph)
    if args.out_png:
        write_overlay_png(args.out_png, details, picks, title=f"{path.name}: {len(picks)} picks ({args.method}, threshold {details.threshold:.2f})")
    write_star(args.out_star, picks_to_star(picks, name))
    cand = details.candidates
    junk = int((~cand["status"].isin(["picked", "below_threshold"])).sum()) if len(cand) else 0
    print(f"{args.out_star}: {len(picks)} particles (threshold {details.threshold:.2f}, ~{details.expected_false:.1f} of them "
          f"expected from noise, {junk} junk candidates rejected, bin {details.bin_factor})")
    return 0


def register(group) -> None:
    p = group("spa").add_parser(
        "pick",
        help="pick particles in a micrograph (template-free LoG, or template matching)",
        description="Laplacian-of-Gaussian (or template) picking on a binned micrograph, non-maximum suppression, "
        "automatic threshold and rejection of ice, carbon and aggregates. Coordinates are written in px of the "
        "input micrograph, origin at the image corner (RELION).",
    )
    p.add_argument("micrograph", help="motion-corrected micrograph (MRC; protein dark as recorded)")
    p.add_argument("--particle-diameter", type=float, required=True, help="particle diameter, Å")
    p.add_argument("--pixel-size", type=float, default=None, help="Å/px (default: from the MRC header)")
    p.add_argument("--out-star", required=True, help="output coordinate STAR file")
    p.add_argument("--out-png", help="overlay PNG of the picks")
    p.add_argument("--method", choices=["log", "template"], default="log", help="picker (default log)")
    p.add_argument("--template", help="template image or stack (MRC/MRCS), protein white as RELION class averages")
    p.add_argument("--template-pixel-size", type=float, default=None, help="Å/px of the templates (default: header)")
    p.add_argument("--template-dark", action="store_true", help="the templates have protein dark")
    p.add_argument("--angle-step", type=float, default=10.0, help="in-plane rotation step of template matching, degrees")
    p.add_argument("--threshold", default="auto",
                   help="'auto' (the lowest score at which at most 10%% of the picks are expected to be noise) "
                   "or a score threshold in robust sigmas of the score map")
    p.add_argument("--min-distance", type=float, default=None, help="minimum distance between picks, Å (default 0.8 × diameter)")
    p.add_argument("--edge", type=float, default=None, help="exclusion at the borders, px (default: half the extraction box)")
    p.add_argument("--max-picks", type=int, default=None, help="keep at most this many best picks")
    p.add_argument("--no-junk-filter", action="store_true", help="keep ice/carbon/aggregate candidates")
    p.add_argument("--inverted", action="store_true", help="the micrograph has protein white (already inverted)")
    p.add_argument("--micrograph-name", help="rlnMicrographName to write (default: the path as given)")
    p.set_defaults(func=_pick)
