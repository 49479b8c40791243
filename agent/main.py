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
from .identity.ca_options import add_ca_client_arguments, ca_client_settings
from .identity.istio_ca import CaClientSettings
from .identity.validity import DEFAULT_LEAF_TTL
from .lifecycle.handover import (HandoverClient, HandoverOffer, HandoverRefused, PredecessorGone,
                                 handover_path)
from .lifecycle.drift import DriftRepair
from .lifecycle.grace import drain_seconds_for_grace, own_pod_grace
from .lifecycle.messages import HandoverProtocolError, Hello, NodeSettings
from .mesh import MeshRuntime, MeshSettings
from .proxy.hbone.settings import HboneSettings
from .proxy.listeners import ListenerKind
from .proxy.node_proxy import NodeProxy
from .rpc.cni_service import CniService
from .rpc.debug_service import DebugService, ProxyView
from .rpc.server import AgentServer, SocketInUse, SocketServed, prepare_socket_path
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
    drain_seconds: float | None = None  # None: from the pod's termination grace period (lifecycle/grace.py)

    def mesh_settings(self) -> MeshSettings:
        return MeshSettings(discovery=self.discovery, node_name=self.node_name, trust_domain=self.trust_domain,
                            root_namespace=self.root_namespace, files=self.files, kubeconfig=self.kubeconfig,
                            ca_dir=self.ca_dir, ca=self.ca, cert_ttl=self.cert_ttl,
                            certs_dir=os.path.join(self.state_dir, "certs"))


def _env_float(name: str) -> float | None:
    value = os.environ.get(name)
    return float(value) if value else None


def parse_args(argv: list[str] | None = None) -> AgentConfig:
    parser = argparse.ArgumentParser(
        prog="ambit-agent",
        description="ambit node agent: serves the CNI and debug API on a Unix socket, enrols pods "
                    "into the mesh and owns ambit's kernel state on this node.",
        epilog="Logs are JSON lines on stderr. SIGTERM/SIGINT drain the agent: it stops accepting, "
               "sends GOAWAY and relays what it has up to --drain-seconds (a second signal cuts that "
               "short); enrolled pods stay captured while no agent runs (fail closed) and the next one "
               "adopts them. An agent started while another serves the node takes over from it without "
               "dropping a connection (docs/lifecycle.md).")
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
    parser.add_argument("--drain-seconds", type=float, default=_env_float("AMBIT_DRAIN_SECONDS"),
                        help="on SIGTERM or after a hand-over, how long the connections being served may take "
                             "to end before they are reset (env AMBIT_DRAIN_SECONDS; default: the agent's own "
                             "pod's terminationGracePeriodSeconds minus 5, read with --discovery kube when "
                             "POD_NAME and POD_NAMESPACE are set, else 25)")
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
                       hbone=hbone, telemetry=telemetry, drain_seconds=args.drain_seconds)


