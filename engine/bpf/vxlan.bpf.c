/*
 * weft's eBPF data plane for the VXLAN backend (issue 13): the fast path in
 * front of the userspace engine, in Flannel's wire format.
 *
 * weft_egress (tcx egress of weft's TUN device): a packet the kernel routes
 * to a remote pod subnet is looked up in the remote subnets (longest prefix),
 * wrapped in outer IPv4/UDP/VXLAN/Ethernet with bpf_skb_adjust_room (tunnel
 * flags, so a GSO packet stays one GSO packet) and redirected to the
 * underlay, whose neighbour the kernel resolves. What it does not handle
 * (no entry, another family, an error) goes on into the TUN, where the
 * userspace engine handles it: userspace is the slow path.
 *
 * weft_ingress (tcx ingress of the underlay interface): a VXLAN datagram to
 * this node's address and weft's port is checked as userspace checks it
 * (VNI, VtepMAC, a known node, an inner source inside that node's subnets),
 * decapsulated and handed to the kernel, which forwards it to the pod.
 * Refused ones are dropped and counted by reason; anything else passes
 * untouched.
 *
 * The maps are written by engine/src/ebpf.rs from the engine's snapshot;
 * the layouts below are mirrored there (engine/src/sys/bpf.rs).
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/udp.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

/* Counter indices (engine/src/ebpf.rs names them). */
enum {
	C_ENCAP = 0,		/* packets encapsulated and redirected */
	C_EGRESS_NO_ROUTE,	/* no remote subnet: left to userspace */
	C_EGRESS_ERROR,		/* adjust_room/store/redirect failed: left to userspace */
	C_DECAP,		/* datagrams decapsulated and handed to the kernel */
	C_DROP_BAD_HEADER,	/* VXLAN flags without the I bit */
	C_DROP_VNI,		/* another VNI */
	C_DROP_UNKNOWN_SOURCE,	/* outer source is no node we know */
	C_DROP_MAC,		/* inner destination MAC is not our VtepMAC */
	C_DROP_SPOOFED,		/* inner source outside the sender's subnets */
	C_INGRESS_PASS,		/* ours, but left to userspace (other family, short, error) */
	C_INGRESS_GSO,		/* GSO bursts left to userspace (see weft_ingress) */
	C_INGRESS_BULK,		/* single packets of a flow whose bursts go to userspace */
	C_COUNT,
};

struct config {
	__u32 vni;		/* host order, 24 bits */
	__u32 ifindex4;		/* the underlay interface holding node-ip */
	__u32 addr4;		/* node-ip, network order */
	__u16 port;		/* VXLAN port, network order */
	__u16 port_min;		/* flow-hashed source ports, host order */
	__u16 port_max;
	__u8 mac4[6];		/* our VtepMAC on the IPv4 underlay */
	__u8 ttl;		/* outer TTL */
	__u8 enabled;		/* 0: every packet goes to userspace */
};

struct lpm4 {
	__u32 prefixlen;
	__u32 addr;		/* network order */
};

struct hop4 {
	__u32 addr;		/* the owning node's underlay address, network order */
	__u8 mac[6];		/* its VtepMAC */
	__u16 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct config);
} weft_config SEC(".maps");

/* Remote pod subnets (IPv4) -> the node that owns them. */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct lpm4);
	__type(value, struct hop4);
} weft_routes4 SEC(".maps");

/* Underlay addresses of the nodes we know (IPv4). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, __u32);
} weft_nodes4 SEC(".maps");

/* An inner flow, as the ingress program tells bulk flows apart. */
struct flow4 {
	__u32 src;
	__u32 dst;
	__u16 sport;
	__u16 dport;
	__u8 proto;
	__u8 pad[3];
};

/* Inner flows that sent a GSO burst lately -> when (ns). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct flow4);
	__type(value, __u64);
} weft_bulk SEC(".maps");

/* How long after its last burst a flow's single packets still follow its
 * bursts to userspace (so that none overtakes them). */
