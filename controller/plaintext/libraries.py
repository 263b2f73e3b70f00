"""Where the system's shared TLS library lives: the file the uprobes attach to."""

from __future__ import annotations

import logging
import shutil
import subprocess

logger = logging.getLogger(__name__)

LIBSSL_SONAME = "libssl.so.3"


def find_shared_library(soname: str) -> str | None:
    """Return the path the dynamic linker would use for `soname`, from `ldconfig -p`."""
    ldconfig = shutil.which("ldconfig") or "/sbin/ldconfig"
    try:
        listing = subprocess.run(
            [ldconfig, "-p"], capture_output=True, text=True, check=True, timeout=10
        ).stdout
    except (OSError, subprocess.SubprocessError) as e:
        logger.info("ldconfig -p failed (%s); cannot locate %s", e, soname)
        return None
    # "\tlibssl.so.3 (libc6,x86-64) => /lib/x86_64-linux-gnu/libssl.so.3"
    for entry in listing.splitlines():
        name, _, rest = entry.strip().partition(" ")
        if name == soname and "=>" in rest:
            return rest.split("=>", 1)[1].strip()
    return None
