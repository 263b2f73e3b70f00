/* SPDX-License-Identifier: GPL-2.0 OR Apache-2.0 */
/*
 * lt_parse.h - bounded parsing of Ethernet, 802.1Q/802.1ad, IPv4 (with
 * options), IPv6 (extension headers), TCP and UDP over direct packet access.
 * Shared by the TC and XDP programs; needs only UAPI headers.
 *
 * Every dereference is preceded by a bounds check against data_end; header
 * lengths come from ihl/doff/hdrlen and are range-checked before use.
 * Helpers return 0 or -LT_PARSE_* (enum lt_stat).
 */
#ifndef __LT_PARSE_H
#define __LT_PARSE_H

#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>
#include "lt_types.h"

#define LT_ETH_P_8021AD 0x88A8
#define LT_ETH_P_QINQ1 0x9100   /* pre-standard QinQ, still seen on mirror ports */
#define LT_VLAN_MAX 2
#define LT_IP_MF 0x2000
#define LT_IP_OFFSET 0x1FFF
#define LT_IPV6_HDRLEN 40
#define LT_TCP_SYN 0x02
#define LT_TCP_ACK 0x10
#define LT_TCP_FIN 0x01
#define LT_TCP_RST 0x04

struct lt_vlan_hdr {
	__be16 tci;
	__be16 encap_proto;
};

/* IPv6 extension header prefix: next header, length in 8-octet units (-1). */
struct lt_ipv6_opt {
	__u8 nexthdr;
	__u8 hdrlen;
};

/* IPv6 fragment header (RFC 8200 4.5):
 *  0        8        16                       29  31
 * +--------+--------+-------------------------+--+-+
 * |nexthdr |reserved|   fragment offset (13)  |res|M|
 * +--------+--------+-------------------------+--+-+
 * |                 identification                 |
 */
struct lt_ipv6_frag {
	__u8 nexthdr;
	__u8 reserved;
	__be16 frag_off;
	__be32 identification;
};

/* What the parser learned about one packet (internal, not ABI). */
struct lt_pkt {
	struct lt_flow_key key;
	__u32 payload_off;        /* offset of the L4 payload from the frame start */
	__u32 payload_len;        /* L4 payload bytes per the IP length fields */
	__u32 seq;                /* TCP sequence of the first payload byte */
	__u32 sig;                /* identity of this packet among its flow's (LT_DEDUP builds only) */
	__u8 tcp_flags;
	__u8 has_ports;           /* 0 for fragments and other L4 protocols */
};

/**
 * eth_parse - skip Ethernet and up to LT_VLAN_MAX 802.1Q/802.1ad tags
 * @data, @data_end: packet bounds
 * @off: out, offset of the L3 header
 * @proto: out, EtherType of the L3 header (host order)
 */
static __always_inline int eth_parse(void *data, void *data_end, __u32 *off, __u16 *proto)
{
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > data_end)
		return -LT_PARSE_TRUNC_L2;
	__u16 type = bpf_ntohs(eth->h_proto);
	__u32 o = sizeof(*eth);

#pragma unroll
	for (int i = 0; i < LT_VLAN_MAX; i++) {
		if (type != ETH_P_8021Q && type != LT_ETH_P_8021AD && type != LT_ETH_P_QINQ1)
			break;
		struct lt_vlan_hdr *vh = data + o;
		if ((void *)(vh + 1) > data_end)
			return -LT_PARSE_TRUNC_L2;
		type = bpf_ntohs(vh->encap_proto);
		o += sizeof(*vh);
	}
	*off = o;
	*proto = type;
	return 0;
}

/**
 * l4_parse - read ports (and TCP flags/sequence) at @l4 and find the payload
 * @ip_end: offset one past the IP datagram (from its length field, clamped)
 */
