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
# One job per core: more jobs than cores only slow the critical path (pretrain_ldm) down.
CORES      ?= $(shell nproc 2>/dev/null || echo 2)
CONFIG     ?= configs/default.yaml
PYTEST_ARGS ?=

BIN        := $(VENV)/bin
# `make decode` installs what decoding needs; `make test` adds the test extra (pytest, import-linter,
# notebook runner, headless-browser driver, bdpy, scikit-image).
STAMP      := $(VENV)/.mindvis-installed
TEST_STAMP := $(VENV)/.mindvis-test-installed

.PHONY: decode test lint bench clean-results browser slurm prior fashion-mnist sc-mbm sc-mbm-corpus learning-curve decoder-seeds

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(if $(strip $(TORCH_SPEC)),$(BIN)/python -m pip install --quiet $(TORCH_SPEC))
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(TEST_STAMP): $(STAMP) pyproject.toml
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

decode: $(STAMP)
	$(BIN)/snakemake decode --cores $(CORES) --configfile $(CONFIG)
	@$(BIN)/mindvis where --config $(CONFIG)
	@$(BIN)/mindvis summary --config $(CONFIG) --csv results/summary.csv

# The layer contract first (pyproject.toml, [tool.importlinter]): a stage importing a later one fails here.
# The suite runs in TEST_WORKERS processes (pytest-xdist), one test file per process at a time (--dist loadfile:
# a file's module fixtures, such as the workflow test's finished run, are built once); TEST_WORKERS=0 runs it in one.
TEST_WORKERS ?= $(CORES)
test: $(TEST_STAMP)
	$(BIN)/lint-imports
	$(BIN)/python -m pytest $(if $(filter-out 0 1,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile) $(PYTEST_ARGS)

# Debian's chromium for the headless-browser report test (tests/test_report.py; Playwright drives it
# through executable_path, so `playwright install` is never needed). Needs root or sudo.
browser:
	test -x /usr/bin/chromium || { $(if $(filter 0,$(shell id -u)),,sudo) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(if $(filter 0,$(shell id -u)),,sudo) apt-get install -y -qq chromium; }

# Debian's SLURM (slurmctld, slurmd, slurm-client, munge) for the SLURM-executor test (tests/test_workflow.py): the
# test starts a one-node cluster with workflow/profiles/slurm-ci/local-slurm.sh and stops it after. Needs root or sudo.
slurm:
	workflow/profiles/slurm-ci/local-slurm.sh install

# Retrain the shipped prior and classifier (mindvis/models/assets/, about two hours on 2 cores) from
# Debian's dataset-fashion-mnist: the 60,000 training-file images train them, the 10,000 test-file
# images only measure them (benchmarks/results/prior.json). Commit the new assets with their provenance.
PRIOR_CONFIG ?= configs/prior-fashion-mnist.yaml
PRIOR_DIR    ?= results/prior-training
prior: $(STAMP)
	$(BIN)/mindvis stimuli --config $(PRIOR_CONFIG) --out $(PRIOR_DIR)/stimuli.h5
	$(BIN)/mindvis train-classifier --config $(PRIOR_CONFIG) --stimuli $(PRIOR_DIR)/stimuli.h5 \
		--out-dir $(PRIOR_DIR)/classifier --threads 1
	$(BIN)/mindvis pretrain-ldm --config $(PRIOR_CONFIG) --stimuli $(PRIOR_DIR)/stimuli.h5 \
		--out-dir $(PRIOR_DIR)/ldm --threads 1
	$(BIN)/python benchmarks/prior_quality.py --config $(PRIOR_CONFIG) --stimuli $(PRIOR_DIR)/stimuli.h5 \
		--prior $(PRIOR_DIR)/ldm --classifier $(PRIOR_DIR)/classifier --out benchmarks/results/prior.json --n 2000
	$(BIN)/mindvis bundle --config $(PRIOR_CONFIG) --kind classifier --source $(PRIOR_DIR)/classifier \
		--stimuli $(PRIOR_DIR)/stimuli.h5 --quality benchmarks/results/prior.json --command "make prior"
	$(BIN)/mindvis bundle --config $(PRIOR_CONFIG) --kind prior --source $(PRIOR_DIR)/ldm \
		--stimuli $(PRIOR_DIR)/stimuli.h5 --quality benchmarks/results/prior.json --command "make prior"

# Retrain the shipped SC-MBM encoder (mindvis/models/assets/sc-mbm-sim/, about 50 minutes at 1 thread): simulate
# and preprocess the resting-state corpus of configs/sc-mbm-corpus.yaml (40 subjects x 2 runs x 700 volumes in the
# group-template voxel space), pretrain SC-MBM once on it, and bundle it with its provenance. `make sc-mbm-corpus`
# stops after the corpus. Commit the new assets with their PROVENANCE.json.
SCMBM_CONFIG ?= configs/sc-mbm-corpus.yaml
SCMBM_DIR    ?= results/sc-mbm
SCMBM_NICE   ?= nice -n 10
SCMBM_REST    = $$($(BIN)/python -c 'import sys; from mindvis.config import load_config, rest_subjects; \
	print(*(f"$(SCMBM_DIR)/rest/{s}.h5" for s in rest_subjects(load_config(sys.argv[1]))))' $(SCMBM_CONFIG))
sc-mbm-corpus: $(STAMP)
	$(BIN)/mindvis bids-metadata --config $(SCMBM_CONFIG) --bids-dir $(SCMBM_DIR)/bids
	for rest in $(SCMBM_REST); do subject=$$(basename $$rest .h5); \
		test $$rest -nt $(SCMBM_CONFIG) && continue; \
		$(SCMBM_NICE) $(BIN)/mindvis simulate-rest --config $(SCMBM_CONFIG) --bids-dir $(SCMBM_DIR)/bids \
			--subject $$subject --threads 1 && \
		$(SCMBM_NICE) $(BIN)/mindvis preprocess-rest --config $(SCMBM_CONFIG) --bids-dir $(SCMBM_DIR)/bids \
			--subject $$subject --out $$rest --threads 1 || exit 1; \
	done
sc-mbm: sc-mbm-corpus
	$(SCMBM_NICE) $(BIN)/mindvis pretrain-mbm --config $(SCMBM_CONFIG) --rest $(SCMBM_REST) \
		--out-dir $(SCMBM_DIR)/mbm --threads 1
	$(BIN)/mindvis bundle --config $(SCMBM_CONFIG) --kind sc-mbm --source $(SCMBM_DIR)/mbm --command "make sc-mbm" \
		--command "mindvis pretrain-mbm --config $(SCMBM_CONFIG) --rest <rest files> --out-dir $(SCMBM_DIR)/mbm"

# Debian's full Fashion-MNIST (30 MB, Expat): the corpus of `make prior` (configs/prior-fashion-mnist.yaml names
# it). The default reads the committed subset (mindvis/data/assets/fashion-mnist/) whether or not it is installed.
fashion-mnist:
	test -d /usr/share/datasets/fashion-mnist || { $(if $(filter 0,$(shell id -u)),,sudo) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(if $(filter 0,$(shell id -u)),,sudo) apt-get install -y -qq dataset-fashion-mnist; }

lint: $(TEST_STAMP)
	$(BIN)/lint-imports
	$(BIN)/snakemake --lint --configfile $(CONFIG)

clean-results:
	rm -rf results logs

# The decoder arms across training seeds (benchmarks/results/decoder_seeds.md; after `make decode`, about 1 h 15 min
# of one core for 3 subjects x 3 arms x 3 seeds) and the learning curve of SC-MBM pretraining against a random
# encoder and no encoder (benchmarks/results/learning_curve_seeds.md; sub-01, 10-50 % of the training trials).
decoder-seeds: $(STAMP)
	$(BIN)/python benchmarks/decoder_seeds.py --results results --config $(CONFIG)
learning-curve: $(STAMP)
	$(BIN)/python benchmarks/decoder_seeds.py --results results --config $(CONFIG) --subjects sub-01 \
		--fractions 0.1 0.25 0.5 1.0 --out benchmarks/results/learning_curve_seeds
