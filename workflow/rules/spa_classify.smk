# SPA 2D classification of the bin-4 particles (a checkpoint), then class selection:
# auto (trained selector in resources/), or manual from the file the user writes (the run
# pauses until it exists).


checkpoint spa_class2d:
    input:
        particles=f"{RESULTS}/spa/particles_bin{spa_first_bin()}.star",
    output:
        averages=f"{RESULTS}/spa/class2d/round1/class_averages.mrcs",
        model=f"{RESULTS}/spa/class2d/round1/model.star",
        particles=f"{RESULTS}/spa/class2d/round1/particles.star",
        log_csv=f"{RESULTS}/spa/class2d/round1/log.csv",
        gallery=report(
            f"{RESULTS}/spa/class2d/round1/gallery.png",
            caption="../report/spa_gallery.rst",
            category="SPA",
            subcategory="classification",
        ),
    log:
        f"{LOGS}/spa_class2d_round1.log",
    benchmark:
        f"{BENCH}/spa_class2d_round1.tsv"
    params:
        conveyor=conveyor_cmd,
        outdir=f"{RESULTS}/spa/class2d/round1",
        opts=lambda wc: (
            "--classes {classes} --iterations {iterations} --seed {seed}".format(**config["spa"]["class2d"])
            + f" --particle-diameter {config['spa']['particle_diameter']}"
        ),
        extra=lookup(dpath="spa/class2d/extra", within=config, default=""),
    threads: 2
    resources:
        mem_mb=lambda wc, attempt: 16000 * attempt,
        runtime=240,
    container:
        container_for("conveyor")
    shell:
        "{params.conveyor} spa class2d --particles {input.particles:q} --out-dir {params.outdir:q}"
        " {params.opts} {params.extra} > {log:q} 2>&1"


rule spa_select:
    input:
        model=f"{RESULTS}/spa/class2d/round1/model.star",
        selection=spa_manual_selection_input,
    output:
        particles=f"{RESULTS}/spa/select/round1_particles.star",
        scores=f"{RESULTS}/spa/select/round1_scores.csv",
        gallery=f"{RESULTS}/spa/select/round1_gallery.png",
    log:
        f"{LOGS}/spa_select_round1.log",
    params:
        conveyor=conveyor_cmd,
        classdir=f"{RESULTS}/spa/class2d/round1",
        mode=lambda wc: config["spa"]["selection"],
        selection=lambda wc, input: (
            f"--selection '{input.selection}'" if config["spa"]["selection"] == "manual"
            else f"--out-yaml '{RESULTS}/spa/select/round1_auto.yaml'"
        ),
    threads: 1
    container:
        container_for("conveyor")
    shell:
        "{params.conveyor} spa select --class-dir {params.classdir:q} --mode {params.mode} {params.selection}"
        " --out-particles {output.particles:q} --out-scores {output.scores:q}"
        " --out-gallery {output.gallery:q} > {log:q} 2>&1"
