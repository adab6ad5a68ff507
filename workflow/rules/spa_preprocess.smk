# SPA preprocessing of each movie: validation -> motion correction -> CTF -> picking ->
# extraction (bin spa.extract.bin, 4 by default); then one merge of all micrographs
# (micrographs_ctf.star, particles.star).
#
# With the native tools (and whenever every step runs in the same container image, see
# spa_one_job in common.smk) a movie is one job, spa_preprocess_movie: `conveyor spa
# preprocess` runs the steps' command lines one after the other in one process, each with
# its own log. Snakemake's cost is per job (building the DAG, scheduling, 0.1-0.2 s of CPU),
# so 10,000 movies are 10,000 jobs, not 50,000. When a peer tool brings its own image, each
# step is its own job in its image (rules spa_validate_movie in spa_import.smk, spa_motion,
# spa_ctf, spa_pick, spa_extract below). Both forms write the same files and logs and run
# the same command lines (spa_step_command).

if config.get("spa") and spa_one_job():

    rule spa_preprocess_movie:
        input:
            movie=spa_movie_input(),
            gain=spa_gain(),
        output:
            record=f"{RESULTS}/spa/movies/{{mic}}.json",
            dw=f"{RESULTS}/spa/motion/{{mic}}.mrc",
            nodw=f"{RESULTS}/spa/motion/{{mic}}_noDW.mrc",
            shifts=f"{RESULTS}/spa/motion/{{mic}}.star",
            plot=f"{RESULTS}/spa/motion/{{mic}}_drift.png",
            ctf=f"{RESULTS}/spa/ctf/{{mic}}.star",
            ctf_diag=f"{RESULTS}/spa/ctf/{{mic}}_diag.png",
            picks=f"{RESULTS}/spa/pick/{{mic}}.star",
            picks_png=f"{RESULTS}/spa/pick/{{mic}}.png",
            stack=f"{RESULTS}/spa/extract/bin{spa_first_bin()}/{{mic}}.mrcs",
            particles=f"{RESULTS}/spa/extract/bin{spa_first_bin()}/{{mic}}.star",
        log:
            validate=f"{LOGS}/spa_validate_movie/{{mic}}.log",
            motion=f"{LOGS}/spa_motion/{{mic}}.log",
            ctf=f"{LOGS}/spa_ctf/{{mic}}.log",
            pick=f"{LOGS}/spa_pick/{{mic}}.log",
            extract=f"{LOGS}/spa_extract/bin{spa_first_bin()}/{{mic}}.log",
        benchmark:
            f"{BENCH}/spa_preprocess_movie/{{mic}}.tsv"
        params:
            # motion and CTF on the job's GPU if it has one; picking and extraction on the
            # CPU, as in jobs of their own
            conveyor=conveyor_cmd,
            conveyor_cpu=spa_conveyor_cpu,
        threads: 2
        resources:
            mem_mb=lambda wc, attempt: 8000 * attempt,
            runtime=60,
        container:
            container_for("conveyor")
        shell:
            "conveyor spa preprocess"
            " ::: {log.validate:q} conveyor "
            + spa_step_command("validate", movie="{input.movie:q}", record="{output.record:q}")
            + " ::: {log.motion:q} {params.conveyor} "
            + spa_step_command(
                "motion", movie="{input.movie:q}", dw="{output.dw:q}", nodw="{output.nodw:q}",
                shifts="{output.shifts:q}", plot="{output.plot:q}",
            )
            + " ::: {log.ctf:q} {params.conveyor} "
            + spa_step_command(
                "ctf", nodw="{output.nodw:q}", dw="{output.dw:q}", star="{output.ctf:q}",
                diag="{output.ctf_diag:q}",
            )
            + " ::: {log.pick:q} {params.conveyor_cpu} "
            + spa_step_command("pick", dw="{output.dw:q}", star="{output.picks:q}", png="{output.picks_png:q}")
            + " ::: {log.extract:q} {params.conveyor_cpu} "
            + spa_step_command(
                "extract", dw="{output.dw:q}", coords="{output.picks:q}", ctf="{output.ctf:q}",
                bin=str(spa_first_bin()), stack="{output.stack:q}", star="{output.particles:q}",
            )

