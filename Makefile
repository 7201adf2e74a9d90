# `make demo` and `make test` are the README's two commands; both set up .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/bnfold: pyproject.toml requirements-dev.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $@

setup: $(BIN)/bnfold

demo: setup
	$(BIN)/python examples/make_examples.py --out examples/models
	$(BIN)/bnfold fuse examples/models/cnn.onnx -o examples/models/cnn.fused.onnx
	$(BIN)/bnfold verify examples/models/cnn.onnx examples/models/cnn.fused.onnx

test: setup
	$(BIN)/python -m pytest -q -n 2

.PHONY: setup demo test
