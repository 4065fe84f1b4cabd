# Two entry points for a fresh machine: `make repro` (install + run the default pipeline) and
# `make test` (install + run the test suite). Everything runs from the project's own .venv.
VENV := .venv
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: install repro test

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/install.sh
	bash scripts/install.sh
	touch $@

repro: install
	dvc repro

test: install
	pytest -q
