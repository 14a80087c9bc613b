# The two commands of the README: `make demo` and `make test`. Both build everything they need
# from scratch into .venv (a fresh machine needs only Python 3.10+ and a C compiler).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml setup.py src/cllm/_core.pyx src/cllm/vecmath.h src/cllm/quant.h | cksum | cut -d' ' -f1)

.PHONY: install test demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py src/cllm/_core.pyx src/cllm/vecmath.h src/cllm/quant.h
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test,mpi]"
	rm -f $(VENV)/.installed-*
	touch $@

test: install
	$(PY) -m pytest -q

# The demo trains on the source of the installed standard library (every machine with Python
# has it): its modules only, copied to demo_out/stdlib without site-packages, the test suite
# and compiled files. A small character-level model; the run ends with samples of the code.
demo: install
	rm -rf demo_out && mkdir -p demo_out/stdlib
	cd "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')" && \
	find . \( -name site-packages -o -name dist-packages -o -name test -o -name tests \
		-o -name idle_test -o -name __pycache__ \) -prune -o -name '*.py' -print0 | \
	tar --null -cf - -T - | tar -xf - -C "$(CURDIR)/demo_out/stdlib"
	$(PY) -m cllm train -d demo_out/stdlib -c demo_out/run --tokenizer char -e 128 -l 4 -H 4 \
		-s 128 -b 16 --max-steps 1300 -r 2e-3 --warmup 50 --min-lr 2e-4 --val-fraction 0.01 \
		--eval-every 100 --eval-batches 5 --checkpoint-every 500

bench: install
	$(PY) bench/train_step.py

clean:
	rm -rf build src/cllm/_core.c src/cllm/*.so src/*.egg-info
