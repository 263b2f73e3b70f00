/* SPDX-License-Identifier: GPL-2.0 OR Apache-2.0 */
/*
 * ssl_uprobe.bpf.c - the first bytes of TLS plaintext written through OpenSSL.
 *
 * Uprobes on SSL_write and SSL_write_ex (OpenSSL 3 and CPython call the _ex
 * form) copy each write to lt_ssl_events in chunks of LT_SSL_SNAP bytes, each
 * with its offset in the write, the process, its cgroup and the SSL object.
 * A per-process token bucket (LT_SSL_EVENTS_PER_SEC chunks/s) bounds the
 * cost; a write it cannot cover in full spends what is left on its first and
 * last chunks, and every byte not delivered is added to lt_ssl_lost for its
 * connection and reason, which the controller drains and reports. The controller joins an
 * SSL object to its socket through the fd: SSL_set_fd gives it directly;
 * for BIO users (curl's own BIO, memory BIOs as in asyncio) the thread's
 * next send syscall carrying a TLS record does.
 *
 * WARNING, overhead: a uprobe traps into the kernel on every call of the
 * probed function in every process whose probe covers it (~1-2 us per call
 * here, about half the rate of a tight 4 KiB write loop even for a
 * count-only program). The controller therefore attaches these per selected
 * process; `select: all` makes every process that maps libssl pay it. The
 * syscall and sched tracepoints below run for every process on the host,
 * but only do one hash lookup for threads without a pending SSL write; the
 * mmap tracepoints test the protection bits first and report executable
 * file mappings (of probed processes, or of all with LT_SSL_MMAP_ALL).
 */
#include <uapi/linux/ptrace.h>
#include <linux/sched.h>
#include <linux/socket.h>
#include <linux/uio.h>

#include "lt_types.h"

/* Not pinned: the events are transient and the counters restart with the
 * controller, whose loss monitor starts from the first reading. */
BPF_RINGBUF_OUTPUT(lt_ssl_events, LT_SSL_RINGBUF_PAGES);
BPF_TABLE("percpu_array", __u32, __u64, lt_ssl_stats, LT_SSL_STAT_MAX);
/* Events are built here (too large for the 512-byte stack); see ssl_emit. */
BPF_TABLE("percpu_array", __u32, struct lt_ssl_event, lt_ssl_scratch, 1);
BPF_TABLE("percpu_array", __u32, struct lt_ssl_plan, lt_ssl_plan, 1);
/* when this CPU last woke the controller for chunks (see ssl_emit) */
BPF_TABLE("percpu_array", __u32, __u64, lt_ssl_wake, 1);
/* exec/mmap notices per process and second (struct lt_rate window) */
BPF_TABLE("lru_hash", __u32, struct lt_rate, lt_ssl_rate, LT_SSL_PROCS_MAX);
/* plaintext chunks per process: token bucket; LRU eviction refills a bucket */
BPF_TABLE("lru_hash", __u32, struct lt_ssl_budget, lt_ssl_budget, LT_SSL_PROCS_MAX);
/* bytes not delivered, per connection; drained by the controller every second */
BPF_TABLE("lru_hash", struct lt_ssl_key, struct lt_ssl_lost, lt_ssl_lost, LT_SSL_CONNS_MAX);
/* thread -> fd of an executable file mmap in flight (enter -> exit) */
BPF_TABLE("lru_hash", __u32, __s32, lt_ssl_mmaps, LT_SSL_THREADS_MAX);
BPF_TABLE("lru_hash", struct lt_ssl_key, struct lt_ssl_sock, lt_ssl_fds, LT_SSL_CONNS_MAX);
BPF_TABLE("lru_hash", __u32, struct lt_ssl_pending, lt_ssl_pend, LT_SSL_THREADS_MAX);
/* tgid -> 1 for the processes the controller probes (written by it). */
BPF_TABLE("hash", __u32, __u8, lt_ssl_pids, LT_SSL_PIDS_MAX);

#ifndef LT_SSL_MMAP_ALL
#define LT_SSL_MMAP_ALL 0   /* 1 with `select: all`: every process's mappings matter */
#endif
#define LT_PROT_EXEC 0x4
#define LT_MAP_ANONYMOUS 0x20
#define LT_CLONE_THREAD 0x10000
#define LT_NSEC_PER_SEC 1000000000ULL
/* Chunks wake the controller at most this often per CPU: one wakeup (two
 * context switches and a poll) per event cost the writer more than the
 * probe itself at thousands of events/s. The ring holds about 250 full
 * chunks, 10 ms of 25,000 chunks/s. */
