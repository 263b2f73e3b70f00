/* SPDX-License-Identifier: GPL-2.0 OR Apache-2.0 */
/*
 * ssl_go.bpf.c - Go crypto/tls plaintext (issue 13.1), compiled after
 * ssl_uprobe.bpf.c in one text (loader.MODE_SOURCES["ssl"]): its events go to
 * the same ring (lt_ssl_events), in the same format, under the same
 * per-process budget, chunking and loss accounting as OpenSSL's, so the
 * stream pipeline treats a Go connection like any other. The connection key
 * (ssl_ptr) is the *tls.Conn pointer.
 *
 * Go >= 1.17 on amd64 passes arguments in registers (ABIInternal):
 *   func (c *Conn) Write(b []byte) (int, error): c in AX, b.ptr in BX, b.len in CX
 *   func (c *Conn) Read(b []byte) (int, error):  same; n returns in AX
 * and keeps the running goroutine's g in R14.
 *
 * No uretprobes: a uretprobe overwrites the return address on the goroutine
 * stack, which the Go runtime copies elsewhere when the stack grows, and the
 * program crashes on return. Read's returns are probed at its RET
 * instructions (controller/plaintext/golang.py finds them by disassembly);
 * the entry records the buffer per goroutine (g, process), since a goroutine
 * that blocks in Read resumes on whichever thread the scheduler picks.
 *
 * The socket of a Conn (for attribution to the CRM destination) is read from
 * memory: tls.Conn.conn is a net.Conn interface (itab, data) at offset 0;
 * for a *net.TCPConn its data points at conn{fd *netFD}; netFD starts with
 * poll.FD, whose Sysfd follows the 16-byte fdMutex. These offsets hold for
 * Go 1.9 through 1.23 (golang.FD_LAYOUT_MINORS); for other versions the
 * controller attaches lt_go_write_nofd, and the fd is learned, as for OpenSSL
 * memory BIOs, from the thread's next send syscall carrying a TLS record.
 * A Conn over something other than a TCP socket yields an fd that the
 * controller's /proc lookup does not find to be TCP: the write is unjoined,
 * not misattributed to another connection's destination.
 */

#define LT_GO_CONN_IFACE_DATA 8   /* tls.Conn.conn (net.Conn): data word */
#define LT_GO_NETFD_SYSFD 16      /* netFD.pfd (poll.FD).Sysfd, after fdMutex */
#define LT_GO_FD_MAX (1 << 24)    /* larger is not an fd: the Conn is not over TCP */

/* (g, process) -> the Read call in progress on that goroutine */
struct lt_go_read_call {
	__u64 conn;
	__u64 buf;
	__u64 cap;
};

BPF_TABLE("lru_hash", struct lt_ssl_key, struct lt_go_read_call, lt_go_reads,
	  LT_SSL_THREADS_MAX);

/**
 * go_learn_fd - bind a *tls.Conn to its socket fd, read through its net.Conn
 * Updates lt_ssl_fds only when the fd changed (a Conn's memory reused by a
 * later connection is rebound on its first write).
 */
static __always_inline void go_learn_fd(__u64 conn)
{
	struct lt_ssl_key key = {};
	struct lt_ssl_sock *known;
	__u64 data = 0, netfd = 0;
	__s64 fd = -1;

	if (bpf_probe_read_user(&data, sizeof(data), (void *)(conn + LT_GO_CONN_IFACE_DATA)) ||
	    !data || bpf_probe_read_user(&netfd, sizeof(netfd), (void *)data) || !netfd ||
	    bpf_probe_read_user(&fd, sizeof(fd), (void *)(netfd + LT_GO_NETFD_SYSFD)) ||
	    fd < 0 || fd >= LT_GO_FD_MAX) {
		ssl_stat_inc(LT_SSL_LOSS_GO_FD);
		return;
	}
	key.ssl_ptr = conn;
	key.tgid = bpf_get_current_pid_tgid() >> 32;
	known = lt_ssl_fds.lookup(&key);
	if (known && known->fd == (__s32)fd && known->via_set_fd)
		return;
	struct lt_ssl_sock sock = { .fd = (__s32)fd, .via_set_fd = 1 };

	lt_ssl_fds.update(&key, &sock);
	ssl_stat_inc(LT_SSL_CNT_GO_FD);
}

/* crypto/tls.(*Conn).Write, after its stack check: the whole write is in b */
int lt_go_write(struct pt_regs *ctx)
{
	go_learn_fd(ctx->ax);
	return ssl_write_common(ctx->ax, (const void *)ctx->bx, ctx->cx);
}

/* the same, for a Go whose struct layout is not known: fd from the send syscall */
int lt_go_write_nofd(struct pt_regs *ctx)
{
	return ssl_write_common(ctx->ax, (const void *)ctx->bx, ctx->cx);
}

/* crypto/tls.(*Conn).Read, after its stack check: remember b for the return */
int lt_go_read(struct pt_regs *ctx)
{
	struct lt_ssl_key key = {};
	struct lt_go_read_call call = { .conn = ctx->ax, .buf = ctx->bx, .cap = ctx->cx };

	key.ssl_ptr = ctx->r14;  /* g: the goroutine */
	key.tgid = bpf_get_current_pid_tgid() >> 32;
	lt_go_reads.update(&key, &call);
	return 0;
}

/* a RET of crypto/tls.(*Conn).Read: n = AX bytes of b are plaintext read */
int lt_go_read_ret(struct pt_regs *ctx)
{
	struct lt_ssl_key key = {};
	struct lt_go_read_call *call;
	__s64 n = (__s64)ctx->ax;

	key.ssl_ptr = ctx->r14;
	key.tgid = bpf_get_current_pid_tgid() >> 32;
	call = lt_go_reads.lookup(&key);
	if (!call) {
		ssl_stat_inc(LT_SSL_LOSS_GO_UNMATCHED);
		return 0;
	}
	struct lt_go_read_call c = *call;

	lt_go_reads.delete(&key);
	if (n <= 0 || (__u64)n > c.cap)
		return 0;
	/* the from_crm direction, through the read side's capture (ssl_uprobe.bpf.c) */
	return ssl_read_capture(c.conn, (const void *)c.buf, (__u64)n);
}
