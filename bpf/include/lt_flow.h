/* SPDX-License-Identifier: GPL-2.0 OR Apache-2.0 */
/*
 * lt_flow.h - the shared data path: totals, per-flow counters and sampling of
 * the rare bytes worth parsing (TLS ClientHello, QUIC Initial, DNS queries
 * and answers).
 *
 * The including program defines, before including this file:
 *   LT_CTX                     its context type (struct __sk_buff, struct xdp_md)
 *   LT_LOAD_BYTES(ctx, o, b, n) the load helper for its context
 *   LT_SOCKET_UID(ctx)         owner uid of the packet's socket, or ~0
 *   LT_PULL_HEADERS(ctx, len, &data, &data_end)  make up to LT_PULL_LEN header
 *                              bytes linear and reload the pointers; 0 on success
 *
 * Overhead: a data packet of an established flow costs three array lookups
 * (totals, the front cache entry and its bank, lt_fcache.h) and a key compare;
 * other packets one LRU hash lookup and (egress) one per-cgroup hash lookup
 * more (enf_blocked adds one array lookup, lt_enforce.h). Payload bytes are
 * touched only for the first LT_PROBE_SEGS payload packets of a flow entry,
 * while a multi-segment hello is being followed, and for port-53 messages.
 */
#ifndef __LT_FLOW_H
#define __LT_FLOW_H

#include "lt_loss.h"
#include "lt_parse.h"

/* TLS record header + handshake header of a ClientHello:
 *   0      1      2      3      4      5      6      7      8
 * +------+------+------+------+------+------+------+------+------+
 * | 0x16 | 0x03 | minor| record length| 0x01 | handshake length   |
 * +------+------+------+------+------+------+------+------+------+ */
#define TLS_REC_HDR_LEN 5
#define TLS_HELLO_HDR_LEN 9
#define TLS_HS_HDR_LEN 4
#define TLS_CT_HANDSHAKE 0x16
#define TLS_HS_CLIENT_HELLO 0x01
/* QUIC long header: first byte 1F......, then a 32-bit version (RFC 8999) */
#define QUIC_LONG_FORM 0xC0
#define QUIC_V1 0x00000001
#define QUIC_V2 0x6b3343cf
#define DNS_PORT 53
/* 1: sample DNS in both directions (one hook sees both: XDP, replay) */
#ifndef LT_DNS_BOTH_WAYS
#define LT_DNS_BOTH_WAYS 0
#endif

#include "lt_enforce.h"

/* Sequence comparisons modulo 2^32 (RFC 1982) */
static __always_inline int seq_before(__u32 a, __u32 b)
{
	return (__s32)(a - b) < 0;
}

/**
 * volume_add - add one skb to a volume counter
 */
static __always_inline void volume_add(struct lt_volume *v, __u32 len, __u32 segs)
{
	v->bytes += len;
	v->packets += segs;
}

/**
 * totals_account - count every packet, parsed or not, by direction. With the
 * per-cgroup totals (cgroup_account) these never evict, so LRU flow evictions
 * never lose volume: the controller reports totals - attributed as unattributed.
 */
static __always_inline void totals_account(__u32 dir, __u32 len, __u32 segs)
{
	struct lt_volume *t = lt_totals.lookup(&dir);

	if (t)
		volume_add(t, len, segs);
}

/**
 * cgroup_account - add egress volume to its cgroup's total (lt_cgtot)
 */
static __always_inline void cgroup_account(__u64 cgroup_id, __u64 bytes, __u64 packets)
{
	struct lt_volume *c = lt_cgtot.lookup(&cgroup_id);

	if (c) {
		c->bytes += bytes;
		c->packets += packets;
		return;
	}
	struct lt_volume init = { .bytes = bytes, .packets = packets };
	if (lt_cgtot.insert(&cgroup_id, &init)) {
		/* -EEXIST: another CPU raced us; this CPU's slot is ours to set */
		c = lt_cgtot.lookup(&cgroup_id);
		if (c) {
			c->bytes += bytes;
			c->packets += packets;
		} else {
			stat_inc(LT_LOSS_CGROUP_FULL);
		}
	}
}

/**
 * flow_account - add one skb to its flow entry, creating it if needed
 * Returns the entry (this CPU's slot) or NULL when the insert failed.
 */
