"""`ambit lab tour`: what `make lab` shows a newcomer, in about a minute.

It builds the default two-node lab (nodes as network namespaces on an
underlay, one real ambit-agent each, pods from the real CNI chain) and
walks through what ambit does: identities from the CA service (its own
process, the only one with the key) and a certificate it refuses a node
for a pod on another node, a cross-node call over HBONE
with the client's own address preserved, proof that the underlay carried
only TLS, a same-node call, a Service VIP balanced by the proxy, a request
that policy denies, an L7 decision at an Envoy waypoint, a policy applied
and removed while the waypoint's Envoy keeps running, and a metrics
snapshot. Then it tears everything down;
Ctrl-C at any point leaves nothing behind.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, TextIO

from ambit.agent.cli.client import AgentClient
from ambit.agent.datapath.constants import HBONE_PORT, METRICS_PORT
from ambit.agent.netns import NetnsThread, netns_path

from . import labconfig
from .errors import LeftoversFound
from .plan import LabSettings
from .topology import Lab

__all__ = ["LeftoversFound", "run_tour"]

WORKLOAD = [sys.executable, "-m", "ambit.lab.podapp"]
MARKER = "ambit-tour-plaintext-marker"
ETH_P_ALL = 0x0003


class UnderlayCapture:
    """Every frame crossing the underlay bridge, read with an AF_PACKET
    socket made inside the underlay namespace (no tcpdump needed)."""

    def __init__(self, netns: str, port: str) -> None:
        """`port`: a bridge port (frames switched between ports never reach
        the bridge device itself)."""
        with NetnsThread(netns_path(netns)) as thread:
            self.sock = thread.new_socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.sock.bind((port, 0))
        self.sock.settimeout(0.2)
        self.frames: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                self.frames.append(self.sock.recv(65535))
            except socket.timeout:
                continue
            except OSError:
                return

    def stop(self) -> None:
        """Stop reading, after taking the frames the socket still holds."""
        self._stop.set()
        self._thread.join()
        self.sock.setblocking(False)
        try:
            while True:
                self.frames.append(self.sock.recv(65535))
        except OSError:  # BlockingIOError: nothing left
            pass
        self.sock.close()

    def tcp_payloads(self) -> list[tuple[int, int, bytes]]:
        """(source port, destination port, payload) of each IPv4 TCP frame."""
        out = []
        for frame in self.frames:
            if len(frame) < 34 or frame[12:14] != b"\x08\x00" or frame[23] != 6:
                continue
            ihl = (frame[14] & 0x0F) * 4
            tcp = 14 + ihl
            offset = (frame[tcp + 12] >> 4) * 4
            out.append((int.from_bytes(frame[tcp:tcp + 2], "big"), int.from_bytes(frame[tcp + 2:tcp + 4], "big"),
                        frame[tcp + offset:]))
        return out


UPGRADE_ANSWERS = 20  # answers the load client must have before the upgrade, and again after it


def _answers(progress: Path) -> int:
    try:
        return int(progress.read_text())
    except (OSError, ValueError):
        return 0


def _until_answers(progress: Path, count: int, load: subprocess.Popen[bytes], timeout: float = 30.0) -> bool:
    """Until the load client has had `count` answers (it keeps the number in
    `progress`); False if it exited or `timeout` passed first."""
    deadline = time.monotonic() + timeout
    while _answers(progress) < count:
        if load.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _upgrade_under_load(lab: Lab, tour: "Tour", ips: dict[str, str]) -> None:
    """A hand-over with traffic flowing: how many requests, how many failed."""
    stop = lab.settings.state_dir / "tour-load.stop"
    progress = lab.settings.state_dir / "tour-load.answers"
    stop.unlink(missing_ok=True)
    progress.unlink(missing_ok=True)
    load = lab.spawn("shop/client-0", [*WORKLOAD, "load", f"http://{ips['shop/web-1']}:8080/",
                                       f"http://{ips['shop/web-0']}:8080/", "--rate", "20",
                                       "--until-file", str(stop), "--progress-file", str(progress)])
    try:
        old = lab.state().nodes["node1"].agent
        # Traffic observed flowing before the event, and answered again after it
        # (however slowly the client starts on a loaded host).
        flowing = _until_answers(progress, UPGRADE_ANSWERS, load)
        started = time.monotonic()
        new = lab.restart_agent("node1", upgrade=True)
        took = time.monotonic() - started
        flowing = _until_answers(progress, _answers(progress) + UPGRADE_ANSWERS, load) and flowing
    finally:
        stop.touch()
        out, err = load.communicate(timeout=60)
        stop.unlink(missing_ok=True)
        progress.unlink(missing_ok=True)
    if not flowing:
        tour.say(f"the load client never got {UPGRADE_ANSWERS} answers on one side of the upgrade")
    counts = json.loads(out) if load.returncode == 0 else {}
    tour.say(f"agent pid {old.pid if old else '?'} handed node1 to pid {new.pid} in {took:.1f} s "
             "(listening sockets passed over a Unix socket, API socket renamed, records handed on)")
    if counts:
        tour.say(f"{counts['requests']} requests during the upgrade, {counts['failed']} failed; "
                 f"the slowest took {counts['slowest_s'] * 1000:.0f} ms")
    else:
        tour.say(f"the load client failed: {err.decode()[-300:]}")


class Tour:
    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.count = 0

    @contextmanager
    def step(self, title: str) -> Iterator[None]:
        """A numbered step; its time is shown when it took a second or more."""
        self.count += 1
        self.out.write(f"\n[{self.count}] {title}\n")
        self.out.flush()
        started = time.monotonic()
        yield
        elapsed = time.monotonic() - started
        if elapsed >= 1:
            self.say(f"({elapsed:.1f}s)")

    def say(self, text: str = "") -> None:
        for line in text.splitlines() or [""]:
            self.out.write(f"    {line}\n")
        self.out.flush()


def _get(lab: Lab, pod: str, url: str) -> tuple[int, str]:
    result = lab.exec(pod, [*WORKLOAD, "get", url, "--timeout", "5"], timeout=30)
    return result.returncode, (result.stdout or result.stderr).decode().strip()


def _newest(read: Callable[[], list[dict]], match: Callable[[dict], bool]) -> dict | None:
    """The newest entry `read()` returns that `match`es, waiting up to 3 s
    for the writer to flush; None if there is none by then."""
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        found = [e for e in read() if match(e)]
        if found:
            return found[-1]
        time.sleep(0.05)
    return None


def _access_log(lab: Lab, node: str, match: Callable[[dict], bool]) -> dict | None:
    """The newest access-log line of a node's agent that `match`es."""
    record = lab.state().nodes[node].agent
    path = record.log if record else None
    if path is None:
        return None
    return _newest(lambda: [json.loads(l) for l in open(path, encoding="utf-8") if '"event": "connection"' in l],
                   match)


