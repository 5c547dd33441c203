# The two commands of README.md. Everything lives in .venv; nothing is installed system-wide.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: demo test lint protos bench clean

$(BIN)/.installed: pyproject.toml $(wildcard services/stage/cpu_*.[ch])  # pip compiles the kernels into the package
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip==25.3
	$(BIN)/python -m pip install --quiet -e '.[dev,qnn]'
	touch $@

demo: $(BIN)/.installed  ## install, export the default model if needed, serve it, answer the sample prompts
	$(BIN)/splitllm demo

test: $(BIN)/.installed  ## lint, then the whole test suite (unit and end-to-end over real processes)
	$(BIN)/ruff check .
	$(BIN)/python protos/generate.py && git diff --exit-code --stat -- protos/ || (echo "generated protos are stale: run make protos"; exit 1)
	$(BIN)/pytest -q

protos: $(BIN)/.installed  ## regenerate the gRPC code from protos/*.proto
	$(BIN)/python protos/generate.py

bench: $(BIN)/.installed  ## the benchmark suite (figures, never pass/fail)
	$(BIN)/splitllm bench

clean:
	rm -rf $(VENV) artifacts
