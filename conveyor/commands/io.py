"""``conveyor io``: inspect and validate files.

* ``conveyor io info FILE...`` prints, per file, the shape, dtype and pixel size of MRC
  and TIFF files, and the data blocks with their row counts of STAR files.
* ``conveyor io validate-movie MOVIE [--frames N] [--pixel-size A] --out OUT.json`` checks
  a raw movie (:func:`conveyor.io.movie.validate_movie`) and writes its description as
  JSON. A bad movie is reported on one line with exit status 2 and leaves no OUT file.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import InputError
from ..io.atomic import write_text

_MRC = (".mrc", ".mrcs", ".map", ".st", ".ali", ".rec")
_TIFF = (".tif", ".tiff")
_STAR = (".star",)


def register(group) -> None:
    io = group("io")
    p = io.add_parser(
        "info",
        help="print shape, dtype and pixel size of MRC/TIFF files, blocks and rows of STAR files",
        description="Describe MRC (.mrc/.mrcs), TIFF (.tif/.tiff) and STAR (.star) files from their headers.",
    )
    p.add_argument("files", nargs="+", metavar="FILE", help="files to describe")
    p.add_argument("--json", action="store_true", help="print one JSON object per line instead of text")
    p.set_defaults(func=cmd_info)

    v = io.add_parser(
        "validate-movie",
        help="check a raw movie (readable, frame count, pixel size, no NaN or empty frames)",
        description=(
            "Check a raw movie and write what was found as JSON. On a bad movie the problem is printed on "
            "one line, the exit status is 2, and OUT is removed if it exists."
        ),
    )
    v.add_argument("movie", metavar="MOVIE", help="movie (.mrc/.mrcs/.tif/.tiff)")
    v.add_argument("--frames", type=int, default=None, metavar="N", help="expected number of frames (spa.frames)")
    v.add_argument("--pixel-size", type=float, default=None, metavar="A",
                   help="expected pixel size in Å/px (spa.pixel_size)")
    v.add_argument("--pixel-tolerance", type=float, default=0.02, metavar="F",
                   help="allowed relative difference between header and expected pixel size (default 0.02)")
    v.add_argument("--no-data-check", action="store_true",
                   help="check the header only; do not read the frames for NaN and empty frames")
    v.add_argument("--out", required=True, metavar="OUT.json", help="report to write")
    v.set_defaults(func=cmd_validate_movie)


def _sniff(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in _MRC:
        return "mrc"
    if suffix in _TIFF:
        return "tiff"
    if suffix in _STAR:
        return "star"
    try:
        with open(path, "rb") as fh:
            head = fh.read(4096)
    except OSError as exc:
        raise InputError(path, f"cannot read file ({exc.strerror})", "check the path and permissions") from None
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if head[208:212] == b"MAP ":
        return "mrc"
    if b"data_" in head:
        return "star"
    raise InputError(path, "unrecognised file type", "io info reads MRC (.mrc/.mrcs), TIFF (.tif/.tiff) and STAR (.star)")


def file_info(path) -> dict:
    """Header description of one MRC, TIFF or STAR file (JSON-serialisable)."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "file does not exist", "check the path")
    if path.is_dir():
        raise InputError(path, "is a directory", "give file paths")
    kind = _sniff(path)
    if kind == "mrc":
        from ..io.mrc import read_header

        h = read_header(path)
        shape = h["shape"] if h["ndim"] == 3 else h["shape"][1:]
        return {"path": str(path), "format": "mrc", "shape": list(shape), "dtype": h["dtype"],
                "pixel_size": h["pixel_size"] or None, "ispg": h["ispg"]}
    if kind == "tiff":
        from ..io.tiff import read_tiff_header

        h = read_tiff_header(path)
        shape = h["shape"] if h["ndim"] == 3 else h["shape"][1:]
        return {"path": str(path), "format": "tiff", "shape": list(shape), "dtype": h["dtype"],
                "pixel_size": h["pixel_size"], "compression": h["compression"]}
    from ..io.star import read_star

    blocks = read_star(path)
    return {"path": str(path), "format": "star", "blocks": {name: len(df) for name, df in blocks.items()}}


def _describe(info: dict) -> str:
    if info["format"] == "star":
        blocks = ", ".join(f"data_{name} ({rows} rows)" for name, rows in info["blocks"].items())
        return f"{info['path']}: STAR, {blocks}"
    shape = " x ".join(str(s) for s in info["shape"])
    axes = "(n, y, x)" if len(info["shape"]) == 3 else "(y, x)"
    ps = "pixel size unknown" if info["pixel_size"] is None else f"pixel size {info['pixel_size']:.4f} Å/px"
    extra = f", ispg {info['ispg']}" if info["format"] == "mrc" else f", compression {info['compression']}"
    return f"{info['path']}: {info['format'].upper()}, shape {shape} {axes}, {info['dtype']}, {ps}{extra}"


def cmd_info(args) -> int:
    errors: list[InputError] = []
    for name in args.files:
        try:
            info = file_info(name)
        except InputError as exc:
            errors.append(exc)
            continue
        print(json.dumps(info) if args.json else _describe(info), flush=True)
    if errors:
        first = errors[0]
        more = f" (and {len(errors) - 1} more unusable file(s))" if len(errors) > 1 else ""
        raise InputError(first.path, first.problem + more, first.fix)
    return 0


def cmd_validate_movie(args) -> int:
    from ..io.movie import validate_movie

    out = Path(args.out)
    try:
        report = validate_movie(
            args.movie,
            expected_frames=args.frames,
            pixel_size=args.pixel_size,
            pixel_tolerance=args.pixel_tolerance,
            check_data=not args.no_data_check,
        )
    except InputError:
        out.unlink(missing_ok=True)  # a stale report must not vouch for a bad movie
        raise
    write_text(out, json.dumps(report, indent=2) + "\n")
    return 0
