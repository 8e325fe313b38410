# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv and install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint results clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[train,test,lint]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m gradspace compare --preset mini --tokenizer chars --steps 300 --eval-every 100 --lr-from docs/results/1-pretrain --threads 2 --overwrite --out runs/demo

test: $(STAMP)
	$(PY) -m pytest -q -n 2

# the comparison protocol of docs/results.md (hours on 2 cores; rerun to continue), then its tables
results: $(STAMP)
	$(PY) tools/results.py

lint: $(STAMP)
	$(PY) -m ruff check src tests tools
	$(PY) -m ruff format --check src tests tools

clean:
	rm -rf $(VENV)
