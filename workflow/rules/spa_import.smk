# SPA input: validate every raw movie (one job per movie), then list them in movies.star.


rule spa_validate_movie:
    input:
        movie=lambda wc: spa_movies()[wc.mic],
    output:
        record=f"{RESULTS}/spa/movies/{{mic}}.json",
    log:
        f"{LOGS}/spa_validate_movie/{{mic}}.log",
    params:
        frames=lambda wc: f"--frames {config['spa']['frames']}" if config["spa"]["frames"] else "",
        pixel_size=config["spa"]["pixel_size"] if config.get("spa") else 0,
    threads: 1
    resources:
        mem_mb=lambda wc, attempt: 2000 * attempt,
        runtime=10,
    container:
        container_for("conveyor")
    shell:
        "conveyor io validate-movie {input.movie:q} {params.frames}"
        " --pixel-size {params.pixel_size} --out {output.record:q} > {log:q} 2>&1"


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
