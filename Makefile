# The two commands of the README: `make demo` and `make test`. Both build everything they need
# from scratch into .venv (a fresh machine needs only Python 3.10+ and a C compiler).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml setup.py src/cllm/_core.pyx src/cllm/vecmath.h | cksum | cut -d' ' -f1)

.PHONY: install test demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py src/cllm/_core.pyx src/cllm/vecmath.h
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	rm -f $(VENV)/.installed-*
	touch $@

test: install
	$(PY) -m pytest -q

demo: install
	$(PY) -m cllm demo

bench: install
	$(PY) bench/train_step.py

clean:
	rm -rf build src/cllm/_core.c src/cllm/*.so src/*.egg-info
