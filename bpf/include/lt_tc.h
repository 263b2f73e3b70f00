/* SPDX-License-Identifier: GPL-2.0 OR Apache-2.0 */
/*
 * lt_tc.h - the TC (clsact, direct-action) binding of the shared data path.
 */
#ifndef __LT_TC_H
#define __LT_TC_H

#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>

#define LT_CTX struct __sk_buff
#define LT_LOAD_BYTES(ctx, off, buf, n) bpf_skb_load_bytes(ctx, off, buf, n)
#define LT_SOCKET_UID(ctx) bpf_get_socket_uid(ctx)
#define LT_PULL_HEADERS(ctx, len, data, data_end) tc_pull_headers(ctx, len, data, data_end)

/* Headers the parser reads with direct access: Ethernet + 2 VLAN tags + IPv4
 * with options + TCP fits; so do IPv6 and a few extension headers. */
#define LT_PULL_LEN 128

/**
 * tc_pull_headers - make the first bytes of the packet linear (the stack can
 * leave headers in fragments) and reload the packet pointers
 */
static __always_inline int tc_pull_headers(struct __sk_buff *skb, __u32 len, void **data,
					   void **data_end)
{
	if (bpf_skb_pull_data(skb, len < LT_PULL_LEN ? len : LT_PULL_LEN))
		return -1;
	*data = (void *)(long)skb->data;
	*data_end = (void *)(long)skb->data_end;
	return 0;
}

/* the egress verdict (lt_enforce.h): the packet's socket gives its cgroups */
#ifndef LT_ENFORCE
#define LT_ENFORCE 1
#endif
#define LT_ANCESTOR_CGROUP(ctx, level) bpf_skb_ancestor_cgroup_id(ctx, level)

/* server names are read in the tail program lt_tc_hello (lt_hello_read.h) */
#define LT_READ_NAMES 1

#include "lt_hello_read.h"

/* the tail programs (LT_PROG_HELLO, LT_PROG_NAME), put there by the loader;
 * pinned with the counting maps: a prog array empties when its last user
 * reference goes, and a crashed controller's pinned programs keep reading */
LT_TABLE("prog", int, int, lt_progs, 2);

/**
 * tc_handle - account an skb seen by a TC hook
 * Bytes are skb->len (what the interface counters count, GSO super-packets
 * included); packets are max(gso_segs, 1), the segments on the wire.
 * Returns 1 when enforcement drops the skb.
 */
static __always_inline int tc_handle(struct __sk_buff *skb, __u32 dir, __u64 cgroup_id,
				     int probe_tls)
{
	__u32 segs = skb->gso_segs ? skb->gso_segs : 1;

	int verdict = lt_handle(skb, (void *)(long)skb->data, (void *)(long)skb->data_end, skb->len, segs,
		  cgroup_id, dir, probe_tls, skb->ifindex);
	if (verdict == LT_READ) {
		lt_progs.call(skb, LT_PROG_HELLO);
		stat_inc(LT_LOSS_SNI_TAIL); /* the tail program is missing */
		hello_unread_to_ring(skb);
		return LT_PASS;
	}
	return verdict;
}

#endif /* __LT_TC_H */
