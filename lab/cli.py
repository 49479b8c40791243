"""ambit: the lab and other tools around the agent.

  ambit lab up [--nodes N] [--pods-per-node M] [--config FILE]
                   build a multi-node lab: nodes as network namespaces, one
                   ambit-agent each, pods made by the real CNI chain
  ambit lab status     what is running, where, with which addresses
  ambit lab exec POD -- CMD...   run a command in a pod's network namespace
  ambit lab down       remove the lab, or whatever a crashed run left behind
  ambit lab tour       the guided tour `make lab` runs: build, show, tear down
  ambit ca init DIR    create the mesh CA for the ambit-ca Secret
  ambit waypoint NS/NAME --config-file F --ca-dir D --out-dir O
                   write the Envoy bootstrap of a waypoint (L7 policy; docs/waypoint.md)
  ambit install-cni [--watch | --uninstall]   chain ambit-cni into this node's CNI
                   configuration (the DaemonSet's install step; see install/README.md)

Exit codes: 0 success, 1 error (for `status`: no lab, or not healthy), 2 leftovers
in the way / usage, 130 interrupted; `exec` returns the command's own code.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Sequence, TextIO

from .. import log as logconf


def _lab_tour(args: argparse.Namespace) -> int:
    from ..lab.topology import LabError, LeftoversFound
    from ..lab.tour import run_tour
    try:
        run_tour(settings=_settings(args))
    except LeftoversFound as exc:
        print(f"ambit lab: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nambit lab: interrupted; everything the tour created was removed", file=sys.stderr)
        return 130
    except (LabError, PermissionError) as exc:
        print(f"ambit lab: {exc}", file=sys.stderr)
        return 1
    return 0


# --- lab settings shared by up/status/exec/down ---------------------------------------------------------------

def _settings_parent() -> argparse.ArgumentParser:
    from ..lab import topology
    defaults = topology.LabSettings()
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("where the lab lives (for tests and side-by-side labs; "
                                      "give the same values to every command)")
    group.add_argument("--prefix", default=defaults.prefix, help="name prefix of every lab object "
                       "(default: %(default)s)")
    group.add_argument("--state-dir", type=Path, default=defaults.state_dir,
                       help="state file, logs and agent sockets (default: %(default)s)")
    group.add_argument("--underlay-cidr", default=defaults.underlay_cidr,
                       help="node addresses, node N = host N (default: %(default)s)")
    group.add_argument("--pod-cidr", default=defaults.pod_supernet,
                       help="pod range, node N gets the Nth /24 (default: %(default)s)")
    group.add_argument("--bpffs-root", type=Path, default=defaults.bpffs_root,
                       help="per-node pinned eBPF directories are <root>/<prefix>nodeN (default: %(default)s)")
    return parent


def _settings(args: argparse.Namespace):
    from ..lab.topology import LabSettings
    return LabSettings(prefix=args.prefix, state_dir=args.state_dir, underlay_cidr=args.underlay_cidr,
                       pod_supernet=args.pod_cidr, bpffs_root=args.bpffs_root,
                       capture=getattr(args, "capture", "ebpf"))


def _same_lab_options(args: argparse.Namespace) -> str:
    """The options to repeat in hints when the lab is not the default one."""
    from ..lab.topology import LabSettings
    defaults = LabSettings()
    # status/exec/down read the address ranges from the state file: only these matter to them
    pairs = [("--prefix", args.prefix, defaults.prefix), ("--state-dir", str(args.state_dir), str(defaults.state_dir)),
             ("--bpffs-root", str(args.bpffs_root), str(defaults.bpffs_root))]
    return "".join(f" {flag} {value}" for flag, value, default in pairs if value != default)


class PrintedSteps:
    """One line per step, with the time it took when that was a second or more."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.count = 0

    @contextlib.contextmanager
    def step(self, title: str) -> Iterator[None]:
        self.count += 1
        self.out.write(f"[{self.count}] {title} ...")
        self.out.flush()
        started = time.monotonic()
        try:
            yield
        except BaseException:
            self.out.write(" failed\n")
            self.out.flush()
            raise
        elapsed = time.monotonic() - started
        self.out.write(f" done{f' ({elapsed:.1f}s)' if elapsed >= 1 else ''}\n")
        self.out.flush()


