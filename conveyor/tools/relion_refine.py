"""RELION 3.1 as a peer tool for 2D classification, initial model, 3D refinement and post-processing.

Each function takes the options of the matching native command and writes the native
command's files, with the same names and contents, into the same output folder, so a
workflow can switch tool per stage without any other change:

==========================  ===========================  =================================================
function                    mirrors                      RELION 3.1 program
==========================  ===========================  =================================================
:func:`run_class2d`         ``conveyor spa class2d``     ``relion_refine`` (2D, ``--K``, ``--psi_step``)
:func:`run_initial_model`   ``conveyor spa initial-      ``relion_refine --sgd --denovo_3dref``
                            model``
:func:`run_refine3d`        ``conveyor spa refine3d``    ``mpirun -n 3 relion_refine_mpi --auto_refine
                                                         --split_random_halves`` (``--classes K > 1``:
                                                         ``relion_refine --K K``, 3D classification)
:func:`run_postprocess`     ``conveyor spa postprocess`` ``relion_postprocess``
==========================  ===========================  =================================================

The command lines are built by :func:`class2d_command`, :func:`initial_model_command`,
:func:`refine3d_command`, :func:`class3d_command` and :func:`postprocess_command` (their
docstrings show them). RELION runs inside a project directory (a temporary one beside the
outputs, removed on success and kept on failure, or ``work_dir``; for refinement
``<out-dir>/relion``, kept so that ``--continue`` can resume it).

Conventions and conversions
---------------------------
* **Particles.** The particles are read with :func:`conveyor.io.star.read_particles`; the
  ``--max-particles`` subset is the native commands' (the same ``seed``, the same rows).
  RELION gets a STAR file with ``data_optics`` and only the columns its job uses
  (``rlnImageName`` with the stack path made absolute, looked up as written and then
  beside the STAR file as natively; the CTF columns; ``rlnOriginX/YAngst`` and
  ``rlnRandomSubset`` for refinement); every input column is kept in the output
  ``particles.star``, RELION's results added. ``rlnMicrographName`` is not handed over, so
  RELION models the noise and the intensity scale as one group, as the native code does.
* **Angles and origins** are RELION's convention on both sides (``rlnAngleRot/Tilt/Psi``,
  ``rlnOriginX/YAngst`` = minus where the particle lies); they are copied unchanged.
* **Seeds.** RELION's ``--random_seed`` gets ``seed + 1``: RELION takes 0 to mean "do not
  randomise the particle order", which would make its mini-batches and half sets
  depend on the file order.
* **Angular steps** become the nearest HEALPix order (60° / 2^order: 15° is order 2).
* **Noise power.** RELION's ``rlnSigma2Noise`` is per real/imaginary component of a
  transform normalised by 1/N²; the native ``model.star`` holds ``E|rfft2|²`` of the
  images, so it is multiplied by ``2 N⁴``.

RELION 3.1's auto-refinement needs MPI with at least 3 processes (a leader and one
follower per half set): it runs as ``mpirun -n 3 relion_refine_mpi`` with Open MPI's
oversubscription allowed and (as root, in containers) ``OMPI_ALLOW_RUN_AS_ROOT`` set.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shlex
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import InputError
from ._run import ToolError, run_tool
from .relion import _project, relion_exe

log = logging.getLogger(__name__)

MPI_FIX = "install Open MPI (Debian/Ubuntu: apt-get install openmpi-bin) or pass --mpirun with the MPI launcher"
#: RELION's auto-refinement needs a leader and one follower per half set.
MIN_MPI_RANKS = 3
#: CTF columns handed to RELION when present (per particle).
CTF_LABELS = ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnPhaseShift", "rlnCtfBfactor",
              "rlnCtfScalefactor")


# --------------------------------------------------------------------------- small helpers
def healpix_order(step_deg: float) -> int:
    """The HEALPix order whose sampling (60° / 2^order) is nearest to ``step_deg`` (0..8)."""
    step = float(step_deg)
    if not (math.isfinite(step) and step > 0):
        raise InputError("--angular-step", f"must be a positive number of degrees, got {step_deg!r}", "use e.g. 15")
    return int(min(8, max(0, round(math.log2(60.0 / step)))))


def relion_seed(seed: int) -> int:
    """RELION's ``--random_seed`` for our ``seed`` (``seed + 1``: RELION's 0 switches randomisation off)."""
    return int(seed) + 1


def sgd_iterations(total: int) -> tuple[int, int, int]:
    """``(initial, in-between, final)`` SGD iterations for ``total``, in RELION's default 1 : 4 : 1 ratio."""
    total = int(total)
    if total < 3:
        raise InputError("--iterations", f"RELION's SGD needs at least 3 iterations, got {total}", "use 3 or more")
    ini = max(1, round(total / 6))
    fin = max(1, round(total / 6))
    return ini, total - ini - fin, fin


def _f(x) -> str:
    return f"{float(x):g}"


@dataclasses.dataclass
class ParticleSet:
    """Particles for a RELION job: the rows used and what RELION reads."""

    source: Path
    table: pd.DataFrame  # the rows used, every input column (written back with RELION's results)
    optics: pd.DataFrame
    relion: pd.DataFrame  # what RELION reads (absolute image names, the job's columns)
    pixel_size: float
    box: int
    has_ctf: bool


def prepare_particles(star, *, max_particles=None, seed: int = 0, extra_labels=()) -> ParticleSet:
    """Read a particle STAR file and build the table RELION reads (see the module docstring).

    ``max_particles`` keeps the native commands' random subset (``default_rng(seed)``,
    drawn without replacement, in file order). ``extra_labels`` are columns handed to
    RELION besides the image name, the CTF columns and ``rlnOpticsGroup``.
    """
    from ..io.mrc import read_header  # noqa: PLC0415
    from ..io.star import join_optics, parse_image_names, read_particles, require_columns  # noqa: PLC0415

    star = Path(star)
    table, optics = read_particles(star)
    if len(table) == 0:
        raise InputError(star, "holds no particles", "check the extraction/selection that wrote it")
    require_columns(table, ["rlnImageName"], star, block="particles")
    if max_particles is not None and 0 < int(max_particles) < len(table):
        keep = np.sort(np.random.default_rng(seed).choice(len(table), size=int(max_particles), replace=False))
        table = table.iloc[keep]
    table = table.reset_index(drop=True)
    joined = join_optics(table, optics, star)
    if "rlnImagePixelSize" not in joined.columns:
        raise InputError(star, "no rlnImagePixelSize in data_optics",
                         "pass the particle STAR file written by extraction")
    ps_all = pd.to_numeric(joined["rlnImagePixelSize"], errors="coerce").to_numpy(float)
    if not np.isfinite(ps_all).all() or (ps_all <= 0).any():
        raise InputError(star, "rlnImagePixelSize must be a positive number", "fix data_optics")
    if np.ptp(ps_all) > 1e-3 * ps_all.max():
        raise InputError(star, f"particles have different pixel sizes ({sorted(set(np.round(ps_all, 4)))} Å)",
                         "process each pixel size separately, or re-extract to one pixel size")
    if "rlnCtfDataAreCtfPremultiplied" in joined.columns and (pd.to_numeric(
            joined["rlnCtfDataAreCtfPremultiplied"], errors="coerce").fillna(0) != 0).any():
        raise InputError(star, "particles are CTF-premultiplied (rlnCtfDataAreCtfPremultiplied 1)",
                         "re-extract without premultiplication")
    idx, stacks = parse_image_names(table["rlnImageName"], star)
    resolved = {}
    for name in pd.unique(stacks):
        p = Path(str(name))
        if not (p.is_absolute() or p.exists()) and (star.parent / p).exists():
            p = star.parent / p
        if not p.exists():
            raise InputError(star, f"particle stack {name} (from rlnImageName) does not exist",
                             "run from the directory the paths are relative to, or re-extract")
        resolved[name] = str(p.resolve())
    shape = read_header(resolved[stacks[0]])["shape"]
    box = int(shape[-1])
    if shape[-1] != shape[-2] or box % 2:
        raise InputError(resolved[stacks[0]], f"particle boxes must be square and even, got {shape[-2]}x{shape[-1]}",
                         "re-extract the particles")
    rel = pd.DataFrame({"rlnImageName": [f"{i:06d}@{resolved[s]}" for i, s in zip(idx, stacks)]})
    has_ctf = "rlnDefocusU" in joined.columns
    for lab in (*CTF_LABELS, *extra_labels):
        if lab in table.columns:
            rel[lab] = table[lab].to_numpy()
    rel["rlnOpticsGroup"] = table["rlnOpticsGroup"].to_numpy(int) if "rlnOpticsGroup" in table.columns else 1
    opt = optics[[c for c in optics.columns if c.startswith("rln")]].copy()
    if "rlnOpticsGroup" not in opt.columns:
        opt["rlnOpticsGroup"] = 1
    if "rlnImageSize" not in opt.columns:
        opt["rlnImageSize"] = box
    if "rlnImageDimensionality" not in opt.columns:
        opt["rlnImageDimensionality"] = 2
    if has_ctf:
        for lab, fix in (("rlnVoltage", "kV"), ("rlnSphericalAberration", "mm"), ("rlnAmplitudeContrast", "")):
            if lab not in joined.columns:
                raise InputError(star, f"has CTF columns but no {lab}",
                                 f"add {lab} ({fix}) to data_optics".replace(" ()", ""))
    return ParticleSet(source=star, table=table, optics=opt, relion=rel, pixel_size=float(ps_all[0]), box=box,
                       has_ctf=has_ctf)