static __always_inline int l4_parse(void *data, void *data_end, __u32 l4, __u32 ip_end,
				    struct lt_pkt *p)
{
	if (p->key.proto == IPPROTO_TCP) {
		struct tcphdr *th = data + l4;
		if ((void *)(th + 1) > data_end)
			return -LT_PARSE_BAD_L4;
		__u32 doff = th->doff * 4;
		if (doff < sizeof(*th) || l4 + doff > ip_end)
			return -LT_PARSE_BAD_L4;
		p->key.sport = bpf_ntohs(th->source);
		p->key.dport = bpf_ntohs(th->dest);
		/* the flags byte follows doff/reserved: byte 13 of the header */
		p->tcp_flags = ((__u8 *)th)[13];
		/* a SYN consumes one sequence number: TFO data starts at ISN + 1 */
		p->seq = bpf_ntohl(th->seq) + ((p->tcp_flags & LT_TCP_SYN) ? 1 : 0);
		p->payload_off = l4 + doff;
		/* checksum covers the payload: a retransmission with other data differs */
#if LT_DEDUP
		p->sig = ((__u32)th->check << 16) ^ p->seq ^ bpf_ntohl(th->ack_seq) ^ p->tcp_flags;
#endif
	} else if (p->key.proto == IPPROTO_UDP) {
		struct udphdr *uh = data + l4;
		if ((void *)(uh + 1) > data_end || l4 + sizeof(*uh) > ip_end)
			return -LT_PARSE_BAD_L4;
		p->key.sport = bpf_ntohs(uh->source);
		p->key.dport = bpf_ntohs(uh->dest);
		p->payload_off = l4 + sizeof(*uh);
#if LT_DEDUP
		p->sig = ((__u32)uh->check << 16) ^ bpf_ntohs(uh->len);
#endif
	} else {
		return -LT_PARSE_OTHER_L4;
	}
	p->has_ports = 1;
	p->payload_len = ip_end - p->payload_off;
	return 0;
}

/**
 * ipv4_parse - IPv4 header with options, fragments, lying lengths
 * @pkt_len: bytes in the frame (skb->len); @gso: packet is a GSO super-packet
 * Returns 0 with p->payload_* set, or -LT_PARSE_*; *clamped is set when the
 * length field claims more than the frame holds.
 */
static __always_inline int ipv4_parse(void *data, void *data_end, __u32 off, __u32 pkt_len,
				      int gso, struct lt_pkt *p, int *clamped)
{
	struct iphdr *ip = data + off;

	if ((void *)(ip + 1) > data_end)
		return -LT_PARSE_TRUNC_L3;
	if (ip->version != 4 || ip->ihl < 5)
		return -LT_PARSE_BAD_IPV4;
	__u32 hlen = ip->ihl * 4;
	if (data + off + hlen > data_end)
		return -LT_PARSE_TRUNC_L3;

	__u32 tot = bpf_ntohs(ip->tot_len);
	/* BIG TCP GSO packets carry tot_len 0: the frame length is the truth */
	if (tot == 0 && gso)
		tot = pkt_len - off;
	if (tot < hlen)
		return -LT_PARSE_BAD_LEN;
	if (off + tot > pkt_len) {
		tot = pkt_len - off;
		*clamped = 1;
	}

	p->key.family = 4;
	p->key.proto = ip->protocol;
	p->key.saddr[0] = ip->saddr;
	p->key.daddr[0] = ip->daddr;
	/* non-first fragments carry no L4 header: count them with ports 0 */
	if (bpf_ntohs(ip->frag_off) & LT_IP_OFFSET)
		return -LT_PARSE_FRAGMENT;
	int err = l4_parse(data, data_end, off + hlen, off + tot, p);
	/* the IP id tells copies from retransmissions with equal checksums apart */
#if LT_DEDUP
	p->sig ^= (__u32)bpf_ntohs(ip->id) << 8;
#endif
	return err;
}

/**
 * ipv6_parse - IPv6 header and up to LT_IPV6_EXT_MAX extension headers
 */
