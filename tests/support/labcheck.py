"""What a lab test may leave behind: nothing.

`lab_debris(settings, ranges)` lists every trace of a lab with that prefix:
namespaces, processes (marked or inside a lab namespace), links named like
the lab's and routes or rules using its address ranges in the machine's own
namespace, pins under the lab's bpffs root, the state file and node
directories. Empty means clean. tests/kernel/conftest.py runs it before and
after every lab it makes.
"""
from __future__ import annotations

from collections.abc import Sequence

from ambit.lab.plan import LabSettings
from ambit.lab.processes import lab_namespaces, lab_processes
from pyroute2 import IPRoute


def root_debris(prefix: str, ranges: Sequence[str]) -> list[str]:
    """Lab links, routes and rules in the machine's own namespace (the lab
    never creates any there). `ranges`: address prefixes such as "10.102."."""
    found = []
    starts = tuple(ranges)
    with IPRoute() as ipr:
        found += [f"link {n}" for link in ipr.get_links() if (n := link.get("ifname") or "").startswith(prefix)]
        for route in ipr.get_routes():
            if (dst := route.get("RTA_DST") or "").startswith(starts):
                found.append(f"route {dst}")
        for rule in ipr.get_rules():
            for attr in ("FRA_SRC", "FRA_DST"):
                if (value := rule.get(attr) or "").startswith(starts):
                    found.append(f"rule {attr.lower()} {value}")
    return found


def lab_debris(settings: LabSettings, ranges: Sequence[str]) -> list[str]:
    prefix = settings.prefix
    found = [f"namespace {n}" for n in lab_namespaces(prefix)]
    found += [f"process {pid}" for pid in lab_processes(prefix)]
    found += root_debris(prefix, ranges)
    if settings.bpffs_root.is_dir():
        found += [f"pins {p}" for p in settings.bpffs_root.glob(f"{prefix}*")]
    found += [f"file {p}" for p in (settings.state_file, settings.cluster_file, settings.nodes_dir) if p.exists()]
    return found
