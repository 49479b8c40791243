"""ambit-agent: the node agent.

One asyncio process per node (hostNetwork, privileged). It serves the agent
API on a Unix socket for ambit-cni and ambitctl, enrols pods, and owns every
kernel object ambit creates.
"""
from __future__ import annotations

import os

# The agent never forks a copy of itself (agent/netlink.py says why); its only
# child, the eBPF loader (datapath/programs.py), is exec'd at once. gRPC's fork
# handlers are for children that go on using gRPC, which it never does.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import argparse
import asyncio
import resource
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta

import structlog

from . import __version__
from . import eventloop
from . import log as logconf
from .datapath import constants
from .datapath.backend import CAPTURE_BACKENDS, capture_backend, make_datapath, uninstall_all
from .datapath.capture import Datapath
from .datapath.errors import CaptureUnavailable, require_backend
from .datapath.nft_capture import NftDatapath
from .discovery.model import POLICY_KINDS
from .discovery.state import EVENT_REJECTED
from .discovery.report import NO_DISCOVERY, DiscoveryReport
from .enrolment import Enrolment, RecordOnly
from .identity.ca import DEFAULT_LEAF_TTL
from .identity.ca_options import add_ca_client_arguments, ca_client_settings
from .identity.istio_ca import CaClientSettings
from .mesh import MeshRuntime, MeshSettings
from .proxy.hbone.settings import HboneSettings
from .proxy.node_proxy import NodeProxy
from .rpc.cni_service import CniService
from .rpc.debug_service import DebugService, ProxyView
from .rpc.server import AgentServer, SocketInUse, prepare_socket_path
from .enrolment_records import StateStore
from .telemetry.http import HttpLimits, TelemetryServer
from .telemetry.metrics import Metrics

DEFAULT_SOCKET = "/var/run/ambit/agent.sock"
DEFAULT_STATE_DIR = "/var/run/ambit/state"
CAPTURE_MODES = (*CAPTURE_BACKENDS, "none")

log = structlog.get_logger("ambit.agent")


@dataclass(frozen=True)
class AgentConfig:
    socket: str = DEFAULT_SOCKET
    state_dir: str = DEFAULT_STATE_DIR
    node_name: str = ""
    log_level: str = "info"
    capture: str = "ebpf"
    proxy_netns: str = constants.PROXY_NETNS
    bpffs_dir: str = constants.BPFFS_ROOT
    telemetry_address: str = "0.0.0.0"
    metrics_port: int = constants.METRICS_PORT
    readiness_port: int = constants.READINESS_PORT
    discovery: str = "none"
    files: tuple[str, ...] = ()
    kubeconfig: str | None = None
    trust_domain: str = "cluster.local"
    root_namespace: str = "istio-system"
    ca_dir: str = "/var/run/ambit/ca"
    ca: CaClientSettings | None = None
    cert_ttl: timedelta = DEFAULT_LEAF_TTL
    cleanup: bool = False
    event_loop: str = "auto"
    hbone: HboneSettings = field(default_factory=HboneSettings)
    telemetry: HttpLimits = field(default_factory=HttpLimits)

    def mesh_settings(self) -> MeshSettings:
        return MeshSettings(discovery=self.discovery, node_name=self.node_name, trust_domain=self.trust_domain,
                            root_namespace=self.root_namespace, files=self.files, kubeconfig=self.kubeconfig,
                            ca_dir=self.ca_dir, ca=self.ca, cert_ttl=self.cert_ttl,
                            certs_dir=os.path.join(self.state_dir, "certs"))