#ifndef LT_SSL_WAKE_NS
#define LT_SSL_WAKE_NS 10000000ULL
#endif
/* Depth of a process's chunk bucket: one second of LT_SSL_EVENTS_PER_SEC.
 * Not bounded by the ring buffer: a tiny write costs a whole token, and a
 * request written a byte at a time must fit (a full ring is counted and
 * reported per connection like any other loss). */
#define LT_SSL_BURST LT_SSL_EVENTS_PER_SEC

/* TLS record content types 20..24 (ChangeCipherSpec .. Heartbeat), version 3.x */
#define TLS_TYPE_MIN 20
#define TLS_TYPE_MAX 24
#define TLS_MAJOR 3

/**
 * ssl_stat_inc - count one occurrence of @reason (enum lt_ssl_stat)
 * Uprobe programs can be preempted by another task on the same CPU, so the
 * per-CPU slot is still updated atomically.
 */
static __always_inline void ssl_stat_inc(__u32 reason)
{
	__u64 *c = lt_ssl_stats.lookup(&reason);

	if (c)
		__sync_fetch_and_add(c, 1);
}

/* ssl_stat_add - add @n to the counter @reason (enum lt_ssl_stat) */
static __always_inline void ssl_stat_add(__u32 reason, __u64 n)
{
	__u64 *c = lt_ssl_stats.lookup(&reason);

	if (c)
		__sync_fetch_and_add(c, n);
}

/**
 * ssl_rate_allowed - per-process window of LT_SSL_EVENTS_PER_SEC notices/second
 * @tgid: the process that exec'd or mapped a file
 * Returns 1 when a notice may be sent; counts LT_SSL_LOSS_NOTIFY otherwise
 * (the controller's periodic rescan catches up).
 * Two threads resetting the window at once only grant a few extra events.
 */
static __always_inline int ssl_rate_allowed(__u32 tgid)
{
	__u64 now = bpf_ktime_get_ns();
	struct lt_rate *r = lt_ssl_rate.lookup(&tgid);

	if (!r) {
		struct lt_rate fresh = { .window_ns = now, .count = 1 };

		/* a full LRU evicts an idle process's window: nothing is lost */
		lt_ssl_rate.update(&tgid, &fresh);
		return 1;
	}
	if (now - r->window_ns >= 1000000000ULL) {
		r->window_ns = now;
		r->count = 0;
	}
	if (__sync_fetch_and_add(&r->count, 1) >= LT_SSL_EVENTS_PER_SEC) {
		ssl_stat_inc(LT_SSL_LOSS_NOTIFY);
		return 0;
	}
	return 1;
}

/**
 * ssl_budget_take - take up to @want chunks from @tgid's token bucket
 * @floor: tokens this caller must leave in the bucket (a constant: 0 for
 *         writes; reads leave half of it, so a process reading a lot cannot
 *         starve the inspection of what it sends)
 * Returns the chunks granted (0..@want). The bucket refills at
 * LT_SSL_EVENTS_PER_SEC per second up to LT_SSL_BURST; refill_ns
 * advances by whole tokens only, so no fraction is lost between calls.
 * Tokens are taken atomically; racing refills may grant a few extra.
 */
static __always_inline __u32 ssl_budget_take(__u32 tgid, __u32 want, __s64 floor)
{
	__u64 now = bpf_ktime_get_ns();
	struct lt_ssl_budget *b = lt_ssl_budget.lookup(&tgid);
	__s64 before;

	if (!b) {
		__s64 grant = want < LT_SSL_BURST - floor ? want : LT_SSL_BURST - floor;
		struct lt_ssl_budget fresh = { .refill_ns = now, .tokens = LT_SSL_BURST - grant };

		lt_ssl_budget.update(&tgid, &fresh);
		return (__u32)grant;
	}
	__u64 elapsed = now - b->refill_ns;

	if (elapsed >= LT_NSEC_PER_SEC) {
		b->tokens = LT_SSL_BURST;
		b->refill_ns = now;
	} else {
		__u64 add = elapsed * LT_SSL_EVENTS_PER_SEC / LT_NSEC_PER_SEC;

		if (add) {
			__s64 t = b->tokens + (__s64)add;

			b->tokens = t > LT_SSL_BURST ? LT_SSL_BURST : t;
			b->refill_ns += add * LT_NSEC_PER_SEC / LT_SSL_EVENTS_PER_SEC;
		}
	}
	/* the flooding path: a plain read, no atomic, when the bucket is empty */
	if (b->tokens <= floor)
		return 0;
	before = __sync_fetch_and_add(&b->tokens, -(__s64)want) - floor;
	if (before >= (__s64)want)
		return want;
	/* give back what could not be granted */
	__u32 granted = before > 0 ? (__u32)before : 0;

	__sync_fetch_and_add(&b->tokens, (__s64)(want - granted));
	return granted;
}

