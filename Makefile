# openclip-align: the commands a newcomer runs (see README.md)
PYTHON ?= python
DATA ?= data/default
SMALL_DATA ?= data/small
BENCH_OUT ?= runs/benchmark
STUDY_OUT ?= runs/study
STUDY_TEMPERATURE_OUT ?= runs/study-temperature
STUDY_SCALING_OUT ?= runs/study-scaling
PUBLISH_FLAGS ?=     # e.g. --corpus data/default --redraw-pca data/default for a run an older version made

.PHONY: install test test-all data data-small benchmark benchmark-quick benchmark-publish study study-publish \
	study-temperature study-temperature-publish study-scaling study-scaling-publish gpu-check-dry gpu-check-prepare

install:            ## torch from the local wheel pair, the plugin (editable) with its dev extra, the Debian data packages
	$(PYTHON) -m pip install torch==2.14.1 torchvision==0.29.1
	$(PYTHON) -m pip install -e ".[dev]"
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && apt-get install -y -qq --no-install-recommends \
			$$($(PYTHON) -m openclip_align.cli data requirements --size small --kind apt); \
	else \
		echo "not root: install these Debian packages yourself:" \
			$$($(PYTHON) -m openclip_align.cli data requirements --size small --kind apt); \
	fi

test:               ## the test suite (CPU only, a few minutes; the slow multi-process runs are skipped)
	$(PYTHON) -m pytest -m "not slow" --durations=25

test-all:           ## the whole test suite, slow multi-process training runs included
	$(PYTHON) -m pytest

data:               ## the embedded default corpus, built offline from packages
	$(PYTHON) -m openclip_align.cli data build --out $(DATA) --size full

data-small:
	$(PYTHON) -m openclip_align.cli data build --out $(SMALL_DATA) --size small

benchmark:          ## the main job: plugin vs upstream OpenCLIP on the embedded default, into $(BENCH_OUT) (untracked)
	$(PYTHON) -m openclip_align.cli benchmark --data $(DATA) --out $(BENCH_OUT)

benchmark-quick:
	$(PYTHON) -m openclip_align.cli benchmark --data $(DATA) --out $(BENCH_OUT)-quick --quick

benchmark-publish:  ## make the run in $(BENCH_OUT) the committed copy: benchmark/ (results, baseline, figures), README tables
	$(PYTHON) -m openclip_align.publishing --benchmark $(BENCH_OUT) $(PUBLISH_FLAGS)

study:              ## losses x optimizers grid of the course study (pretrained towers; --regime scratch for Tiny models)
	$(PYTHON) -m openclip_align.cli study --data $(DATA) --out $(STUDY_OUT)

study-publish:      ## make the study in $(STUDY_OUT) the committed copy: study/ and README's grid
	$(PYTHON) -m openclip_align.publishing --study $(STUDY_OUT)

study-temperature:  ## Mind the Gap's temperatures: the pretrained-tower CLIP fine-tuned at each fixed T, CLIP-Refine (lr 1e-6 and 1e-4) beside it
	$(PYTHON) -m openclip_align.cli study --data $(DATA) --out $(STUDY_TEMPERATURE_OUT) \
		--temperatures 0.01 0.02 0.0333 0.05 0.1 1 --refine-lrs 1e-6 1e-4

gpu-check-dry:      ## the GPU check's CPU dry run on Tiny models (seconds): measurements/gpu_check.py --dry-run
	$(PYTHON) measurements/gpu_check.py --dry-run --out runs/gpu-check-dry

gpu-check-prepare:  ## wheels, mpnet skeleton and small corpus for the one device call of measurements/gpu_check.sh
	bash measurements/gpu_check.sh prepare

study-temperature-publish:  ## make $(STUDY_TEMPERATURE_OUT) the committed copy: study/temperature/ and README's block
	$(PYTHON) -m openclip_align.publishing --temperature-study $(STUDY_TEMPERATURE_OUT)

study-scaling:      ## data scaling: the scratch track on 1/4, 1/2 and all of the training pairs, 3 seeds (rerun continues a stopped one)
	$(PYTHON) -m openclip_align.cli study --data $(DATA) --out $(STUDY_SCALING_OUT) --train-fractions 0.25 0.5 1 --seeds 0 1 2

study-scaling-publish:  ## make $(STUDY_SCALING_OUT) the committed copy: study/scaling/ and README's block
	$(PYTHON) -m openclip_align.publishing --scaling-study $(STUDY_SCALING_OUT)