static __always_inline struct lt_flow_val *flow_account(LT_CTX *ctx, struct lt_pkt *p, __u32 len,
							__u32 segs)
{
	struct lt_flow_val *v = lt_flows.lookup(&p->key);

	if (!v) {
		struct lt_flow_val init = {};
		/* BPF_NOEXIST: a concurrent insert by another CPU must not be overwritten */
		lt_flows.insert(&p->key, &init);
		v = lt_flows.lookup(&p->key);
		if (!v) {
			stat_inc(LT_LOSS_FLOW_INSERT);
			return NULL;
		}
		stat_inc(LT_CNT_FLOW_NEW);
	}
	/* An insert fills only the inserting CPU's slot; every other CPU's slot
	 * starts zeroed, so each slot is stamped by its own first packet. The
	 * owner is read on egress only: an ingress skb may still carry the sending
	 * socket of a local peer (veth across namespaces keeps skb->sk). */
	if (!v->first_seen_ns) {
		v->first_seen_ns = bpf_ktime_get_ns();
		v->last_seen_ns = v->first_seen_ns;
		v->uid = p->key.dir == LT_DIR_EGRESS ? LT_SOCKET_UID(ctx) : LT_NO_UID;
	}
	v->tx_bytes += len;
	v->tx_packets += segs;
#if LT_DEDUP
	v->last_sig = p->sig;
#endif
	__u8 f = p->tcp_flags;
	if (p->key.proto == IPPROTO_TCP && f) {
		if ((f & (LT_TCP_SYN | LT_TCP_ACK)) == LT_TCP_SYN)
			v->flags |= LT_FF_SYN;
		else if ((f & (LT_TCP_SYN | LT_TCP_ACK)) == (LT_TCP_SYN | LT_TCP_ACK))
			v->flags |= LT_FF_SYNACK;
		if (f & LT_TCP_FIN)
			v->flags |= LT_FF_FIN;
		if (f & LT_TCP_RST)
			v->flags |= LT_FF_RST;
	}
	return v;
}

#include "lt_fcache.h"

/**
 * emit_payload - send payload bytes [@start, @end) to user space as events of
 * at most @snap bytes, up to @chunks events
 * @kind: enum lt_event_kind; @uid: socket owner
 * Returns the offset one past the last byte sent.
 */
static __always_inline __u32 emit_payload(LT_CTX *ctx, struct lt_pkt *p, __u32 kind, __u32 start,
					  __u32 end, __u32 snap, __u32 chunks, __u32 uid,
					  __u32 ifindex)
{
	__u32 zero = 0;

	for (__u32 i = 0; i < chunks && i < LT_HELLO_CHUNKS; i++) {
		if (start >= end)
			break;
		if (!event_allowed())
			return start;
		struct lt_event *ev = lt_scratch.lookup(&zero);
		if (!ev)
			return start;
		__u32 n = end - start;
		if (n > snap)
			n = snap;
		/* n is in [1, snap] here, but clang drops checks it can prove, so
		 * hide n from it and restate the range in a form the verifier
		 * tracks: ((n - 1) & (LT_SNAP - 1)) + 1 is in [1, LT_SNAP]. */
		asm volatile("" : "+r"(n));
		n = ((n - 1) & (LT_SNAP - 1)) + 1;
		ev->ts_ns = bpf_ktime_get_ns();
		ev->cgroup_id = p->key.cgroup_id;
		ev->kind = kind;
		ev->ifindex = ifindex;
		__builtin_memcpy(ev->saddr, p->key.saddr, 16);
		__builtin_memcpy(ev->daddr, p->key.daddr, 16);
		ev->sport = p->key.sport;
		ev->dport = p->key.dport;
		ev->family = p->key.family;
		ev->proto = p->key.proto;
		ev->dir = p->key.dir;
		ev->tcp_flags = p->tcp_flags;
		ev->seq = p->seq + start;
		ev->uid = uid;
		ev->payload_len = p->payload_len;
		ev->payload_off = start;
		ev->cap_len = n;
		/* a failed chunk is counted and the next one still tried, so
		 * every event not delivered has its own count */
		if (LT_LOAD_BYTES(ctx, p->payload_off + start, ev->payload, n))
			stat_inc(LT_LOSS_LOAD_BYTES);
		else if (lt_events.ringbuf_output(ev, LT_EVENT_HDR_SIZE + n, 0))
			stat_inc(LT_LOSS_RINGBUF_FULL);
		else
			stat_inc(kind == LT_EV_DNS ? LT_CNT_EV_DNS :
				 kind == LT_EV_QUIC_INITIAL ? LT_CNT_EV_QUIC : LT_CNT_EV_HELLO);
		start += n;
	}
	if (start < end)
		stat_inc(LT_LOSS_TRUNCATED);
	return start;
}

