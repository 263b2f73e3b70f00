/* SPDX-License-Identifier: GPL-2.0 OR Apache-2.0 */
/*
 * lt_types.h - the kernel/user ABI of leaktap: every struct, enum and limit
 * shared between the BPF programs and the Python controller is defined here
 * and only here. Python reads the structs through the ctypes classes BCC
 * derives from these declarations and the enums through controller/kernel/abi.py;
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
/* Range of kernel.flows_max. Each limit's _FLOOR/_CEIL (and _POW2) below is
 * what the config validation and the loader accept (controller/kernel/abi.py
 * reads them from here) and what the build checks at the end of this section.
 * Below 16 entries the LRU evicts within one drain; 4M x ~100 B per CPU is
 * gigabytes of kernel memory. */
#define LT_FLOWS_MAX_FLOOR 16
#define LT_FLOWS_MAX_CEIL 4194304

/* Per-cgroup totals are never evicted: one entry per cgroup that ever sent
 * traffic. Container hosts rarely exceed a few thousand; overflow is counted
 * (LT_LOSS_CGROUP_FULL) and the bytes stay in the global totals. */
#ifndef LT_CGROUPS_MAX
#define LT_CGROUPS_MAX 16384
#endif
#define LT_CGROUPS_MAX_FLOOR 1
#define LT_CGROUPS_MAX_CEIL 16777216

/* Flows whose ClientHello spans several segments and is not complete yet.
 * A handshake completes within one RTT, so this is bounded by the new-flow
 * rate x RTT: 4096 covers 40k new flows/s at 100 ms. Not LRU, so a full map
 * fails the insert and counts LT_LOSS_HELLO_PENDING instead of evicting
 * silently; the controller deletes entries older than a few seconds. */
#ifndef LT_HELLO_PENDING_MAX
#define LT_HELLO_PENDING_MAX 4096
#endif
#define LT_HELLO_PENDING_MAX_FLOOR 1
#define LT_HELLO_PENDING_MAX_CEIL 16777216

/* Ring buffer size in pages (power of two). 64 pages = 256 KiB hold ~120
 * full-size events; raise for bursts of new TLS flows. */
#ifndef LT_RINGBUF_PAGES
#define LT_RINGBUF_PAGES 64
#endif
/* The kernel refuses a ring buffer whose size is not a power-of-two number
 * of pages; 65536 pages = 256 MiB. */
#define LT_RINGBUF_PAGES_FLOOR 1
#define LT_RINGBUF_PAGES_CEIL 65536
#define LT_RINGBUF_PAGES_POW2 1

/* Bytes of payload one event carries. A GSO skb holding a larger hello is
 * split into several events (LT_HELLO_CHUNKS), each with its own sequence. */
#define LT_SNAP 2048
/* DNS messages: the first 512 bytes (RFC 1035 UDP size) are enough for the
 * answers that map an address to a name. */
#define LT_DNS_SNAP 512
/* Events per skb when a ClientHello arrives in one GSO super-packet. */
#define LT_HELLO_CHUNKS 8
/* Steps of the hello walker per segment: one step reads a TLS record header
 * or the handshake header (a byte at a time where a segment or record
 * boundary cuts them) or skips a record's body, so ~2 steps per record. 64
 * covers 32 records in one segment; a segment with more stops the walk
 * (LT_LOSS_HELLO_WALK) and the hello is captured up to LT_HELLO_SEGS_MAX. */
#define LT_HELLO_WALK_STEPS 64
/* The largest TLS record (RFC 8446 5.2, TLSCiphertext: 2^14 + 256; a
 * TLSPlaintext is 2^14); a longer record length is not TLS. */
#define LT_TLS_REC_MAX 16640
/* A ClientHello is at most one 16 KiB handshake message plus record headers. */
#define LT_HELLO_MAX_BYTES 18432
/* Continuation segments followed per hello before giving up (counted). */
#ifndef LT_HELLO_SEGS_MAX
#define LT_HELLO_SEGS_MAX 12
#endif
#define LT_HELLO_SEGS_MAX_FLOOR 1
#define LT_HELLO_SEGS_MAX_CEIL 64
/* Payload-carrying packets per flow entry whose first bytes are inspected
 * for a QUIC start; TCP segments are inspected for a hello start or a pending
 * continuation for LT_PROBE_SEGS + LT_HELLO_SEGS_MAX of them. Entries are
 * drained each second, so a STARTTLS upgrade later in a long flow is still
 * seen within the first packets of the next interval. */
#define LT_PROBE_SEGS 8
/* Smallest UDP datagram inspected for a QUIC Initial: clients pad Initial
 * datagrams to 1200 bytes (RFC 9000 14.1); half of it tolerates captures cut
 * by a snap length. */
#define LT_QUIC_MIN_DATAGRAM 600
/* Events per second per CPU before rate limiting (counted). */
#ifndef LT_EVENTS_PER_SEC
#define LT_EVENTS_PER_SEC 65536
#endif
#define LT_EVENTS_PER_SEC_FLOOR 1
#define LT_EVENTS_PER_SEC_CEIL 16777216
/* Mirror-port mode: skip a packet identical to its flow's previous one. */
#ifndef LT_DEDUP
#define LT_DEDUP 0
#endif
/* IPv6 extension headers walked before giving up (counted). */
#define LT_IPV6_EXT_MAX 6