def parse_args(argv: list[str] | None = None) -> AgentConfig:
    parser = argparse.ArgumentParser(
        prog="ambit-agent",
        description="ambit node agent: serves the CNI and debug API on a Unix socket, enrols pods "
                    "into the mesh and owns ambit's kernel state on this node.",
        epilog="Logs are JSON lines on stderr. SIGTERM/SIGINT stop the agent cleanly; enrolled pods "
               "stay captured while it is down (fail closed) and are re-adopted on the next start.")
    parser.add_argument("--socket", default=os.environ.get("AMBIT_AGENT_SOCKET", DEFAULT_SOCKET),
                        help="agent API socket, created with mode 0600 (default: %(default)s; env AMBIT_AGENT_SOCKET)")
    parser.add_argument("--state-dir", default=os.environ.get("AMBIT_STATE_DIR", DEFAULT_STATE_DIR),
                        help="where enrolment records are kept across agent restarts (default: %(default)s)")
    parser.add_argument("--node-name", default=os.environ.get("NODE_NAME", ""),
                        help="this node's name (default: $NODE_NAME, else the hostname)")
    parser.add_argument("--log-level", default=os.environ.get("AMBIT_LOG_LEVEL", "info"),
                        choices=["debug", "info", "warn", "error"], help="log level (default: %(default)s)")
    parser.add_argument("--capture", default=os.environ.get("AMBIT_CAPTURE", "ebpf"), choices=CAPTURE_MODES,
                        help="how enrolled pods' traffic is captured: ebpf = tc programs on each pod's veth "
                             "steering TCP into the proxy namespace; nftables = nftables sets, a policy route "
                             "and TPROXY (for hosts without eBPF); none = record pods only "
                             "(default: %(default)s)")
    parser.add_argument("--proxy-netns", default=constants.PROXY_NETNS,
                        help="name of the proxy's network namespace (default: %(default)s)")
    parser.add_argument("--bpffs-dir", default=constants.BPFFS_ROOT,
                        help="where the eBPF maps are pinned (default: %(default)s)")
    parser.add_argument("--telemetry-address", default="0.0.0.0",
                        help="address for the metrics and readiness ports (default: %(default)s)")
    parser.add_argument("--metrics-port", type=int, default=constants.METRICS_PORT,
                        help="Prometheus /metrics port (default: %(default)s)")
    parser.add_argument("--readiness-port", type=int, default=constants.READINESS_PORT,
                        help="/healthz/ready port for the kubelet (default: %(default)s)")
    mesh = parser.add_argument_group("mesh", "where workloads, services and policies come from, and identities")
    mesh.add_argument("--discovery", choices=("none", "files", "kube"),
                      default=os.environ.get("AMBIT_DISCOVERY", "none"),
                      help="none: no identities, plain relay (capture tests only); files: Kubernetes objects "
                           "from --config-file; kube: list/watch the API server (default: %(default)s)")
    mesh.add_argument("--config-file", action="append", default=[], metavar="PATH",
                      help="YAML/JSON file or directory of Kubernetes objects for --discovery files "
                           "(repeatable; reloaded on change)")
    mesh.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG") or None,
                      help="kubeconfig for --discovery kube (default: in-cluster service account)")
    mesh.add_argument("--trust-domain", default=os.environ.get("AMBIT_TRUST_DOMAIN", "cluster.local"),
                      help="SPIFFE trust domain (default: %(default)s)")
    mesh.add_argument("--root-namespace", default="istio-system",
                      help="mesh-wide policy namespace (default: %(default)s)")
    identity = parser.add_argument_group(
        "identity", "workload keys are made on this node; certificates come from a CA over Istio's certificate "
                    "API (--ca-address), or, without one, from a CA key on this host (--ca-dir)")
    add_ca_client_arguments(identity, who="the agent")
    identity.add_argument("--ca-dir", default=os.environ.get("AMBIT_CA_DIR", "/var/run/ambit/ca"),
                          help="without --ca-address: directory with ca-cert.pem/ca-key.pem; a CA is created there "
                               "if absent. Every node of a mesh must use the same CA (default: %(default)s)")
    identity.add_argument("--cert-ttl", type=float, default=DEFAULT_LEAF_TTL.total_seconds(), metavar="SECONDS",
                          help="lifetime asked for workload certificates; each is replaced at half the lifetime "
                               "it got (default: %(default)s)")
    limits = parser.add_argument_group("limits", "what a hostile peer can make the agent hold (HBONE on 15008, "
                                                 "metrics and readiness on 15020/15021)")
    defaults = HboneSettings()
    limits.add_argument("--hbone-max-connections", type=int, default=defaults.max_connections,
                        help="connections to 15008 at once, handshaking or established (default: %(default)s)")
    limits.add_argument("--hbone-max-connections-per-peer", type=int, default=defaults.max_connections_per_peer,
                        help="connections to 15008 at once from one peer address (default: %(default)s)")
    limits.add_argument("--hbone-max-pending-handshakes", type=int, default=defaults.max_pending_handshakes,
                        help="TLS handshakes in progress on 15008; over it the oldest is dropped "
                             "(default: %(default)s)")
    limits.add_argument("--hbone-max-outbound-control-frames", type=int,
                        default=defaults.max_outbound_control_frames,
                        help="PING/SETTINGS acknowledgements queued for a peer that does not read them before "
                             "GOAWAY ENHANCE_YOUR_CALM, as Envoy's max_outbound_control_frames "
                             "(default: %(default)s)")
    limits.add_argument("--hbone-max-write-queue", type=int, default=defaults.max_write_queue, metavar="BYTES",
                        help="bytes queued for one HBONE peer beyond which we stop reading it until it reads "
                             "(default: %(default)s)")
    http_defaults = HttpLimits()
    limits.add_argument("--telemetry-max-connections", type=int, default=http_defaults.max_connections,
                        help="connections held per metrics/readiness port; a new one displaces the longest idle "
                             "(default: %(default)s)")
    limits.add_argument("--telemetry-request-timeout", type=float, default=http_defaults.request_timeout_s,
                        metavar="SECONDS", help="for a metrics/readiness client to send its request "
                                                "(default: %(default)s)")
    parser.add_argument("--event-loop", default=os.environ.get("AMBIT_EVENT_LOOP", "auto"), choices=eventloop.CHOICES,
                        help="event loop: uvloop (libuv, less proxy latency per hop), asyncio, or auto = uvloop "
                             "when installed (default: %(default)s)")
    parser.add_argument("--cleanup", action="store_true",
                        help="remove everything ambit made in this node's kernel (capture on every pod, "
                             "the proxy namespace, pinned maps, enrolment records) and exit")
    parser.add_argument("--version", action="version", version=f"ambit-agent {__version__}")
    args = parser.parse_args(argv)
    if args.discovery == "files" and not args.config_file:
        parser.error("--discovery files needs at least one --config-file")
    if not 75 <= args.cert_ttl <= 365 * 86400:  # below, the CA's backdating would make it due at once
        parser.error("--cert-ttl must be between 75 seconds and a year")
    try:
        hbone = HboneSettings(max_connections=args.hbone_max_connections,
                              max_connections_per_peer=args.hbone_max_connections_per_peer,
                              max_pending_handshakes=args.hbone_max_pending_handshakes,
                              max_outbound_control_frames=args.hbone_max_outbound_control_frames,
                              max_write_queue=args.hbone_max_write_queue)
        telemetry = HttpLimits(max_connections=args.telemetry_max_connections,
                               request_timeout_s=args.telemetry_request_timeout)
    except ValueError as exc:
        parser.error(str(exc))
    return AgentConfig(socket=args.socket, state_dir=args.state_dir,
                       node_name=args.node_name or socket.gethostname(), log_level=args.log_level,
                       capture=args.capture, proxy_netns=args.proxy_netns, bpffs_dir=args.bpffs_dir,
                       telemetry_address=args.telemetry_address, metrics_port=args.metrics_port,
                       readiness_port=args.readiness_port, discovery=args.discovery,
                       files=tuple(args.config_file), kubeconfig=args.kubeconfig, trust_domain=args.trust_domain,
                       root_namespace=args.root_namespace, ca_dir=args.ca_dir, ca=ca_client_settings(args),
                       cert_ttl=timedelta(seconds=args.cert_ttl), cleanup=args.cleanup, event_loop=args.event_loop,
                       hbone=hbone, telemetry=telemetry)