/**
 * hello_walk_fail - the walked bytes are not (or no longer) a ClientHello
 * Returns 1 when no handshake header was read yet: not a hello at all, so the
 * caller drops it; else the message ended before this record: end it here.
 */
static __always_inline int hello_walk_fail(struct lt_hello_state *st, __u32 rec_start)
{
	if (st->hs_got < TLS_HS_HDR_LEN)
		return 1;
	st->end_seq = rec_start;
	st->walk = LT_HW_END;
	return 0;
}

/**
 * hello_walk_byte - walk one byte of a record header or of the handshake
 * header, checking it against the layout drawn above
 * Returns 1 when the byte cannot be part of a ClientHello.
 */
static __always_inline int hello_walk_byte(struct lt_hello_state *st, __u8 b)
{
	if (st->hdr_got < TLS_REC_HDR_LEN) {
		__u8 i = st->hdr_got++;
		if (i == 0)
			return b != TLS_CT_HANDSHAKE;
		if (i == 1)
			return b != 3;
		if (i == 2)
			return b > 4;
		st->rec_left = (st->rec_left << 8) | b;
		return 0;
	}
	st->rec_left--;
	if (st->hs_got++ == 0)
		return b != TLS_HS_CLIENT_HELLO;
	st->msg_left = (st->msg_left << 8) | b;
	return 0;
}

/**
 * hello_walk - walk the TLS record headers and the handshake header that lie
 * in this segment, fixing @st->end_seq once the handshake message is covered
 *
 * A step reads a whole 5-byte record header or 4-byte handshake header when
 * the segment and record hold it, else one byte of it (so a hello cut after
 * any byte, or a handshake header spread over records, is still read); a
 * record body past the handshake header is skipped without reading it.
 * Returns 1 when the bytes are not a ClientHello (nothing to capture).
 */
static __always_inline int hello_walk(LT_CTX *ctx, struct lt_pkt *p, struct lt_hello_state *st)
{
	if (st->walk == LT_HW_FOLLOW && seq_before(p->seq, st->walk_seq) == 0 &&
	    st->walk_seq != p->seq) {
		/* bytes between the walk and this segment were never seen */
		stat_inc(LT_LOSS_HELLO_GAP);
		st->walk = LT_HW_BLIND;
	}
	for (int i = 0; i < LT_HELLO_WALK_STEPS; i++) {
		if (st->walk != LT_HW_FOLLOW)
			return 0;
		__u32 rec_start = st->walk_seq - st->hdr_got;
		if (st->hdr_got == TLS_REC_HDR_LEN &&
		    (st->hs_got == TLS_HS_HDR_LEN || st->rec_left == 0)) {
			/* the rest of this record's body needs no reading */
			if (st->hs_got == TLS_HS_HDR_LEN) {
				if (st->msg_left <= st->rec_left) {
					st->end_seq = st->walk_seq + st->msg_left;
					st->walk = LT_HW_END;
					return 0;
				}
				st->msg_left -= st->rec_left;
			}
			st->walk_seq += st->rec_left;
			st->rec_left = 0;
			st->hdr_got = 0;
			continue;
		}
		__u32 off = st->walk_seq - p->seq;
		if (off >= p->payload_len)
			return 0; /* the next byte is in the next segment */
		__u32 avail = p->payload_len - off;
		__u8 h[TLS_REC_HDR_LEN] = {};
		if (st->hdr_got == 0 && avail >= TLS_REC_HDR_LEN) {
			if (LT_LOAD_BYTES(ctx, p->payload_off + off, h, TLS_REC_HDR_LEN))
				goto load_failed;
			if (h[0] != TLS_CT_HANDSHAKE || h[1] != 3 || h[2] > 4)
				return hello_walk_fail(st, rec_start);
			st->rec_left = ((__u32)h[3] << 8) | h[4];
			st->hdr_got = TLS_REC_HDR_LEN;
			st->walk_seq += TLS_REC_HDR_LEN;
		} else if (st->hdr_got == TLS_REC_HDR_LEN && st->hs_got == 0 &&
			   st->rec_left >= TLS_HS_HDR_LEN && avail >= TLS_HS_HDR_LEN) {
			if (LT_LOAD_BYTES(ctx, p->payload_off + off, h, TLS_HS_HDR_LEN))
				goto load_failed;
			if (h[0] != TLS_HS_CLIENT_HELLO)
				return hello_walk_fail(st, rec_start);
			st->msg_left = ((__u32)h[1] << 16) | ((__u32)h[2] << 8) | h[3];
			st->hs_got = TLS_HS_HDR_LEN;
			st->rec_left -= TLS_HS_HDR_LEN;
			st->walk_seq += TLS_HS_HDR_LEN;
		} else {
			if (LT_LOAD_BYTES(ctx, p->payload_off + off, h, 1))
				goto load_failed;
			st->walk_seq++;
			if (hello_walk_byte(st, h[0]))
				return hello_walk_fail(st, rec_start);
		}
		if (st->hdr_got == TLS_REC_HDR_LEN && st->walk_seq == rec_start + TLS_REC_HDR_LEN &&
		    (st->rec_left == 0 || st->rec_left > LT_TLS_REC_MAX))
			return hello_walk_fail(st, rec_start); /* empty or oversized record */
		if (st->hs_got == TLS_HS_HDR_LEN && st->msg_left + TLS_HS_HDR_LEN > LT_HELLO_MAX_BYTES)
			return hello_walk_fail(st, rec_start);
	}
	/* budget spent with bytes of this segment still unread */
	if (st->walk == LT_HW_FOLLOW && seq_before(st->walk_seq, p->seq + p->payload_len)) {
		stat_inc(LT_LOSS_HELLO_WALK);
		st->walk = LT_HW_BLIND;
	}
	return 0;
load_failed:
	stat_inc(LT_LOSS_LOAD_BYTES);
	st->walk = LT_HW_BLIND;
	return 0;
}

