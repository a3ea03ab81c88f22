# Two entry points for a fresh machine:  `make demo` (set up + build the embedded sample + evaluate the shipped,
# trained network beside identity, ORB, SIFT and ECC, each also refined by ECC, on pairs it never saw) and `make test` (set up + run the
# tests). Everything installs into .venv from setup.py.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
SAMPLE  := data/sample_coco
OUT     ?= out/sample
RUN     ?= runs/sample
REPORT  ?= reports/sample
WEIGHTS ?= data/weights/compact_rho32
# Every method beside its ECC-refined variant (X+ecc), and auto (the best refined candidate by correlation).
DEMO_METHODS ?= identity,orb_default,orb,orb+ecc,sift,sift+ecc,ecc,network,network+ecc,network_tta,network_tta+ecc,sift_or_network,sift_or_network+ecc,auto
# The commands' own progress and results, not the libraries' INFO logs: TensorFlow's C++ logging off, and the
# builder at absl's WARNING level (its summary is printed, not logged).
export TF_CPP_MIN_LOG_LEVEL ?= 3
QUIET   ?= --verbosity=-1

.PHONY: setup demo sample build train evaluate evaluate-shipped test clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.py
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test]"
	touch $@

sample: setup
	$(BIN)/python -m data.sample --output_dir=$(SAMPLE)

# `make train` / `make evaluate`: a short training of the compact network on the sample (a minute on a CPU:
# it exercises the chain, it does not train a useful network; the shipped weights took hours, see their
# CARD.md). bn_momentum 0.9: BN statistics that keep up with a short run.
DEMO_STEPS ?= 200
DEMO_PAIRS ?= 40

build: sample
	@echo "building the sample dataset in $(OUT) ..."
	$(BIN)/python -m pipeline.build --coco_dir=$(SAMPLE) --output_dir=$(OUT) --overwrite --runner=DirectRunner \
		--patches_per_image=$(DEMO_PAIRS) $(QUIET)
	@echo "building the same pairs, each patch through its own camera change, in $(OUT)_camera ..."
	$(BIN)/python -m pipeline.build --coco_dir=$(SAMPLE) --output_dir=$(OUT)_camera --overwrite --runner=DirectRunner \
		--patches_per_image=$(DEMO_PAIRS) --photometric=camera $(QUIET)

train: build
	$(BIN)/python -m model.train --data_dir=$(OUT) --model_dir=$(RUN) --steps=$(DEMO_STEPS) --batch_size=16 \
		--architecture=compact --optimizer=adam --learning_rate=0.001 --nodropout \
		--bn_momentum=0.9 --val_every=50 --checkpoint_every=50 --log_every=10 --shuffle_buffer=1000

evaluate: train
	$(BIN)/python -m model.evaluate --data_dir=$(OUT) --split=validation --model_dir=$(RUN) --output_dir=$(REPORT)

# The shipped network (trained on COCO train2017 images only) against the classical methods on the sample's
# validation photographs.
evaluate-shipped: build
	@echo "evaluating the shipped network and the classical methods, each with and without ECC refinement ..."
	$(BIN)/python -m model.evaluate --data_dir=$(OUT) --split=validation --model_dir=$(WEIGHTS) \
		--methods=$(DEMO_METHODS) --output_dir=$(REPORT)/shipped
	@echo "the same on the camera pairs ..."
	$(BIN)/python -m model.evaluate --data_dir=$(OUT)_camera --split=validation --model_dir=$(WEIGHTS) \
		--methods=$(DEMO_METHODS) --output_dir=$(REPORT)/shipped_camera

demo: evaluate-shipped
	@echo
	@echo "dataset: $(OUT) (index homography_index.json; a TFDS dataset directory)   shipped network: $(WEIGHTS)/CARD.md (how it was trained, COCO figures)"
	@echo "reports: $(REPORT)/shipped/mace_report.md (clean pairs), $(REPORT)/shipped_camera/mace_report.md (camera pairs)"
	@echo "train one yourself: make train (a short run) or BUILD_NOTES.md (the recipe behind the shipped weights)"

test: setup
	$(BIN)/python -m pytest -q -n 2 tests

clean:
	rm -rf out runs reports $(SAMPLE)
