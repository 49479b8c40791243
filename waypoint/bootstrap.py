"""The Envoy configuration of a waypoint, built from a WaypointPlan (pure).

    client node proxy ==HBONE (mTLS, CONNECT <dialled address>)==> :15008
      "hbone" listener: TLS with the waypoint's SPIFFE certificate, client
      certificates of the mesh CA only; HTTP/2 CONNECT routed by authority
      (unknown authority: 404). Before routing it copies the client's
      address and mTLS identity into filter state handed to the next hop.
        -> internal listener "inbound|<authority>", one per destination:
           the original-destination listener filter restores the client's
           address; HTTP ports: an HTTP connection manager (access log, XFF
           with the client's IP, RBAC deny then allow, round robin over the
           backends); TCP ports: network RBAC then tcp_proxy
        -> internal listener "connect|<pod IP>:<port>", one per backend:
           tcp_proxy tunnelling (CONNECT <pod IP>:<port>) over cluster
           "hbone|<pod IP>": HTTP/2 over mTLS to <pod IP>:15008 with the
           waypoint's certificate, expecting that pod's SPIFFE ID
    ==HBONE==> the destination node's 15008, which authorizes the waypoint.

Internal listeners (Envoy user-space sockets) keep every hop in one process
without loopback ports. The bootstrap only says who this Envoy is and where
its resources are: listeners, clusters and the hbone routes come from files
Envoy watches (xds_files.py), the certificate and trust bundle from SDS files
(credentials.py), so `ambit waypoint --run --watch` applies cluster and policy
changes, and certificate rotations, to the running Envoy.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ambit.agent.datapath.constants import HBONE_PORT

from .credentials import BUNDLE_SECRET, IDENTITY_SECRET, SecretFiles
from .xds_files import Resources, XdsFiles, file_config_source
from .destinations import Backend, Destination, WaypointPlan
from .rbac import PEER_PRINCIPAL_KEY, RbacRules, rbac_rules

HBONE_ROUTES = "hbone"
_TYPES = "type.googleapis.com/envoy."
ORIGINAL_REMOTE_KEY = "envoy.filters.listener.original_dst.remote_ip"


@dataclass(frozen=True)
class BootstrapOptions:
    listen_address: str = "0.0.0.0"
    port: int = HBONE_PORT
    access_log: str = "/dev/stdout"
    connect_timeout: str = "10s"


def _typed(kind: str, **fields: Any) -> dict[str, Any]:
    return {"@type": _TYPES + kind, **fields}


def _tls_context(secrets: SecretFiles, peer_san: dict[str, str]) -> dict[str, Any]:
    """TLS 1.3 only and ALPN h2, as HBONE requires; peers must chain to the mesh CA.
    Certificate and bundle come from SDS files, so a rotation needs no restart."""
    return {
        "tls_params": {"tls_minimum_protocol_version": "TLSv1_3", "tls_maximum_protocol_version": "TLSv1_3"},
        "alpn_protocols": ["h2"],
        "tls_certificate_sds_secret_configs": [
            {"name": IDENTITY_SECRET, "sds_config": file_config_source(secrets.identity)}],
        "combined_validation_context": {
            "default_validation_context": {
                "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": peer_san}]},
            "validation_context_sds_secret_config": {
                "name": BUNDLE_SECRET, "sds_config": file_config_source(secrets.bundle)},
        },
    }


def _internal_endpoint(listener: str) -> dict[str, Any]:
    return {"endpoint": {"address": {"envoy_internal_address": {"server_listener_name": listener}}}}


def _internal_cluster(name: str, listeners: list[str], connect_timeout: str) -> dict[str, Any]:
    return {
        "name": name, "type": "STATIC", "connect_timeout": connect_timeout, "lb_policy": "ROUND_ROBIN",
        "load_assignment": {"cluster_name": name, "endpoints": [
            {"lb_endpoints": [_internal_endpoint(listener) for listener in listeners]}]},
        "transport_socket": {"name": "envoy.transport_sockets.internal_upstream", "typed_config": _typed(
            "extensions.transport_sockets.internal_upstream.v3.InternalUpstreamTransport",
            transport_socket={"name": "envoy.transport_sockets.raw_buffer",
                              "typed_config": _typed("extensions.transport_sockets.raw_buffer.v3.RawBuffer")})},
    }


def _access_log(path: str, fields: dict[str, str]) -> list[dict[str, Any]]:
    return [{"name": "envoy.access_loggers.file", "typed_config": _typed(
        "extensions.access_loggers.file.v3.FileAccessLog", path=path, log_format={"json_format": fields})}]


def _log_fields(plan: WaypointPlan, destination: Destination) -> dict[str, str]:
    """What every access log line carries; `client` is the client pod's own address."""
    return {"time": "%START_TIME%", "waypoint": plan.waypoint.key, "destination": destination.authority,
            "target": destination.target, "client": "%DOWNSTREAM_REMOTE_ADDRESS%",
            "client_identity": f"%FILTER_STATE({PEER_PRINCIPAL_KEY}:PLAIN)%", "upstream": "%UPSTREAM_HOST%",
            "flags": "%RESPONSE_FLAGS%", "sent": "%BYTES_SENT%", "received": "%BYTES_RECEIVED%",
            "duration_ms": "%DURATION%"}


