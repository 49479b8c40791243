"""`ambit ca init DIR`: create the mesh CA (or show the existing one) for the ambit-ca Secret."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    ca = subparsers.add_parser("ca", help="the mesh's certificate authority")
    ca_sub = ca.add_subparsers(dest="action", required=True, metavar="ACTION")
    init = ca_sub.add_parser("init", help="create a CA (or show the existing one) in DIR, for the ambit-ca Secret")
    init.add_argument("dir", type=Path, help="directory for ca-cert.pem and ca-key.pem (key mode 0600)")
    init.add_argument("--trust-domain", default="cluster.local", help="SPIFFE trust domain (default: %(default)s)")
    init.set_defaults(func=init_ca)
    return ca


def init_ca(args: argparse.Namespace) -> int:
    from ambit.agent.identity.ca import InvalidCA, LocalCA
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
