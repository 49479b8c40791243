# ambit node image: the agent (with bcc from Debian) and the CNI plugin that
# the install step copies onto the host.

# --- the frozen ambit-cni (scripts/freeze-cni.sh) ------------------------------
# Hosts have no Python to run the plugin with: PyInstaller bundles the
# interpreter and the few standard modules it imports. Built on the same
# Debian as the image, so the host needs glibc 2.35 or newer.
FROM debian:12-slim AS cni-builder

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv binutils \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY requirements.txt requirements-dev.txt ./
# Only what freezing needs, at the pinned versions (h2 brings hpack, which the
# plugin uses on a rare path).
RUN python3 -m venv /src/.venv \
 && /src/.venv/bin/pip install --no-cache-dir $(grep -ihE '^(pyinstaller|h2)==' requirements.txt requirements-dev.txt)
COPY cni ./cni
COPY scripts/freeze-cni.sh ./scripts/
RUN PY=/src/.venv/bin/python bash scripts/freeze-cni.sh

# --- the node image ------------------------------------------------------------
FROM debian:12-slim

RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      python3 python3-venv python3-bpfcc iproute2 nftables python3-nftables \
      linux-headers-amd64 ca-certificates make \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/ambit
COPY requirements.txt setup.cfg setup.py pyproject.toml README.md ./
COPY proto ./proto
COPY cni ./cni
COPY agent ./agent
COPY lab ./lab
COPY waypoint ./waypoint
COPY ca ./ca
COPY cli ./cli
COPY bpf ./bpf
COPY install ./install
COPY scripts ./scripts

# bcc lives in Debian's dist-packages: the venv sees system site packages (only the
# short-lived eBPF loader imports it; the agent uses libbpf1, which bcc depends on).
RUN python3 -m venv --system-site-packages /opt/ambit/.venv \
 && /opt/ambit/.venv/bin/pip install --no-cache-dir -r requirements.txt \
 && /opt/ambit/.venv/bin/python -m grpc_tools.protoc -I proto --python_out=proto --pyi_out=proto \
      --grpc_python_out=proto proto/ambit/api/v1/agent.proto proto/ambit/api/istio/ca.proto \
 && /opt/ambit/.venv/bin/pip install --no-cache-dir --no-deps -e .

# The plugin `ambit install-cni` copies into the host's /opt/cni/bin
# (install/kubernetes/ambit.yaml runs it as the DaemonSet's init container).
COPY --from=cni-builder /src/build/cni-frozen/ambit-cni /opt/ambit/cni-plugin
ENV AMBIT_CNI_PLUGIN=/opt/ambit/cni-plugin/ambit-cni

ENV PATH=/opt/ambit/.venv/bin:$PATH
ENTRYPOINT ["ambit-agent"]
