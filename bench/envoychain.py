"""An Envoy HBONE chain as the anchor of a bench, with the load tool beside it.

Two throwaway "node" namespaces joined by a veth pair (bench/hbone.py's
make_nodes: pod A 10.253.1.1 on node A, pod B 10.253.1.2 on node B):

    client (node A) -> A:15103 Envoy tcp_proxy tunnel ==HBONE (mTLS, h2 CONNECT)==>
        B:15108 Envoy CONNECT terminator -> B:7000 pingpong echo server

Certificates from one local CA, TLS 1.3, ALPN h2; Envoy's default worker
count. Also offers the direct path (client -> B:7000) for comparison.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))
import hbone  # noqa: E402  (bench/hbone.py: the two-namespace topology and identities)

from tests.support import envoy  # noqa: E402

ECHO_PORT = 7000
ENTRY_PORT = 15103
HBONE_PORT = 15108


def build_pingpong(directory: Path) -> Path:
    """bench/pingpong.c, compiled into directory."""
    tool = directory / "pingpong"
    subprocess.run(["gcc", "-O2", "-o", str(tool), str(BENCH / "pingpong.c"), "-lpthread"], check=True)
    return tool


def tune_client_namespace(node: Any) -> None:
    """Many short connections from one address: the whole port range and
    TIME_WAIT reuse, in the namespace of `node` (a NetnsThread)."""
    node.run(Path("/proc/sys/net/ipv4/ip_local_port_range").write_text, "1024 65000\n")
    node.run(Path("/proc/sys/net/ipv4/tcp_tw_reuse").write_text, "1\n")


class EnvoyChain:
    """Start with `with EnvoyChain(workdir, tool) as chain:`; everything is
    stopped and both namespaces removed on exit, also after a failure."""

    def __init__(self, workdir: Path, tool: Path) -> None:
        self.workdir = workdir
        self.tool = tool
        self.procs = hbone.Processes()
        self.envoys: list[envoy.EnvoyProcess] = []
        self.names: tuple[str, str] | None = None

    @property
    def entry(self) -> tuple[str, int]:
        """Where a client on node A connects to go through the chain."""
        return hbone.POD_A, ENTRY_PORT

    @property
    def direct(self) -> tuple[str, int]:
        return hbone.POD_B, ECHO_PORT

    @property
    def pids(self) -> dict[str, int]:
        return {"envoy_client": self.envoys[1].pid, "envoy_server": self.envoys[0].pid}

    def __enter__(self) -> EnvoyChain:
        from ambit.agent.netns import NetnsThread, netns_path

        self.names = hbone.make_nodes()
        try:
            self.client_node = NetnsThread(netns_path(self.names[0]))
            self.server_node = NetnsThread(netns_path(self.names[1]))
            tune_client_namespace(self.client_node)
            ca_dir, certs = hbone.setup_identities(self.workdir)
            server_id = f"spiffe://{hbone.TRUST_DOMAIN}/ns/{hbone.SERVER_SA[0]}/sa/{hbone.SERVER_SA[1]}"
            authority = f"{hbone.POD_B}:{ECHO_PORT}"
            self.procs.start([str(self.tool), "server", hbone.POD_B, str(ECHO_PORT)], ready_line=True,
                             node=self.server_node)
            self.envoys.append(self.server_node.run(lambda: envoy.EnvoyProcess(
                envoy.server_config(certs["server"], (hbone.POD_B, HBONE_PORT),
                                    {authority: (hbone.POD_B, ECHO_PORT)}, hbone.TRUST_DOMAIN),
                self.workdir, "envoy-server")))
            self.envoys.append(self.client_node.run(lambda: envoy.EnvoyProcess(
                envoy.client_config(certs["client"], server_id, (hbone.POD_B, HBONE_PORT),
                                    {(hbone.POD_A, ENTRY_PORT): authority}, hbone.POD_A),
                self.workdir, "envoy-client")))
            self.server_node.run(self.envoys[0].wait_listening, hbone.POD_B, HBONE_PORT)
            self.client_node.run(self.envoys[1].wait_listening, hbone.POD_A, ENTRY_PORT)
        except BaseException:
            self.close()
            raise
        return self

    def spawn(self, argv: list[str], *, ready_line: bool = False, stdin: int | None = None,
              output: bool = False) -> subprocess.Popen[bytes]:
        """A load process on node A (the client side)."""
        return self.procs.start(argv, ready_line=ready_line, stdin=stdin, node=self.client_node, output=output)

    def close(self) -> None:
        from ambit.agent.netns import remove_netns

        for proxy in self.envoys:
            proxy.stop()
        self.procs.stop_all()
        for node in ("client_node", "server_node"):
            if hasattr(self, node):
                getattr(self, node).close()
        if self.names:
            for name in self.names:
                remove_netns(name)

    def __exit__(self, *exc: object) -> None:
        self.close()