/**
 * hello_capture - capture the hello bytes of this segment and note progress
 */
static __always_inline void hello_capture(LT_CTX *ctx, struct lt_pkt *p, struct lt_hello_state *st,
					  __u32 uid, __u32 ifindex)
{
	__u32 n = st->end_seq - p->seq;

	if (n > p->payload_len)
		n = p->payload_len;
	emit_payload(ctx, p, LT_EV_TLS_HELLO, 0, n, LT_SNAP, LT_HELLO_CHUNKS, uid, ifindex);
	if (seq_before(st->next_seq, p->seq + n))
		st->next_seq = p->seq + n;
	st->segs++;
}

/* lt_handle's verdict: pass, drop, or read the hello's name in the tail
 * program (lt_hello_read.h; TC egress), which gives the final verdict */
#define LT_PASS 0
#define LT_DROP 1
#define LT_READ 2
/* 1: read server names in the kernel (the includer has the tail program) */
#ifndef LT_READ_NAMES
#define LT_READ_NAMES 0
#endif
/* 1: the ring also carries the single-segment hellos the kernel names (the
 * path before issue 12's naming at line rate; benchmarks compare the two).
 * 0: such a hello reaches user space only as its lt_names record; the tail
 * program sends it to the ring when it is not named there. */
#ifndef LT_RING_NAMED
#define LT_RING_NAMED 0
#endif

/**
 * hello_job - leave the tail program a job about this packet (per-CPU)
 * @kind: enum lt_hello_job_kind; @arg: message length (LT_JOB_WHOLE) or
 * reason (LT_JOB_NAMELESS); @seq: the hello's first sequence
 * Returns LT_READ, or LT_PASS when there is no scratch.
 */
static __always_inline int hello_job(struct lt_pkt *p, __u32 kind, __u32 arg, __u32 seq,
				     __u32 uid, __u32 ifindex)
{
	__u32 zero = 0;
	struct lt_sni_scratch *s = lt_sni_scratch.lookup(&zero);

	if (!LT_READ_NAMES || !s)
		return LT_PASS;
	struct lt_hello_job *j = &s->job;
	__builtin_memcpy(&j->key, &p->key, sizeof(j->key));
	j->kind = kind;
	j->arg = arg;
	j->payload_off = p->payload_off;
	j->payload_len = p->payload_len;
	j->seq = seq;
	j->uid = uid;
	j->ifindex = ifindex;
	j->tcp_flags = p->tcp_flags;
	return LT_READ;
}

