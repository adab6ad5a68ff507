# Demo and test data with known ground truth (config section `simulate:`).


checkpoint simulate_spa:
    output:
        directory(SIM["spa"]["out"] if SIM.get("spa") else "data/demo/spa"),
    log:
        f"{LOGS}/simulate_spa.log",
    params:
        p=dict(sorted((SIM.get("spa") or {}).items())),  # sorted: key order in the config never re-runs it
    threads: 1
    container:
        container_for("conveyor")
    shell:
        "conveyor simulate spa --out {output:q}"
        " --micrographs {params.p[micrographs]} --size {params.p[size]}"
        " --frames {params.p[frames]} --pixel-size {params.p[pixel_size]}"
        " --dose-per-frame {params.p[dose_per_frame]} --particles {params.p[particles]}"
        " --particle-diameter {params.p[particle_diameter]} --symmetry {params.p[symmetry]}"
        " --junk-fraction {params.p[junk_fraction]} --seed {params.p[seed]}"
        " > {log:q} 2>&1"


checkpoint simulate_spi:
    output:
        directory(SIM["spi"]["out"] if SIM.get("spi") else "data/demo/spi"),
    log:
        f"{LOGS}/simulate_spi.log",
    params:
        p=dict(sorted((SIM.get("spi") or {}).items())),
    threads: 1
    container:
        container_for("conveyor")
    shell:
        "conveyor simulate spi --out {output:q}"
        " --files {params.p[files]} --frames-per-file {params.p[frames_per_file]}"
        " --detector {params.p[detector]} --diameter-nm {params.p[diameter_nm]}"
        " --hit-fraction {params.p[hit_fraction]} --seed {params.p[seed]}"
        " > {log:q} 2>&1"
