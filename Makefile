# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
PY      = $(VENV)/bin/python

.PHONY: demo test lint bench env clean

env: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py tasks/_scan_fp16.c
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q torch==2.14.1 torchvision==0.29.1
	$(VENV)/bin/pip install -q -e ".[lite,dask,s3,search,dev]"
	touch $@

demo: env
	$(PY) -m flows.demo

test: env
	$(PY) -m pytest -q

lint: env
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) demo_out runs
