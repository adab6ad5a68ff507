# Helper functions: config validation, input discovery, input functions.
# Rule files hold only rules.

import functools
import glob
import os
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError

sys.path.insert(0, workflow.basedir)

from conveyor.config import validate_config  # noqa: E402
from conveyor.errors import InputError  # noqa: E402

try:
    _validated = validate_config(
        dict(config), source=", ".join(map(str, workflow.configfiles)) or "config"
    )
except InputError as exc:
    raise WorkflowError(str(exc))
config.clear()
config.update(_validated)

EXP = config["experiment"]
RESULTS = f"results/{EXP}"
LOGS = f"logs/{EXP}"
BENCH = f"benchmarks/{EXP}"
SIM = config["simulate"]


wildcard_constraints:
    mic=r"[^/]+",
    bin=r"[124]",
    round=r"[12]",
    run=r"[^/]+",


def container_for(tool):
    """Apptainer image of a tool, from the config's `containers:` section."""
    return config["containers"].get(tool)


def conveyor_cmd(wildcards, threads, resources):
    """The conveyor CLI with the device and the CPU threads of this job.

    `device: auto` becomes gpu for jobs that were given a GPU (the gpgpu profile gives
    GPU rules `gpu: 1`) and cpu otherwise, so a CPU job never grabs a GPU it did not ask for.
    `--threads` keeps the job's numeric libraries within the cores it was given.
    """
    device = config["device"]
    if device == "auto":
        device = "gpu" if int(resources.get("gpu", 0) or 0) > 0 else "cpu"
    return f"conveyor --device {device} --threads {threads}"


def write_input_lists(input, keys, next_to):
    """Write each named input file list to a hidden text file beside ``next_to`` and return
    {key: path}: merges take `@list` arguments, since thousands of paths overflow a command line."""
    lists = {}
    for key in keys:
        lists[key] = Path(next_to).with_name(f".{Path(next_to).stem}_{key}.list")
        lists[key].write_text("\n".join(input[key]) + "\n")
    return lists


@functools.lru_cache(maxsize=None)
def _discover(pattern, key, exts):
    """{name: path} of the files matching a glob (cached: thousands of jobs ask)."""
    paths = sorted(p for p in glob.glob(pattern) if Path(p).suffix.lower() in exts)
    if not paths:
        raise WorkflowError(
            f"config key '{key}': the glob {pattern!r} matches no {'/'.join(sorted(exts))} file "
            f"(working directory {os.getcwd()}) -- fix the path in the config or copy the data there"
        )
    by_name = {}
    for p in paths:
        name = Path(p).stem
        if name in by_name:
            raise WorkflowError(
                f"config key '{key}': two input files have the same name {name!r}: "
                f"{by_name[name]} and {p} -- rename one; the name identifies the file in results/"
            )
        by_name[name] = p
    return by_name


def spa_movies():
    """{micrograph name: movie path} for the configured glob (after the demo simulation if any)."""
    if SIM.get("spa"):
        checkpoints.simulate_spa.get()
    return _discover(config["spa"]["movies"], "spa.movies", (".mrc", ".mrcs", ".tif", ".tiff"))


def spi_raw_runs():
    """{run name: path} of the input shot files: CXI, or CXIDB-style HDF5 when spi.cxidb is set."""
    if SIM.get("spi"):
        checkpoints.simulate_spi.get()
    spi = config["spi"]
    if spi.get("cxidb"):
        return _discover(spi["cxidb"], "spi.cxidb", (".h5", ".hdf5", ".cxi"))
    if not spi.get("shots"):
        raise WorkflowError("config section 'spi' needs 'shots' (glob of CXI files) or 'cxidb' (plain HDF5 to import)")
    return _discover(spi["shots"], "spi.shots", (".cxi", ".h5", ".hdf5"))


def spi_shot_path(run):
    """The CXI file of one run: the raw file, or the imported one for CXIDB input."""
    if config["spi"].get("cxidb"):
        return f"{RESULTS}/spi/cxi/{run}.cxi"
    return spi_raw_runs()[run]


def spi_shot_file(wildcards):
    return spi_shot_path(wildcards.run)


def spa_validated(wildcards=None):
    return [f"{RESULTS}/spa/movies/{m}.json" for m in spa_movies()]


def spi_validated(wildcards=None):
    return [f"{RESULTS}/spi/shots/{r}.json" for r in spi_raw_runs()]


