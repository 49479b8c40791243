"""ambit: the lab and other tools around the agent.

  ambit lab up|status|exec|apply|delete|down|tour   the local multi-node lab (lab/cli.py)
  ambit waypoint NS/NAME ...    an L7 waypoint's Envoy configuration, or run it (waypoint/cli.py)
  ambit ca init DIR             create the mesh CA for the ambit-ca Secret (ca/cli.py)
  ambit install-cni [--watch | --uninstall]   chain ambit-cni into this node's CNI
                                configuration (the DaemonSet's install step; install/README.md)

Only the chosen area's module is imported, so `ambit waypoint` never loads the
lab and `ambit install-cni` neither. Each area's module has
`add_parser(subparsers)`, which registers it and sets `func` on its commands.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from ambit.agent import log as logconf

# area -> (module that registers it, one line for `ambit --help`)
AREAS: dict[str, tuple[str, str]] = {
    "lab": ("ambit.lab.cli", "the local lab: nodes as network namespaces, pods via the real CNI chain"),
    "waypoint": ("ambit.waypoint.cli", "write the Envoy bootstrap of a waypoint (L7 policy in front of Services "
                 "and pods)"),
    "ca": ("ambit.ca.cli", "the mesh's certificate authority"),
    "install-cni": ("ambit.agent.install_cni.cli", "copy ambit-cni onto this node and chain it after the primary CNI"),
}


def build_parser(area: str | None = None) -> argparse.ArgumentParser:
    """The full parser of `area`; every other area only as a name and a line of help."""
    parser = argparse.ArgumentParser(prog="ambit", description="ambit tools: the local multi-node lab and helpers.")
    sub = parser.add_subparsers(dest="area", required=True, metavar="AREA")
    for name, (module, summary) in AREAS.items():
        if name == area:
            importlib.import_module(module).add_parser(sub)
        else:
            sub.add_parser(name, help=summary, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    area = next((a for a in argv[:1] if a in AREAS), None)
    try:
        args = build_parser(area).parse_args(argv)  # imports the area: Ctrl-C may come this early
    except KeyboardInterrupt:
        sys.exit(130)
    logconf.configure("warn")
    sys.exit(args.func(args))


if __name__ == "__main__":
    main()