/**
 * ssl_lost_add - record @bytes of a connection's plaintext not delivered
 * @key: the connection (SSL object, process)
 * @fd: its socket fd if known, else -1
 * @reason: enum lt_ssl_lost_reason
 * @first: 1 for the first loss of this write (counts the write)
 */
static __always_inline void ssl_lost_add(struct lt_ssl_key *key, __s32 fd, __u32 reason,
					 __u64 bytes, int first)
{
	struct lt_ssl_lost *l;

	if (reason >= LT_SSL_LOST_MAX || bytes == 0)
		return;
	l = lt_ssl_lost.lookup(key);
	if (!l) {
		struct lt_ssl_lost fresh = {};

		fresh.cgroup_id = bpf_get_current_cgroup_id();
		fresh.uid = (__u32)bpf_get_current_uid_gid();
		fresh.fd = fd;
		bpf_get_current_comm(fresh.comm, sizeof(fresh.comm));
		lt_ssl_lost.update(key, &fresh);
		l = lt_ssl_lost.lookup(key);
		if (!l) {
			ssl_stat_inc(LT_SSL_LOSS_LOST_RECORD);
			return;
		}
	}
	if (fd >= 0)
		l->fd = fd;
	__sync_fetch_and_add(&l->bytes[reason], bytes);
	if (first)
		__sync_fetch_and_add(&l->writes, 1);
}

/**
 * ssl_event_init - fill the header of the per-CPU scratch event
 * @kind: enum lt_ssl_event_kind
 * Returns the event, or NULL if the scratch slot is missing (cannot happen
 * for a one-entry array; the callers count it as their loss reason).
 */
static __always_inline struct lt_ssl_event *ssl_event_init(__u32 kind, __u64 ssl_ptr, __s32 fd)
{
	__u32 zero = 0;
	struct lt_ssl_event *e = lt_ssl_scratch.lookup(&zero);
	__u64 pid_tgid = bpf_get_current_pid_tgid();

	if (!e)
		return NULL;
	e->ts_ns = bpf_ktime_get_ns();
	e->cgroup_id = bpf_get_current_cgroup_id();
	e->ssl_ptr = ssl_ptr;
	e->req_len = 0;
	e->data_off = 0;
	e->kind = kind;
	e->pid = (__u32)pid_tgid;
	e->tgid = pid_tgid >> 32;
	e->uid = (__u32)bpf_get_current_uid_gid();
	e->fd = fd;
	e->cap_len = 0;
	bpf_get_current_comm(e->comm, sizeof(e->comm));
	return e;
}

/**
 * ssl_emit - copy the filled part of @e to the ring buffer
 * @loss: reason counted when the ring buffer is full
 * The scratch slot is per CPU; a uprobe preempted between init and emit by
 * another probed task on the same CPU could see its header overwritten. The
 * window is a few hundred instructions; the cost of a per-event allocation
 * (reserving LT_SSL_SNAP for every write) would be a 4x smaller ring.
 */
static __always_inline int ssl_emit(struct lt_ssl_event *e, __u32 loss)
{
	__u32 len = e->cap_len;
	__u32 zero = 0;
	__u64 *woke = NULL;
	__u64 flags = BPF_RB_FORCE_WAKEUP;

	if (len > LT_SSL_SNAP)
		len = LT_SSL_SNAP;
	/* chunks wake the controller at most every LT_SSL_WAKE_NS per CPU (it drains
	 * the rest at its next wakeup or poll timeout); notices wake it at once */
	if (e->kind == LT_SSL_EV_WRITE || e->kind == LT_SSL_EV_READ) {
		woke = lt_ssl_wake.lookup(&zero);
		if (woke && e->ts_ns - *woke < LT_SSL_WAKE_NS)
			flags = BPF_RB_NO_WAKEUP;
	}
	if (lt_ssl_events.ringbuf_output(e, LT_SSL_EVENT_HDR_SIZE + len, flags) != 0) {
		ssl_stat_inc(loss);
		return -1;
	}
	if (woke && flags == BPF_RB_FORCE_WAKEUP)
		*woke = e->ts_ns;
	return 0;
}

