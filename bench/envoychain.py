"""An Envoy HBONE chain as the anchor of a bench, with the load tool beside it.

    client -> entry: Envoy tcp_proxy tunnel ==HBONE (mTLS, h2 CONNECT)==>
        Envoy CONNECT terminator -> target (a pingpong echo server)

By default on two throwaway "node" namespaces joined by a veth pair
(bench/hbone.py's make_nodes: pod A 10.253.1.1 on node A, pod B 10.253.1.2
on node B, entry A:15103, terminator B:15108, echo server B:7000). Or placed
(`EnvoyPlacement`) in existing namespaces, e.g. a lab's nodes, so its
packets cross the same network as the mesh's. Certificates from one local
CA, TLS 1.3, ALPN h2; Envoy's default worker count.
"""
from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
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


@dataclass(frozen=True)
class EnvoyPlacement:
    """Where the chain runs when it is not on its own namespaces."""

    client_node: Any                 # NetnsThread: the tunnel Envoy and the load tool run here
    server_node: Any                 # NetnsThread: the terminator runs here
    entry: tuple[str, int]           # where the tunnel Envoy listens (clients connect here)
    hbone: tuple[str, int]           # where the terminator listens
    source_ip: str                   # the tunnel Envoy's address towards the terminator
    target: tuple[str, int]          # what the terminator connects to (a running echo server)


class EnvoyChain:
    """Start with `with EnvoyChain(workdir, tool) as chain:`; everything is
    stopped (and its own namespaces removed) on exit, also after a failure."""

    def __init__(self, workdir: Path, tool: Path, placement: EnvoyPlacement | None = None) -> None:
        self.workdir = workdir
        self.tool = tool
        self.placement = placement
        self.procs = hbone.Processes()
        self.envoys: list[envoy.EnvoyProcess] = []
        self.names: tuple[str, str] | None = None

    @property
    def entry(self) -> tuple[str, int]:
        """Where a client on the client node connects to go through the chain."""
        return self.placement.entry if self.placement else (hbone.POD_A, ENTRY_PORT)

    @property
    def pids(self) -> dict[str, int]:
        return {"envoy_client": self.envoys[1].pid, "envoy_server": self.envoys[0].pid}

    def __enter__(self) -> EnvoyChain:
        from ambit.agent.netns import NetnsThread, netns_path

        try:
            placement = self.placement
            if placement is None:
                self.names = hbone.make_nodes()
                placement = EnvoyPlacement(
                    NetnsThread(netns_path(self.names[0])), NetnsThread(netns_path(self.names[1])),
                    entry=(hbone.POD_A, ENTRY_PORT), hbone=(hbone.POD_B, HBONE_PORT), source_ip=hbone.POD_A,
                    target=(hbone.POD_B, ECHO_PORT))
                self._own_threads = (placement.client_node, placement.server_node)
                self.procs.start([str(self.tool), "server", hbone.POD_B, str(ECHO_PORT)], ready_line=True,
                                 node=placement.server_node)
            self.client_node, self.server_node = placement.client_node, placement.server_node
            tune_client_namespace(self.client_node)
            # The terminator opens one connection per tunnel to the one target from here: without
            # this, TIME_WAIT fills the port range over a few runs and each connect() searches it
            # longer (measured: the server Envoy's system CPU per connection 0.3 -> 2 ms).
            tune_client_namespace(self.server_node)
            ca_dir, certs = hbone.setup_identities(self.workdir)
            server_id = f"spiffe://{hbone.TRUST_DOMAIN}/ns/{hbone.SERVER_SA[0]}/sa/{hbone.SERVER_SA[1]}"
            authority = f"{placement.target[0]}:{placement.target[1]}"
            self.envoys.append(self.server_node.run(lambda: envoy.EnvoyProcess(
                envoy.server_config(certs["server"], placement.hbone, {authority: placement.target},
                                    hbone.TRUST_DOMAIN),
                self.workdir, "envoy-server")))
            self.envoys.append(self.client_node.run(lambda: envoy.EnvoyProcess(
                envoy.client_config(certs["client"], server_id, placement.hbone, {placement.entry: authority},
                                    placement.source_ip),
                self.workdir, "envoy-client")))
            self.server_node.run(self.envoys[0].wait_listening, *placement.hbone)
            self.client_node.run(self.envoys[1].wait_listening, *placement.entry)
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
        for thread in getattr(self, "_own_threads", ()):
            thread.close()
        if self.names:
            for name in self.names:
                remove_netns(name)

    def __exit__(self, *exc: object) -> None:
        self.close()
