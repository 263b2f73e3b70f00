/* SPDX-License-Identifier: GPL-2.0 OR Apache-2.0 */
/*
 * lt_sni.h - the server name of a ClientHello, read in the kernel.
 *
 * Accepts exactly what controller/protocols/tls.py's _parse_handshake and
 * _parse_sni accept (tests/bpf/test_tc_sni.py runs its cases through both):
 * every length is checked against its container, extensions in any order,
 * GREASE and padding skipped as unknown types, a repeated server_name, ALPN,
 * supported_versions or encrypted_client_hello extension rejects the hello,
 * ALPN and supported_versions bodies are validated, and the first host_name
 * entry is the name when it is a valid host name (LDH plus '_', labels of
 * 1..63, at most 253 bytes after one trailing dot), lower-cased.
 *
 * The message is read from a buffer in map memory (per-CPU scratch for a
 * single-segment hello, lt_hello_bufs for one split over segments): every
 * index is masked into the buffer, and bounds are checked logically against
 * the message length, which the caller keeps <= LT_HELLO_BUF.
 */
#ifndef __LT_SNI_H
#define __LT_SNI_H

#include "lt_loss.h"

/* @v & @mask, with the mask kept: clang drops masks it can prove redundant
 * from a loop bound, which the verifier does not track through the loop */
static __always_inline __u32 lt_mask(__u32 v, __u32 mask)
{
	asm volatile("" : "+r"(v));
	return v & mask;
}

#define SNI_M(m, i) ((__u32)(m)[lt_mask((i), LT_HELLO_BUF - 1)])
#define NAME_AT(i) lt_mask((i), LT_NAME_MAX - 1)
#define SNI_U16(m, i) ((SNI_M(m, i) << 8) | SNI_M(m, (i) + 1))
#define TLS_EXT_SERVER_NAME 0x0000
#define TLS_EXT_ALPN 0x0010
#define TLS_EXT_SUPPORTED_VERSIONS 0x002b
#define TLS_EXT_ECH 0xfe0d
#define TLS_RANDOM_LEN 32
#define TLS_SESSION_ID_MAX 32
#define SNI_HOST_NAME 0
/* the user-space parser looks at the first 255 bytes of a name */
#define SNI_RAW_MAX 255
#define SNI_HOSTNAME_MAX 253
#define SNI_LABEL_MAX 63

static __always_inline void sni_count(int outcome)
{
	stat_inc(outcome == LT_SNI_NAMED ? LT_CNT_SNI_NAMED :
		 outcome == LT_SNI_NONE ? LT_CNT_SNI_NO_NAME :
		 outcome == LT_SNI_BAD ? LT_SNI_MALFORMED : LT_SNI_GIVEUP_LIMIT);
}

/* Branch-free helpers: the verifier walks a loop without data-dependent
 * branches along one path, so the parser's cost to verify stays linear.
 * Arguments are below 2^31 (offsets, bytes, 16-bit fields). */
static __always_inline __u32 sni_in(__u32 c, __u32 lo, __u32 hi)
{
	return (((hi - c) | (c - lo)) >> 31) ^ 1; /* lo <= c <= hi */
}

static __always_inline __u32 sni_eq(__u32 a, __u32 b)
{
	return sni_in(a, b, b);
}

static __always_inline __u32 sni_gt(__u32 a, __u32 b)
{
	return (b - a) >> 31; /* a > b */
}

static __always_inline __u32 sni_sel(__u32 cond, __u32 a, __u32 b)
{
	return b ^ ((a ^ b) & -cond); /* cond (0 or 1) ? a : b */
}

/**
 * sni_take_name - copy the host_name at @off (@nlen bytes) lower-cased into
 * @s->akey.name (zero-padded), checked as the user-space parser does: the
 * first 255 bytes, one trailing dot stripped, then labels of 1..63 bytes of
 * [a-z0-9_-] not starting or ending with '-', at most 253 bytes in all.
 * Returns LT_SNI_NAMED (s->name_len set) or LT_SNI_NONE.
 */
static __always_inline int sni_take_name(__u8 *m, __u32 off, __u32 nlen,
					 struct lt_sni_scratch *s)
{
	__u32 len = nlen < SNI_RAW_MAX ? nlen : SNI_RAW_MAX;

