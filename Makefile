# Entry points for a fresh machine: `make repro` (install + run the default pipeline), `make test` (install +
# lint and run the test suite; `make test-fast`: the unit tests only) and `make study` (install + the ablation grid).
# Everything runs from the project's own .venv.
VENV := .venv
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: install repro test test-fast study

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/install.sh
	bash scripts/install.sh
	touch $@

repro: install
	dvc repro

test: install
	ruff check .
	pytest -q

# The unit tests alone (about a minute): everything not marked slow (tests that run the real pipeline).
test-fast: install
	pytest -q -m "not slow"

study: install
	revision study
