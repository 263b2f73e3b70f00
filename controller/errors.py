"""Errors the CLI reports as one clear line (exit 2) instead of a traceback."""


class LeaktapError(Exception):
    """Base of every error meant for the user."""


class ConfigError(LeaktapError):
    """The configuration file is unreadable or invalid; the message names key and line."""


class ProbeLoadError(LeaktapError):
    """A BPF program failed to compile, load or attach."""


class PcapError(LeaktapError):
    """A capture file is malformed or truncated; the message names the packet number."""
