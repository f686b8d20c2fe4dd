# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
PY      = $(VENV)/bin/python

.PHONY: demo test lint bench env clean browser

env: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py tasks/_scan_fp16.c tasks/_scan_fp16_loops.h models/_selective_scan.c models/_selective_scan_kernel.h
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q torch==2.14.1 torchvision==0.29.1
	$(VENV)/bin/pip install -q -e ".[lite,dask,s3,search,dev]"
	touch $@

demo: env
	$(PY) -m flows.demo

test: env browser
	$(PY) -m pytest -q

# Chromium for tests/test_serve_browser.py: Playwright drives Debian's build (its own browser download is not
# used). Without root the install fails: the browser test is then skipped locally (and fails on CI).
browser:
	@command -v chromium >/dev/null 2>&1 || { apt-get update && apt-get install -y chromium; } \
		|| echo "warning: could not install chromium (apt-get install -y chromium)"

lint: env
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) demo_out runs
