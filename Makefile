# `make test` and `make lab` are all a newcomer needs: each prepares the host
# (Debian packages, kernel-header links, bpffs), the venv and the generated
# gRPC code first, idempotently; a second run only checks.
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
# The agent's own API, and Istio's certificate API (the same wire contract as
# istio/api security/v1alpha1/ca.proto, so the agent and istiod interoperate).
PROTOS := proto/ambit/api/v1/agent.proto proto/ambit/api/istio/ca.proto
GEN    := $(foreach p,$(PROTOS:.proto=),$(p)_pb2.py $(p)_pb2_grpc.py $(p)_pb2.pyi)
HOST_STAMP := build/.host-ready
VENV_STAMP := $(VENV)/.installed

CNI_STAGED := build/cni-bin/ambit-cni

.PHONY: setup host venv proto cni test test-fast lab bench clean distclean

setup: host venv proto cni

host: $(HOST_STAMP)
$(HOST_STAMP): scripts/setup-host.sh
	@bash scripts/setup-host.sh
	@mkdir -p build && touch $@

# bcc's Python module lives in Debian's dist-packages, hence --system-site-packages.
venv: $(VENV_STAMP)
$(VENV_STAMP): requirements.txt requirements-dev.txt setup.cfg setup.py $(HOST_STAMP)
	@test -x $(PY) || /usr/bin/python3 -m venv --system-site-packages $(VENV)
	@$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	@$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $@

proto: $(GEN)
$(GEN) &: $(PROTOS) $(VENV_STAMP)
	@$(PY) -m grpc_tools.protoc -I proto --python_out=proto --pyi_out=proto --grpc_python_out=proto $(PROTOS)
	@echo "generated $(GEN)"

# ambit-cni for this host's system Python (stdlib only, fast start-up).
cni: $(CNI_STAGED)
$(CNI_STAGED): scripts/stage-cni.sh $(wildcard cni/*.py)
	@bash scripts/stage-cni.sh

# ambit-cni for hosts with no Python: a PyInstaller one-directory build in
# build/cni-frozen/ambit-cni/ (what the image ships and install-cni copies).
CNI_FROZEN := build/cni-frozen/ambit-cni/ambit-cni
.PHONY: frozen
frozen: $(CNI_FROZEN)
$(CNI_FROZEN): scripts/freeze-cni.sh $(wildcard cni/*.py) requirements-dev.txt $(VENV_STAMP)
	@bash scripts/freeze-cni.sh --if-stale
	@touch $@

test: setup
	@bash scripts/check-host.sh
	$(PY) -m pytest -q $(PYTEST_ARGS)

lab: setup
	$(VENV)/bin/ambit lab tour

# A bench is a script (it has a __main__ block); the other modules in bench/
# (stats.py, iperf.py, envoychain.py) are helpers the benches import.
BENCHES = $(shell grep -l '^if __name__ == "__main__"' bench/*.py)
bench: setup
	for b in $(BENCHES); do $(PY) $$b --quick || exit 1; done

clean:
	rm -rf build .pytest_cache
	find . -name __pycache__ -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) $(GEN)
