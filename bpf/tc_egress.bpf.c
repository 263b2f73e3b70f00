// SPDX-License-Identifier: GPL-2.0 OR Apache-2.0
/*
 * tc_egress.bpf.c - leaktap's egress monitor on a clsact qdisc (direct-action).
 *
 * Counts every skb leaving the interface into per-flow (5-tuple + cgroup)
 * LRU per-CPU counters and never-evicted totals, and samples ClientHello,
 * QUIC Initial and DNS query bytes into the lt_events ring buffer (answers
 * leaving the host are counted, never sampled).
 *
 * Never drops: always returns TC_ACT_OK. Overhead: see lt_flow.h; measured
 * by perf/bench_tc_cost.py against an empty classifier.
 */
#include "lt_tc.h"

int lt_tc_egress(struct __sk_buff *skb)
{
	tc_handle(skb, LT_DIR_EGRESS, bpf_skb_cgroup_id(skb), 1);
	return TC_ACT_OK;
}
