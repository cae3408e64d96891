# Set-up and the two commands the README starts with. Each target creates .venv on first use.
PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
# The CPU build used when the venv has no torch yet; a CUDA torch already in the venv is kept.
TORCH_SPEC ?= torch==2.13.0

.PHONY: quickstart test install clean study study-quick

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install -q "$(TORCH_SPEC)"
	$(VPY) -m pip install -q -r requirements-dev.txt
	touch $@

quickstart: install
	$(VPY) quickstart.py

study: install
	$(VPY) -m toy_hands.study --out toy_study

study-quick: install
	$(VPY) -m toy_hands.study --out toy_study_quick --quick

test: install
	$(VPY) -m pytest -q tests

clean:
	rm -rf quickstart/ toy_study/ toy_study_quick/ .pytest_cache