class Agent:
    """Wires the parts together and runs until told to stop."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.started_at = time.time()
        self.store = StateStore(config.state_dir)
        self.metrics = Metrics()
        self.enrolment = Enrolment(self.store, RecordOnly(), on_capture_failure=self.metrics.ebpf_attach_failures.inc)
        self.metrics.enrolled_pods.set_function(self.enrolment.enrolled_count)
        self.telemetry = TelemetryServer(self.metrics.registry, self.readiness, config.telemetry_address,
                                         config.metrics_port, config.readiness_port, config.telemetry)
        self.datapath: Datapath | NftDatapath | None = None
        self.proxy: NodeProxy | None = None
        self.mesh = MeshRuntime(config.mesh_settings(), self.enrolment.workload_by_ip) \
            if config.discovery != "none" else None
        if self.mesh is not None:
            for kind in POLICY_KINDS:
                self.metrics.policies_rejected.labels(kind).set(0)
            self.mesh.state.subscribe(self._count_rejected)
        self._ready = False
        self._not_ready_reason = "starting"
        self.server = AgentServer(
            config.socket,
            CniService(self.enrolment, self.readiness,
                       lambda method, seconds: self.metrics.cni_rpc_seconds.labels(method).observe(seconds)),
            DebugService(self.enrolment, config.node_name, self.started_at, self.readiness, self.proxy_view,
                         lambda: self.mesh, self.discovery_report))

    def _count_rejected(self, kind: str, event: str, old: object, new: object) -> None:
        """ambit_policies_rejected follows the state's rejections (on the loop, as they happen)."""
        if event == EVENT_REJECTED and (old is None) != (new is None):
            self.metrics.policies_rejected.labels(kind).inc(1 if old is None else -1)

    def proxy_view(self) -> ProxyView:
        if self.proxy is None:
            return ProxyView(capture=self.config.capture, proxy_netns="", listeners=lambda: [],
                             connections=lambda: ())
        proxy = self.proxy
        return ProxyView(capture=self.config.capture, proxy_netns=self.config.proxy_netns,
                         listeners=proxy.listener_names, connections=proxy.connections.snapshot,
                         failed_closed=self.metrics.failed_closed_by_reason)

    def discovery_report(self) -> DiscoveryReport:
        return self.mesh.report() if self.mesh is not None else NO_DISCOVERY

    def readiness(self) -> tuple[bool, str]:
        if not self._ready:
            return False, self._not_ready_reason
        if self.mesh is not None and not self.mesh.settled:
            pending = self.mesh.pending()
            if pending:
                return False, (f"discovery ({self.config.discovery}) has not synced, new connections are refused: "
                               f"{pending}")
            return False, "discovery synced; matching the enrolment records against the labels"
        return True, "ready"

    async def run(self, stop: asyncio.Event) -> None:
        # Refuse before touching the records: a second agent (another
        # namespace, a hand-started copy) would otherwise reconcile them and
        # release the pods the serving agent owns.
        prepare_socket_path(self.config.socket)
        self.store.open()
        try:
            self.telemetry.start()
        except OSError as exc:
            raise SocketInUse(f"cannot serve metrics/readiness on ports {self.config.metrics_port}/"
                              f"{self.config.readiness_port}: {exc.strerror}") from None
        if self.mesh is not None:
            self._not_ready_reason = f"loading {self.config.discovery} discovery"
            await self.mesh.start()
            self.mesh.follow(self.enrolment)
        if self.config.capture in CAPTURE_BACKENDS:
            await self._start_datapath()
        await self.enrolment.reconcile()
        await self.server.start()
        self._ready = True
        settling = asyncio.get_running_loop().create_task(self.mesh.settle(self.enrolment)) if self.mesh else None
        log.info("agent serving", node=self.config.node_name, version=__version__, capture=self.config.capture,
                 enrolled=len(self.enrolment.workloads()), event_loop=eventloop.current_name(),
                 ready=self.readiness()[0])
        try:
            await stop.wait()
        finally:
            self._ready = False
            self._not_ready_reason = "stopping"
            log.info("agent stopping")
            if settling is not None:
                settling.cancel()
            await self.server.stop()
            if self.proxy is not None:
                await self.proxy.stop()
            if self.datapath is not None:
                # Capture stays in force: enrolled pods fail closed until an
                # agent is back, never bypass the mesh.
                self.datapath.close()
            if self.mesh is not None:
                await self.mesh.stop()
            self.telemetry.stop()
            log.info("agent stopped")

    async def _start_datapath(self) -> None:
        """Listeners first, then the programs: after a restart the pods'
        filters (kept by the kernel) already steer to these listeners, so
        captured pods are served again before the ~1 s compile is done."""
        self.datapath = make_datapath(self.config.capture, proxy_netns=self.config.proxy_netns,
                                      pin_dir=self.config.bpffs_dir)
        self._not_ready_reason = "creating the proxy namespace"
        await asyncio.to_thread(self.datapath.proxy_ns.ensure)
        self.proxy = NodeProxy(self.datapath.proxy_ns.path, self.metrics, self.enrolment.workload_by_ip,
                               self.mesh.mesh if self.mesh is not None else None, hbone=self.config.hbone)
        await self.proxy.start()
        self._not_ready_reason = f"installing the {self.config.capture} datapath"
        await asyncio.to_thread(self.datapath.install)
        self.enrolment.backend = capture_backend(self.datapath)


