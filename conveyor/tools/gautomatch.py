"""Gautomatch (run from a user-supplied Apptainer image) as a peer tool for particle picking.

Gautomatch (K. Zhang, GPU) is a closed binary; users put it in an Apptainer image
(containers/ctffind.def holds CTFFIND4 and Gautomatch) and name the image with ``--image``.

Command (one micrograph; a symbolic link to it in a work directory, so Gautomatch's outputs,
written beside its input, land there)::

    apptainer exec --nv --bind DIRS IMAGE Gautomatch --apixM PIX --diameter D
        [--T TEMPLATES --apixT PIX_T] [--cc_cutoff C] [--min_dist MD] [--lp LP] --gid GPU WORK/mic.mrc

Without ``--T`` Gautomatch picks with a Gaussian blob of the diameter. Outputs parsed:

* ``mic_automatch.star`` — a RELION coordinate file (one loop: ``rlnCoordinateX``,
  ``rlnCoordinateY`` in px of the micrograph, RELION's convention, plus ``rlnAnglePsi``,
  ``rlnClassNumber``, ``rlnAutopickFigureOfMerit``); used when present;
* ``mic_automatch.box`` — EMAN box file, one line per particle: x and y of the box's
  lower-left corner, box width and height (px); the centre is ``corner + size / 2``. Used
  when there is no STAR file (its figure of merit is then 0).

Coordinates are copied to the pick contract unchanged (same origin and axes as Conveyor's).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import InputError
from ..io.mrc import read_header, read_mrc
from ..io.star import read_star, require_columns
from . import _contracts as C
from ._run import ToolError, apptainer_command, merge_options, require_apptainer, run_tool

PROGRAM = "Gautomatch"


def build_command(micrograph_link, *, image, pixel_size: float, diameter: float, templates=None,
                  template_pixel_size=None, cc_cutoff=None, min_dist=None, lowpass=None, gpu="0",
                  nv: bool = True, runtime: str = "apptainer", program: str = PROGRAM, extra=(),
                  binds=()) -> list[str]:
    """The ``apptainer exec --nv ... IMAGE Gautomatch --apixM ... --diameter ... MIC`` command.

    ``micrograph_link`` is the micrograph path Gautomatch reads (its outputs go beside it).
    """
    link = Path(micrograph_link)
    argv = [program, "--apixM", f"{float(pixel_size):g}", "--diameter", f"{float(diameter):g}"]
    extra_binds = [link.parent, *binds]
    if templates is not None:
        t = Path(templates).resolve()
        argv += ["--T", str(t), "--apixT", f"{float(template_pixel_size or pixel_size):g}"]
        extra_binds.append(t.parent)
    if cc_cutoff is not None:
        argv += ["--cc_cutoff", f"{float(cc_cutoff):g}"]
    if min_dist is not None:
        argv += ["--min_dist", f"{float(min_dist):g}"]
    if lowpass is not None:
        argv += ["--lp", f"{float(lowpass):g}"]
    argv += ["--gid", str(gpu)]
    argv = [argv[0]] + merge_options(argv[1:], extra)
    argv.append(str(link))
    return apptainer_command(image, argv, nv=nv, binds=extra_binds, runtime=runtime)


# --------------------------------------------------------------------------- parsing


def parse_automatch_star(path) -> pd.DataFrame:
    """Gautomatch's ``*_automatch.star`` -> DataFrame with ``rlnCoordinateX/Y`` and ``rlnAutopickFigureOfMerit``."""
    blocks = read_star(path)
    table = next(iter(blocks.values()))
    if len(table) == 0:
        return pd.DataFrame(columns=["rlnCoordinateX", "rlnCoordinateY", "rlnAutopickFigureOfMerit"])
    require_columns(table, ["rlnCoordinateX", "rlnCoordinateY"], path)
    table = table.copy()
    if "rlnAutopickFigureOfMerit" not in table:
        table["rlnAutopickFigureOfMerit"] = 0.0
    return table


def parse_box(path) -> pd.DataFrame:
    """EMAN ``.box`` (x_corner y_corner width height per line) -> centres ``rlnCoordinateX/Y`` (px)."""
    path = Path(path)
    rows = []
    for lineno, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        parts = s.split()
        if len(parts) < 4:
            raise InputError(path, f"line {lineno} has {len(parts)} values, expected x y width height",
                             "give an EMAN .box file")
        try:
            x, y, w, h = (float(v) for v in parts[:4])
        except ValueError:
            raise InputError(path, f"line {lineno} is not numeric: {s!r}", "give an EMAN .box file") from None
        rows.append((x + w / 2.0, y + h / 2.0))
    arr = np.asarray(rows, dtype=float).reshape(-1, 2)
    return pd.DataFrame({"rlnCoordinateX": arr[:, 0], "rlnCoordinateY": arr[:, 1],
                         "rlnAutopickFigureOfMerit": np.zeros(len(arr))})


