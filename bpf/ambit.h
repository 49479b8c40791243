/* Shared definitions of ambit's tc programs: pinned maps, packet parsing,
 * verdict accounting and the redirect into the proxy namespace.
 *
 * Compiled by bcc at agent start (agent/datapath/programs.py). Every number
 * comes from agent/datapath/constants.py as a -D define, so C and Python
 * cannot drift apart:
 *   AMBIT_PIN_DIR            bpffs directory of this agent's maps ("...")
 *   OUTBOUND_PORT, INBOUND_PLAINTEXT_PORT, HBONE_PORT   proxy listeners
 *   MARK_CAPTURED            skb->mark bit that selects routing table 100
 *   PROXY_LINK_ADDR          the proxy's own eth0 address, host byte order
 *   MAX_LOCAL_PODS           capacity of local_pods
 *   VERDICT_<NAME>, VERDICT_SLOTS   indexes and capacity of verdict_counts
 */
#ifndef AMBIT_H
#define AMBIT_H

#include <uapi/linux/bpf.h>
#include <uapi/linux/if_arp.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/in6.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/pkt_cls.h>

#define AMBIT_AF_INET 2
#define AMBIT_AF_INET6 10
#define AMBIT_IP_FRAG_MASK 0x3fff /* IP_MF | fragment offset */
/* IPv6 extension headers walked to find the transport protocol; a chain
 * longer than this is treated as TCP (fail closed). */
#define AMBIT_IPV6_MAX_EXT 6

/* proxy_link[0]: where captured packets go. Written once by the agent at
 * install; node_ifindex is ambit0's index *as the node namespace sees it*
 * (ifindexes are per namespace). */
struct proxy_link {
	__u32 node_ifindex;
	__u8 proxy_mac[ETH_ALEN]; /* eth0 inside the proxy namespace */
	__u8 pad[2];
};

/* local_pods[pod IPv4, network order]: the enrolled pods of this node, each
 * address bound to the host veth it was enrolled on. capture_outbound lets
 * an address out of that veth only; capture_inbound drops an enrolled
 * address's TCP that did not come through the proxy, and any packet for an
 * enrolled address about to enter another veth; proxy_ingress uses
 * membership to tell outbound from inbound; the agent uses host_ifindex to
 * reconcile after a restart. flags is reserved so the
 * pinned map's layout can grow without being recreated (a restarted agent
 * must re-adopt the map, and a different value size would refuse it). */
struct local_pod {
	__u32 host_ifindex;
	__u32 flags;
};

BPF_TABLE_PINNED("array", __u32, struct proxy_link, proxy_link, 1,
		 AMBIT_PIN_DIR "/proxy_link");
BPF_TABLE_PINNED("hash", __be32, struct local_pod, local_pods, MAX_LOCAL_PODS,
		 AMBIT_PIN_DIR "/local_pods");
/* One counter per verdict, per CPU: what ambitctl and the tests read to see
 * which branch a packet took. */
BPF_TABLE_PINNED("percpu_array", __u32, __u64, verdict_counts, VERDICT_SLOTS,
		 AMBIT_PIN_DIR "/verdict_counts");

static __always_inline int count(__u32 verdict, int action)
{
	__u64 *n = verdict_counts.lookup(&verdict);
	if (n)
		*n += 1;
	return action;
}

/* The IPv4 header of an Ethernet frame, or NULL (not IPv4, or truncated).
 * Headers of veth and bridged frames are linear; a pull is the fallback. */
static __always_inline struct iphdr *ipv4_header(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > data_end)
		return NULL;
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return NULL;
	struct iphdr *ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > data_end)
		return NULL;
	return ip;
}

/* The enrolment of an IPv4 address, or NULL when no pod of this node owns
 * it. */
static __always_inline struct local_pod *enrolled(__be32 addr)
{
	return local_pods.lookup(&addr);
}