def spa_targets(wildcards=None):
    if not config.get("spa"):
        return []
    return [
        f"{RESULTS}/spa/movies.star",
        f"{RESULTS}/spa/micrographs_ctf.star",
        f"{RESULTS}/spa/particles_bin{spa_first_bin()}.star",
    ]


def spi_targets(wildcards=None):
    if not config.get("spi"):
        return []
    return [f"{RESULTS}/spi/shots.csv", f"{RESULTS}/spi/frames", f"{RESULTS}/spi/class2d/gallery.png"]


# Fail at once, before any job, on an empty or ambiguous input glob (unless the input is
# simulated first by the demo).
if config.get("spa") and not SIM.get("spa"):
    spa_movies()
if config.get("spi") and not SIM.get("spi"):
    spi_raw_runs()


# --- SPA preprocessing options (from the experiment config) ---------------------------


def spa_gain():
    g = (config.get("spa") or {}).get("gain")
    return [g] if g else []


def spa_first_bin():
    return (config.get("spa") or {}).get("extract", {}).get("bin", 4)


def spa_motion_opts(wildcards=None):
    spa = config["spa"]
    m = spa["motion"]
    opts = [
        f"--pixel-size {spa['pixel_size']}",
        f"--voltage {spa['voltage']}",
        f"--dose-per-frame {spa['dose_per_frame']}",
        f"--bfactor {m['bfactor']}",
        f"--patches {m['patches']}x{m['patches']}" if m["patches"] else "--patches 0",
    ]
    if spa.get("frames"):
        opts.append(f"--frames {spa['frames']}")
    if spa.get("gain"):
        opts.append(f"--gain '{spa['gain']}' --gain-rot {spa['gain_rot']}")
        if spa.get("gain_flip"):
            opts.append(f"--gain-flip {spa['gain_flip']}")
    return " ".join(opts)


def spa_ctf_opts(wildcards=None):
    spa = config["spa"]
    c = spa["ctf"]
    opts = (
        f"--pixel-size {spa['pixel_size']} --voltage {spa['voltage']} --cs {spa['cs']}"
        f" --amplitude-contrast {spa['amplitude_contrast']}"
        f" --defocus-min {c['defocus_min']} --defocus-max {c['defocus_max']}"
        f" --res-min {c['res_min']} --res-max {c['res_max']}"
    )
    return opts + (" --phase-shift" if c["phase_shift"] else "")


def spa_pick_opts(wildcards=None):
    spa = config["spa"]
    p = spa["pick"]
    opts = f"--particle-diameter {spa['particle_diameter']} --method {p['method']} --threshold {p['threshold']}"
    if p["method"] == "template":
        if not p.get("template"):
            raise WorkflowError("config key 'spa.pick.template' must name the templates (MRC/MRCS) when spa.pick.method is template")
        opts += f" --template '{p['template']}'"
    return opts


def spa_box():
    """Box size at full resolution (px): configured, or ~1.6x the particle diameter rounded up to a multiple of 8 that bins cleanly."""
    spa = config["spa"]
    if spa["extract"].get("box"):
        return int(spa["extract"]["box"])
    box = int(1.6 * spa["particle_diameter"] / spa["pixel_size"])
    return box + (-box) % 8


def spa_extract_opts(wildcards=None):
    spa = config["spa"]
    return f"--box {spa_box()} --particle-diameter {spa['particle_diameter']}"


def spa_merge_opts(wildcards):
    spa = config["spa"]
    m = spa["merge"]
    return (
        f"--max-ctf-resolution {m['max_ctf_resolution']}"
        f" --max-drift {m['max_drift'] / spa['pixel_size']:.2f}"
    )


def spa_one_job():
    """Whether each movie's steps (validation, motion correction, CTF, picking, extraction)
    are one job, rule spa_preprocess_movie (`conveyor spa preprocess` runs them in one
    process): when they all run in one container image, as with the native tools. When a
    peer tool brings another image, each step is a job of its own in its image
    (spa_validate_movie, spa_motion, spa_ctf, spa_pick, spa_extract)."""
    stages = ("motion", "ctf", "pick", "extract")
    return len({container_for("conveyor")} | {spa_tool_container(s) for s in stages}) == 1


