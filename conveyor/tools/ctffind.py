"""CTFFIND4 (run from a user-supplied Apptainer image) as a peer tool for CTF estimation.

CTFFIND 4.1.x asks its parameters interactively; the adapter feeds the answers on standard
input (:func:`stdin_answers`), in the order CTFFIND 4.1.x asks them for a single micrograph
(the order RELION's ``CtffindRunner::executeCtffind4`` writes them too):

 1. Input image file name
 2. Output diagnostic image file name (``.mrc``; the text results go to the same name
    with ``.txt``, the 1D profiles to ``_avrot.txt``)
 3. Pixel size (Å)
 4. Acceleration voltage (kV)
 5. Spherical aberration (mm)
 6. Amplitude contrast (fraction)
 7. Size of amplitude spectrum to compute (px)
 8. Minimum resolution (Å)
 9. Maximum resolution (Å)
10. Minimum defocus (Å)
11. Maximum defocus (Å)
12. Defocus search step (Å)
13. Do you know what astigmatism is present? (no)
14. Slower, more exhaustive search? (yes unless ``fast_search``; the default of 4.1.8+)
15. Use a restraint on astigmatism? (yes)
16. Expected (tolerated) astigmatism (Å)
17. Find additional phase shift? (yes/no; if yes: 17a minimum, 17b maximum, 17c step, in radians)
18. Do you want to set expert options? (no)

(For a stack of frames CTFFIND first asks "Input is a movie (stack of frames)?" after
question 1; the adapter only gives it single micrographs, the non-dose-weighted sums.)

Outputs parsed (:func:`parse_diagnostic_txt`): ``diagnostic_output.txt``, ``#`` header lines
(version, input file, "Pixel size: ... ; acceleration voltage: ... ; spherical aberration:
... ; amplitude contrast: ...", search ranges, column list) and one line per micrograph with
7 columns: micrograph number; defocus 1 (Å); defocus 2 (Å); azimuth of astigmatism (deg);
additional phase shift (rad); cross correlation; spacing (Å) up to which CTF rings were fit
successfully (``inf`` when no ring fits). Converted to the CTF contract as RELION does:
``rlnDefocusU/V`` = defocus 1/2 (swapped, angle + 90°, if defocus 2 is larger),
``rlnDefocusAngle`` = azimuth (brought into (-90, 90]), ``rlnPhaseShift`` = phase in degrees,
``rlnCtfFigureOfMerit`` = cross correlation, ``rlnCtfMaxResolution`` = fit spacing (999 for
``inf``). CTFFIND's defocus is positive for underfocus, as Conveyor's and RELION's.
"""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..io.mrc import read_header, read_mrc
from . import _contracts as C
from ._run import ToolError, apptainer_command, require_apptainer, run_tool

log = logging.getLogger(__name__)

PROGRAM = "ctffind"

#: The questions CTFFIND 4.1.x asks for one micrograph, in order (see the module docstring).
QUESTIONS = (
    "Input image file name",
    "Output diagnostic image file name",
    "Pixel size",
    "Acceleration voltage",
    "Spherical aberration",
    "Amplitude contrast",
    "Size of amplitude spectrum to compute",
    "Minimum resolution",
    "Maximum resolution",
    "Minimum defocus",
    "Maximum defocus",
    "Defocus search step",
    "Do you know what astigmatism is present?",
    "Slower, more exhaustive search?",
    "Use a restraint on astigmatism?",
    "Expected (tolerated) astigmatism",
    "Find additional phase shift?",
    "Do you want to set expert options?",
)


def stdin_answers(micrograph, diagnostic, *, pixel_size: float, voltage: float, cs: float,
                  amplitude_contrast: float, spectrum_size: int = 512, res_min: float = 30.0, res_max: float = 5.0,
                  defocus_min: float = 5000.0, defocus_max: float = 50000.0, defocus_step: float = 500.0,
                  astigmatism: float = 1000.0, fast_search: bool = False, phase_shift: bool = False,
                  phase_min: float = 0.0, phase_max: float = 180.0, phase_step: float = 10.0) -> str:
    """The text fed to CTFFIND 4.1.x's standard input (phase limits in degrees, sent in radians)."""
    if not res_min > res_max > 0:
        raise InputError("--res-min/--res-max", f"need res_min > res_max > 0 (Å), got {res_min:g}, {res_max:g}",
                         "e.g. --res-min 30 --res-max 5")
    if not defocus_max > defocus_min > 0:
        raise InputError("--defocus-min/--defocus-max", f"need 0 < min < max (Å), got {defocus_min:g}, {defocus_max:g}",
                         "e.g. --defocus-min 5000 --defocus-max 50000")
    lines = [
        str(micrograph), str(diagnostic), f"{pixel_size:g}", f"{voltage:g}", f"{cs:g}", f"{amplitude_contrast:g}",
        str(int(spectrum_size)), f"{res_min:g}", f"{res_max:g}", f"{defocus_min:g}", f"{defocus_max:g}",
        f"{defocus_step:g}", "no", "no" if fast_search else "yes", "yes", f"{astigmatism:g}",
    ]
    if phase_shift:
        lines += ["yes", f"{math.radians(phase_min):.6g}", f"{math.radians(phase_max):.6g}",
                  f"{math.radians(phase_step):.6g}"]
    else:
        lines.append("no")
    lines.append("no")
    return "\n".join(lines) + "\n"