/* A -D override outside its range fails the build, not the verifier. */
#define LT_OUT_OF_RANGE(x, lo, hi) ((x) < (lo) || (x) > (hi))
#if LT_OUT_OF_RANGE(LT_FLOWS_MAX, LT_FLOWS_MAX_FLOOR, LT_FLOWS_MAX_CEIL)
#error "LT_FLOWS_MAX out of range"
#endif
#if LT_OUT_OF_RANGE(LT_CGROUPS_MAX, LT_CGROUPS_MAX_FLOOR, LT_CGROUPS_MAX_CEIL)
#error "LT_CGROUPS_MAX out of range"
#endif
#if LT_OUT_OF_RANGE(LT_HELLO_PENDING_MAX, LT_HELLO_PENDING_MAX_FLOOR, LT_HELLO_PENDING_MAX_CEIL)
#error "LT_HELLO_PENDING_MAX out of range"
#endif
#if LT_OUT_OF_RANGE(LT_RINGBUF_PAGES, LT_RINGBUF_PAGES_FLOOR, LT_RINGBUF_PAGES_CEIL) || \
	(LT_RINGBUF_PAGES & (LT_RINGBUF_PAGES - 1))
#error "LT_RINGBUF_PAGES must be a power of two in range"
#endif
#if LT_OUT_OF_RANGE(LT_HELLO_SEGS_MAX, LT_HELLO_SEGS_MAX_FLOOR, LT_HELLO_SEGS_MAX_CEIL)
#error "LT_HELLO_SEGS_MAX out of range"
#endif
#if LT_OUT_OF_RANGE(LT_EVENTS_PER_SEC, LT_EVENTS_PER_SEC_FLOOR, LT_EVENTS_PER_SEC_CEIL)
#error "LT_EVENTS_PER_SEC out of range"
#endif

/* lt_flow_val.uid when no socket owner is known (ingress, XDP) */
#define LT_NO_UID 0xFFFFFFFF

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
	LT_LOSS_HELLO_WALK,       /* more records in one segment than LT_HELLO_WALK_STEPS walk:
				   * end unknown, captured up to LT_HELLO_SEGS_MAX segments */
	LT_LOSS_HELLO_GAP,        /* a hello segment past bytes never seen (lost, reordered):
				   * end unknown, captured up to LT_HELLO_SEGS_MAX segments */
	LT_LOSS_LOAD_BYTES,       /* bpf_*_load_bytes failed */
	LT_CNT_EV_HELLO,          /* ClientHello events delivered */
	LT_CNT_EV_QUIC,           /* QUIC Initial events delivered */
	LT_CNT_EV_DNS,            /* DNS events delivered (queries leaving, answers arriving) */
	LT_CNT_DUPLICATE,         /* mirror-port copies of the previous packet, not counted */
	LT_CNT_DNS_ANS_OUT,       /* DNS answers leaving the host (TC egress): never learned */
	LT_CNT_DNS_QRY_IN,        /* DNS queries arriving (TC ingress, a local server): not sampled */
	/* server name read in the kernel (lt_sni.h), once per hello that completes */
	LT_CNT_SNI_NAMED,         /* a valid host_name read */
	LT_CNT_SNI_NO_NAME,       /* a valid hello without a (valid) host_name: user space agrees */
	LT_SNI_MALFORMED,         /* not a ClientHello the user-space parser accepts */
	LT_SNI_GIVEUP_TOO_LONG,     /* hello longer than LT_HELLO_BUF: not read in the kernel */
	LT_SNI_GIVEUP_LIMIT,        /* more extensions or list entries than the loop bounds */
	LT_SNI_GIVEUP_RECORDS,      /* hello spread over several records: not read in the kernel */
	LT_SNI_GIVEUP_GAP,          /* split hello with a hole or no buffer room: not read */
	LT_SNI_GIVEUP_NAMES_FULL,   /* lt_names full: the name goes by the ring (the hello event) */
	LT_LOSS_SNI_TAIL,         /* the tail program could not be called: hello not read */
	LT_CNT_SNI_TO_RING,       /* single-segment hellos sent to the ring because the kernel
				   * did not name them (or lt_names was full); the named ones
				   * reach user space only through lt_names */
	/* enforcement (lt_enforce.h) */
	LT_CNT_ENF_BLOCKED_PKT,   /* later packets of a blocked flow dropped */
	LT_LOSS_ENF_EVENT,        /* a decision not reported on the ring (still enforced) */
	LT_LOSS_ENF_BLOCK_INSERT, /* a blocked flow not remembered (its hello still dropped) */
	/* front cache of established flows (lt_fcache.h) */
	LT_CNT_FCACHE_FOLD,       /* entries folded into lt_flows: another flow took the slot */
	LT_STAT_MAX,
};