def spa_movie_input():
    """The raw movie of a {mic} job: the plain pattern DIR/{mic}.EXT when every movie is such
    a file (no function call per job while the DAG is built), else a function of the
    wildcards (always for simulated data, which exist only after the simulation)."""
    by_name = lambda wc: spa_movies()[wc.mic]
    if not config.get("spa") or SIM.get("spa"):
        return by_name
    movies = spa_movies()
    name, path = next(iter(movies.items()))
    ext = Path(path).suffix
    prefix = path[: len(path) - len(name) - len(ext)]
    if "{" in prefix + ext or "}" in prefix + ext:
        return by_name
    if any(p != f"{prefix}{n}{ext}" for n, p in movies.items()):
        return by_name
    return f"{prefix}{{mic}}{ext}"


def spa_conveyor_cpu(wildcards, threads, resources):
    """conveyor_cmd of a step that stays on the CPU (picking, extraction), also inside a
    per-movie job that was given a GPU for motion correction and CTF."""
    return conveyor_cmd(wildcards, threads, {})


def spa_step_command(step, **files):
    """One per-movie SPA step's command line after `conveyor [--device X]`.

    The configured tool (spa.<stage>.tool), options and extra flags are filled in here, once
    when the workflow is parsed; `files` are the rule's shell placeholders (such as
    '{input.movie:q}') for the step's files. The one-job rule and the per-step rules build
    their commands from this, so both run the same command lines.
    """
    spa = config["spa"]

    def literal(text):  # a config value inside a shell template: braces kept as they are
        return str(text).replace("{", "{{").replace("}", "}}")

    def tail(stage, opts):
        extra = (spa.get(stage) or {}).get("extra") or ""
        return literal(f"{opts} {extra}".rstrip())

    f = files
    if step == "validate":
        frames = f" --frames {spa['frames']}" if spa["frames"] else ""
        return f"io validate-movie {f['movie']}{frames} --pixel-size {spa['pixel_size']} --out {f['record']}"
    if step == "motion":
        return (
            f"{literal(spa_tool('motion'))} {f['movie']} {tail('motion', spa_motion_opts())}"
            f" --out-sum {f['dw']} --out-sum-nodw {f['nodw']} --out-shifts {f['shifts']} --out-plot {f['plot']}"
        )
    if step == "ctf":
        return (
            f"{literal(spa_tool('ctf'))} {f['nodw']} {tail('ctf', spa_ctf_opts())} --micrograph-name {f['dw']}"
            f" --out-star {f['star']} --out-diag {f['diag']}"
        )
    if step == "pick":
        return f"{literal(spa_tool('pick'))} {f['dw']} {tail('pick', spa_pick_opts())} --out-star {f['star']} --out-png {f['png']}"
    if step == "extract":
        return (
            f"{literal(spa_tool('extract'))} {f['dw']} --coords {f['coords']} --ctf {f['ctf']} --bin {f['bin']}"
            f" {tail('extract', spa_extract_opts())} --out-stack {f['stack']} --out-star {f['star']}"
        )
    raise ValueError(f"unknown SPA step {step!r}")


# --- class selection: checkpoints that pause for the user ------------------------------

PAUSED = []  # (pipeline, gallery, selection file, command) for selections still to be made


def spi_selection_file():
    return f"{RESULTS}/spi/select/classes.yaml"


def spi_manual_selection_input(wildcards):
    return [spi_selection_file()] if config["spi"]["selection"] == "manual" else []


def spi_selection_ready():
    """After the 2D classification: True if the pipeline may go on, else record a pause."""
    checkpoints.spi_class2d.get()
    if config["spi"]["selection"] == "auto" or Path(spi_selection_file()).exists():
        return True
    entry = (
        "SPI",
        f"{RESULTS}/spi/class2d/gallery.png",
        spi_selection_file(),
        f"conveyor select spi --class-dir {RESULTS}/spi/class2d --classes 1 4 7 --out {spi_selection_file()}",
    )
    if entry not in PAUSED:
        PAUSED.append(entry)
    return False


def spi_selected_targets(wildcards=None):
    if not config.get("spi"):
        return []
    if not spi_selection_ready():
        return []
    return [f"{RESULTS}/spi/select/frames.csv", f"{RESULTS}/spi/phasing/density.mrc"]


