# SPI input: import CXIDB-style HDF5 if configured, validate every CXI file (one job per
# file), then list them in shots.csv.


rule spi_import_cxidb:
    input:
        raw=lambda wc: spi_raw_runs()[wc.run],
    output:
        cxi=f"{RESULTS}/spi/cxi/{{run}}.cxi",
    log:
        f"{LOGS}/spi_import_cxidb/{{run}}.log",
    params:
        geometry=lambda wc: " ".join(
            f"--{flag} {config['spi'][key]}"
            for flag, key in [
                ("photon-energy-ev", "photon_energy_ev"),
                ("distance-m", "detector_distance_m"),
                ("pixel-size-m", "pixel_size_m"),
            ]
            if config["spi"].get(key) is not None
        ),
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 4000 * attempt,
        runtime=30,
    container:
        container_for("conveyor")
    shell:
        "conveyor io import-cxidb {input.raw:q} --out {output.cxi:q} {params.geometry} > {log:q} 2>&1"


rule spi_validate_shots:
    input:
        cxi=spi_shot_file,
    output:
        record=f"{RESULTS}/spi/shots/{{run}}.json",
    log:
        f"{LOGS}/spi_validate_shots/{{run}}.log",
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 2000 * attempt,
        runtime=10,
    container:
        container_for("conveyor")
    shell:
        "conveyor spi validate-shots {input.cxi:q} --out {output.record:q} > {log:q} 2>&1"


rule spi_shots_table:
    input:
        records=spi_validated,
    output:
        table=f"{RESULTS}/spi/shots.csv",
    log:
        f"{LOGS}/spi_shots_table.log",
    threads: 1
    container:
        container_for("conveyor")
    shell:
        "conveyor spi shots-table {input.records:q} --out {output.table:q} > {log:q} 2>&1"
