# SPA 3D: ab initio model from the last selected 2D classes, gold-standard refinement of
# the same particles re-extracted at spa.refine3d.bin (full size by default), then
# post-processing (mask, corrected FSC, B-factor, sharpened map; FSC against a known map
# when there is one, e.g. the simulator's truth).


rule spa_initial_model:
    input:
        particles=lambda wc: f"{RESULTS}/spa/select/round{spa_last_round()}_particles.star",
    output:
        map=f"{RESULTS}/spa/initial_model/initial_model.mrc",
    log:
        f"{LOGS}/spa_initial_model.log",
    benchmark:
        f"{BENCH}/spa_initial_model.tsv"
    params:
        conveyor=conveyor_cmd,
        tool=spa_tool("initial_model"),
        opts=spa_initial_model_opts,
    threads: 2
    resources:
        mem_mb=lambda wc, attempt: 16000 * attempt,
        runtime=240,
    container:
        spa_tool_container("initial_model")
    shell:
        "{params.conveyor} {params.tool} --particles {input.particles:q} --out {output.map:q}"
        " {params.opts} > {log:q} 2>&1"


rule spa_refine3d:
    input:
        particles=spa_refine_particles,
        reference=f"{RESULTS}/spa/initial_model/initial_model.mrc",
    output:
        map=f"{RESULTS}/spa/refine3d/map.mrc",
        half1=f"{RESULTS}/spa/refine3d/half1.mrc",
        half2=f"{RESULTS}/spa/refine3d/half2.mrc",
        fsc=f"{RESULTS}/spa/refine3d/fsc.star",
        plot=report(
            f"{RESULTS}/spa/refine3d/fsc.png",
            caption="../report/spa_fsc.rst",
            category="SPA",
            subcategory="3D",
        ),
        summary=f"{RESULTS}/spa/refine3d/run.json",
        particles=f"{RESULTS}/spa/refine3d/particles.star",
    log:
        f"{LOGS}/spa_refine3d.log",
    benchmark:
        f"{BENCH}/spa_refine3d.tsv"
    params:
        conveyor=conveyor_cmd,
        tool=spa_tool("refine3d"),
        outdir=f"{RESULTS}/spa/refine3d",
        opts=spa_refine3d_opts,
    threads: 2
    resources:
        mem_mb=lambda wc, attempt: 32000 * attempt,
        runtime=1440,
    container:
        spa_tool_container("refine3d")
    shell:
        # --auto-continue: an interrupted run of the same inputs continues from its last
        # finished iteration; anything else starts afresh
        "{params.conveyor} {params.tool} --particles {input.particles:q} --reference {input.reference:q}"
        " --out-dir {params.outdir:q} --auto-continue {params.opts} > {log:q} 2>&1"


rule spa_postprocess:
    input:
        half1=f"{RESULTS}/spa/refine3d/half1.mrc",
        half2=f"{RESULTS}/spa/refine3d/half2.mrc",
        reference=spa_reference_map(),
    output:
        map=f"{RESULTS}/spa/postprocess/postprocess.mrc",
        masked=f"{RESULTS}/spa/postprocess/postprocess_masked.mrc",
        star=f"{RESULTS}/spa/postprocess/postprocess.star",
        fsc=report(
            f"{RESULTS}/spa/postprocess/fsc.png",
            caption="../report/spa_fsc.rst",
            category="SPA",
            subcategory="3D",
        ),
        slices=report(
            f"{RESULTS}/spa/postprocess/slices.png",
            caption="../report/spa_slices.rst",
            category="SPA",
            subcategory="3D",
        ),
        summary=f"{RESULTS}/spa/postprocess/postprocess.json",
    log:
        f"{LOGS}/spa_postprocess.log",
    params:
        conveyor=conveyor_cmd,
        tool=spa_tool("postprocess"),
        outdir=f"{RESULTS}/spa/postprocess",
        opts=spa_postprocess_opts,
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 8000 * attempt,
        runtime=30,
    container:
        spa_tool_container("postprocess")
    shell:
        "{params.conveyor} {params.tool} --half1 {input.half1:q} --half2 {input.half2:q}"
        " --out-dir {params.outdir:q} {params.opts} > {log:q} 2>&1"