def report_results():
    """One line per final result that exists (called on success)."""
    import json as _json

    lines = []
    post = Path(f"{RESULTS}/spa/postprocess/postprocess.json")
    if config.get("spa") and post.exists():
        r = _json.loads(post.read_text())
        line = f"SPA map: {RESULTS}/spa/postprocess/postprocess.mrc, {r['resolution_A']:.1f} Å (gold-standard FSC 0.143)"
        if r.get("hand"):
            h = r["hand"]
            line += f"; against the reference: FSC 0.5 at {h['resolution_as_is' if h['hand'] == 'as is' else 'resolution_mirror']:.1f} Å, hand {h['hand']}"
        lines.append(line)
    res = Path(f"{RESULTS}/spi/phasing/resolution.json")
    if config.get("spi") and res.exists():
        r = _json.loads(res.read_text())
        lines.append(f"SPI density: {RESULTS}/spi/phasing/density.mrc, {r['resolution_nm']:.1f} nm (PRTF 1/e)")
    for line in lines:
        print(line, file=sys.stderr)


def report_pauses():
    """Tell the user which selection the run is waiting for (called on success)."""
    for pipeline, gallery, selection, command in PAUSED:
        print(
            f"\n=== {pipeline} class selection needed (selection: manual) ===\n"
            f"  1. look at the class gallery: {gallery}\n"
            f"  2. write the classes to keep to {selection}, e.g.\n"
            f"         classes: [1, 4, 7]\n"
            f"     or run: {command}\n"
            f"  3. re-run the same snakemake command: it continues from here without recomputing.\n",
            file=sys.stderr,
        )


# --- peer tools per SPA stage (config `spa.<stage>.tool`) ----------------------------
# (command after `conveyor`, container): every tool takes the native command's options and
# writes the same files, so the rules do not change with the tool.
SPA_TOOLS = {
    "motion": {
        "conveyor": ("spa motion", "conveyor"),
        "relion": ("tools relion-motion", "relion"),
        "motioncor2": ("tools motioncor2 --image {image}", None),
    },
    "ctf": {
        "conveyor": ("spa ctf", "conveyor"),
        "ctffind": ("tools ctffind --image {image}", None),
    },
    "pick": {
        "conveyor": ("spa pick", "conveyor"),
        "relion": ("tools relion-autopick", "relion"),
        "gautomatch": ("tools gautomatch --image {image}", None),
    },
    "extract": {
        "conveyor": ("spa extract", "conveyor"),
        "relion": ("tools relion-extract", "relion"),
    },
    "class2d": {
        "conveyor": ("spa class2d", "conveyor"),
        "relion": ("tools relion-class2d", "relion"),
    },
    "initial_model": {
        "conveyor": ("spa initial-model", "conveyor"),
        "relion": ("tools relion-initial-model", "relion"),
    },
    "refine3d": {
        "conveyor": ("spa refine3d", "conveyor"),
        "relion": ("tools relion-refine3d", "relion"),
    },
    "postprocess": {
        "conveyor": ("spa postprocess", "conveyor"),
        "relion": ("tools relion-postprocess", "relion"),
    },
}
# images that the adapters start themselves with `apptainer exec`
SPA_TOOL_IMAGES = {"motioncor2": "motioncor2", "ctffind": "ctffind", "gautomatch": "ctffind"}


def spa_tool(stage):
    """The conveyor sub-command that runs a SPA stage with the configured tool."""
    tool = (config.get("spa") or {}).get(stage, {}).get("tool", "conveyor")
    command, _ = SPA_TOOLS[stage][tool]
    image = config["containers"].get(SPA_TOOL_IMAGES.get(tool, ""), "")
    return command.format(image=f"'{image}'")


def spa_tool_container(stage):
    """The Apptainer image a SPA stage's job runs in (None: the adapter starts its own)."""
    tool = (config.get("spa") or {}).get(stage, {}).get("tool", "conveyor")
    name = SPA_TOOLS[stage][tool][1]
    return container_for(name) if name else None


def spi_correct_opts():
    c = config["spi"]["correct"]
    size = config["spi"]["size"]
    diameter = c["diameter_nm"] or 0.5 * (size["dmin_nm"] + size["dmax_nm"])
    return f"--diameter-nm {diameter} --background {c['background']} --symmetry {config['spi']['emc']['symmetry']}"


# --- SPA classification rounds and 3D reconstruction ----------------------------------


def spa_rounds():
    """[(round, bin)] of the 2D classification rounds: round 1 on the first extraction, round 2
    (optional) on the round-1 selection re-extracted at its own binning."""
    rounds = [(1, spa_first_bin())]
    r2 = config["spa"]["class2d"].get("round2")
    if r2:
        rounds.append((2, int(r2["bin"])))
    return rounds


def spa_round_bin(rnd):
    return dict(spa_rounds())[int(rnd)]


def spa_last_round():
    return spa_rounds()[-1][0]


