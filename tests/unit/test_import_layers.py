"""Imports run one way: cli -> lab -> (waypoint, ca) -> agent; inside the agent,
main/rpc -> proxy -> policy -> discovery -> the leaves (identity, telemetry,
datapath) -> small helpers.

Every product module is parsed (not imported) and every import in it counts,
also one inside a function: a lazy import is still a dependency. The packages
are setup.cfg's, so a new top-level package is checked without editing this.
"""
from __future__ import annotations

import ast
import configparser
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Higher may import lower or equal, never higher; the cycle check covers equals.
TOP_RANKS = {"ambit.cni": 0, "ambit.api": 0, "ambit.agent": 1, "ambit.ca": 2, "ambit.waypoint": 2,
             "ambit.lab": 3, "ambit.cli": 4}
AGENT_RANKS = {
    # programs and their wiring
    "main": 6, "mesh": 6, "rpc": 6, "cli": 6, "install_cni": 6, "lifecycle": 6,
    "proxy": 5, "enrolment": 5,
    "policy": 4,
    "discovery": 3,
    "identity": 2, "telemetry": 2, "datapath": 2, "enrolment_records": 2,
    # helpers without a concept of the mesh: namespaces, netlink, files, logging, the pod record
    "netns": 1, "netlink": 1, "rtnl_query": 1, "pyroute2_lazy": 1, "grpc_wire": 1, "grpc_call": 1, "atomic_files": 1, "log": 1, "eventloop": 1, "workload": 1,
    # retry delays and shared in-flight calls (watches, certificate requests, the CA's lookups)
    "backoff": 1, "singleflight": 1,
}
NEVER_IN_THE_AGENT = ("ambit.lab", "ambit.waypoint", "ambit.ca", "ambit.cli")


def _roots() -> dict[str, Path]:
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    lines = config["options"]["package_dir"].strip().splitlines()
    return {name.strip(): REPO / folder.strip() for name, folder in (line.split("=") for line in lines)}


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    where: str  # path:line

    def __str__(self) -> str:
        return f"{self.importer} imports {self.imported} ({self.where})"


def _modules() -> dict[str, tuple[Path, bool]]:
    found = {}
    for package, folder in _roots().items():
        for path in folder.rglob("*.py"):
            if path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
                continue  # generated
            parts = list(path.relative_to(folder).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            found[".".join([package, *parts[:-1]] if is_package else [package, *parts])] = (path, is_package)
    return found


def _imports(modules: dict[str, tuple[Path, bool]]) -> Iterator[Import]:
    for name, (path, is_package) in modules.items():
        here = name.split(".") if is_package else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(here[: len(here) - node.level + 1] + [node.module or ""]) if node.level \
                    else node.module or ""
                base = base.rstrip(".")
                # `from pkg import mod` imports pkg.mod when that is a module
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                           for alias in node.names]
            else:
                continue
            for target in targets:
                if target.startswith("ambit.") and target != name:
                    yield Import(name, target, f"{path.relative_to(REPO)}:{node.lineno}")


def _unit(module: str) -> str:
    """What the layering is about: a top-level package, or a sub-package or loose module of the agent."""
    parts = module.split(".")
    if parts[1] == "agent" and len(parts) > 2:
        return ".".join(parts[:3])
    return ".".join(parts[:2])


def _rank(unit: str) -> tuple[int, int]:
    parts = unit.split(".")
    top = TOP_RANKS[".".join(parts[:2])]
    if parts[1] == "agent" and len(parts) > 2:
        assert parts[2] in AGENT_RANKS, f"{unit}: new agent module or package; give it a layer in AGENT_RANKS"
        return top, AGENT_RANKS[parts[2]]
    return top, 99 if parts[1] == "agent" else 0


def _cross_unit_imports() -> list[Import]:
    modules = _modules()
    return [i for i in _imports(modules) if _unit(i.importer) != _unit(i.imported)]


def test_every_top_level_package_has_a_layer():
    assert set(_roots()) == set(TOP_RANKS)


def test_the_agent_never_imports_the_tools_built_on_it():
    wrong = [str(i) for i in _cross_unit_imports()
             if i.importer.startswith("ambit.agent.") and i.imported.startswith(NEVER_IN_THE_AGENT)]
    assert not wrong, "the agent process must not load lab, waypoint, ca or cli code:\n" + "\n".join(wrong)


def test_imports_never_go_up_a_layer():
    wrong = []
    for i in _cross_unit_imports():
        importer, imported = _unit(i.importer), _unit(i.imported)
        if imported == "ambit.agent":
            continue  # the agent package's own __init__ (`from .. import log`)
        if _rank(imported) > _rank(importer):
            wrong.append(str(i))
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_no_import_cycle_among_product_packages():
    edges: dict[str, dict[str, Import]] = {}
    for i in _cross_unit_imports():
        edges.setdefault(_unit(i.importer), {}).setdefault(_unit(i.imported), i)
    cycles = _strongly_connected(edges)
    described = []
    for members in cycles:
        inside = [str(i) for unit in sorted(members) for target, i in sorted(edges.get(unit, {}).items())
                  if target in members]
        described.append(" <-> ".join(sorted(members)) + ":\n  " + "\n  ".join(inside))
    assert not cycles, "import cycles:\n" + "\n".join(described)


def test_the_cycle_check_finds_a_cycle():
    """The check itself: a two-package cycle and a three-package ring are found, a chain is not."""
    def edges(pairs):
        out: dict[str, dict[str, None]] = {}
        for a, b in pairs:
            out.setdefault(a, {})[b] = None
        return out
    assert _strongly_connected(edges([("a", "b"), ("b", "a"), ("b", "c")])) == [{"a", "b"}]
    assert _strongly_connected(edges([("a", "b"), ("b", "c"), ("c", "a")])) == [{"a", "b", "c"}]
    assert _strongly_connected(edges([("a", "b"), ("b", "c")])) == []


def _strongly_connected(edges: dict[str, dict[str, object]]) -> list[set[str]]:
    """Tarjan's algorithm; the components with more than one member are the cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges.get(node, {}):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(component)

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found