async def _serve(config: AgentConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        log.info("signal received", signal=sig.name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    await Agent(config).run(stop)


def cleanup(config: AgentConfig) -> None:
    """Remove ambit's kernel state and records for this node (uninstall)."""
    uninstall_all(proxy_netns=config.proxy_netns, pin_dir=config.bpffs_dir)  # whichever backend ran
    store = StateStore(config.state_dir)
    for workload in store.load_all():
        store.delete(workload.key)
    log.info("cleaned up", proxy_netns=config.proxy_netns, bpffs_dir=config.bpffs_dir)


def raise_open_files_limit(config: AgentConfig) -> None:
    """Soft RLIMIT_NOFILE up to the hard limit (as ztunnel does): every proxied
    connection takes two descriptors and the caps on 15008 assume they exist.
    Warns when the hard limit cannot hold --hbone-max-connections."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    limit = hard if hard != resource.RLIM_INFINITY else None
    if limit is not None and limit < 2 * config.hbone.max_connections + 1024:
        log.warning("open files limit below what --hbone-max-connections needs", open_files=limit,
                    hbone_max_connections=config.hbone.max_connections)


def main(argv: list[str] | None = None) -> None:
    config = parse_args(argv)
    logconf.configure(config.log_level)
    if config.cleanup:
        cleanup(config)
        return
    try:
        raise_open_files_limit(config)
        require_backend(config.capture)
        eventloop.run(_serve(config), config.event_loop)
    except (SocketInUse, CaptureUnavailable, eventloop.EventLoopUnavailable) as exc:
        log.error("cannot start", error=str(exc))
        sys.exit(2)
    except PermissionError as exc:
        log.error("cannot start: permission denied (ambit-agent must run as root)", error=str(exc))
        sys.exit(2)


if __name__ == "__main__":
    main()
