"""An agent's life on a node with traffic flowing: a successor takes over
while connections are being made and long-lived ones carry bytes, the old
agent drains and exits; SIGTERM with no successor drains to the deadline.

One node namespace, the real chain (bridge + host-local + ambit-cni), eBPF
capture, two pods: `client` dials `server` (an echo server) through the
node proxy. The load runs on threads in the client's namespace: a new short
connection every few milliseconds, each checked byte for byte, and two
streams that echo a chunk every 20 ms for as long as the test wants.
"""
from __future__ import annotations

import os
import signal
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field

import pytest

from ambit.agent.cli.client import AgentClient
from ambit.lab.cniruntime import CniRuntime, PodSandbox
from ambit.lab.node import AgentProcess, NodeNamespace, bridge_conflist, cni_plugin_dirs, make_pod_netns, remove_netns
from tests.support.kernelstate import node_snapshot, verdict_counts
from tests.support.podnet import TcpServer, connect, echo_until_eof, recv_exactly
from tests.support.waiting import wait_until
from tests.support.logfile import json_lines

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(240)]

PREFIX = "lcy"
SUBNET = "10.239.0.0/24"
PORT = 9000
DRAIN = "10"


def json_events(agent: AgentProcess) -> list[dict]:
    return json_lines(agent.logs())


def events_named(agent: AgentProcess, name: str) -> list[dict]:
    return [e for e in json_events(agent) if e.get("event") == name]


def wait_for(predicate, what: str, timeout: float = 30.0):
    return wait_until(predicate, what, timeout, interval=0.05)


def status(socket_path: str):
    with AgentClient(socket_path, timeout=2.0) as client:
        return client.status()


def answered_by(agent: AgentProcess) -> bool:
    """The node's agent socket is served by `agent`, and it is ready."""
    try:
        st = status(agent.socket)
    except Exception:
        return False
    return agent.proc is not None and st.pid == agent.proc.pid and st.ready


@dataclass
class Load:
    """Short connections and long streams from the client pod to the server."""

    netns: str
    ip: str
    streams: int = 2
    stop: threading.Event = field(default_factory=threading.Event)
    end_streams: threading.Event = field(default_factory=threading.Event)
    shorts: list[tuple[float, bool, str]] = field(default_factory=list)  # (started, ok, error)
    stream_results: list[dict] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> "Load":
        self.threads = [threading.Thread(target=self._short_loop, daemon=True)]
        self.threads += [threading.Thread(target=self._stream, args=(i,), daemon=True) for i in range(self.streams)]
        for thread in self.threads:
            thread.start()
        return self

    def _short_loop(self) -> None:
        n = 0
        while not self.stop.is_set():
            started = time.time()
            payload = f"short {n} {uuid.uuid4().hex}".encode()
            n += 1
            try:
                sock = connect(self.netns, self.ip, PORT, timeout=5.0)
                with sock:
                    sock.sendall(payload)
                    sock.shutdown(socket.SHUT_WR)
                    got = b""
                    while chunk := sock.recv(4096):
                        got += chunk
                self.shorts.append((started, got == payload, "" if got == payload else f"echo {got[:20]!r}"))
            except OSError as exc:
                self.shorts.append((started, False, type(exc).__name__))
            time.sleep(0.01)

    def _stream(self, index: int) -> None:
        result = {"index": index, "sent": 0, "echoed": 0, "error": "", "after": []}
        self.stream_results.append(result)
        try:
            sock = connect(self.netns, self.ip, PORT, timeout=5.0)
            sock.settimeout(10)
            with sock:
                n = 0
                while not self.end_streams.is_set():
                    chunk = (f"{index}:{n:08d}:".encode() * 64)[:1024]
                    sock.sendall(chunk)
                    result["sent"] += len(chunk)
                    if recv_exactly(sock, len(chunk)) != chunk:
                        raise ValueError(f"wrong echo at chunk {n}")
                    result["echoed"] += len(chunk)
                    result["after"].append(time.time())
                    n += 1
                    time.sleep(0.02)
                sock.shutdown(socket.SHUT_WR)
                if sock.recv(1) != b"":
                    raise ValueError("bytes after the end")
        except (OSError, ValueError) as exc:
            result["error"] = f"{type(exc).__name__}: {exc}"

    def finish(self) -> None:
        self.end_streams.set()
        self.stop.set()
        for thread in self.threads:
            thread.join(30)

    def failed(self) -> list[tuple[float, bool, str]]:
        return [s for s in self.shorts if not s[1]]


