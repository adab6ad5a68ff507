# Conveyor: the two commands of the README, and a few helpers.
#   make demo      install, simulate the demo data sets, run the whole pipeline
#   make test      install (Python packages and, as root, SLURM), run the whole test suite
#   make profiles  install the SLURM/local profiles so `snakemake --profile mesocentre` works

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CORES ?= all
CONFIG ?= config/config.yaml
PYTEST_ARGS ?=
STAMP := $(VENV)/.installed

.PHONY: install system-deps peers test demo profiles dag rulegraph report lint clean distclean help

help:
	@echo "make demo | make test | make profiles | make dag | make report | make lint | make clean"

install: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is needed (found " + sys.version.split()[0] + "); set PYTHON=python3.11")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[workflow,test]'
	touch $(STAMP)

# Debian packages the tests use (SLURM for the scheduler tier, graphviz for the DAG).
# Installed only when running as root with apt-get; otherwise those tests are skipped
# with a printed reason.
system-deps:
	@bash scripts/system-deps.sh

# The seeds' own SPI tools (spi_processing, spi_em_class, Dragonfly), peers of the
# native SPI steps; skipped with a message where they cannot be installed.
peers: install
	@bash scripts/install-spi-peers.sh $(VENV)

test: install system-deps peers
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest $(PYTEST_ARGS)

demo: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/snakemake --cores $(CORES) --configfile $(CONFIG) --rerun-incomplete
	@echo "demo finished: results in results/demo/ (see docs/outputs.md)"

profiles:
	bash profiles/install.sh

dag: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/snakemake --configfile $(CONFIG) --dag | dot -Tsvg > dag.svg
	@echo "wrote dag.svg"

rulegraph: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/snakemake --configfile $(CONFIG) --rulegraph | dot -Tsvg > rulegraph.svg
	@echo "wrote rulegraph.svg"

report: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/snakemake --configfile $(CONFIG) --report report.zip

lint: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/snakemake --configfile $(CONFIG) --lint

clean:
	rm -rf results logs benchmarks .snakemake data/demo dag.svg rulegraph.svg report.zip

distclean: clean
	rm -rf $(VENV) *.egg-info