def _write_input(path: Path, ps: ParticleSet) -> None:
    from ..io.star import write_star  # noqa: PLC0415

    write_star(path, {"optics": ps.optics, "particles": ps.relion})


def _read(path: Path, source) -> dict:
    """A RELION STAR file as ``{block: DataFrame}`` (simple blocks as one-row frames)."""
    from ..io.star import read_star  # noqa: PLC0415

    try:
        return read_star(path)
    except InputError as exc:
        raise ToolError(source, f"cannot read RELION's output {path} ({exc})",
                        "check the RELION version (3.1 is expected)") from None


def _general(blocks: dict, name: str) -> dict:
    g = blocks.get(name)
    return {} if g is None or len(g) == 0 else g.iloc[0].to_dict()


def _particles_block(blocks: dict, path, source) -> pd.DataFrame:
    t = blocks.get("particles", blocks.get("images"))
    if t is None:
        raise ToolError(source, f"RELION's {path} has no data_particles block",
                        "check the RELION version (3.1 is expected)")
    return t


def _match_rows(relion_out: pd.DataFrame, sent: pd.DataFrame, source, path) -> np.ndarray:
    """Row ``i`` of what RELION wrote for row ``i`` of what it was given (matched by image name)."""
    names = relion_out["rlnImageName"].astype(str).to_numpy()
    want = sent["rlnImageName"].astype(str).to_numpy()
    if len(names) == len(want) and (names == want).all():
        return np.arange(len(want))
    pos = pd.Series(np.arange(len(names)), index=names)
    if pos.index.duplicated().any() or not pd.Index(want).isin(pos.index).all():
        raise ToolError(source, f"RELION's {path} does not hold the {len(want)} particles it was given "
                        f"({len(names)} rows)", "check the RELION log in the kept work directory")
    return pos.loc[want].to_numpy()


def _iteration_files(folder: Path, pattern: str) -> dict[int, Path]:
    rx = re.compile(pattern)
    out = {}
    for p in folder.glob("run_it*"):
        m = rx.fullmatch(p.name)
        if m:
            out[int(m.group(1))] = p
    return out


def _mtime(p: Path) -> float:
    try:
        return p.stat().st_mtime
    except OSError:
        return math.nan


# --------------------------------------------------------------------------- 2D classification
def class2d_command(exe: str, *, classes: int, particle_diameter: float, iterations: int, psi_step: float,
                    offset_range: float, offset_step: float, initial_resolution: float | None,
                    max_resolution: float | None, ctf: bool, threads: int, seed: int) -> list[str]:
    """The RELION 3.1 2D classification command (RELION's GUI defaults where no native option maps)::

        relion_refine --i particles.star --o Class2D/run --dont_combine_weights_via_disc --pool 3
            --pad 2 [--ctf] --iter N --tau2_fudge 2 --particle_diameter D --K K --flatten_solvent
            --zero_mask --oversampling 1 --psi_step PSI --offset_range R --offset_step S --norm
            --scale --j T --random_seed SEED+1 [--ini_high INI] [--strict_highres_exp MAX]

    ``--psi_step``/``--offset_step`` are RELION's coarse steps (its adaptive oversampling
    halves them for the likely poses); ``--offset_range``/``--offset_step`` in px.
    """
    cmd = [exe, "--i", "particles.star", "--o", "Class2D/run", "--dont_combine_weights_via_disc", "--pool", "3",
           "--pad", "2"]
    if ctf:
        cmd.append("--ctf")
    cmd += ["--iter", str(int(iterations)), "--tau2_fudge", "2", "--particle_diameter", _f(particle_diameter),
            "--K", str(int(classes)), "--flatten_solvent", "--zero_mask", "--oversampling", "1",
            "--psi_step", _f(psi_step), "--offset_range", _f(offset_range), "--offset_step", _f(offset_step),
            "--norm", "--scale", "--j", str(max(1, int(threads))), "--random_seed", str(relion_seed(seed))]
    if initial_resolution:
        cmd += ["--ini_high", _f(initial_resolution)]
    if max_resolution:
        cmd += ["--strict_highres_exp", _f(max_resolution)]
    return cmd


def _class2d_log(folder: Path, iterations: int, pixel_size: float, n: int) -> pd.DataFrame:
    """The native per-iteration log from RELION's ``run_itNNN_model/optimiser.star``."""
    from ..spa.classify2d import LOG_COLUMNS  # noqa: PLC0415

    rows = []
    prev = _mtime(folder / "run_it000_model.star")
    for it in range(1, iterations + 1):
        mp = folder / f"run_it{it:03d}_model.star"
        m = _read(mp, mp)
        g = _general(m, "model_general")
        opt = _general(_read(folder / f"run_it{it:03d}_optimiser.star", mp), "optimiser_general")
        mc = m.get("model_classes")
        res = mc["rlnEstimatedResolution"].to_numpy(float) if mc is not None else np.array([np.nan])
        dist = mc["rlnClassDistribution"].to_numpy(float) if mc is not None else np.array([1.0])
        big = dist >= max(3.0 / max(n, 1), 0.02)
        now = _mtime(mp)
        rows.append({
            "iteration": it, "resolution_limit": float(g.get("rlnCurrentResolution", np.nan)),
            "best_resolution": float(np.min(res[big] if big.any() else res)), "temperature": 1.0,
            "log_likelihood": float(g.get("rlnLogLikelihood", np.nan)),
            "average_pmax": float(g.get("rlnAveragePmax", np.nan)),
            "changed_fraction": float(opt.get("rlnChangesOptimalClasses", np.nan)),
            "sigma_offset": float(g.get("rlnSigmaOffsetsAngst", np.nan)) / pixel_size,
            "significant_per_particle": np.nan, "reseeded": 0, "seconds": now - prev,
        })
        prev = now
    return pd.DataFrame(rows, columns=list(LOG_COLUMNS))