	s->name_len = 0;
	if (len == 0)
		return LT_SNI_NONE;
	if (SNI_M(m, off + len - 1) == '.')
		len--;
	if (len == 0 || len > SNI_HOSTNAME_MAX)
		return LT_SNI_NONE;
	__u32 bad = 0, label = 0, at_start = 1, prev_hyphen = 0;
#pragma clang loop unroll(disable)
	for (__u32 i = 0; i < SNI_HOSTNAME_MAX; i++) {
		__u32 on = sni_gt(len, i);
		__u32 c = SNI_M(m, off + i);
		c += sni_in(c, 'A', 'Z') << 5;
		__u32 dot = sni_eq(c, '.');
		__u32 hyphen = sni_eq(c, '-');
		__u32 b = (dot | hyphen | sni_in(c, 'a', 'z') | sni_in(c, '0', '9') |
			   sni_eq(c, '_')) ^ 1;
		b |= dot & (at_start | prev_hyphen);    /* empty label, label ending in '-' */
		b |= hyphen & at_start;                 /* label starting with '-' */
		__u32 next = (label + 1) * (dot ^ 1);
		b |= sni_gt(next, SNI_LABEL_MAX);       /* label longer than 63 */
		bad |= b & on;
		label = sni_sel(on, next, label);
		at_start = sni_sel(on, dot, at_start);
		prev_hyphen = sni_sel(on, hyphen, prev_hyphen);
		s->akey.name[NAME_AT(i)] = c * on;
	}
	s->akey.name[SNI_HOSTNAME_MAX] = 0;
	s->akey.name[SNI_HOSTNAME_MAX + 1] = 0;
	s->akey.name[SNI_HOSTNAME_MAX + 2] = 0;
	if (bad | at_start | prev_hyphen) {
		__builtin_memset(s->akey.name, 0, LT_NAME_MAX);
		return LT_SNI_NONE;
	}
	s->name_len = len;
	return LT_SNI_NAMED;
}

/**
 * sni_parse - find the server name of the handshake message @m[0, @n)
 * (header included, @n <= LT_HELLO_BUF): @s->ech, and for LT_SNI_NAMED the
 * host_name entry's offset and length (s->name_off, s->name_raw), which
 * sni_take_name checks and copies
 * Returns enum lt_sni_outcome.
 */
