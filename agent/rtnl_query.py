"""Read-only rtnetlink queries on a plain socket, with pyroute2's message classes.

pyroute2's `IPRoute` builds an asyncio event loop, a socketpair and a
request machine per handle and per call: ~0.4-0.9 ms of CPU each, which was
most of what CNI ADD cost the agent (py-spy under bench/cni_add.py: 350 of
450 busy samples in `inspect_pod_link`, mostly that machinery). Enrolment
needs four small answers (one link by name, one by index, a namespace id,
a pod's addresses) and the eBPF capture two tc filter dumps per pod, so
they are asked here directly: pyroute2 still encodes the requests and
decodes the replies (`ifinfmsg`, `ifaddrmsg`, `nsidmsg`, `tcmsg`); only the
send/receive loop is ours. Everything that changes kernel state keeps
going through `IPRoute`.
"""
from __future__ import annotations

import itertools
import socket
import struct

from pyroute2.netlink import NLM_F_DUMP, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import RTM_GETADDR, RTM_GETLINK, RTM_GETNSID, RTM_GETTFILTER
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
from pyroute2.netlink.rtnl.nsidmsg import nsidmsg
from pyroute2.netlink.rtnl.tcmsg import tcmsg

from .netns import socket_in_netns

NETLINK_ROUTE = 0
_HEADER = struct.Struct("=IHHII")  # struct nlmsghdr
_ERRNO = struct.Struct("=i")
_RECV_SIZE = 64 * 1024
RTEXT_FILTER_SKIP_STATS = 1 << 3  # linux/rtnetlink.h
_sequence = itertools.count(1)


class RtnlQuery:
    """One rtnetlink socket in one namespace (the caller's when netns is
    None); a context manager that closes it."""

    def __init__(self, netns: str | None = None) -> None:
        if netns is None:
            self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_ROUTE)
        else:
            self._sock = socket_in_netns(netns, socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_ROUTE)
        self._sock.bind((0, 0))

    def __enter__(self) -> "RtnlQuery":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._sock.close()

    # -- queries -------------------------------------------------------------
    def link(self, *, index: int = 0, ifname: str | None = None) -> ifinfmsg:
        """One link by index or name; NetlinkError(ENODEV) if there is none."""
        msg = ifinfmsg()
        msg["index"] = index
        # Skip the counters the kernel can leave out: ~20% less to decode.
        msg["attrs"] = [("IFLA_EXT_MASK", RTEXT_FILTER_SKIP_STATS)]
        if ifname is not None:
            msg["attrs"].append(("IFLA_IFNAME", ifname))
        return self._request(msg, RTM_GETLINK, ifinfmsg, dump=False)[0]

    def links(self) -> list[ifinfmsg]:
        """Every link of the namespace."""
        msg = ifinfmsg()
        msg["attrs"] = [("IFLA_EXT_MASK", RTEXT_FILTER_SKIP_STATS)]
        return self._request(msg, RTM_GETLINK, ifinfmsg, dump=True)

    def all_addresses(self) -> list[ifaddrmsg]:
        """Every address of the namespace, on every link."""
        return self._request(ifaddrmsg(), RTM_GETADDR, ifaddrmsg, dump=True)

    def addresses(self, index: int) -> list[ifaddrmsg]:
        """Every address on one link (the dump is filtered here: the kernel
        filters only on sockets with strict checking)."""
        msg = ifaddrmsg()
        msg["index"] = index
        return [a for a in self._request(msg, RTM_GETADDR, ifaddrmsg, dump=True) if a["index"] == index]

    def own_addresses(self) -> set[str]:
        """Every address of every link of the namespace (`ambitctl trace`
        tells host-network traffic by them)."""
        found = set()
        for msg in self._request(ifaddrmsg(), RTM_GETADDR, ifaddrmsg, dump=True):
            address = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
            if address:
                found.add(address)
        return found

    def filters(self, index: int, parent: int) -> list[tcmsg]:
        """The tc filters on one hook of one link (the kernel dumps just
        that hook); NetlinkError(ENODEV) if there is no such link."""
        msg = tcmsg()
        msg["index"] = index
        msg["parent"] = parent
        return self._request(msg, RTM_GETTFILTER, tcmsg, dump=True)

    def netnsid(self, netns_fd: int) -> int | None:
        """The id this namespace gives the namespace behind `netns_fd`
        (None when it has none assigned)."""
        msg = nsidmsg()
        msg["attrs"] = [("NETNSA_FD", netns_fd)]
        reply = self._request(msg, RTM_GETNSID, nsidmsg, dump=False)[0]
        nsid = reply.get_attr("NETNSA_NSID")
        return None if nsid is None or nsid >= 0xFFFFFFFF or nsid < 0 else nsid

    # -- the exchange ----------------------------------------------------------
    def _request(self, msg, msg_type: int, reply_class, *, dump: bool) -> list:
        sequence = next(_sequence) & 0xFFFFFFFF
        msg["header"]["type"] = msg_type
        msg["header"]["flags"] = NLM_F_REQUEST | (NLM_F_DUMP if dump else 0)
        msg["header"]["sequence_number"] = sequence
        msg.encode()
        self._sock.send(msg.data)
        replies = []
        while True:
            data = self._sock.recv(_RECV_SIZE)
            offset = 0
            while offset + _HEADER.size <= len(data):
                length, kind, _flags, seq, _pid = _HEADER.unpack_from(data, offset)
                if length < _HEADER.size:
                    raise NetlinkError(0, f"malformed netlink reply (length {length})")
                if seq != sequence:
                    offset += _align(length)
                    continue  # a late answer to an earlier request on this socket
                if kind == NLMSG_ERROR:
                    (error,) = _ERRNO.unpack_from(data, offset + _HEADER.size)
                    if error:
                        raise NetlinkError(-error)
                    return replies  # an ACK
                if kind == NLMSG_DONE:
                    return replies
                reply = reply_class(data[offset:offset + length])
                reply.decode()
                replies.append(reply)
                offset += _align(length)
            if not dump and replies:
                return replies


def _align(length: int) -> int:
    return (length + 3) & ~3
