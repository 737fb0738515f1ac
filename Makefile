# Two commands do the whole set-up on a fresh machine:
#   make demo   installs, builds ResNet-50 in code (random weights), compiles it for this machine, prints the report
#   make test   installs and runs the tests
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch first, pinned: a CPU wheel of 2.13.0 is available here; an unpinned torch pulls gigabytes of CUDA.
TORCH  ?= torch==2.13.0
MODELS := build/models
STAMP  := $(VENV)/.installed

.PHONY: install test test-models conformance demo clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[zoo,dev]"
	touch $@

test: install
	$(BIN)/python -m pytest -q -m "not slow"

# Full-size models (minutes): ResNet-50 and BERT-base for the host.
test-models: install
	$(BIN)/python -m pytest -q -m slow

# The ONNX backend node tests (about 1.9k) through the host pipeline; fails if fewer pass than the recorded floor.
conformance: install
	$(BIN)/python -m autoglm_compile.conformance --floor docs/conformance.json --write docs/conformance.md

$(MODELS)/resnet50.onnx: | install
	$(BIN)/python -m autoglm_compile.zoo resnet50 $@

demo: $(MODELS)/resnet50.onnx
	$(BIN)/autoglm-compile $(MODELS)/resnet50.onnx --target host --dim batch=1 -o build/resnet50 --runs 5

clean:
	rm -rf build dist *.egg-info