/* True when addr is enrolled for the veth with this ifindex. */
static __always_inline int bound_to(__be32 addr, __u32 ifindex)
{
	struct local_pod *pod = enrolled(addr);

	return pod && pod->host_ifindex == ifindex;
}

/* The IPv6 header of an Ethernet frame, or NULL. */
static __always_inline struct ipv6hdr *ipv6_header(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IPV6))
		return NULL;
	struct ipv6hdr *ip6 = (void *)(eth + 1);
	if ((void *)(ip6 + 1) > data_end)
		return NULL;
	return ip6;
}

/* Whether an IPv6 packet carries TCP, after its extension headers (hop by
 * hop options, routing, fragment, destination options, authentication):
 * a TCP segment behind one must not slip through as "not TCP". A chain that
 * cannot be read to its end counts as TCP. ESP is opaque (the pod's own
 * tunnel, like one over UDP) and counts as not TCP. */
static __always_inline int ipv6_is_tcp(struct __sk_buff *skb, struct ipv6hdr *ip6)
{
	__u8 next = ip6->nexthdr;
	__u32 offset = sizeof(struct ethhdr) + sizeof(*ip6);

#pragma unroll
	for (int i = 0; i < AMBIT_IPV6_MAX_EXT; i++) {
		__u8 ext[2];

		switch (next) {
		case IPPROTO_TCP:
			return 1;
		case IPPROTO_HOPOPTS:
		case IPPROTO_ROUTING:
		case IPPROTO_DSTOPTS:
		case IPPROTO_FRAGMENT:
		case IPPROTO_AH:
			break;
		default:
			return 0;
		}
		if (bpf_skb_load_bytes(skb, offset, ext, sizeof(ext)) < 0)
			return 1;
		if (next == IPPROTO_FRAGMENT)
			offset += 8;
		else if (next == IPPROTO_AH)
			offset += ((__u32)ext[1] + 2) * 4;
		else
			offset += ((__u32)ext[1] + 1) * 8;
		next = ext[0];
	}
	return next == IPPROTO_TCP || next == IPPROTO_HOPOPTS || next == IPPROTO_ROUTING ||
	       next == IPPROTO_DSTOPTS || next == IPPROTO_FRAGMENT || next == IPPROTO_AH;
}

static __always_inline int is_tcp(struct iphdr *ip)
{
	return ip->protocol == IPPROTO_TCP;
}

/* The TCP header after ip, or NULL when it is not in the linear data (a
 * non-first fragment has none at all). */
static __always_inline struct tcphdr *tcp_header(struct __sk_buff *skb,
						 struct iphdr *ip)
{
	void *data_end = (void *)(long)skb->data_end;
	__u32 ihl = ip->ihl * 4;

	if (ihl < sizeof(*ip))
		return NULL;
	struct tcphdr *tcp = (void *)ip + ihl;
	if ((void *)(tcp + 1) > data_end)
		return NULL;
	return tcp;
}

/* Send the frame to the proxy namespace: the destination MAC becomes the
 * proxy's eth0 (else the proxy drops it as PACKET_OTHERHOST) and the skb
 * leaves through ambit0, whose veth peer is that eth0. */
static __always_inline int redirect_to_proxy(struct __sk_buff *skb,
					     __u32 verdict)
{
	__u32 zero = 0;
	struct proxy_link *link = proxy_link.lookup(&zero);

	if (!link || link->node_ifindex == 0)
		/* Filters attached but no proxy known: drop rather than let an
		 * enrolled pod's TCP bypass the mesh (fail closed). */
		return count(VERDICT_DROP_NO_PROXY_LINK, TC_ACT_SHOT);
	if (bpf_skb_store_bytes(skb, offsetof(struct ethhdr, h_dest),
				link->proxy_mac, ETH_ALEN, 0) < 0)
		/* Cannot address it to the proxy: drop, never deliver it. */
		return count(VERDICT_DROP_REWRITE_FAILED, TC_ACT_SHOT);
	count(verdict, 0);
	return bpf_redirect(link->node_ifindex, 0);
}

#endif /* AMBIT_H */