def find_outputs(work_dir, stem: str = "mic") -> tuple[Path | None, Path | None]:
    d = Path(work_dir)
    star, box = d / f"{stem}_automatch.star", d / f"{stem}_automatch.box"
    return (star if star.exists() else None), (box if box.exists() else None)


def convert_outputs(micrograph, *, work_dir, out_star, out_png=None, pixel_size: float, diameter: float,
                    micrograph_name=None, stem: str = "mic") -> pd.DataFrame:
    """Turn one finished Gautomatch run into Conveyor's pick outputs; return the picks table."""
    star, box = find_outputs(work_dir, stem)
    if star is not None:
        picks = parse_automatch_star(star)
    elif box is not None:
        picks = parse_box(box)
    else:
        raise ToolError(micrograph, f"Gautomatch wrote neither {stem}_automatch.star nor {stem}_automatch.box "
                        f"in {work_dir}", "check its log")
    name = str(micrograph) if micrograph_name is None else str(micrograph_name)
    table = C.picks_table(picks["rlnCoordinateX"], picks["rlnCoordinateY"], picks["rlnAutopickFigureOfMerit"], name)
    C.write_picks_star(out_star, table)
    if out_png is not None:
        img, _ = read_mrc(micrograph)
        C.write_pick_png(out_png, img, table["rlnCoordinateX"], table["rlnCoordinateY"], 0.5 * diameter / pixel_size,
                         title=f"{Path(micrograph).name} (Gautomatch)")
    return table


def default_work_dir(out_star) -> Path:
    out = Path(out_star).resolve()
    return out.parent / f".conveyor-gautomatch-{out.stem}"


def run_gautomatch(micrograph, *, image, particle_diameter: float, out_star, out_png=None, pixel_size=None,
                   templates=None, template_pixel_size=None, threshold=None, min_dist=None, lowpass=None,
                   gpu="0", nv: bool = True, runtime=None, program: str = PROGRAM, extra=(), micrograph_name=None,
                   work_dir=None, dry_run: bool = False):
    """Pick one micrograph with Gautomatch from ``image``; write Conveyor's pick outputs.

    ``threshold`` is Gautomatch's ``--cc_cutoff`` (None or "auto": Gautomatch's default).
    With ``dry_run`` nothing runs and the command (a list) is returned; otherwise the picks.
    """
    mic = Path(micrograph)
    hdr = read_header(mic)
    if hdr["ndim"] != 2:
        raise InputError(mic, "holds a stack, not one micrograph", "give the aligned (dose-weighted) sum")
    ps = pixel_size if pixel_size is not None else (hdr["pixel_size"] or None)
    if ps is None:
        raise InputError(mic, "the micrograph header holds no pixel size", "pass --pixel-size (Å/px)")
    ps = float(ps)
    cc = None if threshold in (None, "auto") else float(threshold)
    keep = work_dir is not None
    work = Path(work_dir).resolve() if keep else default_work_dir(out_star)
    link = work / f"mic{mic.suffix.lower() or '.mrc'}"

    def command(rt):
        return build_command(link, image=image, pixel_size=ps, diameter=particle_diameter, templates=templates,
                             template_pixel_size=template_pixel_size, cc_cutoff=cc, min_dist=min_dist,
                             lowpass=lowpass, gpu=gpu, nv=nv, runtime=rt, program=program, extra=extra,
                             binds=[mic.resolve().parent])

    if dry_run:
        return command(runtime or "apptainer")
    exe = require_apptainer(image, "Gautomatch", mic, runtime)
    if not keep and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(mic.resolve())
    run_tool(command(exe), tool="Gautomatch", input_path=mic, log_path=work / "gautomatch.log")
    table = convert_outputs(mic, work_dir=work, out_star=out_star, out_png=out_png, pixel_size=ps,
                            diameter=particle_diameter, micrograph_name=micrograph_name, stem=link.stem)
    if not keep:
        shutil.rmtree(work, ignore_errors=True)
    return table