/**
 * hello_buf_start - the first segment of a hello longer than its segment:
 * buffer its handshake message when the kernel can read it (one record of
 * at most LT_HELLO_BUF bytes); @start, @rec, @msg as in tls_probe
 * Returns the enum lt_hello_sni state of the follow.
 */
static __always_inline __u8 hello_buf_start(LT_CTX *ctx, struct lt_pkt *p, int start, __u32 rec,
					    __u32 msg)
{
	__u32 zero = 0;

	if (!LT_READ_NAMES || start != 2)
		return LT_HS_SNI_NONE; /* a cut header: maybe no hello at all, see tls_probe */
	if (msg > rec) {
		stat_inc(LT_SNI_GIVEUP_RECORDS); /* the message continues in another record */
		return LT_HS_SNI_GAVE_UP;
	}
	if (msg > LT_HELLO_BUF) {
		stat_inc(LT_SNI_GIVEUP_TOO_LONG);
		return LT_HS_SNI_GAVE_UP;
	}
	struct lt_sni_scratch *s = lt_sni_scratch.lookup(&zero);
	if (!s)
		return LT_HS_SNI_GAVE_UP;
	__u32 n = p->payload_len - TLS_REC_HDR_LEN;
	if (n > msg)
		n = msg;
	s->buf.msg_len = msg;
	s->buf.got = n;
	if (sni_load(ctx, p->payload_off + TLS_REC_HDR_LEN, s->buf.msg, 0, n))
		return LT_HS_SNI_GAVE_UP;
	if (lt_hello_bufs.update(&p->key, &s->buf)) {
		stat_inc(LT_SNI_GIVEUP_GAP);
		return LT_HS_SNI_GAVE_UP;
	}
	return LT_HS_SNI_BUFFERING;
}

/**
 * hello_buf_more - add a continuation segment to a buffered hello
 * Returns LT_READ on the segment that completes it (or that loses it: then
 * judged by address), else LT_PASS.
 */
static __always_inline int hello_buf_more(LT_CTX *ctx, struct lt_pkt *p, struct lt_hello_state *st,
					  __u32 uid, __u32 ifindex)
{
	struct lt_hello_buf *b = lt_hello_bufs.lookup(&p->key);

	if (!b) {
		stat_inc(LT_SNI_GIVEUP_GAP); /* another CPU finished or restarted it */
		st->sni = LT_HS_SNI_GAVE_UP;
		return LT_PASS;
	}
	__u32 rel = p->seq - st->start_seq; /* stream offset of payload[0] in the hello */
	__u32 want = TLS_REC_HDR_LEN + b->got;
	__u32 end = TLS_REC_HDR_LEN + b->msg_len;
	__u32 seg_end = rel + p->payload_len;
	if (seg_end > end)
		seg_end = end;
	if (seg_end <= want)
		return LT_PASS; /* bytes already buffered (a retransmission) */
	if (want < rel || sni_load(ctx, p->payload_off + (want - rel), b->msg, b->got,
				   seg_end - want)) {
		if (want < rel)
			stat_inc(LT_SNI_GIVEUP_GAP);
		lt_hello_bufs.delete(&p->key);
		st->sni = LT_HS_SNI_DONE; /* judged by address below: once */
		return hello_job(p, LT_JOB_NAMELESS, LT_RSN_ADDRESS, st->start_seq, uid, ifindex);
	}
	b->got += seg_end - want;
	if (b->got < b->msg_len)
		return LT_PASS;
	st->sni = LT_HS_SNI_DONE; /* the tail program reads and deletes the buffer */
	return hello_job(p, LT_JOB_BUFFERED, 0, st->start_seq, uid, ifindex);
}

/**
 * hello_start - does this segment open a ClientHello?
 * Returns 2 for a whole hello header in one record (@h filled), 1 for a
 * segment that only may open one (its first byte is a handshake record's:
 * a cut header or a handshake header split over records), 0 otherwise.
 */