def build_command(micrograph, *, image, work_dir, nv: bool = False, runtime: str = "apptainer",
                  program: str = PROGRAM, threads: int = 1) -> list[str]:
    """``apptainer exec --bind ... IMAGE ctffind`` (answers come on stdin; threads via OMP_NUM_THREADS)."""
    mic = Path(micrograph).resolve()
    work = Path(work_dir).resolve()
    return apptainer_command(image, [program], nv=nv, binds=[mic.parent, work], runtime=runtime,
                             env={"OMP_NUM_THREADS": int(threads)} if int(threads) > 1 else None)


# --------------------------------------------------------------------------- parsing


def _header_value(text: str, key: str):
    low = text.lower()
    i = low.find(key.lower())
    if i < 0:
        return None
    rest = text[i + len(key):].split(";")[0].strip().split()
    try:
        return float(rest[0]) if rest else None
    except ValueError:
        return None


def parse_diagnostic_txt(path) -> dict:
    """CTFFIND4's ``diagnostic_output.txt`` -> dict of the first micrograph's results.

    Keys: ``micrograph_number, defocus_1, defocus_2, azimuth`` (Å, Å, degrees),
    ``phase_shift`` (radians), ``cross_correlation``, ``fit_resolution`` (Å, inf when none),
    and from the header when present ``pixel_size, voltage, cs, amplitude_contrast, version``.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "CTFFIND results file does not exist", "check that CTFFIND finished")
    header = []
    values = None
    for lineno, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        s = line.strip()
        if not s:
            continue
        if s.startswith("#"):
            header.append(s)
            continue
        parts = s.split()
        if len(parts) < 7:
            raise InputError(path, f"line {lineno} has {len(parts)} columns, expected 7",
                             "give CTFFIND4's diagnostic_output.txt of a finished run")
        try:
            values = [float(p) for p in parts[:7]]
        except ValueError:
            raise InputError(path, f"line {lineno} has non-numeric values: {s!r}",
                             "give CTFFIND4's diagnostic_output.txt") from None
        break
    if values is None:
        raise InputError(path, "holds no result line", "CTFFIND did not finish; check its log")
    head = "\n".join(header)
    out = {
        "micrograph_number": int(values[0]),
        "defocus_1": values[1],
        "defocus_2": values[2],
        "azimuth": values[3],
        "phase_shift": values[4],
        "cross_correlation": values[5],
        "fit_resolution": values[6],
        "pixel_size": _header_value(head, "Pixel size:"),
        "voltage": _header_value(head, "acceleration voltage:"),
        "cs": _header_value(head, "spherical aberration:"),
        "amplitude_contrast": _header_value(head, "amplitude contrast:"),
        "version": None,
    }
    for h in header:
        if "CTFFind version" in h or "CTFFIND version" in h:
            out["version"] = h.split("version", 1)[1].split(",")[0].strip()
    return out


def parse_avrot(path) -> dict | None:
    """CTFFIND4's ``_avrot.txt`` -> ``{"k", "data", "fit", "cc"}`` (1/Å; None if absent/unreadable).

    After ``#`` comments the file holds 6 rows per micrograph: spatial frequency (1/Å), 1D
    rotational average of the spectrum (assuming no astigmatism), rotational average of the
    spectrum, CTF fit, cross-correlation between spectrum and fit, 2σ of expected
    cross-correlation of noise.
    """
    path = Path(path)
    if not path.exists():
        return None
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        try:
            rows.append(np.array([float(v) for v in s.split()]))
        except ValueError:
            return None
        if len(rows) == 6:
            break
    if len(rows) < 4 or len({len(r) for r in rows}) != 1:
        return None
    return {"k": rows[0], "data": rows[2], "fit": rows[3], "cc": rows[4] if len(rows) > 4 else None}


def ctf_row_from_ctffind(result: dict, micrograph_name, *, pixel_size=None, voltage=None, cs=None,
                         amplitude_contrast=None) -> dict:
    """The CTF contract row from :func:`parse_diagnostic_txt` output (given values win over the header's)."""
    vals = {}
    for key, given in (("pixel_size", pixel_size), ("voltage", voltage), ("cs", cs),
                       ("amplitude_contrast", amplitude_contrast)):
        v = given if given is not None else result.get(key)
        if v is None:
            raise InputError(None, f"CTFFIND results do not give the {key.replace('_', ' ')}",
                             f"pass --{key.replace('_', '-')}")
        vals[key] = float(v)
    res = result["fit_resolution"]
    max_res = 999.0 if not math.isfinite(res) or res <= 0 else float(res)
    return C.ctf_row(
        micrograph_name, result["defocus_1"], result["defocus_2"], result["azimuth"],
        phase_shift=math.degrees(result["phase_shift"]), fom=result["cross_correlation"], max_resolution=max_res,
        voltage=vals["voltage"], cs=vals["cs"], amplitude_contrast=vals["amplitude_contrast"],
        pixel_size=vals["pixel_size"],
    )


def convert_outputs(micrograph, *, diagnostic, out_star, out_diag=None, micrograph_name=None, pixel_size=None,
                    voltage=None, cs=None, amplitude_contrast=None) -> dict:
    """Turn one finished CTFFIND run (``diagnostic`` = its ``.mrc`` name) into Conveyor's CTF outputs."""
    diagnostic = Path(diagnostic)
    txt = diagnostic.with_suffix(".txt")
    if not txt.exists():
        raise ToolError(micrograph, f"CTFFIND did not write {txt}", "check its log")
    result = parse_diagnostic_txt(txt)
    name = str(micrograph) if micrograph_name is None else str(micrograph_name)
    row = ctf_row_from_ctffind(result, name, pixel_size=pixel_size, voltage=voltage, cs=cs,
                               amplitude_contrast=amplitude_contrast)
    C.write_ctf_star(out_star, row)
    if out_diag is not None:
        img = None
        if diagnostic.exists():
            try:
                img, _ = read_mrc(diagnostic, check_finite=False)
            except InputError:
                img = None
        profile = parse_avrot(diagnostic.with_name(diagnostic.stem + "_avrot.txt"))
        C.write_ctf_png(out_diag, row, diagnostic=img, profile=profile, title=f"{Path(micrograph).name} (CTFFIND4)")
    return row


def default_work_dir(out_star) -> Path:
    out = Path(out_star).resolve()
    return out.parent / f".conveyor-ctffind-{out.stem}"


def run_ctffind(micrograph, *, image, out_star, out_diag=None, pixel_size=None, voltage: float = 300.0,
                cs: float = 2.7, amplitude_contrast: float = 0.1, defocus_min: float = 5000.0,
                defocus_max: float = 50000.0, defocus_step: float = 500.0, res_min: float = 30.0,
                res_max: float = 5.0, spectrum_size: int = 512, astigmatism: float = 1000.0,
                fast_search: bool = False, phase_shift: bool = False, phase_range=(0.0, 180.0, 10.0),
                threads: int = 1, runtime=None, program: str = PROGRAM, micrograph_name=None, work_dir=None,
                dry_run: bool = False):
    """Estimate the CTF of one micrograph with CTFFIND4 from ``image``; write Conveyor's CTF outputs.

    With ``dry_run`` nothing runs: ``(command list, stdin text)`` is returned. Otherwise the
    contract row (dict) is returned.
    """
    mic = Path(micrograph)
    hdr = read_header(mic)
    if hdr["ndim"] != 2:
        raise InputError(mic, f"holds {hdr['shape'][0]} images; CTF estimation needs one micrograph",
                         "give the aligned sum (the non-dose-weighted one)")
    ps = pixel_size if pixel_size is not None else (hdr["pixel_size"] or None)
    if ps is None:
        raise InputError(mic, "the micrograph header holds no pixel size", "pass --pixel-size (Å/px)")
    ps = float(ps)
    nyquist = 2.0 * ps
    if res_max < nyquist:
        log.warning("%s: --res-max %.2f Å is beyond Nyquist (%.2f Å); using %.2f Å", mic, res_max, nyquist,
                    nyquist * 1.01)
        res_max = nyquist * 1.01
    keep = work_dir is not None
    work = Path(work_dir).resolve() if keep else default_work_dir(out_star)
    diagnostic = work / "diagnostic_output.mrc"
    answers = stdin_answers(
        mic.resolve(), diagnostic, pixel_size=ps, voltage=voltage, cs=cs, amplitude_contrast=amplitude_contrast,
        spectrum_size=spectrum_size, res_min=res_min, res_max=res_max, defocus_min=defocus_min,
        defocus_max=defocus_max, defocus_step=defocus_step, astigmatism=astigmatism, fast_search=fast_search,
        phase_shift=phase_shift, phase_min=phase_range[0], phase_max=phase_range[1], phase_step=phase_range[2],
    )
    if dry_run:
        return build_command(mic, image=image, work_dir=work, runtime=runtime or "apptainer", program=program,
                             threads=threads), answers
    exe = require_apptainer(image, "CTFFIND", mic, runtime)
    if not keep and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    cmd = build_command(mic, image=image, work_dir=work, runtime=exe, program=program, threads=threads)
    (work / "ctffind.in").write_text(answers)
    run_tool(cmd, tool="CTFFIND", input_path=mic, log_path=work / "ctffind.log", stdin_text=answers,
             expect=[diagnostic.with_suffix(".txt")])
    row = convert_outputs(mic, diagnostic=diagnostic, out_star=out_star, out_diag=out_diag,
                          micrograph_name=micrograph_name, pixel_size=ps, voltage=voltage, cs=cs,
                          amplitude_contrast=amplitude_contrast)
    if not keep:
        shutil.rmtree(work, ignore_errors=True)
    return row