/* Kind of a ring-buffer event. */
enum lt_event_kind {
	LT_EV_TLS_HELLO = 1,      /* TCP payload of a TLS handshake start or continuation */
	LT_EV_QUIC_INITIAL = 2,   /* UDP datagram starting with a QUIC long header */
	LT_EV_DNS = 3,            /* DNS message to or from port 53 (UDP or TCP), see lt_flow.h */
	LT_EV_ENFORCE = 4,        /* struct lt_decision: a block / would-block verdict */
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
	__u32 uid;                /* socket owner uid on egress, LT_NO_UID otherwise */
	__u32 flags;              /* enum lt_flow_flag bits */
	__u32 probe_segs;         /* payload packets inspected for a TLS/QUIC start */
	__u32 last_sig;           /* signature of the last packet (mirror-port dedup) */
};

/* Volume counters for lt_totals (by direction) and lt_cgtot (by cgroup). */
struct lt_volume {
	__u64 bytes;
	__u64 packets;
};

/* Front cache of established flows (lt_fcache.h): for each CPU, two banks of
 * LT_FCACHE_SLOTS entries, bank = lt_fgen[0] & 1. A packet of a flow whose
 * entry is here is counted in the entry only (not in lt_flows nor lt_cgtot);
 * the kernel folds an entry into lt_flows and lt_cgtot when another flow takes
 * its slot, and the drain (controller/kernel/front_cache.py) flips the bank,
 * waits for running programs, then takes the idle bank: every byte is in
 * exactly one of lt_flows, lt_cgtot, an entry, or (drained egress) lt_cgdrained.
 * lt_fgen[1] counts the flows enforcement blocked (lt_enforce.h). */
#define LT_FCACHE_BITS 8
#define LT_FCACHE_SLOTS (1 << LT_FCACHE_BITS)
/* CPUs with front cache slots: the loader passes the possible CPUs (a CPU
 * beyond them has no cache, its packets take the flow map). */
#ifndef LT_NR_CPUS
#define LT_NR_CPUS 1
#endif

/* Value of lt_fcache: one flow's volume since its entry was filled. */
struct lt_fcache_ent {
	struct lt_flow_key key;   /* all zero: empty */
	__u64 bytes;              /* counted here only (not yet in lt_flows, lt_cgtot) */
	__u64 packets;
	__u64 first_seen_ns;      /* of the lt_flows slot it was filled from */
	__u32 uid;                /* as in lt_flow_val */
	__u32 flags;
	__u64 blk_seq;            /* 1 + lt_fgen[1] when this flow was last found not blocked
				   * (0: never looked up): lt_blocked is looked up again only
				   * after another block */
};

/* How far the kernel knows a followed hello (lt_hello_state.walk). */
enum lt_hello_walk {
	LT_HW_FOLLOW = 0,         /* walking record headers: end_seq is an upper bound */
	LT_HW_END = 1,            /* end_seq is the hello's exact end */
	LT_HW_BLIND = 2,          /* walk given up (counted): capture up to the bounds */
};

/* Reading a followed hello's server name (lt_hello_state.sni). */
enum lt_hello_sni {
	LT_HS_SNI_NONE = 0,       /* not read yet: a cut header (counted once the walk ends) */
	LT_HS_SNI_BUFFERING = 1,  /* its handshake message is collected in lt_hello_bufs */
	LT_HS_SNI_DONE = 2,       /* read and judged on the segment that completed it */
	LT_HS_SNI_GAVE_UP = 3,    /* not read; the give-up is counted */
};

/* A ClientHello being followed across segments (global, not per CPU). The
 * kernel walks the TLS record headers and the handshake header as they pass,
 * a byte at a time where a segment or record boundary cuts one, so the end is
 * exact however the hello is split into segments and records. */
