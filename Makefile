# Two commands do all the set-up on a fresh machine:
#   make quickstart   # create .venv, install, fine-tune the shipped tiny MoE and evaluate it
#   make test         # create .venv, install with test extras, run the test suite
# TORCH names the torch build to install first (the CPU wheel by default). Elsewhere, e.g.
#   make quickstart TORCH=torch        # your platform's default build
#   make quickstart TORCH=             # keep the torch already in the environment
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: quickstart test data base-model clean

$(BIN)/moe-tune: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(if $(TORCH),$(BIN)/python -m pip install -q "$(TORCH)")
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

quickstart: $(BIN)/moe-tune
	$(BIN)/moe-tune train recipes/quickstart.yaml --overwrite

test: $(BIN)/moe-tune
	$(BIN)/python -m pytest -q

# Regenerate the shipped data and base model (deterministic; about 15 minutes on 2 CPU cores).
data: $(BIN)/moe-tune
	$(BIN)/python scripts/make_data.py

base-model: data
	cd scripts && ../$(BIN)/python pretrain_base.py

clean:
	rm -rf runs eval
