"""`ambit lab` with `--capture nftables`: two nodes whose agents capture
with nftables, a client pod on node 1 calling a server on node 2 through
both proxies (HBONE between them), the server seeing the client's own
address. Prefix `nftl-` (tests/kernel/conftest.py)."""
from __future__ import annotations

import json
import sys

import pytest

from ambit.agent.cli.client import AgentClient
from ambit.lab import labconfig
from tests.support import nftstate

pytestmark = pytest.mark.kernel

WORKLOAD = [sys.executable, "-m", "ambit.lab.podapp"]


@pytest.fixture
def nft_lab(lab_factory):
    with lab_factory.lab("nftl", capture="nftables") as lab:  # nftables pins nothing, the check still runs
        yield lab


def test_nftables_lab_keeps_the_clients_address_across_nodes(nft_lab):
    nft_lab.up(labconfig.generated_config(2, 1))
    status = nft_lab.status()
    ips = {p.key: p.ip for p in status.pods}
    for node in status.nodes:
        with AgentClient(node.socket, timeout=5.0) as client:
            assert client.status().capture == "nftables"
        objects = nftstate.ambit_objects(node.netns)
        assert objects["tables"] == ["bridge", "ip", "ip6"]
        pod = next(p for p in status.pods if p.node == node.name)
        assert f"pods {pod.ip}" in objects["elements"]   # the node's enrolled pod is steered

    result = nft_lab.exec("lab/node1-pod0", [*WORKLOAD, "get", f"http://{ips['lab/node2-pod0']}:8080/"], timeout=20)
    assert result.returncode == 0, result.stderr.decode()
    answer = json.loads(result.stdout)
    assert (answer["pod"], answer["peer"]) == ("lab/node2-pod0", ips["lab/node1-pod0"])
