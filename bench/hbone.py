#!/usr/bin/env python3
"""HBONE data path: ambit vs Envoy vs direct TCP, in the same run, on the same topology.

Topology: two throwaway "node" namespaces (`hbt-bench-a-*`, `hbt-bench-b-*`)
joined by a veth pair: node A holds pod A 10.253.1.1 and the client side of
every chain (the client, ambit's client agent, Envoy's tunnel); node B holds
pod B 10.253.1.2 and the server side (the servers, ambit's server agent,
Envoy's CONNECT terminator). Every byte of every path crosses the link.

    direct : client ----------------------------------------------> B:port
    ambit  : client -> A:1500x ambit client agent (pool) ==HBONE==> B:15008 ambit
             HboneInbound (separate process) -> B:port
    envoy  : client -> A:1510x Envoy tcp_proxy tunnel ==HBONE==> B:15108 Envoy HCM
             CONNECT terminator -> B:port

HBONE is the same on both chains: TLS 1.3 mTLS with SPIFFE certificates from
one local CA, ALPN h2, HTTP/2 CONNECT. Each ambit agent is one Python process
(one core at most); Envoy runs with its default worker count (one per core).
Envoy keeps its 16 KiB frames; ambit peers use 1 MiB frames and 4/16 MiB windows.

Measured
- throughput with 1 and 4 parallel streams: iperf3 (C), fixed time, its default 128 KiB writes;
- 64-byte ping-pong RTT p50/p99 over one connection: bench/pingpong.c;
  "added RTT" = chain p50 - direct p50;
- agent RSS per idle tunnel: fresh agents, one warm-up tunnel, then 1,000 idle
  tunnels (one ping-pong each) held open; (RSS after - RSS before) / 1,000 per agent.

The three paths are measured interleaved, round after round, and medians are
reported, because the machine may be shared: load from elsewhere then hits
every path alike. CPU seconds per GB and CPU per round trip of the proxies are
reported too (less sensitive to such load than rates).

Targets: 1-stream throughput >= 0.5x Envoy; added RTT p50 <= 1.5x Envoy's;
<= 64 KiB per idle tunnel in each agent. Ends with one JSON line.

    python bench/hbone.py --quick     # < 1 min
    python bench/hbone.py             # longer runs, more samples
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from stats import percentile  # noqa: E402  (bench/stats.py)
from iperf import iperf_received  # noqa: E402  (bench/iperf.py)

POD_A = "10.253.1.1"
POD_B = "10.253.1.2"
TRUST_DOMAIN = "cluster.local"
IPERF_PORT = 5201
ECHO_PORT = 7000
AMBIT_HBONE_PORT = 15008
AMBIT_IDLE_HBONE_PORT = 15018
ENVOY_HBONE_PORT = 15108
# entry ports on pod A: ambit 1500x, envoy 1510x (x: 1 iperf, 2 echo, 3 idle test)
TARGETS = {1: (POD_B, IPERF_PORT), 2: (POD_B, ECHO_PORT), 3: (POD_B, ECHO_PORT)}

TARGET_THROUGHPUT_VS_ENVOY = 0.5
TARGET_ADDED_RTT_VS_ENVOY = 1.5
TARGET_IDLE_TUNNEL_KIB = 64
IDLE_TUNNELS = 1000

CLIENT_SA = ("bench", "client")
SERVER_SA = ("bench", "server")


# --- agents (run as child processes: one agent = one process, like one node) ------------------


def _raise_fd_limit() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _bound_socket(ip: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.IPPROTO_IP, 24, 1)  # IP_BIND_ADDRESS_NO_PORT
    sock.bind((ip, 0))
    sock.setblocking(False)
    return sock


def _store(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from ambit.agent.identity.ca import LocalCA
    from ambit.agent.identity.store import CertificateStore

    ca = LocalCA.load(Path(args.ca_dir) / "ca-cert.pem", Path(args.ca_dir) / "ca-key.pem", trust_domain=TRUST_DOMAIN)
    return CertificateStore(ca, Path(args.store_dir))


async def _client_agent(args: argparse.Namespace) -> None:
    from ambit.agent.identity.spiffe import SpiffeId
    from ambit.agent.proxy.sockets import reset_socket
    from ambit.agent.proxy.pool import HboneClientPool, PoolKey

    store = _store(args)
    pool = HboneClientPool(store, _bound_socket)
    key = PoolKey(
        SpiffeId(TRUST_DOMAIN, *CLIENT_SA), POD_A, POD_B, frozenset({SpiffeId(TRUST_DOMAIN, *SERVER_SA)}), args.hbone_port
    )
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()

    async def tunnel(conn: socket.socket, authority: str) -> None:
        try:
            opened = await pool.open_tunnel(key, authority, conn)
        except Exception as exc:
            print(f"tunnel failed: {exc!r}", file=sys.stderr)
            reset_socket(conn)
            return
        await opened.done

    async def entry(listener: socket.socket, authority: str) -> None:
        while True:
            conn, _ = await loop.sock_accept(listener)
            task = loop.create_task(tunnel(conn, authority))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    servers = []
    for spec in args.entry:
        port, authority = spec.split("=")
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((POD_A, int(port)))
        listener.listen(4096)  # connections queue from here on: ready
        listener.setblocking(False)
        servers.append(loop.create_task(entry(listener, authority)))
    print("ready", flush=True)
    await asyncio.gather(*servers)


async def _server_agent(args: argparse.Namespace) -> None:
    from ambit.agent.identity.spiffe import SpiffeId
    from ambit.agent.proxy.inbound import HboneInbound

    store = _store(args)
    identity = SpiffeId(TRUST_DOMAIN, *SERVER_SA)
    inbound = HboneInbound(
        store,
        identity_for_local_ip=lambda ip: identity if ip == POD_B else None,
        is_local_workload=lambda ip: ip == POD_B,
        # From node B's own pod address: without the eBPF datapath (not in this
        # bench) the client's address would not route back to this agent, and
        # Envoy's terminator connects from its own address too.
        upstream_socket_factory=lambda client_ip: _bound_socket(POD_B),
    )
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((POD_B, args.hbone_port))
    listener.listen(4096)
    print("ready", flush=True)
    await inbound.serve_socket(listener)


def run_agent(args: argparse.Namespace) -> None:
    from ambit.agent import eventloop
    from ambit.agent import log as logconf

    logconf.configure("warn")
    _raise_fd_limit()
    agent = _client_agent if args.agent == "client" else _server_agent
    profile_dir = os.environ.get("HBONE_BENCH_PROFILE")  # development aid: cProfile dump on SIGTERM
    if profile_dir:
        import cProfile

        profiler = cProfile.Profile()

        def dump(*_: object) -> None:
            profiler.disable()
            profiler.dump_stats(os.path.join(profile_dir, f"{args.agent}-{os.getpid()}.prof"))
            os._exit(0)

        signal.signal(signal.SIGTERM, dump)
        profiler.enable()
    eventloop.run(agent(args))  # the agent's own choice: uvloop when installed


# --- orchestration --------------------------------------------------------------------------------


class Processes:
    """Children of the bench; all killed at the end, whatever happens."""

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str], *, ready_line: bool = False, stdin: int | None = None,
              node: Any = None, output: bool = False) -> subprocess.Popen[bytes]:
        """`node`: start it from a thread inside that node's namespace (children
        inherit the namespace of the thread that spawns them). `output`: its
        stdout is a pipe for the caller to read (as with `ready_line`)."""
        def spawn() -> subprocess.Popen[bytes]:
            return subprocess.Popen(
                argv,
                stdout=subprocess.PIPE if ready_line or output else subprocess.DEVNULL,
                stderr=None,
                stdin=stdin,
                start_new_session=True,
            )

        proc = node.run(spawn) if node is not None else spawn()
        self._procs.append(proc)
        if ready_line:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if b"ready" not in line:
                raise RuntimeError(f"{argv[:3]} did not start (exit {proc.poll()})")
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()

    def stop_all(self) -> None:
        for proc in reversed(self._procs):
            with contextlib.suppress(Exception):
                self.stop(proc)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def iperf(ip: str, port: int, seconds: float, streams: int) -> tuple[float, float]:
    """(Gbit/s, GB) received by the server side."""
    received = iperf_received(["iperf3", "-c", ip, "-p", str(port), "-t", str(seconds), "-P", str(streams)], seconds)
    return received["bits_per_second"] / 1e9, received["bytes"] / 1e9


def pingpong_rtts(tool: Path, ip: str, port: int, count: int) -> list[float]:
    out = subprocess.run([str(tool), "client", ip, str(port), str(count), "64"], capture_output=True, check=True, timeout=120)
    values = [int(line) / 1000 for line in out.stdout.split()]
    return values[len(values) // 10 :]  # drop the warm-up tenth


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def idle_tunnel_kib(procs: Processes, tool: Path, port: int, pids: dict[str, int]) -> tuple[dict[str, float], dict[str, int]]:
    """Per-process RSS growth per idle tunnel while IDLE_TUNNELS are held open
    through `port`, and each process's RSS (KiB) at that moment.

    "hold" prints ready once each of its connections did a ping-pong, so
    every tunnel is then open in both proxies. The warm-up tunnel is
    measured from after each proxy closed its socket for it (its descriptor
    count back below what it was with the tunnel open)."""
    warm = procs.start([str(tool), "hold", POD_A, str(port), "1", "64"], ready_line=True, stdin=subprocess.PIPE)
    with_warm = {name: open_fds(pid) for name, pid in pids.items()}
    assert warm.stdin is not None
    warm.stdin.close()
    warm.wait(timeout=30)
    deadline = time.monotonic() + 30
    while lingering := [name for name, pid in pids.items() if open_fds(pid) >= with_warm[name]]:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the warm-up tunnel was never closed in {', '.join(lingering)}")
        time.sleep(0.02)
    before = {name: rss_kib(pid) for name, pid in pids.items()}
    holder = procs.start([str(tool), "hold", POD_A, str(port), str(IDLE_TUNNELS), "64"], ready_line=True, stdin=subprocess.PIPE)
    after = {name: rss_kib(pid) for name, pid in pids.items()}
    assert holder.stdin is not None
    holder.stdin.close()
    holder.wait(timeout=60)
    return {name: (after[name] - before[name]) / IDLE_TUNNELS for name in pids}, after


def setup_identities(directory: Path) -> tuple[Path, dict[str, tuple[Path, Path, Path]]]:
    from ambit.agent.identity.ca import LocalCA
    from ambit.agent.identity.spiffe import SpiffeId
    from ambit.agent.identity.store import CertificateStore

    ca = LocalCA.create(TRUST_DOMAIN)
    ca_dir = directory / "ca"
    ca.save(ca_dir)
    store = CertificateStore(ca, directory / "envoy-certs")
    files = {}
    for name, sa in (("client", CLIENT_SA), ("server", SERVER_SA)):
        paths = store.get(SpiffeId(TRUST_DOMAIN, *sa)).paths
        files[name] = (paths.cert_file, paths.key_file, paths.bundle_file)
    return ca_dir, files


def median(values: list[float]) -> float:
    return statistics.median(values)


def make_nodes() -> tuple[str, str]:
    """Two "nodes", each a namespace, joined by a veth pair: node A holds the
    client pod's address, node B the server pod's. Everything on the client
    side runs in A, everything on the server side in B."""
    from ambit.agent.netlink import iproute
    from ambit.agent.netns import create_netns, netns_path, remove_netns

    tag = uuid.uuid4().hex[:4]
    names = (f"hbt-bench-a-{tag}", f"hbt-bench-b-{tag}")
    try:
        for name in names:
            create_netns(name)
        with iproute(netns_path(names[0])) as a:
            a.link("add", ifname="eth0", kind="veth", peer={"ifname": "eth0", "net_ns_fd": netns_path(names[1])})
        for name, address in zip(names, (POD_A, POD_B)):
            with iproute(netns_path(name)) as ipr:
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
                eth0 = ipr.link_lookup(ifname="eth0")[0]
                ipr.addr("add", index=eth0, address=address, prefixlen=24)
                ipr.link("set", index=eth0, state="up")
    except BaseException:
        for name in names:
            remove_netns(name)
        raise
    return names


def orchestrate(args: argparse.Namespace) -> dict:
    from ambit.agent.netns import NetnsThread, enter_netns, netns_path, remove_netns
    from tests.support import envoy

    quick = args.quick
    seconds = args.seconds or (2 if quick else 8)
    throughput_rounds = 2 if quick else 3
    rtt_rounds, rtt_count = (3, 2000) if quick else (7, 10000)
    node_a, node_b = make_nodes()
    server_node = NetnsThread(netns_path(node_b))
    procs = Processes()
    envoys: list[envoy.EnvoyProcess] = []
    workdir = Path(tempfile.mkdtemp(prefix="hbt-bench-"))
    try:
        enter_netns(netns_path(node_a))  # this thread is the client node; its children inherit it
        _raise_fd_limit()
        tool = workdir / "pingpong"
        subprocess.run(["gcc", "-O2", "-o", str(tool), str(REPO / "bench" / "pingpong.c")], check=True)
        ca_dir, certs = setup_identities(workdir)
        server_id = f"spiffe://{TRUST_DOMAIN}/ns/{SERVER_SA[0]}/sa/{SERVER_SA[1]}"

        procs.start(["iperf3", "-s", "-B", POD_B, "-p", str(IPERF_PORT)], node=server_node)
        procs.start([str(tool), "server", POD_B, str(ECHO_PORT)], ready_line=True, node=server_node)
        server_node.run(envoy.wait_listening, POD_B, IPERF_PORT)  # listening sockets are per namespace

        def start_agents(hbone_port: int, entries: dict[int, str], tag: str) -> dict[str, int]:
            common = [sys.executable, str(Path(__file__).resolve()), "--ca-dir", str(ca_dir), "--hbone-port", str(hbone_port)]
            server = procs.start(common + ["--agent", "server", "--store-dir", str(workdir / f"srv-{tag}")],
                                 ready_line=True, node=server_node)
            entry_args = [f"{port}={authority}" for port, authority in entries.items()]
            client = procs.start(
                common + ["--agent", "client", "--store-dir", str(workdir / f"cli-{tag}"), "--entry", *entry_args], ready_line=True
            )
            return {"client_agent": client.pid, "server_agent": server.pid}

        authorities = {port: f"{ip}:{p}" for port, (ip, p) in TARGETS.items()}
        ambit_pids = start_agents(AMBIT_HBONE_PORT, {15000 + k: v for k, v in authorities.items() if k != 3}, "main")
        server_envoy = server_node.run(lambda: envoy.EnvoyProcess(
            envoy.server_config(certs["server"], (POD_B, ENVOY_HBONE_PORT), {a: TARGETS[k] for k, a in authorities.items()}, TRUST_DOMAIN),
            workdir,
            "envoy-server",
        ))
        envoys.append(server_envoy)
        client_envoy = envoy.EnvoyProcess(
            envoy.client_config(
                certs["client"], server_id, (POD_B, ENVOY_HBONE_PORT), {(POD_A, 15100 + k): v for k, v in authorities.items()}, POD_A
            ),
            workdir,
            "envoy-client",
        )
        envoys.append(client_envoy)
        server_node.run(server_envoy.wait_listening, POD_B, ENVOY_HBONE_PORT)
        for k in TARGETS:
            client_envoy.wait_listening(POD_A, 15100 + k)
        envoy_pids = {"envoy_client": client_envoy.pid, "envoy_server": server_envoy.pid}
        proxy_pids = {"direct": {}, "ambit": ambit_pids, "envoy": envoy_pids}

        paths = {"direct": (POD_B, IPERF_PORT), "ambit": (POD_A, 15001), "envoy": (POD_A, 15101)}
        echo_paths = {"direct": (POD_B, ECHO_PORT), "ambit": (POD_A, 15002), "envoy": (POD_A, 15102)}
        # Paths are interleaved round by round: other load on the machine hits all alike.
        rates: dict[str, dict[str, list[float]]] = {s: {p: [] for p in paths} for s in ("1", "4")}
        cpu_per_gb: dict[str, list[float]] = {"ambit": [], "envoy": []}
        for _ in range(throughput_rounds):
            for streams in (1, 4):
                for path_name, (ip, port) in paths.items():
                    pids = proxy_pids[path_name]
                    before = sum(cpu_seconds(pid) for pid in pids.values())
                    rate, gigabytes = iperf(ip, port, seconds, streams)
                    rates[str(streams)][path_name].append(rate)
                    if pids:
                        cpu_per_gb[path_name].append((sum(cpu_seconds(pid) for pid in pids.values()) - before) / gigabytes)
                    print(f"throughput {streams} stream(s) {path_name:6s} {rate:6.2f} Gbit/s", file=sys.stderr)
        rtt_rounds_p50: dict[str, list[float]] = {p: [] for p in echo_paths}
        rtt_rounds_p99: dict[str, list[float]] = {p: [] for p in echo_paths}
        cpu_per_rtt: dict[str, list[float]] = {"ambit": [], "envoy": []}
        for _ in range(rtt_rounds):
            for path_name, (ip, port) in echo_paths.items():
                pids = proxy_pids[path_name]
                before = sum(cpu_seconds(pid) for pid in pids.values())
                values = pingpong_rtts(tool, ip, port, rtt_count)
                if pids:
                    cpu_per_rtt[path_name].append((sum(cpu_seconds(pid) for pid in pids.values()) - before) / rtt_count * 1e6)
                rtt_rounds_p50[path_name].append(percentile(values, 50))
                rtt_rounds_p99[path_name].append(percentile(values, 99))
                print(f"rtt {path_name:6s} p50 {rtt_rounds_p50[path_name][-1]:7.1f} us  p99 {rtt_rounds_p99[path_name][-1]:7.1f} us", file=sys.stderr)

        idle_pids = start_agents(AMBIT_IDLE_HBONE_PORT, {15003: authorities[3]}, "idle")
        idle, idle_rss = idle_tunnel_kib(procs, tool, 15003, idle_pids)
        envoy_idle, _ = idle_tunnel_kib(procs, tool, 15103, envoy_pids)
        print(f"idle tunnel ambit {idle}  envoy {envoy_idle} (KiB per tunnel)", file=sys.stderr)
    finally:
        for proxy in envoys:
            proxy.stop()
        procs.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
        server_node.close()
        remove_netns(node_a)
        remove_netns(node_b)

    throughput = {s: {p: median(v) for p, v in d.items()} for s, d in rates.items()}
    rtt = {p: {"p50": median(rtt_rounds_p50[p]), "p99": median(rtt_rounds_p99[p])} for p in echo_paths}
    t1, t4 = throughput["1"], throughput["4"]
    added = {p: rtt[p]["p50"] - rtt["direct"]["p50"] for p in ("ambit", "envoy")}
    throughput_ratio = t1["ambit"] / t1["envoy"]
    rtt_ratio = added["ambit"] / added["envoy"] if added["envoy"] > 0 else float("inf")
    idle_worst = max(idle.values())
    report = {
        "bench": "hbone",
        "mode": "quick" if quick else "full",
        "topology": "two node namespaces joined by a veth; client side (client pod address, ambit client agent, "
        "Envoy tunnel) in node A, server side (server pod address, ambit server agent, Envoy terminator) in "
        "node B; 1 process per ambit agent, Envoy default workers; medians over interleaved rounds",
        "throughput_1s_vs_envoy": round(throughput_ratio, 3),
        "target": TARGET_THROUGHPUT_VS_ENVOY,
        "met": throughput_ratio >= TARGET_THROUGHPUT_VS_ENVOY,
        "throughput_1s_vs_direct": round(t1["ambit"] / t1["direct"], 3),
        "throughput_4s_vs_envoy": round(t4["ambit"] / t4["envoy"], 3),
        "throughput_4s_vs_direct": round(t4["ambit"] / t4["direct"], 3),
        "throughput_gbps": {k: {p: round(v, 2) for p, v in d.items()} for k, d in throughput.items()},
        "cpu_s_per_gb": {p: round(median(v), 2) for p, v in cpu_per_gb.items()},
        "rtt_us": {p: {k: round(v, 1) for k, v in d.items()} for p, d in rtt.items()},
        "added_rtt_p50_us": {p: round(v, 1) for p, v in added.items()},
        "added_rtt_p50_vs_envoy": round(rtt_ratio, 3),
        "added_rtt_target": TARGET_ADDED_RTT_VS_ENVOY,
        "added_rtt_met": rtt_ratio <= TARGET_ADDED_RTT_VS_ENVOY,
        "cpu_us_per_round_trip": {p: round(median(v), 1) for p, v in cpu_per_rtt.items()},
        "idle_tunnel_kib": {k: round(v, 1) for k, v in idle.items()},
        "agent_rss_kib_with_1000_idle_tunnels": idle_rss,
        "idle_tunnel_kib_envoy": {k: round(v, 1) for k, v in envoy_idle.items()},
        "idle_tunnel_target_kib": TARGET_IDLE_TUNNEL_KIB,
        "idle_tunnel_met": idle_worst <= TARGET_IDLE_TUNNEL_KIB,
    }
    report["all_met"] = bool(report["met"] and report["added_rtt_met"] and report["idle_tunnel_met"])
    return report


def print_summary(report: dict) -> None:
    t = report["throughput_gbps"]
    print("\nHBONE bench (" + report["topology"] + ")")
    for streams in ("1", "4"):
        row = t[streams]
        print(
            f"  {streams} stream(s): direct {row['direct']:.2f}  envoy {row['envoy']:.2f}  ambit {row['ambit']:.2f} Gbit/s"
            f"  -> ambit {row['ambit'] / row['envoy']:.2f}x envoy, {row['ambit'] / row['direct']:.2f}x direct"
        )
    r = report["rtt_us"]
    print(
        "  RTT p50/p99 us: "
        + ", ".join(f"{p} {r[p]['p50']:.0f}/{r[p]['p99']:.0f}" for p in ("direct", "envoy", "ambit"))
        + f"  -> added p50 ambit {report['added_rtt_p50_us']['ambit']:.0f} us vs envoy "
        f"{report['added_rtt_p50_us']['envoy']:.0f} us = {report['added_rtt_p50_vs_envoy']:.2f}x"
    )
    print(f"  CPU (both proxies together): {report['cpu_s_per_gb']} CPU-s per GB, {report['cpu_us_per_round_trip']} CPU-us per round trip")
    print(
        f"  idle tunnel: ambit {report['idle_tunnel_kib']} KiB, envoy {report['idle_tunnel_kib_envoy']} KiB; "
        f"ambit agents' RSS with {IDLE_TUNNELS} idle tunnels: {report['agent_rss_kib_with_1000_idle_tunnels']} KiB"
    )
    print(
        f"  targets: 1-stream >= {report['target']}x envoy: {report['met']}; added RTT <= "
        f"{report['added_rtt_target']}x envoy: {report['added_rtt_met']}; <= {report['idle_tunnel_target_kib']} KiB/idle tunnel: "
        f"{report['idle_tunnel_met']}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short runs (< 1 min)")
    parser.add_argument("--seconds", type=float, default=0, help="iperf3 run length")
    parser.add_argument("--agent", choices=("client", "server"), help=argparse.SUPPRESS)
    parser.add_argument("--ca-dir", help=argparse.SUPPRESS)
    parser.add_argument("--store-dir", help=argparse.SUPPRESS)
    parser.add_argument("--hbone-port", type=int, default=AMBIT_HBONE_PORT, help=argparse.SUPPRESS)
    parser.add_argument("--entry", nargs="*", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.agent:
        run_agent(args)
        return
    if os.geteuid() != 0:
        raise SystemExit("needs root (network namespaces)")
    report = orchestrate(args)
    print_summary(report)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
