# Entry points for a fresh machine: `make repro` (install + run the default pipeline), `make test` (install +
# lint and run the test suite; `make test-fast`: the unit tests only), `make study` (install + the ablation study) and
# `make test-lmms` (install the lmms extra, lmms-eval, and run the tests that drive it).
# Everything runs from the project's own .venv.
VENV := .venv
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: install lmms repro test test-fast test-lmms study

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/install.sh
	bash scripts/install.sh
	touch $@

lmms: $(VENV)/.lmms-installed

$(VENV)/.lmms-installed: $(VENV)/.installed scripts/install_lmms.sh
	bash scripts/install_lmms.sh
	touch $@

repro: install
	dvc repro

test: install
	ruff check .
	pytest -q

# The unit tests alone (about a minute): everything not marked slow (tests that run the real pipeline).
test-fast: install
	pytest -q -m "not slow"

test-lmms: lmms
	pytest -q -m lmms

study: install
	revision study