def class2d_from_relion(folder: Path, iterations: int, sent: pd.DataFrame, *, pixel_size: float,
                        particle_diameter: float, source):
    """RELION's last 2D iteration in ``folder`` as a :class:`~conveyor.spa.classify2d.Class2DResult`.

    Classes are renumbered 1..K by decreasing population (ties by RELION's number), as
    natively. ``frc`` is the half-set FRC implied by RELION's SSNR (``SSNR / (SSNR + 2)``,
    the inverse of the native ``SSNR = 2 FRC / (1 − FRC)``; RELION's 2D classification has
    no half sets). ``misfit`` is NaN (RELION has no such figure) and ``n_significant`` of
    the earlier iterations is not kept by RELION.
    """
    from ..io.mrc import read_mrc  # noqa: PLC0415
    from ..spa.classify2d import Class2DResult  # noqa: PLC0415

    it = int(iterations)
    model_path = folder / f"run_it{it:03d}_model.star"
    data_path = folder / f"run_it{it:03d}_data.star"
    model = _read(model_path, source)
    data = _particles_block(_read(data_path, source), data_path, source)
    rows = _match_rows(data, sent, source, data_path)
    data = data.iloc[rows].reset_index(drop=True)
    mc = model["model_classes"]
    k = len(mc)
    averages, _ = read_mrc(folder / f"run_it{it:03d}_classes.mrcs")
    averages = averages.reshape((-1,) + averages.shape[-2:])
    if averages.shape[0] != k:
        raise ToolError(source, f"RELION wrote {averages.shape[0]} class averages for {k} classes",
                        "check the RELION log in the kept work directory")
    b = averages.shape[-1]
    cls = data["rlnClassNumber"].to_numpy(int)
    counts = np.bincount(cls - 1, minlength=k)[:k]
    order = np.lexsort((np.arange(k), -counts))
    new_number = np.empty(k, dtype=np.int64)
    new_number[order] = np.arange(1, k + 1)
    nshell = b // 2 + 1
    ssnr = np.zeros((k, nshell))
    for c in range(k):
        s = model.get(f"model_class_{c + 1}")
        if s is not None and "rlnSsnrMap" in s.columns:
            v = s["rlnSsnrMap"].to_numpy(float)[:nshell]
            ssnr[c, : len(v)] = v
    ssnr = np.clip(ssnr, 0.0, None)
    group = model.get("model_group_1", model.get("model_optics_group_1"))
    sigma2 = np.zeros(nshell)
    if group is not None and "rlnSigma2Noise" in group.columns:
        v = group["rlnSigma2Noise"].to_numpy(float)[:nshell]
        sigma2[: len(v)] = v * 2.0 * float(b) ** 4
    psi = data["rlnAnglePsi"].to_numpy(float) if "rlnAnglePsi" in data.columns else np.zeros(len(data))
    psi = np.where(psi > 180.0, psi - 360.0, np.where(psi <= -180.0, psi + 360.0, psi))
    origins = np.stack([data.get("rlnOriginXAngst", pd.Series(np.zeros(len(data)))).to_numpy(float),
                        data.get("rlnOriginYAngst", pd.Series(np.zeros(len(data)))).to_numpy(float)], axis=1)
    g = _general(model, "model_general")
    n = len(data)
    return Class2DResult(
        averages=averages[order].astype(np.float32),
        assignments=new_number[cls - 1],
        psi=psi,
        shifts=-origins / pixel_size,
        probabilities=data["rlnMaxValueProbDistribution"].to_numpy(float),
        log_likelihood=data["rlnLogLikeliContribution"].to_numpy(float),
        class_counts=counts[order],
        class_distribution=mc["rlnClassDistribution"].to_numpy(float)[order],
        class_resolution=mc["rlnEstimatedResolution"].to_numpy(float)[order],
        ssnr=ssnr[order],
        frc=(ssnr / (ssnr + 2.0))[order],
        sigma2=sigma2,
        n_significant=data["rlnNrOfSignificantSamples"].to_numpy(int),
        misfit=np.full(n, np.nan),
        pixel_size=float(pixel_size),
        particle_diameter=float(particle_diameter),
        resolution_limit=float(g.get("rlnCurrentResolution", np.nan)),
        log=_class2d_log(folder, it, pixel_size, n),
    )


def run_class2d(particles, out_dir, *, classes: int, particle_diameter: float, iterations: int = 25,
                psi_step: float = 10.0, offset_range: float = 5.0, offset_step: float = 1.0,
                initial_resolution: float | None = 30.0, max_resolution: float | None = None,
                temperature: float = 1.0, center: bool = True, seed: int = 0, max_particles=None,
                threads: int = 1, relion_bin=None, work_dir=None) -> dict:
    """2D classification with RELION 3.1; writes ``conveyor spa class2d``'s files into ``out_dir``.

    ``class_averages.mrcs``, ``gallery.png``, ``log.csv``, ``particles.star`` and, last,
    ``model.star``, with the native layout (see :mod:`conveyor.commands.spa_classify`).
    ``temperature`` and ``center`` have no RELION 3.1 counterpart (it neither anneals the
    posterior nor re-centres class averages) and are ignored. ``particles.star`` has no
    ``cvMisfit`` column, so ``conveyor spa select`` removes no outliers from it.

    Returns ``{"result": Class2DResult, "seconds": RELION's wall time, "n": particles}``.
    """
    from ..commands.spa_classify import (  # noqa: PLC0415
        AVERAGES, GALLERY, LOG, MODEL, PARTICLES, model_blocks, particle_table, write_gallery)
    from ..io.atomic import write_text  # noqa: PLC0415
    from ..io.mrc import write_mrc  # noqa: PLC0415
    from ..io.star import write_star  # noqa: PLC0415

    if int(classes) < 1:
        raise InputError("--classes", f"must be at least 1, got {classes}", "use e.g. 50")
    if int(iterations) < 1:
        raise InputError("--iterations", f"must be at least 1, got {iterations}", "use e.g. 25")
    for v, flag in ((particle_diameter, "--particle-diameter"), (psi_step, "--psi-step"),
                    (offset_step, "--offset-step")):
        if not (v and float(v) > 0):
            raise InputError(flag, f"must be positive, got {v}", "pass a positive number")
    if temperature != 1.0:
        log.info("RELION 3.1 has no posterior annealing: --temperature %g ignored", temperature)
    ps = prepare_particles(particles, max_particles=max_particles, seed=seed)
    if not ps.has_ctf:
        log.warning("%s has no rlnDefocusU: classifying without CTF correction", particles)
    exe = relion_exe("relion_refine", relion_bin)
    out = Path(out_dir)
    with _project(work_dir, out / MODEL, "conveyor-relion-class2d") as proj:
        _write_input(proj / "particles.star", ps)
        (proj / "Class2D").mkdir(exist_ok=True)
        cmd = class2d_command(exe, classes=classes, particle_diameter=particle_diameter, iterations=iterations,
                              psi_step=psi_step, offset_range=offset_range, offset_step=offset_step,
                              initial_resolution=initial_resolution, max_resolution=max_resolution,
                              ctf=ps.has_ctf, threads=threads, seed=seed)
        last = proj / "Class2D" / f"run_it{int(iterations):03d}"
        t0 = time.perf_counter()
        run_tool(cmd, tool="relion_refine", input_path=particles, cwd=proj, log_path=proj / "relion.log",
                 expect=[Path(f"{last}_classes.mrcs"), Path(f"{last}_model.star"), Path(f"{last}_data.star")])
        seconds = time.perf_counter() - t0
        res = class2d_from_relion(proj / "Class2D", iterations, ps.relion, pixel_size=ps.pixel_size,
                                  particle_diameter=particle_diameter, source=particles)
    averages_path = out / AVERAGES
    write_mrc(averages_path, res.averages, ps.pixel_size, volume=False)
    n = len(ps.table)
    write_gallery(out / GALLERY, res.averages, res.class_counts, res.class_resolution, ps.pixel_size,
                  particle_diameter, title=f"{n} particles, {classes} classes, {iterations} iterations (RELION 3.1)")
    write_text(out / LOG, res.log.to_csv(index=False, float_format="%.6g"))
    table = particle_table(ps.table, res).drop(columns=["cvMisfit"])
    write_star(out / PARTICLES, {"optics": ps.optics, "particles": table})
    write_star(out / MODEL, model_blocks(res, str(averages_path)))
    return {"result": res, "seconds": seconds, "n": n}


