"""ambit: the lab and other tools around the agent.

  ambit lab tour   the guided tour `make lab` runs
  ambit lab down   remove what a crashed lab run left behind
"""
from __future__ import annotations

import argparse
import sys

from .. import log as logconf


def _lab_tour(args: argparse.Namespace) -> int:
    from ..lab.tour import LeftoversFound, run_tour
    try:
        run_tour()
    except LeftoversFound as exc:
        print(f"ambit lab: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nambit lab: interrupted; everything the tour created was removed", file=sys.stderr)
        return 130
    return 0


def _lab_down(args: argparse.Namespace) -> int:
    from ..lab.tour import remove_leftovers
    removed = remove_leftovers()
    print(f"removed {len(removed)} lab namespace(s)" + (f": {', '.join(removed)}" if removed else ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ambit", description="ambit tools: the local multi-node lab and helpers.")
    sub = parser.add_subparsers(dest="area", required=True, metavar="AREA")
    lab = sub.add_parser("lab", help="the local lab: nodes as network namespaces, pods via the real CNI chain")
    lab_sub = lab.add_subparsers(dest="action", required=True, metavar="ACTION")
    lab_sub.add_parser("tour", help="build a lab, show what ambit does, tear it down").set_defaults(func=_lab_tour)
    lab_sub.add_parser("down", help="remove leftovers of a crashed lab run").set_defaults(func=_lab_down)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logconf.configure("warn")
    sys.exit(args.func(args))


if __name__ == "__main__":
    main()
