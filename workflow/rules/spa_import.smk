# SPA input: validate every raw movie (one job per movie), then list them in movies.star.


# (With the native tools the validation is the first step of the per-movie job
# spa_preprocess_movie, in spa_preprocess.smk; this rule exists when the steps are separate
# jobs, see spa_one_job in common.smk.)
if config.get("spa") and not spa_one_job():

    rule spa_validate_movie:
        input:
            movie=spa_movie_input(),
        output:
            record=f"{RESULTS}/spa/movies/{{mic}}.json",
        log:
            f"{LOGS}/spa_validate_movie/{{mic}}.log",
        threads: 1
        resources:
            mem_mb=lambda wc, attempt: 2000 * attempt,
            runtime=10,
        container:
            container_for("conveyor")
        shell:
            "conveyor "
            + spa_step_command("validate", movie="{input.movie:q}", record="{output.record:q}")
            + " > {log:q} 2>&1"


rule spa_movies_star:
    input:
        records=spa_validated,
    output:
        star=f"{RESULTS}/spa/movies.star",
        listing=temp(f"{RESULTS}/spa/movies.list"),
    log:
        f"{LOGS}/spa_movies_star.log",
    params:
        optics=lambda wc: (
            "--pixel-size {pixel_size} --voltage {voltage} --cs {cs}"
            " --amplitude-contrast {amplitude_contrast}".format(**config["spa"])
        ),
    threads: 1
    container:
        container_for("conveyor")
    run:
        Path(output.listing).write_text("\n".join(input.records) + "\n")
        shell(
            "conveyor spa movies-star --list {output.listing:q} {params.optics}"
            " --out {output.star:q} > {log:q} 2>&1"
        )