# --------------------------------------------------------------------------- initial model
def initial_model_command(exe: str, *, iterations: int, particle_diameter: float, symmetry: str,
                          initial_resolution: float, final_resolution: float, batch: tuple[int, int],
                          angular_step: float, max_shift: float, ctf: bool, threads: int, seed: int) -> list[str]:
    """The RELION 3.1 SGD initial-model command::

        relion_refine --i particles.star --o InitialModel/run --sgd --denovo_3dref
            --sgd_ini_iter I --sgd_inbetween_iter M --sgd_fin_iter F --sgd_write_iter N
            --sgd_ini_resol R0 --sgd_fin_resol R1 --sgd_ini_subset B0 --sgd_fin_subset B1
            [--ctf] --K 1 --sym SYM --flatten_solvent --zero_mask --dont_combine_weights_via_disc
            --pool 3 --pad 1 --skip_gridding --particle_diameter D --oversampling 1
            --healpix_order H --offset_range S --offset_step 1 --j T --random_seed SEED+1

    ``I + M + F = iterations`` in RELION's 1 : 4 : 1 ratio; only the last iteration is kept
    (``--sgd_write_iter N``).
    """
    ini, mid, fin = sgd_iterations(iterations)
    cmd = [exe, "--i", "particles.star", "--o", "InitialModel/run", "--sgd", "--denovo_3dref",
           "--sgd_ini_iter", str(ini), "--sgd_inbetween_iter", str(mid), "--sgd_fin_iter", str(fin),
           "--sgd_write_iter", str(int(iterations)), "--sgd_ini_resol", _f(initial_resolution),
           "--sgd_fin_resol", _f(final_resolution), "--sgd_ini_subset", str(int(batch[0])),
           "--sgd_fin_subset", str(int(batch[1]))]
    if ctf:
        cmd.append("--ctf")
    cmd += ["--K", "1", "--sym", str(symmetry), "--flatten_solvent", "--zero_mask", "--dont_combine_weights_via_disc",
            "--pool", "3", "--pad", "1", "--skip_gridding", "--particle_diameter", _f(particle_diameter),
            "--oversampling", "1", "--healpix_order", str(healpix_order(angular_step)),
            "--offset_range", _f(max_shift), "--offset_step", "1", "--j", str(max(1, int(threads))),
            "--random_seed", str(relion_seed(seed))]
    return cmd


def parse_batch(value) -> tuple[int, int]:
    """``"100,300"`` -> (100, 300); ``"200"`` -> (200, 200)."""
    try:
        b = [int(v) for v in str(value).split(",")]
    except ValueError:
        b = []
    if len(b) not in (1, 2) or min(b) < 1:
        raise InputError("--batch", f"expected a mini-batch size or first,last, got {value!r}", "use e.g. 100,300")
    return (b[0], b[-1])


def run_initial_model(particles, out, *, particle_diameter: float, symmetry: str = "C1", iterations: int = 120,
                      em_iterations: int = 3, batch="100,300", initial_resolution: float | None = None,
                      final_resolution: float | None = None, angular_step: float = 15.0, max_shift: float = 2.0,
                      max_particles=None, seed: int = 0, threads: int = 1, relion_bin=None, work_dir=None) -> dict:
    """Ab initio map with RELION 3.1's SGD; writes the map to ``out`` as ``conveyor spa initial-model``.

    Resolutions as natively: final ``max(20, 4 × pixel)`` Å, initial ``max(40, 2 × final)``
    Å unless given. ``em_iterations`` has no RELION 3.1 counterpart and is ignored. The hand
    of the result is undetermined, as natively.

    Returns ``{"volume", "pixel_size", "resolution", "seconds", "n"}``.
    """
    from ..geometry import parse_symmetry  # noqa: PLC0415
    from ..io.mrc import read_mrc, write_mrc  # noqa: PLC0415

    parse_symmetry(symmetry)
    if not (particle_diameter and particle_diameter > 0):
        raise InputError("--particle-diameter", f"must be positive, got {particle_diameter}", "pass the diameter in Å")
    b = parse_batch(batch)
    ps = prepare_particles(particles, max_particles=max_particles, seed=seed)
    final = final_resolution or max(20.0, 4.0 * ps.pixel_size)
    start = initial_resolution or max(40.0, 2.0 * final)
    exe = relion_exe("relion_refine", relion_bin)
    with _project(work_dir, out, "conveyor-relion-initial-model") as proj:
        _write_input(proj / "particles.star", ps)
        (proj / "InitialModel").mkdir(exist_ok=True)
        cmd = initial_model_command(exe, iterations=iterations, particle_diameter=particle_diameter, symmetry=symmetry,
                                    initial_resolution=start, final_resolution=final, batch=b,
                                    angular_step=angular_step, max_shift=max_shift, ctf=ps.has_ctf,
                                    threads=threads, seed=seed)
        result = proj / "InitialModel" / f"run_it{int(iterations):03d}_class001.mrc"
        t0 = time.perf_counter()
        run_tool(cmd, tool="relion_refine", input_path=particles, cwd=proj, log_path=proj / "relion.log",
                 expect=[result])
        seconds = time.perf_counter() - t0
        vol, _ = read_mrc(result)
    if vol.shape != (ps.box,) * 3:
        raise ToolError(particles, f"RELION's initial model has shape {vol.shape}, expected {(ps.box,) * 3}",
                        "check the RELION version")
    write_mrc(out, vol.astype(np.float32), ps.pixel_size)
    return {"volume": vol, "pixel_size": ps.pixel_size, "resolution": final, "seconds": seconds, "n": len(ps.table)}


# --------------------------------------------------------------------------- refinement
def mpi_prefix(ranks: int = MIN_MPI_RANKS, mpirun: str | None = None) -> list[str]:
    """``[mpirun, "-n", ranks]`` (``mpirun`` may hold options, e.g. ``"mpirun --bind-to none"``)."""
    words = shlex.split(mpirun) if mpirun else ["mpirun"]
    exe = shutil.which(words[0]) or (words[0] if Path(words[0]).is_file() else None)
    if exe is None:
        raise InputError(words[0], "MPI launcher not found on PATH (RELION 3.1's auto-refinement needs MPI)", MPI_FIX)
    if int(ranks) < MIN_MPI_RANKS:
        raise InputError("--mpi", f"RELION's gold-standard refinement needs at least {MIN_MPI_RANKS} MPI processes, "
                         f"got {ranks}", f"use --mpi {MIN_MPI_RANKS} (a leader and one follower per half set)")
    return [exe, *words[1:], "-n", str(int(ranks))]


