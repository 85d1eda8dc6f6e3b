# The two commands a fresh clone needs:  `make demo`  and  `make test`.
# Both create .venv on first use and reuse it afterwards (reinstalling only when pyproject.toml changes).

VENV    ?= .venv
PY      := $(VENV)/bin/python
STUDIES ?= studies
STUDY   ?= study/configs/quick.yaml

.PHONY: demo test lint venv clean-studies help

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	@touch $@

venv: $(VENV)/.installed  ## create .venv and install the project with its test extra

demo: venv  ## run the embedded quick study end to end, then its report
	RAY_AUTH_MODE=disabled $(VENV)/bin/tpp-study run $(STUDY) --storage $(STUDIES) --if-exists replace
	$(VENV)/bin/tpp-analyze quick --storage $(STUDIES)
	@echo
	@echo "Report:    $(abspath $(STUDIES))/quick/report/report.html"
	@$(VENV)/bin/tpp-study status quick --storage $(STUDIES) | grep -A2 "^MLflow UI"

test: venv  ## lint and run the whole test suite
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q

lint: venv
	$(VENV)/bin/ruff check .

clean-studies:  ## delete study outputs (MLflow stores, checkpoints, reports)
	rm -rf $(STUDIES)
