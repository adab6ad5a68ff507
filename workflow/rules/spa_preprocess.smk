# SPA preprocessing, one branch per movie: motion correction -> CTF -> picking -> extraction
# (bin 4); then one merge of all micrographs (micrographs_ctf.star, particles.star).


rule spa_motion:
    input:
        movie=lambda wc: spa_movies()[wc.mic],
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
        tool=spa_tool("motion"),
        opts=spa_motion_opts,
        extra=lookup(dpath="spa/motion/extra", within=config, default=""),
    threads: 2
    resources:
        mem_mb=lambda wc, attempt: 8000 * attempt,
        runtime=30,
    container:
        spa_tool_container("motion")
    shell:
        "{params.conveyor} {params.tool} {input.movie:q} {params.opts}"
        " --out-sum {output.dw:q} --out-sum-nodw {output.nodw:q}"
        " --out-shifts {output.shifts:q} --out-plot {output.plot:q} {params.extra}"
        " > {log:q} 2>&1"


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
        tool=spa_tool("ctf"),
        opts=spa_ctf_opts,
        name=f"{RESULTS}/spa/motion/{{mic}}.mrc",
        extra=lookup(dpath="spa/ctf/extra", within=config, default=""),
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 4000 * attempt,
        runtime=15,
    container:
        spa_tool_container("ctf")
    shell:
        "{params.conveyor} {params.tool} {input.mic:q} {params.opts} --micrograph-name {params.name:q}"
        " --out-star {output.star:q} --out-diag {output.diag:q} {params.extra} > {log:q} 2>&1"


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
        tool=spa_tool("pick"),
        opts=spa_pick_opts,
        extra=lookup(dpath="spa/pick/extra", within=config, default=""),
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 4000 * attempt,
        runtime=15,
    container:
        spa_tool_container("pick")
    shell:
        "{params.conveyor} {params.tool} {input.mic:q} {params.opts}"
        " --out-star {output.star:q} --out-png {output.png:q} {params.extra} > {log:q} 2>&1"


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
        tool=spa_tool("extract"),
        opts=spa_extract_opts,
        extra=lookup(dpath="spa/extract/extra", within=config, default=""),
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 4000 * attempt,
        runtime=15,
    container:
        spa_tool_container("extract")
    shell:
        "{params.conveyor} {params.tool} {input.mic:q} --coords {input.coords:q} --ctf {input.ctf:q}"
        " --bin {wildcards.bin} {params.opts}"
        " --out-stack {output.stack:q} --out-star {output.star:q} {params.extra} > {log:q} 2>&1"


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
        lists = {}
        for key in ("ctf", "motion", "particles"):
            lists[key] = Path(output.summary).with_name(f".merge_{key}.list")
            lists[key].write_text("\n".join(input[key]) + "\n")
        shell(
            "{params.conveyor} spa merge --ctf @{lists[ctf]} --motion @{lists[motion]}"
            " --particles @{lists[particles]} {params.thresholds}"
            " --out-micrographs {output.micrographs:q} --out-particles {output.particles:q}"
            " --out-summary {output.summary:q} > {log:q} 2>&1"
        )
        for path in lists.values():
            path.unlink()
