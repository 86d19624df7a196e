# Set-up and the two README commands. `make demo` and `make test` both create the environment first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BE := $(VENV)/bin/basel-edge
OUT ?= out

.PHONY: setup demo demo-quick test test-fast bench-baselines clean

setup: $(VENV)/.installed $(VENV)/.llama-cpp

$(VENV)/.installed: pyproject.toml requirements-embedded.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[dev,onnx,executorch]'
	$(PY) -m pip install --quiet --no-deps --require-hashes -r requirements-embedded.txt
	touch $@

# The low-rank llama.cpp (tools in the cache + patched llama-cpp-python); cached by pin and patch hash, so a
# rerun is quick. LLAMA_CPP_CUDA=1 builds the CUDA backend on a GPU machine.
$(VENV)/.llama-cpp: $(VENV)/.installed runtimes/llama_cpp/lowrank.patch runtimes/llama_cpp/build.py
	$(PY) -m basel_edge.runtimes.llama_cpp.build $(if $(LLAMA_CPP_CUDA),--cuda)
	touch $@

demo: setup
	$(BE) demo -o $(OUT)/demo

demo-quick: setup
	$(BE) demo --quick -o $(OUT)/demo-quick

test: setup
	$(PY) -m pytest --durations=25

test-fast: setup
	$(PY) -m pytest -m "not slow"

bench-baselines: setup
	$(PY) -m basel_edge.eval.bench_baselines

clean:
	rm -rf $(VENV) $(OUT)
