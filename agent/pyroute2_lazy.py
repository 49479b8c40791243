"""pyroute2 without its package __init__, which imports all of pyroute2.

`import pyroute2` runs pyroute2/__init__.py, which imports every public
symbol of the library: NDB (and sqlite3), IPDB, IPVS, nl80211, wireguard,
devlink, plan9, ... The agent uses IPRoute, the netlink message classes and
the netns helpers: 99 modules of 163. Loading the package as an empty
module with the real __path__ lets `from pyroute2.iproute.linux import ...`
and `from pyroute2 import netns` load just those submodules; the first
attribute that is not a submodule (e.g. `from pyroute2 import Ethtool` in
the lab) runs the real __init__ into the same module, so every other user
of pyroute2 in the process sees the whole library as before.
Measured on `import ambit.agent.main`: 64.5 -> 59.2 MB RSS.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import Any

PACKAGE = "pyroute2"
# Names the agent takes from the package itself, and where they live.
LEAN = {"IPRoute": ("pyroute2.iproute.linux", "IPRoute")}


def _full_init(module: types.ModuleType) -> None:
    """Run the real pyroute2/__init__.py into the placeholder module."""
    spec = module.__spec__
    assert spec is not None and spec.loader is not None and spec.origin is not None
    del module.__getattr__  # the real names replace the lazy lookup
    with open(spec.origin, "rb") as source:
        exec(compile(source.read(), spec.origin, "exec"), module.__dict__)


def install() -> None:
    """Put the lazy package in sys.modules, unless pyroute2 is loaded already."""
    if PACKAGE in sys.modules:
        return
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.submodule_search_locations is None:
        return  # not installed: the import that needs it will say so
    module = types.ModuleType(PACKAGE)
    module.__spec__ = spec
    module.__file__ = spec.origin
    module.__path__ = list(spec.submodule_search_locations)
    module.__package__ = PACKAGE

    def lazy_attribute(name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        if name in LEAN:
            where, attribute = LEAN[name]
            value = getattr(importlib.import_module(where), attribute)
            setattr(module, name, value)
            return value
        if importlib.util.find_spec(f"{PACKAGE}.{name}") is not None:
            return importlib.import_module(f"{PACKAGE}.{name}")
        _full_init(module)
        try:
            return module.__dict__[name]
        except KeyError:
            raise AttributeError(f"module {PACKAGE!r} has no attribute {name!r}") from None

    module.__getattr__ = lazy_attribute  # type: ignore[method-assign]
    sys.modules[PACKAGE] = module
