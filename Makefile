# rbdfleet — every target that runs code runs `setup` first; `setup` is idempotent.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
DEBS := ceph-mon ceph-osd ceph-mgr ceph-mds ceph-common python3-rados python3-rbd \
        python3-cephfs python3-libvirt python3-venv libvirt-daemon-system libvirt-clients \
        qemu-system-x86 qemu-block-extra qemu-utils openssh-server openssh-client debootstrap \
        busybox-static iproute2 nftables zstd e2fsprogs procps
DEMO_DIR ?= /var/tmp/rbdfleet-demo
PYTEST_ARGS ?=

.PHONY: setup debs venv test demo demo-down lint unit bench clean

setup: debs venv

debs:
	@missing=$$(dpkg-query -W -f='$${Package} $${Status}\n' $(DEBS) 2>/dev/null | awk '$$4!="installed"{print $$1}'; \
	  for p in $(DEBS); do dpkg-query -W $$p >/dev/null 2>&1 || echo $$p; done); \
	missing=$$(echo $$missing | tr ' ' '\n' | sort -u | tr '\n' ' '); \
	if [ -n "$${missing// /}" ]; then \
	  echo "setup: installing Debian packages: $$missing"; \
	  [ "$$(id -u)" = 0 ] || { echo "setup: must run as root to install packages" >&2; exit 1; }; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	else echo "setup: Debian packages present"; fi

$(VENV)/.stamp: pyproject.toml
	@[ -x $(PY) ] || /usr/bin/python3 -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

venv: $(VENV)/.stamp

lint: setup
	$(VENV)/bin/ruff check agents orchestrator tests bench
	$(VENV)/bin/mypy

unit: setup
	$(VENV)/bin/pytest -m unit -q $(PYTEST_ARGS)

# Lint first (ruff + mypy --strict: cheap, and CI must not forgive them), then every tier
# (unit, contract, integration, fault; vm included) in one pytest run, so the last line is
# pytest's summary. The real parts start through orchestrator.sandbox fixtures.
test: lint
	$(VENV)/bin/pytest --durations=30 $(PYTEST_ARGS)

# Every benchmark on throwaway clusters / a throwaway sandbox (each tears down what it started);
# merged into bench/results/latest.json, one line per key. QUICK=1: fewer, smaller rounds.
bench: setup
	$(PY) bench/run_all.py $(if $(QUICK),--quick,)

demo: setup
	$(PY) -m orchestrator.sandbox.demo --dir $(DEMO_DIR)

demo-down: setup
	$(VENV)/bin/rbdfleet sandbox down --dir $(DEMO_DIR)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
