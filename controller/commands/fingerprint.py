"""`leaktap fingerprint add | list | remove`: a tenant's records as keyed hashes.

`add --tenant T --name N FILE [--columns a,b] [--min-matches 3]` reads a CSV (with
a header row) or JSONL export, keeps only keyed hashes of the selected values
(see controller/fingerprint_store) and bumps the generation a running agent
polls. The key is the agent's per-install secret (plaintext.hmac_secret_file,
else plaintext-hmac.key beside storage.path), so build sets on the host, with
the configuration, of the agent that uses them.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from leaktap.analytics.plaintext.fingerprints import ValueHasher, fingerprint_key
from leaktap.analytics.plaintext.redact import KeyedHasher
from leaktap.controller.config import DEFAULT_DB, LeaktapConfig, load_config, with_database
from leaktap.controller.fingerprint_store import (
    FingerprintError,
    FingerprintStore,
    build_set,
    check_name,
    detect_format,
)


def value_hasher(config: LeaktapConfig) -> ValueHasher:
    """The agent's fingerprint hasher: the same secret file the plaintext monitor reads."""
    from leaktap.controller.plaintext.monitor import SECRET_FILE, load_or_create_secret

    pt = config.plaintext
    path = Path(pt.hmac_secret_file) if pt.hmac_secret_file else (
        Path(config.storage.path or DEFAULT_DB).parent / SECRET_FILE)
    return ValueHasher(fingerprint_key(KeyedHasher(load_or_create_secret(path))))


def _add(args: Any, config: LeaktapConfig, store: FingerprintStore, out: TextIO) -> int:
    tenant = check_name("tenant", args.tenant)
    name = check_name("name", args.name)
    known = {t.name for t in config.tenants}
    if known and tenant not in known:
        raise FingerprintError(f"--tenant {tenant}: no such tenant in the configuration")
    columns = [c.strip() for c in args.columns.split(",") if c.strip()] if args.columns else None
    path = Path(args.file)
    hasher = value_hasher(config)
    started = time.monotonic()
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            fmt = args.format or detect_format(path.name, f.read(64))
            f.seek(0)
            cols, arrays, stats = build_set(hasher, f, str(path), fmt, columns)
    except OSError as e:
        raise FingerprintError(f"{path}: {e.strerror}") from e
    record = store.add(tenant, name, cols, args.min_matches, arrays, stats, hasher.key_id)
    summary = {k: v for k, v in record.public().items() if k != "key_id"}
    summary["build_s"] = round(time.monotonic() - started, 2)
    out.write(json.dumps(summary) + "\n")
    return 0


def main(args: Any, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    config = with_database(load_config(args.config), args.db)
    db = Path(config.storage.path or DEFAULT_DB)
    with FingerprintStore(db) as store:
        if args.action == "add":
            return _add(args, config, store, out)
        if args.action == "list":
            for record in store.sets():
                out.write(json.dumps(record.public()) + "\n")
            return 0
        if not store.remove(args.tenant, args.name):
            raise FingerprintError(f"no fingerprint set {args.tenant}/{args.name}")
        out.write(json.dumps({"removed": f"{args.tenant}/{args.name}"}) + "\n")
        return 0

