# vmferry: `make demo` installs what is needed and runs a real save/restore;
# `make test` runs ruff, mypy --strict and pytest (KVM tests included where /dev/kvm works).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
APT_STAMP := .apt-stamp

.PHONY: all demo test lint typecheck pytest guests system-deps clean bench

all: $(STAMP) guests

# Debian packages the project needs: a C toolchain for the guests, QEMU for the
# side-by-side boot test and the comparison benchmarks, and iproute2 (ip, tc) for the test
# of a link that drops every packet.
system-deps:
	@missing=""; \
	command -v gcc >/dev/null || missing="$$missing gcc libc6-dev"; \
	command -v objcopy >/dev/null || missing="$$missing binutils"; \
	command -v make >/dev/null || missing="$$missing make"; \
	command -v qemu-system-x86_64 >/dev/null || missing="$$missing qemu-system-x86"; \
	command -v tc >/dev/null || missing="$$missing iproute2"; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		if [ "$$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi; \
		$$SUDO apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	fi

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

guests: system-deps
	$(MAKE) -s -C guests

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP) guests
	$(BIN)/pytest -q

test: $(STAMP) guests lint typecheck pytest

demo: $(STAMP) guests
	$(BIN)/vmferry demo

bench: $(STAMP) guests
	$(BIN)/vmferry bench

clean:
	$(MAKE) -s -C guests clean
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
