/* SPDX-License-Identifier: GPL-2.0 OR Apache-2.0 */
/*
 * lt_maps.h - every map of leaktap, declared once for all programs compiled
 * into one BCC module (tc_egress + tc_ingress share them).
 *
 * With -DLT_PIN_DIR="\"/sys/fs/bpf/leaktap/<abi>\"" the counting maps are
 * pinned there, so a controller restart resumes counting where it left off;
 * the controller puts the ABI hash in the directory name so that a changed
 * layout never adopts stale maps. Without it (tests, replay) nothing is pinned.
 */
#ifndef __LT_MAPS_H
#define __LT_MAPS_H

#include "lt_types.h"

#ifdef LT_PIN_DIR
#define LT_TABLE(type, k, v, name, max) \
	BPF_TABLE_PINNED(type, k, v, name, max, LT_PIN_DIR "/" #name)
#else
#define LT_TABLE(type, k, v, name, max) BPF_TABLE(type, k, v, name, max)
#endif

/* Per-flow counters, drained by the controller every second. */
LT_TABLE("lru_percpu_hash", struct lt_flow_key, struct lt_flow_val, lt_flows, LT_FLOWS_MAX);
/* Per-cgroup egress totals: never evicted, never reset (monotonic). */
LT_TABLE("percpu_hash", __u64, struct lt_volume, lt_cgtot, LT_CGROUPS_MAX);
/* Totals by direction, every packet, parsed or not (monotonic). */
LT_TABLE("percpu_array", __u32, struct lt_volume, lt_totals, LT_DIR_MAX);
/* Loss, parse-reject and event counters, indexed by enum lt_stat. */
LT_TABLE("percpu_array", __u32, __u64, lt_stats, LT_STAT_MAX);
/* ClientHellos spanning several segments that are still being followed. */
LT_TABLE("hash", struct lt_flow_key, struct lt_hello_state, lt_hello, LT_HELLO_PENDING_MAX);

/* Transient state: never pinned. */
BPF_TABLE("percpu_array", __u32, struct lt_rate, lt_rate, 1);
/* Events are built here (too large for the 512-byte stack), then the filled
 * part is copied to the ring buffer. */
BPF_TABLE("percpu_array", __u32, struct lt_event, lt_scratch, 1);
BPF_RINGBUF_OUTPUT(lt_events, LT_RINGBUF_PAGES);

#endif /* __LT_MAPS_H */
