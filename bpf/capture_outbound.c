/* capture_outbound: tc ingress of an enrolled pod's host-side veth, i.e.
 * every frame the pod sends (docs/datapath.md, "Hooks and verdicts").
 *
 * IPv4 TCP goes to the proxy namespace, where proxy_ingress hands a new
 * connection to the outbound listener (the source is a local pod) and every
 * other segment to the socket that owns it (e.g. a reply to the proxy's own
 * upstream connection). */
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

int capture_outbound(struct __sk_buff *skb)
{
	struct iphdr *ip = ipv4_header(skb);

	if (!ip || !is_tcp(ip))
		/* ARP, IPv6, UDP (DNS), ICMP: not captured, the pod talks
		 * directly (documented in docs/datapath.md). */
		return count(VERDICT_OUT_PASS_NOT_TCP4, TC_ACT_OK);
	if (to_node_itself(skb, ip))
		/* Pod <-> node (probe replies): stays off the mesh. */
		return count(VERDICT_OUT_PASS_TO_NODE, TC_ACT_OK);
	/* Everything else the enrolled pod sends over TCP: to the proxy. */
	return redirect_to_proxy(skb, VERDICT_OUT_REDIRECT);
}