def mpi_env() -> dict:
    """Open MPI settings for a shared machine (and for root, as in containers); other MPIs ignore them."""
    env = {"OMPI_MCA_rmaps_base_oversubscribe": "1", "OMPI_MCA_mpi_yield_when_idle": "1"}
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    return env


def refine3d_command(exe_mpi: str, *, mpi: list[str], symmetry: str, particle_diameter: float, iterations: int,
                     initial_lowpass: float, angular_step: float, max_shift: float, ctf: bool, threads: int,
                     seed: int, continue_from: str | None = None) -> list[str]:
    """The RELION 3.1 gold-standard auto-refinement (in the project directory)::

        mpirun -n 3 relion_refine_mpi --o Refine3D/run --auto_refine --split_random_halves
            --i particles.star --ref reference.mrc --firstiter_cc --ini_high L
            --dont_combine_weights_via_disc --pool 3 --pad 2 [--ctf] --particle_diameter D
            --flatten_solvent --zero_mask --oversampling 1 --healpix_order H
            --auto_local_healpix_order 4 --offset_range R --offset_step 2 --sym SYM
            --low_resol_join_halves 40 --norm --scale --j T --random_seed SEED+1
            --auto_iter_max N

    resumed with ``... relion_refine_mpi --continue Refine3D/run_itNNN_optimiser.star
    --o Refine3D/run --dont_combine_weights_via_disc --pool 3 --j T --auto_iter_max N``.
    ``--firstiter_cc``: the reference need not be on RELION's absolute grey scale.
    ``--auto_iter_max`` stops RELION after that iteration (its ``--iter`` does not limit
    auto-refinement).
    """
    cmd = [*mpi, exe_mpi]
    if continue_from:
        return cmd + ["--continue", continue_from, "--o", "Refine3D/run", "--dont_combine_weights_via_disc",
                      "--pool", "3", "--j", str(max(1, int(threads))), "--auto_iter_max", str(int(iterations))]
    cmd += ["--o", "Refine3D/run", "--auto_refine", "--split_random_halves", "--i", "particles.star",
            "--ref", "reference.mrc", "--firstiter_cc", "--ini_high", _f(initial_lowpass),
            "--dont_combine_weights_via_disc", "--pool", "3", "--pad", "2"]
    if ctf:
        cmd.append("--ctf")
    cmd += ["--particle_diameter", _f(particle_diameter), "--flatten_solvent", "--zero_mask", "--oversampling", "1",
            "--healpix_order", str(healpix_order(angular_step)), "--auto_local_healpix_order", "4",
            "--offset_range", _f(max_shift), "--offset_step", "2", "--sym", str(symmetry),
            "--low_resol_join_halves", "40", "--norm", "--scale", "--j", str(max(1, int(threads))),
            "--random_seed", str(relion_seed(seed)), "--auto_iter_max", str(int(iterations))]
    return cmd


def class3d_command(exe: str, *, classes: int, symmetry: str, particle_diameter: float, iterations: int,
                    initial_lowpass: float, angular_step: float, max_shift: float, ctf: bool, threads: int,
                    seed: int, continue_from: str | None = None) -> list[str]:
    """RELION 3.1 3D classification (``--classes K > 1``)::

        relion_refine --o Class3D/run --i particles.star --ref reference.mrc --firstiter_cc
            --ini_high L --dont_combine_weights_via_disc --pool 3 --pad 2 [--ctf] --iter N
            --tau2_fudge 4 --particle_diameter D --K K --flatten_solvent --zero_mask
            --oversampling 1 --healpix_order H --offset_range R --offset_step 2 --sym SYM
            --norm --scale --j T --random_seed SEED+1

    resumed with ``relion_refine --continue Class3D/run_itNNN_optimiser.star --o Class3D/run
    --iter N --j T``.
    """
    if continue_from:
        return [exe, "--continue", continue_from, "--o", "Class3D/run", "--iter", str(int(iterations)),
                "--dont_combine_weights_via_disc", "--pool", "3", "--j", str(max(1, int(threads)))]
    cmd = [exe, "--o", "Class3D/run", "--i", "particles.star", "--ref", "reference.mrc", "--firstiter_cc",
           "--ini_high", _f(initial_lowpass), "--dont_combine_weights_via_disc", "--pool", "3", "--pad", "2"]
    if ctf:
        cmd.append("--ctf")
    cmd += ["--iter", str(int(iterations)), "--tau2_fudge", "4", "--particle_diameter", _f(particle_diameter),
            "--K", str(int(classes)), "--flatten_solvent", "--zero_mask", "--oversampling", "1",
            "--healpix_order", str(healpix_order(angular_step)), "--offset_range", _f(max_shift),
            "--offset_step", "2", "--sym", str(symmetry), "--norm", "--scale", "--j", str(max(1, int(threads))),
            "--random_seed", str(relion_seed(seed))]
    return cmd


def _last_optimiser(folder: Path) -> tuple[int, Path] | None:
    its = _iteration_files(folder, r"run_it(\d{3})_optimiser\.star")
    if not its:
        return None
    last = max(its)
    return last, its[last]


def _with_results(table: pd.DataFrame, data: pd.DataFrame, labels) -> pd.DataFrame:
    out = table.copy()
    for lab in labels:
        if lab in data.columns:
            out[lab] = data[lab].to_numpy()
    return out


POSE_LABELS = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst")
SCORE_LABELS = ("rlnLogLikeliContribution", "rlnMaxValueProbDistribution", "rlnNrOfSignificantSamples")


