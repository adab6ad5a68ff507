# SPA 2D classification in rounds (config spa.class2d): round 1 on the bin-4 particles of
# the preprocessing merge; round 2 on the particles of the classes selected in round 1,
# re-extracted at bin 2 and re-centred. Each classification is a checkpoint followed by
# the class selection: auto (trained selector in resources/), or manual from the file the
# user writes (the run pauses until it exists).


checkpoint spa_class2d:
    input:
        particles=spa_class2d_input,
    output:
        averages=f"{RESULTS}/spa/class2d/round{{round}}/class_averages.mrcs",
        model=f"{RESULTS}/spa/class2d/round{{round}}/model.star",
        particles=f"{RESULTS}/spa/class2d/round{{round}}/particles.star",
        log_csv=f"{RESULTS}/spa/class2d/round{{round}}/log.csv",
        gallery=report(
            f"{RESULTS}/spa/class2d/round{{round}}/gallery.png",
            caption="../report/spa_gallery.rst",
            category="SPA",
            subcategory="classification",
        ),
    log:
        f"{LOGS}/spa_class2d/round{{round}}.log",
    benchmark:
        f"{BENCH}/spa_class2d/round{{round}}.tsv"
    params:
        conveyor=conveyor_cmd,
        tool=spa_tool("class2d"),
        outdir=f"{RESULTS}/spa/class2d/round{{round}}",
        opts=spa_class2d_opts,
    threads: 2
    resources:
        mem_mb=lambda wc, attempt: 16000 * attempt,
        runtime=240,
    container:
        spa_tool_container("class2d")
    shell:
        "{params.conveyor} {params.tool} --particles {input.particles:q} --out-dir {params.outdir:q}"
        " {params.opts} > {log:q} 2>&1"


rule spa_select:
    input:
        model=f"{RESULTS}/spa/class2d/round{{round}}/model.star",
        selection=spa_manual_selection_input,
    output:
        particles=f"{RESULTS}/spa/select/round{{round}}_particles.star",
        scores=f"{RESULTS}/spa/select/round{{round}}_scores.csv",
        gallery=f"{RESULTS}/spa/select/round{{round}}_gallery.png",
    log:
        f"{LOGS}/spa_select/round{{round}}.log",
    params:
        conveyor=conveyor_cmd,
        classdir=f"{RESULTS}/spa/class2d/round{{round}}",
        mode=lambda wc: config["spa"]["selection"],
        selection=spa_selection_opts,
    threads: 1
    container:
        container_for("conveyor")
    shell:
        "{params.conveyor} spa select --class-dir {params.classdir:q} --mode {params.mode} {params.selection}"
        " --out-particles {output.particles:q} --out-scores {output.scores:q}"
        " --out-gallery {output.gallery:q} > {log:q} 2>&1"


rule spa_reextract:
    # one micrograph's selected particles, re-centred by their 2D (or 3D) origins; a
    # micrograph with none gets an empty table
    input:
        mic=f"{RESULTS}/spa/motion/{{mic}}.mrc",
        ctf=f"{RESULTS}/spa/ctf/{{mic}}.star",
        particles=f"{RESULTS}/spa/select/round{{round}}_particles.star",
    output:
        stack=f"{RESULTS}/spa/reextract/round{{round}}_bin{{bin}}/{{mic}}.mrcs",
        star=f"{RESULTS}/spa/reextract/round{{round}}_bin{{bin}}/{{mic}}.star",
    log:
        f"{LOGS}/spa_reextract/round{{round}}_bin{{bin}}/{{mic}}.log",
    params:
        conveyor=conveyor_cmd,
        opts=spa_extract_opts,
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 4000 * attempt,
        runtime=15,
    container:
        container_for("conveyor")
    shell:
        "{params.conveyor} spa extract {input.mic:q} --coords {input.particles:q} --reextract --ctf {input.ctf:q}"
        " --bin {wildcards.bin} {params.opts}"
        " --out-stack {output.stack:q} --out-star {output.star:q} > {log:q} 2>&1"


rule spa_reextract_merge:
    input:
        ctf=lambda wc: expand(f"{RESULTS}/spa/ctf/{{mic}}.star", mic=spa_movies()),
        particles=lambda wc: expand(
            f"{RESULTS}/spa/reextract/round{wc.round}_bin{wc.bin}/{{mic}}.star", mic=spa_movies()
        ),
    output:
        particles=f"{RESULTS}/spa/reextract/round{{round}}_bin{{bin}}.star",
        micrographs=f"{RESULTS}/spa/reextract/round{{round}}_bin{{bin}}_micrographs.star",
        summary=f"{RESULTS}/spa/reextract/round{{round}}_bin{{bin}}_summary.tsv",
    log:
        f"{LOGS}/spa_reextract_merge/round{{round}}_bin{{bin}}.log",
    params:
        conveyor=conveyor_cmd,
    threads: 1
    container:
        container_for("conveyor")
    run:
        lists = write_input_lists(input, ("ctf", "particles"), output.summary)
        shell(
            "{params.conveyor} spa merge --ctf @{lists[ctf]} --particles @{lists[particles]}"
            " --out-micrographs {output.micrographs:q} --out-particles {output.particles:q}"
            " --out-summary {output.summary:q} > {log:q} 2>&1"
        )
        for path in lists.values():
            path.unlink()
