"""BPF_PROG_TEST_RUN: run a loaded program on a frame without a network.

Used by `leaktap replay` (each pcap frame through the real compiled program),
by the kernel tests and by the perf/ micro-benchmarks. Calls libbpf's
``bpf_prog_test_run_opts``; the options struct below is libbpf's API, not a
kernel/user type of ours.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from dataclasses import dataclass
from functools import cache

from leaktap.controller.errors import ProbeLoadError

ETH_HLEN = 14
# The kernel builds a test-run skb in one page: PAGE_SIZE - NET_SKB_PAD (64)
# - SKB_DATA_ALIGN(sizeof(struct skb_shared_info)) (320) on x86_64.
MAX_FRAME = os.sysconf("SC_PAGE_SIZE") - 64 - 320


class _TestRunOpts(ctypes.Structure):
    # struct bpf_test_run_opts, libbpf >= 0.7 (libbpf/src/bpf.h)
    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("data_in", ctypes.c_void_p),
        ("data_out", ctypes.c_void_p),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_void_p),
        ("ctx_out", ctypes.c_void_p),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("repeat", ctypes.c_int),
        ("duration", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
    ]


class _SkbCtx(ctypes.Structure):
    # Leading part of the UAPI struct __sk_buff up to gso_size: the fields a
    # SCHED_CLS test run accepts as input (net/bpf/test_run.c convert___skb_to_skb).
    _fields_ = [
        ("len", ctypes.c_uint32),
        ("pkt_type", ctypes.c_uint32),
        ("mark", ctypes.c_uint32),
        ("queue_mapping", ctypes.c_uint32),
        ("protocol", ctypes.c_uint32),
        ("vlan_present", ctypes.c_uint32),
        ("vlan_tci", ctypes.c_uint32),
        ("vlan_proto", ctypes.c_uint32),
        ("priority", ctypes.c_uint32),
        ("ingress_ifindex", ctypes.c_uint32),
        ("ifindex", ctypes.c_uint32),
        ("tc_index", ctypes.c_uint32),
        ("cb", ctypes.c_uint32 * 5),
        ("hash", ctypes.c_uint32),
        ("tc_classid", ctypes.c_uint32),
        ("data", ctypes.c_uint32),
        ("data_end", ctypes.c_uint32),
        ("napi_id", ctypes.c_uint32),
        ("family", ctypes.c_uint32),
        ("remote_ip4", ctypes.c_uint32),
        ("local_ip4", ctypes.c_uint32),
        ("remote_ip6", ctypes.c_uint32 * 4),
        ("local_ip6", ctypes.c_uint32 * 4),
        ("remote_port", ctypes.c_uint32),
        ("local_port", ctypes.c_uint32),
        ("data_meta", ctypes.c_uint32),
        ("flow_keys", ctypes.c_uint64),
        ("tstamp", ctypes.c_uint64),
        ("wire_len", ctypes.c_uint32),
        ("gso_segs", ctypes.c_uint32),
        ("sk", ctypes.c_uint64),
        ("gso_size", ctypes.c_uint32),
    ]


@cache
def _libbpf() -> ctypes.CDLL:
    name = ctypes.util.find_library("bpf") or "libbpf.so.1"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
        fn = lib.bpf_prog_test_run_opts
    except (OSError, AttributeError) as e:
        raise ProbeLoadError(
            f"libbpf with bpf_prog_test_run_opts not found ({name}): apt-get install libbpf1"
        ) from e
    fn.argtypes = [ctypes.c_int, ctypes.POINTER(_TestRunOpts)]
    fn.restype = ctypes.c_int
    return lib


# A TC (SCHED_CLS) test run refuses, with EINVAL, an IPv4 or IPv6 frame too
# short for its IP header after Ethernet (net/bpf/test_run.c reads the header
# to fill the skb's socket); XDP and an attached program see such frames.
_TC_MIN_L3 = {0x0800: 20, 0x86DD: 40}


def tc_refuses(frame: bytes) -> bool:
    """True when BPF_PROG_TEST_RUN of a TC program would reject `frame` as too short."""
    if len(frame) < ETH_HLEN:
        return True
    ethertype = int.from_bytes(frame[12:14], "big")
    return len(frame) < ETH_HLEN + _TC_MIN_L3.get(ethertype, 0)


@dataclass(frozen=True, slots=True)
class RunResult:
    retval: int
    duration_ns: int  # average per repetition, as the kernel measured it


def run_frame(
    prog_fd: int, frame: bytes, *, repeat: int = 1, gso_segs: int = 0, gso_size: int = 0
) -> RunResult:
    """Run `frame` (an Ethernet frame, >= 14 bytes) through a TC or XDP program.

    gso_segs/gso_size describe a GSO super-packet (TC programs only).
    """
    if not ETH_HLEN <= len(frame) <= MAX_FRAME:
        raise ValueError(f"a test-run frame has {ETH_HLEN}..{MAX_FRAME} bytes, got {len(frame)}")
    data = ctypes.create_string_buffer(bytes(frame), len(frame))
    opts = _TestRunOpts()
    opts.sz = ctypes.sizeof(_TestRunOpts)
    opts.data_in = ctypes.cast(data, ctypes.c_void_p)
    opts.data_size_in = len(frame)
    opts.repeat = repeat
    ctx = None
    if gso_segs or gso_size:
        ctx = _SkbCtx(gso_segs=gso_segs, gso_size=gso_size)
        opts.ctx_in = ctypes.cast(ctypes.pointer(ctx), ctypes.c_void_p)
        opts.ctx_size_in = ctypes.sizeof(_SkbCtx)
    rc = _libbpf().bpf_prog_test_run_opts(prog_fd, ctypes.byref(opts))
    if rc != 0:
        err = ctypes.get_errno() or -rc
        raise OSError(err, f"BPF_PROG_TEST_RUN failed: {os.strerror(err)}")
    return RunResult(retval=int(opts.retval), duration_ns=int(opts.duration))


class FrameRunner:
    """One frame run again and again through a program, patched in place between runs
    (`frame` is the writable buffer): what a benchmark's producer needs to offer tens
    of thousands of distinct packets per second, without a buffer and options per run."""

    def __init__(self, prog_fd: int, frame: bytes) -> None:
        if not ETH_HLEN <= len(frame) <= MAX_FRAME:
            raise ValueError(
                f"a test-run frame has {ETH_HLEN}..{MAX_FRAME} bytes, got {len(frame)}")
        self.frame = ctypes.create_string_buffer(bytes(frame), len(frame))
        self._opts = _TestRunOpts()
        self._opts.sz = ctypes.sizeof(_TestRunOpts)
        self._opts.data_in = ctypes.cast(self.frame, ctypes.c_void_p)
        self._opts.data_size_in = len(frame)
        self._opts.repeat = 1
        self._fd = prog_fd
        self._ref = ctypes.byref(self._opts)
        self._call = _libbpf().bpf_prog_test_run_opts

    def run(self) -> int:
        """Run the frame as it is now; returns the program's return value."""
        rc = self._call(self._fd, self._ref)
        if rc != 0:
            err = ctypes.get_errno() or -rc
            raise OSError(err, f"BPF_PROG_TEST_RUN failed: {os.strerror(err)}")
        return int(self._opts.retval)


def supported() -> bool:
    """True when libbpf's test-run entry point is available."""
    try:
        _libbpf()
    except ProbeLoadError:
        return False
    return True


__all__ = ["ETH_HLEN", "MAX_FRAME", "FrameRunner", "RunResult", "run_frame", "supported",
           "tc_refuses"]
