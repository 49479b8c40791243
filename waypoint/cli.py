"""`ambit waypoint NAMESPACE/NAME`: write the Envoy bootstrap of a waypoint.

Reads the cluster's objects (the same files `ambit-agent --discovery files`
reads: Namespaces, Pods, Services, Gateways, AuthorizationPolicies), works
out what the waypoint stands in front of (waypoint/destinations.py),
gets its SPIFFE certificate from the mesh CA (over Istio's certificate API
with the waypoint's own token, --ca-address; or from a CA key on this host,
--ca-dir), and writes into --out-dir:

    envoy.json   the bootstrap (`envoy -c envoy.json`): who this Envoy is and
                 where its resources are
    xds/         listeners, clusters and routes, as files Envoy watches
                 (xds_files.py)
    certs/       the waypoint's key and certificate and the trust bundle, as
                 the SDS files Envoy reads them from (credentials.py)

With --run it then runs Envoy and re-issues the certificate at half its
lifetime (runner.py); with --watch as well, it applies changes of the cluster
files to the running Envoy (live.py). Neither needs an Envoy restart.

A CA that is unavailable at start is asked again with backoff for up to
--ca-wait seconds (300 with --run): a waypoint rolled out beside its CA waits
for it rather than crash-looping.

Exit codes: 0 written (--run: Envoy's own status), 1 the waypoint or the CA is
unusable, 2 usage.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

from ambit.agent.atomic_files import atomic_write
from ambit.agent.backoff import Backoff
from ambit.agent.datapath.constants import HBONE_PORT
from ambit.agent.identity.ca import CA_CERT_FILE, CA_KEY_FILE, DEFAULT_LEAF_TTL, InvalidCA, LocalCA
from ambit.agent.identity.ca_options import add_ca_client_arguments, ca_client_settings
from ambit.agent.identity.issuer import Issuer, IstioCaIssuer, LocalIssuer
from ambit.agent.identity.istio_ca import CaUnavailable, IssueError, IstioCaClient
from ambit.agent.identity.rotation import CA_RETRY
from ambit.agent.identity.store import CertificateStore, WorkloadCert
from .bootstrap import BootstrapOptions, waypoint_bootstrap
from .credentials import CertificateRotator, SecretFiles
from .live import ConfigWatcher, SourceClusterView, file_view, kube_view, write_configuration
from .xds_files import XdsFiles
from .destinations import WaypointError, WaypointPlan, plan_waypoint, state_from_objects

CONFIG_FILE = "envoy.json"
T = TypeVar("T")


@dataclass(frozen=True)
class GeneratedWaypoint:
    plan: WaypointPlan
    config_path: Path
    secrets: SecretFiles
    xds: XdsFiles
    certificate: WorkloadCert
    rotator: CertificateRotator  # keeps the certificate current (`--run`)
    notes: tuple[str, ...]  # omissions and policy rules the waypoint cannot express

    def summary(self) -> list[str]:
        plan = self.plan
        lines = [f"waypoint {plan.waypoint} (for {plan.waypoint.takes.value} traffic) as {plan.identity}"]
        for d in plan.destinations:
            policies = ", ".join(p.key for p in d.policies) or "none"
            backends = ", ".join(f"{b.authority} ({b.pod})" for b in d.backends) or "none"
            lines.append(f"  {d.authority:<22} {d.target} [{d.protocol}] -> {backends}; policies: {policies}")
        lines += [f"  note: {note}" for note in self.notes]
        return lines


def generate(objects: Iterable[Mapping[str, Any]], namespace: str, name: str, out_dir: Path, ca: LocalCA | Issuer,
             options: BootstrapOptions | None = None, service_account: str | None = None,
             cert_ttl: timedelta = DEFAULT_LEAF_TTL) -> GeneratedWaypoint:
    """Plan, issue the certificate and write the bootstrap; raises WaypointError."""
    plan = plan_waypoint(state_from_objects(objects), namespace, name, ca.trust_domain, service_account)
    return write_waypoint(plan, out_dir, ca, options, cert_ttl)


def write_waypoint(plan: WaypointPlan, out_dir: Path, ca: LocalCA | Issuer, options: BootstrapOptions | None = None,
                   cert_ttl: timedelta = DEFAULT_LEAF_TTL) -> GeneratedWaypoint:
    """Get the certificate and write the secrets, the resources and the bootstrap of `plan`;
    IssueError when the CA gives no certificate."""
    options = options or BootstrapOptions()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    secrets = SecretFiles(out_dir / "certs")
    rotator = CertificateRotator(CertificateStore(ca, secrets.directory, ttl=cert_ttl), plan.identity, secrets)
    try:
        certificate = rotator.write()
    except BaseException:
        rotator.close()
        raise
    xds = XdsFiles(out_dir / "xds")
    _, notes = write_configuration(plan, secrets, xds, options)
    config_path = out_dir / CONFIG_FILE
    atomic_write(config_path, json.dumps(waypoint_bootstrap(plan, xds), indent=1).encode(), 0o644, durable=False)
    return GeneratedWaypoint(plan, config_path, secrets, xds, certificate, rotator, plan.notes + notes)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "waypoint", help="write the Envoy bootstrap of a waypoint (L7 policy in front of Services and pods)",
        description="Write the Envoy bootstrap of the waypoint NAMESPACE/NAME (a Gateway of class istio-waypoint): "
                    "HBONE on :15008 with the waypoint's SPIFFE certificate from the mesh CA, the "
                    "AuthorizationPolicies whose targetRef(s) name it or its Services as L7 rules, and HBONE "
                    "to the chosen endpoint's :15008. Envoy reads its resources and certificate from files "
                    "it watches: with --run, ambit runs Envoy and rotates the certificate, with --watch too "
                    "it applies changes of the cluster files, both without restarting Envoy.")
    parser.add_argument("waypoint", metavar="NAMESPACE/NAME", help="the waypoint's Gateway")
    source = parser.add_argument_group("where the cluster's objects come from (one of)")
    source.add_argument("--config-file", action="append", type=Path, default=[], metavar="PATH",
                        help="YAML/JSON file or directory of the cluster's objects (repeatable)")
    source.add_argument("--kube", action="store_true",
                        help="the Kubernetes API: --kubeconfig, else the in-cluster service account")
    source.add_argument("--kubeconfig", help="kubeconfig for --kube (default: in-cluster)")
    identity = parser.add_argument_group(
        "the waypoint's certificate (one of): from the mesh CA over Istio's certificate API with the waypoint's "
        "own service-account token, or from a CA key on this host")
    add_ca_client_arguments(identity, who="the waypoint pod")
    identity.add_argument("--ca-dir", type=Path,
                          help=f"without --ca-address: the mesh CA ({CA_CERT_FILE}, {CA_KEY_FILE}) on this host")
    parser.add_argument("--out-dir", type=Path, required=True, help=f"where {CONFIG_FILE}, xds/ and certs/ are written")
    parser.add_argument("--trust-domain", default="cluster.local", help="SPIFFE trust domain (default: %(default)s)")
    parser.add_argument("--service-account", help="the waypoint's service account (default: its pods', else NAME)")
    parser.add_argument("--listen-address", default="0.0.0.0", help="HBONE listen address (default: %(default)s)")
    parser.add_argument("--port", type=int, default=HBONE_PORT, help="HBONE port (default: %(default)s)")
    parser.add_argument("--access-log", default="/dev/stdout", help="access log path (default: %(default)s)")
    running = parser.add_argument_group("running Envoy (--run)")
    running.add_argument("--run", action="store_true",
                     help="then run Envoy with the bootstrap and re-issue the certificate at half its lifetime "
                          "(Envoy reloads it); exits with Envoy's status")
    running.add_argument("--watch", action="store_true",
                         help="apply what changes in the cluster (endpoints, policies, services) to the running "
                              "Envoy: the --config-file paths are checked every 2 s, --kube is watched")
    running.add_argument("--ready-fd", type=int, metavar="FD",
                         help="write 'ready' to this descriptor once Envoy listens (for a supervisor)")
    running.add_argument("--envoy", default="envoy", help="the Envoy binary (default: envoy on PATH)")
    running.add_argument("--concurrency", type=int, default=2, help="Envoy worker threads (default: %(default)s)")
    running.add_argument("--cert-ttl", type=_seconds, default=DEFAULT_LEAF_TTL, metavar="SECONDS",
                         help="lifetime of the waypoint's certificates (default: 86400); each is replaced at half "
                              "its lifetime")
    running.add_argument("--envoy-log-level", default="warning", help="Envoy's own log level (default: %(default)s)")
    identity.add_argument("--ca-wait", type=float, metavar="SECONDS",
                          help="how long to keep asking a CA that is unavailable (unreachable, or answering "
                               "UNAVAILABLE and the like) for the first certificate, with backoff, before exiting 1 "
                               "(default: 300 with --run, so a waypoint that starts before its CA waits for it; "
                               "else 0); a refusal ends it at once")
    parser.set_defaults(func=run)
    return parser


def _seconds(text: str) -> timedelta:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    # Leaves are backdated by the CA's 60 s clock-skew allowance, and replaced at
    # half their whole lifetime: below ~75 s they would be replaced at once.
    if not 75 <= value <= 365 * 86400:
        raise argparse.ArgumentTypeError("must be between 75 seconds and a year")
    return timedelta(seconds=value)


def retry_while_ca_unavailable(attempt: Callable[[], T], wait_s: float, backoff: Backoff = CA_RETRY,
                               rng: random.Random | None = None,
                               notify: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
                               ) -> T:
    """`attempt()`, again after a jittered backoff while the CA is unavailable,
    for up to `wait_s` seconds: a waypoint rolled out with (or before) its CA
    waits for it instead of crash-looping. A refusal is final at once."""
    rng = rng or random.Random()
    deadline = time.monotonic() + wait_s
    tries = 0
    while True:
        try:
            return attempt()
        except CaUnavailable as exc:
            delay = backoff.delay(tries, rng)
            tries += 1
            left = deadline - time.monotonic()
            if left <= 0:
                raise
            delay = min(delay, left)
            notify(f"ambit waypoint: {exc}; asking again in {delay:.1f} s (attempt {tries}, "
                   f"gives up in {left:.0f} s)")
            time.sleep(delay)  # backoff between attempts, not a wait on a condition


def run(args: argparse.Namespace) -> int:
    namespace, slash, name = args.waypoint.partition("/")
    if not slash or not namespace or not name:
        print(f"ambit waypoint: expected NAMESPACE/NAME, got {args.waypoint!r}", file=sys.stderr)
        return 2
    if bool(args.config_file) == bool(args.kube):
        print("ambit waypoint: give --config-file PATH (repeatable) or --kube", file=sys.stderr)
        return 2
    if args.watch and not args.run:
        print("ambit waypoint: --watch needs --run", file=sys.stderr)
        return 2
    remote = ca_client_settings(args)
    if (remote is None) == (args.ca_dir is None):
        print("ambit waypoint: give --ca-address (the mesh CA's API) or --ca-dir (a CA key on this host)",
              file=sys.stderr)
        return 2
    view: SourceClusterView | None = None
    try:
        issuer: LocalCA | Issuer = (
            IstioCaIssuer(IstioCaClient(remote), args.trust_domain, impersonate=False) if remote is not None else
            LocalCA.load(args.ca_dir / CA_CERT_FILE, args.ca_dir / CA_KEY_FILE, trust_domain=args.trust_domain))
        options = BootstrapOptions(listen_address=args.listen_address, port=args.port, access_log=args.access_log)
        view = kube_view(args.kubeconfig) if args.kube else file_view(args.config_file)
        plan = view.plan(namespace, name, args.trust_domain, args.service_account)
        wait = args.ca_wait if args.ca_wait is not None else (300.0 if args.run else 0.0)
        generated = retry_while_ca_unavailable(
            lambda: write_waypoint(plan, args.out_dir, issuer, options, args.cert_ttl), wait)
    except (WaypointError, InvalidCA, IssueError, OSError) as exc:  # OSError: e.g. no CA files in --ca-dir
        print(f"ambit waypoint: {exc}", file=sys.stderr)
        if view is not None:
            view.close()
        return 1
    try:
        return _serve(args, generated, options, view)
    finally:
        generated.rotator.close()
        view.close()


def _serve(args: argparse.Namespace, generated: GeneratedWaypoint, options: BootstrapOptions,
           view: SourceClusterView) -> int:
    print("\n".join(generated.summary()))
    if not args.run:
        print(f"wrote {generated.config_path}; run: envoy -c {generated.config_path} --file-flush-interval-msec 100")
        return 0
    from ambit.agent import log as logconf
    from .runner import envoy_argv, supervise

    logconf.configure("info")  # a long-running process now: its rotations are worth a line each
    print(f"wrote {generated.config_path}; running {args.envoy}", flush=True)
    watcher = ConfigWatcher(view, generated.plan, generated.secrets, generated.xds, options,
                            args.service_account) if args.watch else None

    def ready() -> None:
        if args.ready_fd is not None:
            os.write(args.ready_fd, b"ready\n")
            os.close(args.ready_fd)

    try:
        return supervise(envoy_argv(args.envoy, str(generated.config_path), args.concurrency, args.envoy_log_level),
                         args.port, generated.rotator, ready, refresh=watcher.refresh if watcher else None)
    except OSError as exc:
        print(f"ambit waypoint: cannot run {args.envoy}: {exc}", file=sys.stderr)
        return 1
