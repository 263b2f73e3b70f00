/* SPDX-License-Identifier: GPL-2.0 OR Apache-2.0 */
/*
 * lt_enforce.h - the verdict on a hello (or QUIC Initial) of a dry-run or
 * block tenant, and the drop of every later packet of a blocked flow.
 *
 * The policy maps are written by controller/enforcement/kernel_policy.py:
 *   lt_tenant_pol  tenant -> mode and edge-case flags; [0].mode != 0 when any
 *                  tenant enforces (otherwise a hello costs one array lookup)
 *   lt_ten_cg / lt_ten_uid / lt_ten_v4 / lt_ten_v6
 *                  the tenant of a packet, in the user-space precedence:
 *                  cgroup (own, then ancestors whose tenant covers its subtree),
 *                  socket uid, source CIDR (longest prefix; the controller
 *                  writes each prefix with the first tenant in config order
 *                  whose CIDRs contain it, so the answer equals the resolver's)
 *   lt_crm_names   whole host names and ".<suffix>" of {instance}.<suffix>
 *                  templates, keyed by the name bytes (zero-padded)
 *   lt_allow       (tenant, vendor, host) allowed; host all zero: the vendor's
 *                  every instance and shared host ("vendor:*")
 *   lt_crm_addrs   addresses of CRMs (QUIC, ECH and nameless hellos)
 *
 * Only hello and QUIC Initial packets run the verdict; a data packet pays one
 * array lookup (lt_blocked_on), plus the lt_blocked lookup only while some
 * flow is blocked (in the front cache, lt_fcache.h: once per flow and block). Includers define LT_ENFORCE 1 and
 * LT_ANCESTOR_CGROUP(ctx, level) (TC egress: there is a socket).
 */
#ifndef __LT_ENFORCE_H
#define __LT_ENFORCE_H

#include "lt_sni.h"

#ifndef LT_ENFORCE
#define LT_ENFORCE 0
#endif

#if LT_ENFORCE

/**
 * enf_tenant - the tenant of an egress packet (0: none)
 */
static __always_inline __u32 enf_tenant(LT_CTX *ctx, struct lt_pkt *p, __u32 uid)
{
	__u64 cg = p->key.cgroup_id;

	if (cg) {
		struct lt_tenant_ref *r = lt_ten_cg.lookup(&cg);
		if (r)
			return r->tenant;
		/* a cgroup created after the controller's last scan: its deepest
		 * mapped ancestor decides when that tenant covers its subtree */
		for (int level = LT_CGROUP_LEVELS - 1; level >= 0; level--) {
			__u64 a = LT_ANCESTOR_CGROUP(ctx, level);
			if (!a || a == cg)
				continue;
			r = lt_ten_cg.lookup(&a);
			if (r && r->subtree)
				return r->tenant;
		}
	}
	if (uid != LT_NO_UID) {
		__u32 *t = lt_ten_uid.lookup(&uid);
		if (t)
			return *t;
	}
	if (p->key.family == 4) {
		struct lt_cidr4_key k = { .prefixlen = 32 };
		__builtin_memcpy(k.addr, p->key.saddr, 4);
		__u32 *t = lt_ten_v4.lookup(&k);
		if (t)
			return *t;
	} else {
		struct lt_cidr6_key k = { .prefixlen = 128 };
		__builtin_memcpy(k.addr, p->key.saddr, 16);
		__u32 *t = lt_ten_v6.lookup(&k);
		if (t)
			return *t;
	}
	return 0;
}

/**
 * enf_policy - the policy of the packet's tenant when it enforces, else NULL
 */
static __always_inline struct lt_tenant_policy *enf_policy(LT_CTX *ctx, struct lt_pkt *p,
							   __u32 uid, __u32 *tenant)
{
	__u32 zero = 0;
	struct lt_tenant_policy *g = lt_tenant_pol.lookup(&zero);

	if (!g || !g->mode)
		return NULL;
	*tenant = enf_tenant(ctx, p, uid);
	if (*tenant == 0 || *tenant >= LT_TENANTS_MAX)
		return NULL;
	struct lt_tenant_policy *tp = lt_tenant_pol.lookup(tenant);
	if (!tp || tp->mode == LT_ENF_MONITOR)
		return NULL;
	return tp;
}

