"""ambit-cni starts once per pod per command: it must not import more than it uses.

Each module below costs start-up time (measured with -X importtime) that
twenty pods starting at once pay in CPU; the plugin does without them.
"""
import os
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PYTHON = "/usr/bin/python3"  # what the staged plugin runs on (`#!/usr/bin/python3 -IS`)
AVOIDED = ("os", "re", "json", "socket", "enum", "selectors", "__future__", "_collections_abc")

PROBE = """
import sys
sys.path.insert(0, {lib!r})
from ambit.cni import main
env = main._environment()
status = main.run(env, b"", open("/dev/null", "w"), open("/dev/null", "w"))
from ambit.cni import agent_client, grpc_unary  # what ADD and DEL load
print(",".join(sorted(name for name in {avoided!r} if name in sys.modules)))
print(env.get("AMBIT_PROBE"))
"""


@pytest.fixture(scope="module")
def cni_lib(tmp_path_factory):
    lib = tmp_path_factory.mktemp("cni-lib")
    (lib / "ambit").mkdir()
    (lib / "ambit" / "cni").symlink_to(os.path.join(REPO, "cni"))
    return str(lib)


def test_plugin_imports_none_of_the_costly_modules(cni_lib):
    env = {"CNI_COMMAND": "VERSION", "AMBIT_PROBE": "caf\u00e9"}
    out = subprocess.run([PYTHON, "-I", "-S", "-c", PROBE.format(lib=cni_lib, avoided=AVOIDED)],
                         env=env, capture_output=True, text=True, check=True)
    loaded, probe = out.stdout.splitlines()
    assert loaded == "", f"ambit-cni imported {loaded}"
    assert probe == "caf\u00e9"  # the environment is decoded as os.environ would


def test_environment_keeps_undecodable_bytes_like_os_environ(cni_lib):
    code = (f"import sys, os; sys.path.insert(0, {cni_lib!r}); from ambit.cni import main; "
            "print(main._environment()['AMBIT_PROBE'] == os.environ['AMBIT_PROBE'])")
    out = subprocess.run([PYTHON, "-I", "-S", "-c", code],
                         env={"AMBIT_PROBE": b"\xff\xfeok".decode("utf-8", "surrogateescape")},
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
