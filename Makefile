# `make test` and `make demo` work on a fresh machine: they create .venv and install from constraints.txt.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test demo clean lmms-env lmms-test

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU build of torch first (the pin lives here, not in pyproject, so GPU users keep their own torch).
	$(BIN)/pip install -q -c constraints.txt torch
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	HF_HUB_OFFLINE=1 TRITON_INTERPRET=1 $(BIN)/python -m pytest tests

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m vtprune.demo

# The lmms-eval plugin's own environment (.venv-lmms): vtprune's pins, the `lmms` extra and the pins lmms-eval 0.7.3
# needs beside them (constraints-lmms.txt). PyPI's torchvision is a CUDA build that cannot load beside the CPU torch
# pinned here ("operator torchvision::nms does not exist") and the LLaVA / InternVL path does not need it: removed.
LMMS_VENV := .venv-lmms
LMMS_STAMP := $(LMMS_VENV)/.installed

$(LMMS_STAMP): pyproject.toml constraints.txt constraints-lmms.txt
	test -x $(LMMS_VENV)/bin/python || $(PY) -m venv $(LMMS_VENV)
	$(LMMS_VENV)/bin/pip install -q --upgrade pip
	$(LMMS_VENV)/bin/pip install -q -c constraints.txt torch
	$(LMMS_VENV)/bin/pip install -q -c constraints.txt -c constraints-lmms.txt -e ".[lmms,dev]"
	$(LMMS_VENV)/bin/pip uninstall -q -y torchvision
	touch $(LMMS_STAMP)

lmms-env: $(LMMS_STAMP)

# The plugin's tests: in .venv those that need lmms-eval skip; here they run lmms-eval end to end on the embedded model.
lmms-test: $(LMMS_STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled TRITON_INTERPRET=1 $(LMMS_VENV)/bin/python -m pytest -q tests/lmms

clean:
	rm -rf $(VENV) $(LMMS_VENV) build *.egg-info
