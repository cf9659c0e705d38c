# `make test` and `make demo` work on a fresh machine: they create .venv and install from constraints.txt.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test demo clean

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

clean:
	rm -rf $(VENV) build *.egg-info
