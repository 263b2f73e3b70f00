"""Types of the compiled fingerprint prefilter (_prefilter.c)."""

# (run buffer, where its words end, runs, indexes, starts and lengths of the runs passed)
Scan = tuple[bytes, int, int, list[int], list[int], list[int]]
# (run buffer, where its words end, starts, lengths, prefilter keys as 8-byte LE)
Runs = tuple[bytes, int, list[int], list[int], bytes]

class Scanner:
    aesni: int  # 1: AES-NI encrypts, 0: OpenSSL (LEAKTAP_NO_AESNI=1 when it was made)
    simd: int  # 1: views translated 16 bytes at a time, 0: bytewise (LEAKTAP_NO_SIMD=1)
    def __init__(self, key: bytes) -> None: ...
    def scan(self, data: bytes, words: memoryview, pairs: memoryview,
             shift: int) -> Scan | None: ...
    def tokens(self, data: bytes) -> Runs | None: ...
    def probe(self, blocks: bytes, words: memoryview, pairs: memoryview,
              shift: int) -> list[int]: ...