/**
 * ssl_capture - capture one write (or what one read returned) in chunks
 * @ssl: the SSL object (first argument)
 * @buf: the plaintext (second argument)
 * @len: bytes requested (a read: bytes returned)
 * @dir: enum lt_ssl_dir, a constant at every call site (the branches fold)
 *
 * The write is cut into LT_SSL_SNAP-byte chunks. With budget for all of
 * them (and at most LT_SSL_CHUNKS_MAX), each is sent in order; otherwise
 * the first ceil(take/2) and the last floor(take/2) chunks are sent and the
 * middle is counted as lost:
 *
 *   offset 0          head*SNAP             tail_start             len
 *   | head chunks ... |  lost (budget/bound) | ... tail chunks (full) |
 */
static __always_inline int ssl_capture(__u64 ssl, const void *buf, __u64 len, __u32 dir)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	struct lt_ssl_key key = {};
	struct lt_ssl_sock *sock;
	__s32 fd = -1;

	ssl_stat_inc(dir == LT_SSL_DIR_READ ? LT_SSL_CNT_READ : LT_SSL_CNT_WRITE);
	key.ssl_ptr = ssl;
	key.tgid = pid_tgid >> 32;
	sock = lt_ssl_fds.lookup(&key);
	if (sock)
		fd = sock->fd;
	if (len == 0) {
		ssl_stat_inc(LT_SSL_CNT_EMPTY);
		return 0;
	}
	ssl_stat_add(dir == LT_SSL_DIR_READ ? LT_SSL_CNT_BYTES_READ : LT_SSL_CNT_BYTES_WRITTEN, len);
	if (dir != LT_SSL_DIR_WRITE)  /* a write's key stays as zeroed: no store */
		key.dir = dir;  /* lt_ssl_lost keeps each direction's losses apart */

	__u64 needed = (len + LT_SSL_SNAP - 1) / LT_SSL_SNAP;
	__u32 want = needed > LT_SSL_CHUNKS_MAX ? LT_SSL_CHUNKS_MAX : (__u32)needed;
	__u32 take = ssl_budget_take(key.tgid, want,
				     dir == LT_SSL_DIR_READ ? LT_SSL_BURST / 2 : 0);

	if (take < want)
		ssl_stat_add(LT_SSL_LOSS_RATE_LIMITED, want - take);
	if (take == 0) {
		ssl_lost_add(&key, fd, LT_SSL_LOST_RATE_LIMITED, len, 1);
		return 0;
	}
	int first_loss = 1;
	__u32 head = take;
	__u64 tail_start = 0;
	__u64 planned = len;

	if (take < needed) {
		__u64 bound_lost = 0;

		head = (take + 1) / 2;
		tail_start = len - (__u64)(take - head) * LT_SSL_SNAP;
		planned = (__u64)take * LT_SSL_SNAP;
		if (needed > LT_SSL_CHUNKS_MAX) {
			ssl_stat_inc(LT_SSL_LOSS_CHUNK_BOUND);
			bound_lost = len - (__u64)LT_SSL_CHUNKS_MAX * LT_SSL_SNAP;
			ssl_lost_add(&key, fd, LT_SSL_LOST_CHUNK_BOUND, bound_lost, 1);
			first_loss = 0;
		}
		if (len - planned > bound_lost) {
			ssl_lost_add(&key, fd, LT_SSL_LOST_BUDGET, len - planned - bound_lost,
				     first_loss);
			first_loss = 0;
		}
	}

	__u32 zero = 0;
	struct lt_ssl_plan *plan = lt_ssl_plan.lookup(&zero);
	struct lt_ssl_event *e = ssl_event_init(
		dir == LT_SSL_DIR_READ ? LT_SSL_EV_READ : LT_SSL_EV_WRITE, ssl, fd);

	if (!e || !plan) {
		ssl_stat_inc(LT_SSL_LOSS_RINGBUF_FULL);
		ssl_lost_add(&key, fd, LT_SSL_LOST_RINGBUF_FULL, planned, first_loss);
		return 0;
	}
	e->req_len = len;
	plan->take = take;
	plan->head = head;
	plan->tail_start = tail_start;
	plan->planned = planned;

	/* The plan is re-read from map memory in every iteration (volatile):
	 * the verifier then knows nothing of take/head that could split its
	 * states per iteration. Every chunk before the last is full, so what
	 * was sent before chunk i is i * LT_SSL_SNAP. */
	for (__u32 i = 0; i < LT_SSL_CHUNKS_MAX; i++) {
		if (i >= *(volatile __u32 *)&plan->take)
			break;
		__u64 off = i < *(volatile __u32 *)&plan->head
			? (__u64)i * LT_SSL_SNAP
			: *(volatile __u64 *)&plan->tail_start +
			  (__u64)(i - *(volatile __u32 *)&plan->head) * LT_SSL_SNAP;
		__u64 left = len - off;
		__u32 n = left < LT_SSL_SNAP ? (__u32)left : LT_SSL_SNAP;

		/* the bound is re-stated for the verifier: n may not exceed data[] */
		if (n == 0 || n > LT_SSL_SNAP)
			break;
		e->data_off = off;
		e->cap_len = n;
		if (bpf_probe_read_user(e->data, n, (const char *)buf + off) != 0) {
			/* header-only event: the controller still sees the chunk */
			ssl_stat_inc(LT_SSL_LOSS_READ_USER);
			ssl_lost_add(&key, fd, LT_SSL_LOST_READ_USER, n, 0);
			e->cap_len = 0;
		}
		if (ssl_emit(e, LT_SSL_LOSS_RINGBUF_FULL) != 0) {
			ssl_lost_add(&key, fd, LT_SSL_LOST_RINGBUF_FULL,
				     *(volatile __u64 *)&plan->planned - (__u64)i * LT_SSL_SNAP,
				     first_loss);
			break;
		}
		ssl_stat_inc(LT_SSL_CNT_EVENT);
		ssl_stat_add(dir == LT_SSL_DIR_READ ? LT_SSL_CNT_BYTES_READ_CAPTURED
					   : LT_SSL_CNT_BYTES_CAPTURED, e->cap_len);
	}
	return 0;
}

