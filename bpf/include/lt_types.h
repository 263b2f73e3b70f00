/* SPDX-License-Identifier: GPL-2.0 OR Apache-2.0 */
/*
 * lt_types.h - the kernel/user ABI of leaktap: every struct, enum and limit
 * shared between the BPF programs and the Python controller is defined here
 * and only here. Python reads the structs through the ctypes classes BCC
 * derives from these declarations and the enums through controller/abi.py;
 * tests/bpf/test_abi.py pins sizes and offsets against tests/abi_golden.json.
 *
 * Rules: structs are flat (BCC's event() cannot decode nested structs),
 * padding is explicit, keys are zero-initialised before use.
 */
#ifndef __LT_TYPES_H
#define __LT_TYPES_H

/* ---- sizing: every max_entries is a named constant, overridable -D ---- */

/* Flows active within one drain interval (1 s). LRU: an eviction loses at
 * most the bytes since the last drain, and those still show up in the
 * per-cgroup and global totals as unattributed volume. 64k entries x (48 B
 * key + 48 B value per CPU) is ~13 MB of kernel memory on 2 CPUs. */
#ifndef LT_FLOWS_MAX
#define LT_FLOWS_MAX 65536
#endif

/* Per-cgroup totals are never evicted: one entry per cgroup that ever sent
 * traffic. Container hosts rarely exceed a few thousand; overflow is counted
 * (LT_LOSS_CGROUP_FULL) and the bytes stay in the global totals. */
#ifndef LT_CGROUPS_MAX
#define LT_CGROUPS_MAX 16384
#endif

/* Flows whose ClientHello spans several segments and is not complete yet.
 * A handshake completes within one RTT, so this is bounded by the new-flow
 * rate x RTT: 4096 covers 40k new flows/s at 100 ms. Not LRU, so a full map
 * fails the insert and counts LT_LOSS_HELLO_PENDING instead of evicting
 * silently; the controller deletes entries older than a few seconds. */
#ifndef LT_HELLO_PENDING_MAX
#define LT_HELLO_PENDING_MAX 4096
#endif

/* Ring buffer size in pages (power of two). 64 pages = 256 KiB hold ~120
 * full-size events; raise for bursts of new TLS flows. */
#ifndef LT_RINGBUF_PAGES
#define LT_RINGBUF_PAGES 64
#endif

/* Bytes of payload one event carries. A GSO skb holding a larger hello is
 * split into several events (LT_HELLO_CHUNKS), each with its own sequence. */
#define LT_SNAP 2048
/* DNS messages: the first 512 bytes (RFC 1035 UDP size) are enough for the
 * answers that map an address to a name. */
#define LT_DNS_SNAP 512
/* Events per skb when a ClientHello arrives in one GSO super-packet. */
#define LT_HELLO_CHUNKS 8
/* TLS record headers read per segment while following a hello (a hello split
 * into tiny records ends early and is completed in user space). */
#define LT_HELLO_REC_WALK 4
/* A ClientHello is at most one 16 KiB handshake message plus record headers. */
#define LT_HELLO_MAX_BYTES 18432
/* Continuation segments followed per hello before giving up (counted). */
#ifndef LT_HELLO_SEGS_MAX
#define LT_HELLO_SEGS_MAX 12
#endif
/* Payload-carrying packets per flow entry whose first bytes are inspected
 * for a QUIC start; TCP segments are inspected for a hello start or a pending
 * continuation for LT_PROBE_SEGS + LT_HELLO_SEGS_MAX of them. Entries are
 * drained each second, so a STARTTLS upgrade later in a long flow is still
 * seen within the first packets of the next interval. */
#define LT_PROBE_SEGS 8
/* Events per second per CPU before rate limiting (counted). */
#ifndef LT_EVENTS_PER_SEC
#define LT_EVENTS_PER_SEC 65536
#endif
/* Mirror-port mode: skip a packet identical to its flow's previous one. */
#ifndef LT_DEDUP
#define LT_DEDUP 0
#endif
/* IPv6 extension headers walked before giving up (counted). */
#define LT_IPV6_EXT_MAX 6

/* ---- enums ---- */

/* Direction of a packet relative to the monitored interface. */
enum lt_dir {
	LT_DIR_EGRESS = 0,
	LT_DIR_INGRESS = 1,
	LT_DIR_MAX = 2,
};

/* Index of lt_stats, a per-CPU array of monotonic counters.
 * LT_PARSE_*: packets the parser rejected; their bytes are still in the
 *             totals (lt_totals, lt_cgtot), only not attributed to a flow.
 * LT_LOSS_*:  data that did not reach user space; each one is a bug unless
 *             counted here and exported.
 * LT_CNT_*:   informative counters. */
