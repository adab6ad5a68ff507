"""``conveyor simulate spi``: XFEL SPI shots (CXI) of a PR772-like capsid with ground truth."""

from __future__ import annotations

import json

from ..simulate.spi import DEFAULTS


def register(group):
    d = DEFAULTS
    p = group("simulate").add_parser(
        "spi",
        help="XFEL single-particle shots (CXI) with ground truth",
        description=(
            "Simulate XFEL single-particle diffraction of an icosahedral capsid: |F|^2 on the "
            "Ewald sphere at random orientations, Poisson photons, background, beamstop and gap, "
            "empty frames, multiple hits and wrong-size particles. Writes DIR/shots/run_NNN.cxi, "
            "DIR/truth/{frames.csv,particles.csv,density.mrc,intensity.mrc,geometry.json,truth.json} "
            "and DIR/experiment.yaml."
        ),
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--files", type=int, default=d["n_files"], help="number of CXI files (default %(default)s)")
    p.add_argument("--frames-per-file", type=int, default=d["frames_per_file"], help="frames per file (default %(default)s)")
    p.add_argument("--detector", type=int, default=d["detector"], help="detector edge in pixels, square (default %(default)s)")
    p.add_argument("--pixel-size-m", type=float, default=d["pixel_size_m"], help="pixel pitch, m (default %(default)g: 4x4-binned pnCCD)")
    p.add_argument("--distance-m", type=float, default=d["distance_m"], help="detector distance, m (default %(default)g)")
    p.add_argument("--photon-energy-ev", type=float, default=d["photon_energy_ev"], help="photon energy, eV (default %(default)g)")
    p.add_argument("--diameter-nm", type=float, default=d["diameter_nm"], help="particle diameter, nm (default %(default)g)")
    p.add_argument("--diameter-sd-nm", type=float, default=d["diameter_sd_nm"], help="spread of diameters, nm (default %(default)g)")
    p.add_argument("--wrong-size-fraction", type=float, default=d["wrong_size_fraction"], help="fraction of single hits with a wrong-size particle (default %(default)g)")
    p.add_argument("--wrong-size-diameter-nm", type=float, default=d["wrong_size_diameter_nm"], help="diameter of wrong-size particles, nm (default %(default)g)")
    p.add_argument("--hit-fraction", type=float, default=d["hit_fraction"], help="fraction of frames with particles (default %(default)g)")
    p.add_argument("--multiple-hit-fraction", type=float, default=d["multiple_hit_fraction"], help="fraction of hits with 2-3 particles (default %(default)g)")
    p.add_argument("--fluence", dest="fluence_ph_um2", type=float, default=d["fluence_ph_um2"], help="peak fluence, photons/um^2 (default %(default)g)")
    p.add_argument("--photons-per-hit", type=float, default=None, help="set the fluence so a single particle gives this mean photon count on good pixels (overrides --fluence)")
    p.add_argument("--min-fluence-fraction", type=float, default=d["min_fluence_fraction"], help="weakest hit fluence relative to the peak (default %(default)g)")
    p.add_argument("--background-photons", type=float, default=d["background_photons"], help="mean background photons per frame (default %(default)g)")
    p.add_argument("--center-offset-px", type=float, nargs="+", default=list(d["center_offset_px"]), metavar="DX [DY]", help="beam centre minus detector middle, px; one value v means (v, -v/2) (default %(default)s)")
    p.add_argument("--beamstop-radius-px", type=float, default=d["beamstop_radius_px"], help="beamstop radius, px (default %(default)g)")
    p.add_argument("--gap-px", type=float, default=d["gap_px"], help="rows of the gap between detector halves (default %(default)g)")
    p.add_argument("--polarization", choices=("x", "y", "none"), default=d["polarization"], help="beam polarisation (default %(default)s)")
    p.add_argument("--seed", type=int, default=d["seed"], help="random seed (default %(default)s)")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from ..simulate.spi import simulate_spi

    off = args.center_offset_px
    paths = simulate_spi(
        args.out,
        n_files=args.files,
        frames_per_file=args.frames_per_file,
        detector=args.detector,
        pixel_size_m=args.pixel_size_m,
        distance_m=args.distance_m,
        photon_energy_ev=args.photon_energy_ev,
        diameter_nm=args.diameter_nm,
        diameter_sd_nm=args.diameter_sd_nm,
        wrong_size_fraction=args.wrong_size_fraction,
        wrong_size_diameter_nm=args.wrong_size_diameter_nm,
        hit_fraction=args.hit_fraction,
        multiple_hit_fraction=args.multiple_hit_fraction,
        fluence_ph_um2=args.fluence_ph_um2,
        photons_per_hit=args.photons_per_hit,
        min_fluence_fraction=args.min_fluence_fraction,
        background_photons=args.background_photons,
        center_offset_px=off[0] if len(off) == 1 else tuple(off[:2]),
        beamstop_radius_px=args.beamstop_radius_px,
        gap_px=args.gap_px,
        polarization=args.polarization,
        seed=args.seed,
    )
    with open(paths["truth"]) as fh:
        truth = json.load(fh)
    c = truth["counts"]
    print(
        f"wrote {len(paths['shots'])} CXI files ({c['frames']} frames: {c['hits']} hits, {c['single_hits']} single, "
        f"{c['multiple_hits']} multiple, {c['wrong_size_single_hits']} wrong-size) to {args.out}/shots; "
        f"truth in {args.out}/truth; config {paths['experiment']} ({truth['runtime_s']:.1f} s)"
    )
    return 0
