/* SPDX-License-Identifier: GPL-2.0 OR Apache-2.0 */
/*
 * lt_maps.h - every map of leaktap, declared once for all programs compiled
 * into one BCC module (tc_egress + tc_ingress share them).
 *
 * The maps declared with LT_TABLE are the counting maps: the loader pins them
 * (kernel/loader.py adopt_pins), so a controller restart resumes counting where
 * it left off; it names their directory by a digest of the sources and flags,
 * so that a changed layout never adopts stale maps. Tests and replay pin
 * nothing. LT_TABLE is only BPF_TABLE to the compiler: the loader finds the
 * names in the source.
 */
#ifndef __LT_MAPS_H
#define __LT_MAPS_H

#include "lt_types.h"

#define LT_TABLE(type, k, v, name, max) BPF_TABLE(type, k, v, name, max)

/* Per-flow counters, drained by the controller every second. */
LT_TABLE("lru_percpu_hash", struct lt_flow_key, struct lt_flow_val, lt_flows, LT_FLOWS_MAX);
/* Per-cgroup egress totals: never evicted, never reset (monotonic). A cgroup's
 * total is its lt_cgtot entry plus its lt_cgdrained entry (see lt_fcache.h). */
LT_TABLE("percpu_hash", __u64, struct lt_volume, lt_cgtot, LT_CGROUPS_MAX);
/* The front cache of established flows (struct lt_fcache_ent: CPU c's banks
 * at c * 2 * LT_FCACHE_SLOTS; a plain array, so a CPU's entries are contiguous,
 * where a per-CPU array's are separate allocations) and [0] its bank
 * generation (written by the drain only), [1] the count of blocks (by the
 * kernel only), pinned: undrained volume survives a restart. */
LT_TABLE("array", __u32, struct lt_fcache_ent, lt_fcache, LT_NR_CPUS * 2 * LT_FCACHE_SLOTS);
LT_TABLE("array", __u32, __u64, lt_fgen, 2);
/* Egress volume the drain took out of the front cache, by cgroup: written by
 * user space only (monotonic, like lt_cgtot). */
LT_TABLE("hash", __u64, struct lt_volume, lt_cgdrained, LT_CGROUPS_MAX);
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

/* ---- server name and enforcement (issue 12): never pinned. The policy is
 * written by the controller (controller/enforcement/kernel_policy.py) at each
 * start and reload; the programs of a crashed run keep theirs. ---- */
BPF_TABLE("percpu_array", __u32, struct lt_sni_scratch, lt_sni_scratch, 1);
/* split hellos being buffered; allocated on use (most flows never need one) */
BPF_F_TABLE("hash", struct lt_flow_key, struct lt_hello_buf, lt_hello_bufs, LT_HELLO_BUFS_MAX,
	    BPF_F_NO_PREALLOC);
/* kernel-read names, drained in batches (the ring keeps split and QUIC hellos) */
BPF_F_TABLE("hash", struct lt_flow_key, struct lt_name_rec, lt_names, LT_NAMES_MAX,
	    BPF_F_NO_PREALLOC);
BPF_TABLE("array", __u32, struct lt_tenant_policy, lt_tenant_pol, LT_TENANTS_MAX);
BPF_TABLE("hash", __u64, struct lt_tenant_ref, lt_ten_cg, LT_POLICY_CGROUPS_MAX);
BPF_TABLE("hash", __u32, __u32, lt_ten_uid, LT_POLICY_UIDS_MAX);
BPF_F_TABLE("lpm_trie", struct lt_cidr4_key, __u32, lt_ten_v4, LT_POLICY_CIDRS_MAX,
	    BPF_F_NO_PREALLOC);
BPF_F_TABLE("lpm_trie", struct lt_cidr6_key, __u32, lt_ten_v6, LT_POLICY_CIDRS_MAX,
	    BPF_F_NO_PREALLOC);
BPF_TABLE("hash", struct lt_name_key, struct lt_crm_name, lt_crm_names, LT_POLICY_NAMES_MAX);
BPF_TABLE("hash", struct lt_allow_key, __u32, lt_allow, LT_POLICY_ALLOW_MAX);
BPF_TABLE("hash", struct lt_addr_key, __u32, lt_crm_addrs, LT_CRM_ADDRS_MAX);
BPF_TABLE("lru_hash", struct lt_flow_key, struct lt_blocked_flow, lt_blocked, LT_BLOCKED_MAX);
/* [0]: 1 while lt_blocked may hold a flow (set by the kernel on a block,
 * cleared by the controller once it is empty): data packets look up lt_blocked
 * only then */
BPF_TABLE("array", __u32, __u32, lt_blocked_on, 1);
/* per-(tenant, action) decisions: index tenant * 2 + action - 1 (monotonic) */
BPF_TABLE("percpu_array", __u32, __u64, lt_decisions, LT_TENANTS_MAX * 2);

#endif /* __LT_MAPS_H */