def _waypoint_log(lab: Lab, match: Callable[[dict], bool]) -> dict | None:
    """The newest line of the waypoint's Envoy access log that `match`es."""
    path = lab.waypoint_access_log("shop/waypoint-0")
    return _newest(lambda: [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
                   if path.exists() else [], match)


NO_BYTES_POLICY = {
    "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
    "metadata": {"name": "web-l7-no-bytes", "namespace": "shop"},
    "spec": {"targetRefs": [{"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "waypoint"}],
             "action": "DENY", "rules": [{"to": [{"operation": {"methods": ["GET"], "paths": ["/bytes*"]}}]}]},
}


def _until_answer(lab: Lab, url: str, *, denied: bool, timeout: float = 20.0) -> float | None:
    """Seconds until GET `url` from shop/client-0 is denied (or answered again); None on timeout."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        code, _ = _get(lab, "shop/client-0", url)
        if (code != 0) == denied:
            return time.monotonic() - started
        time.sleep(0.2)
    return None


def _waypoint_envoy_pid(lab: Lab) -> int | None:
    """Envoy's pid: the child of the waypoint pod's `ambit waypoint --run` process."""
    from ambit.waypoint.runner import child_pids

    record = lab.state().pods["shop/waypoint-0"].workload
    children = child_pids(record.pid) if record is not None else []
    return children[0] if children else None


def _metrics(lab: Lab, node: str) -> list[str]:
    """istio_tcp_* samples from a node agent's /metrics (inside the node's namespace)."""
    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=5) as response:
            return response.read().decode()

    with NetnsThread(netns_path(lab.state().nodes[node].netns)) as thread:
        text = thread.run(scrape)
    return [line for line in text.splitlines()
            if line.startswith(("istio_tcp_connections_opened_total", "istio_tcp_sent_bytes_total",
                                "istio_tcp_connections_failed_total", "ambit_enrolled_pods", "ambit_hbone_pool"))]


def _short_labels(sample: str) -> str:
    """A metrics sample with only the labels a person reads first."""
    name, _, rest = sample.partition("{")
    if not rest:
        return sample
    labels_text, _, value = rest.rpartition("} ")
    keep = ("reporter", "source_workload", "destination_workload", "destination_service",
            "connection_security_policy", "response_flags")
    labels = dict(part.split("=", 1) for part in labels_text.split('",') if "=" in part)
    shown = ",".join(f"{k}={labels[k].strip(chr(34))}" for k in keep if k in labels)
    return f"{name}{{{shown}}} {value}"


def run_tour(out: TextIO = sys.stdout, settings: LabSettings | None = None) -> None:
    if os.geteuid() != 0:
        raise PermissionError("the lab creates network namespaces, veths and eBPF programs: run it as root")
    from .report import PrintedSteps, format_status  # presentation shared with `ambit lab up`
    tour = Tour(out)
    build_steps = PrintedSteps(out)
    lab = Lab(settings or LabSettings(), build_steps)
    config = labconfig.load_tour()
    how = {"ebpf": "eBPF (tc programs on each pod's veth)",
           "nftables": "nftables (policy route + TPROXY)"}.get(lab.settings.capture, lab.settings.capture)
    out.write("ambit lab tour: two nodes, five pods, HBONE between nodes, L4 policy at the destination, "
              f"L7 policy at a waypoint; pods' traffic captured with {how}\n\n")
    try:
        plan = lab.up(config)
        tour.count = build_steps.count  # the tour's steps continue the build's numbering
        status = lab.status()
        ips = {p.key: p.ip for p in status.pods}

        with tour.step("the lab: nodes, pods, addresses and identities"):
            tour.say(format_status(status).split("\nstate ")[0])
            tour.say("identities (SPIFFE; each node's agent asks the CA for those of its own pods):")
            for pod in status.pods:
                ns = pod.key.split("/")[0]
                waypoint = any(w.startswith("waypoint:") for w in pod.workloads)
                ident = f"spiffe://cluster.local/ns/{ns}/sa/{pod.service_account}" if pod.ambient or waypoint \
                    else "- (not in the mesh)"
                ident += " (Envoy waypoint: out of the mesh, speaks HBONE itself)" if waypoint else ""
                tour.say(f"  {pod.key:<16} {ident}")

        with tour.step(f"the CA: `ambit ca serve`, its own process on {status.ca.address}; node agents ask it "
                       "for certificates with Istio's API and hold no CA key"):
            tour.say(f"CA pid {status.ca.pid}; agents: "
                     + ", ".join(f"{n.name} pid {n.agent_pid}" for n in status.nodes))
            key_dir = lab.settings.ca_key_dir
            views = {"the CA": status.ca.pid, "node1's agent": status.nodes[0].agent_pid}
            for who, pid in views.items():
                seen = sorted(p.name for p in Path(f"/proc/{pid}/root{key_dir}").iterdir()) if pid else []
                tour.say(f"{key_dir} as {who} sees it: {', '.join(seen) or 'empty'}")
            with AgentClient(lab.state().nodes["node1"].socket, timeout=5.0) as client:
                held = client.certificates()
            for cert in held.certificates:
                tour.say(f"node1 holds {cert.identity}, serial {cert.serial[:12]}, issued by {cert.issuer}")
            foreign = "spiffe://cluster.local/ns/legacy/sa/probe"
            answer = lab.ask_ca("node1", foreign)
            tour.say(f"node1's agent asks for {foreign} (legacy/probe-0 runs on node2): "
                     + (f"refused, {answer['code']}" if not answer["issued"] else "ISSUED?!"))
            refusal = _newest(lambda: [json.loads(l) for l in lab.ca_log().read_text().splitlines()
                                       if '"event": "ca.refused"' in l], lambda e: e.get("impersonated") == foreign)
            if refusal:
                tour.say(f"CA log: {refusal['reason']}: {refusal['detail']} (caller {refusal['caller']})")

        with tour.step(f"cross-node: shop/client-0 ({ips['shop/client-0']}, node1) -> "
                       f"shop/web-1 ({ips['shop/web-1']}:8080, node2), watching the underlay"):
            capture = UnderlayCapture(lab.settings.underlay_netns, plan.node("node1").underlay_port)
            try:
                code, body = _get(lab, "shop/client-0", f"http://{ips['shop/web-1']}:8080/")
                echoed = lab.exec("shop/client-0", [*WORKLOAD, "send", ips["shop/web-1"], "9000"],
                                  input=MARKER.encode(), timeout=30).stdout
            finally:
                capture.stop()
            answer = json.loads(body) if code == 0 else {}
            tour.say(f"web-1 answered: {body}")
            tour.say(f"and echoed {echoed.decode()!r} on port 9000")
            tour.say(f"the server saw the client as {answer.get('peer')} -- the client pod's own address "
                     f"({'preserved' if answer.get('peer') == ips['shop/client-0'] else 'NOT preserved'})")
            entry = _access_log(lab, "node1", lambda e: e.get("via") == "hbone" and e["dst"].startswith(ips["shop/web-1"]))
            if entry:
                tour.say(f"node1 access log: via={entry['via']} {entry['src_identity']} -> {entry['dst_identity']}, "
                         f"sent {entry['sent']} B, received {entry['received']} B")
            packets = capture.tcp_payloads()
            hbone = [p for p in packets if HBONE_PORT in (p[0], p[1]) and p[2]]
            tls_records = sum(1 for p in hbone if p[2][:1] in (b"\x16", b"\x17") and p[2][1:3] == b"\x03\x03")
            plaintext = [p for p in packets if MARKER.encode() in p[2] or b"GET /" in p[2]]
            tour.say(f"underlay capture: {len(packets)} TCP frames, {len(hbone)} with payload on port {HBONE_PORT}, "
                     f"{tls_records} of them starting a TLS record")
            tour.say(f"the HTTP request or the echoed text seen in clear on the underlay: "
                     f"{'YES (' + str(len(plaintext)) + ' frames)' if plaintext else 'no -- only TLS crossed'}")

        with tour.step("same node: shop/client-0 -> shop/web-0 (node1); never leaves the node"):
            code, body = _get(lab, "shop/client-0", f"http://{ips['shop/web-0']}:8080/")
            tour.say(f"web-0 answered: {body}")
            entry = _access_log(lab, "node1", lambda e: e.get("via") == "local")
            if entry:
                tour.say(f"node1 access log: via={entry['via']}, policy: {entry['reason']}")

        with tour.step("a Service: shop/client-0 -> shop/web at 10.96.0.10:80 (ClusterIP), four times"):
            answered = []
            for _ in range(4):
                code, body = _get(lab, "shop/client-0", "http://10.96.0.10:80/")
                answered.append(json.loads(body)["pod"] if code == 0 else f"error: {body}")
            tour.say(f"answered by: {', '.join(answered)} (the proxy spreads over ready endpoints, "
                     "port 80 -> targetPort http/8080)")

        with tour.step("policy: legacy/probe-0 (not in the mesh, node2) -> shop/web-0:8080 (node1)"):
            code, body = _get(lab, "legacy/probe-0", f"http://{ips['shop/web-0']}:8080/")
            tour.say(f"result: {'denied -- ' + body if code != 0 else 'allowed?! ' + body}")
            entry = _access_log(lab, "node1", lambda e: e.get("decision") == "deny" and
                                e["src"].startswith(ips["legacy/probe-0"]))
            if entry:
                tour.say(f"node1 access log: {entry['listener']} {entry['src']} -> {entry['dst']}: {entry['reason']}")
            result = lab.exec("legacy/probe-0", [*WORKLOAD, "send", ips["shop/web-0"], "9000"], input=b"still open",
                              timeout=30)
            tour.say(f"the same pod on the echo port 9000 (allowed to all): {result.stdout.decode()!r}")

        l7_vip = next(s.cluster_ip for s in status.services if s.key == "shop/web-l7")
        with tour.step(f"L7 at a waypoint: shop/client-0 -> Service shop/web-l7 ({l7_vip}:80, "
                       "istio.io/use-waypoint=waypoint)"):
            code, body = _get(lab, "shop/client-0", f"http://{l7_vip}/")
            answer = json.loads(body) if code == 0 else {}
            tour.say(f"GET /      -> {answer.get('pod', body)}; it saw the waypoint ({answer.get('peer')}) and "
                     f"x-forwarded-for {answer.get('forwarded_for')} (the client)")
            code, body = _get(lab, "shop/client-0", f"http://{l7_vip}/admin")
            tour.say(f"GET /admin -> {'403 ' + body if code == 1 else 'not denied?! ' + body} (DENY paths /admin* "
                     "of policy shop/web-l7-no-admin, enforced by the waypoint)")
            entry = _waypoint_log(lab, lambda e: e.get("path") == "/admin")
            if entry:
                tour.say(f"waypoint access log: client {entry['client']} ({entry['client_identity']}) "
                         f"{entry['method']} {entry['path']} -> {entry['code']}, {entry['policy']}")

        with tour.step("a policy change, live: `ambit lab apply` a waypoint rule denying GET /bytes*, "
                       "then `ambit lab delete` it"):
            envoy_before = _waypoint_envoy_pid(lab)
            url = f"http://{l7_vip}/bytes/16"
            code, body = _get(lab, "shop/client-0", url)
            tour.say(f"before:  GET /bytes/16 -> {'200 (16 bytes)' if code == 0 else 'error ' + body}")
            (name,) = lab.apply_policies([NO_BYTES_POLICY])
            took = _until_answer(lab, url, denied=True)
            tour.say(f"applied {name}: GET /bytes/16 -> "
                     + (f"403 after {took:.1f} s" if took is not None else "still answered?! (not applied in 20 s)"))
            lab.delete_policy("AuthorizationPolicy", "shop/web-l7-no-bytes")
            took = _until_answer(lab, url, denied=False)
            tour.say("deleted it: GET /bytes/16 -> "
                     + (f"200 after {took:.1f} s" if took is not None else "still denied?! (not removed in 20 s)"))
            envoy_after = _waypoint_envoy_pid(lab)
            tour.say(f"the waypoint's Envoy: pid {envoy_before} before, {envoy_after} after -- "
                     + ("not restarted (ambit waypoint --watch rewrote the files it watches)"
                        if envoy_before == envoy_after else "RESTARTED?!"))

        with tour.step("an upgrade under load: node1's agent replaced by a new one (`ambit lab restart node1 "
                       "--upgrade`) while shop/client-0 opens 20 connections a second to web-1 and to web-0"):
            _upgrade_under_load(lab, tour, ips)

        with tour.step(f"metrics: node1 agent, http://127.0.0.1:{METRICS_PORT}/metrics in its namespace (excerpt)"):
            for sample in _metrics(lab, "node1")[:12]:
                tour.say(_short_labels(sample))
    finally:
        with tour.step("tear down: CNI DEL for every pod, stop agents and workloads, remove namespaces and pins"):
            report = lab.down()
            tour.say(f"removed {len(report.namespaces_removed)} namespace(s), stopped "
                     f"{report.processes_stopped} process(es); leftovers: "
                     f"{'none' if not lab.leftovers() else lab.leftovers().describe()}")
