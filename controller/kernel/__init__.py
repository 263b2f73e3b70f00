"""The kernel side as Python sees it: compiling, loading, pinning and attaching the
BPF programs, the shared ABI, reading maps and draining ring buffers."""