static __always_inline int enf_crm_addr(struct lt_pkt *p)
{
	struct lt_addr_key k = { .family = p->key.family };

	__builtin_memcpy(k.addr, p->key.daddr, 16);
	return lt_crm_addrs.lookup(&k) != NULL;
}

/**
 * enf_decide - count, report and (block mode) enforce one verdict
 * @s: scratch whose akey holds the tenant, vendor and name (zero for none)
 * Returns 1 when the packet is to be dropped.
 */
static __always_inline int enf_decide(struct lt_pkt *p, struct lt_sni_scratch *s, __u32 mode,
				      __u32 reason, __u32 inst_len, __u32 uid, __u32 ifindex)
{
	__u32 tenant = s->akey.tenant;
	__u32 action = mode == LT_ENF_BLOCK ? LT_ACT_BLOCKED : LT_ACT_WOULD_BLOCK;
	__u32 idx = tenant * 2 + action - 1;
	__u64 *c = lt_decisions.lookup(&idx);

	if (c)
		*c += 1;
	struct lt_decision *d = &s->dec;
	d->ts_ns = bpf_ktime_get_ns();
	d->cgroup_id = p->key.cgroup_id;
	d->kind = LT_EV_ENFORCE;
	d->ifindex = ifindex;
	__builtin_memcpy(d->saddr, p->key.saddr, 16);
	__builtin_memcpy(d->daddr, p->key.daddr, 16);
	d->sport = p->key.sport;
	d->dport = p->key.dport;
	d->family = p->key.family;
	d->proto = p->key.proto;
	d->action = action;
	d->reason = reason;
	d->tenant = tenant;
	d->vendor = s->akey.vendor;
	d->uid = uid;
	d->name_len = s->name_len;
	d->inst_len = inst_len;
	__builtin_memcpy(d->name, s->akey.name, LT_NAME_MAX);
	if (lt_events.ringbuf_output(d, sizeof(*d), 0))
		stat_inc(LT_LOSS_ENF_EVENT);
	if (action != LT_ACT_BLOCKED)
		return 0;
	struct lt_blocked_flow b = { .ts_ns = d->ts_ns, .tenant = tenant, .reason = reason };
	if (lt_blocked.update(&p->key, &b))
		stat_inc(LT_LOSS_ENF_BLOCK_INSERT);
	/* after the insert: front cache entries checked before it look again */
	__u32 one = 1;
	__u64 *blocks = lt_fgen.lookup(&one);
	if (blocks)
		__sync_fetch_and_add(blocks, 1);
	__u32 zero = 0;
	__u32 *on = lt_blocked_on.lookup(&zero);
	if (on && !*on)
		*on = 1;
	return 1;
}

/**
 * enf_classify - the catalogue entry of the name in @s->akey.name: the whole
 * name, else ".<suffix>" after its first label (the instance, *inst_len bytes)
 */
static __always_inline struct lt_crm_name *enf_classify(struct lt_sni_scratch *s, __u32 *inst_len)
{
	struct lt_crm_name *cn = lt_crm_names.lookup((struct lt_name_key *)s->akey.name);

	if (cn)
		return cn;
	/* the first label ends at the first dot (branch-free: one verifier path) */
	__u32 dot = 0, found = 0;
#pragma clang loop unroll(disable)
	for (__u32 i = 1; i <= SNI_LABEL_MAX; i++) {
		__u32 is_dot = sni_eq(s->akey.name[NAME_AT(i)], '.');
		dot = sni_sel(is_dot & (found ^ 1), i, dot);
		found |= is_dot;
	}
	if (!dot)
		return NULL;
	__u32 len = s->name_len;
#pragma clang loop unroll(disable)
	for (__u32 i = 0; i < LT_NAME_MAX; i++) {
		__u32 from = dot + i;
		s->nkey.name[NAME_AT(i)] = s->akey.name[NAME_AT(from)] * sni_gt(len, from);
	}
	*inst_len = dot;
	return lt_crm_names.lookup(&s->nkey);
}

/* The tenant may use every instance and shared host of the vendor ("vendor:*"). */
static __always_inline int enf_vendor_wildcard(struct lt_sni_scratch *s)
{
	s->wkey.tenant = s->akey.tenant;
	s->wkey.vendor = s->akey.vendor;
	__builtin_memset(s->wkey.name, 0, LT_NAME_MAX);
	return lt_allow.lookup(&s->wkey) != NULL;
}

