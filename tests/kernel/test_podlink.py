"""inspect_pod_link and host_link_exists against real namespaces and links.

The agent finds a pod's host veth from the kernel (rtnl_query on plain
netlink sockets); these pin down every answer it can give, including the
refusals enrolment turns into CNI errors.
"""
from __future__ import annotations

import uuid

import pytest
from pyroute2 import IPRoute

from ambit.agent.datapath.podlink import PodLinkError, host_link_exists, inspect_pod_link
from ambit.agent.netlink import iproute
from ambit.agent.netns import create_netns, netns_path, remove_netns, run_in_netns
from ambit.agent.rtnl_query import RtnlQuery

pytestmark = pytest.mark.kernel


@pytest.fixture
def spaces():
    """A "node" and two "pod" namespaces, removed afterwards whatever happens."""
    tag = uuid.uuid4().hex[:6]
    names = {role: f"plk-{role}-{tag}" for role in ("node", "pod", "other")}
    made = []
    try:
        for name in names.values():
            create_netns(name)
            made.append(name)
        yield {role: netns_path(name) for role, name in names.items()}
    finally:
        for name in made:
            remove_netns(name)


def veth(host_ns: str, host_name: str, pod_ns: str, address: str | None = None) -> None:
    with iproute(host_ns) as host:
        host.link("add", ifname=host_name, kind="veth", peer={"ifname": "eth0", "net_ns_fd": pod_ns})
        host.link("set", index=host.link_lookup(ifname=host_name)[0], state="up")
    if address:
        with iproute(pod_ns) as pod:
            index = pod.link_lookup(ifname="eth0")[0]
            pod.addr("add", index=index, address=address, prefixlen=24)
            pod.link("set", index=index, state="up")


def in_node(spaces, fn, *args):
    return run_in_netns(spaces["node"], lambda: fn(*args))


def test_finds_the_host_veth_its_index_mac_and_the_pod_addresses(spaces) -> None:
    veth(spaces["node"], "vethplk0", spaces["pod"], "10.77.0.5")
    link = in_node(spaces, inspect_pod_link, spaces["pod"], "eth0")
    with iproute(spaces["node"]) as node:
        host = node.get_links(node.link_lookup(ifname="vethplk0")[0])[0]
    with iproute(spaces["pod"]) as pod:
        eth0 = pod.get_links(pod.link_lookup(ifname="eth0")[0])[0]
    assert (link.host_ifname, link.host_ifindex, link.host_mac) == \
        ("vethplk0", host["index"], host.get_attr("IFLA_ADDRESS"))
    assert (link.container_ifname, link.container_ifindex, link.container_mac) == \
        ("eth0", eth0["index"], eth0.get_attr("IFLA_ADDRESS"))
    assert link.addresses[0] == "10.77.0.5/24"
    assert all(a.startswith("fe80:") for a in link.addresses[1:])  # the kernel's IPv6 link-local, if any
    assert in_node(spaces, host_link_exists, link.host_ifindex, "vethplk0")
    assert not in_node(spaces, host_link_exists, link.host_ifindex, "someone-else")
    assert not in_node(spaces, host_link_exists, 999_999, "vethplk0")


def test_a_missing_interface_and_a_missing_namespace(spaces) -> None:
    veth(spaces["node"], "vethplk1", spaces["pod"])
    with pytest.raises(PodLinkError) as info:
        in_node(spaces, inspect_pod_link, spaces["pod"], "eth9")
    assert info.value.reason == PodLinkError.NO_INTERFACE and "eth9" in str(info.value)
    for gone in ("", "/var/run/netns/plk-never-made"):
        with pytest.raises(PodLinkError) as info:
            in_node(spaces, inspect_pod_link, gone, "eth0")
        assert info.value.reason == PodLinkError.NETNS_MISSING


def test_an_interface_that_is_not_a_veth(spaces) -> None:
    with iproute(spaces["pod"]) as pod:
        pod.link("add", ifname="eth0", kind="bridge")
    with pytest.raises(PodLinkError) as info:
        in_node(spaces, inspect_pod_link, spaces["pod"], "eth0")
    assert info.value.reason == PodLinkError.NOT_VETH and "bridge" in str(info.value)


def test_a_veth_whose_peer_is_in_another_namespace(spaces) -> None:
    """The pod's eth0 pairs with a link in "other", not in the agent's
    namespace: whatever link has that index here, it is not the peer."""
    veth(spaces["other"], "vethplk2", spaces["pod"])
    with iproute(spaces["node"]) as node:  # give the node some links whose index may collide
        for i in range(3):
            node.link("add", ifname=f"plkd{i}", kind="bridge")
    with pytest.raises(PodLinkError) as info:
        in_node(spaces, inspect_pod_link, spaces["pod"], "eth0")
    assert info.value.reason == PodLinkError.PEER_MISSING


def test_rtnl_query_answers_like_iproute(spaces) -> None:
    veth(spaces["node"], "vethplk3", spaces["pod"], "10.77.1.9")
    with iproute(spaces["pod"]) as ipr, RtnlQuery(spaces["pod"]) as query:
        expected = ipr.get_links(ipr.link_lookup(ifname="eth0")[0])[0]
        by_name = query.link(ifname="eth0")
        by_index = query.link(index=expected["index"])
        for got in (by_name, by_index):
            assert got["index"] == expected["index"]
            for attr in ("IFLA_IFNAME", "IFLA_ADDRESS", "IFLA_LINK", "IFLA_LINK_NETNSID", "IFLA_MTU"):
                assert got.get_attr(attr) == expected.get_attr(attr), attr
            assert got.get(("IFLA_LINKINFO", "IFLA_INFO_KIND")) == "veth"
        assert [a.get_attr("IFA_ADDRESS") for a in query.addresses(expected["index"])] == \
            [a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=expected["index"])]
        with pytest.raises(Exception) as info:
            query.link(ifname="nope0")
        assert getattr(info.value, "code", None) == 19  # ENODEV