static __always_inline int ipv6_parse(void *data, void *data_end, __u32 off, __u32 pkt_len,
				      int gso, struct lt_pkt *p, int *clamped)
{
	struct ipv6hdr *ip6 = data + off;

	if ((void *)(ip6 + 1) > data_end)
		return -LT_PARSE_TRUNC_L3;
	if (ip6->version != 6)
		return -LT_PARSE_BAD_IPV6;

	__u32 plen = bpf_ntohs(ip6->payload_len);
	if (plen == 0 && gso)
		plen = pkt_len - off - LT_IPV6_HDRLEN;
	__u32 ip_end = off + LT_IPV6_HDRLEN + plen;
	if (ip_end > pkt_len) {
		ip_end = pkt_len;
		*clamped = 1;
	}

	p->key.family = 6;
	__builtin_memcpy(p->key.saddr, &ip6->saddr, 16);
	__builtin_memcpy(p->key.daddr, &ip6->daddr, 16);

	__u8 nh = ip6->nexthdr;
	__u32 l4 = off + LT_IPV6_HDRLEN;
#pragma unroll
	for (int i = 0; i < LT_IPV6_EXT_MAX; i++) {
		if (nh != IPPROTO_HOPOPTS && nh != IPPROTO_ROUTING && nh != IPPROTO_DSTOPTS &&
		    nh != IPPROTO_FRAGMENT && nh != IPPROTO_AH)
			goto l4;
		if (nh == IPPROTO_FRAGMENT) {
			struct lt_ipv6_frag *fh = data + l4;
			if ((void *)(fh + 1) > data_end)
				return -LT_PARSE_TRUNC_L3;
			nh = fh->nexthdr;
			l4 += sizeof(*fh);
			if (bpf_ntohs(fh->frag_off) & ~7) {
				p->key.proto = nh;
				return -LT_PARSE_FRAGMENT;
			}
			continue;
		}
		struct lt_ipv6_opt *oh = data + l4;
		if ((void *)(oh + 1) > data_end)
			return -LT_PARSE_TRUNC_L3;
		/* AH counts 4-octet units minus 2 (RFC 4302), the others 8-octet units minus 1 */
		__u32 len = nh == IPPROTO_AH ? (oh->hdrlen + 2) * 4 : (oh->hdrlen + 1) * 8;
		nh = oh->nexthdr;
		l4 += len;
		if (l4 > ip_end)
			return -LT_PARSE_BAD_LEN;
	}
	/* the loop read LT_IPV6_EXT_MAX headers; only a further one is too many */
	if (nh == IPPROTO_HOPOPTS || nh == IPPROTO_ROUTING || nh == IPPROTO_DSTOPTS ||
	    nh == IPPROTO_FRAGMENT || nh == IPPROTO_AH) {
		p->key.proto = nh;
		return -LT_PARSE_IPV6_EXT;
	}
l4:
	p->key.proto = nh;
	return l4_parse(data, data_end, l4, ip_end, p);
}

/**
 * pkt_parse - parse a frame into a flow key and payload position
 * Returns 0 when the packet has ports; -LT_PARSE_FRAGMENT / -LT_PARSE_OTHER_L4
 * when it is IP but has no ports (still counted as a flow with ports 0);
 * any other -LT_PARSE_* when it cannot be attributed.
 */
static __always_inline int pkt_parse(void *data, void *data_end, __u32 pkt_len, int gso,
				     struct lt_pkt *p, int *clamped)
{
	__u32 off = 0;
	__u16 proto = 0;
	int err = eth_parse(data, data_end, &off, &proto);

	if (err)
		return err;
	if (proto == ETH_P_IP)
		return ipv4_parse(data, data_end, off, pkt_len, gso, p, clamped);
	if (proto == ETH_P_IPV6)
		return ipv6_parse(data, data_end, off, pkt_len, gso, p, clamped);
	return -LT_PARSE_NOT_IP;
}

#endif /* __LT_PARSE_H */