struct lt_hello_state {
	__u64 created_ns;         /* the controller expires hellos never completed */
	__u32 start_seq;          /* sequence of the first record's first byte */
	__u32 next_seq;           /* highest sequence captured so far + 1 */
	__u32 end_seq;            /* one past the hello's last byte; an upper bound
				   * (start + LT_HELLO_MAX_BYTES) until walk is LT_HW_END */
	__u32 walk_seq;           /* sequence of the next byte the walker reads */
	__u32 rec_left;           /* body bytes of the current record not walked; while
				   * hdr_got < 5, the record length bytes read so far */
	__u32 msg_left;           /* handshake body bytes not walked; while hs_got < 4,
				   * the handshake length bytes read so far */
	__u32 segs;               /* segments captured */
	__u8 hdr_got;             /* bytes of the current record header read (5: in its body) */
	__u8 hs_got;              /* bytes of the handshake header read (4: length known) */
	__u8 walk;                /* enum lt_hello_walk */
	__u8 sni;                 /* enum lt_hello_sni: reading the server name */
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

/* ---- server name in the kernel and enforcement (issue 12) ---- */

/* A hello the kernel reads the server name of: handshake message bytes
 * buffered per CPU (single segment) or per flow (split over segments). Real
 * clients send 0.5-2 KiB (post-quantum key shares included); a longer one is
 * counted (LT_SNI_GIVEUP_TOO_LONG) and judged by address. Power of two. */
#define LT_HELLO_BUF 4096
/* Bytes copied per load into a hello buffer (the buffer has this much slack). */
#define LT_HELLO_COPY 1024
/* A host name (253) + its trailing dot + padding: map keys are the name bytes,
 * zero-padded to this size (never a hash: the sender picks the names). */
#define LT_NAME_MAX 256
/* Loop bounds of the name parser; a hello beyond them is counted (LT_SNI_GIVEUP_LIMIT). */
#define LT_SNI_EXT_MAX 64
#define LT_SNI_LIST_MAX 16
/* Split hellos whose bytes are being buffered (one record over several segments). */
#ifndef LT_HELLO_BUFS_MAX
#define LT_HELLO_BUFS_MAX 1024
#endif
#define LT_HELLO_BUFS_MAX_FLOOR 1
#define LT_HELLO_BUFS_MAX_CEIL 65536
/* Tenants (index + 1 in the config's list; 0: none) and policy sizes. */
#define LT_TENANTS_MAX 256
#define LT_POLICY_NAMES_MAX 65536
#define LT_POLICY_ALLOW_MAX 65536
#define LT_POLICY_CGROUPS_MAX 16384
#define LT_POLICY_UIDS_MAX 4096
#define LT_POLICY_CIDRS_MAX 4096
#define LT_CRM_ADDRS_MAX 65536
/* Flows whose hello was blocked: every later egress packet is dropped. LRU. */
#define LT_BLOCKED_MAX 16384
/* cgroup nesting levels searched for a tenant's ancestor cgroup */
#define LT_CGROUP_LEVELS 16

#if LT_OUT_OF_RANGE(LT_HELLO_BUFS_MAX, LT_HELLO_BUFS_MAX_FLOOR, LT_HELLO_BUFS_MAX_CEIL)
#error "LT_HELLO_BUFS_MAX out of range"
#endif

/* Tenant enforcement mode (tenants[].enforce). */
enum lt_enf_mode {
	LT_ENF_MONITOR = 0,
	LT_ENF_DRY_RUN = 1,
	LT_ENF_BLOCK = 2,
};

/* lt_tenant_policy.flags: the enforcement config's edge cases */
enum lt_enf_flag {
	LT_EF_QUIC_BLOCK = 1,     /* enforcement.quic: block */
	LT_EF_ECH_BLOCK = 2,      /* enforcement.ech: block */
	LT_EF_SHARED_BLOCK = 4,   /* enforcement.shared_hosts: block */
};

/* lt_decision.action; lt_decisions index is tenant * 2 + action - 1 */
enum lt_enf_action {
	LT_ACT_BLOCKED = 1,
	LT_ACT_WOULD_BLOCK = 2,
};

/* lt_decision.reason */
enum lt_enf_reason {
	LT_RSN_INSTANCE = 0,      /* a CRM instance outside the allow list */
	LT_RSN_SHARED = 1,        /* a shared vendor host (enforcement.shared_hosts: block) */
	LT_RSN_QUIC = 2,          /* a QUIC Initial to a CRM address */
	LT_RSN_ECH = 3,           /* an Encrypted Client Hello to a CRM address */
	LT_RSN_ADDRESS = 4,       /* no readable name, to a CRM address */
};

/* What the kernel's name parser found (lt_sni.h, lt_name_rec.outcome). */
enum lt_sni_outcome {
	LT_SNI_NAMED = 0,         /* a valid host_name */
	LT_SNI_NONE = 1,          /* a valid hello without a valid host_name */
	LT_SNI_BAD = 2,           /* a hello the user-space parser rejects */
	LT_SNI_LIMIT = 3,         /* beyond the parser's loop bounds: undecided */
};

/* Kernel-read server names, drained in batches by the controller (not the
 * ring): one per flow whose single-segment or split hello was read. Sized for
 * five seconds of 50,000 new flows/s: the agent drains names after the flows,
 * and on a loaded 2-CPU node that flow drain alone took 0.9-2 s of a poll
 * (perf/bench_kernel_naming.py); a full map sends the hello to the ring.
 * Entries are allocated on use (~330 B each), so an idle node pays nothing. */
#ifndef LT_NAMES_MAX
#define LT_NAMES_MAX 262144
#endif
#define LT_NAMES_MAX_FLOOR 16
#define LT_NAMES_MAX_CEIL 4194304
#if LT_OUT_OF_RANGE(LT_NAMES_MAX, LT_NAMES_MAX_FLOOR, LT_NAMES_MAX_CEIL)
#error "LT_NAMES_MAX out of range"
#endif

/* Value of lt_names (key: the hello's lt_flow_key). */
struct lt_name_rec {
	__u64 ts_ns;
	__u32 uid;
	__u32 ifindex;
	__u32 seq;                /* TCP sequence of the hello's first byte */
	__u16 name_len;           /* 0: no name (see outcome) */
	__u8 outcome;             /* enum lt_sni_outcome */
	__u8 ech;                 /* the hello carries encrypted_client_hello */
	__u8 name[LT_NAME_MAX];
};

/* lt_crm_name.kind */
enum lt_name_kind {
	LT_NK_NOT_CRM = 0,        /* an excluded name (www.zendesk.com): untouched */
	LT_NK_INSTANCE = 1,       /* names a CRM instance */
	LT_NK_SHARED = 2,         /* a shared vendor host */
};

/* Key of lt_crm_names: a whole host name, or ".<suffix>" of an
 * {instance}.<suffix> template, zero-padded. */
struct lt_name_key {
	__u8 name[LT_NAME_MAX];
};

struct lt_crm_name {
	__u32 vendor;             /* KernelPolicy's vendor index, from 1 */
	__u32 kind;               /* enum lt_name_kind */
};

/* Key of lt_allow: (tenant, vendor, host name); name all zero = every
 * instance of the vendor ("vendor:*"). */
struct lt_allow_key {
	__u32 tenant;
	__u32 vendor;
	__u8 name[LT_NAME_MAX];
};

/* Value of lt_tenant_pol (index: tenant); entry 0 is global: mode != 0 when
 * any tenant enforces (the hello path looks no further otherwise). */
struct lt_tenant_policy {
	__u32 mode;               /* enum lt_enf_mode */
	__u32 flags;              /* enum lt_enf_flag bits */
};

/* Value of lt_ten_cg (key: cgroup id). */
struct lt_tenant_ref {
	__u32 tenant;
	__u32 subtree;            /* 1: the tenant's glob covers every descendant cgroup */
};

/* Keys of the source-CIDR tries (prefixlen counts the address bits). */
struct lt_cidr4_key {
	__u32 prefixlen;
	__u8 addr[4];
};

struct lt_cidr6_key {
	__u32 prefixlen;
	__u8 addr[16];
};

/* Key of lt_crm_addrs: an address the DNS cache or catalogue names a CRM's. */
struct lt_addr_key {
	__u32 family;             /* 4 or 6 */
	__u32 addr[4];            /* as in lt_flow_key */
};

/* Value of lt_blocked (key: lt_flow_key of the blocked flow). */
struct lt_blocked_flow {
	__u64 ts_ns;
	__u32 tenant;
	__u32 reason;
};

/* Value of lt_hello_bufs: a split hello's handshake message as it arrives. */
struct lt_hello_buf {
	__u32 msg_len;            /* handshake message length, header included */
	__u32 got;                /* contiguous bytes of it buffered */
	__u8 msg[LT_HELLO_BUF + LT_HELLO_COPY];
};

/* A block or would-block verdict, sent on lt_events (kind LT_EV_ENFORCE).
 * The first 20 bytes are laid out as in struct lt_event, so the consumer
 * tells the kinds apart at the same offset. */
struct lt_decision {
	__u64 ts_ns;
	__u64 cgroup_id;
	__u32 kind;               /* LT_EV_ENFORCE */
	__u32 ifindex;
	__u32 saddr[4];
	__u32 daddr[4];
	__u16 sport;
	__u16 dport;
	__u8 family;
	__u8 proto;
	__u8 action;              /* enum lt_enf_action */
	__u8 reason;              /* enum lt_enf_reason */
	__u32 tenant;
	__u32 vendor;             /* 0: not a CRM name (ECH, QUIC, address) */
	__u32 uid;
	__u16 name_len;           /* bytes of name[]: the server name, lower case */
	__u16 inst_len;           /* leading bytes of name[] that are the instance label */
	__u8 name[LT_NAME_MAX];
};

/* What the tail program (lt_tc_hello) is to do with the packet that called it. */
enum lt_hello_job_kind {
	LT_JOB_WHOLE = 1,         /* read the hello in this segment (arg: message length) */
	LT_JOB_BUFFERED = 2,      /* read the hello completed in lt_hello_bufs */
	LT_JOB_NAMELESS = 3,      /* judge by address (arg: enum lt_enf_reason) */
};

/* A job handed from the TC egress program to its tail program (per CPU). */
struct lt_hello_job {
	struct lt_flow_key key;
	__u32 kind;               /* enum lt_hello_job_kind */
	__u32 arg;
	__u32 payload_off;
	__u32 payload_len;
	__u32 seq;                /* the hello's first sequence */
	__u32 uid;
	__u32 ifindex;
	__u32 tcp_flags;
};

/* Per-CPU scratch of the hello path: the handshake message being read and
 * the keys built from its name (all too large for the stack). */
struct lt_sni_scratch {
	struct lt_hello_job job;
	struct lt_hello_buf buf;  /* a single-segment hello, or a split one's first part */
	struct lt_allow_key akey; /* akey.name: the parsed name, zero-padded */
	struct lt_allow_key wkey; /* (tenant, vendor, zero): the vendor wildcard */
	struct lt_name_key nkey;
	struct lt_decision dec;
	struct lt_name_rec rec;
	__u32 name_len;
	__u32 ech;                /* the hello carries encrypted_client_hello */
	__u32 outcome;            /* enum lt_sni_outcome of the hello read (between tail programs) */
	__u32 name_off;           /* the host_name entry sni_parse found: offset in the message */
	__u32 name_raw;           /* and its length as sent */
};

/* ---- TLS plaintext (ssl_uprobe.bpf.c): its own object, maps and counters ---- */

/* Plaintext bytes one event carries: the config's plaintext.max_bytes
 * (default 4096, at most 16384 = one TLS record). A longer write is sent as
 * successive chunks of this size, each with its offset in the write. */
#ifndef LT_SSL_SNAP
#define LT_SSL_SNAP 4096
#endif
#define LT_SSL_SNAP_FLOOR 64
#define LT_SSL_SNAP_CEIL 16384
/* Chunks one write may send (a compile-time loop bound the verifier walks):
 * 64 x 4 KiB = 256 KiB of a write in full. A longer write sends its first
 * and its last LT_SSL_CHUNKS_MAX/2 chunks; the middle is counted as lost
 * (LT_SSL_LOST_CHUNK_BOUND) per connection. */
#ifndef LT_SSL_CHUNKS_MAX
#define LT_SSL_CHUNKS_MAX 64  /* the verifier walks ~3.4k insns per chunk: at most 128 */
#endif
#define LT_SSL_CHUNKS_MAX_FLOOR 2
#define LT_SSL_CHUNKS_MAX_CEIL 128
/* Plaintext ring buffer in pages (power of two). 256 pages = 1 MiB hold
 * ~250 full 4 KiB events, i.e. 25 ms of a 10k events/s burst before the
 * controller's drain (woken by epoll) catches up. */
#ifndef LT_SSL_RINGBUF_PAGES
#define LT_SSL_RINGBUF_PAGES 256
#endif
#define LT_SSL_RINGBUF_PAGES_FLOOR 1
#define LT_SSL_RINGBUF_PAGES_CEIL 65536
#define LT_SSL_RINGBUF_PAGES_POW2 1
/* Plaintext events (chunks) per second per process: a token bucket that
 * refills at this rate and holds at most one second of it. A CRM connector
 * makes at most a few hundred API calls a second; 2000 chunks of 4 KiB are
 * 8 MiB/s of plaintext. A write the bucket cannot cover in full spends what
 * is left on its first and last chunks; the rest is counted as lost. */
#ifndef LT_SSL_EVENTS_PER_SEC
#define LT_SSL_EVENTS_PER_SEC 2000
#endif
#define LT_SSL_EVENTS_PER_SEC_FLOOR 1
#define LT_SSL_EVENTS_PER_SEC_CEIL 1000000
/* Processes with rate-limit state. LRU: an evicted process only starts a
 * fresh window, so eviction loses nothing. */
#ifndef LT_SSL_PROCS_MAX
#define LT_SSL_PROCS_MAX 4096
#endif
#define LT_SSL_PROCS_MAX_FLOOR 1
#define LT_SSL_PROCS_MAX_CEIL 16777216
/* SSL objects with a known socket fd (SSL_set_fd, or learned from the next
 * send syscall). LRU: an evicted connection is learned again from its next
 * write's send syscall (LT_SSL_CNT_BIND counts each learning). 16k open TLS
 * connections x 24 B = 384 KiB. */
#ifndef LT_SSL_CONNS_MAX
#define LT_SSL_CONNS_MAX 16384
#endif
#define LT_SSL_CONNS_MAX_FLOOR 1
#define LT_SSL_CONNS_MAX_CEIL 16777216
/* Threads between an SSL_write on an SSL object without a known fd and
 * their next send syscall. An entry lives microseconds; LRU, overwritten by
 * the thread's next write. */
#ifndef LT_SSL_THREADS_MAX
#define LT_SSL_THREADS_MAX 4096
#endif
#define LT_SSL_THREADS_MAX_FLOOR 1
#define LT_SSL_THREADS_MAX_CEIL 16777216
/* Selected processes whose exit the controller wants to hear of. */
#ifndef LT_SSL_PIDS_MAX
#define LT_SSL_PIDS_MAX 16384
#endif
/* write(2) calls on a thread with a pending SSL object that are not TLS
 * records (a log line between SSL_write and the send) before giving up. */
#define LT_SSL_BIND_TRIES 4

#if LT_OUT_OF_RANGE(LT_SSL_SNAP, LT_SSL_SNAP_FLOOR, LT_SSL_SNAP_CEIL)
#error "LT_SSL_SNAP out of range"
#endif
#if LT_OUT_OF_RANGE(LT_SSL_CHUNKS_MAX, LT_SSL_CHUNKS_MAX_FLOOR, LT_SSL_CHUNKS_MAX_CEIL)
#error "LT_SSL_CHUNKS_MAX out of range"
#endif
#if LT_OUT_OF_RANGE(LT_SSL_RINGBUF_PAGES, LT_SSL_RINGBUF_PAGES_FLOOR, LT_SSL_RINGBUF_PAGES_CEIL) || \
	(LT_SSL_RINGBUF_PAGES & (LT_SSL_RINGBUF_PAGES - 1))
#error "LT_SSL_RINGBUF_PAGES must be a power of two in range"
#endif
#if LT_OUT_OF_RANGE(LT_SSL_EVENTS_PER_SEC, LT_SSL_EVENTS_PER_SEC_FLOOR, LT_SSL_EVENTS_PER_SEC_CEIL)
#error "LT_SSL_EVENTS_PER_SEC out of range"
#endif
#if LT_OUT_OF_RANGE(LT_SSL_PROCS_MAX, LT_SSL_PROCS_MAX_FLOOR, LT_SSL_PROCS_MAX_CEIL) || \
	LT_OUT_OF_RANGE(LT_SSL_CONNS_MAX, LT_SSL_CONNS_MAX_FLOOR, LT_SSL_CONNS_MAX_CEIL) || \
	LT_OUT_OF_RANGE(LT_SSL_THREADS_MAX, LT_SSL_THREADS_MAX_FLOOR, LT_SSL_THREADS_MAX_CEIL)
#error "LT_SSL_PROCS_MAX, LT_SSL_CONNS_MAX or LT_SSL_THREADS_MAX out of range"
#endif

/* Index of lt_ssl_stats (per-CPU, monotonic), exported as ssl_<name>. */
enum lt_ssl_stat {
	LT_SSL_CNT_WRITE = 0,       /* SSL_write/SSL_write_ex calls that wrote (Go: calls) */
	LT_SSL_CNT_EVENT,           /* plaintext events delivered */
	LT_SSL_CNT_BIND,            /* SSL object -> fd bindings learned from a send syscall */
	LT_SSL_CNT_SET_FD,          /* SSL_set_fd calls probed */
	LT_SSL_CNT_EXEC,            /* exec notifications delivered */
	LT_SSL_CNT_EXIT,            /* exit notifications of selected processes delivered */
	LT_SSL_CNT_EMPTY,           /* writes of 0 bytes (or negative SSL_write lengths) */
	LT_SSL_LOSS_RINGBUF_FULL,   /* ring buffer reservation failed */
	LT_SSL_LOSS_RATE_LIMITED,   /* chunk not sent: the process's budget was spent */
	LT_SSL_LOSS_CHUNK_BOUND,    /* write longer than LT_SSL_CHUNKS_MAX chunks: middle lost */
	LT_SSL_LOSS_READ_USER,      /* bpf_probe_read_user of the buffer failed */
	LT_SSL_LOSS_BIND_EVENT,     /* a binding could not be sent (ring buffer full) */
	LT_SSL_LOSS_NOTIFY,         /* an exec/exit/mmap notification could not be sent */
	LT_SSL_LOSS_BIND_GIVEUP,    /* no TLS-looking send within LT_SSL_BIND_TRIES writes */
	LT_SSL_LOSS_LOST_RECORD,    /* a connection's lost bytes could not be recorded */
	LT_SSL_CNT_BYTES_WRITTEN,   /* plaintext bytes the probed writes asked to send */
	LT_SSL_CNT_BYTES_CAPTURED,  /* plaintext bytes delivered in events */
	LT_SSL_CNT_MMAP,            /* executable file mappings notified */
	/* TLS reads (SSL_read/SSL_read_ex): the from_crm direction */
	LT_SSL_CNT_READ,            /* SSL_read/SSL_read_ex calls that returned plaintext */
	LT_SSL_CNT_BYTES_READ,      /* plaintext bytes the probed reads returned */
	LT_SSL_CNT_BYTES_READ_CAPTURED, /* of which delivered in events */
	LT_SSL_LOSS_READ_UNMATCHED, /* a read returned without its call seen (or evicted) */
	LT_SSL_LOSS_READ_LENGTH,    /* SSL_read_ex's *readbytes unreadable: the read is unseen */
	/* Go crypto/tls (ssl_go.bpf.c) */
	LT_SSL_CNT_GO_FD,           /* a Go Conn's socket fd read from its net.TCPConn */
	LT_SSL_LOSS_GO_FD,          /* a Go Conn's fd unreadable: learned from the send instead */
	LT_SSL_LOSS_GO_UNMATCHED,   /* a Go Read returned without its call seen (or evicted) */
	LT_SSL_CNT_FORK,            /* fork notifications of selected processes delivered */
	LT_SSL_CNT_WRITE_NOTHING,   /* SSL_write calls that wrote nothing (want read/write:
	                             * retried with the same buffer; or an error) */
	LT_SSL_LOSS_WRITE_UNMATCHED, /* a write returned without its call seen (or evicted) */
	LT_SSL_STAT_MAX,
};

/* Why bytes of a write were not captured: index of lt_ssl_lost.bytes[]. */
enum lt_ssl_lost_reason {
	LT_SSL_LOST_RATE_LIMITED = 0, /* whole write dropped: no budget left */
	LT_SSL_LOST_BUDGET,         /* middle of a write skipped: budget short */
	LT_SSL_LOST_CHUNK_BOUND,    /* middle of a write beyond LT_SSL_CHUNKS_MAX chunks */
	LT_SSL_LOST_RINGBUF_FULL,   /* chunk not sent: ring buffer full */
	LT_SSL_LOST_READ_USER,      /* chunk not readable from user memory */
	LT_SSL_LOST_MAX,
};

/* Kind of an lt_ssl_events record. */
enum lt_ssl_event_kind {
	LT_SSL_EV_WRITE = 1,        /* one chunk of one SSL_write/SSL_write_ex */
	LT_SSL_EV_BIND = 2,         /* ssl_ptr now writes to fd (learned from a send syscall) */
	LT_SSL_EV_EXEC = 3,         /* a process called execve: the controller checks selection */
	LT_SSL_EV_EXIT = 4,         /* a selected process exited: detach its probes */
	LT_SSL_EV_MMAP = 5,         /* a process mapped a file executable: look for libssl */
	LT_SSL_EV_READ = 6,         /* one chunk of what one SSL_read/SSL_read_ex returned */
	LT_SSL_EV_FORK = 7,         /* a selected process made a process (tgid: the child) */
};

/* Direction of a connection's plaintext: lt_ssl_key.dir, and an event's kind
 * (LT_SSL_EV_WRITE / LT_SSL_EV_READ). */
enum lt_ssl_dir {
	LT_SSL_DIR_WRITE = 0,       /* written by the process: to_crm */
	LT_SSL_DIR_READ = 1,        /* read by the process: from_crm */
};

/* Key of lt_ssl_fds: an SSL object in one process (pointers repeat across processes).
 * In lt_ssl_lost, dir tells the direction of the lost bytes; 0 everywhere else. */
struct lt_ssl_key {
	__u64 ssl_ptr;
	__u32 tgid;
	__u32 dir;                  /* enum lt_ssl_dir */
};

/* Value of lt_ssl_reads (key: pid_tgid): an SSL_read/SSL_read_ex call between
 * its entry and its return. */
struct lt_ssl_read_call {
	__u64 ssl_ptr;
	__u64 buf;                  /* the caller's buffer: filled when the call returns */
	__u64 readbytes;            /* SSL_read_ex's size_t *readbytes; 0 for SSL_read */
};

/* Value of lt_ssl_writes (key: pid_tgid): an SSL_write/SSL_write_ex call between
 * its entry and its return, where its bytes are captured (as many as it wrote). */
struct lt_ssl_write_call {
	__u64 ssl_ptr;
	__u64 buf;                  /* the caller's buffer */
	__u64 len;                  /* bytes asked to write */
	__u64 written;              /* SSL_write_ex's size_t *written; 0 for SSL_write */
};

/* Value of lt_ssl_fds. */
struct lt_ssl_sock {
	__s32 fd;
	__u32 via_set_fd;           /* 1: SSL_set_fd (trusted); 0: learned from a send */
};

/* Value of lt_ssl_pend: the thread's last SSL_write whose fd is not known yet. */
struct lt_ssl_pending {
	__u64 ssl_ptr;
	__u32 tries;                /* write(2) calls seen that were not TLS records */
	__u32 pad;
};

/* Value of lt_ssl_budget: a process's token bucket of plaintext chunks. */
struct lt_ssl_budget {
	__u64 refill_ns;            /* when tokens were last refilled */
	__s64 tokens;               /* may dip below 0 when threads race: read as 0 */
};

/* Value of lt_ssl_plan (per CPU): the chunks one write sends. Kept in map
 * memory, which the verifier does not track by value, so the chunk loop's
 * states converge and its cost stays linear in LT_SSL_CHUNKS_MAX. */
struct lt_ssl_plan {
	__u64 tail_start;           /* offset of the first tail chunk */
	__u64 planned;              /* bytes the chunks cover */
	__u32 take;                 /* chunks to send */
	__u32 head;                 /* of which from offset 0 on; the rest end at the write's end */
};

/* Value of lt_ssl_lost (key lt_ssl_key: one connection): plaintext bytes the
 * kernel did not deliver, by enum lt_ssl_lost_reason, plus who wrote them.
 * The controller drains it (lookup and delete) once a second. */
struct lt_ssl_lost {
	__u64 bytes[LT_SSL_LOST_MAX];
	__u64 writes;               /* writes (reads, for dir 1) with at least one byte lost */
	__u64 cgroup_id;
	__u32 uid;
	__s32 fd;                   /* socket fd of the connection, -1 if not known */
	char comm[16];
};

/* One lt_ssl_events record: header plus cap_len plaintext bytes of a write
 * (or of a read: kind LT_SSL_EV_READ, req_len the bytes it returned),
 * starting at data_off within it. Only LT_SSL_EVENT_HDR_SIZE + cap_len
 * bytes are submitted. For LT_SSL_EV_MMAP, data_off is the mapping address. */
struct lt_ssl_event {
	__u64 ts_ns;
	__u64 cgroup_id;
	__u64 ssl_ptr;
	__u64 req_len;              /* bytes the application asked to write */
	__u64 data_off;             /* offset of data[0] within the write */
	__u32 kind;                 /* enum lt_ssl_event_kind */
	__u32 pid;                  /* thread id */
	__u32 tgid;                 /* process id */
	__u32 uid;
	__s32 fd;                   /* socket fd of ssl_ptr, -1 if not known yet */
	__u32 cap_len;              /* bytes of data[] that are filled */
	char comm[16];
	__u8 data[LT_SSL_SNAP];
};

#define LT_SSL_EVENT_HDR_SIZE __builtin_offsetof(struct lt_ssl_event, data)

#endif /* __LT_TYPES_H */