def spa_class2d_input(wildcards):
    rnd = int(wildcards.round)
    if rnd == 1:
        return f"{RESULTS}/spa/particles_bin{spa_first_bin()}.star"
    return f"{RESULTS}/spa/reextract/round{rnd - 1}_bin{spa_round_bin(rnd)}.star"


def spa_class2d_opts(wildcards):
    c = config["spa"]["class2d"]
    r = c if int(wildcards.round) == 1 else c["round2"]
    return (
        f"--classes {r['classes']} --iterations {r['iterations']} --seed {c['seed']}"
        f" --particle-diameter {config['spa']['particle_diameter']} {c['extra']}"
    )


def spa_selection_file(rnd=1):
    return f"{RESULTS}/spa/select/round{rnd}.yaml"


def spa_manual_selection_input(wildcards):
    return [spa_selection_file(wildcards.round)] if config["spa"]["selection"] == "manual" else []


def spa_selection_opts(wildcards, input):
    if config["spa"]["selection"] == "manual":
        return f"--selection '{input.selection}'"
    return (
        f"--out-yaml '{RESULTS}/spa/select/round{wildcards.round}_auto.yaml'"
        f" --threshold {config['spa']['selection_threshold']}"
    )


def spa_refine_particles(wildcards=None):
    """The particles refined: the last selection, re-extracted at spa.refine3d.bin unless
    that is the binning they already have."""
    last = spa_last_round()
    bin_ = int(config["spa"]["refine3d"]["bin"])
    if bin_ == spa_round_bin(last):
        return f"{RESULTS}/spa/select/round{last}_particles.star"
    return f"{RESULTS}/spa/reextract/round{last}_bin{bin_}.star"


def spa_initial_model_opts(wildcards):
    spa = config["spa"]
    m = spa["initial_model"]
    opts = (
        f"--symmetry {spa['symmetry']} --particle-diameter {spa['particle_diameter']}"
        f" --iterations {m['iterations']} --angular-step {m['angular_step']} --seed {m['seed']}"
    )
    if m.get("max_particles"):
        opts += f" --max-particles {m['max_particles']}"
    return f"{opts} {m['extra']}"


def spa_refine3d_opts(wildcards):
    spa = config["spa"]
    r = spa["refine3d"]
    return (
        f"--symmetry {spa['symmetry']} --particle-diameter {spa['particle_diameter']}"
        f" --iterations {r['iterations']} --initial-lowpass {r['initial_lowpass']}"
        f" --angular-step {r['angular_step']} --seed {r['seed']} {r['extra']}"
    )


def spa_reference_map():
    """A known map to validate the final map against: spa.postprocess.reference, or the
    simulator's truth for simulated data."""
    if not config.get("spa"):
        return []
    ref = config["spa"]["postprocess"].get("reference")
    if ref:
        return [ref]
    if SIM.get("spa"):
        return [f"{SIM['spa']['out']}/truth/map.mrc"]
    return []


def spa_postprocess_opts(wildcards, input):
    spa = config["spa"]
    opts = f"--bfactor {spa['postprocess']['bfactor']} --particle-diameter {spa['particle_diameter']}"
    if input.get("reference"):
        opts += f" --reference '{input.reference}'"
    return f"{opts} {spa['postprocess']['extra']}"


def spa_pause(rnd):
    entry = (
        f"SPA round {rnd}",
        f"{RESULTS}/spa/class2d/round{rnd}/gallery.png",
        spa_selection_file(rnd),
        f"conveyor select spa --class-dir {RESULTS}/spa/class2d/round{rnd} --classes 1 4 7 --out {spa_selection_file(rnd)}",
    )
    if entry not in PAUSED:
        PAUSED.append(entry)


def spa_selected_targets(wildcards=None):
    """After each 2D classification (a checkpoint): the selected particles, then the 3D
    results; a manual selection that is still missing records a pause and stops there."""
    if not config.get("spa"):
        return []
    targets = []
    for rnd, _ in spa_rounds():
        checkpoints.spa_class2d.get(round=str(rnd))
        if config["spa"]["selection"] == "manual" and not Path(spa_selection_file(rnd)).exists():
            spa_pause(rnd)
            return targets
        targets.append(f"{RESULTS}/spa/select/round{rnd}_particles.star")
    if config["spa"]["reconstruct"]:
        targets += [f"{RESULTS}/spa/refine3d/map.mrc", f"{RESULTS}/spa/postprocess/postprocess.json"]
    return targets