@pytest.fixture
def node():
    with NodeNamespace(f"{PREFIX}-node-{uuid.uuid4().hex[:6]}") as node:
        yield node


@dataclass
class Pods:
    runtime: CniRuntime
    client: PodSandbox
    server: PodSandbox
    server_ip: str
    echo: TcpServer


@pytest.fixture
def agents(node):
    made: list[AgentProcess] = []
    yield made
    for agent in reversed(made):
        agent.stop(signal.SIGKILL)
        print(f"--- agent {agent.log_path.name}\n{agent.logs()[-6000:]}")
    if made:
        made[0].cleanup()


@pytest.fixture
def first(node, agents) -> AgentProcess:
    agent = AgentProcess(node, "first", capture="ebpf", extra_args=("--drain-seconds", DRAIN))
    agents.append(agent)
    return agent.start()


@pytest.fixture
def pods(node, first):
    runtime = CniRuntime(bridge_conflist(PREFIX, SUBNET, first.socket, ipam_dir=node.workdir / "ipam"),
                         cni_plugin_dirs(), node_netns=node.path)
    made: list[PodSandbox] = []

    def pod(name: str) -> tuple[PodSandbox, str]:
        sandbox = PodSandbox(container_id=uuid.uuid4().hex, netns=make_pod_netns(f"{PREFIX}-{uuid.uuid4().hex[:8]}"),
                             namespace="shop", name=name, uid=str(uuid.uuid4()))
        made.append(sandbox)
        result = runtime.add(sandbox).result
        return sandbox, result["ips"][0]["address"].split("/")[0]

    try:
        client, _ = pod("client")
        server, server_ip = pod("server")
        echo = TcpServer(server.netns, PORT, echo_until_eof)
        try:
            yield Pods(runtime, client, server, server_ip, echo)
        finally:
            echo.close()
    finally:
        for sandbox in reversed(made):
            try:
                runtime.delete(sandbox)
            except Exception:
                pass
            remove_netns(os.path.basename(sandbox.netns))


def successor(node: NodeNamespace, agents: list[AgentProcess], tag: str) -> AgentProcess:
    agent = AgentProcess(node, tag, capture="ebpf", extra_args=("--drain-seconds", DRAIN))
    agents.append(agent)
    return agent.start(wait=False)


def test_a_successor_takes_over_under_load_and_the_old_agent_exits_after_its_last_connection(
        node, agents, first, pods) -> None:
    load = Load(pods.client.netns, pods.server_ip).start()
    try:
        wait_for(lambda: len(load.shorts) >= 20 and all(r["echoed"] for r in load.stream_results),
                 "traffic through the first agent")
        dropped = verdict_counts(first.bpffs_dir)["proxy_drop_no_listener"]
        began = time.time()
        second = successor(node, agents, "second")
        wait_for(lambda: answered_by(second), "the second agent answering the node's socket, ready")
        took_over = time.time()
        wait_for(lambda: events_named(first, "handed over"), "the first agent to hand over")
        # Both agents accept from the same listening sockets: no SYN found the proxy namespace without one.
        assert verdict_counts(first.bpffs_dir)["proxy_drop_no_listener"] == dropped
        # The old agent keeps relaying the streams it has: alive, bytes still flowing through it.
        flowing = [len(r["after"]) for r in load.stream_results]
        wait_for(lambda: all(len(r["after"]) >= f + 10 for r, f in zip(load.stream_results, flowing)),
                 "the long streams to carry on after the hand-over")
        assert first.proc.poll() is None, "the old agent exited while it still had connections"
        wait_for(lambda: sum(1 for s in load.shorts if s[0] > took_over + 0.5) >= 20,
                 "new connections served by the second agent")
        load.end_streams.set()  # the last connections the first agent carries end now
        ended = time.time()
        assert first.proc.wait(15) == 0
        exited = time.time()
    finally:
        load.finish()
    assert load.failed() == [], f"failed new connections around the hand-over: {load.failed()[:5]}"
    assert [r["error"] for r in load.stream_results] == ["", ""]
    assert all(r["sent"] == r["echoed"] > 0 for r in load.stream_results)
    assert sum(1 for s in load.shorts if began <= s[0] <= took_over) >= 5  # connections made during the hand-over
    assert exited - ended < 5  # it left once its last connection was done, not at the 10 s deadline
    drained = events_named(first, "drained")
    assert drained and drained[-1]["left"] == 0 and drained[-1]["connections_at_start"] >= 2
    handed = events_named(first, "handed over")[-1]
    assert handed["successor_pid"] == second.proc.pid
    # The second agent serves with the records the first one kept, and the same capture.
    st = status(second.socket)
    assert (st.pid, st.phase, st.enrolled, st.ready) == (second.proc.pid, "serving", 2, True)
    ready = events_named(second, "agent serving")[-1]
    assert ready["took_over_from"] == first.proc.pid
    snapshot = node_snapshot(node.path, second.bpffs_dir)
    assert snapshot["local_pods"] == 2


