"""Snapshots of the kernel state ambit could leave behind in a node, read
from the kernel itself (netlink, bpffs), never from the agent's memory."""
from __future__ import annotations

import os

from ambit.agent.datapath.bpfsys import BpfMap
from ambit.agent.datapath.programs import verdict_counts_of
from ambit.agent.netlink import iproute


def _map_keys(path: str) -> int:
    """Number of keys in a pinned BPF hash map."""
    bpf_map = BpfMap.open_pinned(path)
    try:
        return sum(1 for _ in bpf_map.keys())
    finally:
        bpf_map.close()


def verdict_counts(bpffs_dir: str) -> dict[str, int]:
    """Packets per datapath verdict, read from the pinned verdict_counts map
    (what the kernel counted, whichever agent is running or none)."""
    bpf_map = BpfMap.open_pinned(os.path.join(bpffs_dir, "verdict_counts"))
    try:
        return verdict_counts_of(bpf_map)
    finally:
        bpf_map.close()


def pinned_map_has(path: str, key: bytes) -> bool:
    """Whether a pinned BPF hash map holds `key` (its raw bytes)."""
    bpf_map = BpfMap.open_pinned(path)
    try:
        return bpf_map.lookup(key) is not None
    finally:
        bpf_map.close()


def node_snapshot(node_netns: str, bpffs_dir: str) -> dict:
    """Links, qdiscs, tc filters, ip rules and routes of the node namespace,
    the pins under bpffs_dir and the number of local_pods entries."""
    with iproute(node_netns) as ipr:
        links = sorted((l["index"], l.get("IFLA_IFNAME")) for l in ipr.get_links())
        qdiscs = [(q["index"], q.get("TCA_KIND")) for q in ipr.get_qdiscs()]
        filters = []
        for index, _ in links:
            for parent in (0xFFFFFFF2, 0xFFFFFFF3):
                try:
                    found = ipr.get_filters(index=index, parent=parent)
                except Exception:
                    continue
                filters += [(index, parent, f.get(("TCA_OPTIONS", "TCA_BPF_NAME"))) for f in found
                            if f.get("TCA_KIND") == "bpf"]
        rules = sorted(((r.get("FRA_PRIORITY"), r.get("FRA_FWMARK"), r.get("FRA_TABLE")) for r in ipr.get_rules()), key=repr)
        routes = sorted(((r.get("RTA_TABLE"), r.get("RTA_DST"), r["dst_len"], r.get("RTA_OIF"))
                         for r in ipr.get_routes(family=2, table=0)), key=repr)
    pins = sorted(os.listdir(bpffs_dir)) if os.path.isdir(bpffs_dir) else []
    local_pods = _map_keys(os.path.join(bpffs_dir, "local_pods")) if "local_pods" in pins else 0
    return {"links": links, "qdiscs": sorted(qdiscs, key=repr), "filters": sorted(filters, key=repr), "rules": rules, "routes": routes,
            "pins": pins, "local_pods": local_pods}