/**
 * ssl_write_pending - a write on @ssl is starting on this thread
 * Its socket is learned from the send syscall it makes (ssl_send_seen) unless
 * SSL_set_fd told it; a binding learned from a send can go stale when the SSL
 * object's memory is reused for another connection: confirm it on every write.
 */
static __always_inline void ssl_write_pending(__u64 ssl)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	struct lt_ssl_key key = { .ssl_ptr = ssl, .tgid = pid_tgid >> 32 };
	struct lt_ssl_sock *sock = lt_ssl_fds.lookup(&key);
	__u32 tid = (__u32)pid_tgid;

	if (!sock || !sock->via_set_fd) {
		struct lt_ssl_pending p = { .ssl_ptr = ssl };

		lt_ssl_pend.update(&tid, &p);
	}
}

/* one write captured at its entry: ssl_go.bpf.c's tls.Conn.Write (Go has no
 * want-write retries, and a return probe must not be put in a Go function) */
static __always_inline int ssl_write_common(__u64 ssl, const void *buf, __u64 len)
{
	ssl_write_pending(ssl);
	return ssl_capture(ssl, buf, len, LT_SSL_DIR_WRITE);
}

/* ---- OpenSSL writes: entry remembers the call, the return captures what it wrote.
 * A call that returns "want write" (or "want read", as Node's during a
 * handshake) wrote nothing and is retried with the same buffer: captured at
 * the entry, each try would send the bytes again; captured at the return,
 * only the try that wrote counts, and only the bytes it wrote. */

/* thread (pid_tgid) -> its SSL_write/SSL_write_ex call in progress */
BPF_TABLE("lru_hash", __u64, struct lt_ssl_write_call, lt_ssl_writes, LT_SSL_THREADS_MAX);

static __always_inline int ssl_write_enter(struct pt_regs *ctx, __u64 len, __u64 written)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	struct lt_ssl_write_call call = {
		.ssl_ptr = PT_REGS_PARM1(ctx),
		.buf = PT_REGS_PARM2(ctx),
		.len = len,
		.written = written,
	};

	ssl_write_pending(call.ssl_ptr);
	lt_ssl_writes.update(&pid_tgid, &call);
	return 0;
}

/**
 * ssl_write_done - capture @n bytes of the thread's write call recorded at entry
 * A write of nothing (want read/write, an error) is counted; one whose entry
 * was not seen (probed mid-call, evicted) is counted as a loss.
 */
static __always_inline int ssl_write_done(__s64 n, int from_written)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	struct lt_ssl_write_call *c = lt_ssl_writes.lookup(&pid_tgid);
	struct lt_ssl_write_call call;
	__u64 wrote = 0;

	if (!c) {
		ssl_stat_inc(LT_SSL_LOSS_WRITE_UNMATCHED);
		return 0;
	}
	call = *c;
	lt_ssl_writes.delete(&pid_tgid);
	if (call.len == 0) {  /* a write of 0 bytes (or a negative length) */
		ssl_stat_inc(LT_SSL_CNT_EMPTY);
		return 0;
	}
	if (from_written) {
		if (n == 1 && call.written &&
		    bpf_probe_read_user(&wrote, sizeof(wrote), (const void *)call.written) != 0)
			wrote = 0;
	} else if (n > 0) {
		wrote = (__u64)n;
	}
	if (wrote == 0) {
		ssl_stat_inc(LT_SSL_CNT_WRITE_NOTHING);
		return 0;
	}
	if (wrote > call.len)  /* never more than the buffer it was given */
		wrote = call.len;
	return ssl_capture(call.ssl_ptr, (const void *)call.buf, wrote, LT_SSL_DIR_WRITE);
}

