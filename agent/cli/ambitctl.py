"""ambitctl: look inside a running ambit-agent over its socket.

Human tables by default, `-o json` for scripts. Exit status: 0 ok, 1 the
agent answered with an error, 2 usage, 3 the agent is not reachable.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from google.protobuf.json_format import MessageToDict

from .client import DEFAULT_SOCKET, AgentClient, AgentUnavailable

EXIT_ERROR, EXIT_UNREACHABLE = 1, 3


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    return "\n".join(lines)


def _age(since: float) -> str:
    seconds = max(0, int(time.time() - since))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def cmd_status(client: AgentClient, output: str) -> str:
    st = client.status()
    if output == "json":
        return json.dumps(MessageToDict(st, preserving_proto_field_name=True))
    phase = st.phase or "-"
    if st.successor_pid:
        phase += f" (handed over to pid {st.successor_pid})"
    return "\n".join([f"node:        {st.node}", f"version:     {st.version} (pid {st.pid}, {phase})",
                      f"ready:       {'yes' if st.ready else 'no (' + st.reason + ')'}",
                      f"uptime:      {_age(st.started_at)}", f"event loop:  {st.event_loop or '-'}",
                      f"capture:     {st.capture}",
                      f"proxy netns: {st.proxy_netns or '-'}",
                      f"listeners:   {', '.join(st.listeners) or '-'}",
                      f"discovery:   {st.discovery}" + (f" ({'synced' if st.discovery_synced else 'not synced'}, "
                                                        f"{st.discovered_pods} pods with addresses)"
                                                        if st.discovery != "none" else ""),
                      *_discovery_lines(st),
                      f"enrolled:    {st.enrolled} pod(s)", f"connections: {st.live_connections} live",
                      "fail closed: " + (", ".join(f"{n} {reason}" for reason, n in sorted(st.failed_closed.items()))
                                         or "none"),
                      f"dropped:     {st.spoofed_packets_dropped} spoofed packet(s), "
                      f"{st.ipv6_tcp_dropped} IPv6 TCP packet(s)"
                      + (f" ({_drops(st.capture_verdicts)})" if st.spoofed_packets_dropped or st.ipv6_tcp_dropped
                         else ""),
                      *_drift_lines(st)])


def _drops(verdicts) -> str:
    return ", ".join(f"{name} {n}" for name, n in sorted(verdicts.items()) if "_drop_" in name and n)


def _drift_lines(st) -> list[str]:
    """Pods discovery puts in the mesh that this node does not capture."""
    if not st.pods_expected and not st.not_captured:
        return []
    lines = [f"drift:       {len(st.not_captured)} of {st.pods_expected} pod(s) expected in the mesh not captured"]
    lines += [f"             {item}" for item in st.not_captured]
    return lines


def _discovery_lines(st) -> list[str]:
    if st.discovery == "none":
        return []
    held = ", ".join(f"{n} {kind}" for kind, n in sorted(st.discovered_objects.items()) if n) or "nothing"
    return [*[f"  not synced: {what}: {why}" for what, why in sorted(st.discovery_pending.items())],
            f"  revision:  {st.discovery_revision or '-'}", f"  objects:   {held}",
            f"  waypoints ready: {', '.join(st.ready_waypoints) or '-'}",
            *[f"  rejected:  {what}: {why}" for what, why in sorted(st.discovery_errors.items())]]


def cmd_workloads(client: AgentClient, output: str) -> str:
    items = client.workloads()
    if output == "json":
        return json.dumps([MessageToDict(w, preserving_proto_field_name=True) for w in items])
    rows = [[f"{w.pod.namespace}/{w.pod.name}" if w.pod.name else "-", ",".join(w.ips),
             f"{w.host_veth}({w.host_veth_ifindex})", w.capture, w.attachment.container_id[:12],
             _age(w.enrolled_at)] for w in items]
    return _table(rows, ["POD", "IPS", "HOST VETH", "CAPTURE", "CONTAINER", "AGE"])


def _bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n}B"


def cmd_connections(client: AgentClient, output: str) -> str:
    items = client.connections()
    if output == "json":
        return json.dumps([MessageToDict(c, preserving_proto_field_name=True) for c in items])
    rows = [[str(c.id), c.listener, c.client, c.original_destination, c.source_identity or "-",
             c.destination_identity or "-", c.via, _bytes(c.bytes_sent), _bytes(c.bytes_received),
             _age(c.started_at), f"{c.decision}" + (f" ({c.reason})" if c.reason else "")] for c in items]
    return _table(rows, ["ID", "LISTENER", "CLIENT", "ORIGINAL DST", "SRC IDENTITY", "DST IDENTITY", "VIA",
                         "SENT", "RECEIVED", "AGE", "DECISION"])


def _json(message) -> str:
    return json.dumps(MessageToDict(message, preserving_proto_field_name=True))


def cmd_policies(client: AgentClient, output: str, workload: str = "") -> str:
    reply = client.policies(workload)
    if output == "json":
        return _json(reply)
    head = [f"workload: {reply.workload}", f"mTLS:     {reply.mtls}"] if reply.workload else []
    rows = [[f"{p.namespace}/{p.name}", p.kind, p.action, "yes" if p.enforced else "no", p.message or "-"]
            for p in reply.policies]
    if not rows:
        return "\n".join(head + ["", "no AuthorizationPolicy applies: every connection is allowed"][not head:])
    rejected = sum(1 for p in reply.policies if p.error)
    if rejected:
        head.append(f"{rejected} polic{'y' if rejected == 1 else 'ies'} failed to parse: each denies every "
                    "connection to the workloads it would select (NOTES say which)")
    return "\n".join([*head, ""] if head else []) + _table(rows, ["POLICY", "KIND", "ACTION", "ENFORCED", "NOTES"])


def cmd_certs(client: AgentClient, output: str) -> str:
    reply = client.certificates()
    if output == "json":
        return _json(reply)
    rows = [[c.identity, c.serial[:16], time.strftime("%Y-%m-%d %H:%M", time.gmtime(c.not_after)),
             "due" if c.rotation_due else time.strftime("%Y-%m-%d %H:%M", time.gmtime(c.rotation_due_at)),
             c.issuer or "-"]
            for c in reply.certificates]
    head = f"trust domain: {reply.trust_domain}\nCA:           {reply.ca or '-'}\n"
    table = (_table(rows, ["IDENTITY", "SERIAL", "EXPIRES (UTC)", "ROTATES (UTC)", "ISSUED BY"]) if rows else
             "no certificate yet (one is requested for each identity with a pod in the mesh on this node)")
    failing = [f"  {f.identity}: {f.error}" for f in reply.failing]
    return head + table + ("\nrequests failing (retried with backoff):\n" + "\n".join(failing) if failing else "")


def cmd_trace(client: AgentClient, output: str, source: str = "", destination: str = "") -> str:
    host, _, port = destination.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"destination must be IP:PORT, not {destination!r}")
    reply = client.trace(source, host.strip("[]"), int(port))
    if output == "json":
        return _json(reply)
    lines = [f"{source} -> {destination}"]
    lines += [f"  {s.stage:<16} {s.detail}" for s in reply.steps]
    lines.append(f"  => listener {reply.listener}, route {reply.route}, {reply.decision}: {reply.reason}")
    return "\n".join(lines)


COMMANDS = {"status": cmd_status, "workloads": cmd_workloads, "connections": cmd_connections,
            "policies": cmd_policies, "certs": cmd_certs, "trace": cmd_trace}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ambitctl", description="Inspect a running ambit-agent.")
    parser.add_argument("--socket", default=os.environ.get("AMBIT_AGENT_SOCKET", DEFAULT_SOCKET),
                        help="agent API socket (default: %(default)s; env AMBIT_AGENT_SOCKET)")
    parser.add_argument("-o", "--output", choices=["table", "json"], default="table", help="output format")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("status", help="agent version, readiness and counts")
    sub.add_parser("workloads", help="enrolled pods as the agent recorded them from the kernel")
    sub.add_parser("connections", help="live connections: client, original destination, identities, bytes, "
                                       "age, policy decision")
    policies = sub.add_parser("policies", help="policies that apply to a workload (all the agent holds without one)")
    policies.add_argument("workload", nargs="?", default="", help="namespace/name or IP of a pod")
    sub.add_parser("certs", help="workload certificates this node holds, with expiry and rotation")
    trace = sub.add_parser("trace", help="dry run: what would happen to a new connection SRC -> DST:PORT "
                                         "(capture hook, mark, table, listener, route, pool, policy)")
    trace.add_argument("source", help="source IP (a pod)")
    trace.add_argument("destination", help="destination IP:PORT (a pod or a Service VIP)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        extra = {k: v for k, v in vars(args).items() if k in ("workload", "source", "destination")}
        with AgentClient(args.socket) as client:
            print(COMMANDS[args.command](client, args.output, **extra))
    except AgentUnavailable as exc:
        print(f"ambitctl: {exc}", file=sys.stderr)
        sys.exit(EXIT_UNREACHABLE)
    except ValueError as exc:
        print(f"ambitctl: {exc}", file=sys.stderr)
        sys.exit(2)
    except Exception as exc:  # grpc.RpcError and friends: one line, no traceback
        details = exc.details() if hasattr(exc, "details") else str(exc)
        print(f"ambitctl: {args.command} failed: {details}", file=sys.stderr)
        sys.exit(EXIT_ERROR)


if __name__ == "__main__":
    main()
