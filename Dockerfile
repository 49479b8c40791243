# ambit node image: the agent (with bcc from Debian) and the CNI plugin that
# the install step copies onto the host.
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
COPY bpf ./bpf
COPY install ./install
COPY scripts ./scripts

# bcc lives in Debian's dist-packages: the venv sees system site packages.
RUN python3 -m venv --system-site-packages /opt/ambit/.venv \
 && /opt/ambit/.venv/bin/pip install --no-cache-dir -r requirements.txt \
 && /opt/ambit/.venv/bin/python -m grpc_tools.protoc -I proto --python_out=proto --pyi_out=proto \
      --grpc_python_out=proto proto/ambit/api/v1/agent.proto \
 && /opt/ambit/.venv/bin/pip install --no-cache-dir --no-deps -e .

ENV PATH=/opt/ambit/.venv/bin:$PATH
ENTRYPOINT ["ambit-agent"]
