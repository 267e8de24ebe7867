# Two commands for a fresh machine:  make decode  |  make test
# Both create a local virtualenv (.venv) on first use and install mindvis into it.
#
# torch: the default pins the CPU build used for development and CI. GPU users
# pick their CUDA build, e.g.
#   make decode TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126"
# or create .venv themselves with a CUDA torch already in it (TORCH_SPEC= skips it).

PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
CORES      ?= 8
CONFIG     ?= configs/default.yaml
PYTEST_ARGS ?=

BIN   := $(VENV)/bin
STAMP := $(VENV)/.mindvis-installed

.PHONY: decode test lint bench clean-results

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(if $(strip $(TORCH_SPEC)),$(BIN)/python -m pip install --quiet $(TORCH_SPEC))
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

decode: $(STAMP)
	$(BIN)/snakemake decode --cores $(CORES) --configfile $(CONFIG)
	@$(BIN)/mindvis where --config $(CONFIG)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/snakemake --lint --configfile $(CONFIG)

clean-results:
	rm -rf results logs