static __always_inline int hello_start(LT_CTX *ctx, struct lt_pkt *p, __u8 *h)
{
	if (p->payload_len < TLS_HELLO_HDR_LEN)
		return LT_LOAD_BYTES(ctx, p->payload_off, h, 1) == 0 && h[0] == TLS_CT_HANDSHAKE;
	if (LT_LOAD_BYTES(ctx, p->payload_off, h, TLS_HELLO_HDR_LEN) || h[0] != TLS_CT_HANDSHAKE ||
	    h[1] != 3 || h[2] > 4 || h[5] != TLS_HS_CLIENT_HELLO)
		return 0;
	return (((__u32)h[3] << 8) | h[4]) >= 4 ? 2 : 1;
}

/**
 * tls_probe - capture a ClientHello start (detected by content, any port)
 * and, for a hello longer than this segment, follow its continuation
 * segments until the handshake message is complete
 */
static __always_inline int tls_probe(LT_CTX *ctx, struct lt_pkt *p, struct lt_flow_val *v,
				     __u32 ifindex)
{
	int verdict = LT_PASS;

	__u8 h[TLS_HELLO_HDR_LEN] = {};
	int start = hello_start(ctx, p, h);
	__u32 rec = ((__u32)h[3] << 8) | h[4];
	__u32 msg = (((__u32)h[6] << 16) | ((__u32)h[7] << 8) | h[8]) + TLS_HS_HDR_LEN;
	/* nearly every client: the whole hello in its first record and segment */
	int whole = start == 2 && msg <= rec && TLS_REC_HDR_LEN + msg <= p->payload_len;
	struct lt_hello_state *st = NULL;

	/* A followed hello's own segment may open like a hello (a record boundary
	 * before a 0x01 byte): inside it only its first segment restarts it. A
	 * whole hello looks only if this flow slot saw a start before (the lookup
	 * is most of a new TLS flow's cost; a continuation missed so, on another
	 * CPU, is still captured: its hello counts a gap and is followed blind). */
	if (!whole || (v->flags & LT_FF_HELLO))
		st = lt_hello.lookup(&p->key);
	if (st && !seq_before(p->seq, st->start_seq) && seq_before(p->seq, st->end_seq) &&
	    p->seq != st->start_seq)
		start = whole = 0;
	if (start) {
		struct lt_hello_state init = {
			.created_ns = bpf_ktime_get_ns(),
			.start_seq = p->seq,
			.next_seq = p->seq,
			.end_seq = p->seq + LT_HELLO_MAX_BYTES,
			.walk_seq = p->seq,
		};
		v->flags |= LT_FF_HELLO;
		if (start == 2 && msg <= rec) {
			init.end_seq = p->seq + TLS_REC_HDR_LEN + msg;
			init.walk = LT_HW_END;
			if (whole && !LT_RING_NAMED) {
				/* the tail program names it, or sends it to the ring */
				if (st)
					lt_hello.delete(&p->key);
				if (hello_job(p, LT_JOB_WHOLE, msg, p->seq, v->uid, ifindex) == LT_READ)
					return LT_READ;
			}
			hello_capture(ctx, p, &init, v->uid, ifindex);
			if (whole) {
				if (st)
					lt_hello.delete(&p->key);
				return hello_job(p, LT_JOB_WHOLE, msg, p->seq, v->uid, ifindex);
			}
		}
		init.sni = hello_buf_start(ctx, p, start, rec, msg);
		/* BPF_ANY: a retransmitted first segment restarts the follow */
		if (lt_hello.update(&p->key, &init)) {
			stat_inc(LT_LOSS_HELLO_PENDING);
			if (init.walk != LT_HW_END) /* not captured yet: at least this segment */
				emit_payload(ctx, p, LT_EV_TLS_HELLO, 0, p->payload_len, LT_SNAP,
					     LT_HELLO_CHUNKS, v->uid, ifindex);
			if (init.sni == LT_HS_SNI_BUFFERING)
				lt_hello_bufs.delete(&p->key);
			return 0;
		}
		if (init.walk == LT_HW_END)
			return 0; /* captured (and buffered, for the kernel's reading) */
		st = lt_hello.lookup(&p->key);
	} else if (st && (seq_before(p->seq, st->start_seq) || !seq_before(p->seq, st->end_seq))) {
		return 0; /* before the hello (plaintext) or after it */
	}
	if (!st)
		return 0;
	if (hello_walk(ctx, p, st)) {
		if (st->sni == LT_HS_SNI_BUFFERING)
			lt_hello_bufs.delete(&p->key);
		lt_hello.delete(&p->key); /* not a ClientHello after all */
		return 0;
	}
	if (seq_before(p->seq, st->end_seq)) {
		if (st->sni == LT_HS_SNI_BUFFERING)
			verdict = hello_buf_more(ctx, p, st, v->uid, ifindex);
		hello_capture(ctx, p, st, v->uid, ifindex);
	}
	if (!seq_before(st->next_seq, st->end_seq) || st->segs >= LT_HELLO_SEGS_MAX) {
		/* a blind follow ends at the bound by design; its give-up is already counted */
		if (seq_before(st->next_seq, st->end_seq) && st->walk != LT_HW_BLIND)
			stat_inc(LT_LOSS_HELLO_SEGS);
		if (st->sni == LT_HS_SNI_BUFFERING) {
			stat_inc(LT_SNI_GIVEUP_GAP);
			lt_hello_bufs.delete(&p->key);
		} else if (LT_READ_NAMES && st->walk == LT_HW_END &&
			   (st->sni == LT_HS_SNI_NONE || st->sni == LT_HS_SNI_GAVE_UP)) {
			if (st->sni == LT_HS_SNI_NONE) /* a hello after all, its header was cut */
				stat_inc(LT_SNI_GIVEUP_RECORDS);
			/* not read in the kernel: an enforcing tenant's is judged by address */
			if (LT_ENFORCE && verdict == LT_PASS)
				verdict = hello_job(p, LT_JOB_NAMELESS, LT_RSN_ADDRESS, st->start_seq,
						    v->uid, ifindex);
		}
		lt_hello.delete(&p->key);
	}
	return verdict;
}