static __always_inline int sni_parse(__u8 *m, __u32 n, struct lt_sni_scratch *s)
{
	__u32 seen = 0, bad = 0, sni_off = 0, sni_end = 0, alpn_off = 0, alpn_end = 0;

	s->name_len = 0;
	s->ech = 0;
	if (n < TLS_HS_HDR_LEN || n > LT_HELLO_BUF || SNI_M(m, 0) != TLS_HS_CLIENT_HELLO)
		return LT_SNI_BAD;
	if (((SNI_M(m, 1) << 16) | SNI_U16(m, 2)) + TLS_HS_HDR_LEN != n)
		return LT_SNI_BAD;
	__u32 p = TLS_HS_HDR_LEN;
	if (p + 2 + TLS_RANDOM_LEN + 1 > n || SNI_M(m, p) != 3)
		return LT_SNI_BAD;
	p += 2 + TLS_RANDOM_LEN;
	__u32 sid = SNI_M(m, p);
	if (sid > TLS_SESSION_ID_MAX)
		return LT_SNI_BAD;
	p += 1 + sid;
	if (p + 2 > n)
		return LT_SNI_BAD;
	__u32 cs = SNI_U16(m, p);
	if (cs < 2 || (cs & 1))
		return LT_SNI_BAD;
	p += 2 + cs;
	if (p + 1 > n)
		return LT_SNI_BAD;
	__u32 comp = SNI_M(m, p);
	if (comp < 1)
		return LT_SNI_BAD;
	p += 1 + comp;
	if (p > n)
		return LT_SNI_BAD;
	if (p == n)
		return LT_SNI_NONE; /* no extensions (SSLv3, early TLS) */
	if (p + 2 > n)
		return LT_SNI_BAD;
	__u32 total = SNI_U16(m, p);
	p += 2;
	if (p + total != n)
		return LT_SNI_BAD;
	/* extensions: a duplicate of a parsed one rejects the hello (servers do) */
#pragma clang loop unroll(disable)
	for (int i = 0; i < LT_SNI_EXT_MAX; i++) {
		__u32 on = sni_gt(n, p);
		__u32 type = SNI_U16(m, p);
		__u32 body = p + 4;
		__u32 end = body + SNI_U16(m, p + 2);
		__u32 is_sni = on & sni_eq(type, TLS_EXT_SERVER_NAME);
		__u32 is_alpn = on & sni_eq(type, TLS_EXT_ALPN);
		__u32 is_sv = on & sni_eq(type, TLS_EXT_SUPPORTED_VERSIONS);
		__u32 bit = is_sni | (is_alpn << 1) | (is_sv << 2) |
			    ((on & sni_eq(type, TLS_EXT_ECH)) << 3);
		__u32 vlen = SNI_M(m, body);
		bad |= on & (sni_gt(body, n) | sni_gt(end, n));
		bad |= ((seen & bit) + 15) >> 4;
		bad |= is_sv & (sni_gt(body + 1, end) | (sni_eq(body + 1 + vlen, end) ^ 1) |
				(vlen & 1));
		seen |= bit;
		sni_off = sni_sel(is_sni, body, sni_off);
		sni_end = sni_sel(is_sni, end, sni_end);
		alpn_off = sni_sel(is_alpn, body, alpn_off);
		alpn_end = sni_sel(is_alpn, end, alpn_end);
		p = sni_sel(on & (bad ^ 1), end, p);
	}
	if (bad)
		return LT_SNI_BAD;
	if (p < n)
		return LT_SNI_LIMIT;
	s->ech = (seen & 8) != 0;
	/* ALPN: a list of non-empty protocol names filling the extension */
	__u32 has = (seen >> 1) & 1;
	__u32 q = alpn_off + 2;
	bad = has & (sni_gt(q, alpn_end) | (sni_eq(q + SNI_U16(m, alpn_off), alpn_end) ^ 1));
#pragma clang loop unroll(disable)
	for (int i = 0; i < LT_SNI_LIST_MAX; i++) {
		__u32 on = has & sni_gt(alpn_end, q);
		__u32 next = q + 1 + SNI_M(m, q);
		bad |= on & (sni_eq(SNI_M(m, q), 0) | sni_gt(next, alpn_end));
		q = sni_sel(on & (bad ^ 1), next, q);
	}
	if (bad)
		return LT_SNI_BAD;
	if (has && q < alpn_end)
		return LT_SNI_LIMIT;
	if (!(seen & 1) || sni_off == sni_end)
		return LT_SNI_NONE; /* no name, or an empty extension (tolerated) */
	/* server_name: a list filling the extension; the first host_name counts */
	q = sni_off + 2;
	if (q > sni_end || q + SNI_U16(m, sni_off) != sni_end)
		return LT_SNI_BAD;
	__u32 found = 0, name_off = 0, name_len = 0;
#pragma clang loop unroll(disable)
	for (int i = 0; i < LT_SNI_LIST_MAX; i++) {
		__u32 on = sni_gt(sni_end, q);
		__u32 len = SNI_U16(m, q + 1);
		__u32 next = q + 3 + len;
		bad |= on & (sni_gt(q + 3, sni_end) | sni_gt(next, sni_end));
		__u32 take = on & sni_eq(SNI_M(m, q), SNI_HOST_NAME) & (found ^ 1);
		name_off = sni_sel(take, q + 3, name_off);
		name_len = sni_sel(take, len, name_len);
		found |= take;
		q = sni_sel(on & (bad ^ 1), next, q);
	}
	if (bad)
		return LT_SNI_BAD;
	if (q < sni_end)
		return LT_SNI_LIMIT;
	if (!found)
		return LT_SNI_NONE;
	/* the name itself is checked by sni_take_name, in the next tail program */
	s->name_off = name_off;
	s->name_raw = name_len;
	return LT_SNI_NAMED;
}

/**
 * sni_load - copy @n bytes of the packet at @off into @dst[@at, @at + @n)
 * in LT_HELLO_COPY pieces (@dst has LT_HELLO_COPY bytes of slack)
 * Returns 0, or -1 when a load failed (counted).
 */
static __always_inline int sni_load(LT_CTX *ctx, __u32 off, __u8 *dst, __u32 at, __u32 n)
{
	for (int i = 0; i < LT_HELLO_BUF / LT_HELLO_COPY + 1; i++) {
		if (n == 0 || at >= LT_HELLO_BUF)
			return 0;
		__u32 k = n < LT_HELLO_COPY ? n : LT_HELLO_COPY;
		asm volatile("" : "+r"(k));
		k = ((k - 1) & (LT_HELLO_COPY - 1)) + 1;
		__u32 o = at;
		asm volatile("" : "+r"(o)); /* keep the mask: clang knows at < LT_HELLO_BUF */
		o &= LT_HELLO_BUF - 1;
		if (LT_LOAD_BYTES(ctx, off, dst + o, k)) {
			stat_inc(LT_LOSS_LOAD_BYTES);
			return -1;
		}
		off += k;
		at += k;
		n -= k;
	}
	return 0;
}

#endif /* __LT_SNI_H */
