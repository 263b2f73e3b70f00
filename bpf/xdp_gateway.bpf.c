// SPDX-License-Identifier: GPL-2.0 OR Apache-2.0
/*
 * xdp_gateway.bpf.c - leaktap on a gateway or a mirror (SPAN/TAP) port, where
 * the nodes' outbound traffic arrives as ingress. The same parsing, counting
 * and sampling code as the TC programs (bpf/include/lt_flow.h), at the
 * earliest hook. There is no socket here: cgroup 0, uid unknown; tenants are
 * matched by source address (the controller's `inside` networks).
 *
 * Always returns XDP_PASS: a monitor never drops. Overhead: see lt_flow.h;
 * measured by perf/bench_xdp_cost.py against an empty XDP program.
 */
#include <uapi/linux/bpf.h>

#define LT_CTX struct xdp_md
#define LT_LOAD_BYTES(ctx, off, buf, n) bpf_xdp_load_bytes(ctx, off, buf, n)
#define LT_SOCKET_UID(ctx) LT_NO_UID
/* XDP sees the whole first buffer linearly: nothing to pull */
#define LT_PULL_HEADERS(ctx, len, data, data_end) (-1)
/* queries from inside hosts and their answers both arrive here: sample both,
 * user space pairs each answer with its query */
#undef LT_DNS_BOTH_WAYS
#define LT_DNS_BOTH_WAYS 1
#include "lt_flow.h"

int lt_xdp_gw(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	/* frame length: linear part plus fragments of a multi-buffer frame */
	__u32 len = bpf_xdp_get_buff_len(ctx);

	lt_handle(ctx, data, data_end, len, 1, 0, LT_DIR_INGRESS, 1, ctx->ingress_ifindex);
	return XDP_PASS;
}
