"""TLS plaintext inspection: which processes and libraries to probe, decoding the
uprobe events, and the monitor that feeds them to the content inspectors."""
