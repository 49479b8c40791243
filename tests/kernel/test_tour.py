"""`make lab` runs `ambit lab tour`: the walk must keep telling the truth.

The tour prints what it observes (it never prints a canned result), so these
tests run it end to end, with each capture backend, and check the facts it
reports: the CA as its own process, the only one that sees its key, and its
refusal of node1's request for a pod of node2; HBONE across nodes with the client's own address preserved, only
TLS on the underlay, a Service spread over both endpoints, a policy denial,
the waypoint's 403 and its access log naming the client pod, an upgrade of
node1's agent under load with no failed request, and a teardown
with no leftovers (checked by tests/kernel/conftest.py). Prefix `ltour-`.
"""
from __future__ import annotations

import io
import ipaddress
import re

import pytest

from ambit.lab.tour import run_tour

pytestmark = pytest.mark.kernel


@pytest.mark.parametrize("capture", ["ebpf", "nftables"])
def test_the_tour_reports_what_ambit_does(lab_factory, capture) -> None:
    out = io.StringIO()
    with lab_factory.settings("ltour", capture=capture) as settings:  # the tour builds and removes its lab
        run_tour(out, settings)
    text = out.getvalue()
    assert {"ebpf": "eBPF (tc programs", "nftables": "nftables (policy route"}[capture] in text.splitlines()[0]
    client = re.search(r"shop/client-0 \((\d+\.\d+\.\d+\.\d+), node1\)", text).group(1)
    assert ipaddress.ip_address(client) in ipaddress.ip_network(settings.pod_supernet)
    ca = re.search(r"CA pid (\d+); agents: node1 pid (\d+), node2 pid (\d+)", text)
    assert ca and len(set(ca.groups())) == 3  # three processes
    assert re.search(r"ca-key as the CA sees it: ca-cert.pem, ca-key.pem, tokens.csv\n", text)
    assert re.search(r"ca-key as node1's agent sees it: empty\n", text)
    assert re.search(r"node1 holds spiffe://cluster.local/ns/shop/sa/client, serial \w+, issued by Istio CA at "
                     r"[\d.]+:15012", text)
    assert "(legacy/probe-0 runs on node2): refused, PERMISSION_DENIED" in text
    assert "CA log: identity-not-on-node: no pod of legacy/probe runs on node node1" in text
    assert f"the server saw the client as {client} -- the client pod's own address (preserved)" in text
    assert "via=hbone spiffe://cluster.local/ns/shop/sa/client -> spiffe://cluster.local/ns/shop/sa/web" in text
    assert "seen in clear on the underlay: no -- only TLS crossed" in text
    tls = re.search(r"underlay capture: \d+ TCP frames, (\d+) with payload on port 15008, (\d+) of them", text)
    assert int(tls.group(1)) > 0 and int(tls.group(2)) > 0
    spread = re.search(r"answered by: ([^(]+) \(the proxy spreads", text).group(1)
    assert {p.strip() for p in spread.split(",")} == {"shop/web-0", "shop/web-1"}
    assert "result: denied" in text and "denied: no ALLOW policy matched" in text
    assert "the same pod on the echo port 9000 (allowed to all): 'still open'" in text
    assert f"x-forwarded-for {client} (the client)" in text
    assert "GET /admin -> 403 RBAC: access denied" in text
    assert re.search(rf"waypoint access log: client {re.escape(client)}:\d+ "
                     r"\(spiffe://cluster.local/ns/shop/sa/client\) GET /admin -> 403", text)
    assert "before:  GET /bytes/16 -> 200 (16 bytes)" in text
    assert re.search(r"applied AuthorizationPolicy shop/web-l7-no-bytes: GET /bytes/16 -> 403 after \d+\.\d s", text)
    assert re.search(r"deleted it: GET /bytes/16 -> 200 after \d+\.\d s", text)
    assert re.search(r"the waypoint's Envoy: pid \d+ before, \d+ after -- not restarted", text)
    upgrade = re.search(r"agent pid (\d+) handed node1 to pid (\d+) in [\d.]+ s.*\n.*?(\d+) requests during the "
                        r"upgrade, (\d+) failed", text)
    assert upgrade and upgrade.group(1) != upgrade.group(2)
    assert int(upgrade.group(3)) > 20 and upgrade.group(4) == "0"  # an upgrade under load fails no request
    assert "istio_tcp_connections_opened_total{reporter=source" in text
    assert "not denied?!" not in text and "allowed?!" not in text and "NOT preserved" not in text
    assert "?!" not in text
    assert re.search(r"removed \d+ namespace\(s\), stopped \d+ process\(es\); leftovers: none\n", text)