class Agent:
    """Wires the parts together and runs until told to stop."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.started_at = time.time()
        self.store = StateStore(config.state_dir)
        self.metrics = Metrics()
        self.enrolment = Enrolment(self.store, RecordOnly(), on_capture_failure=self.metrics.ebpf_attach_failures.inc)
        self.metrics.enrolled_pods.set_function(self.enrolment.enrolled_count)
        self.metrics.watch_capture(self.capture_verdicts)
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
        self.handover: HandoverOffer | None = None
        self._handed_over = asyncio.Event()
        self._successor: int | None = None
        self._stopping = False
        self._settling: asyncio.Task[None] | None = None
        self.drift: DriftRepair | None = None
        self.drain_seconds = drain_seconds_for_grace(None) if config.drain_seconds is None else config.drain_seconds
        self.cni_gate = asyncio.Event()  # set once the records are ours (CNI calls wait for it)
        self.server = AgentServer(
            config.socket,
            CniService(self.enrolment, self.readiness,
                       lambda method, seconds: self.metrics.cni_rpc_seconds.labels(method).observe(seconds),
                       gate=self.cni_gate),
            DebugService(self.enrolment, config.node_name, self.started_at, self.readiness, self.proxy_view,
                         lambda: self.mesh, self.discovery_report, self.phase,
                         lambda: self.drift.report if self.drift is not None else None))

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
                         failed_closed=self.metrics.failed_closed_by_reason, verdicts=self.capture_verdicts)

    def discovery_report(self) -> DiscoveryReport:
        return self.mesh.report() if self.mesh is not None else NO_DISCOVERY

    def phase(self) -> tuple[str, int]:
        """Where this agent is in its life, and the successor it handed over to."""
        if self._stopping:
            return "draining", self._successor or 0
        if self.enrolment.frozen:
            return "handing-over", 0
        return ("serving" if self._ready else "starting"), 0

    def capture_verdicts(self) -> dict[str, int]:
        """The datapath's packet counters per verdict (empty before install)."""
        datapath = self.datapath
        if datapath is None or isinstance(self.enrolment.backend, RecordOnly):
            return {}
        return datapath.verdict_counts()

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

    async def run(self, stop: asyncio.Event, hurry: asyncio.Event | None = None) -> None:
        """Serve until `stop` (SIGTERM) or a successor has taken over, then
        drain; `hurry` (a second signal) cuts the drain short."""
        hurry = hurry or asyncio.Event()
        # Refuse before touching the records: a second agent (another
        # namespace, a hand-started copy) would otherwise reconcile them and
        # release the pods the serving agent owns. One the serving agent
        # agrees to hand over to is the exception (docs/lifecycle.md).
        predecessor = await self._find_predecessor()
        try:
            await self._start(predecessor)
        except BaseException:
            if predecessor is not None:
                predecessor.close()  # before `ready`: the serving agent carries on
            raise
        self.handover = HandoverOffer(handover_path(self.config.socket), self.node_settings(), __version__, self)
        try:
            self.handover.start()
        except OSError as exc:
            log.warning("no hand-over offered: upgrades will restart this agent instead", error=str(exc))
        try:
            await _first(stop, self._handed_over)
        finally:
            await self._shutdown(hurry)

    async def _find_predecessor(self) -> HandoverClient | None:
        """None when the socket path is free (or stale); a hand-over session
        when another agent serves it and agrees to hand over."""
        try:
            prepare_socket_path(self.config.socket)
            return None
        except SocketServed as exc:
            served = exc
        hello = Hello(os.getpid(), __version__, self.node_settings())
        try:
            client = await HandoverClient.connect(handover_path(self.config.socket), hello)
        except HandoverRefused as exc:
            raise SocketInUse(f"{served}, and it refused to hand over: {exc}") from None
        except (OSError, HandoverProtocolError) as exc:
            raise SocketInUse(f"{served}, and offers no hand-over ({exc})") from None
        log.info("taking over from the serving agent", predecessor_pid=client.predecessor_pid,
                 predecessor_version=client.predecessor_version)
        return client

    async def _start(self, predecessor: HandoverClient | None) -> None:
        self.store.open()
        if predecessor is None:
            self._start_telemetry()
        if self.mesh is not None:
            self._not_ready_reason = f"loading {self.config.discovery} discovery"
            await self.mesh.start()
            self.mesh.follow(self.enrolment)
        self.drain_seconds = await self._drain_deadline()
        adopted: dict[str, socket.socket] = {}
        if self.config.capture in CAPTURE_BACKENDS:
            self.datapath = make_datapath(self.config.capture, proxy_netns=self.config.proxy_netns,
                                          pin_dir=self.config.bpffs_dir)
            self._not_ready_reason = "creating the proxy namespace"
            await asyncio.to_thread(self.datapath.proxy_ns.ensure)
            if predecessor is None:
                # Listeners first, then the programs: after a restart the
                # pods' filters (kept by the kernel) already steer to these
                # listeners, so captured pods are served again before the
                # ~1 s compile is done.
                await self._start_proxy({})
                await self._install_datapath()
            else:
                # The predecessor serves until we have its sockets: compile
                # first, so the time it is frozen stays short.
                await self._install_datapath()
        if predecessor is not None:
            await self.server.start(take_over=True)  # CNI calls now wait for the records (cni_gate)
            try:
                adopted = await predecessor.take_sockets()
            except PredecessorGone as exc:
                log.warning("the serving agent went away during the hand-over: starting afresh", error=str(exc))
            self._start_telemetry(adopted)
            if self.datapath is not None:
                await self._start_proxy({kind: adopted[kind.value] for kind in ListenerKind if kind.value in adopted})
        self._not_ready_reason = "reconciling enrolment records"
        orphans = await self.enrolment.reconcile()
        self.drift = DriftRepair(self.enrolment, self.config.node_name, self.mesh,
                                 on_report=lambda r: self.metrics.pods_not_captured.set(len(r.not_captured)),
                                 on_adopted=lambda origin: self.metrics.pods_adopted.labels(origin).inc())
        await self.drift.rebuild(orphans)  # before serving: a lost record must not look like a missing pod
        self.drift.start()
        if predecessor is None:
            await self.server.start()
        self._ready = True
        self.cni_gate.set()
        if self.mesh is not None:
            self._settling = asyncio.get_running_loop().create_task(self._settle())
        log.info("agent serving", node=self.config.node_name, version=__version__, capture=self.config.capture,
                 enrolled=len(self.enrolment.workloads()), event_loop=eventloop.current_name(),
                 ready=self.readiness()[0], took_over_from=predecessor.predecessor_pid if predecessor else None)
        if self.mesh is None:
            log.info("agent ready", node=self.config.node_name, enrolled=len(self.enrolment.workloads()))
        if predecessor is not None:
            draining = await predecessor.ready()
            log.info("the previous agent stopped accepting", predecessor_pid=predecessor.predecessor_pid,
                     draining=draining)

    async def _drain_deadline(self) -> float:
        if self.config.drain_seconds is not None:
            return self.config.drain_seconds
        grace = None
        name, namespace = os.environ.get("POD_NAME"), os.environ.get("POD_NAMESPACE")
        if self.mesh is not None and self.mesh.api_client is not None and name and namespace:
            grace = await own_pod_grace(self.mesh.api_client, namespace, name)
        seconds = drain_seconds_for_grace(grace)
        log.info("drain deadline", seconds=seconds, termination_grace_s=grace)
        return seconds

    async def _settle(self) -> None:
        """Once discovery has synced: records follow the labels, and pods
        that were running before ambit was chained join the mesh."""
        assert self.mesh is not None and self.drift is not None
        await self.mesh.settle(self.enrolment)
        # The moment readiness turns true (bench/memory.py measures start to ready from it).
        log.info("agent ready", node=self.config.node_name, enrolled=len(self.enrolment.workloads()))
        await self.drift.check()

    def _start_telemetry(self, adopt: dict[str, socket.socket] | None = None) -> None:
        try:
            self.telemetry.start(adopt)
        except OSError as exc:
            raise SocketInUse(f"cannot serve metrics/readiness on ports {self.config.metrics_port}/"
                              f"{self.config.readiness_port}: {exc.strerror}") from None

    async def _start_proxy(self, adopt: dict[ListenerKind, socket.socket]) -> None:
        assert self.datapath is not None
        self.proxy = NodeProxy(self.datapath.proxy_ns.path, self.metrics, self.enrolment.workload_by_ip,
                               self.mesh.mesh if self.mesh is not None else None, hbone=self.config.hbone,
                               records_loaded=self.cni_gate)
        await self.proxy.start(adopt)

    async def _install_datapath(self) -> None:
        assert self.datapath is not None
        self._not_ready_reason = f"installing the {self.config.capture} datapath"
        await asyncio.to_thread(self.datapath.install)
        self.enrolment.backend = capture_backend(self.datapath)

    async def _shutdown(self, hurry: asyncio.Event) -> None:
        """Drain: listeners and node ports let go of here (a successor that
        took them over keeps them open, else new SYNs are dropped: fail
        closed), the API socket released (a successor may start at once),
        no more record changes, GOAWAY on every HBONE connection, then wait
        for the connections being served, up to --drain-seconds."""
        self._stopping = True
        self._ready = False
        self._not_ready_reason = "draining"
        if self._settling is not None:
            self._settling.cancel()
        if self.proxy is not None:
            # A hand-over in progress may still give the sockets to a
            # successor: until it has, queued connections are served here.
            self.proxy.stop_accepting(successor=self._successor is not None)
        self.telemetry.stop()
        if self.handover is not None:
            await self.handover.close()  # a hand-over past `frozen` runs to its end first
        successor = self._successor
        if successor:
            self._not_ready_reason = f"handed over to pid {successor}"
        log.info("agent stopping", handed_over_to=successor, drain_seconds=self.drain_seconds)
        await self.server.stop()
        if self.drift is not None:
            await self.drift.stop()
        if self.mesh is not None:
            self.mesh.unfollow()
        await self.enrolment.freeze("the agent is stopping")
        if self.proxy is not None:
            reason = f"agent handed over to pid {successor}" if successor else "agent stopping"
            drain = asyncio.ensure_future(self.proxy.drain(self.drain_seconds, reason))
            await _first(drain, hurry)
            if not drain.done():
                log.info("drain cut short by a second signal", left=self.proxy.active_connections)
                drain.cancel()
            await self.proxy.stop()
        if self.datapath is not None:
            # Capture stays in force: enrolled pods fail closed until an
            # agent is back, never bypass the mesh.
            self.datapath.close()
        if self.mesh is not None:
            await self.mesh.stop()
        log.info("agent stopped")

    # -- the hand-over, serving side (HandoverHost) ----------------------------------
    def node_settings(self) -> NodeSettings:
        c = self.config
        return NodeSettings.of_this_process(c.node_name, c.socket, c.state_dir, c.proxy_netns, c.bpffs_dir, c.capture)

    def refusal(self) -> str | None:
        if self._stopping:
            return "this agent is stopping"
        if not self._ready:
            return f"this agent is not serving ({self._not_ready_reason})"
        return None

    async def freeze(self, successor_pid: int) -> dict[str, socket.socket]:
        self._ready = False
        self._not_ready_reason = f"handing over to pid {successor_pid}"
        await self.enrolment.freeze(f"handing over to pid {successor_pid}")
        sockets = {kind.value: sock for kind, sock in (self.proxy.listening_sockets() if self.proxy else {}).items()}
        return {**sockets, **self.telemetry.listening_sockets()}

    async def unfreeze(self, why: str) -> None:
        if self._stopping:
            log.warning("hand-over failed while stopping: the next agent adopts the node", reason=why)
            return
        log.warning("hand-over failed: serving on", reason=why)
        self.enrolment.unfreeze()
        if not self.server.serving_the_path:
            await self.server.stop()
            await self.server.start()  # the successor's socket is dead: take the path back
        self._ready = True

    def handed_over(self, successor_pid: int) -> int:
        self._successor = successor_pid
        connections = self.proxy.active_connections if self.proxy is not None else 0
        if self.proxy is not None:
            self.proxy.stop_accepting()  # at once: the successor accepts on the same sockets
        self._handed_over.set()
        return connections


async def _first(*waitables: asyncio.Event | asyncio.Future) -> None:
    """Until the first of these events is set (or futures done)."""
    tasks = [asyncio.ensure_future(w.wait()) if isinstance(w, asyncio.Event) else w for w in waitables]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waitable, task in zip(waitables, tasks):
            if isinstance(waitable, asyncio.Event):
                task.cancel()


async def _serve(config: AgentConfig) -> None:
    stop, hurry = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        log.info("signal received", signal=sig.name, draining=stop.is_set())
        (hurry if stop.is_set() else stop).set()  # the second one cuts the drain short

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    await Agent(config).run(stop, hurry)


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
