# Verbs of the project; `make help` lists them.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CACHE ?= $(HOME)/.cache/afd
TINY := $(CACHE)/tiny
PROTOS := $(wildcard proto/afd/v1/*.proto)
GEN := services/common/wire/gen
STUBS := $(GEN)/.generated

.DEFAULT_GOAL := help
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: help setup proto run test lint prometheus

help: ## list the verbs
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

# protoc writes `from afd.v1 import ...`; the sed makes that the package the stubs live in.
$(STUBS): $(PROTOS) $(STAMP)
	rm -rf $(GEN) && mkdir -p $(GEN)/afd/v1 && touch $(GEN)/__init__.py $(GEN)/afd/__init__.py $(GEN)/afd/v1/__init__.py
	$(BIN)/python -m grpc_tools.protoc -Iproto --python_out=$(GEN) --pyi_out=$(GEN) --grpc_python_out=$(GEN) $(PROTOS)
	sed -i 's/^from afd\./from services.common.wire.gen.afd./' $(GEN)/afd/v1/*_pb2*.py* && touch $@

setup: $(STAMP) $(STUBS) ## create .venv, install the project and generate the gRPC stubs

proto: $(STUBS) ## generate the gRPC stubs from proto/ (when a .proto changed)

run: setup ## serve the tiny default model on http://127.0.0.1:8000 (1 attention, 2 FFN instances)
	test -f $(TINY)/config.json || $(BIN)/afd init-checkpoint $(TINY) --preset tiny
	$(BIN)/afd serve --model $(TINY) --attention-instances 1 --ffn-instances 2

test: setup prometheus ## run the test suite
	$(BIN)/pytest -q

# The observability tests start a real Prometheus (and run promtool) on 127.0.0.1.
prometheus: ## install the Prometheus server and promtool (Debian's package) if missing
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || { \
	  $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; }

lint: $(STAMP) ## ruff format check and lint
	$(BIN)/ruff format --check services tests
	$(BIN)/ruff check services tests

# Images and chart (docs/deploy.md). Building needs a container engine; the chart's tests do not.
.PHONY: images chart
IMAGE ?= afd
TAG ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)

images: ## build the GPU and CPU images: IMAGE=registry/afd TAG=0.1.0 (needs docker)
	docker build -f deploy/docker/Dockerfile -t $(IMAGE):$(TAG) .
	docker build -f deploy/docker/Dockerfile.cpu -t $(IMAGE):$(TAG)-cpu .

chart: setup ## test the Helm chart offline: render, schema, strict Kubernetes validation
	$(BIN)/pytest -q tests/unit/test_chart_*.py
