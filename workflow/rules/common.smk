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
    run=r"[^/]+",


def container_for(tool):
    """Apptainer image of a tool, from the config's `containers:` section."""
    return config["containers"].get(tool)


def conveyor_cmd(wildcards, resources):
    """The conveyor CLI with the device for this job.

    `device: auto` becomes gpu for jobs that were given a GPU (the gpgpu profile gives
    GPU rules `gpu: 1`) and cpu otherwise, so a CPU job never grabs a GPU it did not ask for.
    """
    device = config["device"]
    if device == "auto":
        device = "gpu" if int(resources.get("gpu", 0) or 0) > 0 else "cpu"
    return f"conveyor --device {device}"


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


def spa_motion_opts(wildcards):
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


def spa_ctf_opts(wildcards):
    spa = config["spa"]
    c = spa["ctf"]
    opts = (
        f"--pixel-size {spa['pixel_size']} --voltage {spa['voltage']} --cs {spa['cs']}"
        f" --amplitude-contrast {spa['amplitude_contrast']}"
        f" --defocus-min {c['defocus_min']} --defocus-max {c['defocus_max']}"
        f" --res-min {c['res_min']} --res-max {c['res_max']}"
    )
    return opts + (" --phase-shift" if c["phase_shift"] else "")


def spa_pick_opts(wildcards):
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


def spa_extract_opts(wildcards):
    spa = config["spa"]
    return f"--box {spa_box()} --particle-diameter {spa['particle_diameter']}"


def spa_merge_opts(wildcards):
    spa = config["spa"]
    m = spa["merge"]
    return (
        f"--max-ctf-resolution {m['max_ctf_resolution']}"
        f" --max-drift {m['max_drift'] / spa['pixel_size']:.2f}"
    )


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


def spa_selection_file():
    return f"{RESULTS}/spa/select/round1.yaml"


def spa_manual_selection_input(wildcards):
    return [spa_selection_file()] if config["spa"]["selection"] == "manual" else []


def spa_selected_targets(wildcards=None):
    """The selected particles after round 1, or a recorded pause while a manual selection is missing."""
    if not config.get("spa"):
        return []
    checkpoints.spa_class2d.get()
    if config["spa"]["selection"] == "manual" and not Path(spa_selection_file()).exists():
        entry = (
            "SPA",
            f"{RESULTS}/spa/class2d/round1/gallery.png",
            spa_selection_file(),
            f"conveyor select spa --class-dir {RESULTS}/spa/class2d/round1 --classes 1 4 7 --out {spa_selection_file()}",
        )
        if entry not in PAUSED:
            PAUSED.append(entry)
        return []
    return [f"{RESULTS}/spa/select/round1_particles.star"]