def _table(rows: Sequence[Sequence[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [indent + "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows]


def format_status(status: Any) -> str:
    """`ambit lab status` as a person reads it."""
    lines = [f"lab {status.prefix!r}: {status.phase}{'' if status.healthy else ' (NOT healthy: see below)'}",
             f"  underlay {status.underlay_cidr} on bridge {status.underlay_bridge} in namespace "
             f"{status.underlay_netns}", "", "nodes"]
    rows = [["NAME", "NAMESPACE", "UNDERLAY IP", "POD CIDR", "AGENT", "SOCKET"]]
    for n in status.nodes:
        if n.agent_pid is None:
            agent = "not started"
        elif not n.agent_alive:
            agent = f"pid {n.agent_pid} DEAD"
        elif n.agent_ready:
            agent = f"pid {n.agent_pid} ready, {n.agent_enrolled} of {n.agent_records} pod(s) in the mesh"
        else:
            agent = f"pid {n.agent_pid} NOT READY ({n.agent_detail})"
        rows.append([n.name, n.netns + ("" if n.netns_present else " (gone)"), n.underlay_ip, n.pod_cidr, agent,
                     n.socket])
    lines += _table(rows)
    lines += ["", "pods"]
    rows = [["POD", "NODE", "IP", "SERVICE ACCOUNT", "AMBIENT", "WORKLOAD"]]
    for p in status.pods:
        if not p.workloads:
            workload = "- (client only)"
        else:
            workload = " ".join(p.workloads) + (f" (pid {p.workload_pid})" if p.workload_alive
                                                else f" (pid {p.workload_pid} DEAD)")
        rows.append([p.key, p.node, (p.ip or "-") + ("" if p.netns_present else " (netns gone)"),
                     p.service_account, "yes" if p.ambient else "no", workload])
    lines += _table(rows)
    if status.services:
        lines += ["", "services (ClusterIPs are answered by ambit's proxy once capture is on)"]
        rows = [["SERVICE", "CLUSTER IP", "PORTS", "ENDPOINTS"]]
        rows += [[s.key, s.cluster_ip or "None", ", ".join(s.ports), ", ".join(s.endpoints) or "-"]
                 for s in status.services]
        lines += _table(rows)
    if status.policies:
        lines += ["", "policies (handed to the agent as written)"] + [f"  {p}" for p in status.policies]
    lines += ["", f"state {status.state_file}; objects with addresses {status.cluster_file}"]
    return "\n".join(lines)


def _example_exec(status: Any, options: str) -> str | None:
    """A command worth trying: a client pod calling a server on another node."""
    servers = [p for p in status.pods if any(w.startswith("http:") for w in p.workloads) and p.ip]
    clients = sorted(status.pods, key=lambda p: bool(p.workloads))  # pods without a server first
    for server in servers:
        for client in clients:
            if client.key != server.key and client.node != server.node:
                port = next(w for w in server.workloads if w.startswith("http:")).split(":")[1]
                return (f"ambit lab exec{options} {client.key} -- python -m ambit.agent.lab.workload get "
                        f"http://{server.ip}:{port}/")
    return None


def _lab_up(args: argparse.Namespace) -> int:
    from ..lab import labconfig
    from ..lab.topology import Lab, LabError, LeftoversFound
    options = _same_lab_options(args)
    try:
        if args.config is not None:
            if args.pods_per_node is not None:
                raise labconfig.LabConfigError("--pods-per-node only applies without --config (the file lists "
                                               "the pods)")
            config, source = labconfig.load_file(args.config), str(args.config)
        elif args.nodes is not None or args.pods_per_node is not None:
            nodes = 2 if args.nodes is None else args.nodes
            per_node = 2 if args.pods_per_node is None else args.pods_per_node
            config, source = labconfig.generated_config(nodes, per_node), f"{nodes} nodes x {per_node} pods"
        else:
            config, source = labconfig.load_default(), f"the default lab ({labconfig.DEFAULT_FILE})"
        lab = Lab(_settings(args), PrintedSteps(sys.stdout))
        plan = lab.plan(config, args.nodes)
        print(f"ambit lab up: {len(plan.nodes)} node(s), {len(plan.pods)} pod(s) from {source}")
        lab.up(config, args.nodes)
    except LeftoversFound as exc:
        print(f"ambit lab: {str(exc).replace('`ambit lab down`', f'`ambit lab down{options}`')}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nambit lab: interrupted; everything the lab created was removed", file=sys.stderr)
        return 130
    except (LabError, labconfig.LabConfigError, PermissionError) as exc:
        print(f"ambit lab: {exc}", file=sys.stderr)
        if isinstance(exc, LabError):
            print("ambit lab: everything the lab created was removed", file=sys.stderr)
        return 1
    status = lab.status()
    print()
    print(format_status(status))
    example = _example_exec(status, options)
    print()
    if example:
        print(f"try:  {example}")
    print(f"then: ambit lab down{options}")
    return 0


def _lab_status(args: argparse.Namespace) -> int:
    from ..lab.topology import Lab, LabError, LabNotRunning
    lab = Lab(_settings(args))
    try:
        status = lab.status()
    except LabNotRunning:
        leftovers = lab.leftovers()
        if args.json:
            print(json.dumps({"running": False, "leftovers": leftovers.describe() or None}))
        else:
            print("no lab is running" + (f"; leftovers: {leftovers.describe()} (remove them with "
                                         f"`ambit lab down{_same_lab_options(args)}`)" if leftovers else ""))
        return 1
    except LabError as exc:
        print(f"ambit lab: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"running": True, **status.to_json()}, indent=1))
    else:
        print(format_status(status))
    return 0 if status.healthy else 1


def _lab_exec(args: argparse.Namespace) -> int:
    from ..lab.topology import Lab, LabError
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    try:
        return Lab(_settings(args)).exec(args.pod, command, capture=False).returncode
    except (LabError, PermissionError) as exc:
        print(f"ambit lab: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _lab_apply(args: argparse.Namespace) -> int:
    import yaml

    from ..lab.labconfig import LabConfigError
    from ..lab.topology import Lab, LabError
    documents = []
    try:
        for path in args.files:
            documents += [d for d in yaml.safe_load_all(path.read_text()) if d]
        applied = Lab(_settings(args)).apply_policies(documents)
    except (OSError, yaml.YAMLError, LabError, LabConfigError, PermissionError) as exc:
        print(f"ambit lab apply: {exc}", file=sys.stderr)
        return 1
    for name in applied:
        print(f"{name} applied (agents and waypoints follow the cluster file within ~2 s)")
    return 0


def _lab_delete(args: argparse.Namespace) -> int:
    from ..lab.labconfig import LabConfigError
    from ..lab.topology import Lab, LabError
    try:
        deleted = Lab(_settings(args)).delete_policy(args.kind, args.name)
    except (LabError, LabConfigError, PermissionError) as exc:
        print(f"ambit lab delete: {exc}", file=sys.stderr)
        return 1
    print(f"{args.kind} {args.name} {'deleted' if deleted else 'not found'}")
    return 0 if deleted else 1


def _lab_down(args: argparse.Namespace) -> int:
    from ..lab.topology import Lab
    try:
        report = Lab(_settings(args)).down()
    except PermissionError as exc:
        print(f"ambit lab: {exc}", file=sys.stderr)
        return 1
    print(report.summary())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ambit", description="ambit tools: the local multi-node lab and helpers.")
    sub = parser.add_subparsers(dest="area", required=True, metavar="AREA")
    lab = sub.add_parser("lab", help="the local lab: nodes as network namespaces, pods via the real CNI chain")
    lab_sub = lab.add_subparsers(dest="action", required=True, metavar="ACTION")
    common = _settings_parent()

    up = lab_sub.add_parser("up", parents=[common], help="build the lab (default: a 2-node lab from the packaged "
                                                         "default-lab.yaml)")
    up.add_argument("--nodes", type=int, metavar="N", help="number of nodes (default: from the file, else 2)")
    up.add_argument("--pods-per-node", type=int, metavar="M",
                    help="without --config: generate M pods per node serving HTTP and echo (default: 2)")
    up.add_argument("--config", type=Path, metavar="FILE",
                    help="Kubernetes objects (Namespace, ServiceAccount, Pod, Service, policies) in YAML")
    up.add_argument("--capture", choices=("none", "ebpf", "nftables"), default="ebpf",
                    help="the agents' capture mode: none records pods only; ebpf (tc programs) or nftables "
                         "(TPROXY rules) steers enrolled pods' TCP into each node's proxy namespace "
                         "(default: %(default)s)")
    up.set_defaults(func=_lab_up)

    status = lab_sub.add_parser("status", parents=[common], help="nodes, agents, pods, services of the running lab")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=_lab_status)

    exe = lab_sub.add_parser("exec", parents=[common], help="run a command in a pod's network namespace",
                             usage="ambit lab exec [options] POD -- CMD [ARGS...]")
    exe.add_argument("pod", metavar="POD", help="namespace/name, or a unique pod name")
    exe.add_argument("command", nargs=argparse.REMAINDER, metavar="CMD")
    exe.set_defaults(func=_lab_exec)

    apply = lab_sub.add_parser("apply", parents=[common], help="add or replace AuthorizationPolicies and "
                               "PeerAuthentications in the running lab (agents and waypoints apply them live)")
    apply.add_argument("files", nargs="+", type=Path, metavar="FILE", help="YAML with the policies")
    apply.set_defaults(func=_lab_apply)
    delete = lab_sub.add_parser("delete", parents=[common], help="remove a policy from the running lab")
    delete.add_argument("kind", choices=("AuthorizationPolicy", "PeerAuthentication"))
    delete.add_argument("name", metavar="NAMESPACE/NAME")
    delete.set_defaults(func=_lab_delete)

    lab_sub.add_parser("down", parents=[common], help="remove the lab, or the leftovers of a crashed run"
                       ).set_defaults(func=_lab_down)
    tour = lab_sub.add_parser("tour", parents=[common], help="build the default two-node lab, show what ambit "
                              "does (HBONE, identities, transparency, policy, a waypoint, metrics), tear it down")
    tour.add_argument("--capture", choices=("ebpf", "nftables"), default="ebpf",
                      help="the agents' capture backend for the walk (default: %(default)s)")
    tour.set_defaults(func=_lab_tour)

    # --- install-cni: the DaemonSet's install step (agent/install/cli.py) ---
    from ..install import cli as install_cli
    install_cli.add_parser(sub)

    from ..waypoint import cli as waypoint_cli
    waypoint_cli.add_parser(sub)

    ca = sub.add_parser("ca", help="the mesh's certificate authority")
    ca_sub = ca.add_subparsers(dest="action", required=True, metavar="ACTION")
    init = ca_sub.add_parser("init", help="create a CA (or show the existing one) in DIR, for the ambit-ca Secret")
    init.add_argument("dir", type=Path, help="directory for ca-cert.pem and ca-key.pem (key mode 0600)")
    init.add_argument("--trust-domain", default="cluster.local", help="SPIFFE trust domain (default: %(default)s)")
    init.set_defaults(func=_ca_init)
    return parser


def _ca_init(args: argparse.Namespace) -> int:
    from ..identity.ca import InvalidCA, LocalCA
    try:
        ca = LocalCA.load_or_create(args.dir, args.trust_domain)
    except (InvalidCA, OSError) as exc:
        print(f"ambit ca: {exc}", file=sys.stderr)
        return 1
    print(f"CA for trust domain {args.trust_domain} in {args.dir} (valid until {ca.not_after:%Y-%m-%d})")
    print("give it to every node's agent:")
    print(f"  kubectl -n ambit-system create secret generic ambit-ca "
          f"--from-file={args.dir}/ca-cert.pem --from-file={args.dir}/ca-key.pem")
    return 0


def main(argv: list[str] | None = None) -> None:
    try:
        args = build_parser().parse_args(argv)  # imports the lab: Ctrl-C may come this early
    except KeyboardInterrupt:
        sys.exit(130)
    logconf.configure("warn")
    sys.exit(args.func(args))


if __name__ == "__main__":
    main()