/**
 * quic_probe - capture a datagram that starts with a QUIC long header
 * carrying an Initial packet (v1, v2) or an unknown version
 */
static __always_inline int quic_probe(LT_CTX *ctx, struct lt_pkt *p, struct lt_flow_val *v,
				      __u32 ifindex)
{
	__u8 h[5] = {};

	if (p->payload_len < LT_QUIC_MIN_DATAGRAM || LT_LOAD_BYTES(ctx, p->payload_off, h, sizeof(h)))
		return 0;
	if ((h[0] & QUIC_LONG_FORM) != QUIC_LONG_FORM)
		return 0;
	__u32 version = ((__u32)h[1] << 24) | ((__u32)h[2] << 16) | ((__u32)h[3] << 8) | h[4];
	__u32 type = (h[0] >> 4) & 3;
	if (version == 0 || (version == QUIC_V1 && type != 0) || (version == QUIC_V2 && type != 1))
		return 0;
	emit_payload(ctx, p, LT_EV_QUIC_INITIAL, 0, p->payload_len, LT_SNAP, 1, v->uid, ifindex);
	/* its name is encrypted: a block tenant's Initial to a CRM address is
	 * refused so the client falls back to TCP, where the hello is judged */
	return LT_ENFORCE ? hello_job(p, LT_JOB_NAMELESS, LT_RSN_QUIC, 0, v->uid, ifindex) : LT_PASS;
}

/**
 * dns_sample - send a DNS message to user space if this hook may see it
 *
 * Where the hook knows the direction (TC), only queries leaving (destination
 * port 53) and answers arriving (source port 53) are sampled: an answer
 * leaving the host is a local process (or a local server) speaking, never an
 * answer to this host, so it is only counted; so is a query arriving. Where
 * both directions arrive on one hook (XDP on a gateway or mirror port, and
 * `leaktap replay`), LT_DNS_BOTH_WAYS samples both and user space orients
 * them (a query's source is the client).
 */
static __always_inline void dns_sample(LT_CTX *ctx, struct lt_pkt *p, struct lt_flow_val *v,
				       __u32 dir, __u32 ifindex)
{
	int wanted = dir == LT_DIR_EGRESS ? p->key.dport == DNS_PORT : p->key.sport == DNS_PORT;

	if (!LT_DNS_BOTH_WAYS && !wanted) {
		stat_inc(dir == LT_DIR_EGRESS ? LT_CNT_DNS_ANS_OUT : LT_CNT_DNS_QRY_IN);
		return;
	}
	__u32 end = p->payload_len < LT_DNS_SNAP ? p->payload_len : LT_DNS_SNAP;
	emit_payload(ctx, p, LT_EV_DNS, 0, end, LT_DNS_SNAP, 1, v->uid, ifindex);
	if (p->payload_len > LT_DNS_SNAP)
		stat_inc(LT_LOSS_TRUNCATED);
}

