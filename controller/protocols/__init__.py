"""Pure, bounded parsers of what the kernel samples: TLS and QUIC ClientHellos, DNS
messages, and pcap/pcapng captures. No state beyond one message, no I/O."""
