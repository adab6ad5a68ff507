"""``conveyor simulate spa``: a cryo-EM movie set with ground truth (see :mod:`conveyor.simulate.spa`)."""

from __future__ import annotations

import time


def _run(args) -> int:
    from ..simulate.spa import simulate_spa  # noqa: PLC0415

    t0 = time.time()
    params = dict(
        micrographs=args.micrographs, size=args.size, frames=args.frames, pixel_size=args.pixel_size,
        dose_per_frame=args.dose_per_frame, particles=args.particles, particle_diameter=args.particle_diameter,
        symmetry=args.symmetry, junk_fraction=args.junk_fraction, voltage=args.voltage, cs=args.cs,
        amplitude_contrast=args.amplitude_contrast, format=args.format, seed=args.seed,
        local_motion=args.local_motion, contrast=args.contrast,
    )
    paths = simulate_spa(args.out, **params)
    print(f"{args.out}: {len(paths['movies'])} movies ({args.size}x{args.size}x{args.frames}, "
          f"{args.pixel_size} Å/px, {args.format}); truth in {paths['particles'].parent}; "
          f"config section in {paths['experiment']} ({time.time() - t0:.1f} s)")
    return 0


def register(group) -> None:
    p = group("simulate").add_parser(
        "spa",
        help="simulate cryo-EM movies with ground truth (map, CTF, drift, particle positions)",
        description=(
            "Simulate a cryo-EM single-particle data set: movies in DIR/movies, the truth (map.mrc, "
            "micrographs.star, shifts.star, particles.star) in DIR/truth and the matching `spa:` config "
            "section in DIR/experiment.yaml. The same --seed gives the same data."
        ),
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--micrographs", type=int, default=4, help="number of movies (default: 4)")
    p.add_argument("--size", type=int, default=1024, help="movie width and height in px (default: 1024)")
    p.add_argument("--frames", type=int, default=20, help="frames per movie (default: 20)")
    p.add_argument("--pixel-size", type=float, default=1.5, help="Å/px (default: 1.5)")
    p.add_argument("--dose-per-frame", type=float, default=1.2, help="e/Å² per frame (default: 1.2)")
    p.add_argument("--particles", type=int, default=40, help="particles per micrograph (default: 40)")
    p.add_argument("--particle-diameter", type=float, default=150.0, help="Å (default: 150)")
    p.add_argument("--symmetry", default="D3", help="point group of the map: C1, Cn, Dn, T, O, I (default: D3)")
    p.add_argument("--junk-fraction", type=float, default=0.1,
                   help="junk objects per particle (ice, contamination, aggregates) and carbon edges (default: 0.1)")
    p.add_argument("--voltage", type=float, default=300.0, help="kV (default: 300)")
    p.add_argument("--cs", type=float, default=2.7, help="spherical aberration, mm (default: 2.7)")
    p.add_argument("--amplitude-contrast", type=float, default=0.1, help="fraction (default: 0.1)")
    p.add_argument("--format", choices=("mrc", "tiff"), default="mrc", help="movie format (default: mrc)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--local-motion", type=float, default=0.0,
                   help="largest local (non-rigid) displacement at the last frame, px (default: 0, off)")
    p.add_argument("--contrast", type=float, default=1.0,
                   help="scale of the protein potential; 1 is physical, larger makes easier data (default: 1)")
    p.set_defaults(func=_run)