/**
 * lt_handle - account one packet and sample what is worth parsing
 * @dir: enum lt_dir; @probe_tls: look for ClientHello / QUIC Initial starts
 * (off on TC ingress, where hellos are clients of local servers)
 * Returns LT_DROP when enforcement drops the packet (TC egress only),
 * LT_READ when the tail program is to read the hello's name, else LT_PASS.
 */
static __always_inline int lt_handle(LT_CTX *ctx, void *data, void *data_end, __u32 pkt_len,
				      __u32 segs, __u64 cgroup_id, __u32 dir, int probe_tls,
				      __u32 ifindex)
{
	struct lt_pkt p = {};
	int clamped = 0;

	p.key.cgroup_id = cgroup_id;
	p.key.dir = dir;
	int err = pkt_parse(data, data_end, pkt_len, segs > 1, &p, &clamped);
	/* Headers beyond the linear area: make them linear and parse again. Only
	 * then, because a pull on a cloned TCP skb copies its head (~300 ns). */
	if ((err == -LT_PARSE_TRUNC_L2 || err == -LT_PARSE_TRUNC_L3 || err == -LT_PARSE_BAD_L4) &&
	    data_end - data < pkt_len && LT_PULL_HEADERS(ctx, pkt_len, &data, &data_end) == 0) {
		__builtin_memset(&p, 0, sizeof(p));
		p.key.cgroup_id = cgroup_id;
		p.key.dir = dir;
		clamped = 0;
		err = pkt_parse(data, data_end, pkt_len, segs > 1, &p, &clamped);
	}
#if LT_DEDUP
	/* a TAP or SPAN port may deliver the same packet twice: count it once */
	if (!err && p.sig) {
		struct lt_flow_val *last = lt_flows.lookup(&p.key);
		if (last && last->last_sig == p.sig) {
			stat_inc(LT_CNT_DUPLICATE);
			return 0;
		}
	}
#endif
	totals_account(dir, pkt_len, segs);
	if (clamped)
		stat_inc(LT_PARSE_LEN_CLAMPED);
#if LT_FCACHE
	/* an established flow's data packet: counted in its front cache entry */
	struct lt_fcache_ent *fc = err ? NULL : fcache_hit(&p, pkt_len, segs);
	if (fc)
		return dir == LT_DIR_EGRESS && fcache_blocked(fc, &p) ? LT_DROP : LT_PASS;
#endif
	if (dir == LT_DIR_EGRESS)
		cgroup_account(cgroup_id, pkt_len, segs);
	if (err) {
		stat_inc(-err);
		/* IP without ports (fragments, ICMP, ...) is still a flow */
		if (err != -LT_PARSE_FRAGMENT && err != -LT_PARSE_OTHER_L4)
			return 0;
		p.payload_len = 0;
	}

	struct lt_flow_val *v = flow_account(ctx, &p, pkt_len, segs);
	/* a blocked flow stays blocked: nothing after its hello leaves */
	if (LT_ENFORCE && dir == LT_DIR_EGRESS && !err && enf_blocked(&p))
		return LT_DROP;
#if LT_FCACHE
	/* nothing left to look at in this flow's payload: later packets take the cache */
	if (v && !err && p.key.sport != DNS_PORT && p.key.dport != DNS_PORT &&
	    (!probe_tls || v->probe_segs >= LT_PROBE_SEGS + LT_HELLO_SEGS_MAX))
		fcache_fill(&p, v);
#endif
	if (!v || p.payload_len == 0)
		return 0;

	/* DNS is never gated by the probe budget: user space learns an answer only
	 * when it matches a query this host sent, so it needs both halves */
	if (p.key.sport == DNS_PORT || p.key.dport == DNS_PORT) {
		dns_sample(ctx, &p, v, dir, ifindex);
		return 0;
	}
	if (!probe_tls || v->probe_segs >= LT_PROBE_SEGS + LT_HELLO_SEGS_MAX)
		return 0;
	v->probe_segs++;
	if (p.key.proto == IPPROTO_TCP)
		return tls_probe(ctx, &p, v, ifindex);
	if (p.key.proto == IPPROTO_UDP && v->probe_segs <= LT_PROBE_SEGS)
		return quic_probe(ctx, &p, v, ifindex);
	return 0;
}

#endif /* __LT_FLOW_H */
