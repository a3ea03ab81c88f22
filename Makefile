# Two entry points for a fresh machine:  `make demo` (set up + run the main job on the embedded sample)
# and `make test` (set up + run the tests). Everything installs into .venv from setup.py.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
SAMPLE  := data/sample_coco
OUT     ?= out/sample
RUN     ?= runs/sample
REPORT  ?= reports/sample

.PHONY: setup demo sample build test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.py
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test]"
	touch $@

sample: setup
	$(BIN)/python -m data.sample --output_dir=$(SAMPLE)

build: sample
	$(BIN)/python -m pipeline.build --coco_dir=$(SAMPLE) --output_dir=$(OUT) --overwrite --runner=DirectRunner

demo: build

test: setup
	$(BIN)/python -m pytest -q -n 2 tests

clean:
	rm -rf out runs reports $(SAMPLE)
