# Two entry points for a fresh machine:  `make demo` (set up + run the main job on the embedded sample)
# and `make test` (set up + run the tests). Everything installs into .venv from setup.py.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
SAMPLE  := data/sample_coco
OUT     ?= out/sample
RUN     ?= runs/sample
REPORT  ?= reports/sample

.PHONY: setup demo sample build train evaluate test clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.py
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test]"
	touch $@

sample: setup
	$(BIN)/python -m data.sample --output_dir=$(SAMPLE)

# The demo trains for a few minutes on a CPU: enough to exercise the whole chain, far from the paper's
# 90,000 steps (BUILD_NOTES.md has the full recipe). bn_momentum 0.9: BN statistics that keep up with a short run.
DEMO_STEPS ?= 150
DEMO_PAIRS ?= 40

build: sample
	$(BIN)/python -m pipeline.build --coco_dir=$(SAMPLE) --output_dir=$(OUT) --overwrite --runner=DirectRunner \
		--patches_per_image=$(DEMO_PAIRS)

train: build
	$(BIN)/python -m model.train --data_dir=$(OUT) --model_dir=$(RUN) --steps=$(DEMO_STEPS) --batch_size=16 \
		--bn_momentum=0.9 --val_every=50 --checkpoint_every=50 --log_every=10 --shuffle_buffer=1000

evaluate: train
	$(BIN)/python -m model.evaluate --data_dir=$(OUT) --split=validation --model_dir=$(RUN) --output_dir=$(REPORT)

demo: evaluate
	@echo
	@echo "dataset: $(OUT)/dataset_info.json   run: $(RUN) (mace.png, history.csv, model.keras)"
	@echo "report:  $(REPORT)/mace_report.md   (figures: $(REPORT)/*.png)"

test: setup
	$(BIN)/python -m pytest -q -n 2 tests

clean:
	rm -rf out runs reports $(SAMPLE)