/* int SSL_write(SSL *ssl, const void *buf, int num) */
int lt_ssl_write(struct pt_regs *ctx)
{
	int num = (int)PT_REGS_PARM3(ctx);

	/* a negative num is an error in OpenSSL; nothing is written */
	return ssl_write_enter(ctx, num > 0 ? (__u64)num : 0, 0);
}

/* int SSL_write_ex(SSL *s, const void *buf, size_t num, size_t *written) */
int lt_ssl_write_ex(struct pt_regs *ctx)
{
	return ssl_write_enter(ctx, PT_REGS_PARM3(ctx), PT_REGS_PARM4(ctx));
}

/* SSL_write returned: > 0 is the bytes written; <= 0 nothing (want read/write, error) */
int lt_ssl_write_ret(struct pt_regs *ctx)
{
	return ssl_write_done((__s64)(int)PT_REGS_RC(ctx), 0);
}

/* SSL_write_ex returned: 1 with *written bytes written, 0 on failure */
int lt_ssl_write_ex_ret(struct pt_regs *ctx)
{
	return ssl_write_done((__s64)(int)PT_REGS_RC(ctx), 1);
}
/* ---- end of OpenSSL writes ---- */

/* int SSL_set_fd(SSL *s, int fd): the socket is known before any write */
int lt_ssl_set_fd(struct pt_regs *ctx)
{
	struct lt_ssl_key key = {};
	struct lt_ssl_sock sock = {};

	ssl_stat_inc(LT_SSL_CNT_SET_FD);
	key.ssl_ptr = PT_REGS_PARM1(ctx);
	key.tgid = bpf_get_current_pid_tgid() >> 32;
	sock.fd = (int)PT_REGS_PARM2(ctx);
	sock.via_set_fd = 1;
	lt_ssl_fds.update(&key, &sock);
	return 0;
}

/* ---- read side (issue 14.1): SSL_read / SSL_read_ex, the from_crm direction ----
 * The entry uprobe remembers the call's buffer (and SSL_read_ex's readbytes
 * pointer) per thread; the return uprobe captures the bytes the call actually
 * returned through ssl_capture, under the same per-process budget, chunking
 * and per-connection loss accounting as writes (lt_ssl_lost with dir 1).
 * Go's tls.Conn.Read (ssl_go.bpf.c) can call ssl_read_capture the same way. */

/* thread (pid_tgid) -> its SSL_read/SSL_read_ex call in progress */
BPF_TABLE("lru_hash", __u64, struct lt_ssl_read_call, lt_ssl_reads, LT_SSL_THREADS_MAX);

/* @n plaintext bytes a read returned into @buf on the connection @ssl */
static __always_inline int ssl_read_capture(__u64 ssl, const void *buf, __u64 n)
{
	return ssl_capture(ssl, buf, n, LT_SSL_DIR_READ);
}

static __always_inline int ssl_read_enter(struct pt_regs *ctx, __u64 readbytes)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	struct lt_ssl_read_call call = {
		.ssl_ptr = PT_REGS_PARM1(ctx),
		.buf = PT_REGS_PARM2(ctx),
		.readbytes = readbytes,
	};

	lt_ssl_reads.update(&pid_tgid, &call);
	return 0;
}

/**
 * ssl_read_call - take the thread's read call recorded at entry
 * Returns 0 with @call filled, -1 when the entry was not seen (the probe was
 * attached mid-call, or the LRU evicted it), counted.
 */
static __always_inline int ssl_read_call(struct lt_ssl_read_call *call)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	struct lt_ssl_read_call *c = lt_ssl_reads.lookup(&pid_tgid);

	if (!c) {
		ssl_stat_inc(LT_SSL_LOSS_READ_UNMATCHED);
		return -1;
	}
	*call = *c;
	lt_ssl_reads.delete(&pid_tgid);
	return 0;
}

/* int SSL_read(SSL *ssl, void *buf, int num) */
int lt_ssl_read(struct pt_regs *ctx)
{
	return ssl_read_enter(ctx, 0);
}

