"""The lab's CA: `ambit ca serve` as its own process, with a filesystem of its own.

In a cluster the CA key is a Secret only the ambit-ca pod mounts. The lab
gives its CA the same separation on one machine:

- a holder process makes a mount namespace in which a tmpfs is mounted on
  <state>/ca-key (mountns.py); there it creates the CA (key and certificate)
  and the CA's token file, copies the certificate (the mesh root, public) to
  <state>/ca/root-cert.pem, and then only waits. For every other process,
  the agents, the waypoints and the lab itself, <state>/ca-key is an empty
  directory: no file they can open holds the key;
- the CA process joins that mount namespace and the underlay's network
  namespace (`python -m ambit.lab.labca join ... -- ambit ca serve ...`),
  where it listens on the underlay's last address (:15012).
  Stopping and starting it again keeps the key: the namespace lives as long
  as its holder, which `ambit lab down` stops with everything else.

There is no API server in the lab, so callers are known by static tokens
(`token,namespace/serviceaccount,node`, authn.py), one per node agent
(ambit-system/ambit-node on its node) and one per waypoint pod (its own
account), each written 0600 where its user reads it; the CA reads where pods
run from the lab's cluster file, as the agents do.

`python -m ambit.lab.labca hold ...` is the holder; `probe` asks the CA for
a certificate with a given token (the tour's and the tests' cross-node
request).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Mapping
from typing import NoReturn
from dataclasses import dataclass
from pathlib import Path

from ambit.agent.atomic_files import atomic_write
from ambit.agent.netns import netns_path

from . import mountns
from .plan import CA_PORT, CA_SERVER_NAME, NODE_AGENT_ACCOUNT, LabCaPlan, LabPlan

CA_METRICS_PORT = 15014
CA_READINESS_PORT = 15021


@dataclass(frozen=True)
class CallerToken:
    path: Path    # where its user reads it
    account: str  # namespace/serviceaccount
    node: str


def caller_tokens(plan: LabPlan) -> list[CallerToken]:
    """Who may call the lab's CA: each node's agent, each waypoint pod (pure)."""
    tokens = [CallerToken(node.ca_token, NODE_AGENT_ACCOUNT, node.name) for node in plan.nodes]
    tokens += [CallerToken(pod.ca_token, f"{pod.pod.namespace}/{pod.pod.service_account}", pod.node)
               for pod in plan.pods if pod.pod.waypoint]
    return tokens


def write_tokens(callers: list[CallerToken]) -> str:
    """A fresh secret for every caller, written where it reads it; returns the CA's token file."""
    lines = ["# token,namespace/serviceaccount,node (ambit lab)"]
    for caller in callers:
        token = secrets.token_urlsafe(32)
        caller.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(caller.path, token.encode(), 0o600, durable=False)
        lines.append(f"{token},{caller.account},{caller.node}")
    return "\n".join(lines) + "\n"


def start_holder(ca: LabCaPlan, trust_domain: str, token_file: str, env: Mapping[str, str]) -> subprocess.Popen:
    """The process that owns the CA's private filesystem; returns once the CA
    exists there and its certificate is published."""
    ca.key_dir.mkdir(parents=True, exist_ok=True)
    ca.root_cert.parent.mkdir(parents=True, exist_ok=True)
    with open(ca.log, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ambit.lab.labca", "hold", "--key-dir", str(ca.key_dir), "--root-cert",
             str(ca.root_cert), "--trust-domain", trust_domain],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, start_new_session=True, cwd="/",
            env={**os.environ, **env})
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(token_file.encode())
    proc.stdin.close()
    line = proc.stdout.readline()
    proc.stdout.close()
    if not line.startswith(b"ready"):
        proc.kill()
        proc.wait()
        raise RuntimeError(f"the CA's filesystem holder failed: {line.decode(errors='replace').strip() or 'no answer'}"
                           f" (see {ca.log})")
    return proc


def ca_argv(ca: LabCaPlan, cluster_file: Path, trust_domain: str, ready_fd: int) -> list[str]:
    return [sys.executable, "-m", "ambit.cli", "ca", "serve", "--ca-dir", str(ca.key_dir), "--trust-domain",
            trust_domain, "--listen", ca.target, "--dns-name", CA_SERVER_NAME, "--token-file", str(ca.tokens_file),
            "--config-file", str(cluster_file), "--trusted-node-accounts", NODE_AGENT_ACCOUNT,
            "--telemetry-address", ca.address, "--metrics-port", str(CA_METRICS_PORT),
            "--readiness-port", str(CA_READINESS_PORT), "--ready-fd", str(ready_fd)]


def start_ca(ca: LabCaPlan, holder_pid: int, underlay_netns: str, cluster_file: Path, trust_domain: str,
             env: Mapping[str, str]) -> tuple[subprocess.Popen, int]:
    """`ambit ca serve` in the holder's mount namespace and the underlay's
    network namespace; returns the process and the descriptor it writes
    'ready' to once it serves."""
    ready_read, ready_write = os.pipe()
    # Joined by a process of its own that then becomes the CA (`join`), never by a
    # preexec_fn: that would fork the lab, whose gRPC fork handlers can deadlock.
    argv = [sys.executable, "-m", "ambit.lab.labca", "join", "--mount-of", str(holder_pid), "--netns",
            netns_path(underlay_netns), "--", *ca_argv(ca, cluster_file, trust_domain, ready_write)]
    try:
        with open(ca.log, "ab") as log:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    pass_fds=(ready_write,), start_new_session=True, cwd="/",
                                    env={**os.environ, **env})
    except BaseException:
        os.close(ready_read)
        raise
    finally:
        os.close(ready_write)
    return proc, ready_read


