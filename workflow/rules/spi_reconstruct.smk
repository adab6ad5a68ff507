# SPI reconstruction from the selected frames: EMC 3D intensity -> intensity correction
# -> phase retrieval to a 3D density.


rule spi_emc:
    input:
        frames=f"{RESULTS}/spi/select/frames.csv",
        shots=lambda wc: [spi_shot_path(r) for r in spi_raw_runs()],
    output:
        intensity=f"{RESULTS}/spi/emc/intensity.mrc",
        weight=f"{RESULTS}/spi/emc/intensity_weight.mrc",
        orientations=f"{RESULTS}/spi/emc/orientations.csv",
        log_csv=f"{RESULTS}/spi/emc/log.csv",
        slices=report(
            f"{RESULTS}/spi/emc/slices.png",
            caption="../report/spi_emc.rst",
            category="SPI",
            subcategory="reconstruction",
        ),
    log:
        f"{LOGS}/spi_emc.log",
    benchmark:
        f"{BENCH}/spi_emc.tsv"
    params:
        conveyor=conveyor_cmd,
        tables=lambda wc: [f"{RESULTS}/spi/frames/{r}.h5" for r in spi_raw_runs()],
        opts=lambda wc: (
            "--num-div {num_div} --iterations {iterations} --beta-start {beta_start}"
            " --beta-factor {beta_factor} --beta-every {beta_every} --bin {bin}"
            " --symmetry {symmetry} --seed {seed}".format(**config["spi"]["emc"])
        ),
        outdir=f"{RESULTS}/spi/emc",
        extra=lookup(dpath="spi/emc/extra", within=config, default=""),
    threads: 2
    resources:
        mem_mb=lambda wc, attempt: 16000 * attempt,
        runtime=480,
    container:
        container_for("conveyor")
    shell:
        # --resume: an interrupted EMC continues from its last finished iteration
        "{params.conveyor} spi emc --shots {input.shots:q} --frames-table {params.tables:q}"
        " --selected-frames {input.frames:q} --out-dir {params.outdir:q} {params.opts}"
        " --resume {params.extra} > {log:q} 2>&1"


rule spi_correct:
    input:
        intensity=f"{RESULTS}/spi/emc/intensity.mrc",
        weight=f"{RESULTS}/spi/emc/intensity_weight.mrc",
    output:
        intensity=f"{RESULTS}/spi/intensity/corrected.mrc",
        mask=f"{RESULTS}/spi/intensity/measured_mask.mrc",
    log:
        f"{LOGS}/spi_correct.log",
    params:
        conveyor=conveyor_cmd,
        opts=lambda wc: spi_correct_opts(),
        extra=lookup(dpath="spi/correct/extra", within=config, default=""),
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 8000 * attempt,
        runtime=30,
    container:
        container_for("conveyor")
    shell:
        "{params.conveyor} spi correct {input.intensity:q} --weight {input.weight:q}"
        " --out {output.intensity:q} --out-mask {output.mask:q} {params.opts} {params.extra} > {log:q} 2>&1"


rule spi_phasing:
    input:
        intensity=f"{RESULTS}/spi/intensity/corrected.mrc",
        mask=f"{RESULTS}/spi/intensity/measured_mask.mrc",
    output:
        density=f"{RESULTS}/spi/phasing/density.mrc",
        prtf=f"{RESULTS}/spi/phasing/prtf.csv",
        resolution=f"{RESULTS}/spi/phasing/resolution.json",
        png=report(
            f"{RESULTS}/spi/phasing/slices.png",
            caption="../report/spi_phasing.rst",
            category="SPI",
            subcategory="reconstruction",
        ),
    log:
        f"{LOGS}/spi_phasing.log",
    benchmark:
        f"{BENCH}/spi_phasing.tsv"
    params:
        conveyor=conveyor_cmd,
        opts=lambda wc: (
            "--runs {runs} --iterations {iterations} --algorithm {algorithm}"
            " --seed {seed}".format(**config["spi"]["phasing"])
        ),
        diameter=lambda wc: 0.5 * (config["spi"]["size"]["dmin_nm"] + config["spi"]["size"]["dmax_nm"]),
        extra=lookup(dpath="spi/phasing/extra", within=config, default=""),
    threads: 2
    resources:
        mem_mb=lambda wc, attempt: 8000 * attempt,
        runtime=120,
    container:
        container_for("conveyor")
    shell:
        "{params.conveyor} spi phase {input.intensity:q} --mask {input.mask:q} --diameter-nm {params.diameter}"
        " {params.opts} --out-density {output.density:q} --out-prtf {output.prtf:q}"
        " --out-png {output.png:q} --out-resolution {output.resolution:q} {params.extra} > {log:q} 2>&1"