elif config.get("spa"):

    rule spa_motion:
        input:
            movie=spa_movie_input(),
            record=f"{RESULTS}/spa/movies/{{mic}}.json",
            gain=spa_gain(),
        output:
            dw=f"{RESULTS}/spa/motion/{{mic}}.mrc",
            nodw=f"{RESULTS}/spa/motion/{{mic}}_noDW.mrc",
            shifts=f"{RESULTS}/spa/motion/{{mic}}.star",
            plot=f"{RESULTS}/spa/motion/{{mic}}_drift.png",
        log:
            f"{LOGS}/spa_motion/{{mic}}.log",
        benchmark:
            f"{BENCH}/spa_motion/{{mic}}.tsv"
        params:
            conveyor=conveyor_cmd,
        threads: 2
        resources:
            mem_mb=lambda wc, attempt: 8000 * attempt,
            runtime=30,
        container:
            spa_tool_container("motion")
        shell:
            "{params.conveyor} "
            + spa_step_command(
                "motion", movie="{input.movie:q}", dw="{output.dw:q}", nodw="{output.nodw:q}",
                shifts="{output.shifts:q}", plot="{output.plot:q}",
            )
            + " > {log:q} 2>&1"

    rule spa_ctf:
        input:
            mic=f"{RESULTS}/spa/motion/{{mic}}_noDW.mrc",
        output:
            star=f"{RESULTS}/spa/ctf/{{mic}}.star",
            diag=f"{RESULTS}/spa/ctf/{{mic}}_diag.png",
        log:
            f"{LOGS}/spa_ctf/{{mic}}.log",
        benchmark:
            f"{BENCH}/spa_ctf/{{mic}}.tsv"
        params:
            conveyor=conveyor_cmd,
            name=f"{RESULTS}/spa/motion/{{mic}}.mrc",
        threads: 1
        resources:
            mem_mb=lambda wc, attempt: 4000 * attempt,
            runtime=15,
        container:
            spa_tool_container("ctf")
        shell:
            "{params.conveyor} "
            + spa_step_command(
                "ctf", nodw="{input.mic:q}", dw="{params.name:q}", star="{output.star:q}", diag="{output.diag:q}"
            )
            + " > {log:q} 2>&1"

    rule spa_pick:
        input:
            mic=f"{RESULTS}/spa/motion/{{mic}}.mrc",
        output:
            star=f"{RESULTS}/spa/pick/{{mic}}.star",
            png=f"{RESULTS}/spa/pick/{{mic}}.png",
        log:
            f"{LOGS}/spa_pick/{{mic}}.log",
        benchmark:
            f"{BENCH}/spa_pick/{{mic}}.tsv"
        params:
            conveyor=conveyor_cmd,
        threads: 1
        resources:
            mem_mb=lambda wc, attempt: 4000 * attempt,
            runtime=15,
        container:
            spa_tool_container("pick")
        shell:
            "{params.conveyor} "
            + spa_step_command("pick", dw="{input.mic:q}", star="{output.star:q}", png="{output.png:q}")
            + " > {log:q} 2>&1"

    rule spa_extract:
        input:
            mic=f"{RESULTS}/spa/motion/{{mic}}.mrc",
            coords=f"{RESULTS}/spa/pick/{{mic}}.star",
            ctf=f"{RESULTS}/spa/ctf/{{mic}}.star",
        output:
            stack=f"{RESULTS}/spa/extract/bin{{bin}}/{{mic}}.mrcs",
            star=f"{RESULTS}/spa/extract/bin{{bin}}/{{mic}}.star",
        log:
            f"{LOGS}/spa_extract/bin{{bin}}/{{mic}}.log",
        benchmark:
            f"{BENCH}/spa_extract/bin{{bin}}/{{mic}}.tsv"
        params:
            conveyor=conveyor_cmd,
        threads: 1
        resources:
            mem_mb=lambda wc, attempt: 4000 * attempt,
            runtime=15,
        container:
            spa_tool_container("extract")
        shell:
            "{params.conveyor} "
            + spa_step_command(
                "extract", dw="{input.mic:q}", coords="{input.coords:q}", ctf="{input.ctf:q}",
                bin="{wildcards.bin}", stack="{output.stack:q}", star="{output.star:q}",
            )
            + " > {log:q} 2>&1"


rule spa_merge:
    input:
        ctf=lambda wc: expand(f"{RESULTS}/spa/ctf/{{mic}}.star", mic=spa_movies()),
        motion=lambda wc: expand(f"{RESULTS}/spa/motion/{{mic}}.star", mic=spa_movies()),
        particles=lambda wc: expand(
            f"{RESULTS}/spa/extract/bin{{bin}}/{{mic}}.star", mic=spa_movies(), bin=spa_first_bin()
        ),
    output:
        micrographs=f"{RESULTS}/spa/micrographs_ctf.star",
        particles=f"{RESULTS}/spa/particles_bin{spa_first_bin()}.star",
        summary=f"{RESULTS}/spa/preprocess_summary.tsv",
    log:
        f"{LOGS}/spa_merge.log",
    params:
        conveyor=conveyor_cmd,
        thresholds=spa_merge_opts,
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 4000 * attempt,
        runtime=30,
    container:
        container_for("conveyor")
    run:
        lists = write_input_lists(input, ("ctf", "motion", "particles"), output.summary)
        shell(
            "{params.conveyor} spa merge --ctf @{lists[ctf]} --motion @{lists[motion]}"
            " --particles @{lists[particles]} {params.thresholds}"
            " --out-micrographs {output.micrographs:q} --out-particles {output.particles:q}"
            " --out-summary {output.summary:q} > {log:q} 2>&1"
        )
        for path in lists.values():
            path.unlink()
