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

#include "lt_flow.h"

/**
 * tc_handle - account an skb seen by a TC hook
 * Bytes are skb->len (what the interface counters count, GSO super-packets
 * included); packets are max(gso_segs, 1), the segments on the wire.
 */
static __always_inline void tc_handle(struct __sk_buff *skb, __u32 dir, __u64 cgroup_id,
				      int probe_tls)
{
	__u32 segs = skb->gso_segs ? skb->gso_segs : 1;

	lt_handle(skb, (void *)(long)skb->data, (void *)(long)skb->data_end, skb->len, segs,
		  cgroup_id, dir, probe_tls, skb->ifindex);
}

#endif /* __LT_TC_H */