#define BULK_NS (50ULL * 1000 * 1000)

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, C_COUNT);
	__type(key, __u32);
	__type(value, __u64);
} weft_counters SEC(".maps");

static __always_inline void count(__u32 reason)
{
	__u64 *c = bpf_map_lookup_elem(&weft_counters, &reason);

	if (c)
		*c += 1;
}

/* Byte by byte: clang may turn memcmp into a call BPF cannot make. */
static __always_inline int same_mac(const __u8 *a, const __u8 *b)
{
	return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3] && a[4] == b[4] && a[5] == b[5];
}

#define VXLAN_HLEN 8
#define OUTER4 (sizeof(struct iphdr) + sizeof(struct udphdr) + VXLAN_HLEN + ETH_HLEN)

/* The outer headers of an IPv4 underlay, written in one store. */
struct outer4 {
	struct iphdr ip;
	struct udphdr udp;
	__u8 vxlan[VXLAN_HLEN];
	struct ethhdr eth;
} __attribute__((packed));

static __always_inline __u16 fold(__u32 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)~sum;
}

static __always_inline __u16 ip_checksum(const struct iphdr *ip)
{
	const __u16 *w = (const __u16 *)ip;
	__u32 sum = 0;

#pragma unroll
	for (int i = 0; i < (int)(sizeof(*ip) / 2); i++)
		sum += w[i];
	return fold(sum);
}

/* The configuration, when the programs are on and `skb` is IPv4 (the
 * family they handle); NULL: leave the packet alone. */
static __always_inline struct config *config_for(struct __sk_buff *skb)
{
	__u32 zero = 0;
	struct config *cfg = bpf_map_lookup_elem(&weft_config, &zero);

	if (!cfg || !cfg->enabled || skb->protocol != bpf_htons(ETH_P_IP))
		return NULL;
	return cfg;
}

