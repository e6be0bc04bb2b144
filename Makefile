# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
STAMP  := $(VENV)/.installed

CHECK_VENV ?= /tmp/medseg-check-install

.PHONY: venv test test-all demo check-install lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip >/dev/null
	$(PY) -m pip install torch==$(TORCH_VERSION)
	$(PY) -m pip install -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m ""

# A non-editable `pip install .` into a scratch venv (no system site-packages), then, from outside the
# source tree: `medseg demo --help` and every shipped config loaded by name (.ci/check_install.py).
check-install:
	rm -rf $(CHECK_VENV)
	$(PYTHON) -m venv $(CHECK_VENV)
	$(CHECK_VENV)/bin/python -m pip install -q torch==$(TORCH_VERSION)
	$(CHECK_VENV)/bin/python -m pip install -q .
	rm -rf build
	cd $(CHECK_VENV) && bin/medseg demo --help >/dev/null && bin/medseg --version
	cd $(CHECK_VENV) && bin/python $(CURDIR)/.ci/check_install.py

demo: $(STAMP)
	$(VENV)/bin/medseg demo $(DEMO_ARGS)

clean:
	rm -rf $(VENV) runs outputs .pytest_cache
