# Conveyor: single-particle cryo-EM (SPA) and XFEL (SPI) pipelines, from raw data to 3D.
#
#   snakemake --configfile config/myexp.yaml -n                 # what would run
#   snakemake --configfile config/myexp.yaml --profile mesocentre
#
# The experiment config is validated against workflow/schemas/config.schema.yaml before
# any job runs; see config/README.md for every key.

from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/simulate.smk"
include: "workflow/rules/spa_import.smk"
include: "workflow/rules/spa_preprocess.smk"
include: "workflow/rules/spa_classify.smk"
include: "workflow/rules/spa_reconstruct.smk"
include: "workflow/rules/spi_import.smk"
include: "workflow/rules/spi_preprocess.smk"
include: "workflow/rules/spi_classify.smk"
include: "workflow/rules/spi_reconstruct.smk"


rule all:
    default_target: True
    input:
        # separate input functions, so a pending checkpoint of one pipeline does not hide
        # the jobs of the other from a dry run
        spa=spa_targets,
        spa_selected=spa_selected_targets,
        spi=spi_targets,
        spi_selected=spi_selected_targets,


rule spa:
    input:
        spa_targets,
        spa_selected_targets,


rule spi:
    input:
        spi_targets,
        spi_selected_targets,


onsuccess:
    report_results()
    report_pauses()
