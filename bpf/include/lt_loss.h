/* SPDX-License-Identifier: GPL-2.0 OR Apache-2.0 */
/*
 * lt_loss.h - loss accounting and event rate limiting. Every exit that loses
 * data bumps lt_stats[reason]; the controller exports the counters and logs
 * their deltas with a remedy. A silent drop is a bug.
 */
#ifndef __LT_LOSS_H
#define __LT_LOSS_H

#include "lt_maps.h"

/**
 * stat_inc - count one occurrence of @reason (enum lt_stat)
 * lt_stats is per-CPU and TC/XDP programs do not migrate while running,
 * so a plain increment is race-free.
 */
static __always_inline void stat_inc(__u32 reason)
{
	__u64 *c = lt_stats.lookup(&reason);

	if (c)
		*c += 1;
}

/**
 * event_allowed - per-CPU token window of LT_EVENTS_PER_SEC events/second
 * Returns 1 when an event may be sent; counts LT_LOSS_RATE_LIMITED otherwise.
 */
static __always_inline int event_allowed(void)
{
	__u32 zero = 0;
	struct lt_rate *r = lt_rate.lookup(&zero);

	if (!r)
		return 0;
	__u64 now = bpf_ktime_get_ns();
	if (now - r->window_ns >= 1000000000ULL) {
		r->window_ns = now;
		r->count = 0;
	}
	if (r->count >= LT_EVENTS_PER_SEC) {
		stat_inc(LT_LOSS_RATE_LIMITED);
		return 0;
	}
	r->count++;
	return 1;
}

#endif /* __LT_LOSS_H */
