/* SPDX-License-Identifier: GPL-2.0 OR Apache-2.0 */
/*
 * lt_fcache.h - the front cache of established flows (issue 12: a data packet
 * within 40 ns of an empty classifier, every counter kept).
 *
 * Most packets belong to flows that are already counted and whose payload
 * probe budget is used up: all they change is bytes and packets. Their flow
 * key is looked up in a small array slot of its CPU (hashed from the key) instead
 * of the LRU flow hash and the per-cgroup hash, which cost ~70 of the ~85 ns
 * a data packet cost. Included by lt_flow.h (it uses its counting helpers).
 *
 * Where every byte is, exactly once:
 *  - a packet the cache does not take is counted in lt_flows and lt_cgtot;
 *  - a packet it takes is counted in its entry, in the active bank only;
 *  - when a different flow fills a slot, the kernel (on this CPU, so no other
 *    writer) adds the old entry to lt_flows and lt_cgtot and zeroes it;
 *  - the drain (controller/kernel/front_cache.py) flips lt_fgen, waits for an
 *    RCU grace period (every program that read the old generation has
 *    returned), then owns the idle bank: it reports its entries as flow
 *    volume, adds their egress volume to lt_cgdrained and zeroes them.
 * A filled slot only ever takes packets without SYN/FIN/RST (its flags are
 * fixed) of a flow whose lt_flows slot on this CPU has no probe budget left,
 * and never DNS: those still need the full path. While some flow is blocked,
 * an entry looks lt_blocked up once after each block (fcache_blocked).
 */
#ifndef __LT_FCACHE_H
#define __LT_FCACHE_H

/* mirror-port dedup compares each packet with its flow entry: no cache there */
#ifndef LT_FCACHE
#define LT_FCACHE (!LT_DEDUP)
#endif

/**
 * fcache_slot - index of @k's entry in the bank of generation @gen
 */
static __always_inline __u32 fcache_slot(const struct lt_flow_key *k, __u64 gen)
{
	__u32 h = k->saddr[0] ^ k->saddr[3] ^ k->daddr[0] ^ k->daddr[3] ^
		  (((__u32)k->sport << 16) | k->dport) ^ (__u32)k->cgroup_id ^
		  ((__u32)k->proto << 8) ^ k->dir;

	h *= 0x9E3779B1; /* Fibonacci hashing: the top bits mix every input bit */
	return (__u32)(gen & 1) * LT_FCACHE_SLOTS + (h >> (32 - LT_FCACHE_BITS));
}

static __always_inline int fcache_key_eq(const struct lt_flow_key *a, const struct lt_flow_key *b)
{
	const __u64 *x = (const __u64 *)a;
	const __u64 *y = (const __u64 *)b;

	return ((x[0] ^ y[0]) | (x[1] ^ y[1]) | (x[2] ^ y[2]) | (x[3] ^ y[3]) | (x[4] ^ y[4]) |
		(x[5] ^ y[5])) == 0;
}

/**
 * fcache_entry - this packet's slot in the active bank (NULL: no map memory)
 */
static __always_inline struct lt_fcache_ent *fcache_entry(struct lt_pkt *p)
{
	__u32 zero = 0;
	__u64 *gen = lt_fgen.lookup(&zero);
	__u32 cpu = bpf_get_smp_processor_id();
	if (cpu >= LT_NR_CPUS)
		return NULL;
	/* this CPU's region: only this CPU writes it while its bank is active */
	__u32 slot = cpu * 2 * LT_FCACHE_SLOTS + fcache_slot(&p->key, gen ? *gen : 0);

	return lt_fcache.lookup(&slot);
}

/**
 * fcache_hit - count the packet in its flow's entry if it has one
 * Returns the entry when counted (the caller is done with the flow), else NULL.
 */
static __always_inline struct lt_fcache_ent *fcache_hit(struct lt_pkt *p, __u32 len, __u32 segs)
{
	if (p->tcp_flags & (LT_TCP_SYN | LT_TCP_FIN | LT_TCP_RST))
		return NULL; /* they set flow flags */
	struct lt_fcache_ent *e = fcache_entry(p);
	if (!e || !fcache_key_eq(&e->key, &p->key))
		return NULL;
	e->bytes += len;
	e->packets += segs;
	return e;
}

/**
 * fcache_fold - move an entry's volume into lt_flows and (egress) lt_cgtot
 */
static __always_inline void fcache_fold(struct lt_fcache_ent *e)
{
	if (!e->packets)
		return;
	stat_inc(LT_CNT_FCACHE_FOLD);
	struct lt_flow_val *v = lt_flows.lookup(&e->key);
	if (!v) {
		struct lt_flow_val init = {};
		lt_flows.insert(&e->key, &init);
		v = lt_flows.lookup(&e->key);
	}
	if (v) {
		if (!v->first_seen_ns) {
			v->first_seen_ns = e->first_seen_ns;
			v->last_seen_ns = e->first_seen_ns;
			v->uid = e->uid;
		}
		v->tx_bytes += e->bytes;
		v->tx_packets += e->packets;
		v->flags |= e->flags;
	} else {
		stat_inc(LT_LOSS_FLOW_INSERT); /* still in the cgroup totals below */
	}
	if (e->key.dir == LT_DIR_EGRESS)
		cgroup_account(e->key.cgroup_id, e->bytes, e->packets);
	e->bytes = 0;
	e->packets = 0;
}

/**
 * fcache_fill - let this packet's flow take its slot, folding the slot's
 * previous flow first; @v is the flow's lt_flows slot on this CPU
 */
static __always_inline void fcache_fill(struct lt_pkt *p, struct lt_flow_val *v)
{
	if (p->tcp_flags & (LT_TCP_SYN | LT_TCP_FIN | LT_TCP_RST))
		return;
	struct lt_fcache_ent *e = fcache_entry(p);
	if (!e || fcache_key_eq(&e->key, &p->key))
		return;
	fcache_fold(e);
	__builtin_memcpy(&e->key, &p->key, sizeof(e->key));
	e->first_seen_ns = v->first_seen_ns;
	e->uid = v->uid;
	e->flags = v->flags;
	e->blk_seq = 0;
}

/**
 * fcache_blocked - enf_blocked for a packet counted in entry @e: while flows are
 * blocked, lt_blocked is looked up once per entry and block, not per packet
 */
static __always_inline int fcache_blocked(struct lt_fcache_ent *e, struct lt_pkt *p)
{
	__u32 zero = 0, one = 1;
	__u32 *on = lt_blocked_on.lookup(&zero);

	if (!LT_ENFORCE || !on || !*on)
		return 0;
	__u64 *blocks = lt_fgen.lookup(&one);
	if (!blocks)
		return enf_blocked(p);
	/* read before the lookup: a block after it changes the count (enf_decide
	 * counts after its insert), so this entry looks again */
	__u64 seen = *(volatile __u64 *)blocks;
	if (e->blk_seq == seen + 1)
		return 0;
	if (enf_blocked(p))
		return 1;
	e->blk_seq = seen + 1;
	return 0;
}

#endif /* __LT_FCACHE_H */
