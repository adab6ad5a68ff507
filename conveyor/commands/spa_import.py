"""``conveyor spa movies-star``: the movie list of an experiment as a RELION 3.1 STAR file.

Reads the JSON records written by ``conveyor io validate-movie`` (one per movie) and writes
``movies.star`` with ``data_optics`` (one optics group) and ``data_movies``
(rlnMicrographMovieName, rlnOpticsGroup, plus frame count and size), the same as
``relion_import --do_movies`` would, so users can continue in RELION if they wish.
"""

from __future__ import annotations

import json
from pathlib import Path


from ..errors import InputError
from ..io.star import write_star
from .._lazy import lazy_module

pd = lazy_module("pandas")


def _read_records(paths):
    records = []
    for p in paths:
        try:
            records.append(json.loads(Path(p).read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(p, f"not a readable movie record ({exc})", "re-run the validation step for this movie") from None
    return records


def movies_table(records, pixel_size, voltage, cs, amplitude_contrast) -> dict:
    """``{"optics": ..., "movies": ...}`` DataFrames for validated movie records."""
    if not records:
        raise InputError("spa.movies", "no movie was validated", "check the movies glob in the config")
    optics = pd.DataFrame(
        {
            "rlnOpticsGroupName": ["opticsGroup1"],
            "rlnOpticsGroup": [1],
            "rlnMicrographOriginalPixelSize": [float(pixel_size)],
            "rlnVoltage": [float(voltage)],
            "rlnSphericalAberration": [float(cs)],
            "rlnAmplitudeContrast": [float(amplitude_contrast)],
        }
    )
    movies = pd.DataFrame(
        {
            "rlnMicrographMovieName": [r["path"] for r in records],
            "rlnOpticsGroup": [1] * len(records),
            "cvMovieFrames": [int(r["n_frames"]) for r in records],
            "cvMovieSizeX": [int(r["nx"]) for r in records],
            "cvMovieSizeY": [int(r["ny"]) for r in records],
        }
    )
    return {"optics": optics, "movies": movies}


def _movies_star(args) -> int:
    paths = list(args.validated)
    if args.list:
        paths += [ln.strip() for ln in Path(args.list).read_text().splitlines() if ln.strip()]
    records = _read_records(paths)
    write_star(args.out, movies_table(records, args.pixel_size, args.voltage, args.cs, args.amplitude_contrast))
    print(f"{args.out}: {len(records)} movies")
    return 0


def register(group) -> None:
    p = group("spa").add_parser("movies-star", help="write movies.star (RELION 3.1) from validated movie records")
    p.add_argument("validated", nargs="*", help="JSON records from `conveyor io validate-movie`")
    p.add_argument("--list", help="text file listing more records, one per line (for thousands of movies)")
    p.add_argument("--out", required=True, help="output STAR file")
    p.add_argument("--pixel-size", type=float, required=True, help="Å/px")
    p.add_argument("--voltage", type=float, default=300.0, help="kV")
    p.add_argument("--cs", type=float, default=2.7, help="mm")
    p.add_argument("--amplitude-contrast", type=float, default=0.1)
    p.set_defaults(func=_movies_star)