SEC("classifier/egress")
int weft_egress(struct __sk_buff *skb)
{
	struct config *cfg = config_for(skb);

	if (!cfg)
		return TC_ACT_OK;

	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct iphdr *inner = data;

	if ((void *)(inner + 1) > end || inner->version != 4) {
		count(C_EGRESS_NO_ROUTE);
		return TC_ACT_OK;
	}
	struct lpm4 key = { .prefixlen = 32, .addr = inner->daddr };
	__u8 tos = inner->tos;
	struct hop4 *hop = bpf_map_lookup_elem(&weft_routes4, &key);

	if (!hop) {
		count(C_EGRESS_NO_ROUTE);
		return TC_ACT_OK;
	}

	struct outer4 h = {};
	__u32 hash = bpf_get_hash_recalc(skb);
	__u32 span = (__u32)cfg->port_max - cfg->port_min + 1;
	__u16 sport = cfg->port_min + (__u16)(((__u64)hash * span) >> 32);

	struct iphdr ip = {};

	ip.version = 4;
	ip.ihl = 5;
	/* ECN is copied from the inner header, as kernel VXLAN does. */
	ip.tos = tos & 0x3;
	ip.ttl = cfg->ttl;
	ip.protocol = IPPROTO_UDP;
	ip.saddr = cfg->addr4;
	ip.daddr = hop->addr;
	ip.id = (__u16)bpf_get_prandom_u32();
	h.udp.source = bpf_htons(sport);
	h.udp.dest = cfg->port;
	/* IPv4: no outer UDP checksum, as kernel Flannel sends. */
	h.udp.check = 0;
	h.vxlan[0] = 0x08;
	h.vxlan[4] = cfg->vni >> 16;
	h.vxlan[5] = cfg->vni >> 8;
	h.vxlan[6] = cfg->vni;
	__builtin_memcpy(h.eth.h_dest, hop->mac, ETH_ALEN);
	__builtin_memcpy(h.eth.h_source, cfg->mac4, ETH_ALEN);
	h.eth.h_proto = bpf_htons(ETH_P_IP);

	/* FIXED_GSO: a UDP tunnel GSO packet's gso_size is the inner MSS, as
	 * kernel VXLAN sends it (the pod's MTU already leaves the room); without
	 * it the kernel would shrink every segment by our 50 bytes. */
	__u64 flags = BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 | BPF_F_ADJ_ROOM_ENCAP_L4_UDP |
		      BPF_F_ADJ_ROOM_ENCAP_L2_ETH | BPF_F_ADJ_ROOM_ENCAP_L2(ETH_HLEN);

	/* The TUN's packets have no link-layer header, and
	 * bpf_redirect_neigh wants one to replace: push a blank one first
	 * (the outer headers then go in after it). */
	if (bpf_skb_change_head(skb, ETH_HLEN, 0)) {
		count(C_EGRESS_ERROR);
		return TC_ACT_OK;
	}
	if (bpf_skb_adjust_room(skb, OUTER4, BPF_ADJ_ROOM_MAC, flags)) {
		/* The blank header cannot be taken back: drop, and let TCP
		 * or the sender retry (this does not happen in practice:
		 * room is only refused for a packet too big to grow). */
		count(C_EGRESS_ERROR);
		return TC_ACT_SHOT;
	}
	/* Lengths of the whole (maybe GSO) packet: segmentation rewrites them
	 * per segment. */
	__u32 len = skb->len - ETH_HLEN;

	ip.tot_len = bpf_htons(len);
	ip.check = ip_checksum(&ip);
	__builtin_memcpy(&h.ip, &ip, sizeof(ip));
	h.udp.len = bpf_htons(len - sizeof(struct iphdr));
	struct ethhdr blank = { .h_proto = bpf_htons(ETH_P_IP) };

	if (bpf_skb_store_bytes(skb, 0, &blank, sizeof(blank), 0) ||
	    bpf_skb_store_bytes(skb, ETH_HLEN, &h, sizeof(h), 0)) {
		/* The room is made and cannot be told apart from a packet:
		 * drop rather than send garbage into the TUN. */
		count(C_EGRESS_ERROR);
		return TC_ACT_SHOT;
	}
	long r = bpf_redirect_neigh(cfg->ifindex4, NULL, 0, 0);

	if (r == TC_ACT_REDIRECT)
		count(C_ENCAP);
	else
		count(C_EGRESS_ERROR);
	return r;
}

/* Everything from the outer Ethernet header to the inner IPv4 header. */
struct frame4 {
	struct ethhdr eth;
	struct iphdr ip;
	struct udphdr udp;
	__u8 vxlan[VXLAN_HLEN];
	struct ethhdr inner_eth;
	struct iphdr inner;
} __attribute__((packed));