enum lt_stat {
	LT_CNT_FLOW_NEW = 0,      /* flow entries created (index 0: parse helpers return -LT_PARSE_*) */
	LT_PARSE_NOT_IP,          /* EtherType not IPv4/IPv6 */
	LT_PARSE_TRUNC_L2,        /* shorter than Ethernet + VLAN tags */
	LT_PARSE_BAD_IPV4,        /* version != 4 or ihl < 5 */
	LT_PARSE_BAD_IPV6,        /* version != 6 */
	LT_PARSE_BAD_LEN,         /* IP length below its own header: not attributed */
	LT_PARSE_LEN_CLAMPED,     /* IP length beyond the packet (lying or snapped): attributed */
	LT_PARSE_TRUNC_L3,        /* IP header cut short */
	LT_PARSE_IPV6_EXT,        /* more extension headers than LT_IPV6_EXT_MAX */
	LT_PARSE_FRAGMENT,        /* non-first fragment: counted with ports 0 */
	LT_PARSE_BAD_L4,          /* TCP doff < 5 or TCP/UDP header cut short */
	LT_PARSE_OTHER_L4,        /* not TCP/UDP: counted with ports 0 */
	LT_LOSS_FLOW_INSERT,      /* flow map insert failed */
	LT_LOSS_CGROUP_FULL,      /* per-cgroup totals full */
	LT_LOSS_RINGBUF_FULL,     /* ring buffer reservation failed */
	LT_LOSS_RATE_LIMITED,     /* event dropped by the per-CPU rate limit */
	LT_LOSS_TRUNCATED,        /* event payload shorter than the data */
	LT_LOSS_HELLO_PENDING,    /* no room to follow a multi-segment hello */
	LT_LOSS_HELLO_SEGS,       /* hello needed more than LT_HELLO_SEGS_MAX segments */
	LT_LOSS_LOAD_BYTES,       /* bpf_*_load_bytes failed */
	LT_CNT_EV_HELLO,          /* ClientHello events delivered */
	LT_CNT_EV_QUIC,           /* QUIC Initial events delivered */
	LT_CNT_EV_DNS,            /* DNS answer events delivered */
	LT_CNT_DUPLICATE,         /* mirror-port copies of the previous packet, not counted */
	LT_STAT_MAX,
};

/* Kind of a ring-buffer event. */
enum lt_event_kind {
	LT_EV_TLS_HELLO = 1,      /* TCP payload of a TLS handshake start or continuation */
	LT_EV_QUIC_INITIAL = 2,   /* UDP datagram starting with a QUIC long header */
	LT_EV_DNS = 3,            /* DNS message from source port 53 (UDP or TCP) */
};

/* lt_flow_val.flags bits */
enum lt_flow_flag {
	LT_FF_SYN = 1,            /* a SYN without ACK left this side: it is the initiator */
	LT_FF_SYNACK = 2,         /* a SYN+ACK left this side */
	LT_FF_FIN = 4,
	LT_FF_RST = 8,
	LT_FF_HELLO = 16,         /* a ClientHello start was captured */
};

/* ---- structs ---- */

/* Flow identity, in packet direction. IPv4 addresses sit in addr[0] (network
 * byte order), the rest zero; ports in host byte order. */
struct lt_flow_key {
	__u64 cgroup_id;          /* cgroup v2 id of the sending socket, 0 if none */
	__u32 saddr[4];
	__u32 daddr[4];
	__u16 sport;
	__u16 dport;
	__u8 family;              /* 4 or 6 */
	__u8 proto;               /* IPPROTO_* */
	__u8 dir;                 /* enum lt_dir */
	__u8 pad;
};

/* Per-CPU flow counters; the controller sums the CPUs. */
struct lt_flow_val {
	__u64 tx_bytes;           /* skb->len, as the interface counts them */
	__u64 tx_packets;         /* max(gso_segs, 1) per skb */
	__u64 first_seen_ns;      /* bpf_ktime_get_ns() at entry creation */
	__u64 last_seen_ns;       /* = first_seen_ns: entries live one drain interval, so the
				   * controller stamps the drain time instead of the kernel
				   * reading a clock for every packet */
	__u32 uid;                /* socket owner uid, 0xffffffff if no socket */
	__u32 flags;              /* enum lt_flow_flag bits */
	__u32 probe_segs;         /* payload packets inspected for a TLS/QUIC start */
	__u32 last_sig;           /* signature of the last packet (mirror-port dedup) */
};

/* Volume counters for lt_totals (by direction) and lt_cgtot (by cgroup). */
struct lt_volume {
	__u64 bytes;
	__u64 packets;
};

/* A ClientHello being followed across segments (global, not per CPU). The
 * kernel reads the TLS record headers as they pass (rec_seq, msg_left), so the
 * end is exact however the handshake message is split into records. */
struct lt_hello_state {
	__u64 created_ns;         /* the controller expires hellos never completed */
	__u32 start_seq;          /* sequence of the first record's first byte */
	__u32 next_seq;           /* highest sequence captured so far + 1 */
	__u32 end_seq;            /* one past the hello's last byte; an upper bound
				   * (start + LT_HELLO_MAX_BYTES) while msg_left > 0 */
	__u32 rec_seq;            /* sequence of the next record header not read yet */
	__u32 msg_left;           /* message bytes beyond the records read; 0 = end known */
	__u32 segs;               /* segments captured */
};

/* Events rate limit state, per CPU. */
struct lt_rate {
	__u64 window_ns;
	__u64 count;
};

/* One ring-buffer event: header plus the first cap_len payload bytes. Only
 * LT_EVENT_HDR_SIZE + cap_len bytes are submitted. */
struct lt_event {
	__u64 ts_ns;
	__u64 cgroup_id;
	__u32 kind;               /* enum lt_event_kind */
	__u32 ifindex;
	__u32 saddr[4];
	__u32 daddr[4];
	__u16 sport;
	__u16 dport;
	__u8 family;
	__u8 proto;
	__u8 dir;
	__u8 tcp_flags;           /* TCP flags byte of the packet */
	__u32 seq;                /* TCP sequence number of payload[0] */
	__u32 uid;
	__u32 payload_len;        /* L4 payload bytes in the packet */
	__u32 payload_off;        /* offset of payload[0] within the L4 payload */
	__u32 cap_len;            /* bytes of payload[] that are filled */
	__u8 payload[LT_SNAP];
};

#define LT_EVENT_HDR_SIZE __builtin_offsetof(struct lt_event, payload)

#endif /* __LT_TYPES_H */