# -- the holder and the probe, as processes -----------------------------------------------------------------


def _hold(args: argparse.Namespace) -> int:
    """Make the private mount namespace (first: still one thread), create the CA
    and the token file there, publish the root, wait."""
    key_dir = Path(args.key_dir)
    try:
        mountns.private_tmpfs_namespace(str(key_dir))
    except OSError as exc:
        print(f"failed: {exc}", flush=True)
        return 1
    from ambit.agent import log as logconf
    from ambit.agent.identity.ca import CA_CERT_FILE, LocalCA

    logconf.configure("info")  # to stderr (the CA's log): stdout is the lab's ready channel
    tokens = sys.stdin.read()
    try:
        LocalCA.load_or_create(key_dir, args.trust_domain)
        atomic_write(key_dir / "tokens.csv", tokens.encode(), 0o600, durable=False)
        atomic_write(Path(args.root_cert), (key_dir / CA_CERT_FILE).read_bytes(), 0o644, durable=False)
    except Exception as exc:
        print(f"failed: {exc}", flush=True)
        return 1
    print("ready", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        signal.pause()


def _join(args: argparse.Namespace) -> NoReturn:
    """Join the holder's mount namespace and a network namespace, then become
    `command`: setns into a mount namespace needs a single-threaded caller."""
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    mountns.enter([(f"/proc/{args.mount_of}/ns/mnt", mountns.CLONE_NEWNS), (args.netns, mountns.CLONE_NEWNET)])
    os.execvp(command[0], command)


def _probe(args: argparse.Namespace) -> int:
    """Ask the CA for `--identity` with `--token-file`, as a node agent does; print the outcome as JSON."""
    from datetime import timedelta

    from ambit.agent.identity.csr import new_workload_key
    from ambit.agent.identity.issuer import IstioCaIssuer
    from ambit.agent.identity.istio_ca import CaClientSettings, CaRefused, IssueError, IstioCaClient
    from ambit.agent.identity.spiffe import SpiffeId

    async def ask() -> dict[str, object]:
        client = IstioCaClient(CaClientSettings(address=args.address, token_file=Path(args.token_file),
                                                root_cert_file=Path(args.root_cert), server_name=CA_SERVER_NAME,
                                                timeout=args.timeout))
        identity = SpiffeId.parse(args.identity)
        try:
            issued = await IstioCaIssuer(client, identity.trust_domain, impersonate=not args.own).issue(
                identity, new_workload_key(), timedelta(hours=1))
            if args.out_dir:  # what the agent would hold: the key, the chain, the root
                out = Path(args.out_dir)
                out.mkdir(parents=True, exist_ok=True)
                atomic_write(out / "key.pem", issued.private_key_pem, 0o600, durable=False)
                atomic_write(out / "cert.pem", issued.chain_pem, 0o644, durable=False)
                atomic_write(out / "root-cert.pem", issued.root_pem, 0o644, durable=False)
            return {"issued": True, "identity": str(issued.spiffe_id), "serial": f"{issued.serial:x}"}
        except CaRefused as exc:
            return {"issued": False, "code": exc.code.name, "message": str(exc)}
        except IssueError as exc:
            return {"issued": False, "code": "", "message": str(exc)}
        finally:
            await client.close()

    print(json.dumps(asyncio.run(ask())))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ambit.lab.labca")
    sub = parser.add_subparsers(dest="command", required=True)
    hold = sub.add_parser("hold", help="(the lab runs it) keep the CA's private filesystem")
    hold.add_argument("--key-dir", required=True)
    hold.add_argument("--root-cert", required=True)
    hold.add_argument("--trust-domain", required=True)
    hold.set_defaults(func=_hold)
    join = sub.add_parser("join", help="(the lab runs it) run a command in the holder's filesystem and a netns")
    join.add_argument("--mount-of", type=int, required=True, metavar="PID", help="the holder's pid")
    join.add_argument("--netns", required=True, metavar="PATH")
    join.add_argument("command", nargs=argparse.REMAINDER)
    join.set_defaults(func=_join)
    probe = sub.add_parser("probe", help="ask the lab's CA for a certificate, as a node agent would")
    probe.add_argument("--address", default=f"10.100.0.254:{CA_PORT}")
    probe.add_argument("--token-file", required=True)
    probe.add_argument("--root-cert", required=True)
    probe.add_argument("--identity", required=True, help="spiffe://TD/ns/NS/sa/SA")
    probe.add_argument("--own", action="store_true", help="ask as the token's own identity (no impersonation)")
    probe.add_argument("--timeout", type=float, default=5.0)
    probe.add_argument("--out-dir", help="write the key, the certificate chain and the root here when issued")
    probe.set_defaults(func=_probe)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