SEC("classifier/ingress")
int weft_ingress(struct __sk_buff *skb)
{
	struct config *cfg = config_for(skb);

	if (!cfg)
		return TC_ACT_OK;

	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct frame4 *f = data;

	/* The outer headers up to UDP must be linear to tell ours apart. */
	if (data + sizeof(struct ethhdr) + sizeof(struct iphdr) + sizeof(struct udphdr) > end)
		return TC_ACT_OK;
	if (f->ip.ihl != 5 || f->ip.protocol != IPPROTO_UDP || f->ip.daddr != cfg->addr4 ||
	    f->udp.dest != cfg->port || (f->ip.frag_off & bpf_htons(0x3fff)))
		return TC_ACT_OK;

	if ((void *)(f + 1) > end) {
		if (bpf_skb_pull_data(skb, sizeof(*f))) {
			count(C_INGRESS_PASS);
			return TC_ACT_OK;
		}
		data = (void *)(long)skb->data;
		end = (void *)(long)skb->data_end;
		f = data;
		if ((void *)(f + 1) > end) {
			/* Too short for a VXLAN packet of IPv4: userspace
			 * counts what it is. */
			count(C_INGRESS_PASS);
			return TC_ACT_OK;
		}
	}
	if (!(f->vxlan[0] & 0x08)) {
		count(C_DROP_BAD_HEADER);
		return TC_ACT_SHOT;
	}
	__u32 vni = ((__u32)f->vxlan[4] << 16) | ((__u32)f->vxlan[5] << 8) | f->vxlan[6];

	if (vni != cfg->vni) {
		count(C_DROP_VNI);
		return TC_ACT_SHOT;
	}
	__u32 src = f->ip.saddr;

	if (!bpf_map_lookup_elem(&weft_nodes4, &src)) {
		count(C_DROP_UNKNOWN_SOURCE);
		return TC_ACT_SHOT;
	}
	if (!same_mac(f->inner_eth.h_dest, cfg->mac4)) {
		count(C_DROP_MAC);
		return TC_ACT_SHOT;
	}
	if (f->inner_eth.h_proto != bpf_htons(ETH_P_IP) || f->inner.version != 4) {
		/* IPv6 pods over an IPv4 underlay: userspace's. */
		count(C_INGRESS_PASS);
		return TC_ACT_OK;
	}
	struct lpm4 key = { .prefixlen = 32, .addr = f->inner.saddr };
	struct hop4 *owner = bpf_map_lookup_elem(&weft_routes4, &key);

	if (!owner || owner->addr != src) {
		count(C_DROP_SPOOFED);
		return TC_ACT_SHOT;
	}
	/* A GSO packet (a TCP burst the sender's stack coalesced, or GRO'd
	 * here) stays marked as a UDP tunnel after bpf_skb_adjust_room cuts
	 * the outer headers, and BPF cannot clear that mark: forwarded to the
	 * pod through the CNI bridge, whose hw_enc_features are empty, it
	 * would be segmented in software with checksums. The engine's socket
	 * takes it whole instead (one receive per burst) and writes it to the
	 * TUN as one GSO packet. */
	struct flow4 flow = { .src = f->inner.saddr, .dst = f->inner.daddr, .proto = f->inner.protocol };
	__u16 *ports = (void *)(f + 1);

	if ((flow.proto == IPPROTO_TCP || flow.proto == IPPROTO_UDP) && f->inner.ihl == 5 &&
	    (void *)(ports + 2) <= end) {
		flow.sport = ports[0];
		flow.dport = ports[1];
	}
	__u64 now = bpf_ktime_get_ns();

	if (skb->gso_size) {
		bpf_map_update_elem(&weft_bulk, &flow, &now, BPF_ANY);
		count(C_INGRESS_GSO);
		return TC_ACT_OK;
	}
	/* A flow's single packets (a burst's tail, a lone segment) take the
	 * path its bursts take while they come: decapsulated here, they would
	 * overtake the bursts queued for the engine, and TCP would take the
	 * reordering for loss. */
	__u64 *last = bpf_map_lookup_elem(&weft_bulk, &flow);

	if (last && now - *last < BULK_NS) {
		count(C_INGRESS_BULK);
		return TC_ACT_OK;
	}
	/* One VXLAN packet must be the whole skb: trailing bytes would reach
	 * the pod as part of its packet. */
	if ((__u32)bpf_ntohs(f->inner.tot_len) + ETH_HLEN + OUTER4 != skb->len) {
		count(C_INGRESS_PASS);
		return TC_ACT_OK;
	}
	/* Cut the outer IP, UDP, VXLAN and inner Ethernet headers: the outer
	 * Ethernet header (to our MAC, type IPv4) now fronts the pod's packet,
	 * which the kernel routes to the pod. GSO packets never get here (see
	 * above); FIXED_GSO keeps it so should one: a gso_size grown by our
	 * 50 bytes would be refused as too big on the way to the pod. */
	if (bpf_skb_adjust_room(skb, -(__s32)OUTER4, BPF_ADJ_ROOM_MAC, BPF_F_ADJ_ROOM_FIXED_GSO)) {
		count(C_INGRESS_PASS);
		return TC_ACT_OK;
	}
	count(C_DECAP);
	return TC_ACT_OK;
}

char _license[] SEC("license") = "Dual MIT/GPL";
