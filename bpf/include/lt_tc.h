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
#include "lt_flow.h"

/* Headers the parser reads with direct access; pulled into the linear area
 * when a driver or the stack left them in fragments. */
#define LT_TC_PULL_LEN 128

/**
 * tc_handle - account an skb seen by a TC hook
 * Bytes are skb->len (what the interface counters count, GSO super-packets
 * included); packets are max(gso_segs, 1), the segments on the wire.
 */
static __always_inline void tc_handle(struct __sk_buff *skb, __u32 dir, __u64 cgroup_id,
				      int probe_tls)
{
	__u32 len = skb->len;
	__u32 segs = skb->gso_segs ? skb->gso_segs : 1;
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	__u32 want = len < LT_TC_PULL_LEN ? len : LT_TC_PULL_LEN;

	if (data + want > data_end) {
		/* does not change the packet, only where its bytes live */
		bpf_skb_pull_data(skb, want);
		data = (void *)(long)skb->data;
		data_end = (void *)(long)skb->data_end;
	}
	lt_handle(skb, data, data_end, len, segs, cgroup_id, dir, probe_tls, skb->ifindex);
}

#endif /* __LT_TC_H */