def run_refine3d(particles, reference, out_dir, *, particle_diameter: float, symmetry: str = "C1",
                 iterations: int = 15, initial_lowpass: float = 35.0, angular_step: float = 15.0,
                 finest_step: float | None = None, max_shift: float = 4.0, resume: bool = False,
                 auto_continue: bool = False, classes: int = 1, max_particles=None, seed: int = 0, threads: int = 1,
                 mpi: int = MIN_MPI_RANKS, mpirun=None, relion_bin=None, work_dir=None) -> dict:
    """Gold-standard refinement (``classes == 1``) or 3D classification with RELION 3.1.

    Writes ``conveyor spa refine3d``'s files into ``out_dir``: ``half1.mrc``, ``half2.mrc``
    (RELION's unfiltered final half maps, or the half maps of the last iteration when
    ``iterations`` stopped it before convergence), ``map.mrc`` (RELION's final map, else
    the mean of the two half maps), ``fsc.star`` and ``fsc.png`` (RELION's gold-standard
    FSC; resolution at 0.143 as natively), ``particles.star`` (input columns plus RELION's
    angles, origins, ``rlnRandomSubset`` and scores), ``run.json`` and ``refine.log``.
    With ``classes > 1``: ``classNNN.mrc``, ``particles.star`` (with ``rlnClassNumber``)
    and ``run.json``.

    RELION's project directory is ``work_dir`` or ``<out_dir>/relion`` (kept: ``resume``
    continues from its last ``run_itNNN_optimiser.star``). ``auto_continue`` (the workflow's
    mode, as natively): resume when that directory holds an interrupted run of the same
    particles, reference and options (the native fingerprint,
    :func:`conveyor.commands.spa_refine.run_fingerprint`, in ``<out_dir>/inputs.sha256``);
    otherwise remove RELION's files of the earlier run and start afresh. ``finest_step`` has no RELION
    counterpart (auto-refinement chooses its own finest sampling) and is ignored.
    ``threads``: ``--j max(1, threads // 2)`` for each of the two followers of the
    refinement; ``--j threads`` for classification.
    """
    from ..commands.spa_refine import load_map  # noqa: PLC0415
    from ..geometry import parse_symmetry  # noqa: PLC0415
    from ..io.mrc import write_mrc  # noqa: PLC0415

    parse_symmetry(symmetry)
    if not (particle_diameter and particle_diameter > 0):
        raise InputError("--particle-diameter", f"must be positive, got {particle_diameter}", "pass the diameter in Å")
    if int(classes) < 1:
        raise InputError("--classes", f"must be at least 1, got {classes}", "use 1 for refinement, K > 1 to classify")
    if int(iterations) < 1:
        raise InputError("--iterations", f"must be at least 1, got {iterations}", "use e.g. 15")
    if finest_step is not None:
        log.info("RELION's auto-refinement chooses its finest sampling itself: --finest-step ignored")
    out = Path(out_dir)
    proj = (Path(work_dir) if work_dir is not None else out / "relion").resolve()
    job = "Class3D" if classes > 1 else "Refine3D"
    previous = _last_optimiser(proj / job)
    if auto_continue:
        options = dict(particles=particles, reference=reference, symmetry=symmetry,
                       particle_diameter=particle_diameter, iterations=iterations, initial_lowpass=initial_lowpass,
                       angular_step=angular_step, finest_step=finest_step, max_shift=max_shift, classes=classes,
                       max_particles=max_particles, seed=seed)
        resume = _same_run_or_fresh(out, proj / job, options, previous is not None)
        previous = _last_optimiser(proj / job)
    if previous and not resume:
        raise InputError(out, "holds a previous refinement", "pass --continue to resume it, or choose a new --out-dir")
    if resume and previous is None:
        log.info("%s: nothing to continue; starting a new refinement", out)
    extra = ("rlnOriginXAngst", "rlnOriginYAngst") + (("rlnRandomSubset",) if classes == 1 else ())
    ps = prepare_particles(particles, max_particles=max_particles, seed=seed, extra_labels=extra)
    if "rlnRandomSubset" in ps.relion.columns:
        sub = pd.to_numeric(ps.relion["rlnRandomSubset"], errors="coerce")
        if not set(sub.dropna().unique()) <= {1, 2} or sub.isna().any() or sub.nunique() < 2:
            ps.relion = ps.relion.drop(columns=["rlnRandomSubset"])
    proj.mkdir(parents=True, exist_ok=True)
    (proj / job).mkdir(exist_ok=True)
    cont = None
    if resume and previous:
        cont = str(previous[1].relative_to(proj))
        sent = proj / "particles.star"
        if sent.exists():  # RELION continues with the particles it was first given: match its names
            from ..io.star import read_particles  # noqa: PLC0415

            first, _ = read_particles(sent)
            if len(first) == len(ps.relion):
                ps.relion["rlnImageName"] = first["rlnImageName"].to_numpy()
    else:
        ref, _ = load_map(reference, ps.pixel_size, ps.box, "reference")
        write_mrc(proj / "reference.mrc", ref, ps.pixel_size)
        _write_input(proj / "particles.star", ps)
    env = None
    t0 = time.perf_counter()
    if classes > 1:
        exe = relion_exe("relion_refine", relion_bin)
        cmd = class3d_command(exe, classes=classes, symmetry=symmetry, particle_diameter=particle_diameter,
                              iterations=iterations, initial_lowpass=initial_lowpass, angular_step=angular_step,
                              max_shift=max_shift, ctf=ps.has_ctf, threads=threads, seed=seed, continue_from=cont)
        expect = [proj / job / f"run_it{int(iterations):03d}_data.star"]
    else:
        exe = relion_exe("relion_refine_mpi", relion_bin)
        env = mpi_env()
        cmd = refine3d_command(exe, mpi=mpi_prefix(mpi, mpirun), symmetry=symmetry,
                               particle_diameter=particle_diameter, iterations=iterations,
                               initial_lowpass=initial_lowpass, angular_step=angular_step, max_shift=max_shift,
                               ctf=ps.has_ctf, threads=max(1, int(threads) // 2), seed=seed, continue_from=cont)
        expect = []
    run_tool(cmd, tool="relion_refine_mpi" if classes == 1 else "relion_refine", input_path=particles, cwd=proj,
             log_path=proj / "relion.log", env=env, expect=expect)
    seconds = time.perf_counter() - t0
    folder = proj / job
    if classes > 1:
        return _class3d_outputs(folder, out, ps, iterations, classes, seconds, particles)
    return _refine3d_outputs(folder, out, ps, symmetry, seconds, particles)


def _same_run_or_fresh(out: Path, job_dir: Path, options: dict, has_previous: bool) -> bool:
    """``auto_continue``: True when ``job_dir`` holds an interrupted RELION run of the same inputs and
    options (the native fingerprint); otherwise remove it and ``refine.log`` and record the new fingerprint."""
    from types import SimpleNamespace  # noqa: PLC0415

    from ..commands.spa_refine import FINGERPRINT, run_fingerprint  # noqa: PLC0415
    from ..io.atomic import write_text  # noqa: PLC0415

    digest = run_fingerprint(SimpleNamespace(**options))
    stamp = out / FINGERPRINT
    saved = stamp.read_text().strip() if stamp.exists() else None
    if has_previous and saved == digest:
        log.info("%s: continuing the interrupted RELION refinement of the same inputs", out)
        return True
    if job_dir.exists():
        shutil.rmtree(job_dir)
        log.info("%s: RELION's files of an earlier run with other inputs or options removed, starting afresh", out)
    (out / "refine.log").unlink(missing_ok=True)
    write_text(stamp, digest + "\n")
    return False


def _class3d_outputs(folder: Path, out: Path, ps: ParticleSet, iterations: int, classes: int, seconds: float,
                     source) -> dict:
    from ..io.mrc import read_mrc, write_mrc  # noqa: PLC0415
    from ..io.star import write_star  # noqa: PLC0415

    it = int(iterations)
    data_path = folder / f"run_it{it:03d}_data.star"
    data = _particles_block(_read(data_path, source), data_path, source)
    data = data.iloc[_match_rows(data, ps.relion, source, data_path)].reset_index(drop=True)
    for c in range(1, int(classes) + 1):
        vol, _ = read_mrc(folder / f"run_it{it:03d}_class{c:03d}.mrc")
        write_mrc(out / f"class{c:03d}.mrc", vol, ps.pixel_size)
    table = _with_results(ps.table, data, (*POSE_LABELS, "rlnClassNumber", *SCORE_LABELS))
    write_star(out / "particles.star", {"optics": ps.optics, "particles": table})
    sizes = np.bincount(table["rlnClassNumber"].to_numpy(int), minlength=int(classes) + 1)[1:]
    opt = _general(_read(folder / f"run_it{it:03d}_optimiser.star", source), "optimiser_general")
    changed = float(opt.get("rlnChangesOptimalClasses", np.nan))
    (out / "run.json").write_text(json.dumps({"classes": sizes.tolist(), "iterations": it,
                                              "converged": bool(np.isfinite(changed) and changed < 0.01),
                                              "seconds": round(seconds, 1), "tool": "RELION 3.1"}, indent=1) + "\n")
    return {"classes": sizes, "iterations": it, "seconds": seconds}


def _refine3d_outputs(folder: Path, out: Path, ps: ParticleSet, symmetry: str, seconds: float, source) -> dict:
    from ..io.atomic import write_text  # noqa: PLC0415
    from ..io.mrc import read_mrc, write_mrc  # noqa: PLC0415
    from ..io.star import write_star  # noqa: PLC0415
    from ..spa.fsc import plot_fsc, resolution_at, write_fsc_star  # noqa: PLC0415

    halves = _iteration_files(folder, r"run_it(\d{3})_half1_model\.star")
    done = [i for i in sorted(halves) if i >= 1 and (folder / f"run_it{i:03d}_half2_class001.mrc").exists()
            and (folder / f"run_it{i:03d}_data.star").exists()]
    converged = (folder / "run_model.star").exists() and (folder / "run_half1_class001_unfil.mrc").exists()
    if converged:
        h1p, h2p = folder / "run_half1_class001_unfil.mrc", folder / "run_half2_class001_unfil.mrc"
        model_path, data_path = folder / "run_model.star", folder / "run_data.star"
        iterations = max(done) + 1 if done else 1  # the final iteration (both halves joined) has no number
    elif done:
        iterations = max(done)
        h1p, h2p = (folder / f"run_it{iterations:03d}_half{h}_class001.mrc" for h in (1, 2))
        model_path, data_path = halves[iterations], folder / f"run_it{iterations:03d}_data.star"
    else:
        raise ToolError(source, f"RELION finished without a refined iteration in {folder}",
                        "check relion.log in the RELION project directory")
    h1, _ = read_mrc(h1p)
    h2, _ = read_mrc(h2p)
    full = read_mrc(folder / "run_class001.mrc")[0] if converged else 0.5 * (h1 + h2)
    model = _read(model_path, source)
    cls = model.get("model_class_1")
    n = ps.box
    ns = n // 2 + 1
    curve = np.zeros(ns)
    if cls is not None and "rlnGoldStandardFsc" in cls.columns:
        v = cls["rlnGoldStandardFsc"].to_numpy(float)[:ns]
        curve[: len(v)] = v
    curve[0] = 1.0
    resolution = resolution_at(curve, 0.143, ps.pixel_size, n)
    data = _particles_block(_read(data_path, source), data_path, source)
    data = data.iloc[_match_rows(data, ps.relion, source, data_path)].reset_index(drop=True)
    for name, vol in (("half1.mrc", h1), ("half2.mrc", h2), ("map.mrc", full)):
        write_mrc(out / name, vol.astype(np.float32), ps.pixel_size)
    general = {"rlnFinalResolution": resolution, "rlnCurrentIteration": iterations}
    write_fsc_star(out / "fsc.star", {"rlnFourierShellCorrelation": curve}, n, ps.pixel_size, general=general)
    plot_fsc(out / "fsc.png", {"half maps": curve}, n, ps.pixel_size,
             title=f"gold-standard FSC (RELION 3.1): {resolution:.2f} Å at 0.143")
    history = []
    lines = []
    prev = _mtime(folder / "run_it000_optimiser.star")
    for i in done:
        g = _general(_read(halves[i], source), "model_general")
        opt_path = folder / f"run_it{i:03d}_optimiser.star"
        opt = _general(_read(opt_path, source), "optimiser_general") if opt_path.exists() else {}
        now = _mtime(halves[i])
        entry = {"iteration": i, "resolution": float(g.get("rlnCurrentResolution", np.nan)),
                 "changes_angles": float(opt.get("rlnChangesOptimalOrientations", np.nan)),
                 "changes_offsets_A": float(opt.get("rlnChangesOptimalOffsets", np.nan)),
                 "seconds": round(now - prev, 2)}
        prev = now
        history.append(entry)
        lines.append(f"iteration {i:3d}: RELION resolution {entry['resolution']:.2f} Å, changes in angles "
                     f"{entry['changes_angles']:.2f}°, offsets {entry['changes_offsets_A']:.2f} Å, "
                     f"{entry['seconds']:.1f} s")
    lines.append(f"{'converged' if converged else 'stopped'} after iteration {iterations}: resolution "
                 f"{resolution:.2f} Å (FSC 0.143), {seconds:.1f} s")
    write_text(out / "refine.log", "\n".join(lines) + "\n")
    summary = {"resolution_A": round(resolution, 3),
               "resolution_fsc05_A": round(resolution_at(curve, 0.5, ps.pixel_size, n), 3),
               "iterations": iterations, "converged": converged, "particles": len(ps.table), "symmetry": symmetry,
               "seconds": round(seconds, 1), "tool": "RELION 3.1", "history": history}
    write_text(out / "run.json", json.dumps(summary, indent=1) + "\n")
    table = _with_results(ps.table, data, (*POSE_LABELS, "rlnRandomSubset", *SCORE_LABELS))
    write_star(out / "particles.star", {"optics": ps.optics, "particles": table})  # written last, as natively
    return {"resolution": resolution, "iterations": iterations, "converged": converged, "seconds": seconds,
            "fsc": curve, "n": len(ps.table)}


# --------------------------------------------------------------------------- post-processing
def postprocess_command(exe: str, *, half1: str, half2: str, pixel_size: float, mask: str, bfactor,
                        autob_lowres: float = 10.0) -> list[str]:
    """The RELION 3.1 post-processing command (in the project directory)::

        relion_postprocess --i half1.mrc --i2 half2.mrc --o PostProcess/postprocess --angpix A
            --mask mask.mrc (--auto_bfac --autob_lowres 10 | --adhoc_bfac B)
    """
    cmd = [exe, "--i", half1, "--i2", half2, "--o", "PostProcess/postprocess", "--angpix", _f(pixel_size),
           "--mask", mask]
    if bfactor == "auto":
        cmd += ["--auto_bfac", "--autob_lowres", _f(autob_lowres)]
    else:
        cmd += ["--adhoc_bfac", _f(bfactor)]
    return cmd


def mask_create_command(exe: str, *, average: str, out: str, pixel_size: float, threshold: float,
                        lowpass: float = 15.0, extend: float = 6.0, soft_edge: float = 9.0,
                        threads: int = 1) -> list[str]:
    """RELION's thresholded mask (RELION 3.1's relion_postprocess has no automatic mask)::

        relion_mask_create --i average.mrc --o mask.mrc --ini_threshold T --lowpass 15 --angpix A
            --extend_inimask E --width_soft_edge W --j T

    with the native automatic mask's low-pass (15 Å), extension (6 Å) and soft edge (9 Å)
    converted to px.
    """
    return [exe, "--i", average, "--o", out, "--ini_threshold", _f(threshold), "--lowpass", _f(lowpass),
            "--angpix", _f(pixel_size), "--extend_inimask", str(int(round(extend / pixel_size))),
            "--width_soft_edge", str(max(1, int(round(soft_edge / pixel_size)))), "--j", str(max(1, int(threads)))]


def sphere_mask(box: int, pixel_size: float, particle_diameter: float | None):
    """Soft spherical mask: radius half the particle diameter (or 0.375 × box), raised-cosine edge of 5 px."""
    from ..spa.reconstruct import soft_sphere_mask  # noqa: PLC0415

    radius = 0.5 * particle_diameter / pixel_size if particle_diameter else 0.375 * box
    radius = min(radius, 0.5 * box - 6.0)
    return soft_sphere_mask(box, max(radius, 2.0), edge=5.0, xp=np)


def run_postprocess(half1, half2, out_dir, *, mask=None, reference=None, bfactor="auto", autob_lowres: float = 10.0,
                    mask_threshold: float | None = None, particle_diameter: float | None = None,
                    pixel_size: float | None = None, threads: int = 1, relion_bin=None, work_dir=None):
    """Post-process two half maps with ``relion_postprocess``; writes ``conveyor spa postprocess``'s files.

    ``postprocess.mrc``, ``postprocess_masked.mrc``, ``postprocess.star`` (general, fsc,
    guinier), ``fsc.png``, ``slices.png``, ``postprocess.json`` and, when the mask was made
    here, ``mask.mrc``. Mask: ``mask`` as given; else with ``mask_threshold``
    ``relion_mask_create`` at that density of the mean of the half maps
    (:func:`mask_create_command`); else a soft sphere of ``particle_diameter``
    (:func:`sphere_mask`). ``threads`` go to ``relion_mask_create``. ``reference`` (validation) adds the hand check of
    :func:`conveyor.spa.postprocess.hand_check` on the average of the half maps.

    Returns the :class:`~conveyor.spa.postprocess.PostprocessResult`.
    """
    from ..commands.spa_refine import load_map  # noqa: PLC0415
    from ..io.mrc import read_mrc, write_mrc  # noqa: PLC0415
    from ..spa.postprocess import hand_check, write_postprocess  # noqa: PLC0415

    h1, ps = load_map(half1, pixel_size or None, None, "half map 1")
    h2, _ = load_map(half2, ps, h1.shape[0], "half map 2")
    n = h1.shape[0]
    if bfactor != "auto":
        try:
            bfactor = float(bfactor)
        except (TypeError, ValueError):
            raise InputError("--bfactor", f"not a number: {bfactor!r}",
                             "use auto or a value in Å² (negative sharpens)") from None
    m = None
    if mask is not None:
        m, _ = read_mrc(mask)
        if m.shape != h1.shape:
            raise InputError(mask, f"mask has shape {m.shape}, the half maps {h1.shape}",
                             "give a mask on the same grid")
        if float(m.min()) < -1e-3 or float(m.max()) > 1.0 + 1e-3 or float(m.max()) <= 0:
            raise InputError(mask, "mask values must lie in [0, 1] and not all be 0", "give a soft mask from 0 to 1")
    exe = relion_exe("relion_postprocess", relion_bin)
    out = Path(out_dir)
    with _project(work_dir, out / "postprocess.star", "conveyor-relion-postprocess") as proj:
        write_mrc(proj / "half1.mrc", h1, ps)
        write_mrc(proj / "half2.mrc", h2, ps)
        if m is None and mask_threshold is not None:
            write_mrc(proj / "average.mrc", 0.5 * (h1 + h2), ps)
            cmd = mask_create_command(relion_exe("relion_mask_create", relion_bin), average="average.mrc",
                                      out="mask.mrc", pixel_size=ps, threshold=mask_threshold, threads=threads)
            run_tool(cmd, tool="relion_mask_create", input_path=half1, cwd=proj, log_path=proj / "relion_mask.log",
                     expect=[proj / "mask.mrc"])
            m, _ = read_mrc(proj / "mask.mrc")
            if float(m.max()) <= 0:
                raise InputError("--mask-threshold", f"no density of the mean half map lies above {mask_threshold:g}",
                                 "lower --mask-threshold, or pass --mask or --particle-diameter")
        else:
            if m is None:
                m = sphere_mask(n, ps, particle_diameter)
            write_mrc(proj / "mask.mrc", m.astype(np.float32), ps)
        (proj / "PostProcess").mkdir(exist_ok=True)
        cmd = postprocess_command(exe, half1="half1.mrc", half2="half2.mrc", pixel_size=ps, mask="mask.mrc",
                                  bfactor=bfactor, autob_lowres=autob_lowres)
        pp = proj / "PostProcess"
        run_tool(cmd, tool="relion_postprocess", input_path=half1, cwd=proj, log_path=proj / "relion.log",
                 expect=[pp / "postprocess.mrc", pp / "postprocess_masked.mrc", pp / "postprocess.star"])
        sharp, _ = read_mrc(pp / "postprocess.mrc")
        sharp_masked, _ = read_mrc(pp / "postprocess_masked.mrc")
        blocks = _read(pp / "postprocess.star", half1)
    res = _postprocess_result(blocks, sharp, sharp_masked, h1, h2, m, ps, mask_auto=mask is None, bfactor=bfactor,
                              autob_lowres=autob_lowres, source=half1)
    if reference is not None:
        ref, _ = load_map(reference, ps, n, "reference")
        hand = hand_check(res.average, ref, ps)
        res.curves["cvFourierShellCorrelationReference"] = hand["fsc_as_is"]
        res.curves["cvFourierShellCorrelationReferenceMirror"] = hand["fsc_mirror"]
        res.hand = {k: v for k, v in hand.items() if not k.startswith("fsc_")}
    write_postprocess(res, out, half1_name=str(half1), half2_name=str(half2),
                      mask_name=str(mask) if mask is not None else None)
    return res


def _postprocess_result(blocks: dict, sharp, sharp_masked, h1, h2, mask, ps: float, *, mask_auto: bool, bfactor,
                        autob_lowres: float, source):
    """RELION's ``postprocess.star`` and maps as a :class:`~conveyor.spa.postprocess.PostprocessResult`."""
    from ..spa.postprocess import PostprocessResult  # noqa: PLC0415

    n = h1.shape[0]
    ns = n // 2 + 1
    g = _general(blocks, "general")
    fsc = blocks.get("fsc")
    if fsc is None or not g:
        raise ToolError(source, "RELION's postprocess.star lacks data_general or data_fsc", "check the RELION version")
    curves = {}
    for lab in ("rlnFourierShellCorrelationCorrected", "rlnFourierShellCorrelationUnmaskedMaps",
                "rlnFourierShellCorrelationMaskedMaps", "rlnCorrectedFourierShellCorrelationPhaseRandomizedMaskedMaps"):
        v = np.zeros(ns)
        if lab in fsc.columns:
            x = fsc[lab].to_numpy(float)[:ns]
            v[: len(x)] = x
        curves[lab] = v
    resolution = float(g.get("rlnFinalResolution", np.nan))
    b_used = float(g.get("rlnBfactorUsedForSharpening", 0.0))
    slope = g.get("rlnFittedSlopeGuinierPlot")
    auto = bfactor == "auto"
    fitted = auto and slope is not None and np.isfinite(float(slope))
    guinier = blocks.get("guinier", pd.DataFrame())
    guinier = guinier.drop(columns=[c for c in ("rlnLogAmplitudesIntercept",) if c in guinier.columns])
    guinier = guinier.replace([np.inf, -np.inf], -99.0).reset_index(drop=True)
    randomise_from = float(g.get("rlnRandomiseFrom", np.nan))
    rshell = int(round(n * ps / randomise_from)) if np.isfinite(randomise_from) and randomise_from > 0 else 1
    return PostprocessResult(
        sharpened=sharp, sharpened_masked=sharp_masked, average=0.5 * (h1 + h2), mask=mask, mask_auto=mask_auto,
        resolution=resolution, bfactor=b_used, map_bfactor=-b_used if fitted else 0.0, bfactor_auto=auto,
        fit_range=(float(autob_lowres), resolution) if fitted else None,
        fit_intercept=float(g.get("rlnFittedInterceptGuinierPlot", np.nan)) if fitted else math.nan,
        fit_correlation=float(g.get("rlnCorrelationFitGuinierPlot", np.nan)) if fitted else math.nan,
        randomize_shell=rshell, curves=curves, guinier=guinier, pixel_size=float(ps))
