# Every target installs what it needs into .venv first, so a fresh clone needs only Python 3.11+.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MODELS := gru_serve/models
FULL_RECIPE := --hidden-size 384 --num-layers 2 --dropout 0.5 --optimizer adam --lr 0.003 --epochs 24 \
	--num-steps 64 --max-tokens 0 --holdout 0.1 --eval-every 2

.PHONY: install browser demo test test-unit lint models protos reliability bench clean

install: $(STAMP) browser

# The playground test drives a real Chromium (Debian's package; Playwright downloads nothing).
# Installing it needs root or password-less sudo; without either this says how, and the test
# fails saying the same. GRU_SERVE_CHROMIUM: use another Chromium binary.
CHROMIUM := $(or $(GRU_SERVE_CHROMIUM),/usr/bin/chromium)
browser:
	@if [ -x "$(CHROMIUM)" ]; then :; \
	elif ! command -v apt-get >/dev/null 2>&1; then \
		echo "make browser: no $(CHROMIUM) and no apt-get: install Chromium, set GRU_SERVE_CHROMIUM=/path/to/it" >&2; \
	else \
		if [ "$$(id -u)" = 0 ]; then SUDO=; \
		elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO=sudo; \
		else echo "make browser: no $(CHROMIUM); run 'sudo apt-get install -y chromium' (needs root)" >&2; exit 0; fi; \
		echo "make browser: installing Chromium (apt-get install -y chromium)"; \
		$$SUDO apt-get update -q && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium \
			|| echo "make browser: apt-get install -y chromium failed; the playground test will fail" >&2; \
	fi

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[export,dev]'
	touch $@

demo: $(STAMP)
	$(BIN)/python -m gru_serve.demo

# Every tier (unit, serve, system; tests/conftest.py marks them by folder): the CI gate.
test: $(STAMP) browser
	$(BIN)/ruff check .
	$(BIN)/pytest -q

# The unit tier alone (no server, subprocess or Redis): under a minute.
test-unit: $(STAMP)
	$(BIN)/pytest -q -m unit tests/unit

lint: $(STAMP)
	$(BIN)/ruff check .

# Retrain and re-export the shipped models (about 5, 10 and 12 minutes on 2 CPU cores).
models: $(STAMP)
	$(BIN)/gru-export train -o checkpoints/timemachine-d2l.pt
	$(BIN)/gru-export export checkpoints/timemachine-d2l.pt -o $(MODELS)/timemachine-d2l/model.onnx \
		--name timemachine-d2l --card $(MODELS)/timemachine-d2l/README.md
	$(BIN)/gru-export train $(FULL_RECIPE) -o checkpoints/timemachine-full.pt
	$(BIN)/gru-export export checkpoints/timemachine-full.pt -o $(MODELS)/timemachine-full/model.onnx \
		--name timemachine-full --card $(MODELS)/timemachine-full/README.md
	OMP_NUM_THREADS=1 $(BIN)/gru-export train --tokenizer bpe:1000 --embedding-size 128 --hidden-size 352 \
		--num-layers 2 --dropout 0.45 --tie-weights --batch-size 32 --num-steps 32 --epochs 30 --eval-every 3 \
		-o checkpoints/timemachine-bpe.pt
	mkdir -p $(MODELS)/timemachine-bpe
	$(BIN)/gru-export export checkpoints/timemachine-bpe.pt -o $(MODELS)/timemachine-bpe/model.onnx \
		--name timemachine-bpe --card $(MODELS)/timemachine-bpe/README.md

# Latency and throughput beside PyTorch eager and a PyTorch gRPC server; writes docs/bench/
# (results.json, plots) and docs/benchmarks.md. `make bench BENCH_FLAGS=--quick`: under 2 minutes.
bench: $(STAMP)
	$(BIN)/gru-serve bench $(BENCH_FLAGS) -o docs/bench --markdown docs/benchmarks.md

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis build bench-results *.egg-info

protos: $(STAMP)
	$(BIN)/python scripts/gen_protos.py

# The reliability suite alone, then its report (docs/reliability.md).
reliability: $(STAMP)
	$(BIN)/pytest -q tests/reliability
	$(BIN)/python scripts/reliability_report.py
