// SPDX-License-Identifier: GPL-2.0 OR Apache-2.0
/*
 * cgroup_connect.bpf.c - connect-time refusal for enforcing tenants (issue 12).
 *
 * cgroup/connect4 and cgroup/connect6 programs, attached with BPF_F_ALLOW_MULTI
 * at the root of the cgroup v2 hierarchy (they run for every descendant). The
 * controller fills three maps:
 *   lt_cg_tenant  cgroup id -> tenant (every cgroup a tenant's glob matches, and
 *                 the unmatched descendants of those, as tenant 0)
 *   lt_uid_tenant uid -> tenant (tenants matched by uid)
 *   lt_refused    (tenant, family, address) -> rule: addresses DNS named only
 *                 unsanctioned CRM instances of that tenant
 * A connect() by a block tenant to a refused address fails with EPERM before a
 * SYN leaves; a dry-run tenant's is let through; both are reported on the
 * lt_cg_events ring. Any other connect costs two or three hash lookups.
 *
 * The cgroup is looked up as the deepest mapped ancestor (bpf_get_current_
 * ancestor_cgroup_id), so a cgroup created below a tenant's after the
 * controller's last scan is still that tenant's. Tenants matched by source CIDR
 * are not judged here: an unbound socket has no source address yet (their
 * hellos are judged in TC egress).
 *
 * The event and key layouts live here, not in lt_types.h: this object shares
 * no map with the TC programs and is loaded only when a tenant enforces.
 */
#include <uapi/linux/bpf.h>
#include <linux/in.h>
#include <linux/socket.h>

#ifndef LT_CG_RINGBUF_PAGES
#define LT_CG_RINGBUF_PAGES 16 /* 64 KB: refused connects are rare and small */
#endif
/* cgroup nesting levels searched for a mapped ancestor (systemd: slice/scope) */
#define LT_CG_DEPTH 16
/* sizing: one entry per tenant cgroup, uid, and refused address per tenant */
#define LT_CG_TENANTS_MAX 16384
#define LT_UID_TENANTS_MAX 4096
#define LT_REFUSED_MAX 65536

enum lt_enforce_mode {
	LT_ENFORCE_MONITOR = 0,
	LT_ENFORCE_DRY_RUN = 1,
	LT_ENFORCE_BLOCK = 2,
};

enum lt_cg_loss {
	LT_CG_LOSS_RINGBUF_FULL = 0, /* a decision not reported (still enforced) */
	LT_CG_LOSS_MAX,
};

struct lt_cg_tenant {
	__u32 tenant; /* index + 1 in the config's tenant list; 0: none */
	__u32 mode;   /* enum lt_enforce_mode */
};

struct lt_refused_key {
	__u32 tenant;
	__u32 family; /* AF_INET | AF_INET6 */
	__u8 addr[16]; /* IPv4 in the first 4 bytes, network order */
};

struct lt_cg_event {
	__u64 ts_ns;
	__u64 cgroup_id;
	__u64 pid_tgid;
	__u32 uid;
	__u32 tenant;
	__u32 mode;   /* the tenant's mode: block refused it, dry-run let it through */
	__u32 family;
	__u32 proto;
	__u32 dport;  /* host order */
	__u32 rule;   /* lt_refused value */
	__u32 pad;
	__u8 daddr[16];
};

BPF_HASH(lt_cg_tenant, __u64, struct lt_cg_tenant, LT_CG_TENANTS_MAX);
BPF_HASH(lt_uid_tenant, __u32, struct lt_cg_tenant, LT_UID_TENANTS_MAX);
BPF_HASH(lt_refused, struct lt_refused_key, __u32, LT_REFUSED_MAX);
BPF_PERCPU_ARRAY(lt_cg_lost, __u64, LT_CG_LOSS_MAX);
/* never written: declares struct lt_cg_event to user space (a map type description) */
BPF_PERCPU_ARRAY(lt_cg_scratch, struct lt_cg_event, 1);
BPF_RINGBUF_OUTPUT(lt_cg_events, LT_CG_RINGBUF_PAGES);

/* The tenant of the current task: deepest mapped cgroup, else its uid. */
static __always_inline struct lt_cg_tenant *cg_current_tenant(void)
{
	struct lt_cg_tenant *found = NULL;
	#pragma unroll
	for (int level = 0; level < LT_CG_DEPTH; level++) {
		__u64 id = bpf_get_current_ancestor_cgroup_id(level);
		if (id == 0)
			break; /* deeper than the task's own cgroup */
		struct lt_cg_tenant *t = lt_cg_tenant.lookup(&id);
		if (t)
			found = t;
	}
	/* tenant 0: a cgroup no glob claims; the uid rules come next, as in user space */
	if (found && found->tenant != 0)
		return found;
	__u32 uid = (__u32)bpf_get_current_uid_gid();
	return lt_uid_tenant.lookup(&uid);
}

/*
 * cg_judge - refuse or record a connect to a refused address.
 * @key: tenant 0, family and address filled by the caller
 * @dport: destination port, host order
 * Returns 1 (allow) or 0 (EPERM to the caller of connect()).
 */
static __always_inline int cg_judge(struct bpf_sock_addr *ctx, struct lt_refused_key *key,
				    __u32 dport)
{
	struct lt_cg_tenant *t = cg_current_tenant();
	if (!t || t->tenant == 0 || t->mode == LT_ENFORCE_MONITOR)
		return 1;
	key->tenant = t->tenant;
	__u32 *rule = lt_refused.lookup(key);
	if (!rule)
		return 1;
	__u32 mode = t->mode;
	struct lt_cg_event *e = lt_cg_events.ringbuf_reserve(sizeof(*e));
	if (!e) {
		__u32 reason = LT_CG_LOSS_RINGBUF_FULL;
		__u64 *lost = lt_cg_lost.lookup(&reason);
		if (lost)
			*lost += 1; /* per-CPU: no atomic needed */
	} else {
		e->ts_ns = bpf_ktime_get_ns();
		e->cgroup_id = bpf_get_current_cgroup_id();
		e->pid_tgid = bpf_get_current_pid_tgid();
		e->uid = (__u32)bpf_get_current_uid_gid();
		e->tenant = t->tenant;
		e->mode = mode;
		e->family = key->family;
		e->proto = ctx->protocol;
		e->dport = dport;
		e->rule = *rule;
		e->pad = 0;
		__builtin_memcpy(e->daddr, key->addr, sizeof(e->daddr));
		lt_cg_events.ringbuf_submit(e, 0);
	}
	return mode == LT_ENFORCE_BLOCK ? 0 : 1;
}

int lt_cg_connect4(struct bpf_sock_addr *ctx)
{
	struct lt_refused_key key = {};
	key.family = AF_INET;
	__u32 ip = ctx->user_ip4;
	__builtin_memcpy(key.addr, &ip, 4);
	return cg_judge(ctx, &key, bpf_ntohs((__u16)ctx->user_port));
}

int lt_cg_connect6(struct bpf_sock_addr *ctx)
{
	struct lt_refused_key key = {};
	key.family = AF_INET6;
	__u32 w0 = ctx->user_ip6[0], w1 = ctx->user_ip6[1];
	__u32 w2 = ctx->user_ip6[2], w3 = ctx->user_ip6[3];
	__builtin_memcpy(key.addr, &w0, 4);
	__builtin_memcpy(key.addr + 4, &w1, 4);
	__builtin_memcpy(key.addr + 8, &w2, 4);
	__builtin_memcpy(key.addr + 12, &w3, 4);
	return cg_judge(ctx, &key, bpf_ntohs((__u16)ctx->user_port));
}
