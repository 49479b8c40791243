"""Nothing in the product, the tests or the benches forks its own process.

fork() in a process with threads runs every pthread_atfork handler and copies
one thread of it; gRPC's handler deadlocked against gRPC's own threads under
CPU load, twice (issue 14): once through `subprocess(preexec_fn=setns)` in
Lab.exec, once through pyroute2's `IPRoute(netns=...)` in a kernel test (it
forks a child to open the socket). The agent must never fork either
(agent/netlink.py). What does the same without forking: `spawn_in_netns`
(lab/node.py), `iproute(netns)` (agent/netlink.py), `create_netns`
(agent/netns.py).

Every Python file is parsed, not imported; these calls are refused:
`preexec_fn=` to anything, `os.fork()`, pyroute2's `netns.create()`, and
`IPRoute`/`IPRSocket`/`NDB` given `netns=`.
"""
from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SOURCE_DIRS = ("agent", "lab", "waypoint", "ca", "cli", "cni", "tests", "bench", "scripts")
NETLINK_CLASSES = {"IPRoute", "IPRSocket", "NDB", "AsyncIPRoute"}


def _python_files() -> Iterator[Path]:
    for top in SOURCE_DIRS:
        for path in sorted((REPO / top).rglob("*.py")):
            if "__pycache__" not in path.parts:
                yield path


def _pyroute2_netns_aliases(tree: ast.AST) -> set[str]:
    """Names this module binds to pyroute2.netns (`from pyroute2 import netns as x`)."""
    aliases = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "pyroute2":
            aliases |= {a.asname or a.name for a in node.names if a.name == "netns"}
        elif isinstance(node, ast.Import):
            aliases |= {a.asname for a in node.names if a.name == "pyroute2.netns" and a.asname}
    return aliases


def _name(func: ast.expr) -> str:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return ""


def forks_in(source: str) -> list[tuple[int, str]]:
    """(line, what) for every call in `source` that forks the calling process."""
    tree = ast.parse(source)
    netns_modules = _pyroute2_netns_aliases(tree) | {"pyroute2.netns"}
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        keywords = {k.arg for k in node.keywords}
        func = node.func
        if "preexec_fn" in keywords:
            found.append((node.lineno, "preexec_fn= (fork, then Python in the copy)"))
        if isinstance(func, ast.Attribute) and ast.unparse(func) == "os.fork":
            found.append((node.lineno, "os.fork()"))
        if isinstance(func, ast.Attribute) and func.attr == "create" and ast.unparse(func.value) in netns_modules:
            found.append((node.lineno, "pyroute2 netns.create() (forks; use create_netns)"))
        if _name(func) in NETLINK_CLASSES and "netns" in keywords:
            found.append((node.lineno, f"{_name(func)}(netns=...) (forks; use iproute(netns))"))
    return found


def test_the_check_sees_each_way_of_forking() -> None:
    source = """
import os, subprocess
from pyroute2 import IPRoute, netns as ns
subprocess.Popen(["true"], preexec_fn=lambda: None)
os.fork()
ns.create("x")
with IPRoute(netns="x", flags=0) as ipr: pass
with IPRoute() as ipr: pass
"""
    assert [line for line, _ in forks_in(source)] == [4, 5, 6, 7]


def test_no_source_file_forks_its_own_process() -> None:
    found = [f"{path.relative_to(REPO)}:{line}: {what}"
             for path in _python_files() if path != Path(__file__).resolve()
             for line, what in forks_in(path.read_text())]
    assert found == []
