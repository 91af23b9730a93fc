# The two set-up commands of the README. Each builds .venv from requirements.txt when needed
# (it installs this checkout, editable, with the dependencies pyproject.toml lists).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
WORKDIR ?= workdir/demo
CACHE ?= $(HOME)/.cache/cla-jax

STACK := $(VENV)/compile-stack

.PHONY: demo test clean device-check compile-stack docs

$(VENV)/installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

# Train a small CLA model on the embedded Shakespeare corpus, evaluate it, sample from it.
demo: $(VENV)/installed
	$(PY) train.py --config=configs/default.py --workdir=$(WORKDIR) --cache_dir=$(CACHE)
	$(PY) eval.py --workdir=$(WORKDIR) --cache_dir=$(CACHE)
	$(PY) generate.py --workdir=$(WORKDIR) --cache_dir=$(CACHE) --prompt="ROMEO:" --max_new_tokens=120

# The TPU and GPU compilers (libtpu; the CUDA plugin and cuDNN), pinned to the venv's jax, in
# a folder of their own: only cla-compile and the tests put it on sys.path, so no other command
# sees a CUDA plugin without a GPU (cla_jax/aot/stack.py).
$(STACK)/installed: $(VENV)/installed
	$(PY) -m cla_jax.aot.stack install $(STACK)
	touch $@

compile-stack: $(STACK)/installed

test: $(VENV)/installed $(STACK)/installed
	$(PY) -m pytest

# The accelerator check (benchmarks/device_check.py) on whatever platform jax sees: with the
# .venv that `make demo` / `make test` built when there is one, else the Python on the path
# (a GPU machine that brings its own jax); it never builds the venv, whose jax is CPU-only. It
# writes benchmarks/results/device_check_<date>_<device>.json. DEVICE_CHECK_ARGS=--out=... etc.
DEVICE_CHECK_PY = $(if $(wildcard $(PY)),$(PY),$(PYTHON))

device-check:
	$(DEVICE_CHECK_PY) benchmarks/device_check.py $(DEVICE_CHECK_ARGS)

# The documentation site (docs/, mkdocs.yml) into site/, warnings as errors, as
# tests/test_docs.py builds it. Open site/index.html.
docs: $(VENV)/installed
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) $(WORKDIR)
