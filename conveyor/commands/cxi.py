"""``conveyor io cxi-info`` and ``conveyor io import-cxidb``: inspect CXI files, convert CXIDB-58 HDF5."""

from __future__ import annotations

import json


def register(group):
    io = group("io")
    p = io.add_parser(
        "cxi-info",
        help="summarise a CXI file (frames, geometry, mask)",
        description="Print frames, photon energy, distance, pixel size, beam centre and mask of a CXI file; "
        "fails with a clear message on missing datasets, non-SI units without a units attribute, or NaNs.",
    )
    p.add_argument("file", metavar="FILE", help="CXI file")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=_info)

    q = io.add_parser(
        "import-cxidb",
        help="convert a CXIDB-58-style HDF5 file (PR772 photonCount) to CXI",
        description="Copy the photon-converted frames of a CXIDB-58-style HDF5 file "
        "(photonConverter/pnccdBack/photonCount) into a CXI file with geometry in SI units.",
    )
    q.add_argument("input", metavar="IN.h5", help="HDF5 file from CXIDB (e.g. amo86615 PR772)")
    q.add_argument("--out", required=True, metavar="OUT.cxi", help="CXI file to write")
    q.add_argument("--photon-energy-ev", type=float, default=None, help="photon energy, eV (default: from the file)")
    q.add_argument("--distance-m", type=float, default=None, help="detector distance, m (default: from the file)")
    q.add_argument("--pixel-size-m", type=float, default=None, help="pixel pitch, m (default: 75 um x pnCCD binning inferred from the frame size)")
    q.add_argument("--mask", default=None, metavar="MASK", help=".npy or HDF5 mask, 1 = good pixel (see --mask-zero-is-good)")
    q.add_argument("--mask-zero-is-good", action="store_true", help="the mask marks good pixels with 0 (CXI/Dragonfly style)")
    q.add_argument("--beam-center", type=float, nargs=2, default=None, metavar=("X", "Y"), help="beam centre in pixels (default: detector middle)")
    q.add_argument("--dataset", default="photonConverter/pnccdBack/photonCount", help="HDF5 path of the [n, y, x] photon counts (default %(default)s)")
    q.set_defaults(func=_import)


def _info(args) -> int:
    from ..io.cxi import cxi_info

    info = cxi_info(args.file)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    ev = info["photon_energy_eV"]
    dist = info["distance_m"]
    pix = info["pixel_size_xy_m"]
    cx, cy = info["beam_center_px"]
    ny, nx = info["frame_shape"]
    energy = "missing" if ev is None else f"{ev:.2f} eV (wavelength {info['wavelength_m'] * 1e9:.4f} nm)"
    distance = "missing" if dist is None else f"{dist:.4f} m"
    pixel = "missing" if pix is None else f"{pix[0] * 1e6:.2f} x {pix[1] * 1e6:.2f} um"
    lines = [
        f"file            {info['path']}",
        f"frames          {info['n_frames']} x {ny} x {nx} ({info['dtype']}, {info['compression'] or 'uncompressed'}) at {info['data_path']}",
        f"photon energy   {energy}",
        f"distance        {distance}",
        f"pixel size      {pixel}",
        f"beam centre     x={cx:.2f} y={cy:.2f} px (from {info['beam_center_source']})",
        f"good pixels     {info['good_pixels']} of {info['total_pixels']}",
    ]
    if info.get("q_max_per_m"):
        lines.append(f"q max           {info['q_max_per_m'] * 1e-9:.4f} 1/nm (full period {info['resolution_full_period_m'] * 1e9:.2f} nm)")
    lines.append(f"image_1 group   {'yes' if info['has_image_group'] else 'no (spi_processing needs /entry_1/image_1)'}")
    print("\n".join(lines))
    return 0


def _import(args) -> int:
    from ..io.cxi import import_cxidb

    res = import_cxidb(
        args.input,
        args.out,
        energy_eV=args.photon_energy_ev,
        distance_m=args.distance_m,
        pixel_size_m=args.pixel_size_m,
        mask=args.mask,
        dataset=args.dataset,
        beam_center_px=args.beam_center,
        mask_zero_is_good=args.mask_zero_is_good,
    )
    s = res["sources"]
    print(
        f"wrote {res['output']}: {res['n_frames']} frames {res['frame_shape'][0]}x{res['frame_shape'][1]}, "
        f"{res['photon_energy_eV']:.1f} eV ({s['photon_energy']}), {res['distance_m']:.4f} m ({s['distance']}), "
        f"pixel {res['pixel_size_m'] * 1e6:.1f} um ({s['pixel_size']}), mask: {s['mask']}"
    )
    return 0
