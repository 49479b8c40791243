"""What nftables holds in a namespace, read from the kernel with libnftables'
JSON `list ruleset` on a thread that entered the namespace (independent of
the agent's own nftables code)."""
from __future__ import annotations

import json
from typing import Any

from ambit.agent.netns import run_in_netns


def ruleset(netns: str) -> list[dict[str, Any]]:
    """Every object of `list ruleset` in netns (a name or path)."""
    def read() -> list[dict[str, Any]]:
        import nftables
        nft = nftables.Nftables()
        nft.set_json_output(True)
        rc, out, err = nft.cmd("list ruleset")
        assert rc == 0, err
        return [o for o in json.loads(out)["nftables"] if "metainfo" not in o]
    return run_in_netns(netns, read)


def ambit_objects(netns: str) -> dict[str, list]:
    """ambit's tables, chains, sets/maps (with their element keys), counters
    and rule count in netns; empty lists when nothing of ambit's is there."""
    found: dict[str, list] = {"tables": [], "chains": [], "sets": [], "elements": [], "counters": [], "rules": []}
    for obj in ruleset(netns):
        kind, body = next(iter(obj.items()))
        if body.get("table", body.get("name")) != "ambit" and kind != "table":
            continue
        if kind == "table":
            if body["name"] == "ambit":
                found["tables"].append(body["family"])
        elif kind == "chain":
            found["chains"].append(f"{body['family']} {body['name']}")
        elif kind in ("set", "map"):
            found["sets"].append(f"{body['family']} {body['name']}")
            for item in body.get("elem", []):
                key = item[0] if kind == "map" else item
                key = key["elem"]["val"] if isinstance(key, dict) and "elem" in key else key
                if isinstance(key, dict) and "concat" in key:  # veth . address
                    key = " . ".join(str(part) for part in key["concat"])
                found["elements"].append(f"{body['name']} {key}")
        elif kind == "counter":
            found["counters"].append(body["name"])
        elif kind == "rule":
            found["rules"].append(f"{body['family']} {body['chain']}")
    return {k: sorted(v) for k, v in found.items()}


def elements(netns: str) -> list[str]:
    """"<set> <key>" for every element of ambit's sets and maps (a key of
    two parts as "<a> . <b>"; libnftables names an ifindex by its link)."""
    return ambit_objects(netns)["elements"]
