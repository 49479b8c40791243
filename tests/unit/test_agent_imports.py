"""What starting the agent imports: what every mode needs, nothing more.

The Kubernetes client (and pydantic, which it brings) only with
`--discovery kube` (~0.25 s and ~21 MB of RSS otherwise spent for nothing);
bcc never (it maps LLVM: the loader child compiles); the lab, waypoint,
CA and `ambit` command code never."""
from __future__ import annotations

import json
import subprocess
import sys

NEVER = ("bcc", "ambit.lab", "ambit.waypoint", "ambit.ca", "ambit.cli")
ONLY_FOR_KUBE = ("kubernetes", "pydantic")


def loaded_after(code: str) -> set[str]:
    probe = code + "\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    return set(json.loads(done.stdout.splitlines()[-1]))


def offending(modules: set[str], prefixes: tuple[str, ...]) -> set[str]:
    return {m for m in modules if any(m == p or m.startswith(p + ".") for p in prefixes)}


def test_importing_the_agent_loads_no_kubernetes_client_compiler_or_tool_code() -> None:
    assert offending(loaded_after("import ambit.agent.main"), NEVER + ONLY_FOR_KUBE) == set()

