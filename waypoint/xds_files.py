"""Envoy configuration as files Envoy watches: xDS without a control-plane server.

Envoy reads a resource set (listeners, clusters, routes, secrets) from a file
named by a `path_config_source` and re-reads it when a file is moved into the
source's `watched_directory`. Every write here is a rename into that
directory, so Envoy never sees half a file, and it applies what changed in
place: listeners whose configuration is unchanged are kept, changed ones drain.

    <out>/xds/cds.json   clusters      written first: what listeners point at (an
                                       order Envoy need not keep: routes do not
                                       validate clusters, see bootstrap.py)
    <out>/xds/lds.json   listeners
    <out>/xds/rds.json   the hbone listener's routes (a route change reaches
                         HBONE connections already up, no listener drain)
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ambit.agent.atomic_files import atomic_write

_TYPES = "type.googleapis.com/envoy."
LISTENER_TYPE = _TYPES + "config.listener.v3.Listener"
CLUSTER_TYPE = _TYPES + "config.cluster.v3.Cluster"
ROUTE_TYPE = _TYPES + "config.route.v3.RouteConfiguration"


def file_config_source(path: Path) -> dict[str, Any]:
    """A ConfigSource that is a file, re-read when a file is moved into its directory."""
    return {"path_config_source": {"path": str(path), "watched_directory": {"path": str(path.parent)}},
            "resource_api_version": "V3"}


@dataclass(frozen=True)
class Resources:
    """The dynamic part of a waypoint's configuration."""

    listeners: list[dict[str, Any]] = field(default_factory=list)
    clusters: list[dict[str, Any]] = field(default_factory=list)
    routes: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class XdsFiles:
    directory: Path

    @property
    def lds(self) -> Path:
        return self.directory / "lds.json"

    @property
    def cds(self) -> Path:
        return self.directory / "cds.json"

    @property
    def rds(self) -> Path:
        return self.directory / "rds.json"

    def read(self) -> Resources:
        """What the files hold now (for tests and for comparing before a rewrite)."""
        def load(path: Path) -> list[dict[str, Any]]:
            if not path.exists():
                return []
            return [{k: v for k, v in r.items() if k != "@type"} for r in json.loads(path.read_text())["resources"]]
        return Resources(load(self.lds), load(self.cds), load(self.rds))


def _document(kind: str, resources: list[dict[str, Any]], version: str) -> bytes:
    return json.dumps({"version_info": version, "resources": [{"@type": kind, **r} for r in resources]},
                      indent=1, sort_keys=True).encode()


def write_resources(files: XdsFiles, resources: Resources, version: str) -> bool:
    """Write what differs from the files (clusters, listeners, routes, in that
    order); returns whether anything was written."""
    files.directory.mkdir(parents=True, exist_ok=True)
    if files.read() == resources:
        return False
    for path, kind, items in ((files.cds, CLUSTER_TYPE, resources.clusters),
                              (files.lds, LISTENER_TYPE, resources.listeners),
                              (files.rds, ROUTE_TYPE, resources.routes)):
        atomic_write(path, _document(kind, items, version), 0o644, durable=False)
    return True