/* int SSL_read_ex(SSL *ssl, void *buf, size_t num, size_t *readbytes) */
int lt_ssl_read_ex(struct pt_regs *ctx)
{
	return ssl_read_enter(ctx, PT_REGS_PARM4(ctx));
}

/* SSL_read returned: > 0 is the bytes read; <= 0 an error, EOF or want-read */
int lt_ssl_read_ret(struct pt_regs *ctx)
{
	struct lt_ssl_read_call call;
	int n = (int)PT_REGS_RC(ctx);

	if (ssl_read_call(&call) != 0 || n <= 0)
		return 0;
	return ssl_read_capture(call.ssl_ptr, (const void *)call.buf, (__u64)n);
}

/* SSL_read_ex returned: 1 with *readbytes bytes read, 0 on failure */
int lt_ssl_read_ex_ret(struct pt_regs *ctx)
{
	struct lt_ssl_read_call call;
	__u64 n = 0;

	if (ssl_read_call(&call) != 0 || (int)PT_REGS_RC(ctx) != 1 || !call.readbytes)
		return 0;
	if (bpf_probe_read_user(&n, sizeof(n), (const void *)call.readbytes) != 0) {
		ssl_stat_inc(LT_SSL_LOSS_READ_LENGTH);
		return 0;
	}
	if (n == 0)
		return 0;
	return ssl_read_capture(call.ssl_ptr, (const void *)call.buf, n);
}
/* ---- end of the read side ---- */

/**
 * ssl_send_seen - a send-family syscall on a thread that may have a pending write
 * @fd: the syscall's fd
 * @data: user pointer to the first bytes sent
 * @socket_only: sendto/sendmsg (the fd is a socket); write(2) may be a file
 *
 * Binds the pending SSL object to @fd when the bytes start a TLS record.
 *
 *   TLS record header:  | type (20..24) | 0x03 | minor | length (2) |
 */
static __always_inline int ssl_send_seen(int fd, const void *data, int socket_only)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__u32 tid = (__u32)pid_tgid;
	struct lt_ssl_pending *p = lt_ssl_pend.lookup(&tid);
	__u8 hdr[2] = {};

	if (!p)
		return 0;
	if (!data || bpf_probe_read_user(hdr, sizeof(hdr), data) != 0 ||
	    hdr[0] < TLS_TYPE_MIN || hdr[0] > TLS_TYPE_MAX || hdr[1] != TLS_MAJOR) {
		/* not a TLS record: a log line, or a file; try the next send */
		if (socket_only || ++p->tries < LT_SSL_BIND_TRIES)
			return 0;
		ssl_stat_inc(LT_SSL_LOSS_BIND_GIVEUP);
		lt_ssl_pend.delete(&tid);
		return 0;
	}
	struct lt_ssl_key key = {};
	struct lt_ssl_sock *known;

	key.ssl_ptr = p->ssl_ptr;
	key.tgid = pid_tgid >> 32;
	lt_ssl_pend.delete(&tid);
	known = lt_ssl_fds.lookup(&key);
	if (known && known->fd == fd)
		return 0;
	struct lt_ssl_sock sock = { .fd = fd, .via_set_fd = 0 };
	lt_ssl_fds.update(&key, &sock);
	ssl_stat_inc(LT_SSL_CNT_BIND);

	struct lt_ssl_event *e = ssl_event_init(LT_SSL_EV_BIND, key.ssl_ptr, fd);
	if (!e) {
		ssl_stat_inc(LT_SSL_LOSS_BIND_EVENT);
		return 0;
	}
	ssl_emit(e, LT_SSL_LOSS_BIND_EVENT);
	return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_write)
{
	return ssl_send_seen((int)args->fd, (const void *)args->buf, 0);
}

TRACEPOINT_PROBE(syscalls, sys_enter_sendto)
{
	return ssl_send_seen((int)args->fd, (const void *)args->buff, 1);
}

TRACEPOINT_PROBE(syscalls, sys_enter_sendmsg)
{
	struct user_msghdr msg = {};
	struct iovec iov = {};
	__u32 tid = (__u32)bpf_get_current_pid_tgid();

	/* read the message only for threads with a pending write */
	if (!lt_ssl_pend.lookup(&tid))
		return 0;
	if (bpf_probe_read_user(&msg, sizeof(msg), args->msg) != 0 || !msg.msg_iov ||
	    bpf_probe_read_user(&iov, sizeof(iov), msg.msg_iov) != 0)
		return 0;
	return ssl_send_seen((int)args->fd, iov.iov_base, 1);
}