def _http_rbac(rules: RbacRules) -> list[dict[str, Any]]:
    return [{"name": f"envoy.filters.http.rbac.{which}",
             "typed_config": _typed("extensions.filters.http.rbac.v3.RBAC", rules=message)}
            for which, message in (("deny", rules.deny), ("allow", rules.allow)) if message is not None]


def _network_rbac(rules: RbacRules, prefix: str) -> list[dict[str, Any]]:
    return [{"name": f"envoy.filters.network.rbac.{which}",
             "typed_config": _typed("extensions.filters.network.rbac.v3.RBAC", stat_prefix=f"{prefix}_{which}",
                                    rules=message)}
            for which, message in (("deny", rules.deny), ("allow", rules.allow)) if message is not None]


def _inbound_listener(plan: WaypointPlan, destination: Destination, rules: RbacRules,
                      options: BootstrapOptions) -> dict[str, Any]:
    name = f"inbound|{destination.authority}"
    backends = f"backends|{destination.authority}"
    log = _log_fields(plan, destination)
    if destination.protocol == "http":
        log |= {"method": "%REQ(:METHOD)%", "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
                "authority": "%REQ(:AUTHORITY)%", "code": "%RESPONSE_CODE%",
                "policy": "%DYNAMIC_METADATA(envoy.filters.http.rbac:enforced_effective_policy_id)%"}
        hcm = _typed(
            "extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            stat_prefix=name, codec_type="AUTO",
            use_remote_address=True,  # appends the client pod's IP to x-forwarded-for
            access_log=_access_log(options.access_log, log),
            # No cluster validation: listeners and clusters come from separate files
            # that Envoy applies in its own order, and a cluster may still be warming
            # when a listener naming it arrives; a validated route would make Envoy
            # reject the whole listener update (Istio's routes do the same).
            route_config={"name": name, "validate_clusters": False, "virtual_hosts": [
                {"name": "all", "domains": ["*"], "routes": [
                    {"match": {"prefix": "/"}, "route": {"cluster": backends, "timeout": "0s"}}]}]},
            http_filters=_http_rbac(rules) + [{"name": "envoy.filters.http.router", "typed_config": _typed(
                "extensions.filters.http.router.v3.Router")}])
        filters = [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]
    else:
        log |= {"policy": "%DYNAMIC_METADATA(envoy.filters.network.rbac:enforced_effective_policy_id)%"}
        filters = _network_rbac(rules, "rbac") + [{"name": "envoy.filters.network.tcp_proxy", "typed_config": _typed(
            "extensions.filters.network.tcp_proxy.v3.TcpProxy", stat_prefix=name, cluster=backends,
            access_log=_access_log(options.access_log, log))}]
    return {
        "name": name, "internal_listener": {},
        # Restores the client's address handed over by the hbone listener.
        "listener_filters": [{"name": "envoy.filters.listener.original_dst",
                              "typed_config": _typed("extensions.filters.listener.original_dst.v3.OriginalDst")}],
        "filter_chains": [{"filters": filters}],
    }


def _connect_listener(backend: Backend) -> dict[str, Any]:
    return {"name": f"connect|{backend.authority}", "internal_listener": {}, "filter_chains": [{"filters": [
        {"name": "envoy.filters.network.tcp_proxy", "typed_config": _typed(
            "extensions.filters.network.tcp_proxy.v3.TcpProxy", stat_prefix=f"connect|{backend.authority}",
            cluster=f"hbone|{backend.ip}", tunneling_config={"hostname": backend.authority})}]}]}


def _hbone_cluster(backend: Backend, secrets: SecretFiles, options: BootstrapOptions) -> dict[str, Any]:
    name = f"hbone|{backend.ip}"
    return {
        "name": name, "type": "STATIC", "connect_timeout": options.connect_timeout,
        "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": _typed(
            "extensions.upstreams.http.v3.HttpProtocolOptions", explicit_http_config={"http2_protocol_options": {}})},
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": backend.ip, "port_value": HBONE_PORT}}}}]}]},
        "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": _typed(
            "extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            common_tls_context=_tls_context(secrets, {"exact": str(backend.identity)}))},
    }


