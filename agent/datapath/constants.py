"""Every port, mark bit, routing table and kernel object name ambit uses.

One place, so the eBPF programs (bpf/*.c get these as -D defines), the
routing set-up, the proxy and the docs cannot drift apart.

Mark bits (skb->mark / SO_MARK), all inside 0xf00 so they stay clear of
kube-proxy (0x4000/0x8000), Calico (0xffff0000) and Cilium (0x0f00 is Cilium's
too: do not run both on one node):
  0x100  CAPTURED  set by the proxy-namespace tc ingress program on every
                   packet it accepts from ambit0; `ip rule fwmark 0x100/0x100
                   lookup 100` + `local 0.0.0.0/0 dev lo table 100` make the
                   proxy namespace deliver it locally although the destination
                   is not one of its addresses (docs/datapath.md, "Marks, rules, tables").
  0x200  PROXY     SO_MARK on every socket the proxy opens, so its own traffic
                   is recognisable (the nftables backend and `ambitctl trace`
                   use it; the eBPF backend recognises proxy traffic on the
                   node side by its ingress interface, ambit0, because marks
                   do not survive a namespace crossing).
  0x400  POD_PORT  set by the nftables backend's bridge chain on IPv6 TCP from
                   an enrolled pod's bridge port, so the ip6 forward hook (which
                   sees the bridge, not the port, as the input) drops it.
  0x800  BOUND     set by the nftables backend's bridge chain on IPv4 from a
                   bound pod port (source bound to that port; the TCP it lifts
                   out included), so the ip prerouting chain sends its TCP to
                   `outbound` without classifying it again and trusts the rest,
                   and bridge forward skips the enrolled-source check. Marks are
                   scrubbed when a packet crosses into another namespace, so a
                   pod cannot send one.
Routing table 100 lives only in the proxy namespace.
"""
from __future__ import annotations

# Transparent listeners in the proxy namespace (Istio's numbers).
OUTBOUND_PORT = 15001      # what enrolled pods send
INBOUND_PLAINTEXT_PORT = 15006  # plaintext arriving for enrolled pods
HBONE_PORT = 15008         # mTLS HTTP/2 CONNECT tunnels for enrolled pods
METRICS_PORT = 15020
READINESS_PORT = 15021
PROXY_PORTS = (OUTBOUND_PORT, INBOUND_PLAINTEXT_PORT, HBONE_PORT, METRICS_PORT, READINESS_PORT)

MARK_CAPTURED = 0x100
MARK_PROXY = 0x200
MARK_POD_PORT = 0x400  # nftables backend: an IPv6 TCP frame from an enrolled pod's bridge port
MARK_BOUND = 0x800     # nftables backend: an IPv4 frame from a bound pod port (its own source), lifted TCP included
MARK_MASK = 0xF00
ROUTE_TABLE = 100
RULE_PRIORITY = 100

# Names of kernel objects (all start with "ambit").
PROXY_NETNS = "ambit-proxy"       # default proxy namespace name (the lab prefixes it per node)
NODE_LINK = "ambit0"              # node side of the proxy veth pair
PROXY_LINK = "eth0"               # proxy side of the pair
BPFFS_ROOT = "/sys/fs/bpf/ambit"  # default pin directory (the lab uses one per node)

# Link-local /30 between the node and the proxy namespace; never routed
# beyond the node.
NODE_LINK_ADDR = "169.254.7.1"
PROXY_LINK_ADDR = "169.254.7.2"
LINK_PREFIXLEN = 30

# Verdicts of the tc programs, in the index order of their pinned
# verdict_counts map (passed to C as VERDICT_<NAME>); new ones go at the end
# so a restarted agent's indexes keep their meaning. The nftables backend's
# named counters use the same names where the decision is the same.
VERDICTS = (
    "out_redirect", "out_pass_not_tcp4", "out_pass_to_node",
    "in_redirect", "in_pass_not_tcp4", "in_pass_from_node", "in_pass_from_proxy",
    "drop_no_proxy_link", "drop_rewrite_failed",
    "proxy_pass_not_tcp4", "proxy_pass_own_addr", "proxy_owned", "proxy_no_owner",
    "proxy_to_outbound", "proxy_to_inbound_plaintext", "proxy_to_hbone",
    "proxy_drop_malformed", "proxy_drop_no_listener", "proxy_drop_assign_failed", "proxy_drop_own_addr",
    # Source binding and IPv6 (docs/datapath.md, "Source addresses are bound
    # to their veth"): what an enrolled veth must not send or receive.
    "out_drop_spoofed_source", "out_drop_spoofed_arp", "out_drop_not_ip", "out_drop_ipv6_tcp",
    "in_drop_spoofed_source", "in_drop_misdelivered", "in_drop_ipv6_tcp",
)
# Capacity of verdict_counts, larger than VERDICTS so that adding a verdict
# does not change the pinned map's size (a restarted agent re-adopts it).
VERDICT_SLOTS = 64
# The verdicts that count refused attacks, shown by `ambitctl status` and
# the ambit_capture_drops_total metric.
SOURCE_BINDING_DROPS = ("out_drop_spoofed_source", "out_drop_spoofed_arp", "out_drop_not_ip",
                        "in_drop_spoofed_source", "in_drop_misdelivered")
IPV6_DROPS = ("out_drop_ipv6_tcp", "in_drop_ipv6_tcp")
