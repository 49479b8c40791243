/* capture_outbound: tc ingress of an enrolled pod's host-side veth, i.e.
 * every frame the pod sends (docs/datapath.md, "Hooks and verdicts").
 *
 * Source addresses are bound to the veth: an IPv4 packet leaves only with a
 * source enrolled for this very veth, an ARP only announcing one (or none,
 * a probe), so no pod can speak, or be answered, with another's address.
 * IPv4 TCP goes to the proxy namespace, where proxy_ingress hands a new
 * connection to the outbound listener (the source is a local pod) and every
 * other segment to the socket that owns it (e.g. a reply to the proxy's own
 * upstream connection). IPv6 TCP is dropped until it is captured: never
 * around the mesh in plaintext. */
#include "ambit.h"

/* True when the node itself is the destination (one of its own addresses),
 * decided by the node's routing tables for this very packet: such traffic
 * is between the pod and the node (kubelet probe replies, hostNetwork
 * peers), never proxied, because the proxy could not spoof the pod's address
 * towards the node: the node's replies to the pod are generated locally and
 * would bypass the proxy on the way back. */
static __always_inline int to_node_itself(struct __sk_buff *skb,
					  struct iphdr *ip)
{
	struct bpf_fib_lookup fib = {};

	fib.family = AMBIT_AF_INET;
	fib.l4_protocol = IPPROTO_TCP;
	fib.tos = ip->tos;
	fib.tot_len = bpf_ntohs(ip->tot_len);
	fib.ipv4_src = ip->saddr;
	fib.ipv4_dst = ip->daddr;
	fib.ifindex = skb->ingress_ifindex;
	/* NOT_FWDED: the route is not unicast, i.e. local (or broadcast, or no
	 * route at all, which the node would drop anyway). Every other result
	 * - including "forwarding disabled" - captures: when in doubt, the
	 * packet goes to the proxy. */
	return bpf_fib_lookup(skb, &fib, sizeof(fib), 0) ==
	       BPF_FIB_LKUP_RET_NOT_FWDED;
}

/* The IPv6 counterpart, stricter because IPv6 TCP is never proxied: the
 * FIB must say "not forwarded" (local, or no route at all, which for a
 * bridged neighbour the node may simply not know), and a socket of the node
 * must own the segment's 4-tuple (the kubelet's probe, a hostNetwork
 * listener). A segment bridged to another pod has neither. */
static __always_inline int ipv6_to_node_itself(struct __sk_buff *skb,
					       struct ipv6hdr *ip6)
{
	struct bpf_fib_lookup fib = {};

	fib.family = AMBIT_AF_INET6;
	fib.l4_protocol = IPPROTO_TCP;
	fib.tot_len = bpf_ntohs(ip6->payload_len) + sizeof(*ip6);
	__builtin_memcpy(fib.ipv6_src, &ip6->saddr, sizeof(fib.ipv6_src));
	__builtin_memcpy(fib.ipv6_dst, &ip6->daddr, sizeof(fib.ipv6_dst));
	fib.ifindex = skb->ingress_ifindex;
	if (bpf_fib_lookup(skb, &fib, sizeof(fib), 0) != BPF_FIB_LKUP_RET_NOT_FWDED)
		return 0;

	void *data_end = (void *)(long)skb->data_end;
	struct tcphdr *tcp = (void *)(ip6 + 1);
	if (ip6->nexthdr != IPPROTO_TCP || (void *)(tcp + 1) > data_end)
		return 0;
	struct bpf_sock_tuple tuple = {};
	__builtin_memcpy(tuple.ipv6.saddr, &ip6->saddr, sizeof(tuple.ipv6.saddr));
	__builtin_memcpy(tuple.ipv6.daddr, &ip6->daddr, sizeof(tuple.ipv6.daddr));
	tuple.ipv6.sport = tcp->source;
	tuple.ipv6.dport = tcp->dest;
	struct bpf_sock *sk = bpf_skc_lookup_tcp(skb, &tuple, sizeof(tuple.ipv6),
						 BPF_F_CURRENT_NETNS, 0);
	if (!sk)
		return 0;
	bpf_sk_release(sk);
	return 1;
}

/* ARP from the pod: it may announce or ask with one of its own addresses,
 * or with none (0.0.0.0, an RFC 5227 probe); anything else would teach the
 * node and the bridge's other pods to send another pod's traffic here. */
static __always_inline int arp_sender_bound(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct arphdr *arp = data + sizeof(struct ethhdr);
	__u8 *body = (void *)(arp + 1);
	__be32 sender;

	if ((void *)(body + 2 * ETH_ALEN + 8) > data_end)
		return 0;
	if (arp->ar_hrd != bpf_htons(ARPHRD_ETHER) || arp->ar_pro != bpf_htons(ETH_P_IP) ||
	    arp->ar_hln != ETH_ALEN || arp->ar_pln != 4)
		return 0;
	__builtin_memcpy(&sender, body + ETH_ALEN, sizeof(sender));
	return sender == 0 || bound_to(sender, skb->ifindex);
}

int capture_outbound(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > data_end || skb->vlan_present)
		/* Runt, or VLAN-tagged: a tag could carry packets past the
		 * checks below; a pod's veth has no use for one. */
		return count(VERDICT_OUT_DROP_NOT_IP, TC_ACT_SHOT);
	if (eth->h_proto == bpf_htons(ETH_P_ARP))
		return arp_sender_bound(skb) ?
		       count(VERDICT_OUT_PASS_NOT_TCP4, TC_ACT_OK) :
		       count(VERDICT_OUT_DROP_SPOOFED_ARP, TC_ACT_SHOT);
	if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = ipv6_header(skb);

		if (!ip6)
			return count(VERDICT_OUT_DROP_NOT_IP, TC_ACT_SHOT);
		if (!ipv6_is_tcp(skb, ip6))
			/* ND, ICMPv6, UDP: not captured, not checked. */
			return count(VERDICT_OUT_PASS_NOT_TCP4, TC_ACT_OK);
		if (ipv6_to_node_itself(skb, ip6))
			return count(VERDICT_OUT_PASS_TO_NODE, TC_ACT_OK);
		/* IPv6 is not captured yet: dropped, never meshless. */
		return count(VERDICT_OUT_DROP_IPV6_TCP, TC_ACT_SHOT);
	}
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return count(VERDICT_OUT_DROP_NOT_IP, TC_ACT_SHOT);

	struct iphdr *ip = ipv4_header(skb);
	if (!ip)
		return count(VERDICT_OUT_DROP_NOT_IP, TC_ACT_SHOT);
	if (!bound_to(ip->saddr, skb->ifindex))
		/* Another pod's address, one never enrolled (a raw or
		 * IP_FREEBIND socket), or a stale one: whatever the protocol,
		 * it leaves this veth with no one's identity. */
		return count(VERDICT_OUT_DROP_SPOOFED_SOURCE, TC_ACT_SHOT);
	if (!is_tcp(ip))
		/* UDP (DNS), ICMP: not captured, the pod talks directly
		 * (documented in docs/datapath.md). */
		return count(VERDICT_OUT_PASS_NOT_TCP4, TC_ACT_OK);
	if (to_node_itself(skb, ip))
		/* Pod <-> node (probe replies): stays off the mesh. */
		return count(VERDICT_OUT_PASS_TO_NODE, TC_ACT_OK);
	/* Everything else the enrolled pod sends over TCP: to the proxy. */
	return redirect_to_proxy(skb, VERDICT_OUT_REDIRECT);
}
