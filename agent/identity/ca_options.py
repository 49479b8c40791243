"""The CA client's command-line options, the same for `ambit-agent` and `ambit waypoint`.

Names and defaults follow ztunnel's, and its environment variables are read
too (CA_ADDRESS, CA_ROOT_CA, AUTH_TOKEN, ALT_CA_HOSTNAME, CLUSTER_ID), so
pointing --ca-address at istiod (istiod.istio-system.svc:15012) or at
istio-csr is the whole change; the token and root certificate are found where
Istio's manifests mount them.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from .istio_ca import DEFAULT_CLUSTER_ID, DEFAULT_ROOT_CERT, DEFAULT_TOKEN_FILE, CaClientSettings


def add_ca_client_arguments(group: argparse._ActionsContainer, *, who: str) -> None:
    group.add_argument("--ca-address", default=os.environ.get("CA_ADDRESS", ""), metavar="HOST:PORT",
                       help="the CA speaking Istio's certificate API: `ambit ca`, istiod "
                            "(istiod.istio-system.svc:15012) or istio-csr; empty: sign with a CA key on this "
                            "host (--ca-dir; no Kubernetes) (default: $CA_ADDRESS)")
    group.add_argument("--ca-token-file", type=Path, default=Path(os.environ.get("AUTH_TOKEN", DEFAULT_TOKEN_FILE)),
                       metavar="PATH",
                       help=f"{who}'s projected service-account token (audience istio-ca), re-read for every "
                            "request (default: %(default)s)")
    group.add_argument("--ca-root-cert", type=Path, default=Path(os.environ.get("CA_ROOT_CA", DEFAULT_ROOT_CERT)),
                       metavar="PATH",
                       help="the mesh root the CA's TLS certificate must chain to: the istio-ca-root-cert "
                            "ConfigMap's root-cert.pem (default: %(default)s)")
    group.add_argument("--ca-server-name", default=os.environ.get("ALT_CA_HOSTNAME", ""), metavar="NAME",
                       help="the name the CA's certificate carries, when it is not --ca-address's host")
    group.add_argument("--cluster-id", default=os.environ.get("CLUSTER_ID", DEFAULT_CLUSTER_ID),
                       help="sent to the CA as the clusterid header (default: %(default)s)")


def ca_client_settings(args: argparse.Namespace) -> CaClientSettings | None:
    """The remote CA's settings, or None when --ca-address is empty (a local CA)."""
    if not args.ca_address:
        return None
    return CaClientSettings(address=args.ca_address, token_file=args.ca_token_file,
                            root_cert_file=args.ca_root_cert, server_name=args.ca_server_name,
                            cluster_id=args.cluster_id)
