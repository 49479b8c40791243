"""`ambit lab` with `--capture nftables`: two nodes whose agents capture
with nftables, a client pod on node 1 calling a server on node 2 through
both proxies (HBONE between them), the server seeing the client's own
address. Prefix `nftl-`, ranges 10.232.254.0/24 (underlay) and
10.233.128.0/17 (pods), so it never meets the other lab tests."""
from __future__ import annotations

import json
import sys

import pytest

from ambit.agent.cli.client import AgentClient
from ambit.lab import labconfig
from ambit.lab.plan import LabSettings
from ambit.lab.processes import lab_namespaces, lab_processes
from ambit.lab.topology import Lab
from tests.support import nftstate
from tests.support.bpffs import lab_bpffs_root

pytestmark = pytest.mark.kernel

PREFIX = "nftl-"
WORKLOAD = [sys.executable, "-m", "ambit.lab.podapp"]


@pytest.fixture
def nft_lab(tmp_path):
    with lab_bpffs_root(PREFIX) as bpffs_root:  # the lab wants one; nftables pins nothing
        assert not lab_namespaces(PREFIX), "a previous run left nftl- namespaces: `ambit lab down --prefix nftl-`"
        lab = Lab(LabSettings(prefix=PREFIX, state_dir=tmp_path / "lab", underlay_cidr="10.232.254.0/24",
                              pod_supernet="10.233.128.0/17", bpffs_root=bpffs_root, capture="nftables"))
        try:
            yield lab
        finally:
            lab.down()
        assert lab_namespaces(PREFIX) == () and lab_processes(PREFIX) == ()


def test_nftables_lab_keeps_the_clients_address_across_nodes(nft_lab):
    nft_lab.up(labconfig.generated_config(2, 1))
    status = nft_lab.status()
    ips = {p.key: p.ip for p in status.pods}
    for node in status.nodes:
        with AgentClient(node.socket, timeout=5.0) as client:
            assert client.status().capture == "nftables"
        objects = nftstate.ambit_objects(node.netns)
        assert objects["tables"] == ["bridge", "ip"]
        pod = next(p for p in status.pods if p.node == node.name)
        assert f"pods {pod.ip}" in objects["elements"]   # the node's enrolled pod is steered

    result = nft_lab.exec("lab/node1-pod0", [*WORKLOAD, "get", f"http://{ips['lab/node2-pod0']}:8080/"], timeout=20)
    assert result.returncode == 0, result.stderr.decode()
    answer = json.loads(result.stdout)
    assert (answer["pod"], answer["peer"]) == ("lab/node2-pod0", ips["lab/node1-pod0"])