/**
 * enf_hello - the verdict on a hello whose name was read (@outcome) into @s
 * Returns 1 to drop the packet.
 */
static __always_inline int enf_hello(LT_CTX *ctx, struct lt_pkt *p, struct lt_sni_scratch *s,
				     int outcome, __u32 uid, __u32 ifindex)
{
	__u32 tenant = 0, inst_len = 0;
	struct lt_tenant_policy *tp = enf_policy(ctx, p, uid, &tenant);

	if (!tp)
		return 0;
	__u32 mode = tp->mode, flags = tp->flags;
	struct lt_crm_name *cn = NULL;
	s->akey.tenant = tenant;
	s->akey.vendor = 0;
	if (outcome == LT_SNI_NAMED)
		cn = enf_classify(s, &inst_len);
	__u32 vendor = cn && cn->kind != LT_NK_NOT_CRM ? cn->vendor : 0;
	__u32 kind = cn ? cn->kind : LT_NK_NOT_CRM;
	/* the real name is encrypted: judged by the outer name or the address */
	if (s->ech && (flags & LT_EF_ECH_BLOCK) && (vendor || enf_crm_addr(p))) {
		s->akey.vendor = vendor;
		return enf_decide(p, s, mode, LT_RSN_ECH, inst_len, uid, ifindex);
	}
	if (vendor) {
		s->akey.vendor = vendor;
		if (kind == LT_NK_SHARED) {
			if (!(flags & LT_EF_SHARED_BLOCK) || enf_vendor_wildcard(s))
				return 0;
			return enf_decide(p, s, mode, LT_RSN_SHARED, 0, uid, ifindex);
		}
		if (lt_allow.lookup(&s->akey) || enf_vendor_wildcard(s))
			return 0;
		return enf_decide(p, s, mode, LT_RSN_INSTANCE, inst_len, uid, ifindex);
	}
	/* no name the kernel could read (none sent, malformed, beyond its bounds) */
	if (outcome != LT_SNI_NAMED && enf_crm_addr(p))
		return enf_decide(p, s, mode, LT_RSN_ADDRESS, 0, uid, ifindex);
	return 0;
}

/**
 * enf_nameless - the verdict on a hello or QUIC Initial judged by address
 * @reason: LT_RSN_QUIC (needs enforcement.quic: block) or LT_RSN_ADDRESS
 */
static __always_inline int enf_nameless(LT_CTX *ctx, struct lt_pkt *p, __u32 reason, __u32 uid,
					__u32 ifindex)
{
	__u32 tenant = 0, zero = 0;
	struct lt_tenant_policy *tp = enf_policy(ctx, p, uid, &tenant);

	if (!tp || (reason == LT_RSN_QUIC && !(tp->flags & LT_EF_QUIC_BLOCK)) || !enf_crm_addr(p))
		return 0;
	struct lt_sni_scratch *s = lt_sni_scratch.lookup(&zero);
	if (!s)
		return 0;
	__builtin_memset(s->akey.name, 0, LT_NAME_MAX);
	s->akey.tenant = tenant;
	s->akey.vendor = 0;
	s->name_len = 0;
	return enf_decide(p, s, tp->mode, reason, 0, uid, ifindex);
}

/**
 * enf_blocked - is this egress packet part of a blocked flow? A bare RST
 * passes (the server may free the connection; it carries no data).
 */
static __always_inline int enf_blocked(struct lt_pkt *p)
{
	__u32 zero = 0;
	__u32 *on = lt_blocked_on.lookup(&zero);

	if (!on || !*on)
		return 0;
	if (!lt_blocked.lookup(&p->key))
		return 0;
	if ((p->tcp_flags & LT_TCP_RST) && p->payload_len == 0)
		return 0;
	stat_inc(LT_CNT_ENF_BLOCKED_PKT);
	return 1;
}

#else /* !LT_ENFORCE */

static __always_inline int enf_hello(LT_CTX *ctx, struct lt_pkt *p, struct lt_sni_scratch *s,
				     int outcome, __u32 uid, __u32 ifindex)
{
	return 0;
}

static __always_inline int enf_nameless(LT_CTX *ctx, struct lt_pkt *p, __u32 reason, __u32 uid,
					__u32 ifindex)
{
	return 0;
}

static __always_inline int enf_blocked(struct lt_pkt *p)
{
	return 0;
}

#endif /* LT_ENFORCE */

#endif /* __LT_ENFORCE_H */