def test_sigterm_with_no_successor_drains_to_the_deadline_and_fails_closed(node, agents, first, pods) -> None:
    first_proc = first.proc
    load = Load(pods.client.netns, pods.server_ip, streams=1)
    load.stop.set()  # streams only
    load.start()
    try:
        wait_for(lambda: load.stream_results and load.stream_results[0]["echoed"] > 0, "a stream through the agent")
        signalled = time.time()
        first_proc.send_signal(signal.SIGTERM)
        wait_for(lambda: events_named(first, "draining"), "the drain to begin")
        assert not os.path.exists(first.socket)  # released at once: a successor could start now
        flowing = len(load.stream_results[0]["after"])
        wait_for(lambda: len(load.stream_results[0]["after"]) >= flowing + 10, "the stream to carry on while draining")
        # A new connection meets no listener: its SYN is dropped, never relayed unproxied.
        dropped = verdict_counts(first.bpffs_dir)["proxy_drop_no_listener"]
        with pytest.raises(OSError):
            connect(pods.client.netns, pods.server_ip, PORT, timeout=1.0).close()
        assert verdict_counts(first.bpffs_dir)["proxy_drop_no_listener"] > dropped
        assert first_proc.wait(20) == 0
        exited = time.time()
        wait_for(lambda: load.stream_results[0]["error"], "the stream to be cut at the deadline")
    finally:
        load.finish()
    assert float(DRAIN) <= exited - signalled < float(DRAIN) + 5
    assert events_named(first, "drain deadline reached")[-1]["left"] == 1
    # The kernel kept the capture; the next agent adopts it and serves at once.
    second = successor(node, agents, "second")
    wait_for(lambda: answered_by(second), "the next agent ready")
    assert status(second.socket).enrolled == 2
    sock = connect(pods.client.netns, pods.server_ip, PORT)
    with sock:
        sock.sendall(b"after")
        sock.shutdown(socket.SHUT_WR)
        assert recv_exactly(sock, 5) == b"after"


def test_a_successor_started_during_the_drain_serves_while_the_old_one_finishes(node, agents, first, pods) -> None:
    load = Load(pods.client.netns, pods.server_ip).start()
    try:
        wait_for(lambda: len(load.shorts) >= 20 and all(r["echoed"] for r in load.stream_results),
                 "traffic through the first agent")
        first.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: not os.path.exists(first.socket), "the first agent to release the socket")
        second = successor(node, agents, "second")
        wait_for(lambda: answered_by(second), "the second agent ready")
        ready_at = time.time()
        wait_for(lambda: sum(1 for s in load.shorts if s[0] > ready_at) >= 20, "new connections after it is ready")
        assert first.proc.poll() is None  # still relaying its streams
        load.end_streams.set()
        assert first.proc.wait(15) == 0
    finally:
        load.finish()
    assert [s for s in load.failed() if s[0] >= ready_at] == []
    assert [r["error"] for r in load.stream_results] == ["", ""]  # the streams outlived their agent's SIGTERM