/* A new program image: the controller decides whether to probe it. */
TRACEPOINT_PROBE(sched, sched_process_exec)
{
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;

	/* exec storms are rate limited like writes, per process */
	if (!ssl_rate_allowed(tgid))
		return 0;
	struct lt_ssl_event *e = ssl_event_init(LT_SSL_EV_EXEC, 0, -1);
	if (!e) {
		ssl_stat_inc(LT_SSL_LOSS_NOTIFY);
		return 0;
	}
	if (ssl_emit(e, LT_SSL_LOSS_NOTIFY) == 0)
		ssl_stat_inc(LT_SSL_CNT_EXEC);
	return 0;
}

/**
 * A selected process made a new process (a fork, not a thread): the child maps
 * its parent's libraries but carries none of its probes (a per-pid uprobe
 * fires only in its own process's memory), so it is reported like an exec
 * instead of waiting for the rescan. Its mmaps and exit are reported from now on.
 */
TRACEPOINT_PROBE(task, task_newtask)
{
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	__u32 child = (__u32)args->pid;
	__u8 one = 1;

	if ((args->clone_flags & LT_CLONE_THREAD) || !lt_ssl_pids.lookup(&tgid))
		return 0;
	/* fork storms are rate limited like execs, per parent */
	if (!ssl_rate_allowed(tgid))
		return 0;
	lt_ssl_pids.update(&child, &one);
	struct lt_ssl_event *e = ssl_event_init(LT_SSL_EV_FORK, 0, -1);
	if (!e) {
		ssl_stat_inc(LT_SSL_LOSS_NOTIFY);
		return 0;
	}
	e->pid = child;
	e->tgid = child;
	if (ssl_emit(e, LT_SSL_LOSS_NOTIFY) == 0)
		ssl_stat_inc(LT_SSL_CNT_FORK);
	return 0;
}

/**
 * ssl_mmap_wanted - is this mmap an executable mapping of a file we care about
 * The dynamic linker maps a library's text with PROT_EXEC from its fd;
 * with `select: all` any process's mapping matters, else a probed one's.
 */
TRACEPOINT_PROBE(syscalls, sys_enter_mmap)
{
	__u64 pid_tgid;
	__u32 tgid, tid;
	__s32 fd = (__s32)args->fd;

	if (!(args->prot & LT_PROT_EXEC) || (args->flags & LT_MAP_ANONYMOUS) || fd < 0)
		return 0;
	pid_tgid = bpf_get_current_pid_tgid();
	tgid = pid_tgid >> 32;
	tid = (__u32)pid_tgid;
	if (!LT_SSL_MMAP_ALL && !lt_ssl_pids.lookup(&tgid))
		return 0;
	lt_ssl_mmaps.update(&tid, &fd);
	return 0;
}

/* The mapping exists now: the controller may look for libssl in it. */
TRACEPOINT_PROBE(syscalls, sys_exit_mmap)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__u32 tid = (__u32)pid_tgid;
	__s32 *fdp = lt_ssl_mmaps.lookup(&tid);
	__s32 fd;

	if (!fdp)
		return 0;
	fd = *fdp;
	lt_ssl_mmaps.delete(&tid);
	/* -4095..-1 are errors */
	if (args->ret < 0 && args->ret >= -4095)
		return 0;
	if (!ssl_rate_allowed(pid_tgid >> 32))
		return 0;
	struct lt_ssl_event *e = ssl_event_init(LT_SSL_EV_MMAP, 0, fd);
	if (!e) {
		ssl_stat_inc(LT_SSL_LOSS_NOTIFY);
		return 0;
	}
	e->data_off = (__u64)args->ret;
	if (ssl_emit(e, LT_SSL_LOSS_NOTIFY) == 0)
		ssl_stat_inc(LT_SSL_CNT_MMAP);
	return 0;
}

/* A probed process's leader exits: its uprobes can be detached. */
TRACEPOINT_PROBE(sched, sched_process_exit)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__u32 tgid = pid_tgid >> 32;

	if ((__u32)pid_tgid != tgid || !lt_ssl_pids.lookup(&tgid))
		return 0;
	lt_ssl_pids.delete(&tgid);
	lt_ssl_rate.delete(&tgid);
	lt_ssl_budget.delete(&tgid);
	struct lt_ssl_event *e = ssl_event_init(LT_SSL_EV_EXIT, 0, -1);
	if (!e) {
		ssl_stat_inc(LT_SSL_LOSS_NOTIFY);
		return 0;
	}
	if (ssl_emit(e, LT_SSL_LOSS_NOTIFY) == 0)
		ssl_stat_inc(LT_SSL_CNT_EXIT);
	return 0;
}
