// SPDX-License-Identifier: GPL-2.0 OR Apache-2.0
/*
 * tc_egress.bpf.c - leaktap's egress monitor on a clsact qdisc (direct-action).
 *
 * Counts every skb leaving the interface into per-flow (5-tuple + cgroup)
 * LRU per-CPU counters and never-evicted totals, and samples ClientHello,
 * QUIC Initial and DNS query bytes into the lt_events ring buffer (answers
 * leaving the host are counted, never sampled).
 *
 * Drops only for enforcement (lt_enforce.h): the hello of a block-mode
 * tenant's flow to a CRM instance outside its allow list, and every later
 * packet of that flow; otherwise TC_ACT_OK. Overhead: see lt_flow.h;
 * measured by perf/bench_tc_cost.py against an empty classifier.
 */
#include "lt_tc.h"

int lt_tc_egress(struct __sk_buff *skb)
{
	return tc_handle(skb, LT_DIR_EGRESS, bpf_skb_cgroup_id(skb), 1) ? TC_ACT_SHOT : TC_ACT_OK;
}

/* The hello tail programs (lt_hello_read.h): find the server name, then
 * check it and judge the hello. */
int lt_tc_hello(struct __sk_buff *skb)
{
	int verdict = hello_read_job(skb);

	if (verdict == LT_READ) {
		lt_progs.call(skb, LT_PROG_NAME);
		stat_inc(LT_LOSS_SNI_TAIL);
		hello_unread_to_ring(skb);
		return TC_ACT_OK;
	}
	return verdict == LT_DROP ? TC_ACT_SHOT : TC_ACT_OK;
}

int lt_tc_name(struct __sk_buff *skb)
{
	return hello_name_job(skb) == LT_DROP ? TC_ACT_SHOT : TC_ACT_OK;
}
