"""`ambit ca`: the mesh's certificate authority.

  ambit ca init DIR     create the CA's key and certificate (or show the existing ones)
  ambit ca serve ...    serve Istio's certificate API (IstioCertificateService) on
                        :15012: the only process that reads the CA key

`serve` authenticates callers with TokenReview (in a cluster) or a static
token file (--token-file, the lab), and reads where pods run from the API
server or from cluster files (--config-file). Its defaults are istiod's.

Exit codes: 0 stopped by a signal, 1 cannot start (CA, files, port), 2 usage.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

DEFAULT_DNS_NAME = "ambit-ca.ambit-system.svc"
DEFAULT_TRUSTED_NODE_ACCOUNTS = "ambit-system/ambit-node"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    ca = subparsers.add_parser("ca", help="the mesh's certificate authority")
    ca_sub = ca.add_subparsers(dest="action", required=True, metavar="ACTION")
    init = ca_sub.add_parser("init", help="create a CA (or show the existing one) in DIR, for the ambit-ca Secret")
    init.add_argument("dir", type=Path, help="directory for ca-cert.pem and ca-key.pem (key mode 0600)")
    init.add_argument("--trust-domain", default="cluster.local", help="SPIFFE trust domain (default: %(default)s)")
    init.set_defaults(func=init_ca)
    _add_serve_parser(ca_sub)
    return ca


def _add_serve_parser(ca_sub: Any) -> None:
    serve = ca_sub.add_parser(
        "serve", help="serve IstioCertificateService (CSRs from node agents and waypoints) over TLS",
        description="Sign workload certificates for CSRs sent with Istio's certificate API. A caller gets its own "
                    "identity; a trusted node account (the node agents') may ask for another identity "
                    "(metadata ImpersonatedIdentity) only if a pod with it runs on the caller's own node, as "
                    "the API server (or the cluster files) shows it.")
    serve.add_argument("--ca-dir", type=Path, required=True, help="directory with ca-cert.pem and ca-key.pem")
    serve.add_argument("--trust-domain", default=os.environ.get("TRUST_DOMAIN", "cluster.local"),
                       help="SPIFFE trust domain (default: %(default)s)")
    serve.add_argument("--listen", default="0.0.0.0:15012", help="gRPC address (default: %(default)s, istiod's)")
    serve.add_argument("--dns-name", action="append", default=[], metavar="NAME",
                       help=f"DNS name in the serving certificate, as clients dial it (repeatable; default: "
                            f"{DEFAULT_DNS_NAME})")
    who = serve.add_argument_group("who is calling (one of)")
    who.add_argument("--token-file", type=Path,
                     help="static tokens, one `token,namespace/serviceaccount,node` per line, re-read when "
                          "changed (clusters without an API server, the lab); default: TokenReview")
    who.add_argument("--audience", action="append", default=[], metavar="AUD",
                     help="audiences a token must carry for TokenReview (repeatable; default: $TOKEN_AUDIENCES "
                          "or istio-ca)")
    where = serve.add_argument_group("where pods run (one of)")
    where.add_argument("--config-file", action="append", type=Path, default=[], metavar="PATH",
                       help="cluster objects from YAML/JSON files or directories (repeatable; re-read when changed); "
                            "default: the API server")
    serve.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG") or None,
                       help="kubeconfig for the API server (default: in-cluster service account)")
    serve.add_argument("--trusted-node-accounts",
                       default=os.environ.get("CA_TRUSTED_NODE_ACCOUNTS", DEFAULT_TRUSTED_NODE_ACCOUNTS),
                       metavar="NS/SA,...",
                       help="service accounts that may ask for identities of pods on their node "
                            "(default: $CA_TRUSTED_NODE_ACCOUNTS or %(default)s)")
    serve.add_argument("--default-cert-ttl", type=_seconds, default=timedelta(hours=24), metavar="SECONDS",
                       help="lifetime when the request asks for none (default: 86400)")
    serve.add_argument("--max-cert-ttl", type=_seconds, default=timedelta(days=90), metavar="SECONDS",
                       help="longest lifetime signed; longer requests are cut to it (default: 7776000)")
    serve.add_argument("--telemetry-address", default="0.0.0.0", help="address of the metrics and readiness ports")
    serve.add_argument("--metrics-port", type=int, default=15014, help="Prometheus /metrics (default: %(default)s)")
    serve.add_argument("--readiness-port", type=int, default=15021, help="/healthz/ready (default: %(default)s)")
    serve.add_argument("--ready-fd", type=int, metavar="FD",
                       help="write 'ready' to this descriptor once serving (for a supervisor)")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warn", "error"])
    serve.set_defaults(func=serve_ca)


def _seconds(text: str) -> timedelta:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return timedelta(seconds=value)


def init_ca(args: argparse.Namespace) -> int:
    from ambit.agent.identity.ca import InvalidCA, LocalCA
    try:
        ca = LocalCA.load_or_create(args.dir, args.trust_domain)
    except (InvalidCA, OSError) as exc:
        print(f"ambit ca: {exc}", file=sys.stderr)
        return 1
    print(f"CA for trust domain {args.trust_domain} in {args.dir} (valid until {ca.not_after:%Y-%m-%d})")
    print("give the key to the CA service only, the certificate to everyone:")
    print(f"  kubectl -n ambit-system create secret generic ambit-ca "
          f"--from-file={args.dir}/ca-cert.pem --from-file={args.dir}/ca-key.pem")
    print(f"  kubectl -n ambit-system create configmap istio-ca-root-cert "
          f"--from-file=root-cert.pem={args.dir}/ca-cert.pem")
    return 0


def serve_ca(args: argparse.Namespace) -> int:
    from ambit.agent import eventloop
    from ambit.agent import log as logconf

    from .authz import parse_accounts

    logconf.configure(args.log_level)
    try:
        trusted = parse_accounts(args.trusted_node_accounts)
    except ValueError as exc:
        print(f"ambit ca serve: --trusted-node-accounts: {exc}", file=sys.stderr)
        return 2
    if args.max_cert_ttl < args.default_cert_ttl:
        print("ambit ca serve: --max-cert-ttl is shorter than --default-cert-ttl", file=sys.stderr)
        return 2
    try:
        return eventloop.run(_serve(args, trusted))
    except _CannotStart as exc:
        print(f"ambit ca serve: {exc}", file=sys.stderr)
        return 1


class _CannotStart(Exception):
    pass


async def _serve(args: argparse.Namespace, trusted: frozenset[str]) -> int:
    import structlog

    from ambit.agent.discovery.kube import api_client_from
    from ambit.agent.identity.ca import CA_CERT_FILE, CA_KEY_FILE, InvalidCA, LocalCA

    from .authn import DEFAULT_AUDIENCES, StaticTokenAuthenticator, TokenReviewAuthenticator
    from .pods import FilePods, KubePods
    from .server import CaServer, Listen
    from .service import CertificateService, IssuingPolicy

    log = structlog.get_logger("ambit.ca")
    try:
        ca = LocalCA.load(args.ca_dir / CA_CERT_FILE, args.ca_dir / CA_KEY_FILE, trust_domain=args.trust_domain)
    except (InvalidCA, OSError) as exc:
        raise _CannotStart(str(exc)) from None
    api = None
    if not args.token_file or not args.config_file:
        try:
            api = api_client_from(kubeconfig=args.kubeconfig, in_cluster=not args.kubeconfig)
        except Exception as exc:  # no kubeconfig, not in a cluster
            raise _CannotStart(f"no API server ({exc}); give --token-file and --config-file to run without one") \
                from None
    try:
        authenticator = (StaticTokenAuthenticator(args.token_file) if args.token_file else
                         TokenReviewAuthenticator(api, args.audience or
                                                  os.environ.get("TOKEN_AUDIENCES", ",".join(DEFAULT_AUDIENCES))
                                                  .split(",")))
    except (OSError, ValueError) as exc:
        raise _CannotStart(f"--token-file: {exc}") from None
    file_pods = FilePods(args.config_file) if args.config_file else None
    pods = file_pods or KubePods(api)
    policy = IssuingPolicy(trusted, default_ttl=args.default_cert_ttl, max_ttl=args.max_cert_ttl)
    service = CertificateService(ca, authenticator, pods, policy)
    listen = Listen(args.listen, args.telemetry_address, args.metrics_port, args.readiness_port)
    try:
        server = CaServer(service, ca, args.dns_name or [DEFAULT_DNS_NAME], listen)
    except (OSError, RuntimeError) as exc:
        raise _CannotStart(str(exc)) from None
    if file_pods is not None:
        await file_pods.start()
        if file_pods.errors():
            log.warning("ca.cluster_files_rejected", errors=file_pods.errors())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await server.start()
    except OSError as exc:
        raise _CannotStart(f"cannot serve metrics/readiness: {exc}") from None
    log.info("ca.started", trust_domain=ca.trust_domain, authenticator=authenticator.description,
             pods=pods.description, trusted_node_accounts=sorted(trusted),
             max_cert_ttl_s=int(policy.max_ttl.total_seconds()), port=server.port)
    if args.ready_fd is not None:
        os.write(args.ready_fd, b"ready\n")
        os.close(args.ready_fd)
    try:
        await stop.wait()
    finally:
        await server.stop()
        if file_pods is not None:
            await file_pods.stop()
        log.info("ca.stopped")
    return 0
