# Entry points for a fresh machine: `make repro` (install + run the default pipeline), `make test` (install +
# run the test suite) and `make study` (install + the ablation grid). Everything runs from the project's own .venv.
VENV := .venv
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: install repro test study

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/install.sh
	bash scripts/install.sh
	touch $@

repro: install
	dvc repro

test: install
	pytest -q

study: install
	revision study
