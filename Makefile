# Set-up and everyday commands. Everything installs into ./.venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: serve test bench build annotate clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

## serve: install mip with its serving extras and run `mip serve` on the demo repository
serve: $(BIN)/python
	$(BIN)/python -m pip install '.[serve]'
	$(BIN)/mip serve

## test: install mip (editable, extension built in place) with test extras; run the whole suite
test: $(BIN)/python
	$(BIN)/python -m pip install -e '.[test]'
	@if [ "$$(id -u)" = 0 ]; then command -v redis-server >/dev/null || (apt-get update && apt-get install -y redis-server); \
	elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then command -v redis-server >/dev/null || (sudo apt-get update && sudo apt-get install -y redis-server); fi
	$(BIN)/python -m pytest

## bench: the codec comparison (ours vs struct, protobuf and memcpy), ratios printed
bench: $(BIN)/python
	$(BIN)/python -m pip install -e '.[bench]'
	$(BIN)/python bench/compare_codec.py

## build: sdist and wheel into dist/
build: $(BIN)/python
	$(BIN)/python -m pip install -q build
	$(BIN)/python -m build

## annotate: Cython's HTML annotation of the codec (mip/protocol/*.html)
annotate: $(BIN)/python
	MIP_ANNOTATE=1 $(BIN)/python setup.py build_ext --inplace -q

clean:
	rm -rf build dist *.egg-info mip/protocol/*.c mip/protocol/*.so mip/protocol/*.html
