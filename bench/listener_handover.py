#!/usr/bin/env python3
"""Which way of handing a listening socket from one process to another
loses no connection, measured: the choice behind docs/lifecycle.md.

In a namespace of its own: an "old" server process accepts on 127.0.0.1
(accepting in bursts every few ms, as a busy agent does, so its accept queue
is rarely empty) while 16 client processes connect, read one byte and close,
as fast as they can. Then a "new" server process takes over and the old one
stops accepting and closes its listener, by one of:

  fd-pass    the old process sends its listening socket over a Unix socket
             (SCM_RIGHTS); both accept from the one queue until the old
             one closes its descriptor (the socket lives on in the new one)
  reuseport  both bind the port with SO_REUSEPORT; the old one closes its
             own listener (net.ipv4.tcp_migrate_req=0, the default)
  migrate    the same with net.ipv4.tcp_migrate_req=1: the kernel moves the
             closed listener's queued and half-open connections to another
             listener of the group

A client connection fails if it is reset or gets no byte. Ends with one JSON
line; target: 0 failed connections for the method the agent uses (fd-pass).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ambit.agent.netlink import iproute  # noqa: E402
from ambit.agent.netns import create_netns, enter_netns, remove_netns, write_sysctl  # noqa: E402

PORT = 18001
METHODS = ("fd-pass", "reuseport", "migrate")
CLIENTS = 16
ACCEPT_EVERY_S = 0.005
SERVED_EACH_SIDE = 300  # connections answered before the hand-over, and again after it


def _listener(reuseport: bool) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuseport:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", PORT))
    sock.listen(4096)
    return sock


def _serve_burst(sock: socket.socket) -> int:
    """Accept what is queued (up to 64), answer each with one byte."""
    served = 0
    for _ in range(64):
        try:
            conn, _ = sock.accept()
        except (BlockingIOError, TimeoutError):
            break
        conn.sendall(b"x")
        conn.close()
        served += 1
    return served


def old_server(netns: str, method: str, control: str, ready: mp.Event, stop: mp.Event) -> None:
    enter_netns(netns)
    sock = _listener(reuseport=method != "fd-pass")
    sock.setblocking(False)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(control)
    server.listen(1)
    server.setblocking(False)
    ready.set()
    while not stop.is_set():
        try:
            peer, _ = server.accept()
        except BlockingIOError:
            time.sleep(ACCEPT_EVERY_S)
            _serve_burst(sock)
            continue
        peer.setblocking(True)
        if method == "fd-pass":
            socket.send_fds(peer, [b"listener"], [sock.fileno()])
        else:
            peer.recv(1)  # the new process is listening: hand over by closing ours
        sock.close()
        peer.close()
        return


def new_server(netns: str, method: str, control: str, stop: mp.Event) -> None:
    enter_netns(netns)
    peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    peer.connect(control)
    if method == "fd-pass":
        _, fds, _, _ = socket.recv_fds(peer, 64, 1)
        sock = socket.socket(fileno=fds[0])
    else:
        sock = _listener(reuseport=True)
        peer.sendall(b"r")
    sock.setblocking(False)
    while not stop.is_set():
        time.sleep(ACCEPT_EVERY_S)
        _serve_burst(sock)
    sock.close()


def client(netns: str, stop: mp.Event, results: mp.Queue, served: Any) -> None:
    enter_netns(netns)
    ok, failed = 0, {}
    while not stop.is_set():
        conn = socket.socket()
        conn.settimeout(3)
        try:
            conn.connect(("127.0.0.1", PORT))
            if conn.recv(1) == b"x":
                ok += 1
                with served.get_lock():
                    served.value += 1
            else:
                failed["eof"] = failed.get("eof", 0) + 1
        except OSError as exc:
            failed[type(exc).__name__] = failed.get(type(exc).__name__, 0) + 1
        finally:
            conn.close()
    results.put((ok, failed))


def _until(check: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"never happened within {timeout:g}s: {what}")
        time.sleep(0.01)


def trial(netns: str, method: str, workdir: Path) -> tuple[int, dict[str, int]]:
    control = str(workdir / f"control-{uuid.uuid4().hex[:6]}")
    stop, stop_clients, ready, results = mp.Event(), mp.Event(), mp.Event(), mp.Queue()
    served = mp.Value("i", 0)
    old = mp.Process(target=old_server, args=(netns, method, control, ready, stop))
    old.start()
    if not ready.wait(30):
        raise RuntimeError("the old server never listened")
    clients = [mp.Process(target=client, args=(netns, stop_clients, results, served)) for _ in range(CLIENTS)]
    for proc in clients:
        proc.start()
    _until(lambda: served.value >= SERVED_EACH_SIDE, f"{SERVED_EACH_SIDE} connections served by the old server")
    new = mp.Process(target=new_server, args=(netns, method, control, stop))
    new.start()
    old.join(30)  # it returns once it handed over (and closed its listener)
    if old.is_alive():
        raise RuntimeError("the old server never handed over")
    handed_over_at = served.value
    _until(lambda: served.value >= handed_over_at + SERVED_EACH_SIDE,
           f"{SERVED_EACH_SIDE} connections served after the hand-over")
    stop_clients.set()  # clients first: a server closing under them would count as a failure
    ok, failed = 0, {}
    for _ in clients:
        got, kinds = results.get(timeout=30)
        ok += got
        for kind, count in kinds.items():
            failed[kind] = failed.get(kind, 0) + count
    for proc in clients:
        proc.join(10)
    stop.set()
    for proc in (new, old):
        proc.join(10)
    os.unlink(control)
    return ok, failed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 hand-overs per method instead of 10")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("the bench makes a network namespace: run it as root")
    trials = 3 if args.quick else 10
    name = f"bhand-{uuid.uuid4().hex[:6]}"
    path = create_netns(name)
    workdir = Path(f"/tmp/{name}")
    workdir.mkdir()
    report: dict[str, dict[str, object]] = {}
    try:
        with iproute(path) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        for method in METHODS:
            write_sysctl(path, "net/ipv4/tcp_migrate_req", 1 if method == "migrate" else 0)
            ok, failed = 0, {}
            for _ in range(trials):
                got, kinds = trial(path, method, workdir)
                ok += got
                for kind, count in kinds.items():
                    failed[kind] = failed.get(kind, 0) + count
            report[method] = {"connections": ok + sum(failed.values()), "failed": sum(failed.values()),
                              "failures": failed, "handovers": trials}
            print(f"{method:>9}: {sum(failed.values())} of {ok + sum(failed.values())} connections failed "
                  f"over {trials} hand-overs {failed or ''}", flush=True)
    finally:
        remove_netns(name)
        workdir.rmdir()
    print(json.dumps({"bench": "listener_handover", "quick": args.quick, **report,
                      "target": {"fd-pass": {"failed": 0}}, "met": report["fd-pass"]["failed"] == 0}))


if __name__ == "__main__":
    main()
