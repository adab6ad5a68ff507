# SPI 2D classification of the filtered frames (a checkpoint), then class selection:
# auto, or manual from the file the user writes (the run pauses until it exists).


checkpoint spi_class2d:
    input:
        frames=f"{RESULTS}/spi/frames",
        shots=lambda wc: [spi_shot_path(r) for r in spi_raw_runs()],
    output:
        classes=f"{RESULTS}/spi/class2d/classes.h5",
        assignments=f"{RESULTS}/spi/class2d/assignments.csv",
        log_csv=f"{RESULTS}/spi/class2d/log.csv",
        gallery=report(
            f"{RESULTS}/spi/class2d/gallery.png",
            caption="../report/spi_gallery.rst",
            category="SPI",
            subcategory="classification",
        ),
    log:
        f"{LOGS}/spi_class2d.log",
    benchmark:
        f"{BENCH}/spi_class2d.tsv"
    params:
        conveyor=conveyor_cmd,
        tables=lambda wc: [f"{RESULTS}/spi/frames/{r}.h5" for r in spi_raw_runs()],
        opts=lambda wc: (
            "--classes {classes} --rotations {rotations} --iterations {iterations}"
            " --seed {seed}".format(**config["spi"]["class2d"])
        ),
        outdir=f"{RESULTS}/spi/class2d",
        extra=lookup(dpath="spi/class2d/extra", within=config, default=""),
    threads: 2
    resources:
        mem_mb=lambda wc, attempt: 8000 * attempt,
        runtime=120,
    container:
        container_for("conveyor")
    shell:
        "{params.conveyor} spi class2d --shots {input.shots:q} --frames-table {params.tables:q}"
        " --out-dir {params.outdir:q} {params.opts} {params.extra} > {log:q} 2>&1"


rule spi_select:
    input:
        classes=f"{RESULTS}/spi/class2d/classes.h5",
        selection=spi_manual_selection_input,
    output:
        frames=f"{RESULTS}/spi/select/frames.csv",
        scores=f"{RESULTS}/spi/select/scores.csv",
    log:
        f"{LOGS}/spi_select.log",
    params:
        conveyor=conveyor_cmd,
        classdir=f"{RESULTS}/spi/class2d",
        mode=lambda wc: config["spi"]["selection"],
        window=lambda wc: "--dmin-nm {dmin_nm} --dmax-nm {dmax_nm}".format(**config["spi"]["size"]),
        selection=lambda wc, input: (
            f"--selection '{input.selection}'" if config["spi"]["selection"] == "manual"
            else f"--out-yaml '{RESULTS}/spi/select/classes_auto.yaml'"
        ),
    threads: 1
    container:
        container_for("conveyor")
    shell:
        "{params.conveyor} spi select --class-dir {params.classdir:q} --mode {params.mode}"
        " {params.selection} {params.window}"
        " --out-frames {output.frames:q} --out-scores {output.scores:q} > {log:q} 2>&1"
