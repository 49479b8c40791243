"""`ambit lab`: the lab's commands.

  ambit lab up [--nodes N] [--pods-per-node M] [--config FILE]
                   build a multi-node lab: nodes as network namespaces, one
                   ambit-agent each, pods made by the real CNI chain
  ambit lab status     what is running, where, with which addresses
  ambit lab exec POD -- CMD...   run a command in a pod's network namespace
  ambit lab apply FILE... / delete KIND NS/NAME   change policies in the running lab
  ambit lab restart NODE [--upgrade | --kill]   replace a node's agent under traffic
  ambit lab down       remove the lab, or whatever a crashed run left behind
  ambit lab tour       the guided tour `make lab` runs: build, show, tear down

Exit codes: 0 success, 1 error (for `status`: no lab, or not healthy), 2 leftovers
in the way / usage, 130 interrupted; `exec` returns the command's own code.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .report import PrintedSteps, format_status


def _lab_tour(args: argparse.Namespace) -> int:
    from .errors import LabError, LeftoversFound
    from .tour import run_tour
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
    from .plan import LabSettings
    defaults = LabSettings()
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
    from .plan import LabSettings
    return LabSettings(prefix=args.prefix, state_dir=args.state_dir, underlay_cidr=args.underlay_cidr,
                       pod_supernet=args.pod_cidr, bpffs_root=args.bpffs_root,
                       capture=getattr(args, "capture", "ebpf"))


def _same_lab_options(args: argparse.Namespace) -> str:
    """The options to repeat in hints when the lab is not the default one."""
    from .plan import LabSettings
    defaults = LabSettings()
    # status/exec/down read the address ranges from the state file: only these matter to them
    pairs = [("--prefix", args.prefix, defaults.prefix), ("--state-dir", str(args.state_dir), str(defaults.state_dir)),
             ("--bpffs-root", str(args.bpffs_root), str(defaults.bpffs_root))]
    return "".join(f" {flag} {value}" for flag, value, default in pairs if value != default)


def _example_exec(status: Any, options: str) -> str | None:
    """A command worth trying: a client pod calling a server on another node."""
    servers = [p for p in status.pods if any(w.startswith("http:") for w in p.workloads) and p.ip]
    clients = sorted(status.pods, key=lambda p: bool(p.workloads))  # pods without a server first
    for server in servers:
        for client in clients:
            if client.key != server.key and client.node != server.node:
                port = next(w for w in server.workloads if w.startswith("http:")).split(":")[1]
                return (f"ambit lab exec{options} {client.key} -- python -m ambit.lab.podapp get "
                        f"http://{server.ip}:{port}/")
    return None


def _lab_up(args: argparse.Namespace) -> int:
    from . import labconfig
    from .errors import LabError, LeftoversFound
    from .topology import Lab
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
    from .errors import LabError, LabNotRunning
    from .topology import Lab
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
    from .errors import LabError
    from .topology import Lab
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

    from .labconfig import LabConfigError
    from .errors import LabError
    from .topology import Lab
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
    from .labconfig import LabConfigError
    from .errors import LabError
    from .topology import Lab
    try:
        deleted = Lab(_settings(args)).delete_policy(args.kind, args.name)
    except (LabError, LabConfigError, PermissionError) as exc:
        print(f"ambit lab delete: {exc}", file=sys.stderr)
        return 1
    print(f"{args.kind} {args.name} {'deleted' if deleted else 'not found'}")
    return 0 if deleted else 1


def _lab_restart(args: argparse.Namespace) -> int:
    from .errors import LabError
    from .topology import Lab
    lab = Lab(_settings(args))
    try:
        before = lab.state().nodes[args.node].agent if args.node in lab.state().nodes else None
        record = lab.restart_agent(args.node, kill=args.kill, upgrade=args.upgrade)
    except (LabError, PermissionError) as exc:
        print(f"ambit lab restart: {exc}", file=sys.stderr)
        return 1
    how = "took over from" if args.upgrade else ("replaced the killed" if args.kill else "replaced the draining")
    old = f" pid {before.pid}" if before is not None else ""
    print(f"{args.node}: agent pid {record.pid} {how} agent{old}; it serves the node now")
    return 0


def _lab_down(args: argparse.Namespace) -> int:
    from .topology import Lab
    try:
        report = Lab(_settings(args)).down()
    except PermissionError as exc:
        print(f"ambit lab: {exc}", file=sys.stderr)
        return 1
    print(report.summary())
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    lab = subparsers.add_parser("lab", help="the local lab: nodes as network namespaces, pods via the real CNI chain")
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

    restart = lab_sub.add_parser("restart", parents=[common], help="replace a node's agent: SIGTERM and start "
                                 "(default), a hand-over to a new agent (--upgrade), or SIGKILL and start (--kill)")
    restart.add_argument("node", metavar="NODE", help="the node whose agent to replace, e.g. node1")
    how = restart.add_mutually_exclusive_group()
    how.add_argument("--upgrade", action="store_true", help="start the new agent beside the running one; it takes "
                     "over the listening sockets, the API and the records, the old one drains (docs/lifecycle.md)")
    how.add_argument("--kill", action="store_true", help="SIGKILL the running agent (a crash), then start")
    restart.set_defaults(func=_lab_restart)
    lab_sub.add_parser("down", parents=[common], help="remove the lab, or the leftovers of a crashed run"
                       ).set_defaults(func=_lab_down)
    tour = lab_sub.add_parser("tour", parents=[common], help="build the default two-node lab, show what ambit "
                              "does (HBONE, identities, transparency, policy, a waypoint, metrics), tear it down")
    tour.add_argument("--capture", choices=("ebpf", "nftables"), default="ebpf",
                      help="the agents' capture backend for the walk (default: %(default)s)")
    tour.set_defaults(func=_lab_tour)

    return lab
