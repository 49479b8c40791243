"""What starting the agent imports: what every mode needs, nothing more.

The Kubernetes client (and pydantic, which it brings) only with
`--discovery kube` (~0.25 s and ~21 MB of RSS otherwise spent for nothing);
bcc never (it maps LLVM: the loader child compiles); the lab, waypoint,
CA and `ambit` command code never; of pyroute2 only what the agent uses;
`cryptography` (~9 MB of RSS: its own OpenSSL) only where it signs with a
local CA key (credentials_child.py makes keys and checks a remote CA's
answers in a child process)."""
from __future__ import annotations

import json
import subprocess
import sys

NEVER = ("bcc", "ambit.lab", "ambit.waypoint", "ambit.ca", "ambit.cli",
         "pyroute2.ndb", "pyroute2.ipdb", "sqlite3",  # pyroute2's __init__ brings these (pyroute2_lazy.py)
         "cryptography")
ONLY_FOR_KUBE = ("kubernetes", "pydantic")


def loaded_after(code: str) -> set[str]:
    probe = code + "\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    return set(json.loads(done.stdout.splitlines()[-1]))


def offending(modules: set[str], prefixes: tuple[str, ...]) -> set[str]:
    return {m for m in modules if any(m == p or m.startswith(p + ".") for p in prefixes)}


def test_importing_the_agent_loads_no_kubernetes_client_compiler_or_tool_code() -> None:
    assert offending(loaded_after("import ambit.agent.main"), NEVER + ONLY_FOR_KUBE) == set()



def test_the_rest_of_pyroute2_is_there_for_whoever_asks() -> None:
    """The lab and the benches take more of pyroute2 than the agent does."""
    code = ("import ambit.agent.main, pyroute2\n"
            "from pyroute2.iproute.linux import IPRoute as lean\n"
            "assert pyroute2.IPRoute is lean\n"
            "from pyroute2 import Ethtool, IPRoute, netns\n"
            "assert IPRoute is lean and netns.__name__ == 'pyroute2.netns' and pyroute2.__version__\n"
            "try:\n    pyroute2.NoSuchName\nexcept AttributeError:\n    pass\nelse:\n    raise SystemExit(1)")
    assert "pyroute2.ndb" in loaded_after(code)
