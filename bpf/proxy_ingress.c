/* proxy_ingress: tc ingress of eth0 inside the proxy namespace; sees every
 * packet capture_outbound/capture_inbound redirected, plus what is routed
 * to the proxy's own address (only the node's metrics/readiness traffic is
 * let through there).
 *
 * Steering by bpf_sk_assign, no NAT: the packet keeps its original
 * destination, so an accepted socket's getsockname() is the address the
 * client dialled. MARK_CAPTURED + `ip rule fwmark MARK_CAPTURED lookup 100`
 * + `local 0.0.0.0/0 dev lo table 100` make the namespace deliver it
 * locally although that destination is not one of its addresses. */
#include "ambit.h"

static __always_inline int accept_marked(struct __sk_buff *skb, __u32 verdict)
{
	skb->mark |= MARK_CAPTURED;
	return count(verdict, TC_ACT_OK);
}

/* The proxy's own address is no way in: the listeners are bound to any
 * address, so a SYN for 169.254.7.2:15001 from a pod would reach one without
 * the capture (and the outbound proxy would dial its own address again).
 * Only the node, to the metrics and readiness ports, may use it. A pod
 * cannot pass for the node: the node drops pod packets with a node source
 * (no accept_local on veths), and what it cannot see (the capture's
 * redirect) would be a blind SYN, whose answer goes to the node. */
static __always_inline int to_own_addr(struct __sk_buff *skb, struct iphdr *ip)
{
	if (ip->saddr == bpf_htonl(NODE_LINK_ADDR)) {
		if (ip->frag_off & bpf_htons(AMBIT_IP_FRAG_MASK))
			return count(VERDICT_PROXY_PASS_OWN_ADDR, TC_ACT_OK);
		struct tcphdr *tcp = tcp_header(skb, ip);
		if (tcp && (tcp->dest == bpf_htons(METRICS_PORT) ||
			    tcp->dest == bpf_htons(READINESS_PORT)))
			return count(VERDICT_PROXY_PASS_OWN_ADDR, TC_ACT_OK);
	}
	return count(VERDICT_PROXY_DROP_OWN_ADDR, TC_ACT_SHOT);
}

/* The listener for a new connection, chosen by direction. */
static __always_inline __u16 listener_port(struct iphdr *ip, struct tcphdr *tcp,
					   __u32 *verdict)
{
	__be32 saddr = ip->saddr;

	if (local_pods.lookup(&saddr)) {
		/* Sent by an enrolled pod of this node: outbound, whatever
		 * the destination port (even 15008). */
		*verdict = VERDICT_PROXY_TO_OUTBOUND;
		return OUTBOUND_PORT;
	}
	if (tcp->dest == bpf_htons(HBONE_PORT)) {
		*verdict = VERDICT_PROXY_TO_HBONE;
		return HBONE_PORT;
	}
	*verdict = VERDICT_PROXY_TO_INBOUND_PLAINTEXT;
	return INBOUND_PLAINTEXT_PORT;
}

int proxy_ingress(struct __sk_buff *skb)
{
	struct iphdr *ip = ipv4_header(skb);

	if (!ip || !is_tcp(ip))
		/* ARP for the link, anything not redirected by us: ordinary
		 * stack (nothing else is captured). */
		return count(VERDICT_PROXY_PASS_NOT_TCP4, TC_ACT_OK);
	if (ip->daddr == bpf_htonl(PROXY_LINK_ADDR))
		/* Addressed to the proxy itself: the node scraping 15020 or
		 * probing 15021 gets ordinary local delivery, anyone else is
		 * dropped. */
		return to_own_addr(skb, ip);
	if (ip->frag_off & bpf_htons(AMBIT_IP_FRAG_MASK))
		/* A fragment carries no reliable ports; the stack reassembles
		 * it and finds the owning socket itself (a SYN is never
		 * fragmented). */
		return accept_marked(skb, VERDICT_PROXY_OWNED);

	struct tcphdr *tcp = tcp_header(skb, ip);
	if (!tcp)
		/* Malformed or truncated: not ours to deliver. */
		return count(VERDICT_PROXY_DROP_MALFORMED, TC_ACT_SHOT);

	struct bpf_sock_tuple tuple = {};
	tuple.ipv4.saddr = ip->saddr;
	tuple.ipv4.daddr = ip->daddr;
	tuple.ipv4.sport = tcp->source;
	tuple.ipv4.dport = tcp->dest;

	/* 1. Does a socket of this namespace own the packet's own 4-tuple? */
	struct bpf_sock *sk = bpf_skc_lookup_tcp(skb, &tuple, sizeof(tuple.ipv4),
						 BPF_F_CURRENT_NETNS, 0);
	if (sk) {
		int listening = sk->state == BPF_TCP_LISTEN;
		bpf_sk_release(sk);
		if (!listening)
			/* Established, handshaking or TIME_WAIT (replies to the
			 * proxy's upstream sockets included): the stack's own
			 * lookup finds the same socket, so no assign. */
			return accept_marked(skb, VERDICT_PROXY_OWNED);
		/* A listener that happens to match the destination port does
		 * not own the connection: direction decides below. */
	}

	if (!tcp->syn || tcp->ack)
		/* No owner and not a new connection (a stray ACK, a RST, a
		 * late segment): let the stack answer it (RST / drop). Only a
		 * pure SYN may reach a listener, else SYN-ACKs for the proxy's
		 * own connections would land on one. */
		return accept_marked(skb, VERDICT_PROXY_NO_OWNER);

	/* 2. A new connection: the listener for its direction. */
	__u32 verdict = 0;
	tuple.ipv4.dport = bpf_htons(listener_port(ip, tcp, &verdict));
	sk = bpf_skc_lookup_tcp(skb, &tuple, sizeof(tuple.ipv4),
				BPF_F_CURRENT_NETNS, 0);
	if (!sk)
		/* No listener: the agent is down or restarting. Drop the SYN so
		 * the connection fails instead of reaching anything unproxied
		 * (fail closed); the client retransmits and succeeds once the
		 * listener is back. */
		return count(VERDICT_PROXY_DROP_NO_LISTENER, TC_ACT_SHOT);
	if (sk->state != BPF_TCP_LISTEN) {
		/* An unrelated connection that shares the tuple with the
		 * listener port: never hand the SYN to it. */
		bpf_sk_release(sk);
		return count(VERDICT_PROXY_DROP_NO_LISTENER, TC_ACT_SHOT);
	}
	long err = bpf_sk_assign(skb, sk, 0);
	bpf_sk_release(sk);
	if (err)
		/* Could not steer it (not a listener this skb may use). */
		return count(VERDICT_PROXY_DROP_ASSIGN_FAILED, TC_ACT_SHOT);
	/* Steered: the transparent listener receives it and getsockname() of
	 * the accepted socket is the original destination. */
	return accept_marked(skb, verdict);
}
