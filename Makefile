# Verbs of the project; `make help` lists them.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CACHE ?= $(HOME)/.cache/afd
TINY := $(CACHE)/tiny

.DEFAULT_GOAL := help
.PHONY: help setup run test lint

help: ## list the verbs
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP) ## create .venv and install the project into it

run: $(STAMP) ## generate from the embedded tiny model (created on first use)
	test -f $(TINY)/config.json || $(BIN)/afd init-checkpoint $(TINY) --preset tiny
	$(BIN)/afd generate --model $(TINY) --prompt "$(or $(PROMPT),Hello! Who are you?)"

test: $(STAMP) ## run the test suite
	$(BIN)/pytest -q

lint: $(STAMP) ## ruff format check and lint
	$(BIN)/ruff format --check services tests
	$(BIN)/ruff check services tests
