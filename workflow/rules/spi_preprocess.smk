# SPI preprocessing, one branch per shot file: hits -> beam centre -> particle size; then
# the size filter over all files (one histogram, one summary).


rule spi_hits:
    input:
        cxi=spi_shot_file,
        record=f"{RESULTS}/spi/shots/{{run}}.json",
    output:
        table=f"{RESULTS}/spi/hits/{{run}}.h5",
    log:
        f"{LOGS}/spi_hits/{{run}}.log",
    benchmark:
        f"{BENCH}/spi_hits/{{run}}.tsv"
    params:
        conveyor=conveyor_cmd,
        threshold=lambda wc: config["spi"]["hits"]["threshold"],
        k_sigma=lambda wc: config["spi"]["hits"]["k_sigma"],
        extra=lookup(dpath="spi/hits/extra", within=config, default=""),
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 4000 * attempt,
        runtime=20,
    container:
        container_for("conveyor")
    shell:
        "{params.conveyor} spi hits {input.cxi:q} --threshold {params.threshold}"
        " --k-sigma {params.k_sigma} --out {output.table:q} {params.extra} > {log:q} 2>&1"


rule spi_center:
    input:
        cxi=spi_shot_file,
        table=f"{RESULTS}/spi/hits/{{run}}.h5",
    output:
        table=f"{RESULTS}/spi/center/{{run}}.h5",
    log:
        f"{LOGS}/spi_center/{{run}}.log",
    benchmark:
        f"{BENCH}/spi_center/{{run}}.tsv"
    params:
        conveyor=conveyor_cmd,
        per_frame=lambda wc: "--per-frame" if config["spi"]["center"]["per_frame"] else "",
        extra=lookup(dpath="spi/center/extra", within=config, default=""),
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 4000 * attempt,
        runtime=20,
    container:
        container_for("conveyor")
    shell:
        "{params.conveyor} spi center {input.cxi:q} --frames {input.table:q} {params.per_frame}"
        " --out {output.table:q} {params.extra} > {log:q} 2>&1"


rule spi_size:
    input:
        cxi=spi_shot_file,
        table=f"{RESULTS}/spi/center/{{run}}.h5",
    output:
        table=f"{RESULTS}/spi/size/{{run}}.h5",
    log:
        f"{LOGS}/spi_size/{{run}}.log",
    benchmark:
        f"{BENCH}/spi_size/{{run}}.tsv"
    params:
        conveyor=conveyor_cmd,
        search=lambda wc: "--dmin-nm {search_min_nm} --dmax-nm {search_max_nm}".format(**config["spi"]["size"]),
        extra=lookup(dpath="spi/size/extra", within=config, default=""),
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 4000 * attempt,
        runtime=30,
    container:
        container_for("conveyor")
    shell:
        "{params.conveyor} spi size {input.cxi:q} --frames {input.table:q} {params.search}"
        " --out {output.table:q} {params.extra} > {log:q} 2>&1"


rule spi_filter:
    input:
        tables=lambda wc: expand(f"{RESULTS}/spi/size/{{run}}.h5", run=spi_raw_runs()),
    output:
        frames=directory(f"{RESULTS}/spi/frames"),
        plot=report(
            f"{RESULTS}/spi/size_histogram.png",
            caption="../report/spi_size.rst",
            category="SPI",
            subcategory="preprocessing",
        ),
    log:
        f"{LOGS}/spi_filter.log",
    params:
        conveyor=conveyor_cmd,
        window=lambda wc: (
            "--dmin-nm {dmin_nm} --dmax-nm {dmax_nm} --min-score {min_score}"
            " --max-multi {max_multi}".format(**config["spi"]["size"])
        ),
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 4000 * attempt,
        runtime=20,
    container:
        container_for("conveyor")
    shell:
        "{params.conveyor} spi filter --frames {input.tables:q} --out-dir {output.frames:q}"
        " {params.window} --out-plot {output.plot:q} > {log:q} 2>&1"