def _hbone_routes(plan: WaypointPlan) -> dict[str, Any]:
    """CONNECT routed by authority; anything else (an unknown authority) gets 404."""
    return {"name": HBONE_ROUTES, "validate_clusters": False, "virtual_hosts": [
        {"name": d.authority, "domains": [d.authority], "routes": [
            {"match": {"connect_matcher": {}}, "route": {
                "cluster": f"inbound|{d.authority}", "timeout": "0s",
                "upgrade_configs": [{"upgrade_type": "CONNECT", "connect_config": {}}]}}]}
        for d in plan.destinations]}


def _hbone_listener(plan: WaypointPlan, secrets: SecretFiles, xds: XdsFiles,
                    options: BootstrapOptions) -> dict[str, Any]:
    def copy(key: str, value: str, **extra: str) -> dict[str, Any]:
        return {"object_key": key, "format_string": {"text_format_source": {"inline_string": value}},
                "shared_with_upstream": "ONCE", **extra}

    hcm = _typed(
        "extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        stat_prefix="hbone", codec_type="HTTP2", http2_protocol_options={"allow_connect": True},
        upgrade_configs=[{"upgrade_type": "CONNECT"}], stream_idle_timeout="0s",
        rds={"route_config_name": HBONE_ROUTES, "config_source": file_config_source(xds.rds)},
        http_filters=[
            {"name": "envoy.filters.http.set_filter_state", "typed_config": _typed(
                "extensions.filters.http.set_filter_state.v3.Config", on_request_headers=[
                    copy(ORIGINAL_REMOTE_KEY, "%DOWNSTREAM_REMOTE_ADDRESS%"),
                    copy(PEER_PRINCIPAL_KEY, "%DOWNSTREAM_PEER_URI_SAN%", factory_key="envoy.string")])},
            {"name": "envoy.filters.http.router", "typed_config": _typed("extensions.filters.http.router.v3.Router")},
        ])
    return {
        "name": "hbone",
        "address": {"socket_address": {"address": options.listen_address, "port_value": options.port}},
        "filter_chains": [{
            "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": _typed(
                "extensions.transport_sockets.tls.v3.DownstreamTlsContext", require_client_certificate=True,
                common_tls_context=_tls_context(secrets, {"prefix": f"spiffe://{plan.identity.trust_domain}/"}))},
            "filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}],
        }],
    }


def waypoint_resources(plan: WaypointPlan, secrets: SecretFiles, xds: XdsFiles,
                       options: BootstrapOptions | None = None) -> tuple[Resources, tuple[str, ...]]:
    """Listeners, clusters and routes (as JSON-ready dicts), and notes on policy
    rules they could not express."""
    options = options or BootstrapOptions()
    listeners = [_hbone_listener(plan, secrets, xds, options)]
    clusters: list[dict[str, Any]] = []
    notes: list[str] = []
    backends: dict[str, Backend] = {}
    for destination in plan.destinations:
        rules = rbac_rules(destination.policies, destination.ip, destination.port, destination.protocol == "http")
        notes += [f"{destination.authority} ({destination.target}): {note}" for note in rules.notes]
        listeners.append(_inbound_listener(plan, destination, rules, options))
        name = f"inbound|{destination.authority}"
        clusters.append(_internal_cluster(name, [name], options.connect_timeout))
        clusters.append(_internal_cluster(f"backends|{destination.authority}",
                                          [f"connect|{b.authority}" for b in destination.backends],
                                          options.connect_timeout))
        for backend in destination.backends:
            backends.setdefault(backend.authority, backend)
    hbone_ips: set[str] = set()
    for backend in backends.values():
        listeners.append(_connect_listener(backend))
        if backend.ip not in hbone_ips:
            hbone_ips.add(backend.ip)
            clusters.append(_hbone_cluster(backend, secrets, options))
    return Resources(listeners, clusters, [_hbone_routes(plan)]), tuple(notes)


def waypoint_bootstrap(plan: WaypointPlan, xds: XdsFiles) -> dict[str, Any]:
    """The bootstrap: who this Envoy is, and where its resources are (files it watches)."""
    return {
        "node": {"id": f"waypoint~{plan.waypoint.namespace}~{plan.waypoint.name}", "cluster": plan.waypoint.key},
        "bootstrap_extensions": [{"name": "envoy.bootstrap.internal_listener", "typed_config": _typed(
            "extensions.bootstrap.internal_listener.v3.InternalListener")}],
        "dynamic_resources": {"lds_config": file_config_source(xds.lds), "cds_config": file_config_source(xds.cds)},
    }
