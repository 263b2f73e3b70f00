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
 * Overhead: on an established flow a data packet costs two array updates, one
 * LRU hash lookup and (egress) one per-cgroup hash lookup. Payload bytes are
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
#define TLS_CT_HANDSHAKE 0x16
#define TLS_HS_CLIENT_HELLO 0x01
/* QUIC long header: first byte 1F......, then a 32-bit version (RFC 8999) */
#define QUIC_LONG_FORM 0xC0
#define QUIC_V1 0x00000001
#define QUIC_V2 0x6b3343cf
/* clients pad Initial datagrams to 1200 bytes (RFC 9000 14.1); half of it
 * tolerates captures cut by a snap length */
#define QUIC_MIN_DATAGRAM 600
#define DNS_PORT 53
/* 1: sample DNS in both directions (one hook sees both: XDP, replay) */
#ifndef LT_DNS_BOTH_WAYS
#define LT_DNS_BOTH_WAYS 0
#endif

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
 * totals_account - count every packet, parsed or not, by direction and
 * (egress) by cgroup. These maps never evict, so LRU flow evictions never
 * lose volume: the controller reports totals - attributed as unattributed.
 */
static __always_inline void totals_account(__u32 dir, __u64 cgroup_id, __u32 len, __u32 segs)
{
	struct lt_volume *t = lt_totals.lookup(&dir);

	if (t)
		volume_add(t, len, segs);
	if (dir != LT_DIR_EGRESS)
		return;
	struct lt_volume *c = lt_cgtot.lookup(&cgroup_id);
	if (c) {
		volume_add(c, len, segs);
		return;
	}
	struct lt_volume init = { .bytes = len, .packets = segs };
	if (lt_cgtot.insert(&cgroup_id, &init)) {
		/* -EEXIST: another CPU raced us; this CPU's slot is ours to set */
		c = lt_cgtot.lookup(&cgroup_id);
		if (c)
			volume_add(c, len, segs);
		else
			stat_inc(LT_LOSS_CGROUP_FULL);
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
 * hello_walk - read the TLS record headers that start inside this segment,
 * advancing @st->rec_seq and @st->msg_left; fixes @st->end_seq once the
 * handshake message is covered (or a non-handshake record shows it ended)
 */
static __always_inline void hello_walk(LT_CTX *ctx, struct lt_pkt *p, struct lt_hello_state *st)
{
	for (int i = 0; i < LT_HELLO_REC_WALK && st->msg_left; i++) {
		__u32 off = st->rec_seq - p->seq;
		if (seq_before(st->rec_seq, p->seq) || off + TLS_REC_HDR_LEN > p->payload_len)
			break;
		__u8 h[TLS_REC_HDR_LEN] = {};
		if (LT_LOAD_BYTES(ctx, p->payload_off + off, h, TLS_REC_HDR_LEN)) {
			stat_inc(LT_LOSS_LOAD_BYTES);
			break;
		}
		if (h[0] != TLS_CT_HANDSHAKE) {
			st->msg_left = 0; /* the handshake message ended before this record */
			break;
		}
		__u32 len = ((__u32)h[3] << 8) | h[4];
		st->rec_seq += TLS_REC_HDR_LEN + len;
		st->msg_left = len >= st->msg_left ? 0 : st->msg_left - len;
	}
	if (!st->msg_left)
		st->end_seq = st->rec_seq;
}

/**
 * hello_capture - capture the hello bytes of this segment and keep or drop the
 * pending state; @st is on the stack for a first segment, in lt_hello after
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

/**
 * tls_probe - capture a ClientHello start (detected by content, any port)
 * and, for a hello longer than this segment, follow its continuation
 * segments until the handshake message is complete
 */
static __always_inline void tls_probe(LT_CTX *ctx, struct lt_pkt *p, struct lt_flow_val *v,
				      __u32 ifindex)
{
	__u8 h[TLS_HELLO_HDR_LEN] = {};

	if (p->payload_len >= TLS_HELLO_HDR_LEN &&
	    LT_LOAD_BYTES(ctx, p->payload_off, h, TLS_HELLO_HDR_LEN) == 0 &&
	    h[0] == TLS_CT_HANDSHAKE && h[1] == 3 && h[2] <= 4 && h[5] == TLS_HS_CLIENT_HELLO) {
		__u32 rec = ((__u32)h[3] << 8) | h[4];
		__u32 msg = (((__u32)h[6] << 16) | ((__u32)h[7] << 8) | h[8]) + 4;
		struct lt_hello_state st = {
			.created_ns = bpf_ktime_get_ns(),
			.start_seq = p->seq,
			.next_seq = p->seq,
			.rec_seq = p->seq + TLS_REC_HDR_LEN + rec,
			.msg_left = msg > rec ? msg - rec : 0,
		};
		st.end_seq = st.msg_left ? p->seq + LT_HELLO_MAX_BYTES : p->seq + TLS_REC_HDR_LEN + msg;
		hello_walk(ctx, p, &st);
		hello_capture(ctx, p, &st, v->uid, ifindex);
		v->flags |= LT_FF_HELLO;
		/* BPF_ANY: a retransmitted first segment restarts the follow */
		if (seq_before(st.next_seq, st.end_seq) && lt_hello.update(&p->key, &st))
			stat_inc(LT_LOSS_HELLO_PENDING);
		return;
	}

	struct lt_hello_state *st = lt_hello.lookup(&p->key);
	if (!st)
		return;
	if (seq_before(p->seq, st->start_seq) || !seq_before(p->seq, st->end_seq))
		return;
	hello_walk(ctx, p, st);
	if (seq_before(p->seq, st->end_seq))
		hello_capture(ctx, p, st, v->uid, ifindex);
	if (!seq_before(st->next_seq, st->end_seq)) {
		lt_hello.delete(&p->key);
	} else if (st->segs >= LT_HELLO_SEGS_MAX) {
		stat_inc(LT_LOSS_HELLO_SEGS);
		lt_hello.delete(&p->key);
	}
}

/**
 * quic_probe - capture a datagram that starts with a QUIC long header
 * carrying an Initial packet (v1, v2) or an unknown version
 */
static __always_inline void quic_probe(LT_CTX *ctx, struct lt_pkt *p, struct lt_flow_val *v,
				       __u32 ifindex)
{
	__u8 h[5] = {};

	if (p->payload_len < QUIC_MIN_DATAGRAM || LT_LOAD_BYTES(ctx, p->payload_off, h, sizeof(h)))
		return;
	if ((h[0] & QUIC_LONG_FORM) != QUIC_LONG_FORM)
		return;
	__u32 version = ((__u32)h[1] << 24) | ((__u32)h[2] << 16) | ((__u32)h[3] << 8) | h[4];
	__u32 type = (h[0] >> 4) & 3;
	if (version == 0 || (version == QUIC_V1 && type != 0) || (version == QUIC_V2 && type != 1))
		return;
	emit_payload(ctx, p, LT_EV_QUIC_INITIAL, 0, p->payload_len, LT_SNAP, 1, v->uid, ifindex);
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
 */
static __always_inline void lt_handle(LT_CTX *ctx, void *data, void *data_end, __u32 pkt_len,
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
			return;
		}
	}
#endif
	totals_account(dir, cgroup_id, pkt_len, segs);
	if (clamped)
		stat_inc(LT_PARSE_LEN_CLAMPED);
	if (err) {
		stat_inc(-err);
		/* IP without ports (fragments, ICMP, ...) is still a flow */
		if (err != -LT_PARSE_FRAGMENT && err != -LT_PARSE_OTHER_L4)
			return;
		p.payload_len = 0;
	}

	struct lt_flow_val *v = flow_account(ctx, &p, pkt_len, segs);
	if (!v || p.payload_len == 0)
		return;

	/* DNS is never gated by the probe budget: user space learns an answer only
	 * when it matches a query this host sent, so it needs both halves */
	if (p.key.sport == DNS_PORT || p.key.dport == DNS_PORT) {
		dns_sample(ctx, &p, v, dir, ifindex);
		return;
	}
	if (!probe_tls || v->probe_segs >= LT_PROBE_SEGS + LT_HELLO_SEGS_MAX)
		return;
	v->probe_segs++;
	if (p.key.proto == IPPROTO_TCP)
		tls_probe(ctx, &p, v, ifindex);
	else if (p.key.proto == IPPROTO_UDP && v->probe_segs <= LT_PROBE_SEGS)
		quic_probe(ctx, &p, v, ifindex);
}

#endif /* __LT_FLOW_H */
