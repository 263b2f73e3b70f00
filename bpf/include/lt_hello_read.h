/* SPDX-License-Identifier: GPL-2.0 OR Apache-2.0 */
/*
 * lt_hello_read.h - the tail program's work: read a hello's server name
 * (lt_sni.h), leave it for the controller's batch drain (lt_names), and
 * judge it (lt_enforce.h).
 *
 * The reading and the verdict live in their own program, tail-called from
 * TC egress on a hello packet only: the parser's loops would not fit in the
 * egress program's instruction budget (4096 where the loader lacks
 * CAP_BPF in the initial user namespace), and data packets never load it.
 * The egress program leaves its job in lt_sni_scratch.job (same CPU).
 */
#ifndef __LT_HELLO_READ_H
#define __LT_HELLO_READ_H

#include "lt_flow.h"

/**
 * hello_name_record - leave the kernel's reading of a hello for the
 * controller's batch drain (lt_names)
 */
static __always_inline int hello_name_record(struct lt_pkt *p, struct lt_sni_scratch *s,
					     int outcome, __u32 seq, __u32 uid, __u32 ifindex)
{
	struct lt_name_rec *r = &s->rec;

	r->ts_ns = bpf_ktime_get_ns();
	r->uid = uid;
	r->ifindex = ifindex;
	r->seq = seq;
	r->name_len = s->name_len;
	r->outcome = outcome;
	r->ech = s->ech;
	__builtin_memcpy(r->name, s->akey.name, LT_NAME_MAX);
	if (lt_names.update(&p->key, r)) {
		stat_inc(LT_SNI_GIVEUP_NAMES_FULL);
		return -1;
	}
	return 0;
}

/**
 * hello_to_ring - send the single-segment hello of a job to the ring, for
 * user space to name: the egress program left it out (LT_RING_NAMED 0) and
 * the kernel did not name it, or its name found no room in lt_names
 */
static __always_inline void hello_to_ring(LT_CTX *ctx, struct lt_pkt *p, struct lt_hello_job *j)
{
	if (LT_RING_NAMED || j->kind != LT_JOB_WHOLE)
		return; /* captured by the egress program */
	stat_inc(LT_CNT_SNI_TO_RING);
	emit_payload(ctx, p, LT_EV_TLS_HELLO, 0, TLS_REC_HDR_LEN + j->arg, LT_SNAP,
		     LT_HELLO_CHUNKS, j->uid, j->ifindex);
}

/* indexes of lt_progs */
#define LT_PROG_HELLO 0
#define LT_PROG_NAME 1

/**
 * hello_job_pkt - the packet the egress program left in @j, as a parsed packet
 */
static __always_inline void hello_job_pkt(struct lt_hello_job *j, struct lt_pkt *p)
{
	__builtin_memcpy(&p->key, &j->key, sizeof(p->key));
	p->payload_off = j->payload_off;
	p->payload_len = j->payload_len;
	p->seq = j->seq;
	p->tcp_flags = j->tcp_flags;
}

/**
 * hello_unread_to_ring - a tail call failed: the job's hello still goes to
 * the ring (its failure is counted by the caller as LT_LOSS_SNI_TAIL)
 */
static __always_inline void hello_unread_to_ring(LT_CTX *ctx)
{
	__u32 zero = 0;
	struct lt_sni_scratch *s = lt_sni_scratch.lookup(&zero);

	if (!s)
		return;
	struct lt_pkt p = {};
	hello_job_pkt(&s->job, &p);
	hello_to_ring(ctx, &p, &s->job);
}

/**
 * hello_message - the handshake message a job reads (scratch or lt_hello_bufs)
 * and its length in *@n; NULL when it is gone
 */
static __always_inline __u8 *hello_message(struct lt_sni_scratch *s, struct lt_pkt *p, __u32 *n)
{
	if (s->job.kind != LT_JOB_BUFFERED) {
		*n = s->job.arg;
		return s->buf.msg;
	}
	struct lt_hello_buf *b = lt_hello_bufs.lookup(&p->key);
	if (!b)
		return NULL;
	*n = b->msg_len;
	return b->msg;
}

/**
 * hello_read_job - first tail program: load and walk the hello of the job
 * the egress program left, up to its server_name entry; the second one
 * (hello_name_job) takes the name and judges
 * Returns LT_DROP or LT_PASS when it gives the verdict itself, else LT_READ
 * (tail-call LT_PROG_NAME).
 */
static __always_inline int hello_read_job(LT_CTX *ctx)
{
	__u32 zero = 0, n = 0;
	struct lt_sni_scratch *s = lt_sni_scratch.lookup(&zero);

	if (!s)
		return LT_PASS;
	struct lt_pkt p = {};
	hello_job_pkt(&s->job, &p);
	__u32 uid = s->job.uid, ifindex = s->job.ifindex, kind = s->job.kind;

	if (kind == LT_JOB_NAMELESS)
		return enf_nameless(ctx, &p, s->job.arg, uid, ifindex);
	if (kind == LT_JOB_WHOLE) {
		if (s->job.arg > LT_HELLO_BUF) {
			stat_inc(LT_SNI_GIVEUP_TOO_LONG);
			hello_to_ring(ctx, &p, &s->job);
			return enf_nameless(ctx, &p, LT_RSN_ADDRESS, uid, ifindex);
		}
		if (sni_load(ctx, p.payload_off + TLS_REC_HDR_LEN, s->buf.msg, 0, s->job.arg)) {
			hello_to_ring(ctx, &p, &s->job);
			return enf_nameless(ctx, &p, LT_RSN_ADDRESS, uid, ifindex);
		}
	}
	__u8 *m = hello_message(s, &p, &n);
	if (!m) {
		stat_inc(LT_SNI_GIVEUP_GAP);
		return enf_nameless(ctx, &p, LT_RSN_ADDRESS, uid, ifindex);
	}
	s->outcome = sni_parse(m, n, s);
	return LT_READ;
}

/**
 * hello_name_job - second tail program: check and copy the name, leave it
 * for the controller's batch drain, judge the hello
 * Returns LT_DROP or LT_PASS.
 */
static __always_inline int hello_name_job(LT_CTX *ctx)
{
	__u32 zero = 0, n = 0;
	struct lt_sni_scratch *s = lt_sni_scratch.lookup(&zero);

	if (!s)
		return LT_PASS;
	struct lt_pkt p = {};
	hello_job_pkt(&s->job, &p);
	__u32 uid = s->job.uid, ifindex = s->job.ifindex;
	int outcome = s->outcome;
	__u8 *m = hello_message(s, &p, &n);

	if (outcome == LT_SNI_NAMED) {
		if (m)
			outcome = sni_take_name(m, s->name_off, s->name_raw, s);
		else
			outcome = LT_SNI_LIMIT; /* the buffer went away in between */
	}
	if (outcome != LT_SNI_NAMED) {
		__builtin_memset(s->akey.name, 0, LT_NAME_MAX);
		s->name_len = 0;
	}
	if (m && s->job.kind == LT_JOB_BUFFERED)
		lt_hello_bufs.delete(&p.key);
	sni_count(outcome);
	/* user space names what the kernel did not (an invalid name is still
	 * reported as sent), and a name lt_names had no room for */
	if (hello_name_record(&p, s, outcome, s->job.seq, uid, ifindex) || outcome != LT_SNI_NAMED)
		hello_to_ring(ctx, &p, &s->job);
	return enf_hello(ctx, &p, s, outcome, uid, ifindex);
}

#endif /* __LT_HELLO_READ_H */
