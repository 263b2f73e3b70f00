"""Content inspection of TLS plaintext samples (pure Python, never imports bcc).

The controller hands each captured write to `inspector.ContentInspector`;
the plaintext lives only for the duration of that call. What leaves this
package (findings, audit records) holds finding types, offsets, keyed hashes
and masked excerpts, never the raw bytes: see `redact`.
"""
