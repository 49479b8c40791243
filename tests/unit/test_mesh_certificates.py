"""The agent's mesh wiring asks the CA for exactly its node's pods in the mesh,
as soon as discovery shows them, and forgets identities whose pods left.

Discovery from a file, the CA a grpcio server from the same proto.
"""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

from ambit.agent.identity.ca import LocalCA
from ambit.agent.identity.istio_ca import CaClientSettings
from ambit.agent.identity.spiffe import SpiffeId
from ambit.agent.mesh import MeshRuntime, MeshSettings
from tests.support.istio_ca_server import SERVER_NAME, scripted_ca
from tests.support.waiting import until

TD = "cluster.local"


def pod(name: str, sa: str, node: str, ambient: bool = True, phase: str = "Running") -> dict:
    labels = {"istio.io/dataplane-mode": "ambient"} if ambient else {}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"namespace": "shop", "name": name, "labels": labels},
            "spec": {"serviceAccountName": sa, "nodeName": node, "containers": [{"name": "c"}]},
            "status": {"phase": phase}}


def write(path: Path, pods: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}}, *pods]}))
    tmp.replace(path)


def test_the_node_fetches_certificates_for_its_mesh_pods_and_drops_departed_ones(tmp_path: Path) -> None:
    mesh_ca = LocalCA.create(TD)
    cluster = tmp_path / "cluster.json"
    write(cluster, [pod("cart-1", "cart", "node1"), pod("web-1", "web", "node2"),
                    pod("legacy-1", "legacy", "node1", ambient=False), pod("job-1", "job", "node1", phase="Failed")])
    (tmp_path / "token").write_text("agent-token")
    (tmp_path / "root.pem").write_bytes(mesh_ca.trust_bundle_pem)

    async def scenario() -> None:
        async with scripted_ca(mesh_ca) as endpoint:
            ca = CaClientSettings(address=endpoint.address, token_file=tmp_path / "token",
                                  root_cert_file=tmp_path / "root.pem", server_name=SERVER_NAME)
            runtime = MeshRuntime(MeshSettings(discovery="files", node_name="node1", files=(str(cluster),), ca=ca,
                                               certs_dir=str(tmp_path / "certs")))
            await runtime.start()
            try:
                store = runtime.mesh.certificates
                cart, admin = SpiffeId(TD, "shop", "cart"), SpiffeId(TD, "shop", "admin")
                await until(lambda: store.identities() == [cart], "cart's certificate")
                assert [r.impersonated for r in endpoint.servicer.received] == [str(cart)]
                assert store.status()[0].issuer == f"Istio CA at {endpoint.address}"

                # A pod scheduled here gets its certificate before its first connection;
                # the cart pods left, and with them the cart key.
                write(cluster, [pod("admin-1", "admin", "node1"), pod("web-1", "web", "node2")])
                await runtime.source.reload()
                await until(lambda: store.identities() == [admin], "admin's certificate, and cart's gone")
                assert not store.paths(cart).key_file.exists()
            finally:
                await runtime.stop()
    asyncio.run(asyncio.wait_for(scenario(), 30))
